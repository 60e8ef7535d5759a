"""Bundles that are broken in ways a checksum cannot see: every one refused at load with a BundleError
naming the key or file at fault (issue 23, items 4-7), and the optional manifest signature."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import leukoedge.bundle as bundle_module
from leukoedge import Detector
from leukoedge.bundle import MAX_FILE_BYTES, MAX_MANIFEST_BYTES, check_models, load_bundle, save_bundle, sign_bundle
from leukoedge.errors import BundleError

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "default"


def _copy_of_default(tmp_path: Path) -> Path:
    copy = tmp_path / "default"
    shutil.copytree(DEFAULT_BUNDLE, copy, ignore=shutil.ignore_patterns("engines"))
    return copy


def _edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _replace_file(bundle: Path, name: str, content: bytes) -> None:
    """A new file in place of a model, its sha256 updated: the checksum passes, the content is wrong."""
    (bundle / name).write_bytes(content)
    _edit_manifest(bundle, lambda manifest: manifest["files"].update({name: hashlib.sha256(content).hexdigest()}))


def _fp32_only(manifest: dict) -> None:
    """Every model at its FP32 file, whatever the calibrated speeds: edits to a model's section then hit the file that runs."""
    manifest.pop("precisions", None)


# --- item 4: only the package's own error, naming the field, at load ------------------------------


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        # An integer of 401 digits: math.isfinite raised OverflowError on it.
        (lambda text: text.replace('"blast_threshold": 0.5', '"blast_threshold": 1' + "0" * 400), "verdict.blast_threshold must be a number in [0, 1]"),
        # Over Python's 4300-digit limit: json.loads raised ValueError.
        (lambda text: text.replace('"min_cell_area_px": 40', '"min_cell_area_px": ' + "1" * 5000), "is not valid JSON: Exceeds the limit (4300 digits)"),
        (lambda text: text.replace('"max_frame_side": 4096', '"max_frame_side": 1' + "0" * 400), "limits.max_frame_side must be an integer in [1, 16384]"),
    ],
    ids=["10**400", "5000-digits", "huge-limit"],
)
def test_absurd_numbers_in_the_manifest_text_are_refused_by_name(tmp_path: Path, edit, words: str):
    bundle = _copy_of_default(tmp_path)
    text = json.dumps(json.loads((bundle / "manifest.json").read_text()))
    (bundle / "manifest.json").write_text(edit(text))
    with pytest.raises(BundleError) as refusal:
        Detector.load(bundle)
    assert words in str(refusal.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m["classifier"].update(crop_margin=1e300), "classifier.crop_margin must be a number in [0, 1]"),
        (lambda m: m["files"].update({"a\0b.onnx": "0" * 64}), "file name 'a\\x00b.onnx' in files must be printable"),
        (lambda m: m.update(files=sorted(m["files"])), "files must be an object of at most 100 file name -> sha256"),
        (lambda m: (m["classifier"]["heads"].pop("blast"), m["classifier"].update(primary_head="subtype")), "must have a 'blast' head with a 'blast' class"),
        (lambda m: m["segmenter"].update(input_size=[100_000, 100_000]), "segmenter.input_size must be [H, W], integers in [1, 4096]"),
        (lambda m: m["preprocess"].update(std=[0.25, 0.0, 0.25]), "preprocess.std must be 3 numbers in [0.001, 10]"),
        (lambda m: m["classifier"]["heads"]["blast"].update(classes=["blast", "blast"]), "classifier.heads.blast must be"),
        (lambda m: m["refiner"].update(skip_below_uncertainty="0.1"), "refiner.skip_below_uncertainty must be a number in [0, 1]"),
        (lambda m: m["refiner"].update(skip_below_uncertainty=1.5), "refiner.skip_below_uncertainty must be a number in [0, 1]"),
        (lambda m: m["refiner"].update(min_cell_side_px=-4), "refiner.min_cell_side_px must be a number in [0, 16384]"),
    ],
    ids=["crop-margin", "nul-byte", "files-list", "no-blast-head", "giant-input", "zero-std", "repeated-class", "skip-text", "skip-above-1", "negative-side"],
)
def test_malformed_manifests_are_refused_at_load_naming_the_key(tmp_path: Path, change, words: str):
    bundle = _copy_of_default(tmp_path)
    _edit_manifest(bundle, change)
    with pytest.raises(BundleError) as refusal:
        Detector.load(bundle)
    assert words in str(refusal.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m["classifier"].update(input="pixels"), "classifier.input 'pixels' is not the input of classifier.onnx: its inputs are ['crop']"),
        (lambda m: m["segmenter"].update(output="labels"), "segmenter.output 'labels' is not an output of segmenter.onnx: its outputs are ['probs']"),
        (lambda m: m["classifier"]["heads"]["subtype"].update(output="kind_probs"), "classifier.heads.subtype.output 'kind_probs' is not an output"),
        # item 5: class names must match the head's output size, sizes the graph's input.
        (
            lambda m: m["classifier"]["heads"]["subtype"]["classes"].append("Mature"),
            "output 'subtype_probs' has shape (1, 4) where the manifest expects (1, 5) (from classifier.heads.subtype.classes)",
        ),
        (lambda m: (m.pop("gate", None), m["classifier"].update(input_size=[32, 32])), "classifier model classifier.onnx does not run on a 1x3x32x32 input (classifier.input_size)"),
        (lambda m: m["refiner"].update(input_size=[96, 96]), "refiner model refiner.onnx does not run on a 1x3x96x96 input"),
    ],
    ids=["input-name", "output-name", "head-output-name", "class-count", "classifier-input-size", "refiner-input-size"],
)
def test_a_manifest_that_disagrees_with_its_models_is_refused_at_load(tmp_path: Path, change, words: str):
    bundle = _copy_of_default(tmp_path)
    _edit_manifest(bundle, lambda manifest: (_fp32_only(manifest), change(manifest)))
    with pytest.raises(BundleError) as refusal:
        Detector.load(bundle)
    assert words in str(refusal.value)


def test_a_file_that_is_no_onnx_model_is_refused_at_load(tmp_path: Path):
    bundle = _copy_of_default(tmp_path)
    _replace_file(bundle, "segmenter.onnx", b"not a protobuf at all " * 50)
    with pytest.raises(BundleError, match="ONNX Runtime .* cannot load model file segmenter.onnx: .*INVALID_PROTOBUF"):
        Detector.load(bundle)


def test_a_model_with_an_unknown_custom_operator_is_refused_at_load(tmp_path: Path):
    onnx = pytest.importorskip("onnx", reason="building a model with a custom operator needs onnx (the train extra)")
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["crop"], ["blast_probs"], domain="com.example.custom")],
        "custom",
        [helper.make_tensor_value_info("crop", onnx.TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("blast_probs", onnx.TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)])
    bundle = _copy_of_default(tmp_path)
    _edit_manifest(bundle, _fp32_only)
    _replace_file(bundle, "classifier.onnx", model.SerializeToString())
    with pytest.raises(BundleError, match="cannot load model file classifier.onnx: .*Mystery"):
        Detector.load(bundle)


# --- item 5: check_models, the load-time run through every model -----------------------------------


class _FakeModel:
    """A backend returning fixed outputs, to hold check_models against outputs no real model here gives."""

    name = "fake"

    def __init__(self, input_name: str, outputs: dict[str, np.ndarray]):
        self.input_names, self.output_names, self.outputs, self.inputs = [input_name], list(outputs), outputs, []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.inputs.append(inputs)
        return self.outputs


def _classifier_manifest() -> dict:
    return {"classifier": {"file": "classifier.onnx", "input": "crop", "input_size": [64, 48], "heads": {"blast": {"output": "blast_probs", "classes": ["normal", "blast"]}}}}


def test_check_models_runs_one_input_of_the_manifest_size_and_accepts_probabilities():
    model = _FakeModel("crop", {"blast_probs": np.array([[0.25, 0.75]], np.float32)})
    check_models(_classifier_manifest(), {"classifier": model})
    (inputs,) = model.inputs
    assert inputs["crop"].shape == (1, 3, 64, 48) and inputs["crop"].dtype == np.float32


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (np.array([[-1.5, 2.5]], np.float32), "is not class probabilities"),  # logits exported without their softmax
        (np.array([[0.2, 0.3]], np.float32), "is not class probabilities"),
        (np.array([[np.nan, 1.0]], np.float32), "not all finite numbers"),
        (np.array([[0, 1]], np.int64), "not all finite numbers"),
        (np.array([0.25, 0.75], np.float32), "has shape (2,) where the manifest expects (1, 2)"),
    ],
    ids=["logits", "sum-below-one", "nan", "integers", "no-batch-axis"],
)
def test_check_models_refuses_outputs_the_runtime_would_misread(values: np.ndarray, words: str):
    with pytest.raises(BundleError) as refusal:
        check_models(_classifier_manifest(), {"classifier": _FakeModel("crop", {"blast_probs": values})}, {"classifier": "classifier.int8.onnx"})
    assert words in str(refusal.value) and "classifier.int8.onnx" in str(refusal.value)


def test_check_models_turns_a_backend_failure_into_a_bundle_error():
    class Broken(_FakeModel):
        def run(self, inputs):
            raise RuntimeError("engine exploded")

    with pytest.raises(BundleError, match="classifier model classifier.onnx does not run on a 1x3x64x48 input .*engine exploded"):
        check_models(_classifier_manifest(), {"classifier": Broken("crop", {"blast_probs": np.zeros((1, 2), np.float32)})})


# --- item 6: sizes checked before reading -----------------------------------------------------------


def test_an_oversized_manifest_is_refused_without_being_read(tmp_path: Path):
    bundle = _copy_of_default(tmp_path)
    with open(bundle / "manifest.json", "r+b") as manifest:
        manifest.truncate(64 << 20)  # sparse: 64 MiB that cost no disk
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=f"is {64 << 20} bytes; a manifest may hold at most {MAX_MANIFEST_BYTES}"):
            load_bundle(bundle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"refusing the manifest allocated {peak} bytes"


def test_an_oversized_model_file_is_refused_before_it_is_hashed(tmp_path: Path):
    bundle = _copy_of_default(tmp_path)
    with open(bundle / "classifier.onnx", "r+b") as model:
        model.truncate(MAX_FILE_BYTES + 1)  # sparse
    started = time.perf_counter()
    with pytest.raises(BundleError, match=f"'classifier.onnx' is {MAX_FILE_BYTES + 1} bytes; a bundle file may hold at most {MAX_FILE_BYTES}"):
        load_bundle(bundle)
    assert time.perf_counter() - started < 5.0, "hashing 1 GiB takes seconds: the size must be checked first"


def test_an_archive_declaring_an_oversized_manifest_is_refused_before_extraction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("manifest.json", b" " * (MAX_MANIFEST_BYTES + 1))  # a kilobyte compressed
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    with pytest.raises(BundleError, match="member 'manifest.json' declares 1048577 bytes"):
        load_bundle(archive)
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_with_too_many_members_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str):
    monkeypatch.setattr(bundle_module, "MAX_ARCHIVE_MEMBERS", 5)
    archive = tmp_path / f"many.{kind}"
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(6):
        (folder / f"file{index}.bin").write_bytes(b"x")
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as many:
            for path in sorted(folder.iterdir()):
                many.write(path, path.name)
    else:
        with tarfile.open(archive, "w") as many:
            for path in sorted(folder.iterdir()):
                many.add(path, path.name)
    with pytest.raises(BundleError, match="more than 5 members"):
        load_bundle(archive)


# --- item 7: zips written by ZipFile.writestr ------------------------------------------------------


def test_a_zip_written_with_writestr_loads(tmp_path: Path):
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle_zip:
        for path in sorted(DEFAULT_BUNDLE.iterdir()):
            if path.is_file():
                bundle_zip.writestr(path.name, path.read_bytes())  # records permissions 0o600 without a file type
    assert {(info.external_attr >> 16) & 0o170000 for info in zipfile.ZipFile(archive).infolist()} == {0}
    assert load_bundle(archive).manifest == load_bundle(DEFAULT_BUNDLE).manifest


# --- the manifest itself ----------------------------------------------------------------------------


def test_a_key_given_twice_in_one_object_is_refused(tmp_path: Path):
    bundle = _copy_of_default(tmp_path)
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"blast_threshold": 0.5', '"blast_threshold": 0.5, "blast_threshold": 0.99', 1))
    with pytest.raises(BundleError, match="holds the key 'blast_threshold' twice"):
        load_bundle(bundle)


def test_the_shipped_bundle_loads_and_its_models_pass_the_load_time_run():
    detector = Detector.load(DEFAULT_BUNDLE)
    assert set(detector.precisions) >= {"segmenter", "classifier"}


# --- item 5: the optional Ed25519 signature --------------------------------------------------------


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    pytest.importorskip("cryptography", reason='signatures need the signing extra: pip install "leukoedge[signing]"')
    from leukoedge.signing import new_key_pair

    return new_key_pair()


def test_a_signed_bundle_loads_with_its_key_and_an_edited_threshold_is_refused(tmp_path: Path, keys):
    private_pem, public_pem = keys
    bundle = _copy_of_default(tmp_path)
    signature = sign_bundle(bundle, private_pem)
    assert signature.name == "manifest.json.sig"
    assert Detector.load(bundle, public_key=public_pem).bundle.name == "leukoedge-default"
    # The case: a threshold edited in place; every sha256 still matches.
    _edit_manifest(bundle, lambda manifest: manifest["verdict"].update(blast_threshold=0.99))
    assert load_bundle(bundle).manifest["verdict"]["blast_threshold"] == 0.99, "without a key, the signature is not checked"
    with pytest.raises(BundleError, match="does not verify with the pinned public key"):
        Detector.load(bundle, public_key=public_pem)


def test_a_bundle_without_a_signature_is_refused_when_a_key_is_pinned(tmp_path: Path, keys):
    with pytest.raises(BundleError, match="is not signed: it has no manifest.json.sig"):
        load_bundle(_copy_of_default(tmp_path), public_key=keys[1])


def test_a_signature_by_another_key_is_refused(tmp_path: Path, keys):
    from leukoedge.signing import new_key_pair

    bundle = _copy_of_default(tmp_path)
    sign_bundle(bundle, new_key_pair()[0])
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(bundle, public_key=keys[1])


@pytest.mark.parametrize("content", [b"not base64 !!\n", b"c2hvcnQ=\n"], ids=["not-base64", "short"])
def test_a_malformed_signature_file_is_refused(tmp_path: Path, keys, content: bytes):
    bundle = _copy_of_default(tmp_path)
    (bundle / "manifest.json.sig").write_bytes(content)
    with pytest.raises(BundleError, match="manifest.json.sig"):
        load_bundle(bundle, public_key=keys[1])


def test_the_public_key_is_taken_as_pem_openssh_raw_bytes_or_a_file(tmp_path: Path, keys):
    from cryptography.hazmat.primitives import serialization

    from leukoedge.signing import load_public_key

    private_pem, public_pem = keys
    bundle = _copy_of_default(tmp_path)
    sign_bundle(bundle, private_pem)
    key = load_public_key(public_pem)
    (tmp_path / "leukoedge.pub").write_bytes(public_pem)
    forms = [
        key,
        public_pem,
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        tmp_path / "leukoedge.pub",
        str(tmp_path / "leukoedge.pub"),
    ]
    for form in forms:
        assert load_bundle(bundle, public_key=form).name == "leukoedge-default"


def test_a_key_that_is_not_ed25519_is_refused(tmp_path: Path, keys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    bundle = _copy_of_default(tmp_path)
    sign_bundle(bundle, keys[0])
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(BundleError, match="bundle signatures are Ed25519"):
        load_bundle(bundle, public_key=other)
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(bundle, public_key=tmp_path / "no-such.pub")


def test_a_signed_folder_archived_loads_with_its_key(tmp_path: Path, keys):
    bundle = _copy_of_default(tmp_path)
    sign_bundle(bundle, keys[0])
    archive = tmp_path / "signed.tar.gz"
    with tarfile.open(archive, "w:gz") as signed:
        signed.add(bundle, arcname="leukoedge-default")
    assert load_bundle(archive, public_key=keys[1]).name == "leukoedge-default"
    with pytest.raises(BundleError, match="sign the folder, then archive it"):
        sign_bundle(archive, keys[0])


def test_saving_over_a_signed_bundle_drops_its_stale_signature(tmp_path: Path, keys):
    bundle = _copy_of_default(tmp_path)
    sign_bundle(bundle, keys[0])
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {name: bundle / name for name in manifest["files"]}
    sources = tmp_path / "sources"
    shutil.copytree(bundle, sources)
    save_bundle(bundle, manifest, {name: sources / name for name in files})
    assert not (bundle / "manifest.json.sig").exists()
    assert os.path.exists(sources / "manifest.json.sig")


def test_the_private_key_is_taken_as_pem_openssh_or_raw_bytes(tmp_path: Path, keys):
    from cryptography.hazmat.primitives import serialization

    from leukoedge.signing import load_private_key

    private_pem, public_pem = keys
    key = load_private_key(private_pem)
    bundle = _copy_of_default(tmp_path)
    for form in [
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),  # ssh-keygen's format
        key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
    ]:
        (bundle / "manifest.json.sig").unlink(missing_ok=True)
        sign_bundle(bundle, form)
        assert load_bundle(bundle, public_key=public_pem).name == "leukoedge-default"
    with pytest.raises(BundleError, match="private key cannot be read"):
        sign_bundle(bundle, b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
