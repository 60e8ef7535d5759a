"""ONNX Runtime backend: the CPU reference, and CUDA where onnxruntime-gpu is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, BundleError

DEVICES = ("cpu", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider"
_GPU_PACKAGE = "pip uninstall onnxruntime && pip install onnxruntime-gpu (on Jetson: the onnxruntime-gpu wheel for your JetPack)"


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as error:  # a hard dependency, but say what to do if a slim install lacks it
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from error
    return ort


def _providers(ort: Any, device: str) -> list[Any]:
    """The providers a session on `device` asks for, CPU last so that ops CUDA lacks still run."""
    if device not in DEVICES:
        raise ValueError(f"unknown ONNX Runtime device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise BackendUnavailableError(
            f"the onnxruntime-cuda backend needs onnxruntime-gpu and a CUDA GPU; this onnxruntime {ort.__version__} offers only {available}: {_GPU_PACKAGE}"
        )
    # fp32 stays fp32, as on the CPU: from 1.18 ONNX Runtime otherwise runs fp32 Conv and MatMul as TF32 on
    # Ampere and later GPUs (Jetson Orin included); earlier versions have no such option.
    major, minor = (int(part) for part in ort.__version__.split(".")[:2])
    return [(CUDA_PROVIDER, {"use_tf32": "0"} if (major, minor) >= (1, 18) else {}), "CPUExecutionProvider"]


def session_options(ort: Any, threads: int | None) -> Any:
    """Options of every leukoedge session. Idle intra-op threads sleep instead of spinning: a Detector
    runs two sessions back to back beside a capture thread on a few cores, and threads spinning in the
    idle session steal the cores the busy one needs (measured here: the segmenter took 18-29 ms per
    frame next to other live sessions, 14 ms alone)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend:
    """One InferenceSession per model. ONNX Runtime sessions are safe to call from several threads.

    device "cuda" runs on the CUDA execution provider; numpy inputs and outputs, copied to and from the GPU by ONNX Runtime.
    """

    def __init__(self, model_path: Path, device: str = "cpu", threads: int | None = None):
        ort = _import_onnxruntime()
        providers = _providers(ort, device)
        options = session_options(ort, threads)
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as error:  # ONNX Runtime's own classes (InvalidProtobuf, Fail, InvalidGraph, ...), not importable
            raise BundleError(
                f"ONNX Runtime {ort.__version__} cannot load model file {model_path.name}: {error} "
                "(not an ONNX model, or one with operators this ONNX Runtime lacks)"
            ) from error
        if device == "cuda" and CUDA_PROVIDER not in self.session.get_providers():
            # ONNX Runtime falls back to the CPU, logging why, when the CUDA provider cannot start: refuse that silently slow path.
            raise BackendUnavailableError(
                f"ONNX Runtime could not start its CUDA provider for {model_path.name} (CUDA or cuDNN libraries missing or "
                f"of another version than this onnxruntime-gpu was built for? its log above names the cause); it runs on {self.session.get_providers()}"
            )
        self.name = "onnxruntime" if device == "cpu" else "onnxruntime-cuda"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs))
