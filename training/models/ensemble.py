"""Several trained segmentation models behind the interface of one (a deep ensemble).

Independently trained networks make partly independent mistakes, so the mean of their class
probabilities is usually better than any one of them: three refiners, one trained on the expert masks
alone, two on the expert and the weak Taleqani masks, raise the validation Zheng nucleus Dice from
0.960 to 0.966. Each member costs its own compute at run time, so the shipped refiner is one network
distilled from that ensemble (training.train.distillation_loss; docs/training.md, "Refiner ensemble and distillation").

The ensemble's output is the log of the members' mean class probabilities: softmax of it is that
mean again, so it trains, exports (export/onnx.py wraps segmenters in a softmax), quantizes and
runs where any one segmentation model does, as one ONNX graph.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# log(0) would be -inf, which a quantizer or TensorRT may not carry; the members' softmax never gets there in practice.
MIN_PROBABILITY = 1e-12


class ProbabilityMean(nn.Module):
    """Logits N x C x H x W whose softmax is the mean of the members' softmax (C classes each)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members; got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([torch.softmax(member(x), dim=1) for member in self.members]).mean(dim=0)
        return torch.log(probabilities.clamp_min(MIN_PROBABILITY))
