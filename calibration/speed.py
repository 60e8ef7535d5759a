"""Latency of model files on this machine, measured side by side (INT8 speed is measured, never assumed)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np


def describe_cpu() -> str:
    """The CPU model and core count, for the record next to every timing."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform's answer stands
    return f"{name}, {os.cpu_count()} logical cores"


def median_latency_ms(models: dict[str, Path], inputs: np.ndarray, runs: int = 20, threads: int | None = None, warmup: int = 3) -> dict[str, float]:
    """Median ms of one call per model on the same input. Calls alternate between the models, so load
    from other processes on the machine falls on every model alike instead of on whichever ran last."""
    import onnxruntime as ort

    from leukoedge.backends.onnxruntime import session_options

    sessions = {
        name: ort.InferenceSession(str(path), sess_options=session_options(ort, threads), providers=["CPUExecutionProvider"])
        for name, path in models.items()
    }
    feeds = {name: {session.get_inputs()[0].name: inputs} for name, session in sessions.items()}
    for _ in range(warmup):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: float(np.median(values)) for name, values in times.items()}
