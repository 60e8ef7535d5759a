"""validate_frame: what passes unchanged, what is refused and what the refusal says."""

from __future__ import annotations

import numpy as np
import pytest

from leukoedge.errors import BundleError, InvalidFrameError, LeukoedgeError
from leukoedge.frame import DEFAULT_MIN_JUDGED_SIDE, min_judged_side, too_small_reason, validate_frame

LIMITS = {"min_side": 16, "max_side": 256}


def _frame(height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_valid_frame_is_returned_without_a_copy():
    frame = _frame()
    assert validate_frame(frame, **LIMITS) is frame


@pytest.mark.parametrize("view", [lambda f: f[:, ::-1], lambda f: f[::2, 1::2], lambda f: f[..., ::-1]], ids=["mirrored", "strided", "bgr-to-rgb"])
def test_non_contiguous_view_is_accepted_as_a_contiguous_copy(view):
    source = view(_frame(64, 96))
    assert not source.flags.c_contiguous
    validated = validate_frame(source, **LIMITS)
    assert validated.flags.c_contiguous
    np.testing.assert_array_equal(validated, np.ascontiguousarray(source))


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (None, ["HxWx3 uint8 BGR", "got None"]),
        ([[1, 2, 3]], ["numpy.ndarray", "got list", "np.asarray"]),
        (np.zeros((48, 64, 3), np.float32), ["expected dtype uint8, got float32", "scale to 0-255 and convert with astype(np.uint8)"]),
        (np.zeros((48, 64, 3), np.uint16), ["expected dtype uint8, got uint16", "8 bits per channel"]),
        (np.zeros((48, 64), np.uint8), ["grayscale", "(48, 64)", "COLOR_GRAY2BGR"]),
        (np.zeros((48, 64, 1), np.uint8), ["single-channel", "COLOR_GRAY2BGR"]),
        (np.zeros((48, 64, 4), np.uint8), ["4 channels", "cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)"]),
        (np.zeros((48, 64, 2), np.uint8), ["2 channels"]),
        (np.zeros((2, 48, 64, 3), np.uint8), ["4-D", "one frame at a time"]),
        (np.zeros((0, 64, 3), np.uint8), ["empty", "(0, 64, 3)"]),
        (np.zeros((0,), np.float64), ["empty"]),
        (np.zeros((8, 64, 3), np.uint8), ["at least 16 px", "64x8", "never resizes silently"]),
        (np.zeros((48, 300, 3), np.uint8), ["at most 256 px", "300x48", "never resizes silently", "tile or downscale"]),
    ],
    ids=["none", "list", "float32", "uint16", "grayscale", "one-channel", "bgra", "two-channel", "batch", "empty", "empty-float", "too-small", "too-large"],
)
def test_bad_frame_is_refused_with_what_was_expected_and_what_came(frame, words):
    with pytest.raises(InvalidFrameError) as refusal:
        validate_frame(frame, **LIMITS)
    for word in words:
        assert word in str(refusal.value)


def test_refusal_names_the_qualified_type_of_foreign_objects():
    class FakeTensor:
        pass

    with pytest.raises(InvalidFrameError, match=r"got .*FakeTensor"):
        validate_frame(FakeTensor(), **LIMITS)


def test_rgb_callers_get_rgb_advice():
    with pytest.raises(InvalidFrameError, match="COLOR_RGBA2RGB"):
        validate_frame(np.zeros((48, 64, 4), np.uint8), channel_order="RGB", **LIMITS)


def test_frames_at_the_limits_pass():
    assert validate_frame(_frame(16, 256), **LIMITS).shape == (16, 256, 3)


def test_refusals_belong_to_the_one_error_hierarchy():
    with pytest.raises(LeukoedgeError):
        validate_frame(None, **LIMITS)
    assert issubclass(InvalidFrameError, ValueError)


def test_unknown_channel_order_is_a_caller_error():
    with pytest.raises(ValueError, match="channel_order"):
        validate_frame(_frame(), channel_order="HSV", **LIMITS)


def test_min_judged_side_comes_from_the_manifest_or_the_default_for_older_bundles():
    assert min_judged_side({"min_frame_side": 16, "max_frame_side": 4096, "min_judged_side": 100}) == 100
    assert min_judged_side({"min_frame_side": 16, "max_frame_side": 4096}) == DEFAULT_MIN_JUDGED_SIDE
    # an older bundle that already refuses frames smaller than the default judges all it accepts
    assert min_judged_side({"min_frame_side": 200, "max_frame_side": 4096}) == 200


@pytest.mark.parametrize("value", [0, 8, 5000, 64.0, "64", True, None], ids=["zero", "below-min-frame", "above-max-frame", "float", "text", "bool", "null"])
def test_a_wrong_min_judged_side_is_a_bundle_error_naming_the_field(value):
    with pytest.raises(BundleError, match="limits.min_judged_side"):
        min_judged_side({"min_frame_side": 16, "max_frame_side": 4096, "min_judged_side": value})


def test_too_small_reason_names_the_size_and_the_minimum():
    assert too_small_reason(_frame(64, 80), 64) == ""
    reason = too_small_reason(_frame(63, 200), 64)
    assert "200x63" in reason and "64 px" in reason
