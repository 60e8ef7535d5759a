"""Ensembles of segmentation models: one model whose softmax is the mean of its members' softmax,
saved as one checkpoint, rebuilt by the pipeline from it, exported as one ONNX graph; and a refiner
distilled from one (--refiner-teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leukoedge import cli
from leukoedge.preprocess.cpu import PreprocessSpec
from leukoedge.training.data import LABEL_IGNORE
from leukoedge.training.models import ProbabilityMean, create_model
from leukoedge.training.pipeline import PipelineConfig, _checkpoint_model, architecture_label
from leukoedge.training.train import (
    CellMaskExample,
    TrainConfig,
    distillation_loss,
    load_checkpoint,
    save_checkpoint,
    save_ensemble_checkpoint,
    train_refiner,
)


def _member(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("hctnet_lite").eval()


def _saved_member(folder: Path, seed: int) -> Path:
    path = folder / f"member-{seed}.pt"
    save_checkpoint(_member(seed), {"config": {"model": "hctnet_lite", "model_kwargs": {}, "seed": seed}, "best_val_score": 0.5 + seed / 100}, path)
    return path


def _mean_probabilities(members, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.softmax(member(x), dim=1) for member in members]).mean(dim=0)


def test_the_ensembles_softmax_is_the_mean_of_its_members_softmax():
    members = [_member(0), _member(1)]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ensemble = torch.softmax(ProbabilityMean(members).eval()(x), dim=1)
        mean = _mean_probabilities(members, x)
        first = torch.softmax(members[0](x), dim=1)
    assert torch.allclose(ensemble, mean, atol=1e-6)
    assert not torch.allclose(ensemble, first, atol=1e-3)  # the members differ, so the mean is neither of them


def test_an_ensemble_needs_two_members():
    with pytest.raises(ValueError, match="at least two members"):
        ProbabilityMean([_member(0)])


def test_an_ensemble_checkpoint_keeps_every_members_weights_and_training_record(tmp_path):
    paths = [_saved_member(tmp_path, seed) for seed in (0, 1, 2)]
    save_ensemble_checkpoint(paths, tmp_path / "ensemble.pt")
    ensemble, record = load_checkpoint(tmp_path / "ensemble.pt")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(torch.softmax(ensemble(x), dim=1), _mean_probabilities([_member(s) for s in (0, 1, 2)], x), atol=1e-6)
    assert [member["checkpoint"] for member in record["members"]] == [str(path) for path in paths]
    assert [member["training"]["best_val_score"] for member in record["members"]] == [0.5, 0.51, 0.52]
    assert architecture_label(record["config"]) == "probability_mean(hctnet_lite, hctnet_lite, hctnet_lite)"
    assert architecture_label({"model": "hctnet_lite", "model_kwargs": {}}) == "hctnet_lite"


def test_an_ensemble_of_classifiers_is_refused(tmp_path):
    classifier = tmp_path / "classifier.pt"
    save_checkpoint(create_model("custom_cnn", head_classes={"blast": 2}), {"config": {"model": "custom_cnn", "model_kwargs": {"head_classes": {"blast": 2}}}}, classifier)
    with pytest.raises(ValueError, match="ensemble members must be segmenters"):
        save_ensemble_checkpoint([_saved_member(tmp_path, 0), classifier], tmp_path / "ensemble.pt")


def test_the_pipeline_keeps_an_ensemble_checkpoint_as_its_refiner(tmp_path):
    """`leukoedge train --refiner-init ENSEMBLE.pt --refiner-steps 0`: the model rebuilt from the checkpoint's
    own config (its members), with its weights, not a fresh default-architecture refiner."""
    save_ensemble_checkpoint([_saved_member(tmp_path, seed) for seed in (0, 1)], tmp_path / "ensemble.pt")
    fields = _checkpoint_model(tmp_path / "ensemble.pt", "hctnet_s")
    assert fields["model"] == "probability_mean" and len(fields["model_kwargs"]["members"]) == 2
    config = TrainConfig(**fields, input_size=(32, 32), steps=0, batch_size=1, init_from=str(tmp_path / "ensemble.pt"))
    refiner, summary = train_refiner([], [], None, config, 0.15)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(torch.softmax(refiner(x), dim=1), _mean_probabilities([_member(0), _member(1)], x), atol=1e-6)
    assert summary["reused_checkpoint"] == str(tmp_path / "ensemble.pt")


def test_an_exported_ensemble_is_one_onnx_graph_giving_the_mean_probabilities(tmp_path):
    pytest.importorskip("onnxruntime")
    from leukoedge.backends.onnxruntime import OnnxRuntimeBackend
    from leukoedge.export.onnx import export_segmenter

    members = [_member(0), _member(1)]
    x = np.random.default_rng(5).normal(0.0, 1.0, (2, 3, 32, 32)).astype(np.float32)
    parity = export_segmenter(ProbabilityMean(members).eval(), x, tmp_path / "refiner.onnx", input_name="crop")
    outputs = OnnxRuntimeBackend(tmp_path / "refiner.onnx").run({"crop": x})
    with torch.no_grad():
        mean = _mean_probabilities(members, torch.from_numpy(x)).numpy()
    assert parity < 1e-4
    np.testing.assert_allclose(next(iter(outputs.values())), mean, atol=1e-5)


def test_the_ensemble_command_writes_the_checkpoint_or_says_why_not(tmp_path, capsys):
    members = [str(_saved_member(tmp_path, seed)) for seed in (0, 1)]
    assert cli.main(["ensemble", "--out", str(tmp_path / "e.pt"), *members]) == 0
    assert "ensemble of 2 (hctnet_lite, hctnet_lite)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["config"]["model"] == "probability_mean"

    assert cli.main(["ensemble", "--out", str(tmp_path / "one.pt"), members[0]]) == 2
    assert "at least two member checkpoints" in capsys.readouterr().err
    assert cli.main(["ensemble", "--out", str(tmp_path / "gone.pt"), members[0], str(tmp_path / "missing.pt")]) == 2
    assert f"no checkpoint (.pt with its .json) at {tmp_path / 'missing.pt'}" in capsys.readouterr().err
    assert not (tmp_path / "one.pt").exists() and not (tmp_path / "gone.pt").exists()

    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "corrupt.json").write_text((tmp_path / "member-0.json").read_text())
    assert cli.main(["ensemble", "--out", str(tmp_path / "bad.pt"), members[0], str(tmp_path / "corrupt.pt")]) == 2
    assert f"{tmp_path / 'corrupt.pt'} is not a readable checkpoint" in capsys.readouterr().err
    (tmp_path / "member-1.json").write_text("{not json")
    assert cli.main(["ensemble", "--out", str(tmp_path / "bad.pt"), *members]) == 2
    assert f"{tmp_path / 'member-1.pt'} is not a readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_the_distillation_term_is_least_at_the_teachers_own_probabilities():
    labels = torch.full((2, 8, 8), LABEL_IGNORE)  # no pixel labelled: only the teacher speaks
    teacher_logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    targets = (labels, teacher_logits.softmax(dim=1))
    at_teacher = distillation_loss(teacher_logits, targets)
    for other in (teacher_logits * 0.5, teacher_logits * 2.0, torch.zeros_like(teacher_logits), teacher_logits.flip(1)):
        assert distillation_loss(other, targets) > at_teacher + 1e-4


def _disc_cells(count: int, seed: int) -> list[CellMaskExample]:
    """Synthetic single-cell images: a dark nucleus in a paler cytoplasm disc on a light background."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        image = np.full((48, 48, 3), 220, np.uint8)
        labels = np.zeros((48, 48), np.uint8)
        cy, cx = rng.integers(20, 28, size=2)
        yy, xx = np.mgrid[:48, :48]
        distance = np.hypot(yy - cy, xx - cx)
        image[distance < 14], labels[distance < 14] = (200, 150, 190), 1
        image[distance < 8], labels[distance < 8] = (110, 40, 120), 2
        examples.append(CellMaskExample("wbc-seg-zheng", image, labels, (int(cx) - 14, int(cy) - 14, int(cx) + 14, int(cy) + 14)))
    return examples


def test_a_refiner_distilled_from_a_teacher_ends_nearer_the_teacher_than_one_trained_without(tmp_path):
    save_ensemble_checkpoint([_saved_member(tmp_path, seed) for seed in (0, 1)], tmp_path / "teacher.pt")
    teacher, _ = load_checkpoint(tmp_path / "teacher.pt")
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    train, val = _disc_cells(8, 0), _disc_cells(2, 1)
    probe = torch.from_numpy(np.random.default_rng(7).normal(0.0, 1.0, (2, 3, 32, 32)).astype(np.float32))

    def distance_to_teacher(teacher_path: str | None) -> float:
        config = TrainConfig(
            model="hctnet_lite", input_size=(32, 32), steps=12, batch_size=4, learning_rate=5e-3, validate_every=12, seed=3, teacher=teacher_path
        )
        student, summary = train_refiner(train, val, spec, config, 0.15)
        assert summary["config"]["teacher"] == teacher_path
        with torch.no_grad():
            target = teacher(probe).softmax(dim=1)
            return float((target * (target.clamp_min(1e-12).log() - student(probe).log_softmax(dim=1))).sum(dim=1).mean())

    assert distance_to_teacher(str(tmp_path / "teacher.pt")) < distance_to_teacher(None)


def test_a_teacher_without_training_steps_is_refused_before_any_data_is_read(tmp_path):
    teacher = _saved_member(tmp_path, 0)
    with pytest.raises(ValueError, match="--refiner-teacher needs refiner training steps"):
        PipelineConfig(tmp_path, tmp_path, refiner_teacher=teacher, refiner_steps=0)
    with pytest.raises(ValueError, match="a teacher needs training steps"):
        TrainConfig(model="hctnet_lite", input_size=(32, 32), steps=0, batch_size=1, teacher="teacher.pt")


@pytest.mark.parametrize("option", ["segmenter_init", "refiner_init", "classifier_init", "refiner_teacher"])
def test_a_missing_checkpoint_is_refused_before_any_training(tmp_path, option):
    """Each model's checkpoint is read when its turn comes, minutes into a run: the config checks them all first."""
    weights_only = tmp_path / "weights-only.pt"
    weights_only.write_bytes(b"")  # its .json is missing
    for path in (tmp_path / "absent.pt", weights_only):
        with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} {path}: no checkpoint there"):
            PipelineConfig(tmp_path, tmp_path, **{option: path})
    assert PipelineConfig(tmp_path, tmp_path, **{option: _saved_member(tmp_path, 0)})
