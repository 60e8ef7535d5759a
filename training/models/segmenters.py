"""Whole-field segmenters: label map background / cytoplasm / nucleus.

HCT-Net: a CNN encoder, a transformer over the deepest feature map for context across the field,
and a decoder that fuses the CNN skips with that context through channel + spatial attention.
UNet is the plain-CNN baseline of similar size ("CNN (base)").

hctnet_lite (the shipped segmenter) runs the same network behind a stride-2 stem, at half the input
resolution, and restores full-resolution edges with one convolution over the upsampled features and
the input image: a third of the compute of hctnet_s, which matters on 2 CPU cores and on a Jetson.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ChannelAttention, ConvBNReLU, DoubleConv, SpatialAttention, TransformerBlock


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
    half_resolution: a stride-2 stem first, and a full-resolution refinement (upsampled decoder output +
    the input image, refine_channels wide) before the head.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        num_classes: int,
        transformer_depth: int,
        heads: int,
        attention: bool,
        half_resolution: bool = False,
        refine_channels: int = 16,
    ):
        super().__init__()
        self.half_resolution = half_resolution
        channels = 3
        if half_resolution:
            self.stem = ConvBNReLU(3, widths[0], stride=2)
            channels = widths[0]
        self.encoder = nn.ModuleList()
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
        if half_resolution:
            self.refine = ConvBNReLU(channels + 3, refine_channels)
            channels = refine_channels
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image) if self.half_resolution else image
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        if self.half_resolution:
            x = F.interpolate(x, size=image.shape[2:], mode="bilinear", align_corners=False)
            x = self.refine(torch.cat([x, image], dim=1))
        return self.head(x)


def hctnet(widths: tuple[int, ...] = (64, 128, 256), num_classes: int = 3, transformer_depth: int = 2, heads: int = 8) -> EncoderDecoder:
    """HCT-Net as in the paper: 64/128/256 filters, transformer over the 1/8 map, attention decoder."""
    return EncoderDecoder(widths, num_classes, transformer_depth, heads, attention=True)


def hctnet_s(num_classes: int = 3) -> EncoderDecoder:
    """HCT-Net at a quarter of the width: trains in minutes on 2 CPU cores and runs on a Jetson Nano."""
    return EncoderDecoder((16, 32, 64), num_classes, transformer_depth=1, heads=4, attention=True)


def hctnet_lite(num_classes: int = 3) -> EncoderDecoder:
    """hctnet_s at half resolution with a full-resolution edge refinement: the shipped segmenter."""
    return EncoderDecoder((16, 32, 64), num_classes, transformer_depth=1, heads=4, attention=True, half_resolution=True)


def unet_s(num_classes: int = 3) -> EncoderDecoder:
    """Plain U-Net baseline of similar size to hctnet_s: no transformer, no attention."""
    return EncoderDecoder((16, 32, 64), num_classes, transformer_depth=0, heads=1, attention=False)


def unet_lite(num_classes: int = 3) -> EncoderDecoder:
    """Plain U-Net baseline paired with hctnet_lite: the same half-resolution body and refinement, no transformer, no attention."""
    return EncoderDecoder((16, 32, 64), num_classes, transformer_depth=0, heads=1, attention=False, half_resolution=True)
