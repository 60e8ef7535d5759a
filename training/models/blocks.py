"""Small named building blocks shared by the segmenters and classifiers."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (stride 2 halves the map), batch norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two ConvBNReLU: the unit of every U-Net style encoder and decoder stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class ChannelAttention(nn.Module):
    """Which feature maps matter (CBAM channel branch): avg- and max-pooled descriptors through a shared MLP."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        average = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        maximum = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(average + maximum)


class SpatialAttention(nn.Module):
    """Where to look (CBAM spatial branch): a 7x7 conv over channel-mean and channel-max maps."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        descriptor = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(descriptor))


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder layer over the pixels of a feature map (multi-head attention + FFN,
    each with a residual). A depthwise conv adds position information, so any map size works."""

    def __init__(self, channels: int, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        self.position = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        x = x + self.position(x)
        tokens = x.flatten(2).transpose(1, 2)
        normed = self.norm1(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        tokens = tokens + self.ffn(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The residual shortcut: identity where the shape is kept, else a strided 1x1 conv + BN."""
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with a shortcut; stride 2 halves the map."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, out_channels, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResidualAttentionBlock(nn.Module):
    """A VGG stage (two 3x3 convs) with a residual skip, its output reweighted by CBAM channel then
    spatial attention before the skip is added (Woo et al. 2018's placement); attention=False: without CBAM."""

    def __init__(self, in_channels: int, out_channels: int, attention: bool = True):
        super().__init__()
        layers: list[nn.Module] = [
            ConvBNReLU(in_channels, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if attention:
            layers += [ChannelAttention(out_channels), SpatialAttention()]
        self.body = nn.Sequential(*layers)
        self.shortcut = _projection(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class DepthwiseSeparableConv(nn.Sequential):
    """A 3x3 depthwise conv then a 1x1 pointwise conv, each with BN + ReLU (MobileNetV1): a 3x3 conv's
    reach at about 1/9 of its multiply-adds once there are more than a few channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            ConvBNReLU(in_channels, out_channels, kernel_size=1),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise (stride 2 halves the map), linear 1x1 projection,
    with a residual where the shape is kept. ReLU rather than ReLU6: the same speed, and INT8 calibration
    (ORT static QDQ, TensorRT) then sees one activation everywhere."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, hidden, kernel_size=1),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = in_channels == out_channels and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)
