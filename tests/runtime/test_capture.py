"""Frame sources and the threaded reader, on real files written with OpenCV into tmp_path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge.capture import (
    Frame,
    FrameSource,
    ThreadedReader,
    VideoCaptureSource,
    csi_pipeline,
    has_gstreamer,
    open_source,
)
from leukoedge.errors import CaptureError, UnsupportedImageError

FIELD_SIZE = (160, 120)  # width, height: small enough to keep every test fast
BUILD_HAS_GSTREAMER = any(
    line.strip().startswith("GStreamer:") and "YES" in line for line in cv2.getBuildInformation().splitlines()
)


@pytest.fixture(scope="module")
def smear_fields(request: pytest.FixtureRequest) -> list[np.ndarray]:
    """Three distinct BGR fields: real BCCD smears when the data folder is present, else synthetic."""
    try:
        data_root: Path = request.getfixturevalue("data_root")
        paths = sorted((data_root / "bccd" / "images").glob("*.jpg"))[:3]
    except pytest.skip.Exception:
        paths = []
    if len(paths) == 3:
        return [cv2.resize(cv2.imread(str(path)), FIELD_SIZE, interpolation=cv2.INTER_AREA) for path in paths]
    return [synthetic_field(seed) for seed in range(3)]


def synthetic_field(seed: int) -> np.ndarray:
    """A smear-like field (pale background, red cells, one purple nucleus): smooth enough for JPEG."""
    rng = np.random.default_rng(seed)
    width, height = FIELD_SIZE
    field = np.full((height, width, 3), (200, 190, 225), dtype=np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(field, centre, int(rng.integers(6, 12)), (150, 120, 210), -1)
    centre = (int(rng.integers(20, width - 20)), int(rng.integers(20, height - 20)))
    cv2.circle(field, centre, 14, (140, 60, 110), -1)
    return field


def write_video(path: Path, fields: list[np.ndarray], frame_count: int) -> list[np.ndarray]:
    """An MJPG .avi cycling through the fields, each frame marked with its number; returns the frames written."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, FIELD_SIZE)
    frames = []
    for number in range(frame_count):
        frame = fields[number % len(fields)].copy()
        cv2.putText(frame, str(number), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
        writer.write(frame)
        frames.append(frame)
    writer.release()
    return frames


def truncated_jpeg(field: np.ndarray) -> bytes:
    encoded = cv2.imencode(".jpg", field)[1].tobytes()
    return encoded[: len(encoded) * 7 // 10]


def corrupt_jpeg(field: np.ndarray) -> bytes:
    """Middle bytes damaged, the end marker intact: libjpeg decodes it with a "Corrupt JPEG data" warning."""
    encoded = bytearray(cv2.imencode(".jpg", field)[1].tobytes())
    middle = len(encoded) // 2
    encoded[middle : middle + 20] = bytes(value ^ 0x55 for value in encoded[middle : middle + 20])
    return bytes(encoded)


class ScriptedLiveSource(FrameSource):
    """A live camera stand-in: `good_frames` frames (None = endless), then a fault: raise or an empty read."""

    live = True

    def __init__(self, field: np.ndarray, good_frames: int | None, fault: str = "raise", read_delay_s: float = 0.0):
        self.uri = "scripted://camera"
        self._field = field
        self._good_frames = good_frames
        self._fault = fault
        self._read_delay_s = read_delay_s
        self._delivered = 0
        self.closed = False

    def read(self) -> Frame | None:
        time.sleep(self._read_delay_s)
        if self._good_frames is not None and self._delivered >= self._good_frames:
            if self._fault == "raise":
                raise OSError("camera cable pulled")
            return None
        self._delivered += 1
        return Frame(self._field, self._delivered - 1, time.monotonic(), 0.0, self.uri)

    def close(self) -> None:
        self.closed = True


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# --- sources -------------------------------------------------------------------------------------


def test_folder_source_reads_images_in_sorted_order(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    for number in (2, 0, 1):
        cv2.imwrite(str(tmp_path / f"field_{number}.png"), smear_fields[number])
    (tmp_path / "notes.txt").write_text("not an image")

    with open_source(str(tmp_path)) as source:
        frames = list(source)

    assert [frame.index for frame in frames] == [0, 1, 2]
    for frame, field in zip(frames, smear_fields):
        assert np.array_equal(frame.image, field)
        assert frame.source == str(tmp_path)
    assert source.skipped == 0


def test_frames_read_from_jpeg_files_carry_their_quality_and_others_none(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    cv2.imwrite(str(tmp_path / "a.jpg"), smear_fields[0], [cv2.IMWRITE_JPEG_QUALITY, 55])
    cv2.imwrite(str(tmp_path / "b.png"), smear_fields[1])
    with open_source(str(tmp_path)) as source:
        assert [frame.jpeg_quality for frame in source] == [55, None]


def test_folder_glob_selects_files_by_uri_query_or_option(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), smear_fields[0])
    cv2.imwrite(str(tmp_path / "b.jpg"), smear_fields[1])
    cv2.imwrite(str(tmp_path / "c.png"), smear_fields[2])

    png_frames = list(open_source(f"folder://{tmp_path}?glob=*.png"))
    jpg_frames = list(open_source(tmp_path, glob="*.jpg"))

    assert [np.array_equal(f.image, field) for f, field in zip(png_frames, smear_fields[::2])] == [True, True]
    assert len(jpg_frames) == 1
    assert np.abs(jpg_frames[0].image.astype(int) - smear_fields[1]).mean() < 8  # JPEG is lossy


def test_greyscale_and_16_bit_image_files_are_refused_with_their_reason_not_converted(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    """A monochrome camera has no stain colours and 12-bit data in 16 bits darkens when shifted: neither is guessed at."""
    cv2.imwrite(str(tmp_path / "grey.png"), cv2.cvtColor(smear_fields[0], cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(tmp_path / "deep.png"), smear_fields[0].astype(np.uint16) * 16)  # 12-bit data in a 16-bit file
    for name, reason in (("grey.png", "greyscale"), ("deep.png", "16 bits per channel")):
        with pytest.raises(UnsupportedImageError, match=reason):
            open_source(f"file://{tmp_path / name}")


def test_an_image_file_with_an_alpha_channel_gives_its_colour_pixels(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(smear_fields[0], cv2.COLOR_BGR2BGRA))
    with open_source(f"file://{tmp_path / 'rgba.png'}") as source:
        first, second = source.read(), source.read()
    assert second is None and first is not None
    assert np.array_equal(first.image, smear_fields[0])


def test_video_file_yields_every_frame_in_order(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    written = write_video(tmp_path / "session.avi", smear_fields, 12)

    with open_source(tmp_path / "session.avi") as source:
        assert not source.live
        frames = list(source)

    assert [frame.index for frame in frames] == list(range(12))
    assert all(later.timestamp > earlier.timestamp for earlier, later in zip(frames, frames[1:]))
    assert all(frame.capture_ms >= 0 for frame in frames)
    for frame, expected in zip(frames, written):
        assert frame.image.shape == expected.shape
        assert np.abs(frame.image.astype(int) - expected).mean() < 10  # MJPG is lossy


def read_all(path: Path) -> list[np.ndarray]:
    """Every frame cv2.VideoCapture decodes from a file, unchecked: the reference for an intact file."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while (decoded := capture.read())[0]:
        frames.append(decoded[1])
    capture.release()
    return frames


def test_a_lossily_compressed_video_says_so_when_opened(tmp_path: Path, smear_fields: list[np.ndarray], caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "session.avi"
    write_video(path, smear_fields, 3)  # MJPG: every frame a JPEG
    with caplog.at_level("WARNING", logger="leukoedge.capture"), open_source(str(path)) as source:
        assert source.codec == "MJPG"
    assert any("MJPG-compressed frames" in record.getMessage() for record in caplog.records)


def test_cut_video_raises_capture_error_after_its_whole_frames_only(
    tmp_path: Path, smear_fields: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 23: the half-decoded last frame of a cut AVI was delivered as valid, and the cut read as the end.
    path = tmp_path / "cut.avi"
    write_video(path, smear_fields, 30)
    intact = read_all(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    source, frames = open_source(path), []

    with caplog.at_level(logging.WARNING, logger="leukoedge.capture"), pytest.raises(CaptureError, match="of the 30 frames its header declares"):
        for frame in source:
            frames.append(frame)

    assert 0 < len(frames) < 30
    assert all(np.array_equal(frame.image, expected) for frame, expected in zip(frames, intact))
    assert source.skipped == 1 and "decoder reported damage" in caplog.text  # the half frame


def test_damaged_video_frame_is_skipped_and_counted(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    path = tmp_path / "damaged.avi"
    write_video(path, smear_fields, 12)
    intact = read_all(path)
    data = bytearray(path.read_bytes())
    sixth = [index for index in range(len(data)) if data[index : index + 4] == b"00dc"][6]  # the 6th frame's chunk
    data[sixth + 600 : sixth + 640] = bytes(40)  # zeros in its entropy-coded data
    path.write_bytes(bytes(data))

    with open_source(path) as source:
        frames = list(source)

    assert source.skipped >= 1 and len(frames) + source.skipped == 12
    assert all(any(np.array_equal(frame.image, expected) for expected in intact) for frame in frames)


def test_threaded_reader_raises_a_cut_files_error_and_does_not_replay_it(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    path = tmp_path / "cut.avi"
    write_video(path, smear_fields, 30)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    frames = []

    with ThreadedReader(lambda: open_source(path)) as reader, pytest.raises(CaptureError, match="cut or damaged"):
        for frame in reader:
            frames.append(frame)

    assert 0 < len(frames) < 30 and reader.stats()["reconnects"] == 0


def test_unreadable_images_in_folder_are_skipped_counted_and_logged(
    tmp_path: Path, smear_fields: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), smear_fields[0])
    (tmp_path / "b.png").write_bytes(b"not a png at all" * 20)
    (tmp_path / "c.jpg").write_bytes(truncated_jpeg(smear_fields[1]))
    (tmp_path / "d.jpg").write_bytes(b"")
    cv2.imwrite(str(tmp_path / "e.png"), smear_fields[2])
    (tmp_path / "f.jpg").write_bytes(corrupt_jpeg(smear_fields[1]))

    with caplog.at_level(logging.WARNING, logger="leukoedge.capture"):
        source = open_source(tmp_path)
        frames = list(source)

    assert [np.array_equal(f.image, field) for f, field in zip(frames, smear_fields[::2])] == [True, True]
    assert [frame.index for frame in frames] == [0, 1]
    assert source.skipped == 4
    assert {name for name in ("b.png", "c.jpg", "d.jpg", "f.jpg") if name in caplog.text} == {"b.png", "c.jpg", "d.jpg", "f.jpg"}
    assert "truncated file" in caplog.text and "decoder reported a damaged file" in caplog.text


def test_a_broken_link_and_a_folder_named_like_an_image_are_skipped_and_counted_not_left_out_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.full((64, 64, 3), 120, np.uint8))
    (tmp_path / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "c.jpg").mkdir()
    (tmp_path / "notes").mkdir()  # no image's name: not one of the images handed over
    with caplog.at_level(logging.WARNING, logger="leukoedge.capture"):
        source = open_source(tmp_path)
        frames = list(source)
    assert [frame.name for frame in frames] == ["a.png"] and source.skipped == 2
    assert "b.jpg" in caplog.text and "c.jpg" in caplog.text and "notes" not in caplog.text


def test_a_folder_s_files_that_are_not_images_it_reads_are_named_once_not_left_out_silently(
    tmp_path: Path, smear_fields: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), smear_fields[0])
    cv2.imwrite(str(tmp_path / "b.webp"), smear_fields[1])
    (tmp_path / "field.gif").write_bytes(b"GIF89a")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="leukoedge.capture"):
        frames = list(open_source(tmp_path))
    assert [frame.name for frame in frames] == ["a.png", "b.webp"]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "left out 2 file(s)" in warnings[0]
    assert "field.gif, notes.txt" in warnings[0] and ".DS_Store" not in warnings[0]


@pytest.mark.parametrize(
    ("make_uri", "message"),
    [
        (lambda tmp: str(tmp / "missing.mp4"), "does not exist"),
        (lambda tmp: f"folder://{tmp / 'missing'}", "not a folder"),
        (lambda tmp: str(tmp), "holds no image files"),
        (lambda tmp: "ftp://scope.local/field.png", "unknown source scheme"),
        (lambda tmp: "csi://front", "csi://<sensor id>"),
        (lambda tmp: 99, "cannot open v4l2://99"),
        (lambda tmp: "v4l2:///dev/video99", "cannot open"),
    ],
    ids=["missing-file", "missing-folder", "empty-folder", "unknown-scheme", "bad-csi", "camera-index", "v4l2-path"],
)
def test_unopenable_sources_raise_capture_error(
    tmp_path: Path, make_uri: Callable[[Path], str | int], message: str
) -> None:
    with pytest.raises(CaptureError, match=message.replace("<", ".").replace(">", ".")):
        open_source(make_uri(tmp_path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("field.png", b"\x89PNG broken" * 10, "not an image file"),
        ("cut.png", cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))[1].tobytes()[:-30], "truncated"),
        ("session.avi", b"RIFF junk" * 50, "expected a video file"),
        ("never_written.mp4", b"", "the file is empty"),
        ("notes.txt", b"hello", "unknown file type"),
    ],
)
def test_unreadable_files_raise_capture_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CaptureError, match=message):
        open_source(tmp_path / name)


def test_has_gstreamer_follows_the_build_information() -> None:
    assert has_gstreamer() == BUILD_HAS_GSTREAMER


@pytest.mark.skipif(BUILD_HAS_GSTREAMER, reason="this OpenCV build has GStreamer")
@pytest.mark.parametrize(
    "uri", ["csi://0", "gst://videotestsrc ! appsink", "videotestsrc num-buffers=3 ! videoconvert ! appsink"]
)
def test_gstreamer_sources_say_gstreamer_is_missing(uri: str) -> None:
    with pytest.raises(CaptureError, match="OpenCV build has no GStreamer support"):
        open_source(uri)


@pytest.mark.skipif(not BUILD_HAS_GSTREAMER, reason="this OpenCV build lacks GStreamer")
def test_gstreamer_pipeline_delivers_bgr_frames() -> None:
    pipeline = (
        "videotestsrc num-buffers=3 ! video/x-raw, width=64, height=48 ! videoconvert ! "
        "video/x-raw, format=BGR ! appsink"
    )
    with open_source(pipeline) as source:
        frame = source.read()
    assert frame is not None and frame.image.shape == (48, 64, 3)


def test_csi_pipeline_names_sensor_size_rate_and_flip() -> None:
    pipeline = csi_pipeline(sensor_id=1, width=1280, height=720, fps=60, flip=2)

    assert pipeline.startswith("nvarguscamerasrc sensor-id=1 !")
    for part in ("width=1280", "height=720", "framerate=60/1", "flip-method=2", "format=BGR !"):
        assert part in pipeline
    assert pipeline.rsplit("!", 1)[-1].strip().startswith("appsink")


# --- threaded reader -----------------------------------------------------------------------------


def test_reader_hands_out_the_newest_frame_and_counts_dropped(
    tmp_path: Path, smear_fields: list[np.ndarray]
) -> None:
    path = tmp_path / "session.avi"
    write_video(path, smear_fields, 30)
    last_frame = list(open_source(path))[-1]

    reader = ThreadedReader(lambda: open_source(path), drop_frames=True)  # as from a camera
    wait_until(lambda: not reader.running)  # a consumer far slower than the source

    newest = reader.get(timeout=1.0)
    assert newest is not None and newest.index == 29
    assert np.array_equal(newest.image, last_frame.image)
    assert reader.stats()["dropped"] == 29
    assert reader.get(timeout=1.0) is None


def test_stop_joins_the_thread_and_closes_the_source(smear_fields: list[np.ndarray]) -> None:
    camera = ScriptedLiveSource(smear_fields[0], good_frames=None, read_delay_s=0.001)
    reader = ThreadedReader(lambda: camera)
    assert reader.get(timeout=2.0) is not None

    started = time.monotonic()
    reader.stop(timeout=2.0)

    assert time.monotonic() - started < 1.0
    assert not reader.running
    assert camera.closed


def test_get_times_out_when_no_frame_comes(smear_fields: list[np.ndarray]) -> None:
    with ThreadedReader(lambda: ScriptedLiveSource(smear_fields[0], None, read_delay_s=0.3)) as reader:
        with pytest.raises(TimeoutError):
            reader.get(timeout=0.05)


@pytest.mark.parametrize(("fault", "error_text"), [("raise", "camera cable pulled"), ("empty", "empty frame")])
def test_reader_reconnects_after_a_live_source_fails(
    tmp_path: Path, smear_fields: list[np.ndarray], fault: str, error_text: str
) -> None:
    for number in range(4):
        cv2.imwrite(str(tmp_path / f"field_{number}.png"), smear_fields[number % 3])
    opened: list[FrameSource] = []

    def reopen_camera() -> FrameSource:
        # First a camera that fails after 3 frames, then one that works (a finite folder, so the test ends).
        source = ScriptedLiveSource(smear_fields[0], 3, fault) if not opened else open_source(tmp_path)
        opened.append(source)
        return source

    with ThreadedReader(reopen_camera, backoff_s=(0.01, 0.05)) as reader:
        frames = list(reader)
        stats = reader.stats()

    assert len(opened) == 2 and opened[0].closed
    assert stats["reconnects"] == 1
    assert stats["frames"] == 7
    assert error_text in str(stats["last_error"])
    assert frames[-1].index == 6
    assert all(later.index > earlier.index for earlier, later in zip(frames, frames[1:]))


def test_reader_raises_capture_error_once_retries_are_exhausted(smear_fields: list[np.ndarray]) -> None:
    attempts = []

    def unplugged_camera() -> FrameSource:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            return ScriptedLiveSource(smear_fields[0], good_frames=0)
        raise CaptureError("cannot open v4l2://0: camera unplugged")

    with ThreadedReader(unplugged_camera, max_retries=2, backoff_s=(0.01, 0.02)) as reader:
        with pytest.raises(CaptureError, match="2 re-open attempts.*camera unplugged"):
            reader.get(timeout=2.0)
        assert reader.stats()["reconnects"] == 0
    assert len(attempts) == 3
    assert attempts[2] - attempts[1] >= 0.02 - 1e-3  # the backoff doubled and stayed within its bound


def test_reader_without_reconnect_surfaces_the_first_fault(smear_fields: list[np.ndarray]) -> None:
    with ThreadedReader(lambda: ScriptedLiveSource(smear_fields[0], 0), reconnect=False) as reader:
        with pytest.raises(CaptureError, match="camera cable pulled"):
            reader.get(timeout=2.0)


def test_reader_ends_a_finite_source_and_counts_size_changes_and_skips(
    tmp_path: Path, smear_fields: list[np.ndarray]
) -> None:
    small = cv2.resize(smear_fields[2], (40, 32))
    for name, field in (("a.png", smear_fields[0]), ("b.png", smear_fields[1]), ("d.png", small), ("e.png", small)):
        cv2.imwrite(str(tmp_path / name), field)
    (tmp_path / "c.png").write_bytes(b"corrupt")

    with ThreadedReader(lambda: open_source(tmp_path), drop_frames=True) as reader:  # as from a camera
        wait_until(lambda: not reader.running)
        taken = list(reader)
        stats = reader.stats()

    assert len(taken) == 1 and taken[0].image.shape == (32, 40, 3)
    assert stats == {
        "frames": 4, "dropped": 3, "reconnects": 0, "size_changes": 1, "skipped": 1, "last_error": None,
    }


# --- faults: sources that vanish, deliver nothing, or change size --------------------------------


class StubCapture:
    """cv2.VideoCapture as a failing driver behaves: grab() succeeds or not, retrieve() gives this image."""

    def __init__(self, grabbed: bool, image: np.ndarray | None):
        self._grabbed = grabbed
        self._image = image

    def grab(self) -> bool:
        return self._grabbed

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        return self._image is not None, self._image

    def release(self) -> None:
        pass


@pytest.mark.parametrize(
    ("grabbed", "image"),
    [(False, None), (True, None), (True, np.empty((0, 0, 3), np.uint8)), (True, np.empty((480, 0, 3), np.uint8))],
    ids=["grab-fails", "retrieve-fails", "empty-image", "zero-width-image"],
)
def test_camera_that_delivers_nothing_reads_as_no_frame(grabbed: bool, image: np.ndarray | None) -> None:
    # None is what ThreadedReader treats as a fault of a live source (and re-opens it), never a frame to run.
    source = VideoCaptureSource(StubCapture(grabbed, image), "v4l2://0", live=True)  # type: ignore[arg-type]
    assert source.read() is None


class ListedFramesCamera(FrameSource):
    """A live camera delivering the given images in turn, then failing: a camera switching modes mid-stream."""

    live = True

    def __init__(self, images: list[np.ndarray]):
        self.uri = "scripted://mode-switching-camera"
        self._images = images
        self._delivered = 0

    def read(self) -> Frame | None:
        time.sleep(0.02)  # slower than the consumer, so no frame is dropped
        if self._delivered == len(self._images):
            raise OSError("camera unplugged")
        self._delivered += 1
        return Frame(self._images[self._delivered - 1], self._delivered - 1, time.monotonic(), 0.0, self.uri)

    def close(self) -> None:
        pass


def test_frames_of_a_new_size_are_delivered_and_counted(smear_fields: list[np.ndarray]) -> None:
    large = smear_fields[0]
    small = cv2.resize(smear_fields[1], (80, 60))
    camera = ListedFramesCamera([large, large, small, small, large])

    with ThreadedReader(lambda: camera, reconnect=False) as reader:
        shapes = []
        with pytest.raises(CaptureError, match="camera unplugged"):
            while True:
                frame = reader.get(timeout=2.0)
                shapes.append(frame.image.shape)
        stats = reader.stats()

    assert shapes == [large.shape, large.shape, small.shape, small.shape, large.shape]
    assert stats["size_changes"] == 2 and stats["dropped"] == 0


def test_first_open_failure_is_raised_by_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="does not exist"):
        ThreadedReader(lambda: open_source(tmp_path / "unplugged.avi"))


def test_folder_emptied_while_reading_ends_cleanly_with_skips_counted(tmp_path: Path, smear_fields: list[np.ndarray]) -> None:
    for number in range(3):
        cv2.imwrite(str(tmp_path / f"field_{number}.png"), smear_fields[number])
    source = open_source(tmp_path)
    first = source.read()
    for number in (1, 2):  # a USB stick pulled, or a sync job deleting files, after the listing
        (tmp_path / f"field_{number}.png").unlink()

    assert first is not None and np.array_equal(first.image, smear_fields[0])
    assert source.read() is None
    assert source.skipped == 2


def test_stop_ends_a_reader_waiting_to_reopen_a_vanished_camera(smear_fields: list[np.ndarray]) -> None:
    opened = []

    def camera_gone_for_good() -> FrameSource:
        opened.append(time.monotonic())
        if len(opened) == 1:
            return ScriptedLiveSource(smear_fields[0], good_frames=1)
        raise CaptureError("cannot open v4l2://0: camera unplugged")

    reader = ThreadedReader(camera_gone_for_good, backoff_s=(0.5, 30.0))  # retries without limit
    assert reader.get(timeout=2.0) is not None
    wait_until(lambda: len(opened) >= 3)  # after 0.5 s and 1 s waits, now in a 2 s one
    started = time.monotonic()
    reader.stop(timeout=2.0)

    assert time.monotonic() - started < 1.0
    assert not reader.running
    assert reader.get(timeout=1.0) is None
    assert "camera unplugged" in str(reader.stats()["last_error"])
