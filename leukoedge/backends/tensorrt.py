"""TensorRT backend (Jetson and other NVIDIA GPUs): serialized engines run with pycuda buffers.

leukoedge runs on TensorRT 10 only (JetPack 6: TensorRT 10.3). Its graphs are ONNX opset 18, which
TensorRT 8.x (JetPack 5: 8.5, 8.6) does not read: its ONNX parser stops at opset 17 (and 8.5 has no
LayerNormalization, which the transformer blocks of bundles up to 0.14.0 used). TensorRT 11 removed
the weakly-typed precision flags (BuilderFlag.FP16, BuilderFlag.INT8) these engines are built with.
Both are refused at import with what to do instead.

An engine is valid only for the model file it was built from, the TensorRT version that built it,
the GPU it was built on (name, compute capability, number of multiprocessors and memory: every Jetson
Orin module calls itself "Orin") and the settings it was built with (batch profile, workspace). Engines
are cached next to the model in `<bundle>/engines/`, each with a JSON sidecar holding that key; an
engine whose key does not match this model, TensorRT, GPU and settings is refused with the command
that rebuilds it, never run. An engine file that TensorRT cannot deserialize (cut, overwritten, built
by another TensorRT) is a BundleError naming the file and TensorRT's reason, raised at load.

tensorrt and pycuda are imported only inside the functions that need them, so this module (and the
cache-key logic in it) imports on any machine.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import sha256_file
from ..errors import BackendUnavailableError, BundleError

log = logging.getLogger("leukoedge.backends")

ENGINE_DIR = "engines"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
TENSORRT_MAJOR = 10
_JETSON_EXTRA = "pip install 'leukoedge[jetson]' (on Jetson: JetPack 6's TensorRT 10, and pycuda; see docs/jetson.md)"

# (min, opt, max) batch per model: one field per segmenter call; the refiner and the classifier take a
# frame's cells at once, up to Detector's MAX_CELL_BATCH. Part of every engine's key: an engine built for
# a smaller batch would refuse a crowded frame's cells.
BATCH_PROFILES = {"segmenter": (1, 1, 4), "refiner": (1, 8, 64), "gate": (1, 8, 64), "classifier": (1, 8, 64)}
WORKSPACE_BYTES = 1 << 30  # Jetson Orin Nano shares 8 GB between CPU and GPU: 1 GB of scratch is plenty here

# The bundle manifest section `leukoedge calibrate --target tensorrt` writes: the TensorRT-target INT8 files.
TENSORRT_INT8 = "tensorrt_int8"
_CALIBRATE_FOR_TENSORRT = "leukoedge calibrate --data DIR --bundle {bundle} --target tensorrt"


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT other than 10.x, saying why and what to use instead."""
    try:
        major = int(version.split(".")[0])
    except ValueError as error:
        raise BackendUnavailableError(f"cannot read the TensorRT version {version!r}; leukoedge needs TensorRT {TENSORRT_MAJOR}.x") from error
    if major < TENSORRT_MAJOR:
        raise BackendUnavailableError(
            f"TensorRT {version} cannot run leukoedge's models: they are ONNX opset 18 graphs, and TensorRT 8.x (JetPack 5) "
            f"parses opsets up to 17 only. Use JetPack 6 (TensorRT 10), or on JetPack 5 "
            f"the ONNX Runtime backends (--backend onnxruntime, or onnxruntime-cuda with the onnxruntime-gpu wheel for JetPack 5)"
        )
    if major > TENSORRT_MAJOR:
        raise BackendUnavailableError(
            f"TensorRT {version} is not supported: TensorRT 11 removed BuilderFlag.FP16 and BuilderFlag.INT8 (weak typing), "
            f"which leukoedge's engines are built with; install TensorRT 10: pip install 'tensorrt>=10,<11'"
        )


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailableError(f"the TensorRT backend needs the tensorrt package: {_JETSON_EXTRA}") from error
    check_tensorrt_version(tensorrt.__version__)
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
    multiprocessors: int  # Orin Nano and Orin NX: 8 (4 on the 4 GB Nano), AGX Orin: 16
    memory_mib: int  # the 8 GB and 16 GB modules of one family differ only here
    batch_profile: tuple[int, int, int]  # (min, opt, max)
    workspace_bytes: int

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> "EngineKey":
        """The key a sidecar holds (KeyError where a field is missing, as in sidecars of older leukoedge)."""
        values = {name: recorded[name] for name in cls.__dataclass_fields__}
        values["batch_profile"] = tuple(values["batch_profile"])
        return cls(**values)

    def mismatches(self, other: "EngineKey") -> list[str]:
        """Human-readable differences, `self` being what the engine was built for."""
        built, here = asdict(self), asdict(other)
        return [f"{name} {built[name]!r} (here {here[name]!r})" for name in built if built[name] != here[name]]


def model_role(model_path: Path) -> str:
    """segmenter, refiner or classifier, from the bundle's file naming (segmenter.onnx, segmenter.int8-trt.onnx)."""
    role = model_path.name.split(".")[0]
    if role not in BATCH_PROFILES:
        raise BundleError(f"{model_path.name} is not a bundle model file: TensorRT engines are built for {', '.join(BATCH_PROFILES)}.*onnx")
    return role


def gpu_identity(cuda: Any) -> dict[str, Any]:
    """The GPU an engine is built for: what distinguishes one Jetson module from another, not only its name."""
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return {
        "gpu_name": device.name(),
        "compute_capability": f"{major}.{minor}",
        "multiprocessors": int(device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)),
        "memory_mib": int(device.total_memory()) // (1 << 20),
    }


def current_key(model_path: Path, precision: str, workspace_bytes: int = WORKSPACE_BYTES) -> EngineKey:
    """The key an engine for `model_path` at `precision` must carry on this machine (needs TensorRT and a GPU)."""
    trt = import_tensorrt()
    cuda = import_pycuda()
    return EngineKey(
        model_sha256=sha256_file(model_path),
        precision=precision,
        tensorrt_version=trt.__version__,
        **gpu_identity(cuda),
        batch_profile=BATCH_PROFILES[model_role(model_path)],
        workspace_bytes=workspace_bytes,
    )


def engine_paths(model_path: Path, precision: str) -> tuple[Path, Path]:
    """(engine, sidecar) for a model file at a precision: <bundle>/engines/<model>.<precision>.engine/.json."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r}; expected one of {', '.join(ENGINE_PRECISIONS)}")
    folder = model_path.parent / ENGINE_DIR
    stem = f"{model_path.name.split('.')[0]}.{precision}"  # segmenter.onnx, segmenter.int8-trt.onnx -> segmenter.<precision>
    return folder / f"{stem}.engine", folder / f"{stem}.json"


def write_sidecar(sidecar: Path, key: EngineKey, source: str) -> None:
    payload = {**asdict(key), "source": source, "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    sidecar.write_text(json.dumps(payload, indent=2) + "\n")


def check_engine(engine: Path, sidecar: Path, expected: EngineKey, rebuild: str) -> None:
    """Refuse a missing engine, or one whose sidecar key differs from `expected`; `rebuild` is the command to fix it."""
    if not engine.is_file() or not sidecar.is_file():
        raise BackendUnavailableError(f"no TensorRT engine {engine.name} in {engine.parent} for this model; build it: {rebuild}")
    try:
        built_for = EngineKey.from_record(json.loads(sidecar.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BackendUnavailableError(f"engine sidecar {sidecar} is unreadable or from an older leukoedge ({error!r}); rebuild the engine: {rebuild}") from error
    differences = built_for.mismatches(expected)
    if differences:
        raise BackendUnavailableError(
            f"TensorRT engine {engine} was built for another model, TensorRT, GPU or build settings: {'; '.join(differences)}. "
            f"Engines do not transfer between them; rebuild it: {rebuild}"
        )


def rebuild_command(model_path: Path, precision: str) -> str:
    flag = {"fp32": "", "fp16": " --fp16", "int8": " --int8"}[precision]
    return f"leukoedge export --engine --bundle {model_path.parent}{flag}"


def engine_source(manifest: dict[str, Any], model: str, precision: str, bundle_path: Path | str = "B") -> str:
    """The bundle file a TensorRT engine of `model` at `precision` is built from.

    fp32 and fp16: the fp32 ONNX file. int8: the TensorRT-target QDQ file (symmetric INT8, zero points 0)
    that `leukoedge calibrate --target tensorrt` wrote and gated, never the CPU-target `*.int8.onnx`
    (UINT8 activations with non-zero zero points, which TensorRT's parser refuses).
    """
    if precision in ("fp32", "fp16"):
        return manifest[model]["file"]
    if precision != "int8":
        raise ValueError(f"unknown engine precision {precision!r}; expected one of {', '.join(ENGINE_PRECISIONS)}")
    section = manifest.get(TENSORRT_INT8)
    calibrate = _CALIBRATE_FOR_TENSORRT.format(bundle=bundle_path)
    if section is None:
        cpu_files = sorted(name for name in manifest["files"] if name.endswith(".int8.onnx"))
        found = (
            f"its INT8 files ({', '.join(cpu_files)}) are quantized for the CPU (UINT8 activations, non-zero zero points), which TensorRT refuses"
            if cpu_files
            else "it has no INT8 files"
        )
        raise BundleError(f"bundle {manifest['name']} was never quantized for TensorRT, so it has no INT8 {model} engine source: {found}. Make them: {calibrate}")
    entry = section.get(model) or {}
    if entry.get("file") is None:
        failed = [m for m in entry.get("gate", {}).get("metrics", []) if not m.get("passed", True)]
        reasons = "; ".join(f"{m['name']} {m['fp32']:.4f} -> {m['int8']:.4f} (allowed drop {m['tolerance']:g})" for m in failed)
        raise BundleError(
            f"bundle {manifest['name']} has no TensorRT-target INT8 {model}: it failed its accuracy gate at calibration ({reasons or 'no gate recorded'}); "
            "build its engine at fp16 (`leukoedge export --engine --int8` does so for such models)"
        )
    return entry["file"]


def _recording_logger(trt: Any) -> Any:
    """A TensorRT logger that passes warnings and errors to leukoedge's log, as trt.Logger(WARNING) prints
    them, and keeps the errors so that a refused engine can say why."""

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            if severity <= trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    return RecordingLogger()


def _deserialize(trt: Any, logger: Any, engine_path: Path, rebuild: str) -> Any:
    """The engine in `engine_path`; BundleError naming the file where it cannot be read or TensorRT refuses it.

    A sidecar that matches does not make the engine file whole: it may be cut, overwritten or built by
    another TensorRT. TensorRT then returns None and logs why (a wrong magic tag, an incompatible plan),
    or raises; either becomes a BundleError here, at load, never at the first frame.
    """
    try:
        serialized = engine_path.read_bytes()
    except OSError as error:
        raise BundleError(f"TensorRT engine {engine_path} cannot be read: {error.strerror or error}") from error
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    except Exception as error:  # TensorRT's bindings raise RuntimeError, TypeError, ... on a damaged plan
        raise BundleError(f"TensorRT engine {engine_path} is damaged or not an engine ({error}); rebuild it: {rebuild}") from error
    if engine is None:
        reason = "; ".join(logger.errors[-3:]) or "TensorRT gave no reason"
        raise BundleError(
            f"TensorRT engine {engine_path} cannot be deserialized ({reason}): the file is damaged, or was built by another "
            f"TensorRT or for another GPU; rebuild it: {rebuild}"
        )
    return engine


class TensorRTBackend:
    """One engine, one execution context, one CUDA stream; device buffers sized for the profile's
    largest batch, page-locked host buffers so copies overlap nothing and never page-fault.

    The context, stream and buffers are shared by every call, so run() takes one call at a time:
    threads sharing a Detector on TensorRT wait for each other instead of overwriting each other's inputs.
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path, rebuild: str = "leukoedge export --engine --bundle BUNDLE"):
        trt = import_tensorrt()
        cuda = import_pycuda()
        self._cuda = cuda
        # The primary context is the one the CUDA runtime inside TensorRT uses; sharing it avoids a second context.
        self._gpu_context = cuda.Device(0).retain_primary_context()
        self._one_call_at_a_time = threading.Lock()
        self._gpu_context.push()
        try:
            self._logger = _recording_logger(trt)
            self.engine = _deserialize(trt, self._logger, engine_path, rebuild)
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
    rebuild = rebuild_command(model_path, precision)
    check_engine(engine, sidecar, current_key(model_path, precision), rebuild)
    return TensorRTBackend(engine, rebuild)


def has_valid_engine(model_path: Path, precision: str) -> bool:
    """Whether a usable engine for this model, precision, TensorRT and GPU is cached."""
    engine, sidecar = engine_paths(model_path, precision)
    try:
        check_engine(engine, sidecar, current_key(model_path, precision), rebuild_command(model_path, precision))
    except BackendUnavailableError:
        return False
    return True
