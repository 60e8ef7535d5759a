"""Peer segmenters for timing only: torchvision's LR-ASPP MobileNetV3-Large, written out in plain PyTorch.

Issue 24 asks for the field segmenter to be "ahead of LRASPP-MobileNetV3 at the same input size". torchvision
is not installable beside this project's torch build here (its wheels fail to load their C++ ops), and speed
depends on the architecture, not the weights, so the architecture is rebuilt layer for layer from torchvision's
source (torchvision/models/mobilenetv3.py with dilated=True, torchvision/models/segmentation/lraspp.py): the
same blocks, channels, kernels, strides, dilations, squeeze-excitation and head. With 21 classes it has
torchvision's documented 3,221,538 parameters (tests/training/test_peer_segmenters.py checks it).

    python scripts/segmenter_speed.py models/checkpoints/default-segmenter.pt lraspp_mobilenet_v3_large
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PEERS = ("lraspp_mobilenet_v3_large",)


def _divisible(channels: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of divisor, never below 90 % of the value."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1, activation: type[nn.Module] | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2 * dilation, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, eps=0.001, momentum=0.01),
    ]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeezed = _divisible(channels // 4)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))


class _InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, kernel: int, expanded: int, out_channels: int, squeeze: bool, hard_swish: bool, stride: int, dilation: int):
        super().__init__()
        activation = nn.Hardswish if hard_swish else nn.ReLU
        stride = 1 if dilation > 1 else stride  # torchvision: a dilated stage keeps its resolution
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(_conv_bn(in_channels, expanded, 1, activation=activation))
        layers.append(_conv_bn(expanded, expanded, kernel, stride, dilation, groups=expanded, activation=activation))
        if squeeze:
            layers.append(_SqueezeExcitation(expanded))
        layers.append(_conv_bn(expanded, out_channels, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


# (in, kernel, expanded, out, squeeze-excitation, hard-swish, stride, dilation): mobilenet_v3_large, dilated=True
_LARGE = (
    (16, 3, 16, 16, False, False, 1, 1),
    (16, 3, 64, 24, False, False, 2, 1),
    (24, 3, 72, 24, False, False, 1, 1),
    (24, 5, 72, 40, True, False, 2, 1),  # its output at stride 8 is the head's "low" input
    (40, 5, 120, 40, True, False, 1, 1),
    (40, 5, 120, 40, True, False, 1, 1),
    (40, 3, 240, 80, False, True, 2, 1),
    (80, 3, 200, 80, False, True, 1, 1),
    (80, 3, 184, 80, False, True, 1, 1),
    (80, 3, 184, 80, False, True, 1, 1),
    (80, 3, 480, 112, True, True, 1, 1),
    (112, 3, 672, 112, True, True, 1, 1),
    (112, 5, 672, 160, True, True, 2, 2),
    (160, 5, 960, 160, True, True, 1, 2),
    (160, 5, 960, 160, True, True, 1, 2),
)
_LOW_BLOCK = 4  # features[4] in torchvision's numbering (features[0] is the stem)


class LRASPPMobileNetV3Large(nn.Module):
    """LR-ASPP on a dilated MobileNetV3-Large (output stride 16): logits N x num_classes x H x W."""

    def __init__(self, num_classes: int = 3, inter_channels: int = 128):
        super().__init__()
        features: list[nn.Module] = [_conv_bn(3, 16, 3, stride=2, activation=nn.Hardswish)]
        features += [_InvertedResidual(*config) for config in _LARGE]
        features.append(_conv_bn(160, 960, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.cbr = nn.Sequential(nn.Conv2d(960, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels), nn.ReLU())
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(960, inter_channels, 1, bias=False), nn.Sigmoid())
        self.low_classifier = nn.Conv2d(40, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low = self.features[: _LOW_BLOCK + 1](image)
        high = self.features[_LOW_BLOCK + 1 :](low)
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.low_classifier(low) + self.high_classifier(x)
        return F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)


def create_peer(name: str, num_classes: int = 3) -> nn.Module:
    if name != "lraspp_mobilenet_v3_large":
        raise ValueError(f"unknown peer segmenter {name!r}; expected one of {', '.join(PEERS)}")
    return LRASPPMobileNetV3Large(num_classes)
