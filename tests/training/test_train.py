"""The training loop: best-checkpoint selection and early stopping."""

import numpy as np
import pytest
import torch

from leukoedge.training.train import TrainConfig, train_loop


def _run(scores: list[float], steps: int, patience: int) -> dict:
    """Train a one-weight model with a scripted validation score sequence (validated every step)."""
    model = torch.nn.Linear(1, 1)
    sequence = iter(scores)
    config = TrainConfig(model="scripted", input_size=(1, 1), steps=steps, batch_size=1, validate_every=1, patience=patience)
    return train_loop(
        model,
        config,
        make_batch=lambda indices, rng: (torch.ones(1, 1), torch.zeros(1, 1)),
        loss_of=lambda output, target: ((output - target) ** 2).mean(),
        validate=lambda m: next(sequence),
        sample_indices=np.zeros(steps, dtype=int),
        description="test",
    )


def test_no_early_stop_in_the_first_half():
    # Best at step 1, then worse: patience 2 would stop at step 3, but steps < 10 // 2 keep training.
    summary = _run([0.9] + [0.1] * 20, steps=10, patience=2)
    assert [h["step"] for h in summary["history"]][-1] == 5  # the first step in the second half with 2+ stale validations
    assert summary["best_val_score"] == 0.9


def test_runs_to_the_end_while_improving():
    summary = _run([i / 10 for i in range(10)], steps=10, patience=2)
    assert len(summary["history"]) == 10
    assert summary["best_val_score"] == 0.9


def _weights_kept(ema_decay: float | None, steps: int = 6) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Train a one-weight model; return the weights each step started from (plus the last step's result)
    and the weights train_loop kept (validated once, at the end, so that one is kept)."""
    model = torch.nn.Linear(1, 1, bias=False)
    trajectory = []

    def make_batch(indices, rng):
        trajectory.append(model.weight.detach().clone())
        return torch.ones(1, 1), torch.full((1, 1), 5.0)

    config = TrainConfig(model="scripted", input_size=(1, 1), steps=steps, batch_size=1, learning_rate=0.5, validate_every=steps, ema_decay=ema_decay)
    train_loop(model, config, make_batch, lambda o, t: ((o - t) ** 2).mean(), lambda m: 0.0, np.zeros(steps, dtype=int), "test")
    return trajectory, model.weight.detach().clone()


def test_the_moving_average_of_the_weights_is_kept_when_asked():
    plain_trajectory, plain_kept = _weights_kept(None)
    trajectory, kept = _weights_kept(0.5)
    assert torch.equal(trajectory[0], plain_trajectory[0])  # the same start, the same steps
    # Without the average the last step's weights are kept; with it, the average of the weights after each step.
    final = trajectory[1:] + [None]
    # The last step's own weights are not in the trajectory: recover them from the plain run (same steps).
    final[-1] = plain_kept
    expected = final[0]
    for weights in final[1:]:
        expected = 0.5 * expected + 0.5 * weights
    assert torch.allclose(kept, expected)
    assert not torch.allclose(kept, plain_kept)


def test_a_moving_average_decay_outside_zero_to_one_is_refused():
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="moving-average decay"):
            TrainConfig(model="m", input_size=(1, 1), steps=1, batch_size=1, ema_decay=decay)


def test_the_train_command_refuses_a_bad_classifier_decay_before_any_training(tmp_path, capsys):
    from leukoedge.cli import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--classifier-ema-decay", "1.5"]) == 2
    assert "moving-average decay" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sampling_balances_sources_and_follows_weights():
    from leukoedge.training.train import balanced_indices

    sources = ["big"] * 900 + ["small"] * 100
    rng = np.random.default_rng(0)
    equal = np.asarray(sources)[balanced_indices(sources, 20000, rng)]
    assert abs((equal == "small").mean() - 0.5) < 0.02
    weighted = np.asarray(sources)[balanced_indices(sources, 20000, rng, {"small": 3.0})]
    assert abs((weighted == "small").mean() - 0.75) < 0.02


def test_a_training_window_outside_the_model_input_is_refused(tmp_path):
    from leukoedge.cli import main
    from leukoedge.training.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="segmenter_crop"):
        PipelineConfig(tmp_path, tmp_path / "out", segmenter_crop=512)
    assert PipelineConfig(tmp_path, tmp_path / "out", segmenter_crop=None).segmenter_crop is None  # the whole input
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--segmenter-crop", "8"]) == 2  # clear error, no training


def test_only_classifiers_the_runtime_can_feed_are_trained_for_a_bundle(tmp_path):
    from leukoedge.cli import main
    from leukoedge.training.pipeline import PipelineConfig

    assert PipelineConfig(tmp_path, tmp_path / "out", classifier_model="vgg_hybrid").classifier_model == "vgg_hybrid"
    with pytest.raises(ValueError, match="3-channel crop"):
        PipelineConfig(tmp_path, tmp_path / "out", classifier_model="dual_branch")  # 6 channels: cell + nucleus crop
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--classifier-model", "nope"]) == 2
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--model", "dual_branch"]) == 2


def test_fresh_weights_follow_the_models_own_seed_not_what_was_drawn_before():
    from leukoedge.training.train import _initial_model

    def weights(seed: int) -> list[torch.Tensor]:
        config = TrainConfig("custom_cnn", (64, 64), steps=1, batch_size=1, seed=seed)
        return [p.detach().clone() for p in _initial_model(config, head_classes={"blast": 2}).parameters()]

    first = weights(1)
    torch.rand(1000)  # another model drew from the global generator in between
    assert all(torch.equal(a, b) for a, b in zip(first, weights(1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, weights(2)))


@pytest.mark.parametrize(
    ("augmented_view", "augmentation"),
    [("device_view_crop", "device_augment"), ("chroma_turned", "chroma_augment"), ("resolution_lowered", "resolution_augment")],
    ids=["device", "chroma", "resolution"],
)
def test_a_classifier_trained_on_augmented_crops_is_also_selected_on_them(monkeypatch, augmented_view, augmentation):
    # With device or colour augmentation, validation scores the cells as they are and as the augmentation shows
    # them (drawn once per cell, the same crops at every validation): mean of the two balanced accuracies.
    from leukoedge.preprocess.cpu import PreprocessSpec
    from leukoedge.training import train as train_module
    from leukoedge.training.train import CellExample, train_classifier

    image = np.full((120, 160, 3), 220, np.uint8)
    image[40:80, 60:100] = (150, 40, 90)
    cells = [CellExample("pbc", image, (60, 40, 100, 80), {"blast": index % 2}) for index in range(4)]
    drawn = []

    def black(*args):  # every augmented validation crop black; the last argument: the strength, or resolution_lowered's rng
        drawn.append(args[-1])
        return np.zeros((3, 64, 64), np.float32)

    monkeypatch.setattr(train_module, augmented_view, black)
    plain_sample = train_module.classification_sample  # both runs train on the same crops: only validation differs
    monkeypatch.setattr(train_module, "classification_sample", lambda *args: plain_sample(*args[:6]))
    spec = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
    scores = {}
    for strength in (0.0, 0.7):
        config = TrainConfig(model="custom_cnn", input_size=(64, 64), steps=2, batch_size=2, validate_every=1, **{augmentation: strength})
        _, summary = train_classifier(cells, cells, {"blast": ["normal", "blast"]}, spec, config, 0.15)
        scores[strength] = [h["val_score"] for h in summary["history"]]
    assert len(drawn) == len(cells)  # one augmented view per validation cell, drawn once
    assert augmentation == "resolution_augment" or drawn == [0.7] * len(cells)
    # A constant input is classified one way: balanced accuracy 0.5 on the augmented view, averaged in.
    for plain, augmented in zip(scores[0.0], scores[0.7]):
        assert augmented == pytest.approx((plain + 0.5) / 2)


def test_a_capture_fault_reaches_the_student_s_crop_and_not_the_teacher_s():
    # The teacher answers on the crop as captured, the student on the same crop (the same draws) with the fault.
    from leukoedge.training.train import CellExample, captured_pair

    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), np.uint8)
    example = CellExample("all-taleqani", image, (20, 20, 70, 70), {"blast": 1})

    def sample(cell, rng):  # a crop that shows its draw and whether it was cut from the frame as captured
        return np.array([rng.random(), float(np.array_equal(cell.image, image))])

    rng = np.random.default_rng(1)
    student, teacher = captured_pair(example, sample, rng, 1.0, with_teacher=True)
    assert student[0] == teacher[0] and (student[1], teacher[1]) == (0.0, 1.0)
    student, teacher = captured_pair(example, sample, rng, 1.0, with_teacher=False)
    assert student is teacher and student[1] == 0.0  # no teacher: the faulty crop alone
    student, teacher = captured_pair(example, sample, rng, 0.0, with_teacher=True)
    assert student is teacher and student[1] == 1.0  # no capture augmentation: the crop as captured


def test_a_label_weight_needs_a_teacher_and_zero_learns_the_teacher_alone(tmp_path):
    from leukoedge.training.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="needs a teacher"):
        TrainConfig(model="custom_cnn", input_size=(64, 64), steps=2, batch_size=2, label_weight=0.0)
    with pytest.raises(ValueError, match="needs --classifier-teacher"):
        PipelineConfig(data_root=tmp_path, out_dir=tmp_path / "out", classifier_label_weight=0.0)


def test_the_teacher_loss_is_least_at_the_teacher_s_logits_and_at_a_temperature_sees_their_margin():
    from leukoedge.training.train import teacher_loss

    teacher = torch.tensor([[6.0, -6.0], [-4.0, 4.0], [1.0, 0.0]])
    plain = -(teacher.softmax(dim=1) * torch.log_softmax(teacher, dim=1)).sum(dim=1).mean()
    assert teacher_loss(teacher, teacher) == pytest.approx(float(plain))  # temperature 1: the probabilities as they are
    for temperature in (1.0, 4.0):
        at_teacher = teacher_loss(teacher, teacher, temperature)
        for other in (teacher * 0.5, teacher * 2.0, teacher + torch.tensor([1.0, 0.0]), torch.zeros_like(teacher)):
            assert teacher_loss(other, teacher, temperature) > at_teacher + 1e-4
    # A student as sure of the classes but with half the teacher's margins: at temperature 1 it costs little more than the
    # teacher (confident cells' probabilities are near 0 and 1 either way); at 4 the margins are seen.
    gap = {t: float(teacher_loss(teacher * 0.5, teacher, t) - teacher_loss(teacher, teacher, t)) for t in (1.0, 4.0)}
    assert gap[4.0] > 3 * gap[1.0]
    with pytest.raises(ValueError, match="temperature must be positive"):
        TrainConfig(model="custom_cnn", input_size=(64, 64), steps=2, batch_size=2, teacher="t.pt", distill_temperature=0.0)
    with pytest.raises(ValueError, match="temperature needs a teacher"):
        TrainConfig(model="custom_cnn", input_size=(64, 64), steps=2, batch_size=2, distill_temperature=4.0)
