"""Segmenter output -> cell instances.

Works at the model's input resolution (small, so fast), then maps boxes and masks to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .preprocess.cpu import Box, Letterbox
from .result import BACKGROUND, NUCLEUS


@dataclass(frozen=True)
class CellInstance:
    """One cell found in the frame: its box and box-local masks, in frame pixels."""

    box: Box
    mask: np.ndarray  # bool, whole cell
    nucleus_mask: np.ndarray  # bool
    # Where the field segmenter found the cell; set by refinement (refine.py), which moves box and masks.
    # The classifier crops around this box: its training crops were cut from the field segmenter's boxes.
    found_box: Box | None = None

    @property
    def classifier_box(self) -> Box:
        return self.box if self.found_box is None else self.found_box


def label_map_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """3xHxW class probabilities -> HxW uint8 label map (argmax)."""
    return np.argmax(probabilities, axis=0).astype(np.uint8)


def split_touching(cell_mask: np.ndarray, min_area_px: int) -> np.ndarray:
    """Instance map (int32, 0 = none) of a binary WBC mask, touching cells split by watershed.

    Seeds are the cores of the distance transform: a single round cell has one core, two touching
    cells have two, joined only by a thin neck that the distance threshold cuts.
    """
    mask = cell_mask.astype(np.uint8)
    count, components = cv2.connectedComponents(mask, connectivity=8)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    seeds = np.zeros(mask.shape, np.int32)
    next_seed = 1
    for component in range(1, count):
        inside = components == component
        if inside.sum() < min_area_px:
            continue
        cores = (distance >= 0.6 * distance[inside].max()) & inside
        core_count, core_labels = cv2.connectedComponents(cores.astype(np.uint8), connectivity=8)
        for core in range(1, core_count):
            seeds[core_labels == core] = next_seed
            next_seed += 1
    if next_seed == 1:
        return seeds
    # watershed floods from the seeds over the inverted distance; -1 marks the split lines.
    relief = cv2.cvtColor(cv2.normalize(-distance, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    markers = seeds.copy()
    markers[mask == 0] = next_seed  # background as its own basin so cells do not flood it
    cv2.watershed(relief, markers)
    markers[(markers == next_seed) | (markers < 0) | (mask == 0)] = 0
    # The -1 lines and the background basin also take each cell's rim (and the frame's edge), not only
    # the cuts between cells: without this a cell loses a pixel all round, a small one half its area.
    # Every pixel of a component goes to the nearest cell of the same component.
    _, nearest = cv2.distanceTransformWithLabels((markers == 0).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    cell_ys, cell_xs = np.nonzero(markers)  # DIST_LABEL_PIXEL numbers these 1.. in the same row-major order
    refill = (mask > 0) & (markers == 0)
    source = nearest[refill] - 1
    same_component = components[cell_ys[source], cell_xs[source]] == components[refill]
    markers[refill] = np.where(same_component, markers[cell_ys[source], cell_xs[source]], 0)
    return markers


def find_cells(
    model_label_map: np.ndarray,
    letterbox: Letterbox,
    min_cell_area_px: int,
    split: bool,
    min_nucleus_area_px: int = 0,
) -> tuple[list[CellInstance], np.ndarray]:
    """Cells in a model-resolution label map, mapped to frame coordinates.

    Returns the cells (sorted top-to-bottom, left-to-right) and the frame-resolution label map.
    Components smaller than min_cell_area_px model pixels are dropped (platelets, debris, noise), and
    so are those with fewer than min_nucleus_area_px nucleus pixels: every white cell has a nucleus,
    while bluish rims of red cells look like cytoplasm alone. The label map keeps the pixels of the
    cells returned and nothing else, so that it and the cells always agree.
    """
    frame_label_map = letterbox.label_map_to_frame(model_label_map)
    cell_mask = model_label_map > BACKGROUND
    if split:
        instances = split_touching(cell_mask, min_cell_area_px)
    else:
        _, instances = cv2.connectedComponents(cell_mask.astype(np.uint8), connectivity=8)
    frame_instances = letterbox.label_map_to_frame(instances.astype(np.int32))
    cells, kept = [], []
    for instance in range(1, int(instances.max()) + 1):
        model_pixels = instances == instance
        if model_pixels.sum() < min_cell_area_px or (model_pixels & (model_label_map == NUCLEUS)).sum() < min_nucleus_area_px:
            continue
        ys, xs = np.nonzero(model_pixels)
        box = letterbox.box_to_frame((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            continue
        mask = frame_instances[y0:y1, x0:x1] == instance
        if not mask.any():
            continue
        nucleus_mask = mask & (frame_label_map[y0:y1, x0:x1] == NUCLEUS)
        cells.append(CellInstance(box, mask, nucleus_mask))
        kept.append(instance)
    cells.sort(key=lambda cell: (cell.box[1], cell.box[0]))
    is_kept = np.zeros(int(instances.max()) + 1, bool)  # a lookup table: half the time of np.isin on a 640x480 frame
    is_kept[kept] = True
    frame_label_map[~is_kept[frame_instances]] = BACKGROUND
    return cells, frame_label_map


def central_box(boxes: list[Box], shape: tuple[int, ...]) -> Box | None:
    """The box whose centre is nearest the image centre: single-cell images are centred on their cell."""
    if not boxes:
        return None
    cy, cx = shape[0] / 2, shape[1] / 2
    return min(boxes, key=lambda b: ((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2)
