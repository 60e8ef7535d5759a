"""Long runs: many frames through one Detector, watching resident memory and latency drift.

A leak of a few kB per frame never shows in a unit test and takes a device down after days in a
clinic; a soak run makes it visible. Resident memory is read after the warm-up (ONNX Runtime's
arenas and OpenCV's buffers grow on the first frames, once) and again at the end; latency is
compared between the first and the last 10 % of frames.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .errors import LeukoedgeError

log = logging.getLogger("leukoedge.soak")

MAX_GROWTH_MB = 5.0  # MB = 2**20 bytes throughout this module
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
    """Memory and latency of a soak run; growth and drift are end minus start."""

    frames: int
    warmup: int
    start_rss_mb: float
    end_rss_mb: float
    rss_source: str
    first_median_ms: float  # median latency of the first 10 % of frames
    last_median_ms: float  # median latency of the last 10 % of frames
    window: int  # frames in each 10 % window

    @property
    def growth_mb(self) -> float:
        return self.end_rss_mb - self.start_rss_mb

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
        return "\n".join(
            [
                f"frames: {self.frames} after {self.warmup} warm-up",
                f"resident memory ({self.rss_source}): start {self.start_rss_mb:.1f} MB, end {self.end_rss_mb:.1f} MB, "
                f"growth {self.growth_mb:+.1f} MB (limit {max_growth_mb:.1f} MB)",
                f"latency: first 10 % median {self.first_median_ms:.1f} ms, last 10 % median {self.last_median_ms:.1f} ms, "
                f"drift {self.drift_ms:+.1f} ms ({drift_percent:+.1f} %), {self.window} frames each",
                f"result: {verdict}",
            ]
        )


def run_soak(detector: FrameRunner, frames: Sequence[np.ndarray], count: int, warmup: int = 10) -> SoakReport:
    """Run `count` frames (cycling through `frames`) after `warmup` untimed ones; one result alive at a time."""
    if count < 1 or not frames:
        raise LeukoedgeError(f"a soak run needs at least one frame and a count >= 1, got {len(frames)} frame(s) and count {count}")
    for index in range(warmup):
        detector.run(frames[index % len(frames)])
    gc.collect()  # garbage from the warm-up must not count as growth (nor hide it)
    start_rss, source = resident_mb()
    latencies_ms = np.empty(count)
    window = max(1, count // 10)
    for index in range(count):
        started = time.perf_counter()
        detector.run(frames[index % len(frames)])
        latencies_ms[index] = (time.perf_counter() - started) * 1000.0
        if (index + 1) % window == 0:
            log.info("frame %d/%d: resident %.1f MB, last frame %.1f ms", index + 1, count, resident_mb()[0], latencies_ms[index])
    gc.collect()
    end_rss, _ = resident_mb()
    return SoakReport(
        frames=count,
        warmup=warmup,
        start_rss_mb=start_rss,
        end_rss_mb=end_rss,
        rss_source=source,
        first_median_ms=float(np.median(latencies_ms[:window])),
        last_median_ms=float(np.median(latencies_ms[-window:])),
        window=window,
    )
