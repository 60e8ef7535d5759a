"""The training-side commands of `leukoedge`: calibrate, evaluate, train, ensemble, study, pretrain, gate.

leukoedge/cli.py registers them with add_training_commands; each imports PyTorch (the [train] extra)
only when it runs, so the runtime's command line loads without it and says what to install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leukoedge.adapt import DEFAULT_ADAPTED_MODELS, DEFAULT_DEVICE_SHARE
from leukoedge.cli import model_names, non_negative_int, positive_int, removed_if_left_empty, require_data_folder, require_out_folder, share
from leukoedge.errors import LeukoedgeError
from leukoedge.shipped import MODELS_DIR, default_bundle

# The comparison models shipped for the report (made by the commands in docs/training.md), used by
# `leukoedge evaluate` unless other ones are named.
SHIPPED_BASELINE = ("CNN (base)", MODELS_DIR / "checkpoints" / "unet-lite-segmenter.pt")
# Bundles trained without some sources: the segmenter without Taleqani and BCCD; the classifier without ALL-IDB2.
SHIPPED_CROSS_SOURCE = (MODELS_DIR / "cross-source", MODELS_DIR / "cross-source-classifier")


def k_fold_count(text: str) -> int:
    """argparse type of --folds: k-fold needs at least 2 folds, one to test on and one to train on."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 2, got {text}")
    return value


def command_calibrate(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    if args.out is not None:
        require_out_folder(args.out)
    from leukoedge.calibration.calibrate import CalibrateConfig, calibrate_bundle, parse_keep_float
    from leukoedge.calibration.quantize import QuantizationSettings

    config = CalibrateConfig(
        args.data,
        args.bundle,
        args.out,
        fields=args.fields,
        cells=args.cells,
        gate_split=args.gate_split,
        gate_limit=args.gate_limit,
        dice_tolerance=args.max_dice_drop,
        accuracy_tolerance=args.max_accuracy_drop,
        benign_flag_tolerance=args.max_benign_flag_rise,
        keep_float=parse_keep_float(args.keep_float),
        settings=QuantizationSettings.for_target(args.target, args.method),
        threads=args.threads,
    )
    report = calibrate_bundle(config)
    print(report.format())
    print(f"bundle written to {report.bundle.root}")
    failures = report.failures()
    if failures:
        raise LeukoedgeError("\n".join(failures))
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    require_out_folder(args.out)
    from leukoedge.bundle import load_bundle
    from leukoedge.training.evaluate import evaluate_bundle, parse_segmenter_checkpoints, run_quick

    for bundle in [args.bundle, *(args.cross_source_bundle or ())]:  # before minutes of work, not after
        if bundle is not None:
            load_bundle(bundle, verify=False)

    checkpoints = parse_segmenter_checkpoints(args.segmenter_checkpoint)
    if args.quick:
        run_quick(args.data, args.out, args.bundle, checkpoints, args.cross_source_bundle or (), args.limit, args.split)
    else:
        label, baseline = SHIPPED_BASELINE
        if not args.segmenter_checkpoint and baseline.is_file():
            checkpoints = {label: baseline}
        cross_source = args.cross_source_bundle or [bundle for bundle in SHIPPED_CROSS_SOURCE if bundle.is_dir()]
        evaluate_bundle(args.bundle or default_bundle(), args.data, args.out, args.limit, checkpoints, cross_source, split=args.split)
    print((args.out / "evaluation.md").read_text())
    return 0


def parse_source_weights(text: str | None, option: str = "--segmenter-source-weights") -> dict[str, float]:
    """'wbc-seg-zheng=2,all-idb2=2' -> {source: weight}; errors name `option`."""
    weights = {}
    for item in (text or "").split(","):
        if item.strip():
            source, _, weight = item.partition("=")
            try:
                weights[source.strip()] = float(weight)
            except ValueError:
                raise LeukoedgeError(f"{option} takes SOURCE=WEIGHT,...; got {item!r}") from None
    return weights


def parse_box_jitter(text: str) -> tuple[float, float]:
    """'0.1,0.2' -> (0.1, 0.2): the centre shift's and log size change's standard deviations, shares of the box's side."""
    parts = text.split(",")
    try:
        shift, size = (float(part) for part in parts)
    except ValueError:
        raise LeukoedgeError(f"--classifier-box-jitter takes SHIFT,SIZE (e.g. 0.05,0.1); got {text!r}") from None
    if not (0.0 <= shift <= 0.5 and 0.0 <= size <= 0.5):
        raise LeukoedgeError(f"--classifier-box-jitter: each standard deviation must be 0..0.5 of the box's side; got {text!r}")
    return shift, size


def models_kept_without_checkpoint(args: argparse.Namespace) -> list[str]:
    """An error per --X-steps 0 without --X-init: 0 steps keeps that checkpoint, and without one the bundle would ship an untrained model."""
    return [
        f"--{model}-steps 0 keeps the {model} of --{model}-init, and none is given: add --{model}-init CHECKPOINT "
        f"(e.g. models/checkpoints/default-{model}.pt) or train it with --{model}-steps >= 1"
        for model in ("segmenter", "refiner", "classifier")
        if getattr(args, f"{model}_steps") == 0 and getattr(args, f"{model}_init") is None
    ]


def command_train(args: argparse.Namespace) -> int:
    kept_without_checkpoint = models_kept_without_checkpoint(args)
    if kept_without_checkpoint:
        print("\n".join(f"error: {problem}" for problem in kept_without_checkpoint), file=sys.stderr)
        return 2
    require_data_folder(args.data)
    require_out_folder(args.out)
    from leukoedge.training.models import SEGMENTERS
    from leukoedge.training.pipeline import CLASSIFICATION_SOURCES, SEGMENTATION_SOURCES, PipelineConfig, run_pipeline

    for model in (args.segmenter_model, args.refiner_model):
        if model is not None and model not in SEGMENTERS:
            print(f"error: unknown segmenter {model!r}; choose one of {', '.join(sorted(SEGMENTERS))}", file=sys.stderr)
            return 2
    sources = SEGMENTATION_SOURCES if args.segmentation_sources is None else tuple(s.strip() for s in args.segmentation_sources.split(",") if s.strip())
    refiner_sources = None if args.refiner_sources is None else tuple(s.strip() for s in args.refiner_sources.split(",") if s.strip())
    classification_sources = CLASSIFICATION_SOURCES if args.classification_sources is None else tuple(
        s.strip() for s in args.classification_sources.split(",") if s.strip()
    )
    try:
        config = PipelineConfig(
            args.data,
            args.out,
            quick=args.quick,
            segmenter_steps=args.segmenter_steps,
            classifier_steps=args.classifier_steps,
            segmenter_learning_rate=args.segmenter_lr,
            segmenter_crop=args.segmenter_crop or None,
            segmenter_model=args.segmenter_model,
            refiner_model=args.refiner_model,
            refiner_input_size=args.refiner_input_size,
            classifier_model=args.classifier_model or PipelineConfig.classifier_model,
            segmenter_init=args.segmenter_init,
            segmenter_source_weights=parse_source_weights(args.segmenter_source_weights),
            classifier_init=args.classifier_init,
            refiner_steps=args.refiner_steps,
            refiner_learning_rate=args.refiner_lr,
            refiner_source_weights=parse_source_weights(args.refiner_source_weights, "--refiner-source-weights"),
            refiner_init=args.refiner_init,
            refiner_teacher=args.refiner_teacher,
            segmenter_teacher=args.segmenter_teacher,
            segmentation_sources=sources,
            refiner_sources=refiner_sources,
            classification_sources=classification_sources,
            classifier_seed=args.classifier_seed,
            classifier_ema_decay=PipelineConfig.classifier_ema_decay if args.classifier_ema_decay is None else args.classifier_ema_decay or None,
            classifier_device_augment=PipelineConfig.classifier_device_augment if args.classifier_device_augment is None else args.classifier_device_augment,
            classifier_chroma_augment=PipelineConfig.classifier_chroma_augment if args.classifier_chroma_augment is None else args.classifier_chroma_augment,
            classifier_resolution_augment=(
                PipelineConfig.classifier_resolution_augment if args.classifier_resolution_augment is None else args.classifier_resolution_augment
            ),
            classifier_capture_augment=PipelineConfig.classifier_capture_augment if args.classifier_capture_augment is None else args.classifier_capture_augment,
            classifier_teacher=args.classifier_teacher,
            classifier_label_weight=args.classifier_label_weight,
            segmenter_device_augment=PipelineConfig.segmenter_device_augment if args.segmenter_device_augment is None else args.segmenter_device_augment,
            classifier_box_jitter=PipelineConfig.classifier_box_jitter if args.classifier_box_jitter is None else parse_box_jitter(args.classifier_box_jitter),
        )
    except ValueError as error:  # e.g. an unknown source name
        print(f"error: {error}", file=sys.stderr)
        return 2
    with removed_if_left_empty(args.out):
        bundle = run_pipeline(config)
    print(f"bundle written to {bundle.root}")
    return 0


def command_ensemble(args: argparse.Namespace) -> int:
    from leukoedge.training.train import is_checkpoint, save_ensemble_checkpoint

    missing = [str(path) for path in args.members if not is_checkpoint(path)]
    if missing:
        print(f"error: no checkpoint (.pt with its .json) at {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        record = save_ensemble_checkpoint(args.members, args.out)
    except ValueError as error:  # fewer than two members, or one that is not a segmenter
        print(f"error: {error}", file=sys.stderr)
        return 2
    members = ", ".join(member["model"] for member in record["config"]["model_kwargs"]["members"])
    print(f"ensemble of {len(args.members)} ({members}) written to {args.out}; build a bundle with it: leukoedge train ... --refiner-init {args.out} --refiner-steps 0")
    return 0


def command_study(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    require_out_folder(args.out)
    from leukoedge.training.classifier_study import run_study

    with removed_if_left_empty(args.out):
        run_study(args.data, args.out, quick=args.quick, folds=args.folds, bundle=args.bundle)
    print((args.out / "study.md").read_text())
    return 0


def command_pretrain(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    require_out_folder(args.out)
    from leukoedge.training.pipeline import check_runtime_classifier
    from leukoedge.training.pretrain import CLASSIFIER_MODEL, run_pretraining

    model = args.model or CLASSIFIER_MODEL
    try:
        check_runtime_classifier(model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with removed_if_left_empty(args.out):
        run_pretraining(args.data, args.out, quick=args.quick, bundle=args.bundle, model=model)
    print((args.out / "pretraining.md").read_text())
    return 0


def command_gate(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    from leukoedge.training.detection import format_table
    from leukoedge.bundle import load_bundle
    from leukoedge.training.gate import GateRecipe, build_gated_bundle, check_same_crops, leave_one_source_out

    try:
        for other in args.proposals_from:
            check_same_crops(load_bundle(args.bundle), load_bundle(other))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    recipe = GateRecipe(
        steps=args.steps,
        train_per_source=args.train_per_source,
        eval_split=args.split,
        eval_per_source=args.eval_per_source,
        proposals_from=tuple(str(path) for path in args.proposals_from),
        seed=args.seed,
    )
    if args.leave_out:
        rows = leave_one_source_out(
            args.data, args.bundle, args.leave_out, recipe, cache=args.cache, labelled_frames=args.labelled_frames,
            labelled_models=args.fine_tune, labelled_share=args.device_share
        )
        titles = {
            False: "left out of the gate and the domain check",
            True: "after `leukoedge adapt` with the left-out device's unlabelled training fields",
            "labelled": f"after `leukoedge adapt --labels` with {args.labelled_frames} of the left-out device's boxed training fields",
        }
        def label(row: dict) -> str:
            # A labelled adaptation its own check refused is shown, marked: a device maker would have kept the original.
            refused = "; refused by its check, not written" if row.get("report") is not None and row["report"].problems else ""
            bar = f", uncertainty bar {row['uncertainty_bar']:.3f}" if "uncertainty_bar" in row else ""
            return f"{row['domain']} (gate threshold {row['gate_threshold']:.2f}{bar}{refused})"

        for adapted, title in titles.items():
            chosen = [{**row, "domain": label(row)} for row in rows if row["adapted"] == adapted]
            if chosen:
                print(format_table(chosen, title) + "\n")
        for row in rows:
            if row["adapted"] == "labelled":
                print(f"labelled adaptation to {row['left_out']} (its own held-back check):\n  " + "\n  ".join(row["report"].lines()) + "\n")
        print("same-source figures: leukoedge evaluate (its 'Only white cells are cells' table)")
        return 0
    if args.out is None:
        print("error: --out is needed to write a bundle (or give --leave-out for the figures only)", file=sys.stderr)
        return 2
    if args.out.resolve() == args.bundle.resolve():
        print("error: --out must be another folder than --bundle (write it, check it, then replace)", file=sys.stderr)
        return 2
    bundle = build_gated_bundle(args.data, args.bundle, args.out, recipe, cache=args.cache, checkpoint=args.checkpoint)
    print(f"bundle with a gate (threshold {bundle.manifest['gate']['threshold']:.3f}) and a domain check written to {bundle.root}")
    return 0




def add_training_commands(commands: argparse._SubParsersAction) -> None:
    """Add the training-side commands to the `leukoedge` subparsers."""
    calibrate = commands.add_parser("calibrate", help="INT8 models for a bundle, written only if they pass an accuracy gate (needs [train])")
    calibrate.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    calibrate.add_argument("--bundle", type=Path, default=default_bundle())
    calibrate.add_argument("--out", type=Path, default=None, help="write the calibrated bundle here (default: into --bundle)")
    calibrate.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax", help="activation range calibration (default: %(default)s)")
    calibrate.add_argument(
        "--target", choices=("cpu", "tensorrt"), default="cpu", help="cpu: ONNX Runtime on x86; tensorrt: symmetric int8 for `export --engine --int8`"
    )
    calibrate.add_argument("--fields", type=positive_int, default=512, help="segmenter calibration fields from the train split (default: %(default)s)")
    calibrate.add_argument("--cells", type=positive_int, default=512, help="classifier calibration cells from the train split (default: %(default)s)")
    calibrate.add_argument("--gate-split", choices=("val", "test"), default="val", help="held-out data of the accuracy gate (default: %(default)s)")
    calibrate.add_argument("--gate-limit", type=positive_int, default=None, help="at most this many held-out images per source (default: all)")
    calibrate.add_argument("--max-dice-drop", type=float, default=0.005, help="allowed Dice loss, nucleus and whole cell (default: %(default)s)")
    calibrate.add_argument("--max-accuracy-drop", type=float, default=0.005, help="allowed accuracy and F1 loss per head (default: %(default)s = 0.5 pt)")
    calibrate.add_argument(
        "--max-benign-flag-rise",
        type=float,
        default=0.0,
        help="allowed rise in the share of benign Taleqani fields flagged (held-out and train split) with the INT8 segmenter or classifier (default: %(default)s: none)",
    )
    calibrate.add_argument("--keep-float", action="append", default=[], metavar="MODEL:NAMES", help="keep op types or nodes in float, e.g. segmenter:MatMul")
    calibrate.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    calibrate.set_defaults(handler=command_calibrate)


    evaluate = commands.add_parser("evaluate", help="held-out figures of a bundle on ../shared/data (needs [train])")
    evaluate.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    evaluate.add_argument("--bundle", type=Path, default=None, help="model bundle (default: $LEUKOEDGE_BUNDLE, else the shipped models/default; --quick: a tiny one trained for the run)")
    evaluate.add_argument("--out", type=Path, default=Path("reports"))
    evaluate.add_argument("--limit", type=positive_int, default=None, help="at most this many images per source, spread over the split (--quick: 6)")
    evaluate.add_argument(
        "--segmenter-checkpoint",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also compare this segmenter checkpoint (repeatable; default: the shipped 'CNN (base)=models/checkpoints/unet-lite-segmenter.pt')",
    )
    evaluate.add_argument(
        "--cross-source-bundle",
        type=Path,
        action="append",
        default=None,
        help="a bundle trained with --segmentation-sources or --classification-sources leaving some out, tested on those; "
        "repeat for several (default: the shipped models/cross-source and models/cross-source-classifier)",
    )
    evaluate.add_argument("--quick", action="store_true", help="CI: tiny models, a few images; checks every table and plot is made, not accuracy")
    evaluate.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test (default): held-out figures; val: compare candidate models without looking at the test split",
    )
    evaluate.set_defaults(handler=command_evaluate)

    train = commands.add_parser("train", help="train segmenter + refiner + classifier, export to ONNX, write a bundle (needs [train])")
    train.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    train.add_argument("--out", type=Path, default=Path("models/default"))
    train.add_argument("--quick", action="store_true", help="a few steps on a few images: checks the path, not accuracy")
    train.add_argument("--segmenter-model", default="hctnet_lite", help="hctnet_lite (default), hctnet_s, hctnet, unet_lite, unet_s, or the light mobile_unet_field, mobile_unet_field_dense, mobile_unet_field_fine (docs/performance.md)")
    train.add_argument(
        "--refiner-model", default=None, help="the per-cell refiner's architecture, one of --segmenter-model's or mobile_unet, mobile_unet_xs (default: the segmenter's)"
    )
    train.add_argument(
        "--refiner-input-size", type=int, default=None, metavar="SIDE",
        help="side of the refiner's square crops, e.g. 64 for mobile_unet (default: the one --refiner-init was trained at, else 128)",
    )
    train.add_argument("--classifier-model", default=None, help="vgg_hybrid, custom_cnn, resnet_s, mobile_cnn, vgg_hybrid_slim, vgg_hybrid_slim16 or vgg_hybrid_plain (default: the pipeline's, the shipped one; see `leukoedge study`)")
    train.add_argument("--segmenter-steps", type=non_negative_int, default=8000, help="0 with --segmenter-init: keep that segmenter")
    train.add_argument("--classifier-steps", type=non_negative_int, default=1500, help="0 with --classifier-init: keep that classifier")
    train.add_argument(
        "--classifier-ema-decay", type=float, default=None,
        help="the decay per step of the moving average of the classifier's weights that training keeps (default 0.999); 0: none, keep its best step's weights",
    )
    train.add_argument(
        "--classifier-device-augment", type=float, default=None, metavar="STRENGTH",
        help="show half the classifier's training crops as another microscope would (stain, white balance, lamp, focus, noise, JPEG, 0.6-1.6x scale) at this strength (default: the pipeline's; 0: never)",
    )
    train.add_argument(
        "--classifier-chroma-augment", type=float, default=None, metavar="STRENGTH",
        help="turn the hue (up to 45 degrees) and scale the saturation (0.5-1.6x) of the classifier's training crops at this strength (default: the pipeline's; 0: never)",
    )
    train.add_argument(
        "--classifier-capture-augment", type=float, default=None, metavar="SHARE",
        help="cut this share of the classifier's training crops from their frame with camera noise and JPEG added (default: the pipeline's; 0: never); "
        "with --classifier-teacher, the teacher answers on the crops without them",
    )
    train.add_argument(
        "--classifier-teacher", type=Path, default=None,
        help="distillation: the classifier also learns this checkpoint's probabilities (same heads), e.g. the shipped classifier while it learns noisy and compressed frames",
    )
    train.add_argument(
        "--classifier-label-weight", type=float, default=1.0,
        help="with --classifier-teacher: the weight of the labels' loss beside the teacher's (default: %(default)s; 0: learn the teacher's probabilities alone)",
    )
    train.add_argument(
        "--classifier-resolution-augment", type=float, default=None, metavar="SHARE",
        help="show this share of the classifier's training crops at lower resolution (shrunk to 0.25-0.75 of their side, enlarged back), as a coarser camera would (default: the pipeline's; 0: never)",
    )
    train.add_argument(
        "--classifier-box-jitter", default=None, metavar="SHIFT,SIZE",
        help="standard deviations of the classifier's training box's centre shift and log size change, as shares of its side (default: the pipeline's, 0.05,0.1)",
    )
    train.add_argument("--classifier-seed", type=non_negative_int, default=None, help="the classifier's own training seed (default: 0, every model's), for its run-to-run spread")
    train.add_argument("--refiner-steps", type=non_negative_int, default=4000, help="0 with --refiner-init: keep that per-cell refiner")
    train.add_argument("--refiner-lr", type=float, default=2e-3, help="peak learning rate of the refiner's one-cycle schedule")
    train.add_argument("--refiner-source-weights", default=None, metavar="SOURCE=W,...", help="relative sampling weight per refiner source (default 1 each)")
    train.add_argument("--segmenter-source-weights", default=None, metavar="SOURCE=W,...", help="relative sampling weight per segmentation source (default 1 each), e.g. wbc-seg-zheng=2,all-idb2=2")
    train.add_argument(
        "--segmenter-device-augment", type=float, default=None, metavar="STRENGTH",
        help="show half the segmenter's training fields as another microscope would (stain, white balance, lamp, focus, noise, JPEG; magnification 0.6-1.6x) at this strength (default: the pipeline's; 0: never)",
    )
    train.add_argument("--segmenter-crop", type=int, default=128, help="side of the segmenter's training windows in model pixels (default 128; 0: the whole 192x256 input)")
    train.add_argument("--segmenter-lr", type=float, default=2e-3, help="peak learning rate of the segmenter's one-cycle schedule")
    train.add_argument("--segmenter-init", type=Path, default=None, help="fine-tune from this checkpoint, e.g. models/checkpoints/default-segmenter.pt")
    train.add_argument(
        "--segmenter-teacher", type=Path, default=None,
        help="distillation: the segmenter also learns this segmenter checkpoint's class probabilities, e.g. models/checkpoints/default-segmenter.pt for a lighter one",
    )
    train.add_argument("--classifier-init", type=Path, default=None, help="fine-tune from this checkpoint, e.g. models/checkpoints/default-classifier.pt")
    train.add_argument("--refiner-init", type=Path, default=None, help="fine-tune from this checkpoint, e.g. models/checkpoints/default-refiner.pt")
    train.add_argument(
        "--refiner-teacher", type=Path, default=None, help="distillation: the refiner also learns this checkpoint's class probabilities, e.g. a `leukoedge ensemble` one"
    )
    train.add_argument(
        "--segmentation-sources",
        default=None,
        metavar="SOURCE,...",
        help="the sources the segmenter learns from, comma separated (default: all four: wbc-seg-zheng, all-idb2, all-taleqani, bccd); "
        "leave some out for `evaluate --cross-source-bundle`; add txl-pbc, or one of its devices (txl-pbc/bcd, txl-pbc/raabin), "
        "for more labs' fields with boxed white cells as weak labels",
    )
    train.add_argument(
        "--refiner-sources",
        default=None,
        metavar="SOURCE,...",
        help="the sources the per-cell refiner learns from (default: wbc-seg-zheng, all-idb2, all-taleqani, those of them in --segmentation-sources); bccd, txl-pbc or one of its devices (txl-pbc/bcd) add boxed cells as weak labels",
    )
    train.add_argument(
        "--classification-sources",
        default=None,
        metavar="SOURCE,...",
        help="the sources the classifier learns from (default: all-idb2, all-taleqani, pbc; the last two are required): "
        "leave all-idb2 out for `evaluate --cross-source-bundle`",
    )
    train.set_defaults(handler=command_train)

    ensemble = commands.add_parser(
        "ensemble", help="one checkpoint that averages several segmentation checkpoints' class probabilities, e.g. a refiner ensemble (needs [train])"
    )
    ensemble.add_argument("members", type=Path, nargs="+", help="two or more segmenter or refiner checkpoints (.pt, each with its .json)")
    ensemble.add_argument("--out", type=Path, required=True, help="the ensemble checkpoint to write (.pt and .json), e.g. for --refiner-init")
    ensemble.set_defaults(handler=command_ensemble)

    study = commands.add_parser("study", help="compare the classifiers (4 models x 2 losses) on 3 tasks by stratified k-fold (needs [train])")
    study.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    study.add_argument("--out", type=Path, default=Path("reports/classifiers"))
    study.add_argument("--quick", action="store_true", help="2 folds, 3 steps, 4 images per class: checks the path, not accuracy")
    study.add_argument("--folds", type=k_fold_count, default=None, help="k (default 10, 2 with --quick; fewer where a class has fewer cells)")
    study.add_argument("--bundle", type=Path, default=default_bundle(), help="bundle whose segmenter finds PBC cells and nuclei (default: %(default)s)")
    study.set_defaults(handler=command_study)

    pretrain = commands.add_parser(
        "pretrain", help="SimCLR pretraining of the classifier on unlabelled cells, and scratch vs SimCLR init on the test split (needs [train])"
    )
    pretrain.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    pretrain.add_argument("--out", type=Path, default=Path("reports/pretraining"), help="report and simclr-classifier.pt (default: %(default)s)")
    pretrain.add_argument("--quick", action="store_true", help="a few cells, 2-3 steps: checks the path, not accuracy")
    pretrain.add_argument("--model", default=None, help="the classifier pretrained and compared: vgg_hybrid, custom_cnn or resnet_s (default: the pipeline's, the shipped one)")
    pretrain.add_argument("--bundle", type=Path, default=default_bundle(), help="bundle whose preprocessing and segmenter checkpoint (PBC cells) are used (default: %(default)s)")
    pretrain.set_defaults(handler=command_pretrain)
    gate = commands.add_parser(
        "gate", help="train the cell-or-not gate and fit the domain check into a bundle, or print leave-one-source-out figures (needs [train])"
    )
    gate.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    gate.add_argument("--bundle", type=Path, default=default_bundle(), help="the bundle whose segmenter proposes the cells (default: %(default)s)")
    gate.add_argument("--out", type=Path, default=None, help="where to write the bundle with the gate (another folder than --bundle)")
    gate.add_argument("--leave-out", nargs="+", default=None, metavar="SOURCE", help="print figures with each of these sources/devices left out (e.g. txl-pbc/raabin bccd) instead of writing a bundle")
    gate.add_argument(
        "--labelled-frames", type=non_negative_int, default=0, metavar="N", help="with --leave-out: also the figures after `leukoedge adapt --labels` with N boxed training fields of each left-out device (default: %(default)s, none)"
    )
    gate.add_argument(
        "--fine-tune", type=model_names, default=DEFAULT_ADAPTED_MODELS,
        help="with --labelled-frames: the models labelled adaptation fine-tunes, comma-separated (default: as `leukoedge adapt --labels`)",
    )
    gate.add_argument(
        "--device-share", type=share, default=DEFAULT_DEVICE_SHARE,
        help="with --labelled-frames: the device's share of each fine-tuning batch (default: %(default)s, as `leukoedge adapt --labels`)",
    )
    gate.add_argument("--steps", type=positive_int, default=1000, help="gate training steps (default: %(default)s)")
    gate.add_argument("--train-per-source", type=positive_int, default=120, help="training fields per source/device (default: %(default)s)")
    gate.add_argument("--seed", type=non_negative_int, default=0, help="the gate's training seed, and with --labelled-frames the labelled adaptation's (default: %(default)s, the shipped gate's)")
    gate.add_argument("--split", choices=("val", "test"), default="test", help="split of the figures (default: %(default)s)")
    gate.add_argument("--eval-per-source", type=positive_int, default=60, help="normal fields per source/device in the figures (default: %(default)s)")
    gate.add_argument("--cache", type=Path, default=None, help="folder to keep the collected training crops in between runs")
    gate.add_argument(
        "--proposals-from", type=Path, nargs="+", default=[], metavar="BUNDLE",
        help="also learn from the cells these bundles' field segmenters propose (same preprocessing and crops as --bundle): a gate that knows more than one segmenter's habits",
    )
    gate.add_argument("--checkpoint", type=Path, default=None, help="also save the gate's PyTorch checkpoint here (.pt and .json)")
    gate.set_defaults(handler=command_gate)

