"""How much a cell's blast probability hangs on the framing of its crop: the central cell of each single-cell image
(ALL-IDB2, PBC), its classifier box shifted by a few pixels and scaled a few per cent, the blast probability of
each framing. A cell whose call (probability >= the bundle's blast threshold) differs between framings is one a
segmenter with other boxes may call the other way: the noise under a single-cell accuracy figure.

    python scripts/framing_sensitivity.py --data ../shared/data --bundles shipped=models/default [other=DIR ...] \\
        [--split test] [--shift 2] [--pbc-limit 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.detector import Detector  # noqa: E402
from leukoedge.preprocess.cpu import prepare_crops  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.evaluate import NOT_WHITE_CELL_TYPES, _central_cell  # noqa: E402

SCALES = (0.95, 1.0, 1.05)


def framings(box: tuple[int, int, int, int], shift: int) -> list[tuple[int, int, int, int]]:
    """The box moved by -shift, 0, +shift px in x and y, and at SCALES of its size about its centre."""
    x0, y0, x1, y1 = box
    moved = [(x0 + dx, y0 + dy, x1 + dx, y1 + dy) for dx in (-shift, 0, shift) for dy in (-shift, 0, shift)]
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    scaled = [(round(cx - w * s / 2), round(cy - h * s / 2), round(cx + w * s / 2), round(cy + h * s / 2)) for s in SCALES if s != 1.0]
    return moved + scaled


def blast_probabilities(detector: Detector, image: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """The classifier's blast probability for a crop around each box, cut as the runtime cuts it."""
    prepared = detector.prepare_frame(image)
    spec = detector.classifier_spec
    crops = prepare_crops(image, boxes, detector.spec, spec["input_size"], spec["crop_margin"], prepared.lab_statistics, detector.channel_order)
    head = spec["heads"]["blast"]
    outputs = detector.classifier.run({spec["input"]: crops})
    return outputs[head["output"]][:, list(head["classes"]).index("blast")]


def measure(detector: Detector, records: list[data.Record], shift: int) -> dict[str, float]:
    threshold = detector.verdict_spec["blast_threshold"]
    ranges, flips, right_found, right_worst, right_best, cells = [], 0, 0, 0, 0, 0
    for record in records:
        image = data.read_image(record)
        cell = _central_cell(detector.run(image))
        if cell is None:
            continue
        probabilities = blast_probabilities(detector, image, framings(cell.classifier_box, shift))
        calls = probabilities >= threshold
        truth = bool(record.blast)
        cells += 1
        ranges.append(float(probabilities.max() - probabilities.min()))
        flips += bool(calls.any() != calls.all())
        right_found += (cell.blast_probability >= threshold) == truth
        right_worst += bool((calls == truth).all())
        right_best += bool((calls == truth).any())
    return {
        "cells": cells,
        "median_range": float(np.median(ranges)) if ranges else float("nan"),
        "p90_range": float(np.quantile(ranges, 0.9)) if ranges else float("nan"),
        "calls_that_flip": flips,
        "accuracy_found_box": right_found / max(1, cells),
        "accuracy_every_framing": right_worst / max(1, cells),
        "accuracy_some_framing": right_best / max(1, cells),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundles", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--shift", type=int, default=2, help="pixels each framing moves the box (default: %(default)s)")
    parser.add_argument("--pbc-limit", type=int, default=200, help="PBC white-cell images, evenly spaced (default: %(default)s)")
    args = parser.parse_args()
    pbc = [r for r in data.load_records(args.data, "pbc", args.split) if r.wbc_type not in NOT_WHITE_CELL_TYPES]
    pbc = [pbc[int(i)] for i in np.linspace(0, len(pbc) - 1, min(args.pbc_limit, len(pbc)))]
    sources = {"all-idb2": data.load_records(args.data, "all-idb2", args.split), "pbc (normal white cells)": pbc}
    print("| bundle | source | cells | median / p90 range of the blast probability | calls that flip | accuracy: found box, every framing, some framing |")
    print("|---|---|---|---|---|---|")
    for name, path in (item.split("=", 1) for item in args.bundles):
        detector = Detector.load(path)
        for source, records in sources.items():
            m = measure(detector, records, args.shift)
            print(
                f"| {name} | {source} | {m['cells']} | {m['median_range']:.3f} / {m['p90_range']:.3f} | {m['calls_that_flip']} | "
                f"{m['accuracy_found_box']:.3f}, {m['accuracy_every_framing']:.3f}, {m['accuracy_some_framing']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
