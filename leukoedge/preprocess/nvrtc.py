"""CUDA C++ -> GPU code at run time with NVRTC (libnvrtc through ctypes): no nvcc, nothing on PATH.

pycuda's SourceModule runs `nvcc --version` on every build, and stock JetPack leaves
/usr/local/cuda/bin off PATH, so the kernels are compiled here instead and loaded with
pycuda.driver.module_from_buffer. NVRTC emits SASS (a cubin) for the GPU's own architecture,
which the driver loads without a JIT step; for an architecture this NVRTC does not know, it emits
PTX for the newest one it does, and the driver compiles that forward.

libnvrtc is looked for in the machine's CUDA toolkit first (CUDA_HOME, CUDA_PATH, /usr/local/cuda:
on a Jetson, the one JetPack installed, which matches its driver), then in the pip wheel
nvidia-cuda-nvrtc-cu12, then on the loader's path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendUnavailableError

INSTALL_NVRTC = (
    "pip install 'nvidia-cuda-nvrtc-cu12==12.6.*' (the CUDA 12.x of JetPack 6), "
    "or the CUDA toolkit's cuda-nvrtc package (part of JetPack; JetPack 5 has CUDA 11.4)"
)
_LIBRARY_NAMES = ("libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.11.2")  # 11.x sonames carry 11.2 for all of 11.2-11.8


def _candidate_paths() -> list[str]:
    """Where libnvrtc may be, best first; bare names last so the loader's own path is tried too."""
    toolkits = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    folders = [Path(root) / sub for root in toolkits if root for sub in ("lib64", "targets/aarch64-linux/lib")]
    wheel = importlib.util.find_spec("nvidia.cuda_nvrtc") if importlib.util.find_spec("nvidia") else None
    if wheel is not None and wheel.submodule_search_locations:
        folders += [Path(location) / "lib" for location in wheel.submodule_search_locations]
    return [str(folder / name) for folder in folders for name in _LIBRARY_NAMES if (folder / name).is_file()] + list(_LIBRARY_NAMES)


@functools.lru_cache(maxsize=1)
def load_nvrtc() -> ctypes.CDLL:
    """The first libnvrtc that loads, its functions typed; BackendUnavailableError naming the fix if none does."""
    for path in _candidate_paths():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        _preload_builtins(Path(path).parent)
        return _declare(library)
    raise BackendUnavailableError(f"CUDA preprocessing compiles its kernels with NVRTC, and no libnvrtc was found: {INSTALL_NVRTC}")


def _preload_builtins(folder: Path) -> None:
    """libnvrtc dlopens libnvrtc-builtins by name when it compiles, found through libnvrtc's own
    search path; a process whose dlopen is intercepted (AddressSanitizer's is) loses that path, and
    the compile fails. Loaded beforehand from libnvrtc's folder, the name resolves to it."""
    for builtins in sorted(folder.glob("libnvrtc-builtins.so*")):
        try:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types from nvrtc.h: every call returns an nvrtcResult (int), 0 on success."""
    program, size, text = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
        "nvrtcGetNumSupportedArchs": [ctypes.POINTER(ctypes.c_int)],
        "nvrtcGetSupportedArchs": [ctypes.POINTER(ctypes.c_int)],
        "nvrtcCreateProgram": [ctypes.POINTER(program), text, text, ctypes.c_int, ctypes.POINTER(text), ctypes.POINTER(text)],
        "nvrtcCompileProgram": [program, ctypes.c_int, ctypes.POINTER(text)],
        "nvrtcGetProgramLogSize": [program, ctypes.POINTER(size)],
        "nvrtcGetProgramLog": [program, ctypes.c_char_p],
        "nvrtcGetPTXSize": [program, ctypes.POINTER(size)],
        "nvrtcGetPTX": [program, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [program, ctypes.POINTER(size)],
        "nvrtcGetCUBIN": [program, ctypes.c_char_p],
        "nvrtcDestroyProgram": [ctypes.POINTER(program)],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    library.nvrtcGetErrorString.argtypes, library.nvrtcGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
    return library


def _check(library: ctypes.CDLL, result: int, call: str) -> None:
    if result != 0:
        raise BackendUnavailableError(f"NVRTC {call} failed: {library.nvrtcGetErrorString(result).decode()}")


def nvrtc_version() -> tuple[int, int]:
    library, major, minor = load_nvrtc(), ctypes.c_int(), ctypes.c_int()
    _check(library, library.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_architectures() -> list[int]:
    """The real architectures this NVRTC emits SASS for, as 72, 87, ..."""
    library, count = load_nvrtc(), ctypes.c_int()
    _check(library, library.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    architectures = (ctypes.c_int * count.value)()
    _check(library, library.nvrtcGetSupportedArchs(architectures), "nvrtcGetSupportedArchs")
    return list(architectures)


def target_for(compute_capability: tuple[int, int], supported: list[int]) -> str:
    """"sm_87" (SASS) where NVRTC knows the GPU; else "compute_XX" (PTX) of the newest architecture below it."""
    wanted = 10 * compute_capability[0] + compute_capability[1]
    if wanted in supported:
        return f"sm_{wanted}"
    older = [architecture for architecture in supported if architecture < wanted]
    if not older:
        raise BackendUnavailableError(f"this NVRTC cannot compile for compute capability {compute_capability[0]}.{compute_capability[1]}: {INSTALL_NVRTC}")
    return f"compute_{max(older)}"


@dataclass(frozen=True)
class CompiledKernels:
    image: bytes  # a cubin for "sm_XX", NUL-terminated PTX for "compute_XX": what cuModuleLoadData takes
    target: str
    log: str


def compile_cuda(source: str, name: str, target: str) -> CompiledKernels:
    """Compile CUDA C++ for target ("sm_87": cubin; "compute_87": PTX); a compile error raises with NVRTC's log."""
    library, program = load_nvrtc(), ctypes.c_void_p()
    _check(library, library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None), "nvrtcCreateProgram")
    try:
        options = (ctypes.c_char_p * 1)(f"--gpu-architecture={target}".encode())
        result = library.nvrtcCompileProgram(program, len(options), options)
        log = _read(library, program, "ProgramLog").rstrip(b"\0").decode(errors="replace")
        if result != 0:
            raise BackendUnavailableError(f"NVRTC could not compile {name} for {target} ({library.nvrtcGetErrorString(result).decode()}):\n{log}")
        image = _read(library, program, "CUBIN" if target.startswith("sm_") else "PTX")
        return CompiledKernels(image, target, log)
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))


def _read(library: ctypes.CDLL, program: ctypes.c_void_p, what: str) -> bytes:
    """One of NVRTC's size-then-copy outputs: ProgramLog, PTX or CUBIN."""
    size = ctypes.c_size_t()
    _check(library, getattr(library, f"nvrtcGet{what}Size")(program, ctypes.byref(size)), f"nvrtcGet{what}Size")
    buffer = ctypes.create_string_buffer(size.value)
    _check(library, getattr(library, f"nvrtcGet{what}")(program, buffer), f"nvrtcGet{what}")
    return buffer.raw
