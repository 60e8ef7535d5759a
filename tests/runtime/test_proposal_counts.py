"""scripts/proposal_counts.py: one field's proposals through the gate, the fragment rule and the refiner's rules."""

from __future__ import annotations

from pathlib import Path

import cv2

from leukoedge import Detector

REPO = Path(__file__).resolve().parents[2]


def test_a_fields_counts_agree_with_what_detector_run_keeps_and_refines(script) -> None:
    detector = Detector.load(REPO / "models" / "default")
    frame = cv2.imread(str(REPO / "samples" / "pbc_lymphocyte_LY_131013.jpg"))
    counts = script("proposal_counts").field_counts(detector, frame)
    result = detector.run(frame)
    assert counts["kept"] == len(result.cells) == 1
    assert counts["proposals"] == counts["kept"] + result.verdict.non_wbc_count > counts["kept"]  # cell 2 is rejected
    assert 0 <= counts["refined_kept"] <= counts["refined_all"] <= counts["proposals"]
    assert 0.0 < counts["frame_uncertainty"] < 2 / 3 and 0.0 < counts["cell_uncertainty"] < 2 / 3
