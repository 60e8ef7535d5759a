"""Model bundles: a folder (or .zip / .tar / .tar.gz of one) with manifest.json and the model files.

The manifest is the single source of truth about the models: inputs, preprocessing, class names,
thresholds, frame limits, training data and metrics. Every file it lists carries a sha256 that
load_bundle checks, so a modified or truncated model is refused instead of giving wrong answers.

What a manifest must hold is written once, in SECTIONS; check_models holds the opened models against
it at load (Detector runs it). Sizes are checked before anything is read, archives before anything
is extracted, and an optional Ed25519 signature (leukoedge/signing.py) ties the manifest to a key the
integrator pins. Every refusal is a BundleError naming the key or file at fault (SECURITY.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from leukoedge.domain import (
    COLOUR_FEATURES,
    ENLARGED_CELL_SIDE_PX,
    MAX_FALLOFF,
    MAX_CUT_CELL_SHARE,
    MAX_EMPTY_FOREGROUND,
    MAX_INCOMPLETE,
    MAX_OUTSIDE_FIELD,
    MAX_TEAR,
    MEAN_SPREAD_FEATURES,
    MIN_EDGE_ISOTROPY,
    MIN_FLAG_DETAIL,
    MIN_PIXEL_JPEG_QUALITY,
    MIN_WHOLE_BLASTS,
    SWAP_MARGIN,
    feature_names,
)
from leukoedge.decode import MAX_DECODED_SIDE
from leukoedge.preprocess.cpu import EVEN_FROM, MAX_DARK_SHARE
from leukoedge.errors import BundleError, LeukoedgeError
from leukoedge.signing import SIGNATURE_NAME, KeyLike, signature_text, verify_signature

if TYPE_CHECKING:
    from leukoedge.backends.base import Backend

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class Bundle:
    """A loaded, validated bundle: its folder and its manifest."""

    root: Path
    manifest: dict[str, Any]

    def path(self, file_name: str) -> Path:
        """Where a file listed in manifest["files"] lies."""
        if file_name not in self.manifest["files"]:
            raise BundleError(f"{file_name!r} is not a file of bundle {self.name}; it has {sorted(self.manifest['files'])}")
        return self.root / file_name

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Sizes checked before anything is read. The default bundle's manifest is 26 KB and its largest file 1.7 MB;
# without these, a 2 GB manifest.json took 4.2 GB of memory before it was refused (issue 23).
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILE_BYTES = 1 << 30  # any one file of a bundle; ONNX Runtime cannot parse a model over 2 GiB anyway
MAX_FILES = 100  # files one manifest lists
MAX_ARCHIVE_BYTES = 2 << 30  # everything a bundle archive unpacks to, as its members declare it
MAX_ARCHIVE_MEMBERS = 1000
# Free space an archive's extraction must leave on its disk: a bundle unpacked onto the disk a device
# records its sessions to must not fill it (session records, overlays and logs need room too).
EXTRACTION_MARGIN_BYTES = 64 << 20
_FILE_BLOCK = 4096  # what one extracted file may take beyond its bytes (its last, partly filled block)
MAX_SIGNATURE_BYTES = 1024

# Ranges of manifest values: wide for any bundle meant for a microscope camera, narrow enough that no value
# makes a frame allocate gigabytes, overflow a float, or divide by zero.
MAX_INPUT_SIDE = 4096  # px, a model input's height or width
MAX_FRAME_SIDE = MAX_DECODED_SIDE  # px, the most limits.max_frame_side may allow: larger images are refused undecoded
MAX_CROP_MARGIN = 1.0  # a cell crop grows by at most the cell's side on each edge
MAX_CLASSES = 1000
MAX_TEXT = 1000  # characters of a name, file name or date
_MAX_INT = 2**53  # beyond this an integer is no longer exact as a float, and 10**400 overflows one

SEGMENTATION_CLASSES = 3  # the runtime's label convention: 0 background, 1 cytoplasm, 2 nucleus (result.py)
BLAST_HEAD, BLAST_CLASS = "blast", "blast"  # the verdict reads this head's class, whatever the primary head


def _shown(value: Any) -> str:
    """A value as a refusal quotes it: repr, cut short (a manifest may hold a megabyte-long list)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_text(value: Any) -> bool:
    # isprintable() refuses NUL bytes, newlines and other control characters in names and file names.
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT and value.isprintable()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT <= value <= _MAX_INT


def _is_number(value: Any) -> bool:
    # json.loads accepts NaN and Infinity; as a mean, std or threshold they would silently poison every frame.
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_names(count: int | None = None) -> Callable[[Any], bool]:
    """A list of distinct names: `count` of them, or 1 to MAX_CLASSES."""

    def check(value: Any) -> bool:
        if not (isinstance(value, list) and all(_is_text(item) for item in value) and len(set(value)) == len(value)):
            return False
        return len(value) == count if count is not None else 0 < len(value) <= MAX_CLASSES

    return check


@dataclass(frozen=True)
class Key:
    """One manifest key: how its value is checked, and what a refusal says was expected."""

    check: Callable[[Any], bool]
    expected: str
    optional: bool = False


def _text(what: str, optional: bool = False) -> Key:
    return Key(_is_text, f"{what} (printable, 1 to {MAX_TEXT} characters)", optional)


def _integer(low: int, high: int, optional: bool = False) -> Key:
    return Key(lambda value: _is_int(value) and low <= value <= high, f"an integer in [{low}, {high}]", optional)


def _number(low: float, high: float, optional: bool = False) -> Key:
    return Key(lambda value: _is_number(value) and low <= value <= high, f"a number in [{low:g}, {high:g}]", optional)


def _numbers(count: int, low: float, high: float) -> Key:
    return Key(
        lambda value: isinstance(value, list) and len(value) == count and all(_is_number(item) and low <= item <= high for item in value),
        f"{count} numbers in [{low:g}, {high:g}]",
    )


def _names(what: str, count: int | None = None) -> Key:
    how_many = f"{count}" if count is not None else f"1 to {MAX_CLASSES}"
    return Key(_is_names(count), f"a list of {how_many} distinct {what}")


_INPUT_SIZE = Key(
    lambda value: isinstance(value, list) and len(value) == 2 and all(_is_int(side) and 1 <= side <= MAX_INPUT_SIDE for side in value),
    f"[H, W], integers in [1, {MAX_INPUT_SIDE}]",
)
_CROP_MARGIN = _number(0.0, MAX_CROP_MARGIN)
MAX_DOMAIN_REFERENCES = 1000
_FLOPS = Key(lambda value: _is_number(value) and value >= 0, "a number >= 0", optional=True)


@dataclass(frozen=True)
class ModelOutput:
    """An output a model must return for a batch of one: its name and shape (None: any size), and the manifest
    keys that declare them (named in refusals). Along axis 1 every output holds class probabilities."""

    name: str
    shape: tuple[int | None, ...]
    name_key: str
    shape_keys: str


@dataclass(frozen=True)
class Section:
    """One object of the manifest.

    keys: what each key must hold. constraints: (section, manifest) -> problems, between keys or with
    other sections, run once every key of the manifest has the right type. outputs: for a model section,
    what its model returns (check_models runs it at load). optional: checked only where the manifest has it.
    """

    keys: dict[str, Key]
    constraints: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None
    outputs: Callable[[dict[str, Any]], list[ModelOutput]] | None = None
    optional: bool = False


def _stain_problems(preprocess: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    stain = preprocess["stain_reference"]
    lab_mean, lab_std = (stain.get(key) if isinstance(stain, dict) else None for key in ("lab_mean", "lab_std"))
    # OpenCV's float L*a*b*: L in 0..100, a and b in about -128..127.
    mean_ok = isinstance(lab_mean, list) and len(lab_mean) == 3 and all(_is_number(v) for v in lab_mean) and 0 <= lab_mean[0] <= 100
    mean_ok = mean_ok and all(-128 <= v <= 128 for v in lab_mean[1:])
    std_ok = isinstance(lab_std, list) and len(lab_std) == 3 and all(_is_number(v) and 0 < v <= 200 for v in lab_std)
    if stain is None or (stain.get("method") == "reinhard" and mean_ok and std_ok):
        return []
    return [
        'preprocess.stain_reference must be {"method": "reinhard", "lab_mean": [L 0..100, a, b -128..128], '
        f'"lab_std": [3 numbers in (0, 200]]}} or null, got {_shown(stain)}'
    ]


def _head_problems(classifier: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    heads, problems = classifier["heads"], []
    for head, spec in heads.items():
        if not (_is_text(head) and isinstance(spec, dict) and _is_text(spec.get("output")) and _is_names()(spec.get("classes"))):
            problems.append(f'classifier.heads.{head} must be {{"output": name, "classes": [distinct names]}}, got {_shown(spec)}')
    if problems:
        return problems
    outputs = [spec["output"] for spec in heads.values()]
    if len(set(outputs)) != len(outputs):
        problems.append(f"classifier.heads name one output twice: {outputs}")
    if classifier["primary_head"] not in heads:
        problems.append(f"classifier.primary_head {classifier['primary_head']!r} is not one of the heads {sorted(heads)}")
    if BLAST_CLASS not in heads.get(BLAST_HEAD, {}).get("classes", []):
        problems.append(f"classifier.heads must have a {BLAST_HEAD!r} head with a {BLAST_CLASS!r} class (the frame verdict counts it), got {sorted(heads)}")
    return problems


def _gate_problems(gate: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The gate reads the classifier's crops (one crop serves both), so it must cut them the same way."""
    problems = []
    if "wbc" not in gate["classes"]:
        problems.append(f"gate.classes must name the white-cell class 'wbc', got {gate['classes']}")
    classifier = manifest.get("classifier", {})
    for head, names in gate.get("not_white_cell_classes", {}).items():
        known = classifier.get("heads", {}).get(head, {}).get("classes", [])
        if not set(names) <= set(known) or set(names) == set(known):
            problems.append(f"gate.not_white_cell_classes.{head} must name some (not all) classes of classifier head {head!r} {known}, got {names}")
    if (gate["input_size"], gate["crop_margin"]) != (classifier.get("input_size"), classifier.get("crop_margin")):
        problems.append(
            f"gate.input_size and gate.crop_margin must equal the classifier's ({classifier.get('input_size')}, "
            f"{classifier.get('crop_margin')}), got ({gate['input_size']}, {gate['crop_margin']})"
        )
    return problems


def _domain_problems(domain: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Each reference frame and the spread hold one number per colour feature the check was fitted on."""
    names = feature_names(domain)
    if tuple(names) not in (COLOUR_FEATURES, MEAN_SPREAD_FEATURES):
        return [f"domain.colour_features must be {list(COLOUR_FEATURES)} or {list(MEAN_SPREAD_FEATURES)}, got {names}"]
    problems = []
    if any(len(row) != len(names) for row in domain["colour_references"]):
        problems.append(f"domain.colour_references rows must hold {len(names)} numbers, one per colour feature {list(names)}")
    if len(domain["colour_spread"]) != len(names):
        problems.append(f"domain.colour_spread must hold {len(names)} numbers, one per colour feature {list(names)}")
    return problems


def _limit_problems(limits: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    if limits["min_frame_side"] > limits["max_frame_side"]:
        return [f"limits.min_frame_side {limits['min_frame_side']} exceeds limits.max_frame_side {limits['max_frame_side']}"]
    return []


def _label_map_outputs(section: str, same_size: bool) -> Callable[[dict[str, Any]], list[ModelOutput]]:
    """A segmentation model: class probabilities per pixel, at its input's size where the runtime maps them
    back pixel for pixel (the field segmenter; the refiner's crops are resized anyway)."""

    def outputs(spec: dict[str, Any]) -> list[ModelOutput]:
        height, width = spec["input_size"] if same_size else (None, None)
        shape_keys = f"{section}.classes and {section}.input_size" if same_size else f"{section}.classes"
        return [ModelOutput(spec["output"], (1, len(spec["classes"]), height, width), f"{section}.output", shape_keys)]

    return outputs


def _head_outputs(classifier: dict[str, Any]) -> list[ModelOutput]:
    return [
        ModelOutput(spec["output"], (1, len(spec["classes"])), f"classifier.heads.{head}.output", f"classifier.heads.{head}.classes")
        for head, spec in classifier["heads"].items()
    ]


def _precision_problems(precisions: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The "precisions" section written by `leukoedge calibrate`: calibration settings, per model and
    precision the file, its measured speed and (int8) the accuracy gate it passed."""
    problems = []
    calibration = precisions.get("calibration")
    if not (isinstance(calibration, dict) and calibration.get("method") in CALIBRATION_METHODS):
        problems.append(f"precisions.calibration must be an object with method one of {CALIBRATION_METHODS}, got {_shown(calibration)}")
    elif not _is_text(calibration.get("calibration_set")) or calibration["calibration_set"] not in manifest["files"]:
        problems.append(f"precisions.calibration.calibration_set {_shown(calibration.get('calibration_set'))} is not listed in files")
    for model in bundle_models(manifest):
        entry = precisions.get(model)
        if not isinstance(entry, dict) or set(entry) - set(BUNDLE_PRECISIONS) or "fp32" not in entry:
            problems.append(f"precisions.{model} must be an object with fp32 and optionally int8, got {_shown(entry)}")
            continue
        for precision, variant in entry.items():
            problems.extend(_variant_problems(manifest, model, precision, variant))
    return problems


def _variant_problems(manifest: dict[str, Any], model: str, precision: str, variant: Any) -> list[str]:
    where = f"precisions.{model}.{precision}"
    if not isinstance(variant, dict):
        return [f"{where} must be an object, got {_shown(variant)}"]
    problems = []
    speed = variant.get("median_ms")
    if speed is not None and not (_is_number(speed) and speed > 0):
        problems.append(f"{where}.median_ms must be a number > 0 or null, got {_shown(speed)}")
    file_name = variant.get("file")
    if precision == "fp32" and file_name != manifest[model]["file"]:
        problems.append(f"{where}.file must be {model}.file {manifest[model]['file']!r}, got {_shown(file_name)}")
    if precision != "int8":
        return problems
    gate = variant.get("gate")
    if not (isinstance(gate, dict) and _is_bool(gate.get("passed")) and isinstance(gate.get("metrics"), list)):
        problems.append(f'{where}.gate must be {{"passed": bool, "metrics": [...]}}, got {_shown(gate)}')
    elif not all(_is_gate_metric(metric) for metric in gate["metrics"]):
        problems.append(f'{where}.gate.metrics must hold {{"name", "fp32", "int8", "tolerance", "passed"}} objects, got {_shown(gate["metrics"])}')
    elif file_name is not None and not gate["passed"]:
        problems.append(f"{where}.file {_shown(file_name)} failed its accuracy gate; a bundle never ships a model that failed")
    if file_name is not None and not (isinstance(file_name, str) and file_name in manifest["files"]):
        problems.append(f"{where}.file {_shown(file_name)} is not listed in files")
    return problems


def _is_gate_metric(metric: Any) -> bool:
    """One metric of an int8 accuracy gate, as model_file quotes it when the gate failed. A score may be NaN
    (a metric undefined on a degenerate gate set): it is a record of the calibration, not a setting."""
    return (
        isinstance(metric, dict)
        and _is_text(metric.get("name"))
        and all(isinstance(metric.get(key), float) or _is_int(metric.get(key)) for key in ("fp32", "int8"))
        and _is_number(metric.get("tolerance"))
        and _is_bool(metric.get("passed", True))
    )


# The manifest's sections, in the order a frame meets the models: the one place that says what a manifest
# holds. An optional section is checked only where a bundle has it; adding one (say a "gate" model) is one
# entry here: its keys, its constraints and, for a model, the outputs check_models expects at load.
SECTIONS: dict[str, Section] = {
    "preprocess": Section(
        {
            "channel_order": Key(lambda value: value in ("RGB", "BGR"), '"RGB" or "BGR"'),
            "mean": _numbers(3, 0.0, 1.0),  # of channel values scaled to [0, 1]
            "std": _numbers(3, 1e-3, 10.0),
            "stain_reference": Key(lambda value: value is None or isinstance(value, dict), "an object or null"),
        },
        constraints=_stain_problems,
    ),
    "segmenter": Section(
        {
            "file": _text("a file name"),
            "input": _text("an input name"),
            "output": _text("an output name"),
            "input_size": _INPUT_SIZE,
            "classes": _names("class names (background, cytoplasm, nucleus)", SEGMENTATION_CLASSES),
            "architecture": _text("an architecture name"),
            "flops": _FLOPS,
        },
        outputs=_label_map_outputs("segmenter", same_size=True),
    ),
    "refiner": Section(  # leukoedge/refine.py; bundles made before 2026-11-30 have none
        {
            "file": _text("a file name"),
            "input": _text("an input name"),
            "output": _text("an output name"),
            "input_size": _INPUT_SIZE,
            "crop_margin": _CROP_MARGIN,
            "classes": _names("class names (background, cytoplasm, nucleus)", SEGMENTATION_CLASSES),
            "architecture": _text("an architecture name"),
            "flops": _FLOPS,
            # refine.cells_to_refine: cells whose field-mask uncertainty is below this keep the segmenter's masks;
            # absent: every cell is refined (docs/performance.md, "Refining only uncertain cells")
            "skip_below_uncertainty": _number(0.0, 1.0, optional=True),
            "min_cell_side_px": _number(0.0, MAX_FRAME_SIDE, optional=True),  # absent before 0.8.0: cells of any size refined
            # a refined cell whose box shrank below this share of the area of the box it was refined from is refined
            # again from a crop around its refined box (Detector.refine); absent: every cell is refined once
            "refine_again_below": _number(0.0, 1.0, optional=True),
        },
        outputs=_label_map_outputs("refiner", same_size=False),
        optional=True,
    ),
    "gate": Section(  # training/gate.py: white cell or not; bundles made before 0.2.0 have none
        {
            "file": _text("a file name"),
            "input": _text("an input name"),
            "output": _text("an output name"),
            "input_size": _INPUT_SIZE,
            "crop_margin": _CROP_MARGIN,
            "classes": _names("class names (not_wbc, wbc)", 2),
            "architecture": _text("an architecture name"),
            "threshold": _number(0.0, 1.0),
            # a proposal at the frame's edge its crop does not pass is read again mirrored whole, and kept at this
            # p(wbc) (Detector.gate_keeps); absent: no second reading (bundles before 0.19.0)
            "edge_whole_threshold": _number(0.0, 1.0, optional=True),
            # classifier head -> its classes that are not white cells (a gated cell is never named one)
            "not_white_cell_classes": Key(
                lambda value: isinstance(value, dict) and all(_is_text(head) and _is_names()(names) for head, names in value.items()),
                "an object of classifier head -> list of class names",
                optional=True,
            ),
        },
        constraints=_gate_problems,
        outputs=lambda spec: [ModelOutput(spec["output"], (1, 2), "gate.output", "gate.classes")],
        optional=True,
    ),
    "classifier": Section(
        {
            "file": _text("a file name"),
            "input": _text("an input name"),
            "input_size": _INPUT_SIZE,
            "crop_margin": _CROP_MARGIN,
            "primary_head": _text("a head name"),
            "heads": Key(lambda value: isinstance(value, dict) and 0 < len(value) <= MAX_CLASSES, "an object of head name -> {output, classes}"),
            "flops": _FLOPS,
        },
        constraints=_head_problems,
        outputs=_head_outputs,
    ),
    "postprocess": Section(
        {
            "min_cell_area_px": _integer(0, MAX_FRAME_SIDE**2),
            "min_nucleus_area_px": _integer(0, MAX_FRAME_SIDE**2, optional=True),  # absent before 0.1.0
            "split_touching": Key(_is_bool, "true or false"),
        }
    ),
    "verdict": Section(
        {
            "blast_threshold": _number(0.0, 1.0),
            "flag_fraction": _number(0.0, 1.0),
            "min_blast_count": _integer(1, 1000, optional=True),  # absent before 0.5.0: one blast flags a frame
        }
    ),
    "limits": Section(
        {"min_frame_side": _integer(1, MAX_FRAME_SIDE), "max_frame_side": _integer(1, MAX_FRAME_SIDE)},
        constraints=_limit_problems,
    ),
    "domain": Section(  # leukoedge/domain.py: the domain check; bundles made before 0.2.0 have none
        {
            # the features the check compares (leukoedge/domain.py); bundles that do not name them compare L*a*b* means and spreads
            "colour_features": Key(_is_names(), "a list of colour feature names", optional=True),
            "colour_references": Key(
                lambda value: isinstance(value, list) and 0 < len(value) <= MAX_DOMAIN_REFERENCES
                and all(isinstance(row, list) and all(_is_number(v) for v in row) for row in value),
                f"a list of 1 to {MAX_DOMAIN_REFERENCES} rows of numbers (a reference frame's colour features)",
            ),
            "colour_spread": Key(lambda value: isinstance(value, list) and all(_is_number(v) and v > 0 for v in value), "numbers > 0"),
            "max_colour_distance": _number(0.0, 1e6),
            "max_uncertainty": _number(0.0, 1.0),
            "max_device_uncertainty": _number(0.0, 1.0, optional=True),  # bundles fitted before 0.20.0 have none: adapt keeps their bar
            "min_cell_side_px": _number(0.0, 1e4, optional=True),  # bundles fitted before the cell-size check have none
            "max_edge_width": _number(0.0, 1e3, optional=True),  # bundles fitted before the focus check (0.11.0) have none
            "max_noise": _number(0.0, 1e3, optional=True),  # bundles fitted before the noise check (0.12.0) have none
            "min_jpeg_quality": _integer(1, 100, optional=True),  # bundles fitted before the compression check (0.13.0) have none
            "min_edge_isotropy": _number(0.0, 1.0, optional=True),  # an adapted bundle's own motion bar (leukoedge adapt)
        },
        constraints=_domain_problems,
        optional=True,
    ),
    "training": Section({}),  # free-form: how the bundle was made, for people and `leukoedge info`
    "precisions": Section({}, constraints=_precision_problems, optional=True),  # only bundles that went through `leukoedge calibrate`
}

_TOP_LEVEL: dict[str, Key] = {
    "name": _text("a non-empty string"),
    "model_version": _text("a non-empty string"),
    "created": _text("an ISO date string"),
    "files": Key(lambda value: isinstance(value, dict) and len(value) <= MAX_FILES, f"an object of at most {MAX_FILES} file name -> sha256"),
}

# Precisions a bundle can hold model files for; fp16 exists only as a TensorRT engine built from the fp32 file.
BUNDLE_PRECISIONS = ("fp32", "int8")
MODELS = tuple(name for name, section in SECTIONS.items() if section.outputs and not section.optional)  # every bundle has these
OPTIONAL_MODELS = tuple(name for name, section in SECTIONS.items() if section.outputs and section.optional)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

_SHA256 = re.compile(r"[0-9a-f]{64}")


def bundle_models(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The models this bundle holds, in the order a frame meets them: segmenter, [refiner], classifier."""
    return tuple(name for name, section in SECTIONS.items() if section.outputs and (not section.optional or name in manifest))


def _unsafe_file_name(name: str) -> bool:
    """Absolute (POSIX or Windows) or climbing out with '..': could reach outside the bundle."""
    return (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or bool(PureWindowsPath(name).drive)
        or ".." in re.split(r"[\\/]", name)
    )


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Refuse a manifest of another schema, or one missing keys, carrying wrong types or values out of
    range, or whose keys contradict each other. Every refusal is a BundleError naming the keys."""
    if not isinstance(manifest, dict):
        raise BundleError(f"manifest.json must hold a JSON object, got {type(manifest).__name__}")
    if "schema_version" not in manifest:
        raise BundleError(f"manifest.json has no schema_version; this leukoedge reads schema {SCHEMA_VERSION}")
    schema = manifest["schema_version"]
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        raise BundleError(
            f"bundle schema {_shown(schema)} is not supported by this leukoedge (supports {SCHEMA_VERSION}); "
            "upgrade leukoedge or re-export"
        )
    missing, wrong = _key_problems(manifest)
    if missing:
        raise BundleError(f"manifest.json is missing required keys: {', '.join(missing)}")
    if not wrong:  # constraints read keys of several sections: only once every key has its type
        wrong = _file_problems(manifest["files"])
        for name, section in SECTIONS.items():
            if name in manifest and section.constraints:
                wrong.extend(section.constraints(manifest[name], manifest))
        wrong.extend(
            f"{model}.file {manifest[model]['file']!r} is not listed in files"
            for model in bundle_models(manifest)
            if manifest[model]["file"] not in manifest["files"]
        )
    if wrong:
        raise BundleError("manifest.json is invalid: " + "; ".join(wrong))


def _key_problems(manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(missing keys, keys of the wrong type or out of range), over the top level and every section present."""
    missing: list[str] = []
    wrong: list[str] = []
    _check_keys("", manifest, _TOP_LEVEL, missing, wrong)
    for name, section in SECTIONS.items():
        if name not in manifest:
            if not section.optional:
                missing.append(name)
        elif not isinstance(manifest[name], dict):
            wrong.append(f"{name}{' (optional)' if section.optional else ''} must be an object, got {_shown(manifest[name])}")
        else:
            _check_keys(f"{name}.", manifest[name], section.keys, missing, wrong)
    return missing, wrong


def _check_keys(prefix: str, table: dict[str, Any], keys: dict[str, Key], missing: list[str], wrong: list[str]) -> None:
    for key, rule in keys.items():
        if key not in table:
            if not rule.optional:
                missing.append(prefix + key)
        elif not rule.check(table[key]):
            wrong.append(f"{prefix}{key} must be {rule.expected}, got {_shown(table[key])}")


def _file_problems(files: dict[str, Any]) -> list[str]:
    problems = []
    for name, sha in files.items():
        if not _is_text(name):
            problems.append(f"file name {_shown(name)} in files must be printable, 1 to {MAX_TEXT} characters")
        elif _unsafe_file_name(name):
            problems.append(f"file name {name!r} in files is absolute or contains '..'; bundle files must lie inside the bundle folder")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            problems.append(f"files[{_shown(name)}] must be a lowercase hex sha256, got {_shown(sha)}")
    return problems


def model_file(manifest: dict[str, Any], model: str, precision: str) -> str:
    """The bundle file that holds `model` at `precision` ("fp32", "fp16": the fp32 file; "int8": the gated QDQ file)."""
    if precision in ("fp32", "fp16"):
        return manifest[model]["file"]
    if precision != "int8":
        raise BundleError(f"unknown precision {precision!r}; a bundle holds {', '.join(BUNDLE_PRECISIONS)} models (fp16: TensorRT engines)")
    variant = manifest.get("precisions", {}).get(model, {}).get("int8")
    if variant is None:
        raise BundleError(f"bundle {manifest['name']} has no int8 {model}: quantize it with `leukoedge calibrate --data DIR --bundle B`")
    if variant.get("file") is None:
        failed = [m for m in variant["gate"]["metrics"] if not m.get("passed", True)]
        reasons = "; ".join(f"{m['name']} {m['fp32']:.4f} -> {m['int8']:.4f} (allowed drop {m['tolerance']:g})" for m in failed)
        raise BundleError(f"bundle {manifest['name']} has no int8 {model}: it failed its accuracy gate at calibration ({reasons})")
    return variant["file"]


# A reduced precision is the default only where it measured at least this much faster than FP32. Latencies
# on a small shared CPU swing by several percent from one calibration to the next; without a margin, a tie
# flips a bundle's default precision, and so its figures, between two runs of the same command.
MIN_SPEEDUP = 0.05


def fastest_precision(manifest: dict[str, Any], model: str) -> str:
    """The precision of `model` with the lowest median latency measured at calibration, among those in
    the bundle (int8 only if it passed its gate), if it beats FP32 by MIN_SPEEDUP; else fp32, also
    where the bundle was never calibrated."""
    measured = {
        precision: variant["median_ms"]
        for precision, variant in manifest.get("precisions", {}).get(model, {}).items()
        if variant.get("file") is not None and variant.get("median_ms") is not None
    }
    if not measured:
        return "fp32"
    fastest = min(measured, key=measured.get)
    if "fp32" in measured and measured[fastest] > (1.0 - MIN_SPEEDUP) * measured["fp32"]:
        return "fp32"
    return fastest


# A softmax's rows sum to 1 up to float rounding: within 2e-7 on the default bundle's models, INT8 included.
PROBABILITY_TOLERANCE = 1e-3


def check_models(manifest: dict[str, Any], models: Mapping[str, Backend], files: Mapping[str, str] | None = None) -> None:
    """Run one input of zeros (a batch of one at the manifest's input size) through every opened model and
    hold what comes out against the manifest: the input's name, each output's name and shape (class
    counts included) and its class probabilities. A bundle whose manifest and models disagree is refused
    here, at load, instead of failing or being misread at the first frame; the run also warms the backend up.

    models: manifest section -> the backend running it; files: section -> the file it runs (for messages).
    """
    for model, backend in models.items():
        spec = manifest[model]
        file_name = (files or {}).get(model, spec["file"])
        expected = SECTIONS[model].outputs(spec)
        _check_model_names(model, file_name, spec, backend, expected)
        height, width = spec["input_size"]
        try:
            outputs = backend.run({spec["input"]: np.zeros((1, 3, height, width), np.float32)})
        except LeukoedgeError:
            raise
        except Exception as error:  # each backend raises its own (ONNX Runtime: InvalidArgument, Fail, ...)
            raise BundleError(f"{model} model {file_name} does not run on a 1x3x{height}x{width} input ({model}.input_size): {error}") from error
        for output in expected:
            problem = _output_problem(np.asarray(outputs[output.name]), output.shape)
            if problem:
                raise BundleError(f"{model} model {file_name}: output {output.name!r} {problem} (from {output.shape_keys})")


def _check_model_names(model: str, file_name: str, spec: dict[str, Any], backend: Backend, expected: list[ModelOutput]) -> None:
    if list(backend.input_names) != [spec["input"]]:
        raise BundleError(f"{model}.input {spec['input']!r} is not the input of {file_name}: its inputs are {list(backend.input_names)}")
    for output in expected:
        if output.name not in backend.output_names:
            raise BundleError(f"{output.name_key} {output.name!r} is not an output of {file_name}: its outputs are {list(backend.output_names)}")


def _output_problem(values: np.ndarray, shape: tuple[int | None, ...]) -> str | None:
    """What is wrong with one output for a batch of one, or None."""
    if values.ndim != len(shape) or any(want is not None and got != want for got, want in zip(values.shape, shape)):
        wanted = "(" + ", ".join("any" if side is None else str(side) for side in shape) + ")"
        return f"has shape {values.shape} where the manifest expects {wanted}"
    if not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
        return f"holds {values.dtype} values that are not all finite numbers"
    sums = values.sum(axis=1, dtype=np.float64)
    if values.min() < -PROBABILITY_TOLERANCE or values.max() > 1 + PROBABILITY_TOLERANCE or np.abs(sums - 1.0).max() > PROBABILITY_TOLERANCE:
        return f"is not class probabilities (values {values.min():.3g}..{values.max():.3g}, sums over classes {sums.min():.3g}..{sums.max():.3g}: logits, not a softmax?)"
    return None


def _read_manifest_bytes(root: Path) -> bytes:
    """manifest.json's bytes, its size checked before it is read (a 2 GB one is refused without reading it)."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a leukoedge bundle: it has no {MANIFEST_NAME}")
    try:
        size = manifest_path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{manifest_path} is {size} bytes; a manifest may hold at most {MAX_MANIFEST_BYTES} (1 MiB)")
        with open(manifest_path, "rb") as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)  # the file may have grown since stat()
    except OSError as error:
        raise BundleError(f"{manifest_path} cannot be read: {error}") from error
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path} holds more than {MAX_MANIFEST_BYTES} bytes (1 MiB), the most a manifest may hold")
    return data


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys, another parser the first: a signed or reviewed manifest
    # must mean one thing.
    table = dict(pairs)
    if len(table) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise BundleError(f"{MANIFEST_NAME} holds the key {twice!r} twice in one object")
    return table


def _parse_manifest(data: bytes, manifest_path: Path) -> dict[str, Any]:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    # ValueError: malformed JSON, bytes that are not UTF-8, integers over Python's 4300-digit limit;
    # RecursionError: absurdly deep nesting.
    except (ValueError, RecursionError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON: {error}") from error


def _check_files(root: Path, manifest: dict[str, Any], verify: bool) -> None:
    resolved_root = root.resolve()
    for name, expected in manifest["files"].items():
        path = root / name
        try:
            # resolve() follows symlinks, so a link inside the folder pointing out of it is caught too.
            if not path.resolve().is_relative_to(resolved_root):
                raise BundleError(f"bundle file {name!r} resolves to {path.resolve()}, outside the bundle folder {resolved_root}")
            if not path.is_file():
                raise BundleError(f"bundle file {name!r} listed in {MANIFEST_NAME} is missing from {root} (or is not a regular file)")
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise BundleError(f"bundle file {name!r} is {size} bytes; a bundle file may hold at most {MAX_FILE_BYTES} (1 GiB)")
            actual = sha256_file(path) if verify else expected
        except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop, on Python < 3.13
            raise BundleError(f"bundle file {name!r} cannot be read: {error}") from error
        if actual != expected:
            raise BundleError(
                f"bundle file {name!r} fails its checksum: expected sha256 {expected}, got {actual}; "
                "the file was modified or corrupted since the bundle was saved"
            )


def _check_member(archive: Path, name: str, size: int, totals: list[int]) -> None:
    """One archive member's name and declared size, before anything is extracted; totals: [members, bytes] so far."""
    if _unsafe_file_name(name):
        raise BundleError(f"archive {archive} is refused: member {name!r} is an absolute path or contains '..' (path traversal)")
    totals[0] += 1
    totals[1] += size
    limit = MAX_MANIFEST_BYTES if PurePosixPath(name).name == MANIFEST_NAME else MAX_FILE_BYTES
    if size > limit:
        raise BundleError(f"archive {archive} is refused: member {name!r} declares {size} bytes, more than a bundle file may hold ({limit})")
    if totals[0] > MAX_ARCHIVE_MEMBERS or totals[1] > MAX_ARCHIVE_BYTES:
        raise BundleError(
            f"archive {archive} is refused: more than {MAX_ARCHIVE_MEMBERS} members or {MAX_ARCHIVE_BYTES} bytes unpacked (a decompression bomb?)"
        )


def _check_free_space(archive: Path, destination: Path, totals: list[int]) -> None:
    """Refuse to extract `totals` ([members, bytes] as declared) where the destination's disk would keep
    less than EXTRACTION_MARGIN_BYTES free: a full disk mid-extraction fails later and less clearly."""
    needed = totals[1] + totals[0] * _FILE_BLOCK + EXTRACTION_MARGIN_BYTES
    free = shutil.disk_usage(destination).free
    if free < needed:
        raise BundleError(
            f"archive {archive} is refused: it unpacks to {totals[1] / 2**20:.1f} MiB, and the disk holding {destination.parent} "
            f"has {free / 2**20:.1f} MiB free, less than that plus the {EXTRACTION_MARGIN_BYTES >> 20} MiB it must keep free; "
            "free some space, set TMPDIR to a folder on a larger disk, or unpack the archive yourself and load the folder"
        )


_UNIX_FILE_TYPE = 0o170000
_UNIX_REGULAR, _UNIX_FOLDER = 0o100000, 0o040000


def _extract_zip(archive: Path, destination: Path) -> None:
    with zipfile.ZipFile(archive) as bundle_zip:
        totals = [0, 0]
        for member in bundle_zip.infolist():
            _check_member(archive, member.filename, member.file_size, totals)
            # The high 16 bits hold a Unix mode where the zip was made on Unix. Its file type bits are 0 where
            # the writer recorded none (ZipFile.writestr records permissions only): a regular file, as for
            # zips from Windows. Only plain files and folders pass.
            file_type = (member.external_attr >> 16) & _UNIX_FILE_TYPE
            if file_type not in (0, _UNIX_REGULAR, _UNIX_FOLDER):
                raise BundleError(f"archive {archive} is refused: member {member.filename!r} is a link or special file")
        # zipfile stops each member at its declared size, so the sizes checked above bound what is written.
        _check_free_space(archive, destination, totals)
        bundle_zip.extractall(destination)


def _extract_tar(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as bundle_tar:
        totals, members = [0, 0], []
        for member in bundle_tar:  # one header at a time: a tar of a million members is refused at the 1001st
            _check_member(archive, member.name, member.size, totals)
            if not (member.isfile() or member.isdir()) or member.issparse():
                raise BundleError(f"archive {archive} is refused: member {member.name!r} is a link, device or other special file")
            members.append(member)
        # The "data" filter (Python >= 3.10.12 / 3.11.4) repeats these checks inside tarfile itself.
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        _check_free_space(archive, destination, totals)
        bundle_tar.extractall(destination, members=members, **safety)


def _bundle_root(extracted: Path) -> Path:
    """The manifest's folder: the archive root, or its single top-level folder (an archived folder)."""
    if (extracted / MANIFEST_NAME).is_file():
        return extracted
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


def _load_archive(archive: Path, verify: bool, public_key: KeyLike | None) -> Bundle:
    if zipfile.is_zipfile(archive):
        extract = _extract_zip
    elif tarfile.is_tarfile(archive):
        extract = _extract_tar
    else:
        raise BundleError(f"{archive} is neither a bundle folder nor a .zip / .tar / .tar.gz archive of one")
    extraction = Path(tempfile.mkdtemp(prefix="leukoedge-bundle-"))
    try:
        extract(archive, extraction)
        bundle = _load_folder(_bundle_root(extraction), verify, public_key)
    except BundleError:
        shutil.rmtree(extraction, ignore_errors=True)
        raise
    except Exception as error:  # zipfile, tarfile and each decompressor raise their own: EOFError, zlib.error, LZMAError...
        shutil.rmtree(extraction, ignore_errors=True)
        raise BundleError(f"archive {archive} cannot be extracted: {error}") from error
    # The extracted files live exactly as long as the bundle that points at them.
    weakref.finalize(bundle, shutil.rmtree, extraction, ignore_errors=True)
    return bundle


def _check_signature(root: Path, manifest_bytes: bytes, public_key: KeyLike) -> None:
    signature_path = root / SIGNATURE_NAME
    if not signature_path.is_file():
        raise BundleError(f"bundle {root} is not signed: it has no {SIGNATURE_NAME}, and a public key was given to check it with")
    try:
        if signature_path.stat().st_size > MAX_SIGNATURE_BYTES:
            raise BundleError(f"{signature_path} is over {MAX_SIGNATURE_BYTES} bytes: not a signature")
        signature = signature_path.read_bytes()
    except OSError as error:
        raise BundleError(f"{signature_path} cannot be read: {error}") from error
    verify_signature(manifest_bytes, signature, public_key)


def _load_folder(root: Path, verify: bool, public_key: KeyLike | None) -> Bundle:
    manifest_bytes = _read_manifest_bytes(root)
    if public_key is not None:  # before parsing: an unsigned manifest's JSON is never even read
        _check_signature(root, manifest_bytes, public_key)
    manifest = _parse_manifest(manifest_bytes, root / MANIFEST_NAME)
    validate_manifest(manifest)
    _check_files(root, manifest, verify)
    return Bundle(root=root, manifest=manifest)


def load_bundle(path: str | Path, verify: bool = True, public_key: KeyLike | None = None) -> Bundle:
    """Load a bundle folder or archive; verify=True checks every file's sha256 (reads every byte).

    public_key: the integrator's pinned Ed25519 public key (leukoedge/signing.py lists the forms it takes);
    given, the bundle must carry manifest.json.sig, a valid signature of its manifest.json by that key.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"expected the path of a bundle folder or archive (str or pathlib.Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, verify, public_key)
    if path.is_file():
        return _load_archive(path, verify, public_key)
    raise BundleError(f"bundle folder {path} does not exist")


def sign_bundle(path: str | Path, private_key: KeyLike) -> Path:
    """Sign a bundle folder: write manifest.json.sig, an Ed25519 signature of its manifest.json. The bundle
    is loaded first (checksums included), so a broken bundle is never signed. Returns the signature's path."""
    if not Path(path).is_dir():
        raise BundleError(f"{path} is not a bundle folder: sign the folder, then archive it")
    bundle = load_bundle(path)
    signature_path = bundle.root / SIGNATURE_NAME
    signature_path.write_text(signature_text(_read_manifest_bytes(bundle.root), private_key), encoding="ascii")
    return signature_path


def save_bundle(out_dir: Path, manifest: dict[str, Any], files: dict[str, Path]) -> Bundle:
    """Copy files (bundle name -> source path) into out_dir, record their sha256 in
    manifest["files"], write manifest.json, and return the bundle as load_bundle reads it."""
    out_dir = Path(out_dir)
    manifest = copy.deepcopy(manifest)
    manifest["files"] = {name: sha256_file(source) for name, source in files.items()}
    # Validate before writing anything, so a bad manifest never leaves a half-written bundle.
    validate_manifest(manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out_dir / SIGNATURE_NAME).unlink(missing_ok=True)  # it signed the manifest just replaced: sign the new one again
    return load_bundle(out_dir)


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in table.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def describe_bundle(bundle: Bundle) -> str:
    """A human-readable summary, as `leukoedge info` prints it."""
    manifest = bundle.manifest
    preprocess, segmenter, classifier = manifest["preprocess"], manifest["segmenter"], manifest["classifier"]
    postprocess, verdict, limits = manifest["postprocess"], manifest["verdict"], manifest["limits"]
    lines = [
        f"bundle {bundle.name} {bundle.model_version} (schema {manifest['schema_version']}, created {manifest['created']})",
        f"folder {bundle.root}",
        "files:",
    ]
    for name, sha in manifest["files"].items():
        lines.append(f"  {name}  {_human_size(bundle.path(name).stat().st_size)}  sha256 {sha[:12]}")
    stain = preprocess["stain_reference"]
    stain_text = "none" if stain is None else f"{stain['method']} lab_mean {stain['lab_mean']} lab_std {stain['lab_std']}"
    height, width = segmenter["input_size"]
    crop_height, crop_width = classifier["input_size"]
    lines += [
        f"preprocess: {preprocess['channel_order']}, mean {preprocess['mean']}, std {preprocess['std']}, stain reference {stain_text}",
        f"segmenter: {segmenter['architecture']} ({segmenter['file']}), input {segmenter['input']!r} {height}x{width}, "
        f"output {segmenter['output']!r}, classes {', '.join(segmenter['classes'])}",
    ]
    if "refiner" in manifest:
        refiner = manifest["refiner"]
        refine_height, refine_width = refiner["input_size"]
        lines.append(
            f"refiner: {refiner['architecture']} ({refiner['file']}), input {refiner['input']!r} {refine_height}x{refine_width} per cell, "
            f"crop margin {refiner['crop_margin']}, output {refiner['output']!r}"
            + (f"; only cells with field-mask uncertainty >= {refiner['skip_below_uncertainty']}" if "skip_below_uncertainty" in refiner else "")
            + (f"; only cells at least {refiner['min_cell_side_px']:g} px across" if "min_cell_side_px" in refiner else "")
            + (f"; refined again around its refined box where that is under {refiner['refine_again_below']:g} of the first box's area" if "refine_again_below" in refiner else "")
        )
    if "gate" in manifest:
        gate = manifest["gate"]
        lines.append(
            f"gate: {gate['architecture']} ({gate['file']}), white cell or not on the classifier's crops; "
            f"a proposal is a white cell at p(wbc) >= {gate['threshold']:.3f}"
            + (
                f"; one at the frame's edge showing at least half a cell, read again mirrored whole, at p(wbc) >= {gate['edge_whole_threshold']:g}"
                if "edge_whole_threshold" in gate
                else ""
            )
        )
    if "domain" in manifest:
        domain = manifest["domain"]
        lines.append(
            f"domain check: {len(domain['colour_references'])} reference frames of {', '.join(feature_names(domain))}; outside at colour distance > "
            f"{domain['max_colour_distance']:.2f} or segmenter uncertainty > {domain['max_uncertainty']:.3f}"
            + (f" (unlabelled adapt: a device's own, at most {domain['max_device_uncertainty']:.3f})" if "max_device_uncertainty" in domain else "")
            + (f" or white cells under {domain['min_cell_side_px']:.1f} px across" if "min_cell_side_px" in domain else "")
            + (f" or out of focus (cells' edges wider than {domain['max_edge_width']:.2f})" if "max_edge_width" in domain else "")
            + (f" or blurred one way (edge isotropy under {domain['min_edge_isotropy']:.2f}, the device's own)" if "min_edge_isotropy" in domain else "")
            + (f" or too noisy (over {domain['max_noise']:.2f} grey levels on the cells)" if "max_noise" in domain else "")
            + (f" or read from a JPEG under quality {domain['min_jpeg_quality']}" if "min_jpeg_quality" in domain else "")
            + (f"; adapted {manifest['adaptation']['date']} from {manifest['adaptation']['frames']} frames" if "adaptation" in manifest else "")
        )
        lines.append(  # the runtime's, for every bundle with a domain check (not fitted, not in the manifest)
            f"runtime checks: black outside a field of view filled and light falling off by {EVEN_FROM:.0%} or more evened before the models; outside when "
            f"more than {MAX_OUTSIDE_FIELD:.0%} outside the field of view or {MAX_DARK_SHARE:.0%} black inside it, light falling off by more "
            f"than {MAX_FALLOFF:.0%}, a band of flat or repeating rows over {MAX_INCOMPLETE:.0%} of the frame, edges blurred one way (edge "
            f"isotropy under {MIN_EDGE_ISOTROPY:.3f}), pixels compressed "
            f"under JPEG quality {MIN_PIXEL_JPEG_QUALITY} (under the file bar where its white cells are under {ENLARGED_CELL_SIDE_PX:.0f} px), or, on a flagged frame, "
            f"colours {SWAP_MARGIN:.2f} nearer the sources' with red and blue swapped, rows torn sideways (tear score over {MAX_TEAR:.1f}), "
            f"fewer than {MIN_WHOLE_BLASTS} blasts besides those cut by the frame's edge and spanning {MAX_CUT_CELL_SHARE:.0%} of it, "
            f"or white cells under {ENLARGED_CELL_SIDE_PX:.0f} px with fine detail under {MIN_FLAG_DETAIL:.1f}; "
            f"and a frame without a white cell whose segmenter marks over {MAX_EMPTY_FOREGROUND:.0%} of it as white cell"
        )
    if manifest.get("adaptation", {}).get("labelled"):
        lines.append(f"adapted with labels (leukoedge adapt --labels): {', '.join(manifest['adaptation']['adapted'])}")
    lines += [
        f"classifier: {classifier['file']}, input {classifier['input']!r} {crop_height}x{crop_width}, "
        f"crop margin {classifier['crop_margin']}, primary head {classifier['primary_head']}",
    ]
    for head, spec in classifier["heads"].items():
        lines.append(f"  head {head} (output {spec['output']!r}): {', '.join(spec['classes'])}")
    if "flops" in segmenter and "flops" in classifier:  # bundles before 2026-11-24 do not record them
        refiner_text = f", refiner {manifest['refiner']['flops'] / 1e6:.0f} MFLOPs per cell" if "flops" in manifest.get("refiner", {}) else ""
        gate_text = f", gate {manifest['gate']['flops'] / 1e6:.1f} MFLOPs per cell" if "flops" in (manifest.get("gate") or {}) else ""
        lines.append(
            f"compute (multiply-add = 2 FLOPs): segmenter {segmenter['flops'] / 1e9:.2f} GFLOPs per frame{refiner_text}{gate_text}, "
            f"classifier {classifier['flops'] / 1e6:.1f} MFLOPs per cell"
        )
    lines += [
        f"postprocess: min cell area {postprocess['min_cell_area_px']} px, split touching cells {'yes' if postprocess['split_touching'] else 'no'}",
        f"verdict: a cell is a blast at p >= {verdict['blast_threshold']}; a frame is flagged at blast fraction >= {verdict['flag_fraction']}"
        f" with at least {verdict.get('min_blast_count', 1)} blast(s)",
        f"limits: frame sides {limits['min_frame_side']}..{limits['max_frame_side']} px",
    ]
    if "precisions" in manifest:
        calibration = manifest["precisions"]["calibration"]
        lines.append(f"precisions (calibrated {calibration.get('date', '?')}, {calibration['method']}; default per model: INT8 where it passed and was at least {MIN_SPEEDUP:.0%} faster, else FP32):")
        for model in bundle_models(manifest):
            variants = manifest["precisions"][model]
            described = [
                f"{precision} {variant['median_ms']:.1f} ms" if variant.get("median_ms") else precision
                for precision, variant in variants.items()
                if variant.get("file") is not None
            ]
            if "int8" in variants and variants["int8"].get("file") is None:
                described.append("int8 failed its accuracy gate")
            lines.append(f"  {model}: {', '.join(described)} -> {fastest_precision(manifest, model)}")
    metrics = manifest["training"].get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines.append("training metrics:")
        lines += [f"  {key}: {value:.4g}" if _is_number(value) else f"  {key}: {value}" for key, value in _flatten(metrics)]
    return "\n".join(lines)
