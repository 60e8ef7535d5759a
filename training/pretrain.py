"""Self-supervised pretraining of the cell classifier (SimCLR), and whether it helps.

No ImageNet weights can be downloaded here, so the classifier's trunk learns first from the unlabelled
cells of ../shared/data. `leukoedge pretrain --data ../shared/data --out reports/pretraining [--quick]`:

1. Unlabelled cells of the train split of every source (labels never read): the marked WBC boxes
   (data.wbc_boxes: Zheng and ALL-IDB2 expert masks, BCCD boxes); Taleqani: every cell the bundle's
   segmenter finds (its weak masks miss most Pro cells); PBC (no masks): the cell the segmenter finds
   nearest the centre. Taleqani and PBC as the pipeline finds their cells.
2. SimCLR (Chen et al. 2020): two views of each cell through the augmentation the classifier trains
   with (samples.classification_sample: box, stain and gain jitter, rotations, flips), the classifier's
   trunk and a projection MLP, NT-Xent loss. Kept as a full classifier checkpoint with pipeline.HEADS
   (trunk pretrained, dense layers and heads at their fresh init), so that
   `leukoedge train --classifier-init <out>/simclr-classifier.pt` fine-tunes from it unchanged.
3. Does it help: the pipeline's classifier on the pipeline's cells (pipeline.load_cell_examples, Taleqani
   and PBC boxes from the bundle's segmenter checkpoint), trained from scratch and from the SimCLR checkpoint
   with one TrainConfig, on a stratified share of the labelled train cells (per source and class), a
   few seeds each, scored on the test split. Writes pretraining.json, pretraining.md, pretraining.png.

FULL_BUDGET takes about 27 minutes on 2 CPU cores (see its comment); QUICK_BUDGET checks the path.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from leukoedge.bundle import load_bundle
from leukoedge.postprocess import central_box
from leukoedge.preprocess.cpu import PreprocessSpec

from . import data
from .evaluate import portable_path
from .classifier_study import LEARNING_RATE, shrink_for_crops, stratified_folds
from .metrics import binary_summary, classification_report, mean_std
from .models import create_model
from .models.classifiers import MultiHeadClassifier
from .pipeline import (
    CLASSIFIER_INPUT,
    CROP_MARGIN,
    HEADS,
    PipelineConfig,
    check_runtime_classifier,
    load_cell_examples,
    segmenter_boxes,
    spread,
)
from .plots import label_fraction_curves
from .samples import classification_sample
from .torch_backend import checkpoint_paths, verified_model
from .train import CellExample, TrainConfig, train_loop, balanced_indices, save_checkpoint, train_classifier

CLASSIFIER_MODEL = PipelineConfig.classifier_model  # the architecture the pipeline trains by default
CHECKPOINT_NAME = "simclr-classifier.pt"
TEMPERATURE = 0.2
PROJECTION_WIDTHS = (256, 64)  # hidden, output: SimCLR's projection g, dropped after pretraining
SIMCLR_LEARNING_RATE = 2e-3
SEED = 0
INITS = ("scratch", "simclr")
METRICS = {
    "blast_accuracy": "blast accuracy",
    "blast_sensitivity": "blast sensitivity",
    "blast_specificity": "blast specificity",
    "blast_balanced_accuracy": "blast balanced accuracy",
    "blast_auc": "blast ROC-AUC",
    "subtype_accuracy": "subtype accuracy",
    "wbc_type_accuracy": "WBC type accuracy",
}
HEADLINE_METRICS = ("blast_balanced_accuracy", "subtype_accuracy", "wbc_type_accuracy")  # the verdict and the plot
MIN_DIFFERENCE = 0.01  # a change in a headline metric counts only beyond this and beyond both inits' seed std


@dataclass(frozen=True)
class PretrainBudget:
    """Data and steps of one pretraining and comparison."""

    pool_images_per_source: int  # unlabelled train images per source (a Taleqani field holds several cells)
    pool_val_images_per_source: int  # val images per source whose fixed view pairs score the pretraining
    simclr_steps: int
    simclr_batch_size: int  # cells per step, two views each
    simclr_validate_every: int
    labelled_images_per_source: int | None  # train and test images per source of the comparison (None: the whole split)
    val_images_per_source: int  # early stopping of each fine-tuning run
    steps: int  # per fine-tuning run
    batch_size: int
    validate_every: int
    label_fractions: tuple[float, ...]  # each 1/k: a stratified share of the labelled train cells
    seeds: int  # fine-tuning runs per init and fraction (seed: the labelled share, the scratch init, the batches)


# Sized for about 27 minutes on 2 free CPU cores, from steps timed there: a SimCLR step of 64 cells
# (128 views) 1.2 s, a fine-tuning step of 64 cells 0.7 s, a validation of ~300 cells 3 s, scoring the
# ~3000 test cells 13 s, loading every cell 2.5 min (the segmenter on PBC's 1392 train and 304 test
# images). 2.5 min + 300 x 1.2 s + 12 runs x (100 x 0.7 s + 2 x 3 s + 13 s) = 2.5 + 6 + 18 min.
FULL_BUDGET = PretrainBudget(
    pool_images_per_source=400,
    pool_val_images_per_source=30,
    simclr_steps=300,
    simclr_batch_size=64,
    simclr_validate_every=50,
    labelled_images_per_source=None,
    val_images_per_source=30,
    steps=100,
    batch_size=64,
    validate_every=50,
    label_fractions=(0.1, 1.0),
    seeds=3,
)
QUICK_BUDGET = PretrainBudget(
    pool_images_per_source=6,
    pool_val_images_per_source=3,
    simclr_steps=3,
    simclr_batch_size=8,
    simclr_validate_every=1,
    labelled_images_per_source=8,
    val_images_per_source=4,
    steps=2,
    batch_size=8,
    validate_every=1,
    label_fractions=(0.1, 1.0),
    seeds=2,
)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross-entropy: row i of `first` and of `second` are two
    views of one cell, and each view must pick its partner out of the batch's 2N - 1 other views by
    cosine similarity."""
    views = F.normalize(torch.cat([first, second]), dim=1)
    count = len(first)
    similarity = (views @ views.T / temperature).masked_fill(torch.eye(2 * count, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)])
    return F.cross_entropy(similarity, partner)


class ContrastiveModel(nn.Module):
    """A classifier's trunk (shared, not copied) with SimCLR's projection MLP: views in, projections out.
    The loss acts on the projections, so the trunk keeps features the projection learns to ignore."""

    def __init__(self, classifier: MultiHeadClassifier):
        super().__init__()
        self.trunk = classifier.trunk
        features = next(layer for layer in classifier.dense if isinstance(layer, nn.Linear)).in_features
        hidden, output = PROJECTION_WIDTHS
        self.projection = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, output))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.projection(self.trunk(views))


def head_classes() -> dict[str, int]:
    return {head: len(classes) for head, classes in HEADS.items()}


def lighter(cell: CellExample) -> CellExample:
    """The cell on a smaller copy of its image where the crop stays sharp (classifier_study.shrink_for_crops):
    every augmented view measures stain statistics over the whole image, 5-10x the cost on PBC and BCCD."""
    image, (box, _) = shrink_for_crops(cell.image, (cell.box, cell.box))
    return replace(cell, image=image, box=box)


def unlabelled_cells(
    data_root: Path, split: str, images_per_source: int, segmenter: nn.Module, spec: PreprocessSpec
) -> tuple[list[CellExample], dict[str, int]]:
    """The cells of at most images_per_source images (spread over the split) of every source, without
    targets; and the count per source."""
    cells: list[CellExample] = []
    for source in data.SOURCES:
        for record in tqdm(spread(data.load_records(data_root, source, split), images_per_source), desc=f"unlabelled {source} {split}", leave=False):
            image = data.read_image(record)
            if source == "pbc":
                boxes = [central_box(segmenter_boxes(segmenter, image, spec), image.shape)]  # one cell per PBC image
            elif source == "all-taleqani":
                boxes = segmenter_boxes(segmenter, image, spec)
            else:
                boxes = data.wbc_boxes(record)
            cells += [lighter(CellExample(source, image, box, {})) for box in boxes if box is not None]
    return cells, {source: sum(cell.source == source for cell in cells) for source in data.SOURCES}


def pretrain_simclr(
    cells: Sequence[CellExample], val_cells: Sequence[CellExample], spec: PreprocessSpec, config: TrainConfig, temperature: float = TEMPERATURE
) -> tuple[MultiHeadClassifier, dict[str, Any]]:
    """SimCLR on `cells` (each source sampled equally); returns the classifier with HEADS (trunk
    pretrained, dense layers and heads as seeded by config.seed) and the training summary. The
    validation score, for model selection, is -NT-Xent on fixed view pairs of val_cells."""
    torch.manual_seed(config.seed)
    classifier = create_model(config.model, head_classes=head_classes())
    contrastive = ContrastiveModel(classifier)

    def views(batch: Sequence[CellExample], rng: np.random.Generator) -> torch.Tensor:
        first, second = ([classification_sample(c.image, c.box, spec, config.input_size, CROP_MARGIN, rng) for c in batch] for _ in range(2))
        return torch.from_numpy(np.stack(first + second))

    def make_batch(indices: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, None]:
        return views([cells[i] for i in indices], rng), None

    def loss_of(projections: torch.Tensor, _: None) -> torch.Tensor:
        return nt_xent(*projections.chunk(2), temperature)

    held_out = views(val_cells, np.random.default_rng(config.seed + 2))

    def validate(model: nn.Module) -> float:
        return -float(nt_xent(*model(held_out).chunk(2), temperature))

    sample_indices = balanced_indices([cell.source for cell in cells], config.steps * config.batch_size, np.random.default_rng(config.seed + 1))
    summary = train_loop(contrastive, config, make_batch, loss_of, validate, sample_indices, f"simclr {config.model}")
    return classifier, summary


@dataclass
class CappedCells(PipelineConfig):
    """The pipeline's cell loading (pipeline.load_cell_examples) on at most images_per_source images of
    each source's split, spread over it (None: every image)."""

    images_per_source: int | None = None

    def limit(self, records: list) -> list:
        return records if self.images_per_source is None else spread(records, self.images_per_source)


def labelled_cells(
    data_root: Path, out_dir: Path, budget: PretrainBudget, segmenter: nn.Module, spec: PreprocessSpec
) -> tuple[dict[str, list[CellExample]], dict[str, dict]]:
    """The comparison's train, val and test cells with the pipeline's targets; and their counts."""
    caps = {"train": budget.labelled_images_per_source, "val": budget.val_images_per_source, "test": budget.labelled_images_per_source}
    cells, counts = {}, {}
    for split, cap in caps.items():
        examples, counts[split] = load_cell_examples(CappedCells(data_root, out_dir, images_per_source=cap), split, segmenter, spec)
        cells[split] = [lighter(cell) for cell in examples]
    return cells, counts


def labelled_share(cells: Sequence[CellExample], fraction: float, seed: int) -> list[CellExample]:
    """A stratified share of the labelled cells: within each source and class, one in k = 1/fraction
    of a seeded shuffle (classifier_study.stratified_folds, fold 0)."""
    parts = round(1 / fraction)
    if not math.isclose(parts * fraction, 1.0):
        raise ValueError(f"a label fraction must be 1/k (e.g. 0.1, 0.25, 1.0); got {fraction}")
    strata = [f"{cell.source}/{sorted(cell.targets.items())}" for cell in cells]
    kept = stratified_folds(strata, parts, seed) == 0
    return [cell for cell, keep in zip(cells, kept) if keep]


def head_probabilities(model: nn.Module, inputs: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    """Softmax probabilities of every head, one forward pass per batch."""
    with torch.inference_mode():
        outputs = [model(inputs[start : start + batch]) for start in range(0, len(inputs), batch)]
    return {head: torch.cat([output[head] for output in outputs]).softmax(dim=1).numpy() for head in HEADS}


def _accuracy(truth: np.ndarray, probabilities: np.ndarray) -> float | None:
    labelled = truth >= 0
    if not labelled.any():
        return None
    return classification_report(truth[labelled].tolist(), probabilities[labelled].argmax(axis=1).tolist())["accuracy"]


def held_out_scores(model: nn.Module, inputs: torch.Tensor, truth: dict[str, np.ndarray]) -> dict[str, float | None]:
    """METRICS on the test cells; truth: per head, the class of each cell (-1: not labelled for it)."""
    probabilities = head_probabilities(model, inputs)
    labelled = truth["blast"] >= 0
    blast = binary_summary(truth["blast"][labelled], probabilities["blast"][labelled, 1])
    sensitivity, specificity = blast["sensitivity"], blast["specificity"]
    return {
        **{f"blast_{metric}": blast[metric] for metric in ("accuracy", "sensitivity", "specificity")},
        "blast_balanced_accuracy": None if sensitivity is None or specificity is None else (sensitivity + specificity) / 2,
        "blast_auc": blast["auc"],
        "subtype_accuracy": _accuracy(truth["subtype"], probabilities["subtype"]),
        "wbc_type_accuracy": _accuracy(truth["wbc_type"], probabilities["wbc_type"]),
    }


def runtime_crops(cells: Sequence[CellExample], spec: PreprocessSpec) -> torch.Tensor:
    """The classifier's input for each cell as the runtime cuts it (no augmentation)."""
    crops = [classification_sample(cell.image, cell.box, spec, CLASSIFIER_INPUT, CROP_MARGIN, None) for cell in tqdm(cells, desc="test crops", leave=False)]
    return torch.from_numpy(np.stack(crops))


def fine_tune_and_score(
    train: list[CellExample],
    val: list[CellExample],
    spec: PreprocessSpec,
    budget: PretrainBudget,
    init_from: str | None,
    seed: int,
    test: tuple[torch.Tensor, dict[str, np.ndarray]],
    model: str = CLASSIFIER_MODEL,
) -> dict[str, Any]:
    """One run: the classifier `model` trained on `train` from init_from (None: from scratch), scored on
    the test inputs and truth."""
    config = TrainConfig(
        model=model,
        input_size=CLASSIFIER_INPUT,
        steps=budget.steps,
        batch_size=budget.batch_size,
        learning_rate=LEARNING_RATE,
        validate_every=budget.validate_every,
        init_from=init_from,
        seed=seed,
    )
    torch.manual_seed(seed)  # the scratch init
    model, summary = train_classifier(train, val, HEADS, spec, config, CROP_MARGIN)
    return {
        "seed": seed,
        "labelled_cells": len(train),
        **held_out_scores(model, *test),
        "best_val_score": summary["best_val_score"],
        "steps_run": summary["history"][-1]["step"],
        "train_seconds": summary["seconds"],
    }


def compare_inits(
    cells: dict[str, list[CellExample]], spec: PreprocessSpec, budget: PretrainBudget, checkpoint: Path, model: str = CLASSIFIER_MODEL
) -> dict[str, dict[str, Any]]:
    """Every init x label fraction x seed, fine-tuned and scored on the test cells. Both inits of a fraction
    and seed share the labelled share and the TrainConfig (the comparison is paired)."""
    test = (runtime_crops(cells["test"], spec), {head: np.array([cell.targets.get(head, -1) for cell in cells["test"]]) for head in HEADS})
    init_from = {"scratch": None, "simclr": str(checkpoint)}
    results: dict[str, dict[str, Any]] = {init: {} for init in INITS}
    with tqdm(total=len(INITS) * len(budget.label_fractions) * budget.seeds, desc="fine-tuning runs", unit="run") as progress:
        for fraction in budget.label_fractions:
            for seed in range(budget.seeds):
                train = labelled_share(cells["train"], fraction, seed)
                for init in INITS:
                    progress.set_description(f"{init}, {100 * fraction:g} % labels, seed {seed}")
                    run = results[init].setdefault(f"{fraction:g}", {"fraction": fraction, "runs": []})
                    run["runs"].append(fine_tune_and_score(train, cells["val"], spec, budget, init_from[init], seed, test, model))
                    progress.update()
    for by_fraction in results.values():
        for run in by_fraction.values():
            run["mean_std"] = {metric: mean_std([record[metric] for record in run["runs"]]) for metric in [*METRICS, "labelled_cells"]}
    return results


def verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether SimCLR helped, from the numbers: a headline metric at a label fraction counts as changed
    when the means differ by more than MIN_DIFFERENCE and more than either init's std over seeds."""
    changes: dict[str, list[str]] = {"better": [], "worse": []}
    for key, scratch in results["scratch"].items():
        simclr = results["simclr"][key]
        for metric in HEADLINE_METRICS:
            before, after = scratch["mean_std"][metric], simclr["mean_std"][metric]
            if before["mean"] is None or after["mean"] is None:
                continue
            difference = after["mean"] - before["mean"]
            if abs(difference) > max(before["std"], after["std"], MIN_DIFFERENCE):
                changes["better" if difference > 0 else "worse"].append(f"{METRICS[metric]} at {100 * scratch['fraction']:g} % labels ({difference:+.3f})")
    better, worse = "; ".join(changes["better"]), "; ".join(changes["worse"])
    if changes["better"] and changes["worse"]:
        sentence = f"SimCLR pretraining gave mixed results: better {better}; worse {worse}."
    elif changes["better"]:
        sentence = f"SimCLR pretraining helped: {better}; no headline metric got worse."
    elif changes["worse"]:
        sentence = f"SimCLR pretraining did not help, it hurt: {worse}; no headline metric got better."
    else:
        sentence = "SimCLR pretraining did not help: no headline metric moved by more than the seed-to-seed spread at any label fraction."
    return {"sentence": sentence, **changes}


def _format(summary: dict[str, Any], digits: int = 3) -> str:
    if summary["mean"] is None:
        return "-"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{source} {count}" for source, count in counts.items())


def markdown_report(report: dict[str, Any]) -> str:
    config, budget, pretraining = report["config"], report["config"]["budget"], report["pretraining"]
    history = pretraining["history"]
    lines = [
        f"# Self-supervised pretraining of the cell classifier ({report['date']})",
        "",
        f"Command: `leukoedge pretrain --data <data> --out <out>{' --quick' if config['quick'] else ''}`"
        f"{' (quick: a few cells and steps; the numbers check the path, not accuracy)' if config['quick'] else ''}. "
        f"PBC cells: the segmenter checkpoint of bundle `{Path(config['bundle']).name}`; images shrunk where the "
        f"{CLASSIFIER_INPUT[0]} px crop stays sharp.",
        "",
        f"SimCLR: {sum(report['cells']['pool'].values())} unlabelled cells of the train split ({_counts(report['cells']['pool'])}; "
        f"at most {budget['pool_images_per_source']} images per source, labels never read), each source sampled equally; "
        f"{budget['simclr_steps']} steps of {budget['simclr_batch_size']} cells x 2 views (the classifier's training augmentation), "
        f"NT-Xent temperature {config['temperature']}, projection MLP {' -> '.join(map(str, config['projection_widths']))} on the "
        f"{config['model']} trunk, AdamW, one-cycle LR to {config['simclr_learning_rate']}. "
        f"Held-out NT-Xent (fixed view pairs of {sum(report['cells']['pool_val'].values())} val-split cells): "
        f"{-history[0]['val_score']:.3f} at step {history[0]['step']}, best {-pretraining['best_val_score']:.3f}; "
        f"{pretraining['seconds'] / 60:.1f} min. `leukoedge train --classifier-init <out>/{CHECKPOINT_NAME}` fine-tunes from it.",
        "",
        f"Fine-tuning: {config['model']} on the pipeline's cells (train: {_counts(report['cells']['train'])}), at most "
        f"{budget['steps']} steps of {budget['batch_size']}, one-cycle LR to {config['learning_rate']}, early stopping on val-split cells "
        f"(at most {budget['val_images_per_source']} images per source); the same TrainConfig from scratch and from SimCLR. "
        f"Labels: a stratified share (per source and class) of the labelled train cells, drawn per seed; {budget['seeds']} seeds. "
        f"Test split: {_counts(report['cells']['test'])}. Scores: mean ± std over the seeds.",
        "",
        "| init | labels | labelled cells | " + " | ".join(METRICS.values()) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for init, by_fraction in report["results"].items():
        for run in by_fraction.values():
            scores = " | ".join(_format(run["mean_std"][metric]) for metric in METRICS)
            lines.append(f"| {init} | {100 * run['fraction']:g} % | {run['mean_std']['labelled_cells']['mean']:.0f} | {scores} |")
    lines += [
        "",
        f"**{report['verdict']['sentence']}** (Changed: the means differ by more than {MIN_DIFFERENCE} and more than either init's std.)",
        "",
        f"![scores against labelled share]({report['plot']})",
        "",
        f"Caveats: one pretraining run (seed {SEED}), so the std is over fine-tuning only; {budget['seeds']} seeds give a rough "
        "spread. Both inits fine-tune for the same short budget (far fewer steps than the shipped classifier trains); "
        "Taleqani and PBC have no patient IDs, so cells of one patient may sit in train and test.",
        "",
    ]
    return "\n".join(lines)


def run_pretraining(
    data_root: Path, out_dir: Path, quick: bool = False, bundle: Path = Path("models/default"), model: str = CLASSIFIER_MODEL
) -> dict[str, Any]:
    """Pretrain, compare, and write pretraining.json, pretraining.md, pretraining.png and the checkpoint
    into out_dir. bundle: whose preprocessing the crops take and whose segmenter checkpoint (verified
    against its ONNX file) finds the PBC cells. model: the classifier pretrained and compared."""
    check_runtime_classifier(model)
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_bundle(bundle, verify=False)
    spec = PreprocessSpec.from_manifest(loaded.manifest["preprocess"])
    segmenter = verified_model(loaded, "segmenter", checkpoint_paths(bundle)["segmenter"])
    pool, pool_counts = unlabelled_cells(data_root, "train", budget.pool_images_per_source, segmenter, spec)
    pool_val, pool_val_counts = unlabelled_cells(data_root, "val", budget.pool_val_images_per_source, segmenter, spec)
    simclr_config = TrainConfig(
        model=model,
        input_size=CLASSIFIER_INPUT,
        steps=budget.simclr_steps,
        batch_size=budget.simclr_batch_size,
        learning_rate=SIMCLR_LEARNING_RATE,
        validate_every=budget.simclr_validate_every,
        seed=SEED,
    )
    classifier, pretraining = pretrain_simclr(pool, pool_val, spec, simclr_config)
    checkpoint = out_dir / CHECKPOINT_NAME
    record = {"temperature": TEMPERATURE, "projection_widths": PROJECTION_WIDTHS, "cells_per_source": pool_counts, "bundle": portable_path(bundle, data_root)}
    save_checkpoint(
        classifier,
        {"config": asdict(simclr_config), "heads": HEADS, "pretraining": f"simclr ({checkpoint})", "heads_trained": False, **record, **pretraining},
        checkpoint,
    )
    cells, counts = labelled_cells(data_root, out_dir, budget, segmenter, spec)
    results = compare_inits(cells, spec, budget, checkpoint, model)
    plot = label_fraction_curves(
        results, {metric: METRICS[metric] for metric in HEADLINE_METRICS}, "test split: scratch vs SimCLR init", out_dir / "pretraining.png"
    )
    report = {
        "date": dt.date.today().isoformat(),
        "config": {
            "quick": quick,
            "budget": asdict(budget),
            "model": model,
            "temperature": TEMPERATURE,
            "projection_widths": list(PROJECTION_WIDTHS),
            "simclr_learning_rate": SIMCLR_LEARNING_RATE,
            "learning_rate": LEARNING_RATE,
            "bundle": portable_path(bundle, data_root),
            "checkpoint": portable_path(checkpoint, data_root),
            "torch_threads": torch.get_num_threads(),
        },
        "cells": {"pool": pool_counts, "pool_val": pool_val_counts, **counts},
        "pretraining": pretraining,
        "results": results,
        "verdict": verdict(results),
        "plot": plot.name,
    }
    (out_dir / "pretraining.json").write_text(json.dumps(report, indent=2))
    (out_dir / "pretraining.md").write_text(markdown_report(report))
    return report
