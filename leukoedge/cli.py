"""`leukoedge run | info | bench | soak | evaluate | train | study | pretrain | calibrate | export`: the command line over the same Python API.

Training and evaluation import torch; they are imported only when those commands run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import cv2
import numpy as np

from .backends import BACKENDS
from .bundle import MIN_SPEEDUP
from .detector import PREPROCESSORS
from .errors import LeukoedgeError, StorageError
from .soak import MAX_GROWTH_MB, MAX_WARMUP

if TYPE_CHECKING:
    from .detector import Detector
    from .result import Result

log = logging.getLogger("leukoedge")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def default_bundle() -> Path:
    """$LEUKOEDGE_BUNDLE, else the bundle shipped in the repository (models/default)."""
    return Path(os.environ.get("LEUKOEDGE_BUNDLE", Path(__file__).resolve().parents[1] / "models" / "default"))


MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
# The comparison models shipped for the report (made by the commands in the README), used by
# `leukoedge evaluate` unless other ones are named.
SHIPPED_BASELINE = ("CNN (base)", MODELS_DIR / "checkpoints" / "unet-lite-segmenter.pt")
# Bundles trained without some sources: the segmenter without Taleqani and BCCD; the classifier without ALL-IDB2.
SHIPPED_CROSS_SOURCE = (MODELS_DIR / "cross-source", MODELS_DIR / "cross-source-classifier")


def image_paths(target: Path) -> list[Path]:
    """One image, or every image in a folder (sorted)."""
    if target.is_dir():
        paths = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise LeukoedgeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {target}")
        return paths
    if not target.is_file():
        raise LeukoedgeError(f"no such image or folder: {target}")
    return [target]


def read_image(path: Path) -> np.ndarray:
    """The whole image, or UnreadableImageError (a LeukoedgeError): a truncated or corrupt file is never judged."""
    from .decode import read_image as read_whole_image

    return read_whole_image(path)


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (--frames, --save-every, ...)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0 (--warmup)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return value


def require_data_folder(data: Path) -> None:
    if not data.is_dir():
        raise LeukoedgeError(f"--data {data} is not a folder: expected the folder holding the data sources (../shared/data, see its README.md)")


def require_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LeukoedgeError(f"--out {out} is a file: expected a folder (created when missing)")


@contextmanager
def removed_if_left_empty(out: Path) -> Iterator[None]:
    """A command that fails must not leave behind an empty --out it created."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def command_run(args: argparse.Namespace) -> int:
    if (args.input is None) == (args.source is None):
        raise LeukoedgeError(
            "`leukoedge run` takes exactly one of: an image or folder of images (positional), "
            "or --source URI for a live session (csi://0, v4l2:///dev/video0, rtsp://..., clip.mp4, folder://...)"
        )
    if args.source is not None:
        if args.explain:
            raise LeukoedgeError("--explain works on an image or a folder of images, not on a live --source")
        return command_run_live(args)
    from .detector import Detector
    from .result import draw_overlay, flagged_subtype, verdict_summary
    from .session import write_file, write_png

    args.out = args.out or Path("leukoedge-out")
    require_out_folder(args.out)
    paths = image_paths(args.input)
    detector = Detector.load(args.bundle, backend=args.backend, preprocess=args.preprocess)
    explain = gradcam_explainer(args, detector) if args.explain else None
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"cannot create {args.out}: {error.strerror or error}") from error
    failures = written = 0
    for path in paths:
        try:
            frame = read_image(path)
            result = detector.run(frame)
        except LeukoedgeError as error:  # one bad file must not stop a folder run
            log.error("%s: %s", path, error)
            failures += 1
            continue
        try:  # a full disk ends the run: every later write would fail the same way
            write_png(args.out / f"{path.stem}_overlay.png", draw_overlay(frame, result))
            if explain is not None:
                write_png(args.out / f"{path.stem}_gradcam.png", explain(frame, result))
            write_file(args.out / f"{path.stem}.json", result.to_json(include_masks=args.masks, indent=2).encode("utf-8"))
        except StorageError as error:
            raise StorageError(f"{error}; the results of the {written} image(s) before {path.name} are in {args.out}") from error
        written += 1
        verdict = result.verdict
        subtype = flagged_subtype(verdict)
        print(
            f"{path.name}: {verdict_summary(verdict)}{f' ({subtype})' if subtype else ''}"
        )
        for cell in result.cells:
            extra = "  ".join(f"{head}={max(s, key=s.get)}" for head, s in cell.head_scores.items() if head != detector.classifier_spec["primary_head"])
            print(f"  cell {cell.id:2d} box={cell.box} area={cell.area_px}px {cell.label} p(blast)={cell.blast_probability:.2f}  {extra}")
        print("  timings ms: " + ", ".join(f"{stage} {ms:.1f}" for stage, ms in result.timings.items()))
    print(f"overlays and JSON written to {args.out}")
    return 1 if failures else 0


def gradcam_explainer(args: argparse.Namespace, detector: Detector) -> Callable[[np.ndarray, Result], np.ndarray]:
    """frame, result -> Grad-CAM overlay of the blast head. From the training checkpoint in PyTorch (ONNX
    Runtime gives no gradients), verified to be the bundle's classifier; needs the [train] extra."""
    from .training.explain import explain_frame
    from .training.torch_backend import checkpoint_paths, verified_model

    checkpoint = checkpoint_paths(args.bundle, args.checkpoints)["classifier"]
    classifier = verified_model(detector.bundle, "classifier", checkpoint)
    print(f"Grad-CAM from training checkpoint {checkpoint}")
    return lambda frame, result: explain_frame(frame, result, detector, classifier).overlay


def command_run_live(args: argparse.Namespace) -> int:
    """Record a session from a camera, stream or recording until it ends, --frames, or Ctrl-C."""
    from .detector import Detector
    from .session import RESULTS_FILE, SUMMARY_FILE, ProgressDisplay, capture_session, format_summary

    out = args.out or Path("leukoedge-out") / time.strftime("session-%Y%m%d-%H%M%S")
    require_out_folder(out)
    detector = Detector.load(args.bundle, backend=args.backend, preprocess=args.preprocess)
    # A folder that already holds a session is refused and written nothing: its summary is not this run's.
    older_session = (out / RESULTS_FILE).exists()
    progress = ProgressDisplay(show_timings=args.show_timings)
    try:
        summary = capture_session(args.source, detector, out, max_frames=args.frames, save_every=args.save_every, on_frame=progress)
    except KeyboardInterrupt:  # a second Ctrl-C: the summary was still written first
        progress.close()
        if not older_session and (out / SUMMARY_FILE).is_file():
            print(f"stopped by a second Ctrl-C; the session is written to {out}", file=sys.stderr)
        return 130
    except LeukoedgeError:
        progress.close()
        if not older_session and (out / SUMMARY_FILE).is_file():
            print(f"the session up to the failure is written to {out} (open {out / 'summary.html'})", file=sys.stderr)
        raise
    progress.close()
    print(format_summary(summary))
    print(f"session written to {out} (open {out / 'summary.html'})")
    return 0


def command_info(args: argparse.Namespace) -> int:
    from .bundle import describe_bundle, load_bundle

    print(describe_bundle(load_bundle(args.bundle)))
    return 0


def command_bench(args: argparse.Namespace) -> int:
    from .benchmark import COMPARISON_PAIRS, comparison_detectors, format_comparison, format_single, time_detectors
    from .detector import Detector

    if args.data is not None:
        return bench_scaling(args)
    if args.images is None:
        raise LeukoedgeError("bench needs images (an image or a folder) or --data (a data folder, for the scaling table)")
    frames = [read_image(p) for p in image_paths(args.images)]
    shape = "x".join(str(s) for s in frames[0].shape[1::-1])
    runs = f"Detector.run on {len(frames)} real frame(s) ({shape}), {args.frames} runs after {args.warmup} warm-up"
    if args.compare:
        detectors, notes = comparison_detectors(args.bundle, args.threads, args.checkpoints)
        print(f"{runs}, each configuration in turn frame by frame, the order rotating: {', '.join(detectors)}")
        for note in notes:
            print(note)
        print(format_comparison(time_detectors(detectors, frames, args.frames, args.warmup), COMPARISON_PAIRS))
        return 0
    precision = None if args.precision == "auto" else args.precision
    detector = Detector.load(args.bundle, backend=args.backend, threads=args.threads, precision=precision, preprocess=args.preprocess)
    times = time_detectors({args.backend: detector}, frames, args.frames, args.warmup)[args.backend]
    precisions = ", ".join(f"{model} {value}" for model, value in detector.precisions.items())
    print(f"{runs}, backend {args.backend} ({precisions}), preprocess {detector.preprocess_name}")
    print(format_single(times))
    return 0


def bench_scaling(args: argparse.Namespace) -> int:
    """`leukoedge bench --data`: the cost of Detector.run against cells and frame size."""
    from .benchmark import fit_scaling, format_scaling, scaling_points, time_points
    from .detector import Detector

    precision = None if args.precision == "auto" else args.precision
    detector = Detector.load(args.bundle, backend=args.backend, threads=args.threads, precision=precision, preprocess=args.preprocess)
    points = scaling_points(args.data)
    precisions = ", ".join(f"{model} {value}" for model, value in detector.precisions.items())
    print(
        f"Detector.run against cells and frame size: {detector.bundle.name} ({precisions}), backend {args.backend}, "
        f"{args.frames} runs per point after {args.warmup} warm-up, the points in turn frame by frame, the order rotating"
    )
    time_points(detector, points, args.frames, args.warmup)
    print(format_scaling(points, fit_scaling(points)))
    return 0


def command_calibrate(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    if args.out is not None:
        require_out_folder(args.out)
    from .calibration.calibrate import CalibrateConfig, calibrate_bundle, parse_keep_float
    from .calibration.quantize import QuantizationSettings

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


def command_export(args: argparse.Namespace) -> int:
    if not args.engine:
        raise LeukoedgeError("`leukoedge export` builds TensorRT engines: give --engine (the ONNX files come from `leukoedge train`)")
    from .export.tensorrt import export_engines

    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    for engine in export_engines(args.bundle, precision):  # --int8: per model, fp16 where its TensorRT-target INT8 failed its gate
        print(f"engine written to {engine} (key in {engine.with_suffix('.json').name})")
    return 0


def command_soak(args: argparse.Namespace) -> int:
    from .detector import Detector
    from .soak import run_soak

    detector = Detector.load(args.bundle, threads=args.threads)
    frames = [read_image(p) for p in image_paths(args.images)]
    shape = "x".join(str(s) for s in frames[0].shape[1::-1])
    print(f"soak: one Detector (bundle {detector.bundle.name} {detector.bundle.model_version}) on {len(frames)} real frame(s) ({shape})")
    report = run_soak(detector, frames, args.frames, warmup=args.warmup, max_warmup=args.max_warmup)
    print(report.format(args.max_growth_mb))
    return 1 if report.leaked(args.max_growth_mb) else 0


def command_evaluate(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    require_out_folder(args.out)
    from .training.evaluate import evaluate_bundle, parse_segmenter_checkpoints, run_quick

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


def command_train(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    require_out_folder(args.out)
    from .training.models import SEGMENTERS
    from .training.pipeline import CLASSIFICATION_SOURCES, SEGMENTATION_SOURCES, PipelineConfig, run_pipeline

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
            classifier_model=args.classifier_model or PipelineConfig.classifier_model,
            segmenter_init=args.segmenter_init,
            segmenter_source_weights=parse_source_weights(args.segmenter_source_weights),
            classifier_init=args.classifier_init,
            refiner_steps=args.refiner_steps,
            refiner_learning_rate=args.refiner_lr,
            refiner_source_weights=parse_source_weights(args.refiner_source_weights, "--refiner-source-weights"),
            refiner_init=args.refiner_init,
            refiner_teacher=args.refiner_teacher,
            segmentation_sources=sources,
            refiner_sources=refiner_sources,
            classification_sources=classification_sources,
            classifier_seed=args.classifier_seed,
            classifier_ema_decay=PipelineConfig.classifier_ema_decay if args.classifier_ema_decay is None else args.classifier_ema_decay or None,
        )
    except ValueError as error:  # e.g. an unknown source name
        print(f"error: {error}", file=sys.stderr)
        return 2
    with removed_if_left_empty(args.out):
        bundle = run_pipeline(config)
    print(f"bundle written to {bundle.root}")
    return 0


def command_ensemble(args: argparse.Namespace) -> int:
    from .training.train import is_checkpoint, save_ensemble_checkpoint

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
    from .training.classifier_study import run_study

    with removed_if_left_empty(args.out):
        run_study(args.data, args.out, quick=args.quick, folds=args.folds, bundle=args.bundle)
    print((args.out / "study.md").read_text())
    return 0


def command_pretrain(args: argparse.Namespace) -> int:
    require_data_folder(args.data)
    require_out_folder(args.out)
    from .training.pipeline import check_runtime_classifier
    from .training.pretrain import CLASSIFIER_MODEL, run_pretraining

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
    from .training.detection import format_table
    from .training.gate import GateRecipe, build_gated_bundle, leave_one_source_out

    recipe = GateRecipe(steps=args.steps, train_per_source=args.train_per_source, eval_split=args.split, eval_per_source=args.eval_per_source)
    if args.leave_out:
        rows = leave_one_source_out(args.data, args.bundle, args.leave_out, recipe, cache=args.cache)
        for adapted in (False, True):
            chosen = [row for row in rows if row["adapted"] == adapted and (adapted or row["left_out"] != "none")]
            title = "after `leukoedge adapt` (unlabelled training fields of the left-out device)" if adapted else "left out of the gate and the domain check"
            print(format_table([{**row, "domain": row["domain"] + f" (threshold {row['gate_threshold']:.2f})"} for row in chosen], title) + "\n")
        print(format_table([row for row in rows if row["left_out"] == "none"], "same-source (every source in the gate and the domain check)"))
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


def command_adapt(args: argparse.Namespace) -> int:
    from .adapt import adapt_bundle

    paths = image_paths(args.frames)
    if args.out.resolve() == args.bundle.resolve():
        print("error: --out must be another folder than --bundle", file=sys.stderr)
        return 2
    frames = [read_image(path) for path in paths]
    report = adapt_bundle(args.bundle, frames, [path.name for path in paths], args.out, hold_back=args.hold_back, channel_order=args.channel_order)
    print("\n".join(report.lines()))
    if report.written:
        print(f"adapted bundle written to {args.out}")
        return 0
    return 1


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a Detector runs its models (--backend) and its preprocessing (--preprocess)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="onnxruntime",
        help="onnxruntime (CPU), onnxruntime-cuda (needs onnxruntime-gpu), tensorrt (needs [jetson] and `leukoedge export --engine`) (default: %(default)s)",
    )
    parser.add_argument(
        "--preprocess", choices=PREPROCESSORS, default="cpu", help="cpu (the reference) or cuda (pycuda kernels; needs [jetson] and a GPU) (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leukoedge", description="White blood cell detection and leukemia screening in blood-smear frames.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="detect, segment and classify cells in an image or a folder of images, or live on --source",
        description="Either an image or folder of images (overlays + JSON per image), or --source URI: a live "
        "session from a camera, stream or recording, written as a session folder (see leukoedge.session); Ctrl-C stops it cleanly.",
    )
    run.add_argument("input", type=Path, nargs="?", help="an image file or a folder of images")
    run.add_argument("--source", help="live mode: csi://0, v4l2:///dev/video0, 0, rtsp://..., gst://..., clip.mp4, folder:///path")
    run.add_argument("--bundle", type=Path, default=default_bundle(), help="model bundle folder or archive (default: %(default)s)")
    run.add_argument("--out", type=Path, default=None, help="where results go (default: leukoedge-out, live: leukoedge-out/session-<time>)")
    run.add_argument("--masks", action="store_true", help="images: include run-length-encoded masks in the JSON")
    run.add_argument("--frames", type=positive_int, default=None, help="live: stop after this many frames (default: until the source ends or Ctrl-C)")
    run.add_argument("--save-every", type=positive_int, default=10, help="live: keep every k-th frame and its overlay as PNG (default: %(default)s)")
    run.add_argument("--show-timings", action="store_true", help="live: median ms per stage in the progress line")
    run.add_argument(
        "--explain",
        action="store_true",
        help="images: also write <image>_gradcam.png, Grad-CAM of the blast head from the training checkpoint (needs [train])",
    )
    run.add_argument("--checkpoints", type=Path, default=None, help="--explain: folder of <bundle>-classifier.pt (default: beside the bundle)")
    add_device_arguments(run)
    run.set_defaults(handler=command_run)

    info = commands.add_parser("info", help="describe a model bundle and verify its checksums")
    info.add_argument("bundle", type=Path, nargs="?", default=default_bundle())
    info.set_defaults(handler=command_info)

    bench = commands.add_parser("bench", help="per-stage latency of Detector.run on real frames (median, p95)")
    bench.add_argument("images", type=Path, nargs="?", help="an image or a folder of images (e.g. ../shared/data/bccd/images); or --data")
    bench.add_argument(
        "--data", type=Path, default=None, help="scaling mode: time Detector.run against cells and frame size on frames built from this data folder (e.g. ../shared/data); --frames runs per point"
    )
    bench.add_argument("--bundle", type=Path, default=default_bundle())
    bench.add_argument("--frames", type=positive_int, default=100)
    bench.add_argument("--warmup", type=non_negative_int, default=5)
    bench.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    add_device_arguments(bench)
    bench.add_argument(
        "--precision", choices=("auto", "fp32", "int8", "fp16"), default="auto", help=f"auto: per model INT8 where it passed its gate and measured at least {MIN_SPEEDUP * 100:.0f} %% faster at calibration, else FP32 (default)"
    )
    bench.add_argument(
        "--compare", action="store_true", help="ONNX Runtime fp32, int8 and the bundle's mix of the two, and PyTorch eager fp32, side by side (needs [train] for PyTorch)"
    )
    bench.add_argument("--checkpoints", type=Path, default=None, help="--compare: folder of <bundle>-segmenter.pt/-classifier.pt (default: beside the bundle)")
    bench.set_defaults(handler=command_bench)

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
    calibrate.add_argument("--gate-limit", type=int, default=None, help="at most this many held-out images per source (default: all)")
    calibrate.add_argument("--max-dice-drop", type=float, default=0.005, help="allowed Dice loss, nucleus and whole cell (default: %(default)s)")
    calibrate.add_argument("--max-accuracy-drop", type=float, default=0.005, help="allowed accuracy and F1 loss per head (default: %(default)s = 0.5 pt)")
    calibrate.add_argument("--keep-float", action="append", default=[], metavar="MODEL:NAMES", help="keep op types or nodes in float, e.g. segmenter:MatMul")
    calibrate.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    calibrate.set_defaults(handler=command_calibrate)

    export = commands.add_parser("export", help="TensorRT engines for a bundle, cached in <bundle>/engines (needs [jetson] and a GPU)")
    export.add_argument("--engine", action="store_true", help="build TensorRT engines from the bundle's ONNX files")
    export.add_argument("--bundle", type=Path, default=default_bundle())
    precision = export.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 engines from the fp32 models")
    precision.add_argument("--int8", action="store_true", help="int8 engines from the bundle's gated QDQ models (leukoedge calibrate)")
    export.set_defaults(handler=command_export)

    soak = commands.add_parser("soak", help="many frames through one Detector: resident memory growth and latency drift")
    soak.add_argument("images", type=Path, help="an image or a folder of images (e.g. ../shared/data/bccd/images)")
    soak.add_argument("--bundle", type=Path, default=default_bundle())
    soak.add_argument("--frames", type=positive_int, default=10_000)
    soak.add_argument("--warmup", type=non_negative_int, default=10, help="untimed frames at least before the start reading (default: %(default)s)")
    soak.add_argument(
        "--max-warmup",
        type=non_negative_int,
        default=MAX_WARMUP,
        help="untimed frames at most: the warm-up goes on until resident memory settles (ONNX Runtime's arenas grow over the first few hundred frames) or this many (default: %(default)s)",
    )
    soak.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    soak.add_argument("--max-growth-mb", type=float, default=MAX_GROWTH_MB, help="exit 1 when resident memory grows this much (default: %(default)s)")
    soak.set_defaults(handler=command_soak)

    evaluate = commands.add_parser("evaluate", help="held-out figures of a bundle on ../shared/data (needs [train])")
    evaluate.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    evaluate.add_argument("--bundle", type=Path, default=None, help=f"model bundle (default: {default_bundle()}; --quick: a tiny one trained for the run)")
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
    train.add_argument("--segmenter-model", default="hctnet_lite", help="hctnet_lite (default), hctnet_s, hctnet, unet_lite or unet_s")
    train.add_argument("--refiner-model", default=None, help="the per-cell refiner's architecture, one of --segmenter-model's (default: the segmenter's)")
    train.add_argument("--classifier-model", default=None, help="vgg_hybrid, custom_cnn or resnet_s (default: the pipeline's, the shipped one; see `leukoedge study`)")
    train.add_argument("--segmenter-steps", type=int, default=8000, help="0 with --segmenter-init: keep that segmenter")
    train.add_argument("--classifier-steps", type=int, default=1500, help="0 with --classifier-init: keep that classifier")
    train.add_argument(
        "--classifier-ema-decay", type=float, default=None,
        help="the decay per step of the moving average of the classifier's weights that training keeps (default 0.999); 0: none, keep its best step's weights",
    )
    train.add_argument("--classifier-seed", type=int, default=None, help="the classifier's own training seed (default: 0, every model's), for its run-to-run spread")
    train.add_argument("--refiner-steps", type=int, default=4000, help="0 with --refiner-init: keep that per-cell refiner")
    train.add_argument("--refiner-lr", type=float, default=2e-3, help="peak learning rate of the refiner's one-cycle schedule")
    train.add_argument("--refiner-source-weights", default=None, metavar="SOURCE=W,...", help="relative sampling weight per refiner source (default 1 each)")
    train.add_argument("--segmenter-source-weights", default=None, metavar="SOURCE=W,...", help="relative sampling weight per segmentation source (default 1 each), e.g. wbc-seg-zheng=2,all-idb2=2")
    train.add_argument("--segmenter-crop", type=int, default=128, help="side of the segmenter's training windows in model pixels (default 128; 0: the whole 192x256 input)")
    train.add_argument("--segmenter-lr", type=float, default=2e-3, help="peak learning rate of the segmenter's one-cycle schedule")
    train.add_argument("--segmenter-init", type=Path, default=None, help="fine-tune from this checkpoint, e.g. models/checkpoints/default-segmenter.pt")
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
        "leave some out for `evaluate --cross-source-bundle`",
    )
    train.add_argument(
        "--refiner-sources",
        default=None,
        metavar="SOURCE,...",
        help="the sources the per-cell refiner learns from (default: wbc-seg-zheng, all-idb2, all-taleqani, those of them in --segmentation-sources)",
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
    study.add_argument("--folds", type=int, default=None, help="k (default 10, 2 with --quick; fewer where a class has fewer cells)")
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
    gate.add_argument("--steps", type=int, default=1000, help="gate training steps (default: %(default)s)")
    gate.add_argument("--train-per-source", type=int, default=120, help="training fields per source/device (default: %(default)s)")
    gate.add_argument("--split", choices=("val", "test"), default="test", help="split of the figures (default: %(default)s)")
    gate.add_argument("--eval-per-source", type=int, default=60, help="normal fields per source/device in the figures (default: %(default)s)")
    gate.add_argument("--cache", type=Path, default=None, help="folder to keep the collected training crops in between runs")
    gate.add_argument("--checkpoint", type=Path, default=None, help="also save the gate's PyTorch checkpoint here (.pt and .json)")
    gate.set_defaults(handler=command_gate)

    adapt = commands.add_parser("adapt", help="adapt a bundle's domain check to a new microscope from its unlabelled frames")
    adapt.add_argument("--bundle", type=Path, default=default_bundle(), help="the bundle to adapt (default: %(default)s)")
    adapt.add_argument("--frames", type=Path, required=True, help="folder of 20-500 frames of the new microscope (images)")
    adapt.add_argument("--out", type=Path, required=True, help="where to write the adapted bundle")
    adapt.add_argument("--hold-back", type=float, default=0.2, help="share of the frames kept out of the fit to check the result (default: %(default)s)")
    adapt.add_argument("--channel-order", choices=("BGR", "RGB"), default="BGR", help="channel order of the frames as read (default: %(default)s)")
    adapt.set_defaults(handler=command_adapt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except LeukoedgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        print(f"error: {error.name} is not installed; `{args.command}` needs it: pip install 'leukoedge[train]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`leukoedge info | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 1
    except OSError as error:  # a file the command reads or writes: the message names it, a traceback adds nothing
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
