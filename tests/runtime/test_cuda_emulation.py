"""The CPU emulation of the CUDA kernels catches what it is there to catch, and the kernels run clean
under AddressSanitizer (a build of kernels.cu with -fsanitize=address, run in a process that
preloads libasan, through the unmodified CudaPreprocessor)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cuda_emulator
import numpy as np
import pytest

from leukoedge.errors import BackendUnavailableError
from leukoedge.preprocess.cpu import PreprocessSpec, StainReference

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parents[1] / "samples"
SPEC = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), StainReference((73.2, 5.5, 1.5), (14.3, 12.6, 15.1)))
EARLY_RETURN = "    if (!with_moments) return;\n"


def _preprocessor():
    from leukoedge.preprocess.cuda import CudaPreprocessor

    try:
        return CudaPreprocessor(SPEC, (192, 256))
    except BackendUnavailableError as error:
        cuda_emulator.missing(f"the emulation compiles through CudaPreprocessor's NVRTC: {error}")


def test_a_divergent_syncthreads_fails_the_launch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # Threads past the content's edge leaving before the block's __syncthreads: undefined on a GPU,
    # where it may hang or sum garbage. The emulation must refuse it, not average it away.
    source = cuda_emulator.KERNEL_SOURCE.read_text()
    assert EARLY_RETURN in source
    broken = tmp_path / "kernels.cu"
    broken.write_text(source.replace(EARLY_RETURN, "    if (!with_moments || dx >= content_width) return;\n"))
    cuda_emulator.install(monkeypatch, cuda_emulator.build(tmp_path, kernel_source=broken))
    frame = np.random.default_rng(2).integers(0, 256, (100, 90, 3), np.uint8)  # content 173 px wide: a partial block column
    with pytest.raises(cuda_emulator.LaunchError, match=r"resize_content: __syncthreads\(\) reached by \d+ threads of block \(10, 0\)"):
        _preprocessor().prepare_frame(frame)


ASAN_RUN = """
import sys
import cv2
import numpy as np
import cuda_emulator
sys.modules.update(cuda_emulator.fake_pycuda(sys.argv[1]))
from leukoedge.preprocess.cpu import PreprocessSpec, StainReference, prepare_frame
from leukoedge.preprocess.cuda import CudaPreprocessor
spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), StainReference((73.2, 5.5, 1.5), (14.3, 12.6, 15.1)))
preprocessor = CudaPreprocessor(spec, (192, 256))
if sys.argv[2] == "overflow":
    # The normalize kernel writing a 3x192x256 tensor into a buffer one float short: ASan must stop it.
    cuda = sys.modules["pycuda.driver"]
    context = cuda.Device(0).retain_primary_context()
    context.push()
    content, params = cuda.mem_alloc(256 * 192 * 3 * 4), cuda.to_device(np.ones(12, np.float32))
    tensor = cuda.mem_alloc(3 * 192 * 256 * 4 - 4)
    preprocessor._normalize.prepared_async_call((16, 12), (16, 16, 1), None, content, 256, 192, 0, params, params, 0, tensor, 256, 192, 0, 0)
for path in sys.argv[3:]:
    frame = cv2.imread(path)
    difference = np.abs(preprocessor.prepare_frame(frame).tensor - prepare_frame(frame, spec, (192, 256)).tensor)
    print(f"{path}: max {difference.max():.4f} mean {difference.mean():.5f}")
"""


def _run_under_asan(library: Path, mode: str, frames: list[Path]) -> subprocess.CompletedProcess:
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        cuda_emulator.missing("g++ has no libasan.so here (apt-get install libasan8 or the gcc of this g++)")
    environment = {
        **os.environ,
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",  # Python's own allocations look like leaks at exit
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-c", ASAN_RUN, str(library), mode, *map(str, frames)], capture_output=True, text=True, env=environment, timeout=300)


@pytest.fixture(scope="module")
def asan_library(request: pytest.FixtureRequest) -> Path:
    from leukoedge.preprocess.nvrtc import load_nvrtc

    try:  # the sanitized run compiles its kernels through NVRTC too
        load_nvrtc()
    except BackendUnavailableError as error:
        cuda_emulator.missing(f"the sanitized run compiles through NVRTC: {error}")
    return cuda_emulator.build(cuda_emulator.library_folder(request), sanitize=True)


def test_the_kernels_run_clean_under_address_sanitizer(asan_library: Path):
    frames = [SAMPLES / "bccd_BloodImage_00002.jpg", SAMPLES / "pbc_lymphocyte_LY_131013.jpg"]
    run = _run_under_asan(asan_library, "frames", frames)
    if "AddressSanitizer" in run.stderr and "ERROR: AddressSanitizer" not in run.stderr:
        pytest.skip(f"AddressSanitizer cannot run here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in run.stderr
    assert len(run.stdout.strip().splitlines()) == len(frames), run.stdout


def test_address_sanitizer_does_stop_a_kernel_writing_past_its_buffer(asan_library: Path):
    run = _run_under_asan(asan_library, "overflow", [])
    if "AddressSanitizer" in run.stderr and "ERROR: AddressSanitizer" not in run.stderr:
        pytest.skip(f"AddressSanitizer cannot run here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in run.stderr and "normalize_into_tensor" in run.stderr, run.stderr[-4000:]
