"""Detector.run on frames too small for a white cell at the bundle's scale: a "too_small" verdict,
never a flag (issue 23: 115 of 120 16x16 crops of normal BCCD fields were flagged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import Detector
from leukoedge.errors import BundleError
from leukoedge.frame import DEFAULT_MIN_JUDGED_SIDE
from leukoedge.result import STATUS_TOO_SMALL

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_BUNDLE = REPO_ROOT / "models" / "default"
FIELD = REPO_ROOT / "samples" / "bccd_BloodImage_00002.jpg"


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.load(SHIPPED_BUNDLE, threads=1)


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return cv2.imread(str(FIELD))


def crops(field: np.ndarray, side: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(side)
    tops = rng.integers(0, field.shape[0] - side, count)
    lefts = rng.integers(0, field.shape[1] - side, count)
    return [field[top : top + side, left : left + side] for top, left in zip(tops, lefts)]


@pytest.mark.parametrize("side", [16, 32, 48, DEFAULT_MIN_JUDGED_SIDE - 1])
def test_small_crops_of_a_normal_field_are_not_judged(detector: Detector, field: np.ndarray, side: int):
    for crop in crops(field, side, 8):
        result = detector.run(crop, capture_ms=1.5)
        verdict = result.verdict
        assert verdict.status == STATUS_TOO_SMALL and not verdict.judged and not verdict.flagged
        assert f"{side}x{side}" in verdict.reason
        assert result.cells == [] and result.frame_shape == (side, side)
        assert result.label_map.shape == (side, side) and not result.label_map.any()
        assert result.timings["capture"] == 1.5 and result.timings["total"] >= 0.0
        assert json.loads(result.to_json())["verdict"]["status"] == STATUS_TOO_SMALL


def test_single_cell_images_of_the_training_sets_stay_judged(detector: Detector, field: np.ndarray):
    # ALL-IDB2's low-resolution copies are 103x78 to 103x103 px, Zheng's crops 120x120.
    for height, width in ((78, 103), (103, 103), (120, 120), (DEFAULT_MIN_JUDGED_SIDE, DEFAULT_MIN_JUDGED_SIDE)):
        assert detector.run(np.ascontiguousarray(field[:height, :width])).verdict.status != STATUS_TOO_SMALL


def test_the_manifest_sets_the_minimum_and_a_wrong_one_fails_at_load(field: np.ndarray, tmp_path: Path):
    bundle = Path(shutil.copytree(SHIPPED_BUNDLE, tmp_path / "bundle", ignore=shutil.ignore_patterns("engines")))
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["limits"]["min_judged_side"] = 200
    manifest_path.write_text(json.dumps(manifest))
    assert Detector.load(bundle, threads=1).run(np.ascontiguousarray(field[:150, :300])).verdict.status == STATUS_TOO_SMALL

    manifest["limits"]["min_judged_side"] = 10**6
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="limits.min_judged_side"):
        Detector.load(bundle, threads=1)
