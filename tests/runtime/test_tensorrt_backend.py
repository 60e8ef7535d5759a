"""TensorRT backend: the engine-cache key and its refusals, the supported TensorRT versions, and the
backend itself run end to end against ONNX Runtime (the reference) on the shipped bundle's models.

Runs everywhere: where tensorrt and pycuda are absent (CI, this machine), `tests/fakes` stands in for
them (TensorRT 10's Python API run by ONNX Runtime; see fakes/fake_tensorrt.py for what it checks and
what it cannot). Where a real TensorRT and GPU are present, the comparisons also run on them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import fakes
from leukoedge.backends import create_backend
from leukoedge.backends.onnxruntime import OnnxRuntimeBackend
from leukoedge.backends.tensorrt import BATCH_PROFILES, EngineKey, check_engine, engine_paths, rebuild_command, write_sidecar
from leukoedge.errors import BackendUnavailableError, BundleError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "default"
KEY = EngineKey("ab" * 32, "fp16", "10.3.0", "Orin", "8.7", 8, 7619, (1, 1, 4), 1 << 30)
# Probabilities. The fake computes in fp32 like ONNX Runtime; a GPU's fp32 may run TF32 on Ampere and
# later, and fp16 engines carry fp16 rounding.
TOLERANCE = {"fake": {"fp32": 1e-5, "fp16": 1e-5}, "real": {"fp32": 1e-2, "fp16": 3e-2}}


def _cached_engine(tmp_path: Path, key: EngineKey) -> tuple[Path, Path, Path]:
    model = tmp_path / "segmenter.onnx"
    model.write_bytes(b"onnx bytes")
    engine, sidecar = engine_paths(model, key.precision)
    engine.parent.mkdir()
    engine.write_bytes(b"serialized engine")
    write_sidecar(sidecar, key, model.name)
    return model, engine, sidecar


@pytest.fixture(params=["fake", "real"])
def gpu_stack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """'fake': tests/fakes installed as tensorrt and pycuda; 'real': the installed ones, on a GPU."""
    if request.param == "fake":
        fakes.install(monkeypatch)
        return "fake"
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None:
        pytest.skip("no real TensorRT here: pip install 'leukoedge[jetson]' on a GPU machine (docs/jetson.md)")
    from leukoedge.backends.tensorrt import import_pycuda, import_tensorrt

    try:
        import_tensorrt(), import_pycuda()
    except BackendUnavailableError as error:
        pytest.skip(f"no usable TensorRT and CUDA GPU: {error}")
    return "real"


@pytest.fixture
def shipped_copy(tmp_path: Path) -> Path:
    """The shipped bundle in a scratch folder, so engines are built beside its models, not in the repository."""
    return Path(shutil.copytree(SHIPPED, tmp_path / "default", ignore=shutil.ignore_patterns("engines")))


def test_engines_are_cached_next_to_the_model_one_per_model_and_precision():
    bundle = Path("models/default")
    assert engine_paths(bundle / "segmenter.onnx", "fp16") == (bundle / "engines/segmenter.fp16.engine", bundle / "engines/segmenter.fp16.json")
    assert engine_paths(bundle / "segmenter.int8-trt.onnx", "int8")[0] == bundle / "engines/segmenter.int8.engine"
    with pytest.raises(ValueError, match="precision"):
        engine_paths(bundle / "segmenter.onnx", "int4")


def test_an_engine_with_a_matching_key_is_accepted(tmp_path: Path):
    model, engine, sidecar = _cached_engine(tmp_path, KEY)
    check_engine(engine, sidecar, KEY, rebuild_command(model, "fp16"))
    recorded = json.loads(sidecar.read_text())
    assert recorded["model_sha256"] == KEY.model_sha256 and recorded["batch_profile"] == [1, 1, 4] and recorded["multiprocessors"] == 8


@pytest.mark.parametrize(
    "difference, named",
    [
        ({"model_sha256": "cd" * 32}, "model_sha256"),
        ({"tensorrt_version": "10.4.0"}, "tensorrt_version"),
        ({"gpu_name": "Xavier", "compute_capability": "7.2"}, "gpu_name"),
        ({"precision": "int8"}, "precision"),
        ({"multiprocessors": 16}, "multiprocessors"),  # an AGX Orin is "Orin" too
        ({"memory_mib": 15_388}, "memory_mib"),  # Orin NX 16 GB vs 8 GB: same name, same SM count
        ({"batch_profile": (1, 8, 64)}, "batch_profile"),
        ({"workspace_bytes": 1 << 28}, "workspace_bytes"),
    ],
)
def test_an_engine_built_for_another_model_tensorrt_gpu_or_build_settings_is_refused_with_the_rebuild_command(
    tmp_path: Path, difference: dict, named: str
):
    model, engine, sidecar = _cached_engine(tmp_path, KEY)
    with pytest.raises(BackendUnavailableError, match="rebuild") as refusal:
        check_engine(engine, sidecar, replace(KEY, **difference), rebuild_command(model, "fp16"))
    message = str(refusal.value)
    assert named in message and f"leukoedge export --engine --bundle {tmp_path} --fp16" in message


def test_a_missing_engine_an_unreadable_sidecar_or_one_of_an_older_leukoedge_is_refused(tmp_path: Path):
    model, engine, sidecar = _cached_engine(tmp_path, KEY)
    older = {name: value for name, value in json.loads(sidecar.read_text()).items() if name not in ("multiprocessors", "memory_mib", "batch_profile")}
    sidecar.write_text(json.dumps(older))
    with pytest.raises(BackendUnavailableError, match="older leukoedge.*rebuild"):
        check_engine(engine, sidecar, KEY, rebuild_command(model, "fp16"))
    sidecar.write_text("{not json")
    with pytest.raises(BackendUnavailableError, match="unreadable"):
        check_engine(engine, sidecar, KEY, rebuild_command(model, "fp16"))
    engine.unlink()
    with pytest.raises(BackendUnavailableError, match="no TensorRT engine segmenter.fp16.engine"):
        check_engine(engine, sidecar, KEY, rebuild_command(model, "fp16"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_without_tensorrt_the_backend_names_the_extra_to_install(tmp_path: Path):
    model = tmp_path / "segmenter.onnx"
    model.write_bytes(b"onnx bytes")
    with pytest.raises(BackendUnavailableError, match=r"leukoedge\[jetson\]"):
        create_backend("tensorrt", model, precision="fp16")


@pytest.mark.parametrize(
    "version, says",
    [
        ("8.5.2.2", ["opset 18", "JetPack 5", "onnxruntime"]),  # JetPack 5.1
        ("8.6.2", ["opset 18", "up to 17"]),
        ("11.0.0", ["BuilderFlag.FP16", "tensorrt>=10,<11"]),
    ],
)
def test_tensorrt_other_than_10_is_refused_at_import_saying_why(monkeypatch: pytest.MonkeyPatch, version: str, says: list[str]):
    from leukoedge.backends.tensorrt import import_tensorrt

    fakes.install(monkeypatch, version=version)
    with pytest.raises(BackendUnavailableError) as refusal:
        import_tensorrt()
    assert all(phrase in str(refusal.value) for phrase in says), str(refusal.value)
    fakes.install(monkeypatch, version="10.3.0.30")  # JetPack 6's TensorRT
    assert import_tensorrt().__version__ == "10.3.0.30"


def test_the_jetson_extra_pins_tensorrt_10():
    (jetson,) = [line for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("jetson = ")]
    assert '"tensorrt>=10,<11"' in jetson


def test_a_machine_where_cuda_finds_no_gpu_is_refused(monkeypatch: pytest.MonkeyPatch):
    from leukoedge.backends.tensorrt import import_pycuda

    fakes.install(monkeypatch, gpu=None)
    with pytest.raises(BackendUnavailableError, match="no GPU"):
        import_pycuda()


def _fields_and_crops(model: str, batch: int) -> np.ndarray:
    """Real inputs: the sample frames letterboxed to the model's input, repeated to `batch`."""
    import cv2

    from leukoedge.bundle import load_bundle
    from leukoedge.preprocess.cpu import PreprocessSpec, prepare_frame

    manifest = load_bundle(SHIPPED).manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    frames = [cv2.imread(str(path)) for path in sorted((REPO / "samples").glob("*.jpg"))]
    tensors = [prepare_frame(frame, spec, manifest[model]["input_size"]).tensor[0] for frame in frames]
    return np.stack([tensors[index % len(tensors)] for index in range(batch)])


@pytest.mark.parametrize("model", ["segmenter", "refiner", "classifier"])
def test_every_model_on_tensorrt_matches_onnx_runtime_at_each_batch_of_its_profile_and_refuses_beyond(
    gpu_stack: str, shipped_copy: Path, model: str
):
    from leukoedge.export.tensorrt import build_engine

    onnx_file = shipped_copy / f"{model}.onnx"
    build_engine(onnx_file, "fp32")
    engine = create_backend("tensorrt", onnx_file, precision="fp32")
    reference = OnnxRuntimeBackend(onnx_file)
    low, typical, high = BATCH_PROFILES[model]
    assert engine.max_batch == high and engine.output_names == reference.output_names
    (input_name,) = engine.input_names
    for batch in sorted({low, typical, high, 3}):
        if batch > high:
            continue
        inputs = {input_name: _fields_and_crops(model, batch)}
        got, want = engine.run(inputs), reference.run(inputs)
        for name in reference.output_names:  # every head of the classifier, not only the first output
            assert got[name].shape == want[name].shape
            assert float(np.abs(got[name] - want[name]).max()) < TOLERANCE[gpu_stack]["fp32"], (model, name, batch)
    with pytest.raises(ValueError, match=f"profile maximum {high}"):
        engine.run({input_name: _fields_and_crops(model, high + 1)})
    with pytest.raises(ValueError, match="outside the engine's optimization profile"):
        engine.run({input_name: _fields_and_crops(model, 1)[:0]})


def test_an_engine_built_on_one_orin_is_refused_on_another(monkeypatch: pytest.MonkeyPatch, shipped_copy: Path):
    from leukoedge.export.tensorrt import build_engine

    fakes.install(monkeypatch, gpu=fakes.ORIN_NANO_8GB)
    onnx_file = shipped_copy / "classifier.onnx"
    build_engine(onnx_file, "fp16")
    create_backend("tensorrt", onnx_file, precision="fp16")  # accepted where it was built
    fakes.switch_gpu(fakes.AGX_ORIN_32GB)  # also reports itself as "Orin", compute capability 8.7
    with pytest.raises(BackendUnavailableError, match="multiprocessors 8 .here 14.*memory_mib") as refusal:
        create_backend("tensorrt", onnx_file, precision="fp16")
    assert "leukoedge export --engine" in str(refusal.value)


def test_an_int8_engine_is_never_built_from_a_cpu_target_file(monkeypatch: pytest.MonkeyPatch, shipped_copy: Path):
    from leukoedge import Detector

    fakes.install(monkeypatch)
    with pytest.raises(BundleError, match=r"never quantized for TensorRT.*refiner\.int8\.onnx.*UINT8.*--target tensorrt"):
        Detector.load(shipped_copy, backend="tensorrt", precision="int8")


def _damage(engine: Path, how: str) -> None:
    data = engine.read_bytes()
    if how == "garbage":
        engine.write_bytes(b"\x00" * 64 + data[64:])
    elif how == "cut":
        engine.write_bytes(data[:20])
    else:  # "another-tensorrt": a whole engine, built by a TensorRT other than this one
        engine.write_bytes(data.replace(b'"tensorrt": "10.3.0"', b'"tensorrt": "10.0.1"', 1))


@pytest.mark.parametrize(
    ("how", "says"),
    [("garbage", "Magic tag does not match"), ("cut", "damaged or not an engine"), ("another-tensorrt", "not compatible with this version")],
)
def test_a_damaged_or_incompatible_engine_file_behind_a_matching_sidecar_is_a_bundle_error_at_load(
    monkeypatch: pytest.MonkeyPatch, shipped_copy: Path, how: str, says: str
):
    from leukoedge import Detector
    from leukoedge.bundle import bundle_models, load_bundle
    from leukoedge.export.tensorrt import build_engine

    fakes.install(monkeypatch)
    for model in bundle_models(load_bundle(shipped_copy).manifest):
        build_engine(shipped_copy / f"{model}.onnx", "fp32")
    Detector.load(shipped_copy, backend="tensorrt", precision="fp32").close()  # intact engines load
    engine, _ = engine_paths(shipped_copy / "segmenter.onnx", "fp32")
    _damage(engine, how)
    with pytest.raises(BundleError, match=says) as refusal:
        Detector.load(shipped_copy, backend="tensorrt", precision="fp32")
    assert str(engine) in str(refusal.value) and "leukoedge export --engine" in str(refusal.value)


def test_an_engine_file_that_cannot_be_read_is_a_bundle_error_naming_it(monkeypatch: pytest.MonkeyPatch, shipped_copy: Path):
    from leukoedge.backends.tensorrt import TensorRTBackend

    fakes.install(monkeypatch)
    folder_not_file = shipped_copy / "engines" / "segmenter.fp32.engine"
    folder_not_file.mkdir(parents=True)
    with pytest.raises(BundleError, match=f"TensorRT engine {folder_not_file} cannot be read"):
        TensorRTBackend(folder_not_file)
