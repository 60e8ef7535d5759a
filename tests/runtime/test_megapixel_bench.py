"""scripts/megapixel_bench.py: the unseen-device fields timed beside the bench's points; how two results are compared."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2

from leukoedge import Detector


def test_unseen_device_points_are_each_txl_pbc_labs_test_fields(script, data_root: Path) -> None:
    points = script("megapixel_bench").unseen_device_points(data_root, 3)
    assert [point.name for point in points] == ["txl-pbc raabin field", "txl-pbc bcd field"]
    assert [len(point.frames) for point in points] == [3, 3]
    assert [point.frames[0].shape for point in points] == [(575, 575, 3), (416, 416, 3)]  # one size per lab


def test_result_differences_count_cells_found_by_one_only_moved_boxes_and_changed_labels(script) -> None:
    bench = script("megapixel_bench")
    repo = Path(__file__).resolve().parents[2]
    detector = Detector.load(repo / "models" / "default")
    result = detector.run(cv2.imread(str(repo / "samples" / "bccd_BloodImage_00002.jpg")))
    assert result.cells, "the sample shows a white cell"
    same = bench.ResultDifferences()
    same.add(result, result)
    assert (same.cells, same.one_only, same.moved, same.verdicts, same.labels, max(same.changes)) == (len(result.cells), 0, 0, 0, 0, 0.0)
    cell = result.cells[0]
    x0, y0, x1, y1 = cell.box
    shifted = replace(cell, box=(x0 + 1, y0, x1 + 1, y1), found_box=None, label="changed")  # still IoU >= 0.5: the same cell, moved
    other = replace(result, cells=[shifted] + result.cells[1:])
    moved = bench.ResultDifferences()
    moved.add(result, other)
    assert (moved.one_only, moved.moved, moved.labels) == (0, 1, 1)
    missing = bench.ResultDifferences()
    missing.add(result, replace(result, cells=result.cells[1:]))
    assert missing.one_only == 1


def test_shrink_paths_time_every_camera_size_and_every_path(script, capsys) -> None:
    bench = script("megapixel_bench")
    repo = Path(__file__).resolve().parents[2]
    bench.shrink_paths(Detector.load(repo / "models" / "default"), cv2.imread(str(repo / "samples" / "bccd_BloodImage_00002.jpg")), 1)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    assert [row.split("|")[1].strip() for row in rows] == [f"{width}x{height}" for width, height in bench.CAMERA_SIZES]
    assert all(len([cell for cell in row.split("|")[2:-1] if float(cell) > 0]) == 4 for row in rows)
