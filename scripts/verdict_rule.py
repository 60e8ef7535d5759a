"""A copy of a bundle with its verdict's minimum blast count set and its flag fraction chosen again on the
Taleqani validation fields (training/verdict.flag_fraction_on); the models, gate and domain check untouched.

    python scripts/verdict_rule.py --bundle models/default --data ../shared/data --min-blast-count 2 --out DIR

Bundle 0.5.0 was such a copy of 0.4.0, given its version and changelog afterwards (docs/training.md,
"Bundle 0.5.0"); a bundle `leukoedge train` writes now carries the rule (training/verdict.MIN_BLAST_COUNT).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.bundle import load_bundle, save_bundle  # noqa: E402


def with_verdict_rule(bundle_dir: Path, data_root: Path, min_blast_count: int, out_dir: Path) -> dict:
    """Write the copy of bundle_dir to out_dir; returns the verdict's choice (flag fraction, balanced accuracy, fields)."""
    from leukoedge import Detector
    from leukoedge.training import data
    from leukoedge.training.verdict import flag_fraction_on

    bundle = load_bundle(bundle_dir)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["verdict"]["min_blast_count"] = min_blast_count
    with Detector.load(bundle_dir) as detector:
        detector.verdict_spec = manifest["verdict"]
        manifest["verdict"]["flag_fraction"], choice = flag_fraction_on(detector, data.load_records(data_root, "all-taleqani", "val"))
    manifest.setdefault("training", {})["verdict_rule"] = {"min_blast_count": min_blast_count, **choice}
    save_bundle(out_dir, manifest, {name: bundle.root / name for name in manifest["files"]})
    return choice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="the bundle to copy (default: %(default)s)")
    parser.add_argument("--data", type=Path, required=True, help="the data root (its all-taleqani validation fields choose the flag fraction)")
    parser.add_argument("--min-blast-count", type=int, required=True, help="the fewest blasts that flag a frame (1: any blast)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the copy to")
    args = parser.parse_args()
    if args.min_blast_count < 1:
        parser.error("--min-blast-count must be at least 1")
    choice = with_verdict_rule(args.bundle, args.data, args.min_blast_count, args.out)
    print(f"{args.out}: a frame is flagged from {args.min_blast_count} blast(s) at blast fraction >= {choice['flag_fraction']:.3f} "
          f"(balanced accuracy {choice['balanced_accuracy']} on {choice['fields']} Taleqani validation fields)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
