"""PyTorch -> ONNX, checked against PyTorch on real inputs.

The exported graphs include the softmax, so the runtime reads probabilities directly. Inputs and
outputs are named; the batch dimension is dynamic (1..64).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("leukoedge.export")

OPSET = 18
MAX_BATCH = 64
# fp32 ONNX Runtime vs PyTorch on the same CPU: differences are rounding only (measured ~1e-7).
PARITY_TOLERANCE = 1e-4


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (1) of Nx3xHxW logits, written out: it exports as ReduceMax, Sub, Exp, ReduceSum
    and Div, which ONNX Runtime's CPU runs in about a third of the time of its Softmax over an axis that is not
    the last (segmenter 16.6 -> 15.5 ms a frame, refiner 8.5 -> 6.4 ms for 16 crops; docs/performance.md, "The
    softmax written out"). The same probabilities to float rounding (3e-8)."""
    exp = (logits - logits.amax(dim=1, keepdim=True)).exp()
    return exp / exp.sum(dim=1, keepdim=True)


class SegmenterWithSoftmax(nn.Module):
    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return class_probabilities(self.segmenter(image))


class ClassifierWithSoftmax(nn.Module):
    """Multi-head classifier -> one probability tensor per head, in a fixed head order."""

    def __init__(self, classifier: nn.Module, head_order: list[str]):
        super().__init__()
        self.classifier = classifier
        self.head_order = head_order

    def forward(self, crop: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.classifier(crop)
        return tuple(outputs[head].softmax(dim=1) for head in self.head_order)


class ParityError(RuntimeError):
    """The exported ONNX graph does not reproduce PyTorch within tolerance."""


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
) -> Path:
    """Export with the torch.export-based exporter (the legacy TorchScript one mis-exports attention)."""
    module = module.eval()
    if example.shape[0] < 2:
        # torch.export specializes a dimension of size 1: an example batch of 2 keeps the batch dynamic.
        example = example.repeat(2, 1, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
    strip_stack_traces(path)
    return path


# Node metadata the exporter writes: the Python stack of each operation, with the absolute paths of the machine that
# exported it. A shipped model must not carry those (nor does anything read them); the module names stay.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(path: Path) -> Path:
    """Rewrite an ONNX file without its nodes' stack-trace metadata (the graph and weights untouched)."""
    import onnx

    model = onnx.load(str(path))
    graphs = [model.graph, *(function for function in model.functions)]
    for graph in graphs:
        for node in graph.node:
            kept = [prop for prop in node.metadata_props if prop.key != STACK_TRACE_KEY]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    onnx.save(model, str(path))
    return path


def check_parity(module: nn.Module, path: Path, inputs: np.ndarray, input_name: str, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max abs difference between ONNX Runtime and PyTorch over all outputs on `inputs`; raises above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_outputs = session.run(None, {input_name: inputs.astype(np.float32)})
    with torch.no_grad():
        torch_outputs = module.eval()(torch.from_numpy(inputs.astype(np.float32)))
    if isinstance(torch_outputs, torch.Tensor):
        torch_outputs = (torch_outputs,)
    difference = max(float(np.abs(o - t.numpy()).max()) for o, t in zip(onnx_outputs, torch_outputs))
    log.info("parity %s: max |onnx - torch| = %.3g on %d real inputs", path.name, difference, len(inputs))
    if difference > tolerance:
        raise ParityError(f"{path.name}: ONNX differs from PyTorch by {difference:.3g} (> {tolerance:g}) on real inputs")
    return difference


def export_segmenter(segmenter: nn.Module, real_inputs: np.ndarray, path: Path, input_name: str = "image") -> float:
    """Export a segmenter as <input_name> -> probs and return the parity difference on real inputs
    (the field segmenter takes "image"; the per-cell refiner, the same kind of model, takes "crop")."""
    wrapped = SegmenterWithSoftmax(segmenter)
    export_onnx(wrapped, torch.from_numpy(real_inputs[:2].astype(np.float32)), path, input_name, ["probs"])
    return check_parity(wrapped, path, real_inputs, input_name)


def export_classifier(classifier: nn.Module, head_order: list[str], real_inputs: np.ndarray, path: Path) -> float:
    """Export a multi-head classifier as crop -> <head>_probs and return the parity difference."""
    wrapped = ClassifierWithSoftmax(classifier, head_order)
    export_onnx(wrapped, torch.from_numpy(real_inputs[:2].astype(np.float32)), path, "crop", [f"{h}_probs" for h in head_order])
    return check_parity(wrapped, path, real_inputs, "crop")
