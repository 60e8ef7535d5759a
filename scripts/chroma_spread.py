"""How much colour a stained field has: the larger of its a* and b* spreads (leukoedge.domain.chroma_spread, the
frame's L*a*b* statistics before stain normalization, as a bundle's preprocessing computes them), per source, over
every image of the data folder; and the same for a greyscale copy of each source's first image. The domain check's
floor (domain.MIN_CHROMA_SPREAD) must sit well below every real field and above every grey one.

    python scripts/chroma_spread.py --data ../shared/data [--bundle models/default]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from leukoedge import Detector
from leukoedge.domain import MIN_CHROMA_SPREAD, chroma_spread
from leukoedge.shipped import default_bundle
from leukoedge.training import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (e.g. ../shared/data)")
    parser.add_argument("--bundle", type=Path, default=default_bundle(), help="whose preprocessing (default: %(default)s)")
    args = parser.parse_args()
    detector = Detector.load(args.bundle)

    def spread_of(image: np.ndarray) -> float:
        return chroma_spread(detector.prepare_frame(image))
    print(f"floor (domain.MIN_CHROMA_SPREAD): {MIN_CHROMA_SPREAD:g}")
    print("| source | images | smallest | 1st percentile | median | its first image in grey |")
    print("|---|---|---|---|---|---|")
    for source in data.SOURCES:
        records = data.load_records(args.data, source)
        spreads = np.array([spread_of(data.read_image(record)) for record in tqdm(records, desc=source, leave=False)])
        grey = cv2.cvtColor(cv2.cvtColor(data.read_image(records[0]), cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        print(
            f"| {source} | {len(spreads)} | {spreads.min():.2f} | {np.quantile(spreads, 0.01):.2f} | {np.median(spreads):.2f} | "
            f"{spread_of(grey):.2f} |"
        )


if __name__ == "__main__":
    main()
