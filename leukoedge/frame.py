"""The gate every frame passes before any work: HxWx3 uint8, within the bundle's side limits.

Refusals raise InvalidFrameError saying what was expected, what came, and how to fix it; the
runtime never converts or resizes a frame behind the caller's back. A valid frame smaller than
limits.min_judged_side is run by nobody: Detector.run answers it with a "too_small" verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leukoedge.errors import BundleError, InvalidArgumentError, InvalidFrameError

CHANNEL_ORDERS = ("BGR", "RGB")


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_channel_order(channel_order: str) -> None:
    """InvalidArgumentError unless channel_order is one of CHANNEL_ORDERS."""
    if channel_order not in CHANNEL_ORDERS:
        raise InvalidArgumentError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")


def validate_frame(frame: Any, *, min_side: int, max_side: int, channel_order: str = "BGR") -> np.ndarray:
    """The frame as a C-contiguous HxWx3 uint8 array (the same object when it already is one)."""
    check_channel_order(channel_order)
    expected = f"an HxWx3 uint8 {channel_order} image (numpy.ndarray)"
    if frame is None:
        raise InvalidFrameError(f"expected {expected}, got None; a camera read that failed returns None, check its ok flag")
    if not isinstance(frame, np.ndarray):
        raise InvalidFrameError(f"expected {expected}, got {_type_name(frame)}; convert it with np.asarray(...)")
    if frame.size == 0:
        raise InvalidFrameError(f"expected {expected}, got an empty array of shape {frame.shape}")
    if frame.dtype != np.uint8:
        hint = (
            "scale to 0-255 and convert with astype(np.uint8)"
            if np.issubdtype(frame.dtype, np.floating)
            else "convert it to 8 bits per channel"
        )
        raise InvalidFrameError(f"expected dtype uint8, got {frame.dtype}; {hint}")
    _check_shape(frame, expected, channel_order)
    height, width = frame.shape[:2]
    if min(height, width) < min_side:
        raise InvalidFrameError(
            f"expected frame sides of at least {min_side} px, got {width}x{height}; "
            "leukoedge never resizes silently: pass a larger field or upscale the frame yourself"
        )
    if max(height, width) > max_side:
        raise InvalidFrameError(
            f"expected frame sides of at most {max_side} px, got {width}x{height}; "
            "leukoedge never resizes silently: tile or downscale the frame yourself"
        )
    return np.ascontiguousarray(frame)


def _check_shape(frame: np.ndarray, expected: str, channel_order: str) -> None:
    if frame.ndim == 2:
        raise InvalidFrameError(
            f"expected {expected}, got a grayscale HxW array of shape {frame.shape}; "
            f"convert with cv2.cvtColor(frame, cv2.COLOR_GRAY2{channel_order})"
        )
    if frame.ndim != 3:
        raise InvalidFrameError(f"expected {expected}, got a {frame.ndim}-D array of shape {frame.shape}; pass one frame at a time")
    channels = frame.shape[2]
    if channels == 1:
        raise InvalidFrameError(
            f"expected {expected}, got a single-channel array of shape {frame.shape}; "
            f"convert with cv2.cvtColor(frame, cv2.COLOR_GRAY2{channel_order})"
        )
    if channels == 4:
        raise InvalidFrameError(
            f"expected {expected}, got 4 channels ({channel_order}A?) of shape {frame.shape}; "
            f"convert with cv2.cvtColor(frame, cv2.COLOR_{channel_order}A2{channel_order})"
        )
    if channels != 3:
        raise InvalidFrameError(f"expected {expected}, got {channels} channels, shape {frame.shape}")


# The smallest frame side judged, for bundles whose manifest has no limits.min_judged_side: a white
# cell at the smallest scale the models learnt (ALL-IDB2's 0.4x copies: cell boxes 52 px median,
# 32-81 px from the 5th to the 95th percentile) fits in 64 px, and those 103x78 to 103x103 px
# single-cell images stay judged. Below it the models' answer is noise: square crops of normal BCCD
# and PBC fields were flagged 85 % at 16 px, 62 % at 32, 71 % at 48 (scripts/small_frames.py, shipped
# bundle before its cell gate). Larger crops were still flagged 66-73 % up to 128 px: size alone does
# not make a piece of a field judgeable, which is the domain check's and the cell gate's part.
DEFAULT_MIN_JUDGED_SIDE = 64


def min_judged_side(limits: dict[str, Any]) -> int:
    """limits.min_judged_side, or DEFAULT_MIN_JUDGED_SIDE for bundles made before it existed.

    Raises BundleError when the manifest's value is not an integer between min_frame_side and
    max_frame_side, so a wrong bundle fails at load time, not at its first frame.
    """
    low, high = limits["min_frame_side"], limits["max_frame_side"]
    side = limits.get("min_judged_side", min(max(DEFAULT_MIN_JUDGED_SIDE, low), high))
    if isinstance(side, bool) or not isinstance(side, int) or not low <= side <= high:
        raise BundleError(
            f"manifest.json is invalid: limits.min_judged_side must be an integer from limits.min_frame_side ({low}) "
            f"to limits.max_frame_side ({high}), got {side!r}"
        )
    return side


def too_small_reason(frame: np.ndarray, min_side: int) -> str:
    """Why a validated frame is too small for a white cell at the bundle's scale, or "" when it is not."""
    height, width = frame.shape[:2]
    if min(height, width) >= min_side:
        return ""
    return (
        f"a {width}x{height} frame cannot hold a white cell at this bundle's scale (sides of at least "
        f"{min_side} px are judged); pass the whole field, not a piece of it"
    )
