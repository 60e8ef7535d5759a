"""A copy of a bundle with another per-cell refiner, everything else kept: compares refiners by accuracy and
time with the same segmenter, gate, classifier and domain check (docs/performance.md, "The light refiner").

    python scripts/swap_refiner.py --bundle models/default --checkpoint models/checkpoints/light-refiner.pt --out DIR

The refiner checkpoint is exported as the pipeline exports one (export/onnx.py, parity-checked), at the crop
size it was trained at; the manifest's refiner section takes that size, the architecture, the FLOPs and
the checkpoint's training record. The old refiner's INT8 file is left out (`leukoedge calibrate` makes one
for the new refiner), so the copy runs its refiner in FP32. Bundle 0.4.0 was such a copy, given its version,
changelog and calibration afterwards (docs/training.md, "Bundle 0.4.0").
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


def swap_refiner(bundle_dir: Path, checkpoint: Path, out_dir: Path) -> Path:
    """Write the copy of bundle_dir with checkpoint's refiner to out_dir; returns out_dir."""
    from leukoedge.export.onnx import export_segmenter
    from leukoedge.training.flops import count_flops
    from leukoedge.training.pipeline import architecture_label
    from leukoedge.training.train import load_checkpoint, trained_input_size

    bundle = load_bundle(bundle_dir)
    manifest = copy.deepcopy(bundle.manifest)
    refiner, record = load_checkpoint(checkpoint)
    size = trained_input_size(record) or tuple(manifest["refiner"]["input_size"])
    # Parity needs inputs in the range crops take (stain-normalized, ~zero mean, unit range), not real cells.
    crops = np.random.default_rng(0).normal(0.0, 1.0, (8, 3, *size)).astype(np.float32)
    int8_files = {variant.get("file") for variant in manifest.get("precisions", {}).get("refiner", {}).values()} - {manifest["refiner"]["file"], None}
    with tempfile.TemporaryDirectory() as scratch:
        refiner_file = Path(scratch) / manifest["refiner"]["file"]
        parity = export_segmenter(refiner, crops, refiner_file, input_name=manifest["refiner"]["input"])
        manifest["refiner"].update(
            input_size=list(size), architecture=architecture_label(record["config"]), flops=count_flops(refiner, (1, 3, *size))
        )
        manifest["training"]["refiner"] = {**record, "onnx_parity_max_abs": parity, "checkpoint": str(checkpoint)}
        if "refiner_sources" in record:  # what the new refiner learnt from, not the old one's
            manifest["refiner"]["sources"] = manifest["training"]["refiner_sources"] = list(record["refiner_sources"])
        if "precisions" in manifest:
            manifest["precisions"]["refiner"] = {"fp32": {"file": manifest["refiner"]["file"], "median_ms": None}}
        files = {name: bundle.root / name for name in manifest["files"] if name not in int8_files}
        files[manifest["refiner"]["file"]] = refiner_file
        save_bundle(out_dir, manifest, files)
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="the bundle to copy (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the refiner checkpoint (.pt with its .json)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the copy to")
    args = parser.parse_args()
    print(f"bundle with the refiner of {args.checkpoint} written to {swap_refiner(args.bundle, args.checkpoint, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
