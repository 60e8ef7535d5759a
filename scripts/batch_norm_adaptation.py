"""Leave one device out, then adapt to it without labels with the field segmenter's batch-norm statistics
re-estimated on the device's frames (AdaBN), beside `leukoedge adapt`'s domain-only adaptation: does a segmenter
that is surer of a new device's fields make refusals fewer without false flags?

    python scripts/batch_norm_adaptation.py --data ../shared/data --bundle LOSO_BUNDLE --cache GATE_CACHE \
        --checkpoint LOSO_BUNDLE/../checkpoints/default-segmenter.pt --shares 0 0.5 1

As `leukoedge gate --leave-out DEVICE` (training/gate.leave_one_source_out): the gate trained and the domain check
fitted without the device, the device's training fields (unlabelled) added to the colour references. Then, per
--shares value s, each batch-norm layer's running mean and variance become s x the device's (one pass over those
training fields, cumulative average) + (1 - s) x the trained ones; s = 0 is `leukoedge adapt` as it is. The device's
uncertainties are measured again with that segmenter; the uncertainty threshold stays the one fitted on the training
sources. Printed per share: the detection figures on the device's normal test fields (training/detection.py).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from leukoedge import Detector
from leukoedge.adapt import FrameMeasure, adapted_domain
from leukoedge.training import data
from leukoedge.training.detection import detection_figures, normal_records
from leukoedge.training.gate import (
    MIN_GATE_RECALL,
    GateRecipe,
    _examples,
    choose_threshold,
    frame_domain,
    gate_records,
    train_gate,
    wbc_probabilities,
    with_torch_gate,
)
from leukoedge.training.torch_backend import as_backend, verified_model

SHOWN = ("fields", "box_recall", "box_precision", "rbc_called_wbc_per_1000", "refused_rate", "refused_uncertainty_rate", "flagged", "judged")


def with_device_statistics(segmenter: torch.nn.Module, tensors: list[np.ndarray], share: float, batch: int = 8) -> torch.nn.Module:
    """A copy of the model (the segmenter; scripts/classifier_batch_norm.py: the classifier) whose batch-norm running
    statistics are `share` x the device's (measured on `tensors`, its prepared inputs) + (1 - share) x its own."""
    adapted = copy.deepcopy(segmenter).eval()
    if share == 0:
        return adapted
    layers = [module for module in adapted.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    trained = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch
        layer.train()
    with torch.no_grad():
        for start in range(0, len(tensors), batch):
            adapted(torch.from_numpy(np.concatenate(tensors[start : start + batch])))
    for layer, (mean, variance) in zip(layers, trained):
        layer.running_mean.mul_(share).add_((1 - share) * mean)
        layer.running_var.mul_(share).add_((1 - share) * variance)
    return adapted.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle whose classifier was trained without the device")
    parser.add_argument("--checkpoint", type=Path, required=True, help="its segmenter's training checkpoint")
    parser.add_argument("--cache", type=Path, default=None, help="the gate examples' cache, as for `leukoedge gate --cache`")
    parser.add_argument("--device", default="txl-pbc/raabin")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    recipe = GateRecipe()
    detector = Detector.load(args.bundle)
    train = _examples(detector, args.data, "train", recipe.train_per_source, recipe.augmented_copies, args.cache).without(args.device)
    validation = _examples(detector, args.data, "val", recipe.val_per_source, 0, args.cache).without(args.device)
    gate = train_gate(train, recipe.steps, recipe.seed)
    with_torch_gate(detector, gate, choose_threshold(wbc_probabilities(gate, validation.crops), validation.labels, MIN_GATE_RECALL))
    fitted = frame_domain(detector, gate_records(args.data, "val", recipe.val_per_source)).fit(args.device)
    fields = [r for r in normal_records(args.data, recipe.eval_split, limit=recipe.eval_per_source) if r.domain.startswith(args.device)]
    device_records = [r for r in gate_records(args.data, "train", recipe.train_per_source) if r.domain.startswith(args.device)]
    tensors = [detector.prepare_frame(data.read_image(r)).tensor for r in device_records]
    segmenter = verified_model(detector.bundle, "segmenter", args.checkpoint)
    print(f"{args.device} left out; {len(device_records)} unlabelled training fields adapted to, {len(fields)} normal test fields")
    print("| device's share of the batch-norm statistics | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---|" * len(SHOWN))
    for share in args.shares:
        detector.segmenter = as_backend(detector.bundle, "segmenter", with_device_statistics(segmenter, tensors, share))
        detector.domain_spec = fitted
        device = frame_domain(detector, device_records, f"device frames, share {share}")
        detector.domain_spec = adapted_domain(fitted, [FrameMeasure(c, u, False, False) for c, u in zip(device.colour, device.uncertainty)])
        for row in detection_figures(detector, fields, f"share {share}"):
            cells = [f"{row[key]:.3f}" if isinstance(row[key], float) else str(row[key]) for key in SHOWN]
            print(f"| {share} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
