"""Boxes whose label a person should look at again: where a bundle and a box source's labels disagree.

    python scripts/box_label_audit.py --data ../shared/data --out DIR [--bundle models/default] [--sources txl-pbc bccd]

For every field of the box sources (every split): a red-cell or platelet box that a white cell the bundle keeps
matches at IoU >= 0.5 (training/detection.MATCH_IOU), and a white-cell box that no proposal of the segmenter
matches. TXL-PBC's labels are semi-automatic (YOLOv8n, then corrected by hand, per its README), so some of these
are label errors and some are the bundle's; only a person looking at the cell can tell. Written to DIR:
`candidates.csv` (image, split, box number, class as labelled, box, why, the gate's white-cell probability) and one
sheet per kind, `kept-RBC.png`, `kept-Platelets.png`, `unproposed-WBC.png`: a tile per candidate (the box in red, the
field around it, its number in the csv), for that person. What they decide
goes into training/box_corrections.csv (docs/training.md, "TXL-PBC's box labels looked at again"), which the loader applies.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from leukoedge import Detector
from leukoedge.shipped import default_bundle
from leukoedge.training import data
from leukoedge.training.detection import MATCH_IOU, box_iou, greedy_matches

TILE = 192


def candidates(detector: Detector, record: data.Record) -> list[dict]:
    """The field's boxes whose labels the bundle disagrees with (see the module doc)."""
    image = data.read_image(record)
    labelled = data.labelled_boxes(record.label_path, image.shape)
    kept = [cell.box for cell in detector.run(image).cells]
    found = detector.candidates(image)
    proposals = [instance.box for instance in found.instances]
    gate = detector.white_cell_probabilities(detector.cell_crops(image, found.prepared, found.instances)) if proposals else np.zeros(0)
    rows = []
    for number, cls, box in labelled:
        if cls == "WBC":
            if not proposals or box_iou(proposals, [box]).max() < MATCH_IOU:
                rows.append({"why": "white-cell box no proposal matches", "box_number": number, "class": cls, "box": box, "gate": ""})
        elif kept and greedy_matches(box_iou(kept, [box])):
            nearest = int(box_iou(proposals, [box]).ravel().argmax())
            rows.append({"why": "kept as a white cell", "box_number": number, "class": cls, "box": box, "gate": f"{gate[nearest]:.3f}"})
    return [{"image": record.image_path.name, "split": record.split, **row} for row in rows]


def tile(record: data.Record, box: data.Box, text: str) -> np.ndarray:
    """The field around the box (twice its side), the box drawn, the text above."""
    image = data.read_image(record)
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * 2
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left, top = max(0, cx - side // 2), max(0, cy - side // 2)
    crop = image[top : top + side, left : left + side].copy()
    cv2.rectangle(crop, (x0 - left, y0 - top), (x1 - left, y1 - top), (0, 0, 255), 2)
    crop = cv2.resize(crop, (TILE, TILE))
    cv2.putText(crop, text, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 2)
    cv2.putText(crop, text, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (e.g. ../shared/data)")
    parser.add_argument("--bundle", type=Path, default=default_bundle())
    parser.add_argument("--sources", nargs="+", default=list(data.BOX_SOURCES), help="box sources (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder for candidates.csv and candidates.png")
    args = parser.parse_args()
    detector = Detector.load(args.bundle)
    records = [r for source in args.sources for r in data.load_records(args.data, source) if r.label_path is not None]
    found, tiles = [], {}
    for record in tqdm(records, desc="fields", unit="field"):
        for row in candidates(detector, record):
            found.append(row)
            sheet = f"{'unproposed' if row['class'] == 'WBC' else 'kept'}-{row['class']}"
            tiles.setdefault(sheet, []).append(tile(record, row["box"], f"{len(found)} {row['image'][:8]} #{row['box_number']}"))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "candidates.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "split", "box_number", "class", "box", "why", "gate"])
        writer.writeheader()
        writer.writerows(found)
    for sheet, sheet_tiles in tiles.items():
        columns = 8
        sheet_tiles += [np.zeros_like(sheet_tiles[0])] * (-len(sheet_tiles) % columns)
        rows = [np.concatenate(sheet_tiles[start : start + columns], 1) for start in range(0, len(sheet_tiles), columns)]
        cv2.imwrite(str(args.out / f"{sheet}.png"), np.concatenate(rows, 0))
    by_why: dict[str, int] = {}
    for row in found:
        by_why[f"{row['class']}: {row['why']}"] = by_why.get(f"{row['class']}: {row['why']}", 0) + 1
    print(f"{len(records)} fields; candidates: " + ", ".join(f"{why} {count}" for why, count in sorted(by_why.items())))
    print(f"written to {args.out}: candidates.csv, {', '.join(f'{sheet}.png' for sheet in tiles)}")


if __name__ == "__main__":
    main()
