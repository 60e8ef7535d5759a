"""Bundles: save/load round trip, every refusal, and archives (including hostile ones)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

import leukoedge.bundle as bundle_module
from leukoedge.bundle import (
    SCHEMA_VERSION,
    Bundle,
    bundle_models,
    describe_bundle,
    load_bundle,
    save_bundle,
    sha256_file,
    validate_manifest,
)
from leukoedge.errors import BundleError

MODEL_BYTES = {"segmenter.onnx": b"segmenter weights " * 64, "classifier.onnx": b"classifier weights " * 32}


def _manifest() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "leukoedge-test",
        "model_version": "0.0.1",
        "created": "2025-01-01",
        "files": {},
        "preprocess": {
            "channel_order": "RGB",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "stain_reference": {"method": "reinhard", "lab_mean": [60.0, 20.0, -10.0], "lab_std": [15.0, 8.0, 6.0]},
        },
        "segmenter": {
            "file": "segmenter.onnx",
            "input": "image",
            "output": "probs",
            "input_size": [256, 256],
            "classes": ["background", "cytoplasm", "nucleus"],
            "architecture": "hctnet_s",
        },
        "classifier": {
            "file": "classifier.onnx",
            "input": "crop",
            "input_size": [96, 96],
            "crop_margin": 0.15,
            "primary_head": "blast",
            "heads": {
                "blast": {"output": "blast_probs", "classes": ["normal", "blast"]},
                "wbc_type": {"output": "wbc_type_probs", "classes": ["lymphocyte", "monocyte", "neutrophil"]},
            },
        },
        "postprocess": {"min_cell_area_px": 40, "split_touching": True},
        "verdict": {"blast_threshold": 0.5, "flag_fraction": 0.2},
        "limits": {"min_frame_side": 16, "max_frame_side": 4096},
        "training": {"data": "unit test", "metrics": {"segmenter": {"dice": 0.91234}, "blast_f1": 0.875}},
    }


@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    sources = tmp_path / "sources"
    sources.mkdir()
    files = {}
    for name, content in MODEL_BYTES.items():
        (sources / name).write_bytes(content)
        files[name] = sources / name
    return files


@pytest.fixture
def bundle_dir(tmp_path: Path, model_files: dict[str, Path]) -> Path:
    save_bundle(tmp_path / "bundle", _manifest(), model_files)
    return tmp_path / "bundle"


def _rewrite_manifest(bundle_dir: Path, change) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    change(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def test_save_and_load_round_trip(tmp_path: Path, model_files: dict[str, Path]):
    manifest = _manifest()
    saved = save_bundle(tmp_path / "bundle", manifest, model_files)
    assert manifest["files"] == {}, "save_bundle must not change the caller's manifest"
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.manifest == saved.manifest
    assert (loaded.name, loaded.model_version) == ("leukoedge-test", "0.0.1")
    for name, content in MODEL_BYTES.items():
        assert loaded.path(name).read_bytes() == content
        assert loaded.manifest["files"][name] == hashlib.sha256(content).hexdigest()
    text = (tmp_path / "bundle" / "manifest.json").read_text()
    assert text == json.dumps(loaded.manifest, indent=2, sort_keys=True) + "\n"


def test_sha256_file_matches_hashlib(tmp_path: Path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_path_of_an_unlisted_file_is_refused(bundle_dir: Path):
    with pytest.raises(BundleError, match="'other.onnx' is not a file of bundle leukoedge-test"):
        load_bundle(bundle_dir).path("other.onnx")


def test_missing_folder_is_refused(tmp_path: Path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_folder_without_manifest_is_refused(tmp_path: Path):
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path)


def test_manifest_that_is_not_json_is_refused_with_the_parse_error(bundle_dir: Path):
    (bundle_dir / "manifest.json").write_text('{"schema_version": 1,\n "name": }')
    with pytest.raises(BundleError, match=r"not valid JSON: Expecting value: line 2"):
        load_bundle(bundle_dir)


def test_manifest_without_schema_version_is_refused(bundle_dir: Path):
    _rewrite_manifest(bundle_dir, lambda manifest: manifest.pop("schema_version"))
    with pytest.raises(BundleError, match="no schema_version"):
        load_bundle(bundle_dir)


def test_unknown_schema_is_refused_with_upgrade_advice(bundle_dir: Path):
    _rewrite_manifest(bundle_dir, lambda manifest: manifest.update(schema_version=7))
    with pytest.raises(BundleError) as refusal:
        load_bundle(bundle_dir)
    assert str(refusal.value) == "bundle schema 7 is not supported by this leukoedge (supports 1); upgrade leukoedge or re-export"


def test_missing_required_keys_are_named(bundle_dir: Path):
    def drop(manifest):
        del manifest["name"]
        del manifest["segmenter"]["input_size"]
        del manifest["verdict"]["flag_fraction"]

    _rewrite_manifest(bundle_dir, drop)
    with pytest.raises(BundleError, match="missing required keys: name, segmenter.input_size, verdict.flag_fraction"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m["verdict"].update(blast_threshold=1.5), "verdict.blast_threshold must be a number in [0, 1], got 1.5"),
        (lambda m: m["preprocess"].update(mean=[0.5, 0.5]), "preprocess.mean must be 3 numbers"),
        (lambda m: m["preprocess"].update(channel_order="HSV"), "preprocess.channel_order"),
        (lambda m: m["segmenter"].update(input_size=[256, "256"]), "segmenter.input_size must be [H, W]"),
        (lambda m: m["postprocess"].update(split_touching="yes"), "postprocess.split_touching must be true or false"),
        (lambda m: m["classifier"].update(primary_head="subtype"), "primary_head 'subtype' is not one of the heads"),
        (lambda m: m["classifier"]["heads"].update(subtype={"output": "subtype_probs"}), "classifier.heads.subtype must be"),
        (lambda m: m["segmenter"].update(file="other.onnx"), "segmenter.file 'other.onnx' is not listed in files"),
        (lambda m: m["preprocess"]["stain_reference"].update(method="macenko"), "preprocess.stain_reference must be"),
        (lambda m: m["limits"].update(min_frame_side=5000), "limits.min_frame_side 5000 exceeds"),
        (lambda m: m.update(training=[]), "training must be an object"),
        (lambda m: m["verdict"].update(flag_fraction=10**400), "verdict.flag_fraction must be a number in [0, 1]"),
        (lambda m: m["segmenter"].update(classes=["background", "nucleus"]), "segmenter.classes must be a list of 3 distinct"),
        (lambda m: m["segmenter"].update(flops="1.2 GFLOPs"), "segmenter.flops must be a number >= 0"),
        (lambda m: m["classifier"]["heads"]["wbc_type"].update(output="blast_probs"), "classifier.heads name one output twice"),
        (lambda m: m["preprocess"]["stain_reference"].update(lab_std=[15.0, 0.0, 6.0]), "preprocess.stain_reference must be"),
        (lambda m: m["postprocess"].update(min_nucleus_area_px=-1), "postprocess.min_nucleus_area_px must be an integer in [0, "),
        (lambda m: m.update(name="leukoedge\ntest"), "name must be a non-empty string (printable"),
    ],
    ids=[
        "threshold", "mean", "channel-order", "input-size", "bool", "primary-head", "head", "file-unlisted", "stain", "limits", "training",
        "huge-integer", "segmenter-classes", "flops", "shared-output", "stain-std", "nucleus-area", "control-character",
    ],
)
def test_wrong_values_are_refused_by_name(change, words):
    manifest = _manifest()
    manifest["files"] = {name: hashlib.sha256(content).hexdigest() for name, content in MODEL_BYTES.items()}
    validate_manifest(manifest)
    change(manifest)
    with pytest.raises(BundleError) as refusal:
        validate_manifest(manifest)
    assert words in str(refusal.value)


def test_stain_reference_may_be_null():
    manifest = _manifest()
    manifest["files"] = {name: hashlib.sha256(content).hexdigest() for name, content in MODEL_BYTES.items()}
    manifest["preprocess"]["stain_reference"] = None
    validate_manifest(manifest)


def test_missing_model_file_is_refused(bundle_dir: Path):
    (bundle_dir / "classifier.onnx").unlink()
    with pytest.raises(BundleError, match="'classifier.onnx' listed in manifest.json is missing"):
        load_bundle(bundle_dir, verify=False)


def test_tampered_file_fails_its_checksum(bundle_dir: Path):
    path = bundle_dir / "segmenter.onnx"
    content = bytearray(path.read_bytes())
    content[100] ^= 0x01
    path.write_bytes(bytes(content))
    expected = hashlib.sha256(MODEL_BYTES["segmenter.onnx"]).hexdigest()
    with pytest.raises(BundleError) as refusal:
        load_bundle(bundle_dir)
    message = str(refusal.value)
    assert "'segmenter.onnx'" in message and expected in message
    assert hashlib.sha256(bytes(content)).hexdigest() in message
    assert "modified or corrupted" in message
    assert load_bundle(bundle_dir, verify=False).name == "leukoedge-test", "verify=False skips the checksums"


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "models/../../outside.onnx", "C:\\models\\x.onnx", "..\\outside.onnx"])
def test_file_names_that_leave_the_bundle_are_refused(bundle_dir: Path, model_files: dict[str, Path], tmp_path: Path, name: str):
    _rewrite_manifest(bundle_dir, lambda manifest: manifest["files"].update({name: "0" * 64}))
    with pytest.raises(BundleError, match="absolute or contains '..'"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="absolute or contains '..'"):
        save_bundle(tmp_path / "second", _manifest(), {**model_files, name: model_files["segmenter.onnx"]})
    assert not (tmp_path / "second").exists(), "a refused manifest must not leave a half-written bundle"


def test_symlink_out_of_the_bundle_is_refused(bundle_dir: Path, tmp_path: Path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not from the bundle")
    (bundle_dir / "extra.onnx").symlink_to(outside)
    _rewrite_manifest(bundle_dir, lambda manifest: manifest["files"].update({"extra.onnx": sha256_file(outside)}))
    with pytest.raises(BundleError, match="outside the bundle folder"):
        load_bundle(bundle_dir)


def _zip_folder(folder: Path, archive: Path, prefix: str = "") -> None:
    with zipfile.ZipFile(archive, "w") as bundle_zip:
        for path in sorted(folder.iterdir()):
            bundle_zip.write(path, prefix + path.name)


@pytest.mark.parametrize("prefix", ["", "leukoedge-test/"], ids=["flat", "in-a-folder"])
def test_zip_archive_loads_and_its_extraction_goes_with_the_bundle(bundle_dir: Path, tmp_path: Path, prefix: str):
    _zip_folder(bundle_dir, tmp_path / "bundle.zip", prefix)
    bundle = load_bundle(tmp_path / "bundle.zip")
    assert bundle.manifest == load_bundle(bundle_dir).manifest
    assert bundle.path("classifier.onnx").read_bytes() == MODEL_BYTES["classifier.onnx"]
    extracted = bundle.root
    del bundle
    assert not extracted.exists()


def test_tar_gz_archive_loads(bundle_dir: Path, tmp_path: Path):
    with tarfile.open(tmp_path / "bundle.tar.gz", "w:gz") as bundle_tar:
        bundle_tar.add(bundle_dir, arcname="leukoedge-test")
    bundle = load_bundle(tmp_path / "bundle.tar.gz")
    assert isinstance(bundle, Bundle) and bundle.name == "leukoedge-test"
    assert bundle.path("segmenter.onnx").read_bytes() == MODEL_BYTES["segmenter.onnx"]


def test_tampered_file_inside_an_archive_is_refused(bundle_dir: Path, tmp_path: Path):
    (bundle_dir / "classifier.onnx").write_bytes(b"x" + MODEL_BYTES["classifier.onnx"][1:])
    _zip_folder(bundle_dir, tmp_path / "bundle.zip")
    with pytest.raises(BundleError, match="modified or corrupted"):
        load_bundle(tmp_path / "bundle.zip")


@pytest.mark.parametrize("member", ["../evil.txt", "bundle/../../evil.txt", "/tmp/evil.txt"])
def test_zip_slip_is_refused(bundle_dir: Path, tmp_path: Path, member: str):
    archive = tmp_path / "evil.zip"
    _zip_folder(bundle_dir, archive)
    with zipfile.ZipFile(archive, "a") as bundle_zip:
        bundle_zip.writestr(zipfile.ZipInfo(member), b"owned")
    with pytest.raises(BundleError, match="path traversal"):
        load_bundle(archive)
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_member_is_refused(bundle_dir: Path, tmp_path: Path):
    archive = tmp_path / "link.zip"
    _zip_folder(bundle_dir, archive)
    link = zipfile.ZipInfo("segmenter_link.onnx")
    link.external_attr = (0o120777 << 16)  # Unix mode of a symlink, as `zip --symlinks` writes it
    with zipfile.ZipFile(archive, "a") as bundle_zip:
        bundle_zip.writestr(link, "/etc/passwd")
    with pytest.raises(BundleError, match="link or special file"):
        load_bundle(archive)


def _tar_with(bundle_dir: Path, archive: Path, member: tarfile.TarInfo, content: bytes = b"") -> None:
    with tarfile.open(archive, "w:gz") as bundle_tar:
        bundle_tar.add(bundle_dir, arcname=".")
        member.size = len(content)
        bundle_tar.addfile(member, io.BytesIO(content) if content else None)


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt"])
def test_tar_slip_is_refused(bundle_dir: Path, tmp_path: Path, name: str):
    _tar_with(bundle_dir, tmp_path / "evil.tar.gz", tarfile.TarInfo(name), b"owned")
    with pytest.raises(BundleError, match="path traversal"):
        load_bundle(tmp_path / "evil.tar.gz")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE], ids=["symlink", "hardlink", "device", "fifo"])
def test_tar_links_and_devices_are_refused(bundle_dir: Path, tmp_path: Path, kind: bytes):
    member = tarfile.TarInfo("segmenter_link.onnx")
    member.type = kind
    member.linkname = "/etc/passwd"
    _tar_with(bundle_dir, tmp_path / "links.tar", member)
    with pytest.raises(BundleError, match="link, device or other special file"):
        load_bundle(tmp_path / "links.tar")


def test_file_that_is_no_archive_is_refused(tmp_path: Path):
    (tmp_path / "bundle.onnx").write_bytes(b"\x08\x07onnx")
    with pytest.raises(BundleError, match="neither a bundle folder nor a .zip"):
        load_bundle(tmp_path / "bundle.onnx")


def test_describe_bundle_summarizes_what_info_shows(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    text = describe_bundle(bundle)
    for words in [
        "leukoedge-test 0.0.1",
        "created 2025-01-01",
        f"segmenter.onnx  {len(MODEL_BYTES['segmenter.onnx']) / 1024:.1f} KB  sha256 {bundle.manifest['files']['segmenter.onnx'][:12]}",
        "256x256",
        "96x96",
        "head blast (output 'blast_probs'): normal, blast",
        "lymphocyte, monocyte, neutrophil",
        "p >= 0.5",
        "blast fraction >= 0.2",
        "frame sides 16..4096 px",
        "segmenter.dice: 0.9123",
        "blast_f1: 0.875",
    ]:
        assert words in text



# --- malformed and tampered input beyond the happy refusals ---------------------------------------


@pytest.mark.parametrize("text", ["[]", '"bundle"', "null", "[" * 100_000], ids=["list", "string", "null", "deeply-nested"])
def test_manifest_that_is_not_a_json_object_is_refused(bundle_dir: Path, text: str):
    (bundle_dir / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="must hold a JSON object|not valid JSON"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("schema", [True, "1", 1.5, None], ids=["bool", "string", "float", "null"])
def test_schema_version_must_be_the_integer_itself(bundle_dir: Path, schema):
    _rewrite_manifest(bundle_dir, lambda manifest: manifest.update(schema_version=schema))
    with pytest.raises(BundleError, match="is not supported by this leukoedge"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("sha", ["ABC" * 21 + "A", "0" * 63, "g" * 64, 12345], ids=["uppercase", "short", "not-hex", "number"])
def test_checksum_that_is_not_a_lowercase_sha256_is_refused(bundle_dir: Path, sha):
    _rewrite_manifest(bundle_dir, lambda manifest: manifest["files"].update({"segmenter.onnx": sha}))
    with pytest.raises(BundleError, match=r"files\['segmenter.onnx'\] must be a lowercase hex sha256"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("literal", "where"),
    [("NaN", "preprocess.mean"), ("Infinity", "preprocess.std"), ("-Infinity", "classifier.crop_margin"), ("NaN", "verdict.flag_fraction")],
)
def test_non_finite_numbers_in_the_manifest_are_refused(bundle_dir: Path, literal: str, where: str):
    # json.loads reads NaN and Infinity; a NaN mean would turn every frame into NaN without an error.
    section, key = where.split(".")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest[section][key] = [0.5, "__LITERAL__", 0.5] if key in ("mean", "std") else "__LITERAL__"
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest).replace('"__LITERAL__"', literal))
    with pytest.raises(BundleError, match=f"{where} must be"):
        load_bundle(bundle_dir)


def _archive(bundle_dir: Path, archive: Path, kind: str) -> None:
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle_zip:
            for path in sorted(bundle_dir.iterdir()):
                bundle_zip.write(path, path.name)
    else:
        with tarfile.open(archive, f"w:{kind}" if kind != "tar" else "w") as bundle_tar:
            bundle_tar.add(bundle_dir, arcname="leukoedge-test")


@pytest.mark.parametrize("kind", ["zip", "gz"])
def test_an_archive_that_would_not_fit_on_the_disk_with_a_margin_is_refused_before_extraction(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
):
    from leukoedge.bundle import EXTRACTION_MARGIN_BYTES

    archive = tmp_path / f"bundle.{kind}"
    _archive(bundle_dir, archive, kind)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    disk = shutil.disk_usage(scratch)
    free = {"bytes": EXTRACTION_MARGIN_BYTES}  # the margin alone: the bundle's own bytes do not fit beside it
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk._replace(free=free["bytes"]))
    with pytest.raises(BundleError, match=r"unpacks to 0\.\d MiB.*has 64\.0 MiB free.*64 MiB it must keep free.*TMPDIR"):
        load_bundle(archive)
    assert list(scratch.iterdir()) == [], "nothing is extracted from a refused archive"
    free["bytes"] = EXTRACTION_MARGIN_BYTES + (1 << 20)
    assert load_bundle(archive).manifest == load_bundle(bundle_dir).manifest


@pytest.mark.parametrize("damage", ["truncated", "bit-flips"])
@pytest.mark.parametrize("kind", ["zip", "tar", "gz", "bz2", "xz"])
def test_damaged_archive_is_refused_and_leaves_no_extraction_behind(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, damage: str
):
    archive = tmp_path / f"bundle.{kind}"
    _archive(bundle_dir, archive, kind)
    data = bytearray(archive.read_bytes())
    # Truncation hits the decompressors' end-of-stream checks (EOFError); flips hit CRCs, headers and checksums.
    damaged = data[: len(data) // 2] if damage == "truncated" else bytearray(data)
    if damage == "bit-flips":
        for position in range(len(data) // 7, len(data), len(data) // 7):
            damaged[position] ^= 0xA5
    archive.write_bytes(bytes(damaged))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(BundleError):
        load_bundle(archive)
    assert list(scratch.iterdir()) == [], "a refused archive must not leave its extraction folder behind"


def _with_refiner() -> dict:
    manifest = _manifest()
    manifest["refiner"] = {
        "file": "refiner.onnx",
        "input": "crop",
        "output": "probs",
        "input_size": [128, 128],
        "crop_margin": 0.15,
        "classes": ["background", "cytoplasm", "nucleus"],
        "architecture": "hctnet_lite",
    }
    manifest["files"] = {name: hashlib.sha256(content).hexdigest() for name, content in {**MODEL_BYTES, "refiner.onnx": b"r"}.items()}
    return manifest


def test_the_refiner_is_optional_and_checked_like_a_model_where_present():
    validate_manifest(_with_refiner())
    without = _with_refiner()
    del without["refiner"]
    validate_manifest(without)  # bundles made before the refiner still load

    missing = _with_refiner()
    del missing["refiner"]["crop_margin"]
    with pytest.raises(BundleError, match="missing required keys: refiner.crop_margin"):
        validate_manifest(missing)
    unlisted = _with_refiner()
    del unlisted["files"]["refiner.onnx"]
    with pytest.raises(BundleError, match="refiner.file 'refiner.onnx' is not listed in files"):
        validate_manifest(unlisted)
    not_an_object = _with_refiner()
    not_an_object["refiner"] = "refiner.onnx"
    with pytest.raises(BundleError, match="refiner \\(optional\\) must be an object"):
        validate_manifest(not_an_object)


def test_bundle_models_put_the_refiner_between_segmenter_and_classifier():
    assert bundle_models(_manifest()) == ("segmenter", "classifier")
    assert bundle_models(_with_refiner()) == ("segmenter", "refiner", "classifier")


def test_a_failed_int8_gate_with_malformed_metrics_is_refused_at_validation():
    manifest = _manifest()
    manifest["files"] = {name: hashlib.sha256(content).hexdigest() for name, content in {**MODEL_BYTES, "calibration_set.csv": b"c"}.items()}
    manifest["precisions"] = {
        "calibration": {"method": "minmax", "calibration_set": "calibration_set.csv"},
        "segmenter": {"fp32": {"file": "segmenter.onnx"}},
        "classifier": {"fp32": {"file": "classifier.onnx"}, "int8": {"file": None, "gate": {"passed": False, "metrics": ["f1 dropped"]}}},
    }
    # model_file quotes the failed metrics; strings in their place raised AttributeError there.
    with pytest.raises(BundleError, match=r"precisions.classifier.int8.gate.metrics must hold"):
        validate_manifest(manifest)


def test_an_optional_section_is_one_table_entry_checked_only_where_present(monkeypatch: pytest.MonkeyPatch):
    """How a new optional model joins: one Section in SECTIONS (here a made-up "grader" model)."""
    grader = bundle_module.Section(
        {"file": bundle_module._text("a file name"), "input": bundle_module._text("an input name"), "threshold": bundle_module._number(0.0, 1.0)},
        outputs=lambda spec: [bundle_module.ModelOutput("grade_probs", (1, 2), "grader.output", "grader.classes")],
        optional=True,
    )
    monkeypatch.setattr(bundle_module, "SECTIONS", {**bundle_module.SECTIONS, "grader": grader})
    manifest = _manifest()
    manifest["files"] = {name: hashlib.sha256(content).hexdigest() for name, content in MODEL_BYTES.items()}
    validate_manifest(manifest)  # absent: not checked
    assert bundle_models(manifest) == ("segmenter", "classifier")
    manifest["grader"] = {"file": "grader.onnx", "input": "crop", "threshold": 2}
    assert bundle_models(manifest) == (*bundle_models(manifest)[:-1], "grader")
    with pytest.raises(BundleError, match=r"grader.threshold must be a number in \[0, 1\], got 2"):
        validate_manifest(manifest)
    manifest["grader"]["threshold"] = 0.5
    with pytest.raises(BundleError, match="grader.file 'grader.onnx' is not listed in files"):
        validate_manifest(manifest)
    del manifest["grader"]["input"]
    with pytest.raises(BundleError, match="missing required keys: grader.input"):
        validate_manifest(manifest)


def test_describe_bundle_names_every_models_compute_the_manifest_records():
    bundle = load_bundle(Path(__file__).resolve().parents[2] / "models" / "default")
    text = describe_bundle(bundle)
    assert f"gate {bundle.manifest['gate']['flops'] / 1e6:.1f} MFLOPs per cell" in text
    assert f"classifier {bundle.manifest['classifier']['flops'] / 1e6:.1f} MFLOPs per cell" in text


def test_describe_bundle_names_the_loosest_uncertainty_bar_adaptation_may_give():
    bundle = load_bundle(Path(__file__).resolve().parents[2] / "models" / "default")
    loosest = bundle.manifest["domain"]["max_device_uncertainty"]
    assert f"a device's own, at most {loosest:.3f}" in describe_bundle(bundle)
    without = copy.deepcopy(bundle.manifest)
    del without["domain"]["max_device_uncertainty"]
    validate_manifest(without)  # optional: bundles fitted before 0.20.0 have none
