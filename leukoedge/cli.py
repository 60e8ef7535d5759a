"""`leukoedge run | info | bench | export | soak | adapt`, the runtime's command line over the Python API.

The training side (calibrate, evaluate, train, ensemble, study, pretrain, gate) registers its own
commands (leukoedge/training/cli.py); they import PyTorch only when they run, and this module never does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .adapt import ADAPTABLE_MODELS, DEFAULT_ADAPTED_MODELS, DEFAULT_DEVICE_SHARE, DEFAULT_HOLD_BACK, DEFAULT_TALEQANI_MASK_WEIGHT
from .backends import BACKENDS
from .bundle import MIN_SPEEDUP, load_bundle
from .detector import PREPROCESSORS
from .errors import InvalidFrameError, LeukoedgeError, StorageError, UnreadableImageError
from .shipped import default_bundle
from .soak import MAX_GROWTH_MB, MAX_WARMUP

if TYPE_CHECKING:
    from .capture import Frame, ThreadedReader
    from .detector import Detector
    from .result import Result
    from .session import SequentialReader

log = logging.getLogger("leukoedge")

SESSION_SAVE_EVERY = 10  # a session keeps every 10th frame's images unless --save-every says otherwise
INPUT_HELP = (
    "what to run on, one grammar for all (see docs/integration.md): an image file, a folder of images, a video "
    "file (clip.mp4), or a camera or stream: csi://0, v4l2:///dev/video0, rtsp://..., gst://..., folder:///path?glob=*.jpg. "
    "A bare number (0, 1, ...) is always a camera index (V4L2 /dev/video0 on Linux), never a file: name a file called 0 as ./0"
)


def image_paths(target: Path) -> list[Path]:
    """One image, or every image in a folder (sorted; capture.folder_images, as `leukoedge run` reads a folder)."""
    from .capture import IMAGE_SUFFIXES, folder_images

    if target.is_dir():
        paths = folder_images(target)
        if not paths:
            raise LeukoedgeError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {target}")
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


MIN_SUGGESTED_SHARE = 0.1  # below it a batch holds about one device example: not worth suggesting


def share(text: str) -> float:
    """argparse type of a share strictly between 0 and 1 (--device-share)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text}")
    return value


def hold_back_share(text: str) -> float:
    """argparse type of --hold-back: a share within adapt's HOLD_BACK_RANGE."""
    from .adapt import HOLD_BACK_RANGE

    value = float(text)
    low, high = HOLD_BACK_RANGE
    if not low <= value <= high:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a share from {low} to {high}, got {text}")
    return value


def positive_number(text: str) -> float:
    """argparse type of a finite number above 0 (a weight, a bound in MB): NaN would pass every comparison's test."""
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def model_names(text: str) -> tuple[str, ...]:
    """argparse type of --fine-tune: comma-separated names among ADAPTABLE_MODELS."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ADAPTABLE_MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(ADAPTABLE_MODELS)}, got {text!r}")
    return names


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


PUBLIC_KEY_HELP = "refuse the bundle unless manifest.json.sig is a valid signature by this Ed25519 public key (PEM or OpenSSH file)"


def load_detector(args: argparse.Namespace) -> Detector:
    """Detector.load with the command's --bundle, --backend, --threads, --precision, --preprocess (and --channel-order)."""
    from .detector import Detector

    precision = None if args.precision == "auto" else args.precision
    return Detector.load(
        args.bundle,
        backend=args.backend,
        threads=args.threads,
        precision=precision,
        preprocess=args.preprocess,
        channel_order=getattr(args, "channel_order", "BGR"),
        public_key=getattr(args, "public_key", None),
    )


def command_run(args: argparse.Namespace) -> int:
    """Images, folders, videos, cameras and streams alike: open_source reads them, one result per frame."""
    if (args.input is None) == (args.source is None):
        raise LeukoedgeError(
            "`leukoedge run` takes exactly one of: INPUT (an image, folder, video, camera or stream URI), "
            "or --source URI (the same as INPUT with --session)"
        )
    if args.source is not None:
        args.input, args.session = args.source, True
    if args.session:
        if args.explain:
            raise LeukoedgeError("--explain writes a Grad-CAM image per frame; it does not work with --session (or --source)")
        return command_run_session(args)
    from .session import open_reader

    args.out = args.out or Path("leukoedge-out")
    require_out_folder(args.out)
    if Path(args.input).is_dir() and Path(args.input).resolve() == args.out.resolve():
        # The overlays written there are images: a second run would judge them as frames.
        raise LeukoedgeError(f"--out {args.out} is the input folder: write the overlays and JSON to another folder")
    detector = load_detector(args)
    explain = gradcam_explainer(args, detector) if args.explain else None
    reader = open_reader(args.input)  # CaptureError: a missing path, a camera that is not there, a corrupt single image
    try:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create {args.out}: {error.strerror or error}") from error
        written, refused, verdicts, interrupted = run_frames(args, detector, reader, explain)
    finally:
        reader.stop()
    print(verdict_counts(verdicts))
    unreadable = int(reader.stats()["skipped"] or 0)
    if unreadable or refused:
        print(f"{unreadable} file(s) or frame(s) skipped (unreadable, greyscale, deeper than 8 bits or indexed colour), {refused} frame(s) outside the size limits (see the messages above)")
    print(f"overlays and JSON of {written} frame(s) written to {args.out}")
    if interrupted:
        print("stopped by Ctrl-C: the counts above are of the frames before it", file=sys.stderr)
        return 130
    return 1 if unreadable or refused else 0


def frame_name(frame: Frame) -> str:
    """An image file's name, or frame_000042 for a frame of a video, camera or stream."""
    return frame.name or f"frame_{frame.index:06d}"


def verdict_counts(verdicts: Counter[str]) -> str:
    """"4 frame(s) judged, 1 flagged; 2 not judged (no_cells 1, outside_domain 1)", as the session summary counts them."""
    not_judged = {status: count for status, count in sorted(verdicts.items()) if status not in ("ok", "flagged")}
    details = ", ".join(f"{status} {count}" for status, count in not_judged.items())
    judged = verdicts["ok"] + verdicts["flagged"]
    return f"{judged} frame(s) judged, {verdicts['flagged']} flagged; {sum(not_judged.values())} not judged" + (f" ({details})" if details else "")


def run_frames(
    args: argparse.Namespace, detector: Detector, reader: SequentialReader | ThreadedReader, explain: Callable[[np.ndarray, Result], np.ndarray] | None
) -> tuple[int, int, Counter[str], bool]:
    """Run the detector on every frame until the source ends, --frames or Ctrl-C; print each result and write
    <name>_overlay.png and <name>.json of every --save-every-th frame. Returns the frames written, the frames refused,
    the verdicts counted ("flagged", "ok" for judged and not flagged, else the status), and whether Ctrl-C stopped it
    (the frame in progress then counts for nothing; write_file leaves no part of a file)."""
    written = refused = seen = 0
    verdicts: Counter[str] = Counter()
    stems: set[str] = set()
    try:
        while (args.frames is None or seen < args.frames) and (frame := reader.get()) is not None:
            seen += 1
            name = frame_name(frame)
            try:
                result = detector.run(frame.image, capture_ms=frame.capture_ms, jpeg_quality=frame.jpeg_quality)
            except InvalidFrameError as error:  # one odd frame must not stop a folder or a camera
                log.error("%s: %s", name, error)
                refused += 1
                continue
            if (seen - 1) % (args.save_every or 1) == 0:
                try:  # a full disk ends the run: every later write would fail the same way
                    write_frame_results(args, output_stem(name, stems), frame.image, result, explain)
                except StorageError as error:
                    raise StorageError(f"{error}; the results of the {written} frame(s) before {name} are in {args.out}") from error
                written += 1
            print_result(name, result)
            verdicts["flagged" if result.verdict.flagged else result.verdict.status] += 1
    except KeyboardInterrupt:
        return written, refused, verdicts, True
    return written, refused, verdicts, False


def output_stem(name: str, used: set[str]) -> str:
    """The name a frame's result files start with: the image's stem, or, where an earlier frame of the run had that stem
    (cell.jpg and cell.png), its whole name with the dot as "_" (cell_png), numbered if that too was taken: one
    frame's results never overwrite another's. Adds it to `used`."""
    stem = Path(name).stem
    if stem in used:
        stem = name.replace(".", "_")
        base, number = stem, 2
        while stem in used:
            stem, number = f"{base}_{number}", number + 1
        log.warning("%s: another frame of this run had the name %s; its results are written as %s_*", name, Path(name).stem, stem)
    used.add(stem)
    return stem


def write_frame_results(args: argparse.Namespace, stem: str, image: np.ndarray, result: Result, explain: Callable[[np.ndarray, Result], np.ndarray] | None) -> None:
    from .session import write_file, write_png

    written: list[Path] = []
    try:
        write_png(args.out / f"{stem}_overlay.png", result.draw(image))
        written.append(args.out / f"{stem}_overlay.png")
        if explain is not None:
            write_png(args.out / f"{stem}_gradcam.png", explain(image, result))
            written.append(args.out / f"{stem}_gradcam.png")
        write_file(args.out / f"{stem}.json", result.to_json(include_masks=args.masks, indent=2).encode("utf-8"))
    except KeyboardInterrupt:  # a frame's files come whole or not at all: an overlay without its JSON is not a result
        for path in written:  # this frame's (write_file removed the one cut short)
            path.unlink(missing_ok=True)
        raise


# The B-ALL subtype describes a blast and the WBC type a normal white cell: each line names the one that fits the cell
# (an eosinophil printed "subtype=Benign" read as a diagnosis); the JSON keeps every head's scores.
HEAD_SHOWN_FOR = {"blast": "subtype", "normal": "wbc_type"}


def print_result(name: str, result: Result) -> None:
    """The verdict (a frame not judged: its status and why), each cell, the timings."""
    from .result import flagged_subtype, verdict_summary

    subtype = flagged_subtype(result.verdict)
    print(f"{name}: {verdict_summary(result.verdict)}{f' ({subtype})' if subtype else ''}")
    for cell in result.cells:
        head = HEAD_SHOWN_FOR.get(cell.label)
        extra = f"{head}={max(cell.head_scores[head], key=cell.head_scores[head].get)}" if head in cell.head_scores else ""
        print(f"  cell {cell.id:2d} box={cell.box} area={cell.area_px}px {cell.label} p(blast)={cell.blast_probability:.2f}  {extra}")
    print("  timings ms: " + ", ".join(f"{stage} {ms:.1f}" for stage, ms in result.timings.items()))


def gradcam_explainer(args: argparse.Namespace, detector: Detector) -> Callable[[np.ndarray, Result], np.ndarray]:
    """frame, result -> Grad-CAM overlay of the blast head. From the training checkpoint in PyTorch (ONNX
    Runtime gives no gradients), verified to be the bundle's classifier; needs the [train] extra."""
    from .training.explain import explain_frame
    from .training.torch_backend import checkpoint_paths, verified_model

    checkpoint = checkpoint_paths(args.bundle, args.checkpoints)["classifier"]
    classifier = verified_model(detector.bundle, "classifier", checkpoint)
    print(f"Grad-CAM from training checkpoint {checkpoint}")
    return lambda frame, result: explain_frame(frame, result, detector, classifier).overlay


def command_run_session(args: argparse.Namespace) -> int:
    """Record a field-validation session folder until the source ends, --frames, or Ctrl-C."""
    from .session import RESULTS_FILE, SUMMARY_FILE, ProgressDisplay, capture_session, format_summary

    out = args.out or Path("leukoedge-out") / time.strftime("session-%Y%m%d-%H%M%S")
    require_out_folder(out)
    detector = load_detector(args)
    # A folder that already holds a session is refused and written nothing: its summary is not this run's.
    older_session = (out / RESULTS_FILE).exists()
    progress = ProgressDisplay(show_timings=args.show_timings)
    save_every = args.save_every or SESSION_SAVE_EVERY
    try:
        summary = capture_session(args.input, detector, out, max_frames=args.frames, save_every=save_every, on_frame=progress)
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
    return 1 if summary.get("files_skipped") else 0  # as `leukoedge run` without --session: some input was never judged


def command_info(args: argparse.Namespace) -> int:
    from .bundle import describe_bundle

    print(describe_bundle(load_bundle(args.bundle, public_key=args.public_key)))
    if args.public_key is not None:
        print(f"signature: manifest.json.sig verified with {args.public_key}")
    return 0


def command_sign(args: argparse.Namespace) -> int:
    from .bundle import sign_bundle

    print(f"signature written to {sign_bundle(args.bundle, args.private_key)}; integrators pin the public key and load with --public-key")
    return 0


def command_bench(args: argparse.Namespace) -> int:
    from .benchmark import COMPARISON_PAIRS, comparison_detectors, format_comparison, format_single, time_detectors

    if args.data is not None:
        return bench_scaling(args)
    if args.images is None:
        raise LeukoedgeError("bench needs images (an image or a folder) or --data (a data folder, for the scaling table)")
    frames = judged_frames(image_paths(args.images), load_bundle(args.bundle).manifest["limits"])
    shape = "x".join(str(s) for s in frames[0].shape[1::-1])
    runs = f"Detector.run on {len(frames)} real frame(s) ({shape}), {args.frames} runs after {args.warmup} warm-up"
    if args.compare:
        detectors, notes = comparison_detectors(args.bundle, args.threads, args.checkpoints)
        print(f"{runs}, each configuration in turn frame by frame, the order rotating: {', '.join(detectors)}")
        for note in notes:
            print(note)
        print(format_comparison(time_detectors(detectors, frames, args.frames, args.warmup), COMPARISON_PAIRS))
        return 0
    detector = load_detector(args)
    times = time_detectors({args.backend: detector}, frames, args.frames, args.warmup)[args.backend]
    precisions = ", ".join(f"{model} {value}" for model, value in detector.precisions.items())
    print(f"{runs}, backend {args.backend} ({precisions}), preprocess {detector.preprocess_name}")
    print(format_single(times))
    return 0


def judged_frames(paths: list[Path], limits: dict) -> list[np.ndarray]:
    """The frames `leukoedge bench` times: those the bundle judges. A frame too small to judge returns before any model
    runs, so timing it measures nothing (a 32x32 image gave 87,000 frames/s); it is left out, named, and none left is an
    error."""
    from .frame import min_judged_side, too_small_reason

    min_side = min_judged_side(limits)
    frames, left_out = [], []
    for path in paths:
        frame = read_image(path)
        (left_out if too_small_reason(frame, min_side) else frames).append((path, frame))
    for path, frame in left_out:
        print(f"not timed: {path.name} ({frame.shape[1]}x{frame.shape[0]}) is too small to judge: no model runs on it")
    if not frames:
        raise LeukoedgeError(f"none of the {len(left_out)} frame(s) is large enough to judge (sides of at least {min_side} px): nothing to time")
    return [frame for _, frame in frames]


def bench_scaling(args: argparse.Namespace) -> int:
    """`leukoedge bench --data`: the cost of Detector.run against cells and frame size."""
    from .benchmark import fit_scaling, format_scaling, scaling_points, time_points

    detector = load_detector(args)
    points = scaling_points(args.data)
    precisions = ", ".join(f"{model} {value}" for model, value in detector.precisions.items())
    print(
        f"Detector.run against cells and frame size: {detector.bundle.name} ({precisions}), backend {args.backend}, "
        f"{args.frames} runs per point after {args.warmup} warm-up, the points in turn frame by frame, the order rotating"
    )
    time_points(detector, points, args.frames, args.warmup)
    print(format_scaling(points, fit_scaling(points)))
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


def command_adapt(args: argparse.Namespace) -> int:
    from .adapt import adapt_bundle

    paths = image_paths(args.frames)
    require_out_folder(args.out)  # before minutes of measuring, not after
    if args.out.resolve() == args.bundle.resolve():
        print("error: --out must be another folder than --bundle", file=sys.stderr)
        return 2
    if args.labels is not None:
        return adapt_with_labels(args, paths)
    frames = DeviceFrames(paths, load_bundle(args.bundle).manifest["limits"])
    report = adapt_bundle(
        args.bundle, frames, frames.names, args.out, hold_back=args.hold_back, channel_order=args.channel_order, jpeg_qualities=frames.jpeg_qualities
    )
    print("\n".join(report.lines()))
    return 0 if report.written else 1


class DeviceFrames(Sequence[np.ndarray]):
    """The frames `leukoedge adapt` fits, read from their files when indexed (hundreds of camera frames do not fit in
    a small device's memory at once). An unreadable file or a frame outside the bundle's size limits is skipped with
    its reason, as `leukoedge run` skips it, rather than ending the adaptation."""

    def __init__(self, paths: list[Path], limits: dict) -> None:
        self.limits = limits
        self.paths: list[Path] = []
        # Each file's JPEG quality (None: not a JPEG), read with it: adapt judges a frame as `leukoedge run` does, whose
        # compression check reads the file's quality, so a device saving at a quality the bundle refuses is told so.
        self.jpeg_qualities: list[int | None] = []
        for path in paths:
            try:
                self.jpeg_qualities.append(self._read(path)[1])
            except (UnreadableImageError, InvalidFrameError) as error:
                log.warning("skipped %s: %s", path.name, error)
                continue
            self.paths.append(path)
        if len(self.paths) < len(paths):
            print(f"{len(paths) - len(self.paths)} of {len(paths)} file(s) skipped (see the messages above)")

    def _read(self, path: Path) -> tuple[np.ndarray, int | None]:
        from .decode import read_image_file
        from .frame import validate_frame

        image, quality = read_image_file(path)
        return validate_frame(image, min_side=self.limits["min_frame_side"], max_side=self.limits["max_frame_side"]), quality

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]  # Sequence's overloads; adapt indexes by int only
        return self._read(self.paths[index])[0]

    @property
    def names(self) -> list[str]:
        return [path.name for path in self.paths]


def adapt_with_labels(args: argparse.Namespace, paths: list[Path]) -> int:
    """`leukoedge adapt --labels`: fine-tune the segmenter, gate and classifier (--fine-tune) on the device's boxed frames (needs [train])."""
    if args.data is None:
        print("error: --labels needs --data: the training data replayed beside the device's frames, so the models do not forget it", file=sys.stderr)
        return 2
    from .training.adapt import LabelledRecipe, adapt_bundle_with_labels, read_labelled_frames

    frames = read_labelled_frames(paths, args.labels, read_image)
    print(f"{len(frames)} of {len(paths)} frames have a box file in {args.labels}" + ("" if frames else " (named as the frames: <frame name>.xml or .txt)"))
    steps = args.steps
    recipe = LabelledRecipe(
        models=args.fine_tune, segmenter_steps=steps, refiner_steps=steps, gate_steps=steps, classifier_steps=steps, hold_back=args.hold_back,
        device_share=args.device_share, taleqani_mask_replay_weight=args.taleqani_mask_weight,
    )
    report = adapt_bundle_with_labels(args.bundle, frames, args.out, args.data, recipe, args.checkpoints, args.channel_order)
    print("\n".join(report.lines()))
    if report.written:
        print(f"adapted bundle written to {args.out} (FP32: rerun `leukoedge calibrate` for INT8)")
        return 0
    if report.problems and args.device_share > MIN_SUGGESTED_SHARE:
        print(f"a lower share of the device's frames in each batch keeps more of what the models learnt and may pass: --device-share {args.device_share / 2:g}")
    return 1


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8", "fp16"),
        default="auto",
        help=f"auto: per model INT8 where it passed its gate and measured at least {MIN_SPEEDUP * 100:.0f} %% faster at calibration, "
        "else FP32 (default); fp16: TensorRT only",
    )


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
        help="detect, segment and classify cells in images, folders, videos, cameras and streams",
        description="One input, any kind (INPUT below), read frame by frame through the same source layer as "
        "leukoedge.open_source. Every frame's result is printed; --out gets <name>_overlay.png and <name>.json per "
        "frame kept (<name>: the image file's name, or frame_000042 for a video or camera frame). A folder's files that "
        "cannot be judged (not decoded whole, greyscale, more than 8 bits) are skipped, named and counted (exit 1, with --session too); one "
        "such file given alone is an error (exit 2). --session records a field-validation session folder "
        "instead (frames/, overlays/, results.jsonl, summary.html; see docs/integration.md). Ctrl-C stops cleanly.",
    )
    run.add_argument("input", nargs="?", metavar="INPUT", help=INPUT_HELP)
    run.add_argument("--source", metavar="URI", help="the same as INPUT --session (the live mode of leukoedge 0.1)")
    run.add_argument("--session", action="store_true", help="record a session folder (summary, blast fraction with its 95 %% interval, latency) instead")
    run.add_argument("--bundle", type=Path, default=default_bundle(), help="model bundle folder or archive (default: %(default)s)")
    run.add_argument("--out", type=Path, default=None, help="where results go (default: leukoedge-out; --session: leukoedge-out/session-<time>)")
    run.add_argument("--masks", action="store_true", help="include run-length-encoded masks in each frame's JSON")
    run.add_argument("--frames", type=positive_int, default=None, help="stop after this many frames (default: until the source ends or Ctrl-C)")
    run.add_argument(
        "--save-every", type=positive_int, default=None, help=f"write every k-th frame's overlay and JSON (default: every frame; --session: every {SESSION_SAVE_EVERY}th frame and its overlay)"
    )
    run.add_argument("--show-timings", action="store_true", help="--session: median ms per stage in the progress line")
    run.add_argument(
        "--explain",
        action="store_true",
        help="also write <name>_gradcam.png, Grad-CAM of the blast head from the training checkpoint (needs [train])",
    )
    run.add_argument("--checkpoints", type=Path, default=None, help="--explain: folder of <bundle>-classifier.pt (default: beside the bundle)")
    add_device_arguments(run)
    add_precision_argument(run)
    run.add_argument("--public-key", type=Path, default=None, help=PUBLIC_KEY_HELP)
    run.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads per model (default: all cores)")
    run.add_argument(
        "--channel-order",
        choices=("BGR", "RGB"),
        default="BGR",
        help="channel order of the frames as the source delivers them: BGR for files, cameras and streams read by OpenCV; RGB for e.g. a gst:// pipeline ending in format=RGB (default: %(default)s)",
    )
    run.set_defaults(handler=command_run)

    info = commands.add_parser("info", help="describe a model bundle and verify its checksums")
    info.add_argument("bundle", type=Path, nargs="?", default=default_bundle())
    info.add_argument("--public-key", type=Path, default=None, help=PUBLIC_KEY_HELP)
    info.set_defaults(handler=command_info)

    sign = commands.add_parser("sign", help="sign a bundle folder's manifest with an Ed25519 private key (writes manifest.json.sig; needs [signing])")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--private-key", type=Path, required=True, help="Ed25519 private key file (PEM or OpenSSH)")
    sign.set_defaults(handler=command_sign)

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
    add_precision_argument(bench)
    bench.add_argument(
        "--compare", action="store_true", help="ONNX Runtime fp32, int8 and the bundle's mix of the two, and PyTorch eager fp32, side by side (needs [train] for PyTorch)"
    )
    bench.add_argument("--checkpoints", type=Path, default=None, help="--compare: folder of <bundle>-segmenter.pt/-classifier.pt (default: beside the bundle)")
    bench.set_defaults(handler=command_bench)

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
    soak.add_argument("--max-growth-mb", type=positive_number, default=MAX_GROWTH_MB, help="exit 1 when resident memory grows this much (default: %(default)s)")
    soak.set_defaults(handler=command_soak)

    adapt = commands.add_parser("adapt", help="adapt a bundle to a new microscope: its domain check from unlabelled frames; with --labels, its models too")
    adapt.add_argument("--bundle", type=Path, default=default_bundle(), help="the bundle to adapt (default: %(default)s)")
    adapt.add_argument("--frames", type=Path, required=True, help="folder of 20-500 frames of the new microscope (images)")
    adapt.add_argument("--out", type=Path, required=True, help="where to write the adapted bundle")
    adapt.add_argument(
        "--hold-back", type=hold_back_share, default=DEFAULT_HOLD_BACK, help="share of the frames kept out of the fit to check the result, 0.05-0.5 (default: %(default)s)"
    )
    adapt.add_argument("--channel-order", choices=("BGR", "RGB"), default="BGR", help="channel order of the frames as read (default: %(default)s)")
    adapt.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="folder of box files for some frames of NORMAL smears (<frame stem>.xml Pascal VOC or .txt YOLO: WBC, RBC, Platelets): "
        "fine-tune the segmenter, gate and classifier on them (needs [train], --data and the training checkpoints)",
    )
    adapt.add_argument("--data", type=Path, default=None, help="--labels: the training data folder, replayed so the models keep what they learnt")
    adapt.add_argument("--checkpoints", type=Path, default=None, help="--labels: folder of <bundle>-segmenter.pt, -refiner.pt, -classifier.pt and -gate.pt (default: beside the bundle)")
    adapt.add_argument("--steps", type=positive_int, default=300, help="--labels: fine-tuning steps of each model (default: %(default)s)")
    adapt.add_argument(
        "--fine-tune",
        type=model_names,
        default=DEFAULT_ADAPTED_MODELS,
        help=f"--labels: the models fine-tuned, comma-separated, among {','.join(ADAPTABLE_MODELS)} "
        f"(default: {','.join(DEFAULT_ADAPTED_MODELS)}); the others are kept as they are",
    )
    adapt.add_argument(
        "--device-share",
        type=share,
        default=DEFAULT_DEVICE_SHARE,
        help="--labels: share of each fine-tuning batch taken from the device's frames, the rest replayed training examples "
        "(default: %(default)s); when the adaptation is refused for what the training sources lost, a lower share may pass",
    )
    adapt.add_argument(
        "--taleqani-mask-weight",
        type=positive_number,
        default=DEFAULT_TALEQANI_MASK_WEIGHT,
        help="--labels: how many times as often the segmenter's and refiner's replay draws Taleqani's fields and cells "
        "(default: %(default)s; 1: training's balance, which cost Taleqani's masks on a device left out; docs/training.md)",
    )
    adapt.set_defaults(handler=command_adapt)

    from .training.cli import add_training_commands  # no torch: each training command imports it when it runs

    add_training_commands(commands)
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
