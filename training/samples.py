"""Training samples built with the runtime's own geometry and preprocessing.

Segmentation: a frame is letterboxed into the model input exactly as Detector does (fit_letterbox),
then, for augmentation, rescaled, shifted, flipped and re-stained around that placement.
Classification and refinement: cells are cut with the runtime's prepare_crops, from boxes the
segmenter (or a mask) gives, so the classifier and the refiner train on the crops they will be shown.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from leukoedge.preprocess.cpu import (
    Box,
    PreprocessSpec,
    cut_padded,
    fit_letterbox,
    lab_statistics,
    prepare_crops,
    prepare_frame,
    reinhard_normalize,
    resize,
    resize_labels,
    square_crop_box,
    to_chw_normalized,
    to_rgb_float,
)

from .data import LABEL_BACKGROUND
from .stain import augment_chroma, augment_colour, augment_device, jitter_reference


DEVICE_VIEW_PROBABILITY = 0.5  # with device augmentation on, the share of samples seen as another microscope would show them
DEVICE_SCALES = (0.6, 1.6)  # pixel size differs by objective and camera
# A cell's crop as a camera with fewer pixels across the cell would give it (lower magnification, a coarser
# sensor, defocus): its side shrunk to this share of the model's input, then enlarged back. At frame scale
# (augment_device's blur) a large cell hardly changes once cut down to 64x64; here it does.
RESOLUTION_SHARES = (0.25, 0.75)


def letterbox_label_map(label_map: np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    """A frame-resolution label map placed the way prepare_frame places its frame (padding = background)."""
    placement = fit_letterbox(label_map.shape[0], label_map.shape[1], input_size)
    canvas = np.full((int(input_size[0]), int(input_size[1])), LABEL_BACKGROUND, np.uint8)
    content = resize_labels(label_map, placement.content_width, placement.content_height)
    canvas[placement.pad_y : placement.pad_y + placement.content_height, placement.pad_x : placement.pad_x + placement.content_width] = content
    return canvas


def segmentation_sample(
    image: np.ndarray,
    label_map: np.ndarray,
    spec: PreprocessSpec,
    input_size: Sequence[int],
    rng: np.random.Generator | None,
    device_strength: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(3xHxW float32 input, HxW uint8 labels). rng None: exactly the runtime's input, no augmentation.
    device_strength > 0: half the fields are seen as another microscope would show them (augment_device),
    and magnification varies over DEVICE_SCALES instead of 0.7-1.4x."""
    if rng is None:
        return prepare_frame(image, spec, input_size).tensor[0], letterbox_label_map(label_map, input_size)
    height, width = int(input_size[0]), int(input_size[1])
    placement = fit_letterbox(image.shape[0], image.shape[1], input_size)
    # Magnification differs by microscope: train around the runtime's scale.
    low, high = DEVICE_SCALES if device_strength > 0 else (0.7, 1.4)
    scale = placement.scale * float(np.exp(rng.uniform(np.log(low), np.log(high))))
    content_width = max(8, round(image.shape[1] * scale))
    content_height = max(8, round(image.shape[0] * scale))
    resized = resize(image, content_width, content_height)
    if device_strength > 0 and rng.random() < DEVICE_VIEW_PROBABILITY:
        resized = augment_device(resized, rng, device_strength)
    rgb = to_rgb_float(resized)
    labels = resize_labels(label_map, content_width, content_height)
    if spec.stain_reference is not None:
        rgb = reinhard_normalize(rgb, jitter_reference(spec.stain_reference, rng))  # with the image's own statistics
    rgb = augment_colour(rgb, rng)
    if rng.random() < 0.5:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.5:
        rgb, labels = rgb[::-1], labels[::-1]
    canvas = np.broadcast_to(np.asarray(spec.mean, np.float32), (height, width, 3)).copy()
    canvas_labels = np.full((height, width), LABEL_BACKGROUND, np.uint8)
    # Random placement: content larger than the canvas is cropped, smaller is shifted around.
    x = int(rng.integers(min(0, width - content_width), max(0, width - content_width) + 1))
    y = int(rng.integers(min(0, height - content_height), max(0, height - content_height) + 1))
    cx0, cy0 = max(0, x), max(0, y)
    cx1, cy1 = min(width, x + content_width), min(height, y + content_height)
    canvas[cy0:cy1, cx0:cx1] = rgb[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
    canvas_labels[cy0:cy1, cx0:cx1] = labels[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
    return to_chw_normalized(canvas, spec), canvas_labels


def random_crop(tensor: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A size x size window, biased towards windows that contain cell pixels (cells are sparse in fields)."""
    height, width = labels.shape
    if height <= size and width <= size:
        return tensor, labels
    foreground = np.argwhere((labels != LABEL_BACKGROUND) & (labels != 255))
    if len(foreground) and rng.random() < 0.7:
        cy, cx = foreground[rng.integers(len(foreground))]
        y = int(np.clip(cy - rng.integers(size), 0, height - size))
        x = int(np.clip(cx - rng.integers(size), 0, width - size))
    else:
        y, x = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
    return tensor[:, y : y + size, x : x + size], labels[y : y + size, x : x + size]


BOX_JITTER = (0.05, 0.1)  # (centre shift, log size change): standard deviations, as shares of the box's side


def jitter_box(box: Box, rng: np.random.Generator, jitter: tuple[float, float] = BOX_JITTER) -> Box:
    """The box as a found cell's box may come out: centre shifted ~jitter[0] of its side, size ~jitter[1] off."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    shift = rng.normal(0.0, jitter[0] * side, 2)
    grow = float(np.exp(rng.normal(0.0, jitter[1])))
    cx, cy = (x0 + x1) / 2 + shift[0], (y0 + y1) / 2 + shift[1]
    half_w, half_h = (x1 - x0) * grow / 2, (y1 - y0) * grow / 2
    return (int(cx - half_w), int(cy - half_h), int(np.ceil(cx + half_w)), int(np.ceil(cy + half_h)))


def jittered_stain(spec: PreprocessSpec, rng: np.random.Generator) -> PreprocessSpec:
    """The spec with its stain reference jittered (another lab's stain), or as it is without one."""
    if spec.stain_reference is None:
        return spec
    return PreprocessSpec(spec.channel_order, spec.mean, spec.std, jitter_reference(spec.stain_reference, rng))


def refiner_sample(
    image: np.ndarray,
    label_map: np.ndarray,
    box: Box,
    spec: PreprocessSpec,
    input_size: Sequence[int],
    margin: float,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(3xSxS crop, SxS labels) of one cell for the per-cell refiner (leukoedge/refine.py). rng None:
    exactly the runtime's crop of that box; otherwise jittered box and stain, rotations, flips.
    The labels are cut from the same square and resized to the input as the image is (pixel centres
    aligned); refine.py maps the refiner's probabilities back to the square the same way."""
    statistics = lab_statistics(to_rgb_float(image)) if spec.stain_reference is not None else None
    if rng is not None:
        box, spec = jitter_box(box, rng), jittered_stain(spec, rng)
    crop = prepare_crops(image, [box], spec, input_size, margin, statistics)[0]
    labels, _ = cut_padded(label_map, square_crop_box(box, margin))  # outside the image: background
    labels = resize_labels(labels, int(input_size[1]), int(input_size[0]))
    if rng is not None:
        turns = int(rng.integers(4))
        crop, labels = np.rot90(crop, turns, axes=(1, 2)), np.rot90(labels, turns)
        if rng.random() < 0.5:
            crop, labels = crop[:, :, ::-1], labels[:, ::-1]
        crop = crop * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.1)
    return np.ascontiguousarray(crop, dtype=np.float32), np.ascontiguousarray(labels)


# Frame statistics by image: a cell's crop is normalized with its whole frame's L*a*b* statistics, and a
# 575x575 field costs ~15 ms to measure; a training run samples each frame's cells thousands of times.
_FRAME_STATISTICS: dict[int, tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}
MAX_CACHED_FRAMES = 10000


def frame_statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lab_statistics of the whole frame, measured once per image object (the image is kept with them,
    so its id cannot be reused while the entry exists)."""
    cached = _FRAME_STATISTICS.get(id(image))
    if cached is None or cached[0] is not image:
        if len(_FRAME_STATISTICS) >= MAX_CACHED_FRAMES:  # a caller passing fresh arrays must not grow it forever
            _FRAME_STATISTICS.clear()
        cached = (image, lab_statistics(to_rgb_float(image)))
        _FRAME_STATISTICS[id(image)] = cached
    return cached[1]


def device_view(image: np.ndarray, box: Box, margin: float, rng: np.random.Generator, strength: float) -> tuple[np.ndarray, Box, tuple[np.ndarray, np.ndarray]]:
    """The frame around one cell as another microscope would show it (training/stain.augment_device, and a
    magnification in DEVICE_SCALES), the cell's box in it, and the frame statistics the runtime would
    normalize it with. Only a window around the cell's crop is augmented (a whole field per sample is too
    slow); the statistics come from the whole frame, downscaled, augmented with the same draws."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = square_crop_box(box, margin)
    pad = (x1 - x0) // 4  # the crop may be jittered later; the window holds it with room
    wx0, wy0, wx1, wy1 = max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)
    seed = int(rng.integers(2**31))
    window = augment_device(np.ascontiguousarray(image[wy0:wy1, wx0:wx1]), np.random.default_rng(seed), strength)
    small = resize(image, max(1, width // 4), max(1, height // 4))
    statistics = lab_statistics(to_rgb_float(augment_device(small, np.random.default_rng(seed), strength)))
    scale = float(np.exp(rng.uniform(np.log(DEVICE_SCALES[0]), np.log(DEVICE_SCALES[1]))))
    window = resize(window, max(1, round(window.shape[1] * scale)), max(1, round(window.shape[0] * scale)))
    bx0, by0, bx1, by1 = box
    moved = (round((bx0 - wx0) * scale), round((by0 - wy0) * scale), round((bx1 - wx0) * scale), round((by1 - wy0) * scale))
    return window, moved, statistics


def device_view_crop(image: np.ndarray, box: Box, spec: PreprocessSpec, input_size: Sequence[int], margin: float, rng: np.random.Generator, strength: float) -> np.ndarray:
    """3xHxW crop of one cell as another microscope would show it (device_view), cut as the runtime cuts
    it, without the other augmentations: a validation input for "does it still work on a new device"."""
    window, moved, statistics = device_view(image, box, margin, rng, strength)
    return prepare_crops(window, [moved], spec, input_size, margin, statistics if spec.stain_reference is not None else None)[0]


# What a camera adds to a frame before the runtime sees it (capture_degraded): sensor noise of a standard deviation
# drawn from CAPTURE_NOISE (grey levels, each channel; the noise check, domain.max_noise, refuses Taleqani's fields
# from about 4) and JPEG compression at a quality drawn from CAPTURE_JPEG_QUALITY (OpenCV's encoder, colour at half
# resolution as cameras'): the faults scripts/capture_study.py measures the verdict under.
CAPTURE_NOISE = (1.0, 6.0)
CAPTURE_JPEG_QUALITY = (30, 95)


def capture_degraded(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The uint8 frame with sensor noise, saved as a JPEG, or both (a third of the draws each)."""
    kind = int(rng.integers(3))
    if kind in (0, 2):
        noise = rng.normal(0.0, rng.uniform(*CAPTURE_NOISE), image.shape)
        image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if kind in (1, 2):
        quality = int(rng.integers(CAPTURE_JPEG_QUALITY[0], CAPTURE_JPEG_QUALITY[1] + 1))
        image = cv2.imdecode(cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)
    return image


def chroma_turned(crop: np.ndarray, spec: PreprocessSpec, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A model-ready 3xHxW crop with its colours turned (stain.augment_chroma): undone to RGB first, where grey is grey."""
    mean, std = np.asarray(spec.mean, np.float32)[:, None, None], np.asarray(spec.std, np.float32)[:, None, None]
    return ((augment_chroma(crop * std + mean, rng, strength) - mean) / std).astype(np.float32)


def resolution_lowered(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A model-ready 3xHxW crop seen at lower resolution: shrunk (area averaging) to a side drawn log-uniformly
    from RESOLUTION_SHARES of its own, then enlarged back (bilinear), as the runtime enlarges a small cell's crop."""
    height, width = crop.shape[1:]
    share = float(np.exp(rng.uniform(np.log(RESOLUTION_SHARES[0]), np.log(RESOLUTION_SHARES[1]))))
    image = np.ascontiguousarray(crop.transpose(1, 2, 0))
    small = resize(image, max(2, round(width * share)), max(2, round(height * share)))
    return np.ascontiguousarray(resize(small, width, height).transpose(2, 0, 1), dtype=np.float32)


def classification_sample(
    image: np.ndarray,
    box: Box,
    spec: PreprocessSpec,
    input_size: Sequence[int],
    margin: float,
    rng: np.random.Generator | None,
    device_strength: float = 0.0,
    chroma_strength: float = 0.0,
    resolution_share: float = 0.0,
    box_jitter: tuple[float, float] = BOX_JITTER,
) -> np.ndarray:
    """3xHxW crop of one cell. rng None: exactly the runtime's crop; otherwise jittered box, stain, flips,
    with device_strength > 0, half the crops from device_view (another microscope's view of the cell),
    with chroma_strength > 0, the crop's hue turned and saturation scaled (stain.augment_chroma), and
    that share of the crops seen at lower resolution (resolution_lowered); the box jittered by box_jitter (jitter_box)."""
    statistics = frame_statistics(image) if spec.stain_reference is not None else None
    if rng is None:
        return prepare_crops(image, [box], spec, input_size, margin, statistics)[0]
    if device_strength > 0 and rng.random() < DEVICE_VIEW_PROBABILITY:
        image, box, device_statistics = device_view(image, box, margin, rng, device_strength)
        statistics = device_statistics if spec.stain_reference is not None else None
    crop = prepare_crops(image, [jitter_box(box, rng, box_jitter)], jittered_stain(spec, rng), input_size, margin, statistics)[0]
    crop = np.rot90(crop, int(rng.integers(4)), axes=(1, 2))
    if rng.random() < 0.5:
        crop = crop[:, :, ::-1]
    if chroma_strength > 0:
        crop = chroma_turned(crop, spec, rng, chroma_strength)
    if resolution_share > 0 and rng.random() < resolution_share:
        crop = resolution_lowered(crop, rng)
    gain = rng.uniform(0.85, 1.15)
    return np.ascontiguousarray(crop * gain + rng.normal(0.0, 0.1), dtype=np.float32)
