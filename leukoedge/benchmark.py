"""`leukoedge bench`: per-stage latency of Detector.run on real frames.

With --data, how the cost grows with the cells in a frame and with the frame's size (scaling_points):
real white cells pasted onto a real field, one field at several sizes, real Taleqani fields tiled; the
points take turns frame by frame, and a least-squares fit over their medians gives ms per extra cell
and per extra megapixel, stage by stage.

With --compare, several configurations (ONNX Runtime FP32, ONNX Runtime INT8, the bundle's own mix
of precisions where it has one, PyTorch eager FP32) run in the same process on the same frames, one
frame each in turn (the order rotating from frame to frame), so that whatever else loads the machine
loads every configuration alike; the
table gives per-stage median and p95 ms, frames/s and the ratios of the medians.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from .bundle import bundle_models, fastest_precision, load_bundle
from .detector import Detector
from .errors import BundleError, LeukoedgeError
from .result import Result

STAGES = ("preprocess", "segment", "postprocess", "refine", "gate", "check", "classify", "total")
COMPARISON_PAIRS = (
    ("ort int8", "ort fp32"),
    ("ort default", "ort fp32"),
    ("ort fp32", "torch fp32"),
    ("ort int8", "torch fp32"),
    ("ort default", "torch fp32"),
)


@dataclass
class StageTimes:
    """Milliseconds per stage over the timed runs of one configuration."""

    label: str
    ms: dict[str, list[float]] = field(default_factory=dict)

    def median(self, stage: str) -> float:
        return float(np.median(self.ms[stage]))

    def p95(self, stage: str) -> float:
        return float(np.percentile(self.ms[stage], 95))

    @property
    def frames_per_second(self) -> float:
        return 1000.0 / self.median("total")


def time_detectors(detectors: dict[str, Detector], frames: Sequence[np.ndarray], runs: int, warmup: int) -> dict[str, StageTimes]:
    """Run every detector on frames[i % len(frames)] for i in range(runs), in turn, after `warmup` untimed rounds.
    The turn order rotates from frame to frame: whichever configuration runs right after another pays for
    that one's leftovers (its spinning worker threads, the caches it filled), so each takes every place alike."""
    labels = list(detectors)
    for index in range(warmup):
        for detector in detectors.values():
            detector.run(frames[index % len(frames)])
    times = {label: StageTimes(label) for label in detectors}
    for index in range(runs):
        frame = frames[index % len(frames)]
        shift = index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            for stage, ms in detectors[label].run(frame).timings.items():
                times[label].ms.setdefault(stage, []).append(ms)
    return times


def format_single(times: StageTimes) -> str:
    """The classic `leukoedge bench` table: one configuration."""
    lines = [f"{'stage':<12}{'median ms':>10}{'p95 ms':>10}"]
    lines += [f"{stage:<12}{times.median(stage):>10.1f}{times.p95(stage):>10.1f}" for stage in times.ms]
    lines.append(f"frames/s (median total): {times.frames_per_second:.1f}")
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    # Below the printed 0.1 ms the stage did not really run (classify on frames without cells): no ratio.
    return f"{numerator / denominator:.2f}" if denominator >= 0.05 and numerator >= 0.05 else "-"


def format_comparison(times: dict[str, StageTimes], pairs: Sequence[tuple[str, str]]) -> str:
    """Per stage and configuration: median and p95 ms; frames/s; for each (a, b) in pairs the ratio of a's medians to b's."""
    labels = list(times)
    width = max(len(label) for label in labels) + 9
    lines = [f"{'stage':<12}" + "".join(f"{label + ' median':>{width}}{'p95':>8}" for label in labels)]
    for stage in STAGES:
        lines.append(f"{stage:<12}" + "".join(f"{times[label].median(stage):>{width}.1f}{times[label].p95(stage):>8.1f}" for label in labels))
    lines.append("frames/s (median total): " + ", ".join(f"{label} {times[label].frames_per_second:.1f}" for label in labels))
    for numerator, denominator in pairs:
        if numerator in times and denominator in times:
            ratios = ", ".join(
                f"{stage} {_ratio(times[numerator].median(stage), times[denominator].median(stage))}" for stage in ("segment", "refine", "classify", "total")
            )
            lines.append(f"ratio {numerator} / {denominator} (median ms; < 1 is faster): {ratios}")
    return "\n".join(lines)


def comparison_detectors(bundle_path: Path, threads: int | None, checkpoints: Path | None) -> tuple[dict[str, Detector], list[str]]:
    """ONNX Runtime FP32, ONNX Runtime INT8 and PyTorch eager FP32 on the same bundle, and "ort default"
    where the bundle's default mixes precisions (e.g. an INT8 segmenter beside an FP32 classifier whose
    INT8 failed its gate): what Detector.load runs. Returns the detectors and notes: what cannot run here,
    with the reason (no int8 models, no torch, no or mismatched checkpoints), and what "ort default" runs."""
    bundle = load_bundle(bundle_path)
    detectors = {"ort fp32": Detector(bundle, threads=threads, precision="fp32")}
    notes = []
    try:
        detectors["ort int8"] = Detector(bundle, threads=threads, precision="int8")
    except BundleError as error:
        notes.append(f"ort int8 skipped: {error}")
    defaults = {model: fastest_precision(bundle.manifest, model) for model in bundle_models(bundle.manifest)}  # what Detector.load picks
    if len(set(defaults.values())) > 1:  # all one precision: the same as a column above
        detectors["ort default"] = Detector(bundle, threads=threads)
        notes.append("ort default: the bundle's default precision per model (" + ", ".join(f"{m} {p}" for m, p in defaults.items()) + ")")
    try:
        from .training.torch_backend import checkpoint_paths, torch_backends
    except ImportError as error:
        notes.append(f"torch fp32 skipped: {error.name} is not installed (pip install 'leukoedge[train]')")
        return detectors, notes
    try:
        backends = torch_backends(bundle, checkpoint_paths(bundle_path, checkpoints, bundle_models(bundle.manifest)), threads)
    except LeukoedgeError as error:
        notes.append(f"torch fp32 skipped: {error}")
        return detectors, notes
    eager = Detector(bundle, threads=threads, precision="fp32")
    # Same preprocessing and postprocessing; only the model calls run in PyTorch.
    eager.segmenter, eager.classifier, eager.refiner = backends["segmenter"], backends["classifier"], backends.get("refiner")
    eager.backend_name = "torch"
    detectors["torch fp32"] = eager
    return detectors, notes


# --data: frames built from real images in the data folder (../shared/data layout, see its README).
PASTED_CELLS = (0, 8, 16, 24)  # white cells pasted onto a 640x480 BCCD field (which has its own)
PASTE_GRID = (4, 6)  # rows, columns of slots on the field: 24 cells at most
FIELD_SIZES = ((320, 240), (1280, 960), (2560, 1920))  # one BCCD field resized (640x480 is the 0-pasted point)
TALEQANI_TILES = (1, 2, 3)  # 224x224 fields tiled KxK
SCENE_VARIANTS = 4  # different source images per point, taken in turn


@dataclass
class ScalingPoint:
    """Frames of one kind and size: the bench runs them in turn and times every stage."""

    name: str
    frames: list[np.ndarray]
    times: StageTimes = field(init=False)
    cell_counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.times = StageTimes(self.name)

    @property
    def megapixels(self) -> float:
        height, width = self.frames[0].shape[:2]
        return height * width / 1e6

    @property
    def cells(self) -> float:
        """The median number of cells the detector found in the point's frames."""
        return float(np.median(self.cell_counts))

    def run(self, detector: Detector, frame_index: int) -> Result:
        """Frame frame_index % len(frames) through the detector, its stage times and cell count kept; its Result."""
        result = detector.run(self.frames[frame_index % len(self.frames)])
        self.cell_counts.append(len(result.cells))
        for stage, ms in result.timings.items():
            if ms is not None:
                self.times.ms.setdefault(stage, []).append(ms)
        return result


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise LeukoedgeError(f"cannot read {path}: expected a JPEG of the data folder")
    return image


def bccd_white_cells(data_root: Path, count: int) -> list[np.ndarray]:
    """The first `count` white cells boxed in BCCD's VOC annotations, cut from their fields."""
    cells: list[np.ndarray] = []
    for annotation in sorted((data_root / "bccd" / "annotations").glob("*.xml")):
        image_path = data_root / "bccd" / "images" / f"{annotation.stem}.jpg"
        if not image_path.exists():
            continue
        image = None
        for obj in ElementTree.parse(annotation).getroot().iter("object"):
            if obj.findtext("name") != "WBC":
                continue
            image = _read(image_path) if image is None else image
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (int(float(box.findtext(side))) for side in ("xmin", "ymin", "xmax", "ymax"))
            if x1 - x0 > 8 and y1 - y0 > 8:
                cells.append(image[max(0, y0) : y1, max(0, x0) : x1])
            if len(cells) == count:
                return cells
    if not cells:
        raise LeukoedgeError(f"no WBC boxes in {data_root / 'bccd' / 'annotations'}: expected BCCD's VOC XML files")
    return [cells[index % len(cells)] for index in range(count)]


def paste_cells(field_image: np.ndarray, cells: Sequence[np.ndarray]) -> np.ndarray:
    """The field with the cells pasted in a grid of slots (each shrunk to fit its slot, aspect kept)."""
    rows, columns = PASTE_GRID
    height, width = field_image.shape[:2]
    slot_height, slot_width = height // rows, width // columns
    scene = field_image.copy()
    for slot, cell in enumerate(cells[: rows * columns]):
        scale = min(1.0, slot_width / cell.shape[1], slot_height / cell.shape[0])
        cell = cv2.resize(cell, (max(1, int(cell.shape[1] * scale)), max(1, int(cell.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        y0, x0 = (slot // columns) * slot_height, (slot % columns) * slot_width
        scene[y0 : y0 + cell.shape[0], x0 : x0 + cell.shape[1]] = cell
    return scene


def tile(fields: Sequence[np.ndarray], side: int) -> np.ndarray:
    """side x side fields as one frame, row by row."""
    return np.vstack([np.hstack(fields[row * side : (row + 1) * side]) for row in range(side)])


def scaling_points(data_root: Path, variants: int = SCENE_VARIANTS) -> list[ScalingPoint]:
    """The bench's points, each with `variants` frames from different source images (see the constants)."""
    bccd = sorted((data_root / "bccd" / "images").glob("*.jpg"))[:variants]
    taleqani = sorted((data_root / "all-taleqani" / "images").glob("*/*.jpg"))
    needed = variants * max(TALEQANI_TILES) ** 2
    if not bccd or len(taleqani) < needed:
        raise LeukoedgeError(f"{data_root} lacks bccd/images or {needed} all-taleqani/images/*/*.jpg: expected the ../shared/data layout")
    fields = [_read(path) for path in bccd]
    white_cells = bccd_white_cells(data_root, max(PASTED_CELLS) * len(fields))
    points = []
    for pasted in PASTED_CELLS:
        frames = [paste_cells(image, white_cells[index * pasted : (index + 1) * pasted]) for index, image in enumerate(fields)]
        points.append(ScalingPoint(f"bccd +{pasted} pasted WBC", frames))
    for width, height in FIELD_SIZES:
        frames = [cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if width < image.shape[1] else cv2.INTER_LINEAR) for image in fields]
        points.append(ScalingPoint(f"bccd field {width}x{height}", frames))
    # Taleqani fields spread over the four subtypes: every subtype's crowding comes into every tile.
    spread = [taleqani[(index * len(taleqani)) // needed] for index in range(needed)]
    for side in TALEQANI_TILES:
        frames = [tile([_read(path) for path in spread[start : start + side * side]], side) for start in range(0, variants * side * side, side * side)]
        points.append(ScalingPoint(f"taleqani tiled {side}x{side}", frames))
    return points


def time_points(detector: Detector, points: Sequence[ScalingPoint], runs: int, warmup: int) -> None:
    """Every point's frame i % len(frames) for i in range(runs), the points in turn (their order rotating
    from run to run, so that each follows every other alike), after `warmup` untimed rounds; fills each
    point's times and cell counts."""
    time_points_interleaved({"": detector}, {"": list(points)}, runs, warmup)


def time_points_interleaved(
    detectors: dict[str, Detector],
    points: dict[str, list[ScalingPoint]],
    runs: int,
    warmup: int,
    compare: Callable[[list[Result]], None] | None = None,
) -> None:
    """time_points for several detectors in one run, each with its own copy of the same points (`points[name]`):
    at every point of every round the detectors take turns, their order rotating too, so whatever else loads
    the machine loads each alike. `compare`, if given, sees each frame's Results of all the detectors."""
    names = list(detectors)
    count = len(points[names[0]])
    for index in range(warmup):
        for name in names:
            for point in points[name]:
                detectors[name].run(point.frames[index % len(point.frames)])
    for index in range(runs):
        for point_index in [(index + offset) % count for offset in range(count)]:
            turn = names[index % len(names) :] + names[: index % len(names)]
            results = [points[name][point_index].run(detectors[name], index) for name in turn]
            if compare is not None:
                compare(results)


# The total's slopes come with a bootstrap interval: each point's timed runs drawn again with replacement, the fit
# redone on those medians, BOOTSTRAP_DRAWS times; the central 95 % of the slopes. It says how far the runs' own spread
# on this machine moves the figure (a target "at the bar" reads as such), not how another machine would do.
BOOTSTRAP_DRAWS = 1000


@dataclass(frozen=True)
class ScalingFit:
    """ms = base + per_cell * cells + per_megapixel * megapixels, per stage; None where the points cannot tell. The
    total's ms per cell and per megapixel with their 95 % bootstrap intervals (low, high); None likewise."""

    base: dict[str, float | None]
    per_cell: dict[str, float | None]
    per_megapixel: dict[str, float | None]
    per_cell_interval: tuple[float, float] | None = None
    per_megapixel_interval: tuple[float, float] | None = None


def fit_scaling(points: Sequence[ScalingPoint], stages: Sequence[str] = STAGES) -> ScalingFit:
    """Least squares over the points' median ms against their median cell count and megapixels; for the total, the
    bootstrap intervals of its slopes (BOOTSTRAP_DRAWS, the same draws every call)."""
    design = np.array([[1.0, point.cells, point.megapixels] for point in points])
    solvable = len(points) >= 3 and np.linalg.matrix_rank(design) == 3
    base, per_cell, per_megapixel = {}, {}, {}
    for stage in stages:
        if not solvable or any(stage not in point.times.ms for point in points):
            base[stage] = per_cell[stage] = per_megapixel[stage] = None
            continue
        medians = np.array([point.times.median(stage) for point in points])
        (base[stage], per_cell[stage], per_megapixel[stage]), *_ = np.linalg.lstsq(design, medians, rcond=None)
    if not solvable or any("total" not in point.times.ms for point in points):
        return ScalingFit(base, per_cell, per_megapixel)
    rng = np.random.default_rng(0)
    medians = np.empty((BOOTSTRAP_DRAWS, len(points)))
    for column, point in enumerate(points):
        runs = np.asarray(point.times.ms["total"], np.float64)
        medians[:, column] = np.median(runs[rng.integers(0, runs.size, (BOOTSTRAP_DRAWS, runs.size))], axis=1)
    slopes = medians @ np.linalg.pinv(design).T  # every draw's (base, per cell, per MP)
    (cell_low, mp_low), (cell_high, mp_high) = np.percentile(slopes[:, 1:], [2.5, 97.5], axis=0)
    return ScalingFit(base, per_cell, per_megapixel, (float(cell_low), float(cell_high)), (float(mp_low), float(mp_high)))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_scaling(points: Sequence[ScalingPoint], fit: ScalingFit, stages: Sequence[str] = STAGES) -> str:
    """One row per point (frame size, megapixels, median cells found, median/p95 ms per stage), then the fit."""
    width = 13
    lines = [f"{'point':<26}{'frame':>11}{'MP':>6}{'cells':>7}" + "".join(f"{stage:>{width}}" for stage in stages)]
    lines.append(f"{'':<26}{'':>11}{'':>6}{'':>7}" + "".join(f"{'median/p95':>{width}}" for _ in stages))
    for point in points:
        height, frame_width = point.frames[0].shape[:2]
        cells = "".join(
            f"{point.times.median(stage):>{width - 6}.1f}/{point.times.p95(stage):<5.1f}" if stage in point.times.ms else f"{'-':>{width}}" for stage in stages
        )
        lines.append(f"{point.name:<26}{f'{frame_width}x{height}':>11}{point.megapixels:>6.2f}{point.cells:>7.1f}{cells}")
    lines.append("")
    lines.append("least squares over the points' medians: ms = base + per cell x cells found + per MP x megapixels")
    lines.append(f"{'stage':<12}{'base ms':>10}{'ms/cell':>10}{'ms/MP':>10}")
    for stage in stages:
        lines.append(f"{stage:<12}{_number(fit.base[stage]):>10}{_number(fit.per_cell[stage]):>10}{_number(fit.per_megapixel[stage]):>10}")
    if fit.per_cell_interval is not None and fit.per_megapixel_interval is not None:
        (cell_low, cell_high), (mp_low, mp_high) = fit.per_cell_interval, fit.per_megapixel_interval
        lines.append(
            f"total's 95 % bootstrap interval over the timed runs: ms/cell {cell_low:.2f}-{cell_high:.2f}, ms/MP {mp_low:.2f}-{mp_high:.2f} "
            "(this machine's run-to-run spread only)"
        )
    return "\n".join(lines)
