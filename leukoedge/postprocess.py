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
    """Instance map (int32, 0 = none) of a binary WBC mask, touching cells split at their distance cores.

    Seeds are the cores of the distance transform: a single round cell has one core, two touching
    cells have two, joined only by a thin neck that the distance threshold cuts.
    """
    return _split_touching(cell_mask, min_area_px).instances


def _split_touching(cell_mask: np.ndarray, min_area_px: int) -> _InstanceMap:
    """split_touching, with the instances' pixels, ids and boxes (find_cells needs them too).

    Every pixel goes to the nearest seed (a distance core) of its own component. The cores are cut at one share of
    the component's peak distance, so each core's edge lies that far inside its cell's outline: for two touching
    round cells, large and small alike, the pixels nearer one core than the other are that cell's, and the cut runs
    through their contact. (A watershed flooding the distance map instead, as OpenCV's does by the differences between
    neighbours, ran along the flat ridge between two cells and wrapped one seed's piece round the other's: two
    touching white cells came out as one.)"""
    mask = cell_mask.astype(np.uint8)
    component_count, components = cv2.connectedComponents(mask, connectivity=8)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    # Per-pixel work runs on the mask's pixels (flat indices, row-major), not on the whole map: a Taleqani field's
    # mask is a tenth to a seventh of its 192x256 map.
    pixels = np.flatnonzero(mask != 0)
    markers, seed_count = _core_seeds(mask, components, component_count, distance, pixels, min_area_px)
    if not seed_count:
        return _InstanceMap.none(mask.shape)
    flat_markers = markers.ravel()
    seed_pixels = np.flatnonzero((markers > 0) & (markers <= seed_count))
    component_of_seed = np.zeros(seed_count + 1, np.int64)
    component_of_seed[flat_markers[seed_pixels]] = components.ravel()[seed_pixels]
    # Seeds are numbered component by component; a component of one seed is that seed's whole (the lowest seed wins).
    component_seed = np.zeros(component_count, np.int32)
    component_seed[component_of_seed[:0:-1]] = np.arange(seed_count, 0, -1)
    pixel_components = components.ravel()[pixels]
    pixel_ids = component_seed[pixel_components]
    several = np.bincount(component_of_seed[1:], minlength=component_count) > 1
    if several.any():  # most frames have none: no distance transform for them
        seeds = np.ones(mask.shape, np.uint8)
        seeds.ravel()[seed_pixels] = 0
        _, nearest = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
        shared = several[pixel_components]
        source = seed_pixels[nearest.ravel()[pixels[shared]] - 1]  # DIST_LABEL_PIXEL numbers the seed pixels 1.. in row-major order
        # A pixel nearer another component's seed than its own keeps its component's first seed.
        own = components.ravel()[source] == pixel_components[shared]
        pixel_ids[np.flatnonzero(shared)[own]] = flat_markers[source[own]]
    on_instance = pixel_ids != 0
    instances = np.zeros(mask.shape, np.int32)
    instances.ravel()[pixels[on_instance]] = pixel_ids[on_instance]
    return _merge_nested(_InstanceMap.of(instances, pixels[on_instance], pixel_ids[on_instance]), components)


def _core_seeds(
    mask: np.ndarray, components: np.ndarray, component_count: int, distance: np.ndarray, pixels: np.ndarray, min_area_px: int
) -> tuple[np.ndarray, int]:
    """Seed markers (int32): each component's distance cores (at least 0.6 of its peak distance) as seeds
    1..seed_count, numbered component by component and, inside one, as cv2.connectedComponents numbers them in the
    component's box; seed_count + 1 on the background, 0 on the rest of the mask.

    All components at once, over the mask's pixels: less time than a loop over the components' boxes from
    connectedComponentsWithStats."""
    pixel_components = components.ravel()[pixels]
    pixel_distances = distance.ravel()[pixels]
    areas = np.bincount(pixel_components, minlength=component_count)
    peaks = np.zeros(component_count, np.float32)
    np.maximum.at(peaks, pixel_components, pixel_distances)
    # float32, as NumPy 2 computes 0.6 times one component's float32 maximum
    core_floor = np.where(areas >= min_area_px, 0.6 * peaks, np.inf).astype(np.float32)
    on_core = pixel_distances >= core_floor[pixel_components]
    cores = np.zeros(mask.shape, np.uint8)
    cores.ravel()[pixels[on_core]] = 1
    # One labelling of every core at once: components are never 8-connected to each other, so neither are their cores.
    core_count, core_labels = cv2.connectedComponents(cores, connectivity=8)
    seed_count = core_count - 1
    markers = np.full(mask.shape, seed_count + 1, np.int32)
    if not seed_count:
        return markers, 0
    pixel_cores = core_labels.ravel()[pixels[on_core]]
    core_component = np.zeros(core_count, np.int64)
    core_component[pixel_cores] = pixel_components[on_core]
    cores_per_component = np.bincount(core_component[1:], minlength=component_count)
    first_seed = np.cumsum(cores_per_component) - cores_per_component + 1
    pixel_seeds = np.zeros(pixels.size, np.int32)
    pixel_seeds[on_core] = first_seed[pixel_components[on_core]]  # right for a component of one core
    markers.ravel()[pixels] = pixel_seeds
    # A component of several cores numbers them as connectedComponents does in its own box: it numbers by two-row
    # blocks, so a box that starts a row lower can swap two cores (tests/runtime/test_postprocess.py). Few components
    # have several cores, and their numbers stay those of a component-by-component labelling.
    several = cores_per_component > 1
    in_several = several[pixel_components]
    boxes = _boxes_of_pixels(pixels[in_several], pixel_components[in_several], mask.shape[1], component_count - 1)
    for component in np.flatnonzero(several):
        x0, y0, x1, y1 = boxes[component]
        window = np.s_[y0:y1, x0:x1]
        component_cores = (cores[window] != 0) & (components[window] == component)
        _, window_labels = cv2.connectedComponents(component_cores.astype(np.uint8), connectivity=8)
        markers[window][component_cores] = window_labels[component_cores] + (first_seed[component] - 1)
    return markers, seed_count


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
    return _piece_components_of(*_instance_pixels(instances), components, count)


def _piece_components_of(pixels: np.ndarray, ids: np.ndarray, components: np.ndarray, count: int) -> np.ndarray:
    """piece_components of the pixels and ids _instance_pixels gives."""
    component_of = np.zeros(count + 1, np.int64)
    component_of[ids] = components.ravel()[pixels]
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
    width = np.maximum(np.minimum.outer(boxes[:, 2], boxes[:, 2]) - np.maximum.outer(boxes[:, 0], boxes[:, 0]), 0)
    height = np.maximum(np.minimum.outer(boxes[:, 3], boxes[:, 3]) - np.maximum.outer(boxes[:, 1], boxes[:, 1]), 0)
    return width * height >= NESTED_BOX_SHARE * np.maximum(areas[:, None], 1)


def merge_nested(instances: np.ndarray, components: np.ndarray) -> np.ndarray:
    """The instance map with every piece nested in a larger piece of the same connected component (`components`, the
    mask's component map) merged into it: its box NESTED_BOX_SHARE inside that piece's box, NESTED_BORDER_SHARE of the
    pixels around it that piece's, and its area at least NESTED_AREA_SHARE of that piece's."""
    return _merge_nested(_InstanceMap.of(instances), components).instances


def _merge_nested(pieces: _InstanceMap, components: np.ndarray) -> _InstanceMap:
    """merge_nested of an _InstanceMap."""
    instances, count = pieces.instances, pieces.count
    if count < 2:
        return pieces
    boxes = pieces.boxes[1:]
    present = boxes[:, 2] > boxes[:, 0]
    areas = np.where(present, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0)
    # inside[i, j]: piece i's box lies inside piece j's, and j is the larger (ties: the lower id keeps the cell)
    inside = boxes_inside(boxes) & present[:, None] & present[None, :]
    larger = (areas[None, :] > areas[:, None]) | ((areas[None, :] == areas[:, None]) & (np.arange(count)[None, :] < np.arange(count)[:, None]))
    inside &= larger
    if not inside.any():  # most frames: no box inside another, and nothing more to compute on every frame
        return pieces
    component_of = _piece_components_of(pieces.pixels, pieces.ids, components, count)
    piece_pixels = np.bincount(pieces.ids, minlength=count + 1)[1:]
    inside &= (component_of[1:, None] == component_of[None, 1:]) & (piece_pixels[:, None] >= NESTED_AREA_SHARE * piece_pixels[None, :])
    target = np.arange(count + 1, dtype=instances.dtype)
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
    merged = np.zeros(instances.shape, instances.dtype)
    merged_ids = target[pieces.ids]
    merged.ravel()[pieces.pixels] = merged_ids
    # A merged cell's box is the union of its pieces' boxes (no second pass over the pixels).
    merged_boxes = np.zeros_like(pieces.boxes)
    merged_boxes[:, :2] = np.iinfo(np.int32).max
    np.minimum.at(merged_boxes[:, :2], target, pieces.boxes[:, :2])
    np.maximum.at(merged_boxes[:, 2:], target, pieces.boxes[:, 2:])
    return _InstanceMap(merged, pieces.pixels, merged_ids, merged_boxes[: int(merged_ids.max()) + 1])


# A piece split off a larger component is a white cell only if enough of it is nucleus: the piece a
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


def _instance_pixels(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat indices (row-major) of an instance map's pixels off the background, and their instance ids.
    np.flatnonzero of the bool map: faster than on the int32 map, and
    with divmod a third faster than np.nonzero's two index arrays."""
    pixels = np.flatnonzero(instances != 0)
    return pixels, instances.ravel()[pixels]


@dataclass(frozen=True)
class _InstanceMap:
    """An instance map with its pixels off the background (_instance_pixels) and their boxes (_model_boxes, a row
    for every id up to the largest), computed once for merge_nested and find_cells."""

    instances: np.ndarray
    pixels: np.ndarray
    ids: np.ndarray
    boxes: np.ndarray

    @classmethod
    def of(cls, instances: np.ndarray, pixels: np.ndarray | None = None, ids: np.ndarray | None = None) -> _InstanceMap:
        """The map's _InstanceMap; pixels and ids where the caller has them already (as _instance_pixels gives them)."""
        if pixels is None or ids is None:
            pixels, ids = _instance_pixels(instances)
        return cls(instances, pixels, ids, _boxes_of_pixels(pixels, ids, instances.shape[1], int(instances.max())))

    @classmethod
    def none(cls, shape: tuple[int, ...]) -> _InstanceMap:
        """No instance in a map of this shape."""
        return cls.of(np.zeros(shape, np.int32), np.zeros(0, np.intp), np.zeros(0, np.int32))

    @property
    def count(self) -> int:
        """The largest instance id (0 for none)."""
        return len(self.boxes) - 1


def _model_boxes(instances: np.ndarray, count: int) -> np.ndarray:
    """(count + 1) x 4 boxes (x0, y0, x1, y1, ends exclusive) of instances 1..count in one pass; row 0 unused."""
    return _boxes_of_pixels(*_instance_pixels(instances), instances.shape[1], count)


def _boxes_of_pixels(pixels: np.ndarray, ids: np.ndarray, width: int, count: int) -> np.ndarray:
    """_model_boxes of the pixels (flat indices in a map `width` wide) and instance ids _instance_pixels gives."""
    ys, xs = np.divmod(pixels, width)
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
        found = _split_touching(cell_mask, min_cell_area_px)
    else:
        found = _InstanceMap.of(cv2.connectedComponents(cell_mask.astype(np.uint8), connectivity=8)[1])
    instances, count = found.instances, found.count
    # Counted over the instances' pixels only (a tenth to a seventh of a Taleqani field's map); index 0 stays 0, unused.
    areas = np.bincount(found.ids, minlength=count + 1)
    nucleus_areas = np.bincount(found.ids[model_label_map.ravel()[found.pixels] == NUCLEUS], minlength=count + 1)
    with_nucleus = pieces_with_nucleus(instances, model_label_map, areas, nucleus_areas) if split else np.ones(count + 1, bool)
    candidates = [
        instance
        for instance in range(1, count + 1)
        if areas[instance] >= min_cell_area_px and nucleus_areas[instance] >= min_nucleus_area_px and with_nucleus[instance]
    ]
    model_boxes = found.boxes.tolist()
    frame_rows, frame_columns = frame_sampling(letterbox)
    frame_label_map = np.zeros((letterbox.frame_height, letterbox.frame_width), np.uint8)
    cells = []
    for instance in candidates:
        box = letterbox.box_to_frame(tuple(model_boxes[instance]))
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
