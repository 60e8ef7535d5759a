"""`leukoedge bench --data` for several bundles in one interleaved run: the time per extra cell of bundles that
differ in their refiner (docs/performance.md, "The light refiner").

    python scripts/refiner_bench.py --data ../shared/data --bundles default=models/default light=DIR [--frames 8] [--threads 2]

The frames are leukoedge.benchmark's scaling points (real BCCD white cells pasted on BCCD fields, one field at
three sizes, Taleqani fields tiled). Frame by frame, every bundle runs the same frame in turn, the order of
the bundles and of the points rotating, so whatever else loads the machine loads every bundle alike; on a
shared machine read the ratios, not the absolute figures. Printed: each bundle's `leukoedge bench --data`
table and fit, then per point the ratio of each bundle's median total (and refine) to the first bundle's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.benchmark import ScalingPoint, fit_scaling, format_scaling, scaling_points, time_points_interleaved  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundles", nargs="+", required=True, metavar="NAME=PATH", help="the bundles; ratios are to the first")
    parser.add_argument("--frames", type=int, default=8, help="timed runs per point and bundle (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: %(default)s)")
    args = parser.parse_args()
    names = [entry.split("=", 1)[0] for entry in args.bundles]
    detectors = {name: Detector.load(entry.split("=", 1)[1], threads=args.threads) for name, entry in zip(names, args.bundles)}
    frames = scaling_points(args.data)
    points = {name: [ScalingPoint(point.name, point.frames) for point in frames] for name in names}
    time_points_interleaved(detectors, points, args.frames, args.warmup)
    for name in names:
        print(f"\n## {name}: {detectors[name].bundle.root}\n")
        print(format_scaling(points[name], fit_scaling(points[name])))
    first = names[0]
    print(f"\nmedian ms per point, total (refine), and the ratio to {first}'s total (refine)")
    print("| point | cells | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for point_index, point in enumerate(frames):
        reference = points[first][point_index].times
        cells = points[first][point_index].cells
        row = []
        for name in names:
            times = points[name][point_index].times
            total, refine = times.median("total"), times.median("refine")
            row.append(f"{total:.1f} ({refine:.1f}); x{total / reference.median('total'):.2f} (x{refine / reference.median('refine'):.2f})")
        print(f"| {point.name} | {cells:.0f} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
