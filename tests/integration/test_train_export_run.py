"""End to end: the training pipeline (quick mode) -> ONNX export with parity -> bundle -> Detector
on a real image of every data source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from leukoedge import Detector
from leukoedge.bundle import MANIFEST_NAME, load_bundle, sha256_file
from leukoedge.result import BACKGROUND, CYTOPLASM, NUCLEUS
from leukoedge.training import data

PARITY_LIMIT = 1e-4


def test_exported_models_match_pytorch(tiny_bundle):
    training = load_bundle(tiny_bundle).manifest["training"]
    for model in ("segmenter", "refiner", "classifier"):
        parity = training[model]["onnx_parity_max_abs"]
        assert isinstance(parity, float)
        assert 0.0 <= parity < PARITY_LIMIT, f"{model}: ONNX differs from PyTorch by {parity}"


def test_manifest_lists_every_file_with_its_sha256_and_loads(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    on_disk = {path.name for path in tiny_bundle.iterdir() if path.name != MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk == {"segmenter.onnx", "refiner.onnx", "classifier.onnx"}
    for name, sha in manifest["files"].items():
        assert sha == sha256_file(tiny_bundle / name)
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest == manifest
    assert bundle.manifest["training"]["quick"] is True
    assert bundle.manifest["preprocess"]["stain_reference"]["method"] == "reinhard"


@pytest.fixture(scope="module")
def detector(tiny_bundle: Path) -> Detector:
    return Detector.load(tiny_bundle)


@pytest.mark.parametrize("source", ["bccd", "all-taleqani", "wbc-seg-zheng", "all-idb2", "pbc"])
def test_detector_runs_on_a_real_image_of_every_source(detector, data_root, source):
    record = data.load_records(data_root, source, "test")[0]
    frame = data.read_image(record)

    result = detector.run(frame)

    height, width = frame.shape[:2]
    assert result.label_map.shape == (height, width)
    assert set(np.unique(result.label_map)) <= {BACKGROUND, CYTOPLASM, NUCLEUS}
    for cell in result.cells:
        x0, y0, x1, y1 = cell.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert cell.mask.shape == (y1 - y0, x1 - x0)
        assert cell.nucleus_mask.shape == cell.mask.shape and not (cell.nucleus_mask & ~cell.mask).any()
    # The label map is painted from the (refined) cells: it holds their pixels and nothing else.
    painted = np.zeros((height, width), bool)
    for cell in result.cells:
        x0, y0, x1, y1 = cell.box
        painted[y0:y1, x0:x1] |= cell.mask
    assert np.array_equal(painted, result.label_map != BACKGROUND)
    assert result.timings["refine"] > 0.0 or not result.cells
    assert result.verdict.cell_count == len(result.cells)
    assert json.loads(result.to_json())["frame_shape"] == [height, width]
