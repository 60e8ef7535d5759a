"""Field-validation sessions: record what leukoedge sees on a source, summarize it, and compare the
summary with a hematologist's count of the same smear.

A session folder holds:
    session.json       written first: source, heads and class names, save_every, start time
    frames/            every save_every-th frame, PNG
    overlays/          the same frames with the cells drawn (draw_overlay), PNG
    results.jsonl      one JSON object per frame: index, timestamp, bundle, verdict, timings, cells (no masks)
    cells.csv          one row per cell: frame, id, box, areas, label, blast_probability, and for each
                       head its top class and that class's probability ({head}_class, {head}_class_probability)
    timings.csv        one row per frame: milliseconds per stage
    summary.json       written when the session ends, however it ends; ended_early and stopped_by say
                       whether it ran to its end and why not
    summary.html       the same for a reader, with a plot (summary_plot.png) and overlay thumbnails
    review.json        written by review_session once the hematologist's count is in
    .summary-reserve   space held back while recording, given up so the summary fits on a disk that filled

What a reader can rely on, whatever stopped the session (Ctrl-C, SIGTERM, a failing camera, a full
disk, SIGKILL, a power cut):
- A frame's lines are written whole or not at all, in cells.csv, timings.csv and results.jsonl
  together: a write that fails is cut back, and the session ends with StorageError.
- results.jsonl is the record; the other files are views of it. A session killed before its summary
  is rebuilt from it by repair_session (review_session does so on its own).
- results.jsonl is synced to disk at least every SYNC_INTERVAL_S, and when the session ends.
Only numpy, OpenCV and the standard library are needed; matplotlib draws the plot where it is installed.
"""

from __future__ import annotations

import csv
import errno
import html
import io
import json
import logging
import math
import os
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
from .errors import InvalidFrameError, LeukoedgeError, StorageError
from .result import Result, Timings, draw_overlay

if TYPE_CHECKING:
    from .detector import Detector

log = logging.getLogger("leukoedge.session")

# end_to_end: from the frame's grab to its result, time spent waiting for the detector included.
STAGES = (*Timings(capture_ms=0.0).as_dict(), "end_to_end")
RESULTS_FILE, CELLS_FILE, TIMINGS_FILE = "results.jsonl", "cells.csv", "timings.csv"
SUMMARY_FILE, SUMMARY_HTML, SUMMARY_PLOT, REVIEW_FILE = "summary.json", "summary.html", "summary_plot.png", "review.json"
SESSION_FILE, RESERVE_FILE = "session.json", ".summary-reserve"
# summary.json takes a few kB, the plot about 100 kB, summary.html about 0.4 kB per saved frame:
# 1 MiB holds them for a session of a few thousand saved frames.
RESERVE_BYTES = 1 << 20
# An fsync per frame costs milliseconds on a Jetson's eMMC or SD card; once a second bounds what a
# power cut can take. A crash of the process alone loses nothing: written lines are in the page cache.
SYNC_INTERVAL_S = 1.0
POLL_S = 0.5  # how long the loop waits for a frame before it looks at the stop request again
NORMAL_STOPS = ("end of source", "frame limit", "interrupted")  # any other stopped_by: the session ended early
STOPPED_UNRECORDED = "not recorded: the session ended without its summary (killed or power lost); rebuilt from results.jsonl"


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


# --- writing files that a full disk cannot leave half written -----------------------------------


def _why(error: OSError) -> str:
    return error.strerror or str(error)


def write_file(path: Path, data: bytes) -> None:
    """Write a whole file or none: a partial one is removed. Raises StorageError naming the path."""
    try:
        with open(path, "wb") as file:
            file.write(data)
    except OSError as error:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or read-only: nothing was left to remove
        raise StorageError(f"cannot write {path}: {_why(error)}") from error


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so a reader finds the old file or the whole new one."""
    temporary = path.with_name(path.name + ".partial")
    write_file(temporary, data)
    try:
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {_why(error)}") from error


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode in memory and write the file checked: cv2.imwrite only returns False on a full disk
    (after libpng's "Write Error") and can leave a truncated PNG behind."""
    encoded, data = cv2.imencode(".png", image)
    if not encoded:
        raise LeukoedgeError(f"OpenCV cannot encode a {image.shape} {image.dtype} image as PNG for {path}")
    write_file(path, data.tobytes())


class RecordFile:
    """An append-only file written line by line through the file descriptor, with its size kept, so
    the lines of a frame that fail part-way (a filling disk first writes short) can be cut back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as error:
            raise StorageError(f"cannot create {path}: {_why(error)}") from error
        self.size = 0
        self._synced_at = time.monotonic()

    def append(self, text: str) -> None:
        """Raises OSError; the caller cuts back."""
        data = text.encode("utf-8")
        written = 0
        while written < len(data):
            count = os.write(self._fd, data[written:])
            if count == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += count
        self.size += len(data)

    def cut_back(self, size: int) -> None:
        os.ftruncate(self._fd, size)  # frees space, so it works on a full disk too
        self.size = size

    def sync(self, interval_s: float = 0.0) -> None:
        if time.monotonic() - self._synced_at >= interval_s:
            os.fsync(self._fd)
            self._synced_at = time.monotonic()

    def close(self) -> None:
        """Sync and close; raises OSError when the data may not have reached the disk."""
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)


def _reserve_space(path: Path, size: int) -> None:
    """Hold `size` bytes of the disk in a file, given back when the summary is written."""
    try:
        with open(path, "wb") as file:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(file.fileno(), 0, size)
            else:
                file.write(bytes(size))
    except OSError as error:
        path.unlink(missing_ok=True)
        raise StorageError(f"cannot start a session in {path.parent}: {_why(error)} (it needs at least {size >> 10} kB free)") from error


def _csv_line(row: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue()


def _top_classes(cell: Mapping[str, Any], heads: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, float]]:
    return {head: max(cell["head_scores"][head].items(), key=lambda item: item[1]) for head in heads}


def _cells_header(heads: Mapping[str, Sequence[str]]) -> list[str]:
    # {head}_class_probability: "{head}_probability" would collide with blast_probability for the blast head.
    head_columns = [column for head in heads for column in (f"{head}_class", f"{head}_class_probability")]
    return ["frame", "id", "x0", "y0", "x1", "y1", "area_px", "nucleus_area_px", "label", "blast_probability", *head_columns]


def _cells_lines(record: Mapping[str, Any], heads: Mapping[str, Sequence[str]]) -> str:
    """cells.csv lines of one results.jsonl record (none for a refused frame)."""
    lines = []
    for cell in record.get("cells", ()):
        top = _top_classes(cell, heads)
        head_values = [value for head in heads for value in (top[head][0], f"{top[head][1]:.4f}")]
        lines.append(_csv_line([record["index"], cell["id"], *cell["box"], cell["area_px"], cell["nucleus_area_px"], cell["label"], f"{cell['blast_probability']:.4f}", *head_values]))
    return "".join(lines)


def _timings_header() -> list[str]:
    return ["frame", "timestamp", *(f"{stage}_ms" for stage in STAGES)]


def _timings_line(record: Mapping[str, Any]) -> str:
    """The timings.csv line of one results.jsonl record (none for a refused frame)."""
    if "timings" not in record:
        return ""
    timings = record["timings"]
    return _csv_line([record["index"], f"{record['timestamp']:.3f}", *(f"{timings[s]:.2f}" if s in timings else "" for s in STAGES)])


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


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the summary is written, then act as they would have: a second
    Ctrl-C, pressed because the first seemed slow, must not leave summary.html half drawn.
    Outside the main thread no handler can be installed, and none is needed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        number: handler
        for number in (signal.SIGINT, signal.SIGTERM)
        if (handler := signal.getsignal(number)) is not signal.SIG_IGN
    }
    pending: list[int] = []

    def hold(number: int, _frame: object) -> None:
        log.warning("%s while the session summary is written: finishing it first", signal.Signals(number).name)
        pending.append(number)

    for number in previous:
        signal.signal(number, hold)
    finished = False
    try:
        yield
        finished = True
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler or signal.SIG_DFL)
        if finished:  # an error already on its way out ends the process anyway
            for number in pending:
                signal.raise_signal(number)


# --- recording -----------------------------------------------------------------------------------


class SessionTally:
    """A session's numbers, added up from its results.jsonl records one by one: the recorder keeps one
    as it records, repair_session rebuilds one from the file, and both give the same summary."""

    def __init__(self, heads: Mapping[str, Sequence[str]], primary_head: str) -> None:
        self.heads = {head: list(classes) for head, classes in heads.items()}
        self.primary_head = primary_head
        self.frames_processed = self.frames_refused = self.frames_not_judged = 0
        self.cell_count = self.blast_count = self.flagged_frames = 0
        self.not_judged: Counter[str] = Counter()  # frames not judged, by verdict status (no_cells, outside_domain, ...)
        self.last_index = -1
        self.class_counts = {head: dict.fromkeys(classes, 0) for head, classes in self.heads.items()}
        self.stage_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.per_frame: list[dict[str, Any]] = []  # index, elapsed_s, latency and cell counts: the plot
        self.saved: list[dict[str, Any]] = []  # frames written to frames/ and overlays/: the thumbnail table
        self.bundle: dict[str, Any] = {}

    @property
    def blast_fraction(self) -> float | None:
        return self.blast_count / self.cell_count if self.cell_count else None

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one results.jsonl record: a processed frame, or a refused one (with "error")."""
        self.last_index = max(self.last_index, record["index"])
        if "error" in record:
            self.frames_refused += 1
            return
        verdict, timings = record["verdict"], record["timings"]
        self.frames_processed += 1
        status = verdict.get("status", "ok")
        self.frames_not_judged += status != "ok"
        if status != "ok":
            self.not_judged[status] += 1
        self.cell_count += verdict["cell_count"]
        self.blast_count += verdict["blast_count"]
        self.flagged_frames += bool(verdict["flagged"])
        for cell in record["cells"]:
            for head, (class_name, _) in _top_classes(cell, self.heads).items():
                counted = cell["label"] if head == self.primary_head else class_name
                self.class_counts[head][counted] = self.class_counts[head].get(counted, 0) + 1
        for stage, ms in timings.items():
            self.stage_ms.setdefault(stage, []).append(ms)
        counts = {"cells": verdict["cell_count"], "blasts": verdict["blast_count"]}
        self.per_frame.append({"index": record["index"], "elapsed_s": record["elapsed_s"], "total_ms": timings["total"], "end_to_end_ms": timings["end_to_end"], **counts})
        if record.get("overlay_file") is not None:
            labels = dict(Counter(cell["label"] for cell in record["cells"]))
            files = {"frame_file": record["frame_file"], "overlay_file": record["overlay_file"]}
            verdict_text = "FLAGGED" if verdict["flagged"] else "not flagged" if status == "ok" else f"not judged: {status}"
            self.saved.append({**files, "index": record["index"], "elapsed_s": record["elapsed_s"], **counts, "labels": labels, "verdict": verdict_text})
        self.bundle = {**record.get("bundle", {}), "blast_threshold": verdict["blast_threshold"]}

    def summary(self, header: Mapping[str, Any], ended_wall: float, fps: float, capture_stats: Mapping[str, Any], stopped_by: str) -> dict[str, Any]:
        """summary.json; header is session.json's content."""
        low, high = wilson_interval(self.blast_count, self.cell_count)
        return {
            "source": header["source"],
            "bundle": self.bundle,
            "started": _iso(header["started"]),
            "ended": _iso(ended_wall),
            "duration_s": ended_wall - header["started"],
            "stopped_by": stopped_by,
            "ended_early": stopped_by not in NORMAL_STOPS,
            "frames_processed": self.frames_processed,
            "frames_refused": self.frames_refused,
            "frames_not_judged": self.frames_not_judged,
            "frames_not_judged_by_status": dict(sorted(self.not_judged.items())),
            "frames_saved": len(self.saved),
            "save_every": header["save_every"],
            "fps": fps,
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


class SessionRecorder:
    """Writes a session folder frame by frame; finish() adds summary.json and summary.html.

    heads maps each classifier head to its class names; cell.label is the primary head's call
    (for the blast head: blast_probability >= the bundle's threshold), the other heads count their
    top class. Every write is checked: a failing one raises StorageError, and the frame it belonged
    to is in none of the files.
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
        if self.folder.exists() and not self.folder.is_dir():
            raise LeukoedgeError(f"{self.folder} is a file: expected a folder (new or empty) for the session")
        if (self.folder / RESULTS_FILE).exists():
            raise LeukoedgeError(f"{self.folder} already holds a session ({RESULTS_FILE}); a session is never overwritten: choose a new folder")
        try:
            for name in ("frames", "overlays"):
                (self.folder / name).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create the session folder {self.folder}: {_why(error)}") from error
        self.tally = SessionTally(heads, primary_head)
        self.heads, self.primary_head = self.tally.heads, primary_head
        self.save_every = save_every
        self.source = source
        self.summary: dict[str, Any] | None = None
        self._started = self._last_record = time.monotonic()
        self.header = {"source": source, "heads": self.tally.heads, "primary_head": primary_head, "save_every": save_every, "started": time.time()}
        _reserve_space(self.folder / RESERVE_FILE, RESERVE_BYTES)
        try:
            write_file_atomically(self.folder / SESSION_FILE, json.dumps(self.header, indent=2).encode("utf-8"))
            self._results = RecordFile(self.folder / RESULTS_FILE)
            self._cells = RecordFile(self.folder / CELLS_FILE)
            self._timings = RecordFile(self.folder / TIMINGS_FILE)
            self._append({self._cells: _csv_line(_cells_header(self.heads)), self._timings: _csv_line(_timings_header())})
        except BaseException:
            (self.folder / RESERVE_FILE).unlink(missing_ok=True)  # a session that never started holds no space
            raise

    @classmethod
    def for_detector(cls, folder: str | Path, detector: Detector, *, save_every: int = 10, source: str = "") -> SessionRecorder:
        """A recorder for the heads and class names of the detector's bundle."""
        spec = detector.classifier_spec
        heads = {head: head_spec["classes"] for head, head_spec in spec["heads"].items()}
        return cls(folder, heads, spec["primary_head"], save_every=save_every, source=source)

    @property
    def frames_processed(self) -> int:
        return self.tally.frames_processed

    @property
    def frames_refused(self) -> int:
        return self.tally.frames_refused

    @property
    def frames_recorded(self) -> int:
        """Frames with a result plus frames the detector refused."""
        return self.tally.frames_processed + self.tally.frames_refused

    @property
    def cell_count(self) -> int:
        return self.tally.cell_count

    @property
    def blast_count(self) -> int:
        return self.tally.blast_count

    @property
    def blast_fraction(self) -> float | None:
        """Blasts among all cells so far; None before the first cell."""
        return self.tally.blast_fraction

    @property
    def fps(self) -> float:
        """Frames processed per second since the session started."""
        elapsed = self._last_record - self._started
        return self.frames_processed / elapsed if elapsed > 0 else 0.0

    def record(self, frame: Frame, result: Result) -> None:
        """Append one frame's result to every per-frame file; save the frame and its overlay every
        save_every-th frame. Raises StorageError when a file cannot be written (nothing of the frame is kept)."""
        now = time.monotonic()
        plain = result.to_dict()
        timings = {**plain["timings"], "end_to_end": (now - frame.timestamp) * 1000.0}
        save = self.frames_processed % self.save_every == 0
        files = self._save_images(frame, result) if save else {"frame_file": None, "overlay_file": None}
        record = {
            "index": frame.index,
            "timestamp": self._wall_time(frame.timestamp),
            "elapsed_s": frame.timestamp - self._started,
            "frame_shape": list(plain["frame_shape"]),
            "bundle": {"name": plain["bundle_name"], "model_version": plain["model_version"]},
            "verdict": plain["verdict"],
            "timings": timings,
            "cells": plain["cells"],
            **files,
        }
        try:
            self._append_record(record)
        except StorageError:
            for relative in files.values():
                if relative is not None:
                    (self.folder / relative).unlink(missing_ok=True)  # an image no record points to
            raise

    def record_refusal(self, frame: Frame, error: LeukoedgeError) -> None:
        """A frame the detector refused (InvalidFrameError): one results line with the error, no cells."""
        self._append_record({"index": frame.index, "timestamp": self._wall_time(frame.timestamp), "error": str(error)})

    def progress_line(self, show_timings: bool = False) -> str:
        """frames, fps, cells, blast fraction so far; with show_timings the median ms per stage."""
        fraction = "-" if self.blast_fraction is None else f"{self.blast_fraction:.1%}"
        line = f"frames {self.frames_processed}  {self.fps:.1f} fps  cells {self.cell_count}  blasts {self.blast_count} ({fraction})"
        if self.frames_refused:
            line += f"  refused {self.frames_refused}"
        if show_timings:
            line += "  ms " + " ".join(f"{stage} {np.median(values):.0f}" for stage, values in self.tally.stage_ms.items() if values)
        return line

    def finish(self, capture_stats: Mapping[str, Any], stopped_by: str) -> dict[str, Any]:
        """Close the per-frame files, give up the reserved space and write summary.json, then
        summary.html; returns the summary. A second call returns the first summary.
        Raises StorageError when either cannot be written (summary.json first: review needs only it)."""
        if self.summary is not None:
            return self.summary
        for file in (self._results, self._cells, self._timings):
            try:
                file.close()
            except OSError as error:
                log.error("%s may not be complete on disk: %s", file.path, _why(error))
        self.summary = self.tally.summary(self.header, time.time(), self.fps, capture_stats, stopped_by)
        (self.folder / RESERVE_FILE).unlink(missing_ok=True)
        _write_report(self.folder, self.summary, self.tally)
        return self.summary

    def _save_images(self, frame: Frame, result: Result) -> dict[str, str]:
        frame_file, overlay_file = f"frames/frame_{frame.index:06d}.png", f"overlays/frame_{frame.index:06d}.png"
        write_png(self.folder / frame_file, frame.image)
        try:
            write_png(self.folder / overlay_file, draw_overlay(frame.image, result))
        except StorageError:
            (self.folder / frame_file).unlink(missing_ok=True)
            raise
        return {"frame_file": frame_file, "overlay_file": overlay_file}

    def _append_record(self, record: dict[str, Any]) -> None:
        # results.jsonl last: a process killed between the writes leaves the views a frame ahead of
        # the record, which repair_session rewrites from the record.
        self._append({self._cells: _cells_lines(record, self.heads), self._timings: _timings_line(record), self._results: json.dumps(record) + "\n"})
        self.tally.add(record)
        self._last_record = time.monotonic()

    def _append(self, lines: Mapping[RecordFile, str]) -> None:
        """Append to each file its lines, all or none: on a failing write every file is cut back."""
        sizes = {file: file.size for file in lines}
        try:
            for file, text in lines.items():
                if text:
                    file.append(text)
            self._results.sync(SYNC_INTERVAL_S)
        except OSError as error:
            for file, size in sizes.items():
                try:
                    file.cut_back(size)
                except OSError as cut_error:
                    log.error("cannot cut %s back to its last whole line: %s", file.path, _why(cut_error))
            raise StorageError(f"cannot write the session in {self.folder}: {_why(error)}") from error

    @staticmethod
    def _wall_time(monotonic_time: float) -> float:
        """Frame timestamps are time.monotonic(); the files carry wall-clock seconds (Unix time)."""
        return time.time() - (time.monotonic() - monotonic_time)


def _write_report(folder: Path, summary: Mapping[str, Any], tally: SessionTally) -> None:
    """summary.json, then summary.html (and its plot)."""
    try:
        write_file_atomically(folder / SUMMARY_FILE, json.dumps(summary, indent=2).encode("utf-8"))
    except StorageError as error:
        raise StorageError(f"{error}; results.jsonl is whole: `python examples/capture_session.py repair {folder}` writes the summary from it") from error
    try:
        write_summary_html(folder, summary, tally.per_frame, tally.saved)
    except StorageError as error:
        raise StorageError(f"{error}; summary.json is written") from error


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
    written however the loop ends (an error still propagates after that; a full disk raises
    StorageError, the summary saying the session ended early). Returns the summary."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 (or None: no limit); got {max_frames}")
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
        with deferred_signals():
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
    for good, StorageError when the disk fills (the session recorded until then is written first)."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 (or None: no limit); got {max_frames}")
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


def not_judged_text(summary: Mapping[str, Any]) -> str:
    """"3 (no_cells 2, outside_domain 1)": frames the bundle did not judge, by status (never counted as negative)."""
    by_status = summary.get("frames_not_judged_by_status", {})
    details = ", ".join(f"{status} {count}" for status, count in by_status.items())
    return f"{summary.get('frames_not_judged', 0)}{f' ({details})' if details else ''}"


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines for a terminal: frames, capture faults, cells, blast fraction with its interval, latency."""
    low, high = summary["blast_fraction_ci95"]
    fraction = "-" if summary["blast_fraction"] is None else f"{summary['blast_fraction']:.1%} (95 % CI {low:.1%} to {high:.1%})"
    lines = [f"ENDED EARLY: {summary['stopped_by']}"] if summary.get("ended_early") else []
    lines += [
        f"frames processed {summary['frames_processed']} (refused {summary['frames_refused']}, dropped {summary['dropped_frames']}, "
        f"reconnects {summary['reconnects']}), {summary['fps']:.1f} fps, stopped by: {summary['stopped_by']}",
        f"cells {summary['cells']}, blasts {summary['blasts']}: blast fraction {fraction}",
        f"frames flagged {summary['flagged_frames']}, not judged {not_judged_text(summary)}",
    ]
    latency = summary["latency_ms"]
    if latency:
        lines.append("latency ms (median / p95): " + ", ".join(f"{stage} {v['median']:.0f} / {v['p95']:.0f}" for stage, v in latency.items()))
    return "\n".join(lines)


# --- the report ----------------------------------------------------------------------------------


def plot_session(path: Path, per_frame: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """PNG of per-frame latency and blast fraction (with the running session fraction and its interval).
    Raises ImportError naming the package when matplotlib is missing, StorageError when the file cannot be written."""
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
    png = io.BytesIO()
    figure.savefig(png, format="png")
    write_file_atomically(path, png.getvalue())


def write_summary_html(folder: Path, summary: Mapping[str, Any], per_frame: Sequence[Mapping[str, Any]], saved: Sequence[Mapping[str, Any]]) -> Path:
    """summary.html: the key numbers, latency per stage, counts per class, the plot (summary_plot.png,
    when matplotlib is installed) and a table of overlay thumbnails with a column for the reviewer's count.
    Raises StorageError when a file cannot be written."""
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
        ("stopped by", f"{summary['stopped_by']}{' (ENDED EARLY)' if summary.get('ended_early') else ''}"),
        ("frames processed", f"{summary['frames_processed']} ({summary['fps']:.1f} frames/s)"),
        ("frames refused / dropped / reconnects", f"{summary['frames_refused']} / {summary['dropped_frames']} / {summary['reconnects']}"),
        ("cells / blasts", f"{summary['cells']} / {summary['blasts']}"),
        ("blast fraction", fraction),
        ("frames flagged", summary["flagged_frames"]),
        ("frames not judged (status)", not_judged_text(summary)),
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
            html.escape(saved_frame.get("verdict", "")),
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
{_table(("frame", "seconds", "overlay", "cells", "blasts", "verdict", "labels", "reviewer's count"), thumbnail_rows, escape=False)}
</body></html>
"""
    path = folder / SUMMARY_HTML
    write_file_atomically(path, page.encode("utf-8"))
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], escape: bool = True) -> str:
    def cell(value: Any) -> str:
        return html.escape(str(value)) if escape else str(value)

    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


# --- repair and review ---------------------------------------------------------------------------


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a results.jsonl and the length in bytes of its whole lines. A last line cut
    short (a session of an older leukoedge, killed mid-write) is left out; a broken line before it
    raises LeukoedgeError."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, whole = [], 0
    for number, line in enumerate(lines[:-1], start=1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines) - 1 or lines[-1]:
                raise LeukoedgeError(f"{path} line {number} is not a JSON record: the file was changed by something other than leukoedge") from None
            log.warning("%s: left out its last line, written only in part", path)
            return records, whole
        whole += len(line) + 1
    if lines[-1]:
        log.warning("%s: left out its last line, written only in part", path)
    return records, whole


def repair_session(folder: str | Path) -> dict[str, Any]:
    """Rebuild the summary of a session that ended without one (killed, power lost) from results.jsonl:
    summary.json says so (ended_early, stopped_by), and cells.csv, timings.csv and summary.html are
    rewritten from the same records. A session that has its summary is left as it is. Returns the summary."""
    folder = Path(folder)
    if (folder / SUMMARY_FILE).is_file():
        return json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    results_path, header_path = folder / RESULTS_FILE, folder / SESSION_FILE
    if not (results_path.is_file() and header_path.is_file()):
        raise LeukoedgeError(f"{folder} holds no session to rebuild: expected {RESULTS_FILE} and {SESSION_FILE} (sessions recorded before {SESSION_FILE} existed cannot be)")
    header = json.loads(header_path.read_text(encoding="utf-8"))
    records, whole = read_records(results_path)
    (folder / RESERVE_FILE).unlink(missing_ok=True)
    try:
        if whole < results_path.stat().st_size:
            os.truncate(results_path, whole)
    except OSError as error:
        raise StorageError(f"cannot cut the partial last line off {results_path}: {_why(error)}") from error
    tally = SessionTally(header["heads"], header["primary_head"])
    for record in records:
        tally.add(record)
    write_file_atomically(folder / CELLS_FILE, (_csv_line(_cells_header(tally.heads)) + "".join(_cells_lines(r, tally.heads) for r in records)).encode("utf-8"))
    write_file_atomically(folder / TIMINGS_FILE, (_csv_line(_timings_header()) + "".join(_timings_line(r) for r in records)).encode("utf-8"))
    ended = records[-1]["timestamp"] if records else header["started"]
    fps = tally.frames_processed / (ended - header["started"]) if ended > header["started"] else 0.0
    # A reader's dropped frames are the gaps in the frame numbers; reconnects are not in the records.
    capture = {"frames": tally.last_index + 1, "dropped": tally.last_index + 1 - tally.frames_processed - tally.frames_refused}
    summary = {**tally.summary(header, ended, fps, capture, STOPPED_UNRECORDED), "repaired": _iso(time.time())}
    _write_report(folder, summary, tally)
    return summary


def review_session(folder: str | Path, blasts: int, total: int) -> dict[str, Any]:
    """Compare the session's blast fraction with a hematologist's count of `blasts` blasts among
    `total` white cells; writes review.json and returns it. difference is leukoedge minus hematologist.
    A session killed before its summary gets one first (repair_session)."""
    if total <= 0 or not 0 <= blasts <= total:
        raise LeukoedgeError(f"expected a hematologist's count with 0 <= blasts <= total and total > 0; got blasts={blasts}, total={total}")
    folder = Path(folder)
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        if not (folder / RESULTS_FILE).is_file():
            raise LeukoedgeError(f"{summary_path} not found, nor {RESULTS_FILE} to rebuild it from: expected the folder of a session")
        log.warning("%s has no summary (the session was killed?): rebuilding it from %s", folder, RESULTS_FILE)
        repair_session(folder)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    hematologist_fraction = blasts / total
    fraction = summary["blast_fraction"]
    low, high = summary["blast_fraction_ci95"]
    found_cells = fraction is not None
    review = {
        "session": str(folder),
        "reviewed": _iso(time.time()),
        "session_ended_early": summary.get("ended_early", False),
        "hematologist": {"blasts": blasts, "total": total, "blast_fraction": hematologist_fraction, "blast_fraction_ci95": list(wilson_interval(blasts, total))},
        "leukoedge": {"blasts": summary["blasts"], "cells": summary["cells"], "blast_fraction": fraction, "blast_fraction_ci95": [low, high]},
        "difference": fraction - hematologist_fraction if found_cells else None,
        "hematologist_within_leukoedge_ci": low <= hematologist_fraction <= high if found_cells else None,
        "cell_count_ratio": summary["cells"] / total,
    }
    write_file_atomically(folder / REVIEW_FILE, json.dumps(review, indent=2).encode("utf-8"))
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
