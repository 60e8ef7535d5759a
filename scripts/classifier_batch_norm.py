"""A classifier trained without a lab, its batch-norm statistics re-estimated on that lab's cells (AdaBN, no labels):
does it call the lab's blasts and normal cells better, and how much does that depend on which cells it adapted to?

    python scripts/classifier_batch_norm.py --data ../shared/data --bundle models/cross-source-classifier \
        --checkpoint models/checkpoints/cross-source-classifier-classifier.pt --shares 0 0.5 1

Two labs the cross-source classifier never saw (it learnt from Taleqani and PBC only):
- ALL-IDB2 (blasts and normal cells): adapted to its training cells (the detected cell nearest each image's centre,
  as `leukoedge evaluate` takes it), scored on its test cells: blast sensitivity, specificity, AUC at the verdict's
  blast threshold. Then adapted to its blasts only and to its normal cells only: a device maker's frames may hold
  either, and the statistics follow whatever they hold.
- TXL-PBC raabin (normal smears): adapted to the annotated white cells of its first 120 training fields, scored on
  those of its first 60 validation fields: the share called blast (every one of them is normal).
The batch-norm mixing is scripts/batch_norm_adaptation.with_device_statistics (share s of the device's statistics).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from batch_norm_adaptation import with_device_statistics  # this folder's sibling scripts
from device_blast_calls import annotated_crops

from leukoedge import Detector
from leukoedge.postprocess import central_box
from leukoedge.training import data
from leukoedge.training.metrics import roc_auc
from leukoedge.training.torch_backend import as_backend, verified_model


def nearest_centre_crops(detector: Detector, records: list[data.Record]) -> tuple[list[np.ndarray], np.ndarray]:
    """The crop of the detected cell nearest each image's centre (images where one was found) and its blast label."""
    crops, labels = [], []
    for record in records:
        image = data.read_image(record)
        found = detector.candidates(image)
        box = central_box([cell.box for cell in found.instances], image.shape)
        if box is None:
            continue
        nearest = next(cell for cell in found.instances if cell.box == box)
        crops.append(detector.cell_crops(image, found.prepared, [nearest]))
        labels.append(record.blast)
    return crops, np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle whose classifier never saw ALL-IDB2 or TXL-PBC raabin")
    parser.add_argument("--checkpoint", type=Path, required=True, help="its classifier's training checkpoint")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    detector = Detector.load(args.bundle)
    spec = detector.classifier_spec
    blast = spec["heads"]["blast"]
    threshold = detector.verdict_spec["blast_threshold"]
    classifier = verified_model(detector.bundle, "classifier", args.checkpoint)

    def blast_probabilities(model: torch.nn.Module, crops: np.ndarray) -> np.ndarray:
        backend = as_backend(detector.bundle, "classifier", model)
        parts = [backend.run({spec["input"]: crops[s : s + 64]})[blast["output"]][:, blast["classes"].index("blast")] for s in range(0, len(crops), 64)]
        return np.concatenate(parts)

    def all_idb2_row(name: str, adapted_to: list[np.ndarray], share: float) -> str:
        p = blast_probabilities(with_device_statistics(classifier, adapted_to, share, batch=64), idb2_test)
        called = p >= threshold
        return f"| ALL-IDB2, adapted to {name} ({len(adapted_to)} cells) | {share} | {called[idb2_y == 1].mean():.3f} | {1 - called[idb2_y == 0].mean():.3f} | {roc_auc(idb2_y == 1, p):.3f} |"

    idb2 = data.load_records(args.data, "all-idb2")
    idb2_train, idb2_train_y = nearest_centre_crops(detector, [r for r in idb2 if r.split == "train"])
    idb2_test_crops, idb2_y = nearest_centre_crops(detector, [r for r in idb2 if r.split == "test"])
    idb2_test = np.concatenate(idb2_test_crops)
    raabin = [r for r in data.load_records(args.data, "txl-pbc") if r.device == "raabin"]
    raabin_train = annotated_crops(detector, [r for r in raabin if r.split == "train"][:120])
    raabin_val = np.concatenate(annotated_crops(detector, [r for r in raabin if r.split == "val"][:60]))
    print(f"blast threshold {threshold}; ALL-IDB2 test cells {len(idb2_y)} ({int(idb2_y.sum())} blasts); raabin validation cells {len(raabin_val)}")
    print("| lab | device's share of the statistics | sensitivity | specificity | AUC |")
    print("|---|---|---|---|---|")
    for share in args.shares:
        print(all_idb2_row("its training cells", idb2_train, share), flush=True)
    for name, label in (("its blasts only", 1), ("its normal cells only", 0)):
        print(all_idb2_row(name, [c for c, y in zip(idb2_train, idb2_train_y) if y == label], 1.0), flush=True)
    print("\n| raabin (normal) | device's share of the statistics | white cells called blast |")
    print("|---|---|---|")
    for share in args.shares:
        p = blast_probabilities(with_device_statistics(classifier, [c.astype(np.float32) for c in raabin_train], share, batch=32), raabin_val)
        print(f"| adapted to {sum(len(c) for c in raabin_train)} training cells | {share} | {np.mean(p >= threshold):.3f} |", flush=True)


if __name__ == "__main__":
    main()
