"""The files of a session folder: their names, writes that a full disk cannot leave half done,
the CSV views of a frame's record, and reading the records back.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import LeukoedgeError, StorageError
from ..result import Timings

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


def why(error: OSError) -> str:
    return error.strerror or str(error)


def write_file(path: Path, data: bytes) -> None:
    """Write a whole file or none: a partial one is removed (a full disk, or Ctrl-C mid-write). Raises StorageError
    naming the path for an OSError; Ctrl-C goes on up once the part is removed."""
    try:
        with open(path, "wb") as file:
            file.write(data)
    except (OSError, KeyboardInterrupt) as error:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or read-only: nothing was left to remove
        if isinstance(error, KeyboardInterrupt):
            raise
        raise StorageError(f"cannot write {path}: {why(error)}") from error


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so a reader finds the old file or the whole new one."""
    temporary = path.with_name(path.name + ".partial")
    write_file(temporary, data)
    try:
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {why(error)}") from error


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
            raise StorageError(f"cannot create {path}: {why(error)}") from error
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


def reserve_space(path: Path, size: int) -> None:
    """Hold `size` bytes of the disk in a file, given back when the summary is written."""
    try:
        with open(path, "wb") as file:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(file.fileno(), 0, size)
            else:
                file.write(bytes(size))
    except OSError as error:
        path.unlink(missing_ok=True)
        raise StorageError(f"cannot start a session in {path.parent}: {why(error)} (it needs at least {size >> 10} kB free)") from error


def csv_line(row: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue()


def top_classes(cell: Mapping[str, Any], heads: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, float]]:
    return {head: max(cell["head_scores"][head].items(), key=lambda item: item[1]) for head in heads}


def cells_header(heads: Mapping[str, Sequence[str]]) -> list[str]:
    # {head}_class_probability: "{head}_probability" would collide with blast_probability for the blast head.
    head_columns = [column for head in heads for column in (f"{head}_class", f"{head}_class_probability")]
    return ["frame", "id", "x0", "y0", "x1", "y1", "area_px", "nucleus_area_px", "label", "blast_probability", *head_columns]


def cells_lines(record: Mapping[str, Any], heads: Mapping[str, Sequence[str]]) -> str:
    """cells.csv lines of one results.jsonl record (none for a refused frame)."""
    lines = []
    for cell in record.get("cells", ()):
        top = top_classes(cell, heads)
        head_values = [value for head in heads for value in (top[head][0], f"{top[head][1]:.4f}")]
        lines.append(csv_line([record["index"], cell["id"], *cell["box"], cell["area_px"], cell["nucleus_area_px"], cell["label"], f"{cell['blast_probability']:.4f}", *head_values]))
    return "".join(lines)


def timings_header() -> list[str]:
    return ["frame", "timestamp", *(f"{stage}_ms" for stage in STAGES)]


def timings_line(record: Mapping[str, Any]) -> str:
    """The timings.csv line of one results.jsonl record (none for a refused frame)."""
    if "timings" not in record:
        return ""
    timings = record["timings"]
    return csv_line([record["index"], f"{record['timestamp']:.3f}", *(f"{timings[s]:.2f}" if s in timings else "" for s in STAGES)])


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
