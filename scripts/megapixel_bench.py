"""This tree's runtime against an earlier one's, same bundle, in one interleaved run: what a frame costs per
extra megapixel and per extra cell (docs/performance.md, "Cost per megapixel").

    git worktree add ../before <commit>      # or: mkdir ../before && git archive <commit> leukoedge | tar -x -C ../before
    python scripts/megapixel_bench.py --data ../shared/data --baseline ../before [--frames 12] [--threads 2]

The baseline's `leukoedge` package is imported under another name (leukoedge_baseline), so both run in this
process on the same frames: leukoedge.benchmark's scaling points (real BCCD white cells pasted on BCCD fields,
one BCCD field at four sizes, Taleqani fields tiled). Frame by frame both implementations run the same frame
in turn, the order of the two and of the points rotating, so whatever else loads the machine loads both
alike. Printed: each one's `leukoedge bench --data` table and fit (ms = base + per cell x cells + per MP x
megapixels, over every point); the per-MP slope over the BCCD field alone at 320x240 to 2560x1920 (one cell,
the cell growing with the frame), stage by stage; and per point the ratio of the median totals.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.benchmark import STAGES, ScalingPoint, fit_scaling, format_scaling, scaling_points  # noqa: E402

BASELINE_PACKAGE = "leukoedge_baseline"


def import_baseline(root: Path) -> ModuleType:
    """The `leukoedge` package of another source tree, imported as leukoedge_baseline (its relative imports
    stay inside it; its few absolute `leukoedge.` imports, of errors and bundle signing, get this tree's)."""
    package = root / "leukoedge"
    spec = importlib.util.spec_from_file_location(BASELINE_PACKAGE, package / "__init__.py", submodule_search_locations=[str(package)])
    if spec is None or spec.loader is None or not (package / "detector.py").exists():
        raise SystemExit(f"{root} holds no leukoedge package: give a worktree or an archive of the commit to compare with")
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def record(point: ScalingPoint, detector: Detector, frame_index: int) -> None:
    result = detector.run(point.frames[frame_index % len(point.frames)])
    point.cell_counts.append(len(result.cells))
    for stage, ms in result.timings.items():
        if ms is not None:
            point.times.ms.setdefault(stage, []).append(ms)


def field_slopes(points: list[ScalingPoint]) -> dict[str, float]:
    """ms per megapixel, stage by stage: a straight line through the medians of the one BCCD field at its sizes
    (640x480 is the "+0 pasted" point), where only the frame's size (and so the cell's) changes."""
    fields = [point for point in points if point.name.startswith("bccd field") or point.name == "bccd +0 pasted WBC"]
    megapixels = np.array([point.megapixels for point in fields])
    return {stage: float(np.polyfit(megapixels, [point.times.median(stage) for point in fields], 1)[0]) for stage in STAGES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--baseline", type=Path, required=True, help="a source tree of the commit to compare with (its leukoedge/ is imported)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--frames", type=int, default=12, help="timed runs per point and implementation (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: %(default)s)")
    args = parser.parse_args()
    baseline = import_baseline(args.baseline)
    detectors = {
        "before": baseline.Detector.load(args.bundle, threads=args.threads),
        "after": Detector.load(args.bundle, threads=args.threads),
    }
    names = list(detectors)
    frames = scaling_points(args.data)
    points = {name: [ScalingPoint(point.name, point.frames) for point in frames] for name in names}
    for index in range(args.warmup):
        for name in names:
            for point in points[name]:
                detectors[name].run(point.frames[index % len(point.frames)])
    for index in range(args.frames):
        for point_index in [(index + offset) % len(frames) for offset in range(len(frames))]:
            for name in names[index % len(names) :] + names[: index % len(names)]:
                record(points[name][point_index], detectors[name], index)
    slopes = {}
    for name in names:
        print(f"\n## {name} ({args.baseline if name == 'before' else REPO_ROOT})\n")
        print(format_scaling(points[name], fit_scaling(points[name])))
        slopes[name] = field_slopes(points[name])
    fits = {name: fit_scaling(points[name]) for name in names}
    print("\nms per extra megapixel, before -> after: over every point (the fit above) | over the BCCD field's sizes alone")
    print("| stage | every point | BCCD field alone |")
    print("|---|---|---|")
    for stage in STAGES:
        before, after = fits["before"].per_megapixel[stage], fits["after"].per_megapixel[stage]
        joint = "-" if before is None or after is None else f"{before:.2f} -> {after:.2f}"
        print(f"| {stage} | {joint} | {slopes['before'][stage]:.2f} -> {slopes['after'][stage]:.2f} |")
    print("\nmedian / p95 ms of the total per point, before -> after, and the ratio of the medians")
    print("| point | frame | cells | before | after | ratio |")
    print("|---|---|---|---|---|---|")
    for before, after in zip(points["before"], points["after"]):
        height, width = after.frames[0].shape[:2]
        print(
            f"| {after.name} | {width}x{height} | {after.cells:g} | {before.times.median('total'):.1f} / {before.times.p95('total'):.1f} | "
            f"{after.times.median('total'):.1f} / {after.times.p95('total'):.1f} | {after.times.median('total') / before.times.median('total'):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
