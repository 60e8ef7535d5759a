"""Where the domain check's smallest-cell threshold comes from: per source, the median white-cell side (px) of each
validation field the check is fitted on (its smallest and its median over the fields), and the test fields of one
source whose median side is below a size, with each bundle's verdict status (docs/performance.md, "The dense light
segmenter trained again").

    python scripts/cell_sides.py --data ../shared/data models/default OTHER_BUNDLE [--test-source all-taleqani --below 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402


def main() -> int:
    from leukoedge.training import data
    from leukoedge.training.gate import GateRecipe, frame_domain, gate_records

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", type=Path, nargs="+", help="the bundles to compare")
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--test-source", default="all-taleqani", help="the source whose small-celled test fields are listed (default: %(default)s)")
    parser.add_argument("--below", type=float, default=20.0, help="list test fields whose median cell side is below this in any bundle (default: %(default)s px)")
    args = parser.parse_args()
    validation = gate_records(args.data, "val", GateRecipe().val_per_source)
    detectors = {bundle: Detector.load(bundle) for bundle in args.bundles}
    print("| bundle | source | validation fields | smallest median side (px) | median of the medians (px) |\n|---|---|---|---|---|")
    for bundle, detector in detectors.items():
        fields = frame_domain(detector, validation, f"validation fields, {bundle}")
        for source in sorted(set(fields.domains)):
            sides = fields.cell_side[(fields.domains == source) & np.isfinite(fields.cell_side)]
            print(f"| {bundle} | {source} | {sides.size} | {sides.min():.1f} | {np.median(sides):.1f} |")
    print(f"\n| {args.test_source} test field | " + " | ".join(f"{bundle}: status, median side" for bundle in detectors) + " |")
    print("|---|" + "---|" * len(detectors))
    for record in data.load_records(args.data, args.test_source, "test"):
        frame = data.read_image(record)
        verdicts = [detector.run(frame).verdict for detector in detectors.values()]
        sides = [verdict.domain.get("cell_side_px") if verdict.domain else None for verdict in verdicts]
        if any(side is not None and side < args.below for side in sides):
            cells = " | ".join(f"{verdict.status}, {'-' if side is None else f'{side:.1f}'}" for verdict, side in zip(verdicts, sides))
            print(f"| {record.image_path.name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
