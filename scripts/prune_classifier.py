"""Structured channel pruning of a vgg_hybrid classifier into a narrower one (vgg_hybrid_slim by default), or into
vgg_hybrid_plain (its attention dropped, every other weight kept), to be fine-tuned by distillation from the original
(docs/performance.md, "A pruned classifier", "The classifier without its attention").

    python scripts/prune_classifier.py --checkpoint models/checkpoints/default-classifier.pt [--model vgg_hybrid_slim16] --out DIR/pruned.pt
    OMP_NUM_THREADS=1 python scripts/distill_classifier.py --data ../shared/data --model vgg_hybrid_slim \
        --teacher models/checkpoints/default-classifier.pt --init DIR/pruned.pt --steps N --ema-decay 0 --out DIR2/slim.pt

Each conv layer keeps the output channels whose batch norm has the largest |gamma| (a channel with a small gamma
contributes little after BN, whatever its filter). A ResidualAttentionBlock's output is the sum of its body
(conv, conv, channel attention, spatial attention) and its shortcut, so the body's second conv, the shortcut's
projection and the block's output share one choice of channels, ranked by the sum of the two BNs' |gamma|; the
body's first conv picks its own. The channel attention's MLP follows the kept channels on its input and output, and
keeps the hidden units with the largest L1 norm (in and out weights) up to the new width's max(channels // 4, 4);
the spatial attention (2 -> 1 channel) is kept whole. The dense layer's inputs follow the last block's channels;
the dense layer and the heads are kept whole. Written as save_checkpoint writes one (.pt state_dict, .json record),
so distill_classifier.py --init reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.training.models import create_model  # noqa: E402
from leukoedge.training.models.blocks import ChannelAttention, ConvBNReLU, ResidualAttentionBlock  # noqa: E402

SLIM_MODELS = ("vgg_hybrid_slim", "vgg_hybrid_slim16")  # vgg_hybrid at narrower widths (training/models/classifiers.py)
PLAIN_MODEL = "vgg_hybrid_plain"  # vgg_hybrid's widths without its CBAM attention: every other weight copied as it is


def without_attention(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copy a vgg_hybrid's weights into a vgg_hybrid_plain: every parameter and buffer but the attention's, unchanged."""
    own = target.state_dict()
    taken = {name: value for name, value in source.state_dict().items() if name in own}
    missing = sorted(set(own) - set(taken))
    if missing:
        raise ValueError(f"the target has weights the source lacks: {missing[:4]}")
    other_shapes = sorted(name for name, value in taken.items() if value.shape != own[name].shape)
    if other_shapes:
        raise ValueError(f"the source is another shape of vgg_hybrid (its widths differ): {other_shapes[:4]}")
    target.load_state_dict(taken)
    return target.eval()


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest scores, in their original order (keeping every channel keeps the order)."""
    if count > scores.numel():
        raise ValueError(f"cannot keep {count} channels of {scores.numel()}")
    return torch.sort(torch.topk(scores, count).indices).values


def _copy_conv(source: nn.Conv2d, target: nn.Conv2d, out_index: torch.Tensor, in_index: torch.Tensor) -> None:
    target.weight.copy_(source.weight[out_index][:, in_index])
    if source.bias is not None:
        target.bias.copy_(source.bias[out_index])


def _copy_bn(source: nn.BatchNorm2d, target: nn.BatchNorm2d, index: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(target, name).copy_(getattr(source, name)[index])
    target.num_batches_tracked.copy_(source.num_batches_tracked)


def _prune_attention(source: ChannelAttention, target: ChannelAttention, index: torch.Tensor) -> None:
    """Channels `index` in and out; the hidden units of the largest L1 norm (in + out weights) up to the target's width."""
    first, second = source.mlp[0], source.mlp[2]
    hidden = target.mlp[0].out_channels
    norm = first.weight[:, index].abs().sum(dim=(1, 2, 3)) + second.weight[index].abs().sum(dim=(0, 2, 3))
    kept = _top(norm, hidden)
    _copy_conv(first, target.mlp[0], kept, index)
    _copy_conv(second, target.mlp[2], index, kept)


def _prune_block(source: ResidualAttentionBlock, target: ResidualAttentionBlock, in_index: torch.Tensor) -> torch.Tensor:
    """Copy the kept weights of one block; returns the block's kept output channels."""
    conv1, bn1 = source.body[0][0], source.body[0][1]
    conv2, bn2 = source.body[1], source.body[2]
    width = target.body[1].out_channels
    first = _top(bn1.weight.abs(), target.body[0][0].out_channels)
    if isinstance(source.shortcut, nn.Identity):
        if not isinstance(target.shortcut, nn.Identity):
            raise ValueError("the source block has an identity shortcut, the target a projection")
        out = in_index  # the output channels are the input's: the same choice runs through
        if out.numel() != width:
            raise ValueError("an identity shortcut needs as many channels kept in as out")
    else:
        out = _top(bn2.weight.abs() + source.shortcut[1].weight.abs(), width)
    _copy_conv(conv1, target.body[0][0], first, in_index)
    _copy_bn(bn1, target.body[0][1], first)
    _copy_conv(conv2, target.body[1], out, first)
    _copy_bn(bn2, target.body[2], out)
    _prune_attention(source.body[3], target.body[3], out)
    target.body[4].load_state_dict(source.body[4].state_dict())  # spatial attention: 2 -> 1 channel, whole
    if not isinstance(source.shortcut, nn.Identity):
        _copy_conv(source.shortcut[0], target.shortcut[0], out, in_index)
        _copy_bn(source.shortcut[1], target.shortcut[1], out)
    return out


@torch.no_grad()
def prune_vgg_hybrid(source: nn.Module, target: nn.Module) -> nn.Module:
    """Fill `target` (a narrower vgg_hybrid with the same heads and dense widths) with `source`'s kept weights; returns target."""
    source_layers = [m for m in source.trunk if isinstance(m, (ConvBNReLU, ResidualAttentionBlock))]
    target_layers = [m for m in target.trunk if isinstance(m, (ConvBNReLU, ResidualAttentionBlock))]
    if len(source_layers) != len(target_layers) or not isinstance(source_layers[0], ConvBNReLU):
        raise ValueError("source and target must both be vgg_hybrid with as many stages")
    stem_source, stem_target = source_layers[0], target_layers[0]
    index = _top(stem_source[1].weight.abs(), stem_target[0].out_channels)
    _copy_conv(stem_source[0], stem_target[0], index, torch.arange(stem_source[0].in_channels))
    _copy_bn(stem_source[1], stem_target[1], index)
    for block_source, block_target in zip(source_layers[1:], target_layers[1:]):
        index = _prune_block(block_source, block_target, index)
    dense_source = [m for m in source.dense if isinstance(m, nn.Linear)]
    dense_target = [m for m in target.dense if isinstance(m, nn.Linear)]
    if [m.out_features for m in dense_source] != [m.out_features for m in dense_target]:
        raise ValueError("the dense layers must keep their widths")
    dense_target[0].weight.copy_(dense_source[0].weight[:, index])
    dense_target[0].bias.copy_(dense_source[0].bias)
    for layer_source, layer_target in zip(dense_source[1:], dense_target[1:]):
        layer_target.load_state_dict(layer_source.state_dict())
    if set(source.heads) != set(target.heads):
        raise ValueError("source and target must have the same heads")
    for name in source.heads:
        target.heads[name].load_state_dict(source.heads[name].state_dict())
    return target.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "models" / "checkpoints" / "default-classifier.pt", help="a vgg_hybrid checkpoint (default: %(default)s)")
    parser.add_argument(
        "--model", default="vgg_hybrid_slim", choices=(*SLIM_MODELS, PLAIN_MODEL),
        help="the narrower vgg_hybrid to cut to, or vgg_hybrid_plain: the same without its attention (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the pruned checkpoint to write (.pt; its .json beside it)")
    args = parser.parse_args()

    import json

    from leukoedge.training.flops import count_flops
    from leukoedge.training.pipeline import CLASSIFIER_INPUT
    from leukoedge.training.train import load_checkpoint, save_checkpoint

    record = json.loads(args.checkpoint.with_suffix(".json").read_text())
    if record["config"]["model"] != "vgg_hybrid" or record["config"].get("model_kwargs"):
        raise SystemExit(f"{args.checkpoint}: a vgg_hybrid with the default widths expected; got {record['config']['model']} {record['config'].get('model_kwargs')}")
    heads = record["heads"]
    source, _ = load_checkpoint(args.checkpoint, head_classes={name: len(classes) for name, classes in heads.items()})
    target = create_model(args.model, head_classes={name: len(classes) for name, classes in heads.items()})
    if args.model == PLAIN_MODEL:
        without_attention(source, target)
    else:
        prune_vgg_hybrid(source, target)
    shape = (1, 3, *CLASSIFIER_INPUT)
    config = {**record["config"], "model": args.model, "model_kwargs": {}, "steps": 0, "teacher": None, "init_from": None}
    summary = {
        "config": config,
        "heads": heads,
        "loss": record.get("loss", "ce"),
        "pretraining": record.get("pretraining"),
        "pruned_from": {
            "checkpoint": str(args.checkpoint),
            "best_val_score": record.get("best_val_score"),
            "rule": "every weight but the CBAM attention's, unchanged" if args.model == PLAIN_MODEL else (
                "per conv: the largest |BN gamma| channels; per residual block one output choice (body BN + shortcut BN |gamma|); channel-attention hidden units by L1 norm"
            ),
            "flops": {"source": count_flops(source, shape), "pruned": count_flops(target, shape)},
        },
    }
    save_checkpoint(target, summary, args.out)
    flops = summary["pruned_from"]["flops"]
    print(f"{args.model} pruned from {args.checkpoint}: {flops['source'] / 1e6:.2f} -> {flops['pruned'] / 1e6:.2f} MFLOPs; checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
