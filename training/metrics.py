"""Segmentation and classification metrics, in numpy only.

Conventions, the same in every function here:
- Masks are compared as booleans (anything non-zero is foreground).
- Two empty masks agree perfectly: Dice, Jaccard and Tanimoto are 1.0 (nothing to find, nothing found).
- A metric that is undefined on the data (a class with no samples, an AUC without both classes)
  is None, never NaN, so that tables and JSON stay honest about what was not measured.
- Label maps use the project convention 0 background, 1 cytoplasm, 2 nucleus; in a truth map,
  3 marks cell pixels whose nucleus/cytoplasm split is unknown and 255 marks pixels to ignore.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Iterable, Sequence

import cv2
import numpy as np
from scipy.stats import rankdata

from leukoedge.session import wilson_interval  # noqa: F401  (re-exported: one implementation, shared with the runtime)

from .data import LABEL_CYTOPLASM, LABEL_IGNORE, LABEL_NUCLEUS, LABEL_WBC


SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW = 0.01, 0.03, 1.5, 11  # Wang et al. 2004


def _as_bool_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"masks must have the same shape; got {pred.shape} and {truth.shape}")
    return pred.astype(bool), truth.astype(bool)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|P and T| / (|P| + |T|) of two binary masks; 1.0 when both are empty."""
    pred, truth = _as_bool_pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index (IoU) |P and T| / |P or T| of two binary masks; 1.0 when both are empty.

    J = D / (2 - D), so J <= D always, with equality only at 0 and 1.
    """
    pred, truth = _as_bool_pair(pred, truth)
    union = int((pred | truth).sum())
    return 1.0 if union == 0 else int((pred & truth).sum()) / union


def tanimoto(a: np.ndarray, b: np.ndarray) -> float:
    """Continuous Tanimoto coefficient sum(ab) / (sum(a^2) + sum(b^2) - sum(ab)); 1.0 when both are zero.

    On binary masks it equals jaccard(); on soft masks (probabilities) it generalises it.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"arrays must have the same shape; got {a.shape} and {b.shape}")
    product = float((a * b).sum())
    denominator = float((a * a).sum() + (b * b).sum()) - product
    return 1.0 if denominator == 0.0 else product / denominator


def pixel_error_percent(pred: np.ndarray, truth: np.ndarray) -> float:
    """Percentage of pixels where the two binary masks disagree."""
    pred, truth = _as_bool_pair(pred, truth)
    if pred.size == 0:
        raise ValueError("pixel error of empty masks is undefined: no pixels")
    return 100.0 * int((pred != truth).sum()) / pred.size


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0, valid: np.ndarray | None = None) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window sigma 1.5, K1 0.01, K2 0.03.

    a, b: float images of the same shape (HxW or HxWxC, channels averaged) with values spanning
    data_range (1.0 for images in [0, 1] and for masks). As in the authors' reference code the mean
    is over windows that lie fully inside the image (a 5-pixel border is left out); images smaller
    than the 11-pixel window are averaged whole, with reflected borders. valid (HxW bool) restricts
    the mean to those window centres, e.g. to leave out pixels marked ignore.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape; got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"expected a non-empty HxW or HxWxC image; got shape {a.shape}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mean_a, mean_b = blur(a), blur(b)
    var_a = blur(a * a) - mean_a**2
    var_b = blur(b * b) - mean_b**2
    covariance = blur(a * b) - mean_a * mean_b
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    if ssim_map.ndim == 3:
        ssim_map = ssim_map.mean(axis=2)
    inside = np.ones(ssim_map.shape, bool)
    border = SSIM_WINDOW // 2
    if min(ssim_map.shape) >= SSIM_WINDOW:
        inside[:border], inside[-border:], inside[:, :border], inside[:, -border:] = False, False, False, False
    if valid is not None:
        inside &= np.asarray(valid, bool)
    if not inside.any():
        raise ValueError("SSIM has no window centre to average: every pixel is excluded")
    return float(ssim_map[inside].mean())


def _region_scores(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    pred_valid, truth_valid = pred[valid], truth[valid]
    # ignored pixels are set equal in both masks so they add no structure to the windows around them
    return {
        "dice": dice(pred_valid, truth_valid),
        "jaccard": jaccard(pred_valid, truth_valid),
        "tanimoto": tanimoto(pred_valid, truth_valid),  # its own formula: equal to Jaccard on masks, a check of both
        "ssim": ssim((pred & valid).astype(np.float64), (truth & valid).astype(np.float64), valid=valid),
        "pixel_error": pixel_error_percent(pred_valid, truth_valid),
    }


def segmentation_scores(
    pred_label_map: np.ndarray, truth_label_map: np.ndarray, ignore: int = LABEL_IGNORE
) -> dict[str, dict[str, float] | None]:
    """Dice, Jaccard, Tanimoto, SSIM and pixel error (%) of a predicted label map against the truth.

    Returns {"nucleus": ..., "cytoplasm": ..., "whole_cell": ...}, each a dict of the five metrics.
    Nucleus is label 2, cytoplasm label 1, whole cell labels 1 or 2 (and 3 in the truth). Truth pixels
    equal to `ignore` are left out. Where the truth has label-3 pixels (cell, split unknown), nucleus
    and cytoplasm cannot be scored and are None; a region is also None when every pixel is ignored.
    """
    pred, truth = np.asarray(pred_label_map), np.asarray(truth_label_map)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"expected two HxW label maps of the same shape; got {pred.shape} and {truth.shape}")
    valid = truth != ignore
    if not valid.any():
        return {"nucleus": None, "cytoplasm": None, "whole_cell": None}
    whole_cell = _region_scores(
        (pred == LABEL_CYTOPLASM) | (pred == LABEL_NUCLEUS), (truth == LABEL_CYTOPLASM) | (truth == LABEL_NUCLEUS) | (truth == LABEL_WBC), valid
    )
    if ((truth == LABEL_WBC) & valid).any():
        return {"nucleus": None, "cytoplasm": None, "whole_cell": whole_cell}
    return {
        "nucleus": _region_scores(pred == LABEL_NUCLEUS, truth == LABEL_NUCLEUS, valid),
        "cytoplasm": _region_scores(pred == LABEL_CYTOPLASM, truth == LABEL_CYTOPLASM, valid),
        "whole_cell": whole_cell,
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return None if not defined else float(np.mean(defined))


def _binary_inputs(is_positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """(labels as bool, scores as float64, #positives, #negatives), or None unless both classes occur."""
    is_positive = np.asarray(is_positive, bool)
    score = np.asarray(score, np.float64)
    positives = int(is_positive.sum())
    negatives = is_positive.size - positives
    if positives == 0 or negatives == 0:
        return None
    return is_positive, score, positives, negatives


def roc_auc(is_positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve by ranks (Mann-Whitney U); tied scores count half. None without both classes."""
    checked = _binary_inputs(is_positive, score)
    if checked is None:
        return None
    is_positive, score, positives, negatives = checked
    ranks = rankdata(score)  # average ranks for ties
    u_statistic = float(ranks[is_positive].sum()) - positives * (positives + 1) / 2.0
    return u_statistic / (positives * negatives)


def roc_curve(is_positive: np.ndarray, score: np.ndarray) -> dict[str, list[float]] | None:
    """ROC points (false positive rate, true positive rate) from (0, 0) to (1, 1), one per distinct score
    taken as the threshold (called positive at score >= threshold). None without both classes."""
    checked = _binary_inputs(is_positive, score)
    if checked is None:
        return None
    is_positive, score, positives, negatives = checked
    order = np.argsort(-score, kind="stable")
    ranked_score, ranked_positive = score[order], is_positive[order]
    # the last position of each run of equal scores: tied samples cross the threshold together
    run_ends = np.append(np.flatnonzero(np.diff(ranked_score)), score.size - 1)
    true_positives = np.cumsum(ranked_positive)[run_ends]
    false_positives = run_ends + 1 - true_positives
    return {
        "fpr": [0.0] + (false_positives / negatives).tolist(),
        "tpr": [0.0] + (true_positives / positives).tolist(),
    }


def confusion_matrix(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], classes: Sequence[Hashable]) -> np.ndarray:
    """Counts, rows the true class and columns the predicted class, in the order of `classes`."""
    index = {label: position for position, label in enumerate(classes)}
    unknown = {label for label in list(y_true) + list(y_pred) if label not in index}
    if unknown:
        raise ValueError(f"labels {sorted(map(str, unknown))} are not among the classes {list(classes)}")
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    for true_label, pred_label in zip(y_true, y_pred):
        matrix[index[true_label], index[pred_label]] += 1
    return matrix


def matthews_corrcoef(matrix: np.ndarray) -> float | None:
    """MCC from a confusion matrix, Gorodkin's multiclass form (the usual MCC for two classes).

    None where it is 0/0: all samples in one true class or all predictions in one class.
    """
    matrix = np.asarray(matrix, np.float64)
    samples = matrix.sum()
    correct = np.trace(matrix)
    true_counts, pred_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    numerator = correct * samples - float(pred_counts @ true_counts)
    denominator = math.sqrt((samples**2 - float(pred_counts @ pred_counts)) * (samples**2 - float(true_counts @ true_counts)))
    return None if denominator == 0 else numerator / denominator


def classification_report(
    y_true: Sequence[Hashable],
    y_pred: Sequence[Hashable],
    y_score: np.ndarray | None = None,
    classes: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Accuracy, MCC, AUC, confusion matrix, and per-class and macro precision/recall/F1/specificity.

    classes fixes the order (and the columns of y_score); by default the columns of a 2-D y_score
    are classes 0..C-1, otherwise the sorted labels seen. y_score is optional: NxC class scores, or
    for two classes an N vector of the second class's score. Recall is sensitivity. Per class,
    precision is None when the class was never predicted, recall/F1 when it has no samples,
    specificity when every sample is of it; macro averages are over the classes where defined.
    AUC: binary, of the second class against the first; multiclass, macro one-vs-rest.
    """
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"expected equally many true and predicted labels, at least one; got {len(y_true)} and {len(y_pred)}")
    scores = None if y_score is None else np.asarray(y_score, np.float64)
    if classes is None:
        classes = list(range(scores.shape[1])) if scores is not None and scores.ndim == 2 else sorted(set(y_true) | set(y_pred))
    classes = list(classes)
    if scores is not None:
        if scores.ndim == 1:
            if len(classes) != 2:
                raise ValueError(f"a 1-D y_score is the positive-class score of a binary task; got {len(classes)} classes")
            scores = np.stack([1.0 - scores, scores], axis=1)
        if scores.shape != (len(y_true), len(classes)):
            raise ValueError(f"y_score must be N x C = {len(y_true)} x {len(classes)}; got {scores.shape}")

    matrix = confusion_matrix(y_true, y_pred, classes)
    samples = int(matrix.sum())
    truth_index = np.array([classes.index(label) for label in y_true])
    per_class: dict[Hashable, dict[str, float | int | None]] = {}
    for position, label in enumerate(classes):
        true_positive = int(matrix[position, position])
        false_positive = int(matrix[:, position].sum()) - true_positive
        false_negative = int(matrix[position].sum()) - true_positive
        true_negative = samples - true_positive - false_positive - false_negative
        support = true_positive + false_negative
        recall = _ratio(true_positive, support)
        per_class[label] = {
            "precision": _ratio(true_positive, true_positive + false_positive),
            "recall": recall,
            "sensitivity": recall,
            "f1": None if support == 0 else 2 * true_positive / (2 * true_positive + false_positive + false_negative),
            "specificity": _ratio(true_negative, true_negative + false_positive),
            "support": support,
            "auc": None if scores is None else roc_auc(truth_index == position, scores[:, position]),
        }
    macro = {
        metric: _mean_defined([per_class[label][metric] for label in classes])
        for metric in ("precision", "recall", "sensitivity", "f1", "specificity", "auc")
    }
    if len(classes) == 2:
        auc = per_class[classes[1]]["auc"]
    else:
        auc = macro["auc"]
    return {
        "classes": classes,
        "n": samples,
        "accuracy": float(np.trace(matrix)) / samples,
        "mcc": matthews_corrcoef(matrix),
        "auc": auc,
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "macro": macro,
    }


def binary_summary(y_true: Sequence[int], blast_prob: Sequence[float], threshold: float = 0.5) -> dict[str, float | int | None]:
    """Blast-vs-normal summary: y_true 1 for blast, 0 for normal; called blast when blast_prob >= threshold."""
    probabilities = np.asarray(blast_prob, np.float64)
    y_pred = (probabilities >= threshold).astype(int).tolist()
    report = classification_report([int(label) for label in y_true], y_pred, probabilities, classes=[0, 1])
    blast = report["per_class"][1]
    return {
        "accuracy": report["accuracy"],
        "sensitivity": blast["recall"],
        "specificity": blast["specificity"],
        "precision": blast["precision"],
        "f1": blast["f1"],
        "mcc": report["mcc"],
        "auc": report["auc"],
        "n": report["n"],
    }


def mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean, std and count over the defined values (None = undefined for that image or fold)."""
    defined = [value for value in values if value is not None]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(defined)), "std": float(np.std(defined)), "n": len(defined)}


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = 10000, seed: int = 0) -> dict[str, float | int]:
    """Mean of a - b over paired items (e.g. two methods' Dice on the same images), its 95 % bootstrap
    interval, and how often a is ahead or behind. A mean gap whose interval spans 0 is not a win."""
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if differences.size == 0:
        raise ValueError("paired_difference needs at least one pair")
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, differences.size, (resamples, differences.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean": float(differences.mean()),
        "ci95_low": float(low),
        "ci95_high": float(high),
        "ahead": int((differences > 0).sum()),
        "behind": int((differences < 0).sum()),
        "n": int(differences.size),
    }
