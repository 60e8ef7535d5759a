"""`leukoedge bench`: per-stage latency of Detector.run on real frames.

With --compare, several configurations (ONNX Runtime FP32, ONNX Runtime INT8, the bundle's own mix
of precisions where it has one, PyTorch eager FP32) run in the same process on the same frames, one
frame each in turn (the order rotating from frame to frame), so that whatever else loads the machine
loads every configuration alike; the
table gives per-stage median and p95 ms, frames/s and the ratios of the medians.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import bundle_models, fastest_precision, load_bundle
from .detector import Detector
from .errors import BundleError, LeukoedgeError

STAGES = ("preprocess", "segment", "postprocess", "refine", "classify", "total")
COMPARISON_PAIRS = (
    ("ort int8", "ort fp32"),
    ("ort default", "ort fp32"),
    ("ort fp32", "torch fp32"),
    ("ort int8", "torch fp32"),
    ("ort default", "torch fp32"),
)


@dataclass
class StageTimes:
    """Milliseconds per stage over the timed runs of one configuration."""

    label: str
    ms: dict[str, list[float]] = field(default_factory=dict)

    def median(self, stage: str) -> float:
        return float(np.median(self.ms[stage]))

    def p95(self, stage: str) -> float:
        return float(np.percentile(self.ms[stage], 95))

    @property
    def frames_per_second(self) -> float:
        return 1000.0 / self.median("total")


def time_detectors(detectors: dict[str, Detector], frames: Sequence[np.ndarray], runs: int, warmup: int) -> dict[str, StageTimes]:
    """Run every detector on frames[i % len(frames)] for i in range(runs), in turn, after `warmup` untimed rounds.
    The turn order rotates from frame to frame: whichever configuration runs right after another pays for
    that one's leftovers (its spinning worker threads, the caches it filled), so each takes every place alike."""
    labels = list(detectors)
    for index in range(warmup):
        for detector in detectors.values():
            detector.run(frames[index % len(frames)])
    times = {label: StageTimes(label) for label in detectors}
    for index in range(runs):
        frame = frames[index % len(frames)]
        shift = index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            for stage, ms in detectors[label].run(frame).timings.items():
                times[label].ms.setdefault(stage, []).append(ms)
    return times


def format_single(times: StageTimes) -> str:
    """The classic `leukoedge bench` table: one configuration."""
    lines = [f"{'stage':<12}{'median ms':>10}{'p95 ms':>10}"]
    lines += [f"{stage:<12}{times.median(stage):>10.1f}{times.p95(stage):>10.1f}" for stage in times.ms]
    lines.append(f"frames/s (median total): {times.frames_per_second:.1f}")
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    # Below the printed 0.1 ms the stage did not really run (classify on frames without cells): no ratio.
    return f"{numerator / denominator:.2f}" if denominator >= 0.05 and numerator >= 0.05 else "-"


def format_comparison(times: dict[str, StageTimes], pairs: Sequence[tuple[str, str]]) -> str:
    """Per stage and configuration: median and p95 ms; frames/s; for each (a, b) in pairs the ratio of a's medians to b's."""
    labels = list(times)
    width = max(len(label) for label in labels) + 9
    lines = [f"{'stage':<12}" + "".join(f"{label + ' median':>{width}}{'p95':>8}" for label in labels)]
    for stage in STAGES:
        lines.append(f"{stage:<12}" + "".join(f"{times[label].median(stage):>{width}.1f}{times[label].p95(stage):>8.1f}" for label in labels))
    lines.append("frames/s (median total): " + ", ".join(f"{label} {times[label].frames_per_second:.1f}" for label in labels))
    for numerator, denominator in pairs:
        if numerator in times and denominator in times:
            ratios = ", ".join(
                f"{stage} {_ratio(times[numerator].median(stage), times[denominator].median(stage))}" for stage in ("segment", "refine", "classify", "total")
            )
            lines.append(f"ratio {numerator} / {denominator} (median ms; < 1 is faster): {ratios}")
    return "\n".join(lines)


def comparison_detectors(bundle_path: Path, threads: int | None, checkpoints: Path | None) -> tuple[dict[str, Detector], list[str]]:
    """ONNX Runtime FP32, ONNX Runtime INT8 and PyTorch eager FP32 on the same bundle, and "ort default"
    where the bundle's default mixes precisions (e.g. an INT8 segmenter beside an FP32 classifier whose
    INT8 failed its gate): what Detector.load runs. Returns the detectors and notes: what cannot run here,
    with the reason (no int8 models, no torch, no or mismatched checkpoints), and what "ort default" runs."""
    bundle = load_bundle(bundle_path)
    detectors = {"ort fp32": Detector(bundle, threads=threads, precision="fp32")}
    notes = []
    try:
        detectors["ort int8"] = Detector(bundle, threads=threads, precision="int8")
    except BundleError as error:
        notes.append(f"ort int8 skipped: {error}")
    defaults = {model: fastest_precision(bundle.manifest, model) for model in bundle_models(bundle.manifest)}  # what Detector.load picks
    if len(set(defaults.values())) > 1:  # all one precision: the same as a column above
        detectors["ort default"] = Detector(bundle, threads=threads)
        notes.append("ort default: the bundle's default precision per model (" + ", ".join(f"{m} {p}" for m, p in defaults.items()) + ")")
    try:
        from .training.torch_backend import checkpoint_paths, torch_backends
    except ImportError as error:
        notes.append(f"torch fp32 skipped: {error.name} is not installed (pip install 'leukoedge[train]')")
        return detectors, notes
    try:
        backends = torch_backends(bundle, checkpoint_paths(bundle_path, checkpoints, bundle_models(bundle.manifest)), threads)
    except LeukoedgeError as error:
        notes.append(f"torch fp32 skipped: {error}")
        return detectors, notes
    eager = Detector(bundle, threads=threads, precision="fp32")
    # Same preprocessing and postprocessing; only the model calls run in PyTorch.
    eager.segmenter, eager.classifier, eager.refiner = backends["segmenter"], backends["classifier"], backends.get("refiner")
    eager.backend_name = "torch"
    detectors["torch fp32"] = eager
    return detectors, notes
