"""Per-source validation score of segmenter checkpoints, the score training selects by (train._mean_dice):
the mask sources, BCCD and both TXL-PBC devices (box labels, data.box_label_map), so a device a segmenter
never learnt from is scored beside those it did.

    python scripts/segmenter_scores.py --data ../shared/data CHECKPOINT.pt [CHECKPOINT.pt ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from leukoedge.bundle import load_bundle
from leukoedge.preprocess.cpu import PreprocessSpec
from leukoedge.training.pipeline import SEGMENTER_INPUT, PipelineConfig, load_segmentation_examples
from leukoedge.training.samples import segmentation_sample
from leukoedge.training.train import _mean_dice, load_checkpoint

SOURCES = ("wbc-seg-zheng", "all-idb2", "all-taleqani", "bccd", "txl-pbc/bcd", "txl-pbc/raabin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=Path("models/default"), help="whose preprocessing (stain reference) feeds the segmenters")
    parser.add_argument("--per-source", type=int, default=40, help="validation fields per source (default 40)")
    args = parser.parse_args()
    spec = PreprocessSpec.from_manifest(load_bundle(args.bundle).manifest["preprocess"])
    config = PipelineConfig(args.data, Path("."), segmentation_sources=SOURCES)
    examples = load_segmentation_examples(config, "val", per_source=args.per_source)
    samples = [segmentation_sample(e.image, e.label_map, spec, SEGMENTER_INPUT, None) for e in examples]
    for checkpoint in args.checkpoints:
        model = load_checkpoint(checkpoint)[0].eval()
        scores: dict[str, list[float]] = {}
        with torch.no_grad():
            for example, (tensor, truth) in zip(examples, samples):
                predicted = model(torch.from_numpy(tensor[None])).argmax(1)[0].numpy()
                scores.setdefault(example.source, []).append(_mean_dice(predicted, truth))
        row = ", ".join(f"{source} {np.nanmean(values):.3f}" for source, values in scores.items())
        print(f"{checkpoint}: {row}")


if __name__ == "__main__":
    main()
