"""Architectures timed before any training, as the pipeline would run them: shared by scripts/refiner_speed.py
and scripts/segmenter_speed.py (imported from this folder, which Python puts first on the path of a script run
from it).

A model is exported as the pipeline exports a segmenter or refiner (export/onnx.py, softmax included) and run by
leukoedge's own ONNX Runtime backend; several models take turns call by call, their order rotating from round to
round, so whatever else loads the machine loads them alike.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402

WARMUP_CALLS = 3


def exported_segmenter(model, input_shape: Sequence[int], path: Path, input_name: str) -> tuple[Path, float]:
    """The ONNX file of a segmenter (or refiner) `model` for inputs of input_shape (N, 3, H, W; the batch stays
    dynamic), and its MFLOPs per image."""
    import torch

    from leukoedge.export.onnx import SegmenterWithSoftmax, export_onnx
    from leukoedge.training.flops import count_flops

    model = model.eval()
    export_onnx(SegmenterWithSoftmax(model), torch.zeros(tuple(input_shape)), path, input_name, ["probs"])
    return path, count_flops(model, (1, *input_shape[1:])) / 1e6


def time_interleaved(paths: Sequence[Path], feeds: Sequence[dict[str, np.ndarray]], runs: int, threads: int) -> list[np.ndarray]:
    """ms per call of each ONNX file on its feed: WARMUP_CALLS untimed rounds, then `runs` timed ones."""
    backends = [OnnxRuntimeBackend(path, threads=threads) for path in paths]
    times: list[list[float]] = [[] for _ in backends]
    for run in range(runs + WARMUP_CALLS):
        for index in np.roll(np.arange(len(backends)), run):
            started = time.perf_counter()
            backends[index].run(feeds[index])
            if run >= WARMUP_CALLS:
                times[index].append((time.perf_counter() - started) * 1000.0)
    return [np.asarray(measured) for measured in times]


def median_p95(ms: np.ndarray) -> tuple[float, float]:
    return float(np.median(ms)), float(np.percentile(ms, 95))
