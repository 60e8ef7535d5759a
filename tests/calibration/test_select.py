"""Calibration set selection: shares per source and class, stain spread, the file list."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from leukoedge.calibration.select import FIELD_SOURCES, quantile_positions, select_items, share_out, stain_order, write_calibration_csv


def test_share_out_is_equal_capped_and_passes_unused_shares_on():
    assert share_out({"a": 100, "b": 100, "c": 100}, 30) == {"a": 10, "b": 10, "c": 10}
    # "a" has only 2: its unused share goes to the others, equally.
    assert share_out({"a": 2, "b": 100, "c": 100}, 30) == {"a": 2, "b": 14, "c": 14}
    # Asking for more than exists takes everything, never more.
    assert share_out({"a": 3, "b": 4}, 100) == {"a": 3, "b": 4}
    assert sum(share_out({"a": 7, "b": 5, "c": 9}, 10).values()) == 10


def test_slots_at_stain_quantiles_span_the_stain_range_not_one_end():
    rng = np.random.default_rng(0)
    # Stain varies mostly along one direction in L*a*b* (pale/pink to dark/purple), sorted as files often are.
    position = np.sort(rng.uniform(0.0, 1.0, 200))
    lab_means = np.stack([80 - 30 * position, 5 + 10 * position, -5 - 8 * position], axis=1) + rng.normal(0, 0.3, (200, 3))
    chosen = stain_order(lab_means)[quantile_positions(200, 10)]
    assert len(set(chosen)) == 10
    spread = position[chosen]
    assert spread.min() < 0.1 and spread.max() > 0.9  # both ends of the stain range are represented
    assert np.all(np.diff(np.sort(spread)) < 0.2)  # and nothing in between is skipped
    assert sorted(quantile_positions(5, 10)) == list(range(5))  # fewer candidates than slots: all of them


def test_field_selection_is_stratified_by_source_and_class_and_lists_real_train_files(data_root: Path, tmp_path: Path):
    items = select_items(data_root, "segmenter", FIELD_SOURCES, total=20, candidates_per_class=4)
    by_source = Counter(item.source for item in items)
    assert by_source == {source: 4 for source in FIELD_SOURCES}
    assert Counter(item.label for item in items if item.source == "all-idb2") == {"blast": 2, "normal": 2}
    assert Counter(item.label for item in items if item.source == "all-taleqani") == {"Benign": 1, "Early": 1, "Pre": 1, "Pro": 1}
    assert all(item.record.split == "train" for item in items)
    assert len({item.record.image_path for item in items}) == 20

    listed = write_calibration_csv(items, data_root, tmp_path / "calibration_set.csv")
    with listed.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 20
    assert {row["model"] for row in rows} == {"segmenter"}
    assert all((data_root / row["image"]).is_file() and not Path(row["image"]).is_absolute() for row in rows)
    assert all(0.0 <= float(row["lab_l"]) <= 100.0 for row in rows)


def test_an_image_without_a_cell_is_replaced_by_a_stain_neighbour(data_root: Path):
    refused: list[str] = []

    def cell_box(record, image):
        # Every other image "has no cell": its slot must be filled by another image of the same stratum.
        if len(refused) % 2 == 0:
            refused.append(record.image_path.name)
            return None
        refused.append("")
        return (0, 0, image.shape[1] // 2, image.shape[0] // 2)

    items = select_items(data_root, "classifier", ("all-idb2",), total=4, candidates_per_class=6, cell_box=cell_box)
    assert Counter(item.label for item in items) == {"blast": 2, "normal": 2}
    assert all(item.box is not None for item in items)
    assert not {item.record.image_path.name for item in items} & set(refused)
