"""ONNX -> TensorRT engine with the TensorRT 10 Python API: `leukoedge export --engine --bundle B [--fp16|--int8]`.

fp32 and fp16 engines are built from the bundle's fp32 ONNX files; int8 engines from its QDQ files
(`leukoedge calibrate --target tensorrt`: symmetric int8, the only Q/DQ TensorRT takes): the Q/DQ
nodes carry the scales (explicit quantization), so no TensorRT calibrator runs, and the layers left
in float run in fp16. Engines land in <bundle>/engines/ with
a JSON sidecar (model sha256, TensorRT version, GPU name and compute capability, precision) that
the runtime checks before it runs one. A timing cache per TensorRT version and GPU makes rebuilds
fast. Build on the device that will run the engine (a Jetson builds its own).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from leukoedge.backends.tensorrt import EngineKey, current_key, engine_paths, import_tensorrt, write_sidecar
from leukoedge.bundle import bundle_models, load_bundle, model_file
from leukoedge.errors import BundleError, LeukoedgeError

log = logging.getLogger("leukoedge.export")

# (min, opt, max) batch per model: one field per segmenter call; the refiner and the classifier take a
# frame's cells at once, up to Detector.MAX_CELL_BATCH.
BATCH_PROFILES = {"segmenter": (1, 1, 4), "refiner": (1, 8, 64), "classifier": (1, 8, 64)}
WORKSPACE_BYTES = 1 << 30  # Jetson Orin Nano shares 8 GB between CPU and GPU: 1 GB of scratch is plenty here


def timing_cache_path(engine_dir: Path, key: EngineKey) -> Path:
    """One timing cache per TensorRT version and GPU: the timings of another device would mislead the builder."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key.tensorrt_version}-{key.gpu_name}-sm{key.compute_capability}")
    return engine_dir / f"timing-{tag}.cache"


def build_engine(onnx_path: Path, precision: str, batch_profile: tuple[int, int, int], workspace_bytes: int = WORKSPACE_BYTES) -> Path:
    """Parse the ONNX file, build and serialize an engine for this GPU, write it with its key sidecar."""
    trt = import_tensorrt()
    key = current_key(onnx_path, precision)
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
    smallest, typical, largest = batch_profile
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
    write_sidecar(sidecar, key, onnx_path.name, {"batch_min": smallest, "batch_opt": typical, "batch_max": largest})
    return engine_path


def export_engines(bundle_path: Path, precision: str) -> list[Path]:
    """Build the engines of every model of a bundle folder at `precision` (int8: from its gated QDQ files)."""
    if not Path(bundle_path).is_dir():
        raise BundleError(f"{bundle_path} is not a bundle folder: engines are cached inside the bundle, extract the archive first")
    bundle = load_bundle(bundle_path)
    target = bundle.manifest.get("precisions", {}).get("calibration", {}).get("target")
    if precision == "int8" and target != "tensorrt":
        raise BundleError(
            f"the int8 models of {bundle_path} were quantized for {target or 'no target'}, not TensorRT (which takes only symmetric "
            f"int8 Q/DQ): quantize them with `leukoedge calibrate --data DIR --bundle {bundle_path} --target tensorrt`"
        )
    return [build_engine(bundle.path(model_file(bundle.manifest, model, precision)), precision, BATCH_PROFILES[model]) for model in bundle_models(bundle.manifest)]
