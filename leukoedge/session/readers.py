"""Frames for a session: every frame of a recording in order, the newest of a camera or stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ..capture import Frame, FrameSource, ThreadedReader, open_source



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
