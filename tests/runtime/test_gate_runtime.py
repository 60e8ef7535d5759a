"""A bundle with a gate: proposals it rejects are never cells, never classified, never in the verdict."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import Detector
from leukoedge.bundle import save_bundle

pytest.importorskip("torch", reason="the test gate is exported from PyTorch (training extra)")

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "bccd_BloodImage_00002.jpg"


@pytest.fixture(scope="module")
def gated_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """The shipped models plus an (untrained) gate at thresholds 0 (keeps all) and 1 (rejects all)."""
    import torch

    from leukoedge.export.onnx import export_classifier
    from leukoedge.training.gate import GATE_HEAD, gate_spec
    from leukoedge.training.models.classifiers import gate_cnn

    torch.manual_seed(0)
    base = Detector.load(REPO / "models" / "default")
    scratch = tmp_path_factory.mktemp("gate")
    size = base.classifier_spec["input_size"]
    export_classifier(gate_cnn({GATE_HEAD: 2}).eval(), [GATE_HEAD], np.random.default_rng(0).normal(size=(4, 3, *size)).astype(np.float32), scratch / "gate.onnx")
    bundles = {}
    for threshold in (0.0, 1.0):
        manifest = copy.deepcopy(base.bundle.manifest)
        manifest["gate"] = gate_spec(manifest["classifier"], threshold)
        if "precisions" in manifest:
            manifest["precisions"]["gate"] = {"fp32": {"file": "gate.onnx", "median_ms": None}}
        files = {name: base.bundle.path(name) for name in manifest["files"]} | {"gate.onnx": scratch / "gate.onnx"}
        bundles[threshold] = save_bundle(scratch / f"at-{threshold}", manifest, files).root
    return bundles


def test_a_gate_that_rejects_everything_leaves_no_cell_and_no_flag(gated_bundles: dict[float, Path]) -> None:
    frame = cv2.imread(str(SAMPLE))
    plain = Detector.load(REPO / "models" / "default").run(frame)
    rejected = Detector.load(gated_bundles[1.0]).run(frame)
    assert plain.cells and not rejected.cells
    assert rejected.verdict.non_wbc_count == len(plain.cells)
    assert rejected.verdict.status == "no_cells" and not rejected.verdict.flagged
    assert not rejected.label_map.any()  # the rejected objects' pixels are background again
    assert rejected.timings["gate"] > 0


def test_a_gate_that_keeps_everything_changes_nothing_but_the_wbc_types_it_may_name(gated_bundles: dict[float, Path]) -> None:
    frame = cv2.imread(str(SAMPLE))
    plain = Detector.load(REPO / "models" / "default").run(frame)
    kept = Detector.load(gated_bundles[0.0]).run(frame)
    assert [cell.box for cell in kept.cells] == [cell.box for cell in plain.cells]
    assert [cell.label for cell in kept.cells] == [cell.label for cell in plain.cells]
    assert np.array_equal(kept.label_map, plain.label_map) and kept.verdict.non_wbc_count == 0
    for cell in kept.cells:
        types = cell.head_scores["wbc_type"]
        assert types["platelet"] == 0.0 and types["erythroblast"] == 0.0
        assert sum(types.values()) == pytest.approx(1.0, abs=1e-5)
