"""PNG plots of the evaluation report, drawn with matplotlib's Agg backend (no display needed).

Each function takes numbers from the report (or label maps), writes one PNG and returns its path.
Figures are made without pyplot: no global figure state, no GUI backend chosen behind our back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .data import LABEL_BACKGROUND, LABEL_CYTOPLASM, LABEL_IGNORE, LABEL_NUCLEUS, LABEL_WBC

DPI = 110
REGION_TITLES = {"nucleus": "nucleus", "whole_cell": "whole cell"}
METRIC_TITLES = {"ssim": "SSIM", "dice": "Dice", "jaccard": "IoU (Jaccard)"}

# Label map colours (RGB): the colours of the runtime overlay's tints would be lost on white paper.
_LABEL_RGB = np.full((256, 3), 255, np.uint8)
_LABEL_RGB[LABEL_BACKGROUND] = (245, 245, 240)
_LABEL_RGB[LABEL_CYTOPLASM] = (110, 170, 235)
_LABEL_RGB[LABEL_NUCLEUS] = (110, 30, 130)
_LABEL_RGB[LABEL_WBC] = (240, 150, 50)  # cell, nucleus/cytoplasm unknown (weak masks)
_LABEL_RGB[LABEL_IGNORE] = (170, 170, 170)


def _figure(rows: int, columns: int, size: tuple[float, float], **subplots) -> tuple[Figure, np.ndarray]:
    """A figure on the Agg canvas and its axes as a rows x columns array."""
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False, **subplots)


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def dice_bars(segmentation: dict, path: Path) -> Path:
    """Mean Dice (std as error bars) of every method on every source, one panel per region."""
    sources = list(segmentation)
    methods = list(segmentation[sources[0]]["methods"])
    width = 0.8 / len(sources)
    figure, axes = _figure(1, len(REGION_TITLES), (6 + 0.9 * len(methods), 4.2), sharey=True)
    axes = axes[0]
    for axis, (region, title) in zip(axes, REGION_TITLES.items()):
        for offset, source in enumerate(sources):
            summaries = [segmentation[source]["methods"][method][f"{region}_dice"] for method in methods]
            means = [np.nan if s["mean"] is None else s["mean"] for s in summaries]
            stds = [0.0 if s["std"] is None else s["std"] for s in summaries]
            positions = np.arange(len(methods)) + (offset - (len(sources) - 1) / 2) * width
            axis.bar(positions, means, width, yerr=stds, capsize=3, label=f"{source} (n={segmentation[source]['images']})")
        axis.set_title(f"{title} Dice (mean ± std over test images)")
        axis.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
        axis.set_ylim(0, 1.05)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice")
    axes[0].legend(loc="lower left", fontsize="small")
    return _save(figure, path)


def example_grid(examples: Sequence[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]], path: Path) -> Path:
    """Rows of (title, BGR image, truth label map, method -> label map): image, truth, then each method."""
    methods = list(examples[0][3])
    columns = 2 + len(methods)
    figure, axes = _figure(len(examples), columns, (1.7 * columns, 1.8 * len(examples)))
    for row, (title, image, truth, predicted) in enumerate(examples):
        panels = [(title, image[..., ::-1]), ("truth", _LABEL_RGB[truth])]
        panels += [(method, _LABEL_RGB[predicted[method]]) for method in methods]
        for axis, (caption, pixels) in zip(axes[row], panels):
            axis.imshow(pixels, interpolation="nearest")
            axis.set_title(caption, fontsize=7)
            axis.axis("off")
    figure.suptitle("label maps: background light, cytoplasm blue, nucleus purple, grey ignored", fontsize=8)
    return _save(figure, path)


def k_sweep_curves(sweeps: dict, classes: Sequence[str], path: Path) -> Path:
    """K-means score against k: a row per source, a column per metric, a line per class; the chosen k marked."""
    sources = list(sweeps)
    figure, axes = _figure(len(sources), len(METRIC_TITLES), (10, 3 * len(sources)))
    for row, source in enumerate(sources):
        sweep = sweeps[source]
        ks = sorted(int(k) for k in sweep["by_k"])
        for axis, (metric, title) in zip(axes[row], METRIC_TITLES.items()):
            for name in classes:
                values = [sweep["by_k"][k][f"{name}_{metric}"] for k in ks]
                axis.plot(ks, [np.nan if v is None else v for v in values], marker="o", label=name)
            axis.axvline(sweep["chosen_k"], color="grey", linestyle="--", linewidth=1)
            axis.set_title(f"{source}: {title}", fontsize=9)
            axis.set_xticks(ks)
            axis.set_xlabel("k")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle("K-means on train images: mean score per class (dashed: chosen k)", fontsize=10)
    return _save(figure, path)


def roc_curves(curves: dict[str, dict], title: str, path: Path) -> Path:
    """ROC curves, one per label, each {"fpr": [...], "tpr": [...], "auc": float}."""
    figure, axes = _figure(1, 1, (4.6, 4.4))
    axis = axes[0][0]
    for label, curve in curves.items():
        # straight lines between the points: a run of tied scores is a diagonal, and the area is the AUC
        axis.plot(curve["fpr"], curve["tpr"], marker=".", label=f"{label} (AUC {curve['auc']:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    axis.set_title(title, fontsize=10)
    axis.legend(loc="lower right", fontsize="small")
    axis.set_aspect("equal")
    return _save(figure, path)


def confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> Path:
    """Confusion matrix counts, rows the true class, columns the predicted one."""
    counts = np.asarray(matrix)
    figure, axes = _figure(1, 1, (1.2 + 0.6 * len(classes), 1.0 + 0.55 * len(classes)))
    axis = axes[0][0]
    axis.imshow(counts, cmap="Blues")
    for (row, column), count in np.ndenumerate(counts):
        axis.text(column, row, str(count), ha="center", va="center", fontsize=8, color="white" if count > counts.max() / 2 else "black")
    axis.set_xticks(range(len(classes)), classes, rotation=40, ha="right", fontsize=8)
    axis.set_yticks(range(len(classes)), classes, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=10)
    return _save(figure, path)


def training_curves(results: dict[str, dict[str, dict]], title: str, path: Path) -> Path:
    """Inner-validation score (balanced accuracy) against step: a panel per model, a colour per fold,
    solid for the first loss and dashed for the second."""
    models = list(results)
    figure, axes = _figure(1, len(models), (3.2 * len(models), 3.0), sharey=True)
    for axis, model in zip(axes[0], models):
        for loss, style in zip(results[model], ("-", "--", ":")):
            for fold, record in enumerate(results[model][loss]["folds"]):
                steps, scores = zip(*record["history"]) if record["history"] else ((), ())
                axis.plot(steps, scores, linestyle=style, color=f"C{fold % 10}", linewidth=1, label=loss if fold == 0 else None)
        axis.set_title(model, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("val balanced accuracy")
    axes[0][0].legend(fontsize="small")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def label_fraction_curves(results: dict[str, dict[str, dict]], metrics: dict[str, str], title: str, path: Path) -> Path:
    """Test score against the share of labelled training cells, a panel per metric and a line per
    initialisation; results[init][fraction] = {"fraction": float, "mean_std": {metric: {"mean", "std"}}}."""
    figure, axes = _figure(1, len(metrics), (3.4 * len(metrics), 3.2))
    percents = sorted({100 * run["fraction"] for by_fraction in results.values() for run in by_fraction.values()})
    for axis, (metric, metric_title) in zip(axes[0], metrics.items()):
        for init, by_fraction in results.items():
            runs = sorted(by_fraction.values(), key=lambda run: run["fraction"])
            summaries = [run["mean_std"][metric] for run in runs]
            means = [np.nan if s["mean"] is None else s["mean"] for s in summaries]
            stds = [0.0 if s["std"] is None else s["std"] for s in summaries]
            axis.errorbar([100 * run["fraction"] for run in runs], means, yerr=stds, marker="o", capsize=3, label=init)
        axis.set_xscale("log")
        axis.set_xticks(percents, [f"{percent:g} %" for percent in percents])
        axis.minorticks_off()
        axis.set_xlabel("labelled training cells")
        axis.set_title(metric_title, fontsize=9)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test score (mean ± std over seeds)")
    axes[0][0].legend(fontsize="small")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)
