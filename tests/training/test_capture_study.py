"""scripts/capture_study.py: each capture fault spoils a frame as it says, its first level is the frame itself, and
the three-way counts read the right outcomes."""

from __future__ import annotations

import cv2
import numpy as np


def _field() -> np.ndarray:
    frame = np.full((160, 200, 3), 215, np.uint8)
    cv2.circle(frame, (100, 80), 40, (190, 140, 165), -1)
    cv2.circle(frame, (100, 80), 20, (120, 40, 90), -1)
    return frame


def test_no_fault_is_the_frame_and_every_fault_spoils_it_as_documented(script) -> None:
    module = script("capture_study")
    frame = _field()
    for fault, levels in module.LEVELS.items():
        assert module.spoilt(frame, fault, levels[0], 80.0) is frame, fault
        for level in levels[1:]:
            spoilt = module.spoilt(frame, fault, level, 80.0)
            shape = frame.shape if fault != "scale" else (round(160 * level), round(200 * level), 3)
            assert spoilt.shape == shape and spoilt.dtype == np.uint8 and not np.array_equal(spoilt, frame), (fault, level)
    steepest = lambda image: float(np.abs(np.diff(image.astype(float), axis=1)).max())  # noqa: E731
    assert steepest(module.spoilt(frame, "defocus", 0.06, 80.0)) < steepest(module.spoilt(frame, "defocus", 0.03, 80.0)) < steepest(frame)
    assert module.spoilt(frame, "exposure", 1.6, 80.0).max() == 255 and module.spoilt(frame, "exposure", 0.5, 80.0).max() < 120
    noisy = module.spoilt(frame, "noise", 8.0, 80.0)
    assert np.array_equal(noisy, module.spoilt(frame, "noise", 8.0, 80.0))  # the same noise every rerun
    assert 6.0 < float((noisy.astype(float) - frame).std()) < 10.0
    # motion blur smears along the rows only: a step across the rows is smeared, one down the columns kept
    halves = np.full((160, 200, 3), 215, np.uint8)
    halves[80:] = 100
    assert np.array_equal(module.spoilt(halves, "motion", 0.2, 80.0), halves)
    assert steepest(module.spoilt(np.ascontiguousarray(halves.transpose(1, 0, 2)), "motion", 0.2, 80.0)) < 0.1 * 115
    unevenly = module.spoilt(frame, "illumination", 0.5, 80.0)
    assert unevenly[:, 0].mean() == np.floor(0.5 * 215) and np.array_equal(unevenly[:, -1], frame[:, -1])
    assert np.array_equal(module.spoilt(frame, "channels", 1.0, 80.0), frame[..., ::-1])


def test_the_three_ways_count_without_the_check_with_the_bundle_s_bar_and_with_the_device_s(script) -> None:
    module = script("capture_study")
    rows = [
        {"flagged": True, "flagged_with": True, "flagged_device": False},
        {"flagged": True, "flagged_with": False, "flagged_device": False},
        {"flagged": False, "flagged_with": False, "flagged_device": False},
    ]
    assert module.three_ways(rows, "flagged") == "2 / 1 / 0"
