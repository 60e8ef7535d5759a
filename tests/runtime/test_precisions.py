"""The manifest's optional "precisions" section: validation, and which file runs at which precision."""

from __future__ import annotations

import copy

import pytest

from leukoedge.bundle import SCHEMA_VERSION, fastest_precision, model_file, validate_manifest
from leukoedge.errors import BundleError

SHA = "0" * 64


def _gate(passed: bool) -> dict:
    return {"passed": passed, "samples": 80, "metrics": [{"name": "nucleus_dice", "fp32": 0.91, "int8": 0.91 if passed else 0.88, "tolerance": 0.005, "passed": passed}]}


def _manifest(segmenter_passed: bool = True) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "leukoedge-test",
        "model_version": "0.0.1",
        "created": "2025-01-01",
        "files": {name: SHA for name in ("segmenter.onnx", "classifier.onnx", "segmenter.int8.onnx", "classifier.int8.onnx", "calibration_set.csv")},
        "preprocess": {"channel_order": "RGB", "mean": [0.5] * 3, "std": [0.25] * 3, "stain_reference": None},
        "segmenter": {"file": "segmenter.onnx", "input": "image", "output": "probs", "input_size": [192, 256], "classes": ["b", "c", "n"], "architecture": "hctnet_s"},
        "classifier": {
            "file": "classifier.onnx",
            "input": "crop",
            "input_size": [64, 64],
            "crop_margin": 0.15,
            "primary_head": "blast",
            "heads": {"blast": {"output": "blast_probs", "classes": ["normal", "blast"]}},
        },
        "postprocess": {"min_cell_area_px": 40, "split_touching": True},
        "verdict": {"blast_threshold": 0.5, "flag_fraction": 0.2},
        "limits": {"min_frame_side": 16, "max_frame_side": 4096},
        "training": {},
        "precisions": {
            "calibration": {"method": "minmax", "calibration_set": "calibration_set.csv"},
            "segmenter": {
                "fp32": {"file": "segmenter.onnx", "median_ms": 120.0},
                "int8": {"file": "segmenter.int8.onnx" if segmenter_passed else None, "median_ms": 90.0, "gate": _gate(segmenter_passed)},
            },
            "classifier": {
                "fp32": {"file": "classifier.onnx", "median_ms": 3.0},
                "int8": {"file": "classifier.int8.onnx", "median_ms": 4.0, "gate": _gate(True)},
            },
        },
    }


def test_calibrated_and_uncalibrated_manifests_are_valid():
    validate_manifest(_manifest())
    validate_manifest(_manifest(segmenter_passed=False))
    old = _manifest()
    del old["precisions"]
    validate_manifest(old)  # bundles from before `leukoedge calibrate` stay valid


@pytest.mark.parametrize(
    "break_it, complaint",
    [
        (lambda m: m["precisions"]["segmenter"]["int8"]["gate"].update(passed=False), "failed its accuracy gate"),
        (lambda m: m["files"].pop("segmenter.int8.onnx"), "segmenter.int8.onnx' is not listed in files"),
        (lambda m: m["precisions"]["classifier"]["fp32"].update(file="other.onnx"), "must be classifier.file"),
        (lambda m: m["precisions"]["calibration"].update(method="magic"), "method one of"),
        (lambda m: m["precisions"]["segmenter"]["int8"].update(median_ms=-1), "median_ms must be a number > 0"),
        (lambda m: m["precisions"]["segmenter"].update(int4={}), "precisions.segmenter must be an object with fp32"),
    ],
)
def test_a_broken_precisions_section_is_refused(break_it, complaint):
    manifest = copy.deepcopy(_manifest())
    break_it(manifest)
    with pytest.raises(BundleError, match=complaint):
        validate_manifest(manifest)


def test_the_fastest_precision_that_passed_is_chosen_per_model():
    manifest = _manifest()
    assert fastest_precision(manifest, "segmenter") == "int8"  # 90 ms < 120 ms
    assert fastest_precision(manifest, "classifier") == "fp32"  # int8 measured slower: never chosen by default
    failed = _manifest(segmenter_passed=False)
    assert fastest_precision(failed, "segmenter") == "fp32"  # faster, but it failed its gate: not in the bundle
    uncalibrated = _manifest()
    del uncalibrated["precisions"]
    assert fastest_precision(uncalibrated, "segmenter") == "fp32"


def test_a_precision_within_the_timing_noise_of_fp32_does_not_become_the_default():
    manifest = _manifest(segmenter_passed=True)
    timings = manifest["precisions"]["segmenter"]
    for int8_ms, expected in ((120.0, "fp32"), (116.0, "fp32"), (113.0, "int8"), (60.0, "int8")):  # fp32 120 ms; 5 % margin
        timings["int8"]["median_ms"] = int8_ms
        assert fastest_precision(manifest, "segmenter") == expected, int8_ms


def test_model_file_per_precision_and_the_reason_when_there_is_none():
    manifest = _manifest(segmenter_passed=False)
    assert model_file(manifest, "classifier", "int8") == "classifier.int8.onnx"
    assert model_file(manifest, "segmenter", "fp16") == "segmenter.onnx"  # fp16 is a TensorRT engine of the fp32 file
    with pytest.raises(BundleError, match=r"failed its accuracy gate at calibration \(nucleus_dice 0.9100 -> 0.8800"):
        model_file(manifest, "segmenter", "int8")
    del manifest["precisions"]
    with pytest.raises(BundleError, match="leukoedge calibrate"):
        model_file(manifest, "segmenter", "int8")
