"""The TensorRT half of scripts/gpu_check.sh, on a real GPU: build the shipped bundle's engines at each
precision, run Detector on TensorRT and on ONNX Runtime over samples/, compare labels and verdicts,
print a timing table and what could not be tested, and why. Exit status 1 if a comparison disagrees.

    python scripts/gpu_check.py [--runs 20] [--precisions fp32,fp16,int8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build(bundle: Path, precision: str, not_tested: list[str]) -> float | None:
    """Seconds to build the bundle's engines at `precision`, None if it could not be done."""
    from leukoedge.errors import LeukoedgeError
    from leukoedge.export.tensorrt import export_engines

    started = time.perf_counter()
    try:
        engines = export_engines(bundle, precision)
    except LeukoedgeError as error:
        not_tested.append(f"{precision} engines: {error}")
        return None
    print(f"  {precision}: {', '.join(engine.name for engine in engines)} in {time.perf_counter() - started:.0f} s")
    return time.perf_counter() - started


def add_tensorrt_int8(bundle: Path, scratch: Path) -> None:
    """TensorRT-target QDQ files quantized on the sample frames and recorded as if gated: enough to prove
    that TensorRT builds and runs them, not their accuracy (that is `leukoedge calibrate --target tensorrt`)."""
    from leukoedge.backends.tensorrt import TENSORRT_INT8
    from leukoedge.bundle import bundle_models, load_bundle, save_bundle
    from leukoedge.calibration.quantize import QuantizationSettings, TensorBatches, prepare_for_quantization, quantize_model
    from leukoedge.preprocess.cpu import PreprocessSpec, prepare_frame

    loaded = load_bundle(bundle)
    manifest = loaded.manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    frames = [cv2.imread(str(path)) for path in sorted((REPO / "samples").glob("*.jpg"))]
    files = {name: loaded.path(name) for name in manifest["files"]}
    settings = QuantizationSettings.for_target("tensorrt")
    section = {"calibration": {**settings.to_manifest(), "note": "gpu_check: sample frames only, not gated"}}
    for model in bundle_models(manifest):
        inputs = np.stack([prepare_frame(frame, spec, manifest[model]["input_size"]).tensor[0] for frame in frames])
        prepared = prepare_for_quantization(bundle / manifest[model]["file"], scratch / f"{model}.prepared.onnx")
        name = f"{model}.{settings.file_tag}.onnx"
        files[name] = quantize_model(prepared, scratch / name, settings, scratch / f"{model}.ranges", TensorBatches(manifest[model]["input"], inputs))
        section[model] = {"file": name, "gate": {"passed": True, "metrics": []}, "nodes_to_exclude": []}
    save_bundle(scratch / "staged", {**manifest, TENSORRT_INT8: section}, files)
    shutil.rmtree(bundle)
    shutil.copytree(scratch / "staged", bundle)


def verdict_call(verdict) -> tuple:
    """What a frame's verdict decides (not its float scores, which reduced precisions nudge)."""
    keys = ("status", "flagged", "cell_count", "blast_count", "subtype")
    return tuple(verdict.get(key) if isinstance(verdict, dict) else getattr(verdict, key, None) for key in keys)


def median_ms(detector, frames: list[np.ndarray], runs: int) -> float:
    detector.run(frames[0])  # the first call allocates; not counted
    times = []
    for _ in range(runs):
        for frame in frames:
            started = time.perf_counter()
            detector.run(frame)
            times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed passes over samples/ per configuration")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    args = parser.parse_args()
    from leukoedge import Detector

    not_tested: list[str] = []
    frames = [cv2.imread(str(path)) for path in sorted((REPO / "samples").glob("*.jpg"))]
    precisions = args.precisions.split(",")
    with tempfile.TemporaryDirectory(prefix="leukoedge-gpu-check-") as scratch_name:
        scratch = Path(scratch_name)
        bundle = Path(shutil.copytree(REPO / "models" / "default", scratch / "default", ignore=shutil.ignore_patterns("engines")))
        if "int8" in precisions:
            try:
                add_tensorrt_int8(bundle, scratch)
            except ImportError as error:
                not_tested.append(f"int8 engines: quantizing needs the onnx package (pip install 'leukoedge[train]'): {error}")
                precisions.remove("int8")
        print("engine builds (shipped bundle):")
        built = [precision for precision in precisions if build(bundle, precision, not_tested) is not None]
        reference = Detector.load(bundle, precision="fp32")
        expected = [reference.run(frame) for frame in frames]
        rows = [("onnxruntime cpu", "fp32", median_ms(reference, frames, args.runs), "reference")]
        failures = 0
        configurations = [("tensorrt", precision, "cpu") for precision in built]
        configurations += [("tensorrt", built[-1], "cuda")] if built else []
        for backend, precision, preprocess in configurations:
            try:
                detector = Detector.load(bundle, backend=backend, precision=precision, preprocess=preprocess)
            except Exception as error:  # a check script reports every failure to open a configuration and goes on
                not_tested.append(f"{backend} {precision} with {preprocess} preprocessing: {type(error).__name__}: {error}")
                continue
            results = [detector.run(frame) for frame in frames]
            same_labels = sum([c.label for c in got.cells] == [c.label for c in want.cells] for got, want in zip(results, expected))
            same_verdicts = sum(verdict_call(got.verdict) == verdict_call(want.verdict) for got, want in zip(results, expected))
            agreement = f"labels {same_labels}/{len(frames)}, verdicts {same_verdicts}/{len(frames)}"
            # fp32 must agree exactly on every sample; reduced precisions are reported, not failed.
            failures += precision == "fp32" and (same_labels, same_verdicts) != (len(frames), len(frames))
            rows.append((f"{backend} ({preprocess} preprocess)", precision, median_ms(detector, frames, args.runs), agreement))
    print(f"\nDetector on samples/ ({len(frames)} frames, median ms per frame over {args.runs} passes):")
    print(f"  {'configuration':34} {'precision':9} {'ms':>8}  vs onnxruntime fp32")
    for name, precision, milliseconds, agreement in rows:
        print(f"  {name:34} {precision:9} {milliseconds:8.1f}  {agreement}")
    if not_tested:
        print("\nnot tested here:")
        for reason in not_tested:
            print(f"  - {reason}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
