"""Proposals at the frame's edge that the gate rejects, read again whole (mirrored across the edge, the frame
reflected there: Detector.gate_keeps), source by source: the figures docs/training.md ("Cells at the frame's edge")
chose the gate's edge threshold (training/gate.py EDGE_WHOLE_THRESHOLD) on.

    python scripts/edge_cells.py --data ../shared/data --bundle models/default [--split val] [--per-source 60]

For each source/device and label (white cell 1, not 0, as the gate's training labels them: training/gate.py
label_proposals; fragments and Taleqani's unmatched proposals left out), how many edge proposals the gate's
threshold rejects, and how many of them the whole reading passes at each --thresholds value, then the ten best
scores with their fields. Beware the single-cell sources' labels at the edge: a PBC or ALL-IDB2 image's other
proposals are labelled "not a white cell" (0) whatever they are, and some are white cells cut by the image's edge.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.detector import Detector  # noqa: E402
from leukoedge.preprocess.cpu import shows_half, touches_edge  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.gate import gate_records, label_proposals, look_alike_records  # noqa: E402


def edge_scores(detector: Detector, record: data.Record) -> list[tuple[int, float, float, tuple[int, int, int, int]]]:
    """(label, p(wbc) of its crop, p(wbc) read whole, box) of each labelled edge proposal the gate rejects in a field."""
    frame = data.read_image(record)
    found = detector.candidates(frame)
    if not found.instances:
        return []
    spec = detector.gate_spec
    boxes = [instance.classifier_box for instance in found.instances]
    labels = label_proposals(record, boxes, frame.shape[:2], 1.0)
    cut = detector.white_cell_probabilities(detector.cell_crops(frame, found.prepared, found.instances))
    chosen = [i for i, box in enumerate(boxes) if labels[i] is not None and cut[i] < spec["threshold"] and touches_edge(box, frame.shape[:2]) and shows_half(box, frame.shape[:2])]
    if not chosen:
        return []
    whole = detector.whole_probabilities(frame, found.prepared, [boxes[i] for i in chosen])
    return [(int(labels[i]), float(cut[i]), float(p), boxes[i]) for i, p in zip(chosen, whole)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--per-source", type=int, default=60, help="fields per source/device, evenly spaced (default: 60)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.99])
    args = parser.parse_args(argv)

    detector = Detector.load(args.bundle)
    if detector.gate is None:
        parser.error(f"{args.bundle} has no gate")
    records = gate_records(args.data, args.split, args.per_source) + look_alike_records(args.data, args.split, args.per_source)
    rows: dict[tuple[str, int], list[tuple[float, float, str, tuple]]] = defaultdict(list)
    for record in tqdm(records, desc="edge proposals", unit="field"):
        for label, cut, whole, box in edge_scores(detector, record):
            rows[(record.domain, label)].append((whole, cut, Path(record.image_path).name, box))
    print(f"{args.bundle} ({detector.bundle.model_version}), {args.split} split, gate threshold {detector.gate_spec['threshold']:.3f}: "
          "edge proposals it rejects, read again whole")
    print("| source | label | rejected at the edge | " + " | ".join(f"whole >= {t:g}" for t in args.thresholds) + " |")
    print("|---|---|---|" + "---|" * len(args.thresholds))
    for (domain, label), found in sorted(rows.items()):
        scores = np.array([whole for whole, *_ in found])
        print(f"| {domain} | {'white cell' if label else 'not'} | {len(found)} | " + " | ".join(str(int((scores >= t).sum())) for t in args.thresholds) + " |")
    print("\nbest whole readings (p whole, p cut, field, box):")
    for (domain, label), found in sorted(rows.items()):
        for whole, cut, name, box in sorted(found, reverse=True)[:10]:
            if whole >= min(args.thresholds):
                print(f"  {domain} {'white cell' if label else 'not'}: {whole:.3f} {cut:.3f} {name} {box}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
