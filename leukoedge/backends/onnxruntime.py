"""ONNX Runtime backend: the CPU reference, and CUDA where onnxruntime-gpu is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError


class OnnxRuntimeBackend:
    """One InferenceSession per model. ONNX Runtime sessions are safe to call from several threads."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as error:  # a hard dependency, but say what to do if a slim install lacks it
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from error
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailableError(f"ONNX Runtime providers {missing} are not available here (available: {available})")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs))
