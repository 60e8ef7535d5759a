"""Model bundles: a folder (or .zip / .tar / .tar.gz of one) with manifest.json and the model files.

The manifest is the single source of truth about the models: inputs, preprocessing, class names,
thresholds, frame limits, training data and metrics. Every file it lists carries a sha256 that
load_bundle checks, so a modified or truncated model is refused instead of giving wrong answers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import tarfile
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from leukoedge.errors import BundleError

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


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_number(value: Any) -> bool:
    # json.loads accepts NaN and Infinity; as a mean, std or threshold they would silently poison every frame.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_numbers(length: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and len(value) == length and all(_is_number(item) for item in value)


def _is_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_count(item) and item > 0 for item in value)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_text(item) for item in value)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


# section ("" = top level) -> key -> (check, what the check expects)
_REQUIRED: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "": {
        "name": (_is_text, "a non-empty string"),
        "model_version": (_is_text, "a non-empty string"),
        "created": (_is_text, "an ISO date string"),
        "files": (_is_table, "an object of file name -> sha256"),
        "preprocess": (_is_table, "an object"),
        "segmenter": (_is_table, "an object"),
        "classifier": (_is_table, "an object"),
        "postprocess": (_is_table, "an object"),
        "verdict": (_is_table, "an object"),
        "limits": (_is_table, "an object"),
        "training": (_is_table, "an object"),
    },
    "preprocess": {
        "channel_order": (lambda value: value in ("RGB", "BGR"), '"RGB" or "BGR"'),
        "mean": (_is_numbers(3), "3 numbers"),
        "std": (lambda value: _is_numbers(3)(value) and all(item > 0 for item in value), "3 positive numbers"),
        "stain_reference": (lambda value: value is None or isinstance(value, dict), "an object or null"),
    },
    "segmenter": {
        "file": (_is_text, "a file name"),
        "input": (_is_text, "an input name"),
        "output": (_is_text, "an output name"),
        "input_size": (_is_size, "[H, W], positive integers"),
        "classes": (_is_names, "a list of class names"),
        "architecture": (_is_text, "an architecture name"),
    },
    "classifier": {
        "file": (_is_text, "a file name"),
        "input": (_is_text, "an input name"),
        "input_size": (_is_size, "[H, W], positive integers"),
        "crop_margin": (lambda value: _is_number(value) and value >= 0, "a number >= 0"),
        "primary_head": (_is_text, "a head name"),
        "heads": (lambda value: isinstance(value, dict) and bool(value), "an object of head name -> {output, classes}"),
    },
    "refiner": {  # optional section: checked only where the bundle has a refiner
        "file": (_is_text, "a file name"),
        "input": (_is_text, "an input name"),
        "output": (_is_text, "an output name"),
        "input_size": (_is_size, "[H, W], positive integers"),
        "crop_margin": (lambda value: _is_number(value) and value >= 0, "a number >= 0"),
        "classes": (_is_names, "a list of class names"),
        "architecture": (_is_text, "an architecture name"),
    },
    "postprocess": {
        "min_cell_area_px": (_is_count, "an integer >= 0"),
        "split_touching": (_is_bool, "true or false"),
    },
    "verdict": {
        "blast_threshold": (_is_fraction, "a number in [0, 1]"),
        "flag_fraction": (_is_fraction, "a number in [0, 1]"),
    },
    "limits": {
        "min_frame_side": (lambda value: _is_count(value) and value > 0, "an integer > 0"),
        "max_frame_side": (lambda value: _is_count(value) and value > 0, "an integer > 0"),
    },
}

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _unsafe_file_name(name: str) -> bool:
    """Absolute (POSIX or Windows) or climbing out with '..': could reach outside the bundle."""
    return (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or bool(PureWindowsPath(name).drive)
        or ".." in re.split(r"[\\/]", name)
    )


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Refuse a manifest of another schema, or one missing keys or carrying wrong types."""
    if not isinstance(manifest, dict):
        raise BundleError(f"manifest.json must hold a JSON object, got {type(manifest).__name__}")
    if "schema_version" not in manifest:
        raise BundleError(f"manifest.json has no schema_version; this leukoedge reads schema {SCHEMA_VERSION}")
    schema = manifest["schema_version"]
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        raise BundleError(
            f"bundle schema {schema} is not supported by this leukoedge (supports {SCHEMA_VERSION}); "
            "upgrade leukoedge or re-export"
        )
    missing: list[str] = []
    wrong: list[str] = []
    if "refiner" in manifest and not _is_table(manifest["refiner"]):
        raise BundleError(f"manifest.json is invalid: refiner (optional) must be an object, got {manifest['refiner']!r}")
    for section, keys in _REQUIRED.items():
        table = manifest if not section else manifest.get(section)
        if not isinstance(table, dict):
            continue  # already reported as a missing or wrongly typed top-level key, or an optional section absent
        for key, (check, expectation) in keys.items():
            where = f"{section}.{key}" if section else key
            if key not in table:
                missing.append(where)
            elif not check(table[key]):
                wrong.append(f"{where} must be {expectation}, got {table[key]!r}")
    if missing:
        raise BundleError(f"manifest.json is missing required keys: {', '.join(missing)}")
    wrong.extend(_cross_checks(manifest))
    if wrong:
        raise BundleError("manifest.json is invalid: " + "; ".join(wrong))


def _cross_checks(manifest: dict[str, Any]) -> list[str]:
    """Constraints between keys, checked once every key is known to be present and typed."""
    problems = []
    for name, sha in manifest["files"].items():
        if _unsafe_file_name(name):
            problems.append(f"file name {name!r} in files is absolute or contains '..'; bundle files must lie inside the bundle folder")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            problems.append(f"files[{name!r}] must be a lowercase hex sha256, got {sha!r}")
    if not _is_count(manifest["postprocess"].get("min_nucleus_area_px", 0)):
        problems.append("postprocess.min_nucleus_area_px (optional) must be an integer >= 0")
    for section in bundle_models(manifest):
        if manifest[section]["file"] not in manifest["files"]:
            problems.append(f"{section}.file {manifest[section]['file']!r} is not listed in files")
    stain = manifest["preprocess"]["stain_reference"]
    if stain is not None and not (
        stain.get("method") == "reinhard" and _is_numbers(3)(stain.get("lab_mean")) and _is_numbers(3)(stain.get("lab_std"))
    ):
        problems.append(f'preprocess.stain_reference must be {{"method": "reinhard", "lab_mean": [3], "lab_std": [3]}} or null, got {stain!r}')
    classifier = manifest["classifier"]
    for head, spec in classifier["heads"].items():
        if not (isinstance(spec, dict) and _is_text(spec.get("output")) and _is_names(spec.get("classes"))):
            problems.append(f"classifier.heads.{head} must be {{\"output\": name, \"classes\": [names]}}, got {spec!r}")
    if classifier["primary_head"] not in classifier["heads"]:
        problems.append(f"classifier.primary_head {classifier['primary_head']!r} is not one of the heads {sorted(classifier['heads'])}")
    limits = manifest["limits"]
    if limits["min_frame_side"] > limits["max_frame_side"]:
        problems.append(f"limits.min_frame_side {limits['min_frame_side']} exceeds limits.max_frame_side {limits['max_frame_side']}")
    if "precisions" in manifest:  # optional: only bundles that went through `leukoedge calibrate` have it
        problems.extend(_precision_problems(manifest))
    return problems


# Precisions a bundle can hold model files for; fp16 exists only as a TensorRT engine built from the fp32 file.
BUNDLE_PRECISIONS = ("fp32", "int8")
MODELS = ("segmenter", "classifier")  # every bundle has these
OPTIONAL_MODELS = ("refiner",)  # leukoedge/refine.py; bundles made before 2026-11-30 have none
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def bundle_models(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The models this bundle holds, in the order a frame meets them: segmenter, [refiner], classifier."""
    return ("segmenter", *(model for model in OPTIONAL_MODELS if model in manifest), "classifier")


def _precision_problems(manifest: dict[str, Any]) -> list[str]:
    """The "precisions" section written by `leukoedge calibrate`: calibration settings, per model and
    precision the file, its measured speed and (int8) the accuracy gate it passed."""
    precisions = manifest["precisions"]
    if not isinstance(precisions, dict):
        return [f"precisions must be an object, got {precisions!r}"]
    problems = []
    calibration = precisions.get("calibration")
    if not (isinstance(calibration, dict) and calibration.get("method") in CALIBRATION_METHODS):
        problems.append(f"precisions.calibration must be an object with method one of {CALIBRATION_METHODS}, got {calibration!r}")
    elif calibration.get("calibration_set") not in manifest["files"]:
        problems.append(f"precisions.calibration.calibration_set {calibration.get('calibration_set')!r} is not listed in files")
    for model in bundle_models(manifest):
        entry = precisions.get(model)
        if not isinstance(entry, dict) or set(entry) - set(BUNDLE_PRECISIONS) or "fp32" not in entry:
            problems.append(f"precisions.{model} must be an object with fp32 and optionally int8, got {entry!r}")
            continue
        for precision, variant in entry.items():
            where = f"precisions.{model}.{precision}"
            if not isinstance(variant, dict):
                problems.append(f"{where} must be an object, got {variant!r}")
                continue
            speed = variant.get("median_ms")
            if speed is not None and not (_is_number(speed) and speed > 0):
                problems.append(f"{where}.median_ms must be a number > 0 or null, got {speed!r}")
            file_name = variant.get("file")
            if precision == "fp32" and file_name != manifest[model]["file"]:
                problems.append(f"{where}.file must be {model}.file {manifest[model]['file']!r}, got {file_name!r}")
            if precision == "int8":
                gate = variant.get("gate")
                if not (isinstance(gate, dict) and _is_bool(gate.get("passed")) and isinstance(gate.get("metrics"), list)):
                    problems.append(f'{where}.gate must be {{"passed": bool, "metrics": [...]}}, got {gate!r}')
                elif file_name is not None and not gate["passed"]:
                    problems.append(f"{where}.file {file_name!r} failed its accuracy gate; a bundle never ships a model that failed")
                if file_name is not None and file_name not in manifest["files"]:
                    problems.append(f"{where}.file {file_name!r} is not listed in files")
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


def _read_manifest(root: Path) -> dict[str, Any]:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a leukoedge bundle: it has no {MANIFEST_NAME}")
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise BundleError(f"{manifest_path} is not valid JSON: {error}") from error


def _check_files(root: Path, manifest: dict[str, Any], verify: bool) -> None:
    resolved_root = root.resolve()
    for name, expected in manifest["files"].items():
        path = root / name
        # resolve() follows symlinks, so a link inside the folder pointing out of it is caught too.
        if not path.resolve().is_relative_to(resolved_root):
            raise BundleError(f"bundle file {name!r} resolves to {path.resolve()}, outside the bundle folder {resolved_root}")
        if not path.is_file():
            raise BundleError(f"bundle file {name!r} listed in {MANIFEST_NAME} is missing from {root}")
        if verify:
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"bundle file {name!r} fails its checksum: expected sha256 {expected}, got {actual}; "
                    "the file was modified or corrupted since the bundle was saved"
                )


def _check_member_name(archive: Path, name: str) -> None:
    if _unsafe_file_name(name):
        raise BundleError(f"archive {archive} is refused: member {name!r} is an absolute path or contains '..' (path traversal)")


def _extract_zip(archive: Path, destination: Path) -> None:
    with zipfile.ZipFile(archive) as bundle_zip:
        for member in bundle_zip.infolist():
            _check_member_name(archive, member.filename)
            unix_mode = member.external_attr >> 16
            # Only plain files and folders: 0o170000 masks the file type bits of the Unix mode.
            if unix_mode and (unix_mode & 0o170000) not in (0o100000, 0o040000):
                raise BundleError(f"archive {archive} is refused: member {member.filename!r} is a link or special file")
        bundle_zip.extractall(destination)


def _extract_tar(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as bundle_tar:
        members = bundle_tar.getmembers()
        for member in members:
            _check_member_name(archive, member.name)
            if not (member.isfile() or member.isdir()):
                raise BundleError(f"archive {archive} is refused: member {member.name!r} is a link, device or other special file")
        # The "data" filter (Python >= 3.10.12 / 3.11.4) repeats these checks inside tarfile itself.
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        bundle_tar.extractall(destination, members=members, **safety)


def _bundle_root(extracted: Path) -> Path:
    """The manifest's folder: the archive root, or its single top-level folder (an archived folder)."""
    if (extracted / MANIFEST_NAME).is_file():
        return extracted
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


def _load_archive(archive: Path, verify: bool) -> Bundle:
    if zipfile.is_zipfile(archive):
        extract = _extract_zip
    elif tarfile.is_tarfile(archive):
        extract = _extract_tar
    else:
        raise BundleError(f"{archive} is neither a bundle folder nor a .zip / .tar / .tar.gz archive of one")
    extraction = Path(tempfile.mkdtemp(prefix="leukoedge-bundle-"))
    try:
        extract(archive, extraction)
        bundle = _load_folder(_bundle_root(extraction), verify)
    except BundleError:
        shutil.rmtree(extraction, ignore_errors=True)
        raise
    except Exception as error:  # zipfile, tarfile and each decompressor raise their own: EOFError, zlib.error, LZMAError...
        shutil.rmtree(extraction, ignore_errors=True)
        raise BundleError(f"archive {archive} cannot be extracted: {error}") from error
    # The extracted files live exactly as long as the bundle that points at them.
    weakref.finalize(bundle, shutil.rmtree, extraction, ignore_errors=True)
    return bundle


def _load_folder(root: Path, verify: bool) -> Bundle:
    manifest = _read_manifest(root)
    validate_manifest(manifest)
    _check_files(root, manifest, verify)
    return Bundle(root=root, manifest=manifest)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle folder or archive; verify=True checks every file's sha256 (reads every byte)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, verify)
    if path.is_file():
        return _load_archive(path, verify)
    raise BundleError(f"bundle folder {path} does not exist")


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
        )
    lines += [
        f"classifier: {classifier['file']}, input {classifier['input']!r} {crop_height}x{crop_width}, "
        f"crop margin {classifier['crop_margin']}, primary head {classifier['primary_head']}",
    ]
    for head, spec in classifier["heads"].items():
        lines.append(f"  head {head} (output {spec['output']!r}): {', '.join(spec['classes'])}")
    if "flops" in segmenter and "flops" in classifier:  # bundles before 2026-11-24 do not record them
        refiner_text = f", refiner {manifest['refiner']['flops'] / 1e6:.0f} MFLOPs per cell" if "flops" in manifest.get("refiner", {}) else ""
        lines.append(
            f"compute (multiply-add = 2 FLOPs): segmenter {segmenter['flops'] / 1e9:.2f} GFLOPs per frame{refiner_text}, "
            f"classifier {classifier['flops'] / 1e6:.1f} MFLOPs per cell"
        )
    lines += [
        f"postprocess: min cell area {postprocess['min_cell_area_px']} px, split touching cells {'yes' if postprocess['split_touching'] else 'no'}",
        f"verdict: a cell is a blast at p >= {verdict['blast_threshold']}; a frame is flagged at blast fraction >= {verdict['flag_fraction']}",
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
