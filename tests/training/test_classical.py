"""Classical segmentation baselines on constructed cells and on real Zheng images."""

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from leukoedge.errors import InvalidFrameError
from leukoedge.training.classical import (
    choose_k,
    circularity,
    clusters_to_label_map,
    fuzzy_cmeans,
    fuzzy_cmeans_segment,
    hsv_kmeans_segment,
    kmeans_segment,
    kmeans_sweep,
    otsu_two_thresholds,
    otsu_watershed_segment,
)
from leukoedge.training.data import load_records, read_image, read_label_map
from leukoedge.training.metrics import dice

PALE_BACKGROUND = (200, 228, 240)  # BGR, the yellowish plasma of Zheng dataset1
CYTOPLASM_COLOUR = (175, 165, 205)  # pale pink-violet
NUCLEUS_COLOUR = (140, 40, 110)  # dark purple chromatin

METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "kmeans": kmeans_segment,
    "hsv_kmeans": hsv_kmeans_segment,
    "fuzzy_cmeans": fuzzy_cmeans_segment,
    "otsu_watershed": otsu_watershed_segment,
}


def paint(label_map: np.ndarray, colours: dict[int, tuple[int, int, int]], noise: float, seed: int = 0) -> np.ndarray:
    """A BGR image with each label's colour, plus Gaussian sensor noise."""
    image = np.zeros((*label_map.shape, 3), np.float64)
    for label, colour in colours.items():
        image[label_map == label] = colour
    image += np.random.default_rng(seed).normal(0.0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_cell(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A dark nucleus disc inside a lighter cytoplasm disc on a pale background, and its truth."""
    truth = np.zeros((size, size), np.uint8)
    cv2.circle(truth, (size // 2, size // 2), 32, 1, -1)
    cv2.circle(truth, (size // 2 + 3, size // 2 - 2), 15, 2, -1)
    return paint(truth, {0: PALE_BACKGROUND, 1: CYTOPLASM_COLOUR, 2: NUCLEUS_COLOUR}, noise=4.0), truth


def whole_cell(label_map: np.ndarray) -> np.ndarray:
    return label_map > 0


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_each_method_finds_the_synthetic_cell(method: Callable[[np.ndarray], np.ndarray]) -> None:
    image, truth = synthetic_cell()
    label_map = method(image)
    assert label_map.dtype == np.uint8 and label_map.shape == truth.shape
    assert set(np.unique(label_map)) <= {0, 1, 2}
    assert dice(label_map == 2, truth == 2) > 0.9
    assert dice(whole_cell(label_map), whole_cell(truth)) > 0.9


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_invalid_images_are_refused(method: Callable[[np.ndarray], np.ndarray]) -> None:
    with pytest.raises(InvalidFrameError, match="HxWx3 uint8"):
        method(np.zeros((10, 10), np.uint8))
    with pytest.raises(InvalidFrameError, match="float32"):
        method(np.zeros((10, 10, 3), np.float32))


def test_cluster_mapping_darkest_nucleus_touching_cytoplasm_brightest_background() -> None:
    image = np.full((40, 60, 3), 230, np.uint8)
    clusters = np.zeros((40, 60), np.int32)
    clusters[5:35, 5:35], image[5:35, 5:35] = 1, 150  # cell
    clusters[12:28, 12:28], image[12:28, 12:28] = 2, 50  # its nucleus
    clusters[10:20, 45:55], image[10:20, 45:55] = 1, 150  # same colour as the cytoplasm, not touching a nucleus
    label_map = clusters_to_label_map(image, clusters, 3)
    assert (label_map[12:28, 12:28] == 2).all()
    assert (label_map[5:35, 5:35] > 0).all() and (label_map[5:35, 5:35] == 1).sum() == 30 * 30 - 16 * 16
    assert (label_map[10:20, 45:55] == 0).all()
    assert (clusters_to_label_map(image, np.zeros_like(clusters), 3) == 0).all()  # one colour: nothing


def test_k_sweep_picks_the_k_the_truth_needs() -> None:
    # nucleus, cytoplasm, a red cell touching the cell, and plasma: four colours; at k = 3 the red
    # cell merges with the cytoplasm, above k = 4 a colour is split.
    truth = np.zeros((80, 100), np.uint8)
    cv2.circle(truth, (35, 40), 25, 1, -1)
    cv2.circle(truth, (35, 40), 11, 2, -1)
    red_cell = np.zeros_like(truth)
    cv2.circle(red_cell, (72, 40), 14, 1, -1)
    red_cell &= truth == 0
    painted = truth.copy()
    painted[red_cell > 0] = 3
    image = paint(painted, {0: (235, 235, 235), 1: (170, 150, 180), 2: (120, 30, 80), 3: (150, 150, 210)}, noise=0.0)

    sweep = kmeans_sweep(image, truth, range(2, 7))
    assert sweep.best_k == 4
    assert sweep.scores[4]["nucleus_dice"] == 1.0 and sweep.scores[4]["whole_cell_jaccard"] == 1.0
    assert sweep.scores[3]["whole_cell_dice"] < 1.0
    assert sweep.scores[4]["mean"] == max(row["mean"] for row in sweep.scores.values())

    best_k, table = choose_k([image, image], [truth, truth], range(2, 7))
    assert best_k == 4 and table[4]["mean"] == pytest.approx(sweep.scores[4]["mean"])


def test_hsv_kmeans_rejects_dark_objects_without_nucleus_colour_or_shape() -> None:
    image, truth = synthetic_cell(size=128)
    cv2.circle(image, (112, 112), 10, (60, 60, 60), -1)  # dark grey debris: dark, not purple
    cv2.line(image, (5, 120), (90, 120), NUCLEUS_COLOUR, 1)  # a purple thread: purple, not round
    plain = kmeans_segment(image)
    constrained = hsv_kmeans_segment(image)
    assert (plain[108:117, 108:117] == 2).any()  # K-means calls the darkest thing nucleus
    assert not (constrained[100:, :] == 2).any()
    assert dice(constrained == 2, truth == 2) > 0.9


def test_fuzzy_cmeans_memberships_and_centres() -> None:
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(0.2, 0.02, (200, 2)), rng.normal(0.8, 0.02, (200, 2))])
    centres, memberships = fuzzy_cmeans(data, 2, rng=np.random.default_rng(1))
    assert np.allclose(memberships.sum(axis=1), 1.0)
    assert np.allclose(np.sort(centres[:, 0]), [0.2, 0.8], atol=0.01)
    assert (memberships[:200].argmax(axis=1) == memberships[0].argmax()).all()
    with pytest.raises(ValueError, match="fuzzifier"):
        fuzzy_cmeans(data, 2, m=1.0)


def test_otsu_two_thresholds_separates_three_levels() -> None:
    values = np.repeat(np.array([30, 120, 220], np.uint8), [500, 300, 200])
    low, high = otsu_two_thresholds(values)
    assert 30 <= low < 120 <= high < 220


def test_otsu_watershed_splits_touching_cells() -> None:
    truth = np.zeros((90, 140), np.uint8)
    for centre_x in (45, 95):
        cv2.circle(truth, (centre_x, 45), 28, 1, -1)
    for centre_x in (45, 95):
        cv2.circle(truth, (centre_x, 45), 12, 2, -1)
    image = paint(truth, {0: PALE_BACKGROUND, 1: CYTOPLASM_COLOUR, 2: NUCLEUS_COLOUR}, noise=3.0)
    label_map = otsu_watershed_segment(image)
    cell_count, _ = cv2.connectedComponents((label_map > 0).astype(np.uint8), connectivity=8)
    assert cell_count - 1 == 2
    assert dice(label_map == 2, truth == 2) > 0.9


def test_circularity_of_disc_and_line() -> None:
    disc = np.zeros((60, 60), np.uint8)
    cv2.circle(disc, (30, 30), 20, 1, -1)
    contours, _ = cv2.findContours(disc, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    assert circularity(contours[0]) > 0.85
    assert circularity(np.array([[[0, 0]], [[30, 0]]], np.int32)) == 0.0


@pytest.fixture(scope="module")
def zheng_test_images(data_root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Six images of the Zheng dataset1 test split with their expert label maps."""
    records = load_records(data_root, "wbc-seg-zheng", "test")
    chosen = records[:: max(1, len(records) // 6)][:6]
    return [(read_image(record), read_label_map(record)) for record in chosen]


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_each_method_segments_real_zheng_nuclei(method: Callable[[np.ndarray], np.ndarray], zheng_test_images) -> None:
    nucleus_dice = [dice(method(image) == 2, truth == 2) for image, truth in zheng_test_images]
    assert np.mean(nucleus_dice) > 0.6
