"""scripts/compare_evaluations.py: which same-source figures a candidate moves, and whether a drop is one item or more."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from compare_evaluations import compare  # noqa: E402


def _shipped() -> dict:
    return json.loads((REPO_ROOT / "reports" / "evaluation.json").read_text())


def _judgements(before: dict, after: dict) -> dict[str, str]:
    return {name: judgement for name, _, _, judgement in compare(before, after)}


def test_the_same_run_moves_nothing() -> None:
    shipped = _shipped()
    assert set(_judgements(shipped, shipped).values()) == {"same"}


def test_one_cell_of_a_small_set_is_one_item_and_more_is_a_drop() -> None:
    before = _shipped()
    n = before["all_idb2"]["blast"]["n"]
    one, two = copy.deepcopy(before), copy.deepcopy(before)
    one["all_idb2"]["blast"]["accuracy"] -= 1 / n
    two["all_idb2"]["blast"]["accuracy"] -= 2 / n
    assert _judgements(before, one)["ALL-IDB2 blast accuracy"] == f"one item of {n}"
    assert _judgements(before, two)["ALL-IDB2 blast accuracy"] == "DROP"


def test_lower_is_better_figures_judge_a_rise_as_worse() -> None:
    before = _shipped()
    after = copy.deepcopy(before)
    images = before["pbc"]["non_white_cells"]["images"]
    after["pbc"]["non_white_cells"]["counted_as_white_cells"] += 5
    assert _judgements(before, after)["PBC platelet / erythroblast images with a white cell"] == "DROP"
    after["pbc"]["non_white_cells"]["counted_as_white_cells"] -= 10
    assert _judgements(before, after)["PBC platelet / erythroblast images with a white cell"] == "better"
    assert images > 0


def test_a_drop_within_the_rule_passes_whatever_the_set() -> None:
    before = _shipped()
    after = copy.deepcopy(before)
    after["all_taleqani"]["subtype"]["accuracy"] -= 0.005
    assert _judgements(before, after)["Taleqani subtype accuracy"] == "within 0.01"
