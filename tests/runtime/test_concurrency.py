"""One Detector shared by four threads gives exactly what it gives one thread.

Detector.run keeps no state between calls (everything per frame lives in locals); ONNX Runtime's
InferenceSession.run may be called from several threads at once, and the TensorRT backend, whose
execution context and buffers are shared, serializes its calls. So an application may share one
Detector between, say, a capture thread per camera.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from leukoedge import BackendUnavailableError, Detector, Result

THREADS = 4



@pytest.fixture(params=["onnxruntime", "tensorrt"])
def detector(request: pytest.FixtureRequest, shared_detector: Detector) -> Detector:
    if request.param == "onnxruntime":
        return shared_detector
    try:
        return Detector.load(shared_detector.bundle.root, backend=request.param)
    except BackendUnavailableError as error:
        pytest.skip(f"no {request.param} here: {error}")


def assert_same_result(actual: Result, expected: Result) -> None:
    np.testing.assert_array_equal(actual.label_map, expected.label_map)
    assert actual.verdict == expected.verdict
    assert len(actual.cells) == len(expected.cells)
    for got, want in zip(actual.cells, expected.cells):
        assert (got.box, got.label) == (want.box, want.label)
        np.testing.assert_array_equal(got.mask, want.mask)
        np.testing.assert_array_equal(got.nucleus_mask, want.nucleus_mask)
        assert got.blast_probability == want.blast_probability
        assert got.head_scores == want.head_scores


def test_four_threads_on_one_detector_match_serial_results(detector: Detector, smear_fields: list[np.ndarray]):
    serial = [detector.run(field) for field in smear_fields]
    start_together = threading.Barrier(THREADS)

    def run_all_fields(offset: int) -> list[tuple[int, Result]]:
        # Each thread starts on a different field, so different frames are in flight at the same moment.
        order = [(offset + step) % len(smear_fields) for step in range(len(smear_fields))]
        start_together.wait()
        return [(index, detector.run(smear_fields[index])) for index in order]

    with ThreadPoolExecutor(THREADS) as pool:
        per_thread = list(pool.map(run_all_fields, range(THREADS)))

    assert sum(len(results) for results in per_thread) == THREADS * len(smear_fields)
    for results in per_thread:
        for index, result in results:
            assert_same_result(result, serial[index])
