"""Model registry: every model is built by name, e.g. create_model("hctnet_s")."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .classifiers import custom_cnn, dual_branch, gate_cnn, resnet_s, vgg_hybrid, vgg_hybrid_plain, vgg_hybrid_slim, vgg_hybrid_slim16
from .ensemble import ProbabilityMean
from .mobile import mobile_cnn, mobile_unet, mobile_unet_field, mobile_unet_field_dense, mobile_unet_field_fine, mobile_unet_xs
from .segmenters import hctnet, hctnet_lite, hctnet_s, unet_lite, unet_s

SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    "hctnet": hctnet,
    "hctnet_s": hctnet_s,
    "hctnet_lite": hctnet_lite,
    "unet_s": unet_s,
    "unet_lite": unet_lite,
    "mobile_unet": mobile_unet,
    "mobile_unet_xs": mobile_unet_xs,
    "mobile_unet_field": mobile_unet_field,
    "mobile_unet_field_dense": mobile_unet_field_dense,
    "mobile_unet_field_fine": mobile_unet_field_fine,
}
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "custom_cnn": custom_cnn,
    "gate_cnn": gate_cnn,
    "vgg_hybrid": vgg_hybrid,
    "vgg_hybrid_slim": vgg_hybrid_slim,
    "vgg_hybrid_slim16": vgg_hybrid_slim16,
    "vgg_hybrid_plain": vgg_hybrid_plain,
    "resnet_s": resnet_s,
    "dual_branch": dual_branch,
    "mobile_cnn": mobile_cnn,
}


def probability_mean(members: list[dict[str, Any]]) -> ProbabilityMean:
    """An ensemble of segmenters, each {"model": name, "model_kwargs": {...}} (training/models/ensemble.py);
    its weights are its members' trained ones, joined by training.train.save_ensemble_checkpoint."""
    unknown = [member["model"] for member in members if member["model"] not in SEGMENTERS]
    if unknown:
        raise ValueError(f"ensemble members must be segmenters ({', '.join(sorted(SEGMENTERS))}); got {', '.join(unknown)}")
    return ProbabilityMean([SEGMENTERS[member["model"]](**member.get("model_kwargs", {})) for member in members])


ENSEMBLES: dict[str, Callable[..., nn.Module]] = {"probability_mean": probability_mean}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered segmenter, classifier or ensemble by name."""
    registry = {**SEGMENTERS, **CLASSIFIERS, **ENSEMBLES}
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(registry))}")
    return registry[name](**kwargs)
