"""Floating-point operations of a model per input, counted by PyTorch's FlopCounterMode.

One multiply-add counts as 2 FLOPs (the convention of published detector FLOPs, e.g. Ultralytics'),
so the numbers compare directly with published throughput for the Jetson estimate in docs/jetson.md.
Only convolutions, matrix products and attention are counted; element-wise ops are memory-bound
and cost time that FLOPs do not show.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of `model` on a zero tensor of input_shape (batch included)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(tuple(input_shape)))
    return int(counter.get_total_flops())
