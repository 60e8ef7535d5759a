"""The classifier study: stratified folds, the nucleus box, paired augmentation of dual_branch's two
crops, and a quick run on real data that writes every table, plot and the fold file."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch", reason="the study trains classifiers (training extra)")

from leukoedge.preprocess.cpu import PreprocessSpec  # noqa: E402
from leukoedge.result import Cell  # noqa: E402
from leukoedge.training.classifier_study import (  # noqa: E402
    LOSSES,
    MODELS,
    TASKS,
    StudyCell,
    cell_input,
    fold_count,
    nucleus_box,
    run_study,
    stratified_folds,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("seed", range(5))
def test_folds_spread_every_stratum_evenly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    strata = rng.choice(["a", "b", "c", "d"], size=int(rng.integers(40, 120)), p=[0.5, 0.3, 0.15, 0.05])
    folds = int(rng.integers(2, 8))
    assignment = stratified_folds(strata, folds, seed)
    sizes = np.bincount(assignment, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    for stratum in np.unique(strata):
        per_fold = np.bincount(assignment[strata == stratum], minlength=folds)
        assert per_fold.max() - per_fold.min() <= 1


def test_fold_count_follows_the_smallest_class() -> None:
    assert fold_count([0] * 30 + [1] * 12, 10, "blast") == 10
    assert fold_count([0] * 30 + [1] * 4, 10, "blast") == 4
    with pytest.raises(ValueError, match="at least 2"):
        fold_count([0] * 30 + [1], 10, "blast")
    with pytest.raises(ValueError, match="at least 2"):
        fold_count([0] * 10 + [1] * 10 + [2] * 10, 10, "subtype")  # class Pro has no cells


def _cell(box: tuple[int, int, int, int], nucleus: np.ndarray) -> Cell:
    x0, y0, x1, y1 = box
    return Cell(1, box, np.ones((y1 - y0, x1 - x0), bool), nucleus, "normal", {}, 0.0, {})


def test_nucleus_box_is_the_overlapping_cells_nucleus_in_frame_pixels() -> None:
    nucleus = np.zeros((20, 30), bool)
    nucleus[5:12, 8:20] = True
    detected = [_cell((100, 50, 130, 70), nucleus), _cell((0, 0, 10, 10), np.ones((10, 10), bool))]
    assert nucleus_box(detected, (98, 52, 128, 71)) == (108, 55, 120, 62)
    assert nucleus_box(detected, (200, 200, 220, 220)) is None  # nothing overlaps
    assert nucleus_box([_cell((100, 50, 130, 70), np.zeros((20, 30), bool))], (100, 50, 130, 70)) is None


def test_dual_input_augments_both_crops_with_one_draw(data_root: Path) -> None:
    """With the nucleus box set to the cell box, the two augmented halves must be identical."""
    from leukoedge.training import data

    record = data.load_records(data_root, "all-idb2")[0]
    box = data.wbc_boxes(record)[0]
    cell = StudyCell("all-idb2", data.read_image(record), box, {"blast": record.blast}, nucleus_box=box, nucleus_found=True, key="x")
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    augmented = cell_input(cell, spec, np.random.default_rng(3), with_nucleus=True)
    assert augmented.shape == (6, 64, 64)
    np.testing.assert_array_equal(augmented[:3], augmented[3:])
    assert not np.array_equal(augmented[:3], cell_input(cell, spec, None, with_nucleus=False))


@pytest.fixture(scope="module")
def quick_study(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("study")
    return run_study(data_root, out, quick=True, bundle=REPO_ROOT / "models" / "default"), out


def test_quick_study_writes_every_table_and_plot(quick_study: tuple[dict, Path]) -> None:
    study, out = quick_study
    markdown = (out / "study.md").read_text()
    assert json.loads((out / "study.json").read_text())["tasks"].keys() == TASKS.keys()
    for task in TASKS:
        assert f"## {task}:" in markdown
        for model in MODELS:
            for loss in LOSSES:
                assert f"| {model} | {loss} |" in markdown
        for kind in ("confusion", "roc", "curves"):
            image = cv2.imread(str(out / f"{kind}_{task}.png"))
            assert image is not None and min(image.shape[:2]) > 100


def test_quick_study_tests_every_cell_once_and_scores_stay_in_range(quick_study: tuple[dict, Path]) -> None:
    study, _ = quick_study
    for report in study["tasks"].values():
        for by_loss in report["results"].values():
            for run in by_loss.values():
                assert int(np.sum(run["confusion_matrix"])) == report["cells"]
                assert sum(fold["test"] for fold in run["folds"]) == report["cells"]
                for metric in ("accuracy", "precision", "recall", "f1", "specificity", "auc"):
                    for fold in run["folds"]:
                        assert fold[metric] is None or 0.0 <= fold[metric] <= 1.0
                assert run["mean_std"]["ms_per_image"]["mean"] > 0


def test_quick_study_fold_file_is_stratified(quick_study: tuple[dict, Path]) -> None:
    study, out = quick_study
    with (out / "folds.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    for task, classes in TASKS.items():
        task_rows = [row for row in rows if row["task"] == task]
        assert len(task_rows) == study["tasks"][task]["cells"]
        assert len({(row["source"], row["image"]) for row in task_rows}) == len(task_rows)  # one cell per image
        counts = Counter((row["class"], int(row["fold"])) for row in task_rows)
        for name in classes:
            per_fold = [counts[(name, fold)] for fold in range(study["tasks"][task]["folds"])]
            assert min(per_fold) >= 1 and max(per_fold) - min(per_fold) <= 1
