"""Long runs: many frames through one Detector, watching resident memory and latency drift.

A leak of a few kB per frame never shows in a unit test and takes a device down after days in a
clinic; a soak run makes it visible. ONNX Runtime's arenas and OpenCV's buffers grow over the first
few hundred frames (measured cycling through 100 BCCD fields: +23 MB from frame 10 to frame 200,
then flat within a 3 MB sawtooth that follows the cycle), so the warm-up goes on until resident
memory settles. The growth is then the rise of the least-squares line through resident memory read
after every frame: the sawtooth cannot pass for a leak (or hide one) as a difference of two readings
can. Latency is compared between the first and the last 10 % of frames.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .errors import LeukoedgeError

log = logging.getLogger("leukoedge.soak")

MAX_GROWTH_MB = 5.0  # MB = 2**20 bytes throughout this module
MAX_WARMUP = 2000  # untimed frames at most
SETTLE_ROUND = 50  # warm-up frames per round, at least; a round also covers every frame of the set once
SETTLE_MB = 1.0  # settled: a round's peak resident memory rose less than this above every earlier one
_PROC_STATUS = Path("/proc/self/status")


class FrameRunner(Protocol):
    """What a soak run drives: Detector, or anything with the same run(frame)."""

    def run(self, frame: np.ndarray) -> Any: ...


def resident_mb() -> tuple[float, str]:
    """Resident memory of this process in MB and where the number came from.

    VmRSS (Linux) is the current resident set; the getrusage fallback (macOS, BSD) is the peak,
    which still shows a leak as growth but never shows memory given back.
    """
    try:
        for line in _PROC_STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0, "VmRSS"  # the kernel reports kB
    except OSError:
        pass
    try:
        import resource
    except ImportError as error:
        raise LeukoedgeError("resident memory cannot be read here: no /proc/self/status and no resource module") from error
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024.0), "peak RSS (getrusage)"  # bytes on macOS, kB elsewhere


@dataclass(frozen=True)
class SoakReport:
    """Memory and latency of a soak run; drift is end minus start."""

    frames: int
    warmup: int  # untimed frames run before the start reading
    settled: bool | None  # whether resident memory settled in the warm-up; None: a fixed warm-up, not watched
    start_rss_mb: float
    end_rss_mb: float
    growth_mb: float  # the fitted line's rise over the timed frames
    rss_source: str
    first_median_ms: float  # median latency of the first 10 % of frames
    last_median_ms: float  # median latency of the last 10 % of frames
    window: int  # frames in each 10 % window

    @property
    def drift_ms(self) -> float:
        return self.last_median_ms - self.first_median_ms

    def leaked(self, max_growth_mb: float = MAX_GROWTH_MB) -> bool:
        """Whether resident memory grew by max_growth_mb or more: the run fails."""
        return self.growth_mb >= max_growth_mb

    def format(self, max_growth_mb: float = MAX_GROWTH_MB) -> str:
        """The report `leukoedge soak` prints."""
        drift_percent = 100.0 * self.drift_ms / self.first_median_ms if self.first_median_ms > 0 else 0.0
        verdict = f"FAIL: resident memory grew by >= {max_growth_mb:.1f} MB" if self.leaked(max_growth_mb) else "PASS"
        settling = {
            True: f" (resident memory settled: its peak rose < {SETTLE_MB:.1f} MB in the last round)",
            False: " (resident memory was still growing when the warm-up limit came: growth may include warm-up)",
            None: "",
        }[self.settled]
        return "\n".join(
            [
                f"frames: {self.frames} after {self.warmup} warm-up{settling}",
                f"resident memory ({self.rss_source}): start {self.start_rss_mb:.1f} MB, end {self.end_rss_mb:.1f} MB, "
                f"growth {self.growth_mb:+.1f} MB fitted over the {self.frames} frames (limit {max_growth_mb:.1f} MB)",
                f"latency: first 10 % median {self.first_median_ms:.1f} ms, last 10 % median {self.last_median_ms:.1f} ms, "
                f"drift {self.drift_ms:+.1f} ms ({drift_percent:+.1f} %), {self.window} frames each",
                f"result: {verdict}",
            ]
        )


def warm_up(detector: FrameRunner, frames: Sequence[np.ndarray], minimum: int, maximum: int) -> tuple[int, bool | None]:
    """Untimed frames: `minimum`, then rounds until resident memory settles (a round's peak less than
    SETTLE_MB above the peak before it) or `maximum` frames have run. Returns the frames run and
    whether memory settled (None when maximum <= minimum: a fixed warm-up, not watched)."""
    done = 0

    def round_peak(count: int) -> float:
        nonlocal done
        peak = -math.inf
        for _ in range(count):
            detector.run(frames[done % len(frames)])
            done += 1
            peak = max(peak, resident_mb()[0])
        return peak

    peak = round_peak(minimum)
    if maximum <= minimum:
        return done, None
    while done < maximum:
        latest = round_peak(min(max(SETTLE_ROUND, len(frames)), maximum - done))
        if latest < peak + SETTLE_MB:
            return done, True
        peak = max(peak, latest)
    return done, False


def fitted_growth_mb(readings_mb: np.ndarray) -> float:
    """Rise of the least-squares line through per-frame readings over their span (end minus start for fewer than 3)."""
    if len(readings_mb) < 3:
        return float(readings_mb[-1] - readings_mb[0])
    slope = np.polyfit(np.arange(len(readings_mb)), readings_mb, 1)[0]
    return float(slope * (len(readings_mb) - 1))


def run_soak(detector: FrameRunner, frames: Sequence[np.ndarray], count: int, warmup: int = 10, max_warmup: int = MAX_WARMUP) -> SoakReport:
    """Run `count` frames (cycling through `frames`) after a warm-up of at least `warmup` untimed ones
    that goes on until resident memory settles, at most `max_warmup`; one result alive at a time."""
    if count < 1 or not frames:
        raise LeukoedgeError(f"a soak run needs at least one frame and a count >= 1, got {len(frames)} frame(s) and count {count}")
    warmed, settled = warm_up(detector, frames, warmup, max_warmup)
    gc.collect()  # garbage from the warm-up must not count as growth (nor hide it)
    start_rss, source = resident_mb()
    latencies_ms = np.empty(count)
    readings_mb = np.empty(count + 2)  # the start reading, one after every frame, the end reading
    readings_mb[0] = start_rss
    window = max(1, count // 10)
    for index in range(count):
        started = time.perf_counter()
        detector.run(frames[index % len(frames)])
        latencies_ms[index] = (time.perf_counter() - started) * 1000.0
        readings_mb[index + 1] = resident_mb()[0]
        if (index + 1) % window == 0:
            log.info("frame %d/%d: resident %.1f MB, last frame %.1f ms", index + 1, count, readings_mb[index + 1], latencies_ms[index])
    gc.collect()
    readings_mb[-1], _ = resident_mb()
    return SoakReport(
        frames=count,
        warmup=warmed,
        settled=settled,
        start_rss_mb=start_rss,
        end_rss_mb=float(readings_mb[-1]),
        growth_mb=fitted_growth_mb(readings_mb),
        rss_source=source,
        first_median_ms=float(np.median(latencies_ms[:window])),
        last_median_ms=float(np.median(latencies_ms[-window:])),
        window=window,
    )
