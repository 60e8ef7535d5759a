"""CUDA preprocessing against the CPU reference (cpu.prepare_frame) on real frames.

Tolerance, per element of the normalized input tensor: max |cuda - cpu| <= 0.12 and mean <= 0.005.
OpenCV's float L*a*b* conversion interpolates a lookup table (~0.5 L*a*b* units off the exact formula
the kernels use) and its uint8 bilinear resize uses fixed-point weights (one level off when
enlarging); a numpy transliteration of the kernels measured 0.033 max, 0.003 mean on these frames and
up to 0.095 max on one of 12 BCCD fields (see leukoedge/preprocess/cuda.py).
Runs where pycuda and a CUDA GPU are present; skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge.errors import BackendUnavailableError
from leukoedge.preprocess.cpu import PreprocessSpec, StainReference, prepare_frame

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pycuda") is None, reason="CUDA preprocessing needs pycuda and a CUDA GPU: pip install 'leukoedge[jetson]'")

MAX_DIFFERENCE, MEAN_DIFFERENCE = 0.12, 0.005
INPUT_SIZE = (192, 256)
SPEC = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), StainReference((73.2, 5.5, 1.5), (14.3, 12.6, 15.1)))


@pytest.fixture(scope="module")
def real_frames(data_root: Path) -> dict[str, np.ndarray]:
    """A 640x480 field (area shrink), an ALL-IDB2 thumbnail (bilinear enlargement), a PBC cell."""
    pick = {
        "bccd": next((data_root / "bccd" / "images").glob("*.jpg")),
        "all-idb2": next((data_root / "all-idb2" / "images").glob("*.jpg")),
        "pbc": next((data_root / "pbc" / "images").glob("*/*.jpg")),
    }
    return {name: cv2.imread(str(path)) for name, path in pick.items()}


def _preprocessor(spec: PreprocessSpec):
    from leukoedge.preprocess.cuda import CudaPreprocessor

    try:
        return CudaPreprocessor(spec, INPUT_SIZE)
    except BackendUnavailableError as error:
        pytest.skip(f"no usable CUDA GPU: {error}")


@pytest.mark.parametrize("spec", [SPEC, PreprocessSpec("BGR", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), None)], ids=["reinhard-rgb", "no-stain-bgr"])
def test_cuda_prepare_frame_matches_the_cpu_reference(real_frames: dict[str, np.ndarray], spec: PreprocessSpec):
    preprocessor = _preprocessor(spec)
    for name, frame in real_frames.items():
        reference = prepare_frame(frame, spec, INPUT_SIZE)
        prepared = preprocessor.prepare_frame(frame)
        assert prepared.letterbox == reference.letterbox
        difference = np.abs(prepared.tensor - reference.tensor)
        assert difference.max() <= MAX_DIFFERENCE, f"{name}: max {difference.max():.4f}"
        assert difference.mean() <= MEAN_DIFFERENCE, f"{name}: mean {difference.mean():.5f}"
        if spec.stain_reference is None:
            assert prepared.lab_statistics is None
        else:
            for gpu, cpu in zip(prepared.lab_statistics, reference.lab_statistics):
                assert np.allclose(gpu, cpu, atol=0.5), (name, gpu, cpu)


def test_a_frame_already_on_the_gpu_gives_the_same_tensor_as_a_host_frame(real_frames: dict[str, np.ndarray]):
    preprocessor = _preprocessor(SPEC)
    import pycuda.autoprimaryctx  # noqa: F401  (the GPU array below lives in the primary context, as the kernels do)
    import pycuda.gpuarray as gpuarray

    frame = real_frames["bccd"]
    from_host = preprocessor.prepare_frame(frame).tensor
    from_device = preprocessor.prepare_frame(gpuarray.to_gpu(frame)).tensor
    assert np.array_equal(from_host, from_device)
