"""Field-validation sessions: the recorder's files and numbers, the loop's stops, review, and `leukoedge run --source`."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import Detector, session
from leukoedge.capture import Frame, FrameSource, ThreadedReader
from leukoedge.cli import main as cli_main
from leukoedge.errors import CaptureError, LeukoedgeError, StorageError
from leukoedge.result import CYTOPLASM, NUCLEUS, Cell, Result, Timings, make_verdict
from leukoedge.session import (
    RESERVE_BYTES,
    STOPPED_UNRECORDED,
    ProgressDisplay,
    SessionRecorder,
    capture_session,
    open_reader,
    repair_session,
    review_session,
    run_session,
    wilson_interval,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO_ROOT / "samples").glob("bccd_*.jpg"))  # real BCCD fields shipped with the project
HEADS = {"blast": ["normal", "blast"], "wbc_type": ["lymphocyte", "monocyte", "neutrophil"]}
BLAST_THRESHOLD, FLAG_FRACTION = 0.5, 0.2
FIELD_SIZE = (320, 240)


def smear_field(number: int) -> np.ndarray:
    return cv2.resize(cv2.imread(str(SAMPLES[number % len(SAMPLES)])), FIELD_SIZE, interpolation=cv2.INTER_AREA)


def hand_made_cell(cell_id: int, box: tuple[int, int, int, int], blast_probability: float, wbc_type: str) -> Cell:
    x0, y0, x1, y1 = box
    mask = np.ones((y1 - y0, x1 - x0), dtype=bool)
    nucleus_mask = mask.copy()
    nucleus_mask[: (y1 - y0) // 2] = False
    blast_scores = {"normal": 1.0 - blast_probability, "blast": blast_probability}
    wbc_scores = {name: 0.8 if name == wbc_type else 0.1 for name in HEADS["wbc_type"]}
    label = "blast" if blast_probability >= BLAST_THRESHOLD else "normal"
    return Cell(cell_id, box, mask, nucleus_mask, label, blast_scores, blast_probability, {"blast": blast_scores, "wbc_type": wbc_scores})


def hand_made_result(image: np.ndarray, cells: list[Cell]) -> Result:
    label_map = np.zeros(image.shape[:2], dtype=np.uint8)
    for cell in cells:
        x0, y0, x1, y1 = cell.box
        label_map[y0:y1, x0:x1][cell.mask] = CYTOPLASM
        label_map[y0:y1, x0:x1][cell.nucleus_mask] = NUCLEUS
    timings = Timings(capture_ms=1.0, preprocess_ms=2.0, segment_ms=10.0, postprocess_ms=1.0, classify_ms=3.0, total_ms=16.0)
    verdict = make_verdict(cells, BLAST_THRESHOLD, FLAG_FRACTION)
    return Result(label_map, cells, verdict, timings.as_dict(), image.shape[:2], "hand-made", "0.0.1")


# Stream indices with a gap (frame 2 dropped); cells as (blast_probability, wbc_type).
PLANNED_FRAMES = [
    (0, [(0.9, "lymphocyte"), (0.2, "neutrophil")]),
    (1, [(0.7, "monocyte")]),
    (3, []),
    (4, [(0.1, "lymphocyte"), (0.5, "lymphocyte")]),
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A session of PLANNED_FRAMES recorded with save_every=2: 5 cells, 3 blasts (p >= 0.5). Read only."""
    folder = tmp_path_factory.mktemp("recorded") / "session"
    recorder = SessionRecorder(folder, HEADS, "blast", save_every=2, source="hand-made")
    for index, planned in PLANNED_FRAMES:
        image = smear_field(index)
        cells = [hand_made_cell(n + 1, (10 + 40 * n, 20, 40 + 40 * n, 60), p, kind) for n, (p, kind) in enumerate(planned)]
        recorder.record(Frame(image, index, time.monotonic(), 1.0, "hand-made"), hand_made_result(image, cells))
    summary = recorder.finish({"frames": 5, "dropped": 1, "reconnects": 2}, "end of source")
    return folder, summary


def read_results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def read_cells(folder: Path) -> list[dict[str, str]]:
    with (folder / "cells.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_wilson_interval_matches_newcombe_1998() -> None:
    # Newcombe, Stat Med 17 (1998) 857-872, table I, method 3 (score interval without continuity correction).
    for successes, n, expected in [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718))]:
        assert wilson_interval(successes, n) == pytest.approx(expected, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_recorder_writes_every_file_one_line_per_frame(recorded: tuple[Path, dict]) -> None:
    folder, _ = recorded
    saved = ["frame_000000.png", "frame_000003.png"]  # every 2nd processed frame, named by stream index
    for name in ("frames", "overlays"):
        assert sorted(p.name for p in (folder / name).iterdir()) == saved
        assert all(cv2.imread(str(folder / name / file)).shape == (240, 320, 3) for file in saved)
    for name in ("summary.json", "summary.html", "summary_plot.png", "timings.csv"):
        assert (folder / name).is_file(), name
    results = read_results(folder)
    assert [r["index"] for r in results] == [0, 1, 3, 4]
    assert [len(r["cells"]) for r in results] == [2, 1, 0, 2]
    assert [r["overlay_file"] for r in results] == ["overlays/frame_000000.png", None, "overlays/frame_000003.png", None]
    assert all("mask" not in cell and "nucleus_mask" not in cell for r in results for cell in r["cells"])
    assert all(r["timings"]["end_to_end"] >= 0 and r["timings"]["segment"] == 10.0 for r in results)
    with (folder / "timings.csv").open(newline="") as file:
        timings = list(csv.DictReader(file))
    assert [row["frame"] for row in timings] == ["0", "1", "3", "4"]
    assert {float(row["total_ms"]) for row in timings} == {16.0}


def test_cells_csv_has_a_row_per_cell_with_every_heads_top_class(recorded: tuple[Path, dict]) -> None:
    folder, _ = recorded
    rows = read_cells(folder)
    assert len(rows) == sum(len(r["cells"]) for r in read_results(folder)) == 5
    assert [(row["frame"], row["id"]) for row in rows] == [("0", "1"), ("0", "2"), ("1", "1"), ("4", "1"), ("4", "2")]
    assert [row["label"] for row in rows] == ["blast", "normal", "blast", "normal", "blast"]
    assert [row["wbc_type_class"] for row in rows] == ["lymphocyte", "neutrophil", "monocyte", "lymphocyte", "lymphocyte"]
    assert [float(row["blast_probability"]) for row in rows] == [0.9, 0.2, 0.7, 0.1, 0.5]
    assert (rows[0]["x0"], rows[0]["y0"], rows[0]["x1"], rows[0]["y1"]) == ("10", "20", "40", "60")
    assert (float(rows[0]["wbc_type_class_probability"]), rows[1]["blast_class"], float(rows[1]["blast_class_probability"])) == pytest.approx((0.8, "normal", 0.8))


def test_summary_counts_fraction_interval_latency_and_capture_faults(recorded: tuple[Path, dict]) -> None:
    folder, summary = recorded
    assert json.loads((folder / "summary.json").read_text()) == summary
    assert (summary["frames_processed"], summary["cells"], summary["blasts"]) == (4, 5, 3)
    assert summary["blast_fraction"] == pytest.approx(3 / 5)
    low, high = summary["blast_fraction_ci95"]
    assert (low, high) == pytest.approx(wilson_interval(3, 5)) and low < 3 / 5 < high
    assert summary["class_counts"] == {"blast": {"normal": 2, "blast": 3}, "wbc_type": {"lymphocyte": 3, "monocyte": 1, "neutrophil": 1}}
    assert summary["flagged_frames"] == 3  # every frame with cells has >= 20 % blasts
    assert (summary["dropped_frames"], summary["reconnects"], summary["frames_saved"]) == (1, 2, 2)
    assert summary["latency_ms"]["segment"] == {"median": 10.0, "p95": 10.0, "frames": 4}
    assert set(summary["latency_ms"]) == {*Timings(capture_ms=0.0).as_dict(), "end_to_end"} >= {"capture", "segment", "classify", "total"}


def test_summary_html_shows_the_numbers_the_plot_and_every_saved_overlay(recorded: tuple[Path, dict]) -> None:
    folder, _ = recorded
    page = (folder / "summary.html").read_text()
    for text in ('src="summary_plot.png"', 'src="overlays/frame_000000.png"', 'src="overlays/frame_000003.png"', "60.0%", "reviewer&#x27;s count"):
        assert text in page, text
    plot = cv2.imread(str(folder / "summary_plot.png"))
    assert plot is not None and plot.shape[0] > 200


def test_summary_without_matplotlib_still_writes_html_saying_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    recorder = SessionRecorder(tmp_path, HEADS, "blast", save_every=1)
    image = smear_field(0)
    recorder.record(Frame(image, 0, time.monotonic(), 1.0, "hand-made"), hand_made_result(image, []))
    recorder.finish({}, "end of source")
    assert "pip install matplotlib" in (tmp_path / "summary.html").read_text()
    assert not (tmp_path / "summary_plot.png").exists()


def test_a_folder_holding_a_session_is_never_overwritten(recorded: tuple[Path, dict]) -> None:
    folder, _ = recorded
    with pytest.raises(LeukoedgeError, match="already holds a session"):
        SessionRecorder(folder, HEADS, "blast")


def write_summary(folder: Path, blasts: int, cells: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"blasts": blasts, "cells": cells, "blast_fraction": blasts / cells if cells else None, "blast_fraction_ci95": list(wilson_interval(blasts, cells))}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_review_compares_blast_fractions_interval_and_cell_counts(tmp_path: Path) -> None:
    write_summary(tmp_path, blasts=30, cells=200)  # 15 %, 95 % CI about 10.7 % to 20.7 %
    outside = review_session(tmp_path, blasts=24, total=100)
    assert outside["difference"] == pytest.approx(0.15 - 0.24)
    assert outside["hematologist_within_leukoedge_ci"] is False
    assert outside["cell_count_ratio"] == 2.0
    assert outside["hematologist"]["blast_fraction_ci95"] == pytest.approx(wilson_interval(24, 100))
    assert json.loads((tmp_path / "review.json").read_text()) == outside
    inside = review_session(tmp_path, blasts=16, total=100)
    assert inside["difference"] == pytest.approx(-0.01)
    assert inside["hematologist_within_leukoedge_ci"] is True


def test_review_of_a_session_without_cells_compares_nothing(tmp_path: Path) -> None:
    write_summary(tmp_path, blasts=0, cells=0)
    review = review_session(tmp_path, blasts=5, total=100)
    assert (review["difference"], review["hematologist_within_leukoedge_ci"], review["cell_count_ratio"]) == (None, None, 0.0)


@pytest.mark.parametrize(("blasts", "total", "words"), [(5, 3, "0 <= blasts <= total"), (0, 0, "total > 0"), (-1, 10, "0 <= blasts")])
def test_review_refuses_an_impossible_count(tmp_path: Path, blasts: int, total: int, words: str) -> None:
    write_summary(tmp_path, blasts=1, cells=10)
    with pytest.raises(LeukoedgeError, match=words):
        review_session(tmp_path, blasts, total)


def test_review_needs_a_finished_session(tmp_path: Path) -> None:
    with pytest.raises(LeukoedgeError, match="summary.json not found"):
        review_session(tmp_path, 1, 10)


class TerminalBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


class LineSource:
    def progress_line(self, show_timings: bool) -> str:
        return "frames 1" + ("  ms total 5" if show_timings else "")


def test_progress_rewrites_one_line_on_a_terminal_and_prints_lines_on_a_pipe() -> None:
    terminal = TerminalBuffer()
    display = ProgressDisplay(terminal, show_timings=True, interval_s=0.0)
    display(LineSource())
    display(LineSource())
    assert terminal.getvalue() == "\rframes 1  ms total 5" * 2
    display.close()
    assert terminal.getvalue().endswith("\n")
    pipe = io.StringIO()
    ProgressDisplay(pipe, pipe_interval_s=0.0)(LineSource())
    assert pipe.getvalue() == "frames 1\n"


# --- with a real detector --------------------------------------------------------------------------


def test_capture_session_over_a_recording_processes_every_frame(shared_detector: Detector, smear_video: Path, tmp_path: Path) -> None:
    summary = capture_session(smear_video, shared_detector, tmp_path / "session", save_every=2)
    folder = tmp_path / "session"
    results = read_results(folder)
    assert (summary["frames_processed"], summary["stopped_by"], summary["dropped_frames"]) == (6, "end of source", 0)
    assert [r["index"] for r in results] == list(range(6))
    assert len(read_cells(folder)) == sum(len(r["cells"]) for r in results) == summary["cells"]
    assert summary["blasts"] == sum(r["verdict"]["blast_count"] for r in results)
    if summary["cells"]:
        assert summary["blast_fraction"] == pytest.approx(summary["blasts"] / summary["cells"])
        low, high = summary["blast_fraction_ci95"]
        assert low <= summary["blast_fraction"] <= high
    else:
        assert summary["blast_fraction"] is None and summary["blast_fraction_ci95"] == [0.0, 1.0]
    assert len(list((folder / "overlays").glob("*.png"))) == summary["frames_saved"] == 3
    assert summary["latency_ms"]["total"]["frames"] == 6


def test_stop_request_ends_the_session_after_the_frame_in_progress(shared_detector: Detector, smear_video: Path, tmp_path: Path) -> None:
    stop = threading.Event()

    def stop_after_two(recorder: SessionRecorder) -> None:
        if recorder.frames_processed == 2:
            stop.set()

    recorder = SessionRecorder.for_detector(tmp_path, shared_detector, save_every=1)
    summary = run_session(shared_detector, open_reader(smear_video), recorder, stop=stop, on_frame=stop_after_two)
    assert (summary["stopped_by"], summary["frames_processed"]) == ("interrupted", 2)
    assert len(read_results(tmp_path)) == 2
    assert json.loads((tmp_path / "summary.json").read_text())["frames_processed"] == 2


def test_a_refused_frame_is_recorded_and_the_session_goes_on(shared_detector: Detector, tmp_path: Path) -> None:
    folder = tmp_path / "fields"
    folder.mkdir()
    side = shared_detector.limits["min_frame_side"] - 1  # below the bundle's limit: InvalidFrameError
    cv2.imwrite(str(folder / "a_too_small.png"), cv2.resize(smear_field(0), (side, side)))
    cv2.imwrite(str(folder / "b_field.png"), smear_field(1))
    recorder = SessionRecorder.for_detector(tmp_path / "session", shared_detector, save_every=1)
    summary = run_session(shared_detector, open_reader(folder), recorder)
    results = read_results(tmp_path / "session")
    assert "error" in results[0] and "verdict" not in results[0]
    assert "verdict" in results[1]
    assert (summary["frames_refused"], summary["frames_processed"], summary["stopped_by"]) == (1, 1, "end of source")


class FailingCamera(FrameSource):
    """A live source that delivers one real field, then fails as an unplugged camera does."""

    live = True
    uri = "failing://camera"

    def __init__(self) -> None:
        self.delivered = 0

    def read(self) -> Frame | None:
        if self.delivered:
            raise OSError("camera cable pulled")
        self.delivered += 1
        return Frame(smear_field(0), 0, time.monotonic(), 0.0, self.uri)

    def close(self) -> None:
        pass


def test_a_camera_that_fails_for_good_still_leaves_a_summary(shared_detector: Detector, tmp_path: Path) -> None:
    recorder = SessionRecorder.for_detector(tmp_path, shared_detector)
    reader = ThreadedReader(FailingCamera, reconnect=False)
    with pytest.raises(CaptureError, match="camera cable pulled"):
        run_session(shared_detector, reader, recorder)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"].startswith("CaptureError")
    assert "camera cable pulled" in summary["capture"]["last_error"]
    assert len(read_results(tmp_path)) == summary["frames_processed"] <= 1


# --- leukoedge run --source ------------------------------------------------------------------------


def test_cli_live_mode_records_a_session(bundle_path: Path, smear_video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "session"
    code = cli_main(["run", "--source", str(smear_video), "--frames", "3", "--show-timings", "--bundle", str(bundle_path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "segment" in printed.splitlines()[0]  # the progress line, with timings
    assert "frames processed 3" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["frames_processed"], summary["stopped_by"]) == (3, "frame limit")
    assert len(read_results(out)) == 3


def test_a_session_over_a_folder_counts_the_files_it_skipped_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(REPO_ROOT / "samples" / "bccd_BloodImage_00002.jpg", frames / "field.jpg")
    (frames / "empty.jpg").write_bytes(b"")
    cv2.imwrite(str(frames / "grey.png"), np.full((100, 100), 128, np.uint8))
    out = tmp_path / "session"
    assert cli_main(["run", str(frames), "--session", "--out", str(out)]) == 1  # as without --session: some input never judged
    printed = capsys.readouterr().out
    assert "files or frames skipped 2 (unreadable, damaged, greyscale or deeper than 8 bits" in printed
    assert json.loads((out / "summary.json").read_text())["files_skipped"] == 2
    assert "files or frames skipped (unreadable, damaged, greyscale, deeper than 8 bits, indexed colour)</td><td>2<" in (out / "summary.html").read_text()


@pytest.mark.parametrize("arguments", [["run"], ["run", "samples", "--source", "0"]])
def test_cli_run_needs_exactly_one_of_images_and_source(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(arguments) == 2
    assert "exactly one of" in capsys.readouterr().err


@pytest.mark.parametrize("max_frames", [0, -1])
def test_a_session_of_no_frames_is_refused(tmp_path: Path, max_frames: int) -> None:
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        capture_session(tmp_path / "no-source.avi", None, tmp_path / "session", max_frames=max_frames)  # type: ignore[arg-type]
    assert not (tmp_path / "session").exists()


# --- full disks, killed sessions, impatient Ctrl-C -------------------------------------------------


class HandMadeDetector:
    """Detector.run and classifier_spec over PLANNED_FRAMES' cells, cycled: a session without models."""

    classifier_spec = {"heads": {head: {"classes": classes} for head, classes in HEADS.items()}, "primary_head": "blast"}

    def __init__(self) -> None:
        self.calls = 0

    def run(self, image: np.ndarray, capture_ms: float | None = None, jpeg_quality: int | None = None) -> Result:
        planned = PLANNED_FRAMES[self.calls % len(PLANNED_FRAMES)][1]
        self.calls += 1
        return hand_made_result(image, [hand_made_cell(n + 1, (10 + 40 * n, 20, 40 + 40 * n, 60), p, kind) for n, (p, kind) in enumerate(planned)])


def write_fields(folder: Path, count: int) -> Path:
    """A folder of `count` real fields (hard links of one PNG): a long recording that costs no disk."""
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "field_000.png"), smear_field(0))
    for number in range(1, count):
        os.link(folder / "field_000.png", folder / f"field_{number:03d}.png")
    return folder


class FillingDisk:
    """The os module as the session sees it on a disk with `free` bytes left: the write that reaches
    the end is cut short and the next one fails with ENOSPC, as on a full disk."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, bytes(data[: self.free]))
        self.free -= written
        return written


def assert_whole_session(folder: Path) -> dict:
    """Every file of the session agrees with results.jsonl, whose every line is a whole record; returns the summary."""
    text = (folder / "results.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    results = read_results(folder)
    processed = [r for r in results if "verdict" in r]
    assert [(int(row["frame"]), int(row["id"])) for row in read_cells(folder)] == [(r["index"], c["id"]) for r in processed for c in r["cells"]]
    with (folder / "timings.csv").open(newline="") as file:
        assert [int(row["frame"]) for row in csv.DictReader(file)] == [r["index"] for r in processed]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["frames_processed"] == len(processed)
    assert summary["cells"] == sum(r["verdict"]["cell_count"] for r in processed)
    assert (folder / "summary.html").is_file() and not (folder / ".summary-reserve").exists()
    return summary


def test_a_disk_that_fills_mid_line_ends_the_session_with_whole_records_and_a_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "session"
    recorder = SessionRecorder(folder, HEADS, "blast", save_every=100, source="fields")
    monkeypatch.setattr(session.files, "os", FillingDisk(free=2500))  # a few frames' lines, the last cut mid-line
    reader = open_reader(write_fields(tmp_path / "fields", 40))
    with pytest.raises(StorageError, match="No space left on device"):
        run_session(HandMadeDetector(), reader, recorder)
    monkeypatch.undo()

    summary = assert_whole_session(folder)
    assert 1 <= summary["frames_processed"] < 40
    assert summary["ended_early"] is True
    assert summary["stopped_by"].startswith("StorageError") and "No space left on device" in summary["stopped_by"]
    assert "ENDED EARLY" in (folder / "summary.html").read_text()
    assert "ENDED EARLY: StorageError" in session.format_summary(summary)
    review = review_session(folder, blasts=1, total=10)
    assert review["session_ended_early"] is True and review["leukoedge"]["cells"] == summary["cells"]


def test_a_frame_whose_overlay_cannot_be_written_leaves_no_image_and_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "session"
    recorder = SessionRecorder(folder, HEADS, "blast", save_every=1)
    real_open = open

    def full_for_overlays(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "overlays" in str(path) and "frame_000002" in str(path):
            file = real_open(path, mode, *args, **kwargs)
            file.write(b"\x89PNG half")  # a first block made it to the disk
            file.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(session.files, "open", full_for_overlays, raising=False)
    with pytest.raises(StorageError, match="frame_000002.png: No space left on device"):
        run_session(HandMadeDetector(), open_reader(write_fields(tmp_path / "fields", 5)), recorder)
    monkeypatch.undo()
    summary = assert_whole_session(folder)
    assert summary["frames_processed"] == 2 and summary["ended_early"]
    for name in ("frames", "overlays"):
        assert sorted(p.name for p in (folder / name).iterdir()) == ["frame_000000.png", "frame_000001.png"]


def test_a_session_cannot_start_without_room_for_its_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_room(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room, raising=False)
    monkeypatch.setattr(session.files, "os", FillingDisk(free=0))
    with pytest.raises(StorageError, match=f"needs at least {RESERVE_BYTES >> 10} kB free"):
        SessionRecorder(tmp_path / "session", HEADS, "blast")
    assert not (tmp_path / "session" / ".summary-reserve").exists()


def test_a_killed_session_is_rebuilt_from_its_records(tmp_path: Path) -> None:
    folder = tmp_path / "session"
    recorder = SessionRecorder(folder, HEADS, "blast", save_every=2, source="hand-made")
    for index, planned in PLANNED_FRAMES:
        image = smear_field(index)
        cells = [hand_made_cell(n + 1, (10 + 40 * n, 20, 40 + 40 * n, 60), p, kind) for n, (p, kind) in enumerate(planned)]
        recorder.record(Frame(image, index, time.monotonic(), 1.0, "hand-made"), hand_made_result(image, cells))
    # Killed: no finish(); an older leukoedge's half-written last line, and a cells.csv row of a frame never recorded.
    with (folder / "results.jsonl").open("a") as file:
        file.write('{"index": 5, "timestamp": 17')
    with (folder / "cells.csv").open("a") as file:
        file.write("5,1,0,0,9,9,81,40,blast,0.9000,blast,0.9000,lymphocyte,0.8000\r\n")
    assert (folder / ".summary-reserve").stat().st_size == RESERVE_BYTES

    summary = repair_session(folder)

    assert_whole_session(folder)
    assert (summary["frames_processed"], summary["cells"], summary["blasts"], summary["frames_saved"]) == (4, 5, 3, 2)
    assert (summary["ended_early"], summary["stopped_by"]) == (True, STOPPED_UNRECORDED)
    assert summary["dropped_frames"] == 1  # frame 2 is missing from the numbering
    assert summary["class_counts"]["blast"] == {"normal": 2, "blast": 3}
    assert repair_session(folder) == summary  # a second repair finds the summary and leaves it


def test_review_rebuilds_the_summary_of_a_killed_session(tmp_path: Path) -> None:
    folder = tmp_path / "session"
    recorder = SessionRecorder(folder, HEADS, "blast")
    image = smear_field(0)
    recorder.record(Frame(image, 0, time.monotonic(), 1.0, "hand-made"), hand_made_result(image, [hand_made_cell(1, (10, 20, 40, 60), 0.9, "monocyte")]))
    review = review_session(folder, blasts=1, total=2)
    assert (review["leukoedge"]["cells"], review["session_ended_early"]) == (1, True)
    assert json.loads((folder / "summary.json").read_text())["stopped_by"] == STOPPED_UNRECORDED


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler, as in a terminal: a job started in the background inherits SIGINT ignored,
    and the session rightly hands a second Ctrl-C to whatever handler it found."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_while_the_summary_is_written_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, python_ctrl_c) -> None:
    draw_plot = session.report.plot_session

    def impatient_user(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # stop, please
        os.kill(os.getpid(), signal.SIGINT)  # now!
        time.sleep(0.05)  # both are delivered while the plot is drawn
        draw_plot(*args)

    monkeypatch.setattr(session.report, "plot_session", impatient_user)
    folder = tmp_path / "session"
    with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C still acts, once the summary is whole
        capture_session(write_fields(tmp_path / "fields", 3), HandMadeDetector(), folder, save_every=1)  # type: ignore[arg-type]
    summary = assert_whole_session(folder)
    assert (summary["stopped_by"], summary["frames_processed"]) == ("end of source", 3)
    assert 'src="summary_plot.png"' in (folder / "summary.html").read_text()


def user_namespaces_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or not user_namespaces_mount(), reason="needs `unshare -rm` (user namespaces) to mount a small tmpfs")
def test_a_real_full_disk_ends_the_cli_session_with_a_summary_and_a_failed_image_run_says_so(bundle_path: Path, tmp_path: Path) -> None:
    fields = write_fields(tmp_path / "fields", 150)
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    png = len(cv2.imencode(".png", smear_field(0))[1])
    # The reserve, frame 0 and its overlay (save-every 1000), a page for each other file, then ~30 kB of records.
    size_kb = (RESERVE_BYTES + 2 * png) // 1024 + 56
    leukoedge = f"{sys.executable} -m leukoedge.cli"
    script = f"""
        mount -t tmpfs -o size={size_kb}k tmpfs {disk} || exit 77
        {leukoedge} run --source {fields} --bundle {bundle_path} --out {disk}/session --save-every 1000 >{kept}.session.out 2>{kept}.session.err
        echo $? >{kept}.session.rc
        cp -r {disk}/session {kept}
        cat /dev/zero >{disk}/filler 2>/dev/null
        {leukoedge} run {fields}/field_000.png --bundle {bundle_path} --out {disk}/images >{kept}.images.out 2>{kept}.images.err
        echo $? >{kept}.images.rc
        ls {disk}/images >{kept}.images.ls
    """
    completed = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert completed.returncode == 0, completed.stderr

    session_err = Path(f"{kept}.session.err").read_text()
    assert Path(f"{kept}.session.rc").read_text().strip() == "2", session_err
    assert "No space left on device" in session_err and "Traceback" not in session_err
    assert f"the session up to the failure is written to {disk}/session" in session_err
    summary = assert_whole_session(kept)
    assert summary["ended_early"] and 1 <= summary["frames_processed"] < 150
    assert review_session(kept, blasts=1, total=10)["leukoedge"]["cells"] == summary["cells"]

    images_err = Path(f"{kept}.images.err").read_text()
    assert Path(f"{kept}.images.rc").read_text().strip() == "2", images_err
    assert "No space left on device" in images_err and "Traceback" not in images_err
    assert "written to" not in Path(f"{kept}.images.out").read_text()
    assert Path(f"{kept}.images.ls").read_text().split() == []  # no truncated overlay left behind


def test_frames_not_judged_are_counted_by_status_next_to_the_flagged_ones(tmp_path: Path) -> None:
    from leukoedge.result import Verdict

    recorder = SessionRecorder(tmp_path / "session", HEADS, "blast", save_every=1, source="hand-made")
    image = smear_field(0)
    flagged = hand_made_result(image, [hand_made_cell(1, (10, 20, 40, 60), 0.9, "lymphocyte")])
    empty = hand_made_result(image, [])  # no white cell: status no_cells
    refused = Verdict.not_judged("outside_domain", "colours unlike the validated stains", BLAST_THRESHOLD, FLAG_FRACTION)
    outside = Result(**{**empty.__dict__, "verdict": refused})
    for index, result in enumerate([flagged, empty, outside, empty]):
        recorder.record(Frame(image, index, time.monotonic(), 1.0, "hand-made"), result)
    summary = recorder.finish({}, "end of source")
    assert (summary["flagged_frames"], summary["frames_not_judged"]) == (1, 3)
    assert summary["frames_not_judged_by_status"] == {"no_cells": 2, "outside_domain": 1}
    assert "frames flagged 1, not judged 3 (no_cells 2, outside_domain 1)" in session.format_summary(summary)
    page = (tmp_path / "session" / "summary.html").read_text()
    assert "<td>frames not judged (status)</td><td>3 (no_cells 2, outside_domain 1)</td>" in page
    assert page.count("<td>not judged: no_cells</td>") == 2 and "<td>not judged: outside_domain</td>" in page and "<td>FLAGGED</td>" in page
    assert repair_session(tmp_path / "session")["frames_not_judged_by_status"] == summary["frames_not_judged_by_status"]
