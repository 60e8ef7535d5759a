"""`leukoedge soak`: resident memory and latency drift over many frames, exit 1 on growth."""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np
import pytest

from leukoedge import Detector, soak
from leukoedge.cli import main
from leukoedge.errors import LeukoedgeError
from leukoedge.soak import MAX_GROWTH_MB, resident_mb, run_soak

SAMPLE_FIELD = Path(__file__).resolve().parents[2] / "samples" / "bccd_BloodImage_00002.jpg"  # a shipped 640x480 BCCD field
REPORT = re.compile(
    r"frames: (?P<frames>\d+) after (?P<warmup>\d+) warm-up(?P<settling>.*)\n"
    r"resident memory \(VmRSS\): start (?P<start>[\d.]+) MB, end (?P<end>[\d.]+) MB, "
    r"growth (?P<growth>[-+][\d.]+) MB fitted over the (?P=frames) frames \(limit 5\.0 MB\)\n"
    r"latency: first 10 % median (?P<first>[\d.]+) ms, last 10 % median (?P<last>[\d.]+) ms, "
    r"drift (?P<drift>[-+][\d.]+) ms \([-+][\d.]+ %\), (?P<window>\d+) frames each\n"
    r"result: (?P<result>PASS|FAIL: resident memory grew by >= 5\.0 MB)\n"
)


class LeakingRunner:
    """Keeps 1 MB per frame, as a result cache without a bound would."""

    def __init__(self) -> None:
        self.kept: list[mmap.mmap] = []

    def run(self, frame: np.ndarray) -> None:
        # Fresh pages from the kernel, written to so they are resident: malloc could hand back memory
        # that earlier tests in this process freed, which is already resident and would not show.
        block = mmap.mmap(-1, 1 << 20)
        block.write(b"\x01" * (1 << 20))
        self.kept.append(block)


class WarmingRunner:
    """Keeps 0.25 MB a frame for its first 120 frames, then nothing more: ONNX Runtime's arenas as measured."""

    def __init__(self) -> None:
        self.leaky = LeakingRunner()
        self.calls = 0

    def run(self, frame: np.ndarray) -> None:
        self.calls += 1
        if self.calls <= 120:
            block = mmap.mmap(-1, 1 << 18)
            block.write(b"\x01" * (1 << 18))
            self.leaky.kept.append(block)


class TidyRunner:
    """Allocates 1 MB per frame and lets it go."""

    def run(self, frame: np.ndarray) -> int:
        return int(np.ones(1 << 20, np.uint8).sum())


class SlowingRunner:
    """1 ms per frame for its first 15 calls (10 warm-up, 5 timed), then 6 ms: a drift of +5 ms.
    It advances its own clock (patched in as the soak's), so a busy machine cannot change the figures."""

    def __init__(self) -> None:
        self.calls = 0
        self.now_s = 0.0

    def perf_counter(self) -> float:
        return self.now_s

    def run(self, frame: np.ndarray) -> None:
        self.calls += 1
        self.now_s += 0.001 if self.calls <= 15 else 0.006


def test_cli_soak_reports_memory_and_drift_over_fifty_real_frames(shared_detector: Detector, capsys: pytest.CaptureFixture[str]):
    if not Path("/proc/self/status").is_file():
        pytest.skip("VmRSS needs /proc (Linux)")
    code = main(["soak", "--bundle", str(shared_detector.bundle.root), "--frames", "50", "--threads", "1", str(SAMPLE_FIELD)])

    output = capsys.readouterr().out
    assert f"bundle {shared_detector.bundle.name}" in output and "1 real frame(s) (640x480)" in output
    report = REPORT.search(output)
    assert report is not None, output
    assert (report["frames"], report["window"]) == ("50", "5")
    assert 10 + 50 <= int(report["warmup"]) <= 2000  # the minimum, then at least one round to see memory settle
    assert "resident memory settled" in report["settling"] or "still growing" in report["settling"]
    assert float(report["drift"]) == pytest.approx(float(report["last"]) - float(report["first"]), abs=0.11)
    assert 0.0 < float(report["first"]) < 60_000.0
    leaked = float(report["growth"]) >= MAX_GROWTH_MB
    assert code == (1 if leaked else 0)
    assert report["result"].startswith("FAIL") == leaked


def test_cli_soak_exits_1_when_memory_grows_by_the_limit(shared_detector: Detector, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    readings = iter(np.arange(100.0, 200.0, 0.5))  # 0.5 MB more at every reading: one per frame
    monkeypatch.setattr(soak, "resident_mb", lambda: (float(next(readings)), "VmRSS"))

    code = main(["soak", "--bundle", str(shared_detector.bundle.root), "--frames", "10", "--warmup", "1", "--max-warmup", "1", str(SAMPLE_FIELD)])

    output = capsys.readouterr().out
    assert code == 1
    assert "frames: 10 after 1 warm-up\n" in output  # a fixed warm-up: memory not watched
    assert "start 100.5 MB, end 106.0 MB, growth +5.5 MB fitted over the 10 frames (limit 5.0 MB)" in output
    assert "result: FAIL: resident memory grew by >= 5.0 MB" in output


def test_growth_during_the_warm_up_is_not_a_leak():
    # Before the warm-up watched memory, 10 untimed frames left 110 x 0.25 MB to count as growth: FAIL.
    report = run_soak(WarmingRunner(), [np.zeros((4, 4, 3), np.uint8)], count=50, warmup=10)
    assert report.settled is True
    assert 120 <= report.warmup <= 120 + 2 * soak.SETTLE_ROUND
    assert report.growth_mb < 1.0
    assert not report.leaked()


def test_memory_that_never_settles_fails_and_says_so():
    report = run_soak(LeakingRunner(), [np.zeros((4, 4, 3), np.uint8)], count=20, warmup=2, max_warmup=60)
    assert (report.settled, report.warmup) == (False, 60)
    assert report.leaked()
    assert "still growing when the warm-up limit came" in report.format()


def test_the_fitted_growth_sees_a_leak_under_a_sawtooth_and_no_leak_in_one():
    frames = np.arange(1000)
    sawtooth = 200.0 + 3.0 * (frames % 100) / 100  # memory that follows a 100-field cycle, as measured
    assert abs(soak.fitted_growth_mb(sawtooth)) < 0.5
    assert soak.fitted_growth_mb(sawtooth[:950]) < 0.5  # ending high in a cycle: end minus start would say +3 MB
    assert soak.fitted_growth_mb(sawtooth + 0.01 * frames) == pytest.approx(10.0, abs=0.5)  # 10 kB a frame


def test_a_leak_shows_as_growth_and_fails():
    report = run_soak(LeakingRunner(), [np.zeros((4, 4, 3), np.uint8)], count=20, warmup=2, max_warmup=2)
    assert report.growth_mb >= 15.0  # 20 MB kept; allocator rounding may hide a little
    assert report.leaked()


def test_memory_given_back_is_no_growth():
    report = run_soak(TidyRunner(), [np.zeros((4, 4, 3), np.uint8)], count=20, warmup=2)
    assert report.settled is True
    assert report.growth_mb < MAX_GROWTH_MB
    assert not report.leaked()


def test_drift_compares_the_first_and_last_tenth_of_frames(monkeypatch: pytest.MonkeyPatch):
    runner = SlowingRunner()
    monkeypatch.setattr(soak, "time", runner)
    report = run_soak(runner, [np.zeros((4, 4, 3), np.uint8)], count=20, warmup=10, max_warmup=10)
    assert report.window == 2
    assert report.first_median_ms == pytest.approx(1.0)
    assert report.last_median_ms == pytest.approx(6.0)
    assert report.drift_ms == pytest.approx(5.0)


def test_resident_memory_is_read_in_mb():
    megabytes, source = resident_mb()
    assert source in ("VmRSS", "peak RSS (getrusage)")
    assert 1.0 < megabytes < 1 << 20


@pytest.mark.parametrize(("frames", "count"), [([], 10), ([np.zeros((4, 4, 3), np.uint8)], 0)], ids=["no-frames", "zero-count"])
def test_a_soak_of_nothing_is_refused(frames: list[np.ndarray], count: int):
    with pytest.raises(LeukoedgeError, match="at least one frame and a count >= 1"):
        run_soak(TidyRunner(), frames, count)
