"""Classifier comparison: four architectures x two losses on three tasks, stratified k-fold.

`leukoedge study --data ../shared/data --out reports/classifiers [--quick] [--folds K]` writes
study.json (every number), study.md (one table per task), folds.csv (the fold of every cell) and PNGs:
per task the confusion matrix (summed over folds) and ROC curves (pooled out-of-fold predictions) of
its best model by mean macro F1, and the training curves (inner-validation score per fold) of every run.

Tasks, on cells of ../shared/data with the committed train/val/test splits pooled: fine for comparing
methods under one protocol, not a held-out figure of a shipped model (`leukoedge evaluate` gives those).
- blast: normal vs blast: ALL-IDB2 (expert labels), Taleqani fields (Benign normal; Early, Pre, Pro
  blast), PBC lymphocytes (normal);
- subtype: Taleqani Benign / Early / Pre / Pro;
- wbc_type: PBC's 8 classes.
One cell per image, so no image is split between folds: ALL-IDB2 the expert mask's cell, Taleqani and
PBC the cell the shipped bundle's Detector finds nearest the centre (data.MARKED_CELL_SOURCES).
dual_branch's nucleus crop is the box of the nucleus_mask of the detected cell (Detector on the shipped
bundle) that overlaps the cell most, or the cell box where none does (counted in study.json).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from leukoedge.detector import Detector
from leukoedge.postprocess import central_box
from leukoedge.preprocess.cpu import Box, PreprocessSpec, resize, square_crop_box
from leukoedge.result import Cell

from . import data
from .evaluate import portable_path
from .metrics import classification_report, mean_std, roc_auc, roc_curve
from .models import create_model
from .pipeline import CLASSIFIER_INPUT, CROP_MARGIN, HEADS, SUBTYPES, WBC_TYPES
from .plots import confusion, roc_curves, training_curves
from .samples import classification_sample
from .train import CLASSIFIER_LOSSES, CellExample, TrainConfig, train_classifier

TASKS = {"blast": HEADS["blast"], "subtype": SUBTYPES, "wbc_type": WBC_TYPES}
TASK_SOURCES = {"blast": ("all-idb2", "all-taleqani", "pbc"), "subtype": ("all-taleqani",), "wbc_type": ("pbc",)}
MODELS = ("custom_cnn", "vgg_hybrid", "resnet_s", "dual_branch")
LOSSES = tuple(CLASSIFIER_LOSSES)
METRICS = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "specificity": "specificity",
    "mcc": "MCC",
    "auc": "ROC-AUC",
}
# The label each source's images are drawn by, capped per label so that no source or class swamps the rest.
SOURCE_STRATA: dict[str, Callable[[data.Record], str]] = {
    "all-idb2": lambda record: "blast" if record.blast else "normal",
    "all-taleqani": lambda record: str(record.subtype),
    "pbc": lambda record: str(record.wbc_type),
}
SOURCES_ORDER = tuple(SOURCE_STRATA)
SEED = 0
LEARNING_RATE = 3e-3  # the pipeline's classifier rate
TIMING_BATCH = 64
PROBE_STEPS = 3


@dataclass(frozen=True)
class StudyBudget:
    """Data and training per run. FULL is sized for about an hour on 2 CPU cores: 3 tasks x 4 models x
    2 losses x 10 folds = 240 runs of at most `steps` steps each."""

    images_per_stratum: int  # per source label (see SOURCE_STRATA); ALL-IDB2 has 104 of each
    steps: int
    batch_size: int
    validate_every: int
    patience: int


FULL_BUDGET = StudyBudget(images_per_stratum=120, steps=80, batch_size=32, validate_every=20, patience=2)
QUICK_BUDGET = StudyBudget(images_per_stratum=4, steps=3, batch_size=4, validate_every=1, patience=1)


@dataclass
class StudyCell(CellExample):
    """A cell of the study: also the box of its nucleus (dual_branch's second crop) and its image's path."""

    nucleus_box: Box
    nucleus_found: bool  # False: no detected nucleus overlapped the cell, nucleus_box is the cell box
    key: str  # image path inside its source folder


def cell_input(cell: StudyCell, spec: PreprocessSpec, rng: np.random.Generator | None, with_nucleus: bool) -> np.ndarray:
    """The model input of a cell: its 3-channel crop, or for dual_branch the cell crop then the nucleus crop
    (6 channels). Both crops take the same augmentation draw (rotation, flip, stain jitter): one cell, two views."""
    seed = None if rng is None else int(rng.integers(2**32))

    def crop(box: Box) -> np.ndarray:
        return classification_sample(cell.image, box, spec, CLASSIFIER_INPUT, CROP_MARGIN, None if seed is None else np.random.default_rng(seed))

    return np.concatenate([crop(cell.box), crop(cell.nucleus_box)]) if with_nucleus else crop(cell.box)


def _overlap(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    return intersection / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection)


def nucleus_box(detected: Sequence[Cell], box: Box) -> Box | None:
    """Frame box of the nucleus of the detected cell overlapping `box` most; None if none overlaps or it has no nucleus."""
    best = max(detected, key=lambda cell: _overlap(cell.box, box), default=None)
    if best is None or _overlap(best.box, box) == 0.0 or not best.nucleus_mask.any():
        return None
    ys, xs = np.nonzero(best.nucleus_mask)
    x0, y0 = best.box[:2]
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)


def shrink_for_crops(image: np.ndarray, boxes: tuple[Box, Box]) -> tuple[np.ndarray, tuple[Box, Box]]:
    """Each augmented crop takes stain statistics over its whole image, the cost of a training step on
    PBC's large cells: shrink the image (area averaging) while the cell crop stays >= 1.5x the model input
    and the nucleus crop >= 1x. The runtime too measures stain statistics on a resized frame."""
    input_side = min(CLASSIFIER_INPUT)
    cell_crop, nucleus_crop = (square_crop_box(box, CROP_MARGIN) for box in boxes)
    scale = max(1.5 * input_side / (cell_crop[2] - cell_crop[0]), input_side / (nucleus_crop[2] - nucleus_crop[0]))
    if scale >= 0.9:  # resampling would cost more than it saves
        return image, boxes
    height, width = image.shape[:2]
    small = resize(image, max(1, round(width * scale)), max(1, round(height * scale)))
    return small, (_scaled(boxes[0], scale), _scaled(boxes[1], scale))


def _scaled(box: Box, scale: float) -> Box:
    """A box in the pixels of an image resized by `scale`: outward rounding, at least one pixel wide."""
    x0, y0, x1, y1 = (value * scale for value in box)
    return math.floor(x0), math.floor(y0), max(math.ceil(x1), math.floor(x0) + 1), max(math.ceil(y1), math.floor(y0) + 1)


def _targets(record: data.Record) -> dict[str, int]:
    """The record's class index per task; PBC lymphocytes are the blast task's normal lymphoid cells."""
    if record.source == "all-idb2":
        return {"blast": int(record.blast)}
    if record.source == "all-taleqani":
        return {"blast": int(record.blast), "subtype": SUBTYPES.index(record.subtype)}
    targets = {"wbc_type": WBC_TYPES.index(record.wbc_type)}
    return {**targets, "blast": 0} if record.wbc_type == "lymphocyte" else targets


def study_cell(record: data.Record, detector: Detector, data_root: Path) -> StudyCell | None:
    """The record's cell (see the module docstring), or None where the image has none."""
    image = data.read_image(record)
    marked = record.source in data.MARKED_CELL_SOURCES
    detected = detector.run(image).cells
    box = central_box(data.wbc_boxes(record) if marked else [cell.box for cell in detected], image.shape)
    if box is None:
        return None
    found = nucleus_box(detected, box)
    image, (box, nucleus) = shrink_for_crops(image, (box, found or box))
    key = record.image_path.relative_to(Path(data_root) / record.source).as_posix()
    return StudyCell(record.source, image, box, _targets(record), nucleus_box=nucleus, nucleus_found=found is not None, key=key)


def build_cells(
    data_root: Path, sources: Sequence[str], detector: Detector, images_per_stratum: int
) -> tuple[list[StudyCell], dict[str, dict[str, int]]]:
    """The study cells of `sources`, drawn in a seeded random order within each source label until the cap;
    and per source label, how many cells were taken and how many images drawn had none."""
    cells: list[StudyCell] = []
    counts: dict[str, dict[str, int]] = {}
    for source in sources:
        stratum_of = SOURCE_STRATA[source]
        rng = np.random.default_rng([SEED, SOURCES_ORDER.index(source)])  # a source's draw does not depend on the others
        strata: dict[str, list[data.Record]] = defaultdict(list)
        for record in data.load_records(data_root, source):  # every split: see the module docstring
            strata[stratum_of(record)].append(record)
        for stratum, records in sorted(strata.items()):
            taken, without_cell = [], 0
            with tqdm(total=min(images_per_stratum, len(records)), desc=f"cells {source} {stratum}", leave=False) as progress:
                for index in rng.permutation(len(records)):
                    if len(taken) == images_per_stratum:
                        break
                    cell = study_cell(records[index], detector, data_root)
                    if cell is None:
                        without_cell += 1
                        continue
                    taken.append(cell)
                    progress.update()
            cells += taken
            counts[f"{source}/{stratum}"] = {
                "cells": len(taken),
                "images_without_a_cell": without_cell,
                "nucleus_not_found": sum(not cell.nucleus_found for cell in taken),
            }
    return cells, counts


def stratified_folds(strata: Sequence[Hashable], folds: int, seed: int) -> np.ndarray:
    """A fold index per example: each stratum shuffled, then dealt round-robin from where the previous
    stratum stopped, so every stratum is spread evenly and fold sizes differ by at most one."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(strata), np.int64)
    dealt = 0
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        assignment[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return assignment


def fold_count(labels: Sequence[int], wanted: int, task: str) -> int:
    """`wanted` folds, or fewer where a class has fewer examples (each test fold should hold every class)."""
    smallest = int(np.bincount(np.asarray(labels, np.int64), minlength=len(TASKS[task])).min())
    if smallest < 2:
        raise ValueError(f"task {task}: a class has {smallest} cells; stratified k-fold needs at least 2 per class")
    return min(wanted, smallest)


def _strata(cells: Sequence[StudyCell], task: str) -> list[str]:
    """Class first, then source: each class is dealt as one run over the folds, each source within it too."""
    return [f"{cell.targets[task]:02d}/{cell.source}" for cell in cells]


def predict(model: torch.nn.Module, inputs: torch.Tensor, head: str) -> tuple[np.ndarray, float]:
    """Class probabilities, and PyTorch eager ms per image in batches of TIMING_BATCH (after a warm-up batch)."""
    with torch.inference_mode():
        model(inputs[:TIMING_BATCH])
        started = time.perf_counter()
        probabilities = torch.cat([model(inputs[s : s + TIMING_BATCH])[head].softmax(dim=1) for s in range(0, len(inputs), TIMING_BATCH)])
        elapsed = time.perf_counter() - started
    return probabilities.numpy(), 1000.0 * elapsed / len(inputs)


def fold_scores(truth: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """The table's metrics on one test fold: accuracy, MCC, AUC, and macro precision/recall/F1/specificity."""
    report = classification_report(truth.tolist(), probabilities.argmax(axis=1).tolist(), probabilities, classes=list(range(probabilities.shape[1])))
    return {
        "accuracy": report["accuracy"],
        **{metric: report["macro"][metric] for metric in ("precision", "recall", "f1", "specificity")},
        "mcc": report["mcc"],
        "auc": report["auc"],
        "confusion_matrix": report["confusion_matrix"],
    }


@dataclass
class StudyPlan:
    """What one study runs: tasks, models, losses, folds and the training budget."""

    tasks: list[str]
    models: list[str]
    losses: list[str]
    folds: int
    budget: StudyBudget

    def train_config(self, model: str, fold: int) -> TrainConfig:
        """The same seed for every model and loss on a fold: the comparisons are paired."""
        budget = self.budget
        return TrainConfig(
            model=model,
            input_size=CLASSIFIER_INPUT,
            steps=budget.steps,
            batch_size=budget.batch_size,
            learning_rate=LEARNING_RATE,
            validate_every=budget.validate_every,
            patience=budget.patience,
            seed=SEED + fold,
        )


def _sampler(spec: PreprocessSpec, with_nucleus: bool) -> Callable[[CellExample, np.random.Generator | None], np.ndarray]:
    return lambda cell, rng: cell_input(cell, spec, rng, with_nucleus)


def _uses_nucleus(model: str) -> bool:
    return create_model(model, head_classes={"probe": 2}).input_channels == 6


def estimate_seconds(plan: StudyPlan, cells_of: dict[str, list[StudyCell]], spec: PreprocessSpec, fold_counts: dict[str, int]) -> float:
    """Seconds for every run at full length (early stopping only shortens it), from PROBE_STEPS timed
    training steps of each model on a seeded sample of the first task's cells."""
    task = plan.tasks[0]
    cells = cells_of[task]
    rng = np.random.default_rng(SEED)
    sample = [cells[i] for i in rng.choice(len(cells), min(len(cells), PROBE_STEPS * plan.budget.batch_size), replace=False)]
    total = 0.0
    for model in plan.models:
        probe = TrainConfig(model=model, input_size=CLASSIFIER_INPUT, steps=PROBE_STEPS, batch_size=plan.budget.batch_size, validate_every=PROBE_STEPS, seed=SEED)
        _, summary = train_classifier(sample, sample[:8], {task: TASKS[task]}, spec, probe, CROP_MARGIN, sample=_sampler(spec, _uses_nucleus(model)))
        total += summary["seconds"] / PROBE_STEPS * plan.budget.steps * len(plan.losses) * sum(fold_counts.values())
    return total


@dataclass
class TaskOutcome:
    """One task's study: its cells' classes and folds, the JSON-able results per model and loss, and the
    out-of-fold probabilities per (model, loss) for the ROC plot (too large for study.json)."""

    task: str
    truth: np.ndarray
    fold_of: np.ndarray
    results: dict[str, dict[str, dict[str, Any]]]
    out_of_fold: dict[tuple[str, str], np.ndarray]

    @property
    def classes(self) -> list[str]:
        return TASKS[self.task]

    @property
    def folds(self) -> int:
        return int(self.fold_of.max()) + 1

    def best(self) -> tuple[str, str]:
        """(model, loss) with the highest mean macro F1."""
        return max(self.out_of_fold, key=lambda pair: self.results[pair[0]][pair[1]]["mean_std"]["f1"]["mean"] or -1.0)

    def summary(self, plots: dict[str, str]) -> dict[str, Any]:
        counts = np.bincount(self.truth, minlength=len(self.classes))
        return {
            "classes": self.classes,
            "cells": len(self.truth),
            "class_counts": dict(zip(self.classes, counts.tolist())),
            "folds": self.folds,
            "best": list(self.best()),
            "plots": plots,
            "results": self.results,
        }


def train_and_test(
    task: str, cells: list[StudyCell], inputs: torch.Tensor, train_part: np.ndarray, test_part: np.ndarray, config: TrainConfig, loss: str, spec: PreprocessSpec
) -> tuple[dict[str, Any], np.ndarray]:
    """One run: train on train_part with early stopping on a stratified tenth of it, score on test_part.
    Returns the fold's record for study.json and the test cells' class probabilities."""
    truth = np.array([cell.targets[task] for cell in cells])
    train_cells = [cells[i] for i in train_part]
    inner = stratified_folds(_strata(train_cells, task), fold_count(truth[train_part], 10, task), config.seed + 1) == 0
    model, summary = train_classifier(
        [cell for cell, held in zip(train_cells, inner) if not held],
        [cell for cell, held in zip(train_cells, inner) if held],
        {task: TASKS[task]},
        spec,
        config,
        CROP_MARGIN,
        loss=loss,
        sample=_sampler(spec, inputs.shape[1] == 6),
    )
    probabilities, ms_per_image = predict(model, inputs[test_part], task)
    record = {
        "train": int((~inner).sum()),
        "inner_val": int(inner.sum()),
        "test": len(test_part),
        **fold_scores(truth[test_part], probabilities),
        "ms_per_image": ms_per_image,
        "best_val_score": summary["best_val_score"],
        "steps_run": summary["history"][-1]["step"] if summary["history"] else 0,
        "train_seconds": summary["seconds"],
        "history": [[entry["step"], entry["val_score"]] for entry in summary["history"]],
    }
    return record, probabilities


def run_task(task: str, cells: list[StudyCell], plan: StudyPlan, spec: PreprocessSpec, progress: tqdm) -> TaskOutcome:
    """Every model x loss over the task's stratified folds."""
    truth = np.array([cell.targets[task] for cell in cells])
    fold_of = stratified_folds(_strata(cells, task), fold_count(truth, plan.folds, task), SEED)
    # The runtime crops (no augmentation) of every cell, made once: each run tests on a slice of them.
    inputs = torch.from_numpy(np.stack([cell_input(cell, spec, None, True) for cell in tqdm(cells, desc=f"crops {task}", leave=False)]))
    outcome = TaskOutcome(task, truth, fold_of, {}, {})
    for model in plan.models:
        model_inputs = inputs if _uses_nucleus(model) else inputs[:, :3].contiguous()
        for loss in plan.losses:
            records, out_of_fold = [], np.zeros((len(cells), len(TASKS[task])))
            for fold in range(outcome.folds):
                progress.set_description(f"{task} {model} {loss} fold {fold + 1}/{outcome.folds}")
                test_part = np.flatnonzero(fold_of == fold)
                record, probabilities = train_and_test(
                    task, cells, model_inputs, np.flatnonzero(fold_of != fold), test_part, plan.train_config(model, fold), loss, spec
                )
                out_of_fold[test_part] = probabilities
                records.append({"fold": fold, **record})
                progress.update()
            outcome.results.setdefault(model, {})[loss] = {
                "mean_std": {metric: mean_std([record[metric] for record in records]) for metric in [*METRICS, "ms_per_image"]},
                "confusion_matrix": np.sum([record["confusion_matrix"] for record in records], axis=0).tolist(),
                "folds": records,
            }
            outcome.out_of_fold[(model, loss)] = out_of_fold
    return outcome


def _roc_of(truth: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """One curve per class against the rest; for two classes, only the second (blast) against the first."""
    positions = [1] if len(classes) == 2 else range(len(classes))
    curves = {}
    for position in positions:
        curve = roc_curve(truth == position, probabilities[:, position])
        if curve is not None:
            curves[classes[position]] = {**curve, "auc": roc_auc(truth == position, probabilities[:, position])}
    return curves


def write_plots(outcome: TaskOutcome, out_dir: Path) -> dict[str, str]:
    """The best run's confusion matrix and ROC curves, and every run's training curves; returns the file names."""
    task, model, loss = outcome.task, *outcome.best()
    best = f"{task}: {model}, {loss}"
    paths = [
        confusion(outcome.results[model][loss]["confusion_matrix"], outcome.classes, f"{best} (summed over {outcome.folds} folds)", out_dir / f"confusion_{task}.png"),
        roc_curves(_roc_of(outcome.truth, outcome.out_of_fold[(model, loss)], outcome.classes), f"{best} (pooled out-of-fold)", out_dir / f"roc_{task}.png"),
        training_curves(outcome.results, f"{task}: inner-validation score, a colour per fold", out_dir / f"curves_{task}.png"),
    ]
    return {name: path.name for name, path in zip(("confusion", "roc", "training_curves"), paths)}


def write_fold_file(outcomes: Sequence[TaskOutcome], cells_of: dict[str, list[StudyCell]], path: Path) -> None:
    """folds.csv: every cell's task, source, image, class and test fold."""
    lines = ["task,source,image,class,fold"]
    for outcome in outcomes:
        for cell, fold in zip(cells_of[outcome.task], outcome.fold_of):
            lines.append(f"{outcome.task},{cell.source},{cell.key},{outcome.classes[cell.targets[outcome.task]]},{fold}")
    path.write_text("\n".join(lines) + "\n")


def _format(summary: dict[str, Any], folds: int, digits: int = 3) -> str:
    """mean ± std, with (n/K) where the metric was defined in only n of the K folds."""
    if summary["mean"] is None:
        return "-"
    partial = f" ({summary['n']}/{folds})" if summary["n"] < folds else ""
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}{partial}"


def markdown_report(study: dict[str, Any]) -> str:
    config = study["config"]
    lines = [
        f"# Classifier comparison ({study['date']})",
        "",
        f"Command: `leukoedge study --data <data> --out <out>{' --quick' if config['quick'] else ''} --folds {config['folds']}`. "
        f"Stratified k-fold (seed {SEED}) over cells of the train, val and test splits pooled: a comparison of methods under "
        "one protocol, not a held-out figure of the shipped model (`leukoedge evaluate`).",
        f"Each run: at most {config['budget']['steps']} steps of batch {config['budget']['batch_size']}, early stopping on an "
        "inner validation slice (a stratified tenth of the training folds; more where a class has under 10 cells), one-cycle LR, "
        "AdamW, dropout in the dense layers; "
        f"at most {config['budget']['images_per_stratum']} images per source label (Taleqani subtype, PBC cell type, ALL-IDB2 blast/normal).",
        "Scores: mean ± std over the test folds; precision, recall, F1 and specificity are macro averages over the classes; "
        "ROC-AUC is one-vs-rest macro for more than two classes. (n/K): the metric was defined in only n of the K folds "
        "(MCC is 0/0 when a model predicts one class only).",
        f"ms/image: PyTorch eager FP32, batches of {TIMING_BATCH}, {config['torch_threads']} thread(s) on the machine that ran the study "
        "(for ONNX Runtime timings see `leukoedge bench`).",
        "",
    ]
    header = "| model | loss | " + " | ".join(METRICS.values()) + " | ms/image |"
    for task, report in study["tasks"].items():
        model, loss = report["best"]
        lines += [
            f"## {task}: {' / '.join(report['classes'])} ({report['cells']} cells, {report['folds']}-fold)",
            "",
            "Cells per class: " + ", ".join(f"{name} {count}" for name, count in report["class_counts"].items()) + ".",
            "",
            header,
            "|---|---|" + "---|" * (len(METRICS) + 1),
        ]
        for model_name, by_loss in report["results"].items():
            for loss_name, run in by_loss.items():
                scores = " | ".join(_format(run["mean_std"][metric], report["folds"]) for metric in METRICS)
                lines.append(f"| {model_name} | {loss_name} | {scores} | {_format(run['mean_std']['ms_per_image'], report['folds'], 2)} |")
        plots = report["plots"]
        lines += [
            "",
            f"Best by mean macro F1: {model}, {loss}. Confusion matrix `{plots['confusion']}`, ROC `{plots['roc']}`, training curves `{plots['training_curves']}`.",
            "",
        ]
    lines += [
        "Caveats: Taleqani and PBC have no patient IDs and ALL-IDB2 comes from few patients, so cells of one patient may sit in",
        "both training and test folds. The classifiers take any heads (e.g. ALL / AML / CLL / normal), but no AML or CLL images",
        "exist here: nothing is trained or claimed for them. Zheng's WBC types are left out (labels not verified by experts).",
        "",
    ]
    return "\n".join(lines)


def _checked(names: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    chosen = list(known if names is None else names)
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise ValueError(f"unknown or no {what} {unknown}; expected some of {', '.join(known)}")
    return chosen


def run_study(
    data_root: Path,
    out_dir: Path,
    quick: bool = False,
    folds: int | None = None,
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    losses: Sequence[str] | None = None,
    bundle: Path = Path("models/default"),
) -> dict[str, Any]:
    """Run the comparison and write study.json, study.md, folds.csv and the PNGs into out_dir.
    folds: 10 by default (2 in quick mode), fewer for a task where a class has fewer cells.
    bundle: whose segmenter finds the PBC cells and the nuclei, and whose stain reference the crops take."""
    plan = StudyPlan(
        tasks=_checked(tasks, list(TASKS), "tasks"),
        models=_checked(models, list(MODELS), "models"),
        losses=_checked(losses, list(LOSSES), "losses"),
        folds=folds or (2 if quick else 10),
        budget=QUICK_BUDGET if quick else FULL_BUDGET,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    detector = Detector.load(bundle)
    print(f"classifier study: finding cells, at most {plan.budget.images_per_stratum} images per source label through {bundle}")
    sources = [source for source in SOURCES_ORDER if any(source in TASK_SOURCES[task] for task in plan.tasks)]
    cells, source_counts = build_cells(Path(data_root), sources, detector, plan.budget.images_per_stratum)
    cells_of = {task: [cell for cell in cells if task in cell.targets] for task in plan.tasks}
    fold_counts = {task: fold_count([cell.targets[task] for cell in cells_of[task]], plan.folds, task) for task in plan.tasks}
    estimate = estimate_seconds(plan, cells_of, detector.spec, fold_counts)
    runs = sum(fold_counts.values()) * len(plan.models) * len(plan.losses)
    print(
        f"classifier study: {runs} training runs of at most {plan.budget.steps} steps; training estimated at "
        f"{estimate / 60:.1f} min at most on {torch.get_num_threads()} thread(s) (measured on {PROBE_STEPS} steps per model)"
    )
    with tqdm(total=runs, desc="study", unit="run") as progress:
        outcomes = [run_task(task, cells_of[task], plan, detector.spec, progress) for task in plan.tasks]
    write_fold_file(outcomes, cells_of, out_dir / "folds.csv")
    study = {
        "date": dt.date.today().isoformat(),
        "config": {
            "quick": quick,
            "folds": plan.folds,
            "budget": asdict(plan.budget),
            "seed": SEED,
            "bundle": portable_path(bundle, data_root),
            "torch_threads": torch.get_num_threads(),
            "estimated_seconds": estimate,
        },
        "cells_per_source_label": source_counts,
        "tasks": {outcome.task: outcome.summary(write_plots(outcome, out_dir)) for outcome in outcomes},
    }
    (out_dir / "study.json").write_text(json.dumps(study, indent=2))
    (out_dir / "study.md").write_text(markdown_report(study))
    return study
