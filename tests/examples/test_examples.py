"""The example scripts as a user runs them: a subprocess each, over a real recording or image folder."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from leukoedge.session import wilson_interval

REPO_ROOT = Path(__file__).resolve().parents[2]
CAPTURE_SESSION, INTEGRATE = REPO_ROOT / "examples" / "capture_session.py", REPO_ROOT / "examples" / "integrate.py"
SESSION_FILES = ("results.jsonl", "cells.csv", "timings.csv", "summary.json", "summary.html", "summary_plot.png")


def run_script(*arguments: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *map(str, arguments)], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def recorded_session(bundle_path: Path, smear_video: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """capture_session.py over the recording, keeping every 2nd frame."""
    folder = tmp_path_factory.mktemp("capture") / "session"
    completed = run_script(CAPTURE_SESSION, "--source", smear_video, "--bundle", bundle_path, "--out", folder, "--save-every", "2")
    assert completed.returncode == 0, completed.stderr
    assert "frames processed 6" in completed.stdout
    return folder


def results_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_capture_session_writes_every_file_of_the_session(recorded_session: Path) -> None:
    for name in SESSION_FILES:
        assert (recorded_session / name).is_file(), name
    for name in ("frames", "overlays"):
        assert sorted(p.name for p in (recorded_session / name).iterdir()) == [f"frame_{i:06d}.png" for i in (0, 2, 4)]


def test_capture_session_records_one_line_per_frame_and_one_row_per_cell(recorded_session: Path) -> None:
    results = results_of(recorded_session)
    assert [r["index"] for r in results] == list(range(6))
    with (recorded_session / "cells.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == sum(len(r["cells"]) for r in results)
    assert [(int(row["frame"]), int(row["id"])) for row in rows] == [(r["index"], cell["id"]) for r in results for cell in r["cells"]]
    with (recorded_session / "timings.csv").open(newline="") as file:
        assert [int(row["frame"]) for row in csv.DictReader(file)] == list(range(6))


def test_capture_session_summary_agrees_with_its_frames(recorded_session: Path) -> None:
    summary = json.loads((recorded_session / "summary.json").read_text())
    results = results_of(recorded_session)
    cells, blasts = sum(r["verdict"]["cell_count"] for r in results), sum(r["verdict"]["blast_count"] for r in results)
    assert (summary["frames_processed"], summary["cells"], summary["blasts"]) == (6, cells, blasts)
    assert summary["blast_fraction_ci95"] == pytest.approx(wilson_interval(blasts, cells))
    if cells:
        assert summary["blast_fraction"] == pytest.approx(blasts / cells)
        assert summary["blast_fraction_ci95"][0] <= summary["blast_fraction"] <= summary["blast_fraction_ci95"][1]
    else:
        assert summary["blast_fraction"] is None
    assert sum(summary["class_counts"]["blast"].values()) == cells
    assert summary["latency_ms"]["total"]["median"] <= summary["latency_ms"]["total"]["p95"]


def test_ctrl_c_stops_cleanly_and_writes_the_session_so_far(bundle_path: Path, tmp_path: Path) -> None:
    fields = tmp_path / "fields"
    fields.mkdir()
    field = cv2.resize(cv2.imread(str(next((REPO_ROOT / "samples").glob("bccd_*.jpg")))), (320, 240))
    cv2.imwrite(str(fields / "field_000.png"), field)
    for number in range(1, 200):  # a long source: far more frames than run before the signal
        os.link(fields / "field_000.png", fields / f"field_{number:03d}.png")
    folder = tmp_path / "session"
    process = subprocess.Popen(
        [sys.executable, str(CAPTURE_SESSION), "--source", str(fields), "--bundle", str(bundle_path), "--out", str(folder), "--save-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        # Ctrl-C as at a terminal: a test run started as a background job (`cmd &`) ignores SIGINT,
        # and a child inherits that, so the script would rightly leave it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not (folder / "results.jsonl").is_file() or not (folder / "results.jsonl").read_text().count("\n") >= 2:
            assert process.poll() is None and time.monotonic() < deadline, "no frame recorded"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    summary = json.loads((folder / "summary.json").read_text())
    results = results_of(folder)
    assert summary["stopped_by"] == "interrupted"
    assert 2 <= summary["frames_processed"] == len(results) < 200
    assert len(list((folder / "overlays").glob("*.png"))) == len(results)
    assert (folder / "summary.html").is_file() and "frames processed" in stdout


def test_a_killed_session_is_reviewed_from_its_records(bundle_path: Path, tmp_path: Path) -> None:
    fields = tmp_path / "fields"
    fields.mkdir()
    field = cv2.resize(cv2.imread(str(next((REPO_ROOT / "samples").glob("bccd_*.jpg")))), (320, 240))
    cv2.imwrite(str(fields / "field_000.png"), field)
    for number in range(1, 200):
        os.link(fields / "field_000.png", fields / f"field_{number:03d}.png")
    folder = tmp_path / "session"
    process = subprocess.Popen(
        [sys.executable, str(CAPTURE_SESSION), "--source", str(fields), "--bundle", str(bundle_path), "--out", str(folder), "--save-every", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (folder / "results.jsonl").is_file() or (folder / "results.jsonl").read_text().count("\n") < 3:
            assert process.poll() is None and time.monotonic() < deadline, "no frame recorded"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # no handler runs: no summary
        process.wait(timeout=30)
    finally:
        process.kill()
    assert not (folder / "summary.json").exists()

    completed = run_script(CAPTURE_SESSION, "review", folder, "--blasts", "1", "--total", "10")

    assert completed.returncode == 0, completed.stderr
    assert "rebuilding it from results.jsonl" in completed.stderr and "hematologist: 1 blasts of 10 cells" in completed.stdout
    summary = json.loads((folder / "summary.json").read_text())
    results = results_of(folder)
    assert summary["ended_early"] is True and "killed" in summary["stopped_by"]
    assert summary["frames_processed"] == len(results) >= 3
    assert summary["cells"] == sum(r["verdict"]["cell_count"] for r in results)
    assert (folder / "summary.html").is_file() and json.loads((folder / "review.json").read_text())["session_ended_early"] is True
    repaired = run_script(CAPTURE_SESSION, "repair", folder)
    assert repaired.returncode == 0 and "ENDED EARLY" in repaired.stdout  # a session with its summary is left as it is


def test_repair_of_a_folder_without_a_session_says_so(tmp_path: Path) -> None:
    completed = run_script(CAPTURE_SESSION, "repair", tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.startswith("error:") and "holds no session to rebuild" in completed.stderr


def test_a_session_of_no_frames_is_refused(bundle_path: Path, smear_video: Path, tmp_path: Path) -> None:
    completed = run_script(CAPTURE_SESSION, "--source", smear_video, "--bundle", bundle_path, "--out", tmp_path / "s", "--frames", "-1")
    assert completed.returncode == 2 and "expected a whole number >= 1" in completed.stderr
    assert not (tmp_path / "s").exists()


def test_review_prints_and_stores_the_agreement(tmp_path: Path) -> None:
    summary = {"blasts": 30, "cells": 200, "blast_fraction": 0.15, "blast_fraction_ci95": list(wilson_interval(30, 200))}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    completed = run_script(CAPTURE_SESSION, "review", tmp_path, "--blasts", "24", "--total", "100")
    assert completed.returncode == 0, completed.stderr
    assert "24.0%" in completed.stdout and "OUTSIDE" in completed.stdout and "-9.0%" in completed.stdout
    review = json.loads((tmp_path / "review.json").read_text())
    assert review["difference"] == pytest.approx(-0.09)
    assert (review["hematologist_within_leukoedge_ci"], review["cell_count_ratio"]) == (False, 2.0)


def test_review_refuses_more_blasts_than_cells_with_a_message(tmp_path: Path) -> None:
    completed = run_script(CAPTURE_SESSION, "review", tmp_path, "--blasts", "12", "--total", "10")
    assert completed.returncode == 2
    assert completed.stderr.startswith("error:") and "blasts <= total" in completed.stderr


def test_integrate_runs_over_a_recording_and_exits_0(bundle_path: Path, smear_video: Path) -> None:
    completed = run_script(INTEGRATE, smear_video, "--bundle", bundle_path)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    # A recording is read frame by frame however slow the detector: every one of its 6 frames is shown.
    assert [line.split(":")[0] for line in lines[:-1]] == [f"frame {index}" for index in range(6)]
    assert all(re.fullmatch(r"frame \d+: (\d+ cells, \d+ blast \(\d+ %\)( +FLAGGED)?|NOT JUDGED \(\w+\): .+) +\(\d+ ms\)", line) for line in lines[:-1])
    assert lines[-1].startswith("capture: {'frames': 6, 'dropped': 0")


def test_integrate_says_why_a_source_cannot_be_opened(bundle_path: Path, tmp_path: Path) -> None:
    completed = run_script(INTEGRATE, tmp_path / "missing.avi", "--bundle", bundle_path)
    assert completed.returncode == 2
    assert "does not exist" in completed.stderr and "Traceback" not in completed.stderr
