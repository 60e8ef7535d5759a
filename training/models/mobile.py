"""MobileNet-style encoder-decoders: the light per-cell refiner and a light field segmenter.

The refiner runs once per found cell, so its cost is paid per cell: hctnet_lite at 128x128 costs
409 MFLOPs a crop, 80-85 % of a crowded frame's time on 2 CPU cores (docs/performance.md). A cell crop
needs no attention over its pixels (the whole cell is in view of a few strided convolutions), so this
family keeps the encoder-decoder shape and the full-resolution edge refinement of hctnet_lite and builds
them from MobileNetV2 inverted-residual blocks and depthwise-separable convolutions with few channels.
Every op is a conv, batch norm, ReLU, add, concat or bilinear resize: what ONNX Runtime's CPU kernels and
TensorRT fuse best, and what INT8 calibration handles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ChannelAttention, ConvBNReLU, DepthwiseSeparableConv, InvertedResidual
from .classifiers import MultiHeadClassifier


class MobileDecoderStage(nn.Module):
    """Upsample to the skip's size, concatenate it, one depthwise-separable conv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv = DepthwiseSeparableConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class MobileEncoderDecoder(nn.Module):
    """A stride-2 stem, one stage of inverted residuals per further width (each halving the map),
    a decoder of depthwise-separable convs back to half resolution, and a full-resolution refinement
    over the upsampled features and the input image (hctnet_lite's, depthwise-separable here).

    Returns logits N x num_classes x H x W at the input resolution.
    depths: inverted-residual blocks per encoder stage after the stem (len(widths) - 1 of them).
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        num_classes: int = 3,
        expansion: int = 4,
        refine_channels: int = 8,
        dense_refine: bool = False,
        half_resolution_blocks: int = 0,
    ):
        super().__init__()
        if len(depths) != len(widths) - 1:
            raise ValueError(f"one depth per encoder stage after the stem: {len(widths) - 1} for widths {widths}; got {depths}")
        self.stem = ConvBNReLU(3, widths[0], stride=2)
        # Inverted residuals at the stem's resolution (MobileNetV2's first stage): the half-resolution skip the last
        # decoder stage reads is then more than one conv of the pixels.
        self.half_resolution = nn.Sequential(*[InvertedResidual(widths[0], widths[0], expansion=expansion) for _ in range(half_resolution_blocks)])
        self.encoder = nn.ModuleList()
        channels = widths[0]
        for width, depth in zip(widths[1:], depths):
            blocks = [InvertedResidual(channels, width, stride=2, expansion=expansion)]
            blocks += [InvertedResidual(width, width, expansion=expansion) for _ in range(depth - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            channels = width
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.decoder.append(MobileDecoderStage(channels, width, width))
            channels = width
        # dense_refine: a dense 3x3 conv at full resolution (hctnet_lite's) instead of a depthwise-separable one. Where
        # cells are ~17 pixels across (Taleqani at the segmenter's input) one pixel at the edge is a fifth of the cell's
        # area; the separable end drew them too wide (docs/performance.md, "A lighter field segmenter").
        refine = ConvBNReLU if dense_refine else DepthwiseSeparableConv
        self.refine = refine(channels + 3, refine_channels)
        self.head = nn.Conv2d(refine_channels, num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.half_resolution(self.stem(image))
        skips = [x]
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for stage, skip in zip(self.decoder, reversed(skips[:-1])):
            x = stage(x, skip)
        x = F.interpolate(x, size=image.shape[2:], mode="bilinear", align_corners=False)
        return self.head(self.refine(torch.cat([x, image], dim=1)))


def mobile_unet(num_classes: int = 3) -> MobileEncoderDecoder:
    """The light refiner: 16/24/32/48 channels down to 1/16 of the crop, two blocks in the deeper stages."""
    return MobileEncoderDecoder((16, 24, 32, 48), (1, 2, 2), num_classes)


def mobile_unet_xs(num_classes: int = 3) -> MobileEncoderDecoder:
    """mobile_unet at two thirds of the width, one block a stage: for the smallest crops and devices."""
    return MobileEncoderDecoder((8, 16, 24, 32), (1, 1, 1), num_classes, expansion=3)


def mobile_unet_field(num_classes: int = 3) -> MobileEncoderDecoder:
    """A light field segmenter: mobile_unet one stage deeper (down to 1/32 of the field, a 6x8 map at the
    192x256 segmenter input) and wider at depth (64, 96 channels), for context across a whole field and
    the sources' variety that hctnet_lite's transformer gave; about a sixth of hctnet_lite's FLOPs
    (docs/performance.md, "A lighter field segmenter")."""
    return MobileEncoderDecoder((16, 24, 32, 64, 96), (1, 2, 3, 2), num_classes)


def mobile_unet_field_dense(num_classes: int = 3) -> MobileEncoderDecoder:
    """mobile_unet_field with hctnet_lite's full-resolution end: a dense 3x3 conv to 16 channels instead of a
    depthwise-separable one to 8, for cell edges to the pixel on small cells (0.46 GFLOPs, 0.37 of hctnet_lite's)."""
    return MobileEncoderDecoder((16, 24, 32, 64, 96), (1, 2, 3, 2), num_classes, refine_channels=16, dense_refine=True)


def mobile_unet_field_fine(num_classes: int = 3) -> MobileEncoderDecoder:
    """mobile_unet_field_dense with one inverted-residual block at half resolution, for fine detail at the skip the
    last decoder stage reads (0.52 GFLOPs)."""
    return MobileEncoderDecoder((16, 24, 32, 64, 96), (1, 2, 3, 2), num_classes, refine_channels=16, dense_refine=True, half_resolution_blocks=1)


class MobileClassifierTrunk(nn.Sequential):
    """A stride-2 stem, MobileNetV2 inverted-residual stages (the first block of each after the first halves
    the map), a 1x1 conv widening the last map, CBAM's channel attention over it, and a global pool.

    stages: (width, blocks) per stage; the first stage keeps the stem's resolution.
    """

    def __init__(self, stem: int, stages: tuple[tuple[int, int], ...], head_width: int, expansion: int):
        layers: list[nn.Module] = [ConvBNReLU(3, stem, stride=2)]
        channels = stem
        for index, (width, blocks) in enumerate(stages):
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(InvertedResidual(channels, width, stride=stride, expansion=expansion))
                channels = width
        layers += [ConvBNReLU(channels, head_width, kernel_size=1), ChannelAttention(head_width), nn.AdaptiveAvgPool2d(1)]
        super().__init__(*layers)
        self.out_channels = head_width


def mobile_cnn(head_classes: dict[str, int], dropout: float = 0.3, expansion: int = 4) -> MultiHeadClassifier:
    """The light cell classifier: vgg_hybrid's three heads and dense layer on a MobileNetV2-style trunk,
    64x64 crop down to 4x4 (16/24/32/64/96 channels), about a fifth of vgg_hybrid's FLOPs. The same crop as
    the light refiner (size and margin), so the two share each cell's crop at run time."""
    trunk = MobileClassifierTrunk(16, ((16, 1), (24, 2), (32, 2), (64, 2), (96, 1)), head_width=192, expansion=expansion)
    return MultiHeadClassifier(trunk, trunk.out_channels, head_classes, dense=(128,), dropout=dropout)
