"""A copy of a bundle whose FP32 ONNX graphs have had every rewrite that export now runs for ONNX Runtime's fast path
(export/onnx.onto_fast_path: upsampling by constant whole scales, no channel Concat off the blocked path, no reduction
over a few classes' axis), everything else kept: a bundle exported before a rewrite gets its speed without retraining or
exporting again (docs/performance.md, "The image's concat split", "Constant upsampling scales" and "The class axis
split").

    python scripts/rewrite_bundle_graphs.py --bundle models/default --out DIR --version 0.18.0 \
        --change "what changed, for the manifest's changelog"

Each rewritten model is checked against its original on the same inputs (at most export/onnx.PARITY_TOLERANCE apart;
the rewrites change float rounding only), timed against it (printed: median ms a call, the two files' calls
interleaved) and, where it has an INT8 file, timed again beside it, as `leukoedge calibrate` times them
(calibration/speed.py), so that the manifest's precisions still say which precision is faster; a rewrite that would
switch a model's precision is refused. INT8 files are kept: they compute the same function, quantized from the graph
before the rewrite. (Until bundle 0.17.0 it was split_bundle_concats.py and applied the concat split only.)
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.bundle import bundle_models, fastest_precision, load_bundle, save_bundle  # noqa: E402


COMPARISON_RUNS = 300  # calls of each file, interleaved: a gain can be a few per cent of a millisecond-long call


def max_difference(before: Path, after: Path, inputs: np.ndarray) -> float:
    """The largest difference between two ONNX files' outputs on the same inputs (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (before, after)]
    name = sessions[0].get_inputs()[0].name
    outputs = [session.run(None, {name: inputs}) for session in sessions]
    return max(float(np.abs(a - b).max()) for a, b in zip(*outputs))


def rewrite_bundle(bundle_dir: Path, out_dir: Path, version: str, change: str) -> dict[str, float]:
    """Write the copy to out_dir; returns each rewritten model's largest output difference from its original."""
    from leukoedge.calibration.speed import median_latency_ms
    from leukoedge.export.onnx import PARITY_TOLERANCE, onto_fast_path

    bundle = load_bundle(bundle_dir)
    manifest = copy.deepcopy(bundle.manifest)
    if version in manifest.get("changelog", {}):  # a bundle straight from training has no changelog yet
        raise ValueError(f"the bundle's changelog already has {version}: choose a new version")
    files = {name: bundle.root / name for name in manifest["files"]}
    timing = manifest.get("precisions", {}).get("timing", {})
    differences = {}
    with tempfile.TemporaryDirectory() as scratch:
        for model in bundle_models(manifest):
            section = manifest[model]
            original = bundle.root / section["file"]
            rewritten = Path(scratch) / section["file"]
            shutil.copyfile(original, rewritten)
            onto_fast_path(rewritten)
            if rewritten.read_bytes() == original.read_bytes():
                continue
            batch = int(timing.get(f"{model}_batch", 1))
            inputs = np.random.default_rng(0).normal(0.0, 1.0, (batch, 3, *section["input_size"])).astype(np.float32)
            differences[model] = max_difference(original, rewritten, inputs)
            if differences[model] > PARITY_TOLERANCE:
                raise RuntimeError(f"{model}: the rewritten graph differs from the original by {differences[model]:.3g} (> {PARITY_TOLERANCE:g})")
            files[section["file"]] = rewritten
            runs, threads = int(timing.get("runs", 20)), timing.get("threads")
            speed = median_latency_ms({"before": original, "after": rewritten}, inputs, runs=COMPARISON_RUNS, threads=threads)
            print(f"{model}: {speed['before']:.2f} -> {speed['after']:.2f} ms a call (median of {COMPARISON_RUNS}, batch {batch}, calls interleaved)")
            variants = manifest.get("precisions", {}).get(model, {})
            timed = {precision: Path(files[variant["file"]]) for precision, variant in variants.items() if variant.get("file")}
            if len(timed) > 1:  # a model with one file keeps its calibration's figures: nothing to choose between
                before = fastest_precision(bundle.manifest, model)
                latency = median_latency_ms(timed, inputs, runs=runs, threads=threads)
                for precision, ms in latency.items():
                    variants[precision]["median_ms"] = ms
                after = fastest_precision(manifest, model)
                if after != before:
                    # A rewrite that is meant to change float rounding only must not switch a model to another precision.
                    raise RuntimeError(f"{model}: timed again, {after} came out faster than {before} ({latency}); rerun on a quiet machine")
        manifest["model_version"] = version
        manifest.setdefault("changelog", {})[version] = change
        save_bundle(out_dir, manifest, files)
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="the bundle to copy (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the copy to")
    parser.add_argument("--version", required=True, help="the copy's model_version (a new one: its outputs move by float rounding)")
    parser.add_argument("--change", required=True, help="the copy's changelog entry")
    args = parser.parse_args()
    differences = rewrite_bundle(args.bundle, args.out, args.version, args.change)
    for model, difference in differences.items():
        print(f"{model}: rewritten, outputs within {difference:.2g} of the original")
    print(f"bundle {args.version} written to {args.out}" if differences else f"nothing to rewrite; bundle {args.version} written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
