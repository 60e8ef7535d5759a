"""Box matching and the per-device figures of training/detection.py."""

from __future__ import annotations

import numpy as np
import pytest

from leukoedge.training.detection import DeviceFigures, box_iou, count_field, format_table, greedy_matches


def test_box_iou_of_identical_disjoint_and_half_overlapping_boxes():
    iou = box_iou([(0, 0, 10, 10)], [(0, 0, 10, 10), (20, 20, 30, 30), (5, 0, 15, 10)])
    assert iou[0] == pytest.approx([1.0, 0.0, 50 / 150])
    assert box_iou([], [(0, 0, 1, 1)]).shape == (0, 1)


def test_greedy_matching_uses_each_box_once_best_first():
    iou = np.array([[0.9, 0.6], [0.8, 0.0]])
    assert greedy_matches(iou, 0.5) == [(0, 0)]  # row 1's only candidate was taken by the better pair
    assert greedy_matches(np.array([[0.4]]), 0.5) == []


def test_a_red_cell_found_as_a_white_cell_is_counted_once_and_not_as_a_match():
    boxes = {"WBC": [(0, 0, 20, 20)], "RBC": [(40, 40, 50, 50), (60, 60, 70, 70)]}
    counts = count_field([(1, 1, 20, 20), (40, 40, 50, 51)], boxes)
    assert (counts.found, counts.matched, counts.wbc_boxes, counts.rbc_boxes, counts.rbc_called_wbc) == (2, 1, 1, 2, 1)


def test_device_figures_rates_and_refusals():
    figures = DeviceFigures("bccd")
    boxes = {"WBC": [(0, 0, 20, 20)], "RBC": [(40, 40, 50, 50)]}
    figures.add(count_field([(0, 0, 20, 20)], boxes), "ok", False)
    figures.add(count_field([(0, 0, 20, 20), (40, 40, 50, 50)], boxes), "ok", True)
    figures.add(None, "outside_domain", False)
    figures.add(None, "no_cells", False)
    row = figures.as_row()
    assert row["box_recall"] == 1.0 and row["box_precision"] == pytest.approx(2 / 3)
    assert row["rbc_called_wbc_per_1000"] == pytest.approx(500.0)
    assert row["refused_rate"] == pytest.approx(1 / 4)
    assert row["false_flag_rate"] == pytest.approx(1 / 2) and row["judged"] == 2


def test_refusals_say_which_domain_check_failed():
    figures = DeviceFigures("raabin")
    figures.add(None, "outside_domain", False, ["colour"])
    figures.add(None, "outside_domain", False, ["colour", "uncertainty"])
    figures.add(None, "ok", False)
    figures.add(None, "ok", False)
    row = figures.as_row()
    assert row["refused_rate"] == pytest.approx(2 / 4)
    assert (row["refused_colour_rate"], row["refused_uncertainty_rate"]) == (pytest.approx(2 / 4), pytest.approx(1 / 4))
    assert "| 0.500 (colour 0.500, uncertainty 0.250) |" in format_table([row], "left out")
