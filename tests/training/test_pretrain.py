"""SimCLR pretraining: the NT-Xent loss, the checkpoint as a classifier init, and a quick run on real data
that writes the report with every init x label fraction row."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="pretraining trains models (training extra)")

from leukoedge.preprocess.cpu import PreprocessSpec  # noqa: E402
from leukoedge.training.models import create_model  # noqa: E402
from leukoedge.training.pipeline import CLASSIFIER_INPUT, CROP_MARGIN, HEADS, RUNTIME_CLASSIFIERS, _checkpoint_model  # noqa: E402
from leukoedge.training.pretrain import (  # noqa: E402
    CLASSIFIER_MODEL,
    INITS,
    METRICS,
    QUICK_BUDGET,
    head_classes,
    labelled_share,
    nt_xent,
    pretrain_simclr,
    run_pretraining,
)
from leukoedge.training.train import CellExample, TrainConfig, pretraining_of, save_checkpoint, train_classifier  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)


def test_nt_xent_is_lower_for_matched_views_than_for_shuffled_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(32, 16, generator=generator)
    second = first + 0.1 * torch.randn(32, 16, generator=generator)  # the same cells seen again
    shuffled = second[torch.randperm(32, generator=generator)]
    assert nt_xent(first, second) < nt_xent(first, shuffled) - 1.0
    assert torch.isclose(nt_xent(first, second), nt_xent(second, first))  # symmetric in the two views


def _blobs(count: int, seed: int) -> list[CellExample]:
    """Dark round 'cells' on light fields: two sources, each with blasts and normal cells."""
    rng = np.random.default_rng(seed)
    cells = []
    for index in range(count):
        image = rng.integers(190, 230, (96, 96, 3), dtype=np.uint8)
        centre, radius = (int(rng.integers(35, 60)), int(rng.integers(35, 60))), int(rng.integers(12, 20))
        cv2.circle(image, centre, radius, tuple(int(v) for v in rng.integers(60, 160, 3)), -1)
        box = (centre[0] - radius, centre[1] - radius, centre[0] + radius + 1, centre[1] + radius + 1)
        cells.append(CellExample(("all-idb2", "pbc")[index % 2], image, box, {"blast": index // 2 % 2}))
    return cells


@pytest.fixture(scope="module")
def simclr_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TrainConfig(model=CLASSIFIER_MODEL, input_size=CLASSIFIER_INPUT, steps=2, batch_size=6, validate_every=1, seed=5)
    classifier, summary = pretrain_simclr(_blobs(12, 0), _blobs(6, 1), SPEC, config)
    assert [entry["step"] for entry in summary["history"]] == [1, 2]
    path = tmp_path_factory.mktemp("simclr") / "simclr-classifier.pt"
    save_checkpoint(classifier, {"config": asdict(config), "pretraining": f"simclr ({path})", "heads_trained": False, **summary}, path)
    return path


def test_checkpoint_is_a_classifier_with_a_pretrained_trunk_and_fresh_heads(simclr_checkpoint: Path) -> None:
    loaded = create_model(CLASSIFIER_MODEL, head_classes=head_classes())
    loaded.load_state_dict(torch.load(simclr_checkpoint, weights_only=True))  # strict: every key of HEADS' model
    torch.manual_seed(5)  # the pretraining's seed: the init it started from
    fresh = create_model(CLASSIFIER_MODEL, head_classes=head_classes())
    trunk, fresh_trunk = loaded.trunk.state_dict(), fresh.trunk.state_dict()
    assert any(not torch.equal(trunk[name], fresh_trunk[name]) for name in trunk)
    for module in ("dense", "heads"):
        fresh_part = getattr(fresh, module).state_dict()
        assert all(torch.equal(value, fresh_part[name]) for name, value in getattr(loaded, module).state_dict().items())


def test_checkpoint_initialises_the_pipelines_classifier_training(simclr_checkpoint: Path) -> None:
    """What `leukoedge train --classifier-init <checkpoint>` does with it: the model named in its JSON,
    started from its weights, trained a step further."""
    assert _checkpoint_model(simclr_checkpoint, "resnet_s") == {"model": CLASSIFIER_MODEL, "model_kwargs": {}}
    config = TrainConfig(
        **_checkpoint_model(simclr_checkpoint, "resnet_s"), input_size=CLASSIFIER_INPUT, steps=2, batch_size=4, validate_every=2, init_from=str(simclr_checkpoint)
    )
    model, summary = train_classifier(_blobs(8, 2), _blobs(4, 3), HEADS, SPEC, config, CROP_MARGIN)
    assert summary["config"]["init_from"] == str(simclr_checkpoint)
    assert set(model(torch.zeros(1, 3, *CLASSIFIER_INPUT))) == set(HEADS)


def test_a_pretrained_checkpoint_is_never_shipped_with_untrained_heads(simclr_checkpoint: Path) -> None:
    config = TrainConfig(model=CLASSIFIER_MODEL, input_size=CLASSIFIER_INPUT, steps=0, batch_size=4, init_from=str(simclr_checkpoint))
    with pytest.raises(ValueError, match="heads are untrained"):
        train_classifier(_blobs(8, 2), _blobs(4, 3), HEADS, SPEC, config, CROP_MARGIN)


def test_a_fine_tuned_classifier_records_that_it_began_from_simclr(simclr_checkpoint: Path, tmp_path: Path) -> None:
    """The bundle manifest's "pretraining" follows init_from back to the SimCLR checkpoint."""
    config = TrainConfig(model=CLASSIFIER_MODEL, input_size=CLASSIFIER_INPUT, steps=1, batch_size=4, validate_every=1, init_from=str(simclr_checkpoint))
    model, summary = train_classifier(_blobs(8, 2), _blobs(4, 3), HEADS, SPEC, config, CROP_MARGIN)
    fine_tuned = tmp_path / "fine-tuned-classifier.pt"
    save_checkpoint(model, summary, fine_tuned)
    assert summary["pretraining"] == pretraining_of(fine_tuned) == f"simclr ({simclr_checkpoint})"
    simclr_checkpoint.with_suffix(".json").rename(simclr_checkpoint.with_suffix(".gone"))  # the record survives its origin
    try:
        assert pretraining_of(fine_tuned) == f"simclr ({simclr_checkpoint})"
    finally:
        simclr_checkpoint.with_suffix(".gone").rename(simclr_checkpoint.with_suffix(".json"))
    assert pretraining_of(None).startswith("none")


def test_labelled_share_keeps_every_source_and_class() -> None:
    cells = _blobs(40, 4)
    share = labelled_share(cells, 0.25, seed=0)
    assert len(share) == 10
    assert {(cell.source, cell.targets["blast"]) for cell in share} == {(cell.source, cell.targets["blast"]) for cell in cells}
    assert len(labelled_share(cells, 1.0, seed=0)) == len(cells)
    with pytest.raises(ValueError, match="1/k"):
        labelled_share(cells, 0.3, seed=0)


@pytest.fixture(scope="module")
def quick_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("pretraining")
    return run_pretraining(data_root, out, quick=True, bundle=REPO_ROOT / "models" / "default"), out


def test_quick_run_writes_every_row_the_plot_and_a_checkpoint(quick_run: tuple[dict, Path]) -> None:
    report, out = quick_run
    saved = json.loads((out / "pretraining.json").read_text())
    markdown = (out / "pretraining.md").read_text()
    assert saved["verdict"]["sentence"] in markdown
    for init in INITS:
        assert len(saved["results"][init]) == len(QUICK_BUDGET.label_fractions)
        for fraction in QUICK_BUDGET.label_fractions:
            run = saved["results"][init][f"{fraction:g}"]
            assert len(run["runs"]) == QUICK_BUDGET.seeds
            assert f"| {init} | {100 * fraction:g} % |" in markdown
            for metric in METRICS:
                for record in run["runs"]:
                    assert record[metric] is None or 0.0 <= record[metric] <= 1.0
    fewer, more = (saved["results"]["scratch"][f"{fraction:g}"]["mean_std"]["labelled_cells"]["mean"] for fraction in QUICK_BUDGET.label_fractions)
    assert 0 < fewer < more
    image = cv2.imread(str(out / "pretraining.png"))
    assert image is not None and min(image.shape[:2]) > 100
    recorded = json.loads((out / "simclr-classifier.json").read_text())
    assert recorded["pretraining"] == f"simclr ({out / 'simclr-classifier.pt'})" and recorded["heads_trained"] is False
    assert set(recorded["cells_per_source"]) == {"wbc-seg-zheng", "all-idb2", "all-taleqani", "pbc", "bccd", "txl-pbc"}
    assert all(count > 0 for count in recorded["cells_per_source"].values())


def test_simclr_pretrains_any_runtime_classifier() -> None:
    other = next(name for name in RUNTIME_CLASSIFIERS if name != CLASSIFIER_MODEL)  # not the default architecture
    config = TrainConfig(model=other, input_size=CLASSIFIER_INPUT, steps=2, batch_size=6, validate_every=1, seed=5)
    classifier, summary = pretrain_simclr(_blobs(12, 0), _blobs(6, 1), SPEC, config)
    other_keys = create_model(other, head_classes=head_classes()).state_dict().keys()
    assert classifier.state_dict().keys() == other_keys != create_model(CLASSIFIER_MODEL, head_classes=head_classes()).state_dict().keys()
    assert set(classifier(torch.zeros(2, 3, *CLASSIFIER_INPUT))) == set(HEADS)
    assert len(summary["history"]) == 2
