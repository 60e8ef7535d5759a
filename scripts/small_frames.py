"""How often small frames cut from normal smears are flagged: the figure behind limits.min_judged_side.

    python scripts/small_frames.py --data ../shared/data [--bundle models/default] [--crops 60]

For each side, `--crops` square crops at seeded random places of normal BCCD fields (640x480) and as
many of normal PBC cell images (360x363, healthy donors: every flag is false) run through the
Detector twice: with the too-small gate off (what the models would say) and with the bundle's gate.
Then the single-cell crops of ALL-IDB2 and Zheng, which must stay judged, with their smallest side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402

SIDES = (16, 24, 32, 48, 64, 80, 96, 128)


def normal_fields(data: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Normal smears only: every 10th BCCD field and every 40th PBC cell image (healthy donors)."""
    bccd = sorted((data / "bccd" / "images").glob("*.jpg"))[::10]
    pbc = sorted((data / "pbc" / "images").rglob("*.jpg"))[::40]
    return [cv2.imread(str(path)) for path in bccd], [cv2.imread(str(path)) for path in pbc]


def crops(fields: list[np.ndarray], side: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` square crops of `side` px, each from a random field at a random place (seeded)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(count):
        field = fields[int(rng.integers(len(fields)))]
        top = int(rng.integers(field.shape[0] - side + 1))
        left = int(rng.integers(field.shape[1] - side + 1))
        chosen.append(np.ascontiguousarray(field[top : top + side, left : left + side]))
    return chosen


def flag_counts(detector: Detector, frames: list[np.ndarray], gate: bool) -> tuple[int, int]:
    """(frames judged, frames flagged) with the too-small gate on, or off (min_judged_side 0)."""
    kept = detector.min_judged_side
    detector.min_judged_side = kept if gate else 0
    try:
        verdicts = [detector.run(frame).verdict for frame in frames]
    finally:
        detector.min_judged_side = kept
    return sum(v.judged for v in verdicts), sum(v.flagged for v in verdicts)


def single_cell_crops(data: Path) -> dict[str, list[Path]]:
    return {
        "all-idb2": sorted((data / "all-idb2" / "images").glob("*.jpg")),
        "wbc-seg-zheng": sorted((data / "wbc-seg-zheng" / "dataset1" / "images").glob("*.bmp")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--crops", type=int, default=60, help="crops per side from BCCD and as many from PBC")
    parser.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
    args = parser.parse_args(argv)
    detector = Detector.load(args.bundle, threads=1)
    bccd_fields, pbc_fields = normal_fields(args.data)
    print(f"bundle {args.bundle.name}: min_judged_side {detector.min_judged_side} px")
    print("side  crops  flagged (gate off)  judged (gate on)  flagged (gate on)")
    for side in args.sides:
        frames = crops(bccd_fields, side, args.crops, seed=side) + crops(pbc_fields, side, args.crops, seed=side + 1)
        _, flagged_off = flag_counts(detector, frames, gate=False)
        judged_on, flagged_on = flag_counts(detector, frames, gate=True)
        print(f"{side:4d}  {len(frames):5d}  {flagged_off:7d} ({100 * flagged_off / len(frames):3.0f} %)  {judged_on:14d}  {flagged_on:13d}")
    for name, paths in single_cell_crops(args.data).items():
        images = [cv2.imread(str(path)) for path in paths]
        statuses = [detector.run(image).verdict.status for image in images]
        smallest = min(min(image.shape[:2]) for image in images)
        too_small = statuses.count("too_small")
        print(f"{name}: {len(images)} single-cell crops, smallest side {smallest} px, {too_small} refused as too small")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
