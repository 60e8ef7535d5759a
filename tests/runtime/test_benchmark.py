"""`leukoedge bench --compare`: ONNX Runtime FP32 and INT8 and PyTorch eager FP32 in one run, same frames."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from leukoedge import cli
from leukoedge.benchmark import STAGES, StageTimes, format_comparison

CONFIGURATIONS = ("ort fp32", "ort int8", "torch fp32")


@pytest.fixture()
def two_bccd_frames(data_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in sorted((data_root / "bccd" / "images").glob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def test_compare_measures_fp32_int8_and_pytorch_with_medians_p95_fps_and_ratios(calibrated_bundle, tiny_bundle, two_bccd_frames, capsys):
    pytest.importorskip("torch", reason="the PyTorch column needs the training extra (torch)")
    checkpoints = Path(tiny_bundle).parent / "checkpoints"  # the calibrated bundle's models are tiny_bundle's
    argv = ["bench", str(two_bccd_frames), "--bundle", str(calibrated_bundle), "--frames", "2", "--warmup", "1", "--compare"]
    assert cli.main([*argv, "--checkpoints", str(checkpoints)]) == 0
    out = capsys.readouterr().out
    assert "(640x480)" in out and "skipped" not in out
    header = out.splitlines()[1]
    assert all(f"{label} median" in header for label in CONFIGURATIONS)
    for stage in STAGES:
        row = re.search(rf"^{stage}((?:\s+\d+\.\d){{6}})$", out, re.MULTILINE)
        assert row, f"no {stage} row with median and p95 for 3 configurations in:\n{out}"
        medians_and_p95 = [float(value) for value in row.group(1).split()]
        assert all(median <= p95 + 0.1 for median, p95 in zip(medians_and_p95[::2], medians_and_p95[1::2]))
    assert re.search(r"frames/s \(median total\): ort fp32 \d+\.\d, ort int8 \d+\.\d, torch fp32 \d+\.\d", out)
    for numerator, denominator in (("ort int8", "ort fp32"), ("ort fp32", "torch fp32"), ("ort int8", "torch fp32")):
        assert re.search(rf"ratio {numerator} / {denominator} .*segment \d+\.\d\d, classify (\d+\.\d\d|-), total \d+\.\d\d", out)


def test_compare_says_what_it_left_out_and_why(tiny_bundle, two_bccd_frames, tmp_path, capsys):
    argv = ["bench", str(two_bccd_frames), "--bundle", str(tiny_bundle), "--frames", "1", "--warmup", "0", "--compare"]
    assert cli.main([*argv, "--checkpoints", str(tmp_path / "nowhere")]) == 0
    out = capsys.readouterr().out
    assert "ort int8 skipped: bundle" in out and "leukoedge calibrate" in out
    assert "torch fp32 skipped:" in out
    assert re.search(r"frames/s \(median total\): ort fp32 \d+\.\d$", out, re.MULTILINE)


def test_ratio_of_a_stage_that_took_no_time_is_a_dash_not_a_crash():
    fast = StageTimes("a", {stage: [1.0, 2.0] for stage in STAGES})
    idle = StageTimes("b", {**{stage: [2.0, 4.0] for stage in STAGES}, "classify": [0.0, 0.0]})
    text = format_comparison({"a": fast, "b": idle}, [("a", "b")])
    assert "ratio a / b (median ms; < 1 is faster): segment 0.50, classify -, total 0.50" in text
