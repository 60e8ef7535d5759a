"""How many normal fields sit one white cell from a false flag: judged, not flagged, and flagged if their most
blast-like normal cell crossed the blast threshold (a perturbation as small as a JPEG re-save does that:
docs/training.md, "Bundle 0.12.0: sensor noise", TXL-PBC raabin's 9fec4579 at quality 70). The verdict's stability
on normal smears, per source/device, on the same validation fields as scripts/capture_study.py:

    python scripts/borderline_fields.py --data ../shared/data [--bundle models/default] [--split val]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.training import data  # noqa: E402


def flags(probabilities: Sequence[float], blast_threshold: float, flag_fraction: float, min_blast_count: int) -> bool:
    """The frame verdict's rule (result.make_verdict) on the cells' blast probabilities."""
    blasts = sum(p >= blast_threshold for p in probabilities)
    return bool(probabilities) and blasts >= min_blast_count and blasts / len(probabilities) >= flag_fraction


def one_cell_from_flag(probabilities: Sequence[float], blast_threshold: float, flag_fraction: float, min_blast_count: int) -> bool:
    """Not flagged, and flagged once its most blast-like cell under the threshold is called a blast."""
    below = [p for p in probabilities if p < blast_threshold]
    if not below or flags(probabilities, blast_threshold, flag_fraction, min_blast_count):
        return False
    raised = list(probabilities)
    raised[raised.index(max(below))] = 1.0
    return flags(raised, blast_threshold, flag_fraction, min_blast_count)


def main() -> int:
    from capture_study import study_records

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--per-source", type=int, default=60, help="fields per source/device (default: %(default)s)")
    args = parser.parse_args()
    detector = Detector.load(args.bundle)
    rule = detector.verdict_spec
    arguments = (rule["blast_threshold"], rule["flag_fraction"], rule.get("min_blast_count", 1))
    counts: dict[str, list[int]] = {}  # source/device -> [judged, flagged, one cell from a flag]
    for record in study_records(args.data, args.split, args.per_source):
        if record.blast == 1:
            continue  # normal fields only: a flag there is a false flag
        result = data.run_record(detector, record)
        if result.verdict.status != "ok":
            continue
        row = counts.setdefault(record.domain, [0, 0, 0])
        probabilities = [cell.blast_probability for cell in result.cells]
        row[0] += 1
        row[1] += bool(result.verdict.flagged)
        row[2] += one_cell_from_flag(probabilities, *arguments)
    print(f"{args.bundle} ({detector.bundle.model_version}), {args.split} split, normal fields; flagged from {arguments[2]} blasts at fraction {arguments[1]}")
    print("| source/device | judged | flagged | one cell from a flag |")
    print("|---|---|---|---|")
    for domain, (judged, flagged, borderline) in sorted(counts.items()):
        print(f"| {domain} | {judged} | {flagged} | {borderline} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    raise SystemExit(main())
