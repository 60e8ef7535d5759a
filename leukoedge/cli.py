"""`leukoedge run | info | bench | evaluate | train`: the command line over the same Python API.

Training and evaluation import torch; they are imported only when those commands run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .errors import LeukoedgeError

log = logging.getLogger("leukoedge")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def default_bundle() -> Path:
    """$LEUKOEDGE_BUNDLE, else the bundle shipped in the repository (models/default)."""
    return Path(os.environ.get("LEUKOEDGE_BUNDLE", Path(__file__).resolve().parents[1] / "models" / "default"))


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
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise LeukoedgeError(f"cannot decode {path} as an image")
    return image


def command_run(args: argparse.Namespace) -> int:
    from .detector import Detector
    from .result import draw_overlay

    detector = Detector.load(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in image_paths(args.input):
        try:
            frame = read_image(path)
            result = detector.run(frame)
        except LeukoedgeError as error:  # one bad file must not stop a folder run
            log.error("%s: %s", path, error)
            failures += 1
            continue
        cv2.imwrite(str(args.out / f"{path.stem}_overlay.png"), draw_overlay(frame, result))
        (args.out / f"{path.stem}.json").write_text(result.to_json(include_masks=args.masks, indent=2))
        verdict = result.verdict
        print(
            f"{path.name}: {verdict['cell_count']} cells, {verdict['blast_count']} blast "
            f"({100 * verdict['blast_fraction']:.0f} %){'  FLAGGED' if verdict['flagged'] else ''}"
        )
        for cell in result.cells:
            extra = "  ".join(f"{head}={max(s, key=s.get)}" for head, s in cell.head_scores.items() if head != detector.classifier_spec["primary_head"])
            print(f"  cell {cell.id:2d} box={cell.box} area={cell.area_px}px {cell.label} p(blast)={cell.blast_probability:.2f}  {extra}")
        print("  timings ms: " + ", ".join(f"{stage} {ms:.1f}" for stage, ms in result.timings.items()))
    print(f"overlays and JSON written to {args.out}")
    return 1 if failures else 0


def command_info(args: argparse.Namespace) -> int:
    from .bundle import describe_bundle, load_bundle

    print(describe_bundle(load_bundle(args.bundle)))
    return 0


def command_bench(args: argparse.Namespace) -> int:
    from .detector import Detector

    detector = Detector.load(args.bundle, threads=args.threads)
    frames = [read_image(p) for p in image_paths(args.images)]
    for frame in frames[: args.warmup]:
        detector.run(frame)
    per_stage: dict[str, list[float]] = {}
    for index in range(args.frames):
        for stage, ms in detector.run(frames[index % len(frames)]).timings.items():
            per_stage.setdefault(stage, []).append(ms)
    shape = "x".join(str(s) for s in frames[0].shape[1::-1])
    print(f"Detector.run on {len(frames)} real frame(s) ({shape}), {args.frames} runs after {args.warmup} warm-up, backend onnxruntime")
    print(f"{'stage':<12}{'median ms':>10}{'p95 ms':>10}")
    for stage, values in per_stage.items():
        print(f"{stage:<12}{np.median(values):>10.1f}{np.percentile(values, 95):>10.1f}")
    print(f"frames/s (median total): {1000.0 / np.median(per_stage['total']):.1f}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    from .training.evaluate import evaluate_bundle

    evaluate_bundle(args.bundle, args.data, args.out, limit=args.limit)
    print((args.out / "evaluation.md").read_text())
    return 0


def command_train(args: argparse.Namespace) -> int:
    from .training.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(args.data, args.out, quick=args.quick, segmenter_steps=args.segmenter_steps, classifier_steps=args.classifier_steps)
    bundle = run_pipeline(config)
    print(f"bundle written to {bundle.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leukoedge", description="White blood cell detection and leukemia screening in blood-smear frames.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="detect, segment and classify cells in an image or a folder of images")
    run.add_argument("input", type=Path, help="an image file or a folder of images")
    run.add_argument("--bundle", type=Path, default=default_bundle(), help="model bundle folder or archive (default: %(default)s)")
    run.add_argument("--out", type=Path, default=Path("leukoedge-out"), help="where overlays and JSON go (default: %(default)s)")
    run.add_argument("--masks", action="store_true", help="include run-length-encoded masks in the JSON")
    run.set_defaults(handler=command_run)

    info = commands.add_parser("info", help="describe a model bundle and verify its checksums")
    info.add_argument("bundle", type=Path, nargs="?", default=default_bundle())
    info.set_defaults(handler=command_info)

    bench = commands.add_parser("bench", help="per-stage latency of Detector.run on real frames (median, p95)")
    bench.add_argument("images", type=Path, help="an image or a folder of images (e.g. ../shared/data/bccd/images)")
    bench.add_argument("--bundle", type=Path, default=default_bundle())
    bench.add_argument("--frames", type=int, default=100)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    bench.set_defaults(handler=command_bench)

    evaluate = commands.add_parser("evaluate", help="held-out figures of a bundle on ../shared/data (needs [train])")
    evaluate.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    evaluate.add_argument("--bundle", type=Path, default=default_bundle())
    evaluate.add_argument("--out", type=Path, default=Path("reports"))
    evaluate.add_argument("--limit", type=int, default=None, help="at most this many test images per source (quick check)")
    evaluate.set_defaults(handler=command_evaluate)

    train = commands.add_parser("train", help="train segmenter + classifier, export to ONNX, write a bundle (needs [train])")
    train.add_argument("--data", type=Path, required=True, help="folder holding the data sources (../shared/data)")
    train.add_argument("--out", type=Path, default=Path("models/default"))
    train.add_argument("--quick", action="store_true", help="a few steps on a few images: checks the path, not accuracy")
    train.add_argument("--segmenter-steps", type=int, default=2000)
    train.add_argument("--classifier-steps", type=int, default=1500)
    train.set_defaults(handler=command_train)
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


if __name__ == "__main__":
    sys.exit(main())
