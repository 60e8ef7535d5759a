"""The same-source figures of two `leukoedge evaluate` runs side by side, against the rule a new bundle must keep
("no same-source figure drops by more than 0.01", issue "Right on a microscope it has never seen"). Each figure
says how many items it counts: on ALL-IDB2's 32 cells or bcd's 18 boxes one item moves a figure by more than 0.01,
so a drop is marked "one item" where it is a single cell, field or box, and "DROP" where it is more.

    python scripts/compare_evaluations.py --before reports --after CANDIDATE_REPORTS
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

RULE = 0.01


@dataclass(frozen=True)
class Figure:
    name: str
    read: Callable[[dict], float | None]
    items: Callable[[dict], int | None]  # what one item is worth: 1 / items (None: a mean of continuous scores)
    higher_is_better: bool = True


def _method(evaluation: dict, source: str, metric: str) -> float | None:
    """The mean of a metric for the leukoedge method of a segmentation source (its name carries the architecture)."""
    methods = evaluation.get("segmentation", {}).get(source, {}).get("methods", {})
    for name, figures in methods.items():
        if name.startswith("leukoedge"):
            return figures[metric]["mean"]
    return None


def _row(evaluation: dict, domain: str) -> dict:
    return next((row for row in evaluation.get("white_cells_only", []) if row["domain"] == domain), {})


def _taleqani(evaluation: dict) -> dict:
    return evaluation.get("all_taleqani", {}).get("malignant_vs_benign", {})


def _benign(evaluation: dict) -> int | None:
    """Taleqani's benign fields: the steps of the specificity's ROC (1 / benign per step)."""
    fpr = _taleqani(evaluation).get("roc_from_blast_fraction", {}).get("fpr", [])
    steps = [b - a for a, b in zip(fpr, fpr[1:]) if b > a]
    return round(1 / min(steps)) if steps else None


def _taleqani_cross(evaluation: dict) -> float | None:
    for run in evaluation.get("cross_source", []):
        rows = run.get("sources", {}).get("all-taleqani", {}).get("rows", {})
        if "reference" in rows:
            return rows["reference"]["whole_cell_dice"]["mean"]
    return None


def figures() -> list[Figure]:
    none: Callable[[dict], int | None] = lambda e: None  # noqa: E731
    found = [
        Figure(f"{label} {part} Dice", lambda e, s=source, m=metric: _method(e, s, m), none)
        for source, label in (("wbc-seg-zheng", "Zheng"), ("all-idb2", "ALL-IDB2"))
        for part, metric in (("nucleus", "nucleus_dice"), ("whole-cell", "whole_cell_dice"))
    ]
    found += [
        Figure("Taleqani whole-cell Dice", _taleqani_cross, none),
        Figure("ALL-IDB2 blast accuracy", lambda e: e["all_idb2"]["blast"]["accuracy"], lambda e: e["all_idb2"]["blast"]["n"]),
        Figure("ALL-IDB2 blast AUC", lambda e: e["all_idb2"]["blast"]["auc"], none),
        Figure("Taleqani verdict accuracy", lambda e: _taleqani(e)["accuracy"], lambda e: _taleqani(e)["n"]),
        Figure("Taleqani sensitivity", lambda e: _taleqani(e)["sensitivity"], lambda e: (_taleqani(e)["n"] - (_benign(e) or 0)) or None),
        Figure("Taleqani specificity", lambda e: _taleqani(e)["specificity"], _benign),
        Figure("Taleqani AUC (blast fraction)", lambda e: _taleqani(e)["auc_from_blast_fraction"], none),
        Figure("Taleqani subtype accuracy", lambda e: e["all_taleqani"]["subtype"]["accuracy"], lambda e: e["all_taleqani"]["images"]),
        Figure("Taleqani fields refused", lambda e: e["all_taleqani"]["not_judged"] / e["all_taleqani"]["images"], lambda e: e["all_taleqani"]["images"], False),
        Figure("PBC WBC-type accuracy", lambda e: e["pbc"]["wbc_type"]["accuracy"], lambda e: e["pbc"]["wbc_type"]["n"]),
        Figure(
            "PBC platelet / erythroblast images with a white cell",
            lambda e: e["pbc"]["non_white_cells"]["counted_as_white_cells"] / e["pbc"]["non_white_cells"]["images"],
            lambda e: e["pbc"]["non_white_cells"]["images"],
            False,
        ),
        Figure("PBC images without a cell found", lambda e: e["pbc"]["no_cell_found"] / e["pbc"]["images"], lambda e: e["pbc"]["images"], False),
    ]
    for domain in ("bccd", "txl-pbc/bcd", "txl-pbc/raabin", "pbc", "wbc-seg-zheng"):
        found += [
            Figure(f"{domain} box recall", lambda e, d=domain: _row(e, d).get("box_recall"), lambda e, d=domain: _row(e, d).get("wbc_boxes")),
            Figure(f"{domain} box precision", lambda e, d=domain: _row(e, d).get("box_precision"), lambda e, d=domain: _row(e, d).get("found")),
            Figure(f"{domain} red cells called white / 1000", lambda e, d=domain: _row(e, d).get("rbc_called_wbc_per_1000"), none, False),
            Figure(f"{domain} fields refused", lambda e, d=domain: _row(e, d).get("refused_rate"), lambda e, d=domain: _row(e, d).get("fields"), False),
            Figure(f"{domain} false flags among judged", lambda e, d=domain: _row(e, d).get("false_flag_rate"), lambda e, d=domain: _row(e, d).get("judged"), False),
        ]
    return found


def _read(read: Callable[[dict], Any], evaluation: dict) -> Any:
    try:
        return read(evaluation)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def compare(before: dict, after: dict) -> list[tuple[str, float, float, str]]:
    """(figure, before, after, judgement) for every figure both runs have; judgement: better, same, within the rule,
    one item, DROP, or a note on the rule for counts of red cells (per 1000: no 0.01 rule)."""
    rows = []
    for figure in figures():
        old, new = _read(figure.read, before), _read(figure.read, after)
        if old is None or new is None:
            continue
        worse_by = (old - new) if figure.higher_is_better else (new - old)
        items = _read(figure.items, before) or _read(figure.items, after)
        if abs(new - old) < 1e-4:  # float rounding (a few mask pixels at a tie), not a change
            judgement = "same"
        elif worse_by < 0:
            judgement = "better"
        elif figure.name.endswith("/ 1000"):
            judgement = "worse (per 1000 red cells)"
        elif worse_by <= RULE + 1e-9:
            judgement = "within 0.01"
        elif items and worse_by <= 1.0 / items + 1e-9:
            judgement = f"one item of {items}"
        else:
            judgement = "DROP"
        rows.append((figure.name, old, new, judgement))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="folder of the reference run's evaluation.json (e.g. reports)")
    parser.add_argument("--after", type=Path, required=True, help="folder of the candidate's evaluation.json")
    parser.add_argument("--all", action="store_true", help="also list the figures that did not move")
    args = parser.parse_args()
    before, after = (json.loads((folder / "evaluation.json").read_text()) for folder in (args.before, args.after))
    print(f"before: {before.get('bundle')} ({before.get('model_version')}), after: {after.get('bundle')} ({after.get('model_version')})\n")
    print("| figure | before | after | |\n|---|---|---|---|")
    rows = compare(before, after)
    for name, old, new, judgement in rows:
        if args.all or judgement != "same":
            print(f"| {name} | {old:.3f} | {new:.3f} | {judgement} |")
    drops = [row for row in rows if row[3] == "DROP"]
    single = [row for row in rows if row[3].startswith("one item")]
    print(f"\n{len(drops)} figures drop by more than 0.01 and more than one item; {len(single)} by one item only.")


if __name__ == "__main__":
    main()
