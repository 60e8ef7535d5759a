"""Training loops for the segmenter and the cell classifier (CPU friendly: minutes on 2 cores).

Checkpoints are plain state_dicts plus a JSON config; they are read back with weights_only=True.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from leukoedge.preprocess.cpu import PreprocessSpec

from .data import LABEL_IGNORE, LABEL_WBC
from .models import create_model
from .samples import BOX_JITTER, capture_degraded, chroma_turned, classification_sample, resolution_lowered, device_view_crop, random_crop, refiner_sample, segmentation_sample

log = logging.getLogger("leukoedge.training")


@dataclass
class SegmentationExample:
    """One training image with its label map (values 0/1/2, 3 = WBC part unknown, 255 = ignore)."""

    source: str
    image: np.ndarray
    label_map: np.ndarray


@dataclass
class CellMaskExample:
    """One masked cell (expert or weak mask), for the per-cell refiner: the image, its label map and the cell's box."""

    source: str
    image: np.ndarray
    label_map: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class CellExample:
    """One cell: image, its box, and a target per head (-1 = no label for that head)."""

    source: str
    image: np.ndarray
    box: tuple[int, int, int, int]
    targets: dict[str, int]


CellSampler = Callable[[CellExample, np.random.Generator | None], np.ndarray]


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, ignore_index: int = -1) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, so examples the model
    already gets right with confidence count less; mean over the labelled examples. gamma 0 is plain CE."""
    labelled = targets != ignore_index
    log_p_true = F.log_softmax(logits[labelled], dim=1).gather(1, targets[labelled, None])[:, 0]
    return (-((1.0 - log_p_true.exp()) ** gamma) * log_p_true).mean()


def focal_plus_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE keeps every example's gradient; the focal term (gamma 2) adds weight on the hard ones."""
    return F.cross_entropy(logits, targets, ignore_index=-1) + focal_loss(logits, targets, gamma=2.0)


CLASSIFIER_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": partial(F.cross_entropy, ignore_index=-1),
    "focal_ce": focal_plus_cross_entropy,
}


@dataclass
class TrainConfig:
    model: str
    input_size: tuple[int, int]
    steps: int
    batch_size: int
    learning_rate: float = 2e-3
    crop: int | None = None  # segmentation: train on random crops of this size (fully convolutional model)
    validate_every: int = 100
    patience: int = 5  # validations without improvement before early stopping, counted in the second half only
    seed: int = 0
    model_kwargs: dict = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint to start from (fine-tuning); with steps=0 it is used as it is
    source_weights: dict[str, float] = field(default_factory=dict)  # relative sampling weight per source (default 1 each)
    # A checkpoint (e.g. a refiner ensemble, a larger classifier, the shipped segmenter for a lighter one)
    # whose class probabilities the model learns too (distillation).
    teacher: str | None = None
    # Validate and keep an exponential moving average of the weights (this decay per step) instead of the
    # weights as they are at each validation: a run's result then depends less on one noisy step.
    ema_decay: float | None = None
    # Segmenter and classifier: strength of the other-microscope view (samples: augment_device, device_view) given to half the samples; 0: none.
    device_augment: float = 0.0
    # Classifier: strength of the colour augmentation (samples.classification_sample, stain.augment_chroma); 0: none.
    chroma_augment: float = 0.0
    # Classifier: the share of crops seen at lower resolution (samples.resolution_lowered); 0: none.
    resolution_augment: float = 0.0
    # Classifier: the share of crops cut from the frame with camera noise and JPEG added (samples.capture_degraded);
    # 0: none. With a teacher, the teacher answers on the same crop without them: the student learns to answer on a
    # noisy or compressed frame what the teacher answers on the frame as captured.
    capture_augment: float = 0.0
    # Classifier with a teacher: the weight of the labels' loss beside the teacher's (1: both count alike; 0: it learns
    # the teacher's probabilities alone, keeping its calibration where it is fine-tuned for faults only).
    label_weight: float = 1.0
    # Classifier with a teacher: the softmax temperature both answer at in the teacher's loss (Hinton et al., 2015), the
    # loss scaled by its square. 1: the probabilities as they are; above 1, a confident teacher's logits still say how
    # far each cell is from the other class, which a student that must keep the teacher's blast threshold needs.
    distill_temperature: float = 1.0
    # Classifier: how far its training boxes move and change size (samples.jitter_box): a segmenter's boxes differ
    # from the expert's, and from another segmenter's, by a few pixels (scripts/framing_sensitivity.py).
    box_jitter: tuple[float, float] = BOX_JITTER

    def __post_init__(self) -> None:
        if self.teacher is not None and self.steps == 0:
            raise ValueError("a teacher needs training steps: with 0 steps the model is kept as it is")
        if self.label_weight != 1.0 and self.teacher is None:
            raise ValueError("a label weight other than 1 needs a teacher: without one the labels are all the model learns")
        if self.distill_temperature <= 0:
            raise ValueError(f"the distillation temperature must be positive; got {self.distill_temperature}")
        if self.distill_temperature != 1.0 and self.teacher is None:
            raise ValueError("a distillation temperature needs a teacher")
        check_ema_decay(self.ema_decay)


def check_ema_decay(decay: float | None) -> None:
    """ValueError unless decay is None (no moving average) or strictly between 0 and 1."""
    if decay is not None and not 0.0 < decay < 1.0:
        raise ValueError(f"the weights' moving-average decay must be between 0 and 1 (exclusive); got {decay}")


def _initial_model(config: TrainConfig, **model_kwargs) -> torch.nn.Module:
    """A fresh model, or one loaded from config.init_from (weights only, no pickle). Fresh weights come
    from config.seed alone, not from whatever the models built before this one drew."""
    torch.manual_seed(config.seed)
    model = create_model(config.model, **config.model_kwargs, **model_kwargs)
    if config.init_from is not None:
        model.load_state_dict(torch.load(config.init_from, map_location="cpu", weights_only=True))
    elif config.steps == 0:
        raise ValueError(f"{config.model}: 0 training steps needs a checkpoint to start from (init_from)")
    model.eval()
    return model


def _recorded_training(checkpoint: str) -> dict:
    """How a reused checkpoint was trained (its JSON), so a bundle built from it keeps that record."""
    recorded = json.loads(Path(checkpoint).with_suffix(".json").read_text())
    return recorded.get("checkpoint_training", recorded)  # a reuse of a reuse points at the original training


def _reuse_record(config: TrainConfig, **extra) -> dict:
    """The summary of a 0-step training: the checkpoint kept as it is, and how that one was trained."""
    return {
        "config": asdict(config),
        **extra,
        "pretraining": pretraining_of(config.init_from),
        "reused_checkpoint": config.init_from,
        "checkpoint_training": _recorded_training(config.init_from),
    }


NO_PRETRAINING = "none: trained from scratch (no ImageNet weights can be downloaded here)"


def pretraining_of(checkpoint: str | Path | None) -> str:
    """How the weights a training starts from began. Every checkpoint this code saves records it
    ("pretraining" in its JSON, passed on at each fine-tuning), so one level is read: no chain of
    init_from paths to follow, which may point at files long gone."""
    if checkpoint is None:
        return NO_PRETRAINING
    return _recorded_training(str(checkpoint)).get("pretraining", NO_PRETRAINING)  # checkpoints from before the record: from scratch


def balanced_indices(sources: Sequence[str], count: int, rng: np.random.Generator, source_weights: dict[str, float] | None = None) -> np.ndarray:
    """Sample indices so each source contributes equally whatever its size, or in proportion to
    source_weights (source -> relative weight, default 1)."""
    sources = np.asarray(sources)
    names, counts = np.unique(sources, return_counts=True)
    source_weights = source_weights or {}
    weight_of = {name: source_weights.get(name, 1.0) / (len(names) * n) for name, n in zip(names, counts)}
    weights = np.array([weight_of[s] for s in sources])
    return rng.choice(len(sources), size=count, p=weights / weights.sum())


# A blast's nucleus fills most of the cell (high nucleus:cytoplasm ratio), so at least this share of
# every weakly labelled (Taleqani) cell must be nucleus. Without it, "all cytoplasm" satisfies the weak
# label, and a model fine-tuned long enough stops finding nuclei, hence cells, in Taleqani fields.
WEAK_CELL_MIN_NUCLEUS_SHARE = 0.3


def weak_cell_components(labels: np.ndarray) -> list[list[np.ndarray]]:
    """Per image, the flat pixel indices of each connected weak-WBC cell."""
    cells = []
    for image_labels in labels:
        count, components = cv2.connectedComponents((image_labels == LABEL_WBC).astype(np.uint8), connectivity=8)
        flat = components.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(1, count + 1))
        cells.append([order[bounds[i] : bounds[i + 1]] for i in range(count - 1)])
    return cells


def weak_nucleus_loss(nucleus_probability: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Multiple-instance term: in each weak cell, the WEAK_CELL_MIN_NUCLEUS_SHARE of pixels most likely
    to be nucleus are pushed towards nucleus (which pixels is left to the model)."""
    terms = []
    for image, cells in enumerate(weak_cell_components(labels.numpy())):
        flat = nucleus_probability[image].reshape(-1)
        for pixels in cells:
            count = max(1, int(np.ceil(WEAK_CELL_MIN_NUCLEUS_SHARE * len(pixels))))
            top = torch.topk(flat[torch.from_numpy(pixels)], count).values
            terms.append(-torch.log(top + 1e-6).mean())
    return torch.stack(terms).mean() if terms else None


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on labelled pixels, -log P(WBC) on weak WBC pixels plus a nucleus share in each
    weak cell, soft Dice on nucleus and cell."""
    probabilities = logits.softmax(dim=1)
    strong = (labels != LABEL_IGNORE) & (labels != LABEL_WBC)
    strong_labels = torch.where(strong, labels, torch.full_like(labels, LABEL_IGNORE)).long()
    loss = F.cross_entropy(logits, strong_labels, ignore_index=LABEL_IGNORE) if strong.any() else logits.sum() * 0
    weak = labels == LABEL_WBC
    if weak.any():
        loss = loss - torch.log(probabilities[:, 1:].sum(dim=1)[weak] + 1e-6).mean()
        nucleus_term = weak_nucleus_loss(probabilities[:, 2], labels)
        if nucleus_term is not None:
            loss = loss + nucleus_term
    # A weak pixel may be nucleus or cytoplasm: the nucleus Dice leaves it out (counting it would teach
    # "not nucleus" on every weak cell, against the nucleus-share term above); the cell Dice counts it.
    for target_probability, target_mask, valid in (
        (probabilities[:, 2], labels == 2, strong),
        (probabilities[:, 1:].sum(dim=1), (labels == 1) | (labels == 2) | weak, labels != LABEL_IGNORE),
    ):
        valid = valid.float()
        intersection = (target_probability * target_mask.float() * valid).sum()
        total = (target_probability * valid).sum() + target_mask.float().sum()
        loss = loss + 0.5 * (1 - (2 * intersection + 1) / (total + 1))
    return loss


def distillation_loss(logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """segmentation_loss on the labels, plus cross-entropy against a teacher's class probabilities on
    every pixel (soft labels at temperature 1): the student learns what the teacher outputs, also where
    the labels are weak or absent. Its minimum over the soft term is the teacher's own probabilities."""
    labels, teacher_probabilities = targets
    soft = -(teacher_probabilities * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return segmentation_loss(logits, labels) + soft


def trained_input_size(record: dict) -> tuple[int, int] | None:
    """The input size a checkpoint's model was trained at, from its JSON record: that of the training a reused
    checkpoint records, its own, or its ensemble members' (the first's); None where the record names none."""
    trainings = [record.get("checkpoint_training", {}), record] + [member.get("training", {}) for member in record.get("members", [])]
    for training in trainings:
        size = training.get("config", {}).get("input_size")
        if size:
            return int(size[0]), int(size[1])
    return None


def teacher_probabilities(teacher: torch.nn.Module, crops: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A teacher's class probabilities on its own crops, resized to the student's crop size (each pixel's
    resized probabilities still sum to 1: every output pixel is a weighted mean of input pixels)."""
    with torch.no_grad():
        probabilities = teacher(crops).softmax(dim=1)
        if tuple(probabilities.shape[2:]) != tuple(size):
            probabilities = F.interpolate(probabilities, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return probabilities


def _batches(indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices) - batch_size + 1, batch_size):
        yield indices[start : start + batch_size]


def train_loop(
    model: torch.nn.Module,
    config: TrainConfig,
    make_batch: Callable[[np.ndarray, np.random.Generator], tuple[torch.Tensor, object]],
    loss_of: Callable[[object, object], torch.Tensor],
    validate: Callable[[torch.nn.Module], float],
    sample_indices: np.ndarray,
    description: str,
) -> dict:
    """AdamW + one-cycle LR, validation every N steps, early stopping on the validation score (higher = better).
    With config.ema_decay, the weights validated and kept are the moving average's (BatchNorm statistics included)."""
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.15)
    average = None
    if config.ema_decay is not None:
        average = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    evaluated = model if average is None else average.module
    best_score, best_state, stale, history = -np.inf, None, 0, []
    started = time.perf_counter()
    batches = _batches(sample_indices, config.batch_size)
    progress = tqdm(range(config.steps), desc=description, unit="step", dynamic_ncols=True)
    for step in progress:
        model.train()
        inputs, targets = make_batch(next(batches), rng)
        loss = loss_of(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(model)
        progress.set_postfix(loss=f"{loss.item():.3f}", best=f"{best_score:.3f}")
        if (step + 1) % config.validate_every == 0 or step + 1 == config.steps:
            evaluated.eval()
            with torch.no_grad():
                score = validate(evaluated)
            history.append({"step": step + 1, "loss": float(loss.item()), "val_score": score, "seconds": time.perf_counter() - started})
            if score > best_score:
                best_score, stale = score, 0
                best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
            else:
                stale += 1
                # The one-cycle LR is high in the first half and scores swing; stop only once it anneals.
                if stale >= config.patience and step + 1 >= config.steps // 2:
                    log.info("early stop at step %d: no improvement in %d validations", step + 1, stale)
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best_val_score": float(best_score), "history": history, "seconds": time.perf_counter() - started}


def train_segmenter(
    train: Sequence[SegmentationExample],
    val: Sequence[SegmentationExample],
    spec: PreprocessSpec,
    config: TrainConfig,
) -> tuple[torch.nn.Module, dict]:
    """Train a segmenter; the validation score is the mean of nucleus and whole-cell Dice, averaged per
    source and then over sources. With config.teacher (a segmenter checkpoint), the loss adds the teacher's
    class probabilities on each training window (distillation_loss): a light student learns what a trained
    segmenter outputs on every pixel, also where the labels are weak or absent, and converges far faster than
    on the labels alone."""
    model = _initial_model(config)
    pretraining = pretraining_of(config.init_from)
    if config.steps == 0:
        return model, _reuse_record(config)
    teacher = None if config.teacher is None else load_checkpoint(Path(config.teacher))[0]
    sample_indices = balanced_indices(
        [e.source for e in train], config.steps * config.batch_size, np.random.default_rng(config.seed + 1), config.source_weights
    )

    def make_batch(indices: np.ndarray, rng: np.random.Generator):
        inputs, labels = [], []
        for index in indices:
            tensor, label_map = segmentation_sample(train[index].image, train[index].label_map, spec, config.input_size, rng, config.device_augment)
            if config.crop:
                tensor, label_map = random_crop(tensor, label_map, config.crop, rng)
            inputs.append(tensor)
            labels.append(label_map)
        inputs, labels = torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels).astype(np.int64))
        if teacher is None:
            return inputs, labels
        return inputs, (labels, teacher_probabilities(teacher, inputs, inputs.shape[2:]))

    validation = [segmentation_sample(e.image, e.label_map, spec, config.input_size, None) for e in val]
    validation_sources = [e.source for e in val]

    def validate(model: torch.nn.Module) -> float:
        scores = []
        for start in range(0, len(validation), 16):
            chunk = validation[start : start + 16]
            predicted = model(torch.from_numpy(np.stack([t for t, _ in chunk]))).argmax(dim=1).numpy()
            for prediction, (_, truth) in zip(predicted, chunk):
                scores.append(_mean_dice(prediction, truth))
        return per_source_mean(scores, validation_sources)

    loss = segmentation_loss if teacher is None else distillation_loss
    summary = train_loop(model, config, make_batch, loss, validate, sample_indices, f"train {config.model}")
    return model, {"config": asdict(config), "pretraining": pretraining, **summary}


def train_refiner(
    train: Sequence[CellMaskExample],
    val: Sequence[CellMaskExample],
    spec: PreprocessSpec,
    config: TrainConfig,
    crop_margin: float,
) -> tuple[torch.nn.Module, dict]:
    """Train the per-cell refiner (leukoedge/refine.py) on crops of masked cells, cut as the
    runtime cuts them; the loss and the validation score are the segmenter's. With config.teacher, the
    loss adds the teacher's class probabilities on each training crop (distillation_loss): one refiner
    learns what an ensemble of refiners outputs, at one refiner's run-time cost. A teacher trained at another
    crop size (a 128x128 ensemble for a 64x64 student) sees the same cell, augmented alike, cut at its own
    size, and its probabilities are resized to the student's."""
    model = _initial_model(config)
    pretraining = pretraining_of(config.init_from)
    if config.steps == 0:
        return model, _reuse_record(config, crop_margin=crop_margin)
    teacher, teacher_size = None, tuple(config.input_size)
    if config.teacher is not None:
        teacher, teacher_record = load_checkpoint(Path(config.teacher))
        teacher_size = trained_input_size(teacher_record) or teacher_size
    sample_indices = balanced_indices(
        [e.source for e in train], config.steps * config.batch_size, np.random.default_rng(config.seed + 1), config.source_weights
    )

    def sample(example: CellMaskExample, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        return refiner_sample(example.image, example.label_map, example.box, spec, config.input_size, crop_margin, rng)

    def teacher_crop(example: CellMaskExample, rng: np.random.Generator) -> np.ndarray:
        """The teacher's crop of the cell the last sample() cut, drawing the same augmentation again."""
        return refiner_sample(example.image, example.label_map, example.box, spec, teacher_size, crop_margin, rng)[0]

    def make_batch(indices: np.ndarray, rng: np.random.Generator):
        inputs, labels, teacher_inputs = [], [], []
        for index in indices:
            state = rng.bit_generator.state
            crop, crop_labels = sample(train[index], rng)
            inputs.append(crop)
            labels.append(crop_labels)
            if teacher is not None and teacher_size != tuple(config.input_size):
                rng.bit_generator.state = state
                teacher_inputs.append(teacher_crop(train[index], rng))
        inputs, labels = torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels).astype(np.int64))
        if teacher is None:
            return inputs, labels
        teacher_batch = torch.from_numpy(np.stack(teacher_inputs)) if teacher_inputs else inputs
        return inputs, (labels, teacher_probabilities(teacher, teacher_batch, config.input_size))

    validation = [sample(example, None) for example in val]

    def validate(model: torch.nn.Module) -> float:
        scores = []
        for start in range(0, len(validation), 32):
            chunk = validation[start : start + 32]
            predicted = model(torch.from_numpy(np.stack([crop for crop, _ in chunk]))).argmax(dim=1).numpy()
            scores.extend(_mean_dice(prediction, truth) for prediction, (_, truth) in zip(predicted, chunk))
        return per_source_mean(scores, [example.source for example in val])

    loss = segmentation_loss if teacher is None else distillation_loss
    summary = train_loop(model, config, make_batch, loss, validate, sample_indices, f"train refiner {config.model}")
    return model, {"config": asdict(config), "crop_margin": crop_margin, "pretraining": pretraining, **summary}


def per_source_mean(scores: Sequence[float], sources: Sequence[str]) -> float:
    """Mean over sources of each source's mean score (NaN skipped): a source with many validation
    images must not outvote the others, or model selection trades a small source away unseen."""
    scores, sources = np.asarray(scores, dtype=float), np.asarray(sources)
    means = [np.nanmean(scores[sources == source]) for source in np.unique(sources) if not np.isnan(scores[sources == source]).all()]
    return float(np.mean(means)) if means else float("nan")


def _mean_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean of whole-cell Dice and a nucleus score over supervised pixels: nucleus Dice where truth is
    strong; on weak cells, the fraction of cells whose predicted nucleus reaches WEAK_CELL_MIN_NUCLEUS_SHARE
    (model selection must see a model that stops finding nuclei in weakly labelled fields)."""
    valid = truth != LABEL_IGNORE
    scores = []
    truth_cell = (truth == 1) | (truth == 2) | (truth == LABEL_WBC)
    pairs = [(prediction > 0, truth_cell)]
    if not (truth == LABEL_WBC).any():
        pairs.append((prediction == 2, truth == 2))
    else:
        nucleus = (prediction == 2).ravel()
        cells = weak_cell_components(truth[None])[0]
        scores.append(float(np.mean([nucleus[pixels].mean() >= WEAK_CELL_MIN_NUCLEUS_SHARE for pixels in cells])))
    for predicted, expected in pairs:
        predicted, expected = predicted & valid, expected & valid
        total = predicted.sum() + expected.sum()
        if total:
            scores.append(2.0 * (predicted & expected).sum() / total)
    return float(np.mean(scores)) if scores else float("nan")


def captured_pair(
    example: CellExample, sample: CellSampler, rng: np.random.Generator, capture_share: float, with_teacher: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A training crop of the example and the crop its teacher answers on. With probability capture_share the crop is
    cut from the frame with a capture fault (samples.capture_degraded) and the teacher's from the frame as captured,
    with the same crop draws (box jitter, stain, turns); otherwise both are the one crop."""
    if capture_share > 0 and rng.random() < capture_share:
        draws = int(rng.integers(2**32))
        crop = sample(replace(example, image=capture_degraded(example.image, rng)), np.random.default_rng(draws))
        return crop, (sample(example, np.random.default_rng(draws)) if with_teacher else crop)
    crop = sample(example, rng)
    return crop, crop


def teacher_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of a classifier head's logits against a teacher's probabilities, both at `temperature`, scaled
    by its square so that the gradients keep their size whatever the temperature (Hinton et al., 2015). Least where
    the student's logits are the teacher's (up to a constant per cell)."""
    taught = (teacher_logits / temperature).softmax(dim=1)
    return -(taught * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean() * temperature**2


def train_classifier(
    train: Sequence[CellExample],
    val: Sequence[CellExample],
    heads: dict[str, list[str]],
    spec: PreprocessSpec,
    config: TrainConfig,
    crop_margin: float,
    loss: str = "ce",
    sample: CellSampler | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train a multi-head cell classifier. A head's loss counts only cells labelled for it.
    loss: a CLASSIFIER_LOSSES name. sample: how a cell becomes the model's input (given the rng:
    augmented; given None: the runtime's crop); by default classification_sample of its box. With config.teacher
    (a classifier checkpoint with the same heads), the loss adds each head's cross-entropy against the teacher's
    probabilities on the same crops (distillation; at config.distill_temperature); with config.capture_augment, on the same crops without the capture
    fault. Validation score: mean over heads of balanced accuracy (over the validation cells as they are and as each
    augmentation switched on shows them, fixed draws)."""
    if loss not in CLASSIFIER_LOSSES:
        raise ValueError(f"unknown classifier loss {loss!r}; expected one of {', '.join(CLASSIFIER_LOSSES)}")
    head_loss = CLASSIFIER_LOSSES[loss]
    model = _initial_model(config, head_classes={name: len(classes) for name, classes in heads.items()})
    pretraining = pretraining_of(config.init_from)
    if config.steps == 0:
        if _recorded_training(config.init_from).get("heads_trained") is False:
            raise ValueError(f"{config.init_from} is a self-supervised checkpoint: its heads are untrained; fine-tune it (steps > 0)")
        return model, _reuse_record(config, heads=heads, loss=loss)

    def runtime_crop(example: CellExample, rng: np.random.Generator | None) -> np.ndarray:
        return classification_sample(example.image, example.box, spec, config.input_size, crop_margin, rng, config.device_augment, config.chroma_augment, config.resolution_augment, config.box_jitter)

    sample = sample or runtime_crop
    sample_indices = balanced_indices(
        [e.source for e in train], config.steps * config.batch_size, np.random.default_rng(config.seed + 1), config.source_weights
    )
    teacher = None if config.teacher is None else load_checkpoint(Path(config.teacher), head_classes={h: len(c) for h, c in heads.items()})[0]

    def make_batch(indices: np.ndarray, rng: np.random.Generator):
        # The student's crops, and the teacher's: the same, less any capture fault.
        crops, as_captured = zip(*(captured_pair(train[index], sample, rng, config.capture_augment, teacher is not None) for index in indices))
        inputs = torch.from_numpy(np.stack(crops))
        targets = {head: torch.tensor([train[i].targets.get(head, -1) for i in indices]) for head in heads}
        if teacher is None:
            return inputs, (targets, None)
        with torch.no_grad():
            taught = teacher(torch.from_numpy(np.stack(as_captured)))
        return inputs, (targets, taught)

    def loss_of(outputs: dict[str, torch.Tensor], batch: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]) -> torch.Tensor:
        targets, taught = batch
        losses = [config.label_weight * head_loss(outputs[h], targets[h]) for h in heads if (targets[h] >= 0).any()]
        # The teacher answers every head on every cell: the student learns its subtype opinion on a PBC cell too,
        # which the frame's subtype (the mean over its cells) reads.
        if taught is not None:
            losses += [teacher_loss(outputs[h], taught[h], config.distill_temperature) for h in heads]
        return torch.stack(losses).sum()

    validation_sets = [torch.from_numpy(np.stack([sample(e, None) for e in val]))]
    if config.device_augment > 0 and sample is runtime_crop:
        # Trained for other microscopes, selected for them too: the score is the mean over the validation
        # cells as they are and as another microscope would show them (fixed draws, the same every validation).
        validation_sets.append(
            torch.from_numpy(
                np.stack([
                    device_view_crop(e.image, e.box, spec, config.input_size, crop_margin, np.random.default_rng(config.seed + i), config.device_augment)
                    for i, e in enumerate(val)
                ])
            )
        )
    if config.chroma_augment > 0 and sample is runtime_crop:
        # Trained for other stains, selected for them too: the validation cells also with their colours turned (fixed draws).
        turned = [chroma_turned(crop, spec, np.random.default_rng(config.seed + i), config.chroma_augment) for i, crop in enumerate(validation_sets[0].numpy())]
        validation_sets.append(torch.from_numpy(np.stack(turned)))
    if config.resolution_augment > 0 and sample is runtime_crop:
        # Trained for coarser cameras, selected for them too: the validation cells also at lower resolution (fixed draws).
        lowered = [resolution_lowered(crop, np.random.default_rng(config.seed + i)) for i, crop in enumerate(validation_sets[0].numpy())]
        validation_sets.append(torch.from_numpy(np.stack(lowered)))

    if config.capture_augment > 0:
        # Trained for noisy and compressed frames, selected for them too: the validation cells also from their frames
        # with a capture fault (fixed draws).
        validation_sets.append(
            torch.from_numpy(np.stack([sample(replace(e, image=capture_degraded(e.image, np.random.default_rng(config.seed + i))), None) for i, e in enumerate(val)]))
        )

    def balanced_accuracy(evaluated: torch.nn.Module, inputs: torch.Tensor) -> float:
        chunks = [evaluated(inputs[s : s + 256]) for s in range(0, len(val), 256)]  # one pass serves every head
        outputs = {h: torch.cat([chunk[h] for chunk in chunks]) for h in heads}
        scores = []
        for head in heads:
            truth = np.array([e.targets.get(head, -1) for e in val])
            predicted = outputs[head].argmax(dim=1).numpy()
            recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth[truth >= 0])]
            if recalls:
                scores.append(float(np.mean(recalls)))
        return float(np.mean(scores))

    def validate(evaluated: torch.nn.Module) -> float:
        return float(np.mean([balanced_accuracy(evaluated, inputs) for inputs in validation_sets]))

    summary = train_loop(model, config, make_batch, loss_of, validate, sample_indices, f"train {config.model}")
    return model, {"config": asdict(config), "heads": heads, "loss": loss, "pretraining": pretraining, **summary}


def save_checkpoint(model: torch.nn.Module, config: dict, path: Path) -> None:
    """state_dict (tensors only, loadable with weights_only=True) + config JSON beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(config, indent=2, default=str))


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a checkpoint as save_checkpoint writes one: the .pt and its .json beside it."""
    return Path(path).is_file() and Path(path).with_suffix(".json").is_file()


def _readable_checkpoint(path: Path) -> tuple[torch.nn.Module, dict]:
    """load_checkpoint, with any failure to read the file or its JSON said as a ValueError naming the file."""
    try:
        return load_checkpoint(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} is not a readable checkpoint (.pt with its .json): {str(error).splitlines()[0]}") from error
    except Exception as error:  # torch.load's weights-only refusal; its own text suggests unsafe loading, not advice to repeat
        raise ValueError(f"{path} is not a readable checkpoint (.pt with its .json): not a weights file this code saves") from error


def save_ensemble_checkpoint(members: Sequence[Path], path: Path) -> dict:
    """One checkpoint of the mean of several segmentation checkpoints' class probabilities
    (training/models/ensemble.py), with each member's training record; returns its config.
    Fine-tuning from it (--refiner-init PATH) keeps it with 0 steps, as any checkpoint."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two member checkpoints; got {len(members)}")
    loaded = [_readable_checkpoint(Path(member)) for member in members]
    specs = [{"model": record["config"]["model"], "model_kwargs": record["config"].get("model_kwargs", {})} for _, record in loaded]
    ensemble = create_model("probability_mean", members=specs)  # refuses members that are not segmenters
    for member, (module, _) in zip(ensemble.members, loaded):
        member.load_state_dict(module.state_dict())
    origins = sorted({pretraining_of(member) for member in members})
    record = {
        "config": {"model": "probability_mean", "model_kwargs": {"members": specs}},
        "pretraining": origins[0] if len(origins) == 1 else "; ".join(origins),
        "members": [{"checkpoint": str(member), "training": _recorded_training(str(member))} for member in members],
    }
    save_checkpoint(ensemble, record, path)
    return record


def load_checkpoint(path: Path, **model_kwargs) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model named in the config and load its weights without unpickling anything."""
    config = json.loads(path.with_suffix(".json").read_text())
    model = create_model(config["config"]["model"], **{**config["config"].get("model_kwargs", {}), **model_kwargs})
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model, config
