"""The CUDA kernels compile for the Jetsons, with a real CUDA compiler and no GPU.

NVRTC (pip nvidia-cuda-nvrtc-cu12, what CudaPreprocessor compiles with on the device) builds
kernels.cu for Orin (sm_87, JetPack 6) and Xavier (sm_72, JetPack 5); ptxas (pip
nvidia-cuda-nvcc-cu12) assembles the same PTX and reports each kernel's registers and spills, which
must leave room for the 256-thread blocks cuda.py launches. Both come with `pip install -e '.[cuda-ci]'`;
CI runs this file with -s so the table shows in its log. Where they are missing the tests skip, except
in CI (CI=true), where a missing compiler is a failure: a skip would let a broken kernel through.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

from leukoedge.errors import BackendUnavailableError
from leukoedge.preprocess import nvrtc
from leukoedge.preprocess.cuda import _MOMENTS_THREADS, BLOCK, KERNEL_SOURCE

JETSON_ARCHITECTURES = {"sm_87": "Orin, JetPack 6", "sm_72": "Xavier, JetPack 5"}
THREADS_PER_BLOCK = max(BLOCK[0] * BLOCK[1] * BLOCK[2], _MOMENTS_THREADS)
REGISTERS_PER_BLOCK, SHARED_BYTES_PER_BLOCK = 65536, 48 * 1024  # sm_72 and sm_87 alike
KERNELS = ("resize_content", "lab_moments", "normalize_into_tensor")


def _missing(what: str) -> None:
    reason = f"{what}: pip install -e '.[cuda-ci]'"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must compile the kernels, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def source() -> str:
    try:
        nvrtc.load_nvrtc()
    except BackendUnavailableError:
        _missing("no NVRTC")
    return KERNEL_SOURCE.read_text()


@pytest.fixture(scope="module")
def ptxas() -> Path:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc") if importlib.util.find_spec("nvidia") else None
    found = [Path(location) / "bin" / "ptxas" for location in (spec.submodule_search_locations if spec else [])]
    if not found or not found[0].is_file():
        _missing("no ptxas (nvidia-cuda-nvcc-cu12)")
    return found[0]


def ptxas_report(ptxas: Path, ptx: bytes, architecture: str, folder: Path) -> dict[str, dict[str, int]]:
    """Per kernel: registers, spill stores/loads and shared bytes, from `ptxas -v`; a ptxas error fails."""
    (folder / "kernels.ptx").write_bytes(ptx.rstrip(b"\0"))
    run = subprocess.run(
        [str(ptxas), f"-arch={architecture}", "-v", str(folder / "kernels.ptx"), "-o", str(folder / f"kernels.{architecture}.cubin")],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, f"ptxas {architecture} failed:\n{run.stderr}"
    report: dict[str, dict[str, int]] = {}
    for block in re.split(r"Compiling entry function '", run.stdout + run.stderr)[1:]:
        name = block.split("'", 1)[0]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        shared = re.search(r"(\d+) bytes smem", block)
        report[name] = {
            "registers": int(registers.group(1)),
            "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)),
            "shared_bytes": int(shared.group(1)) if shared else 0,
        }
    return report


@pytest.mark.parametrize("architecture", list(JETSON_ARCHITECTURES))
def test_nvrtc_builds_a_cubin_holding_every_kernel(source: str, architecture: str):
    compiled = nvrtc.compile_cuda(source, KERNEL_SOURCE.name, architecture)
    assert compiled.image.startswith(b"\x7fELF"), "NVRTC's cubin is an ELF image"
    for kernel in KERNELS:
        assert kernel.encode() in compiled.image, f"{kernel} missing from the {architecture} cubin"


@pytest.mark.parametrize("architecture", list(JETSON_ARCHITECTURES))
def test_ptxas_fits_every_kernel_in_its_block_without_spilling(source: str, ptxas: Path, architecture: str, tmp_path: Path):
    ptx = nvrtc.compile_cuda(source, KERNEL_SOURCE.name, architecture.replace("sm_", "compute_")).image
    report = ptxas_report(ptxas, ptx, architecture, tmp_path)
    print(f"\nptxas -v {architecture} ({JETSON_ARCHITECTURES[architecture]}), NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))}:")
    for kernel, usage in report.items():
        print(f"  {kernel:24s} {usage['registers']:3d} registers  {usage['spill_stores']} B spill stores  {usage['spill_loads']} B spill loads  {usage['shared_bytes']} B shared")
    assert sorted(report) == sorted(KERNELS)
    for kernel, usage in report.items():
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{kernel} spills on {architecture}: {usage}"
        assert usage["registers"] * THREADS_PER_BLOCK <= REGISTERS_PER_BLOCK, f"{kernel}: {usage['registers']} registers x {THREADS_PER_BLOCK} threads"
        assert usage["shared_bytes"] <= SHARED_BYTES_PER_BLOCK, f"{kernel}: {usage['shared_bytes']} B of shared memory"


def test_a_compile_error_is_reported_with_nvrtc_s_log(source: str):
    with pytest.raises(BackendUnavailableError, match=r"(?s)could not compile kernels.cu for sm_87.*undefined_name"):
        nvrtc.compile_cuda(source + "\n__device__ float broken() { return undefined_name; }\n", KERNEL_SOURCE.name, "sm_87")


@pytest.mark.parametrize(
    ("capability", "target"),
    [((8, 7), "sm_87"), ((7, 2), "sm_72"), ((12, 1), "compute_90")],
    ids=["orin", "xavier", "newer-than-nvrtc"],
)
def test_the_gpu_s_own_architecture_gets_sass_and_a_newer_one_gets_ptx(capability: tuple[int, int], target: str):
    assert nvrtc.target_for(capability, [50, 60, 70, 72, 75, 80, 86, 87, 89, 90]) == target


def test_a_gpu_older_than_every_nvrtc_architecture_is_refused_with_the_fix():
    with pytest.raises(BackendUnavailableError, match=r"compute capability 3.0.*nvidia-cuda-nvrtc-cu12"):
        nvrtc.target_for((3, 0), [50, 60, 70])
