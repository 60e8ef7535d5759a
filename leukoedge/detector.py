"""Detector: bundle + backend + preprocess + postprocess. One call per frame."""

from __future__ import annotations

import functools
import math
import numbers
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .backends import create_backend
from .bundle import Bundle, bundle_models, check_models, fastest_precision, load_bundle, model_file
from .errors import BackendUnavailableError, InvalidArgumentError, LeukoedgeError
from .frame import check_channel_order, min_judged_side, too_small_reason, validate_frame
from .postprocess import CellInstance, find_cells, fragments, label_map_from_probabilities
from .preprocess.cpu import Box, PreparedFrame, PreprocessSpec, corrected_frame, mirrored_at_edges, prepare_crops, prepare_frame, shows_half, touches_edge
from .refine import cells_to_refine, refine_cells
from .domain import (
    ENLARGED_CELL_SIDE_PX,
    SWAP_MARGIN,
    cell_detail,
    cell_scores,
    frame_scores,
    large_cut_cells,
    merged_scores,
    outside_domain,
    swapped_colour_gain,
    tear_score,
)
from .result import BACKGROUND, STATUS_OUTSIDE_DOMAIN, STATUS_TOO_SMALL, Cell, Result, Timings, Verdict, make_verdict

# Cells are refined and classified in batches of at most this many: one call per model for a frame of up
# to 64 cells. ONNX Runtime would take more (the graphs' batch axis is symbolic), but TensorRT engines are
# built for 1..64 (export BATCH_PROFILES) and the chunks bound memory on 8 GB devices; a 65th cell costs
# one more call, measured at no more than the batch of 73 in one (refiner, ORT CPU).
MAX_CELL_BATCH = 64
PRECISIONS = ("fp32", "fp16", "int8")
PREPROCESSORS = ("cpu", "cuda")


def _batches(crops: np.ndarray) -> Iterator[np.ndarray]:
    """Crops MAX_CELL_BATCH at a time: the most one model call takes."""
    for start in range(0, len(crops), MAX_CELL_BATCH):
        yield crops[start : start + MAX_CELL_BATCH]


def shrank(cell: CellInstance, share: float) -> bool:
    """Whether a refined cell's box is smaller than `share` of the area of the box the field segmenter found."""
    (x0, y0, x1, y1), (fx0, fy0, fx1, fy1) = cell.box, cell.classifier_box
    return (x1 - x0) * (y1 - y0) < share * (fx1 - fx0) * (fy1 - fy0)


def without_classes(probabilities: np.ndarray, classes: Sequence[str], excluded: Sequence[str]) -> np.ndarray:
    """N x classes probabilities with the excluded classes at 0 and the others renormalized. Behind a gate,
    every cell that reaches the classifier is a white cell: "platelet" or "erythroblast" is not an answer
    its WBC-type head may give."""
    keep = np.array([name not in excluded for name in classes])
    kept = np.where(keep, probabilities, 0.0)
    return kept / np.maximum(kept.sum(axis=1, keepdims=True), 1e-12)


def without_rejected(found: "Candidates", keep: np.ndarray) -> np.ndarray:
    """The candidates' label map without the proposals the gate rejected, copied box by box (find_cells paints only
    inside its cells' boxes): a large frame's few cells are copied, not its every pixel."""
    label_map = np.zeros(found.label_map.shape, found.label_map.dtype)
    for instance in found.instances:
        x0, y0, x1, y1 = instance.box
        label_map[y0:y1, x0:x1] = found.label_map[y0:y1, x0:x1]
    for instance in (instance for instance, kept in zip(found.instances, keep) if not kept):
        x0, y0, x1, y1 = instance.box
        label_map[y0:y1, x0:x1][instance.mask] = BACKGROUND
    return label_map


@dataclass
class Candidates:
    """A frame's proposals, before the gate and the refiner: the preprocessed frame, the segmenter's class
    probabilities (3 x model H x W), the cell instances in frame pixels and the frame label map painted from them."""

    prepared: PreparedFrame
    probabilities: np.ndarray
    instances: list[CellInstance]
    label_map: np.ndarray


def check_run_arguments(capture_ms: float | None, jpeg_quality: int | None) -> None:
    """InvalidArgumentError unless capture_ms is None or a finite number of ms >= 0 (a NaN would be written into the
    Result's JSON, which then no parser reads) and jpeg_quality None or a whole number 1-100 (a NaN passed the
    compression check)."""
    if capture_ms is not None and (isinstance(capture_ms, bool) or not isinstance(capture_ms, numbers.Real) or not 0.0 <= capture_ms < math.inf):
        raise InvalidArgumentError(f"capture_ms must be a finite number of ms >= 0, or None, got {capture_ms!r}")
    if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, numbers.Integral) or not 1 <= jpeg_quality <= 100):
        raise InvalidArgumentError(f"jpeg_quality must be a whole number 1-100 (the file's JPEG quality), or None for a camera frame, got {jpeg_quality!r}")


def choose_precision(bundle: Bundle, model: str, precision: str | None, backend: str) -> str:
    """The precision `model` runs at. Asked for: checked against the bundle (BundleError if it lacks
    it) and the backend. None: on ONNX Runtime (CPU or CUDA) the fastest precision that passed its
    accuracy gate, by the latencies measured at calibration (on the CPU); on TensorRT the most reduced
    one with a valid cached engine."""
    if precision is None:
        if backend != "tensorrt":
            return fastest_precision(bundle.manifest, model)
        from .backends.tensorrt import has_valid_engine

        for candidate in ("int8", "fp16", "fp32"):
            if _has_file(bundle, model, candidate, backend) and has_valid_engine(bundle.path(source_file(bundle, model, candidate, backend)), candidate):
                return candidate
        return "fp32"  # opening it names the export command when its engine is missing
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)} or None (the bundle's default per model: INT8 where it passed its gate and was measurably faster)")
    if precision == "fp16" and backend != "tensorrt":
        raise BackendUnavailableError(f"fp16 runs on the TensorRT backend only (backend='tensorrt'); {backend} runs fp32 or int8 ONNX files")
    source_file(bundle, model, precision, backend)  # raises BundleError naming what is missing
    return precision


def source_file(bundle: Bundle, model: str, precision: str, backend: str) -> str:
    """The bundle file `model` runs from at `precision`: on TensorRT the one its engine is built from
    (int8: the TensorRT-target QDQ file, never the CPU-target one, which TensorRT refuses), elsewhere
    the file ONNX Runtime runs."""
    if backend == "tensorrt":
        from .backends.tensorrt import engine_source

        return engine_source(bundle.manifest, model, precision, bundle.root)
    return model_file(bundle.manifest, model, precision)


def _has_file(bundle: Bundle, model: str, precision: str, backend: str) -> bool:
    try:
        source_file(bundle, model, precision, backend)
    except LeukoedgeError:
        return False
    return True


def make_preprocessor(name: str, spec: PreprocessSpec, input_size: Sequence[int], channel_order: str) -> Callable[[np.ndarray], PreparedFrame]:
    """frame -> PreparedFrame: "cpu", the reference (numpy + OpenCV); "cuda", the same steps as CUDA
    kernels (pycuda): one copy of the frame to the GPU, one copy of the tensor and stain statistics back."""
    if name == "cpu":
        return functools.partial(prepare_frame, spec=spec, input_size=input_size, channel_order=channel_order)
    if name == "cuda":
        from .preprocess.cuda import CudaPreprocessor

        return CudaPreprocessor(spec, input_size, channel_order).prepare_frame
    raise InvalidArgumentError(f"unknown preprocess {name!r}; expected one of {', '.join(PREPROCESSORS)}")


def _timed(function: Callable[..., dict[str, float]], *args: object, **kwargs: object) -> tuple[dict[str, float], float]:
    """function(*args, **kwargs) and the ms it took."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, (time.perf_counter() - started) * 1000.0


@contextmanager
def _stopwatch(timings: Timings, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    setattr(timings, f"{stage}_ms", getattr(timings, f"{stage}_ms") + (time.perf_counter() - started) * 1000.0)


class Detector:
    """Finds, segments and classifies white blood cells in camera frames.

    >>> with Detector.load("models/default") as det:   # close() at the end releases the models
    ...     result = det.run(frame)   # HxWx3 uint8, BGR (or RGB with channel_order="RGB")

    Every model fact (input sizes, normalization, stain reference, class names, thresholds, frame
    limits) comes from the bundle manifest. Frames outside the manifest's limits are refused with
    InvalidFrameError, never silently resized into a wrong answer.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "onnxruntime",
        channel_order: str = "BGR",
        threads: int | None = None,
        precision: str | None = None,
        preprocess: str = "cpu",
    ):
        manifest = bundle.manifest
        self.bundle = bundle
        check_channel_order(channel_order)  # here, not at the first frame
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 0):
            raise InvalidArgumentError(f"threads must be a whole number >= 1, or None or 0 (ONNX Runtime's default), got {threads!r}")
        self.channel_order = channel_order
        self.spec = PreprocessSpec.from_manifest(manifest["preprocess"])
        self.segmenter_spec = manifest["segmenter"]
        self.classifier_spec = manifest["classifier"]
        self.postprocess_spec = manifest["postprocess"]
        self.verdict_spec = manifest["verdict"]
        self.limits = manifest["limits"]
        self.min_judged_side = min_judged_side(self.limits)
        self.prepare_frame = make_preprocessor(preprocess, self.spec, self.segmenter_spec["input_size"], channel_order)
        self.preprocess_name = preprocess
        self.refiner_spec = manifest.get("refiner")  # None: the field segmenter's masks are final
        # The refiner cuts its crops around the field segmenter's boxes, the classifier around the same boxes
        # (CellInstance.classifier_box): where size and margin agree too, one crop per cell serves both.
        self.shared_crops = self.refiner_spec is not None and all(
            self.refiner_spec[key] == self.classifier_spec[key] for key in ("input_size", "crop_margin")
        )
        self.gate_spec = manifest.get("gate")  # None: every proposal is a white cell (bundles before 0.2.0)
        self.domain_spec = manifest.get("domain")  # None: every frame is judged (bundles before 0.2.0)
        self.precisions = {model: choose_precision(bundle, model, precision, backend) for model in bundle_models(manifest)}
        backends = {
            model: create_backend(backend, bundle.path(source_file(bundle, model, model_precision, backend)), threads, model_precision)
            for model, model_precision in self.precisions.items()
        }
        self.segmenter, self.classifier, self.refiner = backends["segmenter"], backends["classifier"], backends.get("refiner")
        self.gate = backends.get("gate")
        # One input through every model: a bundle whose manifest and models disagree fails here, not at the first frame.
        check_models(manifest, backends, {model: source_file(bundle, model, p, backend) for model, p in self.precisions.items()})
        self.backend_name = backend
        self.closed = False
        self._check_thread: ThreadPoolExecutor | None = None

    def _beside(self) -> ThreadPoolExecutor:
        """The one thread the domain check runs on beside the segmenter and the classifier (started at the first frame)."""
        if self._check_thread is None:
            self._check_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukoedge-check")
        return self._check_thread

    @classmethod
    def load(
        cls,
        bundle_path: str | Path,
        backend: str = "onnxruntime",
        channel_order: str = "BGR",
        threads: int | None = None,
        precision: str | None = None,
        preprocess: str = "cpu",
        public_key: object = None,
    ) -> "Detector":
        """Load and verify a bundle (folder or archive), then open its models on the chosen backend.

        backend: "onnxruntime" (CPU), "onnxruntime-cuda" (needs onnxruntime-gpu) or "tensorrt" (needs [jetson]).
        precision: "fp32", "int8" (the bundle's gated QDQ models), "fp16" (TensorRT only), or None:
        per model, the fastest precision that passed its accuracy gate (fp32 for an uncalibrated bundle).
        preprocess: "cpu" (the reference) or "cuda" (pycuda kernels, needs [jetson] and a GPU; equal to
        the reference within the tolerance stated in leukoedge/preprocess/cuda.py).
        public_key: a pinned Ed25519 public key (leukoedge/signing.py); given, the bundle must carry a valid
        signature of its manifest (manifest.json.sig), else BundleError.
        """
        return cls(
            load_bundle(bundle_path, public_key=public_key), backend=backend, channel_order=channel_order, threads=threads, precision=precision, preprocess=preprocess
        )

    def close(self) -> None:
        """Release the models (ONNX Runtime sessions, TensorRT engines and their GPU buffers, the CUDA
        preprocessor): the references go, so their memory is freed once no other reference holds it.
        Call it once no thread runs this detector any more; run() afterwards raises
        BackendUnavailableError. Closing twice is harmless."""
        self.segmenter = self.classifier = self.refiner = self.gate = None
        self.prepare_frame = None
        if self._check_thread is not None:
            self._check_thread.shutdown()
            self._check_thread = None
        self.closed = True

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self.closed:
            raise BackendUnavailableError(
                f"this Detector ({self.bundle.name}) was closed and its models released: load another with Detector.load(...)"
            )

    def run(self, frame: np.ndarray, capture_ms: float | None = None, jpeg_quality: int | None = None) -> Result:
        """Validate, fill the black outside the field of view and even the light (preprocess.cpu.corrected_frame),
        preprocess, segment, find cells, keep the white cells (bundles with a gate), refine each
        kept cell's masks (bundles with a refiner), check the domain (bundles with one), classify, judge;
        timings in ms per stage. jpeg_quality: the quality of the JPEG file the frame was read from
        (decode.file_jpeg_quality; capture.Frame.jpeg_quality), for the compression check; None for a camera frame
        (what the pixels hold, decode.pixel_jpeg_quality, is checked either way)."""
        self._require_open()
        check_run_arguments(capture_ms, jpeg_quality)
        timings = Timings(capture_ms=capture_ms)
        started = time.perf_counter()
        frame = validate_frame(frame, min_side=self.limits["min_frame_side"], max_side=self.limits["max_frame_side"], channel_order=self.channel_order)
        if too_small := too_small_reason(frame, self.min_judged_side):
            return self.not_judged(frame, STATUS_TOO_SMALL, too_small, timings, started)
        with _stopwatch(timings, "preprocess"):
            corrected = corrected_frame(frame)
            captured, frame = frame, corrected.frame  # every later stage reads the corrected frame, as training did
            prepared = self.prepare_frame(frame)
        # The domain check runs on a thread of its own, its frame scores beside the segmenter's call and its cell scores
        # beside the classifier's: ONNX Runtime's two threads leave a core idle a third of those calls (1.3-1.4x one
        # thread's speed, 2-core x86, scripts/runtime_parts_speed.py), and the check's numpy and OpenCV work releases
        # the interpreter. The same scores; check_ms is the check's own time, which overlaps segment_ms and classify_ms.
        frame_part = None
        if self.domain_spec:
            frame_part = self._beside().submit(
                _timed, frame_scores, self.domain_spec, captured, frame, prepared, self.spec,
                jpeg_quality=jpeg_quality, illumination_falloff=corrected.falloff, outside_field=corrected.outside_field, dark=corrected.dark_share,
            )
        found = self.candidates(frame, timings, prepared)
        instances, label_map, non_wbc_count, crops = self.white_cells(frame, found, timings)
        cell_part = None
        if self.domain_spec:
            cell_part = self._beside().submit(_timed, cell_scores, self.domain_spec, frame, prepared, found.probabilities, [cell.box for cell in instances])
        with _stopwatch(timings, "classify"):
            if crops is None:
                crops = self.cell_crops(frame, found.prepared, instances)
            cells = self.classify(instances, crops)
        domain = {}
        if frame_part is not None and cell_part is not None:
            (frame_checked, frame_ms), (cells_checked, cells_ms) = frame_part.result(), cell_part.result()
            domain = merged_scores(frame_checked, cells_checked)
            timings.check_ms += frame_ms + cells_ms
        verdict = self.judge(cells, non_wbc_count, domain)
        if verdict.flagged and self.domain_spec:
            # A flag is checked once more: are its colours a swapped frame's, is it torn, does it rest on cells cut by
            # the frame's edge and larger than it shows whole, do its small cells hold the detail validated flags do?
            with _stopwatch(timings, "check"):
                # The swap comes nearer by at most the frame's own colour distance: it is measured (2-5 ms) only where
                # that distance could exceed SWAP_MARGIN; most validated flags lie nearer (Taleqani's median 0.09).
                if domain["colour_distance"] > SWAP_MARGIN:
                    domain["swapped_colour_gain"] = swapped_colour_gain(
                        self.domain_spec, frame, domain["colour_distance"], self.spec, self.segmenter_spec["input_size"], self.channel_order
                    )
                domain["tear_score"] = tear_score(frame)
                blasts = [cell for cell in cells if cell.blast_probability >= verdict.blast_threshold]
                cut = large_cut_cells([cell.box for cell in blasts], frame.shape)
                if any(cut):
                    domain["whole_blasts"] = float(cut.count(False))
                side = domain.get("cell_side_px")  # the median side of these cells, measured with the other scores
                if side is not None and side < ENLARGED_CELL_SIDE_PX and (detail := cell_detail(frame, [cell.box for cell in cells])) is not None:
                    domain["flag_detail"] = detail
            verdict = self.judge(cells, non_wbc_count, domain)
        timings.total_ms = (time.perf_counter() - started) * 1000.0
        return Result(
            label_map=label_map,
            cells=cells,
            verdict=verdict,
            timings=timings.as_dict(),
            frame_shape=(frame.shape[0], frame.shape[1]),
            bundle_name=self.bundle.name,
            model_version=self.bundle.model_version,
        )

    def candidates(self, frame: np.ndarray, timings: Timings | None = None, prepared: PreparedFrame | None = None) -> Candidates:
        """Everything the segmenter found in a validated frame, before the gate and the refiner: the cell
        proposals the gate and `leukoedge adapt` work on (the gate reads crops cut around the boxes found here,
        so refinement changes nothing it sees). prepared: the frame already preprocessed (prepare_frame), or None."""
        self._require_open()
        timings = Timings() if timings is None else timings
        if prepared is None:
            with _stopwatch(timings, "preprocess"):
                prepared = self.prepare_frame(frame)
        with _stopwatch(timings, "segment"):
            probabilities = self.segmenter.run({self.segmenter_spec["input"]: prepared.tensor})[self.segmenter_spec["output"]][0]
        with _stopwatch(timings, "postprocess"):
            instances, label_map = find_cells(
                label_map_from_probabilities(probabilities),
                prepared.letterbox,
                self.postprocess_spec["min_cell_area_px"],
                self.postprocess_spec["split_touching"],
                self.postprocess_spec.get("min_nucleus_area_px", 0),  # absent in bundles made before 0.1.0's fix
            )
        return Candidates(prepared, probabilities, instances, label_map)

    def white_cells(self, frame: np.ndarray, found: Candidates, timings: Timings | None = None) -> tuple[list[CellInstance], np.ndarray, int, np.ndarray | None]:
        """The proposals the gate calls white cells (all of them, without a gate), less the fragments of another
        (postprocess.fragments), refined where the bundle refines; the frame label map of those cells; how many
        proposals were left out (red cells, platelets, debris, fragments: never counted, never classified); and the
        kept cells' classifier crops (None where none were cut).

        The gate runs first, so the refiner never segments a proposal the gate then drops (TXL-PBC raabin's
        validation fields: 100 refinements instead of 212, scripts/proposal_counts.py). Crops are cut once: the
        gate's are the classifier's, and the refiner's too where the sizes agree (shared_crops)."""
        timings = Timings() if timings is None else timings
        proposals = found.instances
        if not proposals:
            return [], found.label_map, 0, None
        crops, keep = None, np.ones(len(proposals), bool)
        if self.gate is not None:
            with _stopwatch(timings, "gate"):
                crops = self.cell_crops(frame, found.prepared, proposals)
                keep = self.gate_keeps(frame, found.prepared, proposals, crops)
        kept = np.flatnonzero(keep)
        keep[kept[fragments([proposals[index] for index in kept])]] = False  # a piece of a white cell is not one
        kept = np.flatnonzero(keep)
        if self.refiner is not None and kept.size:
            with _stopwatch(timings, "refine"):
                if crops is None and self.shared_crops:
                    crops = self.cell_crops(frame, found.prepared, proposals)  # every cell's: the classifier needs them all
                cells, label_map = self.refine(frame, found.prepared, proposals, found.probabilities, kept, crops if self.shared_crops else None)
        else:
            cells, label_map = [proposals[index] for index in kept], found.label_map if keep.all() else without_rejected(found, keep)
        return cells, label_map, int((~keep).sum()), None if crops is None else crops[kept]

    def gate_keeps(self, frame: np.ndarray, prepared: PreparedFrame, proposals: list[CellInstance], crops: np.ndarray) -> np.ndarray:
        """Which proposals the gate calls white cells, from their crops (cell_crops). Where the bundle says so
        (gate.edge_whole_threshold), a proposal at the frame's edge that its crop does not pass is read once more
        whole: its box mirrored across the edge, the frame reflected there (preprocess.cpu.mirrored_at_edges), as the
        gate learnt white cells; it is kept if that reading reaches the (higher) edge threshold. Only a proposal that
        shows at least half a cell is read so (preprocess.cpu.shows_half): a mirrored sliver is no cell's image. The
        edge hides part of a cell, and the mean colour its crop holds beyond the edge is unlike any cell the gate
        learnt (docs/training.md, "Cells at the frame's edge")."""
        spec = self.gate_spec
        keep = self.white_cell_probabilities(crops) >= spec["threshold"]
        if "edge_whole_threshold" not in spec:
            return keep
        height, width = frame.shape[:2]
        again = [
            index for index in np.flatnonzero(~keep).tolist()
            if touches_edge(box := proposals[index].classifier_box, (height, width)) and shows_half(box, (height, width))
        ]
        if again:
            keep[again] = self.whole_probabilities(frame, prepared, [proposals[index].classifier_box for index in again]) >= spec["edge_whole_threshold"]
        return keep

    def whole_probabilities(self, frame: np.ndarray, prepared: PreparedFrame, boxes: list[Box]) -> np.ndarray:
        """The gate's probability that each box at the frame's edge is a white cell, read whole: mirrored across the
        edge, its crop cut from the frame reflected there (gate_keeps)."""
        spec = self.gate_spec
        mirrored = [mirrored_at_edges(box, frame.shape[:2]) for box in boxes]
        whole = prepare_crops(
            frame, mirrored, self.spec, spec["input_size"], spec["crop_margin"], prepared.lab_statistics, self.channel_order, prepared.halved,
            outside="reflect",
        )
        return self.white_cell_probabilities(whole)

    def white_cell_probabilities(self, crops: np.ndarray) -> np.ndarray:
        """The gate's probability that each proposal is a white cell, from the classifier's crops (the bundle
        check makes the gate cut its crops the same way)."""
        spec = self.gate_spec
        wbc = spec["classes"].index("wbc")
        return np.concatenate([self.gate.run({spec["input"]: batch})[spec["output"]][:, wbc] for batch in _batches(crops)])

    def judge(self, cells: list[Cell], non_wbc_count: int, domain: dict[str, float]) -> Verdict:
        """The frame's verdict; outside the bundle's validated domain it is not judged (never flagged)."""
        threshold, fraction, count = self.verdict_terms()
        outside = outside_domain(self.domain_spec, domain) if self.domain_spec else ""
        if outside:
            return Verdict.not_judged(STATUS_OUTSIDE_DOMAIN, outside, threshold, fraction, non_wbc_count=non_wbc_count, domain=domain, min_blast_count=count)
        return make_verdict(cells, threshold, fraction, non_wbc_count=non_wbc_count, domain=domain, min_blast_count=count)

    def verdict_terms(self) -> tuple[float, float, int]:
        """(blast threshold, flag fraction, min blast count) of the bundle's verdict; bundles before 0.5.0 flag from one blast."""
        spec = self.verdict_spec
        return spec["blast_threshold"], spec["flag_fraction"], spec.get("min_blast_count", 1)

    def not_judged(self, frame: np.ndarray, status: str, reason: str, timings: Timings, started: float) -> Result:
        """The Result of a frame no model ran on: no cells, an all-background label map, a refusal verdict."""
        timings.total_ms = (time.perf_counter() - started) * 1000.0
        threshold, fraction, count = self.verdict_terms()
        return Result(
            label_map=np.zeros(frame.shape[:2], np.uint8),
            cells=[],
            verdict=Verdict.not_judged(status, reason, threshold, fraction, min_blast_count=count),
            timings=timings.as_dict(),
            frame_shape=(frame.shape[0], frame.shape[1]),
            bundle_name=self.bundle.name,
            model_version=self.bundle.model_version,
        )

    def refine(
        self, frame: np.ndarray, prepared: PreparedFrame, proposals: list[CellInstance], probabilities: np.ndarray, kept: np.ndarray, crops: np.ndarray | None = None
    ) -> tuple[list[CellInstance], np.ndarray]:
        """The kept proposals (indices, in order), each segmented again by the refiner from its crop
        (leukoedge/refine.py), or only those the field segmenter's probabilities leave uncertain where the bundle
        says so (refiner.skip_below_uncertainty), or those large enough (refiner.min_cell_side_px) (the others keep
        the segmenter's masks); and the frame label map painted from them. Every proposal, kept or not, still
        claims its pixels: a cell's mask does not depend on what the gate decided about its neighbours.
        crops: every proposal's crop, already cut (shared_crops), or None.

        Where the bundle says so (refiner.refine_again_below), a refined cell whose box shrank below that share of
        the area of the field segmenter's box is refined once more from a crop around its refined box: where the field
        segmenter merged a white cell with the red cells around it, the first crop (that whole blob, shrunk to the
        refiner's input) shows the cell too small to outline, the second at the refiner's scale (docs/performance.md,
        "A second refinement pass"). The cell's classifier_box stays the field segmenter's."""
        spec = self.refiner_spec
        chosen = cells_to_refine(probabilities, prepared.letterbox, proposals, spec.get("skip_below_uncertainty"), spec.get("min_cell_side_px"))
        chosen = chosen[np.isin(chosen, kept)]
        batches = _batches(crops[chosen]) if crops is not None else self._crop_batches(frame, prepared, [proposals[index].box for index in chosen], spec)
        crop_probabilities = [self.refiner.run({spec["input"]: batch})[spec["output"]] for batch in batches]
        no_crops = np.zeros((0, len(spec["classes"]), *spec["input_size"]), np.float32)
        cells, label_map = refine_cells(proposals, np.concatenate(crop_probabilities) if crop_probabilities else no_crops, spec["crop_margin"], frame.shape[:2], chosen, kept)
        if "refine_again_below" in spec and chosen.size:
            refined = np.flatnonzero(np.isin(kept, chosen))  # positions among the kept cells
            again = refined[[shrank(cells[position], spec["refine_again_below"]) for position in refined.tolist()]]
            if again.size:
                cells, label_map = self.refine_again(frame, prepared, cells, again)
        return cells, label_map

    def refine_again(self, frame: np.ndarray, prepared: PreparedFrame, cells: list[CellInstance], again: np.ndarray) -> tuple[list[CellInstance], np.ndarray]:
        """The kept cells with those at positions `again` refined a second time, each from a crop around its refined
        box (the other kept cells claim their pixels as before); classifier boxes unchanged."""
        spec = self.refiner_spec
        batches = self._crop_batches(frame, prepared, [cells[index].box for index in again], spec)
        crop_probabilities = np.concatenate([self.refiner.run({spec["input"]: batch})[spec["output"]] for batch in batches])
        second, label_map = refine_cells(cells, crop_probabilities, spec["crop_margin"], frame.shape[:2], again)
        for index in again.tolist():
            second[index] = replace(second[index], found_box=cells[index].classifier_box)
        return second, label_map

    def _crop_batches(self, frame: np.ndarray, prepared: PreparedFrame, boxes: list[Box], spec: dict) -> Iterator[np.ndarray]:
        """The cells' crops for a model of the bundle (its input size and crop margin), MAX_CELL_BATCH at a time."""
        for start in range(0, len(boxes), MAX_CELL_BATCH):
            yield prepare_crops(
                frame, boxes[start : start + MAX_CELL_BATCH], self.spec, spec["input_size"], spec["crop_margin"], prepared.lab_statistics, self.channel_order,
                prepared.halved,
            )

    def cell_crops(self, frame: np.ndarray, prepared: PreparedFrame, instances: list[CellInstance]) -> np.ndarray:
        """Nx3xHxW: every cell's crop as the classifier (and the gate) take it, cut around its classifier_box."""
        spec = self.classifier_spec
        if not instances:
            return np.zeros((0, 3, *spec["input_size"]), np.float32)
        return np.concatenate(list(self._crop_batches(frame, prepared, [cell.classifier_box for cell in instances], spec)))

    def classify(self, instances: list[CellInstance], crops: np.ndarray) -> list[Cell]:
        """Classify every cell from its crop (cell_crops; batched) with every head; the primary head names the label."""
        if not instances:
            return []
        spec = self.classifier_spec
        heads = spec["heads"]
        probabilities: dict[str, list[np.ndarray]] = {head: [] for head in heads}
        for batch in _batches(crops):
            outputs = self.classifier.run({spec["input"]: batch})
            for head, head_spec in heads.items():
                probabilities[head].append(outputs[head_spec["output"]])
        stacked = {head: np.concatenate(parts) for head, parts in probabilities.items()}
        for head, excluded in (self.gate_spec or {}).get("not_white_cell_classes", {}).items():
            stacked[head] = without_classes(stacked[head], heads[head]["classes"], excluded)
        primary = spec["primary_head"]
        blast_probabilities = stacked["blast"][:, heads["blast"]["classes"].index("blast")].tolist()
        if primary == "blast":  # the label agrees with the verdict's threshold, not only the argmax
            blast_threshold = self.verdict_spec["blast_threshold"]
            labels = ["blast" if probability >= blast_threshold else "normal" for probability in blast_probabilities]
        else:
            labels = [heads[primary]["classes"][best] for best in stacked[primary].argmax(axis=1).tolist()]
        scores = {head: stacked[head].tolist() for head in heads}  # Python floats for all cells in one step
        cells = []
        for index, instance in enumerate(instances):
            head_scores = {head: dict(zip(heads[head]["classes"], scores[head][index])) for head in heads}
            label, blast_probability = labels[index], blast_probabilities[index]
            cells.append(
                Cell(
                    id=index + 1,
                    box=instance.box,
                    mask=instance.mask,
                    nucleus_mask=instance.nucleus_mask,
                    label=label,
                    scores=head_scores[primary],
                    blast_probability=blast_probability,
                    head_scores=head_scores,
                    found_box=instance.found_box,
                )
            )
        return cells
