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
    split_channel_concats(path)
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


# ONNX Runtime's CPU runs a convolution in its blocked channel layout (NCHWc, its fast path) only where the input has
# fewer channels than its block (8 with AVX2, 16 with AVX-512) or a multiple of it; otherwise it falls back to im2col and
# a matrix product (onnxruntime/core/optimizer/nchwc_transformer.cc). The segmenters end with a convolution over the
# upsampled features (16 channels) concatenated with the image (3): 19 channels, off the fast path, a third of the
# field segmenter's time (docs/performance.md, "The image's concat split"). Convolving each part and adding the results
# is the same function (to float rounding), on the fast path.
NCHWC_BLOCKS = (8, 16)


def on_blocked_path(channels: int) -> bool:
    """Whether ONNX Runtime's CPU can run a dense convolution over this many input channels in its blocked layout,
    with either block size."""
    return all(channels < block or channels % block == 0 for block in NCHWC_BLOCKS)


def _splits(widths: list[int]) -> bool:
    """Whether a channel concat of parts this wide is split: their sum is off the blocked path, each part is on it."""
    return not on_blocked_path(sum(widths)) and all(on_blocked_path(width) for width in widths)


def split_channel_concats(path: Path) -> Path:
    """Rewrite an ONNX file so that no convolution reads a channel Concat off ONNX Runtime's blocked path (_splits):
    the Concat is pushed through what reads it channel by channel (Relu, depthwise Conv: one per part, concatenated
    after) into the dense Conv that mixes the channels, which becomes one Conv per part (the weights' channel slices,
    the bias on the first) and their sum. Every output the same to float rounding (~1e-7); graphs without such a
    Concat are left as they are, byte for byte."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    channels = {
        value.name: value.type.tensor_type.shape.dim[1].dim_value
        for value in [*graph.value_info, *graph.input, *graph.output]
        if len(value.type.tensor_type.shape.dim) > 1
    }
    weights = {tensor.name: tensor for tensor in graph.initializer}
    graph_outputs = {output.name for output in graph.output}
    names = iter(range(1_000_000))

    def fresh(base: str) -> str:
        return f"{base}_split{next(names)}"

    def slice_initializer(name: str, part: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.ascontiguousarray(part), fresh(name))
        graph.initializer.append(tensor)
        weights[tensor.name] = tensor
        return tensor.name

    def replacement(concat: onnx.NodeProto, reader: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        parts = list(concat.input)
        widths = [channels.get(part, 0) for part in parts]
        if not all(widths) or not _splits(widths):
            return None
        starts = np.cumsum([0, *widths])
        attributes = {a.name: helper.get_attribute_value(a) for a in reader.attribute}
        out = reader.output[0]
        if reader.op_type == "Relu":
            outputs = [fresh(out) for _ in parts]
            nodes = [helper.make_node("Relu", [part], [o], name=fresh(reader.name)) for part, o in zip(parts, outputs)]
        elif reader.op_type == "Conv" and reader.input[1] in weights:
            kernel = numpy_helper.to_array(weights[reader.input[1]])
            bias = reader.input[2] if len(reader.input) > 2 and reader.input[2] else None
            group = attributes.pop("group", 1)
            if group == starts[-1] and kernel.shape[:2] == (starts[-1], 1):  # depthwise: channel by channel
                bias_values = None if bias is None else numpy_helper.to_array(weights[bias])
                outputs, nodes = [], []
                for k, part in enumerate(parts):
                    inputs = [part, slice_initializer(reader.input[1], kernel[starts[k] : starts[k + 1]])]
                    if bias_values is not None:
                        inputs.append(slice_initializer(bias, bias_values[starts[k] : starts[k + 1]]))
                    outputs.append(fresh(out))
                    nodes.append(helper.make_node("Conv", inputs, [outputs[-1]], name=fresh(reader.name), group=widths[k], **attributes))
            elif group == 1 and kernel.shape[1] == starts[-1]:  # dense: the sum of each part's convolution
                sums = [fresh(out) for _ in parts]
                nodes = [
                    helper.make_node(
                        "Conv", [part, slice_initializer(reader.input[1], kernel[:, starts[k] : starts[k + 1]]), *([bias] if k == 0 and bias else [])],
                        [sums[k]], name=fresh(reader.name), **attributes,
                    )
                    for k, part in enumerate(parts)
                ]
                total = sums[0]
                for k in range(1, len(parts)):
                    result = out if k == len(parts) - 1 else fresh(out)
                    nodes.append(helper.make_node("Add", [total, sums[k]], [result], name=fresh(reader.name)))
                    total = result
                return nodes
            else:
                return None
        else:
            return None
        for k, o in enumerate(outputs):
            channels[o] = widths[k]
        return [*nodes, helper.make_node("Concat", outputs, [out], name=fresh(concat.name), axis=1)]

    rewrites = 0
    changed = True
    while changed:  # each rewrite moves a Concat one node on, or removes it
        changed = False
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        for concat in graph.node:
            axis = next((helper.get_attribute_value(a) for a in concat.attribute if a.name == "axis"), None)
            if concat.op_type != "Concat" or axis != 1 or concat.output[0] in graph_outputs or len(readers.get(concat.output[0], [])) != 1:
                continue
            reader = readers[concat.output[0]][0]
            nodes = replacement(concat, reader)
            if nodes is None:
                continue
            rebuilt = []
            for node in graph.node:
                if node is reader:
                    rebuilt.extend(nodes)
                elif node is not concat:
                    rebuilt.append(node)
            del graph.node[:]
            graph.node.extend(rebuilt)
            changed = True
            rewrites += 1
            break
    if not rewrites:
        return path  # the file as it was, byte for byte
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # inferred above for the channel counts; ONNX Runtime infers its own
    onnx.checker.check_model(model)
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
