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


def test_a_cell_cut_by_the_frame_edge_is_read_again_whole_where_the_bundle_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """gate.edge_whole_threshold: a proposal at the frame's edge that its crop does not pass is read again, mirrored
    across the edge and reflected there, against that threshold; the other proposals' decisions do not change."""
    from leukoedge.preprocess.cpu import touches_edge

    detector = Detector.load(REPO / "models" / "default")
    frame = cv2.imread(str(REPO / "samples" / "pbc_lymphocyte_LY_131013.jpg"))  # a white cell and a platelet
    largest = max(detector.candidates(frame).instances, key=lambda cell: int(cell.mask.sum()))
    x0, _, x1, _ = largest.box
    cut = np.ascontiguousarray(frame[:, : x0 + 2 * (x1 - x0) // 3])  # the frame ends two thirds into its largest cell
    found = detector.candidates(cut)
    crops = detector.cell_crops(cut, found.prepared, found.instances)
    at_edge = np.array([touches_edge(cell.classifier_box, cut.shape[:2]) for cell in found.instances])
    assert at_edge.any() and not at_edge.all()

    def nothing_filled_beyond_the_edge(crops: np.ndarray) -> np.ndarray:  # the mean colour normalizes to 0 in every channel
        return (np.abs(crops).sum(axis=1) > 0).all(axis=(1, 2)).astype(np.float32)

    monkeypatch.setattr(detector, "white_cell_probabilities", nothing_filled_beyond_the_edge)
    detector.gate_spec = {**{key: value for key, value in detector.gate_spec.items() if key != "edge_whole_threshold"}, "threshold": 0.5}
    plain = detector.gate_keeps(cut, found.prepared, found.instances, crops)
    detector.gate_spec["edge_whole_threshold"] = 0.9
    whole = detector.gate_keeps(cut, found.prepared, found.instances, crops)
    assert not plain[at_edge].any() and whole[at_edge].all()
    assert np.array_equal(plain[~at_edge], whole[~at_edge])
    monkeypatch.setattr(detector, "white_cell_probabilities", lambda crops: 0.85 * nothing_filled_beyond_the_edge(crops))
    assert not detector.gate_keeps(cut, found.prepared, found.instances, crops)[at_edge].any()  # under the edge threshold
