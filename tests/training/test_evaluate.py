"""The held-out report: every table is produced, numbers are consistent, nothing crashes when no cell is found."""

from __future__ import annotations

import json

from leukoedge.training.evaluate import evaluate_bundle


def test_evaluate_writes_every_table_on_a_few_images(tiny_bundle, data_root, tmp_path):
    report = evaluate_bundle(tiny_bundle, data_root, tmp_path, limit=3)
    assert json.loads((tmp_path / "evaluation.json").read_text())["date"] == report["date"]
    markdown = (tmp_path / "evaluation.md").read_text()
    for heading in ("## Segmentation", "## Blast vs normal", "B-ALL subtype", "PBC (healthy donors"):
        assert heading in markdown
    for source in ("wbc-seg-zheng", "all-idb2"):
        table = report["segmentation"][source]
        assert table["images"] == 3
        for method in ("leukoedge", "kmeans_k3"):
            dice, jaccard = table[method]["nucleus_dice"], table[method]["nucleus_jaccard"]
            if dice["mean"] is not None:
                assert jaccard["mean"] <= dice["mean"] + 1e-9  # Jaccard can never exceed Dice
    assert report["all_idb2"]["blast"]["n"] == 3
    assert report["pbc"]["images"] == 3 and 0 <= report["pbc"]["called_blast"] <= 3
    taleqani = report["all_taleqani"]
    assert taleqani["images"] == 3 and taleqani["subtype"]["n"] == 3
