"""Where domain.MAX_EMPTY_FOREGROUND comes from: per source and split, the frames in which the bundle keeps no white
cell, and the largest share of their content the segmenter marks as white cell (domain.foreground_share, as
Result.verdict.domain["empty_foreground"] reads it). An empty field or a platelet or erythroblast image marks little;
a frame filled by one white cell too large to keep marks most of it (docs/training.md, "A higher magnification").

    python scripts/empty_foreground.py --data ../shared/data [--bundle models/default] [--splits train val]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.domain import MAX_EMPTY_FOREGROUND  # noqa: E402
from leukoedge.training import data  # noqa: E402

SOURCES = ("pbc", "bccd", "txl-pbc", "wbc-seg-zheng", "all-idb2", "all-taleqani")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--splits", nargs="+", choices=("train", "val", "test"), default=["train", "val"])
    args = parser.parse_args()
    detector = Detector.load(args.bundle)
    print("| source | split | frames | no white cell kept | largest white-cell share among them (frame) |")
    print("|---|---|---|---|---|")
    total, largest = 0, 0.0
    for source in SOURCES:
        for split in args.splits:
            records = data.load_records(args.data, source, split)
            shares = []
            for record in tqdm(records, desc=f"{source} {split}", unit="frame", leave=False):
                verdict = data.run_record(detector, record).verdict
                if verdict.cell_count == 0 and "empty_foreground" in verdict.domain:
                    shares.append((verdict.domain["empty_foreground"], record.image_path.name))
            top = max(shares, default=None)
            total, largest = total + len(shares), max(largest, top[0] if top else 0.0)
            print(f"| {source} | {split} | {len(records)} | {len(shares)} | " + (f"{top[0]:.2f} ({top[1]}) |" if top else "- |"))
    print(f"frames without a white cell kept: {total}; the largest share {largest:.2f} (domain.MAX_EMPTY_FOREGROUND: {MAX_EMPTY_FOREGROUND})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
