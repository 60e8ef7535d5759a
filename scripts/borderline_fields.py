"""How many normal fields sit one white cell from a false flag: judged, not flagged, and flagged if their most
blast-like normal cell crossed the blast threshold (a perturbation as small as a JPEG re-save does that:
docs/training.md, "Bundle 0.12.0: sensor noise", TXL-PBC raabin's 9fec4579 at quality 70). The verdict's stability
on normal smears, per source/device, on the same validation fields as scripts/capture_study.py.

--confident T...: the same counts, and Taleqani's malignant fields flagged, under a stricter rule that is not the
runtime's: at least min_blast_count of the blasts must also reach T (how far such a rule would move the borderline
fields and the sensitivity; T = the blast threshold is the bundle's own rule).

    python scripts/borderline_fields.py --data ../shared/data [--bundle models/default] [--split val] [--confident 0.7 0.8]
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


def flags(probabilities: Sequence[float], blast_threshold: float, flag_fraction: float, min_blast_count: int, confident: float | None = None) -> bool:
    """The frame verdict's rule (result.make_verdict) on the cells' blast probabilities; with `confident`, at least
    min_blast_count of them must also reach it."""
    blasts = sum(p >= blast_threshold for p in probabilities)
    sure = blasts if confident is None else sum(p >= max(confident, blast_threshold) for p in probabilities)
    return bool(probabilities) and blasts >= min_blast_count and sure >= min_blast_count and blasts / len(probabilities) >= flag_fraction


def one_cell_from_flag(
    probabilities: Sequence[float], blast_threshold: float, flag_fraction: float, min_blast_count: int, confident: float | None = None
) -> bool:
    """Not flagged, and flagged once its most blast-like cell under the threshold is called a blast (for certain)."""
    below = [p for p in probabilities if p < blast_threshold]
    if not below or flags(probabilities, blast_threshold, flag_fraction, min_blast_count, confident):
        return False
    raised = list(probabilities)
    raised[raised.index(max(below))] = 1.0
    return flags(raised, blast_threshold, flag_fraction, min_blast_count, confident)


def main() -> int:
    from capture_study import study_records

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--per-source", type=int, default=60, help="normal fields per source/device (default: %(default)s)")
    parser.add_argument("--confident", type=float, nargs="*", default=[], metavar="T", help="stricter rules to count under (see above)")
    args = parser.parse_args()
    detector = Detector.load(args.bundle)
    rule = detector.verdict_spec
    arguments = (rule["blast_threshold"], rule["flag_fraction"], rule.get("min_blast_count", 1))
    normal = [record for record in study_records(args.data, args.split, args.per_source) if record.blast != 1]
    malignant = [record for record in data.load_records(args.data, "all-taleqani", args.split) if record.blast == 1]
    judged: list[tuple[str, int, list[float]]] = []  # (source/device, blast label, the cells' blast probabilities)
    for record in normal + malignant:
        result = data.run_record(detector, record)
        if result.verdict.status == "ok":
            judged.append((record.domain, int(record.blast == 1), [cell.blast_probability for cell in result.cells]))
    print(f"{args.bundle.name} ({detector.bundle.model_version}), {args.split} split; flagged from {arguments[2]} blasts at fraction {arguments[1]}")
    for confident in [None, *args.confident]:
        print(f"\n{'the bundle' + chr(39) + 's rule' if confident is None else f'{arguments[2]} of the blasts at {confident} or more'}:")
        print("| source/device (normal fields) | judged | flagged | one cell from a flag |")
        print("|---|---|---|---|")
        for domain in sorted({d for d, blast, _ in judged if not blast}):
            fields = [p for d, blast, p in judged if d == domain and not blast]
            flagged = sum(flags(p, *arguments, confident) for p in fields)
            borderline = sum(one_cell_from_flag(p, *arguments, confident) for p in fields)
            print(f"| {domain} | {len(fields)} | {flagged} | {borderline} |")
        flagged_malignant = [flags(p, *arguments, confident) for d, blast, p in judged if blast]
        print(f"Taleqani malignant fields flagged: {sum(flagged_malignant)} of {len(flagged_malignant)} judged ({sum(flagged_malignant) / max(1, len(flagged_malignant)):.3f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    raise SystemExit(main())
