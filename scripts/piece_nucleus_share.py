"""How much of each piece the field segmenter finds is nucleus, white cells against the rest: the evidence for
postprocess.MIN_PIECE_NUCLEUS_SHARE. Every proposal of a bundle's segmenter (before the piece rule and the gate)
is labelled as the gate labels its training proposals (training/gate.label_proposals: white cell, not, or a
fragment of one); the nucleus shares are printed per label, for every piece and for the pieces the watershed cut
from a larger component (the only ones the rule judges), with how many fall below a few thresholds.

    python scripts/piece_nucleus_share.py --data ../shared/data --bundle models/default --split val --per-source 80
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from leukoedge import Detector
from leukoedge.postprocess import MIN_PIECE_NUCLEUS_SHARE, _model_boxes, label_map_from_probabilities, piece_components, pieces_with_nucleus, split_touching
from leukoedge.result import BACKGROUND, NUCLEUS
from leukoedge.training import data
from leukoedge.training.gate import gate_records, label_proposals

LABEL_NAMES = {1: "white cell", 0: "not a white cell", None: "fragment of a white cell"}
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3)


def piece_rows(detector: Detector, record: data.Record) -> list[tuple[str, int | None, float, bool, bool]]:
    """(source, gate label, nucleus share, cut from a larger component, dropped by the rule) of every proposal of one field."""
    frame = data.read_image(record)
    prepared = detector.prepare_frame(frame)
    spec = detector.segmenter_spec
    label_map = label_map_from_probabilities(detector.segmenter.run({spec["input"]: prepared.tensor})[spec["output"]][0])
    min_area = detector.postprocess_spec["min_cell_area_px"]
    instances = split_touching(label_map > BACKGROUND, min_area)
    count = int(instances.max())
    if count == 0:
        return []
    _, components = cv2.connectedComponents((label_map > BACKGROUND).astype(np.uint8), connectivity=8)
    areas = np.bincount(instances.ravel(), minlength=count + 1)
    nucleus = np.bincount(instances[label_map == NUCLEUS], minlength=count + 1)
    component_of = piece_components(instances, components, count)
    pieces = np.bincount(component_of[1:])
    kept_by_rule = pieces_with_nucleus(instances, label_map, areas, nucleus)
    kept = [i for i in range(1, count + 1) if areas[i] >= min_area and nucleus[i] >= detector.postprocess_spec.get("min_nucleus_area_px", 0)]
    boxes = _model_boxes(instances, count)
    frame_boxes = [prepared.letterbox.box_to_frame(tuple(int(side) for side in boxes[i])) for i in kept]
    labels = label_proposals(record, frame_boxes, frame.shape[:2], 1.0)
    return [(record.source, label, nucleus[i] / areas[i], bool(pieces[component_of[i]] > 1), not kept_by_rule[i]) for i, label in zip(kept, labels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--per-source", type=int, default=80, help="fields per source and device (default 80)")
    args = parser.parse_args()
    detector = Detector.load(args.bundle)
    rows = []
    for record in tqdm(gate_records(args.data, args.split, args.per_source), desc="fields", unit="field"):
        rows += piece_rows(detector, record)
    print(f"{args.bundle}, {args.split} split; the rule drops a cut piece below {MIN_PIECE_NUCLEUS_SHARE}")
    print("| proposals | pieces | nucleus share min / 1 % / 5 % | " + " | ".join(f"< {t}" for t in THRESHOLDS) + " |")
    print("|---|---|---|" + "---|" * len(THRESHOLDS))
    for label, name in LABEL_NAMES.items():
        for cut_only in (False, True):
            shares = np.array([share for _, lab, share, cut, _ in rows if lab == label and (cut or not cut_only)])
            if not shares.size:
                continue
            low = np.quantile(shares, [0.0, 0.01, 0.05])
            below = " | ".join(str(int((shares < t).sum())) for t in THRESHOLDS)
            kind = "cut from a larger component" if cut_only else "all"
            print(f"| {name}, {kind} | {shares.size} | {low[0]:.3f} / {low[1]:.3f} / {low[2]:.3f} | {below} |")
    dropped = Counter((source, LABEL_NAMES[label]) for source, label, _, _, gone in rows if gone)
    print("pieces the rule drops (a piece holding its component's most nucleus is kept), per source and label:", dict(dropped) or "none")


if __name__ == "__main__":
    main()
