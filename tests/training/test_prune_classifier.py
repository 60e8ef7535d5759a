"""scripts/prune_classifier.py: structured channel pruning of vgg_hybrid into a narrower vgg_hybrid (vgg_hybrid_slim)."""

from __future__ import annotations


import pytest

torch = pytest.importorskip("torch", reason="the classifiers need the training extra (torch)")

from leukoedge.training.flops import count_flops  # noqa: E402
from leukoedge.training.models import create_model  # noqa: E402
from leukoedge.training.pipeline import CLASSIFIER_INPUT, HEADS, RUNTIME_CLASSIFIERS  # noqa: E402

HEAD_CLASSES = {name: len(classes) for name, classes in HEADS.items()}


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random batch-norm statistics and affine parameters too (fresh ones are all 1 and 0: no order to get wrong)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                count = module.num_features
                module.weight.copy_(torch.rand(count, generator=generator) * 1.5 + 0.1)
                module.bias.copy_(torch.randn(count, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model.eval()


def test_slim_is_a_runtime_classifier_and_the_default_vgg_hybrid_is_unchanged() -> None:
    assert {"vgg_hybrid_slim", "vgg_hybrid_slim16"} <= set(RUNTIME_CLASSIFIERS)
    torch.manual_seed(0)
    default = create_model("vgg_hybrid", head_classes=HEAD_CLASSES)
    torch.manual_seed(0)
    explicit = create_model("vgg_hybrid", head_classes=HEAD_CLASSES, widths=(32, 64, 96), stem=16)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert default.trunk[0][0].out_channels == 16
    full = count_flops(default, (1, 3, *CLASSIFIER_INPUT))
    assert 0.5 < count_flops(create_model("vgg_hybrid_slim", head_classes=HEAD_CLASSES), (1, 3, *CLASSIFIER_INPUT)) / full < 0.65
    assert 0.4 < count_flops(create_model("vgg_hybrid_slim16", head_classes=HEAD_CLASSES), (1, 3, *CLASSIFIER_INPUT)) / full < 0.5


def test_keeping_every_channel_gives_the_same_outputs(script) -> None:
    prune = script("prune_classifier")
    torch.manual_seed(1)
    source = _randomised(create_model("vgg_hybrid", head_classes=HEAD_CLASSES, widths=(8, 12, 16), stem=6))
    target = prune.prune_vgg_hybrid(source, create_model("vgg_hybrid", head_classes=HEAD_CLASSES, widths=(8, 12, 16), stem=6))
    x = torch.randn(4, 3, *CLASSIFIER_INPUT)
    with torch.no_grad():
        expected, got = source(x), target(x)
    for head in HEADS:
        torch.testing.assert_close(got[head], expected[head], rtol=0, atol=0)


def test_dropping_dead_stem_channels_changes_nothing(script) -> None:
    """Stem channels with gamma = beta = 0 output zeros: cutting them must leave every output as it was, which
    holds only if each block's first conv and shortcut take the right input channels."""
    prune = script("prune_classifier")
    torch.manual_seed(2)
    source = _randomised(create_model("vgg_hybrid", head_classes=HEAD_CLASSES, widths=(8, 12, 16), stem=6))
    dead = torch.tensor([1, 4])
    with torch.no_grad():
        source.trunk[0][1].weight[dead] = 0.0
        source.trunk[0][1].bias[dead] = 0.0
    target = prune.prune_vgg_hybrid(source, create_model("vgg_hybrid", head_classes=HEAD_CLASSES, widths=(8, 12, 16), stem=4))
    x = torch.randn(4, 3, *CLASSIFIER_INPUT)
    with torch.no_grad():
        expected, got = source(x), target(x)
    for head in HEADS:
        torch.testing.assert_close(got[head], expected[head], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, stem, last", [("vgg_hybrid_slim", 12, 72), ("vgg_hybrid_slim16", 8, 80)])
def test_pruning_to_a_slim_shape_keeps_the_largest_gamma_channels(script, name: str, stem: int, last: int) -> None:
    prune = script("prune_classifier")
    torch.manual_seed(3)
    source = _randomised(create_model("vgg_hybrid", head_classes=HEAD_CLASSES))
    target = prune.prune_vgg_hybrid(source, create_model(name, head_classes=HEAD_CLASSES))
    reference = create_model(name, head_classes=HEAD_CLASSES).state_dict()
    assert {k: tuple(v.shape) for k, v in target.state_dict().items()} == {k: tuple(v.shape) for k, v in reference.items()}
    gamma = source.trunk[0][1].weight.abs()
    kept = torch.sort(torch.topk(gamma, stem).indices).values
    torch.testing.assert_close(target.trunk[0][1].weight, source.trunk[0][1].weight[kept])
    torch.testing.assert_close(target.trunk[0][0].weight, source.trunk[0][0].weight[kept])
    # The last block's output channels: one choice for body, shortcut and the dense layer's inputs.
    block = source.trunk[6]
    out = torch.sort(torch.topk(block.body[2].weight.abs() + block.shortcut[1].weight.abs(), last).indices).values
    torch.testing.assert_close(target.trunk[6].shortcut[1].weight, block.shortcut[1].weight[out])
    torch.testing.assert_close(target.trunk[6].body[2].weight, block.body[2].weight[out])
    torch.testing.assert_close(target.dense[1].weight, source.dense[1].weight[:, out])
    with torch.no_grad():
        outputs = target(torch.randn(2, 3, *CLASSIFIER_INPUT))
    assert {h: tuple(v.shape) for h, v in outputs.items()} == {h: (2, n) for h, n in HEAD_CLASSES.items()}


def test_the_plain_copy_is_the_vgg_hybrid_with_its_attention_replaced_by_identity(script) -> None:
    """vgg_hybrid_plain from a vgg_hybrid: every weight but the attention's copied, so it computes what the source
    computes with each CBAM reweighting taken out."""
    prune = script("prune_classifier")
    assert "vgg_hybrid_plain" in RUNTIME_CLASSIFIERS
    torch.manual_seed(2)
    source = _randomised(create_model("vgg_hybrid", head_classes=HEAD_CLASSES))
    plain = prune.without_attention(source, create_model("vgg_hybrid_plain", head_classes=HEAD_CLASSES))
    from leukoedge.training.models.blocks import ChannelAttention, SpatialAttention

    assert not any(isinstance(module, (ChannelAttention, SpatialAttention)) for module in plain.modules())
    for block in source.trunk:  # the source's attention made an identity: then both must agree exactly
        if hasattr(block, "body"):
            block.body = torch.nn.Sequential(*[layer for layer in block.body if not isinstance(layer, (ChannelAttention, SpatialAttention))])
    x = torch.randn(4, 3, *CLASSIFIER_INPUT)
    with torch.no_grad():
        expected, got = source(x), plain(x)
    for head in HEADS:
        torch.testing.assert_close(got[head], expected[head], rtol=0, atol=0)
    with pytest.raises(ValueError, match="widths differ"):
        prune.without_attention(create_model("vgg_hybrid_slim", head_classes=HEAD_CLASSES), create_model("vgg_hybrid_plain", head_classes=HEAD_CLASSES))
