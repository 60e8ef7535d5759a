"""The timings behind the twenty-sixth session's runtime changes (docs/performance.md, "The domain check beside the
models" and "Where it stands now"), each part alone on real frames, calls interleaved:

    python scripts/runtime_parts_speed.py --data ../shared/data [--bundle models/default] [--runs 200]

Printed, median ms:
- each model of the bundle with one and with two ONNX Runtime threads (how much of a second core a call uses);
- the classifier and the segmenter alone in a process with idle threads asleep and spinning, and a Taleqani field
  through Detector.run both ways (each in a process of its own: spinning threads load whatever else runs);
- preprocess.to_rgb_float against numpy's cast of the channel-reversed view (what it did before);
- a Taleqani field's segmenter call and its frame scores (domain.frame_scores): each alone, in turn, side by side;
- the classifier with and without its CBAM attention (the attention's outputs bypassed in a copy of the graph: the
  time of the attention, not a model).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.benchmark import scaling_points  # noqa: E402
from leukoedge.detector import Detector  # noqa: E402

BATCHES = {"segmenter": 1, "classifier": 9, "gate": 20, "refiner": 3}  # a Taleqani field's calls


def medians(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median ms of each call, the calls taking turns."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: float(np.median(values)) for name, values in times.items()}


def session(path: Path, threads: int, spinning: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_call(model_session, batch: int) -> Callable[[], object]:
    model_input = model_session.get_inputs()[0]
    inputs = np.random.default_rng(0).random((batch, *model_input.shape[1:]), dtype=np.float32)
    return lambda: model_session.run(None, {model_input.name: inputs})


def without_attention(path: Path, out: Path) -> Path:
    """A copy of a vgg_hybrid classifier in which every residual sum reads its block's second convolution directly,
    bypassing the channel and spatial attention (whose nodes are then removed)."""
    import onnx

    from leukoedge.export.onnx import remove_unread  # the export rewrites' clean-up (needs the training extra)

    model = onnx.load(str(path))
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        for position, name in enumerate(node.input):
            attended = producers.get(name)
            # the spatial attention's Mul(x, sigmoid) reads the channel attention's Mul(conv, sigmoid)
            if attended is not None and attended.op_type == "Mul" and producers.get(attended.input[0], None) is not None:
                inner = producers[attended.input[0]]
                if inner.op_type == "Mul":
                    node.input[position] = inner.input[0]
    remove_unread(graph)
    onnx.save(model, str(out))
    return out


def spinning_child(bundle: Path, data: Path, what: str, spinning: bool, runs: int) -> None:
    """In a process of its own: the median ms of one model (classifier or segmenter) or of Detector.run on Taleqani
    fields, with ONNX Runtime's idle threads spinning or asleep."""
    import leukoedge.backends.onnxruntime as backend

    if what == "pipeline":
        plain = backend.session_options

        def options(ort, threads):
            chosen = plain(ort, threads)
            chosen.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
            return chosen

        backend.session_options = options
        detector = Detector.load(bundle, threads=2)
        frames = next(point for point in scaling_points(data) if point.name == "taleqani tiled 1x1").frames
        turn = iter(range(10**9))
        print(medians({"run": lambda: detector.run(frames[next(turn) % len(frames)])}, runs)["run"])
        return
    manifest = Detector.load(bundle).bundle.manifest
    print(medians({"call": model_call(session(bundle / manifest[what]["file"], 2, spinning), BATCHES[what])}, runs)["call"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--runs", type=int, default=200, help="timed calls of each (default: %(default)s)")
    parser.add_argument("--spinning-child", nargs=2, metavar=("WHAT", "SPINNING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spinning_child:
        spinning_child(args.bundle, args.data, args.spinning_child[0], args.spinning_child[1] == "1", args.runs)
        return 0

    detector = Detector.load(args.bundle, threads=2)
    manifest = detector.bundle.manifest
    print("model (batch): ms with 1 ONNX Runtime thread, with 2, and the speed-up")
    for model, batch in BATCHES.items():
        path = args.bundle / manifest[model]["file"]
        ms = medians({threads: model_call(session(path, threads), batch) for threads in (1, 2)}, args.runs)
        print(f"  {model} ({batch}): {ms[1]:.2f}, {ms[2]:.2f}, {ms[1] / ms[2]:.2f}x")

    print("idle threads asleep -> spinning, each in its own process, twice (ms)")
    for what in ("classifier", "segmenter", "pipeline"):
        figures = []
        for _ in range(2):
            for spinning in ("0", "1"):
                command = [sys.executable, __file__, "--data", str(args.data), "--bundle", str(args.bundle), "--runs", str(min(args.runs, 100))]
                out = subprocess.run([*command, "--spinning-child", what, spinning], capture_output=True, text=True, check=True).stdout
                figures.append(float(out.split()[-1]))
        print(f"  {what}: {figures[0]:.2f} -> {figures[1]:.2f}, {figures[2]:.2f} -> {figures[3]:.2f}")

    from leukoedge.domain import frame_scores
    from leukoedge.preprocess.cpu import corrected_frame, to_rgb_float

    frame_of = {point.name: point.frames[0] for point in scaling_points(args.data)}
    field = frame_of["taleqani tiled 1x1"]
    small = np.ascontiguousarray(field[16:208, 16:208])
    crops = np.random.default_rng(1).integers(0, 256, (20 * 64, 64, 3), dtype=np.uint8)
    ms = medians(
        {
            "frame, numpy": lambda: np.array(small[..., ::-1], dtype=np.float32) * np.float32(1 / 255),
            "frame, to_rgb_float": lambda: to_rgb_float(small),
            "crops, numpy": lambda: np.array(crops[..., ::-1], dtype=np.float32) * np.float32(1 / 255),
            "crops, to_rgb_float": lambda: to_rgb_float(crops),
        },
        args.runs,
    )
    print("uint8 BGR -> float RGB, a 192x192 frame and 20 crops of 64x64 (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))

    corrected = corrected_frame(field)
    prepared = detector.prepare_frame(corrected.frame)
    segmenter = detector.segmenter_spec

    def segment() -> object:
        return detector.segmenter.run({segmenter["input"]: prepared.tensor})

    def frame_checks() -> object:
        return frame_scores(detector.domain_spec, field, corrected.frame, prepared, detector.spec, dark=corrected.dark_share)

    with ThreadPoolExecutor(max_workers=1) as beside:

        def side_by_side() -> None:
            checked = beside.submit(frame_checks)
            segment()
            checked.result()

        ms = medians({"segmenter": segment, "frame scores": frame_checks, "in turn": lambda: (segment(), frame_checks()), "side by side": side_by_side}, args.runs)
    print("a Taleqani field's segmenter call and frame scores (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))

    with tempfile.TemporaryDirectory() as scratch:
        classifier = args.bundle / manifest["classifier"]["file"]
        stripped = without_attention(classifier, Path(scratch) / "no_attention.onnx")
        batch = BATCHES["classifier"]
        ms = medians({"with": model_call(session(classifier, 2), batch), "without": model_call(session(stripped, 2), batch)}, args.runs)
    print(f"the classifier on {batch} crops with its attention, without (ms): {ms['with']:.2f}, {ms['without']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
