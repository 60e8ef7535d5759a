"""Per-crop time of refiner architectures at several crop sizes, before any training: the figure that picks
the candidates worth training (docs/performance.md, "The light refiner").

    python scripts/refiner_speed.py [--models hctnet_lite@128 mobile_unet@64 ...] [--batch 16] [--threads 2] [--runs 30]

Each MODEL@SIZE is built with fresh weights (speed depends on the architecture, not the weights), exported
as the pipeline exports a refiner (export/onnx.py, softmax included), and run by leukoedge's own ONNX
Runtime backend on a batch of random crops. The models take turns call by call, so whatever else loads the
machine loads them alike. Printed: MFLOPs per crop, median and p95 ms per call and per crop, and the
ratio of each one's median per crop to the first's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from onnx_speed import exported_segmenter, median_p95, time_interleaved

DEFAULT_MODELS = ("hctnet_lite@128", "hctnet_lite@64", "mobile_unet@128", "mobile_unet@96", "mobile_unet@64", "mobile_unet_xs@64")


def exported(name: str, size: int, folder: Path) -> tuple[Path, float]:
    """The ONNX file of a fresh `name` refiner at size x size crops, and its MFLOPs per crop."""
    import torch

    from leukoedge.training.models import create_model

    torch.manual_seed(0)
    return exported_segmenter(create_model(name), (2, 3, size, size), folder / f"{name}-{size}.onnx", "crop")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL@SIZE")
    parser.add_argument("--batch", type=int, default=16, help="crops per call (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per model after 3 warm-up calls (default: %(default)s)")
    args = parser.parse_args()
    candidates = [(name, int(size)) for name, size in (entry.split("@") for entry in args.models)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        built = [(name, size, *exported(name, size, Path(scratch))) for name, size in candidates]
        feeds = [{"crop": rng.normal(0.0, 1.0, (args.batch, 3, size, size)).astype(np.float32)} for _, size, _, _ in built]
        times = time_interleaved([path for _, _, path, _ in built], feeds, args.runs, args.threads)
    first = None
    print(f"batch {args.batch}, {args.threads} ONNX Runtime threads, {args.runs} calls each, interleaved")
    print("| refiner | crop | MFLOPs per crop | ms per call, median / p95 | ms per crop | x the first |")
    print("|---|---|---|---|---|---|")
    for (name, size, _, mflops), measured in zip(built, times):
        median, p95 = median_p95(measured)
        per_crop = median / args.batch
        first = per_crop if first is None else first
        print(f"| {name} | {size}x{size} | {mflops:.1f} | {median:.1f} / {p95:.1f} | {per_crop:.2f} | {per_crop / first:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
