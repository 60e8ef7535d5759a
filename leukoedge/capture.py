"""Frame sources named by URI, and a threaded reader that always hands out the newest frame.

`open_source` accepts, in the style of jetson-inference:
    csi://0                         Jetson CSI camera (GStreamer nvarguscamerasrc)
    v4l2:///dev/video0, 0, "0"      USB / V4L2 camera by device path or index
    rtsp://..., http(s)://...       network streams
    gst://<pipeline>, "... ! appsink"  a raw GStreamer pipeline
    clip.mp4, field.png             a video file or one image file (file:// optional)
    folder:///path?glob=*.jpg, /path  a folder of images, read in sorted order
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs

import cv2
import numpy as np

from leukoedge.decode import block_seam, decode_checked, read_image, read_image_file
from leukoedge.errors import CaptureError, UnreadableImageError

log = logging.getLogger("leukoedge.capture")

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".ts"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2"})
STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "http", "https"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


@dataclass
class Frame:
    """One camera frame: HxWx3 uint8 BGR image, its number in the stream, and when it was grabbed."""

    image: np.ndarray
    index: int
    timestamp: float  # time.monotonic() when the frame was grabbed
    capture_ms: float  # grab + decode
    source: str
    name: str = ""  # the image file's name for frames read from image files; "" for video and camera frames
    jpeg_quality: int | None = None  # the quality of the JPEG file it was read from (Detector.run's compression check)


class FrameSource(ABC):
    """A stream of frames: `read()` until it returns None (end of stream), then `close()`.

    A frame that was not decoded whole (leukoedge/decode.py) is never returned: it is skipped,
    counted and logged, and a recording cut short raises CaptureError instead of ending.
    """

    uri: str
    live: bool  # cameras and streams: running dry is a fault; files and folders: it is the end
    skipped: int = 0  # unreadable files or damaged recorded frames passed over

    @abstractmethod
    def read(self) -> Frame | None:
        """The next frame, or None at the end of the stream."""

    @abstractmethod
    def close(self) -> None:
        """Release the device or file."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.read()) is not None:
            yield frame


class VideoCaptureSource(FrameSource):
    """Anything cv2.VideoCapture opens: cameras, streams, GStreamer pipelines, video files.

    From a file, each frame is decoded with the decoder's fault messages collected (FFmpeg reports a
    frame cut or damaged only there, then conceals it) and checked for the block seam damaged data
    leaves (leukoedge.decode.block_seam): such a frame is skipped and counted, and a
    file that ends before the frame count its header declares raises CaptureError, since a cut
    recording must not read as one that ended.
    """

    def __init__(self, capture: cv2.VideoCapture, uri: str, *, live: bool, codec: str = "") -> None:
        self._capture = capture
        self.uri = uri
        self.live = live
        self.codec = codec  # the FOURCC the camera or file delivers (codec_name); "" where the backend does not say
        self.skipped = 0
        self._next_index = 0
        self._declared_frames = 0 if live else max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)

    def read(self) -> Frame | None:
        while True:
            started = time.monotonic()
            if self.live:
                decoded, faults = self._decode(), []
            else:
                decoded, faults = decode_checked(self._decode)
            if decoded is None:
                self._check_complete()
                return None
            grabbed_at, image = decoded
            if not self.live and not faults:
                seam = block_seam(image)  # damage FFmpeg decodes without a message: MJPG frames carry no checksum
                faults = [seam] if seam else []
            if faults:
                self.skipped += 1
                log.warning(
                    "skipped the file's frame %d (counting from 1) of %s: the decoder reported damage (%s); the frames read whole "
                    "are numbered on from %d (frame_%06d)", self._position, self.uri, "; ".join(faults[:3]), self._next_index, self._next_index,
                )
                continue
            frame = Frame(_as_bgr(image), self._next_index, grabbed_at, (time.monotonic() - started) * 1000.0, self.uri)
            self._next_index += 1
            return frame

    @property
    def _position(self) -> int:
        """Frames read from the file so far, returned or skipped."""
        return self._next_index + self.skipped

    def _decode(self) -> tuple[float, np.ndarray] | None:
        """(when it was grabbed, the decoded image) of the next frame, or None at the end."""
        if not self._capture.grab():
            return None
        grabbed_at = time.monotonic()
        ok, image = self._capture.retrieve()
        if not ok or image is None or image.size == 0:
            return None
        return grabbed_at, image

    def _check_complete(self) -> None:
        """At the end of a file: CaptureError when frames its header declares never came."""
        if self._position < self._declared_frames:
            raise CaptureError(
                f"{self.uri} ended after {self._position} of the {self._declared_frames} frames its header declares: "
                "the file is cut or damaged, so the recording is incomplete"
            )

    def close(self) -> None:
        self._capture.release()


class ImageFilesSource(FrameSource):
    """Image files read in the given order; unreadable ones are logged, counted and skipped."""

    live = False

    def __init__(self, paths: list[Path], uri: str) -> None:
        self._paths = paths
        self._position = 0
        self._next_index = 0
        self.uri = uri
        self.skipped = 0

    def read(self) -> Frame | None:
        while self._position < len(self._paths):
            path = self._paths[self._position]
            self._position += 1
            started = time.monotonic()
            try:
                image, quality = read_image_file(path)
            except UnreadableImageError as error:
                self.skipped += 1
                log.warning("skipped %s", error)
                continue
            frame = Frame(image, self._next_index, started, (time.monotonic() - started) * 1000.0, self.uri, path.name, quality)
            self._next_index += 1
            return frame
        return None

    def close(self) -> None:
        self._position = len(self._paths)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """Cameras may deliver grey or BGRA frames; the detector takes 3-channel BGR."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def has_gstreamer() -> bool:
    """Whether this OpenCV build can open GStreamer pipelines."""
    return re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()) is not None


def csi_pipeline(sensor_id: int = 0, width: int = 1920, height: int = 1080, fps: int = 30, flip: int = 0) -> str:
    """GStreamer pipeline for a Jetson CSI camera (Argus) that delivers BGR frames to OpenCV."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width={width}, height={height}, framerate={fps}/1, format=NV12 ! "
        f"nvvidconv flip-method={flip} ! video/x-raw, format=BGRx ! "
        "videoconvert ! video/x-raw, format=BGR ! "
        # One buffer, dropping old ones: a slow consumer sees the newest frame, not a growing backlog.
        "appsink drop=true max-buffers=1"
    )


def open_source(
    uri: str | int | Path,
    *,
    width: int | None = None,
    height: int | None = None,
    fps: int | None = None,
    flip: int = 0,
    glob: str | None = None,
) -> FrameSource:
    """Open a frame source named by URI (see the module docstring); raises CaptureError if it cannot.

    width/height/fps request a camera mode (CSI, V4L2); flip is the CSI flip-method; glob filters a folder.
    """
    if isinstance(uri, int):
        return _open_camera(uri, f"v4l2://{uri}", width, height, fps)
    text = str(uri).strip()
    if text.isdigit():
        return _open_camera(int(text), f"v4l2://{text}", width, height, fps)
    if text.startswith("gst://"):
        return _open_gstreamer(text[len("gst://"):], text)
    if " ! " in text:
        return _open_gstreamer(text, text)
    match = _SCHEME.match(text)
    if match is None:
        if text.startswith("/dev/video"):
            return _open_camera(text, text, width, height, fps)
        return _open_path(Path(text).expanduser(), glob, text)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "csi":
        if not rest.isdigit():
            raise CaptureError(f"expected csi://<sensor id>, e.g. csi://0; got {text!r}")
        pipeline = csi_pipeline(int(rest), width or 1920, height or 1080, fps or 30, flip)
        return _open_gstreamer(pipeline, text)
    if scheme == "v4l2":
        return _open_camera(int(rest) if rest.isdigit() else rest, text, width, height, fps)
    if scheme in STREAM_SCHEMES:
        return _open_capture(text, cv2.CAP_ANY, text, live=True, expected="a reachable network stream")
    if scheme == "file":
        return _open_path(Path(rest), glob, text)
    if scheme == "folder":
        folder, _, query = rest.partition("?")
        query_glob = parse_qs(query).get("glob", [None])[0]
        return _open_folder(Path(folder), glob or query_glob, text)
    raise CaptureError(
        f"unknown source scheme {scheme!r} in {text!r}: expected csi://, v4l2://, rtsp://, http(s)://, "
        "gst://, file://, folder://, a camera index, or a path to a video, image or folder"
    )


# Codecs that compress frames lossily before leukoedge sees them: compression loses blasts and can flag a normal field
# (docs/training.md, "Bundle 0.13.0"), and a decoded frame carries no quality for the compression check to read.
LOSSY_CODECS = frozenset({
    "MJPG", "JPEG", "H264", "AVC1", "X264", "HEVC", "H265", "HEV1", "HVC1", "MP4V", "XVID", "DIVX", "FMP4", "VP80", "VP90", "AV01", "MPG1", "MPG2",
})


def codec_name(capture: cv2.VideoCapture) -> str:
    """The capture's FOURCC as text ("MJPG", "YUYV", "H264"), upper case; "" where the backend reports none."""
    value = int(capture.get(cv2.CAP_PROP_FOURCC))
    return "".join(chr((value >> 8 * index) & 0xFF) for index in range(4)).strip("\x00 ").upper()


def _open_capture(
    target: str | int, api: int, uri: str, *, live: bool, expected: str, settings: dict[int, int] | None = None
) -> VideoCaptureSource:
    capture = cv2.VideoCapture(target, api)
    if not capture.isOpened():
        capture.release()
        raise CaptureError(f"cannot open {uri}: expected {expected}")
    for prop, value in (settings or {}).items():
        capture.set(prop, value)
    codec = codec_name(capture)
    if codec in LOSSY_CODECS:
        log.warning(
            "%s delivers %s-compressed frames: compression loses blasts and can flag a normal field, and a decoded frame "
            "carries no quality to check; ask the camera for an uncompressed format (YUYV, raw) or record losslessly "
            "(docs/integration.md, capture settings)", uri, codec,
        )
    return VideoCaptureSource(capture, uri, live=live, codec=codec)


def _open_camera(
    device: int | str, uri: str, width: int | None, height: int | None, fps: int | None
) -> VideoCaptureSource:
    api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
    requested = {cv2.CAP_PROP_FRAME_WIDTH: width, cv2.CAP_PROP_FRAME_HEIGHT: height, cv2.CAP_PROP_FPS: fps}
    settings = {prop: value for prop, value in requested.items() if value is not None}
    expected = "a connected camera (check the index or device path)"
    return _open_capture(device, api, uri, live=True, expected=expected, settings=settings)


def _open_gstreamer(pipeline: str, uri: str) -> VideoCaptureSource:
    if not has_gstreamer():
        raise CaptureError(
            f"cannot open {uri}: this OpenCV build has no GStreamer support (cv2.getBuildInformation() "
            "does not say 'GStreamer: YES'). CSI cameras and gst pipelines need OpenCV built with GStreamer, "
            "e.g. JetPack's (apt python3-opencv); uninstall the opencv-python(-headless) wheel in that "
            "environment so that build is the one imported"
        )
    if "appsink" not in pipeline.rsplit("!", 1)[-1]:
        raise CaptureError(f"expected a GStreamer pipeline ending in appsink; got {pipeline!r}")
    return _open_capture(pipeline, cv2.CAP_GSTREAMER, uri, live=True, expected="a GStreamer pipeline that starts")


def _open_path(path: Path, glob: str | None, uri: str) -> FrameSource:
    if path.is_dir():
        return _open_folder(path, glob, uri)
    if not path.is_file():
        raise CaptureError(f"{path} does not exist: expected a video file, an image file or a folder of images")
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if path.stat().st_size == 0:  # OpenCV would only say it cannot decode it
            raise CaptureError(f"cannot open {path}: the file is empty (0 bytes): a recording that was never written or not copied whole")
        return _open_capture(str(path), cv2.CAP_ANY, uri, live=False, expected="a video file OpenCV can decode")
    if suffix in IMAGE_SUFFIXES:
        read_image(path)  # an unreadable single image fails here, with the reason (UnreadableImageError)
        return ImageFilesSource([path], uri)
    raise CaptureError(
        f"unknown file type {suffix!r} of {path}: expected a video ({', '.join(sorted(VIDEO_SUFFIXES))}) "
        f"or an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
    )


def folder_images(folder: Path) -> list[Path]:
    """The entries of a folder named as images leukoedge reads (IMAGE_SUFFIXES), sorted. A broken link, or a folder
    named like an image, is kept: reading it fails, and it is skipped, named and counted like an unreadable file. The
    folder's other files (an animated GIF, a HEIC photo, a sidecar) are named in one warning: a lab counts the images it
    handed over, and none is left out without a word. Hidden files (a leading dot) are not named."""
    entries = sorted(folder.iterdir())
    others = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        log.warning(
            "left out %d file(s) of %s that are not images leukoedge reads: %s (it reads %s)",
            len(others), folder, shown, ", ".join(sorted(IMAGE_SUFFIXES)),
        )
    return [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]


def _open_folder(folder: Path, glob: str | None, uri: str) -> ImageFilesSource:
    if not folder.is_dir():
        raise CaptureError(f"{folder} is not a folder: expected a folder of images")
    if glob:  # a glob names what it wants; what it matches that is neither a file nor a broken link is no frame
        paths = sorted(p for p in folder.glob(glob) if p.is_file() or (p.is_symlink() and not p.exists()) or p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        paths = folder_images(folder)
    if not paths:
        wanted = f"files matching {glob!r}" if glob else f"image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        raise CaptureError(f"{folder} holds no {wanted}: expected a folder of images")
    return ImageFilesSource(paths, uri)


class ThreadedReader:
    """Grabs frames on a background thread into a one-frame slot, so `get()` returns the newest frame.

    From a live source (camera, stream) a frame not taken before the next one arrives is dropped
    (counted): latency never piles up. From a file or folder every frame is kept, the grabbing thread
    waiting for `get()`, since a recording has no "now" to keep up with; drop_frames overrides either.
    A live source that fails is re-opened through `source_factory` with exponential backoff; a finite
    source simply ends. Frame.index is renumbered across re-opens, so gaps in it are exactly the
    dropped frames.
    """

    def __init__(
        self,
        source_factory: Callable[[], FrameSource],
        *,
        reconnect: bool = True,
        max_retries: int | None = None,
        backoff_s: tuple[float, float] = (0.5, 8.0),
        drop_frames: bool | None = None,
    ) -> None:
        self._source_factory = source_factory
        self._reconnect = reconnect
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._slot = threading.Condition()
        self._latest: Frame | None = None
        self._finished = False
        self._error: CaptureError | None = None
        self._stopping = threading.Event()
        self._frames = self._dropped = self._reconnects = self._size_changes = 0
        self._skipped_before = 0  # unreadable files of sources already closed
        self._retries = 0  # re-open attempts since the last frame
        self._last_size: tuple[int, int] | None = None
        self._last_error: str | None = None
        # The first open happens here, so a wrong URI or a missing GStreamer fails at once, not in the thread.
        self._source: FrameSource | None = source_factory()
        self._drop_frames = self._source.live if drop_frames is None else drop_frames
        self._thread = threading.Thread(target=self._run, name="leukoedge-capture", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the grabbing thread is still alive."""
        return self._thread.is_alive()

    def get(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not yet taken; None after the end of a finite source or after stop().

        Raises CaptureError when the source failed and could not be re-opened, and TimeoutError when
        no frame came within `timeout` seconds.
        """
        with self._slot:
            if not self._slot.wait_for(lambda: self._latest is not None or self._finished, timeout):
                raise TimeoutError(f"no frame within {timeout} s (stats: {self.stats()})")
            frame, self._latest = self._latest, None
            self._slot.notify_all()  # a grabbing thread that keeps every frame waits for the slot to empty
            if frame is None and self._error is not None:
                raise self._error
            return frame

    def stop(self, timeout: float = 5.0) -> None:
        """Stop grabbing, close the source and join the thread (waiting at most `timeout` seconds)."""
        self._stopping.set()
        with self._slot:
            self._slot.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("capture thread still blocked in its source after %.1f s", timeout)

    def stats(self) -> dict[str, int | str | None]:
        """Counters for a session log: frames, dropped, reconnects, size_changes, skipped, last_error."""
        source = self._source
        return {
            "frames": self._frames,
            "dropped": self._dropped,
            "reconnects": self._reconnects,
            "size_changes": self._size_changes,
            "skipped": self._skipped_before + (source.skipped if source is not None else 0),
            "last_error": self._last_error,
        }

    def __enter__(self) -> ThreadedReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.get()) is not None:
            yield frame

    def _run(self) -> None:
        try:
            while self._source is not None and not self._stopping.is_set():
                try:
                    frame = self._source.read()
                except Exception as error:  # drivers and user sources raise anything; every one is a fault
                    if not self._source.live:  # re-opened, a file would replay from its start: its fault is final
                        self._end_with(error)
                        return
                    self._recover(error)
                    continue
                if frame is not None:
                    self._publish(frame)
                elif self._source.live:
                    self._recover(CaptureError(f"{self._source.uri} delivered an empty frame"))
                else:
                    return  # a file or folder reached its end
        finally:
            self._close_source()
            with self._slot:
                self._finished = True
                self._slot.notify_all()

    def _publish(self, frame: Frame) -> None:
        size = frame.image.shape[:2]
        with self._slot:
            if not self._drop_frames:
                self._slot.wait_for(lambda: self._latest is None or self._stopping.is_set())
                if self._stopping.is_set():
                    return
            if self._last_size is not None and size != self._last_size:
                self._size_changes += 1
            self._last_size = size
            if self._latest is not None:
                self._dropped += 1
            self._latest = replace(frame, index=self._frames)
            self._frames += 1
            self._retries = 0
            self._slot.notify_all()

    def _recover(self, fault: BaseException) -> None:
        """Close the failed source and re-open it with backoff; leaves no source when giving up or stopping."""
        self._note_error(fault)
        self._close_source()
        while self._reconnect and (self._max_retries is None or self._retries < self._max_retries):
            delay = min(self._backoff_s[0] * 2 ** min(self._retries, 32), self._backoff_s[1])
            self._retries += 1
            log.warning("capture failed (%s); re-opening in %.2f s (attempt %d)", self._last_error, delay, self._retries)
            if self._stopping.wait(delay):
                return
            try:
                self._source = self._source_factory()
            except Exception as error:  # a camera still unplugged: try again after a longer wait
                self._note_error(error)
                continue
            self._reconnects += 1
            return
        with self._slot:
            self._error = CaptureError(
                f"capture failed and was not recovered after {self._retries} re-open attempts: {self._last_error}"
            )
            self._error.__cause__ = fault

    def _end_with(self, fault: BaseException) -> None:
        """A file or folder failed (a cut recording among them): get() raises it after the frames before it."""
        self._note_error(fault)
        with self._slot:
            if isinstance(fault, CaptureError):
                self._error = fault
            else:
                self._error = CaptureError(f"reading {self._source.uri if self._source else 'the source'} failed: {self._last_error}")
                self._error.__cause__ = fault

    def _note_error(self, error: BaseException) -> None:
        self._last_error = f"{type(error).__name__}: {error}"

    def _close_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            self._skipped_before += source.skipped
            try:
                source.close()
            except Exception as error:  # a failing release must not hide the fault that led here
                log.warning("closing %s failed: %s", source.uri, error)
