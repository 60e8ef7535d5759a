"""The light cell classifier (mobile_cnn): registered and fed by the runtime, a fifth of vgg_hybrid's compute,
exported with ONNX parity, learnt from a teacher's probabilities, and swapped into a copy of the shipped bundle
whose detector still cuts each cell's crop once (docs/performance.md, "A lighter classifier")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the classifiers need the training extra (torch)")

from leukoedge import Detector  # noqa: E402
from leukoedge.bundle import load_bundle  # noqa: E402
from leukoedge.export.onnx import export_classifier  # noqa: E402
from leukoedge.preprocess.cpu import PreprocessSpec  # noqa: E402
from leukoedge.training.flops import count_flops  # noqa: E402
from leukoedge.training.models import CLASSIFIERS, create_model  # noqa: E402
from leukoedge.training.pipeline import CLASSIFIER_INPUT, CROP_MARGIN, HEADS, RUNTIME_CLASSIFIERS  # noqa: E402
from leukoedge.training.train import CellExample, TrainConfig, save_checkpoint, train_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "default"
SAMPLE = REPO / "samples" / "bccd_BloodImage_00002.jpg"
HEAD_CLASSES = {name: len(classes) for name, classes in HEADS.items()}


def _swap_module():
    spec = importlib.util.spec_from_file_location("swap_classifier", REPO / "scripts" / "swap_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fresh_checkpoint(folder: Path, heads: dict[str, list[str]] = HEADS) -> Path:
    torch.manual_seed(0)
    model = create_model("mobile_cnn", head_classes={name: len(classes) for name, classes in heads.items()}).eval()
    path = folder / "light-classifier.pt"
    save_checkpoint(model, {"config": {"model": "mobile_cnn", "model_kwargs": {}, "input_size": list(CLASSIFIER_INPUT)}, "heads": heads}, path)
    return path


def test_mobile_cnn_is_a_runtime_classifier_at_a_fifth_of_vgg_hybrids_compute() -> None:
    assert "mobile_cnn" in CLASSIFIERS and "mobile_cnn" in RUNTIME_CLASSIFIERS
    light = count_flops(create_model("mobile_cnn", head_classes=HEAD_CLASSES), (1, 3, *CLASSIFIER_INPUT))
    shipped = count_flops(create_model("vgg_hybrid", head_classes=HEAD_CLASSES), (1, 3, *CLASSIFIER_INPUT))
    assert 10e6 <= light <= 25e6
    assert light < shipped / 4


def test_mobile_cnn_gives_one_probability_row_per_cell_and_head_through_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("mobile_cnn", head_classes=HEAD_CLASSES).eval()
    crops = np.random.default_rng(0).normal(0.0, 1.0, (5, 3, *CLASSIFIER_INPUT)).astype(np.float32)
    parity = export_classifier(model, list(HEADS), crops, tmp_path / "classifier.onnx")
    assert parity < 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "classifier.onnx"), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"crop": crops})))
    assert {name: probs.shape for name, probs in outputs.items()} == {f"{h}_probs": (5, n) for h, n in HEAD_CLASSES.items()}
    for probabilities in outputs.values():
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_student_learns_a_head_it_has_no_labels_for_from_its_teacher(tmp_path: Path) -> None:
    """The cells carry blast labels only; the teacher's subtype head says "Early" everywhere. With the teacher
    the student's subtype head follows it; without, nothing teaches that head."""
    torch.manual_seed(1)
    teacher = create_model("mobile_cnn", head_classes=HEAD_CLASSES).eval()
    with torch.no_grad():
        teacher.heads["subtype"].bias.copy_(torch.tensor([0.0, 6.0, 0.0, 0.0]))
    teacher_path = tmp_path / "teacher.pt"
    save_checkpoint(teacher, {"config": {"model": "mobile_cnn", "model_kwargs": {}}, "heads": HEADS}, teacher_path)
    rng = np.random.default_rng(0)
    cells = [CellExample("all-idb2", rng.integers(0, 255, (80, 80, 3), dtype=np.uint8), (20, 20, 60, 60), {"blast": i % 2}) for i in range(16)]
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)

    def early_probability(teacher_checkpoint: Path | None) -> float:
        config = TrainConfig(
            model="mobile_cnn", input_size=CLASSIFIER_INPUT, steps=30, batch_size=8, learning_rate=1e-2, validate_every=30,
            teacher=None if teacher_checkpoint is None else str(teacher_checkpoint),
        )
        student, _ = train_classifier(cells, cells[:4], HEADS, spec, config, CROP_MARGIN)
        crops = torch.randn(8, 3, *CLASSIFIER_INPUT)
        with torch.no_grad():
            return float(student(crops)["subtype"].softmax(dim=1)[:, 1].mean())

    assert early_probability(teacher_path) > 0.8
    assert early_probability(None) < 0.6


def test_swapped_bundle_runs_the_new_classifier_in_fp32_and_keeps_sharing_crops(tmp_path: Path) -> None:
    checkpoint = _fresh_checkpoint(tmp_path)
    out = _swap_module().swap_classifier(SHIPPED, checkpoint, tmp_path / "swapped")
    bundle, shipped = load_bundle(out), load_bundle(SHIPPED)
    manifest = bundle.manifest
    assert manifest["classifier"]["architecture"] == "mobile_cnn"
    assert manifest["classifier"]["flops"] < shipped.manifest["classifier"]["flops"] / 4
    assert manifest["training"]["classifier"]["checkpoint"] == str(checkpoint)
    assert manifest["precisions"]["classifier"] == {"fp32": {"file": "classifier.onnx", "median_ms": None}}
    assert "classifier.int8.onnx" not in manifest["files"] and not (out / "classifier.int8.onnx").exists()
    for kept in ("segmenter.onnx", "refiner.onnx", "gate.onnx", "refiner.int8.onnx"):
        assert (out / kept).read_bytes() == (SHIPPED / kept).read_bytes()
    assert {k: v for k, v in manifest.items() if k not in ("classifier", "training", "precisions", "files")} == {
        k: v for k, v in shipped.manifest.items() if k not in ("classifier", "training", "precisions", "files")
    }
    detector = Detector.load(out)
    assert detector.shared_crops
    result = detector.run(cv2.imread(str(SAMPLE)))
    assert result.cells
    probe = np.random.default_rng(0).normal(0.0, 1.0, (2, 3, *CLASSIFIER_INPUT)).astype(np.float32)
    model = create_model("mobile_cnn", head_classes=HEAD_CLASSES)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(probe))["blast"].softmax(dim=1).numpy()
    np.testing.assert_allclose(detector.classifier.run({"crop": probe})["blast_probs"], expected, atol=1e-5)


def test_a_checkpoint_with_other_heads_is_refused(tmp_path: Path) -> None:
    other = {**HEADS, "blast": ["blast", "normal"]}  # same sizes, classes swapped: the verdict would read them backwards
    checkpoint = _fresh_checkpoint(tmp_path, other)
    with pytest.raises(ValueError, match="not the bundle's"):
        _swap_module().swap_classifier(SHIPPED, checkpoint, tmp_path / "swapped")
    assert not (tmp_path / "swapped").exists()
    assert json.loads(checkpoint.with_suffix(".json").read_text())["heads"] == other
