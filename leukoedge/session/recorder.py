"""Recording a session: the recorder that writes a folder frame by frame, the loop over a source,
Ctrl-C and SIGTERM handling, and the progress line.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from ..capture import Frame, ThreadedReader
from ..errors import InvalidFrameError, LeukoedgeError, StorageError
from ..result import Result
from .files import CELLS_FILE, RESERVE_BYTES, RESERVE_FILE, RESULTS_FILE, RecordFile, SESSION_FILE, SYNC_INTERVAL_S, TIMINGS_FILE, cells_header, cells_lines, csv_line, reserve_space, timings_header, timings_line, why, write_file_atomically, write_png
from .readers import SequentialReader, open_reader
from .report import write_report
from .tally import SessionTally

if TYPE_CHECKING:
    from ..detector import Detector

log = logging.getLogger("leukoedge.session")


POLL_S = 0.5  # how long the loop waits for a frame before it looks at the stop request again


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
            raise StorageError(f"cannot create the session folder {self.folder}: {why(error)}") from error
        self.tally = SessionTally(heads, primary_head)
        self.heads, self.primary_head = self.tally.heads, primary_head
        self.save_every = save_every
        self.source = source
        self.summary: dict[str, Any] | None = None
        self._started = self._last_record = time.monotonic()
        self.header = {"source": source, "heads": self.tally.heads, "primary_head": primary_head, "save_every": save_every, "started": time.time()}
        reserve_space(self.folder / RESERVE_FILE, RESERVE_BYTES)
        try:
            write_file_atomically(self.folder / SESSION_FILE, json.dumps(self.header, indent=2).encode("utf-8"))
            self._results = RecordFile(self.folder / RESULTS_FILE)
            self._cells = RecordFile(self.folder / CELLS_FILE)
            self._timings = RecordFile(self.folder / TIMINGS_FILE)
            self._append({self._cells: csv_line(cells_header(self.heads)), self._timings: csv_line(timings_header())})
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
                log.error("%s may not be complete on disk: %s", file.path, why(error))
        self.summary = self.tally.summary(self.header, time.time(), self.fps, capture_stats, stopped_by)
        (self.folder / RESERVE_FILE).unlink(missing_ok=True)
        write_report(self.folder, self.summary, self.tally)
        return self.summary

    def _save_images(self, frame: Frame, result: Result) -> dict[str, str]:
        frame_file, overlay_file = f"frames/frame_{frame.index:06d}.png", f"overlays/frame_{frame.index:06d}.png"
        write_png(self.folder / frame_file, frame.image)
        try:
            write_png(self.folder / overlay_file, result.draw(frame.image))
        except StorageError:
            (self.folder / frame_file).unlink(missing_ok=True)
            raise
        return {"frame_file": frame_file, "overlay_file": overlay_file}

    def _append_record(self, record: dict[str, Any]) -> None:
        # results.jsonl last: a process killed between the writes leaves the views a frame ahead of
        # the record, which repair_session rewrites from the record.
        self._append({self._cells: cells_lines(record, self.heads), self._timings: timings_line(record), self._results: json.dumps(record) + "\n"})
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
                    log.error("cannot cut %s back to its last whole line: %s", file.path, why(cut_error))
            raise StorageError(f"cannot write the session in {self.folder}: {why(error)}") from error

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
                result = detector.run(frame.image, capture_ms=frame.capture_ms, jpeg_quality=frame.jpeg_quality)
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
