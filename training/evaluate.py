"""Held-out evaluation of a bundle, end to end through the runtime Detector (what ships is what is measured).

`leukoedge evaluate --data ../shared/data --bundle models/default --out reports/` writes
reports/evaluation.md (tables, linking the plots), reports/evaluation.json (every number) and PNG plots:

- segmentation on the expert masks (Zheng, ALL-IDB2 test splits): the bundle, deep segmenters given
  as training checkpoints, K-means (k=3 and k chosen on the train split), HSV K-means, fuzzy C-means,
  Otsu + watershed; Jaccard, Tanimoto, Dice, SSIM, pixel error, ms/image; Jaccard <= Dice checked;
- the K-means k sweep (k = 2..6) on the train split, per class, and the chosen k;
- cross-source: bundles tested on the sources their segmenter (segmentation) or classifier (ALL-IDB2
  blast vs normal) never saw;
- blast vs normal, B-ALL subtype and WBC type, with ROC curves and confusion matrices.

`--quick` trains tiny models and evaluates a few images: it checks that every table and plot is made.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from leukoedge.bundle import MANIFEST_NAME, Bundle, load_bundle
from leukoedge.detector import Detector
from leukoedge.errors import LeukoedgeError
from leukoedge.postprocess import central_box, find_cells
from leukoedge.preprocess.cpu import Box, PreprocessSpec
from leukoedge.result import BACKGROUND, NUCLEUS, Result

from . import data, plots
from .classical import SWEEP_METRICS, choose_k, fuzzy_cmeans_segment, hsv_kmeans_segment, kmeans_segment, otsu_watershed_segment
from .detection import NORMAL_SOURCES, detection_figures, format_table, normal_records
from .metrics import binary_summary, classification_report, mean_std, paired_difference, roc_curve, segmentation_scores
from .pipeline import (
    CLASSIFICATION_SOURCES,
    SEGMENTATION_SOURCES,
    SEGMENTER_INPUT,
    PipelineConfig,
    load_segmentation_examples,
    run_pipeline,
    segmenter_label_map,
    spread,
)
from .train import TrainConfig, is_checkpoint, load_checkpoint, save_checkpoint, train_segmenter

SEGMENTATION_TEST_SOURCES = ("wbc-seg-zheng", "all-idb2")  # the sources with expert nucleus + cytoplasm masks
REGIONS = ("nucleus", "whole_cell")
# Every source a table reads: segmentation, cross-source (any segmentation source a bundle left out), the single
# cells (ALL-IDB2, PBC, Taleqani, named in evaluate_bundle) and "only white cells are cells".
EVALUATED_SOURCES = tuple(
    source for source in data.SOURCES if source in {*SEGMENTATION_TEST_SOURCES, *SEGMENTATION_SOURCES, "all-idb2", "pbc", "all-taleqani", *NORMAL_SOURCES}
)
TABLE_METRICS = ("jaccard", "tanimoto", "dice", "ssim", "pixel_error")
K_SWEEP = tuple(range(2, 7))
# "val" is for comparing candidates (model selection may look at it); only "test" gives held-out figures.
EVALUATION_SPLITS = ("test", "val")
K_SWEEP_IMAGES = 40  # train images per source for the sweep (spread over the split): the k is stable by then
SWEEP_CLASSES = ("background", "cytoplasm", "nucleus")
EXAMPLE_IMAGES_PER_SOURCE = 2
BOX_MATCH_IOU = 0.5
JACCARD_DICE_HOLDS = "Jaccard <= Dice holds for every method, source, region and image"
# A report is read on other machines: it names files relative to the data folder, the working folder or
# this repository, never by the absolute path of the machine that made it.
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def portable_path(path: str | Path, data_root: Path | None = None) -> str:
    """`path` as a report prints it: "<data>/..." under the data folder given, else relative to the
    working folder or the repository, else ".../<name>" (a scratch folder means nothing elsewhere)."""
    resolved = Path(path).resolve()
    if data_root is not None and resolved.is_relative_to(Path(data_root).resolve()):
        return (Path("<data>") / resolved.relative_to(Path(data_root).resolve())).as_posix()
    for base in (Path.cwd().resolve(), REPOSITORY_ROOT):
        if resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix() or "."
    return f".../{resolved.name}"
QUICK_LIMIT = 6
# The quick bundle's segmenter leaves Taleqani and BCCD out, and its classifier ALL-IDB2, so that it also
# serves as the cross-source bundle.
QUICK_SEGMENTATION_SOURCES = ("wbc-seg-zheng", "all-idb2")
QUICK_CLASSIFICATION_SOURCES = ("all-taleqani", "pbc")

Segmenter = Callable[[np.ndarray], tuple[np.ndarray, float]]  # BGR image -> (frame label map, ms)


def _sample(records: list[data.Record], limit: int | None) -> list[data.Record]:
    return records if limit is None else spread(records, limit)


# ---- segmenters: every method as BGR image -> (label map in frame pixels, milliseconds) ----


def _timed(segment: Callable[[np.ndarray], np.ndarray]) -> Segmenter:
    def run(image: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        label_map = segment(image)
        return label_map, (time.perf_counter() - started) * 1000.0

    return run


def bundle_segmenter(detector: Detector) -> Segmenter:
    """The bundle through Detector.run; its time is preprocess + segment + postprocess + refine
    (classifying the found cells is not segmentation)."""

    def run(image: np.ndarray) -> tuple[np.ndarray, float]:
        result = detector.run(image)
        return result.label_map, sum(result.timings[stage] for stage in ("preprocess", "segment", "postprocess", "refine"))

    return run


def bundle_method(detector: Detector) -> str:
    models = detector.segmenter_spec.get("architecture", "segmenter")
    if detector.refiner_spec is not None:
        models += " + refiner"
    return f"leukoedge ({models})"


def checkpoint_segmenter(checkpoint: Path, evaluated: Bundle) -> tuple[Segmenter, str]:
    """A segmenter training checkpoint run in PyTorch through the runtime's preprocessing, letterbox and postprocess.

    Its preprocessing (stain reference, mean/std) is that of the bundle the pipeline wrote with it
    (<dir>/<name> for <dir>/checkpoints/<name>-segmenter.pt), else the evaluated bundle's. Returns the
    segmenter and where its preprocessing came from.
    """
    model, saved = load_checkpoint(checkpoint)
    input_size = tuple(saved["config"]["input_size"])
    own_bundle = checkpoint.parent.parent / checkpoint.stem.removesuffix("-segmenter")
    if (own_bundle / MANIFEST_NAME).is_file():
        preprocess, origin = load_bundle(own_bundle, verify=False).manifest["preprocess"], f"bundle {portable_path(own_bundle)}"
    else:
        preprocess, origin = evaluated.manifest["preprocess"], f"the evaluated bundle (no bundle at {portable_path(own_bundle)})"
    spec = PreprocessSpec.from_manifest(preprocess)
    postprocess = evaluated.manifest["postprocess"]

    def segment(image: np.ndarray) -> np.ndarray:
        # the runtime's postprocess too (cells kept by the evaluated bundle's rules), as for the bundle itself
        _, label_map = find_cells(
            *segmenter_label_map(model, image, spec, input_size),
            postprocess["min_cell_area_px"],
            postprocess["split_touching"],
            postprocess.get("min_nucleus_area_px", 0),
        )
        return label_map

    return _timed(segment), origin


def classical_segmenters(swept_k: int) -> dict[str, Segmenter]:
    return {
        "kmeans_k3": _timed(lambda image: kmeans_segment(image, k=3)),
        "kmeans_swept": _timed(lambda image: kmeans_segment(image, k=swept_k)),
        "hsv_kmeans": _timed(hsv_kmeans_segment),
        "fuzzy_cmeans": _timed(fuzzy_cmeans_segment),
        "otsu_watershed": _timed(otsu_watershed_segment),
    }


def parse_segmenter_checkpoints(values: Sequence[str]) -> dict[str, Path]:
    """`LABEL=PATH` arguments (e.g. "CNN (base)=models/checkpoints/unet-lite-segmenter.pt") -> {label: path}."""
    checkpoints: dict[str, Path] = {}
    for value in values:
        label, separator, path = value.partition("=")
        label, path = label.strip(), Path(path.strip())
        if not separator or not label or not path.name:
            raise LeukoedgeError(f"--segmenter-checkpoint takes LABEL=PATH, e.g. 'CNN (base)=models/checkpoints/unet-lite-segmenter.pt'; got {value!r}")
        if label in checkpoints or label in classical_segmenters(swept_k=3):  # (its names only)
            raise LeukoedgeError(f"--segmenter-checkpoint label {label!r} is used twice or names a built-in method")
        if not is_checkpoint(path):
            raise LeukoedgeError(f"segmenter checkpoint {path} (and the {path.with_suffix('.json').name} beside it) not found")
        checkpoints[label] = path
    return checkpoints


# ---- scoring label maps against the truth ----

PerImage = dict[str, dict[str, list[dict[str, float] | None]]]  # method -> region -> one score dict per image


@dataclass
class ScoredImages:
    """Per-image scores, times and a few label maps of some segmenters on some images."""

    per_image: PerImage
    milliseconds: dict[str, list[float]]
    examples: list[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]] = field(default_factory=list)


def score_images(
    records: list[data.Record], segmenters: dict[str, Segmenter], description: str, keep_examples: int = 0, regions: Sequence[str] = REGIONS
) -> ScoredImages:
    """Every segmenter on every record, each region scored by segmentation_scores."""
    scored = ScoredImages({m: {r: [] for r in regions} for m in segmenters}, {m: [] for m in segmenters})
    for index, record in enumerate(tqdm(records, desc=description, leave=False)):
        image, truth = data.read_image(record), data.read_label_map(record)
        predicted = {}
        for method, segment in segmenters.items():
            predicted[method], milliseconds = segment(image)
            scored.milliseconds[method].append(milliseconds)
            scores = segmentation_scores(predicted[method], truth)
            for region in regions:
                scored.per_image[method][region].append(scores[region])
        if index < keep_examples:
            scored.examples.append((f"{record.source} {record.image_path.stem}", image, truth, predicted))
    return scored


def summarise(scored: ScoredImages, metrics: Sequence[str] = TABLE_METRICS) -> dict[str, dict[str, Any]]:
    """Per method: mean ± std over images of each region's metrics, and the median ms per image."""
    table = {}
    for method, regions in scored.per_image.items():
        row: dict[str, Any] = {
            f"{region}_{metric}": mean_std(None if scores is None else scores[metric] for scores in per_region)
            for region, per_region in regions.items()
            for metric in metrics
        }
        row["ms_per_image"] = float(np.median(scored.milliseconds[method]))
        table[method] = row
    return table


def jaccard_dice_violations(per_image_by_source: dict[str, PerImage]) -> list[str]:
    """Every image where Jaccard exceeds Dice (impossible on the same masks: J = D / (2 - D)), as text."""
    violations = []
    for source, methods in per_image_by_source.items():
        for method, regions in methods.items():
            for region, images in regions.items():
                for index, scores in enumerate(images):
                    if scores is not None and scores["jaccard"] > scores["dice"] + 1e-12:
                        where = f"{source} / {method} / {region} / image {index}"
                        violations.append(f"{where}: Jaccard {scores['jaccard']:.6f} > Dice {scores['dice']:.6f}")
    return violations


# ---- the comparison on the expert masks ----


def versus_baseline(per_image: PerImage, methods: Sequence[str], baseline: str) -> dict[str, dict[str, Any]]:
    """Per method and region, the paired Dice difference method - baseline over the same images (with
    its bootstrap interval): whether a method beats the baseline, not only whether its mean is higher."""
    return {
        method: {
            region: paired_difference(
                *zip(*((m["dice"], b["dice"]) for m, b in zip(per_image[method][region], per_image[baseline][region]) if m is not None and b is not None))
            )
            for region in REGIONS
        }
        for method in methods
    }


@dataclass
class SegmentationComparison:
    table: dict[str, Any]  # the JSON section
    per_image: dict[str, PerImage]  # source -> method -> region -> per-image scores
    examples: list = field(default_factory=list)


def compare_segmentation(
    data_root: Path, deep: dict[str, Segmenter], swept_k: dict[str, int], limit: int | None, split: str = "test"
) -> SegmentationComparison:
    """Deep segmenters and every classical method on the split of each source with expert masks."""
    comparison = SegmentationComparison({}, {})
    for source in SEGMENTATION_TEST_SOURCES:
        records = _sample(data.load_records(data_root, source, split), limit)
        scored = score_images(records, {**deep, **classical_segmenters(swept_k[source])}, f"segmentation {source}", EXAMPLE_IMAGES_PER_SOURCE)
        comparison.table[source] = {
            "images": len(records),
            "kmeans_swept_k": swept_k[source],
            "methods": summarise(scored),
            "versus_kmeans_k3": versus_baseline(scored.per_image, list(deep), "kmeans_k3"),
        }
        comparison.per_image[source] = scored.per_image
        comparison.examples += scored.examples
    return comparison


# ---- the K-means k sweep ----


def background_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float] | None:
    """SSIM, Dice and IoU of the background class, by the same rule as every region: scored as the
    nucleus of label maps where background is relabelled the only foreground class (ignored stays ignored)."""

    def background_as_nucleus(label_map: np.ndarray) -> np.ndarray:
        return np.where(label_map == BACKGROUND, NUCLEUS, BACKGROUND).astype(np.uint8)

    relabelled_truth = np.where(truth == data.LABEL_IGNORE, data.LABEL_IGNORE, background_as_nucleus(truth)).astype(np.uint8)
    return segmentation_scores(background_as_nucleus(predicted), relabelled_truth)["nucleus"]


def kmeans_k_sweep(data_root: Path, source: str, images: int) -> dict[str, Any]:
    """K-means at k = 2..6 on a sample of the source's TRAIN split: the mean SSIM, Dice and IoU per class,
    and the k classical.choose_k picks (best mean of nucleus, cytoplasm and whole-cell SSIM/Dice/IoU).
    The test split plays no part, so the chosen k is then tested honestly."""
    records = spread(data.load_records(data_root, source, "train"), images)
    pairs = [(data.read_image(r), data.read_label_map(r)) for r in tqdm(records, desc=f"k sweep {source}", leave=False)]
    chosen_k, table = choose_k([image for image, _ in pairs], [truth for _, truth in pairs], K_SWEEP)
    by_k = {}
    for k in K_SWEEP:
        background = [background_scores(kmeans_segment(image, k), truth) for image, truth in pairs]
        by_k[k] = dict(table[k])
        for metric in SWEEP_METRICS:
            by_k[k][f"background_{metric}"] = mean_std(None if s is None else s[metric] for s in background)["mean"]
    return {"images": len(records), "split": "train", "chosen_k": chosen_k, "by_k": by_k}


# ---- cross-source ----


def trained_segmentation_sources(bundle: Bundle) -> list[str]:
    """The sources the bundle's segmenter learnt from (bundles made before the field learnt from all four)."""
    return list(bundle.manifest.get("training", {}).get("segmentation_sources", SEGMENTATION_SOURCES))


def trained_classification_sources(bundle: Bundle) -> list[str]:
    """The sources the bundle's classifier learnt from (bundles made before the choice learnt from all three)."""
    return list(bundle.manifest.get("training", {}).get("classification_sources", CLASSIFICATION_SOURCES))


def box_iou(a: Box, b: Box) -> float:
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    overlap = width * height
    return overlap / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap)


def matched_boxes(detected: Sequence[Box], truth: Sequence[Box], min_iou: float = BOX_MATCH_IOU) -> int:
    """Detected-truth pairs with IoU >= min_iou, one-to-one, matched greedily from the highest IoU."""
    pairs = sorted(((box_iou(d, t), i, j) for i, d in enumerate(detected) for j, t in enumerate(truth)), reverse=True)
    used_detected, used_truth = set(), set()
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i not in used_detected and j not in used_truth:
            used_detected.add(i)
            used_truth.add(j)
    return len(used_truth)


def box_detection(detector: Detector, records: list[data.Record], description: str) -> dict[str, Any]:
    """Box recall and precision at IoU >= 0.5 of the detected cells against the annotated WBC boxes.
    Fields without a WBC box in their annotation are skipped (every BCCD field shows a WBC)."""
    truth_boxes = detected_boxes = matched = skipped = 0
    for record in tqdm(records, desc=description, leave=False):
        truth = data.wbc_boxes(record)
        if not truth:
            skipped += 1
            continue
        detected = [cell.box for cell in data.run_record(detector, record).cells]
        truth_boxes, detected_boxes = truth_boxes + len(truth), detected_boxes + len(detected)
        matched += matched_boxes(detected, truth)
    return {
        "box_recall": None if truth_boxes == 0 else matched / truth_boxes,
        "box_precision": None if detected_boxes == 0 else matched / detected_boxes,
        "truth_boxes": truth_boxes,
        "detected_boxes": detected_boxes,
        "matched": matched,
        "fields_without_a_wbc_box": skipped,
    }


def evaluate_cross_source(
    cross: Detector, reference: Detector, data_root: Path, limit: int | None, split: str = "test"
) -> tuple[dict[str, Any], dict[str, PerImage]]:
    """The cross-source bundle on the split of every segmentation source its segmenter did not
    learn from, next to the reference bundle on the same images. Masks (Zheng, ALL-IDB2 expert;
    Taleqani weak: label 3 and 1/2 count as cell, 255 ignored): Dice/Jaccard; BCCD: WBC boxes.
    Where its classifier did not learn from ALL-IDB2 (the one classification source that can be left
    out), blast vs normal on ALL-IDB2 too, as the same-source table measures it."""
    trained = trained_segmentation_sources(cross.bundle)
    classifier_trained = trained_classification_sources(cross.bundle)
    section: dict[str, Any] = {
        "bundle": portable_path(cross.bundle.root, data_root),
        "architecture": cross.segmenter_spec.get("architecture"),
        "trained_on": trained,
        "reference_bundle": portable_path(reference.bundle.root, data_root),
        "reference_trained_on": trained_segmentation_sources(reference.bundle),
        "split": split,
        "sources": {},
        "classifier_trained_on": classifier_trained,
        "reference_classifier_trained_on": trained_classification_sources(reference.bundle),
        "classification": {},
    }
    per_image: dict[str, PerImage] = {}
    for source in (s for s in SEGMENTATION_SOURCES if s not in trained):
        records = _sample(data.load_records(data_root, source, split), limit)
        drawn = len(records)
        if source != "bccd":  # Taleqani fields where the authors' segmentation failed have no mask to score against
            records = [record for record in records if data.read_label_map(record) is not None]
        detectors = {"cross_source": cross, "reference": reference}
        if source == "bccd":
            rows = {role: box_detection(detector, records, f"cross-source {source} {role}") for role, detector in detectors.items()}
        else:
            # Nucleus only against expert nucleus masks: a weak Taleqani mask marks cells, and a field whose
            # weak mask kept no cell would otherwise score "no nucleus anywhere" as nucleus segmentation.
            regions = REGIONS if source in SEGMENTATION_TEST_SOURCES else ("whole_cell",)
            segmenters = {role: bundle_segmenter(detector) for role, detector in detectors.items()}
            scored = score_images(records, segmenters, f"cross-source {source}", regions=regions)
            rows = summarise(scored, ("dice", "jaccard"))
            per_image[f"{source} (cross-source)"] = scored.per_image
        section["sources"][source] = {"images": len(records), "images_without_a_usable_mask": drawn - len(records), "rows": rows}
    if "all-idb2" not in classifier_trained:
        section["classification"]["all-idb2"] = {
            role: evaluate_single_cells(detector, data_root, "all-idb2", limit, split)
            for role, detector in (("cross_source", cross), ("reference", reference))
        }
    return section, per_image


# ---- classification (blast, subtype, WBC type) ----


def _central_cell(result: Result):
    """The detected cell nearest the frame centre: single-cell images are centred on their cell."""
    box = central_box([cell.box for cell in result.cells], result.frame_shape)
    return next((cell for cell in result.cells if cell.box == box), None)


def _roc(truth: Sequence[int], score: Sequence[float], auc: float | None) -> dict[str, Any] | None:
    curve = roc_curve(np.asarray(truth) == 1, np.asarray(score))
    return None if curve is None else {**curve, "auc": auc}


def _class_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a classification_report the evaluation keeps: accuracy, macro F1, confusion matrix."""
    return {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro"]["f1"],
        "n": report["n"],
        "classes": report["classes"],
        "confusion": report["confusion_matrix"],
    }


# PBC classes that are not white cells: their images are scored by whether a white cell is reported at all.
NOT_WHITE_CELL_TYPES = ("platelet", "erythroblast")


def evaluate_single_cells(detector: Detector, data_root: Path, source: str, limit: int | None, split: str = "test") -> dict[str, Any]:
    """Blast vs normal on single-cell images (ALL-IDB2, PBC): the detected cell nearest the centre.
    An image with no detected cell counts as called normal and is reported as a miss."""
    records = _sample(data.load_records(data_root, source, split), limit)
    truth, probability, missed = [], [], 0
    wbc_truth, wbc_predicted = [], []
    non_white, non_white_counted = 0, 0
    for record in tqdm(records, desc=f"cells {source}", leave=False):
        cell = _central_cell(data.run_record(detector, record))
        if record.wbc_type in NOT_WHITE_CELL_TYPES:  # a platelet or an erythroblast: right when no white cell is reported
            non_white += 1
            non_white_counted += cell is not None
            continue
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
        report["called_blast_fraction"] = called_blast / max(1, len(truth))
        report["non_white_cells"] = {"images": non_white, "counted_as_white_cells": non_white_counted}
        report["wbc_type"] = {"accuracy": None, "macro_f1": None, "n": 0}
        if wbc_truth:  # images where a cell was found
            # A bundle without a gate may still name a white cell "platelet" or "erythroblast": a wrong answer, in its own column.
            classes = [name for name in detector.classifier_spec["heads"]["wbc_type"]["classes"] if name not in NOT_WHITE_CELL_TYPES or name in wbc_predicted]
            report["wbc_type"] = _class_summary(classification_report(wbc_truth, wbc_predicted, classes=classes))
    else:
        report["blast"] = binary_summary(truth, probability, threshold)
        report["blast"]["roc"] = _roc(truth, probability, report["blast"]["auc"])
    return report


def evaluate_taleqani(detector: Detector, data_root: Path, limit: int | None, split: str = "test") -> dict[str, Any]:
    """Taleqani fields: malignant vs benign per image from the frame verdict (flagged), and B-ALL subtype
    per image from the frame verdict's subtype (the mean subtype probabilities of the detected cells)."""
    records = _sample(data.load_records(data_root, "all-taleqani", split), limit)
    subtype_classes = detector.classifier_spec["heads"]["subtype"]["classes"]
    malignant, flagged, fraction, subtype_truth, subtype_predicted, no_cells, not_judged = [], [], [], [], [], 0, 0
    for record in tqdm(records, desc="fields all-taleqani", leave=False):
        result = data.run_record(detector, record)
        malignant.append(record.blast)
        flagged.append(result.verdict.flagged)
        fraction.append(result.verdict.blast_fraction)
        no_cells += not result.cells
        not_judged += result.verdict.status not in ("ok", "no_cells")  # refused: counted as not flagged, no subtype
        subtype_truth.append(record.subtype)
        subtype_predicted.append(result.verdict.subtype or "none")  # the runtime's frame subtype
    verdict = binary_summary(malignant, [float(f) for f in flagged], 0.5)
    verdict["auc_from_blast_fraction"] = binary_summary(malignant, fraction, 0.5)["auc"]
    verdict["roc_from_blast_fraction"] = _roc(malignant, fraction, verdict["auc_from_blast_fraction"])
    # A field where no cell was found gets no subtype: it counts as wrong, in its own "none" column.
    subtype = classification_report(subtype_truth, subtype_predicted, classes=subtype_classes + ["none"] * ("none" in subtype_predicted))
    return {
        "images": len(records),
        "no_cell_found": no_cells,
        "not_judged": not_judged,
        "malignant_vs_benign": verdict,
        "subtype": _class_summary(subtype),
    }


# ---- the report ----


def write_plots(report: dict[str, Any], examples: list, out_dir: Path) -> dict[str, str]:
    """Every PNG of the report into out_dir; returns plot name -> file name (absent: nothing to draw)."""
    made = {
        "dice_by_method": plots.dice_bars(report["segmentation"], out_dir / "dice_by_method.png"),
        "segmentation_examples": plots.example_grid(examples, out_dir / "segmentation_examples.png"),
        "kmeans_k_sweep": plots.k_sweep_curves(report["kmeans_k_sweep"], SWEEP_CLASSES, out_dir / "kmeans_k_sweep.png"),
    }
    taleqani_verdict = report["all_taleqani"]["malignant_vs_benign"]
    curves = {
        "roc_all_idb2_blast": ("ALL-IDB2: blast probability of the central cell", report["all_idb2"]["blast"]["roc"]),
        "roc_taleqani_blast_fraction": ("Taleqani: malignant field by blast fraction", taleqani_verdict["roc_from_blast_fraction"]),
    }
    for name, (title, curve) in curves.items():
        if curve is not None:  # a sample with one class only has no ROC
            made[name] = plots.roc_curves({f"bundle {report['model_version']}": curve}, title, out_dir / f"{name}.png")
    matrices = {
        "confusion_taleqani_subtype": ("Taleqani B-ALL subtype per field", report["all_taleqani"]["subtype"]),
        "confusion_pbc_wbc_type": ("PBC WBC type (central cell)", report["pbc"]["wbc_type"]),
    }
    for name, (title, summary) in matrices.items():
        if summary["n"]:  # PBC: none when no cell was found in any image
            made[name] = plots.confusion(summary["confusion"], summary["classes"], title, out_dir / f"{name}.png")
    return {name: path.name for name, path in made.items()}


def require_sources(data_root: Path) -> None:
    """LeukoedgeError naming every source folder the evaluation reads that data_root lacks: the last table reads
    TXL-PBC, so without this a missing folder surfaced only after a minute or more of work."""
    missing = [source for source in EVALUATED_SOURCES if not (Path(data_root) / source).is_dir()]
    if missing:
        raise LeukoedgeError(
            f"--data {data_root} lacks the source folder(s) {', '.join(missing)}: evaluate reads {', '.join(EVALUATED_SOURCES)} "
            "(expected the folder holding the data sources: ../shared/data, see its README.md)"
        )


def evaluate_bundle(
    bundle: Path,
    data_root: Path,
    out_dir: Path,
    limit: int | None = None,
    segmenter_checkpoints: dict[str, Path] | None = None,
    cross_source_bundles: Sequence[Path] = (),
    quick: bool = False,
    split: str = "test",
) -> dict[str, Any]:
    """Every held-out figure of the bundle; writes evaluation.json, evaluation.md and the PNGs into out_dir.

    limit: at most this many test images per source (spread over the split); it also caps the k sweep.
    segmenter_checkpoints: label -> segmenter checkpoint compared with the bundle (e.g. "CNN (base)").
    cross_source_bundles: bundles whose segmenter or classifier left some sources out (manifest
    training.segmentation_sources, training.classification_sources), each tested on those.
    split: "test" (held-out figures) or "val" (to compare candidate models without looking at the test split).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 image per source; got {limit}")
    if split not in EVALUATION_SPLITS:
        raise ValueError(f"split must be one of {', '.join(EVALUATION_SPLITS)}; got {split!r}")
    require_sources(data_root)
    detector = Detector.load(bundle)
    sweeps = {source: kmeans_k_sweep(data_root, source, min(limit or K_SWEEP_IMAGES, K_SWEEP_IMAGES)) for source in SEGMENTATION_TEST_SOURCES}
    deep = {bundle_method(detector): bundle_segmenter(detector)}
    preprocess_of = {}
    for label, checkpoint in (segmenter_checkpoints or {}).items():
        deep[label], preprocess_of[label] = checkpoint_segmenter(Path(checkpoint), detector.bundle)
    comparison = compare_segmentation(data_root, deep, {source: sweep["chosen_k"] for source, sweep in sweeps.items()}, limit, split)
    cross_source, cross_per_image = [], {}
    for cross_source_bundle in cross_source_bundles:
        section, per_image = evaluate_cross_source(Detector.load(cross_source_bundle), detector, data_root, limit, split)
        cross_source.append(section)
        cross_per_image.update({f"{key}, {portable_path(cross_source_bundle, data_root)}": scores for key, scores in per_image.items()})
    violations = jaccard_dice_violations({**comparison.per_image, **cross_per_image})
    report = {
        "date": dt.date.today().isoformat(),
        "quick": quick,
        "bundle": portable_path(bundle, data_root),
        "model_version": detector.bundle.model_version,
        "precisions": dict(detector.precisions),
        "evaluated_split": split,
        "split": (
            "test split of training/splits/*.csv (seed 0), never seen in training or model selection"
            if split == "test"
            else "VALIDATION split of training/splits/*.csv (seed 0): model selection saw it, so these are not held-out figures"
        ),
        "segmentation": comparison.table,
        "segmenter_checkpoints": {
            label: {"checkpoint": portable_path(path, data_root), "preprocess_from": preprocess_of[label]} for label, path in (segmenter_checkpoints or {}).items()
        },
        "jaccard_le_dice": {"holds": not violations, "violations": violations},
        "kmeans_k_sweep": sweeps,
        "cross_source": cross_source,
        "all_idb2": evaluate_single_cells(detector, data_root, "all-idb2", limit, split),
        "pbc": evaluate_single_cells(detector, data_root, "pbc", limit, split),
        "all_taleqani": evaluate_taleqani(detector, data_root, limit, split),
        "white_cells_only": detection_figures(detector, normal_records(data_root, split, limit=limit), "normal fields"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, comparison.examples, out_dir)
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "evaluation.md").write_text(markdown_report(report))
    return report


def tiny_unet_checkpoint(data_root: Path, bundle: Path, scratch: Path) -> Path:
    """A U-Net (unet_lite) trained a few steps on the quick-mode images with the bundle's preprocessing:
    the quick run's stand-in for "CNN (base)" (it checks the path, it says nothing about U-Nets)."""
    config = PipelineConfig(data_root, scratch / "unet", quick=True)
    spec = PreprocessSpec.from_manifest(load_bundle(bundle, verify=False).manifest["preprocess"])
    model, summary = train_segmenter(
        load_segmentation_examples(config, "train"),
        load_segmentation_examples(config, "val", per_source=2),
        spec,
        TrainConfig(model="unet_lite", input_size=SEGMENTER_INPUT, steps=8, batch_size=4, crop=128, validate_every=4),
    )
    checkpoint = scratch / "checkpoints" / "unet-segmenter.pt"
    save_checkpoint(model, summary, checkpoint)
    return checkpoint


def run_quick(
    data_root: Path,
    out_dir: Path,
    bundle: Path | None = None,
    segmenter_checkpoints: dict[str, Path] | None = None,
    cross_source_bundles: Sequence[Path] = (),
    limit: int | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Every table and plot from tiny models on a few images (CI): checks the report, not the models.

    Without a bundle, one is trained by the pipeline's quick mode, its segmenter on Zheng and ALL-IDB2
    only and its classifier without ALL-IDB2, and serves as the cross-source bundle too; without
    checkpoints a tiny U-Net stands in for "CNN (base)".
    """
    require_sources(data_root)
    with tempfile.TemporaryDirectory(prefix="leukoedge-quick-") as scratch_name:
        scratch = Path(scratch_name)
        if bundle is None:
            config = PipelineConfig(
                data_root,
                scratch / "quick",
                quick=True,
                segmentation_sources=QUICK_SEGMENTATION_SOURCES,
                classification_sources=QUICK_CLASSIFICATION_SOURCES,
            )
            bundle = run_pipeline(config).root
        if not segmenter_checkpoints:
            segmenter_checkpoints = {"CNN (base)": tiny_unet_checkpoint(data_root, bundle, scratch)}
        return evaluate_bundle(bundle, data_root, out_dir, limit or QUICK_LIMIT, segmenter_checkpoints, cross_source_bundles or [bundle], quick=True, split=split)


# ---- markdown ----


def _cell(summary: dict, digits: int = 3) -> str:
    return "-" if summary["mean"] is None else f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _image(report: dict[str, Any], name: str, caption: str) -> list[str]:
    file_name = report["plots"].get(name)
    return [f"![{caption}]({file_name})", ""] if file_name else [f"({caption}: nothing to plot, e.g. one class only among the images)", ""]


def _method_label(method: str, source_table: dict[str, Any]) -> str:
    return f"kmeans_swept (k={source_table['kmeans_swept_k']})" if method == "kmeans_swept" else method


def _segmentation_md(report: dict[str, Any]) -> list[str]:
    lines = [
        f"## Segmentation on expert masks ({report['evaluated_split']} split, mean ± std over images)",
        "",
        "Methods: the bundle (ONNX Runtime through `Detector.run`; ms = preprocess + segment + postprocess), deep",
        "segmenters from training checkpoints (PyTorch, through the same preprocessing and letterbox), and the classical",
        "baselines of training/classical.py. `kmeans_swept` uses the k that the sweep below chose on the TRAIN split,",
        "without the test images. Tanimoto is computed by its own formula; on binary masks it equals Jaccard.",
        "",
    ]
    for label, checkpoint in report["segmenter_checkpoints"].items():
        lines.append(f"- {label}: checkpoint `{checkpoint['checkpoint']}`, preprocessing from {checkpoint['preprocess_from']}")
    lines.append("")
    for region, title in plots.REGION_TITLES.items():
        lines += [
            f"### {title.capitalize()}",
            "",
            "| source | method | Jaccard | Tanimoto | Dice | SSIM | pixel error % | ms/image (median) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for source, table in report["segmentation"].items():
            for method, row in table["methods"].items():
                scores = " | ".join(_cell(row[f"{region}_{metric}"], 2 if metric == "pixel_error" else 3) for metric in TABLE_METRICS)
                lines.append(f"| {source} (n={table['images']}) | {_method_label(method, table)} | {scores} | {row['ms_per_image']:.1f} |")
        lines.append("")
    lines += [
        "### Paired against K-means (k=3): Dice difference on the same images",
        "",
        "Mean of (method - kmeans_k3) per image with its 95 % bootstrap interval; ahead/behind count the images.",
        "",
        "| source | method | region | mean difference | 95 % interval | ahead / behind |",
        "|---|---|---|---|---|---|",
    ]
    for source, table in report["segmentation"].items():
        for method, regions in table.get("versus_kmeans_k3", {}).items():
            for region, gap in regions.items():
                lines.append(
                    f"| {source} | {method} | {region.replace('_', ' ')} | {gap['mean']:+.3f} | "
                    f"[{gap['ci95_low']:+.3f}, {gap['ci95_high']:+.3f}] | {gap['ahead']} / {gap['behind']} |"
                )
    lines.append("")
    check = report["jaccard_le_dice"]
    if check["holds"]:
        lines.append(JACCARD_DICE_HOLDS + " (segmentation and cross-source tables).")
    else:
        lines += ["Jaccard > Dice, impossible on the same masks, at:"] + [f"- {violation}" for violation in check["violations"]]
    lines.append("")
    lines += _image(report, "dice_by_method", "Dice by method and source")
    lines += _image(report, "segmentation_examples", "Example test images: image, truth and each method's label map")
    return lines


def _k_sweep_md(report: dict[str, Any]) -> list[str]:
    lines = [
        "## K-means k sweep (train split)",
        "",
        "K-means (L*a*b*, clusters mapped to classes by the shared rule of training/classical.py) at k = 2..6, scored per",
        "class against the expert masks; mean over the sampled train images. The chosen k has the best selection score:",
        "the mean of SSIM, Dice and IoU over nucleus, cytoplasm and whole cell (background, its complement, is shown, not scored).",
        "",
    ]
    for source, sweep in report["kmeans_k_sweep"].items():
        ks = list(sweep["by_k"])
        lines += [
            f"### {source}: chosen k = {sweep['chosen_k']} ({sweep['images']} train images)",
            "",
            "| class | metric | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        for name in SWEEP_CLASSES:
            for metric, title in plots.METRIC_TITLES.items():
                lines.append(f"| {name} | {title} | " + " | ".join(_number(sweep["by_k"][k][f"{name}_{metric}"]) for k in ks) + " |")
        lines += ["| selection score | mean | " + " | ".join(_number(sweep["by_k"][k]["mean"]) for k in ks) + " |", ""]
    lines += _image(report, "kmeans_k_sweep", "K-means score against k per class")
    return lines


def _cross_source_md(report: dict[str, Any]) -> list[str]:
    sections = report["cross_source"]
    lines = ["## Cross-source segmentation (test sources the segmenter never saw)", ""]
    segmentation = [cross for cross in sections if cross["sources"]]
    if not segmentation:
        lines += ["Not run: no `--cross-source-bundle` left a segmentation source out (`leukoedge train --segmentation-sources ...`).", ""]
    for cross in segmentation:
        lines += _cross_source_segmentation_md(cross)
    lines += ["## Cross-source blast vs normal (a test source the classifier never saw)", ""]
    classification = [cross for cross in sections if cross["classification"]]
    if not classification:
        lines += [
            "Not run: no `--cross-source-bundle` left ALL-IDB2 out of its classifier (`leukoedge train --classification-sources all-taleqani,pbc`).",
            "",
        ]
    for cross in classification:
        lines += _cross_source_classification_md(cross)
    return lines


def _cross_source_classification_md(cross: dict[str, Any]) -> list[str]:
    rows = cross["classification"]["all-idb2"]
    trained = "all-idb2" in cross["reference_classifier_trained_on"]
    reference_label = "reference (trained on it)" if trained else "reference (also trained without it)"
    lines = [
        f"Bundle `{cross['bundle']}`, classifier trained on {', '.join(cross['classifier_trained_on'])} only, on the",
        f"{cross['split']} split of ALL-IDB2 (the detected cell nearest the centre, as in the same-source table below); next to it",
        f"the reference `{cross['reference_bundle']}` (classifier trained on {', '.join(cross['reference_classifier_trained_on'])}).",
        "",
        "| ALL-IDB2 | n | accuracy | sensitivity | specificity | AUC | no cell found |",
        "|---|---|---|---|---|---|---|",
    ]
    for role, label in (("cross_source", "trained without it"), ("reference", reference_label)):
        blast = rows[role]["blast"]
        lines.append(
            f"| {label} | {blast['n']} | {_number(blast['accuracy'])} | {_number(blast['sensitivity'])} | "
            f"{_number(blast['specificity'])} | {_number(blast['auc'])} | {rows[role]['no_cell_found']} |"
        )
    return lines + [""]


def _cross_source_segmentation_md(cross: dict[str, Any]) -> list[str]:
    held_out = ", ".join(cross["sources"])
    lines = [
        f"Bundle `{cross['bundle']}` ({cross['architecture']}), segmenter trained on {', '.join(cross['trained_on'])} only, tested on the",
        f"{cross['split']} split of {held_out}. Next to it, on the same images, the reference `{cross['reference_bundle']}`",
        f"(trained on {', '.join(cross['reference_trained_on'])}: a same-source figure where it learnt from that source).",
        "Taleqani masks are weak (the authors' colour threshold; cell = labels 1/2/3, 255 ignored), so only whole-cell",
        "scores exist there, on the fields where that threshold did not fail (n; the others are counted in the JSON);",
        "BCCD has WBC boxes only:",
        f"box recall and precision at IoU >= {BOX_MATCH_IOU} between detected cells and annotated WBC boxes.",
        "These figures are kept apart from the same-source tables above.",
        "",
        "| held-out source | n | bundle | whole-cell Dice | whole-cell Jaccard | nucleus Dice | nucleus Jaccard | box recall | box precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source, entry in cross["sources"].items():
        for role, row in entry["rows"].items():
            if role == "cross_source":
                bundle_label = "trained without it"
            else:
                bundle_label = "reference (trained on it)" if source in cross["reference_trained_on"] else "reference (also trained without it)"
            if source == "bccd":
                masks = "- | - | - | -"
                recall, precision = _number(row["box_recall"]), _number(row["box_precision"])
                boxes = f"{recall} ({row['matched']}/{row['truth_boxes']}) | {precision} ({row['matched']}/{row['detected_boxes']})"
            else:
                keys = ("whole_cell_dice", "whole_cell_jaccard", "nucleus_dice", "nucleus_jaccard")
                masks = " | ".join(_cell(row[key]) if key in row else "-" for key in keys)
                boxes = "- | -"
            lines.append(f"| {source} | {entry['images']} | {bundle_label} | {masks} | {boxes} |")
    return lines + [""]


def _classification_md(report: dict[str, Any]) -> list[str]:
    idb, taleqani, pbc = report["all_idb2"], report["all_taleqani"], report["pbc"]
    verdict = taleqani["malignant_vs_benign"]
    lines = [
        "## Blast vs normal",
        "",
        "| data | unit | n | accuracy | sensitivity | specificity | AUC | no cell found |",
        "|---|---|---|---|---|---|---|---|",
        f"| ALL-IDB2 | cell nearest the centre | {idb['blast']['n']} | {_number(idb['blast']['accuracy'])} | {_number(idb['blast']['sensitivity'])} | "
        f"{_number(idb['blast']['specificity'])} | {_number(idb['blast']['auc'])} | {idb['no_cell_found']} |",
        f"| Taleqani | field: frame verdict `flagged` | {verdict['n']} | {_number(verdict['accuracy'])} | {_number(verdict['sensitivity'])} | "
        f"{_number(verdict['specificity'])} | {_number(verdict['auc_from_blast_fraction'])} (blast fraction) | {taleqani['no_cell_found']} |",
        "",
        f"Taleqani fields not judged (outside the validated domain, too small or unreadable): {taleqani.get('not_judged', 0)}; "
        "each counts as not flagged and without a subtype.",
        "",
    ]
    lines += _image(report, "roc_all_idb2_blast", "ROC, ALL-IDB2 blast probability")
    lines += _image(report, "roc_taleqani_blast_fraction", "ROC, Taleqani blast fraction per field")
    lines += [
        f"B-ALL subtype per Taleqani field (mean of the cells' subtype probabilities): accuracy {_number(taleqani['subtype']['accuracy'])}, "
        f"macro F1 {_number(taleqani['subtype']['macro_f1'])}, n={taleqani['subtype']['n']}.",
        "",
    ]
    lines += _image(report, "confusion_taleqani_subtype", "Confusion matrix, Taleqani subtype")
    lines += [
        f"PBC (healthy donors, all normal): {pbc['called_blast']} of {pbc['images'] - pbc['non_white_cells']['images']} white cells called blast "
        f"({100 * pbc['called_blast_fraction']:.1f} %); WBC type accuracy {_number(pbc['wbc_type']['accuracy'])} over the six white-cell types "
        f"(macro F1 {_number(pbc['wbc_type']['macro_f1'])}, n={pbc['wbc_type']['n']}); no cell found in {pbc['no_cell_found']}. "
        f"Platelet and erythroblast images (not white cells): {pbc['non_white_cells']['counted_as_white_cells']} of "
        f"{pbc['non_white_cells']['images']} reported a white cell.",
        "",
    ]
    lines += _image(report, "confusion_pbc_wbc_type", "Confusion matrix, PBC WBC type")
    return lines


def _white_cells_md(report: dict[str, Any]) -> list[str]:
    rows = report.get("white_cells_only")
    if not rows:
        return []
    return [
        format_table(rows, "Only white cells are cells: normal fields per source/device"),
        "",
        "Every field here is a normal smear (no leukemia): any flag is a false flag. A found cell matches a WBC box at",
        "IoU >= 0.5; an unmatched one over a red-cell box is a red cell called a white cell (TXL-PBC's boxes as corrected",
        "in training/box_corrections.csv). Refused: fields not judged (outside the validated domain, too small).",
        "Leave-one-source-out figures: `leukoedge gate --leave-out`.",
        "",
    ]


def markdown_report(report: dict[str, Any]) -> str:
    lines = [f"# leukoedge held-out evaluation ({report['date']})", ""]
    if report["quick"]:
        lines += [
            "**Quick mode**: tiny models trained for a few steps, a few images per source. It checks that every",
            "table and plot is made; its numbers say nothing about the models.",
            "",
        ]
    lines += [
        f"Bundle `{report['bundle']}` (model {report['model_version']}); {report['split']}.",
        "Measured end to end through `Detector.run` (ONNX Runtime, CPU; precision per model: "
        + ", ".join(f"{model} {precision}" for model, precision in report.get("precisions", {}).items())
        + ", the bundle's default).",
        "",
    ]
    lines += _segmentation_md(report) + _k_sweep_md(report) + _cross_source_md(report) + _classification_md(report) + _white_cells_md(report)
    lines += [
        "Caveats: Taleqani and PBC have no patient IDs and ALL-IDB2 comes from few patients, so images of one",
        "patient may sit on both sides of a split. No AML, CLL or FAB L1/L2/L3 data exists here: nothing is claimed for them.",
        "",
    ]
    return "\n".join(lines)
