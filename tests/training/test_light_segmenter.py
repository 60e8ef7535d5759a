"""A light field segmenter: a MobileNet-style architecture at the segmenter's input, distilled from the shipped
segmenter (--segmenter-teacher; docs/performance.md, "A lighter field segmenter")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from leukoedge.domain import MIN_SIDE_FIELDS
from leukoedge.preprocess.cpu import PreprocessSpec
from leukoedge.training.flops import count_flops
from leukoedge.training.models import SEGMENTERS, create_model
from leukoedge.training.pipeline import SEGMENTER_INPUT, PipelineConfig
from leukoedge.training.train import SegmentationExample, TrainConfig, load_checkpoint, save_checkpoint, train_segmenter


@pytest.mark.parametrize(("name", "share_of_shipped"), [("mobile_unet_field", 0.2), ("mobile_unet_field_dense", 0.4), ("mobile_unet_field_fine", 0.45)])
def test_the_light_field_segmenters_are_registered_at_a_share_of_the_shipped_segmenters_compute(name: str, share_of_shipped: float) -> None:
    assert name in SEGMENTERS
    shipped = count_flops(create_model("hctnet_lite"), (1, 3, *SEGMENTER_INPUT))
    assert count_flops(create_model(name), (1, 3, *SEGMENTER_INPUT)) < shipped * share_of_shipped


def test_the_dense_variant_differs_only_in_its_full_resolution_end(tmp_path: Path) -> None:
    """Everything but the refinement and the head carries over from a mobile_unet_field checkpoint
    (scripts/warm_start.py), and the dense end is a full 3x3 conv over 16 channels."""
    import importlib.util

    torch.manual_seed(2)
    source = create_model("mobile_unet_field").eval()
    save_checkpoint(source, {"config": {"model": "mobile_unet_field", "model_kwargs": {}}}, tmp_path / "field.pt")
    spec = importlib.util.spec_from_file_location("warm_start", Path(__file__).resolve().parents[2] / "scripts" / "warm_start.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copied, fresh = module.warm_start(tmp_path / "field.pt", "mobile_unet_field_dense", tmp_path / "dense.pt", fresh_layers=("refine", "head"))
    assert {name.split(".")[0] for name in fresh} == {"refine", "head"}
    started, record = load_checkpoint(tmp_path / "dense.pt")
    assert record["config"]["model"] == "mobile_unet_field_dense" and record["warm_start"]["copied"] == len(copied)
    for name, value in started.state_dict().items():
        if name in copied:
            assert torch.equal(value, source.state_dict()[name])
    assert started.refine[0].groups == 1 and started.refine[0].out_channels == 16
    assert len(started.half_resolution) == 0 and len(create_model("mobile_unet_field_fine").half_resolution) == 1
    with torch.no_grad():
        image = torch.randn(1, 3, 64, 96)
        assert torch.equal(started.stem(image), source.stem(image))


def test_the_light_field_segmenter_sees_the_whole_field_and_the_light_refiner_does_not() -> None:
    """One stage deeper: the field centre's logits depend on every corner of the 192x256 input (hctnet_lite's
    transformer saw the whole field too); mobile_unet's reach stops short of them."""

    def reach(name: str) -> torch.Tensor:
        torch.manual_seed(0)
        image = torch.randn(1, 3, *SEGMENTER_INPUT, requires_grad=True)
        create_model(name).eval()(image)[0, :, SEGMENTER_INPUT[0] // 2, SEGMENTER_INPUT[1] // 2].sum().backward()
        return image.grad.abs().amax(dim=1)[0] > 0

    corners = (slice(None, 8), slice(-8, None))
    for rows in corners:
        for cols in corners:
            assert reach("mobile_unet_field")[rows, cols].any()
            assert reach("mobile_unet_field_dense")[rows, cols].any()
            assert reach("mobile_unet_field_fine")[rows, cols].any()
            assert not reach("mobile_unet")[rows, cols].any()


def _fields(count: int, seed: int) -> list[SegmentationExample]:
    """Synthetic fields: one dark nucleus in a paler cytoplasm disc on a light background."""
    rng = np.random.default_rng(seed)
    examples = []
    yy, xx = np.mgrid[:64, :64]
    for _ in range(count):
        image = np.full((64, 64, 3), 220, np.uint8)
        labels = np.zeros((64, 64), np.uint8)
        cy, cx = rng.integers(22, 42, size=2)
        distance = np.hypot(yy - cy, xx - cx)
        image[distance < 16], labels[distance < 16] = (200, 150, 190), 1
        image[distance < 9], labels[distance < 9] = (110, 40, 120), 2
        examples.append(SegmentationExample("wbc-seg-zheng", image, labels))
    return examples


def _saved_teacher(folder: Path) -> Path:
    torch.manual_seed(1)
    path = folder / "teacher-segmenter.pt"
    save_checkpoint(create_model("mobile_unet_xs").eval(), {"config": {"model": "mobile_unet_xs", "model_kwargs": {}, "input_size": [64, 64]}}, path)
    return path


def test_a_segmenter_distilled_from_a_teacher_ends_nearer_the_teacher_than_one_trained_without(tmp_path: Path) -> None:
    teacher_path = _saved_teacher(tmp_path)
    teacher, _ = load_checkpoint(teacher_path)
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    train, val = _fields(8, 0), _fields(2, 1)
    probe = torch.from_numpy(np.random.default_rng(7).normal(0.0, 1.0, (2, 3, 64, 64)).astype(np.float32))

    def distance_to_teacher(teacher_checkpoint: str | None) -> float:
        config = TrainConfig(
            model="mobile_unet", input_size=(64, 64), steps=12, batch_size=4, learning_rate=5e-3, crop=48, validate_every=12, seed=3,
            teacher=teacher_checkpoint,
        )
        student, summary = train_segmenter(train, val, spec, config)
        assert summary["config"]["teacher"] == teacher_checkpoint
        with torch.no_grad():
            target = teacher(probe).softmax(dim=1)
            return float((target * (target.clamp_min(1e-12).log() - student(probe).log_softmax(dim=1))).sum(dim=1).mean())

    assert distance_to_teacher(str(teacher_path)) < distance_to_teacher(None)


def test_a_segmenter_teacher_without_segmenter_steps_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    teacher = _saved_teacher(tmp_path)
    with pytest.raises(ValueError, match="--segmenter-teacher needs segmenter training steps"):
        PipelineConfig(tmp_path, tmp_path, segmenter_teacher=teacher, segmenter_steps=0)
    assert PipelineConfig(tmp_path, tmp_path, segmenter_teacher=teacher).segmenter_teacher == teacher


def test_the_train_command_refuses_a_missing_segmenter_teacher_before_any_training(tmp_path: Path, capsys) -> None:
    from leukoedge.cli import main

    absent = tmp_path / "absent.pt"
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--segmenter-teacher", str(absent)]) == 2
    assert f"--segmenter-teacher {absent}: no checkpoint there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_swapped_segmenter_runs_in_fp32_in_a_copy_that_keeps_every_other_file(tmp_path: Path) -> None:
    """scripts/swap_mask_model.py --model segmenter: the copy's segmenter.onnx is the checkpoint's network at the
    bundle's input size, its INT8 file is gone, and every other model file is the bundle's, byte for byte."""
    import importlib.util

    import onnxruntime as ort

    from leukoedge import Detector
    from leukoedge.bundle import load_bundle

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("swap_mask_model", repo / "scripts" / "swap_mask_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    network = create_model("mobile_unet_field_dense").eval()
    save_checkpoint(network, {"config": {"model": "mobile_unet_field_dense", "model_kwargs": {}, "crop": 128}}, tmp_path / "field.pt")
    shipped = load_bundle(repo / "models" / "default")
    out = module.swap_mask_model(shipped.root, "segmenter", tmp_path / "field.pt", tmp_path / "swapped")
    copy = load_bundle(out)
    section = copy.manifest["segmenter"]
    assert section["architecture"] == "mobile_unet_field_dense" and section["input_size"] == shipped.manifest["segmenter"]["input_size"]
    assert set(copy.manifest["precisions"]["segmenter"]) == {"fp32"}
    image = np.random.default_rng(1).normal(0.0, 1.0, (1, 3, *section["input_size"])).astype(np.float32)
    onnx = ort.InferenceSession(str(copy.path(section["file"])), providers=["CPUExecutionProvider"]).run(None, {section["input"]: image})[0]
    with torch.no_grad():
        expected = network(torch.from_numpy(image)).softmax(dim=1).numpy()
    np.testing.assert_allclose(onnx, expected, atol=1e-4)
    for name in copy.manifest["files"]:
        if name != section["file"] and name != "README.md":
            assert copy.path(name).read_bytes() == shipped.path(name).read_bytes(), name
    assert Detector.load(out).run(np.full((96, 128, 3), 200, np.uint8)).verdict.status in ("ok", "no_cells", "outside_domain")


def test_a_copy_without_a_refiner_keeps_the_field_segmenters_masks_and_every_other_file(tmp_path: Path, script) -> None:
    """scripts/swap_mask_model.py --drop: the copy has no refiner, runs, and its cells are the field segmenter's (the
    shipped bundle's cells before refinement); every other model file is the bundle's."""
    import cv2

    from leukoedge import Detector
    from leukoedge.bundle import load_bundle

    repo = Path(__file__).resolve().parents[2]
    shipped = load_bundle(repo / "models" / "default")
    out = script("swap_mask_model").drop_refiner(shipped.root, tmp_path / "no-refiner")
    copy = load_bundle(out)
    assert "refiner" not in copy.manifest and "refiner" not in copy.manifest.get("precisions", {})
    assert not any(name.startswith("refiner") for name in copy.manifest["files"])
    for name in copy.manifest["files"]:
        if name not in ("manifest.json", "README.md"):
            assert copy.path(name).read_bytes() == shipped.path(name).read_bytes(), name
    frame = cv2.imread(str(repo / "samples" / "bccd_BloodImage_00002.jpg"))
    unrefined = Detector.load(out).run(frame)
    refining = Detector.load(shipped.root)
    refined = refining.white_cells(frame, refining.candidates(frame))[0]  # the shipped bundle's white cells, refined
    assert unrefined.cells and unrefined.timings["refine"] == 0.0
    assert [cell.box for cell in unrefined.cells] == [instance.found_box or instance.box for instance in refined]


def test_refit_domain_changes_only_the_domain_check(data_root: Path, tmp_path: Path, script) -> None:
    """scripts/refit_domain.py: the copy's domain check is fitted on the validation fields through the bundle's own
    segmenter; the gate, its threshold, the verdict and every model file stay the bundle's."""
    from leukoedge.bundle import load_bundle

    repo = Path(__file__).resolve().parents[2]
    module = script("refit_domain")
    shipped = load_bundle(repo / "models" / "default")
    # MIN_SIDE_FIELDS fields per source: enough for each source's typical cell side
    domain = module.refit_domain(shipped.root, data_root, tmp_path / "refit", per_source=MIN_SIDE_FIELDS)
    copy = load_bundle(tmp_path / "refit")
    assert copy.manifest["domain"] == domain and domain["fitted_on"]["frames"] == sum(domain["fitted_on"]["sources"].values())
    assert 2 <= domain["fitted_on"]["frames"] < shipped.manifest["domain"]["fitted_on"]["frames"]
    # the smallest white cells judged: half the smallest-celled source's typical cell, as the gate keeps them
    assert 5 < domain["min_cell_side_px"] < 200
    assert "min_cell_side_px" not in module.refit_domain(shipped.root, data_root, tmp_path / "few", per_source=2)  # too few fields a source
    for key in ("gate", "verdict", "segmenter", "classifier"):
        assert copy.manifest[key] == shipped.manifest[key]
    for name in copy.manifest["files"]:
        if name not in ("manifest.json", "README.md"):
            assert copy.path(name).read_bytes() == shipped.path(name).read_bytes(), name


def test_train_help_names_every_registered_segmenter_and_classifier() -> None:
    """The CLI is built without PyTorch, so its help lists the architectures by hand: it must not fall behind the registry."""
    from leukoedge.cli import build_parser
    from leukoedge.training.models import CLASSIFIERS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {action.dest: action.help for action in train._actions}
    for name in set(SEGMENTERS) - {"mobile_unet", "mobile_unet_xs"}:  # the two refiner-only ones are --refiner-model's
        assert name in helps["segmenter_model"], name
    for name in set(CLASSIFIERS) - {"gate_cnn", "dual_branch"}:  # the gate's and the study's own
        assert name in helps["classifier_model"], name
