"""Metrics against hand-computed answers, invariants, and degenerate cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from scipy.ndimage import gaussian_filter

from leukoedge.training.metrics import (
    binary_summary,
    classification_report,
    dice,
    jaccard,
    matthews_corrcoef,
    pixel_error_percent,
    roc_auc,
    roc_curve,
    segmentation_scores,
    ssim,
    tanimoto,
    wilson_interval,
)


def square(size: int, x0: int, y0: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def test_overlapping_squares_hand_computed() -> None:
    # two 10x10 squares shifted by 5 px: overlap 50 px, union 150 px, 100 of 400 px disagree
    first, second = square(20, 0, 0, 10), square(20, 5, 0, 10)
    assert dice(first, second) == pytest.approx(0.5)
    assert jaccard(first, second) == pytest.approx(1 / 3)
    assert tanimoto(first, second) == pytest.approx(1 / 3)
    assert pixel_error_percent(first, second) == pytest.approx(25.0)


def test_empty_mask_conventions() -> None:
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert dice(empty, empty) == jaccard(empty, empty) == tanimoto(empty, empty) == 1.0
    assert dice(empty, full) == jaccard(empty, full) == 0.0
    assert pixel_error_percent(empty, full) == 100.0


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


def test_tanimoto_on_soft_masks() -> None:
    # sum(ab) = 1.5, sum(a^2) = 1.25, sum(b^2) = 2 -> 1.5 / 1.75
    assert tanimoto(np.array([1.0, 0.5]), np.array([1.0, 1.0])) == pytest.approx(1.5 / 1.75)


masks = arrays(np.bool_, (12, 12))


@settings(max_examples=60, deadline=None)
@given(masks, masks)
def test_jaccard_never_exceeds_dice(pred: np.ndarray, truth: np.ndarray) -> None:
    d, j = dice(pred, truth), jaccard(pred, truth)
    assert j <= d + 1e-12
    assert j == pytest.approx(d / (2 - d))
    assert tanimoto(pred, truth) == pytest.approx(j)


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise() -> None:
    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.random((48, 48)), 2.0)
    assert ssim(image, image) == pytest.approx(1.0)
    scores = [ssim(image, np.clip(image + rng.normal(0, sigma, image.shape), 0, 1)) for sigma in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]


def test_ssim_of_flat_images_hand_computed() -> None:
    # no variance anywhere: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = (0.01)^2
    expected = (2 * 0.5 * 0.25 + 1e-4) / (0.25 + 0.0625 + 1e-4)
    assert ssim(np.full((20, 20), 0.5), np.full((20, 20), 0.25)) == pytest.approx(expected)


def test_ssim_matches_a_direct_scipy_implementation() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((30, 40))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, 1.5, truncate=3.5)  # an 11-tap window, as in Wang et al.

    mean_a, mean_b = blur(a), blur(b)
    covariance = blur(a * b) - mean_a * mean_b
    var_a, var_b = blur(a * a) - mean_a**2, blur(b * b) - mean_b**2
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    assert ssim(a, b) == pytest.approx(ssim_map[5:-5, 5:-5].mean())


def test_segmentation_scores_per_region_and_ignored_pixels() -> None:
    truth = np.zeros((30, 30), np.uint8)
    truth[5:25, 5:25] = 1
    truth[10:20, 10:20] = 2
    pred = truth.copy()
    pred[10:20, 10:15] = 1  # half the nucleus called cytoplasm
    scores = segmentation_scores(pred, truth)
    assert scores["nucleus"]["dice"] == pytest.approx(2 * 50 / (50 + 100))
    assert scores["whole_cell"]["dice"] == 1.0 and scores["whole_cell"]["pixel_error"] == 0.0
    assert scores["cytoplasm"]["jaccard"] == pytest.approx(300 / 350)

    wrong_corner = pred.copy()
    wrong_corner[0:3, 0:3] = 1
    ignored = truth.copy()
    ignored[0:3, 0:3] = 255
    assert segmentation_scores(wrong_corner, truth)["whole_cell"]["dice"] < 1.0
    assert segmentation_scores(wrong_corner, ignored)["whole_cell"]["dice"] == 1.0


def test_unsplit_cell_label_scores_whole_cell_only() -> None:
    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 3
    pred = np.zeros_like(truth)
    pred[5:15, 5:15] = 1
    pred[8:12, 8:12] = 2
    scores = segmentation_scores(pred, truth)
    assert scores["nucleus"] is None and scores["cytoplasm"] is None
    assert scores["whole_cell"]["dice"] == 1.0
    assert segmentation_scores(pred, np.full_like(truth, 255)) == {"nucleus": None, "cytoplasm": None, "whole_cell": None}


def test_binary_report_hand_computed() -> None:
    # TP 3, FN 1, FP 2, TN 4
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    report = classification_report(y_true, y_pred)
    blast = report["per_class"][1]
    assert report["accuracy"] == pytest.approx(0.7)
    assert blast["recall"] == blast["sensitivity"] == pytest.approx(0.75)
    assert blast["specificity"] == pytest.approx(4 / 6)
    assert blast["precision"] == pytest.approx(3 / 5)
    assert blast["f1"] == pytest.approx(2 / 3)
    assert report["mcc"] == pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))
    assert report["confusion_matrix"] == [[4, 2], [1, 3]]
    assert report["auc"] is None  # no scores given


def test_auc_by_ranks_counts_ties_half() -> None:
    # positives 0.9, 0.8, 0.4 against negatives 0.7, 0.4, 0.1: 3 + 3 + (0 + 0.5 + 1) of 9 pairs
    is_positive = np.array([1, 1, 1, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.4, 0.1])
    assert roc_auc(is_positive, scores) == pytest.approx(7.5 / 9)
    assert roc_auc(is_positive, -scores) == pytest.approx(1.5 / 9)
    assert roc_auc(np.ones(3, bool), np.arange(3)) is None


def test_roc_curve_points_and_area() -> None:
    # the same scores: thresholds 0.9, 0.8, 0.7, 0.4 (one positive and one negative tied), 0.1
    is_positive = np.array([1, 1, 1, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.4, 0.1])
    curve = roc_curve(is_positive, scores)
    assert curve["fpr"] == pytest.approx([0, 0, 0, 1 / 3, 2 / 3, 1])
    assert curve["tpr"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(roc_auc(is_positive, scores))  # ties as a diagonal
    assert roc_curve(np.zeros(3, bool), np.arange(3)) is None


def test_multiclass_mcc_gorodkin_hand_computed() -> None:
    # c = 7 correct of s = 10; true and predicted counts both (3, 3, 4):
    # (7 * 10 - 34) / sqrt((100 - 34) * (100 - 34)) = 36 / 66
    matrix = np.array([[2, 1, 0], [0, 2, 1], [1, 0, 3]])
    assert matthews_corrcoef(matrix) == pytest.approx(36 / 66)
    assert matthews_corrcoef(np.diag([3, 3, 4])) == pytest.approx(1.0)


def test_multiclass_macro_auc_one_vs_rest() -> None:
    y_true = [0, 0, 1, 1, 2, 2]
    # class 0 and 2 perfectly ranked; class 1 scores ranked backwards against the rest
    y_score = np.array(
        [
            [0.9, 0.5, 0.0],
            [0.8, 0.5, 0.1],
            [0.1, 0.0, 0.2],
            [0.2, 0.1, 0.3],
            [0.0, 0.6, 0.8],
            [0.1, 0.7, 0.9],
        ]
    )
    report = classification_report(y_true, y_score.argmax(axis=1), y_score)
    assert report["per_class"][0]["auc"] == 1.0 and report["per_class"][2]["auc"] == 1.0
    assert report["per_class"][1]["auc"] == 0.0
    assert report["auc"] == report["macro"]["auc"] == pytest.approx(2 / 3)


def test_class_without_samples_gives_none_not_nan() -> None:
    report = classification_report(["normal", "normal", "blast"], ["normal", "blast", "blast"], classes=["normal", "blast", "pro-B"])
    absent = report["per_class"]["pro-B"]
    assert absent["recall"] is None and absent["f1"] is None and absent["precision"] is None
    assert absent["specificity"] == 1.0 and absent["support"] == 0
    assert report["macro"]["recall"] == pytest.approx((0.5 + 1.0) / 2)
    one_class = classification_report([1, 1, 1], [1, 1, 1], np.array([0.9, 0.8, 0.7]), classes=[0, 1])
    assert one_class["mcc"] is None and one_class["auc"] is None and one_class["accuracy"] == 1.0


def test_unknown_labels_and_bad_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="not among the classes"):
        classification_report([0, 1, 2], [0, 1, 1], classes=[0, 1])
    with pytest.raises(ValueError, match="y_score"):
        classification_report([0, 1], [0, 1], np.zeros((2, 3)), classes=[0, 1])


def test_binary_summary_thresholds_blast_probability() -> None:
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    blast_probability = [0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.2, 0.1, 0.1, 0.05]
    summary = binary_summary(y_true, blast_probability)
    assert summary["n"] == 10
    assert summary["sensitivity"] == pytest.approx(0.75) and summary["specificity"] == pytest.approx(4 / 6)
    assert summary["precision"] == pytest.approx(3 / 5) and summary["f1"] == pytest.approx(2 / 3)
    # pairs won: 0.9, 0.8 beat all 6; 0.6 beats 5; 0.3 beats 4 -> 21 of 24
    assert summary["auc"] == pytest.approx(21 / 24)
    strict = binary_summary(y_true, blast_probability, threshold=0.75)
    assert strict["sensitivity"] == pytest.approx(0.5) and strict["specificity"] == 1.0


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.96**2 / (10 + 1.96**2))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_difference_separates_a_consistent_gain_from_noise():
    from leukoedge.training.metrics import paired_difference

    rng = np.random.default_rng(1)
    baseline = rng.uniform(0.8, 0.95, 40)
    better = paired_difference(baseline + 0.02, baseline)  # ahead on every image by the same margin
    assert better["mean"] == pytest.approx(0.02)
    assert 0 < better["ci95_low"] <= better["ci95_high"]
    assert (better["ahead"], better["behind"]) == (40, 0)
    noisy = paired_difference(baseline + rng.normal(0, 0.05, 40), baseline)
    assert noisy["ci95_low"] < 0 < noisy["ci95_high"]  # a zero-mean gap is no win
    with pytest.raises(ValueError):
        paired_difference([], [])
