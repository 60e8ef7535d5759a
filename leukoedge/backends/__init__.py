"""Inference backends behind one interface (base.Backend)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BackendUnavailableError
from .base import Backend

BACKENDS = ("onnxruntime", "tensorrt")


def create_backend(name: str, model_path: Path, threads: int | None = None) -> Backend:
    """Build a backend by name; TensorRT is imported only when asked for."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_path, threads=threads)
    if name == "tensorrt":
        raise BackendUnavailableError("the TensorRT backend is not part of this release yet; use backend='onnxruntime'")
    raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
