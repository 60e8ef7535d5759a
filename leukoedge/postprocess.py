"""Segmenter output -> cell instances.

Works at the model's input resolution (small, so fast), then maps boxes and masks to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .preprocess.cpu import Box, Letterbox, resize_labels
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
    """3xHxW class probabilities -> HxW uint8 label map (argmax; labels_of_three)."""
    background, cytoplasm, nucleus = probabilities
    return labels_of_three(background, cytoplasm, nucleus, np.empty(background.shape, np.uint8))


def labels_of_three(background: np.ndarray, cytoplasm: np.ndarray, nucleus: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The argmax of three class planes, written into `out` (uint8, their shape), by two comparisons: ties go to
    the lower class, as np.argmax. A tenth of the time of np.argmax over the class axis (0.1 against 0.8 ms on the
    segmenter's 3x192x256 output)."""
    np.greater(cytoplasm, background, out=out.view(bool))  # 1 = CYTOPLASM where it beats the background
    np.copyto(out, np.uint8(NUCLEUS), where=nucleus > np.maximum(background, cytoplasm))
    return out


def split_touching(cell_mask: np.ndarray, min_area_px: int) -> np.ndarray:
    """Instance map (int32, 0 = none) of a binary WBC mask, touching cells split by watershed.

    Seeds are the cores of the distance transform: a single round cell has one core, two touching
    cells have two, joined only by a thin neck that the distance threshold cuts.
    """
    mask = cell_mask.astype(np.uint8)
    _, components, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    seeds = np.zeros(mask.shape, np.int32)
    next_seed = 1
    # Each component's cores are found inside its own box: a crowded field's 70 components then cost
    # 70 box-sized steps, not 70 passes over the whole map.
    for component in np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area_px) + 1:
        x, y, width, height = stats[component, :4]
        window = np.s_[y : y + height, x : x + width]
        inside = components[window] == component
        cores = (distance[window] >= 0.6 * distance[window][inside].max()) & inside
        core_count, core_labels = cv2.connectedComponents(cores.astype(np.uint8), connectivity=8)
        seeds[window][cores] = core_labels[cores] + (next_seed - 1)  # numbered in raster order, as one by one
        next_seed += core_count - 1
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
    if not cell_ys.size:  # the split lines took every seed (a strip 2 px thin along the edge): no cell to refill
        return markers
    refill = (mask > 0) & (markers == 0)
    source = nearest[refill] - 1
    same_component = components[cell_ys[source], cell_xs[source]] == components[refill]
    markers[refill] = np.where(same_component, markers[cell_ys[source], cell_xs[source]], 0)
    return merge_nested(markers, components)


# A white cell the gate keeps whose box lies inside another kept cell's box, with a tenth of its area or less, is a
# fragment of that cell (an edge the segmenter cut off, a lobe beside a red cell it touches), not a cell: two white
# cells lie side by side, and a round cell's box cannot sit inside another's unless that one is several times wider.
# Fragments sit on blast-like nuclei (69 dropped beside Taleqani's validation cells, scripts/proposal_counts.py), and
# one flagged a normal TXL-PBC field as a second blast beside a large lymphocyte (docs/training.md, "Bundle 0.10.0").
FRAGMENT_AREA_SHARE = 0.1


def fragments(cells: list[CellInstance]) -> np.ndarray:
    """Whether each cell is a fragment of another: its box NESTED_BOX_SHARE inside that cell's box and its mask's
    area under FRAGMENT_AREA_SHARE of that cell's."""
    if len(cells) < 2:
        return np.zeros(len(cells), bool)
    inside = boxes_inside(np.array([cell.box for cell in cells], np.int64))
    np.fill_diagonal(inside, False)
    if not inside.any():  # most frames
        return np.zeros(len(cells), bool)
    areas = np.array([int(cell.mask.sum()) for cell in cells])
    return (inside & (areas[:, None] < FRAGMENT_AREA_SHARE * areas[None, :])).any(axis=1)


def piece_components(instances: np.ndarray, components: np.ndarray, count: int) -> np.ndarray:
    """For instances 0..count, the connected component (of `components`, the mask's component map) each lies in; 0 for
    background and for ids no pixel carries."""
    ys, xs = np.nonzero(instances)
    component_of = np.zeros(count + 1, np.int64)
    component_of[instances[ys, xs]] = components[ys, xs]
    return component_of


# A piece of a split component that lies inside another piece, its box within that piece's box and most of its
# border on that piece, is part of that cell: white cells in a smear lie side by side, they do not wrap around each
# other. An irregular cell (a large, lobed one of a device no model learnt from) can have two distance cores; without
# this its pieces counted as two cells, both called blasts, and flagged a normal field (docs/performance.md, "A
# lighter field segmenter"). The lobes of one cell are of a size; a piece far smaller than the piece around it is a
# cell of its own in a clump (or in a field a barely trained segmenter paints as one sea of "cell").
NESTED_BOX_SHARE = 0.9
NESTED_BORDER_SHARE = 0.5
NESTED_AREA_SHARE = 0.2


def boxes_inside(boxes: np.ndarray) -> np.ndarray:
    """inside[i, j]: NESTED_BOX_SHARE of box i's area lies inside box j (Nx4 x0, y0, x1, y1; every box inside itself)."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    width = np.clip(np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0]), 0, None)
    height = np.clip(np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1]), 0, None)
    return width * height >= NESTED_BOX_SHARE * np.maximum(areas[:, None], 1)


def merge_nested(instances: np.ndarray, components: np.ndarray) -> np.ndarray:
    """The instance map with every piece nested in a larger piece of the same connected component (`components`, the
    mask's component map) merged into it: its box NESTED_BOX_SHARE inside that piece's box, NESTED_BORDER_SHARE of the
    pixels around it that piece's, and its area at least NESTED_AREA_SHARE of that piece's."""
    count = int(instances.max())
    if count < 2:
        return instances
    boxes = _model_boxes(instances, count)[1:]
    present = boxes[:, 2] > boxes[:, 0]
    areas = np.where(present, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0)
    # inside[i, j]: piece i's box lies inside piece j's, and j is the larger (ties: the lower id keeps the cell)
    inside = boxes_inside(boxes) & present[:, None] & present[None, :]
    larger = (areas[None, :] > areas[:, None]) | ((areas[None, :] == areas[:, None]) & (np.arange(count)[None, :] < np.arange(count)[:, None]))
    inside &= larger
    if not inside.any():  # most frames: no box inside another, and nothing more to compute on every frame
        return instances
    component_of = piece_components(instances, components, count)
    pixels = np.bincount(instances.ravel(), minlength=count + 1)[1:]
    inside &= (component_of[1:, None] == component_of[None, 1:]) & (pixels[:, None] >= NESTED_AREA_SHARE * pixels[None, :])
    target = np.arange(count + 1)
    height_px, width_px = instances.shape
    for piece in np.argsort(-areas):  # largest first, so a chain of nested pieces ends in the outermost
        hosts = np.flatnonzero(inside[piece])
        if not hosts.size:
            continue
        x0, y0, x1, y1 = boxes[piece]
        window = instances[max(y0 - 1, 0) : min(y1 + 1, height_px), max(x0 - 1, 0) : min(x1 + 1, width_px)]
        own = (window == piece + 1).astype(np.uint8)
        around = window[(cv2.dilate(own, np.ones((3, 3), np.uint8)) > 0) & (own == 0)]
        host = hosts[np.argmax(areas[hosts])]
        if around.size and np.mean(around == host + 1) >= NESTED_BORDER_SHARE:
            target[piece + 1] = target[host + 1]
    return target[instances].astype(instances.dtype)


# A piece the watershed cut from a larger component is a white cell only if enough of it is nucleus: the piece a
# touching red cell (or a clump of them) leaves is cytoplasm-coloured with a sliver of the neighbour's nucleus. On
# the validation fields every white-cell piece of a split component held at least a third nucleus, the red-cell
# pieces as little as 0.01 (`python scripts/piece_nucleus_share.py`, docs/performance.md). The piece holding most of
# its component's nucleus is always kept, as a whole component is: a white cell the segmenter painted together with
# the red cells around it, or a neutrophil with a faint nucleus, can be mostly cytoplasm.
MIN_PIECE_NUCLEUS_SHARE = 0.2


def pieces_with_nucleus(instances: np.ndarray, model_label_map: np.ndarray, areas: np.ndarray, nucleus_areas: np.ndarray) -> np.ndarray:
    """Per instance (index 0 unused): False for a piece of a split component that holds less than
    MIN_PIECE_NUCLEUS_SHARE nucleus and less nucleus than another piece of it, True for every other instance."""
    keep = np.ones(len(areas), bool)
    low = np.flatnonzero(nucleus_areas[1:] < MIN_PIECE_NUCLEUS_SHARE * areas[1:]) + 1
    if not low.size:  # most frames: every piece is mostly nucleus, and nothing more to compute
        return keep
    _, components = cv2.connectedComponents((model_label_map > BACKGROUND).astype(np.uint8), connectivity=8)
    component_of = piece_components(instances, components, len(areas) - 1)
    most_nucleus = np.zeros(int(components.max()) + 1, np.int64)
    np.maximum.at(most_nucleus, component_of[1:], nucleus_areas[1:])
    keep[low] = nucleus_areas[low] >= most_nucleus[component_of[low]]
    return keep


def frame_sampling(letterbox: Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """For every frame row and column, the model-input row and column whose label it takes: exactly
    Letterbox.label_map_to_frame's nearest-neighbour mapping (OpenCV computes it, on one row and one
    column), so that any frame box can be mapped back alone, at the cost of its own pixels."""
    columns = np.arange(letterbox.content_width, dtype=np.int32)[None, :]
    rows = np.arange(letterbox.content_height, dtype=np.int32)[:, None]
    return (
        resize_labels(rows, 1, letterbox.frame_height)[:, 0] + letterbox.pad_y,
        resize_labels(columns, letterbox.frame_width, 1)[0] + letterbox.pad_x,
    )


def cell_labels_in_frame(model_label_map: np.ndarray, instances: np.ndarray, instance: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """One instance's labels (BACKGROUND outside it) at the frame pixels whose model rows and columns are
    given (frame_sampling over its box). Masked at model resolution, then sampled columns first (a few
    model rows wide) and rows second (whole rows copied): the same pixels as sampling the model maps at
    every frame pixel of the box, a fraction of the time on a large cell."""
    row0, row1, column0, column1 = int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1
    window = np.s_[row0:row1, column0:column1]
    cell_labels = np.where(instances[window] == instance, model_label_map[window], BACKGROUND).astype(np.uint8, copy=False)
    return cell_labels.take(columns - column0, axis=1).take(rows - row0, axis=0)


def _model_boxes(instances: np.ndarray, count: int) -> np.ndarray:
    """(count + 1) x 4 boxes (x0, y0, x1, y1, ends exclusive) of instances 1..count in one pass; row 0 unused."""
    flat = np.flatnonzero(instances)  # with divmod, a third faster than np.nonzero's two index arrays
    ids = instances.ravel()[flat]
    ys, xs = np.divmod(flat, instances.shape[1])
    boxes = np.zeros((count + 1, 4), np.int64)
    boxes[:, :2] = np.iinfo(np.int32).max
    np.minimum.at(boxes[:, 0], ids, xs)
    np.minimum.at(boxes[:, 1], ids, ys)
    np.maximum.at(boxes[:, 2], ids, xs + 1)
    np.maximum.at(boxes[:, 3], ids, ys + 1)
    return boxes


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
    while bluish rims of red cells look like cytoplasm alone. For the same reason a piece split off a larger
    component with under MIN_PIECE_NUCLEUS_SHARE nucleus, and less than another piece of it, is dropped
    (pieces_with_nucleus). The label map keeps the pixels of the
    cells returned and nothing else, so that it and the cells always agree.

    Masks are mapped to the frame box by box (frame_sampling): the cost grows with the cells' area in
    the frame, not with the frame's, whose label map is only painted where the cells are.
    """
    cell_mask = model_label_map > BACKGROUND
    if split:
        instances = split_touching(cell_mask, min_cell_area_px)
    else:
        _, instances = cv2.connectedComponents(cell_mask.astype(np.uint8), connectivity=8)
    count = int(instances.max())
    areas = np.bincount(instances.ravel(), minlength=count + 1)
    nucleus_areas = np.bincount(instances[model_label_map == NUCLEUS], minlength=count + 1)
    with_nucleus = pieces_with_nucleus(instances, model_label_map, areas, nucleus_areas) if split else np.ones(count + 1, bool)
    candidates = [
        instance
        for instance in range(1, count + 1)
        if areas[instance] >= min_cell_area_px and nucleus_areas[instance] >= min_nucleus_area_px and with_nucleus[instance]
    ]
    model_boxes = _model_boxes(instances, count)
    frame_rows, frame_columns = frame_sampling(letterbox)
    frame_label_map = np.zeros((letterbox.frame_height, letterbox.frame_width), np.uint8)
    cells = []
    for instance in candidates:
        box = letterbox.box_to_frame(tuple(int(side) for side in model_boxes[instance]))
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            continue
        labels = cell_labels_in_frame(model_label_map, instances, instance, frame_rows[y0:y1], frame_columns[x0:x1])
        mask = labels != BACKGROUND
        if not mask.any():
            continue
        cells.append(CellInstance(box, mask, labels == NUCLEUS))
        # The cells' masks are disjoint (one model pixel, one instance), so the order of painting does not matter.
        np.copyto(frame_label_map[y0:y1, x0:x1], labels, where=mask)
    cells.sort(key=lambda cell: (cell.box[1], cell.box[0]))
    return cells, frame_label_map


def central_box(boxes: list[Box], shape: tuple[int, ...]) -> Box | None:
    """The box whose centre is nearest the image centre: single-cell images are centred on their cell."""
    if not boxes:
        return None
    cy, cx = shape[0] / 2, shape[1] / 2
    return min(boxes, key=lambda b: ((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2)
