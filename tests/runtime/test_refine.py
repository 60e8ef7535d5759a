"""Per-cell refinement (leukoedge/refine.py): the refiner's crop labels become each cell's mask, box and
nucleus in frame pixels; neighbours are not swallowed; a cell the refiner misses keeps its field mask; a
bundle may refine only the cells the field segmenter is unsure of (refiner.skip_below_uncertainty)."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import Detector
from leukoedge.bundle import describe_bundle, load_bundle, save_bundle
from leukoedge.postprocess import CellInstance, fragments
from leukoedge.preprocess.cpu import cut_padded, fit_letterbox, resize, resize_labels, square_crop_box
from leukoedge.refine import cell_uncertainty, cells_to_refine, crop_labels_in_frame_pixels, refine_cells
from leukoedge.result import BACKGROUND, CYTOPLASM, NUCLEUS

MARGIN = 0.15
SIZE = 128
FRAME = (120, 160)


def _disk_cell(centre: tuple[int, int], radius: int, nucleus_radius: int) -> np.ndarray:
    """Frame label map of one round cell with a round nucleus."""
    label_map = np.zeros(FRAME, np.uint8)
    cv2.circle(label_map, centre, radius, CYTOPLASM, -1)
    cv2.circle(label_map, centre, nucleus_radius, NUCLEUS, -1)
    return label_map


def _instance(cell: np.ndarray) -> CellInstance:
    ys, xs = np.nonzero(cell)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return CellInstance((x0, y0, x1, y1), cell[y0:y1, x0:x1], np.zeros((y1 - y0, x1 - x0), bool))


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([labels == label for label in (BACKGROUND, CYTOPLASM, NUCLEUS)]).astype(np.float32)


def _crop_probabilities(label_map: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """What a perfect (and certain) refiner returns for the crop the runtime cuts around `box`."""
    labels, _ = cut_padded(label_map, square_crop_box(box, MARGIN))
    return _one_hot(resize_labels(labels, SIZE, SIZE))


def _in_frame(cell: CellInstance) -> np.ndarray:
    frame = np.zeros(FRAME, bool)
    x0, y0, x1, y1 = cell.box
    frame[y0:y1, x0:x1] = cell.mask
    return frame


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_a_perfect_refiner_gives_back_the_true_cell_in_frame_pixels():
    truth = _disk_cell((70, 60), 30, 14)
    # The field segmenter's mask is too large (as measured on Zheng): a disk 4 px wider.
    field = _instance(_disk_cell((70, 60), 34, 0) > 0)

    (cell,), label_map = refine_cells([field], _crop_probabilities(truth, field.box)[None], MARGIN, FRAME)

    ys, xs = np.nonzero(truth)
    true_box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    assert all(abs(a - b) <= 1 for a, b in zip(cell.box, true_box))
    assert cell.classifier_box == field.box  # the classifier keeps cropping where the cell was found
    assert _dice(label_map > 0, truth > 0) > 0.98
    assert _dice(label_map == NUCLEUS, truth == NUCLEUS) > 0.95
    x0, y0, x1, y1 = cell.box
    assert np.array_equal(label_map[y0:y1, x0:x1] > 0, cell.mask)
    assert np.array_equal(label_map[y0:y1, x0:x1] == NUCLEUS, cell.nucleus_mask)


def test_the_outline_follows_the_refiners_soft_edge_between_crop_pixels():
    # A large cell (crop ~3x the refiner's input) whose probabilities fall smoothly across its true
    # outline, as a trained refiner's do: resizing the probabilities puts the outline where they
    # cross, not on the 3-pixel staircase that upsampled crop labels would draw.
    frame_shape, centre, radius = (420, 420), (210, 210), 150.0
    field = CellInstance((60, 60, 361, 361), np.ones((301, 301), bool), np.zeros((301, 301), bool))
    x0, y0, x1, y1 = square_crop_box(field.box, MARGIN)
    scale = (x1 - x0) / SIZE
    # frame coordinates of the crop's pixel centres, and their signed distance to the true outline
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    distance = radius - np.hypot(x0 + (xs + 0.5) * scale - 0.5 - centre[0], y0 + (ys + 0.5) * scale - 0.5 - centre[1])
    inside = 1.0 / (1.0 + np.exp(-distance / scale))
    probabilities = np.stack([1.0 - inside, inside, np.zeros_like(inside)])[None]

    (cell,), label_map = refine_cells([field], probabilities, MARGIN, frame_shape)

    truth = np.zeros(frame_shape, np.uint8)
    cv2.circle(truth, centre, int(radius), 1, -1)
    assert 0 < np.abs((label_map > 0).astype(int) - truth).sum() <= 0.002 * truth.sum()
    assert abs(int((label_map > 0).sum()) - int(truth.sum())) <= 0.002 * truth.sum()


def test_a_touching_neighbour_in_the_crop_is_not_swallowed():
    left, right = _disk_cell((60, 60), 22, 9), _disk_cell((100, 60), 22, 9)
    both = np.maximum(left, right)  # the two disks touch: one blob in either cell's crop
    field_left, field_right = _instance(left > 0), _instance((right > 0) & (left == 0))
    crops = np.stack([_crop_probabilities(both, field_left.box), _crop_probabilities(both, field_right.box)])

    (refined_left, refined_right), label_map = refine_cells([field_left, field_right], crops, MARGIN, FRAME)

    left_pixels, right_pixels = _in_frame(refined_left), _in_frame(refined_right)
    assert not (left_pixels & _in_frame(field_right)).any()  # each keeps to its own side of the other's field mask
    assert not (right_pixels & _in_frame(field_left)).any()
    assert _dice(left_pixels, left > 0) > 0.97
    assert _dice(label_map > 0, both > 0) > 0.97


def test_a_cell_the_refiner_misses_keeps_its_field_mask():
    field = _instance(_disk_cell((70, 60), 25, 10) > 0)
    elsewhere = _disk_cell((140, 20), 10, 4)  # the refiner sees only something that is not this cell
    crops = np.stack([_one_hot(np.zeros((SIZE, SIZE), np.uint8)), _crop_probabilities(elsewhere, field.box)])

    refined, label_map = refine_cells([field, field], crops, MARGIN, FRAME)

    for cell in refined:
        assert cell is field
    assert label_map.max() == CYTOPLASM  # the field mask, which had no nucleus
    assert label_map.sum() == field.mask.sum() * CYTOPLASM  # first cell wins the pixels both claim


def test_cells_at_the_frame_edge_stay_inside_the_frame():
    truth = _disk_cell((8, 60), 20, 8)  # cut by the left edge
    field = _instance(truth > 0)

    (cell,), label_map = refine_cells([field], _crop_probabilities(truth, field.box)[None], MARGIN, FRAME)

    x0, y0, x1, y1 = cell.box
    assert 0 <= x0 < x1 <= FRAME[1] and 0 <= y0 < y1 <= FRAME[0]
    assert cell.mask.shape == (y1 - y0, x1 - x0)
    assert _dice(label_map > 0, truth > 0) > 0.97


def test_a_count_mismatch_is_refused():
    field = _instance(_disk_cell((70, 60), 25, 10) > 0)
    with pytest.raises(ValueError, match="2 refined crops for 1 cells"):
        refine_cells([field], np.zeros((2, 3, SIZE, SIZE), np.float32), MARGIN, FRAME)


@pytest.mark.parametrize("side", [40, 128, 300])
def test_crop_labels_are_the_argmax_of_the_resized_probabilities_ties_to_the_lower_class(side):
    """Plane by plane and two comparisons: the labels np.argmax gives over the interleaved resize,
    shrunk, same size and enlarged, where classes tie exactly too."""
    rng = np.random.default_rng(side)
    probabilities = rng.random((3, SIZE, SIZE)).astype(np.float32)
    probabilities[1, :10] = probabilities[0, :10]  # cytoplasm ties background
    probabilities[2, 10:20] = probabilities[1, 10:20] = np.maximum(probabilities[0, 10:20], 0.5)  # nucleus ties cytoplasm
    interleaved = resize(np.ascontiguousarray(np.moveaxis(probabilities, 0, -1)), side, side)
    np.testing.assert_array_equal(crop_labels_in_frame_pixels(probabilities, side, side), np.argmax(interleaved, axis=-1))


def test_a_crop_larger_than_the_label_cap_gets_the_capped_labels_enlarged(monkeypatch: pytest.MonkeyPatch):
    """A large cell in a large frame: its labels are computed at MAX_LABEL_SIDE and enlarged, and differ from the
    full-size computation only along the outline."""
    import leukoedge.refine as refine

    frame_shape, centre, radius = (1100, 1100), (550, 550), 380
    truth = np.zeros(frame_shape, np.uint8)
    cv2.circle(truth, centre, radius, CYTOPLASM, -1)
    cv2.circle(truth, centre, radius // 2, NUCLEUS, -1)
    field = _instance(truth > 0)
    x0, y0, x1, y1 = square_crop_box(field.box, MARGIN)
    labels, _ = cut_padded(truth, (x0, y0, x1, y1))
    probabilities = cv2.GaussianBlur(np.moveaxis(_one_hot(resize_labels(labels, SIZE, SIZE)), 0, -1), (0, 0), 1.5)
    probabilities = np.ascontiguousarray(np.moveaxis(probabilities, -1, 0))
    side = x1 - x0
    assert side > refine.MAX_LABEL_SIDE

    capped = crop_labels_in_frame_pixels(probabilities, side, side)
    scaled = round(side * refine.MAX_LABEL_SIDE / side)
    np.testing.assert_array_equal(capped, resize_labels(crop_labels_in_frame_pixels(probabilities, scaled, scaled), side, side))
    monkeypatch.setattr(refine, "MAX_LABEL_SIDE", 10_000)
    full = crop_labels_in_frame_pixels(probabilities, side, side)
    assert 0 < np.mean(capped != full) < 0.01
    assert _dice(capped > 0, full > 0) > 0.995 and _dice(capped == NUCLEUS, full == NUCLEUS) > 0.99


def test_a_crowded_field_refines_as_if_each_crop_saw_the_whole_frames_cells():
    """Neighbours are found box by box: a cell whose crop reaches a neighbour's box keeps off that
    neighbour's pixels, and one far away plays no part, in any order of the cells."""
    centres = [(30, 30), (62, 30), (94, 30), (30, 90), (130, 90)]
    truth = np.zeros(FRAME, np.uint8)
    for centre in centres:
        truth = np.maximum(truth, _disk_cell(centre, 17, 7))
    fields = []
    claimed = np.zeros(FRAME, bool)
    for centre in centres:
        own = (_disk_cell(centre, 17, 7) > 0) & ~claimed
        claimed |= own
        fields.append(_instance(own))
    crops = np.stack([_crop_probabilities(truth, field.box) for field in fields])
    refined, label_map = refine_cells(fields, crops, MARGIN, FRAME)
    for index, cell in enumerate(refined):
        others = np.zeros(FRAME, bool)
        for other_index, other in enumerate(fields):
            if other_index != index:
                others |= _in_frame(other)
        assert not (_in_frame(cell) & others).any()
        assert _dice(_in_frame(cell), _in_frame(fields[index])) > 0.9
    reversed_cells, reversed_map = refine_cells(fields[::-1], crops[::-1], MARGIN, FRAME)
    assert [cell.box for cell in reversed_cells[::-1]] == [cell.box for cell in refined]
    assert _dice(label_map > 0, truth > 0) > 0.97


def _frame_wide_refine(instances: list[CellInstance], crop_probabilities: np.ndarray, frame_shape: tuple[int, int]) -> tuple[list[CellInstance], np.ndarray]:
    """refine_cells as first written, over whole frames: the instance map of the frame (first instance wins
    an overlap), each crop's labels by np.argmax over the interleaved resize, the component of the refined
    foreground holding most of the cell's field mask by counting every pixel's component."""
    ids = np.zeros(frame_shape, np.int32)
    for index, instance in enumerate(instances):
        x0, y0, x1, y1 = instance.box
        ids[y0:y1, x0:x1][instance.mask & (ids[y0:y1, x0:x1] == 0)] = index + 1
    refined = []
    for index, (instance, probabilities) in enumerate(zip(instances, crop_probabilities)):
        sx0, sy0, sx1, sy1 = square_crop_box(instance.box, MARGIN)
        interleaved = resize(np.ascontiguousarray(np.moveaxis(probabilities, 0, -1)), sx1 - sx0, sy1 - sy0)
        labels = np.zeros(frame_shape, np.int64)
        in_frame = np.s_[max(sy0, 0) : sy1, max(sx0, 0) : sx1]
        labels[in_frame] = np.argmax(interleaved, axis=-1)[max(sy0, 0) - sy0 :, max(sx0, 0) - sx0 :][: labels[in_frame].shape[0], : labels[in_frame].shape[1]]
        own = ids == index + 1
        foreground = (labels != BACKGROUND) & ((ids == 0) | own)
        count, components = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=8)
        overlap = np.bincount(components[own], minlength=count)[1:]
        if count < 2 or overlap.max() == 0:
            refined.append(instance)
            continue
        mask = components == 1 + int(overlap.argmax())
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        nucleus = mask[y0:y1, x0:x1] & (labels[y0:y1, x0:x1] == NUCLEUS)
        refined.append(CellInstance((x0, y0, x1, y1), mask[y0:y1, x0:x1], nucleus, found_box=instance.box))
    label_map = np.zeros(frame_shape, np.uint8)
    for cell in refined:
        x0, y0, x1, y1 = cell.box
        free = cell.mask & (label_map[y0:y1, x0:x1] == BACKGROUND)
        label_map[y0:y1, x0:x1][free] = np.where(cell.nucleus_mask[free], NUCLEUS, CYTOPLASM)
    return refined, label_map


@pytest.mark.parametrize("seed", range(6))
def test_refining_window_by_window_gives_the_frame_wide_result(seed):
    """refine_cells works inside each crop's window and counts the field mask's overlap only where it can
    be: the same cells, boxes, masks and label map as the frame-wide version, on random crowded fields whose
    field masks overlap (the first instance wins), reach past the frame's edges, and whose refined
    foreground falls apart into many pieces, several touching the field mask (ties included)."""
    rng = np.random.default_rng(seed)
    instances = []
    for _ in range(int(rng.integers(3, 12))):
        centre = (int(rng.integers(-5, FRAME[1] + 5)), int(rng.integers(-5, FRAME[0] + 5)))
        disc = _disk_cell(centre, int(rng.integers(3, 30)), 2) > 0
        if disc.any():
            instances.append(_instance(disc))
    coarse = rng.random((len(instances), 3, 6, 6)).astype(np.float32)
    crops = np.stack([np.stack([resize(plane, SIZE, SIZE) for plane in planes]) for planes in coarse])
    crops[:, 2] *= 0.9  # fewer nucleus wins: more of every class on the outlines
    crops[0, 1] = crops[0, 0]  # exact ties, to the lower class
    refined, label_map = refine_cells(instances, crops, MARGIN, FRAME)
    expected, expected_map = _frame_wide_refine(instances, crops, FRAME)
    for cell, reference in zip(refined, expected):
        assert (cell.box, cell.found_box) == (reference.box, reference.found_box)
        np.testing.assert_array_equal(cell.mask, reference.mask)
        np.testing.assert_array_equal(cell.nucleus_mask, reference.nucleus_mask)
    np.testing.assert_array_equal(label_map, expected_map)


# --- refining only the cells the field segmenter is unsure of -------------------------------------

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "default"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def test_a_confident_cell_is_left_to_the_segmenter_and_an_uncertain_one_refined():
    letterbox = fit_letterbox(FRAME[0], FRAME[1], (60, 80))  # model pixels are 2x2 frame pixels
    sure, unsure = _instance(_disk_cell((40, 60), 20, 8) > 0), _instance(_disk_cell((120, 60), 20, 8) > 0)
    probabilities = np.zeros((3, 60, 80), np.float32)
    probabilities[0] = 1.0  # certain background everywhere ...
    probabilities[:, 15:45, 50:70] = 1.0 / 3  # ... but over the second cell, where every class is as likely

    uncertainty = cell_uncertainty(probabilities, letterbox, [sure, unsure])

    assert uncertainty[0] == 0.0 and uncertainty[1] > 0.6
    assert cells_to_refine(probabilities, letterbox, [sure, unsure], None).tolist() == [0, 1]  # absent: every cell
    assert cells_to_refine(probabilities, letterbox, [sure, unsure], 0.5).tolist() == [1]
    assert cells_to_refine(probabilities, letterbox, [sure, unsure], 0.0).tolist() == [0, 1]


def test_a_cell_smaller_than_the_bundles_smallest_side_is_left_to_the_segmenter():
    letterbox = fit_letterbox(FRAME[0], FRAME[1], (60, 80))
    small, large = _instance(_disk_cell((30, 30), 8, 3) > 0), _instance(_disk_cell((110, 60), 30, 10) > 0)  # 17 and 61 px across
    probabilities = np.full((3, 60, 80), 1.0 / 3, np.float32)  # every cell as uncertain as can be

    assert cells_to_refine(probabilities, letterbox, [small, large], None, None).tolist() == [0, 1]
    assert cells_to_refine(probabilities, letterbox, [small, large], None, 48.0).tolist() == [1]
    assert cells_to_refine(probabilities, letterbox, [small, large], 0.5, 48.0).tolist() == [1]  # both conditions
    assert cells_to_refine(probabilities, letterbox, [small, large], 0.9, 48.0).tolist() == []  # not unsure enough
    assert cells_to_refine(probabilities, letterbox, [small, large], None, 100.0).tolist() == []


def test_a_cell_not_chosen_keeps_its_field_mask_and_a_refined_neighbour_keeps_off_it():
    left, right = _disk_cell((60, 60), 22, 9), _disk_cell((100, 60), 22, 9)
    both = np.maximum(left, right)
    field_left, field_right = _instance(left > 0), _instance((right > 0) & (left == 0))

    (kept_left, refined_right), label_map = refine_cells(
        [field_left, field_right], _crop_probabilities(both, field_right.box)[None], MARGIN, FRAME, chosen=np.array([1])
    )

    assert kept_left is field_left  # the segmenter's instance, untouched (its classifier box too)
    assert refined_right.found_box == field_right.box
    assert not (_in_frame(refined_right) & _in_frame(field_left)).any()
    assert _dice(_in_frame(refined_right), right > 0) > 0.95
    assert np.array_equal(label_map > 0, _in_frame(kept_left) | _in_frame(refined_right))


def _bundle_with_refiner(tmp_path: Path, key: str, value: float) -> Path:
    """A copy of the shipped bundle with one refiner setting changed, as docs/performance.md makes them."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["refiner"][key] = value
    out = tmp_path / f"{key}-{value}"
    save_bundle(out, manifest, {name: bundle.root / name for name in manifest["files"]})
    return out


def test_cells_smaller_than_the_smallest_side_skip_the_refiner_and_leukoedge_info_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bundle = load_bundle(DEFAULT_BUNDLE)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["refiner"]["min_cell_side_px"] = float(max(_sample_frame().shape))  # larger than any cell of the frame
    out = tmp_path / "large-cells-only"
    save_bundle(out, manifest, {name: bundle.root / name for name in manifest["files"]})
    with Detector.load(out, threads=1) as detector:
        assert f"only cells at least {manifest['refiner']['min_cell_side_px']:g} px across" in describe_bundle(detector.bundle)
        refined_batches = []
        run_refiner = detector.refiner.run
        monkeypatch.setattr(detector.refiner, "run", lambda inputs: refined_batches.append(inputs) or run_refiner(inputs))
        frame = _sample_frame()
        cells = detector.white_cells(frame, detector.candidates(frame))[0]
    assert cells and not refined_batches and all(cell.found_box is None for cell in cells)


def _sample_frame() -> np.ndarray:
    frame = cv2.imread(str(SAMPLES / "bccd_BloodImage_00024.jpg"))
    assert frame is not None
    return frame


def test_a_threshold_of_zero_refines_every_cell_exactly_as_the_shipped_bundle(tmp_path: Path):
    frame = _sample_frame()
    with Detector.load(DEFAULT_BUNDLE, threads=1) as shipped, Detector.load(_bundle_with_refiner(tmp_path, "skip_below_uncertainty", 0.0), threads=1) as every_cell:
        expected, found = shipped.run(frame), every_cell.run(frame)
    assert len(found.cells) == len(expected.cells) > 0
    assert np.array_equal(found.label_map, expected.label_map)
    for cell, reference in zip(found.cells, expected.cells):
        assert cell.box == reference.box and cell.found_box == reference.found_box
        assert np.array_equal(cell.mask, reference.mask) and np.array_equal(cell.nucleus_mask, reference.nucleus_mask)
        assert cell.blast_probability == reference.blast_probability


def test_confident_cells_skip_the_refiner_and_keep_the_segmenters_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    frame = _sample_frame()
    with Detector.load(_bundle_with_refiner(tmp_path, "skip_below_uncertainty", 1.0), threads=1) as detector:  # every cell is surer than that
        assert "only cells with field-mask uncertainty >= 1.0" in describe_bundle(detector.bundle)  # `leukoedge info` says so
        refined_batches = []
        run_refiner = detector.refiner.run
        monkeypatch.setattr(detector.refiner, "run", lambda inputs: refined_batches.append(inputs) or run_refiner(inputs))
        found = detector.white_cells(frame, detector.candidates(frame))[0]
        assert found and not refined_batches  # the refiner never ran
        detector.refiner_spec = {key: value for key, value in detector.refiner_spec.items() if key != "skip_below_uncertainty"}
        every_cell = detector.white_cells(frame, detector.candidates(frame))[0]
        assert len(refined_batches) == 1  # without the option it runs, on every cell
    assert all(cell.found_box is None for cell in found)  # no cell moved: the segmenter's masks
    assert [cell.classifier_box for cell in found] == [cell.classifier_box for cell in every_cell]
    assert not all(np.array_equal(a.mask, b.mask) for a, b in zip(found, every_cell))


def test_refiner_and_classifier_share_one_crop_per_cell_with_the_same_results() -> None:
    """The shipped refiner cuts its crops as the classifier does (64x64, the same margin, the field segmenter's
    boxes): cut once, the results are the ones cutting them twice gives."""
    repo = Path(__file__).resolve().parents[2]
    detector = Detector.load(repo / "models" / "default")
    assert detector.shared_crops
    # Four sample fields side by side: many cells, some refined, some skipped.
    frames = [cv2.resize(cv2.imread(str(path)), (320, 240)) for path in sorted((repo / "samples").glob("*.jpg"))]
    frame = np.ascontiguousarray(np.vstack([np.hstack(frames[:2]), np.hstack(frames[2:4])]))
    refiner_cuts = []  # the refiner cuts crops of its own only where it cannot share the classifier's
    cut_for_refiner = detector._crop_batches
    detector._crop_batches = lambda frame, prepared, boxes, spec: (refiner_cuts.append(1) if spec is detector.refiner_spec else None) or cut_for_refiner(frame, prepared, boxes, spec)
    shared = detector.run(frame)
    assert not refiner_cuts
    detector.shared_crops = False
    separate = detector.run(frame)
    assert refiner_cuts
    assert len(shared.cells) == len(separate.cells) >= 3
    for a, b in zip(shared.cells, separate.cells):
        assert a.box == b.box and a.label == b.label and a.blast_probability == pytest.approx(b.blast_probability, abs=1e-6)
    assert np.array_equal(shared.label_map, separate.label_map)


def test_the_refiner_segments_only_the_proposals_the_gate_keeps_and_they_come_out_as_refining_all_would_give(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate runs before the refiner: a rejected proposal is never refined, and a kept cell's refined mask is the
    one refining every proposal gives (every proposal still claims its pixels, kept or not)."""
    detector = Detector.load(DEFAULT_BUNDLE, threads=1)
    refined_crops = []
    run_refiner = detector.refiner.run
    monkeypatch.setattr(detector.refiner, "run", lambda inputs: refined_crops.append(len(next(iter(inputs.values())))) or run_refiner(inputs))
    rejected_somewhere = False
    for path in sorted((data_root / "txl-pbc" / "images").glob("*.jpg"))[:12]:
        frame = cv2.imread(str(path))
        found = detector.candidates(frame)
        if not found.instances:
            continue
        crops = detector.cell_crops(frame, found.prepared, found.instances)
        keep = detector.white_cell_probabilities(crops) >= detector.gate_spec["threshold"]
        kept = np.flatnonzero(keep)
        keep[kept[fragments([found.instances[index] for index in kept])]] = False
        spec = detector.refiner_spec
        chosen = cells_to_refine(found.probabilities, found.prepared.letterbox, found.instances, spec.get("skip_below_uncertainty"), spec.get("min_cell_side_px"))
        refined_crops.clear()
        cells = detector.white_cells(frame, found)[0]
        assert sum(refined_crops) == int(keep[chosen].sum())
        everyone = detector.refine(frame, found.prepared, found.instances, found.probabilities, np.arange(len(found.instances)), crops)[0]
        expected = [cell for cell, kept in zip(everyone, keep) if kept]
        assert [cell.box for cell in cells] == [cell.box for cell in expected]
        assert all(np.array_equal(a.mask, b.mask) and np.array_equal(a.nucleus_mask, b.nucleus_mask) for a, b in zip(cells, expected))
        rejected_somewhere |= bool((~keep[chosen]).any())
    assert rejected_somewhere  # some proposal the refiner would have segmented was rejected first


def test_a_cell_whose_refined_box_shrank_is_refined_again_from_it_and_no_verdict_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    frame = cv2.imread(str(SAMPLES / "pbc_lymphocyte_LY_131013.jpg"))  # its cell's refined box is 0.94 of its field box
    with Detector.load(_bundle_with_refiner(tmp_path, "refine_again_below", 0.0), threads=1) as once, Detector.load(_bundle_with_refiner(tmp_path, "refine_again_below", 1.0), threads=1) as twice:
        assert "refined again around its refined box where that is under 1 of the first box's area" in describe_bundle(twice.bundle)
        batches = {"once": [], "twice": []}
        for name, detector in (("once", once), ("twice", twice)):
            run = detector.refiner.run
            monkeypatch.setattr(detector.refiner, "run", lambda inputs, run=run, name=name: batches[name].append(next(iter(inputs.values()))) or run(inputs))
        first, second = once.run(frame), twice.run(frame)
        calls = {name: len(found) for name, found in batches.items()}
        refined_once = once.white_cells(frame, once.candidates(frame))[0]
        shrunk = [cell.box for cell in refined_once if cell.found_box is not None and cell.box != cell.found_box]
        # The second crop is cut around the first pass's box: the same crop as cutting it by hand.
        expected = np.concatenate(list(twice._crop_batches(frame, twice.candidates(frame).prepared, shrunk, twice.refiner_spec)))
    assert calls == {"once": 1, "twice": 2}  # a share of 0 refines nothing again
    assert len(shrunk) > 0 and np.array_equal(expected, batches["twice"][1])
    assert [cell.classifier_box for cell in second.cells] == [cell.classifier_box for cell in first.cells]
    assert [cell.blast_probability for cell in second.cells] == [cell.blast_probability for cell in first.cells]
    assert second.verdict.flagged == first.verdict.flagged and second.verdict.blast_count == first.verdict.blast_count
    assert [cell.box for cell in second.cells] != [cell.box for cell in first.cells]  # the outline moved


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_refine_again_share_outside_zero_to_one_is_refused(tmp_path: Path, share: float):
    from leukoedge.errors import BundleError

    bundle = load_bundle(DEFAULT_BUNDLE)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["refiner"]["refine_again_below"] = share
    with pytest.raises(BundleError, match="refine_again_below"):
        save_bundle(tmp_path / "odd", manifest, {name: bundle.root / name for name in manifest["files"]})


def test_best_overlap_is_the_component_holding_most_touching_pixels_ties_to_the_lowest():
    from leukoedge.refine import best_overlap

    rng = np.random.default_rng(0)
    for trial in range(300):
        count = int(rng.integers(2, 6))
        frame = rng.integers(0, count, (40, 50)).astype(np.int32)
        components = frame[3:33, 5:45]  # a view, as refine_instance passes the box's part of the window
        touching = (rng.random(components.shape) < rng.choice([0.0, 0.01, 0.3, 1.0])) & (components > 0)
        if trial % 3 == 0 and touching.any():  # often only one component is touched, as in a cell's crop
            touching &= components == components[touching][0]
        counts = np.bincount(components[touching], minlength=count)[1:]
        expected = 0 if not touching.any() else 1 + int(counts.argmax())
        if count == 2 and touching.any():
            expected = 1
        assert best_overlap(components, count, touching) == expected
