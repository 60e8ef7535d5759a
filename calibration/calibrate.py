"""`leukoedge calibrate --data DIR --bundle B [--method minmax|entropy|percentile] [--out B2]`.

Calibration set (train split) -> QDQ INT8 segmenter, refiner (where the bundle has one) and
classifier -> accuracy gate against FP32 on held-out data -> latency of both precisions on this
machine -> bundle with the models that passed, the calibration file list and a manifest
"precisions" section. A model that fails its gate is not
written; the error names the metric and, where one exists, the op type whose layers, kept in float,
make it pass.

`--target tensorrt` quantizes for TensorRT instead (quantize.QuantizationSettings.for_target) and is
gated the same way, but writes beside the CPU-target files, never over them: <model>.int8-trt.onnx,
calibration_set.int8-trt.csv and a manifest section "tensorrt_int8", which `leukoedge export --engine
--int8` reads. It measures no latency: ONNX Runtime's CPU timing of a TensorRT-target graph says
nothing about the engine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from leukoedge.backends.onnxruntime import OnnxRuntimeBackend
from leukoedge.backends.tensorrt import TENSORRT_INT8
from leukoedge.bundle import MODELS, OPTIONAL_MODELS, Bundle, bundle_models, load_bundle, save_bundle
from leukoedge.errors import BundleError, LeukoedgeError
from leukoedge.postprocess import central_box, find_cells, label_map_from_probabilities
from leukoedge.preprocess.cpu import Box, PreprocessSpec, prepare_frame
from leukoedge.training import data
from leukoedge.training.samples import classification_sample

from . import gate
from .quantize import QuantizationSettings, TensorBatches, prepare_for_quantization, quantizable_nodes, quantize_model
from .select import CELL_SOURCES, FIELD_SOURCES, CalibrationItem, select_items, write_calibration_csv
from .speed import describe_cpu, median_latency_ms

log = logging.getLogger("leukoedge.calibration")

CALIBRATION_CSV = "calibration_set.csv"
CELL_TIMING_BATCH = 8  # cells per refiner and classifier call: a crowded field; most frames have fewer cells


@dataclass
class CalibrateConfig:
    data_root: Path
    bundle: Path
    out_dir: Path | None = None  # None: write into the bundle folder itself
    fields: int = 512  # segmenter calibration fields
    cells: int = 512  # refiner and classifier calibration cells
    candidates_per_class: int | None = 200  # images read per stratum to choose the stain-diverse ones from
    gate_split: str = "val"
    gate_limit: int | None = None  # held-out images per source (None: the whole split)
    dice_tolerance: float = gate.DEFAULT_DICE_TOLERANCE
    accuracy_tolerance: float = gate.DEFAULT_ACCURACY_TOLERANCE
    benign_flag_tolerance: float = gate.DEFAULT_BENIGN_FLAG_TOLERANCE  # share of benign fields newly flagged allowed
    keep_float: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model -> op types or node names
    settings: QuantizationSettings = field(default_factory=QuantizationSettings)
    speed_runs: int = 50  # per model and precision, interleaved (calibration/speed.py): enough for a stable median
    threads: int | None = None
    search: bool = True  # on a failed gate, look for op types to keep in float

    @property
    def tolerances(self) -> dict[str, float]:
        return {"dice": self.dice_tolerance, "accuracy": self.accuracy_tolerance, "f1": self.accuracy_tolerance, "unflagged": self.benign_flag_tolerance}


@dataclass
class ModelOutcome:
    """What calibration found for one model."""

    gate: gate.GateResult
    settings: QuantizationSettings
    median_ms: dict[str, float]  # precision -> ms; empty for the TensorRT target (not timed)
    written: bool
    remedies: list[tuple[str, gate.GateResult]] = field(default_factory=list)  # op type kept in float -> its gate

    def explanation(self, model: str) -> str:
        failures = ", ".join(
            f"{m.name} {m.fp32:.4f} -> {m.int8:.4f} (drop {m.fp32 - m.int8:.4f} > allowed {m.tolerance:g})" for m in self.gate.failures()
        )
        text = f"INT8 {model} failed its accuracy gate: {failures}; no int8 {model} was written."
        passing = [(op_type, result) for op_type, result in self.remedies if result.passed]
        if passing:
            op_type, result = passing[0]
            text += (
                f" Keeping its {op_type} layers in float passes ("
                + ", ".join(f"{m.name} {m.int8:.4f}" for m in result.metrics)
                + f"): re-run with --keep-float {model}:{op_type}"
            )
        elif self.remedies:
            tried = ", ".join(op_type for op_type, _ in self.remedies)
            text += f" Keeping any one op type ({tried}) in float does not pass either: try another --method or more calibration data."
        return text


@dataclass
class CalibrationReport:
    bundle: Bundle
    outcomes: dict[str, ModelOutcome]
    calibration_counts: dict[str, int]

    def failures(self) -> list[str]:
        return [outcome.explanation(model) for model, outcome in self.outcomes.items() if not outcome.written]

    def format(self) -> str:
        lines = [f"calibration set: {self.calibration_counts['fields']} fields, {self.calibration_counts['cells']} cells (train split)"]
        for outcome in self.outcomes.values():
            lines.append(outcome.gate.table())
            if outcome.median_ms:
                fp32_ms, int8_ms = outcome.median_ms["fp32"], outcome.median_ms["int8"]
                lines.append(f"  median ms per call: fp32 {fp32_ms:.2f}, int8 {int8_ms:.2f} (int8/fp32 {int8_ms / fp32_ms:.2f})")
            lines.append(f"  {outcome.settings.file_tag} {'written' if outcome.written else 'NOT written'}")
        return "\n".join(lines)


def parse_keep_float(values: list[str]) -> dict[str, tuple[str, ...]]:
    """["segmenter:MatMul,Softmax", "classifier:/fc/Gemm"] -> {model: (op types or node names)}."""
    keep: dict[str, tuple[str, ...]] = {}
    for value in values:
        model, _, names = value.partition(":")
        if model not in (*MODELS, *OPTIONAL_MODELS) or not names:
            raise LeukoedgeError(f"--keep-float takes MODEL:NAME[,NAME...] with MODEL segmenter, refiner or classifier, got {value!r}")
        keep[model] = keep.get(model, ()) + tuple(name for name in names.split(",") if name)
    return keep


def cell_finder(bundle: Bundle, threads: int | None) -> Callable[[data.Record, np.ndarray], Box | None]:
    """The cell of an image: from its mask in data.MARKED_CELL_SOURCES, else (Taleqani, PBC) from the
    bundle's own FP32 segmenter through the runtime's postprocessing, as training.pipeline does."""
    manifest = bundle.manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    segmenter = OnnxRuntimeBackend(bundle.path(manifest["segmenter"]["file"]), threads=threads)

    def find(record: data.Record, image: np.ndarray) -> Box | None:
        if record.source in data.MARKED_CELL_SOURCES:
            return central_box(data.wbc_boxes(record), image.shape)
        prepared = prepare_frame(image, spec, manifest["segmenter"]["input_size"])
        probabilities = segmenter.run({manifest["segmenter"]["input"]: prepared.tensor})[manifest["segmenter"]["output"]][0]
        cells, _ = find_cells(
            label_map_from_probabilities(probabilities),
            prepared.letterbox,
            manifest["postprocess"]["min_cell_area_px"],
            manifest["postprocess"]["split_touching"],
            manifest["postprocess"].get("min_nucleus_area_px", 0),
        )
        return central_box([cell.box for cell in cells], image.shape)

    return find


def model_inputs(items: list[CalibrationItem], spec: PreprocessSpec, manifest: dict[str, Any], model: str) -> np.ndarray:
    """The calibration items as the runtime feeds them to `model`: letterboxed fields, or cut cells
    (the refiner's and the classifier's crops differ only in size and margin)."""
    if model == "segmenter":
        return np.stack([prepare_frame(data.read_image(item.record), spec, manifest["segmenter"]["input_size"]).tensor[0] for item in items])
    cut = manifest[model]
    return np.stack(
        [classification_sample(data.read_image(item.record), item.box, spec, cut["input_size"], cut["crop_margin"], None) for item in items]
    )


def resolve_keep_float(names: tuple[str, ...], nodes_by_type: dict[str, list[str]], all_nodes: set[str], model: str) -> tuple[str, ...]:
    """Op types expand to their nodes; node names must exist in the model."""
    resolved: list[str] = []
    for name in names:
        if name in nodes_by_type:
            resolved.extend(nodes_by_type[name])
        elif name in all_nodes:
            resolved.append(name)
        else:
            raise LeukoedgeError(
                f"--keep-float {model}:{name}: no op type or node of that name in the {model}; "
                f"quantized op types are {sorted(nodes_by_type)}, e.g. nodes {sorted(all_nodes)[:5]}"
            )
    return tuple(dict.fromkeys(resolved))


def _all_node_names(prepared: Path) -> set[str]:
    import onnx

    return {node.name for node in onnx.load(str(prepared), load_external_data=False).graph.node}


def quantize_and_gate(
    model: str,
    fp32_path: Path,
    inputs: np.ndarray,
    score: Callable[[Path], dict[str, float]],
    samples: int,
    config: CalibrateConfig,
    scratch: Path,
) -> tuple[Path, ModelOutcome]:
    """Quantize one model, gate it, time both precisions; on failure try keeping each op type in float."""
    prepared = prepare_for_quantization(fp32_path, scratch / f"{model}.prepared.onnx")
    nodes_by_type = quantizable_nodes(prepared, config.settings.op_types)
    excluded = resolve_keep_float(config.keep_float.get(model, ()), nodes_by_type, _all_node_names(prepared), model)
    settings = dataclasses.replace(config.settings, nodes_to_exclude=excluded)
    ranges = scratch / f"{model}.ranges.json"
    int8_path = quantize_model(prepared, scratch / f"{model}.{settings.file_tag}.onnx", settings, ranges, TensorBatches(_input_name(fp32_path), inputs))
    fp32_scores = score(fp32_path)
    result = gate.compare(model, fp32_scores, score(int8_path), config.tolerances, samples)
    log.debug("gate\n%s", result.table())
    timing_batch = inputs[:1] if model == "segmenter" else inputs[:CELL_TIMING_BATCH]
    timed = settings.target == "cpu"
    median_ms = median_latency_ms({"fp32": fp32_path, "int8": int8_path}, timing_batch, config.speed_runs, config.threads) if timed else {}
    outcome = ModelOutcome(result, settings, median_ms, written=result.passed)
    if not result.passed and config.search:
        for op_type, names in nodes_by_type.items():
            remaining = set().union(*map(set, nodes_by_type.values())) - set(excluded) - set(names)
            if not remaining:
                continue  # nothing left to quantize: that is the fp32 model
            trial = dataclasses.replace(settings, nodes_to_exclude=tuple(dict.fromkeys(excluded + tuple(names))))
            trial_path = quantize_model(prepared, scratch / f"{model}.int8-float-{op_type}.onnx", trial, ranges)
            outcome.remedies.append((op_type, gate.compare(model, fp32_scores, score(trial_path), config.tolerances, samples)))
        # The cheapest remedy first: the one keeping the fewest layers in float.
        outcome.remedies.sort(key=lambda remedy: (not remedy[1].passed, len(nodes_by_type[remedy[0]])))
    return int8_path, outcome


def _input_name(model_path: Path) -> str:
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name


def _precisions_section(config: CalibrateConfig, manifest: dict[str, Any], outcomes: dict[str, ModelOutcome], counts: dict[str, int]) -> dict[str, Any]:
    import onnxruntime as ort

    settings = config.settings.to_manifest()
    settings.pop("nodes_to_exclude")  # per model, below
    section: dict[str, Any] = {
        "calibration": {
            **settings,
            "calibration_set": CALIBRATION_CSV,
            "data_split": "train",
            **counts,
            "gate_split": config.gate_split,
            "tolerances": config.tolerances,
            "onnxruntime": ort.__version__,
            "date": dt.date.today().isoformat(),
        },
        "timing": {
            "what": "median ms of one model call on ONNX Runtime CPU, fp32 and int8 calls interleaved",
            "device": describe_cpu(),
            "threads": config.threads,
            "runs": config.speed_runs,
            "segmenter_batch": 1,
            "refiner_batch": CELL_TIMING_BATCH,
            "classifier_batch": CELL_TIMING_BATCH,
        },
    }
    for model, outcome in outcomes.items():
        section[model] = {
            "fp32": {"file": manifest[model]["file"], "median_ms": outcome.median_ms["fp32"]},
            "int8": {
                "file": f"{model}.int8.onnx" if outcome.written else None,
                "median_ms": outcome.median_ms["int8"],
                "nodes_to_exclude": list(outcome.settings.nodes_to_exclude),
                "gate": outcome.gate.to_manifest(),
            },
        }
    for model in bundle_models(manifest):
        section.setdefault(model, {"fp32": {"file": manifest[model]["file"], "median_ms": None}})
    return section


def _tensorrt_section(config: CalibrateConfig, outcomes: dict[str, ModelOutcome], counts: dict[str, int], calibration_csv: str) -> dict[str, Any]:
    """The manifest's "tensorrt_int8" section: settings, and per model its TensorRT-target file (null where
    its gate failed), the gate and the nodes kept in float. No timing: see the module docstring."""
    import onnxruntime as ort

    settings = config.settings.to_manifest()
    settings.pop("nodes_to_exclude")
    section: dict[str, Any] = {
        "calibration": {
            **settings,
            "calibration_set": calibration_csv,
            "data_split": "train",
            **counts,
            "gate_split": config.gate_split,
            "tolerances": config.tolerances,
            "gate_runtime": f"onnxruntime {ort.__version__} (CPU), running the QDQ graph",
            "date": dt.date.today().isoformat(),
        }
    }
    for model, outcome in outcomes.items():
        section[model] = {
            "file": f"{model}.{config.settings.file_tag}.onnx" if outcome.written else None,
            "nodes_to_exclude": list(outcome.settings.nodes_to_exclude),
            "gate": outcome.gate.to_manifest(),
        }
    return section


def verdict_scorer(
    bundle: Bundle, field_cases: Sequence[gate.FieldCase], benign_cases: Sequence[gate.FieldCase], threads: int | None
) -> Callable[[str, Path], dict[str, float]]:
    """gate.verdict_scores of a model's file in the bundle's place ({} without fields), the bundle's own FP32 verdicts
    read once: the segmenter's and the classifier's FP32 files each put in their own place are the bundle as it is
    (729 Taleqani fields, about 20 s a pass on 2 cores)."""
    own: dict[str, float] = {}

    def scores(model: str, path: Path) -> dict[str, float]:
        if not field_cases:
            return {}
        if Path(path) != bundle.path(bundle.manifest[model]["file"]):
            return gate.verdict_scores(bundle, model, path, field_cases, threads, benign_cases)
        if not own:
            own.update(gate.verdict_scores(bundle, model, path, field_cases, threads, benign_cases))
        return dict(own)

    return scores


def calibrate_bundle(config: CalibrateConfig) -> CalibrationReport:
    """Quantize, gate and time every model of a bundle; write the bundle with what passed."""
    bundle = load_bundle(config.bundle)
    out_dir = config.out_dir or config.bundle
    if not Path(out_dir).is_dir() and config.out_dir is None:
        raise BundleError(f"{config.bundle} is an archive: give --out FOLDER for the calibrated bundle")
    manifest = bundle.manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    find_cell = cell_finder(bundle, config.threads)
    fields = select_items(config.data_root, "segmenter", FIELD_SOURCES, config.fields, candidates_per_class=config.candidates_per_class)
    cells = select_items(
        config.data_root, "classifier", CELL_SOURCES, config.cells, candidates_per_class=config.candidates_per_class, cell_box=find_cell
    )
    counts = {"fields": len(fields), "cells": len(cells)}
    log.info("calibration set: %d fields, %d cells", counts["fields"], counts["cells"])
    segmentation_cases = gate.segmentation_cases(config.data_root, spec, manifest["segmenter"]["input_size"], config.gate_split, config.gate_limit)
    cell_cases = gate.cell_cases(config.data_root, spec, manifest["classifier"], find_cell, config.gate_split, config.gate_limit)
    field_cases = gate.field_cases(config.data_root, config.gate_split, config.gate_limit)
    benign_cases = gate.benign_field_cases(config.data_root, config.gate_limit) if field_cases else []
    refiner_cases = (
        gate.refiner_cases(config.data_root, spec, manifest["refiner"], config.gate_split, config.gate_limit) if "refiner" in manifest else []
    )
    if not segmentation_cases or not cell_cases:
        raise LeukoedgeError(f"no held-out data for the gate in the {config.gate_split} split of {config.data_root}")
    verdicts = verdict_scorer(bundle, field_cases, benign_cases, config.threads)
    scorers: dict[str, tuple[Callable[[Path], dict[str, float]], int]] = {
        "segmenter": (
            lambda path: {**gate.segmenter_scores(path, segmentation_cases, config.threads), **verdicts("segmenter", path)},
            len(segmentation_cases) + len(field_cases) + len(benign_cases),
        ),
        "refiner": (lambda path: gate.refiner_scores(path, refiner_cases, config.threads), len(refiner_cases)),
        "classifier": (
            lambda path: {
                **gate.classifier_scores(path, cell_cases, manifest["classifier"], manifest["verdict"]["blast_threshold"], config.threads),
                **verdicts("classifier", path),
            },
            len(cell_cases) + len(field_cases) + len(benign_cases),
        ),
    }
    tag = config.settings.file_tag
    calibration_csv = CALIBRATION_CSV if tag == "int8" else f"calibration_set.{tag}.csv"
    with tempfile.TemporaryDirectory(prefix="leukoedge-calibrate-") as scratch_name:
        scratch = Path(scratch_name)
        files = {}
        for name in manifest["files"]:
            # A previous calibration's outputs for this target are replaced; the other target's are kept.
            if name != calibration_csv and not name.endswith(f".{tag}.onnx"):
                files[name] = scratch / "bundle" / name
                files[name].parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bundle.path(name), files[name])
        files[calibration_csv] = write_calibration_csv(fields + cells, config.data_root, scratch / calibration_csv)
        outcomes = {}
        # The cell-or-not gate (0.02 GFLOPs a cell) has no INT8 accuracy gate of its own: it stays FP32.
        for model in (name for name in bundle_models(manifest) if name in scorers):
            items = fields if model == "segmenter" else cells
            score, samples = scorers[model]
            int8_path, outcomes[model] = quantize_and_gate(
                model, bundle.path(manifest[model]["file"]), model_inputs(items, spec, manifest, model), score, samples, config, scratch
            )
            if outcomes[model].written:
                files[f"{model}.{tag}.onnx"] = int8_path
        if config.settings.target == "cpu":
            new_manifest = {**manifest, "precisions": _precisions_section(config, manifest, outcomes, counts)}
        else:
            new_manifest = {**manifest, TENSORRT_INT8: _tensorrt_section(config, outcomes, counts, calibration_csv)}
        written = save_bundle(Path(out_dir), new_manifest, files)
    for stale in Path(out_dir).glob(f"*.{tag}.onnx"):
        if stale.name not in written.manifest["files"]:
            stale.unlink()  # a failed model must not linger from an earlier calibration
    return CalibrationReport(written, outcomes, counts)
