"""scripts/megapixel_bench.py: the unseen-device fields timed beside the bench's points."""

from __future__ import annotations

from pathlib import Path


def test_unseen_device_points_are_each_txl_pbc_labs_test_fields(script, data_root: Path) -> None:
    points = script("megapixel_bench").unseen_device_points(data_root, 3)
    assert [point.name for point in points] == ["txl-pbc raabin field", "txl-pbc bcd field"]
    assert [len(point.frames) for point in points] == [3, 3]
    assert [point.frames[0].shape for point in points] == [(575, 575, 3), (416, 416, 3)]  # one size per lab
