"""Result, Cell, Timings, verdict maths, RLE and the overlay."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from leukoedge.errors import InvalidFrameError
from leukoedge.result import (
    CYTOPLASM,
    NUCLEUS,
    Cell,
    Result,
    Timings,
    Verdict,
    draw_overlay,
    flagged_subtype,
    make_verdict,
    rle_decode,
    rle_encode,
    verdict_summary,
)

FRAME_SHAPE = (120, 160)


def _cell(cell_id: int, box: tuple[int, int, int, int], blast_probability: float) -> Cell:
    """A round cell filling its box with a round nucleus in the middle; numpy scalars on purpose."""
    x0, y0, x1, y1 = box
    rows, cols = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
    centre_y, centre_x = (y1 - y0 - 1) / 2, (x1 - x0 - 1) / 2
    distance = np.hypot(rows - centre_y, cols - centre_x)
    label = "blast" if blast_probability >= 0.5 else "normal"
    scores = {"normal": np.float32(1 - blast_probability), "blast": np.float32(blast_probability)}
    return Cell(
        id=np.int64(cell_id),
        box=box,
        mask=distance <= min(centre_x, centre_y) + 0.5,
        nucleus_mask=distance <= min(centre_x, centre_y) / 2,
        label=label,
        scores=scores,
        blast_probability=np.float32(blast_probability),
        head_scores={"blast": scores, "wbc_type": {"lymphocyte": np.float64(0.7), "monocyte": np.float64(0.3)}},
    )


def _result(cells: list[Cell]) -> Result:
    label_map = np.zeros(FRAME_SHAPE, np.uint8)
    for cell in cells:
        x0, y0, x1, y1 = cell.box
        local = label_map[y0:y1, x0:x1]
        local[cell.mask] = CYTOPLASM
        local[cell.nucleus_mask] = NUCLEUS
    timings = Timings(capture_ms=np.float64(3.5), preprocess_ms=1.0, segment_ms=5.0, postprocess_ms=0.5, classify_ms=2.0, total_ms=9.0)
    return Result(
        label_map=label_map,
        cells=cells,
        verdict=make_verdict(cells, blast_threshold=0.5, flag_fraction=0.2),
        timings=timings.as_dict(),
        frame_shape=FRAME_SHAPE,
        bundle_name="leukoedge-test",
        model_version="0.0.1",
    )


@given(arrays(np.bool_, st.tuples(st.integers(0, 24), st.integers(0, 24))))
def test_rle_round_trip_is_exact(mask):
    rle = rle_encode(mask)
    assert rle["size"] == list(mask.shape)
    assert sum(rle["counts"]) == mask.size
    decoded = rle_decode(json.loads(json.dumps(rle)))
    assert decoded.dtype == np.bool_
    np.testing.assert_array_equal(decoded, mask)


def test_rle_is_row_major_and_starts_with_background():
    assert rle_encode(np.array([[0, 1], [1, 1]], bool))["counts"] == [1, 3]
    assert rle_encode(np.array([[1, 0, 0], [0, 1, 1]], bool))["counts"] == [0, 1, 3, 2]


def test_rle_decode_refuses_counts_that_do_not_fill_the_size():
    with pytest.raises(ValueError, match="sum to 3"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})


def test_cell_areas_and_mask_shape_check():
    cell = _cell(1, (10, 20, 30, 44), 0.9)
    assert cell.area_px == int(cell.mask.sum()) > cell.nucleus_area_px == int(cell.nucleus_mask.sum()) > 0
    with pytest.raises(ValueError, match="box's shape"):
        Cell(2, (0, 0, 5, 5), np.ones((5, 6), bool), np.ones((5, 5), bool), "normal", {}, 0.1, {})


def test_cell_to_dict_with_masks_round_trips_through_json():
    cell = _cell(7, (10, 20, 30, 44), 0.93)
    record = json.loads(json.dumps(cell.to_dict(include_masks=True)))
    assert record["id"] == 7 and record["box"] == [10, 20, 30, 44]
    assert record["area_px"] == cell.area_px and record["nucleus_area_px"] == cell.nucleus_area_px
    assert record["label"] == "blast"
    assert record["blast_probability"] == pytest.approx(0.93)
    assert record["head_scores"]["wbc_type"] == {"lymphocyte": 0.7, "monocyte": 0.3}
    np.testing.assert_array_equal(rle_decode(record["mask"]), cell.mask)
    np.testing.assert_array_equal(rle_decode(record["nucleus_mask"]), cell.nucleus_mask)
    assert "mask" not in cell.to_dict()


def test_the_classifier_box_is_where_the_cell_was_found_when_refinement_moved_it():
    refined = Cell(1, (12, 10, 30, 28), np.ones((18, 18), bool), np.zeros((18, 18), bool), "normal", {}, 0.1, {}, found_box=(10, 9, 32, 30))
    assert refined.classifier_box == (10, 9, 32, 30) and refined.to_dict()["classifier_box"] == [10, 9, 32, 30]
    unrefined = Cell(2, (0, 0, 5, 5), np.ones((5, 5), bool), np.ones((5, 5), bool), "normal", {}, 0.1, {})
    assert unrefined.classifier_box == (0, 0, 5, 5) and unrefined.to_dict()["classifier_box"] == [0, 0, 5, 5]


def test_timings_include_capture_only_when_measured():
    assert list(Timings().as_dict()) == ["preprocess", "segment", "postprocess", "refine", "gate", "check", "classify", "total"]
    assert Timings(capture_ms=2.0, total_ms=9.0).as_dict()["capture"] == 2.0


def test_verdict_with_no_cells_is_not_flagged_even_at_zero_flag_fraction():
    verdict = make_verdict([], blast_threshold=0.5, flag_fraction=0.0)
    assert verdict.to_dict() == {
        "cell_count": 0,
        "blast_count": 0,
        "blast_fraction": 0.0,
        "flagged": False,
        "blast_threshold": 0.5,
        "flag_fraction": 0.0,
        "subtype": None,
        "subtype_scores": {},
        "status": "no_cells",
        "reason": "no white cell found in the frame",
        "non_wbc_count": 0,
        "domain": {},
        "min_blast_count": 1,
    }
    assert not verdict.judged


def test_verdict_refuses_a_flag_on_a_frame_it_did_not_judge():
    with pytest.raises(ValueError, match="cannot be flagged"):
        Verdict(1, 1, 1.0, True, 0.5, 0.2, None, {}, status="outside_domain")
    refused = Verdict.not_judged("too_small", "12x9 px frame", blast_threshold=0.5, flag_fraction=0.2)
    assert (refused.flagged, refused.cell_count, refused.judged) == (False, 0, False)
    assert "NOT JUDGED (too_small)" in verdict_summary(refused)
    with pytest.raises(ValueError, match="status"):
        Verdict.not_judged("maybe", "", 0.5, 0.2)


def test_dict_style_verdict_access_still_works_with_a_deprecation_warning():
    verdict = make_verdict([], blast_threshold=0.5, flag_fraction=0.2)
    with pytest.warns(DeprecationWarning, match="verdict.flagged"):
        assert verdict["flagged"] is False


def test_verdict_counts_blasts_at_the_threshold_and_flags_at_the_fraction():
    cells = [_cell(index, (0, 0, 10, 10), probability) for index, probability in enumerate([0.5, 0.49, 0.1, 0.2, 0.3])]
    verdict = make_verdict(cells, blast_threshold=0.5, flag_fraction=0.2)
    assert (verdict.cell_count, verdict.blast_count) == (5, 1)
    assert verdict.blast_fraction == pytest.approx(0.2)
    assert verdict.flagged is True
    assert make_verdict(cells, blast_threshold=0.5, flag_fraction=0.21).flagged is False
    assert make_verdict(cells, blast_threshold=0.05, flag_fraction=0.5).blast_count == 5


def test_a_lone_blast_does_not_flag_a_frame_where_the_bundle_asks_for_more():
    # One white cell, called a blast: 100 % blasts, but one cell is not enough evidence at min_blast_count 2.
    lone = [_cell(1, (0, 0, 10, 10), 0.9)]
    verdict = make_verdict(lone, blast_threshold=0.5, flag_fraction=0.7, min_blast_count=2)
    assert (verdict.blast_count, verdict.blast_fraction, verdict.flagged) == (1, 1.0, False)
    assert verdict.flagging_fraction == 0.0  # what the flag reads, and what the flag fraction is chosen on
    assert "not flagged: a frame is flagged from 2 blasts" in verdict_summary(verdict)
    assert make_verdict(lone, blast_threshold=0.5, flag_fraction=0.7).flagged is True  # bundles before 0.5.0: one is enough
    pair = lone + [_cell(2, (20, 0, 30, 10), 0.8)]
    flagged = make_verdict(pair, blast_threshold=0.5, flag_fraction=0.7, min_blast_count=2)
    assert flagged.flagged is True and flagged.flagging_fraction == 1.0
    assert verdict_summary(flagged).endswith("FLAGGED")
    assert json.loads(json.dumps(flagged.to_dict()))["min_blast_count"] == 2


def _with_subtype(cell: Cell, scores: dict[str, float]) -> Cell:
    cell.head_scores = {**cell.head_scores, "subtype": scores}
    return cell


def test_frame_subtype_is_the_mean_over_cells_not_a_vote():
    # Two cells lean Pre a little, one is clearly Pro: a vote says Pre, the mean says Pro.
    cells = [
        _with_subtype(_cell(1, (0, 0, 10, 10), 0.9), {"Benign": 0.0, "Early": 0.0, "Pre": 0.55, "Pro": 0.45}),
        _with_subtype(_cell(2, (10, 0, 20, 10), 0.9), {"Benign": 0.0, "Early": 0.0, "Pre": 0.55, "Pro": 0.45}),
        _with_subtype(_cell(3, (20, 0, 30, 10), 0.9), {"Benign": 0.0, "Early": 0.0, "Pre": 0.05, "Pro": 0.95}),
    ]
    verdict = make_verdict(cells, blast_threshold=0.5, flag_fraction=0.2)
    assert verdict.subtype == "Pro"
    assert verdict.subtype_scores == pytest.approx({"Benign": 0.0, "Early": 0.0, "Pre": 1.15 / 3, "Pro": 1.85 / 3})
    json.dumps(verdict.to_dict())


def test_frame_without_a_subtype_head_has_no_subtype():
    verdict = make_verdict([_cell(1, (0, 0, 10, 10), 0.9)], blast_threshold=0.5, flag_fraction=0.2)
    assert (verdict.subtype, verdict.subtype_scores) == (None, {})


def test_result_to_dict_is_json_serializable_and_round_trips():
    result = _result([_cell(1, (10, 20, 40, 50), 0.93), _cell(2, (90, 30, 130, 76), 0.12)])
    record = result.to_dict(include_masks=True)
    assert json.loads(json.dumps(record)) == record
    assert record["frame_shape"] == list(FRAME_SHAPE)
    assert record["verdict"]["blast_count"] == 1 and record["verdict"]["flagged"] is True
    assert record["timings"]["capture"] == 3.5
    assert [cell["label"] for cell in record["cells"]] == ["blast", "normal"]
    np.testing.assert_array_equal(rle_decode(record["label_map"]["nucleus"]), result.label_map == NUCLEUS)
    np.testing.assert_array_equal(rle_decode(record["label_map"]["cytoplasm"]), result.label_map == CYTOPLASM)
    assert "label_map" not in result.to_dict()
    assert json.loads(result.to_json(indent=2)) == result.to_dict()


def test_overlay_tints_cells_draws_boxes_and_leaves_the_input_alone():
    blast, normal = _cell(1, (20, 40, 60, 84), 0.93), _cell(2, (100, 50, 140, 96), 0.12)
    result = _result([blast, normal])
    frame = np.full(FRAME_SHAPE + (3,), 200, np.uint8)
    untouched = frame.copy()
    overlay = draw_overlay(frame, result)
    assert overlay.shape == frame.shape and overlay.dtype == np.uint8
    np.testing.assert_array_equal(frame, untouched)
    changed = np.any(overlay != frame, axis=2)
    assert changed[result.label_map == NUCLEUS].all() and changed[result.label_map == CYTOPLASM].all()
    # Box edges in the label's colour (BGR): blast red, normal green.
    assert tuple(overlay[62, 20]) == (0, 0, 255)
    assert tuple(overlay[73, 100]) == (0, 200, 0)
    # Far from cells, captions and the verdict line the frame is as it came.
    assert not changed[100:, :15].any()


def test_subtype_is_shown_on_flagged_frames_only():
    pro = {"Benign": 0.01, "Early": 0.02, "Pre": 0.1, "Pro": 0.87}
    cells = [_with_subtype(_cell(1, (20, 40, 60, 84), 0.93), pro), _with_subtype(_cell(2, (100, 50, 140, 96), 0.12), pro)]
    flagged = make_verdict(cells, blast_threshold=0.5, flag_fraction=0.5)
    assert flagged_subtype(flagged) == "B-ALL subtype Pro, p 0.87"
    assert flagged_subtype(make_verdict(cells, blast_threshold=0.5, flag_fraction=0.6)) == ""  # same cells, not flagged
    frame = np.full(FRAME_SHAPE + (3,), 200, np.uint8)
    with_subtype = draw_overlay(frame, Result(**{**_result(cells).__dict__, "verdict": flagged}))
    without = draw_overlay(frame, Result(**{**_result(cells).__dict__, "verdict": dataclasses.replace(flagged, subtype=None)}))
    differs = np.flatnonzero(np.any(with_subtype != without, axis=(1, 2)))
    assert differs.size and differs.min() > 5  # a second line below the verdict line, nothing else moved


def test_overlay_refuses_a_frame_of_another_size():
    with pytest.raises(InvalidFrameError, match="frame the result came from"):
        draw_overlay(np.zeros((60, 80, 3), np.uint8), _result([]))


def test_result_draws_itself_as_draw_overlay_does():
    result = _result([_cell(1, (20, 40, 60, 84), 0.93)])
    frame = np.full(FRAME_SHAPE + (3,), 200, np.uint8)
    np.testing.assert_array_equal(result.draw(frame), draw_overlay(frame, result))
    with pytest.raises(InvalidFrameError, match="frame the result came from"):
        result.draw(np.zeros((60, 80, 3), np.uint8))


def test_the_overlay_of_a_frame_not_judged_shows_its_status_in_yellow_not_a_count():
    frame = np.full(FRAME_SHAPE + (3,), 200, np.uint8)
    refused = Verdict.not_judged("outside_domain", "colours unlike the validated stains", 0.5, 0.2)
    judged = _result([])
    overlay = Result(**{**judged.__dict__, "verdict": refused}).draw(frame)
    text_rows = np.any(overlay != frame, axis=(1, 2))
    assert np.any(np.all(overlay[text_rows] == (0, 215, 255), axis=-1))  # the status and reason lines
    assert not np.array_equal(overlay, judged.draw(frame))


def test_the_package_exports_what_an_integrator_uses():
    import leukoedge

    for name in ("Detector", "Result", "Verdict", "open_source", "ThreadedReader", "draw_overlay", "default_bundle", "LeukoedgeError"):
        assert name in leukoedge.__all__ and hasattr(leukoedge, name), name
    assert leukoedge.default_bundle().name == "default" or "LEUKOEDGE_BUNDLE" in __import__("os").environ


def test_no_code_or_document_uses_the_deprecated_dict_access_of_a_result_verdict():
    import re
    from pathlib import Path

    repository = Path(__file__).resolve().parents[2]
    files = [*repository.glob("leukoedge/**/*.py"), *repository.glob("training/**/*.py"), *repository.glob("calibration/*.py")]
    files += [*repository.glob("export/*.py"), *repository.glob("examples/*.py"), *repository.glob("docs/*.md"), repository / "README.md"]
    uses = [f"{path.name}: {line.strip()}" for path in files for line in path.read_text(encoding="utf-8").splitlines() if re.search(r"\.verdict\[", line)]
    assert not uses, uses
