"""Model registry: every model is built by name, e.g. create_model("hctnet_s")."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .classifiers import custom_cnn, dual_branch, resnet_s, vgg_hybrid
from .segmenters import hctnet, hctnet_lite, hctnet_s, unet_lite, unet_s

SEGMENTERS: dict[str, Callable[..., nn.Module]] = {"hctnet": hctnet, "hctnet_s": hctnet_s, "hctnet_lite": hctnet_lite, "unet_s": unet_s, "unet_lite": unet_lite}
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "custom_cnn": custom_cnn,
    "vgg_hybrid": vgg_hybrid,
    "resnet_s": resnet_s,
    "dual_branch": dual_branch,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered segmenter or classifier by name."""
    registry = {**SEGMENTERS, **CLASSIFIERS}
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(registry))}")
    return registry[name](**kwargs)
