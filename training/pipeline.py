"""One command from ../shared/data to a model bundle: `leukoedge train --data DIR --out models/default`.

Steps: stain reference from the training split -> field segmenter -> per-cell refiner ->
cell crops -> classifier -> ONNX export with parity check -> bundle (manifest + sha256) -> frame
verdict threshold from the validation fields.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from leukoedge.bundle import SCHEMA_VERSION, Bundle, save_bundle
from leukoedge.frame import DEFAULT_MIN_JUDGED_SIDE
from leukoedge.postprocess import central_box, find_cells, label_map_from_probabilities
from leukoedge.preprocess.cpu import Letterbox, PreprocessSpec, prepare_frame

from . import data
from .flops import count_flops
from .samples import BOX_JITTER
from .stain import estimate_reference
from .train import (
    CellExample,
    CellMaskExample,
    SegmentationExample,
    TrainConfig,
    check_ema_decay,
    is_checkpoint,
    save_checkpoint,
    train_classifier,
    train_refiner,
    train_segmenter,
    trained_input_size,
)
from .verdict import DEFAULT_FLAG_FRACTION, MIN_BLAST_COUNT, flag_fraction_on

log = logging.getLogger("leukoedge.training")

SEGMENTATION_SOURCES = ("wbc-seg-zheng", "all-idb2", "all-taleqani", "bccd")
# More fields the segmenter may learn from (--segmentation-sources), boxed white cells as weak labels
# (data.box_label_map): TXL-PBC whole, or one of its devices (the other left out as an unseen microscope).
BOX_SEGMENTATION_SOURCES = ("txl-pbc", "txl-pbc/raabin", "txl-pbc/bcd")
SEGMENTER_INPUT = (192, 256)  # H, W: a 640x480 field maps exactly, single-cell crops are letterboxed
CLASSIFIER_INPUT = (64, 64)
CROP_MARGIN = 0.15  # the classifier's and the refiner's crops: a square around the cell, 15 % of its side added per edge
REFINER_INPUT = (128, 128)  # a Zheng cell (~100 px) at ~1.1x, a Taleqani or BCCD cell enlarged to the same size
# A light refiner at 64x64 costs a tenth of hctnet_lite at 128 per cell (docs/performance.md, "The light refiner").
REFINER_INPUT_SIDES = (32, 256)
# The refiner learns from every source with cell masks: the experts' (Zheng, ALL-IDB2) and Taleqani's weak
# masks (as for the segmenter: "some WBC pixel" plus a nucleus share), without which it fails on fields.
REFINER_SOURCES = ("wbc-seg-zheng", "all-idb2", "all-taleqani")
# Boxed white cells (data.box_label_map) the refiner may also learn from (--refiner-sources): how far a cell reaches.
REFINER_BOX_SOURCES = ("bccd",) + BOX_SEGMENTATION_SOURCES
CLASSIFICATION_SOURCES = ("all-idb2", "all-taleqani", "pbc", "bccd", "txl-pbc", "wbc-seg-zheng")
# Normal smears from more labs and devices: their white cells teach the blast head what a normal cell looks
# like under other stains and cameras (blast 0; no subtype, no WBC type: Zheng's types are unverified).
NORMAL_CELL_SOURCES = ("bccd", "txl-pbc", "wbc-seg-zheng")
# Batches are balanced over sources (devices for TXL-PBC); the normal-cell devices each get less than a full
# share, so that the B-ALL fields (Taleqani, the subtype head's only source) keep most of every batch.
NORMAL_CELL_WEIGHTS = {"bccd": 0.4, "txl-pbc/raabin": 0.4, "txl-pbc/bcd": 0.4, "wbc-seg-zheng": 0.4}
FINE_TUNE_LEARNING_RATE = 1e-3  # a classifier fine-tuned from a checkpoint (--classifier-init) keeps most of what it learnt
# The only sources of the subtype head (and the frame verdict's threshold) and of the WBC-type head.
REQUIRED_CLASSIFICATION_SOURCES = ("all-taleqani", "pbc")
MIN_CELL_AREA_PX = 40  # model-input pixels: a Taleqani WBC is ~300, platelets and specks ~10-30
MIN_NUCLEUS_AREA_PX = 20  # model-input pixels: a Taleqani blast nucleus is ~150; red-cell rims have none
RUNTIME_CLASSIFIERS = ("custom_cnn", "vgg_hybrid", "vgg_hybrid_slim", "vgg_hybrid_slim16", "vgg_hybrid_plain", "resnet_s", "mobile_cnn")  # dual_branch takes 6 channels (cell + nucleus crop): study only
SUBTYPES = ["Benign", "Early", "Pre", "Pro"]
WBC_TYPES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
VALIDATION_IMAGES_PER_SOURCE = 60  # model selection during training; the test split is evaluated in full
HEADS = {"blast": ["normal", "blast"], "subtype": SUBTYPES, "wbc_type": WBC_TYPES}


def check_runtime_classifier(model: str) -> None:
    """ValueError unless the runtime can feed `model` (one 3-channel crop per cell)."""
    if model not in RUNTIME_CLASSIFIERS:
        raise ValueError(f"classifier model must be one the runtime can feed (one 3-channel crop per cell): {', '.join(RUNTIME_CLASSIFIERS)}; got {model!r}")


@dataclass
class PipelineConfig:
    data_root: Path
    out_dir: Path
    quick: bool = False  # a few steps on a few images: checks the whole path, not the accuracy
    segmenter_model: str = "hctnet_lite"
    refiner_model: str | None = None  # None: the segmenter's architecture
    # Side of the refiner's square crops; None: the one --refiner-init was trained at, else REFINER_INPUT's.
    refiner_input_size: int | None = None
    classifier_model: str = "vgg_hybrid"  # best validation score of the runtime-fed classifiers (docs/training.md)
    segmenter_steps: int = 8000
    classifier_steps: int = 1500
    segmenter_learning_rate: float = 2e-3
    refiner_steps: int = 4000
    refiner_learning_rate: float = 2e-3
    # Training windows of the segmenter input (fully convolutional): small is fast; None trains on the whole
    # 192x256 input, where a letterboxed single-cell crop is seen whole, as at run time.
    segmenter_crop: int | None = 128
    # Fine-tuning: start a model from a checkpoint (.pt); with 0 steps that model is kept as it is.
    segmenter_init: Path | None = None
    classifier_init: Path | None = None
    refiner_init: Path | None = None
    # Distillation: the refiner also learns this checkpoint's class probabilities (e.g. a refiner ensemble's).
    refiner_teacher: Path | None = None
    # Distillation: the segmenter also learns this segmenter checkpoint's class probabilities (a light one the shipped one's).
    segmenter_teacher: Path | None = None
    # The sources the segmenter (and the stain reference) learn from; leave some out to test across sources.
    segmentation_sources: tuple[str, ...] = SEGMENTATION_SOURCES
    segmenter_source_weights: dict[str, float] = field(default_factory=dict)  # relative sampling weight per source
    # The sources the refiner learns from; None: those of REFINER_SOURCES the segmenter learns from too.
    refiner_sources: tuple[str, ...] | None = None
    refiner_source_weights: dict[str, float] = field(default_factory=dict)  # relative sampling weight per refiner source
    # The sources the classifier learns from; leave ALL-IDB2 out to test blast vs normal on a source it never saw.
    classification_sources: tuple[str, ...] = CLASSIFICATION_SOURCES
    seed: int = 0
    # The classifier's own seed (initial weights, batch order, augmentation); None: `seed`. Unlike `seed`,
    # it leaves the stain reference and the other models alone: for the classifier's run-to-run spread.
    classifier_seed: int | None = None
    # The classifier keeps a moving average of its weights (this decay per step; None: its best step's weights):
    # it lifted the validation verdict of every seed tried, most that of the worst one (docs/training.md).
    classifier_ema_decay: float | None = 0.999
    # The classifier also sees half its crops as another microscope would show them, at this strength (0: never).
    classifier_device_augment: float = 0.0
    # The classifier's crops with their hue turned and saturation scaled at this strength (0: never; stain.augment_chroma).
    classifier_chroma_augment: float = 0.0
    # The share of the classifier's crops seen at lower resolution (0: never; samples.resolution_lowered).
    classifier_resolution_augment: float = 0.0
    # The share of the classifier's crops cut from their frame with camera noise and JPEG added (0: never;
    # samples.capture_degraded); with classifier_teacher, that checkpoint answers on the crops without them.
    classifier_capture_augment: float = 0.0
    classifier_teacher: Path | None = None  # distillation: the classifier also learns this checkpoint's probabilities
    classifier_label_weight: float = 1.0  # with classifier_teacher: the labels' loss weight beside the teacher's (0: the teacher's alone)
    # The classifier's training boxes jittered by (centre shift, log size) standard deviations, shares of the side.
    classifier_box_jitter: tuple[float, float] = BOX_JITTER
    segmenter_device_augment: float = 0.0  # the same for the segmenter's training fields

    def __post_init__(self) -> None:
        check_runtime_classifier(self.classifier_model)
        check_ema_decay(self.classifier_ema_decay)
        if self.segmenter_crop is not None and not 16 <= self.segmenter_crop <= max(SEGMENTER_INPUT):
            raise ValueError(f"segmenter_crop must be 16..{max(SEGMENTER_INPUT)} model pixels, or None for the whole input; got {self.segmenter_crop}")
        known = SEGMENTATION_SOURCES + BOX_SEGMENTATION_SOURCES
        unknown = [source for source in self.segmentation_sources if source not in known]
        if unknown or not self.segmentation_sources:
            raise ValueError(f"segmentation_sources must be some of {', '.join(known)}; got {list(self.segmentation_sources)}")
        # Checked here, not when each model's turn comes: a missing file must not cost minutes of training first.
        for option, checkpoint in (
            ("--segmenter-init", self.segmenter_init),
            ("--refiner-init", self.refiner_init),
            ("--classifier-init", self.classifier_init),
            ("--refiner-teacher", self.refiner_teacher),
            ("--segmenter-teacher", self.segmenter_teacher),
            ("--classifier-teacher", self.classifier_teacher),
        ):
            if checkpoint is not None and not is_checkpoint(checkpoint):
                raise ValueError(f"{option} {checkpoint}: no checkpoint there (a .pt with its .json, as training writes them)")
        if self.refiner_teacher is not None and self.refiner_steps == 0:
            raise ValueError("--refiner-teacher needs refiner training steps: with --refiner-steps 0 the refiner is kept as it is")
        if self.segmenter_teacher is not None and self.segmenter_steps == 0:
            raise ValueError("--segmenter-teacher needs segmenter training steps: with --segmenter-steps 0 the segmenter is kept as it is")
        if self.classifier_teacher is not None and self.classifier_steps == 0:
            raise ValueError("--classifier-teacher needs classifier training steps: with --classifier-steps 0 the classifier is kept as it is")
        if self.classifier_label_weight != 1.0 and self.classifier_teacher is None:
            raise ValueError("--classifier-label-weight needs --classifier-teacher: without one the labels are all the classifier learns")
        self.refiner_input_size = refiner_input_side(self.refiner_input_size, self.refiner_init, self.refiner_steps)
        if self.refiner_sources is None:
            self.refiner_sources = tuple(source for source in REFINER_SOURCES if source in self.segmentation_sources)
        known = REFINER_SOURCES + REFINER_BOX_SOURCES
        if not self.refiner_sources or any(source not in known for source in self.refiner_sources):
            raise ValueError(f"the refiner learns from cell masks or boxed cells: refiner_sources must be some of {', '.join(known)}; got {list(self.refiner_sources)}")
        if any(source not in CLASSIFICATION_SOURCES for source in self.classification_sources) or any(
            source not in self.classification_sources for source in REQUIRED_CLASSIFICATION_SOURCES
        ):
            raise ValueError(
                f"classification_sources must be some of {', '.join(CLASSIFICATION_SOURCES)}, with {' and '.join(REQUIRED_CLASSIFICATION_SOURCES)} "
                f"(the only sources of the subtype and WBC-type heads); got {list(self.classification_sources)}"
            )

    def limit(self, records: list) -> list:
        """In quick mode, a few records per source, spread over the labels by the split files' order."""
        return spread(records, 12) if self.quick else records


def spread(records: list, count: int) -> list:
    """At most `count` records taken evenly over the list (sorted by path, so over the labels too)."""
    return records[:: max(1, len(records) // count)][:count]


def _checkpoint_model(checkpoint: Path | None, default: str) -> dict:
    """TrainConfig's model and model_kwargs: those a checkpoint was built with (its JSON), so fine-tuning
    rebuilds the same model (an ensemble's kwargs name its members); without a checkpoint, `default`'s."""
    if checkpoint is None:
        return {"model": default, "model_kwargs": {}}
    config_path = Path(checkpoint).with_suffix(".json")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the checkpoint's config is missing (it is written beside every .pt by save_checkpoint)")
    config = json.loads(config_path.read_text())["config"]
    return {"model": config["model"], "model_kwargs": config.get("model_kwargs", {})}


def checkpoint_input_side(checkpoint: Path) -> int | None:
    """The crop side a refiner checkpoint was trained at (train.trained_input_size); None where its JSON names none."""
    size = trained_input_size(json.loads(Path(checkpoint).with_suffix(".json").read_text()))
    return None if size is None else size[0]


def refiner_input_side(side: int | None, init: Path | None, steps: int) -> int:
    """The refiner's crop side: `side` if given, else the one `init` was trained at, else REFINER_INPUT's.
    A kept checkpoint (0 steps) runs only at the side it learnt: another one is refused, not silently used."""
    trained = None if init is None else checkpoint_input_side(init)
    if side is None:
        return trained or REFINER_INPUT[0]
    low, high = REFINER_INPUT_SIDES
    if not low <= side <= high:
        raise ValueError(f"--refiner-input-size must be {low}..{high} pixels; got {side}")
    if steps == 0 and trained is not None and side != trained:
        raise ValueError(f"--refiner-init {init} was trained on {trained}x{trained} crops; with --refiner-steps 0 it must run at {trained}, got --refiner-input-size {side}")
    return side


def _records(config: PipelineConfig, source: str, split: str) -> list[data.Record]:
    return config.limit(data.load_records(config.data_root, source, split))


def _named_records(config: PipelineConfig, name: str, split: str) -> list[data.Record]:
    """The records a source name stands for: the whole source, or one device of it (txl-pbc/bcd)."""
    source = name.split("/")[0]
    return [record for record in _records(config, source, split) if name in (source, record.domain)]


def load_segmentation_examples(config: PipelineConfig, split: str, per_source: int | None = None) -> list[SegmentationExample]:
    """Images with label maps; per_source caps each source (validation during training needs only a sample).
    A device name (txl-pbc/bcd) takes that device's fields only, and names the examples (balanced sampling)."""
    examples = []
    for name in config.segmentation_sources:
        for record in tqdm(_named_records(config, name, split)[:per_source], desc=f"load {name} {split}", leave=False):
            label_map = data.read_label_map(record)
            if label_map is not None:
                examples.append(SegmentationExample(name, data.read_image(record), label_map))
    return examples


def preprocess_spec(config: PipelineConfig, train_examples: list[SegmentationExample]) -> PreprocessSpec:
    """Stain reference from the training images of the mask sources (SEGMENTATION_SOURCES; each source weighted
    equally). Box sources add fields for the segmenter, not to the reference: every model of a bundle reads
    frames normalized to it, so a segmenter trained with more fields must not move it."""
    per_source: dict[str, list[np.ndarray]] = {}
    reference_examples = [e for e in train_examples if e.source in SEGMENTATION_SOURCES] or list(train_examples)
    for example in reference_examples:
        per_source.setdefault(example.source, []).append(example.image)
    rng = np.random.default_rng(config.seed)
    images = [image for images in per_source.values() for image in (images[i] for i in rng.choice(len(images), min(60, len(images)), replace=False))]
    # Values near 0.5/0.25 keep the stain-normalized input roughly zero-mean, unit-range.
    return PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), estimate_reference(images))


def segmenter_label_map(
    model: torch.nn.Module, image: np.ndarray, spec: PreprocessSpec, input_size: tuple[int, int] = SEGMENTER_INPUT
) -> tuple[np.ndarray, Letterbox]:
    """A torch segmenter's label map of a BGR image at model resolution, and where the frame sits in it:
    the runtime's own preprocessing, as Detector.run feeds the exported segmenter."""
    prepared = prepare_frame(image, spec, input_size)
    with torch.no_grad():
        probabilities = model(torch.from_numpy(prepared.tensor)).softmax(dim=1)[0].numpy()
    return label_map_from_probabilities(probabilities), prepared.letterbox


def load_refiner_examples(config: PipelineConfig, split: str, per_source: int | None = None) -> list[CellMaskExample]:
    """Every masked or boxed cell of the refiner's sources (expert masks, Taleqani's weak ones, box labels):
    image, label map, the cell's box. A device name (txl-pbc/bcd) takes that device's fields only."""
    examples = []
    for name in config.refiner_sources:
        for record in tqdm(_named_records(config, name, split)[:per_source], desc=f"load {name} {split} cells", leave=False):
            label_map = data.read_label_map(record)
            if label_map is None:
                continue
            image = data.read_image(record)
            examples += [CellMaskExample(name, image, label_map, box) for box in data.wbc_boxes(record)]
    return examples


def segmenter_boxes(model: torch.nn.Module, image: np.ndarray, spec: PreprocessSpec) -> list[tuple[int, int, int, int]]:
    """Cell boxes in frame pixels found by the trained segmenter, through the runtime's own path: the
    boxes the runtime's classifier crops around (refinement changes masks, not these)."""
    cells, _ = find_cells(*segmenter_label_map(model, image, spec), MIN_CELL_AREA_PX, True, MIN_NUCLEUS_AREA_PX)
    return [cell.box for cell in cells]


def _cell_records(config: PipelineConfig, source: str, split: str) -> list[data.Record]:
    """The records of a classification source, none where the classifier leaves that source out."""
    return _records(config, source, split) if source in config.classification_sources else []


def load_cell_examples(config: PipelineConfig, split: str, segmenter: torch.nn.Module, spec: PreprocessSpec) -> tuple[list[CellExample], dict]:
    """Cells with their targets, from config.classification_sources (see cell_examples)."""
    return cell_examples(lambda source: _cell_records(config, source, split), lambda image: segmenter_boxes(segmenter, image, spec), split)


def cell_examples(
    records_of: Callable[[str], list[data.Record]], boxes_of: Callable[[np.ndarray], list[tuple[int, int, int, int]]], split: str
) -> tuple[list[CellExample], dict]:
    """Cells with their targets from each classification source's records (`records_of(source)`). Boxes: ALL-IDB2
    from the expert mask; Taleqani and PBC from the field segmenter (`boxes_of(image)`), as at run time
    (data.MARKED_CELL_SOURCES); the normal-cell sources from their annotated WBC boxes. Every cell of a
    Taleqani field takes the field's labels. Returns the examples and per-source counts."""
    examples: list[CellExample] = []
    counts: dict[str, int] = {}
    missed_pbc = 0
    for record in tqdm(records_of("all-idb2"), desc=f"cells all-idb2 {split}", leave=False):
        image = data.read_image(record)
        box = central_box(data.wbc_boxes(record), image.shape)
        if box is not None:
            examples.append(CellExample("all-idb2", image, box, {"blast": record.blast}))
    for record in tqdm(records_of("all-taleqani"), desc=f"cells all-taleqani {split}", leave=False):
        image = data.read_image(record)
        for box in boxes_of(image):
            examples.append(CellExample("all-taleqani", image, box, {"blast": record.blast, "subtype": SUBTYPES.index(record.subtype)}))
    for record in tqdm(records_of("pbc"), desc=f"cells pbc {split}", leave=False):
        image = data.read_image(record)
        box = central_box(boxes_of(image), image.shape)
        if box is None:
            missed_pbc += 1
            continue
        examples.append(CellExample("pbc", image, box, {"blast": 0, "wbc_type": WBC_TYPES.index(record.wbc_type)}))
    for source in NORMAL_CELL_SOURCES:
        for record in tqdm(records_of(source), desc=f"cells {source} {split}", leave=False):
            image = data.read_image(record)
            examples.extend(CellExample(record.domain, image, box, {"blast": 0}) for box in data.wbc_boxes(record))
    for example in examples:
        counts[example.source] = counts.get(example.source, 0) + 1
    counts["pbc_images_without_a_cell"] = missed_pbc
    return examples, counts


def calibrate_verdict(config: PipelineConfig, bundle_dir: Path) -> dict:
    """Run the written bundle over the Taleqani validation fields and choose the frame verdict's flag_fraction."""
    from leukoedge.detector import Detector

    threshold, choice = flag_fraction_on(Detector.load(bundle_dir), _records(config, "all-taleqani", "val"))
    log.info("verdict flag_fraction %.3f (balanced accuracy %s on %d Taleqani val fields)", threshold, choice["balanced_accuracy"], choice["fields"])
    return choice


def architecture_label(config: dict) -> str:
    """A model's architecture for the manifest: "hctnet_lite"; an ensemble with its members,
    "probability_mean(hctnet_lite, hctnet_lite, hctnet_lite)"."""
    members = config.get("model_kwargs", {}).get("members")
    return config["model"] if not members else f"{config['model']}({', '.join(member['model'] for member in members)})"


def build_manifest(spec: PreprocessSpec, training: dict, flops: dict[str, int], refiner_input: tuple[int, int] = REFINER_INPUT) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "leukoedge-default",
        "model_version": "0.1.0",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {},
        "preprocess": spec.to_manifest(),
        "segmenter": {
            "file": "segmenter.onnx",
            "input": "image",
            "output": "probs",
            "input_size": list(SEGMENTER_INPUT),
            "classes": ["background", "cytoplasm", "nucleus"],
            "architecture": architecture_label(training["segmenter"]["config"]),
            "flops": flops["segmenter"],
        },
        "refiner": {
            "file": "refiner.onnx",
            "input": "crop",
            "output": "probs",
            "input_size": list(refiner_input),
            "crop_margin": CROP_MARGIN,
            "classes": ["background", "cytoplasm", "nucleus"],
            "architecture": architecture_label(training["refiner"]["config"]),
            "flops": flops["refiner"],
            "sources": list(training["refiner_sources"]),
        },
        "classifier": {
            "file": "classifier.onnx",
            "input": "crop",
            "input_size": list(CLASSIFIER_INPUT),
            "crop_margin": CROP_MARGIN,
            "primary_head": "blast",
            "architecture": architecture_label(training["classifier"]["config"]),
            "flops": flops["classifier"],
            "heads": {head: {"output": f"{head}_probs", "classes": classes} for head, classes in HEADS.items()},
        },
        "postprocess": {"min_cell_area_px": MIN_CELL_AREA_PX, "min_nucleus_area_px": MIN_NUCLEUS_AREA_PX, "split_touching": True},
        "verdict": {"blast_threshold": 0.5, "flag_fraction": DEFAULT_FLAG_FRACTION, "min_blast_count": MIN_BLAST_COUNT},
        "limits": {"min_frame_side": 16, "min_judged_side": DEFAULT_MIN_JUDGED_SIDE, "max_frame_side": 4096},
        "training": training,
    }


def run_pipeline(config: PipelineConfig) -> Bundle:
    """Train the three models, export them, write and return the verified bundle."""
    from leukoedge.export.onnx import export_classifier, export_segmenter

    from .samples import classification_sample, refiner_sample, segmentation_sample

    torch.manual_seed(config.seed)
    refiner_input = (config.refiner_input_size, config.refiner_input_size)
    train_examples = load_segmentation_examples(config, "train")
    val_examples = load_segmentation_examples(config, "val", per_source=VALIDATION_IMAGES_PER_SOURCE)
    spec = preprocess_spec(config, train_examples)
    quick = config.quick
    segmenter, segmenter_summary = train_segmenter(
        train_examples,
        val_examples,
        spec,
        TrainConfig(
            **_checkpoint_model(config.segmenter_init, config.segmenter_model),
            input_size=SEGMENTER_INPUT,
            steps=8 if quick else config.segmenter_steps,
            batch_size=4 if quick else 8,
            learning_rate=config.segmenter_learning_rate,
            init_from=None if config.segmenter_init is None else str(config.segmenter_init),
            crop=config.segmenter_crop,
            validate_every=4 if quick else max(50, config.segmenter_steps // 16),
            source_weights=config.segmenter_source_weights,
            seed=config.seed,
            device_augment=config.segmenter_device_augment,
            teacher=None if config.segmenter_teacher is None else str(config.segmenter_teacher),
        ),
    )
    refiner_val = load_refiner_examples(config, "val", per_source=VALIDATION_IMAGES_PER_SOURCE)
    refiner, refiner_summary = train_refiner(
        load_refiner_examples(config, "train"),
        refiner_val,
        spec,
        TrainConfig(
            **_checkpoint_model(config.refiner_init, config.refiner_model or config.segmenter_model),
            input_size=refiner_input,
            steps=8 if quick else config.refiner_steps,
            batch_size=4 if quick else 16,
            learning_rate=config.refiner_learning_rate,
            init_from=None if config.refiner_init is None else str(config.refiner_init),
            validate_every=4 if quick else 200,
            source_weights=config.refiner_source_weights,
            seed=config.seed,
            teacher=None if config.refiner_teacher is None else str(config.refiner_teacher),
        ),
        CROP_MARGIN,
    )
    cell_train, train_counts = load_cell_examples(config, "train", segmenter, spec)
    cell_val, val_counts = load_cell_examples(config, "val", segmenter, spec)
    classifier, classifier_summary = train_classifier(
        cell_train,
        cell_val,
        HEADS,
        spec,
        TrainConfig(
            **_checkpoint_model(config.classifier_init, config.classifier_model),
            input_size=CLASSIFIER_INPUT,
            steps=8 if quick else config.classifier_steps,
            batch_size=8 if quick else 64,
            learning_rate=3e-3 if config.classifier_init is None else FINE_TUNE_LEARNING_RATE,
            init_from=None if config.classifier_init is None else str(config.classifier_init),
            validate_every=4 if quick else 100,
            seed=config.seed if config.classifier_seed is None else config.classifier_seed,
            ema_decay=config.classifier_ema_decay,
            source_weights=NORMAL_CELL_WEIGHTS,
            device_augment=config.classifier_device_augment,
            chroma_augment=config.classifier_chroma_augment,
            resolution_augment=config.classifier_resolution_augment,
            capture_augment=config.classifier_capture_augment,
            teacher=None if config.classifier_teacher is None else str(config.classifier_teacher),
            label_weight=config.classifier_label_weight,
            box_jitter=config.classifier_box_jitter,
        ),
        CROP_MARGIN,
    )
    classifier_summary["cells"] = {"train": train_counts, "val": val_counts}
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        segmenter_inputs = np.stack([segmentation_sample(e.image, e.label_map, spec, SEGMENTER_INPUT, None)[0] for e in val_examples[:8]])
        crop_inputs = np.stack([classification_sample(e.image, e.box, spec, CLASSIFIER_INPUT, CROP_MARGIN, None) for e in cell_val[:32]])
        segmenter_parity = export_segmenter(segmenter, segmenter_inputs, scratch_dir / "segmenter.onnx")
        refiner_inputs = np.stack([refiner_sample(e.image, e.label_map, e.box, spec, refiner_input, CROP_MARGIN, None)[0] for e in refiner_val[:16]])
        refiner_parity = export_segmenter(refiner, refiner_inputs, scratch_dir / "refiner.onnx", input_name="crop")
        classifier_parity = export_classifier(classifier, list(HEADS), crop_inputs, scratch_dir / "classifier.onnx")
        save_checkpoint(segmenter, segmenter_summary, config.out_dir.parent / "checkpoints" / f"{config.out_dir.name}-segmenter.pt")
        save_checkpoint(refiner, refiner_summary, config.out_dir.parent / "checkpoints" / f"{config.out_dir.name}-refiner.pt")
        save_checkpoint(classifier, classifier_summary, config.out_dir.parent / "checkpoints" / f"{config.out_dir.name}-classifier.pt")
        training = {
            "data": "real images of ../shared/data (Zheng 2018 dataset 1, ALL-IDB2 + Di Ruberto masks, Taleqani B-ALL, PBC, BCCD); split files training/splits/*.csv, seed 0",
            "quick": quick,
            "segmentation_sources": list(config.segmentation_sources),
            "refiner_sources": list(config.refiner_sources),
            "classification_sources": list(config.classification_sources),
            "pretraining": {
                "segmenter": segmenter_summary["pretraining"],
                "refiner": refiner_summary["pretraining"],
                "classifier": classifier_summary["pretraining"],
            },
            "segmenter": {**segmenter_summary, "onnx_parity_max_abs": segmenter_parity},
            "refiner": {**refiner_summary, "onnx_parity_max_abs": refiner_parity},
            "classifier": {**classifier_summary, "onnx_parity_max_abs": classifier_parity},
        }
        flops = {
            "segmenter": count_flops(segmenter, (1, 3, *SEGMENTER_INPUT)),
            "refiner": count_flops(refiner, (1, 3, *refiner_input)),
            "classifier": count_flops(classifier, (1, 3, *CLASSIFIER_INPUT)),
        }
        manifest = build_manifest(spec, training, flops, refiner_input)
        files = {name: scratch_dir / name for name in ("segmenter.onnx", "refiner.onnx", "classifier.onnx")}
        draft = save_bundle(scratch_dir / "draft", manifest, files)
        verdict = calibrate_verdict(config, draft.root)
        manifest["verdict"]["flag_fraction"] = verdict["flag_fraction"]
        manifest["training"]["verdict_calibration"] = verdict
        bundle = save_bundle(config.out_dir, manifest, files)
    log.info("bundle written to %s", config.out_dir)
    return bundle


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
