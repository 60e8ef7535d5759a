"""Blast vs normal as a coarser camera would see the test smears. A new microscope is often coarser than the ones
the models learnt from; this says how much of the answer survives it. Two ways (--mode):
- detail: each frame shrunk by a factor (area averaging) and enlarged back to its size (bilinear): every cell keeps
  its size in pixels and loses the detail a sensor with fewer pixels or a slightly defocused objective would lose;
- magnification: each frame shrunk by the factor and left so: every cell is that much smaller in pixels, as under
  a lower-power objective (frames below the bundle's smallest judged side are refused as too small).

    python scripts/coarser_camera.py --data ../shared/data --factors 1 0.5 0.35 BUNDLE [BUNDLE ...]

Per bundle and factor, with training/evaluate.py's own functions (test split): ALL-IDB2 blast sensitivity and
specificity (the detected cell nearest the centre), PBC cells called blast (healthy donors; --pbc-limit images),
and the Taleqani frame verdict's sensitivity and specificity with the share of fields refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from leukoedge import Detector
from leukoedge.preprocess.cpu import resize
from leukoedge.training.evaluate import evaluate_single_cells, evaluate_taleqani


def coarser(frame: np.ndarray, factor: float, keep_size: bool = True) -> np.ndarray:
    """The frame with the detail of one `factor` times its resolution, at its own size (keep_size) or at that smaller size."""
    if factor >= 1:
        return frame
    height, width = frame.shape[:2]
    small = resize(frame, max(1, round(width * factor)), max(1, round(height * factor)))
    return resize(small, width, height) if keep_size else small


class CoarserCamera:
    """A detector whose every frame first goes through coarser(); everything else is the detector's."""

    def __init__(self, detector: Detector, factor: float, keep_size: bool = True) -> None:
        self.detector, self.factor, self.keep_size = detector, factor, keep_size

    def run(self, frame: np.ndarray, **options: Any):
        """Detector.run on the coarser frame; options (the file's jpeg_quality, as training.data.run_record passes it) as given."""
        return self.detector.run(coarser(frame, self.factor, self.keep_size), **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.detector, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.5, 0.35])
    parser.add_argument("--mode", choices=("detail", "magnification"), default="detail")
    parser.add_argument("--pbc-limit", type=int, default=300, help="PBC test images (a sample; all: 0)")
    args = parser.parse_args()
    print(f"| bundle | {args.mode} factor | ALL-IDB2 sensitivity | ALL-IDB2 specificity | PBC called blast | Taleqani verdict sensitivity | specificity | refused |")
    print("|---|---|---|---|---|---|---|---|")
    for bundle in args.bundles:
        with Detector.load(bundle) as detector:
            for factor in args.factors:
                camera = CoarserCamera(detector, factor, keep_size=args.mode == "detail")
                idb2 = evaluate_single_cells(camera, args.data, "all-idb2", None)["blast"]
                pbc = evaluate_single_cells(camera, args.data, "pbc", args.pbc_limit or None)
                taleqani = evaluate_taleqani(camera, args.data, None)
                verdict = taleqani["malignant_vs_benign"]
                print(
                    f"| {bundle} | {factor} | {idb2['sensitivity']:.3f} | {idb2['specificity']:.3f} | "
                    f"{pbc['called_blast']} of {pbc['images'] - pbc['non_white_cells']['images']} | {verdict['sensitivity']:.3f} | "
                    f"{verdict['specificity']:.3f} | {taleqani['not_judged'] / taleqani['images']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
