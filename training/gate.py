"""The cell-or-not gate: is a cell the segmenter found a white cell, or a red cell, platelet or debris?

The field segmenter finds every stained blob; on a microscope it never saw, darker red cells and
platelets come out as "cells" and then as blasts. The gate is the papers' small CNN at half size (gate_cnn) with
one head, trained on what the segmenter actually proposes, cut exactly as the classifier's crops are
(so at run time one crop serves both):
- fields with boxes of every class (BCCD, TXL-PBC): a proposal matching a WBC box (IoU >= 0.4) is a white
  cell, one that overlaps no WBC box is not; plus crops around the annotated WBC, RBC and platelet boxes;
- single-cell sources with expert masks (Zheng, ALL-IDB2): the proposal matching the expert cell is a
  white cell, the others are not;
- PBC: the proposal at the centre is the labelled cell (a white cell unless the label is platelet or
  erythroblast), the others (red cells around it) are not; beside the evenly spaced sample, PBC's platelet and
  erythroblast images (look_alike_records) are a domain of their own, so every batch holds its share of them;
- Taleqani: proposals matching the weak blast masks are white cells; the others are left out (the weak
  masks miss cells, so "unmatched" does not mean "not a white cell").
Every training field is also seen as another device would show it (training/stain.augment_device, scale
0.6-1.6x). Proposals inside a WBC box that match it poorly (fragments) are left out: neither answer is right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from leukoedge.adapt import DEFAULT_ADAPTED_MODELS, DEFAULT_DEVICE_SHARE
from leukoedge.bundle import Bundle
from leukoedge.detector import Candidates, Detector
from leukoedge.preprocess.cpu import prepare_crops

from . import data
from .detection import box_iou, evenly_spaced, records_per_domain
from .models.classifiers import gate_cnn
from .stain import augment_device
from .verdict import flag_fraction_on

log = logging.getLogger("leukoedge.training")

GATE_HEAD = "wbc"
GATE_CLASSES = ["not_wbc", "wbc"]
POSITIVE_IOU = 0.4
WEAK_POSITIVE_IOU = 0.3  # Taleqani's weak masks run larger than the cells
NOT_WBC_TYPES = ("platelet", "erythroblast")  # PBC classes that are not white cells
MAX_BOX_NEGATIVES_PER_FIELD = 8  # annotated red cells per field taken as negatives (raabin fields hold ~30)
SCALE_RANGE = (0.6, 1.6)  # pixel size differs by objective and camera
GATE_SOURCES = ("bccd", "txl-pbc", "wbc-seg-zheng", "all-idb2", "pbc", "all-taleqani")
# A proposal at the frame's edge the gate rejects is read again whole, mirrored across the edge, and kept at this
# p(wbc) (Detector.gate_keeps): on the validation fields of the sources whose every white cell is boxed, no edge
# proposal that is not a white cell reads 0.9 whole, while most rejected edge white cells read more
# (scripts/edge_cells.py; docs/training.md, "Cells at the frame's edge").
EDGE_WHOLE_THRESHOLD = 0.9


@dataclass
class GateExamples:
    """Crops as the classifier takes them (N x 3 x H x W, float16 to halve memory), labels (1 white cell,
    0 not) and each crop's source/device (for balanced batches and leave-one-source-out)."""

    crops: np.ndarray
    labels: np.ndarray
    domains: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence["GateExamples"]) -> "GateExamples":
        parts = [part for part in parts if len(part.labels)]
        if not parts:
            return cls(np.zeros((0, 3, 1, 1), np.float16), np.zeros(0, np.int64), np.zeros(0, object))
        return cls(*(np.concatenate([getattr(part, name) for part in parts]) for name in ("crops", "labels", "domains")))

    def without(self, domain_prefix: str) -> "GateExamples":
        keep = np.array([not str(domain).startswith(domain_prefix) for domain in self.domains], bool)
        return GateExamples(self.crops[keep], self.labels[keep], self.domains[keep])


def label_proposals(record: data.Record, proposals: Sequence[data.Box], frame_shape: tuple[int, int], scale: float) -> list[int | None]:
    """1 white cell, 0 not, None left out, for each proposal box of a field (boxes in the scaled frame)."""
    truth = [tuple(int(round(v * scale)) for v in box) for box in data.wbc_boxes(record)]
    if record.source == "pbc":
        height, width = frame_shape
        centre = (width / 2, height / 2)
        centre_index = _proposal_at(proposals, centre)
        central_label = 0 if record.wbc_type in NOT_WBC_TYPES else 1
        return [central_label if index == centre_index else 0 for index in range(len(proposals))]
    if record.source == "all-taleqani":
        best = box_iou(proposals, truth).max(axis=1) if truth else np.zeros(len(proposals))
        return [1 if value >= WEAK_POSITIVE_IOU else None for value in best]
    return labels_from_boxes(proposals, truth)


def labels_from_boxes(proposals: Sequence[data.Box], truth: Sequence[data.Box]) -> list[int | None]:
    """For a field whose white cells are all boxed: 1 for a proposal matching a box, None for a fragment of
    one (its centre inside a box), 0 for the rest."""
    iou = box_iou(proposals, truth)
    best = iou.max(axis=1) if len(truth) else np.zeros(len(proposals))
    labels: list[int | None] = []
    for index, box in enumerate(proposals):
        if best[index] >= POSITIVE_IOU:
            labels.append(1)
        elif any(_inside(_centre(box), wbc) for wbc in truth):
            labels.append(None)  # a fragment of a white cell
        else:
            labels.append(0)
    return labels


def _centre(box: data.Box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _inside(point: tuple[float, float], box: data.Box) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def _proposal_at(proposals: Sequence[data.Box], point: tuple[float, float]) -> int | None:
    """The proposal whose box holds the point, nearest its centre first; None if none holds it."""
    holding = [index for index, box in enumerate(proposals) if _inside(point, box)]
    if not holding:
        return None
    return min(holding, key=lambda index: np.hypot(*np.subtract(_centre(proposals[index]), point)))


def field_examples(detector: Detector, record: data.Record, frame: np.ndarray, scale: float, rng: np.random.Generator) -> GateExamples:
    """The gate's examples from one (possibly augmented and rescaled) field."""
    found = detector.candidates(frame)
    proposals = [instance.classifier_box for instance in found.instances]
    labels = label_proposals(record, proposals, frame.shape[:2], scale)
    annotated = {name: [tuple(int(round(v * scale)) for v in box) for box in boxes] for name, boxes in data.object_boxes(record).items()}
    return _examples_of(detector, frame, found.prepared, proposals, labels, annotated, record.domain, rng)


def boxed_field_examples(
    detector: Detector, frame: np.ndarray, found: Candidates, boxes: dict[str, list[data.Box]], domain: str, rng: np.random.Generator
) -> GateExamples:
    """The gate's examples from a field of any microscope whose objects are boxed (data.read_boxes); `found`: the
    detector's candidates of the frame."""
    proposals = [instance.classifier_box for instance in found.instances]
    return _examples_of(detector, frame, found.prepared, proposals, labels_from_boxes(proposals, boxes.get("WBC", [])), boxes, domain, rng)


def _examples_of(
    detector: Detector,
    frame: np.ndarray,
    prepared,
    proposals: Sequence[data.Box],
    labels: Sequence[int | None],
    annotated: dict[str, list[data.Box]],
    domain: str,
    rng: np.random.Generator,
) -> GateExamples:
    """Crops of the labelled proposals, plus the annotated white cells and up to MAX_BOX_NEGATIVES_PER_FIELD
    annotated red cells and platelets, cut as the classifier's crops."""
    chosen = [(box, label) for box, label in zip(proposals, labels) if label is not None]
    if annotated:
        chosen += [(box, 1) for box in annotated.get("WBC", [])]
        others = annotated.get("RBC", []) + annotated.get("Platelets", [])
        for index in rng.permutation(len(others))[:MAX_BOX_NEGATIVES_PER_FIELD]:
            chosen.append((others[index], 0))
    if not chosen:
        return GateExamples.concatenate([])
    spec = detector.classifier_spec
    crops = prepare_crops(
        frame, [box for box, _ in chosen], detector.spec, spec["input_size"], spec["crop_margin"], prepared.lab_statistics, detector.channel_order, prepared.halved
    )
    return GateExamples(crops.astype(np.float16), np.array([label for _, label in chosen], np.int64), np.array([domain] * len(chosen), object))


def collect_examples(
    detector: Detector, records: Sequence[data.Record], augmented_copies: int, seed: int, description: str = "gate examples"
) -> GateExamples:
    """Every record as it is, plus `augmented_copies` device-augmented and rescaled versions of it."""
    rng = np.random.default_rng(seed)
    parts = []
    for record in tqdm(records, desc=description, unit="field"):
        image = data.read_image(record)
        for copy in range(1 + augmented_copies):
            frame, scale = image, 1.0
            if copy:
                scale = float(np.exp(rng.uniform(*np.log(SCALE_RANGE))))
                size = (max(16, int(round(image.shape[1] * scale))), max(16, int(round(image.shape[0] * scale))))
                frame = augment_device(cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR), rng)
            parts.append(field_examples(detector, record, frame, scale, rng))
    return GateExamples.concatenate(parts)


def gate_records(data_root: Path, split: str, per_source: int | None, sources: Sequence[str] = GATE_SOURCES) -> list[data.Record]:
    """A split's fields of every gate source, at most `per_source` per source/device (evenly spaced)."""
    return records_per_domain(data_root, split, sources, per_source)


LOOK_ALIKE_DOMAIN = "pbc/look-alike"  # the domain of look_alike_records' examples: a share of every batch of its own
LOOK_ALIKES_PER_FIELD = 3  # look-alike images per field of each source: 360 for the shipped 120, all of PBC's 348


def look_alike_records(data_root: Path, split: str, per_source: int | None) -> list[data.Record]:
    """PBC platelet and erythroblast images of the split that gate_records leaves out, at most LOOK_ALIKES_PER_FIELD x
    per_source (evenly spaced). They are what a gate confuses with white cells (an erythroblast's round dense
    nucleus is a small lymphocyte's), and the evenly spaced sample of PBC holds 15 of each among its 120 fields."""
    sampled = {record.image_path for record in gate_records(data_root, split, per_source, ("pbc",))}
    records = [record for record in data.load_records(data_root, "pbc", split) if record.wbc_type in NOT_WBC_TYPES and record.image_path not in sampled]
    return evenly_spaced(records, None if per_source is None else LOOK_ALIKES_PER_FIELD * per_source)


def _balanced_batch(examples: GateExamples, rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """Indices: half white cells, half not, each half spread evenly over the domains that have any."""
    chosen = []
    for label in (0, 1):
        domains = sorted({domain for domain, value in zip(examples.domains, examples.labels) if value == label})
        per_domain = max(1, batch_size // (2 * max(1, len(domains))))
        for domain in domains:
            pool = np.flatnonzero((examples.labels == label) & (examples.domains == domain))
            chosen.append(rng.choice(pool, per_domain))
    return np.concatenate(chosen)


def _augment_crops(crops: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flips and quarter turns: a cell has no up or down."""
    if rng.random() < 0.5:
        crops = crops.flip(3)
    return torch.rot90(crops, int(rng.integers(4)), dims=(2, 3)).contiguous()


def train_gate(examples: GateExamples, steps: int, seed: int = 0, batch_size: int = 128, learning_rate: float = 2e-3) -> torch.nn.Module:
    """gate_cnn with one head ("wbc": not_wbc, wbc), class- and domain-balanced batches, cosine schedule."""
    if not (examples.labels == 0).any() or not (examples.labels == 1).any():
        raise ValueError("the gate needs examples of white cells and of other objects")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = gate_cnn({GATE_HEAD: len(GATE_CLASSES)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(2, steps))
    model.train()
    for _ in tqdm(range(steps), desc="gate", unit="step"):
        indices = _balanced_batch(examples, rng, batch_size)
        crops = _augment_crops(torch.from_numpy(examples.crops[indices].astype(np.float32)), rng)
        loss = torch.nn.functional.cross_entropy(model(crops)[GATE_HEAD], torch.from_numpy(examples.labels[indices]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def wbc_probabilities(model: torch.nn.Module, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The gate's probability that each crop is a white cell."""
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            logits = model(torch.from_numpy(crops[start : start + batch_size].astype(np.float32)))[GATE_HEAD]
            parts.append(logits.softmax(dim=1)[:, 1].numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, min_recall: float) -> float:
    """The highest threshold that keeps at least `min_recall` of the white cells: a missed white cell
    costs a count, a kept red cell can cost a false flag, so the gate is as strict as the recall allows."""
    positives = np.sort(probabilities[labels == 1])
    if not len(positives):
        raise ValueError("no white cells to choose the gate's threshold on")
    index = int(np.floor((1.0 - min_recall) * len(positives)))
    return float(positives[min(index, len(positives) - 1)])


GATE_SPEC_BASE = {"architecture": "gate_cnn", "file": "gate.onnx", "input": "crop", "output": f"{GATE_HEAD}_probs", "classes": GATE_CLASSES}
MIN_GATE_RECALL = 0.98  # of the validation white cells; see choose_threshold


def gate_spec(classifier_spec: dict, threshold: float) -> dict:
    """The manifest's "gate" section: crops cut as the classifier's (one crop serves both at run time)."""
    not_white = {
        head: [name for name in spec["classes"] if name in NOT_WBC_TYPES]
        for head, spec in classifier_spec["heads"].items()
        if any(name in NOT_WBC_TYPES for name in spec["classes"])
    }
    return {
        **GATE_SPEC_BASE,
        "input_size": list(classifier_spec["input_size"]),
        "crop_margin": classifier_spec["crop_margin"],
        "threshold": float(threshold),
        "edge_whole_threshold": EDGE_WHOLE_THRESHOLD,
        "not_white_cell_classes": not_white,
    }


def with_torch_gate(detector: Detector, model: torch.nn.Module, threshold: float) -> Detector:
    """The detector with `model` as its gate (PyTorch, through the Backend protocol)."""
    from leukoedge.export.onnx import ClassifierWithSoftmax

    from .torch_backend import TorchBackend

    detector.gate_spec = gate_spec(detector.classifier_spec, threshold)
    detector.gate = TorchBackend(ClassifierWithSoftmax(model, [GATE_HEAD]), "crop", [detector.gate_spec["output"]])
    return detector


@dataclass
class FrameDomain:
    """Domain-check inputs of a set of frames: colour features, segmenter uncertainty, median white-cell side, edge
    width and noise level (NaN where the frame has no white cell), the JPEG quality of its file (NaN for another
    format), source/device."""

    colour: np.ndarray
    uncertainty: np.ndarray
    domains: np.ndarray
    cell_side: np.ndarray
    edge_width: np.ndarray
    noise: np.ndarray
    jpeg_quality: np.ndarray

    def scores(self, index: int) -> dict[str, float]:
        """The frame's cell scores as the runtime's domain_scores names them (the ones it has)."""
        values = {"edge_width": self.edge_width[index], "noise": self.noise[index]}
        return {name: float(value) for name, value in values.items() if np.isfinite(value)}

    def fit(self, left_out: str | None = None) -> dict:
        """The manifest's "domain" section fitted on these frames (less one source/device)."""
        from leukoedge.domain import fit_domain

        keep = np.ones(len(self.domains), bool) if left_out is None else np.array([not d.startswith(left_out) for d in self.domains])
        return fit_domain(
            self.colour[keep], self.uncertainty[keep], list(self.domains[keep]),
            cell_sides=self.cell_side[keep], edge_widths=self.edge_width[keep], noise_levels=self.noise[keep], jpeg_qualities=self.jpeg_quality[keep],
        )


def frame_domain(detector: Detector, records: Sequence[data.Record], description: str = "domain check") -> FrameDomain:
    """The domain-check inputs of each record's frame through the detector, its gate included (the cells it keeps
    are the ones whose size the check reads)."""
    from leukoedge.decode import file_jpeg_quality
    from leukoedge.domain import colour_features, edge_width, median_cell_side, noise_level, segmenter_uncertainty

    colour, uncertainty, cell_side, width, noise = [], [], [], [], []
    for record in tqdm(records, desc=description, unit="field"):
        image = data.read_image(record)
        found = detector.candidates(image)
        colour.append(colour_features(found.prepared, detector.spec))
        uncertainty.append(segmenter_uncertainty(found.prepared, found.probabilities))
        boxes = [cell.box for cell in detector.white_cells(image, found)[0]]
        side, edges, noisy = median_cell_side(boxes), edge_width(image, boxes, found.prepared.halved), noise_level(image, boxes)
        cell_side.append(np.nan if side is None else side)
        width.append(np.nan if edges is None else edges)
        noise.append(np.nan if noisy is None else noisy)
    domains = np.array([record.domain for record in records], object)
    qualities = np.array([np.nan if (quality := file_jpeg_quality(record.image_path)) is None else quality for record in records], np.float64)
    return FrameDomain(
        np.array(colour), np.array(uncertainty), domains, np.array(cell_side, np.float64), np.array(width, np.float64), np.array(noise, np.float64), qualities
    )


def validation_domain(detector: Detector, data_root: Path, per_source: int) -> dict:
    """The manifest's "domain" section fitted on per_source validation fields of every source/device, through the
    detector's own segmenter (the bundle a gate build writes; scripts/refit_domain.py for a swapped segmenter)."""
    return frame_domain(detector, gate_records(data_root, "val", per_source)).fit()


def check_same_crops(bundle: Bundle, other: Bundle) -> None:
    """ValueError unless `other` prepares frames and cuts cell crops as `bundle` does: its proposals' crops then
    are what `bundle`'s gate will see at run time."""
    manifest, theirs = bundle.manifest, other.manifest
    differing = ["preprocess"] if manifest["preprocess"] != theirs["preprocess"] else []
    differing += [f"classifier.{key}" for key in ("input_size", "crop_margin") if manifest["classifier"][key] != theirs["classifier"][key]]
    if differing:
        raise ValueError(f"{other.root} prepares its cells otherwise than {bundle.root} ({', '.join(differing)} differ): its proposals cannot teach this bundle's gate")


def proposing_detectors(bundle: Path, proposals_from: Sequence[Path]) -> list[Detector]:
    """The bundle's detector, then those of the bundles whose segmenters also propose the gate's examples."""
    detectors = [Detector.load(path) for path in (bundle, *proposals_from)]
    for other in detectors[1:]:
        check_same_crops(detectors[0].bundle, other.bundle)
    return detectors


def proposer(detector: Detector) -> dict[str, str]:
    """How a manifest names a bundle whose segmenter proposed gate examples: its segmenter's architecture and file hash."""
    manifest = detector.bundle.manifest
    return {"segmenter": manifest["segmenter"].get("architecture", "?"), "sha256": manifest["files"][manifest["segmenter"]["file"]]}


def collected_examples(data_root: Path, bundle: Path, recipe: "GateRecipe", cache: Path | None) -> tuple[list[Detector], GateExamples, GateExamples]:
    """The proposing detectors (the bundle's first, then recipe.proposals_from's) and the training and validation
    examples collected through them."""
    detectors = proposing_detectors(bundle, [Path(path) for path in recipe.proposals_from])
    train = _examples(detectors, data_root, "train", recipe.train_per_source, recipe.augmented_copies, cache)
    validation = _examples(detectors, data_root, "val", recipe.val_per_source, 0, cache)
    return detectors, train, validation


def _examples(detectors: Sequence[Detector], data_root: Path, split: str, per_source: int, copies: int, cache: Path | None) -> GateExamples:
    """Collected examples of a split, through each detector's segmenter in turn (GateRecipe.proposals_from)."""
    return GateExamples.concatenate([split_examples(detector, data_root, split, per_source, copies, cache) for detector in detectors])


def split_examples(detector: Detector, data_root: Path, split: str, per_source: int, copies: int, cache: Path | None) -> GateExamples:
    """Collected examples of a split through one detector, read from / written to `cache` (an .npz per split,
    setting and segmenter file) if given."""
    manifest = detector.bundle.manifest
    segmenter = manifest["files"][manifest["segmenter"]["file"]][:12]  # another segmenter proposes other cells
    path = None if cache is None else Path(cache) / f"gate-{split}-{per_source}-{copies}-look-alikes-{segmenter}.npz"
    if path is not None and path.is_file():
        stored = np.load(path, allow_pickle=False)
        return GateExamples(stored["crops"], stored["labels"], stored["domains"].astype(object))
    seed = 0 if split == "train" else 1
    examples = collect_examples(detector, gate_records(data_root, split, per_source), copies, seed, description=f"gate examples ({split})")
    look_alikes = collect_examples(detector, look_alike_records(data_root, split, per_source), copies, seed + 2, description=f"platelets and erythroblasts ({split})")
    look_alikes.domains[:] = LOOK_ALIKE_DOMAIN
    examples = GateExamples.concatenate([examples, look_alikes])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, crops=examples.crops, labels=examples.labels, domains=examples.domains.astype(str))
    return examples


@dataclass
class GateRecipe:
    """How the gate is trained and its figures measured; the defaults made the shipped gate (docs/training.md)."""

    steps: int = 1000
    train_per_source: int = 120  # training fields per source/device
    augmented_copies: int = 2  # device-augmented versions of each training field
    val_per_source: int = 40  # validation fields per source/device: the gate's threshold and the domain check
    eval_split: str = "test"
    eval_per_source: int = 60  # normal fields per source/device in the figures
    seed: int = 0
    # Bundles whose field segmenters also propose the training and validation cells (the same preprocessing and
    # crops): the gate then learns what a white cell is, not one segmenter's habits.
    proposals_from: tuple[str, ...] = ()


def leave_one_source_out(
    data_root: Path,
    bundle: Path,
    left_out: Sequence[str],
    recipe: GateRecipe,
    cache: Path | None = None,
    labelled_frames: int = 0,
    labelled_models: Sequence[str] = DEFAULT_ADAPTED_MODELS,
    labelled_share: float = DEFAULT_DEVICE_SHARE,
) -> list[dict]:
    """For each left-out source/device: the gate and domain check fitted without it, the detector's
    figures on its fields, before and after `leukoedge adapt` with its unlabelled training fields, and with
    labelled_frames > 0 after `leukoedge adapt --labels` with that many of its boxed training fields (the bundle's
    classifier checkpoint beside it, training/torch_backend.checkpoint_paths). Rows as
    training/detection.detection_figures plus "left_out" and "adapted" (False, True or "labelled"). The bundle's
    classifier should have been trained without the left-out source too (leukoedge train
    --classification-sources); same-source figures are `leukoedge evaluate`'s."""
    from leukoedge.adapt import FrameMeasure, adapted_domain

    from .detection import detection_figures, normal_records

    detectors, train, validation = collected_examples(data_root, bundle, recipe, cache)
    detector = detectors[0]
    validation_frames = frame_domain(detector, gate_records(data_root, "val", recipe.val_per_source))
    evaluated = normal_records(data_root, recipe.eval_split, limit=recipe.eval_per_source)
    rows = []
    for source in left_out:
        model, threshold = apply_left_out(detector, train, validation, validation_frames, source, recipe)
        fields = [r for r in evaluated if r.domain.startswith(source)]
        for row in detection_figures(detector, fields, f"left out {source}"):
            rows.append({**row, "left_out": source, "adapted": False, "gate_threshold": threshold, "uncertainty_bar": detector.domain_spec["max_uncertainty"]})
        device = frame_domain(detector, [r for r in gate_records(data_root, "train", recipe.train_per_source) if r.domain.startswith(source)], f"adapt to {source}")
        measures = [FrameMeasure(c, u, False, False, scores=device.scores(index)) for index, (c, u) in enumerate(zip(device.colour, device.uncertainty))]
        detector.domain_spec = adapted_domain(detector.domain_spec, measures)
        for row in detection_figures(detector, fields, f"adapted to {source}"):
            rows.append({**row, "left_out": source, "adapted": True, "gate_threshold": threshold, "uncertainty_bar": detector.domain_spec["max_uncertainty"]})
        if labelled_frames:
            kept_train, kept_val = train.without(source), validation.without(source)
            rows += _labelled_rows(detector, model, data_root, bundle, source, kept_train, kept_val, fields, labelled_frames, recipe, labelled_models, labelled_share)
    return rows


def apply_left_out(
    detector: Detector, train: GateExamples, validation: GateExamples, validation_frames: FrameDomain, source: str, recipe: GateRecipe
) -> tuple[torch.nn.Module, float]:
    """Put on the detector a gate trained, and a domain check fitted, without `source` (a source/device); returns the
    gate and its threshold."""
    kept_train, kept_val = train.without(source), validation.without(source)
    model = train_gate(kept_train, recipe.steps, recipe.seed)
    threshold = choose_threshold(wbc_probabilities(model, kept_val.crops), kept_val.labels, MIN_GATE_RECALL)
    with_torch_gate(detector, model, threshold)
    detector.domain_spec = validation_frames.fit(source)
    return model, threshold


def _labelled_rows(
    detector: Detector,
    gate: torch.nn.Module,
    data_root: Path,
    bundle: Path,
    source: str,
    kept_train: GateExamples,
    kept_val: GateExamples,
    fields: Sequence[data.Record],
    count: int,
    recipe: GateRecipe,
    models: Sequence[str] = DEFAULT_ADAPTED_MODELS,
    device_share: float = DEFAULT_DEVICE_SHARE,
) -> list[dict]:
    """The figures on `fields` after labelled adaptation to `count` boxed training fields of `source`."""
    from .adapt import LabelledFrame, LabelledRecipe, adapt_models, applied, replay_cells, replay_with_masks
    from .detection import detection_figures
    from .torch_backend import checkpoint_paths, verified_model

    adapt_recipe = LabelledRecipe(seed=recipe.seed, models=tuple(models), device_share=device_share)
    records = [r for r in records_per_domain(data_root, "train", [source.split("/")[0]]) if r.domain.startswith(source) and r.label_path is not None][:count]
    frames = [LabelledFrame(r.image_path.name, data.read_image(r), data.object_boxes(r)) for r in records]
    names = ("segmenter", "classifier") + (("refiner",) if detector.refiner_spec and "refiner" in adapt_recipe.models else ())
    models = {name: verified_model(detector.bundle, name, path) for name, path in checkpoint_paths(bundle, models=names).items()}
    cells = replay_cells(detector, data_root, adapt_recipe.replay_per_source, leave_out=source)
    replay = replay_with_masks(kept_train, kept_val, cells, data_root, adapt_recipe, leave_out=source)
    adapted = adapt_models(detector, {**models, "gate": gate}, frames, replay, data_root, adapt_recipe, domain_name=source)
    log.info("labelled adaptation to %s:\n%s", source, "\n".join(adapted.report.lines()))
    with applied(detector, adapted):
        rows = detection_figures(detector, fields, f"adapted with labels to {source}")
    return [{**row, "left_out": source, "adapted": "labelled", "gate_threshold": adapted.gate_threshold, "report": adapted.report} for row in rows]


def build_gated_bundle(data_root: Path, bundle: Path, out_dir: Path, recipe: GateRecipe, cache: Path | None = None, checkpoint: Path | None = None):
    """The bundle with a gate (trained on every source) and a domain check (fitted on validation frames)."""
    import copy
    import tempfile

    from leukoedge.bundle import save_bundle
    from leukoedge.export.onnx import export_classifier

    from .flops import count_flops
    from .train import save_checkpoint

    detectors, train, validation = collected_examples(data_root, bundle, recipe, cache)
    detector = detectors[0]
    model = train_gate(train, recipe.steps, recipe.seed)
    probabilities = wbc_probabilities(model, validation.crops)
    threshold = choose_threshold(probabilities, validation.labels, MIN_GATE_RECALL)
    with_torch_gate(detector, model, threshold)
    domain = validation_domain(detector, data_root, recipe.val_per_source)
    detector.domain_spec = domain
    manifest = copy.deepcopy(detector.bundle.manifest)
    # The gate changes which cells a field's blast fraction counts: the flag fraction is chosen again, on
    # the Taleqani validation fields, as the pipeline chose it (training/verdict.flag_fraction_on).
    manifest["verdict"]["flag_fraction"], verdict_choice = flag_fraction_on(detector, data.load_records(data_root, "all-taleqani", "val"))
    manifest.setdefault("training", {})["verdict_with_gate"] = verdict_choice
    size = manifest["classifier"]["input_size"]
    manifest["gate"] = {
        **gate_spec(manifest["classifier"], threshold),
        "flops": count_flops(model, (1, 3, *size)),
        "validation": {
            "white_cells": int((validation.labels == 1).sum()),
            "other_objects": int((validation.labels == 0).sum()),
            "white_cells_kept": float((probabilities[validation.labels == 1] >= threshold).mean()),
            "other_objects_rejected": float((probabilities[validation.labels == 0] < threshold).mean()),
        },
    }
    manifest["domain"] = domain
    recorded = {**vars(recipe), "proposals_from": [proposer(other) for other in detectors[1:]]}  # what proposed, not where it lay
    recorded["look_alikes_per_field"] = LOOK_ALIKES_PER_FIELD
    recorded["look_alike_examples"] = int((train.domains == LOOK_ALIKE_DOMAIN).sum())
    manifest.setdefault("training", {})["gate"] = {**recorded, "sources": list(GATE_SOURCES), "examples": int(len(train.labels))}
    if "precisions" in manifest:
        manifest["precisions"]["gate"] = {"fp32": {"file": "gate.onnx", "median_ms": None}}
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = Path(scratch) / "gate.onnx"
        export_classifier(model, [GATE_HEAD], validation.crops[:64].astype(np.float32), onnx_path)
        files = {name: detector.bundle.path(name) for name in manifest["files"]}
        files["gate.onnx"] = onnx_path
        saved = save_bundle(Path(out_dir), manifest, files)
    if checkpoint is not None:
        save_checkpoint(model, {"model": "gate_cnn", "heads": {GATE_HEAD: GATE_CLASSES}, "recipe": recorded}, checkpoint)
    return saved
