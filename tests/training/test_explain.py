"""Grad-CAM of the bundle's classifier: the heatmap contract, faithfulness on the shipped model, the
crops it explains are the ones the runtime classified, a foreign checkpoint is refused, and the CLI."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from leukoedge import Detector, cli
from leukoedge.bundle import load_bundle
from leukoedge.errors import LeukoedgeError
from leukoedge.postprocess import central_box
from leukoedge.preprocess.cpu import PreprocessSpec, square_crop_box
from leukoedge.training import data
from leukoedge.training.explain import cell_crops, explain_frame, grad_cam
from leukoedge.training.samples import classification_sample
from leukoedge.training.torch_backend import checkpoint_paths, verified_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_BUNDLE = REPO_ROOT / "models" / "default"
SHIPPED_CHECKPOINT = REPO_ROOT / "models" / "checkpoints" / "default-classifier.pt"
OCCLUDED_FRACTION = 0.2


SHIPPED_MANIFEST = load_bundle(SHIPPED_BUNDLE).manifest
BLAST_INDEX = SHIPPED_MANIFEST["classifier"]["heads"]["blast"]["classes"].index("blast")


@pytest.fixture(scope="module")
def shipped_classifier() -> torch.nn.Module:
    return verified_model(load_bundle(SHIPPED_BUNDLE), "classifier", SHIPPED_CHECKPOINT)


@pytest.fixture(scope="module")
def blast_records(data_root: Path) -> list[data.Record]:
    """The held-out ALL-IDB2 blasts (test split)."""
    return [record for record in data.load_records(data_root, "all-idb2", "test") if record.blast == 1]


@pytest.fixture(scope="module")
def blast_crops(blast_records: list[data.Record]) -> np.ndarray:
    """Their cells cut as the runtime cuts them, from the expert masks' boxes."""
    spec, classifier = PreprocessSpec.from_manifest(SHIPPED_MANIFEST["preprocess"]), SHIPPED_MANIFEST["classifier"]
    crops = []
    for record in blast_records:
        image = data.read_image(record)
        box = central_box(data.wbc_boxes(record), image.shape)
        crops.append(classification_sample(image, box, spec, classifier["input_size"], classifier["crop_margin"], None))
    return np.stack(crops)


def blast_probability(classifier: torch.nn.Module, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return classifier(torch.from_numpy(np.ascontiguousarray(crops)))["blast"].softmax(dim=1)[:, BLAST_INDEX].numpy()


def test_heatmaps_are_crop_sized_in_unit_range_and_vary_over_a_real_cell(shipped_classifier, blast_crops):
    heatmaps = grad_cam(shipped_classifier, blast_crops)
    assert heatmaps.shape == (len(blast_crops),) + blast_crops.shape[2:]
    assert heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert (heatmaps.reshape(len(heatmaps), -1).std(axis=1) > 0.05).all()
    # The hooks are gone and the model is left as deployed.
    assert not any(layer._forward_hooks for layer in shipped_classifier.trunk.children())
    assert not shipped_classifier.training


def test_occluding_the_hottest_pixels_lowers_p_blast_more_than_the_coldest(shipped_classifier, blast_crops):
    heatmaps = grad_cam(shipped_classifier, blast_crops, "blast", class_index=BLAST_INDEX).reshape(len(blast_crops), -1)
    count = int(OCCLUDED_FRACTION * heatmaps.shape[1])
    ranked = np.argsort(heatmaps, axis=1)

    def occluded(pixels: np.ndarray) -> np.ndarray:
        crops = blast_crops.reshape(len(blast_crops), 3, -1).copy()
        for crop, chosen in zip(crops, pixels):
            crop[:, chosen] = 0.0  # the mean colour, in normalized space
        return crops.reshape(blast_crops.shape)

    original = blast_probability(shipped_classifier, blast_crops)
    drop_hottest = original - blast_probability(shipped_classifier, occluded(ranked[:, -count:]))
    drop_coldest = original - blast_probability(shipped_classifier, occluded(ranked[:, :count]))
    assert drop_hottest.mean() > drop_coldest.mean(), (drop_hottest.mean(), drop_coldest.mean())


def test_explain_frame_explains_the_crops_the_runtime_classified(shipped_classifier, blast_records):
    # fp32: the checkpoint Grad-CAM differentiates is the fp32 model (the bundle's INT8 one differs by ~1e-2)
    detector = Detector.load(SHIPPED_BUNDLE, precision="fp32")

    def crop_boxes(result) -> list:
        return [square_crop_box(cell.classifier_box, detector.classifier_spec["crop_margin"]) for cell in result.cells]

    def leaves(box: tuple, frame: np.ndarray) -> bool:
        x0, y0, x1, y1 = box
        return x0 < 0 or y0 < 0 or x1 > frame.shape[1] or y1 > frame.shape[0]

    # A blast that fills its thumbnail: its square crop box leaves the frame, so pasting the heat map must clip it.
    for record in blast_records:
        frame = data.read_image(record)
        result = detector.run(frame)
        if any(leaves(box, frame) for box in crop_boxes(result)):
            break
    else:
        pytest.fail("no held-out ALL-IDB2 blast's crop box leaves its thumbnail")

    crops = cell_crops(frame, result, detector)
    runtime_probabilities = [cell.blast_probability for cell in result.cells]
    np.testing.assert_allclose(blast_probability(shipped_classifier, crops), runtime_probabilities, atol=1e-3)

    explanation = explain_frame(frame, result, detector, shipped_classifier)
    assert explanation.heatmap.shape == frame.shape[:2]
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
    assert explanation.heatmap.max() > 0.5
    outside = np.ones(frame.shape[:2], bool)
    for x0, y0, x1, y1 in crop_boxes(result):
        outside[max(0, y0) : y1, max(0, x0) : x1] = False
    assert not explanation.heatmap[outside].any()
    assert explanation.overlay.shape == frame.shape and explanation.overlay.dtype == np.uint8
    assert not np.array_equal(explanation.overlay, frame)


def test_a_checkpoint_of_another_bundle_is_refused(tiny_bundle):
    foreign = checkpoint_paths(tiny_bundle)["classifier"]
    with pytest.raises(LeukoedgeError, match="is not the classifier of bundle"):
        verified_model(load_bundle(SHIPPED_BUNDLE), "classifier", foreign)


def test_run_explain_writes_a_gradcam_png_beside_the_overlay(tiny_bundle, tmp_path, capsys):
    sample = REPO_ROOT / "samples" / "bccd_BloodImage_00002.jpg"
    out_dir = tmp_path / "out"
    assert cli.main(["run", str(sample), "--bundle", str(tiny_bundle), "--out", str(out_dir), "--explain"]) == 0
    gradcam = cv2.imread(str(out_dir / f"{sample.stem}_gradcam.png"), cv2.IMREAD_COLOR)
    assert gradcam is not None and gradcam.shape == cv2.imread(str(sample), cv2.IMREAD_COLOR).shape
    assert (out_dir / f"{sample.stem}_overlay.png").is_file()
    assert f"Grad-CAM from training checkpoint {tiny_bundle.parent / 'checkpoints' / 'default-classifier.pt'}" in capsys.readouterr().out


def test_run_explain_without_checkpoints_exits_2_naming_them(tiny_bundle, tmp_path, capsys):
    sample = REPO_ROOT / "samples" / "bccd_BloodImage_00002.jpg"
    arguments = ["run", str(sample), "--bundle", str(tiny_bundle), "--out", str(tmp_path), "--explain", "--checkpoints", str(tmp_path / "none")]
    assert cli.main(arguments) == 2
    assert "no training checkpoints" in capsys.readouterr().err


def test_run_explain_on_a_live_source_exits_2_with_a_message(tmp_path, capsys):
    assert cli.main(["run", "--source", f"folder://{tmp_path}", "--explain"]) == 2
    error = capsys.readouterr().err
    assert "--explain" in error and "--source" in error
