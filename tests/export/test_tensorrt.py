"""TensorRT engines built from a bundle (`leukoedge export --engine`) and Detector(backend="tensorrt")
end to end, compared with ONNX Runtime (the reference), and the op/dtype check of every graph in models/.

Runs everywhere on tests/fakes (a fake TensorRT 10 run by ONNX Runtime: the plumbing, the refusals,
the per-model precisions, not TensorRT's numerics); the comparisons run on a real TensorRT and GPU too
where one is present (scripts/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import fakes
from leukoedge import Detector
from leukoedge.backends import create_backend
from leukoedge.backends.onnxruntime import OnnxRuntimeBackend
from leukoedge.backends.tensorrt import TENSORRT_INT8, engine_paths
from leukoedge.bundle import bundle_models, load_bundle, save_bundle
from leukoedge.errors import BackendUnavailableError, BundleError
from leukoedge.export.tensorrt_operators import OPSET_RANGE, SOURCE, graph_problems, quantization_problems, unsupported_operators
from leukoedge.preprocess.cpu import PreprocessSpec, prepare_frame

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "default"
EXPORTED_GRAPHS = sorted((REPO / "models").glob("*/*.onnx"))
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


@pytest.fixture(params=["fake", "real"])
def gpu_stack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
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


@pytest.fixture(params=["shipped", "tiny"])
def bundle_copy(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The shipped bundle (no torch needed) or the pipeline's quick bundle (needs torch), in a scratch folder."""
    source = SHIPPED if request.param == "shipped" else request.getfixturevalue("tiny_bundle")
    return Path(shutil.copytree(source, tmp_path / "default", ignore=shutil.ignore_patterns("engines")))


def _samples() -> list[np.ndarray]:
    return [cv2.imread(str(path)) for path in SAMPLES]


def verdict_call(verdict) -> tuple:
    """What a frame's verdict decides (not its float scores, which reduced precisions nudge)."""
    keys = ("status", "flagged", "cell_count", "blast_count", "subtype")
    return tuple(verdict.get(key) if isinstance(verdict, dict) else getattr(verdict, key, None) for key in keys)


def _assert_same_findings(got, want) -> None:
    """Labels and verdicts (what a reader acts on), and the label maps."""
    assert [cell.label for cell in got.cells] == [cell.label for cell in want.cells]
    assert verdict_call(got.verdict) == verdict_call(want.verdict)
    assert float((got.label_map == want.label_map).mean()) > 0.999


def test_op_list_is_data_with_its_source_named():
    assert "onnx/onnx-tensorrt" in SOURCE and OPSET_RANGE == (9, 20)


@pytest.mark.parametrize("graph", EXPORTED_GRAPHS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_node_of_every_exported_graph_is_in_tensorrt_10s_operator_list(graph: Path):
    model = onnx.load(str(graph), load_external_data=False)
    assert unsupported_operators(model) == []
    problems = graph_problems(graph)
    if graph.name.endswith(".int8.onnx"):  # CPU-target QDQ: never an engine source, and the check says why
        assert problems and all("zero point" in problem for problem in problems)
        assert any("uint8" in problem for problem in problems) and any("int32" in problem for problem in problems)
    else:
        assert problems == []


def test_the_check_refuses_what_tensorrt_10_does_not_parse(tmp_path: Path):
    model = onnx.load(str(SHIPPED / "classifier.onnx"))
    model.graph.node[0].op_type = "QLinearConv"
    model.opset_import[0].version = 21
    onnx.save(model, str(tmp_path / "classifier.onnx"))
    problems = graph_problems(tmp_path / "classifier.onnx")
    assert any("QLinearConv" in problem for problem in problems) and any("opset 21" in problem for problem in problems)
    assert "not an INT8 (QDQ) graph" in graph_problems(SHIPPED / "classifier.onnx", tensorrt_int8=True)[-1]


def _quantize_for_tensorrt(bundle: Path, model: str, scratch: Path) -> Path:
    """A TensorRT-target QDQ file of `model`, ranges from the sample frames (structure, not accuracy)."""
    from leukoedge.calibration.quantize import QuantizationSettings, TensorBatches, prepare_for_quantization, quantize_model

    manifest = load_bundle(bundle).manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    inputs = np.stack([prepare_frame(frame, spec, manifest[model]["input_size"]).tensor[0] for frame in _samples()])
    prepared = prepare_for_quantization(bundle / manifest[model]["file"], scratch / f"{model}.prepared.onnx")
    settings = QuantizationSettings.for_target("tensorrt")
    return quantize_model(prepared, scratch / f"{model}.{settings.file_tag}.onnx", settings, scratch / f"{model}.ranges", TensorBatches(manifest[model]["input"], inputs))


@pytest.mark.parametrize("model", ["segmenter", "refiner", "classifier"])
def test_tensorrt_target_int8_is_symmetric_int8_with_zero_points_0_and_weights_per_output_channel(tmp_path: Path, model: str):
    quantized = onnx.load(str(_quantize_for_tensorrt(SHIPPED, model, tmp_path)))
    assert quantization_problems(quantized) == [] and unsupported_operators(quantized) == []
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in quantized.graph.initializer}
    qdq = [node for node in quantized.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(initializers[node.input[2]].dtype == np.int8 and not initializers[node.input[2]].any() for node in qdq)
    weights = [node for node in qdq if node.op_type == "DequantizeLinear" and node.input[0] in initializers]
    assert weights and all(initializers[node.input[0]].dtype == np.int8 for node in weights)  # no int32 bias Q/DQ
    per_channel = [node for node in weights if initializers[node.input[1]].size > 1]
    assert per_channel and all(next(a.i for a in node.attribute if a.name == "axis") == 0 for node in per_channel)
    for node in per_channel:
        assert initializers[node.input[1]].shape[0] == initializers[node.input[0]].shape[0]  # one scale per output channel


def _with_tensorrt_int8(bundle: Path, scratch: Path, failed: tuple[str, ...]) -> Path:
    """`bundle` as `leukoedge calibrate --target tensorrt` leaves it, with the models in `failed` having
    failed their gate (no file, gate recorded)."""
    loaded = load_bundle(bundle)
    files = {name: loaded.path(name) for name in loaded.manifest["files"]}
    section = {"calibration": {"method": "minmax", "target": "tensorrt"}}
    for model in bundle_models(loaded.manifest):
        gate = {"passed": model not in failed, "metrics": [{"name": "nucleus_dice", "fp32": 0.94, "int8": 0.93 if model in failed else 0.94, "tolerance": 0.005, "passed": model not in failed}]}
        file_name = None if model in failed else f"{model}.int8-trt.onnx"
        if file_name:
            files[file_name] = _quantize_for_tensorrt(bundle, model, scratch)
        section[model] = {"file": file_name, "gate": gate, "nodes_to_exclude": []}
    return save_bundle(scratch / "bundle", {**loaded.manifest, TENSORRT_INT8: section}, files).root


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_detector_on_tensorrt_finds_what_onnx_runtime_finds_on_the_samples(gpu_stack: str, bundle_copy: Path, precision: str):
    from leukoedge.export.tensorrt import export_engines

    engines = export_engines(bundle_copy, precision)
    models = bundle_models(load_bundle(bundle_copy).manifest)
    assert [engine.name for engine in engines] == [f"{model}.{precision}.engine" for model in models]
    on_tensorrt = Detector.load(bundle_copy, backend="tensorrt", precision=precision)
    reference = Detector.load(bundle_copy, precision="fp32")
    assert on_tensorrt.precisions == dict.fromkeys(models, precision)
    for frame in _samples():
        _assert_same_findings(on_tensorrt.run(frame), reference.run(frame))
    # The default on TensorRT: the most reduced precision with a valid engine.
    assert Detector.load(bundle_copy, backend="tensorrt").precisions == dict.fromkeys(models, precision)


def test_export_int8_builds_int8_engines_for_the_models_that_passed_and_fp16_for_the_one_that_failed(gpu_stack: str, tmp_path: Path):
    from leukoedge.export.tensorrt import export_engines

    bundle = _with_tensorrt_int8(SHIPPED, tmp_path, failed=("segmenter",))  # the shipped segmenter failed its CPU gate too
    engines = export_engines(bundle, "int8")
    assert [engine.name for engine in engines] == ["segmenter.fp16.engine", "refiner.int8.engine", "gate.int8.engine", "classifier.int8.engine"]
    sidecar = json.loads(engine_paths(bundle / "classifier.int8-trt.onnx", "int8")[1].read_text())
    assert sidecar["source"] == "classifier.int8-trt.onnx" and sidecar["batch_profile"] == [1, 8, 64]
    detector = Detector.load(bundle, backend="tensorrt")
    assert detector.precisions == {"segmenter": "fp16", "refiner": "int8", "gate": "int8", "classifier": "int8"}
    crops = np.stack([prepare_frame(frame, PreprocessSpec.from_manifest(detector.bundle.manifest["preprocess"]), (64, 64)).tensor[0] for frame in _samples()])
    got, want = detector.classifier.run({"crop": crops}), OnnxRuntimeBackend(bundle / "classifier.int8-trt.onnx").run({"crop": crops})
    tolerance = 1e-5 if gpu_stack == "fake" else 5e-2
    assert all(float(np.abs(got[name] - want[name]).max()) < tolerance for name in want)  # every head
    for frame in _samples():
        assert detector.run(frame).label_map.shape == frame.shape[:2]
    with pytest.raises(BundleError, match="failed its accuracy gate"):
        Detector.load(bundle, backend="tensorrt", precision="int8")


def test_export_int8_of_a_bundle_never_quantized_for_tensorrt_names_the_calibrate_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from leukoedge.export.tensorrt import export_engines

    fakes.install(monkeypatch)
    bundle = Path(shutil.copytree(SHIPPED, tmp_path / "default"))
    with pytest.raises(BundleError, match=r"refiner\.int8\.onnx.*UINT8.*--target tensorrt"):  # the CPU INT8 file it ships
        export_engines(bundle, "int8")
    assert not (bundle / "engines").exists()


def test_tensorrt_refuses_a_cpu_target_int8_graph_if_it_ever_got_one(monkeypatch: pytest.MonkeyPatch):
    """What the op/dtype check and engine_source keep away from the builder: the parser's own refusal."""
    fake = fakes.install(monkeypatch)
    network = fake.trt.Builder(fake.trt.Logger()).create_network(0)
    parser = fake.trt.OnnxParser(network, fake.trt.Logger())
    cpu_target = sorted(SHIPPED.glob("*.int8.onnx"))  # the shipped bundle's CPU-target QDQ files
    if not cpu_target:
        pytest.skip("the shipped bundle has no CPU-target INT8 file (not calibrated)")
    assert not parser.parse_from_file(str(cpu_target[0]))
    assert "zero point" in parser.get_error(0).desc()


def test_rebuilding_reuses_the_timing_cache_of_this_tensorrt_and_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from leukoedge.export.tensorrt import export_engines

    fakes.install(monkeypatch)
    bundle = Path(shutil.copytree(SHIPPED, tmp_path / "default"))
    export_engines(bundle, "fp16")
    (cache,) = (bundle / "engines").glob("timing-*.cache")
    assert "Orin-sm8.7-8sm-7619MiB" in cache.name and len(json.loads(cache.read_text())) == len(bundle_models(load_bundle(bundle).manifest))
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "timed earlier": "FP16"}))
    export_engines(bundle, "fp32")
    assert json.loads(cache.read_text())["timed earlier"] == "FP16"  # read back and extended, not started afresh


def test_export_without_engine_flag_exits_2_with_what_to_do(capsys):
    from leukoedge import cli

    assert cli.main(["export", "--bundle", str(SHIPPED)]) == 2
    assert "--engine" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_export_without_tensorrt_exits_2_naming_the_extra(tmp_path: Path, capsys):
    from leukoedge import cli

    bundle = Path(shutil.copytree(SHIPPED, tmp_path / "default"))
    assert cli.main(["export", "--engine", "--bundle", str(bundle), "--fp16"]) == 2
    assert "leukoedge[jetson]" in capsys.readouterr().err


def test_an_engine_of_another_model_is_refused(gpu_stack: str, tmp_path: Path):
    from leukoedge.export.tensorrt import export_engines

    bundle = Path(shutil.copytree(SHIPPED, tmp_path / "default"))
    export_engines(bundle, "fp32")
    segmenter_engine, segmenter_sidecar = engine_paths(bundle / "segmenter.onnx", "fp32")
    classifier_engine, classifier_sidecar = engine_paths(bundle / "classifier.onnx", "fp32")
    shutil.copy(classifier_engine, segmenter_engine)
    shutil.copy(classifier_sidecar, segmenter_sidecar)
    with pytest.raises(BackendUnavailableError, match="model_sha256"):
        create_backend("tensorrt", bundle / "segmenter.onnx", precision="fp32")


def test_calibrate_for_tensorrt_writes_gated_int8_trt_files_beside_the_cpu_ones_and_export_uses_them(
    monkeypatch: pytest.MonkeyPatch, calibrated_bundle: Path, data_root: Path, tmp_path: Path
):
    from leukoedge.calibration.calibrate import CalibrateConfig, calibrate_bundle
    from leukoedge.calibration.quantize import QuantizationSettings
    from leukoedge.export.tensorrt import export_engines

    config = CalibrateConfig(
        data_root, calibrated_bundle, tmp_path / "default", fields=8, cells=8, candidates_per_class=4, gate_limit=4,
        dice_tolerance=1.0, accuracy_tolerance=1.0, benign_flag_tolerance=1.0, settings=QuantizationSettings.for_target("tensorrt"),
    )
    bundle = calibrate_bundle(config).bundle  # load_bundle inside verified every sha256
    manifest, models = bundle.manifest, ("segmenter", "refiner", "classifier")
    assert {f"{model}.int8.onnx" for model in models} | {f"{model}.int8-trt.onnx" for model in models} <= set(manifest["files"])
    assert manifest["precisions"] == load_bundle(calibrated_bundle).manifest["precisions"]  # the CPU-target entry untouched
    section = manifest[TENSORRT_INT8]
    assert section["calibration"]["target"] == "tensorrt" and section["calibration"]["calibration_set"] == "calibration_set.int8-trt.csv"
    for model in models:
        assert section[model]["file"] == f"{model}.int8-trt.onnx" and section[model]["gate"]["passed"]
        assert graph_problems(bundle.path(section[model]["file"]), tensorrt_int8=True) == []
    fakes.install(monkeypatch)
    assert [engine.name for engine in export_engines(bundle.root, "int8")] == [f"{model}.int8.engine" for model in models]
    assert Detector.load(bundle.root, backend="tensorrt", precision="int8").precisions == dict.fromkeys(models, "int8")
