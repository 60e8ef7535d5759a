"""`leukoedge calibrate` end to end on a quick bundle: what it writes, the gate, precision selection."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from leukoedge import Detector
from leukoedge.bundle import load_bundle
from leukoedge.calibration import gate
from leukoedge.calibration.calibrate import CalibrateConfig, cell_finder, parse_keep_float, quantize_and_gate
from leukoedge.errors import BackendUnavailableError, BundleError, LeukoedgeError
from leukoedge.preprocess.cpu import PreprocessSpec


def test_calibrated_bundle_lists_int8_models_gate_table_and_calibration_files(calibrated_bundle: Path, data_root: Path):
    bundle = load_bundle(calibrated_bundle)  # verifies every sha256, the new files included
    files = bundle.manifest["files"]
    models = ("segmenter", "refiner", "classifier")
    assert {*(f"{model}.onnx" for model in models), *(f"{model}.int8.onnx" for model in models), "calibration_set.csv"} <= set(files)
    precisions = bundle.manifest["precisions"]
    assert precisions["calibration"]["method"] == "minmax"
    for model in models:
        int8 = precisions[model]["int8"]
        assert int8["file"] == f"{model}.int8.onnx" and int8["gate"]["passed"]
        assert int8["median_ms"] > 0 and precisions[model]["fp32"]["median_ms"] > 0
        assert {metric["name"] for metric in int8["gate"]["metrics"]}
    verdict_metrics = {"taleqani_verdict_accuracy", "taleqani_benign_unflagged"}  # the frame verdict with the INT8 model in place
    assert {m["name"] for m in precisions["segmenter"]["int8"]["gate"]["metrics"]} == {"nucleus_dice", "whole_cell_dice", *verdict_metrics}
    assert {m["name"] for m in precisions["refiner"]["int8"]["gate"]["metrics"]} == {"nucleus_dice", "whole_cell_dice"}
    assert {"blast_accuracy", *verdict_metrics} <= {m["name"] for m in precisions["classifier"]["int8"]["gate"]["metrics"]}
    with bundle.path("calibration_set.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert sum(row["model"] == "segmenter" for row in rows) == precisions["calibration"]["fields"] == 8
    assert sum(row["model"] == "classifier" for row in rows) == precisions["calibration"]["cells"] > 0
    assert all((data_root / row["image"]).is_file() for row in rows)
    assert all(len(row["box"].split()) == 4 for row in rows if row["model"] == "classifier")


def test_onnx_runtime_runs_only_conv_and_gemm_in_int8_attention_and_norms_stay_float(calibrated_bundle: Path, tmp_path: Path):
    for model in ("segmenter", "refiner", "classifier"):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{model}.optimized.onnx")
        ort.InferenceSession(str(calibrated_bundle / f"{model}.int8.onnx"), options, providers=["CPUExecutionProvider"])
        kernels = {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
        int8_kernels = {op for op in kernels if op.startswith("QLinear") or op == "QGemm"}
        # QLinearAdd: the sum of a convolution split over its input's parts (export/onnx.split_channel_concats), whose
        # quantized outputs ONNX Runtime adds in INT8 before the next convolution's quantized input.
        allowed = {"QLinearConv", "QGemm", "QLinearAdd"} if model in ("segmenter", "refiner") else {"QLinearConv", "QGemm"}
        assert "QLinearConv" in int8_kernels and int8_kernels <= allowed, int8_kernels
        assert "Softmax" in kernels  # the output softmax (and the attention softmax) run in float


def test_gate_refuses_int8_when_the_thresholds_cannot_be_met_and_names_the_metric(tiny_bundle: Path, data_root: Path, tmp_path: Path):
    bundle = load_bundle(tiny_bundle)
    manifest = bundle.manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    cases = gate.cell_cases(data_root, spec, manifest["classifier"], cell_finder(bundle, None), "val", limit=3)
    # Every score lies in [0, 1]: gaining more than 1.0 over FP32 is impossible.
    config = CalibrateConfig(data_root, tiny_bundle, tmp_path, dice_tolerance=-1.01, accuracy_tolerance=-1.01, speed_runs=2)

    def score(path: Path) -> dict[str, float]:
        return gate.classifier_scores(path, cases, manifest["classifier"], manifest["verdict"]["blast_threshold"])

    crops = np.stack([case.crop for case in cases])
    _, outcome = quantize_and_gate("classifier", bundle.path("classifier.onnx"), crops, score, len(cases), config, tmp_path)
    assert not outcome.written and not outcome.gate.passed
    assert {op_type for op_type, _ in outcome.remedies} == {"Conv", "Gemm"}  # each quantized op type kept in float, re-measured
    message = outcome.explanation("classifier")
    assert "blast_accuracy" in message and "no int8 classifier was written" in message
    assert "does not pass either" in message


def test_keep_float_takes_model_and_names():
    assert parse_keep_float(["segmenter:MatMul,Softmax", "segmenter:/x/Conv"]) == {"segmenter": ("MatMul", "Softmax", "/x/Conv")}
    assert parse_keep_float(["refiner:MatMul"]) == {"refiner": ("MatMul",)}
    with pytest.raises(LeukoedgeError, match="MODEL:NAME"):
        parse_keep_float(["MatMul"])


def test_detector_picks_the_fastest_precision_that_passed_or_the_one_asked_for(calibrated_bundle: Path, tmp_path: Path, data_root: Path):
    bundle_dir = tmp_path / "default"
    shutil.copytree(calibrated_bundle, bundle_dir)
    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # Speeds as if measured on a machine where int8 helps the segmenter but not the classifier.
    manifest["precisions"]["segmenter"]["fp32"]["median_ms"], manifest["precisions"]["segmenter"]["int8"]["median_ms"] = 20.0, 10.0
    manifest["precisions"]["classifier"]["fp32"]["median_ms"], manifest["precisions"]["classifier"]["int8"]["median_ms"] = 2.0, 3.0
    manifest["precisions"]["refiner"]["fp32"]["median_ms"], manifest["precisions"]["refiner"]["int8"]["median_ms"] = 9.0, 4.0
    manifest_path.write_text(json.dumps(manifest))

    fastest = Detector.load(bundle_dir)
    assert fastest.precisions == {"segmenter": "int8", "refiner": "int8", "classifier": "fp32"}
    frame = cv2.imread(str(sorted((data_root / "bccd" / "images").glob("*.jpg"))[0]))
    assert fastest.run(frame).label_map.shape == frame.shape[:2]
    assert Detector.load(bundle_dir, precision="int8").precisions == {"segmenter": "int8", "refiner": "int8", "classifier": "int8"}
    assert Detector.load(bundle_dir, precision="fp32").precisions == {"segmenter": "fp32", "refiner": "fp32", "classifier": "fp32"}
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        Detector.load(bundle_dir, precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        Detector.load(bundle_dir, precision="int4")


def test_an_uncalibrated_bundle_runs_fp32_and_refuses_int8_with_the_command_to_make_it(tiny_bundle: Path):
    assert Detector.load(tiny_bundle).precisions == {"segmenter": "fp32", "refiner": "fp32", "classifier": "fp32"}
    with pytest.raises(BundleError, match="leukoedge calibrate"):
        Detector.load(tiny_bundle, precision="int8")


def test_tensorrt_target_quantizes_symmetric_int8_with_zero_points_at_zero(tiny_bundle: Path, data_root: Path, tmp_path: Path):
    from onnx import numpy_helper

    from leukoedge.calibration.quantize import QuantizationSettings, TensorBatches, prepare_for_quantization, quantize_model

    bundle = load_bundle(tiny_bundle)
    manifest = bundle.manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    cases = gate.cell_cases(data_root, spec, manifest["classifier"], cell_finder(bundle, None), "val", limit=2)
    prepared = prepare_for_quantization(bundle.path("classifier.onnx"), tmp_path / "prepared.onnx")
    settings = QuantizationSettings.for_target("tensorrt")
    batches = TensorBatches("crop", np.stack([case.crop for case in cases]))
    int8 = onnx.load(str(quantize_model(prepared, tmp_path / "classifier.int8.onnx", settings, tmp_path / "ranges.json", batches)))
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in int8.graph.initializer}
    zero_points = [initializers[node.input[2]] for node in int8.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(point.dtype == np.int8 and not point.any() for point in zero_points)


def test_int8_engines_are_refused_for_models_quantized_for_the_cpu(calibrated_bundle: Path):
    from leukoedge.export.tensorrt import export_engines

    with pytest.raises(BundleError, match="--target tensorrt"):
        export_engines(calibrated_bundle, "int8")


def test_the_verdict_metric_scores_the_detectors_verdict_against_each_fields_label(tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle)
    empty = np.full((480, 640, 3), 245, np.uint8)  # no cell, so never flagged
    cases = [gate.FieldCase(empty, malignant=False), gate.FieldCase(empty, malignant=False), gate.FieldCase(empty, malignant=True)]
    scores = gate.verdict_scores(bundle, "segmenter", bundle.path("segmenter.onnx"), cases)
    assert scores == {"taleqani_verdict_accuracy": pytest.approx(2 / 3), "taleqani_benign_unflagged": 1.0}
    assert gate.verdict_scores(bundle, "classifier", bundle.path("classifier.onnx"), cases) == scores
    assert gate.verdict_scores(bundle, "segmenter", bundle.path("segmenter.onnx"), cases[2:]) == {"taleqani_verdict_accuracy": 0.0}


def test_the_benign_share_reads_the_training_fields_beside_the_held_out_ones(tiny_bundle: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch):
    extra = gate.benign_field_cases(data_root, limit=3)
    assert len(extra) == 3 and not any(case.malignant for case in extra)
    bundle = load_bundle(tiny_bundle)
    empty = np.full((480, 640, 3), 245, np.uint8)
    held_out = [gate.FieldCase(empty, malignant=False), gate.FieldCase(empty, malignant=True)]
    flags = {id(case.frame): True for case in extra}  # every training field flagged, the held-out ones not

    class Verdict:
        def __init__(self, flagged: bool):
            self.flagged = flagged

    def run(self, frame: np.ndarray, **_):
        return type("Result", (), {"verdict": Verdict(flags.get(id(frame), False))})()

    monkeypatch.setattr(gate.Detector, "run", run)
    scores = gate.verdict_scores(bundle, "classifier", bundle.path("classifier.onnx"), held_out, benign_cases=extra)
    # The verdict's accuracy is the held-out fields' alone; the benign share counts 1 of 4 benign fields unflagged.
    assert scores == {"taleqani_verdict_accuracy": 0.5, "taleqani_benign_unflagged": 0.25}


def test_a_quantized_model_that_flags_one_more_benign_field_fails_its_gate():
    tolerances = {"accuracy": 0.005, "dice": 0.005, "f1": 0.005, "unflagged": gate.DEFAULT_BENIGN_FLAG_TOLERANCE}
    fp32 = {"taleqani_verdict_accuracy": 0.970, "taleqani_benign_unflagged": 337 / 343}
    int8 = {"taleqani_verdict_accuracy": 0.970, "taleqani_benign_unflagged": 336 / 343}  # one more of 343 (0.003 < 0.005)
    result = gate.compare("classifier", fp32, int8, tolerances, 386)
    assert not result.passed and [metric.name for metric in result.failures()] == ["taleqani_benign_unflagged"]
    assert gate.compare("classifier", fp32, fp32, tolerances, 386).passed


def test_the_bundles_own_fp32_verdicts_are_read_once_for_both_models(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from leukoedge.calibration.calibrate import verdict_scorer

    bundle = load_bundle(tiny_bundle)
    calls = []

    def verdict_scores(bundle, model, path, cases, threads=None, benign_cases=()):
        calls.append((model, Path(path).name))
        return {"taleqani_verdict_accuracy": 0.9 if Path(path).parent == bundle.root else 0.8}

    monkeypatch.setattr(gate, "verdict_scores", verdict_scores)
    case = gate.FieldCase(np.zeros((8, 8, 3), np.uint8), False)
    scores = verdict_scorer(bundle, [case], [case], None)
    quantized = tmp_path / "classifier.int8.onnx"
    own = [scores("segmenter", bundle.path("segmenter.onnx")), scores("classifier", bundle.path("classifier.onnx")), scores("segmenter", bundle.path("segmenter.onnx"))]
    assert own == [{"taleqani_verdict_accuracy": 0.9}] * 3
    assert scores("classifier", quantized) == {"taleqani_verdict_accuracy": 0.8}
    assert calls == [("segmenter", "segmenter.onnx"), ("classifier", "classifier.int8.onnx")]  # FP32 once, each INT8 file its own
    assert verdict_scorer(bundle, [], [], None)("segmenter", quantized) == {}  # no Taleqani fields: no verdict metrics
