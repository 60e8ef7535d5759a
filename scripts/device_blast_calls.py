"""How a bundle's classifier calls the annotated white cells of one TXL-PBC device: the share of them with a
blast probability at or over the verdict's blast threshold. Every annotated cell there is normal (the device's
fields are normal smears), so that share is what the classifier alone would flag on the device.

    python scripts/device_blast_calls.py --data ../shared/data --device raabin BUNDLE [BUNDLE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from leukoedge import Detector
from leukoedge.preprocess.cpu import prepare_crops
from leukoedge.training import data


def annotated_crops(detector: Detector, records: list[data.Record]) -> list[np.ndarray]:
    """Per field with annotated white cells, their classifier crops (Nx3xHxW), cut as the runtime cuts crops."""
    spec, crops = detector.classifier_spec, []
    for record in records:
        image = data.read_image(record)
        boxes = data.object_boxes(record).get("WBC", [])
        if boxes:
            prepared = detector.prepare_frame(image)
            crops.append(prepare_crops(image, boxes, detector.spec, spec["input_size"], spec["crop_margin"], prepared.lab_statistics, detector.channel_order))
    return crops


def blast_probabilities(detector: Detector, records: list[data.Record]) -> np.ndarray:
    """The classifier's blast probability of each annotated white cell."""
    spec = detector.classifier_spec
    blast = spec["heads"]["blast"]
    found = [detector.classifier.run({spec["input"]: crops})[blast["output"]][:, blast["classes"].index("blast")] for crops in annotated_crops(detector, records)]
    return np.concatenate(found) if found else np.zeros(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--device", default="raabin", help="raabin or bcd")
    parser.add_argument("--split", default="val")
    parser.add_argument("--fields", type=int, default=60)
    args = parser.parse_args()
    records = [r for r in data.load_records(args.data, "txl-pbc", args.split) if r.device == args.device][: args.fields]
    for bundle in args.bundles:
        with Detector.load(bundle) as detector:
            probabilities = blast_probabilities(detector, records)
            threshold = detector.verdict_spec["blast_threshold"]
        called = float(np.mean(probabilities >= threshold)) if probabilities.size else float("nan")
        print(f"{bundle}: {probabilities.size} white cells of {len(records)} {args.device} {args.split} fields, {called:.3f} called blast (p >= {threshold})")


if __name__ == "__main__":
    main()
