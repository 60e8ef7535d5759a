"""A checkpoint of one segmenter architecture started from a trained checkpoint of a related one: every weight whose
name and shape match is copied (but those of the layers named fresh), the rest keep the fresh weights the seed gives. How mobile_unet_field_dense began
from a trained mobile_unet_field (docs/performance.md, "A lighter field segmenter"); train it on with
`leukoedge train --segmenter-model MODEL --segmenter-init OUT.pt`.

    python scripts/warm_start.py CHECKPOINT.pt MODEL OUT.pt [--fresh LAYER ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


def warm_start(checkpoint: Path, model: str, out: Path, fresh_layers: Sequence[str] = (), seed: int = 0) -> tuple[list[str], list[str]]:
    """Write OUT.pt and OUT.json (the source's record, its config naming `model`, and what was copied);
    returns the names of the weights copied and of those left fresh. fresh_layers: top-level layers left fresh
    even where the shapes match (a head trained on another layer's features)."""
    import torch

    from leukoedge.training.models import create_model
    from leukoedge.training.train import save_checkpoint

    source = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.manual_seed(seed)
    weights = create_model(model).state_dict()
    copied = [
        name
        for name, value in weights.items()
        if name in source and source[name].shape == value.shape and name.split(".")[0] not in fresh_layers
    ]
    fresh = [name for name in weights if name not in copied]
    if not copied:
        raise ValueError(f"{checkpoint} shares no weight of matching name and shape with {model}")
    for name in copied:
        weights[name] = source[name]
    started = create_model(model)
    started.load_state_dict(weights)
    record = json.loads(checkpoint.with_suffix(".json").read_text())
    record["config"] = {**record["config"], "model": model}
    record["warm_start"] = {"from": str(checkpoint), "seed": seed, "copied": len(copied), "fresh": fresh, "fresh_layers": list(fresh_layers)}
    save_checkpoint(started.eval(), record, out)
    return copied, fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the trained checkpoint (.pt with its .json)")
    parser.add_argument("model", help="the registered segmenter to start (e.g. mobile_unet_field_dense)")
    parser.add_argument("out", type=Path, help="the new checkpoint (.pt; its .json is written beside it)")
    parser.add_argument("--fresh", nargs="*", default=[], metavar="LAYER", help="top-level layers left fresh even where shapes match (e.g. refine head)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights left fresh (default: %(default)s)")
    args = parser.parse_args()
    copied, fresh = warm_start(args.checkpoint, args.model, args.out, args.fresh, args.seed)
    print(f"{args.out}: {len(copied)} weights copied from {args.checkpoint}, {len(fresh)} fresh: {', '.join(fresh)}")


if __name__ == "__main__":
    main()
