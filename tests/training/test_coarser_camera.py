"""scripts/coarser_camera.py: each frame seen with the detail of a coarser camera, at its own size, by the same detector."""

from __future__ import annotations

import numpy as np


def test_a_coarser_frame_keeps_its_size_and_colours_and_loses_its_detail(script) -> None:
    coarser = script("coarser_camera").coarser
    rng = np.random.default_rng(0)
    frame = np.clip(rng.normal(150, 40, (120, 160, 3)), 0, 255).astype(np.uint8)
    assert coarser(frame, 1.0) is frame
    seen = coarser(frame, 0.5)
    assert seen.shape == frame.shape and seen.dtype == np.uint8
    assert abs(float(seen.mean()) - float(frame.mean())) < 2.0
    detail = lambda image: float(np.abs(np.diff(image.astype(float), axis=1)).mean())  # noqa: E731
    assert detail(seen) < 0.7 * detail(frame)
    assert detail(coarser(frame, 0.35)) < detail(seen)
    smaller = coarser(frame, 0.5, keep_size=False)  # a lower magnification: every cell half the pixels across
    assert smaller.shape == (60, 80, 3) and abs(float(smaller.mean()) - float(frame.mean())) < 2.0


def test_the_camera_runs_the_detector_on_the_coarser_frame_and_lends_it_everything_else(script) -> None:
    module = script("coarser_camera")

    class Detector:
        verdict_spec = {"blast_threshold": 0.5}

        def run(self, frame, jpeg_quality=None):
            return frame, jpeg_quality

    frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    camera = module.CoarserCamera(Detector(), 0.5)
    seen, quality = camera.run(frame, jpeg_quality=90)  # as training.data.run_record calls it
    assert np.array_equal(seen, module.coarser(frame, 0.5)) and quality == 90
    assert camera.verdict_spec == {"blast_threshold": 0.5}
