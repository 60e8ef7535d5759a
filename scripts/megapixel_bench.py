"""This tree's runtime against an earlier one's, same bundle, in one interleaved run: what a frame costs per
extra megapixel and per extra cell (docs/performance.md, "Cost per megapixel").

    git worktree add ../before <commit>      # or: mkdir ../before && git archive <commit> leukoedge | tar -x -C ../before
    python scripts/megapixel_bench.py --data ../shared/data --baseline ../before [--frames 12] [--threads 2] [--unseen-fields 20] [--camera-frames 3]

The baseline's `leukoedge` package is imported under another name (leukoedge_baseline), so both run in this
process on the same frames: leukoedge.benchmark's scaling points (real BCCD white cells pasted on BCCD fields,
one BCCD field at four sizes, Taleqani fields tiled). Frame by frame both implementations run the same frame
in turn, the order of the two and of the points rotating, so whatever else loads the machine loads both
alike. Printed: each one's `leukoedge bench --data` table and fit (ms = base + per cell x cells + per MP x
megapixels, over every point); the per-MP slope over the BCCD field alone at 320x240 to 2560x1920 (one cell,
the cell growing with the frame), stage by stage; per point the ratio of the median totals; and the
preprocessing of frames of camera sizes (the frame's INTER_AREA resize into the segmenter's input costs
several times more per pixel where the ratio is not a whole number, as for most sensors, than at the
bench's 1280x960 and 2560x1920).

With --camera-frames ROUNDS both run, taking turns, on frames of camera sizes (BCCD fields resized to 1280x960 ...
4056x3040, Taleqani fields tiled 4x4 and enlarged 2x), ROUNDS times each: median total and preprocess + check ms per
size, and how the results differ, beside how they differ with sensor noise of one grey level added (a reference for
what a second capture of the field changes by itself), the tear check alone at each camera size, and OpenCV's
INTER_AREA paths there (the one-step resize into the segmenter's input, one halving, 4x4 whole blocks, shrink_frame).

With --shrink-check it also measures, without changing the runtime, what a cheaper shrink would change: a
bilinear shrink to 4x the target size before the INTER_AREA resize (the same call at every ratio below 4),
for the cell crops alone and for the frame too, on large frames (BCCD fields at camera sizes, Taleqani fields
tiled 4x4 and enlarged 2x): the ms saved and how the cells, labels, verdicts and probabilities move.
"""

from __future__ import annotations

import argparse
import functools
import csv
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import leukoedge.preprocess.cpu as preprocess_cpu  # noqa: E402
from leukoedge import Detector  # noqa: E402
from leukoedge.cli import positive_int  # noqa: E402
from leukoedge.domain import tear_score  # noqa: E402
from leukoedge.benchmark import STAGES, ScalingPoint, fit_scaling, format_scaling, scaling_points, time_points_interleaved  # noqa: E402

BASELINE_PACKAGE = "leukoedge_baseline"
CAMERA_SIZES = ((640, 480), (1280, 960), (1920, 1080), (2560, 1920), (2592, 1944), (3264, 2448), (4056, 3040))


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


def same_results(one: Any, other: Any) -> bool:
    """Bit for bit: the label map, every cell's boxes, masks, label and probabilities, the verdict."""
    if not np.array_equal(one.label_map, other.label_map) or one.verdict.to_dict() != other.verdict.to_dict() or len(one.cells) != len(other.cells):
        return False
    return all(
        (a.box, a.classifier_box, a.label, a.head_scores) == (b.box, b.classifier_box, b.label, b.head_scores)
        and np.array_equal(a.mask, b.mask)
        and np.array_equal(a.nucleus_mask, b.nucleus_mask)
        for a, b in zip(one.cells, other.cells)
    )


def unseen_device_points(data_root: Path, per_lab: int) -> list[ScalingPoint]:
    """One point per TXL-PBC lab: its first `per_lab` test fields (one size per lab: raabin 575x575, bcd 416x416)."""
    with open(data_root / "txl-pbc" / "labels.csv", newline="") as table:
        rows = [row for row in csv.DictReader(table) if row["txl_split"] == "test"]
    points = []
    for lab in ("raabin", "bcd"):
        frames = [cv2.imread(str(data_root / "txl-pbc" / row["image"])) for row in rows if row["subset"] == lab][:per_lab]
        points.append(ScalingPoint(f"txl-pbc {lab} field", frames))
    return points


def field_slopes(points: list[ScalingPoint]) -> dict[str, float]:
    """ms per megapixel, stage by stage: a straight line through the medians of the one BCCD field at its sizes
    (640x480 is the "+0 pasted" point), where only the frame's size (and so the cell's) changes."""
    fields = [point for point in points if point.name.startswith("bccd field") or point.name == "bccd +0 pasted WBC"]
    megapixels = np.array([point.megapixels for point in fields])
    return {stage: float(np.polyfit(megapixels, [point.times.median(stage) for point in fields], 1)[0]) for stage in STAGES}


def preprocess_costs(detector: Detector, field: np.ndarray, rounds: int) -> None:
    """Median and p95 ms of the detector's preprocessing of one field resized to each camera size, and the ms
    per megapixel beyond the first size (640x480)."""
    print("\npreprocessing (frame resize into the segmenter's input, stain statistics, normalization) at camera sizes")
    print("| frame | MP | ratio to the input | median / p95 ms | ms per MP beyond 640x480 |")
    print("|---|---|---|---|---|")
    input_height, input_width = detector.segmenter_spec["input_size"]
    first = None
    for width, height in CAMERA_SIZES:
        frame = cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
        times = []
        for _ in range(rounds + 1):
            started = time.perf_counter()
            detector.prepare_frame(frame)
            times.append((time.perf_counter() - started) * 1000.0)
        median, p95, megapixels = np.median(times[1:]), np.percentile(times[1:], 95), width * height / 1e6
        first = first or (median, megapixels)
        slope = "-" if megapixels == first[1] else f"{(median - first[0]) / (megapixels - first[1]):.2f}"
        print(f"| {width}x{height} | {megapixels:.2f} | {max(width / input_width, height / input_height):.3g} | {median:.1f} / {p95:.1f} | {slope} |")


def shrink_first(crop_size: tuple[int, int] | None) -> Callable[[np.ndarray, int, int], np.ndarray]:
    """preprocess_cpu.resize with a bilinear shrink to 4x the target first, where the image is more than 4x larger
    on both sides (crop_size, the crops' (height, width): only for resizes to it, the cell crops; None: the frame too)."""
    exact = preprocess_cpu.resize

    def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
        if (crop_size is None or (height, width) == crop_size) and image.shape[1] > 4 * width and image.shape[0] > 4 * height:
            image = cv2.resize(image, (4 * width, 4 * height), interpolation=cv2.INTER_LINEAR)
        return exact(image, width, height)

    return resize


def large_frames(data_root: Path) -> list[np.ndarray]:
    fields = sorted((data_root / "bccd" / "images").glob("*.jpg"))[:40:2]
    frames = [cv2.resize(cv2.imread(str(path)), CAMERA_SIZES[1 + index % (len(CAMERA_SIZES) - 1)]) for index, path in enumerate(fields)]
    taleqani = sorted((data_root / "all-taleqani" / "images").glob("*/*.jpg"))
    for start in range(6):
        tiles = [cv2.imread(str(taleqani[(start * 16 + index) * 7 % len(taleqani)])) for index in range(16)]
        tiled = np.vstack([np.hstack(tiles[row * 4 : row * 4 + 4]) for row in range(4)])
        frames.append(cv2.resize(tiled, (tiled.shape[1] * 2, tiled.shape[0] * 2)))
    return frames


def _box_iou(one: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> float:
    width = min(one[2], other[2]) - max(one[0], other[0])
    height = min(one[3], other[3]) - max(one[1], other[1])
    inter = max(width, 0) * max(height, 0)
    area = (one[2] - one[0]) * (one[3] - one[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
    return inter / area if area else 0.0


def matched_cells(before: list, after: list) -> list[tuple]:
    """Pairs of cells of two results of one frame whose classifier boxes overlap at IoU >= 0.5, greedily."""
    pairs, free = [], list(after)
    for cell in before:
        best = max(free, key=lambda other: _box_iou(cell.classifier_box, other.classifier_box), default=None)
        if best is not None and _box_iou(cell.classifier_box, best.classifier_box) >= 0.5:
            pairs.append((cell, best))
            free.remove(best)
    return pairs


def shrink_check(detector: Detector, data_root: Path) -> None:
    """The exact runtime against shrink_first on the same large frames, one after the other frame by frame:
    cells found by one only (no box of the other at IoU >= 0.5: the field segmenter's boxes or the gate's
    decisions moved), boxes moved, and over the cells both found, labels and probabilities."""
    exact = preprocess_cpu.resize
    frames = large_frames(data_root)
    print("\nbilinear shrink to 4x the target before INTER_AREA, against the runtime's INTER_AREA alone (not shipped)")
    print("| shrunk first | frames | cells (exact) | found by one only | boxes moved | verdicts changed | labels changed | probability change max / p95 | median ms exact -> shrunk |")
    print("|---|---|---|---|---|---|---|---|---|")
    crop_size = tuple(detector.classifier_spec["input_size"])
    for crops_only in (True, False):
        differences, exact_ms, shrunk_ms = ResultDifferences(), [], []
        for frame in frames:
            results = []
            for resize, times in ((exact, exact_ms), (shrink_first(crop_size if crops_only else None), shrunk_ms)):
                preprocess_cpu.resize = resize
                started = time.perf_counter()
                results.append(detector.run(frame))
                times.append((time.perf_counter() - started) * 1000.0)
            preprocess_cpu.resize = exact
            differences.add(*results)
        print(
            f"| {'cell crops' if crops_only else 'frame and cell crops'} | {len(frames)} | {differences.row()} | "
            f"{np.median(exact_ms):.1f} -> {np.median(shrunk_ms):.1f} |"
        )


def camera_frames_check(detectors: dict[str, Any], data_root: Path, rounds: int) -> None:
    """Both implementations on frames of camera sizes (large_frames: BCCD fields resized to CAMERA_SIZES beyond 640x480,
    Taleqani fields tiled 4x4 and enlarged 2x), taking turns frame by frame, their order alternating: per size the median
    total and preprocess + check ms of each, and how the results differ (cells found by one only, classifier boxes moved,
    verdicts and labels changed, the largest and p95 change of any head's probability over the cells both found)."""
    frames = large_frames(data_root)
    sizes = sorted({frame.shape[:2] for frame in frames}, key=lambda shape: shape[0] * shape[1])
    times = {name: {size: {"total": [], "preprocess+check": []} for size in sizes} for name in detectors}
    differences = {"after": ResultDifferences(), "noise": ResultDifferences()}
    noise = np.random.default_rng(0)
    for round_index in range(rounds):
        for frame in frames:
            order = list(detectors) if round_index % 2 == 0 else list(detectors)[::-1]
            results = {}
            for name in order:
                result = detectors[name].run(frame)
                results[name] = result
                timing = times[name][frame.shape[:2]]
                timing["total"].append(result.timings["total"])
                timing["preprocess+check"].append(result.timings["preprocess"] + result.timings.get("check", 0.0))
            if round_index:
                continue  # the results are the same every round: compared once
            differences["after"].add(results["before"], results["after"])
            # What a second capture of the field could change by itself: the same frame with sensor noise of 1 grey level.
            noisy = np.clip(frame + noise.normal(0.0, 1.0, frame.shape), 0, 255).astype(np.uint8)
            differences["noise"].add(results["before"], detectors["before"].run(noisy))
    print(f"\nframes of camera sizes ({len(frames)}), before -> after, {rounds} rounds")
    print("| frame | frames | total median ms | preprocess + check median ms | ratio of totals |")
    print("|---|---|---|---|---|")
    for size in sizes:
        count = sum(frame.shape[:2] == size for frame in frames)
        total = [float(np.median(times[name][size]["total"])) for name in ("before", "after")]
        steps = [float(np.median(times[name][size]["preprocess+check"])) for name in ("before", "after")]
        print(f"| {size[1]}x{size[0]} | {count} | {total[0]:.1f} -> {total[1]:.1f} | {steps[0]:.1f} -> {steps[1]:.1f} | {total[1] / total[0]:.2f} |")
    print("| compared with before | cells (before) | found by one only | classifier boxes moved | verdicts changed | labels changed | probability change max / p95 |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("after", "after"), ("noise", "before, frame with sensor noise of 1 grey level (a reference)")):
        print(f"| {label} | {differences[name].row()} |")


def shrink_paths(detector: Detector, field: np.ndarray, rounds: int) -> None:
    """OpenCV's INTER_AREA paths at each camera size, median ms: the one-step resize into the segmenter's input (its
    content's size), one halving (2x2 means, the vectorized path), a 4x4 whole-block average, and shrink_frame (the
    halvings, then the rest), on one BCCD field resized."""
    from leukoedge.preprocess.cpu import fit_letterbox, resize, shrink_frame

    print("\nshrink paths (OpenCV INTER_AREA), median ms: one step into the segmenter's input | one halving | 4x4 whole blocks | shrink_frame")
    print("| frame | one step | one halving | 4x4 blocks | shrink_frame |")
    print("|---|---|---|---|---|")
    input_height, input_width = detector.segmenter_spec["input_size"]
    for width, height in CAMERA_SIZES:
        frame = cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
        placement = fit_letterbox(height, width, (input_height, input_width))
        target = placement.content_width, placement.content_height
        paths = (  # one step, one halving, 4x4 whole blocks, shrink_frame
            functools.partial(resize, frame, *target),
            functools.partial(cv2.resize, frame, (width // 2, height // 2), interpolation=cv2.INTER_AREA),
            functools.partial(cv2.resize, frame, (width // 4, height // 4), interpolation=cv2.INTER_AREA),
            functools.partial(shrink_frame, frame, *target),
        )
        medians = []
        for path in paths:
            times = []
            for _ in range(rounds + 1):
                started = time.perf_counter()
                path()
                times.append((time.perf_counter() - started) * 1000.0)
            medians.append(np.median(times[1:]))
        print(f"| {width}x{height} | " + " | ".join(f"{median:.2f}" for median in medians) + " |")


def tear_check(scores: dict[str, Callable[[np.ndarray], float]], data_root: Path, rounds: int) -> None:
    """The tear check alone (domain.tear_score, run on frames about to be flagged), both implementations in turn on one
    BCCD field resized to each camera size: median ms and the scores."""
    field = cv2.imread(str(sorted((data_root / "bccd" / "images").glob("*.jpg"))[0]))
    print("\ntear check alone (frames about to be flagged), median ms before -> after, and its score")
    print("| frame | ms | score |")
    print("|---|---|---|")
    for width, height in CAMERA_SIZES:
        frame = cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
        times: dict[str, list[float]] = {name: [] for name in scores}
        for round_index in range(rounds + 1):
            for name in (list(scores) if round_index % 2 == 0 else list(scores)[::-1]):
                started = time.perf_counter()
                scores[name](frame)
                if round_index:  # the first round warms up
                    times[name].append((time.perf_counter() - started) * 1000.0)
        medians = " -> ".join(f"{np.median(times[name]):.1f}" for name in scores)
        print(f"| {width}x{height} | {medians} | {' -> '.join(f'{scores[name](frame):.3f}' for name in scores)} |")


class ResultDifferences:
    """How the Results of one implementation differ from another's over the same frames (the cells matched by
    matched_cells). A plain class: the tests load this script as a file, outside sys.modules, which dataclasses need."""

    def __init__(self) -> None:
        self.cells = self.one_only = self.moved = self.verdicts = self.labels = 0
        self.changes: list[float] = []

    def add(self, before: Any, after: Any) -> None:
        pairs = matched_cells(before.cells, after.cells)
        self.cells += len(before.cells)
        self.one_only += len(before.cells) + len(after.cells) - 2 * len(pairs)
        self.verdicts += (before.verdict.flagged, before.verdict.status) != (after.verdict.flagged, after.verdict.status)
        for one, other in pairs:
            self.moved += one.classifier_box != other.classifier_box
            self.labels += one.label != other.label
            self.changes += [abs(one.head_scores[head][name] - other.head_scores[head][name]) for head in one.head_scores for name in one.head_scores[head]]

    def row(self) -> str:
        change = f"{max(self.changes):.3f} / {np.percentile(self.changes, 95):.4f}" if self.changes else "-"
        return f"{self.cells} | {self.one_only} | {self.moved} | {self.verdicts} | {self.labels} | {change}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--baseline", type=Path, required=True, help="a source tree of the commit to compare with (its leukoedge/ is imported)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--frames", type=int, default=12, help="timed runs per point and implementation (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: %(default)s)")
    parser.add_argument("--shrink-check", action="store_true", help="also measure a cheaper shrink of large frames and crops (not shipped)")
    parser.add_argument("--camera-frames", type=positive_int, default=0, metavar="ROUNDS", help="also run both on frames of camera sizes, ROUNDS times each, and compare their results")
    parser.add_argument(
        "--unseen-fields", type=int, default=0, metavar="N",
        help="also time N test fields of each TXL-PBC lab (raabin, bcd): microscopes the bench points do not come from, with many red cells and platelets proposed",
    )
    args = parser.parse_args()
    baseline = import_baseline(args.baseline)
    detectors = {
        "before": baseline.Detector.load(args.bundle, threads=args.threads),
        "after": Detector.load(args.bundle, threads=args.threads),
    }
    names = list(detectors)
    frames = scaling_points(args.data)
    fitted = len(frames)  # the fits are over the bench's own points; the unseen-device fields are shown beside them
    frames += unseen_device_points(args.data, args.unseen_fields) if args.unseen_fields else []
    points = {name: [ScalingPoint(point.name, point.frames) for point in frames] for name in names}
    outcomes: list[bool] = []
    time_points_interleaved(detectors, points, args.frames, args.warmup, lambda results: outcomes.append(same_results(*results)))
    compared, differing = len(outcomes), outcomes.count(False)
    print(f"results (label map, cells' boxes, masks, labels, probabilities, verdict) differ bit for bit on {differing} of {compared} frames")
    slopes = {}
    fits = {name: fit_scaling(points[name][:fitted]) for name in names}
    for name in names:
        print(f"\n## {name} ({args.baseline if name == 'before' else REPO_ROOT})\n")
        print(format_scaling(points[name], fits[name]))
        slopes[name] = field_slopes(points[name])
    print("\nms per extra megapixel, before -> after: over every point (the fit above) | over the BCCD field's sizes alone")
    print("| stage | every point | BCCD field alone |")
    print("|---|---|---|")
    for stage in STAGES:
        before, after = fits["before"].per_megapixel[stage], fits["after"].per_megapixel[stage]
        joint = "-" if before is None or after is None else f"{before:.2f} -> {after:.2f}"
        print(f"| {stage} | {joint} | {slopes['before'][stage]:.2f} -> {slopes['after'][stage]:.2f} |")
    print("\nmedian / p95 ms of the total (and of the gate + refine stages) per point, before -> after, and the ratio of the medians")
    print("| point | frame | cells | before | after | ratio | gate + refine, before -> after |")
    print("|---|---|---|---|---|---|---|")
    for before, after in zip(points["before"], points["after"]):
        height, width = after.frames[0].shape[:2]
        per_cell = " -> ".join(f"{point.times.median('gate') + point.times.median('refine'):.1f}" for point in (before, after))
        print(
            f"| {after.name} | {width}x{height} | {after.cells:g} | {before.times.median('total'):.1f} / {before.times.p95('total'):.1f} | "
            f"{after.times.median('total'):.1f} / {after.times.p95('total'):.1f} | {after.times.median('total') / before.times.median('total'):.2f} | {per_cell} |"
        )
    preprocess_costs(detectors["after"], frames[0].frames[0], 3 * args.frames)
    if args.shrink_check:
        shrink_check(detectors["after"], args.data)
    if args.camera_frames:
        shrink_paths(detectors["after"], frames[0].frames[0], 10 * args.camera_frames)
        camera_frames_check(detectors, args.data, args.camera_frames)
        tear_check({"before": sys.modules[f"{BASELINE_PACKAGE}.domain"].tear_score, "after": tear_score}, args.data, 3 * args.camera_frames)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
