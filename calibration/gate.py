"""The accuracy gate: an INT8 model enters a bundle only if it loses no more than a stated amount
against its FP32 original on held-out data (the val split by default; the test split stays for
the reported figures).

Segmenter: mean Dice of the nucleus and of the whole cell against the expert masks (Zheng, ALL-IDB2),
and the accuracy of the frame verdict (malignant vs benign) on Taleqani fields, the segmenter feeding the
bundle's FP32 classifier: the cells a segmenter finds decide the blast fraction, and a segmenter within
its Dice allowance has been seen to lose 5 of 386 validation verdicts. Both verdict-moving models (segmenter,
classifier) must also flag no more benign Taleqani fields than FP32, read on the benign fields of the train
split as well as the held-out ones (benign_field_cases).
Refiner: mean Dice of the nucleus and of the whole cell in the crops of the expert-masked cells.
Classifier: per head, accuracy and F1 (blast: F1 of the blast class at the manifest's threshold;
subtype and WBC type: macro F1) on the cells of ALL-IDB2, Taleqani and PBC.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from leukoedge.backends import create_backend
from leukoedge.bundle import Bundle
from leukoedge.detector import Detector
from leukoedge.postprocess import label_map_from_probabilities
from leukoedge.preprocess.cpu import Box, Letterbox, PreprocessSpec, prepare_frame
from leukoedge.training import data
from leukoedge.training.metrics import binary_summary, classification_report, segmentation_scores
from leukoedge.training.samples import classification_sample, refiner_sample

# Sources with expert nucleus/cytoplasm masks: the ones evaluate.py reports segmentation on.
SEGMENTATION_SOURCES = ("wbc-seg-zheng", "all-idb2")
CELL_SOURCES = ("all-idb2", "all-taleqani", "pbc")
DEFAULT_DICE_TOLERANCE = 0.005
DEFAULT_ACCURACY_TOLERANCE = 0.005  # 0.5 percentage points; F1 gets the same allowance
# A quantized model may not add a false flag: the share of benign fields left unflagged may not fall at all.
DEFAULT_BENIGN_FLAG_TOLERANCE = 0.0
_BATCH = 16


@dataclass(frozen=True)
class SegmentationCase:
    """A held-out field: the segmenter's input, where the field sits in it, and the truth."""

    tensor: np.ndarray  # 3xHxW
    letterbox: Letterbox
    truth: np.ndarray  # frame-resolution label map


@dataclass(frozen=True)
class RefinerCase:
    """A held-out expert-masked cell: the refiner's input crop and the truth cut from the same square."""

    crop: np.ndarray  # 3xSxS
    truth: np.ndarray  # SxS label map


@dataclass(frozen=True)
class FieldCase:
    """A held-out Taleqani field (BGR, as a camera gives it) and whether its smear is malignant."""

    frame: np.ndarray
    malignant: bool


@dataclass(frozen=True)
class CellCase:
    """A held-out cell: the classifier's input and the true class index per head that applies."""

    crop: np.ndarray  # 3xHxW
    targets: dict[str, int]


@dataclass(frozen=True)
class GateMetric:
    name: str
    fp32: float
    int8: float
    tolerance: float  # the largest drop allowed

    @property
    def passed(self) -> bool:
        # A few ulps of slack: an identical score must never fail a zero tolerance on rounding.
        return self.int8 >= self.fp32 - self.tolerance - 1e-12

    def to_manifest(self) -> dict[str, Any]:
        return {"name": self.name, "fp32": self.fp32, "int8": self.int8, "tolerance": self.tolerance, "passed": self.passed}


@dataclass(frozen=True)
class GateResult:
    model: str
    metrics: list[GateMetric]
    samples: int

    @property
    def passed(self) -> bool:
        return all(metric.passed for metric in self.metrics)

    def failures(self) -> list[GateMetric]:
        return [metric for metric in self.metrics if not metric.passed]

    def to_manifest(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples, "metrics": [metric.to_manifest() for metric in self.metrics]}

    def table(self) -> str:
        lines = [f"{self.model} ({self.samples} samples)", f"  {'metric':<27}{'fp32':>9}{'int8':>9}{'drop':>9}{'allowed':>9}"]
        for metric in self.metrics:
            lines.append(
                f"  {metric.name:<27}{metric.fp32:>9.4f}{metric.int8:>9.4f}{metric.fp32 - metric.int8:>9.4f}"
                f"{metric.tolerance:>9.4f}  {'ok' if metric.passed else 'FAIL'}"
            )
        return "\n".join(lines)


def compare(model: str, fp32: dict[str, float], int8: dict[str, float], tolerances: dict[str, float], samples: int) -> GateResult:
    """Gate every metric; the tolerance of a metric is that of its kind (the name's last word: dice, accuracy, f1,
    unflagged)."""
    metrics = [GateMetric(name, fp32[name], int8[name], tolerances[name.rsplit("_", 1)[-1]]) for name in fp32]
    return GateResult(model, metrics, samples)


def _session(model_path: Path, threads: int | None):
    import onnxruntime as ort

    from leukoedge.backends.onnxruntime import session_options

    return ort.InferenceSession(str(model_path), sess_options=session_options(ort, threads), providers=["CPUExecutionProvider"])


def _run_batched(model_path: Path, inputs: np.ndarray, threads: int | None) -> dict[str, np.ndarray]:
    """Every output of the model on `inputs` (run in batches), by output name."""
    session = _session(model_path, threads)
    input_name = session.get_inputs()[0].name
    parts = [session.run(None, {input_name: inputs[i : i + _BATCH]}) for i in range(0, len(inputs), _BATCH)]
    return {output.name: np.concatenate(arrays) for output, arrays in zip(session.get_outputs(), zip(*parts))}


def segmentation_cases(
    data_root: Path, spec: PreprocessSpec, input_size: Sequence[int], split: str = "val", limit: int | None = None
) -> list[SegmentationCase]:
    cases = []
    for source in SEGMENTATION_SOURCES:
        for record in data.load_records(data_root, source, split)[:limit]:
            truth = data.read_label_map(record)
            if truth is None:
                continue
            prepared = prepare_frame(data.read_image(record), spec, input_size)
            cases.append(SegmentationCase(prepared.tensor[0], prepared.letterbox, truth))
    return cases


def segmenter_scores(model_path: Path, cases: Sequence[SegmentationCase], threads: int | None = None) -> dict[str, float]:
    """Mean nucleus and whole-cell Dice over the cases (nucleus only where the truth separates it)."""
    (probabilities,) = _run_batched(model_path, np.stack([case.tensor for case in cases]), threads).values()
    return _mean_dice(
        (case.letterbox.label_map_to_frame(label_map_from_probabilities(field_probabilities)), case.truth)
        for case, field_probabilities in zip(cases, probabilities)
    )


def _mean_dice(predicted_and_truth: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean nucleus and whole-cell Dice over (predicted, truth) label maps (nucleus only where the truth separates it)."""
    dice: dict[str, list[float]] = {"nucleus_dice": [], "whole_cell_dice": []}
    for predicted, truth in predicted_and_truth:
        scores = segmentation_scores(predicted, truth)
        for region in ("nucleus", "whole_cell"):
            if scores[region] is not None:
                dice[f"{region}_dice"].append(scores[region]["dice"])
    return {name: float(np.mean(values)) for name, values in dice.items() if values}


def refiner_cases(
    data_root: Path, spec: PreprocessSpec, refiner: dict[str, Any], split: str = "val", limit: int | None = None
) -> list[RefinerCase]:
    """Every expert-masked cell of the held-out split, cut as the runtime cuts it for the refiner (manifest section `refiner`)."""
    cases = []
    for source in SEGMENTATION_SOURCES:
        for record in data.load_records(data_root, source, split)[:limit]:
            truth, image = data.read_label_map(record), data.read_image(record)
            for box in data.wbc_boxes(record):
                crop, crop_truth = refiner_sample(image, truth, box, spec, refiner["input_size"], refiner["crop_margin"], None)
                cases.append(RefinerCase(crop, crop_truth))
    return cases


def refiner_scores(model_path: Path, cases: Sequence[RefinerCase], threads: int | None = None) -> dict[str, float]:
    """Mean nucleus and whole-cell Dice of the refiner over the cells' crops."""
    (probabilities,) = _run_batched(model_path, np.stack([case.crop for case in cases]), threads).values()
    return _mean_dice((label_map_from_probabilities(crop_probabilities), case.truth) for case, crop_probabilities in zip(cases, probabilities))


def field_cases(data_root: Path, split: str = "val", limit: int | None = None) -> list[FieldCase]:
    return [FieldCase(data.read_image(record), bool(record.blast)) for record in data.load_records(data_root, "all-taleqani", split)[:limit]]


def benign_field_cases(data_root: Path, limit: int | None = None) -> list[FieldCase]:
    """The benign Taleqani fields of the train split (283): more witnesses of a false flag than the held-out split's 60.

    Whether a quantized model flags a benign field FP32 does not is quantization noise on a field near the threshold,
    not generalization, so fields the models learnt from are fair witnesses. Measured (docs/performance.md, "A false
    flag added by INT8, read on more benign fields; scripts/verdict_changes.py --after-int8): on 0.13.0 the INT8
    classifier flags the 60 validation fields as FP32 does, and one more of the 283 training fields; on the test split
    one more than FP32."""
    records = [record for record in data.load_records(data_root, "all-taleqani", "train") if not record.blast][:limit]
    return [FieldCase(data.read_image(record), False) for record in records]


def verdict_scores(
    bundle: Bundle,
    model: str,
    model_path: Path,
    cases: Sequence[FieldCase],
    threads: int | None = None,
    benign_cases: Sequence[FieldCase] = (),
) -> dict[str, float]:
    """Frame-verdict accuracy over the held-out fields `cases`, and the share of benign fields left unflagged, the
    benign ones of `cases` and `benign_cases` together: Detector.run itself in FP32, with `model_path` in place of
    the bundle's `model` ("segmenter" or "classifier"). Both models move the verdict, so both gates read it; the
    second metric is there because a quantized model must not add a false flag on a normal smear, the product's worst
    outcome (a candidate's INT8 classifier passed every per-cell metric and flagged one more benign Taleqani test
    field; docs/performance.md, "The light segmenter fine-tuned on whole inputs")."""
    detector = Detector(bundle, precision="fp32", threads=threads)
    setattr(detector, model, create_backend("onnxruntime", model_path, threads))
    flagged = [detector.run(case.frame).verdict.flagged for case in cases]
    scores = {"taleqani_verdict_accuracy": float(np.mean([flag == case.malignant for flag, case in zip(flagged, cases)]))}
    benign = [not flag for flag, case in zip(flagged, cases) if not case.malignant]
    benign += [not detector.run(case.frame).verdict.flagged for case in benign_cases]
    if benign:
        scores["taleqani_benign_unflagged"] = float(np.mean(benign))  # its tolerance: DEFAULT_BENIGN_FLAG_TOLERANCE
    return scores


def cell_targets(record: data.Record, heads: dict[str, Any]) -> dict[str, int]:
    """The true class index of each head the record has a label for."""
    labels = {
        "blast": None if record.blast is None else ("blast" if record.blast else "normal"),
        "subtype": record.subtype,
        "wbc_type": record.wbc_type,
    }
    return {
        head: spec["classes"].index(labels[head])
        for head, spec in heads.items()
        if labels.get(head) is not None and labels[head] in spec["classes"]
    }


def cell_cases(
    data_root: Path,
    spec: PreprocessSpec,
    classifier: dict[str, Any],
    cell_box: Callable[[data.Record, np.ndarray], Box | None],
    split: str = "val",
    limit: int | None = None,
) -> list[CellCase]:
    """One cell per held-out image (the one cell_box picks), cut exactly as the runtime cuts it."""
    cases = []
    for source in CELL_SOURCES:
        for record in data.load_records(data_root, source, split)[:limit]:
            image = data.read_image(record)
            box = cell_box(record, image)
            if box is None:
                continue
            crop = classification_sample(image, box, spec, classifier["input_size"], classifier["crop_margin"], None)
            cases.append(CellCase(crop, cell_targets(record, classifier["heads"])))
    return cases


def classifier_scores(
    model_path: Path, cases: Sequence[CellCase], classifier: dict[str, Any], blast_threshold: float, threads: int | None = None
) -> dict[str, float]:
    """Per head with labelled cases: accuracy and F1 (blast at the verdict threshold, other heads macro)."""
    outputs = _run_batched(model_path, np.stack([case.crop for case in cases]), threads)
    scores: dict[str, float | None] = {}
    for head, head_spec in classifier["heads"].items():
        probabilities = outputs[head_spec["output"]]
        labelled = [index for index, case in enumerate(cases) if head in case.targets]
        if not labelled:
            continue
        truth = [cases[index].targets[head] for index in labelled]
        if head == "blast":
            blast_column = head_spec["classes"].index("blast")
            is_blast = [int(target == blast_column) for target in truth]
            summary = binary_summary(is_blast, probabilities[labelled, blast_column], blast_threshold)
            scores["blast_accuracy"], scores["blast_f1"] = summary["accuracy"], summary["f1"]
        else:
            report = classification_report(truth, probabilities[labelled].argmax(axis=1).tolist(), classes=list(range(len(head_spec["classes"]))))
            scores[f"{head}_accuracy"], scores[f"{head}_macro_f1"] = report["accuracy"], report["macro"]["f1"]
    # F1 is undefined without a positive case; that depends on the truth only, so fp32 and int8 agree on it.
    return {name: float(value) for name, value in scores.items() if value is not None}
