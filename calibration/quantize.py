"""ONNX Runtime static quantization to QDQ INT8, with calibration ranges measured once and reused.

Defaults come from measuring this project's models on an AVX2 CPU without VNNI (AMD EPYC):
- only Conv and Gemm are quantized: with MatMul quantized too, ONNX Runtime fuses the attention
  softmax into QLinearSoftmax (8-bit attention weights) and gained nothing measurable on the
  segmenter's 5 MatMuls; the LayerNorms, the sigmoid gates of the channel/spatial attention and the
  output softmax never are;
- weights per channel, activations uint8 and weights int8 with reduce_range: on x86 without VNNI
  (AVX2) u8s8 products saturate int16 otherwise; measured without it, the classifier's INT8 argmax
  agreed with FP32 on only 72 % of real cells, with it on 100 %.
"""

from __future__ import annotations

import contextlib
import io
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

DEFAULT_OP_TYPES = ("Conv", "Gemm")
# Calibration collects every intermediate tensor of a batch; a few frames at a time bound the memory.
CALIBRATION_BATCH = 4


@contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """ONNX Runtime's quantizer logs progress and generic advice (already followed here) on the root
    logger, and its histogram calibrators print to stdout; the calibration report says what matters."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _quantization():
    """onnxruntime.quantization needs the onnx package (the [train] extra)."""
    from onnxruntime import quantization

    return quantization


@dataclass(frozen=True)
class QuantizationSettings:
    """How a model is quantized; recorded in the manifest so that a quantized file can be reproduced.

    target "cpu": the defaults above, for ONNX Runtime on x86 CPUs. target "tensorrt": what TensorRT's
    explicit quantization accepts, int8 activations and weights, both symmetric (zero point 0), full
    range, weights per output channel (axis 0 of Conv and of transB Gemm weights, ONNX Runtime's
    per-channel axis for both), biases left in float (TensorRT folds them into its int8 kernels; it
    takes no int32 Q/DQ); ONNX Runtime runs such a model too, so the same gate measures it.
    """

    method: str = "minmax"  # "minmax" | "entropy" | "percentile"
    target: str = "cpu"  # "cpu" | "tensorrt"
    per_channel: bool = True
    reduce_range: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    symmetric_activations: bool = False
    quantize_bias: bool = True
    quant_format: str = "QDQ"
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    nodes_to_exclude: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def for_target(cls, target: str, method: str = "minmax") -> "QuantizationSettings":
        if target == "cpu":
            return cls(method=method)
        if target == "tensorrt":
            return cls(
                method=method, target=target, reduce_range=False, activation_type="QInt8", symmetric_activations=True, quantize_bias=False
            )
        raise ValueError(f"unknown quantization target {target!r}; expected 'cpu' or 'tensorrt'")

    @property
    def file_tag(self) -> str:
        """How this target's quantized files are named, <model>.<tag>.onnx: the CPU-target and the
        TensorRT-target INT8 models of one bundle live side by side, each with its own manifest entry."""
        return "int8" if self.target == "cpu" else "int8-trt"

    def to_manifest(self) -> dict:
        return {**asdict(self), "op_types": list(self.op_types), "nodes_to_exclude": list(self.nodes_to_exclude)}


class TensorBatches:
    """Calibration inputs for ONNX Runtime's CalibrationDataReader protocol, in small batches.

    set_range/len let quantize_static collect ranges batch by batch ("CalibStridedMinMax"),
    so memory stays that of one batch of intermediate tensors whatever the set's size.
    """

    def __init__(self, input_name: str, tensors: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        if len(tensors) == 0:
            raise ValueError("no calibration inputs: the calibration set is empty")
        self.input_name = input_name
        self.batches = [np.ascontiguousarray(tensors[i : i + batch_size], np.float32) for i in range(0, len(tensors), batch_size)]
        self.set_range(0, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self.batches))


def prepare_for_quantization(fp32_path: Path, out_path: Path) -> Path:
    """ORT's quant_pre_process: graph optimizations and ONNX shape inference, so that more tensors get
    ranges and fused patterns quantize as one. Symbolic shape inference is skipped: it fails on the
    exporter's Reshape/Shape chains of the transformer block, and ONNX shape inference covers them."""
    _quantization().quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def quantize_model(
    prepared_path: Path,
    int8_path: Path,
    settings: QuantizationSettings,
    ranges_cache: Path,
    batches: TensorBatches | None = None,
) -> Path:
    """Write the QDQ INT8 model. Ranges come from `batches` the first time and from `ranges_cache`
    after that, so trying other nodes_to_exclude costs a quantization, not a calibration."""
    quantization = _quantization()
    methods = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "entropy": quantization.CalibrationMethod.Entropy,
        "percentile": quantization.CalibrationMethod.Percentile,
    }
    if settings.method not in methods:
        raise ValueError(f"unknown calibration method {settings.method!r}; choose one of {', '.join(methods)}")
    with _quiet_onnxruntime():
        quantization.quantize_static(
            str(prepared_path),
            str(int8_path),
            batches,
            quant_format=getattr(quantization.QuantFormat, settings.quant_format),
            op_types_to_quantize=list(settings.op_types),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=getattr(quantization.QuantType, settings.activation_type),
            weight_type=getattr(quantization.QuantType, settings.weight_type),
            nodes_to_exclude=list(settings.nodes_to_exclude),
            calibrate_method=methods[settings.method],
            extra_options={
                "CalibStridedMinMax": 1,
                "ActivationSymmetric": settings.symmetric_activations,
                "QuantizeBias": settings.quantize_bias,
            },
            calibration_cache_path=str(ranges_cache),
        )
    return int8_path


def quantizable_nodes(prepared_path: Path, op_types: tuple[str, ...]) -> dict[str, list[str]]:
    """Node names of the prepared model by op type, for the op types that are quantized."""
    import onnx

    nodes: dict[str, list[str]] = {}
    for node in onnx.load(str(prepared_path), load_external_data=False).graph.node:
        if node.op_type in op_types:
            nodes.setdefault(node.op_type, []).append(node.name)
    return nodes
