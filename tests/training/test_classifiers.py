"""The registered cell classifiers and the focal + CE loss: output shapes per head, dual_branch's two
inputs, a few steps on real ALL-IDB2 crops lower the loss, focal loss is CE at gamma 0 and discounts
easy examples, and the shipped checkpoint still loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the classifiers need the training extra (torch)")
import torch.nn.functional as F  # noqa: E402

from leukoedge.preprocess.cpu import PreprocessSpec, prepare_crops  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.models import CLASSIFIERS, create_model  # noqa: E402
from leukoedge.training.pipeline import CLASSIFIER_INPUT, CROP_MARGIN  # noqa: E402
from leukoedge.training.train import focal_loss, focal_plus_cross_entropy, load_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
NEW_MODELS = ("vgg_hybrid", "resnet_s", "dual_branch")
HEADS = {"blast": 2, "subtype": 4, "wbc_type": 8}


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def real_batch(data_root: Path) -> tuple[np.ndarray, torch.Tensor]:
    """Six ALL-IDB2 cells (3 blast, 3 normal) as Nx6x64x64: cell crop, then nucleus crop, boxes from the expert masks."""
    records = data.load_records(data_root, "all-idb2")
    chosen = [r for r in records if r.blast][:3] + [r for r in records if not r.blast][:3]
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    inputs = []
    for record in chosen:
        label_map = data.read_label_map(record)
        cell_box, nucleus_box = _box_of(label_map > 0), _box_of(label_map == data.LABEL_NUCLEUS)
        crops = prepare_crops(data.read_image(record), [cell_box, nucleus_box], spec, CLASSIFIER_INPUT, CROP_MARGIN, None)
        inputs.append(np.concatenate(crops))
    return np.stack(inputs), torch.tensor([r.blast for r in chosen])


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_every_classifier_gives_one_logit_row_per_cell_and_head(name: str) -> None:
    model = create_model(name, head_classes=HEADS).eval()
    with torch.no_grad():
        outputs = model(torch.randn(5, model.input_channels, *CLASSIFIER_INPUT))
    assert {head: tuple(logits.shape) for head, logits in outputs.items()} == {head: (5, count) for head, count in HEADS.items()}


def test_dual_branch_reads_the_cell_from_channels_0_to_2_and_the_nucleus_from_3_to_5() -> None:
    torch.manual_seed(0)
    model = create_model("dual_branch", head_classes={"blast": 2}).eval()
    assert model.input_channels == 6
    x = torch.randn(2, 6, *CLASSIFIER_INPUT)
    with torch.no_grad():
        reference = model(x)["blast"]
        for channels in (slice(0, 3), slice(3, 6)):
            changed = x.clone()
            changed[:, channels] = torch.randn_like(changed[:, channels])
            assert not torch.allclose(model(changed)["blast"], reference)
        with pytest.raises(RuntimeError):
            model(x[:, :3])  # a 3-channel crop alone is not a dual-branch input


@pytest.mark.parametrize("name", NEW_MODELS)
def test_a_few_steps_lower_the_loss_on_real_cells(name: str, real_batch: tuple[np.ndarray, torch.Tensor]) -> None:
    torch.manual_seed(0)
    inputs, labels = real_batch
    model = create_model(name, head_classes={"blast": 2})
    batch = torch.from_numpy(inputs[:, : model.input_channels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(batch)["blast"], labels)

    # Training mode throughout: batch-norm statistics of the batch itself, as during the steps.
    model.train()
    with torch.no_grad():
        before = loss().item()
    for _ in range(12):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.5 * before


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_skips_unlabelled() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 4)
    targets = torch.randint(0, 4, (16,))
    targets[:3] = -1
    expected = F.cross_entropy(logits, targets, ignore_index=-1)
    assert torch.allclose(focal_loss(logits, targets, gamma=0.0), expected)
    assert torch.allclose(focal_plus_cross_entropy(logits, targets), expected + focal_loss(logits, targets, gamma=2.0))


def test_focal_loss_discounts_confident_right_answers_more_than_wrong_ones() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])  # first right with p 0.98, second wrong
    targets = torch.tensor([0, 0])
    ratios = [(focal_loss(logits[i : i + 1], targets[i : i + 1]) / F.cross_entropy(logits[i : i + 1], targets[i : i + 1])).item() for i in range(2)]
    assert ratios[0] < 0.01 < 0.9 < ratios[1] <= 1.0


def test_the_shipped_classifier_checkpoint_still_loads() -> None:
    path = REPO_ROOT / "models" / "checkpoints" / "default-classifier.pt"
    if not path.is_file():
        pytest.skip(f"no shipped checkpoint at {path}")
    heads = json.loads(path.with_suffix(".json").read_text())["heads"]
    model, _ = load_checkpoint(path, head_classes={head: len(classes) for head, classes in heads.items()})
    assert model.input_channels == 3


def test_train_classifier_refuses_an_unknown_loss_before_training() -> None:
    from leukoedge.training.train import TrainConfig, train_classifier

    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    with pytest.raises(ValueError, match="focal_ce"):
        train_classifier([], [], {"blast": ["normal", "blast"]}, spec, TrainConfig("custom_cnn", CLASSIFIER_INPUT, 1, 1), CROP_MARGIN, loss="hinge")
