"""Detector on the CUDA paths: preprocess="cuda" (pycuda kernels) and backend="onnxruntime-cuda".

Everywhere: what is missing is refused with what to install, never run on the CPU behind the caller's back.
preprocess="cuda" also runs on the CPU emulation of the kernels (tests/runtime/cuda_emulator: the real
kernels.cu as host C++ behind stand-in pycuda modules), so CI runs it with no GPU. Where pycuda and a
CUDA GPU (or onnxruntime-gpu's CUDA provider) are present: results against the CPU reference on real BCCD fields, run on the shipped bundle (a barely trained bundle's near-tied
probabilities would flip on any difference). Tolerances:
- preprocess="cuda": label maps agree on >= 99 % of pixels and the verdict (cell count, blast count)
  and the cells' labels are the same. Cell boxes are not compared: where touching cells are split, the
  split line moves with a one-pixel change of the segmenter's output. A numpy model of the kernels'
  numerics (exact L*a*b* formulas in place of OpenCV's table) gave >= 99.9 % on 12 BCCD fields.
- backend="onnxruntime-cuda": segmenter and classifier probabilities within 1e-3 of ONNX Runtime on the CPU
  (TF32 is switched off, so both compute in fp32 and differ only by the order and algorithms of their sums).
"""

from __future__ import annotations

import collections
import importlib.util
import sys
import warnings
from pathlib import Path

import cuda_emulator
import numpy as np
import pytest

from leukoedge import BackendUnavailableError, Detector
from leukoedge.backends import create_backend
from leukoedge.bundle import bundle_models, load_bundle
from leukoedge.preprocess import nvrtc
from leukoedge.preprocess.cpu import prepare_crops, prepare_frame

SHIPPED_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "default"
MIN_LABEL_AGREEMENT = 0.99
MAX_PROBABILITY_DIFFERENCE = 1e-3


def _cuda_provider_present() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture
def emulated_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pycuda replaced by the CPU emulation for one test; the host build's path."""
    library = cuda_emulator.build(cuda_emulator.library_folder(request))
    cuda_emulator.install(monkeypatch, library)
    return library


@pytest.fixture(params=["emulated", "gpu"])
def cuda_runtime(request: pytest.FixtureRequest) -> str:
    if request.param == "emulated":
        request.getfixturevalue("emulated_gpu")
    elif importlib.util.find_spec("pycuda") is None:
        pytest.skip("CUDA preprocessing on a GPU needs pycuda and a CUDA GPU: pip install 'leukoedge[jetson]'")
    return request.param


def test_cuda_preprocessing_without_pycuda_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)  # as if it were not installed, on any machine
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailableError, match=r"pycuda: pip install 'leukoedge\[jetson\]'"):
        Detector.load(SHIPPED_BUNDLE, preprocess="cuda")


def test_cuda_preprocessing_needs_no_nvcc_on_path(emulated_gpu: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # Stock JetPack leaves /usr/local/cuda/bin off PATH; pycuda's SourceModule then fails asking nvcc
    # its version (the stand-in's SourceModule fails the same way). NVRTC needs no PATH.
    monkeypatch.setenv("PATH", str(tmp_path))
    try:
        detector = Detector.load(SHIPPED_BUNDLE, preprocess="cuda")
    except BackendUnavailableError as error:
        cuda_emulator.missing(f"the kernels compile with NVRTC: {error}")
    assert detector.preprocess_name == "cuda"
    frame = np.random.default_rng(1).integers(0, 256, (120, 160, 3), np.uint8)
    assert np.isfinite(detector.prepare_frame(frame).tensor).all()


def test_cuda_preprocessing_without_nvrtc_names_the_package_to_install(emulated_gpu: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(nvrtc, "_candidate_paths", lambda: ["/nonexistent/libnvrtc.so.12"])
    nvrtc.load_nvrtc.cache_clear()
    try:
        with pytest.raises(BackendUnavailableError, match=r"no libnvrtc was found: pip install 'nvidia-cuda-nvrtc-cu12"):
            Detector.load(SHIPPED_BUNDLE, preprocess="cuda")
    finally:
        nvrtc.load_nvrtc.cache_clear()


def test_an_nvrtc_newer_than_the_driver_is_refused_with_the_matching_one_named(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    # JetPack 5's driver is CUDA 11.4: code from NVRTC 12 would not load there.
    cuda_emulator.install(monkeypatch, cuda_emulator.build(cuda_emulator.library_folder(request)), compute_capability=(7, 2), driver_version=11040)
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (12, 6))
    with pytest.raises(BackendUnavailableError, match=r"NVRTC 12.6 makes code that this CUDA 11.4 driver cannot load.*nvidia-cuda-nvrtc-cu11"):
        Detector.load(SHIPPED_BUNDLE, preprocess="cuda")


def test_an_unknown_preprocess_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown preprocess 'gpu'; expected one of cpu, cuda"):
        Detector.load(SHIPPED_BUNDLE, preprocess="gpu")


def test_the_cpu_preprocess_is_the_reference_and_is_recorded():
    detector = Detector.load(SHIPPED_BUNDLE, threads=1)
    assert detector.preprocess_name == "cpu"
    frame = np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)
    expected = prepare_frame(frame, detector.spec, detector.segmenter_spec["input_size"])
    np.testing.assert_array_equal(detector.prepare_frame(frame).tensor, expected.tensor)


def test_onnxruntime_cuda_without_the_cuda_provider_names_onnxruntime_gpu(monkeypatch: pytest.MonkeyPatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="onnxruntime-cuda backend needs onnxruntime-gpu"):
        Detector.load(SHIPPED_BUNDLE, backend="onnxruntime-cuda")


@pytest.mark.skipif(_cuda_provider_present(), reason="the CUDA provider is really present here")
def test_a_cuda_session_that_falls_back_to_the_cpu_is_refused(monkeypatch: pytest.MonkeyPatch):
    import onnxruntime as ort

    # The provider is listed but cannot start (as when CUDA or cuDNN libraries are missing): ONNX Runtime
    # drops it and runs the session on the CPU; the backend must refuse that, not run slowly.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ONNX Runtime's own warning about the provider it dropped
        with pytest.raises(BackendUnavailableError, match="could not start its CUDA provider"):
            create_backend("onnxruntime-cuda", SHIPPED_BUNDLE / "segmenter.onnx")


def test_fp16_stays_tensorrt_only_on_onnxruntime_cuda():
    with pytest.raises(BackendUnavailableError, match="fp16 runs on the TensorRT backend only.*onnxruntime-cuda runs fp32 or int8"):
        Detector.load(SHIPPED_BUNDLE, backend="onnxruntime-cuda", precision="fp16")


def _detector_or_skip(runtime: str = "gpu", **options: str) -> Detector:
    try:
        return Detector.load(SHIPPED_BUNDLE, **options)
    except BackendUnavailableError as error:
        if runtime == "emulated":
            cuda_emulator.missing(f"the kernels compile with NVRTC: {error}")
        pytest.skip(f"no CUDA here: {error}")


def test_cuda_preprocessing_finds_the_cells_and_labels_of_the_cpu_reference(cuda_runtime: str, smear_fields: list[np.ndarray]):
    on_gpu = _detector_or_skip(cuda_runtime, preprocess="cuda")
    assert on_gpu.preprocess_name == "cuda"
    reference = Detector.load(SHIPPED_BUNDLE)
    for index, field in enumerate(smear_fields):
        expected, actual = reference.run(field), on_gpu.run(field)
        agreement = float((actual.label_map == expected.label_map).mean())
        assert agreement >= MIN_LABEL_AGREEMENT, f"field {index}: label maps agree on {100 * agreement:.2f} % of pixels"
        assert (actual.verdict.cell_count, actual.verdict.blast_count) == (expected.verdict.cell_count, expected.verdict.blast_count)
        labels = collections.Counter(cell.label for cell in actual.cells)
        assert labels == collections.Counter(cell.label for cell in expected.cells), f"field {index}: p(blast) {[c.blast_probability for c in actual.cells]}"


@pytest.mark.skipif(not _cuda_provider_present(), reason="needs onnxruntime-gpu's CUDAExecutionProvider")
def test_onnxruntime_cuda_probabilities_equal_the_cpu_ones(smear_fields: list[np.ndarray]):
    bundle = load_bundle(SHIPPED_BUNDLE)
    manifest = bundle.manifest
    segmenter, classifier = manifest["segmenter"], manifest["classifier"]
    reference = Detector(bundle)
    try:
        backends = {
            device: {model: create_backend(device, bundle.path(manifest[model]["file"])) for model in bundle_models(manifest)}
            for device in ("onnxruntime", "onnxruntime-cuda")
        }
    except BackendUnavailableError as error:
        pytest.skip(f"the CUDA provider is listed but cannot run here: {error}")
    for field in smear_fields:
        prepared = prepare_frame(field, reference.spec, segmenter["input_size"])
        boxes = [cell.box for cell in reference.run(field).cells] or [(0, 0, 64, 64)]
        crops = prepare_crops(field, boxes, reference.spec, classifier["input_size"], classifier["crop_margin"], prepared.lab_statistics)
        inputs = {"segmenter": {segmenter["input"]: prepared.tensor}, "classifier": {classifier["input"]: crops}}
        if "refiner" in manifest:
            refiner = manifest["refiner"]
            cell_crops = prepare_crops(field, boxes, reference.spec, refiner["input_size"], refiner["crop_margin"], prepared.lab_statistics)
            inputs["refiner"] = {refiner["input"]: cell_crops}
        for model, model_inputs in inputs.items():
            on_cpu, on_gpu = backends["onnxruntime"][model].run(model_inputs), backends["onnxruntime-cuda"][model].run(model_inputs)
            for name, expected in on_cpu.items():
                difference = float(np.abs(on_gpu[name] - expected).max())
                assert difference <= MAX_PROBABILITY_DIFFERENCE, f"{model} {name}: max |cuda - cpu| = {difference:.2e}"
