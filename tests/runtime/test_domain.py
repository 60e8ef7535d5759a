"""The domain check: frames unlike the validated ones are not judged."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import Detector
from leukoedge.domain import COLOUR_FEATURES, THRESHOLD_MARGIN, colour_distance, failed_checks, fit_domain, median_cell_side, outside_domain

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


def _fitted(seed: int = 0, frames: int = 200) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    colour = rng.normal([70, 10, -10, 15, 5, 5], [3, 2, 2, 1, 0.5, 0.5], size=(frames, 6))
    uncertainty = rng.uniform(0.02, 0.08, frames)
    return fit_domain(colour, uncertainty, ["a"] * (frames // 2) + ["b"] * (frames - frames // 2)), colour


def test_fitted_frames_are_inside_and_a_new_stain_is_outside():
    spec, colour = _fitted()
    assert len(spec["colour_references"][0]) == len(COLOUR_FEATURES)
    inside = [not outside_domain(spec, {"colour_distance": colour_distance(spec, row), "uncertainty": 0.05}) for row in colour]
    assert np.mean(inside) >= 0.99
    new_stain = colour[0] + np.array([0, 25, 25, 0, 0, 0])
    reason = outside_domain(spec, {"colour_distance": colour_distance(spec, new_stain), "uncertainty": 0.05})
    assert "colours unlike" in reason and "leukoedge adapt" in reason
    assert "unsure" in outside_domain(spec, {"colour_distance": 0.0, "uncertainty": 0.5})
    far = colour_distance(spec, new_stain)
    assert failed_checks(spec, {"colour_distance": far, "uncertainty": 0.5}) == ["colour", "uncertainty"]
    assert failed_checks(spec, {"colour_distance": far, "uncertainty": 0.05}) == ["colour"]
    assert failed_checks(spec, {"colour_distance": 0.0, "uncertainty": 0.05}) == []


def test_fit_domain_needs_frames():
    with pytest.raises(ValueError, match="at least 2 frames"):
        fit_domain([np.zeros(6)], [0.1], ["a"])


def test_a_frame_outside_the_domain_is_not_judged_and_never_flagged():
    detector = Detector.load(REPO / "models" / "default")
    frame = cv2.imread(str(SAMPLES[0]))
    spec, _ = _fitted()
    spec["max_colour_distance"] = 0.0  # nothing is near enough: every frame is outside
    detector.domain_spec = spec
    result = detector.run(frame)
    assert result.verdict.status == "outside_domain" and not result.verdict.flagged
    assert result.verdict.domain["colour_distance"] > 0
    assert result.to_dict()["verdict"]["status"] == "outside_domain"


def test_the_smallest_cell_side_is_fitted_below_the_fitting_frames_and_frames_without_cells_are_left_out():
    rng = np.random.default_rng(0)
    colour = rng.normal([70, 10, -10, 15, 5, 5], [3, 2, 2, 1, 0.5, 0.5], size=(200, 6))
    sides = np.concatenate([rng.uniform(20, 200, 190), np.full(10, np.nan)])  # ten frames without a white cell
    spec = fit_domain(colour, rng.uniform(0.02, 0.08, 200), ["a"] * 200, cell_sides=sides)
    assert spec["min_cell_side_px"] == pytest.approx(sides[:190].min() / THRESHOLD_MARGIN)
    assert "min_cell_side_px" not in fit_domain(colour, rng.uniform(0.02, 0.08, 200), ["a"] * 200)  # nothing to fit it on


def test_cells_smaller_than_any_validated_are_outside_and_a_bundle_without_the_check_skips_it():
    spec, _ = _fitted()
    assert median_cell_side([]) is None
    assert median_cell_side([(0, 0, 10, 10), (0, 0, 20, 20), (0, 0, 40, 10)]) == 20.0  # sides 10, 20, 20
    inside = {"colour_distance": 0.0, "uncertainty": 0.05}
    assert failed_checks(spec, {**inside, "cell_side_px": 5.0}) == []  # fitted before the check: no threshold
    spec["min_cell_side_px"] = 16.0
    assert failed_checks(spec, {**inside, "cell_side_px": 15.0}) == ["cell_size"]
    assert failed_checks(spec, {**inside, "cell_side_px": 16.0}) == []
    assert failed_checks(spec, inside) == []  # no white cell: nothing to measure (the verdict says "no_cells")
    reason = outside_domain(spec, {**inside, "cell_side_px": 15.0})
    assert "smaller than any it was validated on" in reason and "higher-power objective" in reason


def test_a_frame_whose_cells_are_too_small_is_not_judged():
    detector = Detector.load(REPO / "models" / "default")
    frame = cv2.imread(str(SAMPLES[0]))
    judged = detector.run(frame)
    assert judged.cells and judged.verdict.status == "ok"
    side = judged.verdict.domain["cell_side_px"]
    assert side == pytest.approx(median_cell_side([cell.box for cell in judged.cells]))
    detector.domain_spec = {**detector.domain_spec, "min_cell_side_px": side + 1}
    result = detector.run(frame)
    assert result.verdict.status == "outside_domain" and not result.verdict.flagged
    assert "white cells smaller" in result.verdict.reason
