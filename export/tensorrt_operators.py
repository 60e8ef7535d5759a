"""What TensorRT 10's ONNX parser takes, as data, and a check of a graph against it.

Source: onnx/onnx-tensorrt, docs/operators.md ("Operator Support Matrix"), the copy of the 10.x line
that states "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"; the
operators its CHANGELOG.md lists as added after 10.3 are left out (BlackmanWindow, HammingWindow and
HannWindow in 10.4, STFT in 10.5, Attention in 10.14, RMSNormalization, RotaryEmbedding and
TensorScatter in 10.15), so the list is what JetPack 6's TensorRT 10.3 parses. The opset range is the
one TensorRT 10.0's copy of that file states (9 to 20). The restrictions checked below are those of
the same table that apply to the operators leukoedge's graphs use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SOURCE = "onnx/onnx-tensorrt docs/operators.md (10.x line, less the operators added after 10.3 per its CHANGELOG.md)"
OPSET_RANGE = (9, 20)
SUPPORTED_OPERATORS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
    IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
    OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
    ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _onnx() -> Any:
    import onnx

    return onnx


def _attribute(node: Any, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            value = _onnx().helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def unsupported_operators(model: Any) -> list[str]:
    """Nodes TensorRT 10's parser has no importer for (custom-domain nodes need a plugin), one entry per op type."""
    found = {}
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            found.setdefault(f"{node.domain}::{node.op_type}", node.name)
        elif node.op_type not in SUPPORTED_OPERATORS:
            found.setdefault(node.op_type, node.name)
    return [f"operator {op} (node {name!r}) is not in TensorRT 10's ONNX operator list" for op, name in sorted(found.items())]


def _opset_problems(model: Any) -> list[str]:
    opsets = [entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS]
    low, high = OPSET_RANGE
    return [f"ONNX opset {opset} is outside TensorRT 10's range {low}..{high}" for opset in opsets if not low <= opset <= high]


def _restriction_problems(model: Any) -> list[str]:
    constants = {tensor.name for tensor in model.graph.initializer} | {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    problems = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and any(node.output[1:]):
            problems.append(f"LayerNormalization {node.name!r}: TensorRT supports only its first output")
        if node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            problems.append(f"{node.op_type} {node.name!r}: its axes must be an initializer for TensorRT")
        if node.op_type == "Resize":
            mode, coordinates = _attribute(node, "mode", "nearest"), _attribute(node, "coordinate_transformation_mode", "half_pixel")
            if mode not in RESIZE_MODES or coordinates not in RESIZE_COORDINATES or _attribute(node, "antialias", 0):
                problems.append(f"Resize {node.name!r}: mode {mode!r}, coordinate_transformation_mode {coordinates!r} or antialias are unsupported by TensorRT")
    return problems


def quantization_problems(model: Any) -> list[str]:
    """TensorRT's explicit quantization: every Q/DQ with an INT8 zero point of 0 (UINT8 and non-zero zero
    points are refused), no INT32 Q/DQ (bias), and per-channel weight scales along axis 0 (the output
    channels of Conv weights and of Gemm weights with transB=1)."""
    numpy_helper = _onnx().numpy_helper
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero_point = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            problems.append(f"{node.op_type} {node.name!r} has no INT8 zero-point initializer (an absent one means UINT8)")
            continue
        values = numpy_helper.to_array(zero_point)
        if values.dtype.name != "int8":
            problems.append(f"{node.op_type} {node.name!r}: zero point of type {values.dtype.name}, TensorRT takes INT8 only")
        elif values.any():
            problems.append(f"{node.op_type} {node.name!r}: non-zero zero point {values.ravel()[:4].tolist()}, TensorRT takes symmetric quantization only")
        scale = initializers.get(node.input[1])
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers and scale is not None and numpy_helper.to_array(scale).size > 1:
            axis = _attribute(node, "axis", 1)
            if axis != 0:
                problems.append(f"DequantizeLinear {node.name!r}: per-channel weight scales on axis {axis}, expected 0 (output channels)")
    return problems


def graph_problems(onnx_path: Path, tensorrt_int8: bool = False) -> list[str]:
    """Why TensorRT 10 would refuse this graph (empty: nothing found). tensorrt_int8: it must also carry
    Q/DQ nodes, else an "int8" engine of it would silently be an fp16 one. Without the onnx package (a
    Jetson with only the [jetson] extra) nothing is checked here; TensorRT's parser still is."""
    try:
        model = _onnx().load(str(onnx_path), load_external_data=False)
    except ImportError:
        return []
    problems = _opset_problems(model) + unsupported_operators(model) + _restriction_problems(model) + quantization_problems(model)
    if tensorrt_int8 and not any(node.op_type == "QuantizeLinear" for node in model.graph.node):
        problems.append("it has no QuantizeLinear/DequantizeLinear nodes: it is not an INT8 (QDQ) graph")
    return problems
