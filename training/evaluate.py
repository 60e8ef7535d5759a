"""Held-out evaluation of a bundle, end to end through the runtime Detector (what ships is what is measured).

`leukoedge evaluate --data ../shared/data --bundle models/default --out reports/` writes
reports/evaluation.md (tables), reports/evaluation.json (every number) and PNG plots.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from leukoedge.detector import Detector
from leukoedge.postprocess import central_box
from leukoedge.result import Result

from . import data
from .classical import kmeans_segment
from .metrics import binary_summary, classification_report, segmentation_scores

SEGMENTATION_TEST_SOURCES = ("wbc-seg-zheng", "all-idb2")


def _summary(values: list[float | None]) -> dict[str, float | int | None]:
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(defined)), "std": float(np.std(defined)), "n": len(defined)}


def _central_cell(result: Result):
    """The detected cell nearest the frame centre: single-cell images are centred on their cell."""
    box = central_box([cell.box for cell in result.cells], result.frame_shape)
    return next((cell for cell in result.cells if cell.box == box), None)


def evaluate_segmentation(detector: Detector, data_root: Path, limit: int | None) -> dict[str, Any]:
    """Nucleus / whole-cell Dice and Jaccard on the test split, the bundle's segmenter vs K-means (k=3)."""
    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "leukoedge": lambda image: detector.run(image).label_map,
        "kmeans_k3": lambda image: kmeans_segment(image, k=3),
    }
    table: dict[str, Any] = {}
    for source in SEGMENTATION_TEST_SOURCES:
        records = data.load_records(data_root, source, "test")[:limit]
        scores: dict[str, dict[str, list]] = {m: {} for m in methods}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for record in tqdm(records, desc=f"segmentation {source}", leave=False):
            image, truth = data.read_image(record), data.read_label_map(record)
            for method, segment in methods.items():
                started = time.perf_counter()
                predicted = segment(image)
                times[method].append((time.perf_counter() - started) * 1000)
                result = segmentation_scores(predicted, truth)
                for region in ("nucleus", "whole_cell"):
                    for metric in ("dice", "jaccard"):
                        value = result[region][metric] if result[region] else None
                        scores[method].setdefault(f"{region}_{metric}", []).append(value)
        table[source] = {
            method: {**{k: _summary(v) for k, v in scores[method].items()}, "ms_per_image": float(np.median(times[method]))}
            for method in methods
        }
        table[source]["images"] = len(records)
    return table


def evaluate_single_cells(detector: Detector, data_root: Path, source: str, limit: int | None) -> dict[str, Any]:
    """Blast vs normal on single-cell images (ALL-IDB2, PBC): the detected cell nearest the centre.
    An image with no detected cell counts as called normal and is reported as a miss."""
    records = data.load_records(data_root, source, "test")[:limit]
    truth, probability, missed = [], [], 0
    wbc_truth, wbc_predicted = [], []
    for record in tqdm(records, desc=f"cells {source}", leave=False):
        cell = _central_cell(detector.run(data.read_image(record)))
        missed += cell is None
        truth.append(record.blast)
        probability.append(cell.blast_probability if cell else 0.0)
        if cell and record.wbc_type:
            wbc_truth.append(record.wbc_type)
            scores = cell.head_scores["wbc_type"]
            wbc_predicted.append(max(scores, key=scores.get))
    threshold = detector.verdict_spec["blast_threshold"]
    report: dict[str, Any] = {"images": len(records), "no_cell_found": missed}
    if source == "pbc":
        called_blast = int(np.sum(np.asarray(probability) >= threshold))
        report["called_blast"] = called_blast
        report["called_blast_fraction"] = called_blast / max(1, len(records))
        report["wbc_type"] = {"accuracy": None, "macro_f1": None, "n": 0}
        if wbc_truth:  # images where a cell was found
            wbc = classification_report(wbc_truth, wbc_predicted, classes=detector.classifier_spec["heads"]["wbc_type"]["classes"])
            report["wbc_type"] = {"accuracy": wbc["accuracy"], "macro_f1": wbc["macro"]["f1"], "n": wbc["n"]}
    else:
        report["blast"] = binary_summary(truth, probability, threshold)
    return report


def evaluate_taleqani(detector: Detector, data_root: Path, limit: int | None) -> dict[str, Any]:
    """Taleqani fields: malignant vs benign per image from the frame verdict (flagged), and B-ALL subtype
    per image from the mean subtype probabilities of the detected cells."""
    records = data.load_records(data_root, "all-taleqani", "test")[:limit]
    subtype_classes = detector.classifier_spec["heads"]["subtype"]["classes"]
    malignant, flagged, fraction, subtype_truth, subtype_predicted, no_cells = [], [], [], [], [], 0
    for record in tqdm(records, desc="fields all-taleqani", leave=False):
        result = detector.run(data.read_image(record))
        malignant.append(record.blast)
        flagged.append(result.verdict["flagged"])
        fraction.append(result.verdict["blast_fraction"])
        no_cells += not result.cells
        subtype_truth.append(record.subtype)
        if result.cells:
            mean = np.mean([[c.head_scores["subtype"][s] for s in subtype_classes] for c in result.cells], axis=0)
            subtype_predicted.append(subtype_classes[int(np.argmax(mean))])
        else:
            subtype_predicted.append("none")
    verdict = binary_summary(malignant, [float(f) for f in flagged], 0.5)
    verdict["auc_from_blast_fraction"] = binary_summary(malignant, fraction, 0.5)["auc"]
    # A field where no cell was found gets no subtype: it counts as wrong, in its own "none" column.
    subtype = classification_report(subtype_truth, subtype_predicted, classes=subtype_classes + ["none"] * ("none" in subtype_predicted))
    return {
        "images": len(records),
        "no_cell_found": no_cells,
        "malignant_vs_benign": verdict,
        "subtype": {"accuracy": subtype["accuracy"], "macro_f1": subtype["macro"]["f1"], "n": subtype["n"], "confusion": subtype["confusion_matrix"]},
    }


def evaluate_bundle(bundle: Path, data_root: Path, out_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """Every held-out figure of the bundle; writes evaluation.json and evaluation.md into out_dir."""
    detector = Detector.load(bundle)
    report = {
        "date": dt.date.today().isoformat(),
        "bundle": str(bundle),
        "model_version": detector.bundle.model_version,
        "split": "test split of training/splits/*.csv (seed 0), never seen in training or model selection",
        "segmentation": evaluate_segmentation(detector, data_root, limit),
        "all_idb2": evaluate_single_cells(detector, data_root, "all-idb2", limit),
        "pbc": evaluate_single_cells(detector, data_root, "pbc", limit),
        "all_taleqani": evaluate_taleqani(detector, data_root, limit),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "evaluation.md").write_text(markdown_report(report))
    return report


def _cell(summary: dict) -> str:
    return "-" if summary["mean"] is None else f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_report(report: dict[str, Any]) -> str:
    lines = [
        f"# leukoedge held-out evaluation ({report['date']})",
        "",
        f"Bundle `{report['bundle']}` (model {report['model_version']}); {report['split']}.",
        "Measured end to end through `Detector.run` (ONNX Runtime, CPU).",
        "",
        "## Segmentation (mean ± std over test images)",
        "",
        "| source | method | nucleus Dice | nucleus Jaccard | whole-cell Dice | whole-cell Jaccard | ms/image |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, methods in report["segmentation"].items():
        for method, row in methods.items():
            if method == "images":
                continue
            lines.append(
                f"| {source} (n={methods['images']}) | {method} | {_cell(row['nucleus_dice'])} | {_cell(row['nucleus_jaccard'])} | "
                f"{_cell(row['whole_cell_dice'])} | {_cell(row['whole_cell_jaccard'])} | {row['ms_per_image']:.1f} |"
            )
    idb, taleqani, pbc = report["all_idb2"], report["all_taleqani"], report["pbc"]
    verdict = taleqani["malignant_vs_benign"]
    lines += [
        "",
        "## Blast vs normal",
        "",
        "| data | unit | n | accuracy | sensitivity | specificity | AUC | no cell found |",
        "|---|---|---|---|---|---|---|---|",
        f"| ALL-IDB2 | cell nearest the centre | {idb['blast']['n']} | {_number(idb['blast']['accuracy'])} | {_number(idb['blast']['sensitivity'])} | "
        f"{_number(idb['blast']['specificity'])} | {_number(idb['blast']['auc'])} | {idb['no_cell_found']} |",
        f"| Taleqani | field: frame verdict `flagged` | {verdict['n']} | {_number(verdict['accuracy'])} | {_number(verdict['sensitivity'])} | "
        f"{_number(verdict['specificity'])} | {_number(verdict['auc_from_blast_fraction'])} (blast fraction) | {taleqani['no_cell_found']} |",
        "",
        f"B-ALL subtype per Taleqani field (mean of the cells' subtype probabilities): accuracy {_number(taleqani['subtype']['accuracy'])}, "
        f"macro F1 {_number(taleqani['subtype']['macro_f1'])}, n={taleqani['subtype']['n']}.",
        "",
        f"PBC (healthy donors, all normal): {pbc['called_blast']} of {pbc['images']} cells called blast "
        f"({100 * pbc['called_blast_fraction']:.1f} %); WBC type accuracy {_number(pbc['wbc_type']['accuracy'])} "
        f"(macro F1 {_number(pbc['wbc_type']['macro_f1'])}, n={pbc['wbc_type']['n']}); no cell found in {pbc['no_cell_found']}.",
        "",
        "Caveats: Taleqani and PBC have no patient IDs and ALL-IDB2 comes from few patients, so images of one",
        "patient may sit on both sides of a split. No AML, CLL or FAB L1/L2/L3 data exists here: nothing is claimed for them.",
        "",
    ]
    return "\n".join(lines)
