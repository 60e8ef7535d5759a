"""The training commands' arguments: counts, steps and the data folder are refused before any model runs or trains."""

from __future__ import annotations

import re

import pytest

from leukoedge import cli
from leukoedge.training.cli import models_kept_without_checkpoint


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["train", "--segmenter-steps", "-1"], ">= 0, got -1"),
        (["train", "--classifier-steps", "-1"], ">= 0, got -1"),
        (["train", "--refiner-steps", "-5"], ">= 0, got -5"),
        (["train", "--classifier-seed", "-1"], ">= 0, got -1"),
        (["gate", "--steps", "-1"], ">= 1, got -1"),
        (["gate", "--steps", "0"], ">= 1, got 0"),
        (["gate", "--train-per-source", "0"], ">= 1, got 0"),
        (["gate", "--eval-per-source", "-2"], ">= 1, got -2"),
        (["gate", "--labelled-frames", "-1"], ">= 0, got -1"),
        (["gate", "--seed", "-1"], ">= 0, got -1"),
        (["study", "--folds", "1"], ">= 2, got 1"),
        (["study", "--folds", "0"], ">= 2, got 0"),
        (["calibrate", "--gate-limit", "0"], ">= 1, got 0"),
        (["calibrate", "--threads", "-1"], ">= 1, got -1"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_a_count_out_of_range_is_refused_when_the_arguments_are_parsed(arguments, expected, tmp_path, capsys):
    command, *options = arguments
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--data", str(tmp_path), "--out", str(tmp_path / "out"), *options])
    assert exited.value.code == 2
    assert f"expected a whole number {expected}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["segmenter", "refiner", "classifier"])
def test_train_with_0_steps_and_no_checkpoint_to_keep_is_refused_before_any_work(model, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(out), "--quick", f"--{model}-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert f"error: --{model}-steps 0 keeps the {model} of --{model}-init, and none is given" in err
    assert f"--{model}-init CHECKPOINT" in err
    assert not out.exists()


def test_train_names_every_model_it_was_asked_to_keep_without_a_checkpoint(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path), "--segmenter-steps", "0", "--classifier-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--segmenter-steps 0" in err and "--classifier-steps 0" in err
    assert "--refiner-steps 0" not in err


def test_0_steps_with_the_matching_checkpoint_keeps_that_model_and_is_accepted():
    kept = ["--segmenter-steps", "0", "--segmenter-init", "s.pt", "--refiner-steps", "0", "--refiner-init", "r.pt"]
    args = cli.build_parser().parse_args(["train", "--data", "d", *kept, "--classifier-steps", "0", "--classifier-init", "c.pt"])
    assert models_kept_without_checkpoint(args) == []
    # An init for another model does not count: the classifier would still ship untrained.
    args = cli.build_parser().parse_args(["train", "--data", "d", *kept, "--classifier-steps", "0"])
    assert [problem.split()[0] for problem in models_kept_without_checkpoint(args)] == ["--classifier-steps"]


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_evaluate_names_every_missing_source_folder_before_any_model_runs(quick, data_root, tmp_path, capsys):
    pytest.importorskip("torch", reason="evaluate needs the training extra (torch)")
    partial = tmp_path / "data"
    partial.mkdir()
    for source in ("wbc-seg-zheng", "all-idb2", "all-taleqani", "pbc"):  # bccd and txl-pbc left out
        (partial / source).symlink_to(data_root / source, target_is_directory=True)
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--data", str(partial), "--out", str(out), *(["--quick"] if quick else [])]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: --data {re.escape(str(partial))} lacks the source folder\(s\) bccd, txl-pbc: evaluate reads", err)
    assert not out.exists()


def test_every_source_evaluate_reads_is_in_the_real_data_folder(data_root):
    pytest.importorskip("torch", reason="evaluate needs the training extra (torch)")
    from leukoedge.training.evaluate import EVALUATED_SOURCES, require_sources

    require_sources(data_root)
    assert "txl-pbc" in EVALUATED_SOURCES  # read by the last table, "only white cells are cells"



def test_evaluate_names_a_missing_cross_source_bundle_before_any_work(data_root, tmp_path, capsys):
    missing = tmp_path / "no-such-bundle"
    assert cli.main(["evaluate", "--data", str(data_root), "--out", str(tmp_path / "out"), "--cross-source-bundle", str(missing)]) == 2
    assert f"bundle folder {missing} does not exist" in capsys.readouterr().err
