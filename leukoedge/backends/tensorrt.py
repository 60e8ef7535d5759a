"""TensorRT backend (Jetson and other NVIDIA GPUs): serialized engines run with pycuda buffers.

An engine is valid only for the model it was built from, the TensorRT version that built it and
the GPU (name and compute capability) it was built on. Engines are therefore cached next to the
model in `<bundle>/engines/`, each with a JSON sidecar holding that key; an engine whose key does
not match this model, TensorRT and GPU is refused with the command that rebuilds it, never run.

tensorrt and pycuda are imported only inside the functions that need them, so this module (and the
cache-key logic in it) imports on any machine.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import sha256_file
from ..errors import BackendUnavailableError

ENGINE_DIR = "engines"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
_JETSON_EXTRA = "pip install 'leukoedge[jetson]' (on Jetson: the tensorrt of your JetPack, and pycuda)"


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailableError(f"the TensorRT backend needs the tensorrt package: {_JETSON_EXTRA}") from error
    return tensorrt


def import_pycuda() -> Any:
    """pycuda.driver, initialised; CUDA must see a GPU."""
    try:
        import pycuda.driver as cuda
    except ImportError as error:
        raise BackendUnavailableError(f"the TensorRT backend and CUDA preprocessing need pycuda: {_JETSON_EXTRA}") from error
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            raise BackendUnavailableError("CUDA finds no GPU on this machine")
    except cuda.Error as error:
        raise BackendUnavailableError(f"CUDA cannot start here: {error}") from error
    return cuda


@dataclass(frozen=True)
class EngineKey:
    """What an engine is tied to; two engines are interchangeable only if their keys are equal."""

    model_sha256: str
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"

    def mismatches(self, other: "EngineKey") -> list[str]:
        """Human-readable differences, `self` being what the engine was built for."""
        built, here = asdict(self), asdict(other)
        return [f"{name} {built[name]!r} (here {here[name]!r})" for name in built if built[name] != here[name]]


def current_key(model_path: Path, precision: str) -> EngineKey:
    """The key an engine for `model_path` at `precision` must carry on this machine (needs TensorRT and a GPU)."""
    trt = import_tensorrt()
    cuda = import_pycuda()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return EngineKey(sha256_file(model_path), precision, trt.__version__, device.name(), f"{major}.{minor}")


def engine_paths(model_path: Path, precision: str) -> tuple[Path, Path]:
    """(engine, sidecar) for a model file at a precision: <bundle>/engines/<model stem>.<precision>.engine/.json."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r}; expected one of {', '.join(ENGINE_PRECISIONS)}")
    stem = model_path.name.removesuffix(".onnx")
    stem = stem if stem.endswith(f".{precision}") else f"{stem}.{precision}"  # segmenter.int8.onnx -> segmenter.int8.engine
    folder = model_path.parent / ENGINE_DIR
    return folder / f"{stem}.engine", folder / f"{stem}.json"


def write_sidecar(sidecar: Path, key: EngineKey, source: str, profile: dict[str, Any]) -> None:
    payload = {**asdict(key), "source": source, "profile": profile, "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    sidecar.write_text(json.dumps(payload, indent=2) + "\n")


def check_engine(engine: Path, sidecar: Path, expected: EngineKey, rebuild: str) -> None:
    """Refuse a missing engine, or one whose sidecar key differs from `expected`; `rebuild` is the command to fix it."""
    if not engine.is_file() or not sidecar.is_file():
        raise BackendUnavailableError(f"no TensorRT engine {engine.name} in {engine.parent} for this model; build it: {rebuild}")
    try:
        recorded = json.loads(sidecar.read_text())
        built_for = EngineKey(**{name: recorded[name] for name in EngineKey.__dataclass_fields__})
    except (ValueError, KeyError, TypeError) as error:
        raise BackendUnavailableError(f"engine sidecar {sidecar} is unreadable ({error}); rebuild the engine: {rebuild}") from error
    differences = built_for.mismatches(expected)
    if differences:
        raise BackendUnavailableError(
            f"TensorRT engine {engine} was built for another model, TensorRT or GPU: {'; '.join(differences)}. "
            f"Engines do not transfer between them; rebuild it: {rebuild}"
        )


def rebuild_command(model_path: Path, precision: str) -> str:
    flag = {"fp32": "", "fp16": " --fp16", "int8": " --int8"}[precision]
    return f"leukoedge export --engine --bundle {model_path.parent}{flag}"


class TensorRTBackend:
    """One engine, one execution context, one CUDA stream; device buffers sized for the profile's
    largest batch, page-locked host buffers so copies overlap nothing and never page-fault.

    The context, stream and buffers are shared by every call, so run() takes one call at a time:
    threads sharing a Detector on TensorRT wait for each other instead of overwriting each other's inputs.
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path):
        trt = import_tensorrt()
        cuda = import_pycuda()
        self._cuda = cuda
        # The primary context is the one the CUDA runtime inside TensorRT uses; sharing it avoids a second context.
        self._gpu_context = cuda.Device(0).retain_primary_context()
        self._one_call_at_a_time = threading.Lock()
        self._gpu_context.push()
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_path.read_bytes())
            if self.engine is None:
                raise BackendUnavailableError(f"TensorRT could not deserialize {engine_path}; rebuild it for this TensorRT and GPU")
            self.context = self.engine.create_execution_context()
            self.stream = cuda.Stream()
            names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
            self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
            largest = {n: tuple(self.engine.get_tensor_profile_shape(n, 0)[2]) for n in self.input_names}
            self.max_batch = min(shape[0] for shape in largest.values())
            for input_name, shape in largest.items():
                self.context.set_input_shape(input_name, shape)
            sizes = {n: int(np.prod(largest[n] if n in largest else tuple(self.context.get_tensor_shape(n)))) for n in names}
            self._host = {n: cuda.pagelocked_empty(sizes[n], self._dtypes[n]) for n in names}
            self._device = {n: cuda.mem_alloc(self._host[n].nbytes) for n in names}
            for n in names:
                self.context.set_tensor_address(n, int(self._device[n]))
        finally:
            self._gpu_context.pop()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._one_call_at_a_time:
            return self._run_serialized(inputs)

    def _run_serialized(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {name: np.ascontiguousarray(inputs[name], dtype=self._dtypes[name]) for name in self.input_names}
        for name, array in batch.items():
            if array.shape[0] > self.max_batch:
                raise ValueError(f"batch {array.shape[0]} exceeds the engine's profile maximum {self.max_batch} for {name!r}")
        self._gpu_context.push()
        try:
            for name, array in batch.items():
                if not self.context.set_input_shape(name, array.shape):
                    raise ValueError(f"input {name!r} of shape {array.shape} is outside the engine's optimization profile")
                staged = self._host[name][: array.size]
                staged[:] = array.ravel()
                self._cuda.memcpy_htod_async(self._device[name], staged, self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.output_names}
            for name in self.output_names:
                self._cuda.memcpy_dtoh_async(self._host[name][: int(np.prod(shapes[name]))], self._device[name], self.stream)
            self.stream.synchronize()
        finally:
            self._gpu_context.pop()
        return {name: self._host[name][: int(np.prod(shapes[name]))].reshape(shapes[name]).copy() for name in self.output_names}


def open_engine(model_path: Path, precision: str) -> TensorRTBackend:
    """The cached engine for a bundle's model file at `precision`, after checking its key against this machine."""
    engine, sidecar = engine_paths(model_path, precision)
    check_engine(engine, sidecar, current_key(model_path, precision), rebuild_command(model_path, precision))
    return TensorRTBackend(engine)


def has_valid_engine(model_path: Path, precision: str) -> bool:
    """Whether a usable engine for this model, precision, TensorRT and GPU is cached."""
    engine, sidecar = engine_paths(model_path, precision)
    try:
        check_engine(engine, sidecar, current_key(model_path, precision), rebuild_command(model_path, precision))
    except BackendUnavailableError:
        return False
    return True
