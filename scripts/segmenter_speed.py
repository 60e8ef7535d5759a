"""Time per frame of field segmenters at the segmenter's input (192x256), before or after training: the figure
that picks a lighter field segmenter (docs/performance.md, "A lighter field segmenter").

    python scripts/segmenter_speed.py [SEGMENTER ...] [--threads 2] [--runs 30]

Each SEGMENTER is a registered name (built with fresh weights: speed depends on the architecture, not the weights)
or a checkpoint .pt with its .json (e.g. models/checkpoints/default-segmenter.pt, the shipped one), or a peer
(scripts/peer_segmenters.py: lraspp_mobilenet_v3_large, torchvision's architecture written out). Each is exported
as the pipeline exports the field segmenter (export/onnx.py, softmax included) and run by leukoedge's ONNX Runtime
backend on one frame at a time, the segmenters taking turns call by call (scripts/onnx_speed.py). Printed: GFLOPs
and parameters per frame, median and p95 ms per frame, and the ratio of each one's median to the first's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from onnx_speed import exported_segmenter, median_p95, time_interleaved
from peer_segmenters import PEERS, create_peer

DEFAULT_SEGMENTERS = ("models/checkpoints/default-segmenter.pt", "mobile_unet", "mobile_unet_field")


def loaded(segmenter: str):
    """The model a SEGMENTER argument names, and how the table names it."""
    import torch

    from leukoedge.training.models import create_model
    from leukoedge.training.train import load_checkpoint

    if segmenter.endswith(".pt"):
        model, record = load_checkpoint(Path(segmenter))
        return model, f"{record['config']['model']} ({segmenter})"
    torch.manual_seed(0)
    if segmenter in PEERS:
        return create_peer(segmenter), f"{segmenter} (peer, fresh weights)"
    return create_model(segmenter), f"{segmenter} (fresh weights)"


def main() -> int:
    from leukoedge.training.pipeline import SEGMENTER_INPUT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("segmenters", nargs="*", default=list(DEFAULT_SEGMENTERS), metavar="SEGMENTER", help="registered names or checkpoints (.pt)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per segmenter after the warm-up calls (default: %(default)s)")
    args = parser.parse_args()
    shape = (1, 3, *SEGMENTER_INPUT)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, segmenter in enumerate(args.segmenters):
            model, label = loaded(segmenter)
            path, mflops = exported_segmenter(model, shape, Path(scratch) / f"segmenter-{index}.onnx", "image")
            rows.append((label, path, mflops, sum(parameter.numel() for parameter in model.parameters())))
        feeds = [{"image": rng.normal(0.0, 1.0, shape).astype(np.float32)} for _ in rows]
        times = time_interleaved([path for _, path, _, _ in rows], feeds, args.runs, args.threads)
    height, width = SEGMENTER_INPUT
    print(f"one {width}x{height} frame a call, {args.threads} ONNX Runtime threads, {args.runs} calls each, interleaved")
    print("| segmenter | GFLOPs per frame | parameters | ms per frame, median / p95 | x the first |")
    print("|---|---|---|---|---|")
    first = None
    for (label, _, mflops, parameters), measured in zip(rows, times):
        median, p95 = median_p95(measured)
        first = median if first is None else first
        print(f"| {label} | {mflops / 1000:.3f} | {parameters / 1000:.0f} k | {median:.2f} / {p95:.2f} | {median / first:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
