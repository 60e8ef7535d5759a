"""Inference backends behind one interface (base.Backend)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BackendUnavailableError
from .base import Backend

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt")


def create_backend(name: str, model_path: Path, threads: int | None = None, precision: str = "fp32") -> Backend:
    """Build a backend by name for a bundle's model file; TensorRT is imported only when asked for.

    ONNX Runtime runs the file as it is (its precision is the file's), on the CPU ("onnxruntime") or on
    its CUDA provider ("onnxruntime-cuda", needs onnxruntime-gpu). TensorRT runs the engine cached for
    that file at `precision` (fp32, fp16 or int8), built by `leukoedge export --engine`.
    """
    if name in ("onnxruntime", "onnxruntime-cuda"):
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_path, device="cpu" if name == "onnxruntime" else "cuda", threads=threads)
    if name == "tensorrt":
        from .tensorrt import open_engine

        return open_engine(model_path, precision)
    raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
