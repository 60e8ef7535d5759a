"""The cell-or-not gate: how proposals are labelled, and that training separates white cells from other objects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the gate is trained with the training extra (torch)")

from leukoedge.training import data  # noqa: E402
from leukoedge.training.gate import EDGE_WHOLE_THRESHOLD, GateExamples, choose_threshold, label_proposals, train_gate, wbc_probabilities  # noqa: E402


def _record(source: str, wbc_type: str | None = None, device: str | None = None) -> data.Record:
    return data.Record(source, Path("x.jpg"), None, None, None, wbc_type, "train", device)


def test_pbc_centre_proposal_is_the_labelled_cell_and_the_rest_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "wbc_boxes", lambda record: [])
    proposals = [(150, 150, 210, 210), (0, 0, 30, 30), (300, 300, 340, 340)]
    assert label_proposals(_record("pbc", "neutrophil"), proposals, (360, 360), 1.0) == [1, 0, 0]
    assert label_proposals(_record("pbc", "platelet"), proposals, (360, 360), 1.0) == [0, 0, 0]


def test_box_fields_match_white_cells_leave_fragments_out_and_reject_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "wbc_boxes", lambda record: [(100, 100, 160, 160)])
    proposals = [(102, 98, 158, 161), (140, 140, 150, 150), (10, 10, 30, 30)]
    assert label_proposals(_record("txl-pbc", device="raabin"), proposals, (400, 400), 1.0) == [1, None, 0]
    # Boxes are scaled with the frame when the training copy was rescaled.
    assert label_proposals(_record("bccd"), [(200, 200, 320, 320)], (800, 800), 2.0) == [1]


def test_taleqani_unmatched_proposals_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "wbc_boxes", lambda record: [(10, 10, 60, 60)])
    assert label_proposals(_record("all-taleqani"), [(12, 12, 58, 58), (100, 100, 140, 140)], (224, 224), 1.0) == [1, None]


def test_training_separates_two_kinds_of_crops_and_the_threshold_keeps_the_recall() -> None:
    rng = np.random.default_rng(0)
    crops = rng.normal(0, 0.3, size=(160, 3, 64, 64)).astype(np.float16)
    labels = np.repeat([0, 1], 80)
    crops[labels == 1, :, 16:48, 16:48] -= 1.5  # a dark "nucleus" in the middle of the white cells
    examples = GateExamples(crops, labels, np.array(["a", "b"] * 80, object))
    model = train_gate(examples, steps=40, batch_size=32)
    probabilities = wbc_probabilities(model, crops)
    assert ((probabilities >= 0.5) == labels).mean() >= 0.9
    threshold = choose_threshold(probabilities, labels, 0.95)
    assert (probabilities[labels == 1] >= threshold).mean() >= 0.95
    with pytest.raises(ValueError, match="white cells and of other objects"):
        train_gate(GateExamples(crops[:10], np.zeros(10, np.int64), np.array(["a"] * 10, object)), steps=1)


def test_leave_one_out_table_marks_a_labelled_adaptation_its_check_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from types import SimpleNamespace

    from leukoedge.cli import main
    from leukoedge.training import gate

    def row(domain: str, adapted: object, problems: list[str] | None = None) -> dict:
        report = None if problems is None else SimpleNamespace(problems=problems, lines=lambda: ["held-back frames: ..."])
        figures = {"fields": 10, "box_recall": 0.9, "box_precision": 0.9, "rbc_called_wbc_per_1000": 1.0, "refused_rate": 0.0, "false_flag_rate": 0.0, "flagged": 0, "judged": 10}
        return {**figures, "domain": domain, "left_out": domain, "adapted": adapted, "gate_threshold": 0.5, "report": report}

    rows = [
        {**row("txl-pbc/raabin", True), "uncertainty_bar": 0.1176},  # unlabelled adaptation: the bar it gave the device
        row("txl-pbc/raabin", "labelled", []),
        row("txl-pbc/bcd", "labelled", ["all-taleqani whole-cell Dice 0.869 ..."]),
    ]
    monkeypatch.setattr(gate, "leave_one_source_out", lambda *args, **kwargs: rows)
    (tmp_path / "data").mkdir()
    assert main(["gate", "--data", str(tmp_path / "data"), "--leave-out", "txl-pbc/raabin", "txl-pbc/bcd", "--labelled-frames", "40"]) == 0
    table = capsys.readouterr().out
    assert "| txl-pbc/bcd (gate threshold 0.50; refused by its check, not written) |" in table
    assert "| txl-pbc/raabin (gate threshold 0.50) |" in table
    assert "| txl-pbc/raabin (gate threshold 0.50, uncertainty bar 0.118) |" in table


def test_a_gate_learns_from_several_segmenters_proposals_each_cached_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from leukoedge.training import gate

    def detector(name: str, segmenter_sha: str):
        manifest = {"segmenter": {"file": "segmenter.onnx", "architecture": name}, "files": {"segmenter.onnx": segmenter_sha}}
        return SimpleNamespace(name=name, bundle=SimpleNamespace(manifest=manifest))

    collected = []

    def collect(detector, records, copies, seed, description=""):
        collected.append(detector.name)
        count = len(records)  # the fields' examples: 2, the look-alikes': 1
        return GateExamples(np.zeros((count, 3, 4, 4), np.float16), np.zeros(count, np.int64), np.array([detector.name] * count, object))

    monkeypatch.setattr(gate, "gate_records", lambda data_root, split, per_source: ["field", "field"])
    monkeypatch.setattr(gate, "look_alike_records", lambda data_root, split, per_source: ["erythroblast"])
    monkeypatch.setattr(gate, "collect_examples", collect)
    detectors = [detector("hctnet_lite", "a" * 64), detector("mobile_unet_field_dense", "b" * 64)]
    examples = gate._examples(detectors, Path("data"), "train", 10, 2, tmp_path)
    look_alike = gate.LOOK_ALIKE_DOMAIN  # the look-alikes get a share of each batch of their own
    assert list(examples.domains) == ["hctnet_lite"] * 2 + [look_alike] + ["mobile_unet_field_dense"] * 2 + [look_alike]
    assert len(list(tmp_path.glob("gate-train-10-2-*.npz"))) == 2  # one cache file per segmenter
    gate._examples(detectors, Path("data"), "train", 10, 2, tmp_path)
    assert collected == ["hctnet_lite"] * 2 + ["mobile_unet_field_dense"] * 2  # the second time, both from the cache
    assert gate.proposer(detectors[1]) == {"segmenter": "mobile_unet_field_dense", "sha256": "b" * 64}


def test_only_a_bundle_that_cuts_the_same_crops_may_propose_cells() -> None:
    from types import SimpleNamespace

    from leukoedge.bundle import load_bundle
    from leukoedge.shipped import default_bundle
    from leukoedge.training.gate import check_same_crops

    shipped = load_bundle(default_bundle())
    check_same_crops(shipped, shipped)
    other = {**shipped.manifest, "classifier": {**shipped.manifest["classifier"], "crop_margin": 0.3}}
    with pytest.raises(ValueError, match="classifier.crop_margin"):
        check_same_crops(shipped, SimpleNamespace(manifest=other, root=Path("other")))


def test_gate_refuses_proposals_from_a_bundle_with_other_crops_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from leukoedge.bundle import load_bundle, save_bundle
    from leukoedge.cli import main
    from leukoedge.shipped import default_bundle

    shipped = load_bundle(default_bundle())
    manifest = {**shipped.manifest, **{key: {**shipped.manifest[key], "crop_margin": 0.3} for key in ("classifier", "gate")}}
    save_bundle(tmp_path / "other", manifest, {name: shipped.path(name) for name in manifest["files"]})
    (tmp_path / "data").mkdir()
    code = main(["gate", "--data", str(tmp_path / "data"), "--bundle", str(default_bundle()), "--out", str(tmp_path / "out"), "--proposals-from", str(tmp_path / "other")])
    assert code == 2
    assert "classifier.crop_margin" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_examples_are_collected_from_a_real_field_through_the_shipped_detector(data_root: Path) -> None:
    from leukoedge.detector import Detector
    from leukoedge.shipped import default_bundle
    from leukoedge.training import gate

    record = data.load_records(data_root, "bccd", "val")[0]
    with Detector.load(default_bundle()) as detector:
        examples = gate.collect_examples(detector, [record], augmented_copies=0, seed=0)
    size = tuple(detector.classifier_spec["input_size"])
    assert examples.crops.shape[1:] == (3, *size) and examples.crops.dtype == np.float16
    assert set(examples.labels.tolist()) <= {0, 1} and (examples.labels == 1).any()  # its boxed white cell
    assert set(examples.domains.tolist()) == {record.domain}


def test_a_gated_bundle_built_from_two_segmenters_proposals_names_them_without_paths(data_root: Path, tmp_path: Path) -> None:
    from leukoedge.bundle import load_bundle
    from leukoedge.shipped import default_bundle
    from leukoedge.training.gate import GateRecipe, build_gated_bundle

    recipe = GateRecipe(steps=2, train_per_source=2, augmented_copies=0, val_per_source=2, proposals_from=(str(default_bundle()),))
    saved = build_gated_bundle(data_root, default_bundle(), tmp_path / "gated", recipe, cache=tmp_path / "cache", checkpoint=tmp_path / "gate.pt")
    bundle = load_bundle(saved.root)
    recorded = bundle.manifest["training"]["gate"]
    shipped = load_bundle(default_bundle()).manifest
    assert recorded["proposals_from"] == [{"segmenter": shipped["segmenter"]["architecture"], "sha256": shipped["files"]["segmenter.onnx"]}]
    assert str(tmp_path) not in json.dumps(bundle.manifest) and str(default_bundle()) not in json.dumps(recorded)
    assert 0.0 <= bundle.manifest["gate"]["threshold"] <= 1.0
    assert bundle.manifest["gate"]["edge_whole_threshold"] == EDGE_WHOLE_THRESHOLD  # every new gate reads edge cells whole too
    assert recorded["look_alikes_per_field"] == 3 and 0 < recorded["look_alike_examples"] < recorded["examples"]
    assert len(list((tmp_path / "cache").glob("gate-*.npz"))) == 2  # train and val, one segmenter file (the same bundle twice)


def test_the_look_alikes_are_pbc_platelets_and_erythroblasts_beyond_the_evenly_spaced_sample(data_root: Path) -> None:
    from leukoedge.training.gate import LOOK_ALIKES_PER_FIELD, NOT_WBC_TYPES, gate_records, look_alike_records

    look_alikes = look_alike_records(data_root, "val", 4)
    sampled = {record.image_path for record in gate_records(data_root, "val", 4)}
    assert len(look_alikes) == LOOK_ALIKES_PER_FIELD * 4
    assert {record.wbc_type for record in look_alikes} == set(NOT_WBC_TYPES) and {record.source for record in look_alikes} == {"pbc"}
    assert not sampled & {record.image_path for record in look_alikes}
