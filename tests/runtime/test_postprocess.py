"""Segmenter output -> cell instances: splitting touching cells, area filter, frame coordinates."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from leukoedge.postprocess import MIN_PIECE_NUCLEUS_SHARE, _InstanceMap, _merge_nested, _model_boxes, _split_touching, cell_labels_in_frame, find_cells, frame_sampling, label_map_from_probabilities, merge_nested, split_touching
from leukoedge.preprocess.cpu import fit_letterbox
from leukoedge.result import BACKGROUND, CYTOPLASM, NUCLEUS

MODEL_SIZE = (192, 256)
MIN_AREA = 40


def _disc(mask: np.ndarray, centre: tuple[int, int], radius: int, value: int = 1) -> np.ndarray:
    cv2.circle(mask, centre, radius, value, thickness=-1)
    return mask


def _cell(label_map: np.ndarray, centre: tuple[int, int], radius: int) -> np.ndarray:
    """A round WBC: cytoplasm disc with a nucleus disc of half its radius inside."""
    _disc(label_map, centre, radius, CYTOPLASM)
    return _disc(label_map, centre, radius // 2, NUCLEUS)


def test_label_map_is_the_argmax_class():
    probabilities = np.zeros((3, 2, 2), np.float32)
    probabilities[0, 0, 0] = probabilities[1, 0, 1] = probabilities[2, 1, 0] = probabilities[2, 1, 1] = 1.0
    label_map = label_map_from_probabilities(probabilities)
    assert label_map.dtype == np.uint8
    np.testing.assert_array_equal(label_map, [[BACKGROUND, CYTOPLASM], [NUCLEUS, NUCLEUS]])


def test_two_touching_discs_are_split_into_two_instances():
    mask = np.zeros(MODEL_SIZE, np.uint8)
    _disc(mask, (100, 96), 20)
    _disc(mask, (135, 96), 20)  # centres 35 apart: the discs overlap in a neck about 19 px high
    assert cv2.connectedComponents(mask)[0] == 2  # one component (plus background) before splitting

    instances = split_touching(mask.astype(bool), MIN_AREA)

    assert instances.dtype == np.int32
    labels = set(np.unique(instances)) - {0}
    assert len(labels) == 2
    left, right = (instances[96, 100], instances[96, 135])
    assert left != right and left in labels and right in labels
    # Every mask pixel, the cut between the cells included, belongs to one of them; nothing else does.
    np.testing.assert_array_equal(instances > 0, mask > 0)
    for label in labels:
        assert (instances == label).sum() > 0.4 * mask.sum()


@pytest.mark.parametrize("radii", [(35, 25), (35, 22), (30, 20), (40, 26), (30, 30)])
def test_a_large_and_a_small_touching_cell_are_each_their_own_instance(radii):
    # Flooding the distance map by neighbour differences (OpenCV's watershed) ran along the ridge between the cells:
    # the small cell's piece wrapped round the large one's core and the two came out as one (BCCD's BloodImage_00176).
    large, small = radii
    mask = np.zeros(MODEL_SIZE, np.uint8)
    centres = ((80, 96), (80 + large + small - 6, 96))  # overlapping by 6 px: a broad contact, no neck
    for centre, radius in zip(centres, radii):
        _disc(mask, centre, radius)
    instances = split_touching(mask.astype(bool), MIN_AREA)
    assert len(set(np.unique(instances)) - {0}) == 2
    np.testing.assert_array_equal(instances > 0, mask > 0)
    for (x, y), radius in zip(centres, radii):
        ys, xs = np.nonzero(instances == instances[y, x])
        assert xs.min() >= x - radius - 2 and xs.max() <= x + radius + 2  # within its own cell, not across both
        assert abs(ys.min() - (y - radius)) <= 2 and abs(ys.max() - (y + radius)) <= 2  # and all of its height


@pytest.mark.parametrize("radius", [4, 8, 25])
def test_one_disc_stays_one_whole_instance(radius):
    mask = _disc(np.zeros(MODEL_SIZE, np.uint8), (100, 96), radius).astype(bool)
    instances = split_touching(mask, MIN_AREA)
    assert set(np.unique(instances)) == {0, 1}
    # The whole disc, rim included: watershed's border lines must not eat the cell's outer ring.
    np.testing.assert_array_equal(instances == 1, mask)


def test_a_cell_cut_by_the_input_edge_keeps_its_edge_pixels():
    mask = _disc(np.zeros(MODEL_SIZE, np.uint8), (120, 0), 15).astype(bool)
    instances = split_touching(mask, MIN_AREA)
    np.testing.assert_array_equal(instances > 0, mask)


def _nested_pieces() -> tuple[np.ndarray, np.ndarray]:
    """An instance map as watershed leaves a large lobed cell: piece 1 a U around piece 2, which lies inside piece 1's
    box, is most of its size and borders it on three sides (one component); piece 3 a separate speck above piece 2;
    piece 4 a small piece cut from the U's floor (bordering the U all round but a fifteenth of its area: a clump's
    cell, not a lobe)."""
    instances = np.zeros(MODEL_SIZE, np.int32)
    instances[40:120, 40:60] = instances[100:120, 40:140] = instances[40:120, 120:140] = 1
    instances[50:100, 60:120] = 2
    _disc(instances, (90, 44), 3, 3)
    instances[102:114, 80:92] = 4
    components = cv2.connectedComponents((instances > 0).astype(np.uint8), connectivity=8)[1]
    return instances, components


def test_a_piece_inside_a_larger_piece_of_the_same_cell_is_merged_into_it():
    instances, components = _nested_pieces()
    assert components[80, 80] == components[110, 50] == components[108, 86] != components[44, 90]
    merged = merge_nested(instances, components)
    np.testing.assert_array_equal(merged > 0, instances > 0)
    assert merged[80, 80] == merged[110, 50] == 1  # the nested piece became part of the U
    assert merged[44, 90] == 3  # another component inside the same box is another cell
    assert merged[108, 86] == 4  # far smaller than the U: a cell of its own, not a lobe


def test_touching_discs_side_by_side_are_not_merged():
    mask = np.zeros(MODEL_SIZE, np.uint8)
    _disc(mask, (100, 96), 20)
    _disc(mask, (135, 96), 20)
    components = cv2.connectedComponents(mask, connectivity=8)[1]
    pieces = split_touching(mask.astype(bool), MIN_AREA)
    np.testing.assert_array_equal(merge_nested(pieces, components), pieces)


def test_split_touching_ignores_components_below_the_minimum_area():
    mask = np.zeros(MODEL_SIZE, np.uint8)
    mask[10:14, 10:14] = 1  # 16 px speck
    np.testing.assert_array_equal(split_touching(mask.astype(bool), MIN_AREA), np.zeros(MODEL_SIZE, np.int32))


def test_the_cores_of_one_component_are_numbered_as_in_its_own_box():
    # Two squares joined by a neck, their component's box starting at an odd row. connectedComponents numbers by
    # two-row blocks: over the whole map the right square's core (a row higher) comes first, in the component's own box
    # the left one. split_touching labels all cores at once and keeps the numbers of a component-by-component labelling.
    mask = np.zeros((64, 96), np.uint8)
    mask[10:30, 10:30] = 1
    mask[9:30, 34:55] = 1
    mask[19, 30:34] = 1
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    cores_over_the_map = cv2.connectedComponents((distance >= 0.6 * distance.max()).astype(np.uint8), connectivity=8)[1]
    assert (cores_over_the_map[20, 20], cores_over_the_map[20, 44]) == (2, 1)
    instances = split_touching(mask.astype(bool), MIN_AREA)
    assert (instances[20, 20], instances[20, 44]) == (1, 2)


def test_the_boxes_find_cells_takes_from_the_split_are_those_of_its_instance_map():
    # find_cells reads the instances' pixels and boxes off the split; where nested pieces merged, each box is the union
    # of its pieces' boxes.
    instances, components = _nested_pieces()
    merged = _merge_nested(_InstanceMap.of(instances), components)
    split = _split_touching(instances > 0, MIN_AREA)
    assert merged.instances[80, 80] == 1 and merged.count == 4  # piece 2 merged into the U
    assert split.count > 0
    for found in (merged, split):
        np.testing.assert_array_equal(found.boxes, _model_boxes(found.instances, int(found.instances.max())))
        np.testing.assert_array_equal(found.pixels, np.flatnonzero(found.instances))
        np.testing.assert_array_equal(found.ids, found.instances.ravel()[found.pixels])


def test_find_cells_drops_specks_and_maps_boxes_to_the_frame():
    model_labels = np.zeros(MODEL_SIZE, np.uint8)
    _cell(model_labels, (100, 80), 15)
    model_labels[150:155, 200:205] = CYTOPLASM  # 25 px: a platelet-sized speck
    letterbox = fit_letterbox(480, 640, MODEL_SIZE)  # scale 0.4, no padding

    cells, frame_labels = find_cells(model_labels, letterbox, MIN_AREA, split=True)

    assert frame_labels.shape == (480, 640)
    assert len(cells) == 1
    cell = cells[0]
    # Model box (85, 65, 116, 96) -> frame pixels / 0.4.
    assert cell.box == letterbox.box_to_frame((85, 65, 116, 96)) == (212, 162, 290, 240)
    x0, y0, x1, y1 = cell.box
    assert cell.mask.shape == cell.nucleus_mask.shape == (y1 - y0, x1 - x0)
    assert cell.mask.dtype == cell.nucleus_mask.dtype == bool
    assert not (cell.nucleus_mask & ~cell.mask).any()
    assert 0 < cell.nucleus_mask.sum() < cell.mask.sum()
    # The mask is the cell's own pixels in the frame label map, read through its box.
    np.testing.assert_array_equal(cell.mask, frame_labels[y0:y1, x0:x1] != BACKGROUND)
    np.testing.assert_array_equal(cell.nucleus_mask, frame_labels[y0:y1, x0:x1] == NUCLEUS)


def test_a_cell_just_above_the_minimum_area_is_kept():
    model_labels = np.zeros(MODEL_SIZE, np.uint8)
    _disc(model_labels, (100, 96), 4, CYTOPLASM)  # 49 model pixels, MIN_AREA 40
    assert np.count_nonzero(model_labels) == 49
    cells, _ = find_cells(model_labels, fit_letterbox(480, 640, MODEL_SIZE), MIN_AREA, split=True)
    assert len(cells) == 1
    assert cells[0].box == (240, 230, 263, 253)  # model box (96, 92, 105, 101) / 0.4


def test_find_cells_removes_the_letterbox_padding():
    model_labels = np.zeros(MODEL_SIZE, np.uint8)
    _cell(model_labels, (128, 96), 40)  # the middle of a 120x120 frame, letterboxed with pad_x 32
    letterbox = fit_letterbox(120, 120, MODEL_SIZE)

    cells, frame_labels = find_cells(model_labels, letterbox, MIN_AREA, split=True)

    assert frame_labels.shape == (120, 120)
    assert len(cells) == 1
    x0, y0, x1, y1 = cells[0].box
    # Model box (88, 56, 169, 137): minus pad_x 32, divided by scale 1.6.
    assert (x0, y0, x1, y1) == (35, 35, 86, 86)
    assert cells[0].mask.shape == (y1 - y0, x1 - x0)
    assert cells[0].mask[(y1 - y0) // 2, (x1 - x0) // 2]


def test_find_cells_keeps_touching_cells_apart_only_when_asked():
    model_labels = np.zeros(MODEL_SIZE, np.uint8)
    _cell(model_labels, (100, 96), 20)
    _cell(model_labels, (135, 96), 20)
    letterbox = fit_letterbox(480, 640, MODEL_SIZE)

    split_cells, _ = find_cells(model_labels, letterbox, MIN_AREA, split=True)
    joined_cells, _ = find_cells(model_labels, letterbox, MIN_AREA, split=False)

    assert len(split_cells) == 2
    assert len(joined_cells) == 1
    for cell in split_cells:
        assert not (cell.nucleus_mask & ~cell.mask).any()
    # Split cells do not share a frame pixel.
    left, right = split_cells
    overlap = np.zeros((480, 640), np.uint8)
    for cell in (left, right):
        x0, y0, x1, y1 = cell.box
        overlap[y0:y1, x0:x1] += cell.mask
    assert overlap.max() == 1


def test_find_cells_sorts_cells_top_to_bottom_then_left_to_right():
    model_labels = np.zeros(MODEL_SIZE, np.uint8)
    for centre in ((200, 150), (60, 40), (200, 40), (60, 150)):
        _cell(model_labels, centre, 12)
    cells, _ = find_cells(model_labels, fit_letterbox(480, 640, MODEL_SIZE), MIN_AREA, split=True)
    corners = [(cell.box[1], cell.box[0]) for cell in cells]
    assert len(cells) == 4
    assert corners == sorted(corners)


@pytest.mark.parametrize("split", [True, False])
def test_an_empty_label_map_has_no_cells(split):
    cells, frame_labels = find_cells(np.zeros(MODEL_SIZE, np.uint8), fit_letterbox(480, 640, MODEL_SIZE), MIN_AREA, split)
    assert cells == []
    assert frame_labels.shape == (480, 640) and not frame_labels.any()


def test_a_component_without_nucleus_is_not_a_cell():
    """Bluish red-cell rims segment as cytoplasm alone; every white cell has a nucleus."""
    label_map = np.zeros(MODEL_SIZE, np.uint8)
    _cell(label_map, (60, 60), 20)
    _disc(label_map, (180, 120), 15, CYTOPLASM)  # cytoplasm only
    placement = fit_letterbox(MODEL_SIZE[0], MODEL_SIZE[1], MODEL_SIZE)
    kept, _ = find_cells(label_map, placement, MIN_AREA, False, min_nucleus_area_px=20)
    assert [cell.box[0] < 128 for cell in kept] == [True]
    everything, _ = find_cells(label_map, placement, MIN_AREA, False, min_nucleus_area_px=0)
    assert len(everything) == 2


def _cell_touching_a_red_cell(nucleus_radius: int) -> np.ndarray:
    """A white cell (nucleus half its radius) touching a red-cell-sized disc of cytoplasm whose own nucleus disc,
    centred on it, has the given radius (0: none): one component, which the watershed cuts in two."""
    label_map = np.zeros(MODEL_SIZE, np.uint8)
    _cell(label_map, (100, 96), 20)
    _disc(label_map, (135, 96), 20, CYTOPLASM)
    if nucleus_radius:
        _disc(label_map, (135, 96), nucleus_radius, NUCLEUS)
    return label_map


def test_a_piece_cut_from_a_cell_with_little_nucleus_is_not_a_cell():
    """The piece a touching red cell leaves when the watershed cuts it from a white cell is cytoplasm with a sliver
    of nucleus: dropped, where a touching white cell with a proper nucleus stays a cell of its own."""
    placement = fit_letterbox(MODEL_SIZE[0], MODEL_SIZE[1], MODEL_SIZE)
    red_piece = _cell_touching_a_red_cell(nucleus_radius=5)  # (5/20)^2 = 0.06 of the piece: below MIN_PIECE_NUCLEUS_SHARE
    assert 0.04 < np.mean(red_piece[76:117, 116:156][red_piece[76:117, 116:156] > 0] == NUCLEUS) < MIN_PIECE_NUCLEUS_SHARE
    cells, frame_labels = find_cells(red_piece, placement, MIN_AREA, split=True, min_nucleus_area_px=20)
    assert len(cells) == 1 and cells[0].box[0] < 100 < cells[0].box[2]
    assert not frame_labels[96, 140]  # the dropped piece is not left in the label map
    white_neighbour = _cell_touching_a_red_cell(nucleus_radius=12)  # 0.36 of it: a white cell
    assert len(find_cells(white_neighbour, placement, MIN_AREA, split=True, min_nucleus_area_px=20)[0]) == 2
    # Not split, the same component is one cell: a whole component is not held to the share
    assert len(find_cells(red_piece, placement, MIN_AREA, split=False, min_nucleus_area_px=20)[0]) == 1


def test_the_piece_holding_most_of_a_components_nucleus_is_kept_whatever_its_share():
    """A white cell painted together with the red cells around it is mostly cytoplasm: its piece holds the most
    nucleus of the component and stays a cell; the red-cell piece cut from it, with less, goes."""
    label_map = np.zeros(MODEL_SIZE, np.uint8)
    _disc(label_map, (100, 96), 30, CYTOPLASM)
    _disc(label_map, (100, 96), 7, NUCLEUS)  # 0.05 of the piece
    _disc(label_map, (153, 96), 26, CYTOPLASM)
    _disc(label_map, (156, 96), 3, NUCLEUS)  # ~29 px: above the minimum nucleus area, under 0.02 of the piece
    placement = fit_letterbox(MODEL_SIZE[0], MODEL_SIZE[1], MODEL_SIZE)
    assert split_touching(label_map > BACKGROUND, MIN_AREA).max() == 2
    cells, _ = find_cells(label_map, placement, MIN_AREA, split=True, min_nucleus_area_px=20)
    assert len(cells) == 1 and cells[0].box[0] < 100 < cells[0].box[2]


def test_a_whole_cell_with_little_nucleus_is_kept():
    """A neutrophil with a faint nucleus can be mostly cytoplasm: a component cut from nothing is a cell if its
    nucleus reaches the minimum area, whatever its share."""
    label_map = np.zeros(MODEL_SIZE, np.uint8)
    _disc(label_map, (100, 96), 30, CYTOPLASM)
    _disc(label_map, (100, 96), 6, NUCLEUS)  # 0.04 of the cell
    placement = fit_letterbox(MODEL_SIZE[0], MODEL_SIZE[1], MODEL_SIZE)
    assert len(find_cells(label_map, placement, MIN_AREA, split=True, min_nucleus_area_px=20)[0]) == 1


@pytest.mark.parametrize("split", [True, False])
def test_the_label_map_holds_the_returned_cells_and_nothing_else(split):
    """A dropped speck or nucleus-less rim must not stay labelled cytoplasm in res.label_map."""
    label_map = np.zeros(MODEL_SIZE, np.uint8)
    _cell(label_map, (60, 60), 20)
    _disc(label_map, (180, 120), 15, CYTOPLASM)  # no nucleus: not a cell
    label_map[150:155, 30:35] = NUCLEUS  # 25 px speck: below the minimum area
    placement = fit_letterbox(MODEL_SIZE[0], MODEL_SIZE[1], MODEL_SIZE)
    cells, frame_labels = find_cells(label_map, placement, MIN_AREA, split, min_nucleus_area_px=20)
    assert len(cells) == 1
    union = np.zeros(MODEL_SIZE, bool)
    x0, y0, x1, y1 = cells[0].box
    union[y0:y1, x0:x1] = cells[0].mask
    np.testing.assert_array_equal(frame_labels != BACKGROUND, union)
    assert (frame_labels[55:65, 55:65] == NUCLEUS).all()  # the kept cell's nucleus is untouched


@pytest.mark.parametrize("frame_shape", [(480, 640), (224, 224), (1920, 2560), (240, 333), (363, 360), (17, 4000), (4000, 30)])
def test_frame_sampling_is_the_frame_wide_nearest_resize(frame_shape):
    """Box-by-box mapping takes every frame pixel's label from the same model pixel as resizing the
    whole map would: enlarged, shrunk, letterboxed either way, extreme aspect ratios."""
    model_map = np.random.default_rng(0).integers(0, 1000, MODEL_SIZE).astype(np.int32)
    placement = fit_letterbox(frame_shape[0], frame_shape[1], MODEL_SIZE)
    rows, columns = frame_sampling(placement)
    np.testing.assert_array_equal(model_map[rows[:, None], columns[None, :]], placement.label_map_to_frame(model_map))


@pytest.mark.parametrize("frame_shape", [(480, 640), (1920, 2560), (150, 200), (17, 4000), (4000, 30)])
def test_a_cells_labels_sampled_columns_first_are_those_of_every_frame_pixel(frame_shape):
    """cell_labels_in_frame (model columns sampled first, then whole rows) gives every frame pixel of a box
    the label of the model pixel frame_sampling names for it where the instance is there, BACKGROUND where
    another instance or none is: boxes anywhere in the frame, enlarged and shrunk."""
    rng = np.random.default_rng(frame_shape[0])
    model_labels = rng.integers(1, 3, MODEL_SIZE).astype(np.uint8)
    instances = rng.integers(0, 4, MODEL_SIZE).astype(np.int32)
    placement = fit_letterbox(frame_shape[0], frame_shape[1], MODEL_SIZE)
    rows, columns = frame_sampling(placement)
    for _ in range(20):
        y0, y1 = np.sort(rng.choice(frame_shape[0] + 1, 2, replace=False))
        x0, x1 = np.sort(rng.choice(frame_shape[1] + 1, 2, replace=False))
        sampled = np.s_[rows[y0:y1, None], columns[None, x0:x1]]
        expected = np.where(instances[sampled] == 2, model_labels[sampled], BACKGROUND)
        np.testing.assert_array_equal(cell_labels_in_frame(model_labels, instances, 2, rows[y0:y1], columns[x0:x1]), expected)


def _frame_wide_reference(model_label_map: np.ndarray, placement, cells) -> np.ndarray:
    """The label map as find_cells made it before it worked box by box: the whole map resized to the
    frame, every pixel outside the returned cells' masks cleared."""
    frame_labels = placement.label_map_to_frame(model_label_map)
    keep = np.zeros(frame_labels.shape, bool)
    for cell in cells:
        x0, y0, x1, y1 = cell.box
        keep[y0:y1, x0:x1] |= cell.mask
        np.testing.assert_array_equal(cell.nucleus_mask, cell.mask & (frame_labels[y0:y1, x0:x1] == NUCLEUS))
    frame_labels[~keep] = BACKGROUND
    return frame_labels


@pytest.mark.parametrize("frame_shape", [(480, 640), (1920, 2560), (150, 200)])
def test_box_by_box_masks_hold_every_pixel_of_their_cell_in_the_frame(frame_shape):
    """Each cell's frame box holds all the frame pixels its model pixels map to (none is cut off by
    mapping box by box), and the label map is what resizing the whole map gives, outside cells cleared."""
    label_map = np.zeros(MODEL_SIZE, np.uint8)
    for centre, radius in (((40, 40), 18), ((75, 45), 16), ((200, 150), 25), ((255, 100), 12), ((130, 191), 14)):
        _cell(label_map, centre, radius)  # two touching, two cut by the input's edges
    placement = fit_letterbox(frame_shape[0], frame_shape[1], MODEL_SIZE)
    cells, frame_labels = find_cells(label_map, placement, MIN_AREA, True, min_nucleus_area_px=20)
    assert len(cells) == 5
    reference = _frame_wide_reference(label_map, placement, cells)
    np.testing.assert_array_equal(frame_labels, reference)
    everything = placement.label_map_to_frame(label_map) != BACKGROUND
    assert (frame_labels != BACKGROUND).sum() == everything.sum()  # nothing of any cell lost at a box edge


def test_split_touching_of_a_thin_strip_at_the_edge_is_one_instance():
    # A 2 px strip along the frame's edge (a small crop's segmenter output) once lost every seed to a watershed's
    # split lines and crashed Detector.run with an IndexError; it is one instance, as without the split
    # (find_cells then drops it for want of a nucleus).
    mask = np.zeros((40, 40), np.uint8)
    mask[38:40, 5:30] = 1
    instances = split_touching(mask, MIN_AREA)
    np.testing.assert_array_equal(instances, mask.astype(np.int32))


def test_the_label_map_is_the_argmax_ties_to_the_lower_class():
    rng = np.random.default_rng(3)
    probabilities = rng.random((3, 40, 50)).astype(np.float32)
    probabilities[:, :4, :4] = 0.25  # three-way ties: background
    probabilities[1, 10, :] = probabilities[0, 10, :]  # cytoplasm ties background
    probabilities[2, 20, :] = np.maximum(probabilities[0, 20, :], probabilities[1, 20, :])  # nucleus ties the larger
    label_map = label_map_from_probabilities(probabilities)
    assert label_map.dtype == np.uint8
    np.testing.assert_array_equal(label_map, np.argmax(probabilities, axis=0))
    assert set(np.unique(label_map)) == {0, 1, 2}


def test_a_small_piece_inside_a_white_cells_box_is_a_fragment_and_a_neighbour_is_not() -> None:
    from leukoedge.postprocess import FRAGMENT_AREA_SHARE, CellInstance, fragments

    def cell(box: tuple[int, int, int, int], area: int) -> CellInstance:
        x0, y0, x1, y1 = box
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        mask.flat[:area] = True
        return CellInstance(box, mask, np.zeros_like(mask))

    large = cell((0, 0, 100, 100), 8000)
    sliver = cell((70, 40, 90, 60), int(FRAGMENT_AREA_SHARE * 8000) - 1)  # inside the large cell's box
    neighbour = cell((95, 0, 160, 60), 3000)  # beside it, its box mostly outside
    lobe = cell((60, 30, 95, 70), int(FRAGMENT_AREA_SHARE * 8000) + 1)  # inside, but not far smaller: kept
    assert list(fragments([large, sliver, neighbour, lobe])) == [False, True, False, False]
    assert not fragments([sliver]).any() and fragments([]).shape == (0,)
