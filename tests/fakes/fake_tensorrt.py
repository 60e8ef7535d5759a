"""A fake `tensorrt` for tests: the subset of TensorRT 10's Python API that leukoedge's backend and
exporter use, run by ONNX Runtime on the CPU, with device memory and streams from fake_pycuda.

What it checks as TensorRT does: the ONNX parser refuses operators outside TensorRT 10's list
(leukoedge/export/tensorrt_operators.py, taken from onnx-tensorrt's docs) and Q/DQ nodes whose zero
points are not INT8 zeros (UINT8 activations, INT32 biases); the builder refuses dynamic inputs
without an optimization profile and profiles that do not fit the inputs; the runtime refuses engines
of another TensorRT version or compute capability; an execution context refuses input shapes outside
the profile and runs only with every input shape and tensor address set, on its stream.
What it does not: its numbers are ONNX Runtime's fp32 (or QDQ) results whatever the builder flags, so
it tests the plumbing, not TensorRT's fp16/int8 numerics; those are checked on a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from leukoedge.export.tensorrt_operators import OPSET_RANGE, SUPPORTED_OPERATORS

from . import fake_pycuda

__version__ = "10.3.0"
_MAGIC = b"FAKETRT1"


class ILogger:
    """The logger interface: TensorRT calls log() of a subclass (trt.Logger is TensorRT's own)."""

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def log(self, severity: "ILogger.Severity", msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity: "ILogger.Severity" = ILogger.Severity.WARNING):
        self.min_severity = min_severity
        self.messages: list[tuple[Logger.Severity, str]] = []

    def log(self, severity: "Logger.Severity", message: str) -> None:
        self.messages.append((severity, message))


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
          DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL, 2: DataType.UINT8, 7: DataType.INT64}


def nptype(trt_type: DataType) -> type:
    return _NUMPY[trt_type]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    BF16 = 1
    INT8 = 2
    STRICT_TYPES = 5


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
    STRONGLY_TYPED = 1


class Dims(tuple):
    """TensorRT's Dims: a sequence of ints, -1 for a dynamic dimension."""


class ITensor:
    def __init__(self, name: str, shape: Dims, dtype: DataType, symbols: tuple[str, ...]):
        self.name, self.shape, self.dtype, self.symbols = name, shape, dtype, symbols


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.onnx_bytes = b""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]


class ParserError:
    def __init__(self, node: str, description: str):
        self._node, self._description = node, description

    def desc(self) -> str:
        return self._description

    def node_name(self) -> str:
        return self._node

    def __str__(self) -> str:
        return f"In node {self._node!r}: {self._description}"


def _tensor(value_info: Any) -> ITensor:
    tensor_type = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    symbols = tuple(d.dim_param for d in tensor_type.shape.dim)
    return ITensor(value_info.name, Dims(dims), _ONNX_TYPES[tensor_type.elem_type], symbols)


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger):
        self.network, self.logger = network, logger
        self.errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> ParserError:
        return self.errors[index]

    def clear_errors(self) -> None:
        self.errors = []

    def parse_from_file(self, path: str) -> bool:
        return self.parse(Path(path).read_bytes())

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        graph_model = onnx.load_from_string(model)
        self.errors = self._refusals(graph_model)
        if self.errors:
            return False
        initializers = {tensor.name for tensor in graph_model.graph.initializer}
        self.network.inputs = [_tensor(value) for value in graph_model.graph.input if value.name not in initializers]
        self.network.outputs = [_tensor(value) for value in graph_model.graph.output]
        self.network.onnx_bytes = model
        return True

    @staticmethod
    def _refusals(model: Any) -> list[ParserError]:
        from onnx import numpy_helper

        errors = []
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= entry.version <= OPSET_RANGE[1]:
                errors.append(ParserError("", f"unsupported ONNX opset {entry.version}"))
        initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPERATORS:
                errors.append(ParserError(node.name, f"No importer registered for op: {node.op_type}"))
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zero_point = initializers.get(node.input[2]) if len(node.input) > 2 else None
                if zero_point is None or zero_point.dtype != np.int8 or zero_point.any():
                    errors.append(ParserError(node.name, "Assertion failed: zero point must be an INT8 zero (symmetric quantization)"))
        return errors


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's keyword names
        self.shapes[input] = (Dims(min), Dims(opt), Dims(max))

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        return list(self.shapes[input])


class ITimingCache:
    def __init__(self, entries: dict[str, str]):
        self.entries = entries

    def serialize(self) -> bytes:
        return json.dumps(self.entries, sort_keys=True).encode()


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self.flags

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self.pools[pool]

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        return ITimingCache(json.loads(serialized_timing_cache) if serialized_timing_cache else {})

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class IHostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


def _current_gpu() -> fake_pycuda.GpuSpec:
    gpu = fake_pycuda._state["gpu"]
    if gpu is None:
        raise RuntimeError("CUDA initialization failure with error: 100 (no CUDA-capable device is detected)")
    return gpu


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def _profile_error(self, network: INetworkDefinition, config: IBuilderConfig) -> str | None:
        dynamic = [tensor for tensor in network.inputs if -1 in tensor.shape]
        if dynamic and not config.profiles:
            return "Network has dynamic or shape inputs, but no optimization profile has been defined."
        for profile in config.profiles:
            for tensor in dynamic:
                if tensor.name not in profile.shapes:
                    return f"{tensor.name}: dynamic input is missing dimensions in profile 0."
                low, typical, high = profile.shapes[tensor.name]
                for shape in (low, typical, high):
                    if len(shape) != len(tensor.shape) or any(want not in (-1, got) for want, got in zip(tensor.shape, shape)):
                        return f"{tensor.name}: profile shape {shape} does not match the input's dimensions {tensor.shape}"
                if not all(a <= b <= c for a, b, c in zip(low, typical, high)):
                    return f"{tensor.name}: profile must satisfy min <= opt <= max, got {low}, {typical}, {high}"
        return None

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        error = self._profile_error(network, config)
        if error:
            self.logger.log(Logger.ERROR, error)
            return None
        header = {
            "tensorrt": __version__,
            "compute_capability": list(_current_gpu().compute_capability),
            "flags": sorted(flag.name for flag in config.flags),
            "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
            "io": [[t.name, "INPUT", list(t.shape), t.dtype.name, list(t.symbols)] for t in network.inputs]
            + [[t.name, "OUTPUT", list(t.shape), t.dtype.name, list(t.symbols)] for t in network.outputs],
            "profiles": [{name: [list(s) for s in shapes] for name, shapes in profile.shapes.items()} for profile in config.profiles],
        }
        if config.timing_cache is not None:  # the "tactics" timed for this network, kept for the next build
            config.timing_cache.entries[hashlib.sha256(network.onnx_bytes).hexdigest()] = "+".join(header["flags"]) or "FP32"
        encoded = json.dumps(header).encode()
        return IHostMemory(_MAGIC + struct.pack("<I", len(encoded)) + encoded + network.onnx_bytes)


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> "ICudaEngine | None":
        data = bytes(serialized_engine)
        if not data.startswith(_MAGIC):
            self.logger.log(Logger.ERROR, "1: [stdArchiveReader.cpp::StdArchiveReader] Error: Magic tag does not match")
            return None
        (length,) = struct.unpack("<I", data[len(_MAGIC) : len(_MAGIC) + 4])
        start = len(_MAGIC) + 4
        header = json.loads(data[start : start + length])
        if header["tensorrt"] != __version__:
            self.logger.log(Logger.ERROR, f"The engine plan file is not compatible with this version of TensorRT ({header['tensorrt']} vs {__version__})")
            return None
        if tuple(header["compute_capability"]) != _current_gpu().compute_capability:
            self.logger.log(Logger.ERROR, "The engine plan file is generated on an incompatible device")
            return None
        return ICudaEngine(header, data[start + length :])


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes):
        import onnxruntime as ort

        self.header = header
        self.io = {name: (TensorIOMode[mode], Dims(shape), DataType[dtype], tuple(symbols)) for name, mode, shape, dtype, symbols in header["io"]}
        self.names = [entry[0] for entry in header["io"]]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.header["profiles"])

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> Dims:
        return self.io[name][1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if self.get_tensor_mode(name) != TensorIOMode.INPUT:
            raise RuntimeError(f"{name} is not an input tensor: it has no profile shape")
        return [Dims(shape) for shape in self.header["profiles"][profile_index][name]]

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.input_shapes: dict[str, Dims] = {}
        self.addresses: dict[str, int] = {}
        self.errors: list[str] = []

    def set_input_shape(self, name: str, shape: Any) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        shape = Dims(int(dim) for dim in shape)
        if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            self.errors.append(f"setInputShape: {name} shape {shape} is outside the profile [{low}, {high}]")
            return False
        self.input_shapes[name] = shape
        return True

    def _symbol_sizes(self) -> dict[str, int]:
        sizes = {}
        for name, shape in self.input_shapes.items():
            for symbol, size in zip(self.engine.io[name][3], shape):
                if symbol:
                    sizes[symbol] = size
        return sizes

    def get_tensor_shape(self, name: str) -> Dims:
        mode, shape, _, symbols = self.engine.io[name]
        if mode == TensorIOMode.INPUT:
            return self.input_shapes.get(name, shape)
        sizes = self._symbol_sizes()
        return Dims(sizes.get(symbol, -1) if dim == -1 else dim for dim, symbol in zip(shape, symbols))

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.io:
            self.errors.append(f"setTensorAddress: no tensor {name!r}")
            return False
        self.addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        inputs = [name for name in self.engine.names if self.engine.io[name][0] == TensorIOMode.INPUT]
        missing = [name for name in inputs if name not in self.input_shapes] + [name for name in self.engine.names if name not in self.addresses]
        if missing:
            self.errors.append(f"enqueueV3: shapes or addresses not set for {missing}")
            return False
        shapes = {name: self.get_tensor_shape(name) for name in self.engine.names}
        fake_pycuda.stream_for(stream_handle).enqueue(lambda: self._run(inputs, shapes))
        return True

    def _run(self, inputs: list[str], shapes: dict[str, Dims]) -> None:
        def view(name: str) -> np.ndarray:
            dtype = np.dtype(nptype(self.engine.io[name][2]))
            nbytes = int(np.prod(shapes[name])) * dtype.itemsize
            return fake_pycuda.device_bytes(self.addresses[name], nbytes).view(dtype).reshape(shapes[name])

        feed = {name: view(name).copy() for name in inputs}
        outputs = [name for name in self.engine.names if name not in inputs]
        for name, value in zip(outputs, self.engine.session.run(outputs, feed)):
            if value.shape != shapes[name]:
                raise AssertionError(f"fake TensorRT resolved {name} to {shapes[name]}, ONNX Runtime gave {value.shape}")
            view(name)[...] = value
