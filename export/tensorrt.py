"""ONNX -> TensorRT engine with the TensorRT 10 Python API: `leukoedge export --engine --bundle B [--fp16|--int8]`.

fp32 and fp16 engines are built from the bundle's fp32 ONNX files. int8 engines are built per model
from the bundle's TensorRT-target QDQ files (`leukoedge calibrate --target tensorrt`: symmetric INT8
activations and weights, zero points 0, weights per output channel), the only Q/DQ TensorRT takes: the
Q/DQ nodes carry the scales (explicit quantization), so no TensorRT calibrator runs, and the layers
left in float run in fp16. A model whose TensorRT-target INT8 failed its accuracy gate gets an fp16
engine instead, as the ONNX Runtime path runs such a model in fp32: one model's failed gate never
costs the others their INT8 engines. The CPU-target `*.int8.onnx` files are never used here.

Engines land in <bundle>/engines/ with a JSON sidecar (model sha256, precision, TensorRT version, GPU
name, compute capability, multiprocessors and memory, batch profile, workspace) that the runtime
checks before it runs one. A timing cache per TensorRT version and GPU makes rebuilds fast. Build on
the device that will run the engine (a Jetson builds its own).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukoedge.backends.tensorrt import (
    BATCH_PROFILES,
    TENSORRT_INT8,
    WORKSPACE_BYTES,
    EngineKey,
    current_key,
    engine_paths,
    engine_source,
    import_tensorrt,
    write_sidecar,
)
from leukoedge.bundle import bundle_models, load_bundle
from leukoedge.errors import BundleError, LeukoedgeError

from .tensorrt_operators import graph_problems

__all__ = ["BATCH_PROFILES", "WORKSPACE_BYTES", "EnginePlan", "build_engine", "engine_plan", "export_engines", "timing_cache_path"]

log = logging.getLogger("leukoedge.export")


@dataclass(frozen=True)
class EnginePlan:
    """What `export --engine` builds for one model: at which precision, from which bundle file, and why."""

    model: str
    precision: str
    source: str
    note: str = ""


def timing_cache_path(engine_dir: Path, key: EngineKey) -> Path:
    """One timing cache per TensorRT version and GPU: the timings of another device would mislead the builder."""
    gpu = f"{key.gpu_name}-sm{key.compute_capability}-{key.multiprocessors}sm-{key.memory_mib}MiB"
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key.tensorrt_version}-{gpu}")
    return engine_dir / f"timing-{tag}.cache"


def engine_plan(manifest: dict[str, Any], precision: str, bundle_path: Path) -> list[EnginePlan]:
    """Per model, the engine `export --engine` builds when asked for `precision`.

    int8: INT8 for every model with a gated TensorRT-target INT8 file, fp16 for a model whose one failed
    its gate; a bundle never quantized for TensorRT is refused (its CPU-target INT8 files do not parse)."""
    models = bundle_models(manifest)
    if precision != "int8":
        return [EnginePlan(model, precision, engine_source(manifest, model, precision)) for model in models]
    if TENSORRT_INT8 not in manifest:
        engine_source(manifest, models[0], "int8", bundle_path)  # raises BundleError naming the calibrate command
    plans = []
    for model in models:
        try:
            plans.append(EnginePlan(model, "int8", engine_source(manifest, model, "int8", bundle_path)))
        except BundleError as error:
            plans.append(EnginePlan(model, "fp16", engine_source(manifest, model, "fp16"), note=str(error)))
    return plans


def build_engine(onnx_path: Path, precision: str, workspace_bytes: int = WORKSPACE_BYTES) -> Path:
    """Parse the ONNX file, build and serialize an engine for this GPU, write it with its key sidecar."""
    trt = import_tensorrt()
    key = current_key(onnx_path, precision, workspace_bytes)
    problems = graph_problems(onnx_path, tensorrt_int8=precision == "int8")
    if problems:  # TensorRT's own parser would refuse these too, with a less direct message
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LeukoedgeError(f"{onnx_path} cannot become a TensorRT {precision} engine: {'; '.join(problems[:5])}{more}")
    engine_path, sidecar = engine_paths(onnx_path, precision)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise LeukoedgeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        # Explicit quantization: the scales are the Q/DQ nodes' own; no calibrator is set.
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    smallest, typical, largest = key.batch_profile
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        sample = tuple(tensor.shape)[1:]  # (C, H, W): only the batch is dynamic in the exported graphs
        profile.set_shape(tensor.name, (smallest, *sample), (typical, *sample), (largest, *sample))
    config.add_optimization_profile(profile)
    cache_file = timing_cache_path(engine_path.parent, key)
    timing_cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    log.info("building %s engine from %s (batch %d..%d, opt %d)", precision, onnx_path.name, smallest, largest, typical)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LeukoedgeError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(serialized)
    cache_file.write_bytes(config.get_timing_cache().serialize())
    write_sidecar(sidecar, key, onnx_path.name)
    return engine_path


def export_engines(bundle_path: Path, precision: str) -> list[Path]:
    """Build the engines of every model of a bundle folder at `precision`; int8 per model (engine_plan)."""
    if not Path(bundle_path).is_dir():
        raise BundleError(f"{bundle_path} is not a bundle folder: engines are cached inside the bundle, extract the archive first")
    bundle = load_bundle(bundle_path)
    engines = []
    for plan in engine_plan(bundle.manifest, precision, Path(bundle_path)):
        if plan.note:
            log.warning("%s: fp16 engine instead of int8 (%s)", plan.model, plan.note)
        engines.append(build_engine(bundle.path(plan.source), plan.precision))
    return engines
