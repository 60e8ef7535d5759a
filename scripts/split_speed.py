"""Time of postprocess.find_cells (the split of touching cells, the piece rules, the masks mapped to the frame) on the
field segmenter's label maps of validation fields, per source: the postprocessing cost a change of the split moves
(docs/training.md, "Touching white cells").

    python scripts/split_speed.py --data ../shared/data [--bundle models/default] [--per-source 20] [--runs 5]

The label maps are made once; each field's map is then postprocessed `runs` times in turn with the others, and the
median over the runs is that field's time. Printed per source: fields, median and p95 of the per-field times (ms).
Compare two versions of leukoedge/postprocess.py by running this at each, one after the other, on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from onnx_speed import median_p95

SOURCES = ("all-taleqani", "bccd", "txl-pbc", "wbc-seg-zheng")


def main() -> int:
    from leukoedge import Detector
    from leukoedge.postprocess import find_cells, label_map_from_probabilities
    from leukoedge.training import data
    from leukoedge.training.detection import records_per_domain

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--per-source", type=int, default=20, help="validation fields per source/device (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="timed passes over the fields (default: %(default)s)")
    args = parser.parse_args()

    detector = Detector.load(args.bundle)
    spec = detector.bundle.manifest["postprocess"]
    fields = []
    for record in records_per_domain(args.data, "val", SOURCES, args.per_source):
        found = detector.candidates(data.read_image(record))
        fields.append((record.domain, label_map_from_probabilities(found.probabilities), found.prepared.letterbox))
    times = np.zeros((args.runs, len(fields)))
    for run in range(args.runs):
        for index, (_, label_map, letterbox) in enumerate(fields):
            started = time.perf_counter()
            find_cells(label_map, letterbox, spec["min_cell_area_px"], spec["split_touching"], spec.get("min_nucleus_area_px", 0))
            times[run, index] = (time.perf_counter() - started) * 1000
    per_field = np.median(times, axis=0)
    print("| source/device | fields | find_cells ms, median / p95 |\n|---|---|---|")
    for domain in dict.fromkeys(domain for domain, _, _ in fields):
        chosen = per_field[[d == domain for d, _, _ in fields]]
        median, p95 = median_p95(chosen)
        print(f"| {domain} | {len(chosen)} | {median:.2f} / {p95:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
