"""Train a cell classifier alone, on the cells a bundle's field segmenter finds, optionally distilled from another
classifier (docs/performance.md, "A lighter classifier").

    python scripts/distill_classifier.py --data ../shared/data --model mobile_cnn \
        --teacher models/checkpoints/default-classifier.pt --steps 2500 --out DIR/light-classifier.pt

`leukoedge train` with `--segmenter-steps 0 --refiner-steps 0` trains the classifier the same way, but first reads
every segmentation and refiner example and afterwards exports all three models and chooses the verdict threshold
(minutes on 2 cores); this runs only the classifier's part of the pipeline: the same cells
(`pipeline.load_cell_examples` with the bundle's segmenter checkpoint and stain reference), the same batches,
learning rate, moving average and source weights (`pipeline.run_pipeline`), plus the teacher. The checkpoint
(.pt and .json) goes to --out; `scripts/swap_classifier.py` puts it into a copy of a bundle.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.bundle import load_bundle  # noqa: E402
from leukoedge.preprocess.cpu import PreprocessSpec  # noqa: E402

CHECKPOINTS = REPO_ROOT / "models" / "checkpoints"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="stain reference and heads from here (default: %(default)s)")
    parser.add_argument("--segmenter", type=Path, default=CHECKPOINTS / "default-segmenter.pt", help="finds the cells (default: %(default)s)")
    parser.add_argument("--model", default="mobile_cnn", help="a registered classifier the runtime can feed (default: %(default)s)")
    parser.add_argument("--teacher", type=Path, default=None, help="a classifier checkpoint whose probabilities the model learns too")
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint of --model (fine-tuning)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of 64 cells (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak rate (default: the pipeline's, 3e-3 from scratch, 1e-3 from --init)")
    parser.add_argument("--seed", type=int, default=0, help="weights, batch order and augmentation (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the teacher's loss (default: %(default)s)")
    parser.add_argument("--label-weight", type=float, default=1.0, help="the labels' loss weight beside the teacher's; 0: the teacher's alone (default: %(default)s)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="moving average of the weights per step; 0: none (default: %(default)s)")
    parser.add_argument(
        "--classification-sources", default=None,
        help="comma-separated sources the classifier learns from (default: the pipeline's; leave a device out as `leukoedge train --classification-sources` does)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write (.pt; its .json beside it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from leukoedge.training.pipeline import (
        CLASSIFIER_INPUT,
        CROP_MARGIN,
        FINE_TUNE_LEARNING_RATE,
        NORMAL_CELL_WEIGHTS,
        PipelineConfig,
        check_runtime_classifier,
        load_cell_examples,
    )
    from leukoedge.training.train import TrainConfig, load_checkpoint, save_checkpoint, train_classifier

    check_runtime_classifier(args.model)
    manifest = load_bundle(args.bundle).manifest
    spec = PreprocessSpec.from_manifest(manifest["preprocess"])
    heads = {name: head["classes"] for name, head in manifest["classifier"]["heads"].items()}
    segmenter, _ = load_checkpoint(args.segmenter)
    sources = {} if args.classification_sources is None else {
        "classification_sources": tuple(source.strip() for source in args.classification_sources.split(",") if source.strip())
    }
    config = PipelineConfig(data_root=args.data, out_dir=args.out.parent, classifier_model=args.model, **sources)
    cell_train, train_counts = load_cell_examples(config, "train", segmenter, spec)
    cell_val, val_counts = load_cell_examples(config, "val", segmenter, spec)
    logging.info("cells: train %s, val %s", train_counts, val_counts)
    default_rate = 3e-3 if args.init is None else FINE_TUNE_LEARNING_RATE
    classifier, summary = train_classifier(
        cell_train,
        cell_val,
        heads,
        spec,
        TrainConfig(
            model=args.model,
            input_size=CLASSIFIER_INPUT,
            steps=args.steps,
            batch_size=64,
            learning_rate=args.learning_rate or default_rate,
            init_from=None if args.init is None else str(args.init),
            validate_every=100,
            seed=args.seed,
            ema_decay=args.ema_decay or None,
            source_weights=NORMAL_CELL_WEIGHTS,
            teacher=None if args.teacher is None else str(args.teacher),
            distill_temperature=args.temperature,
            label_weight=args.label_weight,
        ),
        CROP_MARGIN,
    )
    summary["cells"] = {"train": train_counts, "val": val_counts}
    summary["classification_sources"] = list(config.classification_sources)
    save_checkpoint(classifier, summary, args.out)
    print(f"{args.model}: best validation score {summary['best_val_score']:.4f}; checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
