"""What the sources' own frames hold, per source/device and split, against the capture checks' limits: the sensor
noise of the frame (domain.frame_noise, before it is scaled to the cells' size), its share of black pixels
(preprocess.cpu.dark_share) and black corners (preprocess.cpu.black_corners), how far its light falls off (preprocess.cpu.
illumination_falloff; the frames the runtime evens, EVEN_FROM or more), and the JPEG quality of its file
(decode.file_jpeg_quality) and the quality its pixels were last compressed at (decode.pixel_jpeg_quality), how evenly
its edges run every way (domain.edge_isotropy, on the frame as the runtime corrects it; the motion check), how torn
it reads (domain.tear_score, the torn-frame check's), its longest run of flat or repeating rows (domain.incomplete_rows), and how much nearer
the bundle's validated colours it comes with red and blue swapped (domain.swapped_colour_gain, the channel-order
check's measure; frames inside the colour domain). docs/training.md quotes it where it sets the noise check (Taleqani's camera is the noisy
one), the field-of-view check's MAX_DARK_SHARE and MAX_BLACK_CORNERS, the compression check's lowest validated
quality in files and in pixels, and where the runtime evens uneven light:

    python scripts/capture_levels.py --data ../shared/data [--splits train val test]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.decode import file_jpeg_quality, pixel_jpeg_quality  # noqa: E402
from leukoedge.domain import colour_distance, colour_features, edge_isotropy, feature_names, frame_noise, incomplete_rows, swapped_colour_gain, tear_score  # noqa: E402
from leukoedge.preprocess.cpu import EVEN_FROM, black_corners, corrected_frame, dark_share, illumination_falloff, illumination_surface  # noqa: E402
from leukoedge.training import data  # noqa: E402

SOURCES = ("pbc", "wbc-seg-zheng", "bccd", "txl-pbc", "all-taleqani", "all-idb2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--splits", nargs="+", choices=("train", "val", "test"), default=["train", "val", "test"])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="whose colour check the swap gain reads")
    args = parser.parse_args()
    detector = Detector.load(args.bundle)  # its preprocessing and colour references only: no model runs
    spec, input_size = detector.domain_spec, detector.segmenter_spec["input_size"]

    def swap_gain(corrected: np.ndarray) -> float:
        """The channel-order check's gain (domain.swapped_colour_gain) on the corrected frame; NaN outside the colour domain."""
        distance = colour_distance(spec, colour_features(detector.prepare_frame(corrected), detector.spec, feature_names(spec)))
        if distance > spec["max_colour_distance"]:
            return float("nan")
        return swapped_colour_gain(spec, corrected, distance, detector.spec, input_size, detector.channel_order)

    print(
        "| source/device | split | frames | noise median / largest | black share largest | frames with 1 / 2 / 3+ black corners "
        f"| light falloff median / largest; frames evened (>= {EVEN_FROM:g}) | longest run of flat or repeating rows, largest "
        "(share of the rows) | colours nearer swapped, largest (frames inside the colour domain) | JPEG qualities (none: not JPEG) "
        "| JPEG quality in the pixels: lowest, median; frames without a lattice | edge isotropy lowest, 1 % quantile, median "
        "| tear score median / largest |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for source in SOURCES:
        for split in args.splits:
            records = data.load_records(args.data, source, split)
            for device in sorted({record.device for record in records}, key=str):
                rows = []
                for record in tqdm([r for r in records if r.device == device], desc=f"{source} {device or ''} {split}", leave=False):
                    frame = data.read_image_as_captured(record)
                    corrected = corrected_frame(frame)[0]  # as the runtime's checks read it
                    rows.append((
                        frame_noise(frame), dark_share(frame), black_corners(frame), file_jpeg_quality(record.image_path),
                        illumination_falloff(illumination_surface(frame)), incomplete_rows(frame), swap_gain(corrected),
                        pixel_jpeg_quality(frame), edge_isotropy(corrected), tear_score(frame),
                    ))
                noise, dark, corners = np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), [r[2] for r in rows]
                falloff, incomplete, gains = (np.array([r[index] for r in rows]) for index in (4, 5, 6))
                qualities = Counter("none" if r[3] is None else r[3] for r in rows)
                in_pixels = np.array([r[7] for r in rows if r[7] is not None])
                pixel_column = f"{in_pixels.min()}, {np.median(in_pixels):g}" if in_pixels.size else "-"
                isotropy = np.array([r[8] for r in rows if r[8] is not None])
                isotropy_column = f"{isotropy.min():.3f}, {np.quantile(isotropy, 0.01):.3f}, {np.median(isotropy):.3f}" if isotropy.size else "-"

                name = source + (f"/{device}" if device else "")
                print(
                    f"| {name} | {split} | {len(rows)} | {np.median(noise):.2f} / {noise.max():.2f} | {dark.max():.4f} | "
                    f"{sum(c == 1 for c in corners)} / {sum(c == 2 for c in corners)} / {sum(c >= 3 for c in corners)} | "
                    f"{np.median(falloff):.2f} / {falloff.max():.2f}; {int((falloff >= EVEN_FROM).sum())} | {incomplete.max():.3f} | {np.nanmax(gains) if np.isfinite(gains).any() else float('nan'):.2f} | "
                    + ", ".join(f"{quality}: {count}" for quality, count in sorted(qualities.items(), key=str))
                    + f" | {pixel_column}; {len(rows) - in_pixels.size} | {isotropy_column} | "
                    f"{np.median([r[9] for r in rows]):.2f} / {max(r[9] for r in rows):.2f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
