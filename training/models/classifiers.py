"""Cell classifiers: one shared trunk, one softmax head per task (blast vs normal, B-ALL subtype, WBC type).

Every model takes Nx3x64x64 cell crops (training/pipeline.py CLASSIFIER_INPUT, cut by prepare_crops),
except dual_branch, which takes Nx6x64x64: the cell crop in channels 0-2 and the crop around the cell's
nucleus in channels 3-5, so that it stays a model with one input (one ONNX input, "crop").
The heads are whatever head_classes names, e.g. an ALL/AML/CLL/normal head; nothing is claimed for
classes without data here.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import BasicBlock, ConvBNReLU, ResidualAttentionBlock


class MultiHeadClassifier(nn.Module):
    """A feature trunk followed by dense layers and one linear head per task.

    forward returns {head name: logits N x classes}. input_channels: 3 (a cell crop) or 6 (dual_branch).
    """

    def __init__(
        self, trunk: nn.Module, trunk_features: int, head_classes: dict[str, int], dense: tuple[int, ...], dropout: float, input_channels: int = 3
    ):
        super().__init__()
        self.input_channels = input_channels
        self.trunk = trunk
        layers: list[nn.Module] = [nn.Flatten()]
        features = trunk_features
        for width in dense:
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            features = width
        self.dense = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(features, count) for name, count in head_classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dense(self.trunk(x))
        return {name: head(features) for name, head in self.heads.items()}


def custom_cnn(head_classes: dict[str, int], dropout: float = 0.3) -> MultiHeadClassifier:
    """The paper's small CNN (conv 32, pool, conv 64, pool, dense 196, dense 96, softmax), with one more
    conv stage and a 4x4 average pool so the dense layers stay small at 64x64 input."""
    trunk = nn.Sequential(
        ConvBNReLU(3, 32), nn.MaxPool2d(2),
        ConvBNReLU(32, 64), nn.MaxPool2d(2),
        ConvBNReLU(64, 128), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
    )
    return MultiHeadClassifier(trunk, 128 * 4 * 4, head_classes, dense=(196, 96), dropout=dropout)


def gate_cnn(head_classes: dict[str, int], dropout: float = 0.2) -> MultiHeadClassifier:
    """custom_cnn at half the resolution and half the width: the cell-or-not gate (training/gate.py)
    decides on shape and colour, not on chromatin texture, and runs on every proposal of every frame."""
    trunk = nn.Sequential(
        nn.AvgPool2d(2),
        ConvBNReLU(3, 16), nn.MaxPool2d(2),
        ConvBNReLU(16, 32), nn.MaxPool2d(2),
        ConvBNReLU(32, 64), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
    )
    return MultiHeadClassifier(trunk, 64 * 4 * 4, head_classes, dense=(96,), dropout=dropout)


def vgg_hybrid(
    head_classes: dict[str, int], dropout: float = 0.3, widths: tuple[int, ...] = (32, 64, 96), stem: int = 16, attention: bool = True
) -> MultiHeadClassifier:
    """VGG-style stages (3x3 convs, max-pool) with residual skips and CBAM channel + spatial attention (attention=False:
    without it). A single `stem`-wide conv (16) at full resolution keeps the cost near custom_cnn's at 64x64."""
    layers: list[nn.Module] = [ConvBNReLU(3, stem), nn.MaxPool2d(2)]
    channels = stem
    for width in widths:
        layers += [ResidualAttentionBlock(channels, width, attention), nn.MaxPool2d(2)]
        channels = width
    trunk = nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool2d(1))  # the last stage's 8x8 map is pooled whole
    return MultiHeadClassifier(trunk, channels, head_classes, dense=(128,), dropout=dropout)


def vgg_hybrid_slim(head_classes: dict[str, int], dropout: float = 0.3) -> MultiHeadClassifier:
    """vgg_hybrid at three quarters of its width (stem 12, stages 24/48/72), about 0.57x its FLOPs: the shape
    scripts/prune_classifier.py cuts the shipped vgg_hybrid to (structured channel pruning), to be distilled."""
    return vgg_hybrid(head_classes, dropout=dropout, widths=(24, 48, 72), stem=12)


def vgg_hybrid_slim16(head_classes: dict[str, int], dropout: float = 0.3) -> MultiHeadClassifier:
    """vgg_hybrid cut to stages whose widths are multiples of 16 (stem 8, stages 16/48/80), about 0.45x its FLOPs:
    ONNX Runtime's CPU convolutions work on blocks of 16 channels (NCHWc, AVX-512), so vgg_hybrid_slim's
    12/24/72 channels cost about what 16/32/80 would (0.57x the FLOPs, 0.87x the time). The stem stays narrower
    than the first stage, so that stage keeps its projection shortcut (scripts/prune_classifier.py cuts one into it)."""
    return vgg_hybrid(head_classes, dropout=dropout, widths=(16, 48, 80), stem=8)


def vgg_hybrid_plain(head_classes: dict[str, int], dropout: float = 0.3) -> MultiHeadClassifier:
    """vgg_hybrid without its CBAM attention, the same convolutions: on ONNX Runtime's CPU the attention's pooling over
    channels and positions and its reweighting leave the blocked (NCHWc) layout at every block, about a quarter of the
    network's time for 1 % of its FLOPs (scripts/runtime_parts_speed.py) (docs/performance.md, "The classifier without its attention"). Its weights
    start from a vgg_hybrid's (scripts/prune_classifier.py --model vgg_hybrid_plain), to be distilled."""
    return vgg_hybrid(head_classes, dropout=dropout, attention=False)


def resnet_s(head_classes: dict[str, int], dropout: float = 0.3, widths: tuple[int, ...] = (20, 40, 80), blocks: int = 2) -> MultiHeadClassifier:
    """A small ResNet: a stride-2 stem, three stages of basic blocks (each after the first halves the map);
    the default widths give custom_cnn's FLOPs at 64x64."""
    layers: list[nn.Module] = [ConvBNReLU(3, widths[0], stride=2)]
    channels = widths[0]
    for stage, width in enumerate(widths):
        for index in range(blocks):
            layers.append(BasicBlock(channels, width, stride=2 if stage > 0 and index == 0 else 1))
            channels = width
    trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
    return MultiHeadClassifier(trunk, channels, head_classes, dense=(128,), dropout=dropout)


class DualBranchTrunk(nn.Module):
    """Two trunks: one sees the whole cell (channels 0-2), the other the nucleus (channels 3-5);
    their pooled features are concatenated."""

    def __init__(self, width: int):
        super().__init__()
        self.cell = _branch(width)
        self.nucleus = _branch(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cell(x[:, :3]), self.nucleus(x[:, 3:])], dim=1)


def _branch(width: int) -> nn.Sequential:
    """custom_cnn's three conv stages, narrower, pooled to one feature vector."""
    return nn.Sequential(
        ConvBNReLU(3, width // 4), nn.MaxPool2d(2),
        ConvBNReLU(width // 4, width // 2), nn.MaxPool2d(2),
        ConvBNReLU(width // 2, width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def dual_branch(head_classes: dict[str, int], dropout: float = 0.3, width: int = 96) -> MultiHeadClassifier:
    """Whole-cell and nucleus-crop branches, features concatenated before the dense layer and heads.
    Input Nx6xHxW: cell crop channels 0-2, nucleus crop channels 3-5 (see the module docstring)."""
    return MultiHeadClassifier(DualBranchTrunk(width), 2 * width, head_classes, dense=(128,), dropout=dropout, input_channels=6)
