"""Segmenters: every registered one maps an image to per-pixel class logits at the input resolution."""

from pathlib import Path

import numpy as np
import pytest
import torch

from leukoedge.training.models import SEGMENTERS, create_model
from leukoedge.training.train import load_checkpoint, segmentation_loss

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
@pytest.mark.parametrize("size", [(128, 128), (192, 256), (100, 90)])
def test_logits_have_the_input_resolution(name, size):
    model = create_model(name).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, *size))
    assert logits.shape == (2, 3, *size)


def test_half_resolution_models_cost_less():
    from leukoedge.training.flops import count_flops

    full = count_flops(create_model("hctnet_s"), (1, 3, 192, 256))
    half = count_flops(create_model("hctnet_lite"), (1, 3, 192, 256))
    assert half < full / 2


def test_refinement_sees_the_image_at_full_resolution():
    """A one-pixel change of the input changes the half-resolution model's output at that pixel."""
    torch.manual_seed(0)
    model = create_model("hctnet_lite").eval()
    image = torch.zeros(1, 3, 64, 64)
    changed = image.clone()
    changed[0, :, 31, 31] = 3.0
    with torch.no_grad():
        difference = (model(changed) - model(image)).abs().sum(dim=1)[0]
    assert difference[31, 31] > 0
    assert difference[31, 31] >= difference.max() * 0.5


def test_a_few_steps_reduce_the_loss_on_a_real_batch(data_root):
    from leukoedge.preprocess.cpu import PreprocessSpec
    from leukoedge.training import data
    from leukoedge.training.samples import segmentation_sample

    records = data.load_records(data_root, "wbc-seg-zheng", "train")[:4]
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    samples = [segmentation_sample(data.read_image(r), data.read_label_map(r), spec, (128, 128), None) for r in records]
    inputs = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.int64))
    torch.manual_seed(0)
    model = create_model("hctnet_lite").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = segmentation_loss(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


@pytest.mark.parametrize("model", ["segmenter", "refiner", "classifier"])
def test_shipped_checkpoints_still_load(model):
    path = REPO_ROOT / "models" / "checkpoints" / f"default-{model}.pt"
    kwargs = {"head_classes": {"blast": 2, "subtype": 4, "wbc_type": 8}} if model == "classifier" else {}
    loaded, config = load_checkpoint(path, **kwargs)
    assert config["config"]["model"]
    assert not loaded.training


def test_weak_cells_need_a_nucleus_share():
    """The weak-label term: a weak cell predicted all cytoplasm costs more than one with a nucleus core."""
    from leukoedge.training.train import weak_nucleus_loss

    labels = np.zeros((1, 32, 32), np.int64)
    labels[0, 4:14, 4:14] = 3  # one weakly labelled cell
    labels[0, 20:28, 20:28] = 3  # another
    all_cytoplasm = torch.full((1, 32, 32), 0.01)
    with_nucleus = all_cytoplasm.clone()
    with_nucleus[0, 6:12, 6:12] = 0.95
    with_nucleus[0, 22:26, 22:27] = 0.95
    assert weak_nucleus_loss(with_nucleus, torch.from_numpy(labels)) < weak_nucleus_loss(all_cytoplasm, torch.from_numpy(labels)) / 10
    assert weak_nucleus_loss(all_cytoplasm, torch.zeros((1, 32, 32), dtype=torch.int64)) is None


def test_a_weak_cells_split_beyond_the_nucleus_share_costs_nothing():
    """Weak pixels may be nucleus or cytoplasm: once the nucleus share is met, a weak cell predicted 40 % or
    80 % nucleus costs the same (the nucleus Dice must not count weak pixels as "not nucleus")."""

    def logits_with_nucleus_rows(rows: int) -> torch.Tensor:
        probabilities = torch.full((1, 3, 20, 20), 0.001)
        probabilities[0, 0] = 0.998  # background outside the cell
        cell = probabilities[0, :, 5:15, 5:15]
        cell[0] = 0.001
        cell[1] = 0.998
        cell[2] = 0.001
        cell[1, :rows] = 0.001
        cell[2, :rows] = 0.998
        return probabilities.log()

    labels = torch.zeros((1, 20, 20), dtype=torch.int64)
    labels[0, 5:15, 5:15] = 3  # one weak cell of 100 pixels
    loss_40 = segmentation_loss(logits_with_nucleus_rows(4), labels)
    loss_80 = segmentation_loss(logits_with_nucleus_rows(8), labels)
    assert loss_40.item() == pytest.approx(loss_80.item(), abs=1e-4)
    # an expert nucleus still counts: predicting it as cytoplasm costs more
    labels[0, 5:9, 5:15] = 2
    labels[0, 9:15, 5:15] = 1
    assert segmentation_loss(logits_with_nucleus_rows(0), labels) > segmentation_loss(logits_with_nucleus_rows(4), labels) + 0.1


def test_model_selection_sees_missing_nuclei_in_weak_cells():
    from leukoedge.training.train import _mean_dice

    truth = np.zeros((32, 32), np.uint8)
    truth[4:14, 4:14] = 3
    cytoplasm_only = np.where(truth == 3, 1, 0).astype(np.uint8)
    with_nucleus = cytoplasm_only.copy()
    with_nucleus[5:13, 5:13] = 2
    assert _mean_dice(cytoplasm_only, truth) == 0.5  # whole cell right, nucleus missing
    assert _mean_dice(with_nucleus, truth) == 1.0


def test_model_selection_weighs_every_source_equally():
    from leukoedge.training.train import per_source_mean

    # 9 good images of one source must not hide one bad image of another
    scores = [0.9] * 9 + [0.1]
    sources = ["big"] * 9 + ["small"]
    assert per_source_mean(scores, sources) == pytest.approx(0.5)
    assert per_source_mean([0.4, float("nan"), float("nan")], ["a", "b", "b"]) == pytest.approx(0.4)  # a source with no score is skipped
