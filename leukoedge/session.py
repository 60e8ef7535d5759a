"""Field-validation sessions: record what leukoedge sees on a source, summarize it, and compare the
summary with a hematologist's count of the same smear.

A session folder holds:
    frames/            every save_every-th frame, PNG
    overlays/          the same frames with the cells drawn (draw_overlay), PNG
    results.jsonl      one JSON object per frame: index, timestamp, verdict, timings, cells (no masks)
    cells.csv          one row per cell: frame, id, box, areas, label, blast_probability, and for each
                       head its top class and that class's probability ({head}_class, {head}_class_probability)
    timings.csv        one row per frame: milliseconds per stage
    summary.json       written when the session ends, however it ends
    summary.html       the same for a reader, with a plot (summary_plot.png) and overlay thumbnails
    review.json        written by review_session once the hematologist's count is in

Per-frame files are appended and flushed frame by frame, so a session stopped by Ctrl-C, SIGTERM or
a failing camera keeps every frame it recorded. Only numpy, OpenCV and the standard library are
needed; matplotlib draws the plot where it is installed.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import cv2
import numpy as np

from .capture import Frame, FrameSource, ThreadedReader, open_source
from .errors import InvalidFrameError, LeukoedgeError
from .result import Result, Timings, draw_overlay

if TYPE_CHECKING:
    from .detector import Detector

log = logging.getLogger("leukoedge.session")

# end_to_end: from the frame's grab to its result, time spent waiting for the detector included.
STAGES = (*Timings(capture_ms=0.0).as_dict(), "end_to_end")
RESULTS_FILE, CELLS_FILE, TIMINGS_FILE = "results.jsonl", "cells.csv", "timings.csv"
SUMMARY_FILE, SUMMARY_HTML, SUMMARY_PLOT, REVIEW_FILE = "summary.json", "summary.html", "summary_plot.png", "review.json"
POLL_S = 0.5  # how long the loop waits for a frame before it looks at the stop request again


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n (z 1.96: 95 %); (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"expected 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    proportion = successes / n
    denominator = 1.0 + z * z / n
    centre = (proportion + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def _iso(wall_time: float) -> str:
    return datetime.fromtimestamp(wall_time, timezone.utc).isoformat(timespec="seconds")


# --- reading frames ------------------------------------------------------------------------------


class SequentialReader:
    """Every frame of a finite source (video file, image folder) in order, behind ThreadedReader's
    get / stop / stats, so a recording gives the same session on a fast machine and a slow one."""

    def __init__(self, source: FrameSource) -> None:
        self._source = source
        self._frames = self._size_changes = 0
        self._last_size: tuple[int, int] | None = None

    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None at the end (a file never keeps the caller waiting, so timeout is unused)."""
        frame = self._source.read()
        if frame is not None:
            size = frame.image.shape[:2]
            if self._last_size is not None and size != self._last_size:
                self._size_changes += 1
            self._last_size = size
            self._frames += 1
        return frame

    def stop(self) -> None:
        self._source.close()

    def stats(self) -> dict[str, int | str | None]:
        return {
            "frames": self._frames,
            "dropped": 0,
            "reconnects": 0,
            "size_changes": self._size_changes,
            "skipped": self._source.skipped,
            "last_error": None,
        }


def open_reader(uri: str | int | Path, **source_options: Any) -> ThreadedReader | SequentialReader:
    """Cameras and streams through a ThreadedReader (newest frame, re-opened when they fail);
    files and folders frame by frame. source_options go to open_source. Raises CaptureError."""
    source = open_source(uri, **source_options)
    if not source.live:
        return SequentialReader(source)
    opened = [source]
    # ThreadedReader opens its source at once: hand it this one rather than opening the camera twice.
    return ThreadedReader(lambda: opened.pop() if opened else open_source(uri, **source_options))


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event the first Ctrl-C (SIGINT) or SIGTERM sets, so the frame in progress finishes and the
    session is written. A second signal acts as it would have (KeyboardInterrupt, termination).
    Outside the main thread no handler can be installed; the Event is then only set by its owner."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    # A signal the parent process set to be ignored (a shell's background job) stays ignored.
    previous = {
        number: handler
        for number in (signal.SIGINT, signal.SIGTERM)
        if (handler := signal.getsignal(number)) is not signal.SIG_IGN
    }

    def request_stop(number: int, _frame: object) -> None:
        stop.set()
        signal.signal(number, previous[number] or signal.SIG_DFL)

    for number in previous:
        signal.signal(number, request_stop)
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler or signal.SIG_DFL)


# --- recording -----------------------------------------------------------------------------------


class SessionRecorder:
    """Writes a session folder frame by frame; finish() adds summary.json and summary.html.

    heads maps each classifier head to its class names; cell.label is the primary head's call
    (for the blast head: blast_probability >= the bundle's threshold), the other heads count their
    top class.
    """

    def __init__(
        self,
        folder: str | Path,
        heads: Mapping[str, Sequence[str]],
        primary_head: str,
        *,
        save_every: int = 10,
        source: str = "",
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be at least 1; got {save_every}")
        if primary_head not in heads:
            raise ValueError(f"primary head {primary_head!r} is not one of the heads {list(heads)}")
        self.folder = Path(folder)
        if (self.folder / RESULTS_FILE).exists():
            raise LeukoedgeError(f"{self.folder} already holds a session ({RESULTS_FILE}); a session is never overwritten: choose a new folder")
        for name in ("frames", "overlays"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        self.heads = {head: list(classes) for head, classes in heads.items()}
        self.primary_head = primary_head
        self.save_every = save_every
        self.source = source
        self.frames_processed = self.frames_refused = 0
        self.cell_count = self.blast_count = self.flagged_frames = 0
        self.class_counts = {head: dict.fromkeys(classes, 0) for head, classes in self.heads.items()}
        self.stage_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.per_frame: list[dict[str, Any]] = []  # index, elapsed_s, latency and cell counts: the plot
        self.saved: list[dict[str, Any]] = []  # frames written to frames/ and overlays/: the thumbnail table
        self.bundle: dict[str, Any] = {}
        self.summary: dict[str, Any] | None = None
        self._started_wall, self._started = time.time(), time.monotonic()
        self._last_record = self._started
        self._results = (self.folder / RESULTS_FILE).open("w", encoding="utf-8")
        self._cells_file = (self.folder / CELLS_FILE).open("w", encoding="utf-8", newline="")
        self._timings_file = (self.folder / TIMINGS_FILE).open("w", encoding="utf-8", newline="")
        self._cells = csv.writer(self._cells_file)
        self._timings = csv.writer(self._timings_file)
        # {head}_class_probability: "{head}_probability" would collide with blast_probability for the blast head.
        head_columns = [column for head in self.heads for column in (f"{head}_class", f"{head}_class_probability")]
        self._cells.writerow(["frame", "id", "x0", "y0", "x1", "y1", "area_px", "nucleus_area_px", "label", "blast_probability", *head_columns])
        self._timings.writerow(["frame", "timestamp", *(f"{stage}_ms" for stage in STAGES)])

    @classmethod
    def for_detector(cls, folder: str | Path, detector: Detector, *, save_every: int = 10, source: str = "") -> SessionRecorder:
        """A recorder for the heads and class names of the detector's bundle."""
        spec = detector.classifier_spec
        heads = {head: head_spec["classes"] for head, head_spec in spec["heads"].items()}
        return cls(folder, heads, spec["primary_head"], save_every=save_every, source=source)

    @property
    def frames_recorded(self) -> int:
        """Frames with a result plus frames the detector refused."""
        return self.frames_processed + self.frames_refused

    @property
    def fps(self) -> float:
        """Frames processed per second since the session started."""
        elapsed = self._last_record - self._started
        return self.frames_processed / elapsed if elapsed > 0 else 0.0

    @property
    def blast_fraction(self) -> float | None:
        """Blasts among all cells so far; None before the first cell."""
        return self.blast_count / self.cell_count if self.cell_count else None

    def record(self, frame: Frame, result: Result) -> None:
        """Append one frame's result to every per-frame file; save the frame and its overlay every save_every-th frame."""
        now = time.monotonic()
        timings = {**result.timings, "end_to_end": (now - frame.timestamp) * 1000.0}
        files = self._save_images(frame, result) if self.frames_processed % self.save_every == 0 else {"frame_file": None, "overlay_file": None}
        grabbed_wall = self._wall_time(frame.timestamp)
        elapsed_s = frame.timestamp - self._started
        record = {
            "index": frame.index,
            "timestamp": grabbed_wall,
            "elapsed_s": elapsed_s,
            "frame_shape": list(result.frame_shape),
            "verdict": result.verdict.to_dict(),
            "timings": timings,
            "cells": [cell.to_dict() for cell in result.cells],
            **files,
        }
        self._write_line(record)
        for cell in result.cells:
            top = {head: max(cell.head_scores[head].items(), key=lambda item: item[1]) for head in self.heads}
            head_values = [value for head in self.heads for value in (top[head][0], f"{top[head][1]:.4f}")]
            self._cells.writerow([frame.index, cell.id, *cell.box, cell.area_px, cell.nucleus_area_px, cell.label, f"{cell.blast_probability:.4f}", *head_values])
            for head, (class_name, _) in top.items():
                counted = cell.label if head == self.primary_head else class_name
                self.class_counts[head][counted] = self.class_counts[head].get(counted, 0) + 1
        self._timings.writerow([frame.index, f"{grabbed_wall:.3f}", *(f"{timings[s]:.2f}" if s in timings else "" for s in STAGES)])
        for file in (self._cells_file, self._timings_file):
            file.flush()

        verdict = result.verdict
        self.frames_processed += 1
        self.cell_count += verdict.cell_count
        self.blast_count += verdict.blast_count
        self.flagged_frames += bool(verdict.flagged)
        for stage, ms in timings.items():
            self.stage_ms.setdefault(stage, []).append(ms)
        self.per_frame.append(
            {"index": frame.index, "elapsed_s": elapsed_s, "total_ms": timings["total"], "end_to_end_ms": timings["end_to_end"],
             "cells": verdict.cell_count, "blasts": verdict.blast_count}
        )
        if files["overlay_file"] is not None:
            labels = dict(Counter(cell.label for cell in result.cells))
            self.saved.append({**files, "index": frame.index, "elapsed_s": elapsed_s, "cells": verdict.cell_count, "blasts": verdict.blast_count, "labels": labels})
        self.bundle = {"name": result.bundle_name, "model_version": result.model_version, "blast_threshold": verdict.blast_threshold}
        self._last_record = time.monotonic()

    def record_refusal(self, frame: Frame, error: LeukoedgeError) -> None:
        """A frame the detector refused (InvalidFrameError): one results line with the error, no cells."""
        self._write_line({"index": frame.index, "timestamp": self._wall_time(frame.timestamp), "error": str(error)})
        self.frames_refused += 1
        self._last_record = time.monotonic()

    def progress_line(self, show_timings: bool = False) -> str:
        """frames, fps, cells, blast fraction so far; with show_timings the median ms per stage."""
        fraction = "-" if self.blast_fraction is None else f"{self.blast_fraction:.1%}"
        line = f"frames {self.frames_processed}  {self.fps:.1f} fps  cells {self.cell_count}  blasts {self.blast_count} ({fraction})"
        if self.frames_refused:
            line += f"  refused {self.frames_refused}"
        if show_timings:
            line += "  ms " + " ".join(f"{stage} {np.median(values):.0f}" for stage, values in self.stage_ms.items() if values)
        return line

    def finish(self, capture_stats: Mapping[str, Any], stopped_by: str) -> dict[str, Any]:
        """Close the per-frame files and write summary.json and summary.html; returns the summary.
        A second call returns the first summary."""
        if self.summary is not None:
            return self.summary
        for file in (self._results, self._cells_file, self._timings_file):
            file.close()
        ended_wall = time.time()
        low, high = wilson_interval(self.blast_count, self.cell_count)
        self.summary = {
            "source": self.source,
            "bundle": self.bundle,
            "started": _iso(self._started_wall),
            "ended": _iso(ended_wall),
            "duration_s": ended_wall - self._started_wall,
            "stopped_by": stopped_by,
            "frames_processed": self.frames_processed,
            "frames_refused": self.frames_refused,
            "frames_saved": len(self.saved),
            "save_every": self.save_every,
            "fps": self.fps,
            "dropped_frames": int(capture_stats.get("dropped", 0)),
            "reconnects": int(capture_stats.get("reconnects", 0)),
            "capture": dict(capture_stats),
            "cells": self.cell_count,
            "blasts": self.blast_count,
            "blast_fraction": self.blast_fraction,
            "blast_fraction_ci95": [low, high],
            "flagged_frames": self.flagged_frames,
            "class_counts": self.class_counts,
            "latency_ms": {
                stage: {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "frames": len(values)}
                for stage, values in self.stage_ms.items()
                if values
            },
        }
        temporary = self.folder / (SUMMARY_FILE + ".partial")
        temporary.write_text(json.dumps(self.summary, indent=2), encoding="utf-8")
        temporary.replace(self.folder / SUMMARY_FILE)  # a reader never sees half a summary
        write_summary_html(self.folder, self.summary, self.per_frame, self.saved)
        return self.summary

    def _save_images(self, frame: Frame, result: Result) -> dict[str, str]:
        frame_file, overlay_file = f"frames/frame_{frame.index:06d}.png", f"overlays/frame_{frame.index:06d}.png"
        for relative, image in ((frame_file, frame.image), (overlay_file, draw_overlay(frame.image, result))):
            if not cv2.imwrite(str(self.folder / relative), image):
                raise LeukoedgeError(f"cannot write {self.folder / relative}: check the disk space and permissions")
        return {"frame_file": frame_file, "overlay_file": overlay_file}

    def _write_line(self, record: dict[str, Any]) -> None:
        self._results.write(json.dumps(record) + "\n")
        self._results.flush()

    @staticmethod
    def _wall_time(monotonic_time: float) -> float:
        """Frame timestamps are time.monotonic(); the files carry wall-clock seconds (Unix time)."""
        return time.time() - (time.monotonic() - monotonic_time)


def run_session(
    detector: Detector,
    reader: ThreadedReader | SequentialReader,
    recorder: SessionRecorder,
    *,
    max_frames: int | None = None,
    stop: threading.Event | None = None,
    on_frame: Callable[[SessionRecorder], None] | None = None,
) -> dict[str, Any]:
    """Run the detector on the reader's frames until the source ends, max_frames are recorded or
    stop is set; refused frames are recorded and skipped. The reader is stopped and the summary
    written however the loop ends (an error still propagates after that). Returns the summary."""
    stopped_by = "end of source"
    try:
        while True:
            if stop is not None and stop.is_set():
                stopped_by = "interrupted"
                break
            if max_frames is not None and recorder.frames_recorded >= max_frames:
                stopped_by = "frame limit"
                break
            try:
                frame = reader.get(timeout=POLL_S)
            except TimeoutError:
                continue  # no frame yet: look at the stop request again
            if frame is None:
                break
            try:
                result = detector.run(frame.image, capture_ms=frame.capture_ms)
            except InvalidFrameError as error:  # one bad frame must not end a field session
                log.warning("frame %d refused: %s", frame.index, error)
                recorder.record_refusal(frame, error)
                continue
            recorder.record(frame, result)
            if on_frame is not None:
                on_frame(recorder)
    except BaseException as error:
        stopped_by = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise
    finally:
        reader.stop()
        summary = recorder.finish(reader.stats(), stopped_by)
    return summary


def capture_session(
    source: str | int | Path,
    detector: Detector,
    folder: str | Path,
    *,
    max_frames: int | None = None,
    save_every: int = 10,
    on_frame: Callable[[SessionRecorder], None] | None = None,
) -> dict[str, Any]:
    """Record a session from a source URI into folder until the source ends, max_frames, Ctrl-C or
    SIGTERM; returns the summary. Raises CaptureError when the source cannot be opened or fails
    for good (the session recorded until then is written first)."""
    reader = open_reader(source)
    try:
        recorder = SessionRecorder.for_detector(folder, detector, save_every=save_every, source=str(source))
    except BaseException:
        reader.stop()
        raise
    with stop_on_signals() as stop:
        return run_session(detector, reader, recorder, max_frames=max_frames, stop=stop, on_frame=on_frame)


class ProgressDisplay:
    """The recorder's progress_line, rewritten in place (\\r) on a terminal at most every interval_s;
    on a pipe or a log file a new line every pipe_interval_s. Pass it as on_frame."""

    def __init__(self, stream: TextIO | None = None, *, show_timings: bool = False, interval_s: float = 0.25, pipe_interval_s: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.show_timings = show_timings
        self.terminal = self.stream.isatty()
        self.interval_s = interval_s if self.terminal else pipe_interval_s
        self._shown_at: float | None = None
        self._width = 0

    def __call__(self, recorder: SessionRecorder) -> None:
        now = time.monotonic()
        if self._shown_at is not None and now - self._shown_at < self.interval_s:
            return
        self._shown_at = now
        line = recorder.progress_line(self.show_timings)
        if self.terminal:
            self.stream.write("\r" + line.ljust(self._width))  # pad over a longer previous line
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the status line so the next output starts on a line of its own."""
        if self.terminal and self._shown_at is not None:
            self.stream.write("\n")
            self.stream.flush()


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines for a terminal: frames, capture faults, cells, blast fraction with its interval, latency."""
    low, high = summary["blast_fraction_ci95"]
    fraction = "-" if summary["blast_fraction"] is None else f"{summary['blast_fraction']:.1%} (95 % CI {low:.1%} to {high:.1%})"
    lines = [
        f"frames processed {summary['frames_processed']} (refused {summary['frames_refused']}, dropped {summary['dropped_frames']}, "
        f"reconnects {summary['reconnects']}), {summary['fps']:.1f} fps, stopped by: {summary['stopped_by']}",
        f"cells {summary['cells']}, blasts {summary['blasts']}: blast fraction {fraction}",
    ]
    latency = summary["latency_ms"]
    if latency:
        lines.append("latency ms (median / p95): " + ", ".join(f"{stage} {v['median']:.0f} / {v['p95']:.0f}" for stage, v in latency.items()))
    return "\n".join(lines)


# --- the report ----------------------------------------------------------------------------------


def plot_session(path: Path, per_frame: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """PNG of per-frame latency and blast fraction (with the running session fraction and its interval).
    Raises ImportError naming the package when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the session plot needs matplotlib: pip install matplotlib") from error

    index = [frame["index"] for frame in per_frame]
    figure = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas, without pyplot touching a host application's backend
    latency_axes, fraction_axes = figure.subplots(2, 1, sharex=True)
    latency_axes.plot(index, [frame["total_ms"] for frame in per_frame], ".-", label="Detector.run total")
    latency_axes.plot(index, [frame["end_to_end_ms"] for frame in per_frame], ".-", label="grab to result")
    latency_axes.set_ylabel("latency (ms)")
    latency_axes.legend(loc="upper right")
    with_cells = [frame for frame in per_frame if frame["cells"]]
    fraction_axes.plot([f["index"] for f in with_cells], [f["blasts"] / f["cells"] for f in with_cells], "o", alpha=0.5, label="per frame")
    cells, blasts = np.cumsum([f["cells"] for f in per_frame]), np.cumsum([f["blasts"] for f in per_frame])
    running = np.divide(blasts, cells, out=np.full(len(cells), np.nan), where=cells > 0)
    fraction_axes.plot(index, running, "-", label="session so far")
    if summary["cells"]:
        fraction_axes.axhspan(*summary["blast_fraction_ci95"], alpha=0.15, label="session 95 % CI")
    fraction_axes.set_ylim(-0.02, 1.02)
    fraction_axes.set_ylabel("blast fraction")
    fraction_axes.set_xlabel("frame")
    fraction_axes.legend(loc="upper right")
    figure.savefig(path)


def write_summary_html(folder: Path, summary: Mapping[str, Any], per_frame: Sequence[Mapping[str, Any]], saved: Sequence[Mapping[str, Any]]) -> Path:
    """summary.html: the key numbers, latency per stage, counts per class, the plot (summary_plot.png,
    when matplotlib is installed) and a table of overlay thumbnails with a column for the reviewer's count."""
    if per_frame:
        try:
            plot_session(folder / SUMMARY_PLOT, per_frame, summary)
            plot = f'<img src="{SUMMARY_PLOT}" alt="per-frame latency and blast fraction">'
        except ImportError as error:
            log.warning("%s; summary.html is written without it", error)
            plot = f"<p>No plot: {html.escape(str(error))}.</p>"
    else:
        plot = "<p>No plot: no frame was processed.</p>"
    low, high = summary["blast_fraction_ci95"]
    fraction = "- (no cells)" if summary["blast_fraction"] is None else f"{summary['blast_fraction']:.1%} (95 % CI {low:.1%} to {high:.1%})"
    key_numbers = [
        ("source", summary["source"]),
        ("bundle", f"{summary['bundle'].get('name', '-')} {summary['bundle'].get('model_version', '')}"),
        ("started / ended (UTC)", f"{summary['started']} / {summary['ended']}"),
        ("stopped by", summary["stopped_by"]),
        ("frames processed", f"{summary['frames_processed']} ({summary['fps']:.1f} frames/s)"),
        ("frames refused / dropped / reconnects", f"{summary['frames_refused']} / {summary['dropped_frames']} / {summary['reconnects']}"),
        ("cells / blasts", f"{summary['cells']} / {summary['blasts']}"),
        ("blast fraction", fraction),
        ("frames flagged", summary["flagged_frames"]),
    ]
    latency_rows = [(stage, f"{v['median']:.1f}", f"{v['p95']:.1f}") for stage, v in summary["latency_ms"].items()]
    count_rows = [(head, class_name, count) for head, counts in summary["class_counts"].items() for class_name, count in counts.items()]
    thumbnail_rows = [
        (
            saved_frame["index"],
            f"{saved_frame['elapsed_s']:.1f}",
            f'<a href="{saved_frame["overlay_file"]}"><img src="{saved_frame["overlay_file"]}" width="320" loading="lazy" alt="overlay"></a>'
            f'<br><a href="{saved_frame["frame_file"]}">frame without overlay</a>',
            saved_frame["cells"],
            saved_frame["blasts"],
            html.escape(", ".join(f"{label} {n}" for label, n in sorted(saved_frame["labels"].items())) or "-"),
            "",
        )
        for saved_frame in saved
    ]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>leukoedge session: {html.escape(folder.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}} .note{{color:#555;max-width:60em}}</style>
</head><body>
<h1>leukoedge session: {html.escape(folder.name)}</h1>
{_table(("", "value"), [(name, html.escape(str(value))) for name, value in key_numbers], escape=False)}
<p class="note">Each processed frame counts the cells in it: a field that stays under the camera for several
frames counts its cells several times, and the interval, which treats every cell as independent, is then too
narrow. Compare with a manual count of the same fields: <code>python examples/capture_session.py review
{html.escape(str(folder))} --blasts N --total M</code>.</p>
<h2>Latency per stage (ms)</h2>
{_table(("stage", "median", "p95"), latency_rows)}
<h2>Cells per class</h2>
<p class="note">The primary head counts the label (for blast: probability at or above the bundle's threshold);
the other heads count their most probable class.</p>
{_table(("head", "class", "cells"), count_rows)}
<h2>Per frame</h2>
{plot}
<h2>Saved frames (one processed frame in {summary['save_every']})</h2>
{_table(("frame", "seconds", "overlay", "cells", "blasts", "labels", "reviewer's count"), thumbnail_rows, escape=False)}
</body></html>
"""
    path = folder / SUMMARY_HTML
    path.write_text(page, encoding="utf-8")
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], escape: bool = True) -> str:
    def cell(value: Any) -> str:
        return html.escape(str(value)) if escape else str(value)

    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


# --- review --------------------------------------------------------------------------------------


def review_session(folder: str | Path, blasts: int, total: int) -> dict[str, Any]:
    """Compare the session's blast fraction with a hematologist's count of `blasts` blasts among
    `total` white cells; writes review.json and returns it. difference is leukoedge minus hematologist."""
    if total <= 0 or not 0 <= blasts <= total:
        raise LeukoedgeError(f"expected a hematologist's count with 0 <= blasts <= total and total > 0; got blasts={blasts}, total={total}")
    folder = Path(folder)
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        raise LeukoedgeError(f"{summary_path} not found: expected the folder of a finished session")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    hematologist_fraction = blasts / total
    fraction = summary["blast_fraction"]
    low, high = summary["blast_fraction_ci95"]
    found_cells = fraction is not None
    review = {
        "session": str(folder),
        "reviewed": _iso(time.time()),
        "hematologist": {"blasts": blasts, "total": total, "blast_fraction": hematologist_fraction, "blast_fraction_ci95": list(wilson_interval(blasts, total))},
        "leukoedge": {"blasts": summary["blasts"], "cells": summary["cells"], "blast_fraction": fraction, "blast_fraction_ci95": [low, high]},
        "difference": fraction - hematologist_fraction if found_cells else None,
        "hematologist_within_leukoedge_ci": low <= hematologist_fraction <= high if found_cells else None,
        "cell_count_ratio": summary["cells"] / total,
    }
    (folder / REVIEW_FILE).write_text(json.dumps(review, indent=2), encoding="utf-8")
    return review


def format_review(review: Mapping[str, Any]) -> str:
    """The agreement in a few lines for a terminal."""
    hematologist, leukoedge = review["hematologist"], review["leukoedge"]
    lines = [f"hematologist: {hematologist['blasts']} blasts of {hematologist['total']} cells = {hematologist['blast_fraction']:.1%}"]
    if leukoedge["blast_fraction"] is None:
        lines.append("leukoedge:    no cells found in the session: nothing to compare")
    else:
        low, high = leukoedge["blast_fraction_ci95"]
        verdict = "within" if review["hematologist_within_leukoedge_ci"] else "OUTSIDE"
        lines += [
            f"leukoedge:    {leukoedge['blasts']} blasts of {leukoedge['cells']} cells = {leukoedge['blast_fraction']:.1%} (95 % CI {low:.1%} to {high:.1%})",
            f"difference (leukoedge - hematologist): {review['difference']:+.1%}; the hematologist's fraction is {verdict} leukoedge's interval",
        ]
    lines.append(f"cell count ratio (leukoedge / hematologist): {review['cell_count_ratio']:.2f}")
    return "\n".join(lines)
