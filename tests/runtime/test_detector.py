"""Detector on a bundle from the real pipeline: results, timings, channel order, refusals, determinism."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import BackendUnavailableError, BundleError, Cell, Detector, InvalidArgumentError, InvalidFrameError, Result
from leukoedge.detector import MAX_CELL_BATCH
from leukoedge.result import BACKGROUND, CYTOPLASM, NUCLEUS

STAGES = ("preprocess", "segment", "postprocess", "refine", "gate", "check", "classify")


@pytest.fixture(scope="module")
def detector(tiny_bundle: Path) -> Detector:
    return Detector.load(tiny_bundle)


@pytest.fixture(scope="module")
def bccd_frame(data_root: Path) -> np.ndarray:
    frame = cv2.imread(str(data_root / "bccd" / "images" / "BloodImage_00000.jpg"), cv2.IMREAD_COLOR)
    assert frame is not None and frame.shape == (480, 640, 3)
    return frame


@pytest.fixture(scope="module")
def bccd_result(detector: Detector, bccd_frame: np.ndarray) -> Result:
    return detector.run(bccd_frame)


class FixedSegmenter:
    """A segmenter backend that answers every frame with the same probabilities: lets the tests place
    cells where they want, since a bundle trained for a few steps finds none on its own."""

    name = "fixed"

    def __init__(self, label_map: np.ndarray, output_name: str):
        self.probabilities = np.eye(3, dtype=np.float32)[label_map].transpose(2, 0, 1)[None]
        self.output_name = output_name
        self.input_names: list[str] = []
        self.output_names = [output_name]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.output_name: self.probabilities}


def _cells_label_map(input_size: list[int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    label_map = np.zeros(input_size, np.uint8)
    for centre in centres:
        cv2.circle(label_map, centre, radius, CYTOPLASM, thickness=-1)
        cv2.circle(label_map, centre, radius // 2, NUCLEUS, thickness=-1)
    return label_map


def _detector_with_cells(tiny_bundle: Path, centres: list[tuple[int, int]], radius: int = 10, channel_order: str = "BGR") -> Detector:
    detector = Detector.load(tiny_bundle, channel_order=channel_order)
    spec = detector.segmenter_spec
    detector.segmenter = FixedSegmenter(_cells_label_map(spec["input_size"], centres, radius), spec["output"])
    return detector


def _scores(cell: Cell) -> np.ndarray:
    """Every head's probabilities of a cell, flattened in head and class order."""
    return np.array([p for scores in cell.head_scores.values() for p in scores.values()])


def _assert_consistent(result: Result, detector: Detector, frame_shape: tuple[int, int]) -> None:
    """Every invariant a caller relies on, whatever the models found."""
    height, width = frame_shape
    assert result.frame_shape == frame_shape
    assert result.label_map.shape == frame_shape and result.label_map.dtype == np.uint8
    assert set(np.unique(result.label_map)) <= {BACKGROUND, CYTOPLASM, NUCLEUS}
    heads = detector.classifier_spec["heads"]
    threshold = detector.verdict_spec["blast_threshold"]
    assert [cell.id for cell in result.cells] == list(range(1, len(result.cells) + 1))
    for cell in result.cells:
        x0, y0, x1, y1 = cell.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert cell.mask.shape == cell.nucleus_mask.shape == (y1 - y0, x1 - x0)
        assert cell.mask.any() and not (cell.nucleus_mask & ~cell.mask).any()
        assert (result.label_map[y0:y1, x0:x1][cell.mask] != BACKGROUND).all()
        assert 0.0 <= cell.blast_probability <= 1.0
        assert cell.label == ("blast" if cell.blast_probability >= threshold else "normal")
        assert set(cell.head_scores) == set(heads)
        for head, scores in cell.head_scores.items():
            assert list(scores) == heads[head]["classes"]
            assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    verdict = result.verdict
    assert verdict.cell_count == len(result.cells)
    assert verdict.blast_count == sum(cell.blast_probability >= threshold for cell in result.cells)
    assert verdict.blast_threshold == threshold
    assert verdict.flagged == (bool(result.cells) and verdict.blast_fraction >= verdict.flag_fraction)
    if result.cells and "subtype" in heads:
        assert list(verdict.subtype_scores) == heads["subtype"]["classes"]
        assert sum(verdict.subtype_scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert verdict.subtype == max(verdict.subtype_scores, key=verdict.subtype_scores.get)


def test_run_on_a_real_field_returns_a_consistent_result(detector, bccd_result):
    assert isinstance(bccd_result, Result)
    _assert_consistent(bccd_result, detector, (480, 640))
    assert bccd_result.bundle_name == detector.bundle.name
    assert bccd_result.model_version == detector.bundle.model_version


def test_timings_cover_every_stage_and_the_total_includes_them(bccd_result):
    timings = bccd_result.timings
    assert set(timings) == {*STAGES, "total"}  # no capture stage: the caller read the frame
    assert all(ms >= 0.0 for ms in timings.values())
    # total also covers frame validation, so it is at least the sum of the stages that run one after another; the
    # domain check runs beside the segmenter and the classifier, its time overlapping theirs.
    assert timings["total"] >= sum(timings[stage] for stage in STAGES if stage != "check")
    assert timings["check"] <= timings["total"]


def test_the_domain_check_thread_gives_the_scores_run_in_turn_and_stops_with_the_detector(bccd_frame):
    import threading

    from leukoedge import default_bundle
    from leukoedge.domain import domain_scores
    from leukoedge.preprocess.cpu import corrected_frame

    with Detector.load(default_bundle()) as det:
        result = det.run(bccd_frame)
        corrected = corrected_frame(bccd_frame)
        found = det.candidates(corrected.frame)
        cells, _, _, _ = det.white_cells(corrected.frame, found)
        in_turn = domain_scores(
            det.domain_spec, bccd_frame, corrected.frame, found.prepared, det.spec, found.probabilities, [cell.box for cell in cells],
            illumination_falloff=corrected.falloff, outside_field=corrected.outside_field, dark=corrected.dark_share,
        )
        assert list(result.verdict.domain) == list(in_turn) and result.verdict.domain == in_turn  # the same scores, in order
        assert any(thread.name.startswith("leukoedge-check") for thread in threading.enumerate())
    assert not any(thread.name.startswith("leukoedge-check") for thread in threading.enumerate())


def test_candidates_of_a_frame_prepared_before_are_those_it_prepares_itself(detector, bccd_frame):
    from leukoedge.preprocess.cpu import corrected_frame

    frame = corrected_frame(bccd_frame).frame
    own, given = detector.candidates(frame), detector.candidates(frame, prepared=detector.prepare_frame(frame))
    assert np.array_equal(own.probabilities, given.probabilities) and np.array_equal(own.label_map, given.label_map)
    assert [cell.box for cell in own.instances] == [cell.box for cell in given.instances]


def test_an_error_in_the_domain_check_reaches_the_caller(bccd_frame, monkeypatch):
    import leukoedge.detector as detector_module
    from leukoedge import default_bundle

    def broken(*args, **kwargs):
        raise ValueError("the check failed")

    monkeypatch.setattr(detector_module, "cell_scores", broken)
    with Detector.load(default_bundle()) as det:
        with pytest.raises(ValueError, match="the check failed"):
            det.run(bccd_frame)


def test_capture_time_is_reported_when_given(detector, bccd_frame):
    assert detector.run(bccd_frame, capture_ms=12.5).timings["capture"] == 12.5


def test_result_serializes_to_json(bccd_result):
    decoded = json.loads(json.dumps(bccd_result.to_dict(include_masks=True)))
    assert decoded["frame_shape"] == [480, 640]
    assert set(decoded["timings"]) == {*STAGES, "total"}
    assert decoded["verdict"] == bccd_result.verdict.to_dict()
    assert len(decoded["cells"]) == len(bccd_result.cells)


def test_cells_are_classified_in_batches_and_stay_consistent(tiny_bundle, bccd_frame):
    # 70 cells on a 10x7 grid of model pixels: more than one classifier batch.
    centres = [(14 + 24 * column, 14 + 26 * row) for row in range(7) for column in range(10)]
    assert len(centres) > MAX_CELL_BATCH
    detector = _detector_with_cells(tiny_bundle, centres, radius=6)

    result = detector.run(bccd_frame)

    assert len(result.cells) == len(centres)
    _assert_consistent(result, detector, (480, 640))
    decoded = json.loads(result.to_json(include_masks=True))
    assert [cell["id"] for cell in decoded["cells"]] == list(range(1, len(centres) + 1))
    # A cell's classification depends on its own crop only, not on which batch it landed in.
    single = _detector_with_cells(tiny_bundle, [centres[-1]], radius=6).run(bccd_frame)
    assert single.cells[0].box == result.cells[-1].box
    np.testing.assert_allclose(_scores(single.cells[0]), _scores(result.cells[-1]), atol=1e-5)


def test_rgb_channel_order_on_the_flipped_frame_gives_the_same_result(tiny_bundle, bccd_frame):
    centres = [(60, 50), (180, 120)]
    bgr = _detector_with_cells(tiny_bundle, centres).run(bccd_frame)
    rgb = _detector_with_cells(tiny_bundle, centres, channel_order="RGB").run(bccd_frame[..., ::-1])

    np.testing.assert_array_equal(rgb.label_map, bgr.label_map)
    assert len(rgb.cells) == len(bgr.cells) == 2
    for from_rgb, from_bgr in zip(rgb.cells, bgr.cells):
        assert from_rgb.box == from_bgr.box
        np.testing.assert_allclose(_scores(from_rgb), _scores(from_bgr), atol=1e-6)
    assert rgb.verdict == bgr.verdict


def test_rgb_detector_segments_the_flipped_frame_like_the_bgr_one(tiny_bundle, bccd_frame, bccd_result):
    rgb = Detector.load(tiny_bundle, channel_order="RGB").run(np.ascontiguousarray(bccd_frame[..., ::-1]))
    np.testing.assert_array_equal(rgb.label_map, bccd_result.label_map)
    assert [cell.box for cell in rgb.cells] == [cell.box for cell in bccd_result.cells]


def test_the_same_frame_twice_gives_identical_results(detector, bccd_frame, bccd_result):
    again = detector.run(bccd_frame.copy())
    np.testing.assert_array_equal(again.label_map, bccd_result.label_map)
    assert again.to_dict(include_masks=True)["cells"] == bccd_result.to_dict(include_masks=True)["cells"]
    assert again.verdict == bccd_result.verdict


def test_classification_is_deterministic_for_placed_cells(tiny_bundle, bccd_frame):
    detector = _detector_with_cells(tiny_bundle, [(60, 50), (180, 120)])
    first, second = detector.run(bccd_frame), detector.run(bccd_frame)
    assert first.to_dict(include_masks=True)["cells"] == second.to_dict(include_masks=True)["cells"]


@pytest.mark.parametrize(
    "frame",
    [
        None,
        np.zeros((480, 640, 3), np.float32),
        np.zeros((480, 640), np.uint8),
        np.zeros((480, 640, 4), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((15, 640, 3), np.uint8),
        [[0, 0, 0]],
    ],
    ids=["none", "float32", "grayscale", "four-channel", "empty", "below-min-side", "list"],
)
def test_bad_frames_are_refused(detector, frame):
    with pytest.raises(InvalidFrameError):
        detector.run(frame)


def test_frames_beyond_the_bundle_limit_are_refused(detector):
    max_side = detector.limits["max_frame_side"]
    with pytest.raises(InvalidFrameError, match=f"at most {max_side}"):
        detector.run(np.zeros((16, max_side + 1, 3), np.uint8))


def test_a_tampered_bundle_is_refused_at_load(tiny_bundle, tmp_path):
    tampered = shutil.copytree(tiny_bundle, tmp_path / "tampered")
    segmenter = tampered / "segmenter.onnx"
    model_bytes = bytearray(segmenter.read_bytes())
    model_bytes[len(model_bytes) // 2] ^= 0xFF
    segmenter.write_bytes(bytes(model_bytes))
    with pytest.raises(BundleError, match="segmenter.onnx.*checksum"):
        Detector.load(tampered)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            "tensorrt",
            marks=pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"),
        ),
        "no-such-backend",
    ],
)
def test_unavailable_backends_are_refused(tiny_bundle, backend):
    with pytest.raises(BackendUnavailableError):
        Detector.load(tiny_bundle, backend=backend)


def test_importing_leukoedge_does_not_import_torch():
    code = "import leukoedge, sys; assert 'torch' not in sys.modules, 'leukoedge imported torch'"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_idle_onnxruntime_threads_sleep(detector):
    """Both sessions of a Detector must not spin when idle: on a few cores a spinning idle session
    slows the busy one (measured: segmenter 29 ms per frame beside spinning sessions, 15 ms alone)."""
    for backend in (detector.segmenter, detector.classifier):
        options = backend.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# --- close() and the with-block -------------------------------------------------------------------

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "bccd_BloodImage_00002.jpg"


def test_a_closed_detector_refuses_to_run_and_its_sessions_are_freed():
    import gc
    import weakref

    from leukoedge import LeukoedgeError, default_bundle

    frame = cv2.imread(str(SAMPLE), cv2.IMREAD_COLOR)
    with Detector.load(default_bundle()) as det:
        assert det.run(frame).verdict.status in ("ok", "no_cells")
        sessions = [weakref.ref(backend.session) for backend in (det.segmenter, det.classifier)]
    assert det.closed
    gc.collect()
    assert all(session() is None for session in sessions), "close() must drop the ONNX Runtime sessions"
    with pytest.raises(BackendUnavailableError, match="closed") as refused:
        det.run(frame)
    assert isinstance(refused.value, LeukoedgeError)
    with pytest.raises(BackendUnavailableError, match="closed"):
        det.candidates(frame)
    det.close()  # a second close is harmless


def test_the_with_block_closes_the_detector_when_the_loop_fails():
    from leukoedge import default_bundle

    with pytest.raises(RuntimeError, match="the application failed"):
        with Detector.load(default_bundle()) as det:
            raise RuntimeError("the application failed")
    assert det.closed and det.segmenter is None


def test_the_gated_label_map_holds_the_kept_cells_and_nothing_else(data_root: Path) -> None:
    """white_cells' label map, on fields refined or not, enlarged or tiled: without a refiner, the candidates' map
    (BACKGROUND outside the proposals' boxes) with the rejected proposals cleared, copied box by box as a whole copy
    would be; with one, exactly the kept cells' masks painted (a rejected proposal takes no pixel of a kept cell)."""
    from leukoedge.postprocess import fragments
    from leukoedge.refine import paint_label_map

    shipped = Detector.load(Path(__file__).resolve().parents[2] / "models" / "default")
    assert shipped.gate is not None and shipped.refiner is not None
    field = cv2.imread(str(data_root / "bccd" / "images" / "BloodImage_00001.jpg"))
    taleqani = sorted((data_root / "all-taleqani" / "images").glob("*/*.jpg"))[:4]
    tiles = [cv2.imread(str(path)) for path in taleqani]
    frames = [field, cv2.resize(field, (1280, 960)), np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])]
    refiner = shipped.refiner
    rejected = 0
    for frame in frames:
        for shipped.refiner in (refiner, None):  # refined masks, then the field segmenter's
            found = shipped.candidates(frame)
            assert found.instances
            in_boxes = np.zeros(found.label_map.shape, bool)
            for x0, y0, x1, y1 in (instance.box for instance in found.instances):
                in_boxes[y0:y1, x0:x1] = True
            assert not found.label_map[~in_boxes].any()
            crops = shipped.cell_crops(frame, found.prepared, found.instances)
            keep = shipped.white_cell_probabilities(crops) >= shipped.gate_spec["threshold"]
            kept = np.flatnonzero(keep)
            keep[kept[fragments([found.instances[index] for index in kept])]] = False  # pieces of a kept cell go too
            cells, label_map, rejected_count, kept_crops = shipped.white_cells(frame, found)
            assert rejected_count == int((~keep).sum()) and len(cells) == len(kept_crops) == int(keep.sum())
            np.testing.assert_array_equal(kept_crops, crops[keep])
            if shipped.refiner is None:
                expected = found.label_map.copy()
                for instance in (instance for instance, kept in zip(found.instances, keep) if not kept):
                    x0, y0, x1, y1 = instance.box
                    expected[y0:y1, x0:x1][instance.mask] = BACKGROUND
            else:
                expected = paint_label_map(cells, frame.shape[:2])
            np.testing.assert_array_equal(label_map, expected)
            rejected += rejected_count
    assert rejected  # some proposals were cleared


def test_a_fragment_of_a_white_cell_is_left_out_like_a_rejected_proposal() -> None:
    from leukoedge import default_bundle
    from leukoedge.detector import Candidates
    from leukoedge.postprocess import CellInstance

    def cell(box: tuple[int, int, int, int]) -> CellInstance:
        x0, y0, x1, y1 = box
        mask = np.ones((y1 - y0, x1 - x0), bool)
        return CellInstance(box, mask, np.zeros_like(mask))

    large, sliver = cell((10, 10, 90, 90)), cell((70, 40, 80, 50))  # 100 px inside a 6400 px cell's box
    label_map = np.zeros((100, 100), np.uint8)
    label_map[10:90, 10:90] = 1
    detector = Detector.load(default_bundle())
    detector.gate = detector.refiner = None  # the field segmenter's proposals as they are
    cells, gated_map, left_out, crops = detector.white_cells(np.zeros((100, 100, 3), np.uint8), Candidates(None, None, [large, sliver], label_map))
    assert cells == [large] and left_out == 1 and crops is None
    assert not gated_map[40:50, 70:80].any() and gated_map[10:40, 10:90].all()


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "default"


@pytest.fixture(scope="module")
def shipped_detector() -> Detector:
    return Detector.load(SHIPPED)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"channel_order": "rgb"}, "channel_order must be one of"),
        ({"precision": "bogus"}, "unknown precision 'bogus'"),
        ({"threads": "2"}, "threads must be a whole number >= 1"),
        ({"threads": -1}, "threads must be a whole number >= 1"),
        ({"threads": True}, "threads must be a whole number >= 1"),
        ({"preprocess": "gpu"}, "unknown preprocess 'gpu'"),
    ],
)
def test_a_load_argument_it_does_not_take_is_refused_at_load_not_at_the_first_frame(arguments: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Detector.load(SHIPPED, **arguments)


def test_a_bundle_path_that_is_not_a_path_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="expected the path of a bundle folder or archive"):
        Detector.load(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"jpeg_quality": "high"}, "jpeg_quality must be a whole number 1-100"),
        ({"jpeg_quality": float("nan")}, "jpeg_quality must be a whole number 1-100"),  # passed the compression check before
        ({"jpeg_quality": 500}, "jpeg_quality must be a whole number 1-100"),
        ({"jpeg_quality": 0}, "jpeg_quality must be a whole number 1-100"),
        ({"capture_ms": float("nan")}, "capture_ms must be a finite number of ms >= 0"),  # written into the JSON as NaN before
        ({"capture_ms": float("inf")}, "capture_ms must be a finite number of ms >= 0"),
        ({"capture_ms": -1.0}, "capture_ms must be a finite number of ms >= 0"),
    ],
)
def test_a_run_argument_out_of_range_is_refused(shipped_detector: Detector, arguments: dict, message: str) -> None:
    frame = cv2.imread(str(SHIPPED.parents[1] / "samples" / "bccd_BloodImage_00002.jpg"))
    detector = shipped_detector
    with pytest.raises(InvalidArgumentError, match=message):
        detector.run(frame, **arguments)
    result = detector.run(frame, jpeg_quality=np.int64(95), capture_ms=np.float32(2.5))  # numpy numbers are numbers
    assert result.verdict.status == "ok" and json.loads(result.to_json())["timings"]["capture"] == 2.5


def test_numpy_and_zero_thread_counts_load_as_before() -> None:
    assert Detector.load(SHIPPED, threads=np.int64(1)).precisions and Detector.load(SHIPPED, threads=0).precisions  # 0: ONNX Runtime's default
