"""scripts/batch_norm_adaptation.py: a segmenter's batch-norm statistics mixed with a device's (AdaBN), the trained
weights and the original model left as they were."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def test_the_device_share_mixes_the_running_statistics_and_nothing_else(script) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.fill_(0.5)
    model[1].running_var.fill_(2.0)
    # The device's frames: two batches, brighter and more varied than anything the statistics above describe
    frames = [np.random.default_rng(seed).normal(3.0, 2.0, (1, 3, 8, 8)).astype(np.float32) for seed in range(10)]
    with torch.no_grad():
        features = model[0](torch.from_numpy(np.concatenate(frames)))
    device_mean = features.mean(dim=(0, 2, 3))
    device_var = features.var(dim=(0, 2, 3), unbiased=True)
    adapt = script("batch_norm_adaptation").with_device_statistics

    kept = adapt(model, frames, 0.0)
    assert torch.equal(kept[1].running_mean, model[1].running_mean)
    full = adapt(model, frames, 1.0, batch=4)  # three batches: the statistics are their cumulative average
    half = adapt(model, frames, 0.5, batch=4)
    assert not full.training and not full[1].training
    torch.testing.assert_close(full[1].running_mean, device_mean, rtol=0, atol=0.1)
    torch.testing.assert_close(half[1].running_mean, 0.5 * full[1].running_mean + 0.25)
    torch.testing.assert_close(half[1].running_var, 0.5 * full[1].running_var + 1.0)
    assert (device_var - 2.0).abs().min() > 0.3 and (device_mean - 0.5).abs().min() > 0.3  # the mix is not the original by chance
    assert torch.equal(full[0].weight, model[0].weight) and torch.equal(full[1].weight, model[1].weight)
    assert torch.equal(model[1].running_mean, torch.full((4,), 0.5))  # the original is untouched
