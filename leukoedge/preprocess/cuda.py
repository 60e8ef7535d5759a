"""prepare_frame on an NVIDIA GPU: the same steps as cpu.py, as CUDA kernels (kernels.cu) run through pycuda.

Steps, one kernel each: (1) resize into the letterbox content, area averaging when shrinking and
bilinear when enlarging as cpu.resize does, rounded to uint8 levels as OpenCV's uint8 resize is,
plus per-block sums of L*a*b* and their squares; (2) the frame's L*a*b* mean and std (floored at 1)
and the Reinhard gains, on the GPU, so nothing waits for the host; (3) Reinhard transfer in
L*a*b*, back to RGB, mean/std normalization, written as CHW into the zeroed (= mean colour)
letterboxed tensor. The frame is taken from the GPU as is (a pycuda GPUArray) or copied there once.

Tolerance against cpu.prepare_frame, per tensor element: |cuda - cpu| <= 0.12, mean <= 0.01
(units of the normalized input, where one uint8 level is about 0.016). Where it comes from:
OpenCV's float RGB->L*a*b* interpolates a 3-D lookup table (up to ~0.5 L*a*b* units off the exact
formula these kernels use), and its uint8 bilinear resize uses fixed-point weights (one level off
at some pixels when enlarging); the Reinhard gains (reference std / frame std) multiply both. A numpy
transliteration of these kernels measured 0.033 max and 0.003 mean on BCCD, ALL-IDB2 and PBC frames,
and up to 0.095 max (0.001 mean) on one of 12 BCCD fields, where a dark pixel sits near the Lab
cube-root knee. The kernels themselves, run by the CPU emulation in CI (tests/runtime/cuda_emulator),
measured up to 0.083 max and 0.003 mean on whole frames (the shipped samples, BCCD, ALL-IDB2,
Taleqani), and 0.066 max, 0.0054 mean on a pale 90x100 piece of a field enlarged 1.9x, whose b* gain
is 4.2 (hence a mean bound of 0.01, not 0.005). A camera-sized frame (shrunk by more than cpu.STAGED_SHRINK_REST)
the CPU halves first (cpu.shrink_frame), the kernel shrinks in one step, as the CPU does every smaller frame: up to 2
grey levels apart there (1 at the 99th percentile), times the Reinhard gains; its large cells' crops (cut from the
CPU's halvings, cpu.region_source) are cut from the frame itself.
tests/runtime/test_preprocess_cuda.py checks this on the emulation and, where there is one, on a GPU.

Cell crops for the classifier stay on the CPU (cpu.prepare_crops): a few 64x64 crops per frame.
The kernels (kernels.cu) use double-precision sums but no double atomics, so any CUDA GPU runs them.
They are compiled when a CudaPreprocessor is made, by NVRTC for this GPU's architecture (nvrtc.py:
no nvcc, nothing on PATH), and loaded with pycuda.driver.module_from_buffer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backends.tensorrt import import_pycuda
from ..errors import BackendUnavailableError, InvalidFrameError
from . import nvrtc
from .cpu import Letterbox, PreparedFrame, PreprocessSpec, fit_letterbox

BLOCK = (16, 16, 1)
_MOMENTS_THREADS = 256

KERNEL_SOURCE = Path(__file__).with_name("kernels.cu")  # also compiled as host C++ by the CI emulation


def _load_kernels(cuda: Any, device: Any) -> Any:
    """kernels.cu compiled by NVRTC for this GPU and loaded into the current context."""
    compiler = nvrtc.nvrtc_version()
    driver = cuda.get_driver_version()  # 12060 for CUDA 12.6
    if compiler[0] > driver // 1000:  # within one major version, a newer toolkit's cubin loads on an older driver
        raise BackendUnavailableError(
            f"NVRTC {compiler[0]}.{compiler[1]} makes code that this CUDA {driver // 1000}.{driver % 1000 // 10} driver cannot load: "
            f"use the NVRTC of CUDA {driver // 1000} (the CUDA toolkit's cuda-nvrtc package, or pip install 'nvidia-cuda-nvrtc-cu{driver // 1000}')"
        )
    target = nvrtc.target_for(device.compute_capability(), nvrtc.supported_architectures())
    compiled = nvrtc.compile_cuda(KERNEL_SOURCE.read_text(), KERNEL_SOURCE.name, target)
    try:
        return cuda.module_from_buffer(compiled.image)
    except cuda.Error as error:
        raise BackendUnavailableError(f"the CUDA driver refused the kernels NVRTC {compiler[0]}.{compiler[1]} compiled for {target}: {error}") from error


def _require_packed(frame: Any) -> None:
    """The kernels read a GPU frame as packed HxWx3 rows from gpudata; a strided view (a crop, a
    flipped or channel-sliced array) would be read as the wrong pixels, so it is refused."""
    packed = (3 * frame.shape[1], 3, 1)
    if tuple(frame.strides) != packed or not frame.flags.c_contiguous:
        raise InvalidFrameError(
            f"a frame on the GPU must be C-contiguous HxWx3 uint8 (strides {packed}), got strides {tuple(frame.strides)}: "
            "copy it into a contiguous GPUArray first"
        )


@dataclass
class DevicePreparedFrame:
    """The segmenter input left on the GPU (for a TensorRT engine to read), and what later steps need."""

    tensor: Any  # pycuda DeviceAllocation, 1x3xHxW float32
    shape: tuple[int, int, int, int]
    letterbox: Letterbox
    statistics: np.ndarray | None  # page-locked [mean L,a,b, std L,a,b, gains]: valid after synchronize


class CudaPreprocessor:
    """cpu.prepare_frame on the GPU for one model input size and preprocessing spec.

    The stream and buffers are shared by every call: prepare_frame takes one frame at a time (threads
    sharing a Detector wait for each other); run() leaves its results in those buffers, so its callers
    must not overlap.
    """

    def __init__(self, spec: PreprocessSpec, input_size: Sequence[int], channel_order: str = "BGR"):
        cuda = import_pycuda()
        self._cuda = cuda
        self.spec = spec
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.channel_order = channel_order
        device = cuda.Device(0)
        self._gpu_context = device.retain_primary_context()
        self._one_frame_at_a_time = threading.Lock()
        self._gpu_context.push()
        try:
            module = _load_kernels(cuda, device)
            self._resize = module.get_function("resize_content")
            self._resize.prepare("PiiiPiiiiP")
            self._moments = module.get_function("lab_moments")
            self._moments.prepare("PiiPP")
            self._normalize = module.get_function("normalize_into_tensor")
            self._normalize.prepare("PiiiPPiPiiii")
            self.stream = cuda.Stream()
            reference = spec.stain_reference
            params = np.array(
                [*(reference.lab_mean if reference else (0, 0, 0)), *(reference.lab_std if reference else (1, 1, 1)), *spec.mean, *spec.std], np.float32
            )
            self._params = cuda.to_device(params)
            self._statistics_device = cuda.mem_alloc(9 * 4)
            self._statistics = cuda.pagelocked_empty(9, np.float32)
            self.tensor_shape = (1, 3, *self.input_size)
            self._tensor = cuda.mem_alloc(int(np.prod(self.tensor_shape)) * 4)
            self._host_tensor = cuda.pagelocked_empty(self.tensor_shape, np.float32)
            self._buffers: dict[str, tuple[int, Any]] = {}
            self._staging: Any = None
        finally:
            self._gpu_context.pop()

    def _buffer(self, name: str, nbytes: int) -> Any:
        """A device buffer at least nbytes long, reallocated only when a larger frame needs it."""
        size, allocation = self._buffers.get(name, (0, None))
        if size < nbytes:
            allocation = self._cuda.mem_alloc(nbytes)
            self._buffers[name] = (nbytes, allocation)
        return allocation

    def _upload(self, frame: np.ndarray) -> Any:
        """One host -> device copy through a page-locked staging buffer (an async copy needs one)."""
        if self._staging is None or self._staging.size < frame.size:
            self._staging = self._cuda.pagelocked_empty(frame.size, np.uint8)
        staged = self._staging[: frame.size]
        staged[:] = frame.ravel()
        device = self._buffer("frame", frame.size)
        self._cuda.memcpy_htod_async(device, staged, self.stream)
        return device

    def run(self, frame: Any) -> DevicePreparedFrame:
        """Queue the preprocessing of one frame on the stream: an HxWx3 uint8 numpy array (copied once)
        or a pycuda GPUArray already on the GPU. Synchronize the stream before reading the results."""
        shape = tuple(frame.shape)
        if len(shape) != 3 or shape[2] != 3 or np.dtype(frame.dtype) != np.uint8:
            raise InvalidFrameError(f"expected an HxWx3 uint8 frame, got shape {shape} dtype {frame.dtype}")
        on_gpu = hasattr(frame, "gpudata")
        if on_gpu:
            _require_packed(frame)
        height, width = shape[:2]
        placement = fit_letterbox(height, width, self.input_size)
        stain = self.spec.stain_reference is not None
        self._gpu_context.push()
        try:
            source = frame.gpudata if on_gpu else self._upload(np.ascontiguousarray(frame))
            content_width, content_height = placement.content_width, placement.content_height
            grid = ((content_width + BLOCK[0] - 1) // BLOCK[0], (content_height + BLOCK[1] - 1) // BLOCK[1])
            content = self._buffer("content", content_width * content_height * 3 * 4)
            partials = self._buffer("partials", grid[0] * grid[1] * 6 * 8)
            shrinking = content_width * content_height < height * width  # the rule of cpu.resize
            self._resize.prepared_async_call(
                grid, BLOCK, self.stream, source, width, height, int(self.channel_order == "BGR"),
                content, content_width, content_height, int(shrinking), int(stain), partials,
            )
            if stain:
                self._moments.prepared_async_call(
                    (1, 1), (_MOMENTS_THREADS, 1, 1), self.stream,
                    partials, grid[0] * grid[1], content_width * content_height, self._params, self._statistics_device,
                )
                self._cuda.memcpy_dtoh_async(self._statistics, self._statistics_device, self.stream)
            self._cuda.memset_d32_async(self._tensor, 0, int(np.prod(self.tensor_shape)), self.stream)  # 0 = the mean colour
            self._normalize.prepared_async_call(
                grid, BLOCK, self.stream, content, content_width, content_height, int(stain), self._statistics_device, self._params,
                int(self.spec.channel_order == "BGR"), self._tensor, self.input_size[1], self.input_size[0], placement.pad_x, placement.pad_y,
            )
        finally:
            self._gpu_context.pop()
        return DevicePreparedFrame(self._tensor, self.tensor_shape, placement, self._statistics if stain else None)

    def prepare_frame(self, frame: Any) -> PreparedFrame:
        """cpu.prepare_frame's result, computed on the GPU and copied back once."""
        with self._one_frame_at_a_time:
            prepared = self.run(frame)
            self._gpu_context.push()
            try:
                self._cuda.memcpy_dtoh_async(self._host_tensor, prepared.tensor, self.stream)
                self.stream.synchronize()
            finally:
                self._gpu_context.pop()
            statistics = None if prepared.statistics is None else (prepared.statistics[:3].copy(), prepared.statistics[3:6].copy())
            return PreparedFrame(self._host_tensor.copy(), prepared.letterbox, statistics)
