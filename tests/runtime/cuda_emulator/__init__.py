"""A CUDA GPU emulated on the CPU, so that CI runs CudaPreprocessor, unmodified, over the real kernels.

leukoedge/preprocess/kernels.cu is compiled as host C++ with g++ (cuda_host_shim.h supplies the CUDA
built-ins; launch.cpp runs a grid: blocks one after another, each CUDA thread of a block a fiber of
its own with its own stack, __syncthreads a barrier across the block's fibers). Fibers rather than
OS threads: with 256 OS threads meeting at ~2,000 barriers a frame, a 640x480 frame took 0.6 s on
this 2-core machine and 2.4 s while it was busy, in a different interleaving each run; the fibers run
in one order every time and cost well under a second a frame even then.

`fake_pycuda` returns stand-ins for the pycuda modules that CudaPreprocessor imports, to put in
sys.modules: device memory is host memory, a stream queues its copies and launches and runs them in
order at synchronize() (so a result read before then is stale, as on a GPU), and kernel launches go
to the host build through ctypes.

The stand-ins check what a GPU would punish silently or with a crash: a launch or copy outside a
pushed context, a pointer or copy outside any allocation, prepare() letters that do not match the
kernel's parameter types, a module image that is not a real NVRTC cubin/PTX holding the kernel,
a divergent __syncthreads. Fresh device memory is filled with NaN bytes, so a kernel that reads what
nobody wrote shows NaN in its output.

What this cannot show: timing, warp-level behaviour, the GPU's own float rounding (fused
multiply-adds, its libdevice powf/cbrtf), and memory faults beyond a host allocation's edges unless
built with sanitize=True (AddressSanitizer; run in a process with libasan preloaded).
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leukoedge.preprocess.cuda import KERNEL_SOURCE  # the very file CudaPreprocessor compiles with NVRTC

HERE = Path(__file__).resolve().parent
_POISON = 0xFF  # every float32/float64 made of these bytes is a NaN
_ARGUMENT_TYPES = {"P": ctypes.c_void_p, "i": ctypes.c_int32, "I": ctypes.c_uint32, "f": ctypes.c_float, "d": ctypes.c_double}


def kernel_names(source: str) -> list[str]:
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', source)


def missing(what: str) -> None:
    """Skip for want of a tool, except in CI (CI=true), whose set-up installs them all: there it fails."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the CUDA emulation, but {what}")
    pytest.skip(what)


def build(out_dir: Path, sanitize: bool = False, kernel_source: Path = KERNEL_SOURCE) -> Path:
    """kernels.cu + the shim -> a shared library in out_dir (reused while the sources are unchanged).
    kernel_source: another .cu file (a test's deliberately broken kernel)."""
    if shutil.which("g++") is None:
        missing("the CUDA emulation compiles the kernels with g++, which is not on PATH (apt-get install g++)")
    source = kernel_source.read_text()
    flags = ["-std=c++20", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-sign-compare", f"-I{HERE}"]
    flags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else ["-O2"]
    defines = [f'-DKERNEL_SOURCE="{kernel_source}"', f"-DKERNELS(X)={' '.join(f'X({name})' for name in kernel_names(source))}"]
    inputs = [kernel_source, HERE / "cuda_host_shim.h", HERE / "launch.cpp"]
    key = hashlib.sha256(b"".join(path.read_bytes() for path in inputs) + " ".join(flags + defines).encode()).hexdigest()[:16]
    library = out_dir / f"kernels-{key}{'-asan' if sanitize else ''}.so"
    if not library.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        compiled = subprocess.run(["g++", *flags, *defines, str(HERE / "launch.cpp"), "-o", str(partial)], capture_output=True, text=True)
        if compiled.returncode != 0:
            raise RuntimeError(f"g++ could not build {kernel_source.name} as host C++:\n{compiled.stderr}")
        partial.replace(library)
    return library


class Error(Exception):
    """pycuda.driver.Error: what the driver raises."""


class LogicError(Error):
    pass


class LaunchError(Error):
    pass


class _Device:
    """Device memory (host arrays, addressed by their real pointers), the context stack, the host build."""

    def __init__(self, library: Path, compute_capability: tuple[int, int]):
        self.library = ctypes.CDLL(str(library))
        self.library.kernel_signature.argtypes, self.library.kernel_signature.restype = [ctypes.c_char_p], ctypes.c_char_p
        self.library.emulate_launch.argtypes = [ctypes.c_char_p, *[ctypes.c_uint] * 6, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t]
        self.compute_capability = compute_capability
        self.contexts: list[Any] = []
        self.starts: list[int] = []  # allocations sorted by address
        self.blocks: dict[int, np.ndarray] = {}

    def allocate(self, nbytes: int) -> "DeviceAllocation":
        self.require_context("mem_alloc")
        memory = np.full(max(int(nbytes), 1), _POISON, np.uint8)
        address = memory.ctypes.data
        bisect.insort(self.starts, address)
        self.blocks[address] = memory
        return DeviceAllocation(self, address, int(nbytes))

    def check_range(self, address: int, nbytes: int, what: str) -> None:
        """A GPU faults (or corrupts another buffer) when it touches memory outside its allocations."""
        index = bisect.bisect_right(self.starts, address) - 1
        if index >= 0:
            start = self.starts[index]
            if address + nbytes <= start + self.blocks[start].size:
                return
        raise LogicError(f"{what}: {nbytes} bytes at {address:#x} are not inside one device allocation")

    def require_context(self, what: str) -> None:
        if not self.contexts:
            raise LogicError(f"{what}: no CUDA context is current (push one first)")


class DeviceAllocation:
    def __init__(self, device: _Device, address: int, nbytes: int):
        self._device, self.address, self.nbytes = device, address, nbytes

    def __int__(self) -> int:
        return self.address

    def __index__(self) -> int:
        return self.address


def _address(pointer: Any) -> int:
    return int(pointer)


def fake_pycuda(library: Path, compute_capability: tuple[int, int] = (8, 7), driver_version: int = 12060) -> dict[str, types.ModuleType]:
    """Modules to put in sys.modules as "pycuda", "pycuda.driver", "pycuda.gpuarray", "pycuda.compiler"."""
    device = _Device(library, compute_capability)
    driver = types.ModuleType("pycuda.driver")
    driver.Error, driver.LogicError, driver.LaunchError = Error, LogicError, LaunchError
    driver.init = lambda flags=0: None
    driver.get_driver_version = lambda: driver_version

    class Context:
        def push(self) -> None:
            device.contexts.append(self)

        def pop(self) -> None:
            if not device.contexts or device.contexts[-1] is not self:
                raise LogicError("context pop: this context is not the current one")
            device.contexts.pop()

    primary = Context()

    class Device:
        def __init__(self, ordinal: int):
            if ordinal != 0:
                raise LogicError(f"no device {ordinal}")

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return "CPU emulation of a CUDA GPU"

        def compute_capability(self) -> tuple[int, int]:
            return device.compute_capability

        def retain_primary_context(self) -> Context:
            return primary

    class Stream:
        """Queues its copies and launches and runs them at synchronize(), so a result read before then is stale, as on a GPU."""

        def __init__(self, flags: int = 0):
            self.pending: list[Any] = []

        def synchronize(self) -> None:
            device.require_context("Stream.synchronize")
            pending, self.pending = self.pending, []
            for action in pending:
                action()

    def on_stream(stream: Any, action: Any) -> None:
        if stream is None:
            action()
        else:
            stream.pending.append(action)

    class Function:
        def __init__(self, name: str):
            self.name, self.signature = name, None

        def prepare(self, letters: str) -> "Function":
            expected = device.library.kernel_signature(self.name.encode()).decode()
            if letters != expected:
                raise LogicError(f"{self.name}: prepare({letters!r}) but the kernel's parameters are {expected!r}")
            self.signature = letters
            return self

        def prepared_async_call(self, grid: tuple, block: tuple, stream: Any, *args: Any) -> None:
            device.require_context(f"launch of {self.name}")
            if self.signature is None or len(args) != len(self.signature):
                raise LogicError(f"{self.name}: {len(args)} arguments for prepared signature {self.signature!r}")
            values = []
            for letter, value in zip(self.signature, args):
                if letter == "P":
                    device.check_range(_address(value), 1, f"{self.name} pointer argument")
                    values.append(ctypes.c_void_p(_address(value)))
                else:
                    values.append(_ARGUMENT_TYPES[letter](value))
            grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]

            def launch() -> None:
                pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(value), ctypes.c_void_p) for value in values])
                message = ctypes.create_string_buffer(512)
                if device.library.emulate_launch(self.name.encode(), *grid, *block, pointers, message, len(message)):
                    raise LaunchError(message.value.decode())

            on_stream(stream, launch)

    class Module:
        def __init__(self, image: bytes):
            self.image = image

        def get_function(self, name: str) -> Function:
            if device.library.kernel_signature(name.encode()) is None or name.encode() not in self.image:
                raise LogicError(f"cuModuleGetFunction: no kernel named {name}")
            return Function(name)

    def module_from_buffer(image: bytes, options: Any = None, message_handler: Any = None) -> Module:
        device.require_context("module_from_buffer")
        image = bytes(image)
        is_cubin, is_ptx = image.startswith(b"\x7fELF"), b".entry" in image and image.endswith(b"\0")
        if not (is_cubin or is_ptx):
            raise LogicError("module_from_buffer: the image is neither a cubin nor NUL-terminated PTX")
        return Module(image)

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        return device.allocate(nbytes)

    def to_device(array: np.ndarray) -> DeviceAllocation:
        allocation = device.allocate(array.nbytes)
        memcpy_htod(allocation, array)
        return allocation

    def memcpy_htod(destination: Any, source: np.ndarray, stream: Any = None) -> None:
        device.require_context("memcpy_htod")
        source = np.ascontiguousarray(source)
        device.check_range(_address(destination), source.nbytes, "memcpy_htod")
        on_stream(stream, lambda: ctypes.memmove(_address(destination), source.ctypes.data, source.nbytes))

    def memcpy_dtoh(destination: np.ndarray, source: Any, stream: Any = None) -> None:
        device.require_context("memcpy_dtoh")
        if not destination.flags.c_contiguous:
            raise LogicError("memcpy_dtoh: the host buffer is not contiguous")
        device.check_range(_address(source), destination.nbytes, "memcpy_dtoh")
        on_stream(stream, lambda: ctypes.memmove(destination.ctypes.data, _address(source), destination.nbytes))

    def memset_d32(destination: Any, value: int, count: int, stream: Any = None) -> None:
        device.require_context("memset_d32")
        device.check_range(_address(destination), 4 * count, "memset_d32")
        words = np.frombuffer((ctypes.c_uint32 * count).from_address(_address(destination)), np.uint32)
        on_stream(stream, lambda: words.fill(value))

    driver.Device, driver.Context, driver.Stream, driver.Function, driver.Module = Device, Context, Stream, Function, Module
    driver.DeviceAllocation, driver.module_from_buffer, driver.mem_alloc, driver.to_device = DeviceAllocation, module_from_buffer, mem_alloc, to_device
    driver.memcpy_htod, driver.memcpy_dtoh, driver.memset_d32 = memcpy_htod, memcpy_dtoh, memset_d32
    driver.memcpy_htod_async, driver.memcpy_dtoh_async, driver.memset_d32_async = memcpy_htod, memcpy_dtoh, memset_d32
    driver.pagelocked_empty = lambda shape, dtype, order="C": np.empty(shape, dtype, order=order)

    gpuarray = types.ModuleType("pycuda.gpuarray")

    class GPUArray:
        """shape, dtype, strides, flags and gpudata as pycuda's; slicing makes strided views as pycuda does."""

        def __init__(self, view: np.ndarray, owner: DeviceAllocation):
            self._view, self._owner = view, owner
            self.shape, self.dtype, self.strides, self.flags = view.shape, view.dtype, view.strides, view.flags
            self.gpudata = view.ctypes.data

        def __getitem__(self, index: Any) -> "GPUArray":
            return GPUArray(self._view[index], self._owner)

        def get(self) -> np.ndarray:
            return self._view.copy()

    def to_gpu(array: np.ndarray) -> GPUArray:
        array = np.ascontiguousarray(array)
        allocation = to_device(array)
        view = np.frombuffer((ctypes.c_uint8 * array.nbytes).from_address(allocation.address), array.dtype).reshape(array.shape)
        return GPUArray(view, allocation)

    gpuarray.GPUArray, gpuarray.to_gpu = GPUArray, to_gpu

    compiler = types.ModuleType("pycuda.compiler")

    class SourceModule:
        """What pycuda's does where nvcc is not on PATH (stock JetPack): it fails asking nvcc its version."""

        def __init__(self, *args: Any, **kwargs: Any):
            raise OSError("error invoking 'nvcc --version': [Errno 2] No such file or directory")

    compiler.SourceModule = SourceModule

    package = types.ModuleType("pycuda")
    package.__path__ = []  # a package, so "import pycuda.driver" resolves through sys.modules
    package.driver, package.gpuarray, package.compiler = driver, gpuarray, compiler
    return {"pycuda": package, "pycuda.driver": driver, "pycuda.gpuarray": gpuarray, "pycuda.compiler": compiler}


def install(monkeypatch: Any, library: Path, **device: Any) -> dict[str, types.ModuleType]:
    """Put the stand-ins in sys.modules for one test (monkeypatch undoes it)."""
    modules = fake_pycuda(library, **device)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def library_folder(request: Any) -> Path:
    """Where builds are kept between test runs: pytest's cache (a fresh temporary folder without it)."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("cuda-emulator") if cache is not None else request.getfixturevalue("tmp_path_factory").mktemp("cuda-emulator")
