"""The light per-cell refiner: a MobileNet-style architecture at a smaller crop size, from training through
export and the manifest to the runtime (docs/performance.md, "The light refiner")."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from leukoedge import Detector
from leukoedge.training.flops import count_flops
from leukoedge.training.models import SEGMENTERS, create_model
from leukoedge.training.pipeline import REFINER_INPUT, PipelineConfig, checkpoint_input_side, run_pipeline
from leukoedge.training.train import save_checkpoint, segmentation_loss, teacher_probabilities, trained_input_size

REPO = Path(__file__).resolve().parents[2]
LIGHT_REFINERS = ("mobile_unet", "mobile_unet_xs")


@pytest.mark.parametrize("name", LIGHT_REFINERS)
def test_light_refiners_are_registered_segmenters_at_a_tenth_of_the_shipped_refiners_compute(name: str) -> None:
    assert name in SEGMENTERS
    shipped = count_flops(create_model("hctnet_lite"), (1, 3, *REFINER_INPUT))
    assert count_flops(create_model(name), (1, 3, 64, 64)) < shipped / 25


def test_light_refiner_uses_only_ops_the_cpu_and_tensorrt_paths_fuse() -> None:
    """No attention over pixels, no layer norm: convolutions, batch norm, ReLU and the containers of them."""
    allowed = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Sequential, torch.nn.ModuleList, torch.nn.Identity)
    for module in create_model("mobile_unet").modules():
        children = list(module.children())
        assert children or isinstance(module, allowed), type(module).__name__


@pytest.mark.parametrize("name", LIGHT_REFINERS)
def test_one_training_step_on_64_pixel_crops_lowers_the_loss_of_that_batch(name: str) -> None:
    torch.manual_seed(0)
    crops = torch.randn(4, 3, 64, 64)
    labels = torch.zeros(4, 64, 64, dtype=torch.int64)
    labels[:, 16:48, 16:48] = 1  # a cell: cytoplasm with a nucleus, where the crop is bright
    labels[:, 24:40, 24:40] = 2
    crops[:, :, 16:48, 16:48] += 2.0
    crops[:, 2, 24:40, 24:40] -= 3.0
    model = create_model(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = segmentation_loss(model(crops), labels)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert torch.isfinite(before)
    assert segmentation_loss(model(crops), labels).item() < before.item()


def test_a_teachers_probabilities_are_resized_to_the_students_crop() -> None:
    teacher = create_model("mobile_unet_xs").eval()
    probabilities = teacher_probabilities(teacher, torch.randn(2, 3, 128, 128), (64, 64))
    assert probabilities.shape == (2, 3, 64, 64)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 64, 64))


def test_the_input_size_a_checkpoint_learnt_is_read_from_its_record_or_its_ensemble_members() -> None:
    assert trained_input_size({"config": {"model": "mobile_unet", "input_size": [64, 64]}}) == (64, 64)
    reused = {"config": {"input_size": [128, 128]}, "checkpoint_training": {"config": {"input_size": [96, 96]}}}
    assert trained_input_size(reused) == (96, 96)
    ensemble = json.loads((REPO / "models" / "checkpoints" / "refiner-ensemble.json").read_text())
    assert trained_input_size(ensemble) == (128, 128)
    assert trained_input_size({"config": {"model": "probability_mean"}}) is None


def test_a_kept_refiner_runs_at_the_crop_size_it_learnt(tmp_path: Path) -> None:
    checkpoint = tmp_path / "light-refiner.pt"
    save_checkpoint(create_model("mobile_unet_xs"), {"config": {"model": "mobile_unet_xs", "input_size": [64, 64]}}, checkpoint)
    assert checkpoint_input_side(checkpoint) == 64
    assert PipelineConfig(tmp_path, tmp_path / "default", refiner_init=checkpoint, refiner_steps=0).refiner_input_size == 64
    assert PipelineConfig(tmp_path, tmp_path / "default").refiner_input_size == REFINER_INPUT[0]
    with pytest.raises(ValueError, match="trained on 64x64 crops"):
        PipelineConfig(tmp_path, tmp_path / "default", refiner_init=checkpoint, refiner_steps=0, refiner_input_size=128)
    with pytest.raises(ValueError, match="--refiner-input-size must be"):
        PipelineConfig(tmp_path, tmp_path / "default", refiner_input_size=8)
    # Fine-tuning (steps > 0) may move a refiner to another crop size.
    assert PipelineConfig(tmp_path, tmp_path / "default", refiner_init=checkpoint, refiner_steps=10, refiner_input_size=96).refiner_input_size == 96


def test_the_pipeline_trains_exports_and_the_runtime_refines_with_a_light_refiner_at_64(data_root: Path, tmp_path: Path) -> None:
    """Quick mode (a few steps, a few images): the path, not the accuracy."""
    config = PipelineConfig(
        data_root,
        tmp_path / "default",
        quick=True,
        segmenter_init=REPO / "models" / "checkpoints" / "default-segmenter.pt",
        segmenter_steps=0,
        classifier_init=REPO / "models" / "checkpoints" / "default-classifier.pt",
        classifier_steps=0,
        refiner_model="mobile_unet_xs",
        refiner_input_size=64,
    )
    bundle = run_pipeline(config)
    refiner = bundle.manifest["refiner"]
    assert refiner["input_size"] == [64, 64] and refiner["architecture"] == "mobile_unet_xs"
    assert refiner["flops"] == count_flops(create_model("mobile_unet_xs"), (1, 3, 64, 64))
    assert checkpoint_input_side(tmp_path / "checkpoints" / "default-refiner.pt") == 64
    detector = Detector.load(bundle.root)
    shapes = []
    run_refiner = detector.refiner.run
    detector.refiner.run = lambda inputs: shapes.append(inputs["crop"].shape) or run_refiner(inputs)
    result = detector.run(cv2.imread(str(REPO / "samples" / "bccd_BloodImage_00002.jpg")))
    assert shapes and all(shape[1:] == (3, 64, 64) for shape in shapes)
    assert sum(shape[0] for shape in shapes) >= len(result.cells) > 0
    assert all(np.any(cell.mask) for cell in result.cells)


def test_the_light_refiner_checkpoint_loads_as_a_64_pixel_mobile_unet() -> None:
    from leukoedge.training.train import load_checkpoint

    model, record = load_checkpoint(REPO / "models" / "checkpoints" / "light-refiner.pt")
    assert record["config"]["model"] == "mobile_unet" and trained_input_size(record) == (64, 64)
    assert (REPO / "models" / "checkpoints" / "light-refiner.pt").stat().st_size < 1_000_000
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_a_teacher_trained_at_128_sees_its_own_crops_of_the_cells_a_64_pixel_student_learns(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    from leukoedge.preprocess.cpu import PreprocessSpec
    from leukoedge.training import data, train
    from leukoedge.training.train import CellMaskExample, TrainConfig, train_refiner

    records = data.load_records(data_root, "wbc-seg-zheng", "train")[:2]
    examples = [CellMaskExample("wbc-seg-zheng", data.read_image(r), data.read_label_map(r), data.wbc_boxes(r)[0]) for r in records]
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(create_model("mobile_unet_xs"), {"config": {"model": "mobile_unet_xs", "input_size": [128, 128]}}, teacher)
    seen = []
    original = train.teacher_probabilities

    def recording(model, crops, size):
        seen.append((tuple(crops.shape[2:]), tuple(size)))
        return original(model, crops, size)

    monkeypatch.setattr(train, "teacher_probabilities", recording)
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    config = TrainConfig("mobile_unet_xs", (64, 64), steps=2, batch_size=2, validate_every=2, teacher=str(teacher))
    train_refiner(examples, examples, spec, config, 0.15)
    assert seen == [((128, 128), (64, 64))] * 2
