"""What defocus does to the verdict, and what the focus check (domain.edge_width) refuses.

Every field of a split is blurred as a microscope out of focus blurs it: a Gaussian whose sigma is a share of the
sharp field's median white-cell side (--blur), so the same setting is the same defocus at every magnification. Each
blurred field goes through the bundle twice, with its focus check and without it (the domain section less
"max_edge_width"), and the table prints, per source and blur: the fields' edge widths, how many the check refuses,
and the verdicts with and without it (normal fields flagged; Taleqani's malignant fields flagged; PBC's white-cell
type of the central cell). docs/training.md, "Out of focus", quotes it:

    python scripts/defocus_study.py --data ../shared/data [--bundle models/default] [--split val]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.domain import failed_checks, median_cell_side  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.detection import evenly_spaced  # noqa: E402
from leukoedge.training.gate import NOT_WBC_TYPES  # noqa: E402

SOURCES = ("pbc", "wbc-seg-zheng", "bccd", "txl-pbc", "all-taleqani", "all-idb2")


def study_records(data_root: Path, split: str, per_source: int) -> list[data.Record]:
    """Up to per_source fields of each source/device (evenly spaced; PBC's white cells only; Taleqani's every benign
    field and as many malignant ones)."""
    records = []
    for source in SOURCES:
        fields = data.load_records(data_root, source, split)
        if source == "pbc":
            fields = [record for record in fields if record.wbc_type not in NOT_WBC_TYPES]
        if source == "all-taleqani":
            benign = [record for record in fields if record.blast == 0]
            records += benign + evenly_spaced([record for record in fields if record.blast == 1], len(benign))
            continue
        for device in sorted({record.device for record in fields}, key=str):
            records += evenly_spaced([record for record in fields if record.device == device], per_source)
    return records


def group(record: data.Record) -> str:
    return record.domain + (" malignant" if record.blast == 1 and record.source == "all-taleqani" else "")


def central_type(result, frame: np.ndarray) -> str | None:
    """The WBC type of the cell nearest the frame's centre (PBC centres its one white cell)."""
    if not result.cells:
        return None
    centre = np.array([frame.shape[1], frame.shape[0]]) / 2
    cell = min(result.cells, key=lambda c: np.abs(np.array([(c.box[0] + c.box[2]) / 2, (c.box[1] + c.box[3]) / 2]) - centre).sum())
    scores = cell.head_scores.get("wbc_type")
    return None if scores is None else max(scores, key=scores.get)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="a bundle with a focus check")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--per-source", type=int, default=60, help="fields per source/device (default: %(default)s)")
    parser.add_argument("--blur", type=float, nargs="+", default=[0.0, 0.015, 0.03, 0.045, 0.06, 0.09], help="sigmas, as shares of the median cell side")
    args = parser.parse_args()

    checked = Detector.load(args.bundle)
    if "max_edge_width" not in (checked.domain_spec or {}):
        print(f"error: {args.bundle} has no focus check (domain.max_edge_width): fit it with scripts/refit_domain.py", file=sys.stderr)
        return 2
    unchecked = Detector.load(args.bundle)
    unchecked.domain_spec = {key: value for key, value in checked.domain_spec.items() if key != "max_edge_width"}
    threshold = checked.domain_spec["max_edge_width"]

    rows: dict[tuple[str, float], collections.Counter] = collections.defaultdict(collections.Counter)
    widths: dict[tuple[str, float], list[float]] = collections.defaultdict(list)
    for record in tqdm(study_records(args.data, args.split, args.per_source), desc="fields", unit="field"):
        frame = data.read_image(record)
        sharp = unchecked.run(frame)
        side = median_cell_side([cell.box for cell in sharp.cells])
        if side is None:
            continue  # no white cell found in the sharp field: nothing to blur relative to
        for blur in args.blur:
            blurred = frame if blur == 0 else cv2.GaussianBlur(frame, (0, 0), blur * side)
            with_result = checked.run(blurred)  # the same cells as without the check: only the verdict differs
            without, with_check = unchecked.run(blurred).verdict, with_result.verdict
            counts, key = rows[(group(record), blur)], (group(record), blur)
            counts["fields"] += 1
            if "edge_width" in with_check.domain:
                widths[key].append(with_check.domain["edge_width"])
            counts["refused for focus"] += "focus" in failed_checks(checked.domain_spec, with_check.domain)
            counts["judged without"] += without.status == "ok"
            counts["judged with"] += with_check.status == "ok"
            counts["flagged without"] += bool(without.flagged)
            counts["flagged with"] += bool(with_check.flagged)
            if record.source == "pbc":
                typed = central_type(with_result, blurred) == record.wbc_type
                counts["typed right without"] += typed and without.status == "ok"
                counts["typed right with"] += typed and with_check.status == "ok"

    print(f"{args.bundle} ({checked.bundle.model_version}), {args.split} split; focus check: edge width <= {threshold:.2f}")
    print("| fields | blur (x cell side) | n | edge width median (p95) | refused for focus | judged: without / with the check | flagged: without / with | PBC type right among judged: without / with |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, blur), counts in sorted(rows.items()):
        values = np.array(widths[(name, blur)]) if widths[(name, blur)] else np.array([np.nan])
        typed = f"{counts['typed right without']} / {counts['typed right with']}" if name == "pbc" else ""
        print(
            f"| {name} | {blur:.3f} | {counts['fields']} | {np.median(values):.2f} ({np.quantile(values, 0.95):.2f}) | {counts['refused for focus']} | "
            f"{counts['judged without']} / {counts['judged with']} | {counts['flagged without']} / {counts['flagged with']} | {typed} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
