"""Detector.run under hostile input: every input gives a valid Result or InvalidFrameError, nothing else.

Inputs (hypothesis): every numpy dtype family in either byte order (bool, signed and unsigned
integers, floats with NaN and inf, complex, datetime, strings, object), 0-D to 4-D shapes with
empty sides and 0 to 5 channels, every memory layout (C, Fortran, negative strides, gaps, zero
strides, read-only, channels-first views, masked arrays, subclasses), noise, constant and real
smear content, frames of billions of pixels that exist only as strided views, and things that are
not arrays at all. Whether a frame must be accepted is decided here independently of frame.py, so
a valid frame refused is a failure too.

The default run tries a few hundred inputs; `pytest -m slow tests/runtime/test_fuzz_detector.py`
tries 10,000.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from leukoedge import Detector, InvalidFrameError, Result
from leukoedge.result import BACKGROUND, CYTOPLASM, NUCLEUS

HUGE_BYTES = 64 << 20  # refusing an input this large (as a dense array) must not touch its pixels
REFUSAL_ALLOCATION_LIMIT = 1 << 20  # what refusing a huge view may allocate: messages, not pixels
LAYOUTS = ("C", "fortran", "reversed", "gaps", "channels-first", "zero-strides", "read-only", "masked", "subclass")
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)


class FrameSubclass(np.ndarray):
    """An ndarray subclass, as some camera SDKs hand out."""


class ArrayInterfaceImage:
    """Exposes __array_interface__ the way PIL.Image does: an image, but not an ndarray."""

    def __init__(self, array: np.ndarray):
        self._array = array
        self.__array_interface__ = array.__array_interface__


class ArrayConvertible:
    """Converts with __array__ the way torch.Tensor and cupy arrays do: not an ndarray either."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._array


@pytest.fixture(scope="module")
def smear_field(request: pytest.FixtureRequest) -> np.ndarray | None:
    """One real 640x480 BCCD field to crop frames from; None (noise and constants only) without the data."""
    try:
        data_root: Path = request.getfixturevalue("data_root")
    except pytest.skip.Exception:
        return None
    paths = sorted((data_root / "bccd" / "images").glob("*.jpg"))
    return cv2.imread(str(paths[0])) if paths else None


# --- strategies ----------------------------------------------------------------------------------

OTHER_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(max_len=4),
    hnp.unicode_string_dtypes(max_len=4),
    st.sampled_from([np.dtype(np.longdouble), np.dtype(np.clongdouble), np.dtype(object)]),
)
OBJECT_ELEMENTS = st.one_of(st.none(), st.integers(0, 255), st.floats(), st.text(max_size=3), st.binary(max_size=3))
SIDES = st.integers(0, 120)
FRAME_SHAPES = st.tuples(st.integers(0, 160), st.integers(0, 160), st.just(3))
LIMIT_SHAPES = st.one_of(  # thin strips around the 4096 px limit: extreme aspect ratios, just inside and just outside
    st.tuples(st.integers(14, 18), st.integers(4094, 4098), st.just(3)),
    st.tuples(st.integers(4094, 4098), st.integers(14, 18), st.just(3)),
)
SHAPES = st.one_of(
    st.tuples(SIDES, SIDES, st.sampled_from([0, 1, 2, 3, 3, 3, 4, 5])),  # HxWxC, mostly 3 channels
    st.tuples(SIDES, SIDES),  # grey
    st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 40), st.sampled_from([1, 3, 4])),  # a batch
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),  # anything small, 0-D included
)


@st.composite
def smear_crops(draw: st.DrawFn, field: np.ndarray) -> np.ndarray:
    """A region of a real field: a view with the field's row stride, as a camera ROI delivers."""
    height = draw(st.integers(1, field.shape[0]))
    width = draw(st.integers(1, field.shape[1]))
    top = draw(st.integers(0, field.shape[0] - height))
    left = draw(st.integers(0, field.shape[1] - width))
    return field[top : top + height, left : left + width]


def uint8_arrays(field: np.ndarray | None) -> st.SearchStrategy[np.ndarray]:
    """The one accepted dtype, mostly as HxWx3 frames: noise, constants (hypothesis fills) and real smears."""
    drawn = [hnp.arrays(np.uint8, FRAME_SHAPES), hnp.arrays(np.uint8, SHAPES), hnp.arrays(np.uint8, LIMIT_SHAPES)]
    return st.one_of(*drawn) if field is None else st.one_of(*drawn, smear_crops(field))


def other_arrays() -> st.SearchStrategy[np.ndarray]:
    """Any other dtype, with its extreme values (NaN, inf, min and max integers, NaT)."""
    return OTHER_DTYPES.flatmap(
        lambda dtype: hnp.arrays(dtype, SHAPES, elements=OBJECT_ELEMENTS if dtype == np.dtype(object) else None)
    )


def lay_out(array: np.ndarray, layout: str) -> np.ndarray:
    """The same (or, for zero strides, a broadcast) image in another memory layout or array type."""
    if array.ndim == 0 or layout == "C":
        return array
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "reversed":
        return array[(slice(None, None, -1),) * array.ndim]
    if layout == "gaps":
        padded = np.zeros(tuple(2 * side + 1 for side in array.shape), array.dtype)
        view = padded[(slice(1, None, 2),) * array.ndim]
        view[...] = array
        return view
    if layout == "channels-first":  # stored planar (CxHxW), viewed as HxWxC
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(array, -1, 0)), 0, -1)
    if layout == "zero-strides":  # one pixel repeated over the whole frame, as np.broadcast_to makes
        if array.size == 0:
            return array
        return np.broadcast_to(array[(slice(0, 1),) * (array.ndim - 1)], array.shape)
    if layout == "read-only":
        frozen = array.copy()
        frozen.flags.writeable = False
        return frozen
    if layout == "masked":
        return np.ma.masked_array(array, mask=np.zeros(array.shape, bool))
    return array.view(FrameSubclass)


@st.composite
def huge_views(draw: st.DrawFn) -> np.ndarray:
    """Billions of pixels in a few bytes: zero-stride views made with as_strided or broadcast_to."""
    big = st.integers(8192, 1 << 20)
    shape = draw(
        st.one_of(
            st.tuples(big, st.integers(4096, 1 << 20), st.just(3)),  # too tall
            st.tuples(st.integers(4096, 1 << 20), big, st.just(3)),  # too wide
            st.tuples(big, big),  # grey
            st.tuples(st.integers(4, 1 << 10), st.integers(4096, 1 << 16), st.integers(4096, 1 << 16), st.just(3)),  # a batch
            st.tuples(st.integers(16, 4096), st.integers(16, 4096), st.integers(1 << 20, 1 << 24)),  # absurd channel count
            st.tuples(st.integers(1 << 26, 1 << 34)),  # a flat buffer
            # numpy refuses views of 2**63 bytes or more, so the leading side stays below 2**10 here
            st.tuples(st.integers(1, 1 << 10), big, big, st.just(3)),
        )
    )
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.float64, np.bool_, np.uint16]))
    pixel = np.zeros((1,) * len(shape), dtype)
    if draw(st.booleans()):
        return np.broadcast_to(pixel, shape)
    return np.lib.stride_tricks.as_strided(pixel, shape=shape, strides=(0,) * len(shape))


def non_arrays() -> st.SearchStrategy[Any]:
    """Inputs that are not ndarrays, including image-like ones that would convert with np.asarray."""
    small_frames = hnp.arrays(np.uint8, st.tuples(st.integers(16, 24), st.integers(16, 24), st.just(3)))
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.complex_numbers(),
        st.text(max_size=8),
        st.binary(max_size=64),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
        small_frames.map(lambda frame: frame.tolist()),
        small_frames.map(lambda frame: tuple(map(tuple, frame.tolist()))),
        small_frames.map(lambda frame: frame.tobytes()),
        small_frames.map(lambda frame: bytearray(frame.tobytes())),
        small_frames.map(memoryview),
        small_frames.map(ArrayInterfaceImage),
        small_frames.map(ArrayConvertible),
    )


# Half uint8 arrays, so that about a third of all inputs are valid frames that reach the models.
# (st.one_of flattens nested one_of into equally likely leaves, which would drown them.)
KINDS = ("uint8 array",) * 4 + ("other dtype",) * 2 + ("huge view", "not an array")


@st.composite
def any_input(draw: st.DrawFn, field: np.ndarray | None) -> Any:
    kind = draw(st.sampled_from(KINDS))
    if kind == "huge view":
        return draw(huge_views())
    if kind == "not an array":
        return draw(non_arrays())
    array = draw(uint8_arrays(field) if kind == "uint8 array" else other_arrays())
    return lay_out(array, draw(st.sampled_from(LAYOUTS)))


# --- the property --------------------------------------------------------------------------------


def must_accept(frame: Any, limits: dict[str, int]) -> bool:
    """The documented contract, written independently of frame.py: HxWx3 uint8 within the side limits."""
    return (
        isinstance(frame, np.ndarray)
        and frame.dtype == np.uint8
        and frame.ndim == 3
        and frame.shape[2] == 3
        and min(frame.shape[:2]) >= limits["min_frame_side"]
        and max(frame.shape[:2]) <= limits["max_frame_side"]
    )


def check_result(result: Result, height: int, width: int, verdict_spec: dict[str, float]) -> None:
    assert isinstance(result, Result)
    assert result.frame_shape == (height, width)
    assert result.label_map.shape == (height, width) and result.label_map.dtype == np.uint8
    assert set(np.unique(result.label_map).tolist()) <= {BACKGROUND, CYTOPLASM, NUCLEUS}
    assert [cell.id for cell in result.cells] == list(range(1, len(result.cells) + 1))
    for cell in result.cells:
        x0, y0, x1, y1 = cell.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, f"box {cell.box} outside the {width}x{height} frame"
        assert cell.mask.shape == (y1 - y0, x1 - x0) and cell.mask.any()
        assert not (cell.nucleus_mask & ~cell.mask).any(), "nucleus outside its cell"
        assert (result.label_map[y0:y1, x0:x1][cell.mask] != BACKGROUND).all(), "cell pixels labelled background"
        scores = [cell.blast_probability, *(p for head in cell.head_scores.values() for p in head.values())]
        assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in scores)
    threshold, flag_fraction = verdict_spec["blast_threshold"], verdict_spec["flag_fraction"]
    blasts = sum(cell.blast_probability >= threshold for cell in result.cells)
    verdict = result.verdict
    assert verdict.cell_count == len(result.cells)
    assert verdict.blast_count == blasts
    assert verdict.blast_fraction == (blasts / len(result.cells) if result.cells else 0.0)
    assert verdict.flagged == (bool(result.cells) and verdict.blast_fraction >= flag_fraction)
    assert all(math.isfinite(ms) and ms >= 0.0 for ms in result.timings.values())
    assert json.loads(result.to_json())["verdict"] == verdict.to_dict()


def dense_bytes(frame: np.ndarray) -> int:
    return math.prod(frame.shape) * frame.itemsize


def check_run(detector: Detector, frame: Any) -> str:
    """Detector.run gives a valid Result exactly for valid frames, InvalidFrameError for all else,
    never changes the caller's array, and refuses huge views before allocating their pixels.
    Returns what happened, for hypothesis' statistics."""
    if isinstance(frame, np.ndarray) and dense_bytes(frame) >= HUGE_BYTES and not must_accept(frame, detector.limits):
        tracemalloc.start()
        try:
            with pytest.raises(InvalidFrameError):
                detector.run(frame)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < REFUSAL_ALLOCATION_LIMIT, f"refusing a {frame.shape} view allocated {peak} bytes"
        return "huge view refused"
    before = frame.copy() if isinstance(frame, np.ndarray) and frame.dtype != object else None
    if must_accept(frame, detector.limits):
        result = detector.run(frame)
        check_result(result, frame.shape[0], frame.shape[1], detector.verdict_spec)
        outcome = "accepted, with cells" if result.cells else "accepted, no cells"
    else:
        with pytest.raises(InvalidFrameError) as refusal:
            detector.run(frame)
        assert "expected" in str(refusal.value)
        outcome = "refused"
    if before is not None:
        assert before.tobytes() == frame.tobytes(), "Detector.run changed the caller's frame"
    return outcome


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(data=st.data())
def test_any_input_gives_a_result_or_invalid_frame_error(shared_detector: Detector, smear_field: np.ndarray | None, data: st.DataObject):
    event(check_run(shared_detector, data.draw(any_input(smear_field), label="frame")))


@pytest.mark.slow
@settings(max_examples=10_000, **FUZZ_SETTINGS)
@given(data=st.data())
def test_any_input_long_run(shared_detector: Detector, smear_field: np.ndarray | None, data: st.DataObject):
    event(check_run(shared_detector, data.draw(any_input(smear_field), label="frame")))


@pytest.mark.parametrize(
    "frame",
    [
        np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (1 << 20, 1 << 20, 3)),
        np.lib.stride_tricks.as_strided(np.zeros(1, np.float64), shape=(100_000, 100_000, 3), strides=(0, 0, 0)),
        np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (480, 640, 1 << 24)),
        np.broadcast_to(np.zeros(1, np.uint8), (1 << 34,)),
    ],
    ids=["uint8-1M-sides", "float64-100k-sides", "16M-channels", "16-GiB-flat"],
)
def test_huge_views_are_refused_before_any_pixel_is_allocated(shared_detector: Detector, frame: np.ndarray):
    assert check_run(shared_detector, frame) == "huge view refused"

