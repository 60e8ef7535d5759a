"""Would the domain check's uncertainty term refuse fewer frames of an unseen device, and still the ones that would be
falsely flagged, if it read the white cells the gate keeps instead of the whole frame? Leave one device out as
`leukoedge gate --leave-out` does (the gate trained and the domain check fitted without it), then for each
left-out test field: the frame's mean uncertainty (the shipped term), the mean and the largest of its kept cells'
uncertainty (refine.cell_uncertainty over the boxes the field segmenter found), whether the shipped check refuses it
and whether it would be flagged with the uncertainty term off. The cell terms' thresholds are fitted as the frame
term's (the 0.99 quantile of the validation frames of the other sources, times the same margin).

    python scripts/cell_uncertainty_loso.py --data ../shared/data --bundle <leave-one-device-out bundle> \\
        --leave-out txl-pbc/raabin --cache DIR

docs/training.md, "Bundle 0.10.0" ("What the refusals prevent").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leukoedge.domain import THRESHOLD_MARGIN, THRESHOLD_QUANTILE, segmenter_uncertainty  # noqa: E402
from leukoedge.refine import cell_uncertainty  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.detection import normal_records  # noqa: E402
from leukoedge.training.gate import GateRecipe, apply_left_out, collected_examples, frame_domain, gate_records  # noqa: E402


def measures(detector, records, description: str) -> list[dict]:
    """Per record: frame uncertainty, kept cells' mean and largest uncertainty (NaN without a kept cell), the
    verdict's status, and whether it is flagged with the uncertainty term off."""
    rows = []
    checked = dict(detector.domain_spec)
    for record in tqdm(records, desc=description, unit="field"):
        image = data.read_image(record)
        found = detector.candidates(image)
        kept_boxes = {cell.classifier_box for cell in detector.white_cells(image, found)[0]}  # where the segmenter found them
        per_cell = cell_uncertainty(found.probabilities, found.prepared.letterbox, [p for p in found.instances if p.box in kept_boxes])
        status = detector.run(image).verdict.status
        detector.domain_spec = {**checked, "max_uncertainty": 1.0}
        flagged_off = detector.run(image).verdict.flagged
        detector.domain_spec = checked
        rows.append({
            "name": record.image_path.name,
            "frame": segmenter_uncertainty(found.prepared, found.probabilities),
            "cell_mean": float(per_cell.mean()) if per_cell.size else np.nan,
            "cell_max": float(per_cell.max()) if per_cell.size else np.nan,
            "status": status,
            "flagged_off": flagged_off,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="a leave-one-device-out bundle (docs/training.md)")
    parser.add_argument("--leave-out", required=True, help="the source/device left out, e.g. txl-pbc/raabin")
    parser.add_argument("--cache", type=Path, default=None, help="the gate's example cache (as leukoedge gate --cache)")
    args = parser.parse_args()
    recipe = GateRecipe()
    detectors, train, validation = collected_examples(args.data, args.bundle, recipe, args.cache)
    detector = detectors[0]
    validation_records = gate_records(args.data, "val", recipe.val_per_source)
    apply_left_out(detector, train, validation, frame_domain(detector, validation_records), args.leave_out, recipe)  # as leukoedge gate --leave-out
    fitted = measures(detector, [r for r in validation_records if not r.domain.startswith(args.leave_out)], "validation frames")
    thresholds = {name: float(np.nanquantile([row[name] for row in fitted], THRESHOLD_QUANTILE) * THRESHOLD_MARGIN) for name in ("frame", "cell_mean", "cell_max")}
    left_out = [r for r in normal_records(args.data, recipe.eval_split, limit=recipe.eval_per_source) if r.domain.startswith(args.leave_out)]
    rows = measures(detector, left_out, f"{args.leave_out} {recipe.eval_split}")
    print(f"{args.leave_out}, {len(rows)} normal {recipe.eval_split} fields; thresholds " + ", ".join(f"{k} {v:.3f}" for k, v in thresholds.items()))
    print("| uncertainty term | fields refused for it | flagged (term off) among the fields it judges |\n|---|---|---|")
    for name in ("frame", "cell_mean", "cell_max"):
        refused = np.array([row[name] > thresholds[name] for row in rows])  # NaN (no kept cell) is never refused
        judged_flags = sum(row["flagged_off"] for row, out in zip(rows, refused) if not out)
        print(f"| {name} | {refused.sum()} of {len(rows)} | {judged_flags} of {(~refused).sum()} |")
    print("shipped check (all terms): " + ", ".join(f"{status} {sum(row['status'] == status for row in rows)}" for status in sorted({row["status"] for row in rows})))


if __name__ == "__main__":
    main()
