"""Which cells should the refiner skip for their size? A bundle's figures on the validation split with
refiner.min_cell_side_px at each candidate (cells whose side, the square root of the box area in frame pixels, is
below it keep the field segmenter's masks), and the one chosen: the best mean of the figures, ties to the larger
threshold (fewer cells refined). docs/training.md, "Bundle 0.8.0".

    python scripts/refiner_min_side.py --data ../shared/data --bundle models/default --sides 0 32 48 64 96

Figures: whole-cell Dice on Taleqani's weak masks, nucleus and whole-cell Dice on Zheng's and ALL-IDB2's expert
masks, WBC box F1 at IoU 0.5 on BCCD and TXL-PBC's two devices; and the share of the found cells refined on
Taleqani's fields (where the cells are smallest and most numerous).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from leukoedge import Detector
from leukoedge.refine import cells_to_refine
from leukoedge.training import data
from leukoedge.training.evaluate import box_detection, bundle_segmenter, score_images, summarise

MASK_SOURCES = {"all-taleqani": ("whole_cell",), "wbc-seg-zheng": ("nucleus", "whole_cell"), "all-idb2": ("nucleus", "whole_cell")}
BOX_SETS = ("bccd", "txl-pbc/raabin", "txl-pbc/bcd")


def figures(detector: Detector, data_root: Path, split: str) -> dict[str, float]:
    """The bundle's figures on the split, as the detector stands (its refiner spec included)."""
    out = {}
    for source, regions in MASK_SOURCES.items():
        records = [r for r in data.load_records(data_root, source, split) if data.read_label_map(r) is not None]
        summary = summarise(score_images(records, {"bundle": bundle_segmenter(detector)}, f"{source} ({split})", regions=regions), ("dice",))
        for region in regions:
            out[f"{source} {region} Dice"] = summary["bundle"][f"{region}_dice"]["mean"]
    for name in BOX_SETS:
        source, _, device = name.partition("/")
        records = [r for r in data.load_records(data_root, source, split) if not device or r.device == device]
        boxes = box_detection(detector, records, f"{name} ({split})")
        recall, precision = boxes["box_recall"], boxes["box_precision"]
        out[f"{name} box F1"] = 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)
    return out


def refined_share(detector: Detector, data_root: Path, split: str) -> float:
    """Of the cells found on Taleqani's fields of the split, the share the refiner segments again."""
    spec = detector.refiner_spec
    refined = found = 0
    for record in data.load_records(data_root, "all-taleqani", split):
        candidates = detector.candidates(data.read_image(record))  # refinement leaves the cells' count and order
        chosen = cells_to_refine(candidates.probabilities, candidates.prepared.letterbox, candidates.instances, spec.get("skip_below_uncertainty"), spec.get("min_cell_side_px"))
        refined, found = refined + len(chosen), found + len(candidates.instances)
    return refined / max(found, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with a refiner")
    parser.add_argument("--sides", type=float, nargs="+", default=[0, 32, 48, 64, 96], help="candidate thresholds, px (0: every cell)")
    parser.add_argument("--split", default="val", help="the split the threshold is chosen on (default: val)")
    args = parser.parse_args()

    detector = Detector.load(args.bundle)
    detector.domain_spec = None  # every frame's masks and boxes, whatever the domain check would say
    if detector.refiner_spec is None:
        parser.error(f"{args.bundle} has no refiner")
    base = {key: value for key, value in detector.refiner_spec.items() if key != "min_cell_side_px"}
    rows = {}
    for side in args.sides:
        detector.refiner_spec = {**base, "min_cell_side_px": side} if side > 0 else base
        rows[side] = {**figures(detector, args.data, args.split), "Taleqani cells refined": refined_share(detector, args.data, args.split)}
    names = [name for name in rows[args.sides[0]] if name != "Taleqani cells refined"]
    print(f"{args.bundle}, {args.split} split, refiner.min_cell_side_px:\n")
    print("| figure | " + " | ".join("every cell" if side == 0 else f"{side:g} px" for side in args.sides) + " |")
    print("|---" * (len(args.sides) + 1) + "|")
    for name in [*names, "Taleqani cells refined"]:
        print(f"| {name} | " + " | ".join(f"{rows[side][name]:.4f}" for side in args.sides) + " |")
    means = {side: float(np.mean([rows[side][name] for name in names])) for side in args.sides}
    print("| mean of the figures | " + " | ".join(f"{means[side]:.4f}" for side in args.sides) + " |")
    best = max(means.values())
    chosen = max(side for side in args.sides if means[side] == best)
    print(f"\nchosen: {'every cell (no threshold)' if chosen == 0 else f'{chosen:g} px'} (best mean, ties to the larger)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
