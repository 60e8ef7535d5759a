"""CUDA preprocessing (CudaPreprocessor, kernels.cu) against the CPU reference (cpu.prepare_frame) on real frames.

Each test runs twice: "emulated", the real kernel source compiled as host C++ behind stand-in pycuda
modules (tests/runtime/cuda_emulator; runs in CI, needs g++ and `pip install -e '.[cuda-ci]'` for
NVRTC), and "gpu", real pycuda on a CUDA GPU (skipped where there is none).

Tolerance, per element of the normalized input tensor: max |cuda - cpu| <= 0.12 and mean <= 0.01, as
leukoedge/preprocess/cuda.py states and explains (OpenCV's L*a*b* lookup table and fixed-point
bilinear weights, multiplied by the Reinhard gains; the pale enlarged piece below sets the mean bound).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cuda_emulator
import cv2
import numpy as np
import pytest

from leukoedge.errors import BackendUnavailableError, InvalidFrameError
from leukoedge.preprocess.cpu import PreprocessSpec, StainReference, prepare_frame

MAX_DIFFERENCE, MEAN_DIFFERENCE = 0.12, 0.01
INPUT_SIZE = (192, 256)
SPEC = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), StainReference((73.2, 5.5, 1.5), (14.3, 12.6, 15.1)))
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture(params=["emulated", "gpu"])
def cuda_runtime(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "gpu" and importlib.util.find_spec("pycuda") is None:
        pytest.skip("CUDA preprocessing on a GPU needs pycuda and a CUDA GPU: pip install 'leukoedge[jetson]'")
    if request.param == "emulated":
        cuda_emulator.install(monkeypatch, cuda_emulator.build(cuda_emulator.library_folder(request)))
    return request.param


def sample_frames() -> dict[str, np.ndarray]:
    """The shipped samples: 640x480 BCCD fields and 360x363 PBC cells (area shrink), and a 90x100 piece
    of a field (bilinear enlargement, content 173 px wide: a partly filled block column)."""
    frames = {path.stem: cv2.imread(str(path)) for path in sorted(SAMPLES.glob("*.jpg"))}
    frames["bccd-piece-enlarged"] = np.ascontiguousarray(frames["bccd_BloodImage_00002"][200:300, 300:390])
    return frames


@pytest.fixture(params=["samples", "shared-data"])
def real_frames(request: pytest.FixtureRequest) -> dict[str, np.ndarray]:
    if request.param == "samples":
        return sample_frames()
    data_root = request.getfixturevalue("data_root")
    pick = {
        "all-idb2": next((data_root / "all-idb2" / "images").glob("*.jpg")),  # 103x103 thumbnail: enlarged
        "all-taleqani": next((data_root / "all-taleqani" / "images").glob("*/*.jpg")),  # 224x224
        "bccd": sorted((data_root / "bccd" / "images").glob("*.jpg"))[-1],
    }
    return {name: cv2.imread(str(path)) for name, path in pick.items()}


def make_preprocessor(spec: PreprocessSpec, runtime: str):
    from leukoedge.preprocess.cuda import CudaPreprocessor

    try:
        return CudaPreprocessor(spec, INPUT_SIZE)
    except BackendUnavailableError as error:
        if runtime == "emulated":
            cuda_emulator.missing(f"the emulation compiles through CudaPreprocessor's NVRTC: {error}")
        pytest.skip(f"no usable CUDA GPU: {error}")


def to_gpu(frame: np.ndarray):
    """A pycuda GPUArray of the frame, made in the primary context (the one the kernels run in)."""
    import pycuda.driver as cuda
    import pycuda.gpuarray as gpuarray

    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        return gpuarray.to_gpu(frame)
    finally:
        context.pop()


@pytest.mark.parametrize("spec", [SPEC, PreprocessSpec("BGR", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), None)], ids=["reinhard-rgb", "no-stain-bgr"])
def test_cuda_prepare_frame_matches_the_cpu_reference(cuda_runtime: str, real_frames: dict[str, np.ndarray], spec: PreprocessSpec):
    preprocessor = make_preprocessor(spec, cuda_runtime)
    for name, frame in real_frames.items():
        reference = prepare_frame(frame, spec, INPUT_SIZE)
        prepared = preprocessor.prepare_frame(frame)
        assert prepared.letterbox == reference.letterbox
        assert np.isfinite(prepared.tensor).all(), f"{name}: the kernels left unwritten (NaN) elements"
        difference = np.abs(prepared.tensor - reference.tensor)
        assert difference.max() <= MAX_DIFFERENCE, f"{name}: max {difference.max():.4f}"
        assert difference.mean() <= MEAN_DIFFERENCE, f"{name}: mean {difference.mean():.5f}"
        if spec.stain_reference is None:
            assert prepared.lab_statistics is None
        else:
            for gpu, cpu in zip(prepared.lab_statistics, reference.lab_statistics):
                assert np.allclose(gpu, cpu, atol=0.5), (name, gpu, cpu)


def test_a_frame_already_on_the_gpu_gives_the_same_tensor_as_a_host_frame(cuda_runtime: str):
    preprocessor = make_preprocessor(SPEC, cuda_runtime)
    frame = sample_frames()["bccd_BloodImage_00024"]
    from_host = preprocessor.prepare_frame(frame).tensor
    from_device = preprocessor.prepare_frame(to_gpu(frame)).tensor
    assert np.array_equal(from_host, from_device)


@pytest.mark.parametrize(
    "view",
    [lambda frame: frame[40:200, 100:300], lambda frame: frame[:, ::2], lambda frame: frame[..., ::-1]],
    ids=["crop", "every-other-column", "channels-reversed"],
)
def test_a_strided_gpu_frame_is_refused_not_read_as_packed_rows(cuda_runtime: str, view):
    # The kernels index gpudata as packed HxWx3 rows: a view would be read as other pixels, silently.
    preprocessor = make_preprocessor(SPEC, cuda_runtime)
    strided = view(to_gpu(sample_frames()["bccd_BloodImage_00024"]))
    with pytest.raises(InvalidFrameError, match=r"must be C-contiguous HxWx3 uint8"):
        preprocessor.prepare_frame(strided)
