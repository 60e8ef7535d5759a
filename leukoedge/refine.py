"""Per-cell refinement: every cell the field segmenter found is segmented again from a crop at one scale.

The field segmenter sees each frame letterboxed into one input, so a white cell is ~15 px wide in a
BCCD field and ~190 px in a single-cell crop, and it learns from every source's masks at once (the
weak Taleqani masks run larger than the experts'). It is good at finding cells, less so at their
outlines. The refiner sees each found cell cut the way the classifier's crops are cut (prepare_crops:
a square around the box with a margin, resized to one size), so every cell comes at about one scale,
and it learns from the cells' masks alone (expert Zheng and ALL-IDB2 masks, Taleqani's weak ones).
Its mask replaces the field segmenter's for that cell; the cells found, and their order, do not change,
and the classifier still crops around the box the field segmenter found (CellInstance.found_box): that
is how its training crops were cut, and crops around the tighter refined boxes cost frame verdicts.

A bundle may refine only the cells the field segmenter is unsure of (manifest refiner.skip_below_uncertainty,
cell_uncertainty below), and only cells at least refiner.min_cell_side_px across in the frame: the others keep the
field segmenter's masks, as in a bundle without a refiner. A cell smaller than the refiner's input is enlarged to
it, with no detail the field segmenter did not see, and on Taleqani's small cells the refined outlines matched the
masks less well than the field segmenter's (docs/training.md, "Bundle 0.8.0"); these are the crowded, leukemic
fields, so skipping them is also where the refiner cost most.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .domain import box_sides
from .postprocess import CellInstance, labels_of_three
from .preprocess.cpu import Letterbox, resize, resize_labels, square_crop_box
from .result import BACKGROUND, NUCLEUS


# Rows of a crop's labels compared at a time: the three planes of a large cell's crop in a large frame are
# megabytes each; a band of them stays in the cache from one comparison to the next (a fifth less time).
LABEL_BAND_ROWS = 64
# The largest side a crop's labels are computed at; a larger crop (a large cell in a large frame: ~940 px at
# 2560x1920) gets them at this side, enlarged. 8x the refiner's 64-px grid: an outline step of at most 2 frame
# pixels there, against 3.5 -> 1.0 ms for one such cell on a 2-core x86 CPU (timed by hand) (docs/performance.md, "Cost per megapixel").
MAX_LABEL_SIDE = 512


def crop_labels_in_frame_pixels(crop_probabilities: np.ndarray, width: int, height: int) -> np.ndarray:
    """The refiner's 3xSxS class probabilities of a crop -> its label map at the crop's size in the frame.

    The probabilities are resized, then the argmax taken: the outline then falls between crop pixels
    where the refiner's soft edge does, not on the staircase of upsampled labels (Zheng validation
    nucleus Dice 0.957 -> 0.960 with the shipped refiner in FP32, README). Each class plane is resized
    on its own and the argmax of the three taken by two comparisons (postprocess.labels_of_three), band by
    band: the same labels, a quarter of the time of argmax over interleaved channels on a large cell in a large
    frame. Beyond MAX_LABEL_SIDE the labels are computed at that side and
    enlarged (nearest, pixel centres aligned).
    """
    if max(width, height) > MAX_LABEL_SIDE:
        scale = MAX_LABEL_SIDE / max(width, height)
        small = crop_labels_in_frame_pixels(crop_probabilities, max(1, round(width * scale)), max(1, round(height * scale)))
        return resize_labels(small, width, height)
    background, cytoplasm, nucleus = (resize(np.asarray(plane, np.float32), width, height) for plane in crop_probabilities)
    labels = np.empty((height, width), np.uint8)
    for start in range(0, height, LABEL_BAND_ROWS):
        band = slice(start, start + LABEL_BAND_ROWS)
        labels_of_three(background[band], cytoplasm[band], nucleus[band], labels[band])
    return labels


def cell_uncertainty(probabilities: np.ndarray, letterbox: Letterbox, instances: Sequence[CellInstance]) -> np.ndarray:
    """Each cell's uncertainty in the field segmenter's eyes: the mean of 1 - its top class probability over
    the cell's box at model resolution (3xHxW probabilities, the letterboxed input). Read over the box, not the
    mask: the outline, where the segmenter hesitates, is the box's rim, and a cell only a few model pixels
    wide is mostly rim, so small cells (which the segmenter cannot outline well) score high by themselves."""
    hesitation = 1.0 - probabilities.max(axis=0)
    height, width = hesitation.shape
    uncertainty = np.empty(len(instances), np.float32)
    for index, instance in enumerate(instances):
        mx0, my0, mx1, my1 = letterbox.box_to_model(instance.box, width, height)
        uncertainty[index] = hesitation[my0:my1, mx0:mx1].mean()
    return uncertainty


def cells_to_refine(
    probabilities: np.ndarray,
    letterbox: Letterbox,
    instances: Sequence[CellInstance],
    skip_below_uncertainty: float | None,
    min_cell_side_px: float | None = None,
) -> np.ndarray:
    """Indices of the cells the refiner segments again: those whose cell_uncertainty is at least
    skip_below_uncertainty and whose side (domain.box_sides) is at least min_cell_side_px; None: no such condition."""
    chosen = np.ones(len(instances), bool)
    if min_cell_side_px is not None:
        chosen &= box_sides([instance.box for instance in instances]) >= min_cell_side_px
    if skip_below_uncertainty is not None and chosen.any():
        chosen[chosen] = cell_uncertainty(probabilities, letterbox, [instances[index] for index in np.flatnonzero(chosen)]) >= skip_below_uncertainty
    return np.flatnonzero(chosen)


def crop_windows(instances: Sequence[CellInstance], crop_margin: float, frame_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Each instance's crop square (x0, y0, x1, y1, may leave the frame) and its part inside the frame, Nx4 each."""
    squares = np.array([square_crop_box(instance.box, crop_margin) for instance in instances], np.int64).reshape(-1, 4)
    height, width = frame_shape
    windows = np.maximum(squares, 0)
    windows[:, 2] = np.minimum(squares[:, 2], width)
    windows[:, 3] = np.minimum(squares[:, 3], height)
    return squares, windows


# What window_claims marks in a crop's window: nobody's pixel, the refined cell's, another cell's.
FREE, OWN, OTHER = 0, 1, 2


def window_claims(instances: Sequence[CellInstance], neighbours: np.ndarray, index: int, window: np.ndarray) -> np.ndarray:
    """Inside one window of the frame (uint8, window-sized): OWN where instance `index`'s mask is, OTHER where
    another instance's is, FREE elsewhere; the first instance wins an overlap. Painted only from the
    instances whose boxes reach into the window (neighbours, in order), each inside its own box."""
    wx0, wy0, wx1, wy1 = (int(side) for side in window)
    claims = np.zeros((wy1 - wy0, wx1 - wx0), np.uint8)
    for neighbour in neighbours:
        instance = instances[neighbour]
        x0, y0, x1, y1 = instance.box
        cx0, cy0, cx1, cy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
        target = claims[cy0 - wy0 : cy1 - wy0, cx0 - wx0 : cx1 - wx0]
        mask = instance.mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] & (target == FREE)
        np.copyto(target, np.uint8(OWN if neighbour == index else OTHER), where=mask)
    return claims


def best_overlap(components: np.ndarray, count: int, touching: np.ndarray) -> int:
    """The component (1..count - 1) holding most of the `touching` pixels (the field mask's pixels in the
    refined foreground), ties to the lowest, as the argmax of their counts; 0 where there are none. Where
    only one component holds them (a cell's crop nearly always), it is found without counting every
    pixel's component: the only one there is, or a min and a max that agree (OpenCV's masked minMaxLoc: a twentieth
    of numpy's min(where=...) on a large cell's window)."""
    if not touching.any():
        return 0
    if count == 2:
        return 1
    first, last, _, _ = cv2.minMaxLoc(components, mask=touching.view(np.uint8))
    if first == last:
        return int(first)
    return 1 + int(np.bincount(components[touching], minlength=count)[1:].argmax())


def refine_instance(
    index: int, instance: CellInstance, crop_probabilities: np.ndarray, square: np.ndarray, window: np.ndarray, claims: np.ndarray
) -> CellInstance:
    """One cell's refined instance from the refiner's class probabilities of its crop (3xSxS).

    square: the crop's square in the frame; window: its part inside the frame, claims who holds which
    pixel there (window_claims). Kept: the refined cell component that overlaps this cell's field mask
    most, less the pixels of the other cells found (a crop of a crowded field holds neighbours too).
    Where the refiner finds nothing there, the field segmenter's instance stays: a found cell is never
    dropped here. Every step runs over the window (the crop's size in the frame) at most once or twice
    per pixel, and the field mask's overlap only over the cell's box.
    """
    x0, y0, x1, y1 = (int(side) for side in square)
    wx0, wy0, wx1, wy1 = (int(side) for side in window)
    labels = crop_labels_in_frame_pixels(crop_probabilities, x1 - x0, y1 - y0)[wy0 - y0 : wy1 - y0, wx0 - x0 : wx1 - x0]
    foreground = (labels != BACKGROUND) & (claims != OTHER)
    count, components = cv2.connectedComponents(foreground.view(np.uint8), connectivity=8)
    if count < 2:
        return instance
    fx0, fy0, fx1, fy1 = instance.box  # inside the window: the crop's square is grown around it
    in_box = np.s_[max(fy0 - wy0, 0) : fy1 - wy0, max(fx0 - wx0, 0) : fx1 - wx0]
    best = best_overlap(components[in_box], count, (claims[in_box] == OWN) & foreground[in_box])
    if best == 0:
        return instance
    mask = components == best
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bx0, by0, bx1, by1 = int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1
    mask = mask[by0:by1, bx0:bx1]
    nucleus = mask & (labels[by0:by1, bx0:bx1] == NUCLEUS)
    return CellInstance((wx0 + bx0, wy0 + by0, wx0 + bx1, wy0 + by1), mask, nucleus, found_box=instance.box)


def refine_cells(
    instances: Sequence[CellInstance],
    crop_probabilities: np.ndarray,
    crop_margin: float,
    frame_shape: tuple[int, int],
    chosen: np.ndarray | None = None,
    kept: np.ndarray | None = None,
) -> tuple[list[CellInstance], np.ndarray]:
    """The kept cells (one per kept instance, same order; the chosen ones refined) and the frame label map painted
    from them.

    chosen: indices of the instances the refiner saw (cells_to_refine; None: all of them), in order; the
    others keep the field segmenter's masks. kept: indices of the instances returned (the gate's white cells;
    None: all of them), in order; chosen must be among them. crop_probabilities: len(chosen)x3xSxS, the refiner's
    class probabilities for the chosen instances' crops, cut with prepare_crops(frame, [instance.box ...], ...,
    crop_margin). A refined cell still gives up the pixels of every other instance found, refined, kept or not. All
    work is per cell box: nothing here grows with the frame but the label map it returns.
    """
    chosen = np.arange(len(instances)) if chosen is None else np.asarray(chosen, np.int64)
    if len(crop_probabilities) != len(chosen):
        raise ValueError(f"{len(crop_probabilities)} refined crops for {len(chosen)} cells to refine")
    if kept is not None and not np.isin(chosen, kept).all():
        raise ValueError("the refiner may only segment kept instances")
    squares, windows = crop_windows([instances[index] for index in chosen], crop_margin, frame_shape)
    boxes = np.array([instance.box for instance in instances], np.int64).reshape(-1, 4)
    # reaches[i, j]: instance j's box overlaps the window of the i-th chosen instance, so its pixels can be in that crop
    reaches = (boxes[None, :, 0] < windows[:, None, 2]) & (boxes[None, :, 2] > windows[:, None, 0])
    reaches &= (boxes[None, :, 1] < windows[:, None, 3]) & (boxes[None, :, 3] > windows[:, None, 1])
    refined = list(instances)
    for row, (index, probabilities) in enumerate(zip(chosen.tolist(), crop_probabilities)):
        claims = window_claims(instances, np.flatnonzero(reaches[row]), index, windows[row])
        refined[index] = refine_instance(index, instances[index], probabilities, squares[row], windows[row], claims)
    cells = refined if kept is None else [refined[index] for index in np.asarray(kept, np.int64).tolist()]
    return cells, paint_label_map(cells, frame_shape)


def paint_label_map(cells: Sequence[CellInstance], frame_shape: tuple[int, int]) -> np.ndarray:
    """The frame label map of the cells, the first cell winning a pixel two masks claim. A cell whose box
    meets no earlier cell's is written whole, without reading what is there (most cells)."""
    label_map = np.zeros(frame_shape, np.uint8)
    boxes = np.array([cell.box for cell in cells], np.int64).reshape(-1, 4)
    meets = (boxes[:, None, 0] < boxes[None, :, 2]) & (boxes[:, None, 2] > boxes[None, :, 0])
    meets &= (boxes[:, None, 1] < boxes[None, :, 3]) & (boxes[:, None, 3] > boxes[None, :, 1])
    meets_earlier = np.tril(meets, k=-1).any(axis=1)
    for cell, crowded in zip(cells, meets_earlier.tolist()):
        x0, y0, x1, y1 = cell.box
        window = label_map[y0:y1, x0:x1]
        labels = cell.mask.view(np.uint8) + (cell.nucleus_mask & cell.mask).view(np.uint8)  # 1 CYTOPLASM, 2 NUCLEUS (result.py)
        if crowded:
            np.copyto(window, labels, where=cell.mask & (window == BACKGROUND))
        else:
            window[...] = labels
    return label_map
