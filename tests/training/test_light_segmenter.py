"""A light field segmenter: a MobileNet-style architecture at the segmenter's input, distilled from the shipped
segmenter (--segmenter-teacher; docs/performance.md, "A lighter field segmenter")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from leukoedge.preprocess.cpu import PreprocessSpec
from leukoedge.training.flops import count_flops
from leukoedge.training.models import SEGMENTERS, create_model
from leukoedge.training.pipeline import SEGMENTER_INPUT, PipelineConfig
from leukoedge.training.train import SegmentationExample, TrainConfig, load_checkpoint, save_checkpoint, train_segmenter


def test_the_light_field_segmenter_is_registered_at_a_fifth_of_the_shipped_segmenters_compute() -> None:
    assert "mobile_unet_field" in SEGMENTERS
    shipped = count_flops(create_model("hctnet_lite"), (1, 3, *SEGMENTER_INPUT))
    assert count_flops(create_model("mobile_unet_field"), (1, 3, *SEGMENTER_INPUT)) < shipped / 5


def test_the_light_field_segmenter_sees_the_whole_field_and_the_light_refiner_does_not() -> None:
    """One stage deeper: the field centre's logits depend on every corner of the 192x256 input (hctnet_lite's
    transformer saw the whole field too); mobile_unet's reach stops short of them."""

    def reach(name: str) -> torch.Tensor:
        torch.manual_seed(0)
        image = torch.randn(1, 3, *SEGMENTER_INPUT, requires_grad=True)
        create_model(name).eval()(image)[0, :, SEGMENTER_INPUT[0] // 2, SEGMENTER_INPUT[1] // 2].sum().backward()
        return image.grad.abs().amax(dim=1)[0] > 0

    corners = (slice(None, 8), slice(-8, None))
    for rows in corners:
        for cols in corners:
            assert reach("mobile_unet_field")[rows, cols].any()
            assert not reach("mobile_unet")[rows, cols].any()


def _fields(count: int, seed: int) -> list[SegmentationExample]:
    """Synthetic fields: one dark nucleus in a paler cytoplasm disc on a light background."""
    rng = np.random.default_rng(seed)
    examples = []
    yy, xx = np.mgrid[:64, :64]
    for _ in range(count):
        image = np.full((64, 64, 3), 220, np.uint8)
        labels = np.zeros((64, 64), np.uint8)
        cy, cx = rng.integers(22, 42, size=2)
        distance = np.hypot(yy - cy, xx - cx)
        image[distance < 16], labels[distance < 16] = (200, 150, 190), 1
        image[distance < 9], labels[distance < 9] = (110, 40, 120), 2
        examples.append(SegmentationExample("wbc-seg-zheng", image, labels))
    return examples


def _saved_teacher(folder: Path) -> Path:
    torch.manual_seed(1)
    path = folder / "teacher-segmenter.pt"
    save_checkpoint(create_model("mobile_unet_xs").eval(), {"config": {"model": "mobile_unet_xs", "model_kwargs": {}, "input_size": [64, 64]}}, path)
    return path


def test_a_segmenter_distilled_from_a_teacher_ends_nearer_the_teacher_than_one_trained_without(tmp_path: Path) -> None:
    teacher_path = _saved_teacher(tmp_path)
    teacher, _ = load_checkpoint(teacher_path)
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    train, val = _fields(8, 0), _fields(2, 1)
    probe = torch.from_numpy(np.random.default_rng(7).normal(0.0, 1.0, (2, 3, 64, 64)).astype(np.float32))

    def distance_to_teacher(teacher_checkpoint: str | None) -> float:
        config = TrainConfig(
            model="mobile_unet", input_size=(64, 64), steps=12, batch_size=4, learning_rate=5e-3, crop=48, validate_every=12, seed=3,
            teacher=teacher_checkpoint,
        )
        student, summary = train_segmenter(train, val, spec, config)
        assert summary["config"]["teacher"] == teacher_checkpoint
        with torch.no_grad():
            target = teacher(probe).softmax(dim=1)
            return float((target * (target.clamp_min(1e-12).log() - student(probe).log_softmax(dim=1))).sum(dim=1).mean())

    assert distance_to_teacher(str(teacher_path)) < distance_to_teacher(None)


def test_a_segmenter_teacher_without_segmenter_steps_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    teacher = _saved_teacher(tmp_path)
    with pytest.raises(ValueError, match="--segmenter-teacher needs segmenter training steps"):
        PipelineConfig(tmp_path, tmp_path, segmenter_teacher=teacher, segmenter_steps=0)
    assert PipelineConfig(tmp_path, tmp_path, segmenter_teacher=teacher).segmenter_teacher == teacher


def test_the_train_command_refuses_a_missing_segmenter_teacher_before_any_training(tmp_path: Path, capsys) -> None:
    from leukoedge.cli import main

    absent = tmp_path / "absent.pt"
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--segmenter-teacher", str(absent)]) == 2
    assert f"--segmenter-teacher {absent}: no checkpoint there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
