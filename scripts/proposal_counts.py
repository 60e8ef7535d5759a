"""What the gate, the fragment rule and the refiner do with a bundle's proposals, source by source: the counts
docs/training.md ("Bundle 0.10.0") and docs/performance.md ("The gate before the refiner") quote.

    python scripts/proposal_counts.py --data ../shared/data --bundle models/default [--split val] [--limit N]

Per source/device of the split (at most --limit fields each): fields, proposals, proposals the gate keeps,
fragments dropped (postprocess.fragments), refinements with the gate first (the kept proposals the refiner's
rules choose) against refining every chosen proposal, the segmenter's mean frame uncertainty (the domain check's
term) and its frames' most uncertain kept cell (refine.cell_uncertainty), medians; then WBC box recall and
precision of the normal fields (training/detection.detection_figures); then PBC's platelet and erythroblast
images: how many hold a kept cell at their centre (the labelled look-alike) and how many hold any kept cell.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.detector import Detector  # noqa: E402
from leukoedge.domain import segmenter_uncertainty  # noqa: E402
from leukoedge.postprocess import fragments  # noqa: E402
from leukoedge.refine import cell_uncertainty, cells_to_refine  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.detection import detection_figures, format_table, normal_records, records_per_domain  # noqa: E402
from leukoedge.training.gate import GATE_SOURCES, NOT_WBC_TYPES, _proposal_at  # noqa: E402


def field_counts(detector: Detector, frame: np.ndarray) -> dict[str, float]:
    """One field's proposals through the gate, the fragment rule and the refiner's rules."""
    found = detector.candidates(frame)
    proposals = found.instances
    counts = {"proposals": len(proposals), "kept": 0, "fragments": 0, "refined_all": 0, "refined_kept": 0}
    counts["frame_uncertainty"] = segmenter_uncertainty(found.prepared, found.probabilities)
    counts["cell_uncertainty"] = np.nan
    if not proposals:
        return counts
    keep = np.ones(len(proposals), bool)
    if detector.gate is not None:
        keep = detector.white_cell_probabilities(detector.cell_crops(frame, found.prepared, proposals)) >= detector.gate_spec["threshold"]
    kept = np.flatnonzero(keep)
    fragment = fragments([proposals[index] for index in kept])
    counts["fragments"] = int(fragment.sum())
    keep[kept[fragment]] = False
    counts["kept"] = int(keep.sum())
    if detector.refiner_spec is not None:
        spec = detector.refiner_spec
        chosen = cells_to_refine(found.probabilities, found.prepared.letterbox, proposals, spec.get("skip_below_uncertainty"), spec.get("min_cell_side_px"))
        counts["refined_all"], counts["refined_kept"] = len(chosen), int(keep[chosen].sum())
    if keep.any():
        counts["cell_uncertainty"] = float(cell_uncertainty(found.probabilities, found.prepared.letterbox, [proposals[i] for i in np.flatnonzero(keep)]).max())
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=None, help="fields per source/device (default: all)")
    args = parser.parse_args()
    detector = Detector.load(args.bundle)

    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for record in records_per_domain(args.data, args.split, GATE_SOURCES, args.limit):
        rows[record.domain].append(field_counts(detector, data.read_image(record)))
    print(f"{args.bundle}, {args.split} split")
    print("| source/device | fields | proposals | kept by the gate | fragments dropped | refinements, gate first / every chosen | frame uncertainty | most uncertain kept cell |")
    print("|---|---|---|---|---|---|---|---|")
    for domain in sorted(rows):
        fields = rows[domain]
        total = {key: sum(field[key] for field in fields) for key in ("proposals", "kept", "fragments", "refined_kept", "refined_all")}
        print(
            f"| {domain} | {len(fields)} | {total['proposals']} | {total['kept']} | {total['fragments']} | {total['refined_kept']} / {total['refined_all']} | "
            f"{np.median([field['frame_uncertainty'] for field in fields]):.3f} | {np.nanmedian([field['cell_uncertainty'] for field in fields]):.3f} |"
        )
    print()
    print(format_table(detection_figures(detector, normal_records(args.data, args.split, limit=args.limit)), f"normal fields ({args.split})"))

    look_alikes = [record for record in data.load_records(args.data, "pbc", args.split) if record.wbc_type in NOT_WBC_TYPES]
    print("\n| PBC look-alike | images | a kept cell at the centre | any kept cell |\n|---|---|---|---|")
    for kind in NOT_WBC_TYPES:
        central = anything = 0
        images = [record for record in look_alikes if record.wbc_type == kind]
        for record in images:
            frame = data.read_image(record)
            cells = detector.white_cells(frame, detector.candidates(frame))[0]
            height, width = frame.shape[:2]
            central += _proposal_at([cell.classifier_box for cell in cells], (width / 2, height / 2)) is not None
            anything += bool(cells)
        print(f"| {kind} | {len(images)} | {central} | {anything} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
