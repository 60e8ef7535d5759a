"""Would a domain check on the classifier's features refuse the cells it gets wrong on a new device?

For a bundle and its classifier checkpoint: the classifier's last-layer features of annotated white cells
(cut as the runtime cuts them) of the training sources' training split (the reference), of their validation
split (the threshold: a percentile of their distances) and of one TXL-PBC device's validation fields; prints
the share of the device's cells, and of those it calls blast, beyond the threshold (Mahalanobis distance to the
reference, covariance shrunk 10 % towards its mean variance). docs/training.md, "The classifier with colour
augmentation, and a feature-distance check".

    python scripts/feature_distance.py --data ../shared/data --bundle BUNDLE --device raabin
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from leukoedge import Detector
from leukoedge.preprocess.cpu import prepare_crops
from leukoedge.training import data
from leukoedge.training.train import load_checkpoint

REFERENCE_SOURCES = ("all-idb2", "all-taleqani", "bccd", "wbc-seg-zheng")  # sources with white-cell boxes


def cell_crops(detector: Detector, records: list[data.Record]) -> np.ndarray:
    """The annotated white cells' crops, as the runtime cuts them."""
    spec, crops = detector.classifier_spec, []
    for record in records:
        image, boxes = data.read_image(record), data.wbc_boxes(record)
        if boxes:
            prepared = detector.prepare_frame(image)
            crops.append(prepare_crops(image, boxes, detector.spec, spec["input_size"], spec["crop_margin"], prepared.lab_statistics, detector.channel_order))
    return np.concatenate(crops)


def features_and_blast(model: torch.nn.Module, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        features = model.dense(model.trunk(torch.from_numpy(crops)))
        return features.numpy(), model.heads["blast"](features).softmax(dim=1)[:, 1].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with its checkpoints beside it (BUNDLE/../checkpoints)")
    parser.add_argument("--device", default="raabin", help="raabin or bcd")
    parser.add_argument("--fields", type=int, default=60, help="fields per source and split")
    args = parser.parse_args()
    checkpoint = args.bundle.parent / "checkpoints" / "default-classifier.pt"
    heads = json.loads(checkpoint.with_suffix(".json").read_text())["heads"]
    model, _ = load_checkpoint(checkpoint, head_classes={head: len(classes) for head, classes in heads.items()})
    detector = Detector.load(args.bundle)

    def records(source: str, split: str, device: str | None = None) -> list[data.Record]:
        found = [r for r in data.load_records(args.data, source, split) if device is None or r.device == device]
        return [found[int(i)] for i in np.linspace(0, len(found) - 1, min(args.fields, len(found)))] if found else []

    reference, _ = features_and_blast(model, cell_crops(detector, [r for s in REFERENCE_SOURCES for r in records(s, "train")]))
    validation, _ = features_and_blast(model, cell_crops(detector, [r for s in REFERENCE_SOURCES for r in records(s, "val")]))
    device, blast = features_and_blast(model, cell_crops(detector, records("txl-pbc", "val", args.device)))
    mean, centred = reference.mean(axis=0), reference - reference.mean(axis=0)
    covariance = centred.T @ centred / len(reference)
    precision = np.linalg.inv(0.9 * covariance + 0.1 * np.eye(len(mean)) * np.trace(covariance) / len(mean))

    def distance(features: np.ndarray) -> np.ndarray:
        offset = features - mean
        return np.sqrt(np.einsum("ij,jk,ik->i", offset, precision, offset))

    called = blast >= detector.verdict_spec["blast_threshold"]
    print(f"{len(reference)} reference cells, {len(validation)} validation cells, {len(device)} {args.device} cells ({called.sum()} called blast)")
    for quantile in (0.95, 0.99):
        threshold = np.quantile(distance(validation), quantile)
        beyond = distance(device) > threshold
        print(f"threshold at the validation cells' {quantile:.0%} quantile ({threshold:.2f}): {args.device} cells beyond it {beyond.mean():.3f}, "
              f"of those called blast {beyond[called].mean() if called.any() else float('nan'):.3f}")


if __name__ == "__main__":
    main()
