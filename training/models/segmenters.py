"""Whole-field segmenters: label map background / cytoplasm / nucleus.

HCT-Net: a CNN encoder, a transformer over the deepest feature map for context across the field,
and a decoder that fuses the CNN skips with that context through channel + spatial attention.
UNet is the plain-CNN baseline of similar size ("CNN (base)").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ChannelAttention, DoubleConv, SpatialAttention, TransformerBlock


class DecoderStage(nn.Module):
    """Upsample, concatenate the encoder skip, convolve; optionally refine with channel + spatial attention."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, attention: bool):
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)
        self.attention = nn.Sequential(ChannelAttention(out_channels), SpatialAttention()) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.attention(self.conv(torch.cat([x, skip], dim=1)))


class EncoderDecoder(nn.Module):
    """Encoder of len(widths) stages (max-pool between), a bottleneck, a mirrored decoder, a 1x1 head.

    Returns logits N x num_classes x H x W at the input resolution.
    """

    def __init__(self, widths: tuple[int, ...], num_classes: int, transformer_depth: int, heads: int, attention: bool):
        super().__init__()
        self.encoder = nn.ModuleList()
        channels = 3
        for width in widths:
            self.encoder.append(DoubleConv(channels, width))
            channels = width
        bottleneck_width = widths[-1]
        layers: list[nn.Module] = [DoubleConv(channels, bottleneck_width)]
        layers += [TransformerBlock(bottleneck_width, heads) for _ in range(transformer_depth)]
        if attention:
            layers.append(ChannelAttention(bottleneck_width))
        self.bottleneck = nn.Sequential(*layers)
        self.decoder = nn.ModuleList()
        channels = bottleneck_width
        for width in reversed(widths):
            self.decoder.append(DecoderStage(channels, width, width, attention))
            channels = width
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.head(x)


def hctnet(widths: tuple[int, ...] = (64, 128, 256), num_classes: int = 3, transformer_depth: int = 2, heads: int = 8) -> EncoderDecoder:
    """HCT-Net as in the paper: 64/128/256 filters, transformer over the 1/8 map, attention decoder."""
    return EncoderDecoder(widths, num_classes, transformer_depth, heads, attention=True)


def hctnet_s(num_classes: int = 3) -> EncoderDecoder:
    """HCT-Net at a quarter of the width: trains in minutes on 2 CPU cores and runs on a Jetson Nano."""
    return EncoderDecoder((16, 32, 64), num_classes, transformer_depth=1, heads=4, attention=True)


def unet_s(num_classes: int = 3) -> EncoderDecoder:
    """Plain U-Net baseline of similar size to hctnet_s: no transformer, no attention."""
    return EncoderDecoder((16, 32, 64), num_classes, transformer_depth=0, heads=1, attention=False)
