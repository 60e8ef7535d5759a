"""Cell classifiers: one shared trunk, one softmax head per task (blast vs normal, B-ALL subtype, WBC type)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNReLU


class MultiHeadClassifier(nn.Module):
    """A feature trunk followed by dense layers and one linear head per task.

    forward returns {head name: logits N x classes}.
    """

    def __init__(self, trunk: nn.Module, trunk_features: int, head_classes: dict[str, int], dense: tuple[int, ...], dropout: float):
        super().__init__()
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
