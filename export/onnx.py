"""PyTorch -> ONNX, checked against PyTorch on real inputs.

The exported graphs include the softmax, so the runtime reads probabilities directly. Inputs and
outputs are named; the batch dimension is dynamic (1..64).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

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
    softmax written out"); onto_fast_path then splits its two reductions over the classes (split_class_reductions).
    The same probabilities to float rounding (3e-8)."""
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
    onto_fast_path(path)
    return path


def onto_fast_path(path: Path) -> Path:
    """Every rewrite that puts an exported graph on ONNX Runtime's CPU fast path (its blocked NCHWc layout), each the
    same function to float rounding: constant_resize_scales, split_channel_concats, then split_class_reductions. A graph
    none of them changes is left byte for byte."""
    constant_resize_scales(path)
    split_channel_concats(path)
    split_class_reductions(path)
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


# ONNX Runtime's CPU runs a convolution in its blocked channel layout (NCHWc, its fast path) where the input has few
# channels or a multiple of 4 (padded to its block: 8 channels with AVX2, 16 with AVX-512); other counts fall back to
# im2col and a matrix product (onnxruntime/core/optimizer/nchwc_transformer.cc; ONNX Runtime 1.32 on AVX-512 blocks a
# dense convolution over 1-16 channels or a multiple of 4, tests/export/test_onnx.py asks it). The segmenters end with a
# convolution over the upsampled features (16 channels) concatenated with the image (3): 19 channels, off the fast path,
# a third of the field segmenter's time (docs/performance.md, "The image's concat split"). Convolving each part and
# adding the results is the same function (to float rounding), on the fast path.
def on_blocked_path(channels: int) -> bool:
    """Whether ONNX Runtime's CPU runs a convolution over this many input channels in its blocked layout, with either
    block size (the AVX2 block's few channels: under 8)."""
    return channels < 8 or channels % 4 == 0


def _splits(widths: list[int]) -> bool:
    """Whether a channel concat of parts this wide is split: their sum is off the blocked path, each part is on it."""
    return not on_blocked_path(sum(widths)) and all(on_blocked_path(width) for width in widths)


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _subgraph_reads(graph: Any) -> set[str]:
    """Every name read inside the graph's subgraphs (If, Loop, Scan bodies), at any depth."""
    from onnx import AttributeProto

    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                names |= {name for inner in body.node for name in inner.input} | _subgraph_reads(body)
    return names


def remove_unread(graph: Any) -> None:
    """Remove the nodes whose outputs nothing reads (no node, subgraph or graph output), over and over back towards
    the graph's input, then the initializers nothing reads: what a rewrite left behind."""
    outputs = {value.name for value in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | _subgraph_reads(graph) | outputs
        dead = [node for node in graph.node if not any(name in read for name in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    kept = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _one_file_model(path: Path, rewrite: str) -> Any:
    """The ONNX model of `path`, refused (ValueError) where its weights lie in external data files: a rewrite saves one
    file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer):
        raise ValueError(f"{path.name} keeps its weights in external data files: {rewrite} rewrites one file only")
    return model


def _channel_counts(graph: Any) -> dict[str, int]:
    """Each tensor's channel count (dimension 1) where the graph's inputs, outputs and inferred shapes give it (0 where
    that dimension is not a fixed number)."""
    return {
        value.name: value.type.tensor_type.shape.dim[1].dim_value
        for value in [*graph.value_info, *graph.input, *graph.output]
        if len(value.type.tensor_type.shape.dim) > 1
    }


def _fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base` with the lowest number after it that no name in `taken` has; added to `taken`."""
    name, number = base, 0
    while name in taken:
        number += 1
        name = f"{base}{number}"
    taken.add(name)
    return name


def split_channel_concats(path: Path) -> Path:
    """Rewrite an ONNX file so that no dense convolution reads a channel Concat off ONNX Runtime's blocked path
    (_splits): the Concat is pushed through what reads it channel by channel (Relu, depthwise Conv: one per part,
    concatenated after) into the dense Conv that mixes the channels, which becomes one Conv per part (the weights'
    channel slices, the bias on the first) and their sum. Only a Concat whose chain of single readers ends in such a
    Conv moves. Every output the same to float rounding (~1e-7); a graph without such a Concat is left byte for byte.
    A model with its weights in external files is refused (ValueError): the rewrite saves one file."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(_one_file_model(path, "split_channel_concats"))
    graph = model.graph
    channels = _channel_counts(graph)
    weights = {tensor.name: tensor for tensor in graph.initializer}
    graph_inputs = {value.name for value in graph.input}
    kept_names = {*graph_inputs, *(value.name for value in graph.output), *(value.name for value in graph.value_info), *weights}
    kept_names |= {name for node in graph.node for name in (*node.input, *node.output, node.name)}
    untouchable = {value.name for value in graph.output} | _subgraph_reads(graph)
    replaced: set[str] = set()  # weights the rewrite sliced: dropped once nothing reads them
    counter = iter(range(1_000_000))

    def fresh(base: str) -> str:
        while (name := f"{base}_split{next(counter)}") in kept_names:
            pass
        kept_names.add(name)
        return name

    def slice_initializer(name: str, part: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.ascontiguousarray(part), fresh(name))
        graph.initializer.append(tensor)
        weights[tensor.name] = tensor
        replaced.add(name)
        return tensor.name

    def kind(node: Any, width: int) -> str:
        """"dense", "depthwise" (per channel) or "relu" where the rewrite can pass a concat of `width` channels into or
        through the node; "" otherwise."""
        if node.op_type == "Relu":
            return "relu"
        if node.op_type != "Conv" or node.input[1] not in weights or (len(node.input) > 2 and node.input[2] and node.input[2] not in weights):
            return ""
        kernel_shape = tuple(weights[node.input[1]].dims)
        group = _attribute(node, "group", 1)
        if group == 1 and kernel_shape[1] == width:
            return "dense"
        if group == width and kernel_shape[:2] == (width, 1):
            return "depthwise"
        return ""

    def readers_of(name: str, readers: dict[str, list[Any]]) -> Any | None:
        """The one node reading `name`, where it is read once and nowhere else (no graph output, no subgraph)."""
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and name not in untouchable else None

    def ends_in_dense(concat: Any, width: int, readers: dict[str, list[Any]]) -> bool:
        node = readers_of(concat.output[0], readers)
        while node is not None and kind(node, width) in ("relu", "depthwise"):
            node = readers_of(node.output[0], readers)
        return node is not None and kind(node, width) == "dense"

    def replacement(concat: Any, reader: Any, widths: list[int]) -> list[Any]:
        parts, starts, out = list(concat.input), np.cumsum([0, *widths]), reader.output[0]
        attributes = {a.name: helper.get_attribute_value(a) for a in reader.attribute if a.name != "group"}
        step = kind(reader, int(starts[-1]))

        def node(op_type: str, inputs: list[str], output: str, **extra: Any) -> Any:
            made = helper.make_node(op_type, inputs, [output], name=fresh(reader.name), **extra)
            made.metadata_props.extend(reader.metadata_props)  # where it came from (the exporter's module names)
            return made

        if step == "dense":
            kernel = numpy_helper.to_array(weights[reader.input[1]])
            bias = reader.input[2] if len(reader.input) > 2 and reader.input[2] else None
            sums = [fresh(out) for _ in parts]
            nodes = [
                node("Conv", [part, slice_initializer(reader.input[1], kernel[:, starts[k] : starts[k + 1]]), *([bias] if k == 0 and bias else [])], sums[k], **attributes)
                for k, part in enumerate(parts)
            ]
            total = sums[0]
            for k in range(1, len(parts)):
                result = out if k == len(parts) - 1 else fresh(out)
                nodes.append(node("Add", [total, sums[k]], result))
                total = result
            return nodes
        outputs = [fresh(out) for _ in parts]
        if step == "relu":
            nodes = [node("Relu", [part], output) for part, output in zip(parts, outputs)]
        else:  # depthwise
            kernel = numpy_helper.to_array(weights[reader.input[1]])
            bias = numpy_helper.to_array(weights[reader.input[2]]) if len(reader.input) > 2 and reader.input[2] else None
            nodes = []
            for k, (part, output) in enumerate(zip(parts, outputs)):
                inputs = [part, slice_initializer(reader.input[1], kernel[starts[k] : starts[k + 1]])]
                if bias is not None:
                    inputs.append(slice_initializer(reader.input[2], bias[starts[k] : starts[k + 1]]))
                nodes.append(node("Conv", inputs, output, group=widths[k], **attributes))
        channels.update(zip(outputs, widths))
        merged = helper.make_node("Concat", outputs, [out], name=fresh(concat.name), axis=1)
        merged.metadata_props.extend(concat.metadata_props)
        return [*nodes, merged]

    rewrites = 0
    changed = True
    while changed:  # each rewrite moves a Concat one node on, or removes it
        changed = False
        readers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        for concat in graph.node:
            if concat.op_type != "Concat" or _attribute(concat, "axis") != 1:
                continue
            widths = [channels.get(part, 0) for part in concat.input]
            if not all(widths) or not _splits(widths) or not ends_in_dense(concat, sum(widths), readers):
                continue
            reader = readers_of(concat.output[0], readers)
            nodes = replacement(concat, reader, widths)
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
    read = {name for node in graph.node for name in node.input} | _subgraph_reads(graph)
    orphans = {name for name in replaced if name not in read and name not in graph_inputs}
    kept = [tensor for tensor in graph.initializer if tensor.name not in orphans]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # inferred above for the channel counts; ONNX Runtime infers its own
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# The exporter writes F.interpolate(x, size=skip.shape[-2:]) as a Resize whose output `sizes` are computed from the
# skip tensor's shape at run time. ONNX Runtime runs a Resize in its blocked layout (its NCHWc Upsample, bilinear
# included) only with constant whole `scales`, and cannot prove the output's shape from computed sizes, so the Add that
# follows a split convolution (split_channel_concats) is not fused either: the field segmenter's five upsamplings and the
# layout changes around them took ~1.8 of its 6.3 ms (docs/performance.md, "Constant upsampling scales"). A model's
# spatial input size is fixed, so each computed size is a fixed whole multiple of the Resize's input: the same function.
def constant_resize_scales(path: Path) -> Path:
    """Rewrite an ONNX file so that every Resize given computed `sizes` that are a whole multiple of its input (batch and
    channels unscaled) at the model's fixed spatial input size takes constant `scales` instead; the nodes that computed
    the sizes, and the constants only they read, go. The sizes are read by running the graph once (ONNX Runtime, a
    batch of one of zeros). A graph with no such Resize, or whose input's spatial size is not fixed, is left byte for
    byte; external data is refused (ValueError), as split_channel_concats."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = _one_file_model(path, "constant_resize_scales")
    graph = model.graph
    weights = {tensor.name for tensor in graph.initializer}
    # Computed sizes only, stretched to them (the default policy: the scale on each axis is size / input), no region of
    # interest (tf_crop_and_resize reads one): then sizes k times the input and scale k are the same Resize.
    resizes = [
        node
        for node in graph.node
        if node.op_type == "Resize"
        and len(node.input) > 3
        and node.input[3]
        and node.input[3] not in weights
        and _attribute(node, "keep_aspect_ratio_policy", b"stretch") == b"stretch"
        and _attribute(node, "coordinate_transformation_mode", b"half_pixel") != b"tf_crop_and_resize"
    ]
    if not resizes or len(graph.input) != 1:
        return path
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or any(not dim.HasField("dim_value") for dim in dims[1:]):
        return path
    probe = onnx.load(str(path), load_external_data=False)
    names = [name for node in resizes for name in (node.input[0], node.output[0])]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(names))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = (1, *(dim.dim_value for dim in dims[1:]))
    values = session.run(names, {graph.input[0].name: np.zeros(shape, np.float32)})
    shapes = {name: value.shape for name, value in zip(names, values)}
    taken = weights | {name for node in graph.node for name in (*node.input, *node.output)}
    rewrites = 0
    for node in resizes:
        before, after = shapes[node.input[0]], shapes[node.output[0]]
        factors = [out // size if size and out % size == 0 else 0 for size, out in zip(before, after)]
        if len(factors) != 4 or factors[:2] != [1, 1] or not all(factors):
            continue
        scales = numpy_helper.from_array(np.array(factors, np.float32), _fresh_name(f"{node.output[0]}_scales", taken))
        graph.initializer.append(scales)
        node.input[2] = scales.name
        del node.input[3]
        rewrites += 1
    if not rewrites:
        return path
    remove_unread(graph)  # what computed the sizes is read by nothing now
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


# class_probabilities' written-out softmax reduces over the class axis twice (ReduceMax, ReduceSum). ONNX Runtime's CPU
# reduces a middle axis of three values slowly. The class planes split apart and met elementwise (Max, Sum: one pass
# over them) are the same values, bit for bit on every input tried (the sum is taken in the same order): the field
# segmenter 6.05 -> 5.81 ms a call (ORT 1.32, 2-core x86; scripts/rewrite_bundle_graphs.py, docs/performance.md,
# "The class axis split").
MAX_SPLIT_CLASSES = 8


def split_class_reductions(path: Path) -> Path:
    """Rewrite an ONNX file so that every ReduceMax or ReduceSum over axis 1 alone, keeping it, of a tensor with at most
    MAX_SPLIT_CLASSES channels (known from shape inference) becomes a Split of those channels and one elementwise
    Max or Sum of the parts. A graph without such a reduction is left byte for byte; external data is refused
    (ValueError), as split_channel_concats."""
    import onnx
    from onnx import helper, numpy_helper

    model = _one_file_model(path, "split_class_reductions")
    channels = _channel_counts(onnx.shape_inference.infer_shapes(model).graph)
    graph = model.graph
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    taken = set(weights) | {name for node in graph.node for name in (*node.input, *node.output, node.name)}

    def splits(node: Any) -> bool:
        axes = weights.get(node.input[1]) if len(node.input) > 1 else None
        return (
            node.op_type in ("ReduceMax", "ReduceSum")
            and axes is not None
            and axes.tolist() == [1]
            and _attribute(node, "keepdims", 1) == 1
            and 2 <= channels.get(node.input[0], 0) <= MAX_SPLIT_CLASSES
        )

    rebuilt, rewrites = [], 0
    for node in graph.node:
        if not splits(node):
            rebuilt.append(node)
            continue
        parts = [_fresh_name(f"{node.output[0]}_class{index}", taken) for index in range(channels[node.input[0]])]
        split = helper.make_node("Split", [node.input[0]], parts, name=_fresh_name(f"{node.name}_split", taken), axis=1, num_outputs=len(parts))
        meet = helper.make_node("Max" if node.op_type == "ReduceMax" else "Sum", parts, list(node.output), name=node.name)
        for made in (split, meet):
            made.metadata_props.extend(node.metadata_props)
        rebuilt += [split, meet]
        rewrites += 1
    if not rewrites:
        return path  # the file as it was, byte for byte
    del graph.node[:]
    graph.node.extend(rebuilt)
    read = {name for node in graph.node for name in node.input} | _subgraph_reads(graph)
    kept = [tensor for tensor in graph.initializer if tensor.name in read]  # the axes only the reductions read
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
