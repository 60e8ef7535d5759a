"""Test doubles for the GPU stack, so the TensorRT path runs in CI without a GPU: fake_tensorrt (the
TensorRT 10 Python API subset leukoedge uses, run by ONNX Runtime) and fake_pycuda (device memory,
contexts and streams on the CPU). install() puts them where `import tensorrt` and
`import pycuda.driver` find them, for one test (monkeypatch undoes it)."""

from __future__ import annotations

import sys
import types

import pytest

from . import fake_pycuda, fake_tensorrt
from .fake_pycuda import AGX_ORIN_32GB, ORIN_NANO_8GB, XAVIER_NX, GpuSpec

__all__ = ["AGX_ORIN_32GB", "ORIN_NANO_8GB", "XAVIER_NX", "GpuSpec", "fake_pycuda", "fake_tensorrt", "install"]


def install(monkeypatch: pytest.MonkeyPatch, gpu: GpuSpec | None = ORIN_NANO_8GB, version: str = "10.3.0") -> types.SimpleNamespace:
    """Make `import tensorrt` and `import pycuda.driver` load the fakes, on `gpu` with TensorRT `version`."""
    fake_pycuda.reset(gpu)
    monkeypatch.setattr(fake_tensorrt, "__version__", version)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = fake_pycuda
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake_pycuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    return types.SimpleNamespace(trt=fake_tensorrt, cuda=fake_pycuda)


def switch_gpu(gpu: GpuSpec | None) -> None:
    """The same machine with another GPU in it (engines and caches stay where they were)."""
    fake_pycuda.reset(gpu)
