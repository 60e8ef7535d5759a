"""`leukoedge adapt --labels`: tune a bundle's segmenter, gate and classifier (and, asked, its refiner) to a new
microscope from a few dozen frames whose objects are boxed.

Unlabelled adaptation (leukoedge/adapt.py) can only move the domain check. What goes wrong on a microscope the
models never saw is in the models: its red cells pass the gate (cell or not) and its normal white cells look like
blasts to the classifier; a classifier trained without a device calls about half of its normal white cells blasts,
one that learnt the device a few percent (docs/training.md). The device's own labelled cells are what fixes that.
From frames of NORMAL smears of the device, its white cells boxed (its red cells and platelets too, ideally):
- the segmenter (and the refiner, when LabelledRecipe.models names it) is fine-tuned on the device's fields labelled by the boxes
  (data.boxed_field_label_map: outside the white cells' boxes and on the red cells pressed against them,
  background), beside replayed fields and cells of the mask sources: a white cell's mask otherwise spreads into the
  device's red cells and its box misses the white cell's (docs/training.md);
- then, with the new masks, the gate is fine-tuned on the device's proposals labelled by the boxes (white cell or not), with examples of the
  training sources replayed beside them so it does not forget those; its threshold is chosen again on the training
  sources' validation examples by the rule it was chosen by (training/gate.choose_threshold);
- the classifier is fine-tuned with the device's boxed white cells as normal cells, beside replayed training cells
  of every head, so that blasts stay blasts;
- the verdict's flag fraction is chosen again on the Taleqani validation fields plus the device's frames (normal),
  never below the bundle's own (normal frames can only argue for a stricter verdict);
- the domain check takes the device's colours and, because these frames are labelled and checked, the segmenter
  uncertainty of its frames (leukoedge/adapt.adapted_domain).
The frames held back from all of this decide (the same hash split as unlabelled adaptation): the bundle is written
only if on them it flags and refuses no more frames than before and finds white cells as well (box F1 at most
MAX_DROP lower), if on the Taleqani validation fields it flags no more benign fields and its sensitivity is at most
MAX_DROP lower (apart: in one balanced accuracy a benign field unflagged, 1 of 60, hid 9 of 326 malignant fields lost),
and if its nucleus and whole-cell Dice on the masked validation fields (MASK_CHECK_SOURCES) are at most MAX_DROP lower.
The new models are FP32 only: INT8 versions of the fine-tuned models are dropped (rerun `leukoedge calibrate`).
Replay needs the training data (`--data`) and the models' training checkpoints, checked against the bundle's ONNX files.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from leukoedge.decode import file_jpeg_quality
from leukoedge.errors import LabelError
from leukoedge.adapt import ADAPTABLE_MODELS, DEFAULT_ADAPTED_MODELS, DEFAULT_DEVICE_SHARE, DEFAULT_HOLD_BACK, DEFAULT_TALEQANI_MASK_WEIGHT, AdaptationRefused, FrameMeasure, adapted_domain, adapted_version, held_back
from leukoedge.bundle import save_bundle
from leukoedge.detector import Detector
from leukoedge.domain import colour_features, feature_names, segmenter_uncertainty
from leukoedge.export.onnx import ClassifierWithSoftmax, export_classifier, export_segmenter

from . import data
from .detection import DeviceFigures, count_field, records_per_domain
from .gate import (
    GATE_HEAD,
    GATE_SOURCES,
    MIN_GATE_RECALL,
    GateExamples,
    _augment_crops,
    _balanced_batch,
    boxed_field_examples,
    choose_threshold,
    collect_examples,
    wbc_probabilities,
    with_torch_gate,
)
from .metrics import dice
from .pipeline import HEADS, NORMAL_CELL_WEIGHTS, SEGMENTATION_SOURCES, cell_examples
from .samples import classification_sample, random_crop, refiner_sample, segmentation_sample
from .torch_backend import TorchBackend, as_backend, checkpoint_paths, verified_model
from .train import CLASSIFIER_LOSSES, CellExample, CellMaskExample, SegmentationExample, balanced_indices, save_checkpoint, segmentation_loss, teacher_loss
from .verdict import choose_flag_fraction, taleqani_verdicts

log = logging.getLogger("leukoedge.adapt")

MIN_LABELLED_FRAMES = 10  # fewer say too little about a device to fine-tune on, and leave too few to hold back
MAX_DROP = 0.01  # the rule: no figure may get worse by more than this
# The softmax temperature of the labelled classifier's distillation to the original on replayed cells
# (train.teacher_loss; 1: the original's probabilities as they are).
KEEP_TEMPERATURE = 1.0
LABEL_SUFFIXES = (".xml", ".txt")
# Masked cells a fine-tuned segmenter or refiner must still outline: the experts' nucleus and cytoplasm, Taleqani's
# weak whole-cell masks (its B-ALL fields are the verdict's).
MASK_CHECK_SOURCES = ("wbc-seg-zheng", "all-idb2", "all-taleqani")


@dataclass
class LabelledFrame:
    """One frame of the device (BGR, as read) and its boxes per object class (data.BOX_CLASSES)."""

    name: str
    image: np.ndarray
    boxes: dict[str, list[data.Box]]
    jpeg_quality: int | None = None  # the file's (decode.file_jpeg_quality), judged as `leukoedge run` judges it


@dataclass
class LabelledRecipe:
    """How the models are fine-tuned; the defaults are the ones measured in docs/training.md."""

    models: tuple[str, ...] = DEFAULT_ADAPTED_MODELS  # which are fine-tuned (some of ADAPTABLE_MODELS); the others are kept
    segmenter_steps: int = 300
    refiner_steps: int = 300
    gate_steps: int = 300
    classifier_steps: int = 300
    learning_rate: float = 2e-4  # low: the models keep what they learnt and move towards the device
    batch_size: int = 64  # gate and classifier crops
    segmenter_batch_size: int = 8  # fields, each a segmenter_crop window of the segmenter's input
    segmenter_crop: int = 128
    refiner_batch_size: int = 32  # cells
    device_share: float = DEFAULT_DEVICE_SHARE  # of each batch, the device's examples; the rest replayed ones
    keep_weight: float = 1.0  # weight of the replayed cells' distillation to the original classifier (0: none)
    keep_temperature: float = KEEP_TEMPERATURE  # the softmax temperature of that distillation (train.teacher_loss)
    # How much more often the classifier's replay draws Taleqani's cells than training's balance would: the verdict's
    # only malignant fields, and what a device's normal cells teach the classifier to lose (raabin left out: 316 -> 308
    # of 326 malignant validation fields flagged at 1, 316 -> 315 at 3; docs/training.md, "What the raabin adaptation loses").
    taleqani_replay_weight: float = 3.0
    # The same for the segmenter's and refiner's replayed fields and cells (leukoedge.adapt.DEFAULT_TALEQANI_MASK_WEIGHT;
    # 1: training's balance over sources, which cost Taleqani's whole-cell Dice and flags on a device left out).
    taleqani_mask_replay_weight: float = DEFAULT_TALEQANI_MASK_WEIGHT
    replay_per_source: int = 40  # training fields replayed per source/device
    # Validation fields per source/device for the gate's threshold and the masks' check: all of ALL-IDB2's 32 and Zheng's
    # 44 (with 20, one ALL-IDB2 field moved its Dice by 0.05).
    val_per_source: int = 60
    verdict_fields: int | None = None  # Taleqani validation fields for the verdict (evenly spaced); None: all of them
    hold_back: float = DEFAULT_HOLD_BACK  # share of the labelled frames kept out of fine-tuning, to check the result
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [name for name in self.models if name not in ADAPTABLE_MODELS]
        if unknown or not self.models:
            raise ValueError(f"models to fine-tune must be some of {', '.join(ADAPTABLE_MODELS)}; got {', '.join(self.models) or 'none'}")
        if not 0.0 < self.device_share < 1.0:
            raise ValueError(f"the device's share of each batch must be between 0 and 1 (exclusive); got {self.device_share}")


@dataclass
class Replay:
    """What the training sources bring to fine-tuning, none of it from the device being adapted to: the gate's
    examples (training and validation), cells with their classifier targets, fields with label maps for the
    segmenter, masked cells for the refiner, and masked validation fields for the masks' check."""

    gate_train: GateExamples
    gate_val: GateExamples
    cells: list[CellExample]
    fields: list[SegmentationExample]
    masked_cells: list[CellMaskExample]
    mask_check: list[SegmentationExample]


@dataclass(frozen=True)
class VerdictCounts:
    """How many of the Taleqani validation fields a verdict flags, malignant and benign apart."""

    malignant_flagged: int
    malignant: int
    benign_flagged: int
    benign: int

    @classmethod
    def of(cls, fractions: Sequence[float], malignant: Sequence[int], flag_fraction: float) -> "VerdictCounts":
        flagged, is_malignant = np.asarray(fractions, float) >= flag_fraction, np.asarray(malignant, int) == 1
        return cls(int(flagged[is_malignant].sum()), int(is_malignant.sum()), int(flagged[~is_malignant].sum()), int((~is_malignant).sum()))

    @property
    def sensitivity(self) -> float:
        return self.malignant_flagged / self.malignant if self.malignant else 0.0

    def line(self) -> str:
        return f"malignant {self.malignant_flagged} of {self.malignant} (sensitivity {self.sensitivity:.3f}), benign {self.benign_flagged} of {self.benign}"


@dataclass
class LabelledReport:
    frames: int
    held_back: int
    before: dict  # training/detection.DeviceFigures.as_row of the held-back frames
    after: dict
    taleqani_before: VerdictCounts  # the Taleqani validation fields flagged
    taleqani_after: VerdictCounts
    masks_before: dict[str, float]  # mask_dice: whole-cell (and nucleus) Dice per masked source
    masks_after: dict[str, float]
    gate_threshold: float
    flag_fraction: float
    problems: list[str]
    written: bool = False

    def lines(self) -> list[str]:
        def number(value: float | None, digits: int = 3) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        rows = [
            ("white-cell box recall (IoU 0.5)", "box_recall", 3),
            ("white-cell box precision", "box_precision", 3),
            ("red cells called white per 1000", "rbc_called_wbc_per_1000", 1),
            ("frames refused (outside the domain)", "refused_rate", 3),
            ("false flags among judged frames", "false_flag_rate", 3),
        ]
        lines = [f"frames: {self.frames} labelled ({self.frames - self.held_back} fitted, {self.held_back} held back)", "held-back frames: before -> after"]
        lines += [f"  {label}: {number(self.before[key], digits)} -> {number(self.after[key], digits)}" for label, key, digits in rows]
        lines.append(f"Taleqani validation fields flagged: {self.taleqani_before.line()} -> {self.taleqani_after.line()}")
        lines += [f"{name} (validation): {self.masks_before[name]:.3f} -> {self.masks_after[name]:.3f}" for name in self.masks_before]
        lines.append(f"gate threshold {self.gate_threshold:.3f}, flag fraction {self.flag_fraction:.3f}")
        lines += [f"worse: {problem}" for problem in self.problems]
        if self.problems:
            lines.append("bundle NOT written: it did worse (above)")
        else:
            lines.append("bundle written" if self.written else "no worse on the held-back frames")
        return lines


def read_labelled_frames(paths: Sequence[Path], labels_dir: Path, read: Callable[[Path], np.ndarray]) -> list[LabelledFrame]:
    """The frames among `paths` with a box file of the same stem in labels_dir (data.read_boxes, strict: VOC .xml or
    YOLO .txt, the suffix in any case); frames without one are left out of labelled adaptation. LabelError for a
    labels folder that is not there, a frame with both an .xml and a .txt (which one is meant?), and a box file that
    cannot be read; a file of boxes for no frame is named (a misspelt name would otherwise leave its frame out)."""
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise LabelError(f"--labels {labels_dir} is not a folder: expected a folder of box files named as the frames (<frame name>.xml or .txt)")
    box_files: dict[str, list[Path]] = {}
    for candidate in sorted(labels_dir.iterdir()):
        if candidate.is_file() and candidate.suffix.lower() in LABEL_SUFFIXES:
            box_files.setdefault(candidate.stem, []).append(candidate)
    frames, stems = [], {}
    for path in paths:
        if path.stem in stems and path.stem in box_files:
            raise LabelError(f"{stems[path.stem]} and {path.name} share the name stem {path.stem!r}: a box file cannot say which frame it boxes")
        stems[path.stem] = path.name
        found = box_files.get(path.stem, [])
        if len(found) > 1:
            raise LabelError(f"{path.name} has {len(found)} box files ({', '.join(label.name for label in found)}): keep one")
        if found:
            image = read(path)
            frames.append(LabelledFrame(path.name, image, data.read_boxes(found[0], image.shape), file_jpeg_quality(path)))
    for stem, unused in box_files.items():
        if stem not in stems:
            log.warning("box file %s names no frame of the folder (no frame %s.*): its boxes are not used", unused[0].name, stem)
    return frames


def replay_from_data(detector: Detector, data_root: Path, recipe: LabelledRecipe, leave_out: str | None = None) -> Replay:
    """Replayed examples of the training sources' training split (validation split for the gate's threshold and
    the masks' check), `leave_out` (a source or source/device) excluded."""
    gate_train = collect_examples(detector, _kept(records_per_domain(data_root, "train", GATE_SOURCES, recipe.replay_per_source), leave_out), 1, recipe.seed, "replay: gate examples")
    gate_val = collect_examples(detector, _kept(records_per_domain(data_root, "val", GATE_SOURCES, recipe.val_per_source), leave_out), 0, recipe.seed + 1, "replay: gate validation")
    return replay_with_masks(gate_train, gate_val, replay_cells(detector, data_root, recipe.replay_per_source, leave_out), data_root, recipe, leave_out)


def replay_with_masks(
    gate_train: GateExamples, gate_val: GateExamples, cells: list[CellExample], data_root: Path, recipe: LabelledRecipe, leave_out: str | None = None
) -> Replay:
    """The replay of the gate's and classifier's examples given, with the segmenter's, refiner's and masks' check's
    read from the data (the segmentation sources' label maps, as training.pipeline reads them)."""
    fields, masked_cells = masked_fields(_kept(records_per_domain(data_root, "train", SEGMENTATION_SOURCES, recipe.replay_per_source), leave_out))
    mask_check, _ = masked_fields(_kept(records_per_domain(data_root, "val", MASK_CHECK_SOURCES, recipe.val_per_source), leave_out))
    return Replay(gate_train, gate_val, cells, fields, masked_cells, mask_check)


def masked_fields(records: Sequence[data.Record]) -> tuple[list[SegmentationExample], list[CellMaskExample]]:
    """The records that have a label map (data.read_label_map) with it, and their white cells (data.wbc_boxes)."""
    fields, cells = [], []
    for record in tqdm(records, desc="replay: label maps", unit="field", leave=False):
        label_map = data.read_label_map(record)
        if label_map is None:
            continue
        field = SegmentationExample(record.source, data.read_image(record), label_map)
        fields.append(field)
        cells += [CellMaskExample(record.source, field.image, label_map, box) for box in data.wbc_boxes(record)]
    return fields, cells


def replay_cells(detector: Detector, data_root: Path, per_source: int, leave_out: str | None = None) -> list[CellExample]:
    """Training cells of every classification source as training.pipeline takes them, boxes from the detector."""

    def records_of(source: str) -> list[data.Record]:
        return _kept(records_per_domain(data_root, "train", [source], per_source), leave_out)

    return cell_examples(records_of, lambda image: [cell.classifier_box for cell in detector.candidates(image).instances], "train")[0]


def _kept(records: list[data.Record], leave_out: str | None) -> list[data.Record]:
    return [record for record in records if leave_out is None or not record.domain.startswith(leave_out)]


def device_cells(frames: Sequence[LabelledFrame], domain: str) -> list[CellExample]:
    """The device's boxed white cells, normal (the frames are of normal smears)."""
    return [CellExample(domain, frame.image, box, {"blast": 0}) for frame in frames for box in frame.boxes.get("WBC", [])]


def device_fields(frames: Sequence[LabelledFrame], domain: str) -> list[SegmentationExample]:
    """The device's frames labelled by their boxes (data.boxed_field_label_map)."""
    return [SegmentationExample(domain, frame.image, data.boxed_field_label_map(frame.boxes, frame.image.shape)) for frame in frames]


def device_masked_cells(fields: Sequence[SegmentationExample], frames: Sequence[LabelledFrame]) -> list[CellMaskExample]:
    """The device's boxed white cells with their fields' box labels, for the refiner."""
    return [CellMaskExample(field.source, field.image, field.label_map, box) for field, frame in zip(fields, frames) for box in frame.boxes.get("WBC", [])]


def _fine_tune(model: torch.nn.Module, steps: int, learning_rate: float, next_batch: Callable[[], tuple], loss_of: Callable, description: str, seed: int) -> torch.nn.Module:
    """AdamW with a one-cycle rate for a fixed number of steps: no selection on the device's frames, which are
    kept for the held-back check."""
    torch.manual_seed(seed)  # dropout: reruns give the same models
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(2, steps), pct_start=0.15)
    model.train()
    for _ in tqdm(range(steps), desc=description, unit="step"):
        inputs, targets = next_batch()
        loss = loss_of(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def fine_tune_gate(gate: torch.nn.Module, device: GateExamples, replay: GateExamples, recipe: LabelledRecipe) -> torch.nn.Module:
    """recipe.device_share of each batch the device's examples, the rest replayed ones; each part balanced over
    white cells / not."""
    rng = np.random.default_rng(recipe.seed)
    own = max(2, int(round(recipe.batch_size * recipe.device_share)))

    def next_batch() -> tuple:
        parts = [(device, _balanced_batch(device, rng, own)), (replay, _balanced_batch(replay, rng, recipe.batch_size - own))]
        crops = np.concatenate([examples.crops[indices] for examples, indices in parts]).astype(np.float32)
        labels = np.concatenate([examples.labels[indices] for examples, indices in parts])
        return _augment_crops(torch.from_numpy(crops), rng), torch.from_numpy(labels)

    def loss_of(outputs: dict, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs[GATE_HEAD], labels)

    return _fine_tune(gate, recipe.gate_steps, recipe.learning_rate, next_batch, loss_of, "adapt: gate", recipe.seed)


def classifier_replay_weights(recipe: LabelledRecipe) -> dict[str, float]:
    """Per source, how often the classifier's replay draws its cells against training's balance (1 where not named)."""
    return {**NORMAL_CELL_WEIGHTS, "all-taleqani": recipe.taleqani_replay_weight}


def fine_tune_classifier(
    classifier: torch.nn.Module, device: Sequence[CellExample], replay: Sequence[CellExample], detector: Detector, loss: str, recipe: LabelledRecipe
) -> torch.nn.Module:
    """Batches of replayed cells (balanced over sources as in training, Taleqani's recipe.taleqani_replay_weight times as
    often) in which up to recipe.device_share of the batch, taken from the normal cells, is replaced by the device's
    white cells: the device's cells take the place of other normal cells, so the share of blasts the classifier sees
    stays as in training. On the replayed cells the classifier also keeps the original's answers (distillation, weight
    recipe.keep_weight: learning without forgetting), so its blast probabilities on the sources it learnt do not drift,
    which would cost the verdict's sensitivity. Crops augmented as in training (samples.classification_sample)."""
    rng = np.random.default_rng(recipe.seed + 1)
    own = max(1, int(round(recipe.batch_size * recipe.device_share)))
    weights = classifier_replay_weights(recipe)
    replay_order = iter(balanced_indices([cell.source for cell in replay], recipe.classifier_steps * recipe.batch_size, rng, weights))
    spec = detector.classifier_spec
    head_loss = CLASSIFIER_LOSSES[loss]
    original = copy.deepcopy(classifier).eval()

    def next_batch() -> tuple:
        cells = [replay[next(replay_order)] for _ in range(recipe.batch_size)]
        normal = [index for index, cell in enumerate(cells) if cell.targets.get("blast") == 0]
        replayed = torch.ones(len(cells), dtype=torch.bool)
        for index in normal[:own]:
            cells[index] = device[int(rng.integers(len(device)))]
            replayed[index] = False
        crops = torch.from_numpy(np.stack([classification_sample(cell.image, cell.box, detector.spec, spec["input_size"], spec["crop_margin"], rng) for cell in cells]))
        targets = {head: torch.tensor([cell.targets.get(head, -1) for cell in cells]) for head in HEADS}
        with torch.no_grad():
            kept = original(crops)  # logits: teacher_loss softens them at recipe.keep_temperature
        return crops, (targets, kept, replayed)

    def loss_of(outputs: dict, batch: tuple) -> torch.Tensor:
        targets, kept, replayed = batch
        losses = [head_loss(outputs[head], targets[head]) for head in HEADS if (targets[head] >= 0).any()]
        if recipe.keep_weight > 0:
            losses += [recipe.keep_weight * teacher_loss(outputs[head][replayed], kept[head][replayed], recipe.keep_temperature) for head in HEADS]
        return torch.stack(losses).sum()

    return _fine_tune(classifier, recipe.classifier_steps, recipe.learning_rate, next_batch, loss_of, "adapt: classifier", recipe.seed)


def fine_tune_masks(
    model: torch.nn.Module,
    device: Sequence[SegmentationExample | CellMaskExample],
    replay: Sequence[SegmentationExample | CellMaskExample],
    sample: Callable[[SegmentationExample | CellMaskExample, np.random.Generator], tuple[np.ndarray, np.ndarray]],
    steps: int,
    batch_size: int,
    recipe: LabelledRecipe,
    description: str,
) -> torch.nn.Module:
    """A segmenter or refiner on batches whose recipe.device_share are the device's examples (fields or cells) and
    the rest replayed ones balanced over sources, with training's segmentation loss (train.segmentation_loss)."""
    rng = np.random.default_rng(recipe.seed + 2)
    own = max(1, int(round(batch_size * recipe.device_share)))
    replay_order = iter(balanced_indices([example.source for example in replay], steps * (batch_size - own), rng, {"all-taleqani": recipe.taleqani_mask_replay_weight}))

    def next_batch() -> tuple:
        examples = [device[int(rng.integers(len(device)))] for _ in range(own)] + [replay[next(replay_order)] for _ in range(batch_size - own)]
        inputs, labels = zip(*(sample(example, rng) for example in examples))
        return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels).astype(np.int64))

    return _fine_tune(model, steps, recipe.learning_rate, next_batch, segmentation_loss, description, recipe.seed)


def fine_tune_segmenter(
    segmenter: torch.nn.Module, device: Sequence[SegmentationExample], replay: Sequence[SegmentationExample], detector: Detector, recipe: LabelledRecipe
) -> torch.nn.Module:
    """Fields augmented as in training (samples.segmentation_sample), a recipe.segmenter_crop window of each."""
    size = detector.segmenter_spec["input_size"]

    def sample(field: SegmentationExample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return random_crop(*segmentation_sample(field.image, field.label_map, detector.spec, size, rng), recipe.segmenter_crop, rng)

    return fine_tune_masks(segmenter, device, replay, sample, recipe.segmenter_steps, recipe.segmenter_batch_size, recipe, "adapt: segmenter")


def fine_tune_refiner(
    refiner: torch.nn.Module, device: Sequence[CellMaskExample], replay: Sequence[CellMaskExample], detector: Detector, recipe: LabelledRecipe
) -> torch.nn.Module:
    """Cells cut and augmented as in training (samples.refiner_sample)."""
    spec = detector.refiner_spec

    def sample(cell: CellMaskExample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return refiner_sample(cell.image, cell.label_map, cell.box, detector.spec, spec["input_size"], spec["crop_margin"], rng)

    return fine_tune_masks(refiner, device, replay, sample, recipe.refiner_steps, recipe.refiner_batch_size, recipe, "adapt: refiner")


def mask_dice(detector: Detector, fields: Sequence[SegmentationExample]) -> dict[str, float]:
    """The detector's mean whole-cell Dice per source on masked fields, and nucleus Dice where the masks split
    nucleus from cytoplasm (ignored pixels left out; training/metrics.segmentation_scores' rules)."""
    scores: dict[str, list[float]] = {}
    for field in tqdm(fields, desc="masks (validation)", unit="field", leave=False):
        predicted, truth = detector.run(field.image).label_map, field.label_map
        valid = truth != data.LABEL_IGNORE
        whole = np.isin(truth, (data.LABEL_CYTOPLASM, data.LABEL_NUCLEUS, data.LABEL_WBC))
        scores.setdefault(f"{field.source} whole-cell Dice", []).append(dice((predicted != data.LABEL_BACKGROUND)[valid], whole[valid]))
        if not (truth == data.LABEL_WBC).any():
            nucleus = dice((predicted == data.LABEL_NUCLEUS)[valid], (truth == data.LABEL_NUCLEUS)[valid])
            scores.setdefault(f"{field.source} nucleus Dice", []).append(nucleus)
    return {name: float(np.mean(values)) for name, values in scores.items()}


def labelled_figures(detector: Detector, frames: Sequence[LabelledFrame], domain: str) -> dict:
    """training/detection's device figures of labelled frames (every frame a normal field)."""
    figures = DeviceFigures(domain)
    for frame in tqdm(frames, desc=f"figures ({domain})", unit="frame", leave=False):
        result = detector.run(frame.image, jpeg_quality=frame.jpeg_quality)
        figures.add(count_field([cell.box for cell in result.cells], frame.boxes), result.verdict.status, result.verdict.flagged)
    return figures.as_row()


def _box_f1(row: dict) -> float:
    recall, precision = row["box_recall"] or 0.0, row["box_precision"] or 0.0
    return 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)


def problems_of(
    before: dict, after: dict, taleqani_before: VerdictCounts, taleqani_after: VerdictCounts, masks_before: dict[str, float], masks_after: dict[str, float]
) -> list[str]:
    """Why the adapted models are worse than the original ones, for a person; [] when they are not."""
    problems = []
    if after["flagged"] > before["flagged"]:
        problems.append(f"flags {after['flagged']} held-back frames of normal smears, the original {before['flagged']}")
    refused_before, refused_after = before["refused_rate"] or 0.0, after["refused_rate"] or 0.0
    if refused_after > refused_before:
        problems.append(f"refuses {refused_after:.3f} of the held-back frames, the original {refused_before:.3f}")
    if _box_f1(after) < _box_f1(before) - MAX_DROP:
        problems.append(f"white-cell box F1 {_box_f1(after):.3f} on the held-back frames, the original {_box_f1(before):.3f}")
    if taleqani_after.benign_flagged > taleqani_before.benign_flagged:
        problems.append(f"flags {taleqani_after.benign_flagged} benign Taleqani validation fields, the original {taleqani_before.benign_flagged}")
    if taleqani_after.sensitivity < taleqani_before.sensitivity - MAX_DROP:
        problems.append(f"Taleqani validation sensitivity {taleqani_after.sensitivity:.3f}, the original {taleqani_before.sensitivity:.3f}")
    for name, score in masks_before.items():
        if masks_after[name] < score - MAX_DROP:
            problems.append(f"{name} {masks_after[name]:.3f} on the validation fields, the original {score:.3f}")
    return problems


def check_frames(frames: Sequence[LabelledFrame], hold_back: float = DEFAULT_HOLD_BACK) -> None:
    """AdaptationRefused where the frames cannot teach or check anything: too few, or no white cell boxed among those
    fine-tuned on (the held-back ones, held_back, only check; found only there, fine-tuning would fail minutes in)."""
    if len(frames) < MIN_LABELLED_FRAMES:
        raise AdaptationRefused(f"labelled adaptation needs at least {MIN_LABELLED_FRAMES} labelled frames of the device, got {len(frames)}")
    if not any(frame.boxes.get("WBC") for frame in frames):
        raise AdaptationRefused("no white cell is boxed in the labelled frames: box every white cell (WBC) of each frame")
    held = held_back([frame.name for frame in frames], hold_back)
    if not any(frame.boxes.get("WBC") for frame, checked in zip(frames, held) if not checked):
        raise AdaptationRefused(
            f"white cells are boxed only in the {int(held.sum())} frames held back to check the result: label more of the frames "
            "(each frame's white cells; the frames kept back are chosen by a hash of their names)"
        )


@dataclass
class Adapted:
    """The fine-tuned models and what the manifest needs of them."""

    segmenter: torch.nn.Module
    refiner: torch.nn.Module | None  # None: the bundle has no refiner
    classifier: torch.nn.Module
    gate: torch.nn.Module
    gate_threshold: float
    flag_fraction: float
    domain: dict
    report: LabelledReport | None  # None until measured


def adapt_models(
    detector: Detector,
    models: dict[str, torch.nn.Module],
    frames: Sequence[LabelledFrame],
    replay: Replay,
    data_root: Path,
    recipe: LabelledRecipe,
    domain_name: str = "device",
    classifier_loss: str = "ce",
) -> Adapted:
    """Fine-tune the detector's models named in recipe.models (`models`: its segmenter, classifier and gate, and its
    refiner where it has one and it is fine-tuned, in PyTorch) to the device's fitted frames and measure the held-back ones before and after (see the module doc).
    `detector` is left as it was."""
    check_frames(frames, recipe.hold_back)
    held = held_back([frame.name for frame in frames], recipe.hold_back)
    fitted, checked = [f for f, h in zip(frames, held) if not h], [f for f, h in zip(frames, held) if h]
    before = labelled_figures(detector, checked, domain_name)
    taleqani_fields = records_per_domain(data_root, "val", ["all-taleqani"], recipe.verdict_fields)
    taleqani_fractions, malignant = taleqani_verdicts(detector, taleqani_fields)
    taleqani_before = VerdictCounts.of(taleqani_fractions, malignant, detector.verdict_spec["flag_fraction"])
    masks_before = mask_dice(detector, replay.mask_check)

    fields = device_fields(fitted, domain_name)
    segmenter, refiner = models["segmenter"], models.get("refiner")
    if "segmenter" in recipe.models:
        segmenter = fine_tune_segmenter(copy.deepcopy(segmenter), fields, replay.fields, detector, recipe)
    if refiner is not None and "refiner" in recipe.models:
        refiner = fine_tune_refiner(copy.deepcopy(refiner), device_masked_cells(fields, fitted), replay.masked_cells, detector, recipe)
    # The gate learns the proposals and the domain check the uncertainty of the new masks: the original gate and
    # classifier stand in meanwhile.
    masks_only = Adapted(segmenter, refiner, models["classifier"], models["gate"], detector.gate_spec["threshold"], detector.verdict_spec["flag_fraction"], detector.domain_spec, None)
    rng = np.random.default_rng(recipe.seed)
    examples, measures = [], []
    with applied(detector, masks_only):
        for frame in fitted:
            found = detector.candidates(frame.image)  # once a frame: the gate's examples and the domain check's measures
            examples.append(boxed_field_examples(detector, frame.image, found, frame.boxes, domain_name, rng))
            measures.append(FrameMeasure(colour_features(found.prepared, detector.spec, feature_names(detector.domain_spec)), segmenter_uncertainty(found.prepared, found.probabilities), False, False))
    gate, threshold, classifier = models["gate"], detector.gate_spec["threshold"], models["classifier"]
    if "gate" in recipe.models:
        gate = fine_tune_gate(copy.deepcopy(gate), GateExamples.concatenate(examples), replay.gate_train, recipe)
        threshold = choose_threshold(wbc_probabilities(gate, replay.gate_val.crops), replay.gate_val.labels, MIN_GATE_RECALL)
    if "classifier" in recipe.models:
        classifier = fine_tune_classifier(copy.deepcopy(classifier), device_cells(fitted, domain_name), replay.cells, detector, classifier_loss, recipe)
    domain = adapted_domain(detector.domain_spec, measures, labelled=True)
    adapted = Adapted(segmenter, refiner, classifier, gate, threshold, detector.verdict_spec["flag_fraction"], domain, None)
    with applied(detector, adapted):
        fractions, malignant_after = taleqani_verdicts(detector, taleqani_fields)
        device_fractions = [detector.run(frame.image, jpeg_quality=frame.jpeg_quality).verdict.flagging_fraction for frame in fitted]
        chosen, _ = choose_flag_fraction(fractions + device_fractions, malignant_after + [0] * len(fitted), adapted.flag_fraction)
        # The device's frames are all normal: they can argue for a stricter verdict, never for a more eager one.
        adapted.flag_fraction = max(chosen, adapted.flag_fraction)
        detector.verdict_spec = {**detector.verdict_spec, "flag_fraction": adapted.flag_fraction}
        after = labelled_figures(detector, checked, domain_name)
        masks_after = mask_dice(detector, replay.mask_check)
    taleqani_after = VerdictCounts.of(fractions, malignant_after, adapted.flag_fraction)
    problems = problems_of(before, after, taleqani_before, taleqani_after, masks_before, masks_after)
    adapted.report = LabelledReport(
        len(frames), len(checked), before, after, taleqani_before, taleqani_after, masks_before, masks_after, threshold, adapted.flag_fraction, problems
    )
    return adapted


@contextlib.contextmanager
def applied(detector: Detector, adapted: Adapted) -> Iterator[Detector]:
    """The detector with the adapted models (PyTorch), gate threshold, domain check and flag fraction, put back
    as it was on leaving."""
    original = (detector.segmenter, detector.refiner, detector.classifier, detector.gate, detector.gate_spec, detector.domain_spec, detector.verdict_spec)
    try:
        detector.segmenter = as_backend(detector.bundle, "segmenter", adapted.segmenter)
        if adapted.refiner is not None:
            detector.refiner = as_backend(detector.bundle, "refiner", adapted.refiner)
        with_torch_gate(detector, adapted.gate, adapted.gate_threshold)
        heads = detector.classifier_spec["heads"]
        detector.classifier = TorchBackend(ClassifierWithSoftmax(adapted.classifier, list(heads)), "crop", [head["output"] for head in heads.values()])
        detector.domain_spec = adapted.domain
        detector.verdict_spec = {**detector.verdict_spec, "flag_fraction": adapted.flag_fraction}
        yield detector
    finally:
        detector.segmenter, detector.refiner, detector.classifier, detector.gate, detector.gate_spec, detector.domain_spec, detector.verdict_spec = original


def adapt_bundle_with_labels(
    bundle_path: Path,
    frames: Sequence[LabelledFrame],
    out_dir: Path,
    data_root: Path,
    recipe: LabelledRecipe | None = None,
    checkpoints: Path | None = None,
    channel_order: str = "BGR",
) -> LabelledReport:
    """Labelled adaptation of a bundle (see the module doc); writes out_dir only if nothing got worse."""
    recipe = recipe or LabelledRecipe()
    check_frames(frames, recipe.hold_back)
    detector = Detector.load(bundle_path, channel_order=channel_order)
    if detector.gate_spec is None or detector.domain_spec is None:
        raise AdaptationRefused(f"bundle {detector.bundle.name} has no gate or domain check to adapt (made before 0.2.0); retrain it")
    heads = {name: head["classes"] for name, head in detector.classifier_spec["heads"].items()}
    if heads != HEADS:
        raise AdaptationRefused(f"bundle {detector.bundle.name}'s classifier heads {heads} are not the ones the training cells are labelled for ({HEADS})")
    names = ("segmenter", "classifier", "gate") + (("refiner",) if detector.refiner_spec and "refiner" in recipe.models else ())
    paths = checkpoint_paths(bundle_path, checkpoints, names)
    models = {name: verified_model(detector.bundle, name, paths[name]) for name in names}
    loss = detector.bundle.manifest.get("training", {}).get("classifier", {}).get("loss", "ce")
    replay = replay_from_data(detector, data_root, recipe)
    adapted = adapt_models(detector, models, frames, replay, data_root, recipe, classifier_loss=loss)
    if adapted.report.problems:
        return adapted.report
    modules = {name: getattr(adapted, name) for name in names if name in recipe.models}
    manifest = copy.deepcopy(detector.bundle.manifest)
    manifest["gate"]["threshold"] = adapted.gate_threshold
    manifest["verdict"]["flag_fraction"] = adapted.flag_fraction
    manifest["domain"] = adapted.domain
    for name in modules:
        dropped = manifest.get("precisions", {}).get(name, {}).pop("int8", None)
        if dropped:
            manifest["files"].pop(dropped["file"], None)
    frame_sha256 = [hashlib.sha256(np.ascontiguousarray(frame.image).tobytes()).hexdigest() for frame in frames]
    manifest["model_version"] = adapted_version(manifest["model_version"], frame_sha256)
    manifest["adaptation"] = {
        "date": dt.date.today().isoformat(),
        "labelled": True,
        "adapted": [manifest[name]["file"] for name in modules]
        + ["gate.threshold"] * ("gate" in modules)
        + ["verdict.flag_fraction", "domain.colour_references", "domain.max_colour_distance", "domain.max_uncertainty"],
        "frames": len(frames),
        "held_back": adapted.report.held_back,
        "frame_sha256": frame_sha256,
        "recipe": asdict(recipe),
        "gate": {
            "held_back_before": adapted.report.before,
            "held_back_after": adapted.report.after,
            "taleqani_val_flagged": [asdict(adapted.report.taleqani_before), asdict(adapted.report.taleqani_after)],
            "masks_val": [adapted.report.masks_before, adapted.report.masks_after],
        },
    }
    files = {name: detector.bundle.path(name) for name in manifest["files"]}
    with tempfile.TemporaryDirectory() as scratch:
        for name, module in modules.items():
            files[manifest[name]["file"]] = Path(scratch) / manifest[name]["file"]
            export_model(name, module, manifest[name], real_inputs(name, replay, detector), files[manifest[name]["file"]])
        save_bundle(Path(out_dir), manifest, files)
    # Beside the bundle, as `leukoedge train` leaves them: what a second adaptation or a calibration starts from.
    for name, module in modules.items():
        record = json.loads(paths[name].with_suffix(".json").read_text())
        save_checkpoint(module, {**record, "adaptation": manifest["adaptation"]["date"]}, checkpoint_paths(out_dir, models=(name,))[name])
    adapted.report.written = True
    return adapted.report


def real_inputs(model: str, replay: Replay, detector: Detector, count: int = 16) -> np.ndarray:
    """Inputs the exported model is checked on against PyTorch: replayed fields for the segmenter, replayed cells'
    crops for the refiner, the gate's replayed crops for the gate and the classifier."""
    if model == "segmenter":
        size = detector.segmenter_spec["input_size"]
        return np.stack([segmentation_sample(field.image, field.label_map, detector.spec, size, None)[0] for field in replay.fields[:count]])
    if model == "refiner":
        spec = detector.refiner_spec
        cells = replay.masked_cells[:count]
        return np.stack([refiner_sample(cell.image, cell.label_map, cell.box, detector.spec, spec["input_size"], spec["crop_margin"], None)[0] for cell in cells])
    return replay.gate_val.crops[: 2 * count].astype(np.float32)


def export_model(model: str, module: torch.nn.Module, spec: dict, inputs: np.ndarray, path: Path) -> None:
    """`module` to ONNX as the pipeline exports that model (export/onnx.py, parity-checked against PyTorch)."""
    if model in ("segmenter", "refiner"):
        export_segmenter(module, inputs, path, input_name=spec["input"])
    elif model == "gate":
        export_classifier(module, [GATE_HEAD], inputs, path)
    else:
        export_classifier(module, list(HEADS), inputs, path)
