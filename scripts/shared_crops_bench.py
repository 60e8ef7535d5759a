"""Time Detector.run with one crop per cell shared by the refiner and the classifier against cutting them
twice (Detector.shared_crops off), interleaved in one run: Taleqani test fields and 2x2 tiles of them.

    python scripts/shared_crops_bench.py --data ../shared/data [--bundle models/default] [--rounds 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from leukoedge import Detector
from leukoedge.training import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "default")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    fields = [data.read_image(record) for record in data.load_records(args.data, "all-taleqani", "test")[:8]]
    frames = {"Taleqani field": fields, "2x2 tile": [np.vstack([np.hstack(fields[i : i + 2]), np.hstack(fields[i + 2 : i + 4])]) for i in (0, 4)]}
    detector = Detector.load(args.bundle)
    if not detector.shared_crops:
        raise SystemExit(f"{args.bundle}: the refiner's and the classifier's crops differ in size or margin; nothing is shared")
    times: dict[tuple[str, bool], list[float]] = {}
    for round_index in range(args.rounds + 2):  # the first two rounds warm up
        for name, chosen in frames.items():
            frame = chosen[round_index % len(chosen)]
            for shared in (True, False):
                detector.shared_crops = shared
                started = time.perf_counter()
                detector.run(frame)
                if round_index >= 2:
                    times.setdefault((name, shared), []).append((time.perf_counter() - started) * 1000.0)
    for name in frames:
        one, two = np.array(times[(name, True)]), np.array(times[(name, False)])
        print(
            f"{name}: shared {np.median(one):.1f} ms median / {np.percentile(one, 95):.1f} p95; cut twice {np.median(two):.1f} / "
            f"{np.percentile(two, 95):.1f}; ratio {np.median(one) / np.median(two):.2f}"
        )


if __name__ == "__main__":
    main()
