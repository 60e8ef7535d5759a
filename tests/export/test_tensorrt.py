"""TensorRT engines built from a bundle and run through the backend, compared with ONNX Runtime (the
reference) on real frames. Runs where tensorrt, pycuda and a CUDA GPU are present; skipped elsewhere."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge.backends import create_backend
from leukoedge.backends.onnxruntime import OnnxRuntimeBackend
from leukoedge.bundle import load_bundle
from leukoedge.errors import BackendUnavailableError
from leukoedge.preprocess.cpu import PreprocessSpec, prepare_frame

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None,
    reason="TensorRT engines need tensorrt and pycuda on a CUDA GPU: pip install 'leukoedge[jetson]'",
)

# Probabilities; fp32 engines may run TF32 on Ampere and later, fp16 engines carry fp16 rounding.
TOLERANCE = {"fp32": 1e-2, "fp16": 3e-2}


@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from leukoedge.backends.tensorrt import import_pycuda

    try:
        import_pycuda()
    except BackendUnavailableError as error:
        pytest.skip(f"no usable CUDA GPU: {error}")
    return Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("engines") / "default"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_built_from_the_bundle_matches_onnx_runtime_on_real_frames(engine_bundle: Path, data_root: Path, precision: str):
    from leukoedge.export.tensorrt import export_engines

    engines = export_engines(engine_bundle, precision)
    assert [engine.name for engine in engines] == [f"{model}.{precision}.engine" for model in ("segmenter", "refiner", "classifier")]
    manifest = load_bundle(engine_bundle).manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    frames = [cv2.imread(str(path)) for path in sorted((data_root / "bccd" / "images").glob("*.jpg"))[:2]]
    fields = np.concatenate([prepare_frame(frame, spec, manifest["segmenter"]["input_size"]).tensor for frame in frames])
    model = engine_bundle / "segmenter.onnx"
    engine_out = create_backend("tensorrt", model, precision=precision).run({"image": fields})["probs"]
    reference = OnnxRuntimeBackend(model).run({"image": fields})["probs"]
    assert engine_out.shape == reference.shape
    assert float(np.abs(engine_out - reference).max()) < TOLERANCE[precision]


def test_an_engine_of_another_model_is_refused(engine_bundle: Path):
    from leukoedge.backends.tensorrt import engine_paths
    from leukoedge.export.tensorrt import export_engines

    export_engines(engine_bundle, "fp32")
    segmenter_engine, _ = engine_paths(engine_bundle / "segmenter.onnx", "fp32")
    classifier_engine, _ = engine_paths(engine_bundle / "classifier.onnx", "fp32")
    shutil.copy(classifier_engine, segmenter_engine)
    shutil.copy(classifier_engine.with_suffix(".json"), segmenter_engine.with_suffix(".json"))
    with pytest.raises(BackendUnavailableError, match="model_sha256"):
        create_backend("tensorrt", engine_bundle / "segmenter.onnx", precision="fp32")
