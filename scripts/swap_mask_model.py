"""A copy of a bundle with another field segmenter or per-cell refiner, everything else kept: compares them by
accuracy and time with the same other models (docs/performance.md, "The light refiner", "A lighter field segmenter").

    python scripts/swap_mask_model.py --model refiner --bundle models/default --checkpoint models/checkpoints/light-refiner.pt --out DIR
    python scripts/swap_mask_model.py --model segmenter --bundle models/default --checkpoint CKPT --out DIR
    python scripts/swap_mask_model.py --model refiner --bundle DIR --drop --out DIR2    # no refiner at all

The checkpoint is exported as the pipeline exports one (export/onnx.py, softmax included, parity-checked). The
refiner takes the crop size it was trained at; the segmenter keeps the bundle's input size (its input is the
whole field, whatever window it was trained on). The manifest's section takes the architecture and the FLOPs,
and `training.<model>` the checkpoint's training record. The old model's INT8 file is left out (`leukoedge
calibrate` makes one for the new model), so the copy runs it in FP32. Bundle 0.4.0 was such a copy with another
refiner, given its version, changelog and calibration afterwards (docs/training.md, "Bundle 0.4.0").
A new segmenter changes the proposals the gate was trained on and the uncertainty the domain check reads: refit
both on the copy (`leukoedge gate --bundle DIR --out GATED`) before its figures mean anything. Without a refiner
(--drop) the field segmenter's masks and boxes are final: the domain check's smallest cell side reads those boxes,
so refit it (`scripts/refit_domain.py`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.bundle import load_bundle, save_bundle  # noqa: E402

MASK_MODELS = ("segmenter", "refiner")


def swap_mask_model(bundle_dir: Path, model: str, checkpoint: Path, out_dir: Path) -> Path:
    """Write the copy of bundle_dir with checkpoint as its `model` (segmenter or refiner) to out_dir; returns out_dir."""
    from leukoedge.export.onnx import export_segmenter
    from leukoedge.training.flops import count_flops
    from leukoedge.training.pipeline import architecture_label
    from leukoedge.training.train import load_checkpoint, trained_input_size

    if model not in MASK_MODELS:
        raise ValueError(f"--model must be one of {', '.join(MASK_MODELS)}, got {model!r}")
    bundle = load_bundle(bundle_dir)
    manifest = copy.deepcopy(bundle.manifest)
    if model not in manifest:
        raise ValueError(f"bundle {bundle_dir} has no {model} to swap")
    section = manifest[model]
    network, record = load_checkpoint(checkpoint)
    size = tuple(section["input_size"]) if model == "segmenter" else trained_input_size(record) or tuple(section["input_size"])
    # Parity needs inputs in the range the model's inputs take (stain-normalized, ~zero mean, unit range).
    inputs = np.random.default_rng(0).normal(0.0, 1.0, (8 if model == "refiner" else 2, 3, *size)).astype(np.float32)
    int8_files = {variant.get("file") for variant in manifest.get("precisions", {}).get(model, {}).values()} - {section["file"], None}
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / section["file"]
        parity = export_segmenter(network, inputs, model_file, input_name=section["input"])
        section.update(input_size=list(size), architecture=architecture_label(record["config"]), flops=count_flops(network, (1, 3, *size)))
        manifest["training"][model] = {**record, "onnx_parity_max_abs": parity, "checkpoint": str(checkpoint)}
        if model == "refiner" and "refiner_sources" in record:  # what the new refiner learnt from, not the old one's
            section["sources"] = manifest["training"]["refiner_sources"] = list(record["refiner_sources"])
        if "precisions" in manifest:
            manifest["precisions"][model] = {"fp32": {"file": section["file"], "median_ms": None}}
        files = {name: bundle.root / name for name in manifest["files"] if name not in int8_files}
        files[section["file"]] = model_file
        save_bundle(out_dir, manifest, files)
    return out_dir


def drop_refiner(bundle_dir: Path, out_dir: Path) -> Path:
    """Write the copy of bundle_dir without its refiner (its files, precisions and training record) to out_dir."""
    bundle = load_bundle(bundle_dir)
    manifest = copy.deepcopy(bundle.manifest)
    if "refiner" not in manifest:
        raise ValueError(f"bundle {bundle_dir} has no refiner to drop")
    refiner = manifest.pop("refiner")
    dropped = {refiner["file"]} | {variant.get("file") for variant in manifest.get("precisions", {}).pop("refiner", {}).values()}
    manifest["training"]["refiner"] = "dropped by scripts/swap_mask_model.py --drop: the field segmenter's masks are final"
    manifest["files"] = {name: digest for name, digest in manifest["files"].items() if name not in dropped}
    save_bundle(out_dir, manifest, {name: bundle.root / name for name in manifest["files"]})
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MASK_MODELS, default="refiner", help="which model to swap (default: %(default)s)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="the bundle to copy (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint (.pt with its .json)")
    parser.add_argument("--drop", action="store_true", help="no refiner: write the copy without one (--model refiner only)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the copy to")
    args = parser.parse_args()
    if args.drop:
        if args.model != "refiner" or args.checkpoint is not None:
            parser.error("--drop takes --model refiner and no --checkpoint")
        print(f"bundle without a refiner written to {drop_refiner(args.bundle, args.out)}; refit its domain check: scripts/refit_domain.py")
        return 0
    if args.checkpoint is None:
        parser.error("--checkpoint is required (or --drop)")
    written = swap_mask_model(args.bundle, args.model, args.checkpoint, args.out)
    print(f"bundle with the {args.model} of {args.checkpoint} written to {written}")
    if args.model == "segmenter":
        print(f"the gate and the domain check were fitted with the old segmenter: leukoedge gate --data DATA --bundle {written} --out GATED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
