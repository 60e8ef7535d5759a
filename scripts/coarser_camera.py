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

With --benign-flags, instead: per bundle, the median cell side of the Taleqani validation fields flagged as captured
(what validated flags rest on), then per factor every benign Taleqani field of --split (test) flagged, with its median
cell side, its cells, blasts and detail (domain.cell_detail), the malignant fields flagged and refused, and the
malignant flags' detail (its 0.01 quantile, its minimum, how many under domain.MIN_FLAG_DETAIL). With
--without-detail-check the detail check refuses nothing (domain.MIN_FLAG_DETAIL set to 0), so every flag's detail is
read: how the bar was chosen on the validation fields (--split val).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from leukoedge import Detector, domain
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


def taleqani_verdicts(camera: Any, data_root: Path, split: str) -> list[tuple[Any, Any]]:
    """(record, verdict) of every Taleqani field of the split through the camera, as `leukoedge evaluate` runs them."""
    from leukoedge.training import data

    return [(record, data.run_record(camera, record).verdict) for record in data.load_records(data_root, "all-taleqani", split)]


def list_benign_flags(detector: Detector, data_root: Path, factors: list[float], keep_size: bool, split: str, bar: float) -> None:
    """The validated flags' median cell sides, then per factor the benign fields of `split` flagged and the malignant
    flags' detail against `bar` (see the docstring)."""
    validated = [verdict.domain["cell_side_px"] for record, verdict in taleqani_verdicts(detector, data_root, "val") if record.blast and verdict.flagged]
    low, q05, middle = np.quantile(validated, [0.0, 0.05, 0.5])
    print(f"validation malignant fields flagged as captured: {len(validated)}; their median cell side: min {low:.1f}, 5 % {q05:.1f}, median {middle:.1f} px")
    for factor in factors:
        verdicts = taleqani_verdicts(CoarserCamera(detector, factor, keep_size), data_root, split)
        malignant = [verdict for record, verdict in verdicts if record.blast]
        benign = [(record, verdict) for record, verdict in verdicts if not record.blast]
        flagged = [(record, verdict) for record, verdict in benign if verdict.flagged]
        refused = sum(verdict.status not in ("ok", "no_cells") for verdict in malignant)
        details = np.array([v.domain["flag_detail"] for v in malignant if v.flagged and "flag_detail" in v.domain])
        spread = f"; their detail: 0.01 quantile {np.quantile(details, 0.01):.2f}, min {details.min():.2f}, {(details < bar).sum()} under {bar}" if details.size else ""
        print(
            f"factor {factor} ({split}): benign flagged {len(flagged)} of {len(benign)}; malignant flagged {sum(v.flagged for v in malignant)} "
            f"of {len(malignant)}, refused {refused}{spread}"
        )
        for record, verdict in flagged:
            detail = verdict.domain.get("flag_detail")
            print(
                f"  {record.image_path.name}: median cell side {verdict.domain['cell_side_px']:.1f} px, {verdict.cell_count} cells, "
                f"{verdict.blast_count} blasts, detail {'-' if detail is None else f'{detail:.2f}'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.5, 0.35])
    parser.add_argument("--mode", choices=("detail", "magnification"), default="detail")
    parser.add_argument("--pbc-limit", type=int, default=300, help="PBC test images (a sample; all: 0)")
    parser.add_argument("--benign-flags", action="store_true", help="list the benign Taleqani fields flagged (see above)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="the Taleqani fields --benign-flags reads (default: %(default)s)")
    parser.add_argument("--without-detail-check", action="store_true", help="--benign-flags with the detail check off, every flag's detail read")
    args = parser.parse_args()
    if not args.benign_flags and (args.split != "test" or args.without_detail_check):
        parser.error("--split and --without-detail-check go with --benign-flags")
    if args.benign_flags:
        bar = domain.MIN_FLAG_DETAIL
        if args.without_detail_check:
            domain.MIN_FLAG_DETAIL = 0.0
        for bundle in args.bundles:
            with Detector.load(bundle) as detector:
                list_benign_flags(detector, args.data, args.factors, args.mode == "detail", args.split, bar)
        return
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
