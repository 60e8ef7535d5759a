"""The held-out report: quick mode makes every table and plot, the numbers are consistent, the
Jaccard <= Dice check catches a violation, and the k sweep keeps the best-scoring k."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from leukoedge.bundle import load_bundle, save_bundle
from leukoedge.detector import Detector
from leukoedge.errors import LeukoedgeError
from leukoedge.training import evaluate
from leukoedge.training.evaluate import (
    QUICK_LIMIT,
    background_scores,
    jaccard_dice_violations,
    matched_boxes,
    parse_segmenter_checkpoints,
    run_quick,
)
from leukoedge.training.torch_backend import checkpoint_paths

TABLE_HEADERS = (
    "## Segmentation on expert masks",
    "### Nucleus",
    "### Whole cell",
    "| source | method | Jaccard | Tanimoto | Dice | SSIM | pixel error % | ms/image (median) |",
    "## K-means k sweep (train split)",
    "| class | metric | k=2 | k=3 | k=4 | k=5 | k=6 |",
    "## Cross-source segmentation",
    "| held-out source | n | bundle | whole-cell Dice | whole-cell Jaccard | nucleus Dice | nucleus Jaccard | box recall | box precision |",
    "## Cross-source blast vs normal",
    "| ALL-IDB2 | n | accuracy | sensitivity | specificity | AUC | no cell found |",
    "## Blast vs normal",
    "| data | unit | n | accuracy | sensitivity | specificity | AUC | no cell found |",
    "B-ALL subtype per Taleqani field",
    "PBC (healthy donors",
)
PLOTS = (
    "dice_by_method",
    "segmentation_examples",
    "kmeans_k_sweep",
    "roc_all_idb2_blast",
    "roc_taleqani_blast_fraction",
    "confusion_taleqani_subtype",
    "confusion_pbc_wbc_type",
)
HELD_OUT = ("all-taleqani", "bccd")


@pytest.fixture(scope="module")
def cross_source_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_bundle's models under a manifest whose segmenter learnt from Zheng and ALL-IDB2 only and whose
    classifier left ALL-IDB2 out: the bundle `leukoedge train --segmentation-sources wbc-seg-zheng,all-idb2
    --classification-sources all-taleqani,pbc` writes, without training again."""
    bundle = load_bundle(tiny_bundle)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["training"]["segmentation_sources"] = ["wbc-seg-zheng", "all-idb2"]
    manifest["training"]["classification_sources"] = ["all-taleqani", "pbc"]
    files = {name: bundle.path(name) for name in manifest["files"]}
    return save_bundle(tmp_path_factory.mktemp("cross") / "held-out", manifest, files).root


@pytest.fixture(scope="module")
def quick_report(tiny_bundle: Path, cross_source_bundle: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """`leukoedge evaluate --quick` on tiny_bundle, its own segmenter checkpoint standing in for "CNN (base)"."""
    out = tmp_path_factory.mktemp("report")
    checkpoints = {"CNN (base)": checkpoint_paths(tiny_bundle)["segmenter"]}
    return run_quick(data_root, out, tiny_bundle, checkpoints, [cross_source_bundle]), out


def test_quick_mode_writes_every_table_and_plot(quick_report) -> None:
    report, out = quick_report
    assert json.loads((out / "evaluation.json").read_text())["date"] == report["date"]
    markdown = (out / "evaluation.md").read_text()
    for header in TABLE_HEADERS:
        assert header in markdown, header
    for name in PLOTS:
        file_name = report["plots"][name]
        assert (out / file_name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({file_name})" in markdown  # linked from the report
    assert report["quick"] and "Quick mode" in markdown


def test_segmentation_table_compares_every_method_consistently(quick_report, tiny_bundle) -> None:
    report, out = quick_report
    architecture = load_bundle(tiny_bundle).manifest["segmenter"]["architecture"]
    bundle_method = f"leukoedge ({architecture} + refiner)"  # the quick bundle has a refiner
    expected = {bundle_method, "CNN (base)", "kmeans_k3", "kmeans_swept", "hsv_kmeans", "fuzzy_cmeans", "otsu_watershed"}
    for source in ("wbc-seg-zheng", "all-idb2"):
        table = report["segmentation"][source]
        assert table["images"] == QUICK_LIMIT and set(table["methods"]) == expected
        for method, row in table["methods"].items():
            assert row["ms_per_image"] > 0
            for region in ("nucleus", "whole_cell"):
                dice, jaccard, tanimoto = (row[f"{region}_{metric}"] for metric in ("dice", "jaccard", "tanimoto"))
                assert dice["n"] == QUICK_LIMIT, (source, method, region)
                assert jaccard["mean"] <= dice["mean"] + 1e-12
                assert tanimoto["mean"] == pytest.approx(jaccard["mean"])  # equal on binary masks
        # The bundle's own checkpoint in PyTorch through the runtime preprocessing segments as its ONNX file does.
        checkpoint, onnx = table["methods"]["CNN (base)"], table["methods"][bundle_method]
        assert checkpoint["whole_cell_dice"]["mean"] == pytest.approx(onnx["whole_cell_dice"]["mean"], abs=0.01)
        # Paired against K-means: the mean gap is the gap of the means (same images), inside its interval.
        for method in (bundle_method, "CNN (base)"):
            for region in ("nucleus", "whole_cell"):
                gap = table["versus_kmeans_k3"][method][region]
                dice_gap = table["methods"][method][f"{region}_dice"]["mean"] - table["methods"]["kmeans_k3"][f"{region}_dice"]["mean"]
                assert gap["mean"] == pytest.approx(dice_gap) and gap["ci95_low"] <= gap["mean"] <= gap["ci95_high"]
                assert gap["n"] == QUICK_LIMIT and gap["ahead"] + gap["behind"] <= QUICK_LIMIT
    assert "Paired against K-means (k=3)" in (out / "evaluation.md").read_text()
    assert report["jaccard_le_dice"] == {"holds": True, "violations": []}
    assert "Jaccard <= Dice holds for every method, source, region and image" in (out / "evaluation.md").read_text()


def test_k_sweep_chooses_the_best_scoring_k_on_the_train_split(quick_report) -> None:
    report, _ = quick_report
    for source, sweep in report["kmeans_k_sweep"].items():
        assert sweep["split"] == "train" and sweep["images"] == QUICK_LIMIT
        assert sorted(sweep["by_k"]) == [2, 3, 4, 5, 6]
        best = max(sweep["by_k"], key=lambda k: (sweep["by_k"][k]["mean"], -k))
        assert sweep["chosen_k"] == best
        assert report["segmentation"][source]["kmeans_swept_k"] == best
        for k, row in sweep["by_k"].items():
            for name in ("background", "cytoplasm", "nucleus"):
                assert all(0.0 <= row[f"{name}_{metric}"] <= 1.0 for metric in ("dice", "jaccard")), (source, k, name)


def test_cross_source_tests_the_held_out_sources_beside_the_reference(quick_report, cross_source_bundle) -> None:
    report, _ = quick_report
    (cross,) = report["cross_source"]
    assert cross["bundle"] == evaluate.portable_path(cross_source_bundle) and cross["trained_on"] == ["wbc-seg-zheng", "all-idb2"]
    assert tuple(cross["sources"]) == HELD_OUT
    taleqani = cross["sources"]["all-taleqani"]
    # fields where the authors' threshold failed have no mask to score against: counted, not scored
    assert taleqani["images"] + taleqani["images_without_a_usable_mask"] == QUICK_LIMIT and taleqani["images"] > 0
    for role, row in taleqani["rows"].items():
        assert row["whole_cell_dice"]["n"] == taleqani["images"], role
        assert row["whole_cell_jaccard"]["mean"] <= row["whole_cell_dice"]["mean"] + 1e-12
        assert "nucleus_dice" not in row  # weak masks mark cells, not nuclei
    for role, row in cross["sources"]["bccd"]["rows"].items():
        assert row["truth_boxes"] > 0 and 0 <= row["matched"] <= min(row["truth_boxes"], row["detected_boxes"]), role


def test_cross_source_blast_vs_normal_is_all_idb2_by_the_classifier_that_never_saw_it(quick_report, cross_source_bundle) -> None:
    report, out = quick_report
    (cross,) = report["cross_source"]
    assert cross["classifier_trained_on"] == ["all-taleqani", "pbc"] and "all-idb2" in cross["reference_classifier_trained_on"]
    rows = cross["classification"]["all-idb2"]
    # Same models here (the fixture only relabels tiny_bundle), so both rows are the same-source figure.
    assert rows["reference"] == rows["cross_source"] == report["all_idb2"]
    assert rows["cross_source"]["blast"]["n"] == QUICK_LIMIT
    assert f"| trained without it | {QUICK_LIMIT} |" in (out / "evaluation.md").read_text()


def test_a_cross_source_bundle_that_saw_every_source_tests_nothing_and_says_so(tiny_bundle: Path, data_root: Path) -> None:
    detector = Detector.load(tiny_bundle)  # trained on every source: nothing held out
    section, per_image = evaluate.evaluate_cross_source(detector, detector, data_root, 1)
    assert section["sources"] == {} and section["classification"] == {} and per_image == {}
    markdown = "\n".join(evaluate._cross_source_md({"cross_source": [section]}))
    assert "no `--cross-source-bundle` left a segmentation source out" in markdown
    assert "no `--cross-source-bundle` left ALL-IDB2 out of its classifier" in markdown


def test_the_report_names_no_absolute_path_of_the_machine_that_made_it(quick_report, tiny_bundle, cross_source_bundle, data_root) -> None:
    _, out = quick_report
    for name in ("evaluation.md", "evaluation.json"):
        text = (out / name).read_text()
        for machine_path in (tiny_bundle, cross_source_bundle, Path(data_root).resolve(), Path.cwd().resolve()):
            assert str(machine_path) not in text, (name, machine_path)


def test_portable_path_is_relative_to_the_data_folder_the_working_folder_or_the_repository(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    assert evaluate.portable_path(data_root / "bccd" / "a.jpg", data_root) == "<data>/bccd/a.jpg"
    assert evaluate.portable_path(evaluate.REPOSITORY_ROOT / "models" / "default") == "models/default"
    assert evaluate.portable_path(Path("models/default")) == "models/default"
    assert evaluate.portable_path(tmp_path / "scratch" / "default") == ".../default"


def test_classification_sections_stay(quick_report) -> None:
    report, _ = quick_report
    assert report["all_idb2"]["blast"]["n"] == QUICK_LIMIT
    assert report["pbc"]["images"] == QUICK_LIMIT and 0 <= report["pbc"]["called_blast"] <= QUICK_LIMIT
    taleqani = report["all_taleqani"]
    assert taleqani["images"] == QUICK_LIMIT and taleqani["subtype"]["n"] == QUICK_LIMIT
    assert np.asarray(taleqani["subtype"]["confusion"]).sum() == QUICK_LIMIT


def test_jaccard_dice_check_reports_a_constructed_violation() -> None:
    consistent = {"dice": 0.8, "jaccard": 0.8 / 1.2}
    impossible = {"dice": 0.5, "jaccard": 0.6}
    scores = {"wbc-seg-zheng": {"kmeans_k3": {"nucleus": [consistent, None, impossible], "whole_cell": [consistent]}}}
    violations = jaccard_dice_violations(scores)
    assert len(violations) == 1
    assert "wbc-seg-zheng / kmeans_k3 / nucleus / image 2" in violations[0]
    assert jaccard_dice_violations({"all-idb2": {"otsu_watershed": {"nucleus": [consistent, consistent]}}}) == []


def test_background_is_scored_as_the_complement_of_the_cell() -> None:
    truth = np.zeros((24, 24), np.uint8)
    truth[6:18, 6:18] = 1
    truth[9:15, 9:15] = 2
    assert background_scores(truth, truth)["dice"] == 1.0
    grown = np.zeros_like(truth)
    grown[4:20, 4:20] = 1  # the cell called 16x16 instead of 12x12: background loses 112 of its 432 pixels
    assert background_scores(grown, truth)["dice"] == pytest.approx(2 * 320 / (320 + 432))
    ignored = truth.copy()
    ignored[4:20, 4:20][truth[4:20, 4:20] == 0] = 255  # the disputed ring ignored: nothing left to disagree on
    assert background_scores(grown, ignored)["dice"] == 1.0


def test_boxes_match_one_to_one_at_iou_half() -> None:
    truth = [(0, 0, 10, 10), (20, 20, 30, 30)]
    detected = [(0, 0, 10, 10), (1, 1, 10, 10), (20, 20, 26, 30), (50, 50, 60, 60)]
    # two detections on the first cell count once; IoU 0.6 matches the second; the far box matches nothing
    assert matched_boxes(detected, truth) == 2
    assert matched_boxes([(20, 20, 24, 30)], truth) == 0  # IoU 0.4


def test_segmenter_checkpoint_arguments(tmp_path: Path) -> None:
    checkpoint = tmp_path / "unet-segmenter.pt"
    checkpoint.write_bytes(b"")
    checkpoint.with_suffix(".json").write_text("{}")
    assert parse_segmenter_checkpoints([f"CNN (base)={checkpoint}"]) == {"CNN (base)": checkpoint}
    for bad in (str(checkpoint), f"={checkpoint}", f"kmeans_k3={checkpoint}", f"other={tmp_path / 'missing.pt'}"):
        with pytest.raises(LeukoedgeError):
            parse_segmenter_checkpoints([bad])
    with pytest.raises(LeukoedgeError):
        parse_segmenter_checkpoints([f"a={checkpoint}", f"a={checkpoint}"])


def test_val_split_compares_candidates_without_touching_the_test_split(
    tiny_bundle: Path, cross_source_bundle: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits_read = []
    load_records = evaluate.data.load_records

    def recording_load_records(root, source, split=None):
        splits_read.append(split)
        return load_records(root, source, split)

    monkeypatch.setattr(evaluate.data, "load_records", recording_load_records)
    report = evaluate.evaluate_bundle(tiny_bundle, data_root, tmp_path, limit=1, cross_source_bundles=[cross_source_bundle], split="val")

    assert set(splits_read) == {"train", "val"}  # train: only the K-means k sweep
    assert report["evaluated_split"] == "val" and report["cross_source"][0]["split"] == "val"
    markdown = (tmp_path / "evaluation.md").read_text()
    assert "VALIDATION split" in markdown and "(val split, mean" in markdown
    with pytest.raises(ValueError, match="split must be one of test, val"):
        evaluate.evaluate_bundle(tiny_bundle, data_root, tmp_path, limit=1, split="train")


def test_a_white_cell_named_erythroblast_by_a_bundle_without_a_gate_counts_as_wrong(data_root: Path) -> None:
    # Only a gate takes "platelet" and "erythroblast" out of the WBC-type head; a bundle without one may still name a
    # PBC white cell so. The evaluation must score that as a wrong answer in its own column, not stop.
    from types import SimpleNamespace

    from leukoedge.training.evaluate import evaluate_single_cells

    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]

    class Detector:
        verdict_spec = {"blast_threshold": 0.5}
        classifier_spec = {"heads": {"wbc_type": {"classes": classes}}}

        def run(self, image, jpeg_quality=None):
            height, width = image.shape[:2]
            cell = SimpleNamespace(
                box=(width // 4, height // 4, 3 * width // 4, 3 * height // 4),
                blast_probability=0.1,
                head_scores={"wbc_type": {name: 0.9 if name == "erythroblast" else 0.1 / 7 for name in classes}},
            )
            return SimpleNamespace(cells=[cell], frame_shape=(height, width))

    report = evaluate_single_cells(Detector(), data_root, "pbc", 12)
    assert "erythroblast" in report["wbc_type"]["classes"] and "platelet" not in report["wbc_type"]["classes"]
    white_cells = report["images"] - report["non_white_cells"]["images"]
    assert white_cells > 0 and report["wbc_type"]["n"] == white_cells
    assert report["wbc_type"]["accuracy"] == 0.0
