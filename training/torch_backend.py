"""A bundle's models in PyTorch eager mode behind the runtime's Backend protocol.

The baseline `leukoedge bench --compare` measures ONNX Runtime against: the training checkpoints
(training.pipeline saves them as <bundle parent>/checkpoints/<bundle name>-segmenter.pt and
-classifier.pt), wrapped exactly as export/onnx.py wraps them for export (softmax included), and
checked against the bundle's ONNX files before they are timed, so a stale checkpoint is refused.
Grad-CAM (training/explain.py) takes its classifier from the same verified loader, verified_model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from leukoedge.backends.onnxruntime import OnnxRuntimeBackend
from leukoedge.bundle import MODELS, Bundle
from leukoedge.errors import LeukoedgeError
from leukoedge.export.onnx import ClassifierWithSoftmax, SegmenterWithSoftmax

from .train import load_checkpoint

# fp32 ONNX Runtime against PyTorch on one input; export parity is ~1e-7, a different checkpoint is off by far more.
MATCH_TOLERANCE = 1e-3


class TorchBackend:
    """A torch module as a Backend: named float32 inputs in, named numpy outputs out."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, input_name: str, output_names: list[str]):
        self.module = module.eval()
        self.input_names = [input_name]
        self.output_names = output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(np.ascontiguousarray(inputs[self.input_names[0]], np.float32)))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {name: output.numpy() for name, output in zip(self.output_names, outputs)}


def checkpoint_paths(bundle_path: Path, folder: Path | None = None, models: Sequence[str] = MODELS) -> dict[str, Path]:
    """Where training.pipeline saved the checkpoints of `models` of the bundle at bundle_path (or in `folder`)."""
    folder = folder or Path(bundle_path).parent / "checkpoints"
    return {model: folder / f"{Path(bundle_path).name}-{model}.pt" for model in models}


def _require_files(paths: list[Path]) -> None:
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise LeukoedgeError(f"no training checkpoints {', '.join(missing)}")


def as_backend(bundle: Bundle, model: str, module: torch.nn.Module) -> TorchBackend:
    """`module` wrapped exactly as export/onnx.py wrapped it for export (softmax included)."""
    spec = bundle.manifest[model]
    if model in ("segmenter", "refiner"):
        return TorchBackend(SegmenterWithSoftmax(module), spec["input"], [spec["output"]])
    if model == "gate":
        from .gate import GATE_HEAD

        return TorchBackend(ClassifierWithSoftmax(module, [GATE_HEAD]), spec["input"], [spec["output"]])
    return TorchBackend(ClassifierWithSoftmax(module, list(spec["heads"])), spec["input"], [head["output"] for head in spec["heads"].values()])


def verified_model(bundle: Bundle, model: str, checkpoint: Path) -> torch.nn.Module:
    """The `model` ("segmenter", "refiner", "classifier" or "gate") of `bundle` rebuilt from its training checkpoint, in
    eval mode; LeukoedgeError when the checkpoint is missing or its outputs differ from the bundle's ONNX file."""
    _require_files([checkpoint])
    if model == "gate":
        module = _gate_module(bundle, checkpoint)
    else:
        model_kwargs = {}
        if model == "classifier":
            model_kwargs["head_classes"] = {name: len(spec["classes"]) for name, spec in bundle.manifest["classifier"]["heads"].items()}
        module, _ = load_checkpoint(checkpoint, **model_kwargs)
    backend = as_backend(bundle, model, module)
    height, width = bundle.manifest[model]["input_size"]
    probe = {backend.input_names[0]: np.random.default_rng(0).normal(0.0, 1.0, (1, 3, height, width)).astype(np.float32)}
    reference = OnnxRuntimeBackend(bundle.path(bundle.manifest[model]["file"])).run(probe)
    difference = max(float(np.abs(reference[name] - output).max()) for name, output in backend.run(probe).items())
    if difference > MATCH_TOLERANCE:
        raise LeukoedgeError(
            f"checkpoint {checkpoint} is not the {model} of bundle {bundle.name}: its outputs differ from the ONNX file's by {difference:.3g}"
        )
    return module


def _gate_module(bundle: Bundle, checkpoint: Path) -> torch.nn.Module:
    """The gate as training/gate.build_gated_bundle saved it: gate_cnn's weights, its one head named in the JSON."""
    from .gate import GATE_HEAD
    from .models.classifiers import gate_cnn

    module = gate_cnn({GATE_HEAD: len(bundle.manifest["gate"]["classes"])})
    module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return module.eval()


def torch_backends(bundle: Bundle, checkpoints: dict[str, Path], threads: int | None = None) -> dict[str, TorchBackend]:
    """The models of `bundle` named in `checkpoints` in PyTorch eager FP32, verified against the bundle's ONNX files."""
    _require_files(list(checkpoints.values()))
    if threads:
        torch.set_num_threads(threads)
    return {model: as_backend(bundle, model, verified_model(bundle, model, checkpoint)) for model, checkpoint in checkpoints.items()}
