"""The reference preprocessing: numpy + OpenCV. Training imports these same functions.

A frame goes through: resize into the model's input (letterbox, aspect kept), Reinhard stain
normalization to the bundle's reference, per-channel mean/std, NCHW float32. Cell crops for the
classifier are cut from the original frame and normalized with the statistics of the whole frame,
so that a cell looks the same to the classifier whatever else is in the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import cv2
import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class StainReference:
    """Target colour statistics in CIE L*a*b* (OpenCV float convention: L 0..100, a/b about -128..127)."""

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]

    def to_manifest(self) -> dict[str, Any]:
        return {"method": "reinhard", "lab_mean": list(self.lab_mean), "lab_std": list(self.lab_std)}


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything the preprocessing needs; read from the bundle manifest, never assumed."""

    channel_order: str  # channel order the model takes: "RGB" or "BGR"
    mean: tuple[float, float, float]  # applied to [0, 1] values after stain normalization
    std: tuple[float, float, float]
    stain_reference: StainReference | None

    @classmethod
    def from_manifest(cls, preprocess: dict[str, Any]) -> "PreprocessSpec":
        reference = preprocess.get("stain_reference")
        stain = None
        if reference is not None:
            if reference.get("method") != "reinhard":
                raise ValueError(f"unknown stain normalization method {reference.get('method')!r}; expected 'reinhard'")
            stain = StainReference(tuple(reference["lab_mean"]), tuple(reference["lab_std"]))
        return cls(
            channel_order=preprocess["channel_order"],
            mean=tuple(preprocess["mean"]),
            std=tuple(preprocess["std"]),
            stain_reference=stain,
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "channel_order": self.channel_order,
            "mean": list(self.mean),
            "std": list(self.std),
            "stain_reference": None if self.stain_reference is None else self.stain_reference.to_manifest(),
        }


@dataclass(frozen=True)
class Letterbox:
    """Where the frame sits inside the model input: model = frame * scale, offset by the padding."""

    scale: float
    pad_x: int
    pad_y: int
    content_width: int
    content_height: int
    frame_width: int
    frame_height: int

    def label_map_to_frame(self, model_label_map: np.ndarray) -> np.ndarray:
        """Crop the padding away and resize a model-resolution label map back to the frame (nearest)."""
        content = model_label_map[self.pad_y : self.pad_y + self.content_height, self.pad_x : self.pad_x + self.content_width]
        return resize_labels(content, self.frame_width, self.frame_height)

    def box_to_frame(self, box: Box) -> Box:
        """Map an (x0, y0, x1, y1) box from model input pixels to frame pixels, clipped to the frame."""
        x0, y0, x1, y1 = box
        fx0 = int(np.floor((x0 - self.pad_x) / self.scale))
        fy0 = int(np.floor((y0 - self.pad_y) / self.scale))
        fx1 = int(np.ceil((x1 - self.pad_x) / self.scale))
        fy1 = int(np.ceil((y1 - self.pad_y) / self.scale))
        return (
            max(0, fx0),
            max(0, fy0),
            min(self.frame_width, fx1),
            min(self.frame_height, fy1),
        )

    def box_to_model(self, box: Box, model_width: int, model_height: int) -> Box:
        """Map an (x0, y0, x1, y1) box from frame pixels to model input pixels (box_to_frame's inverse), clipped
        to the model input and at least one pixel wide and high."""
        x0, y0, x1, y1 = box
        mx0 = min(max(int(np.floor(x0 * self.scale)) + self.pad_x, 0), model_width - 1)
        my0 = min(max(int(np.floor(y0 * self.scale)) + self.pad_y, 0), model_height - 1)
        mx1 = max(min(int(np.ceil(x1 * self.scale)) + self.pad_x, model_width), mx0 + 1)
        my1 = max(min(int(np.ceil(y1 * self.scale)) + self.pad_y, model_height), my0 + 1)
        return mx0, my0, mx1, my1


def fit_letterbox(frame_height: int, frame_width: int, input_size: Sequence[int]) -> Letterbox:
    """The largest aspect-preserving placement of a frame inside input_size (H, W), centred."""
    input_height, input_width = int(input_size[0]), int(input_size[1])
    scale = min(input_width / frame_width, input_height / frame_height)
    content_width = max(1, min(input_width, round(frame_width * scale)))
    content_height = max(1, min(input_height, round(frame_height * scale)))
    return Letterbox(
        scale=scale,
        pad_x=(input_width - content_width) // 2,
        pad_y=(input_height - content_height) // 2,
        content_width=content_width,
        content_height=content_height,
        frame_width=frame_width,
        frame_height=frame_height,
    )


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area averaging when shrinking (no aliasing of thin nuclei), bilinear when enlarging."""
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


# A whole frame from a camera of several megapixels is many times the segmenter's input. OpenCV's INTER_AREA is fastest
# halving (2x2 means, vectorized): 0.9 ms for a 2592x1944 frame, where one step to the segmenter's input takes 15 ms
# (OpenCV's general path) and 4x4 whole blocks 3.8 on a 2-core x86 CPU (scripts/megapixel_bench.py --camera-frames,
# its shrink-path table). shrink_frame halves the frame while more than STAGED_SHRINK_REST
# would remain (and its sides are even), then area-resizes the rest: at camera sizes within 2 grey levels of the
# one-step resize, 1 at the 99th percentile, under 0.3 on average (each halving rounds to whole levels); within 6 at
# random sizes (tests/runtime/test_preprocess.py); the results move about as much as with sensor noise of one grey
# level (docs/performance.md, "Camera-sized frames"). Only frames shrunk by more than STAGED_SHRINK_REST on both sides
# take it: every source's frames shrink by 3 at most, so no training image, validation figure or source's golden frame
# moves.
STAGED_SHRINK_REST = 4.0


def halvings(frame: np.ndarray, width: int, height: int) -> list[np.ndarray]:
    """The frame halved (2x2 means) again and again while more than STAGED_SHRINK_REST would remain to shrink it to
    width x height on both sides and both its sides are even (an odd side has no fast halving): [half, quarter, ...];
    empty for a frame shrunk by STAGED_SHRINK_REST or less."""
    halved: list[np.ndarray] = []
    while (
        min(frame.shape[1] / width, frame.shape[0] / height) > STAGED_SHRINK_REST
        and frame.shape[1] % 2 == 0
        and frame.shape[0] % 2 == 0
    ):
        frame = cv2.resize(frame, (frame.shape[1] // 2, frame.shape[0] // 2), interpolation=cv2.INTER_AREA)
        halved.append(frame)
    return halved


def region_source(frame: np.ndarray, halved: Sequence[np.ndarray], box: Box, width: int, height: int) -> tuple[np.ndarray, Box]:
    """Where to cut the frame's region `box` from to shrink it to width x height, and the box in that image's pixels:
    the frame itself, or, for a region shrunk by more than STAGED_SHRINK_REST, the frame's halving (halvings) that
    leaves 2-4 to shrink, as far as they go. A large cell of a camera-sized frame is then not area-averaged from full
    resolution by OpenCV's general path."""
    x0, y0, x1, y1 = box
    ratio = min((x1 - x0) / width, (y1 - y0) / height)
    level = 0
    while level < len(halved) and ratio / 2**level > STAGED_SHRINK_REST:
        level += 1
    if level == 0:
        return frame, box
    image, scale = halved[level - 1], 2**level
    # The corner rounded half up and the sides scaled, so a square stays square wherever it lies; a region inside the
    # frame stays inside the halving (its far side, rounded, could reach a pixel past it).
    side_x, side_y = max(1, round((x1 - x0) / scale)), max(1, round((y1 - y0) / scale))
    left, top = math.floor(x0 / scale + 0.5), math.floor(y0 / scale + 0.5)
    if x0 >= 0 and x1 <= frame.shape[1]:
        left = min(left, image.shape[1] - side_x)
    if y0 >= 0 and y1 <= frame.shape[0]:
        top = min(top, image.shape[0] - side_y)
    return image, (left, top, left + side_x, top + side_y)


def whole_block(side: int, target: int) -> int:
    """The smallest whole block size dividing `side` that leaves at most STAGED_SHRINK_REST to shrink to `target` and at
    least 2 (a block nearly an output pixel's size weighs whole blocks where a one-step resize weighs pixels); 1 if none.
    For shrinking one way only (domain.tear_score), where OpenCV has no fast halving."""
    ratio = side / target
    return next((block for block in range(max(2, math.ceil(ratio / STAGED_SHRINK_REST)), int(ratio / 2) + 1) if side % block == 0), 1)


def shrink_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """resize() of a whole frame, halved first where it shrinks by more than STAGED_SHRINK_REST on both sides
    (halvings)."""
    halved = halvings(frame, width, height)
    return resize(halved[-1] if halved else frame, width, height)


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a label or instance map, pixel centres aligned as in resize().

    cv2.INTER_NEAREST takes floor(x * ratio), which moves every outline up to one pixel right and down
    (at 1.6x, half a model pixel on the way in and half a frame pixel on the way back): masks then sit
    beside their cells. INTER_NEAREST_EXACT samples the source at the pixel centre.
    """
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


# A pixel whose brightest channel is under DARK_LEVEL is black: outside the microscope's field of view, not smear (the
# darkest stained nuclei of every source are brighter). Read on every DARK_STEP-th row and column. TXL-PBC's own frames
# hold up to 4.9 % such pixels (black bars along an edge; its training split; every other source at most 0.11 %:
# scripts/capture_levels.py); a circular field of view cut at 0.8 of the frame's half-diagonal leaves 9 %.
DARK_LEVEL = 24
DARK_STEP = 4
MAX_DARK_SHARE = 0.06
# A circular field's first black is in the frame's corners: MAX_BLACK_CORNERS or more of its four corner squares
# (CORNER_SHARE of its shorter side) almost all black (BLACK_CORNER_SHARE) show a field of view however little black
# the frame holds (no frame of any source, in any split, has more than two such corners).
CORNER_SHARE = 0.03
BLACK_CORNER_SHARE = 0.9
MAX_BLACK_CORNERS = 3
_RIM = np.ones((5, 5), np.uint8)  # the field's edge is anti-aliased: its two outermost pixels are filled too


def dark_share(frame: np.ndarray) -> float:
    """The share of the frame's pixels (every DARK_STEP-th row and column) whose brightest channel is under DARK_LEVEL."""
    # Every channel under DARK_LEVEL, on the sampled rows whole (OpenCV reads a row-strided view in place, faster than
    # numpy's copy of the sampled pixels), then every DARK_STEP-th column of them.
    dark = cv2.inRange(frame[::DARK_STEP], (0, 0, 0), (DARK_LEVEL - 1,) * 3)[:, ::DARK_STEP]
    return np.count_nonzero(dark) / dark.size


def black_corners(frame: np.ndarray) -> int:
    """How many of the frame's four corner squares (CORNER_SHARE of its shorter side) are almost all black."""
    height, width = frame.shape[:2]
    side = max(2, int(round(CORNER_SHARE * min(height, width))))
    squares = (frame[:side, :side], frame[:side, -side:], frame[-side:, :side], frame[-side:, -side:])
    return sum(float((square.max(axis=2) < DARK_LEVEL).mean()) > BLACK_CORNER_SHARE for square in squares)


def shows_field_of_view(frame: np.ndarray, dark: float | None = None) -> bool:
    """Whether the frame shows the microscope's round field of view with black around it: more than MAX_DARK_SHARE
    black, or MAX_BLACK_CORNERS black corners. No source frame of any split does (the sources' own black bars are
    left as the models learnt them). dark: the frame's dark_share where already read."""
    return (dark_share(frame) if dark is None else dark) > MAX_DARK_SHARE or black_corners(frame) >= MAX_BLACK_CORNERS


def fill_outside_field(frame: np.ndarray, dark: float | None = None) -> tuple[np.ndarray, float]:
    """A frame that shows its field of view (shows_field_of_view) with the black outside it (black pixels connected to
    the frame's edge) filled with the field's background colour (the median of its brightest quarter), and the share of
    the frame filled; any other frame as it is, and 0. Filled, the stain normalization and the models read the smear
    only, as if the field reached the frame's edges. dark: the frame's dark_share where already read."""
    if not shows_field_of_view(frame, dark):
        return frame, 0.0
    black = (frame.max(axis=2) < DARK_LEVEL).astype(np.uint8)
    _, labels = cv2.connectedComponents(black, connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = cv2.dilate(np.isin(labels, edge[edge > 0]).astype(np.uint8), _RIM) > 0
    if not outside.any() or outside.all():
        return frame, float(outside.mean())
    field = frame[~outside]
    brightness = field.sum(axis=1)
    filled = frame.copy()
    filled[outside] = np.median(field[brightness >= np.percentile(brightness, 75)], axis=0).astype(np.uint8)
    return filled, float(outside.mean())


# Uneven illumination (a misaligned condenser, an off-centre lamp, a phone adapter's light falling off towards one
# side) darkens part of a frame, and the cells there look darker and bluer to every model: without this step, 4 of 60
# normal TXL-PBC raabin validation fields and 5 of 45 judged benign Taleqani ones were flagged when their light fell
# to 0.5 at one side (python scripts/capture_study.py --data ../shared/data --fault illumination --without-evening;
# docs/training.md, "Uneven light, and other capture faults measured").
# The background's brightness is fitted as a smooth surface, a plane plus a centred bowl in log brightness, to the
# bright end (ILLUMINATION_PERCENTILE) of each of ILLUMINATION_GRID x ILLUMINATION_GRID tiles, read at about
# ILLUMINATION_SIDE px on the frame's shorter side; tiles far darker than the fit (a white cell filling a tile) are
# left out of it. A frame whose fitted background falls off by EVEN_FROM or more is divided by the surface. The
# sources' own frames fall off less (median 0.01-0.13 by source; the models learnt them as they are) and are almost
# all left as they are (12 of ~6,700; scripts/capture_levels.py).
ILLUMINATION_GRID = 8
ILLUMINATION_PERCENTILE = 90
ILLUMINATION_SIDE = 128
EVEN_FROM = 0.25
_OUTLIER_MADS = 3.0  # a tile this many median deviations darker than the fit is a cell, not background
_TILE_CENTRES = (np.arange(ILLUMINATION_GRID) + 0.5) / ILLUMINATION_GRID * 2.0 - 1.0
_TILE_Y, _TILE_X = (axis.ravel() for axis in np.meshgrid(_TILE_CENTRES, _TILE_CENTRES, indexing="ij"))
_ILLUMINATION_DESIGN = np.stack([np.ones_like(_TILE_X), _TILE_X, _TILE_Y, _TILE_X**2 + _TILE_Y**2], axis=1)  # the tiles' terms


def illumination_surface(frame: np.ndarray) -> np.ndarray:
    """(cx, cy, cr): the frame's background brightness as log brightness cx * x + cy * y + cr * (x^2 + y^2) plus a
    constant, over x, y in [-1, 1] across the frame; cr <= 0 (light falls off towards the rim, never towards the
    centre, where a large white cell would otherwise read as a dark centre). Zeros where too few tiles say."""
    height, width = frame.shape[:2]
    step = max(1, min(height, width) // ILLUMINATION_SIDE)
    grid = ILLUMINATION_GRID
    tile_height, tile_width = height // step // grid, width // step // grid
    if tile_height < 1 or tile_width < 1:
        return np.zeros(3)
    # Every step-th pixel (nearest: 0.04 ms on a 640x480 frame, area averaging 1.1): the fit needs the light, not detail.
    small = cv2.resize(frame, (grid * tile_width, grid * tile_height), interpolation=cv2.INTER_NEAREST)
    tiles = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).reshape(grid, tile_height, grid, tile_width).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    bright = int(ILLUMINATION_PERCENTILE / 100.0 * (tiles.shape[1] - 1))
    brightness = np.log(np.partition(tiles, bright, axis=1)[:, bright].astype(np.float64) + 1.0)
    design = _ILLUMINATION_DESIGN
    keep = np.ones(len(brightness), bool)
    coefficients = np.zeros(4)
    for _ in range(3):
        if keep.sum() < design.shape[1] + 2:
            return np.zeros(3)
        coefficients = np.linalg.lstsq(design[keep], brightness[keep], rcond=None)[0]
        if coefficients[3] > 0.0:  # no bowl that rises towards the rim: a plane only
            coefficients = np.append(np.linalg.lstsq(design[keep, :3], brightness[keep], rcond=None)[0], 0.0)
        residuals = brightness - design @ coefficients
        keep = residuals > -_OUTLIER_MADS * (np.median(np.abs(residuals[keep])) + 1e-3)
    return coefficients[1:]


def _log_surface(surface: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx, cy, cr = (np.float32(value) for value in surface)
    return cx * x + cy * y + cr * (x * x + y * y)


def illumination_falloff(surface: np.ndarray) -> float:
    """How far the fitted background falls below its brightest across the frame: 0 even, 0.3 the darkest part at
    70 % of the brightest."""
    axis = np.linspace(-1.0, 1.0, 17, dtype=np.float32)
    values = _log_surface(surface, axis[None, :], axis[:, None])
    return float(1.0 - np.exp(-(values.max() - values.min())))


def even_illumination(frame: np.ndarray) -> tuple[np.ndarray, float]:
    """The frame with its background's falloff divided out where it falls off by EVEN_FROM or more (the frame itself
    otherwise), and its falloff as captured (illumination_falloff). Training reads every image through this too."""
    surface = illumination_surface(frame)
    falloff = illumination_falloff(surface)
    if falloff < EVEN_FROM:
        return frame, falloff
    height, width = frame.shape[:2]
    x = (np.arange(width, dtype=np.float32) + 0.5) / width * 2.0 - 1.0
    y = (np.arange(height, dtype=np.float32) + 0.5) / height * 2.0 - 1.0
    cx, cy, cr = (np.float32(value) for value in surface)
    along_x, along_y = cx * x + cr * x * x, cy * y + cr * y * y  # the surface is their sum: its gain is their product
    # >= 1: the darker parts brought up to the brightest; an outer product and OpenCV's saturating multiply, ~10 ms on
    # a 3-MP frame where numpy's broadcasting took ~40 (2-core x86)
    gain = np.outer(np.exp(along_y.max() - along_y), np.exp(along_x.max() - along_x)).astype(np.float32)
    return cv2.multiply(frame, cv2.merge([gain, gain, gain]), dtype=cv2.CV_8U), falloff


class CorrectedFrame(NamedTuple):
    """A frame as every model reads it (corrected_frame), with what correcting it measured."""

    frame: np.ndarray
    outside_field: float  # the share of the frame outside its field of view, filled
    falloff: float  # its light's falloff as captured
    dark_share: float  # dark_share of `frame`: the captured frame's where nothing was filled or evened (read once)


def corrected_frame(frame: np.ndarray) -> CorrectedFrame:
    """The frame as every model reads it, at run time and in training alike: the black outside its field of view filled
    (fill_outside_field), then its light evened (even_illumination); with the share filled, the falloff as captured
    and its dark share."""
    dark = dark_share(frame)
    filled, outside = fill_outside_field(frame, dark)
    evened, falloff = even_illumination(filled)
    return CorrectedFrame(evened, outside, falloff, dark if evened is frame else dark_share(evened))


def to_rgb_float(image: np.ndarray, channel_order: str = "BGR") -> np.ndarray:
    """uint8 image in the given order -> float32 RGB in [0, 1]."""
    # The channels swapped by OpenCV on the uint8 pixels, then one contiguous cast: the same values as numpy's cast of
    # the channel-reversed view, in about a seventh of its time (0.15 -> 0.02 ms for a 192x192 frame, 0.33 -> 0.05 for
    # 20 crops of 64x64; 2-core x86, scripts/runtime_parts_speed.py).
    image = np.ascontiguousarray(image)
    rgb = (cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if channel_order == "BGR" else image).astype(np.float32)  # always a copy
    rgb *= np.float32(1.0 / 255.0)  # in place: a batch of crops is megabytes, each new array page-faults anew
    return rgb


def lab_statistics(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel L*a*b* mean and std of a float RGB image; std floored so flat images do not explode."""
    return _lab_mean_std(cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab))


def _lab_mean_std(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # OpenCV sums in float64 in one pass: numpy's per-column float32 reductions took ~2 ms of a 192x192 frame's 4 ms
    # preprocessing (docs/performance.md, "Frame statistics in one pass").
    mean, std = cv2.meanStdDev(np.ascontiguousarray(lab).reshape(-1, 1, 3))
    return mean.ravel().astype(np.float32), np.maximum(std.ravel(), 1.0).astype(np.float32)


def _scalar(values: Sequence[float] | np.ndarray) -> tuple[float, float, float, float]:
    """Three per-channel values as an OpenCV scalar, each rounded to float32 first as numpy's float32 arithmetic would."""
    return (*(float(v) for v in np.asarray(values, np.float32)), 0.0)


def reinhard_with_statistics(
    rgb: np.ndarray,
    reference: StainReference,
    image_statistics: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Reinhard et al. (2001) colour transfer: match the image's L*a*b* mean/std to the reference; returns the
    normalized image and the statistics it was normalized with (image_statistics, or the image's own).

    image_statistics lets a crop be normalized with its whole frame's statistics. The image goes into L*a*b*
    once: its own statistics are read from the same conversion the transfer runs on.
    """
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    mean, std = image_statistics if image_statistics is not None else _lab_mean_std(lab)
    # In place, the same float32 steps as (lab - mean) * gain + reference. OpenCV's per-channel scalars run ~10x
    # faster than numpy's broadcasting over a last axis of 3 (docs/performance.md, "Frame statistics in one pass").
    gain = np.asarray(reference.lab_std, np.float32) / np.asarray(std, np.float32)
    cv2.subtract(lab, _scalar(mean), dst=lab)
    cv2.multiply(lab, _scalar(gain), dst=lab)
    cv2.add(lab, _scalar(reference.lab_mean), dst=lab)
    normalized = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB, dst=lab)
    return np.clip(normalized, 0.0, 1.0, out=normalized), (mean, std)


def reinhard_normalize(
    rgb: np.ndarray,
    reference: StainReference,
    image_statistics: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The image colour-transferred to the reference (reinhard_with_statistics), without the statistics."""
    return reinhard_with_statistics(rgb, reference, image_statistics)[0]


def to_chw_normalized(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Float RGB [0, 1] HxWx3 (or a batch, NxHxWx3) -> 3xHxW (Nx3xHxW) float32, mean/std applied, in
    the model's channel order."""
    image = rgb if spec.channel_order == "RGB" else rgb[..., ::-1]
    # Channels first before the arithmetic, which then runs in place on one contiguous copy: the same
    # float32 steps element by element, a quarter of the time on a batch of crops.
    chw = np.array(np.moveaxis(image, -1, -3), dtype=np.float32, order="C")  # always a copy: the caller's array stays
    chw -= np.asarray(spec.mean, np.float32)[:, None, None]
    chw /= np.asarray(spec.std, np.float32)[:, None, None]
    return chw


@dataclass(frozen=True)
class PreparedFrame:
    """The segmenter input plus what later steps need to stay consistent with it."""

    tensor: np.ndarray  # 1x3xHxW float32
    letterbox: Letterbox
    lab_statistics: tuple[np.ndarray, np.ndarray] | None  # the frame's stain statistics (None: no stain step)
    # The frame halved on the way to the segmenter's input (halvings; none for a frame shrunk by STAGED_SHRINK_REST or
    # less, and from the CUDA preprocessor): a camera-sized frame's motion check and its large cells' crops shrink on
    # from them.
    halved: tuple[np.ndarray, ...] = ()


def prepare_frame(frame: np.ndarray, spec: PreprocessSpec, input_size: Sequence[int], channel_order: str = "BGR") -> PreparedFrame:
    """A validated uint8 frame -> the segmenter's 1x3xHxW input, letterboxed; padding is the mean colour."""
    placement = fit_letterbox(frame.shape[0], frame.shape[1], input_size)
    halved = halvings(frame, placement.content_width, placement.content_height)
    content = to_rgb_float(resize(halved[-1] if halved else frame, placement.content_width, placement.content_height), channel_order)
    statistics = None
    if spec.stain_reference is not None:
        # Statistics on the resized content: the same numbers as on the full frame to ~0.1 %, far cheaper.
        content, statistics = reinhard_with_statistics(content, spec.stain_reference)
    tensor = np.zeros((3, int(input_size[0]), int(input_size[1])), np.float32)
    tensor[:, placement.pad_y : placement.pad_y + placement.content_height, placement.pad_x : placement.pad_x + placement.content_width] = (
        to_chw_normalized(content, spec)
    )
    return PreparedFrame(tensor[None], placement, statistics, tuple(halved))


def square_crop_box(box: Box, margin: float) -> Box:
    """A square around a cell box, grown by `margin` of its side on each edge (may leave the frame)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    half = max(side / 2.0, 1.0)
    return (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half)))


def cut_padded(image: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """The box's pixels, zero outside the image, and a boolean map of which pixels were inside."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], image.dtype)
    inside = np.zeros((y1 - y0, x1 - x0), bool)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        inside[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = True
    return out, inside


def touches_edge(box: Box, frame_shape: tuple[int, int]) -> bool:
    """Whether the box reaches the frame's edge (a cell there may be cut by it)."""
    x0, y0, x1, y1 = box
    return x0 <= 0 or y0 <= 0 or x1 >= frame_shape[1] or y1 >= frame_shape[0]


def shows_half(box: Box, frame_shape: tuple[int, int]) -> bool:
    """Whether at least half of a round cell in the box lies inside the frame: at each frame edge the box touches, it
    reaches into the frame at least half its extent along that edge (a disc cut through its centre shows a box
    half as deep as it is long). Mirrored across the edge (mirrored_at_edges), such a cell looks whole; a thinner
    sliver would look like a smaller cell than it is."""
    x0, y0, x1, y1 = box
    height, width = frame_shape
    across, down = x1 - x0, y1 - y0
    touches_side, touches_end = x0 <= 0 or x1 >= width, y0 <= 0 or y1 >= height
    return (not touches_side or 2 * across >= down) and (not touches_end or 2 * down >= across)


def mirrored_at_edges(box: Box, frame_shape: tuple[int, int]) -> Box:
    """The box and its mirror image across each frame edge it touches: a cell cut by the edge, with the frame
    reflected there (prepare_crops(..., outside="reflect")), shown as a whole cell centred on the edge."""
    x0, y0, x1, y1 = box
    height, width = frame_shape
    return (-x1 if x0 <= 0 else x0, -y1 if y0 <= 0 else y0, 2 * width - x0 if x1 >= width else x1, 2 * height - y0 if y1 >= height else y1)


def cut_reflected(image: np.ndarray, box: Box) -> np.ndarray:
    """The box's pixels, the image's part inside it reflected beyond the image's edges (the edge pixel repeated,
    then inward: OpenCV's BORDER_REFLECT). The box must overlap the image."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    pad = ((sy0 - y0, y1 - sy1), (sx0 - x0, x1 - sx1)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image[sy0:sy1, sx0:sx1], pad, mode="symmetric")


def prepare_crops(
    frame: np.ndarray,
    boxes: Sequence[Box],
    spec: PreprocessSpec,
    input_size: Sequence[int],
    margin: float,
    frame_lab_statistics: tuple[np.ndarray, np.ndarray] | None,
    channel_order: str = "BGR",
    halved: Sequence[np.ndarray] = (),
    outside: str = "mean",
) -> np.ndarray:
    """Cell boxes in frame pixels -> Nx3xHxW classifier input: square crops with margin, stain
    normalized with the frame's statistics, mean colour outside the frame (outside="reflect": the frame
    reflected there, cut_reflected). halved: the frame's halvings (PreparedFrame.halved), which a
    camera-sized frame's large cells are cut from (region_source).

    Only the cut and the resize go crop by crop (a view of the frame where the square lies inside
    it); colour conversion, stain normalization and scaling run once over the whole batch. Without
    the frame's statistics each crop is normalized with its own, as one crop at a time.
    """
    if outside not in ("mean", "reflect"):
        raise ValueError(f"outside must be 'mean' or 'reflect', got {outside!r}")
    height, width = int(input_size[0]), int(input_size[1])
    if not boxes:
        return np.zeros((0, 3, height, width), np.float32)
    pixels = np.empty((len(boxes), height, width, 3), np.uint8)
    inside = np.ones((len(boxes), height, width), bool)
    for index, box in enumerate(boxes):
        image, square = region_source(frame, halved, square_crop_box(box, margin), width, height)
        x0, y0, x1, y1 = square
        if x0 >= 0 and y0 >= 0 and x1 <= image.shape[1] and y1 <= image.shape[0]:
            pixels[index] = resize(image[y0:y1, x0:x1], width, height)
        elif outside == "reflect":
            pixels[index] = resize(cut_reflected(image, square), width, height)
        else:
            crop, crop_inside = cut_padded(image, square)
            pixels[index] = resize(crop, width, height)
            inside[index] = resize(crop_inside.astype(np.uint8), width, height) > 0
    # One tall image of the stacked crops: OpenCV's colour conversions work pixel by pixel.
    crops = to_rgb_float(pixels.reshape(-1, width, 3), channel_order)
    if spec.stain_reference is not None:
        if frame_lab_statistics is None:
            crops = np.concatenate([reinhard_normalize(crop, spec.stain_reference) for crop in np.split(crops, len(boxes))])
        else:
            crops = reinhard_normalize(crops, spec.stain_reference, frame_lab_statistics)
    crops = crops.reshape(len(boxes), height, width, 3)
    if not inside.all():  # most frames' crops lie inside them
        crops[~inside] = np.asarray(spec.mean, np.float32)
    return to_chw_normalized(crops, spec)
