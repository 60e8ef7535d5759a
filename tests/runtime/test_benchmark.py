"""`leukoedge bench --compare`: ONNX Runtime FP32 and INT8 and PyTorch eager FP32 in one run, same frames."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
    # The table's header: below the notes, of which there is one where the measured speeds made the default a mix.
    header = next(line for line in out.splitlines() if line.startswith("stage"))
    assert all(f"{label} median" in header for label in CONFIGURATIONS)
    for stage in STAGES:
        # 4 configurations where the tiny models' measured speeds made the bundle's default a mix
        row = re.search(rf"^{stage}((?:\s+\d+\.\d){{6}}|(?:\s+\d+\.\d){{8}})$", out, re.MULTILINE)
        assert row, f"no {stage} row with median and p95 for 3 configurations in:\n{out}"
        medians_and_p95 = [float(value) for value in row.group(1).split()]
        assert all(median <= p95 + 0.1 for median, p95 in zip(medians_and_p95[::2], medians_and_p95[1::2]))
    assert re.search(r"frames/s \(median total\): ort fp32 \d+\.\d, ort int8 \d+\.\d, (ort default \d+\.\d, )?torch fp32 \d+\.\d", out)
    for numerator, denominator in (("ort int8", "ort fp32"), ("ort fp32", "torch fp32"), ("ort int8", "torch fp32")):
        assert re.search(rf"ratio {numerator} / {denominator} .*segment \d+\.\d\d, refine (\d+\.\d\d|-), classify (\d+\.\d\d|-), total \d+\.\d\d", out)


def _compare_without_checkpoints(bundle: Path, frames: Path, tmp_path: Path, capsys) -> str:
    argv = ["bench", str(frames), "--bundle", str(bundle), "--frames", "1", "--warmup", "0", "--compare"]
    assert cli.main([*argv, "--checkpoints", str(tmp_path / "nowhere")]) == 0
    return capsys.readouterr().out


def test_compare_says_what_it_left_out_and_why(tiny_bundle, two_bccd_frames, tmp_path, capsys):
    out = _compare_without_checkpoints(tiny_bundle, two_bccd_frames, tmp_path, capsys)
    assert "ort int8 skipped: bundle" in out and "leukoedge calibrate" in out
    assert "torch fp32 skipped:" in out
    assert "ort default" not in out  # uncalibrated: its default is all fp32, the fp32 column
    assert re.search(r"frames/s \(median total\): ort fp32 \d+\.\d$", out, re.MULTILINE)


def test_ratio_of_a_stage_that_took_no_time_is_a_dash_not_a_crash():
    fast = StageTimes("a", {stage: [1.0, 2.0] for stage in STAGES})
    idle = StageTimes("b", {**{stage: [2.0, 4.0] for stage in STAGES}, "classify": [0.0, 0.0]})
    text = format_comparison({"a": fast, "b": idle}, [("a", "b")])
    assert "ratio a / b (median ms; < 1 is faster): segment 0.50, refine 0.50, classify -, total 0.50" in text


def test_compare_times_the_bundles_own_mix_of_precisions(calibrated_bundle, two_bccd_frames, tmp_path, capsys):
    # A bundle whose INT8 classifier failed its gate: Detector.load runs an INT8 segmenter beside an FP32
    # classifier, a configuration neither the fp32 nor the int8 column measures.
    mixed = tmp_path / "mixed"
    shutil.copytree(calibrated_bundle, mixed)
    manifest = json.loads((mixed / "manifest.json").read_text())
    int8 = manifest["precisions"]["classifier"]["int8"]
    (mixed / int8["file"]).unlink()
    del manifest["files"][int8["file"]]
    int8["file"] = None
    int8["gate"] = {"passed": False, "samples": 8, "metrics": [{"name": "blast_accuracy", "fp32": 0.9, "int8": 0.8, "tolerance": 0.005, "passed": False}]}
    manifest["precisions"]["segmenter"]["fp32"]["median_ms"] = 2 * manifest["precisions"]["segmenter"]["int8"]["median_ms"]  # int8 is its fastest
    manifest["precisions"]["refiner"]["int8"]["median_ms"] = 2 * manifest["precisions"]["refiner"]["fp32"]["median_ms"]  # fp32 is its fastest
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    out = _compare_without_checkpoints(mixed, two_bccd_frames, tmp_path, capsys)
    assert "ort int8 skipped: bundle" in out and "failed its accuracy gate" in out
    assert "ort default: the bundle's default precision per model (segmenter int8, refiner fp32, classifier fp32)" in out
    assert re.search(r"frames/s \(median total\): ort fp32 \d+\.\d, ort default \d+\.\d$", out, re.MULTILINE)
    assert re.search(r"ratio ort default / ort fp32 .*segment \d+\.\d\d", out)


def test_configurations_take_turns_in_a_rotating_order():
    """Each configuration runs first, second and third equally often: none always follows the same one."""
    from leukoedge.benchmark import time_detectors

    calls: list[str] = []

    class Recording:
        def __init__(self, label: str) -> None:
            self.label = label

        def run(self, frame):
            calls.append(self.label)
            return SimpleNamespace(timings={"total": 1.0})

    times = time_detectors({label: Recording(label) for label in "abc"}, [np.zeros((2, 2, 3), np.uint8)], runs=3, warmup=0)
    assert calls == list("abc" "bca" "cab")
    assert all(times[label].ms["total"] == [1.0, 1.0, 1.0] for label in "abc")


def _point(name: str, cells: int, megapixels: float, ms: dict[str, list[float]]):
    from leukoedge.benchmark import ScalingPoint

    side = int(round((megapixels * 1e6) ** 0.5))
    point = ScalingPoint(name, [np.zeros((side, side, 3), np.uint8)])
    point.cell_counts = [cells]
    point.times.ms = ms
    return point


def test_the_scaling_fit_recovers_ms_per_cell_and_per_megapixel():
    from leukoedge.benchmark import fit_scaling, format_scaling

    shapes = [(1, 0.25), (10, 0.25), (30, 0.25), (1, 1.0), (1, 4.0), (12, 0.36)]
    points = [
        _point(f"p{index}", cells, (side := round((mp * 1e6) ** 0.5)) ** 2 / 1e6, {"total": [3.0 + 2.0 * cells + 5.0 * side * side / 1e6] * 3})
        for index, (cells, mp) in enumerate(shapes)
    ]
    fit = fit_scaling(points, stages=("total",))
    assert fit.base["total"] == pytest.approx(3.0) and fit.per_cell["total"] == pytest.approx(2.0) and fit.per_megapixel["total"] == pytest.approx(5.0)
    text = format_scaling(points, fit, stages=("total",))
    assert re.search(r"^total\s+3\.00\s+2\.00\s+5\.00$", text, re.MULTILINE)


def test_the_total_s_slopes_come_with_a_bootstrap_interval_that_holds_them_and_widens_with_the_runs_spread():
    from leukoedge.benchmark import fit_scaling, format_scaling

    shapes = [(1, 0.25), (10, 0.25), (30, 0.25), (1, 1.0), (1, 4.0), (12, 0.36)]
    rng = np.random.default_rng(0)

    def points(spread: float):
        return [
            _point(f"p{index}", cells, (side := round((mp * 1e6) ** 0.5)) ** 2 / 1e6, {"total": list(3.0 + 2.0 * cells + 5.0 * side * side / 1e6 + rng.normal(0.0, spread, 20))})
            for index, (cells, mp) in enumerate(shapes)
        ]

    exact, noisy = fit_scaling(points(0.0), stages=("total",)), fit_scaling(points(1.0), stages=("total",))
    assert exact.per_cell_interval == pytest.approx((2.0, 2.0)) and exact.per_megapixel_interval == pytest.approx((5.0, 5.0))
    (cell_low, cell_high), (mp_low, mp_high) = noisy.per_cell_interval, noisy.per_megapixel_interval
    assert cell_low <= noisy.per_cell["total"] <= cell_high and mp_low <= noisy.per_megapixel["total"] <= mp_high
    assert cell_low < 2.0 < cell_high and mp_low < 5.0 < mp_high and 0.0 < mp_high - mp_low < 4.0
    assert "total's 95 % bootstrap interval over the timed runs: ms/cell" in format_scaling(points(1.0), noisy, stages=("total",))


def test_points_that_cannot_separate_cells_from_size_give_no_slope():
    from leukoedge.benchmark import fit_scaling

    # every point 0.25 MP: the per-megapixel cost cannot be told apart from the base
    points = [_point(f"p{cells}", cells, 0.25, {"total": [float(cells)]}) for cells in (1, 5, 9)]
    fit = fit_scaling(points, stages=("total",))
    assert fit.per_cell["total"] is None and fit.per_megapixel["total"] is None


def test_bench_with_data_prints_every_point_and_the_fit_stage_by_stage(data_root, capsys):
    from leukoedge.benchmark import FIELD_SIZES, PASTED_CELLS, TALEQANI_TILES

    # the shipped bundle: a barely trained one finds one cell (and its fragments) in every frame, so no fit
    assert cli.main(["bench", "--data", str(data_root), "--frames", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "1 runs per point" in out
    header = next(line for line in out.splitlines() if line.startswith("point"))
    assert header.split() == ["point", "frame", "MP", "cells", *STAGES]
    rows = re.findall(rf"^(.+?)\s+(\d+)x(\d+)\s+(\d+\.\d\d)\s+(\d+\.\d)((?:\s+\d+\.\d/\d+\.\d){{{len(STAGES)}}})\s*$", out, re.MULTILINE)
    names = [row[0] for row in rows]
    assert names == [f"bccd +{n} pasted WBC" for n in PASTED_CELLS] + [f"bccd field {w}x{h}" for w, h in FIELD_SIZES] + [f"taleqani tiled {k}x{k}" for k in TALEQANI_TILES]
    for name, width, height, megapixels, _, stages in rows:
        assert float(megapixels) == pytest.approx(int(width) * int(height) / 1e6, abs=0.005)
        for median, p95 in (pair.split("/") for pair in stages.split()):
            assert float(median) <= float(p95) + 0.05, name
    assert [row[1:3] for row in rows][-3:] == [("224", "224"), ("448", "448"), ("672", "672")]
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+-?\d+\.\d\d\s+-?\d+\.\d\d\s+-?\d+\.\d\d$", out, re.MULTILINE), f"no fit row for {stage} in:\n{out}"


def test_bench_needs_images_or_data(capsys):
    assert cli.main(["bench"]) != 0
    assert "--data" in capsys.readouterr().err
