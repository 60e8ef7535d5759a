"""A copy of a bundle with another cell classifier, everything else kept: compares classifiers by accuracy and
time with the same segmenter, refiner, gate, domain check and verdict threshold (docs/performance.md,
"A lighter classifier").

    python scripts/swap_classifier.py --bundle models/default --checkpoint CKPT --out DIR

The classifier checkpoint is exported as the pipeline exports one (export/onnx.py, parity-checked); its heads
must be the bundle's, class for class, since the verdict, the CLI and the reports read them by name. The
manifest's classifier section takes the checkpoint's crop size, architecture and FLOPs, and
`training.classifier` its training record. The old classifier's INT8 file is left out (it is another
network's; `leukoedge calibrate` makes and gates one for the new classifier), so the copy runs its classifier
in FP32. The verdict's flag fraction stays the bundle's (chosen with the old classifier on the Taleqani
validation fields): the copy differs from the bundle in the classifier's network only.
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


def check_heads(bundle_heads: dict[str, dict], checkpoint_heads: dict[str, list[str]], checkpoint: Path) -> None:
    """ValueError unless the checkpoint has the bundle's heads with the same classes in the same order."""
    expected = {name: head["classes"] for name, head in bundle_heads.items()}
    if checkpoint_heads != expected:
        raise ValueError(f"{checkpoint}: its heads {checkpoint_heads} are not the bundle's {expected}")


def swap_classifier(bundle_dir: Path, checkpoint: Path, out_dir: Path) -> Path:
    """Write the copy of bundle_dir with checkpoint's classifier to out_dir; returns out_dir."""
    from leukoedge.export.onnx import export_classifier
    from leukoedge.training.flops import count_flops
    from leukoedge.training.pipeline import architecture_label
    from leukoedge.training.train import load_checkpoint

    bundle = load_bundle(bundle_dir)
    manifest = copy.deepcopy(bundle.manifest)
    section = manifest["classifier"]
    classifier, record = load_checkpoint(checkpoint, head_classes={name: len(head["classes"]) for name, head in section["heads"].items()})
    check_heads(section["heads"], record.get("heads", {}), checkpoint)
    size = tuple(record["config"]["input_size"])
    # Parity needs inputs in the range crops take (stain-normalized, ~zero mean, unit range), not real cells.
    crops = np.random.default_rng(0).normal(0.0, 1.0, (8, 3, *size)).astype(np.float32)
    int8_files = {variant.get("file") for variant in manifest.get("precisions", {}).get("classifier", {}).values()} - {section["file"], None}
    with tempfile.TemporaryDirectory() as scratch:
        classifier_file = Path(scratch) / section["file"]
        parity = export_classifier(classifier, list(section["heads"]), crops, classifier_file)
        section.update(input_size=list(size), architecture=architecture_label(record["config"]), flops=count_flops(classifier, (1, 3, *size)))
        manifest["training"]["classifier"] = {**record, "onnx_parity_max_abs": parity, "checkpoint": str(checkpoint)}
        if "classification_sources" in record:  # what the new classifier learnt from, not the old one's
            manifest["training"]["classification_sources"] = list(record["classification_sources"])
        if "precisions" in manifest:
            manifest["precisions"]["classifier"] = {"fp32": {"file": section["file"], "median_ms": None}}
        files = {name: bundle.root / name for name in manifest["files"] if name not in int8_files}
        files[section["file"]] = classifier_file
        save_bundle(out_dir, manifest, files)
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="the bundle to copy (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the classifier checkpoint (.pt with its .json)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the copy to")
    args = parser.parse_args()
    print(f"bundle with the classifier of {args.checkpoint} written to {swap_classifier(args.bundle, args.checkpoint, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
