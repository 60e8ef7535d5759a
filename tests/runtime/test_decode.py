"""decode.py: a file is read whole or refused with UnreadableImageError saying why.

The damaged files are made from the real smear fields shipped in samples/.
"""

from __future__ import annotations

import os
import zlib
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge.decode import decode_image, decoder_messages, file_jpeg_quality, jpeg_problem, jpeg_quality, pixel_jpeg_quality, png_problem, read_image
from leukoedge.errors import CaptureError, LeukoedgeError, UnreadableImageError, UnsupportedImageError

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "samples").glob("*.jpg"))


@pytest.fixture(scope="module")
def field_jpeg() -> bytes:
    return SAMPLES[0].read_bytes()


@pytest.fixture(scope="module")
def field_png(field_jpeg: bytes) -> bytes:
    return cv2.imencode(".png", cv2.imdecode(np.frombuffer(field_jpeg, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()


def scan_start(jpeg: bytes) -> int:
    """Offset of the first entropy-coded byte (after the SOS header)."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def test_intact_files_decode_to_what_opencv_reads(field_jpeg: bytes, field_png: bytes):
    expected = cv2.imdecode(np.frombuffer(field_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(decode_image(field_jpeg), expected)
    assert np.array_equal(decode_image(field_png), expected)
    assert jpeg_problem(field_jpeg) == "" and png_problem(field_png) == ""


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".bmp", ".tif"])
def test_every_sample_decodes_as_opencv_reads_colour_in_any_format(suffix: str):
    """decode_image decodes as stored (to refuse grey and deep files); an 8-bit colour file gives IMREAD_COLOR's pixels."""
    for sample in SAMPLES:
        encoded = cv2.imencode(suffix, cv2.imread(str(sample)))[1] if suffix != ".jpg" else np.fromfile(sample, np.uint8)
        assert np.array_equal(decode_image(encoded.tobytes(), sample.name), cv2.imdecode(encoded, cv2.IMREAD_COLOR)), (sample.name, suffix)


def test_data_after_the_end_marker_is_ignored(field_jpeg: bytes):
    assert np.array_equal(decode_image(field_jpeg + b"\0" * 64 + b"trailer"), decode_image(field_jpeg))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),  # `leukoedge run` flagged this one (issue 23)
        (lambda b: b[: len(b) // 2] + b"\xff\xd9", "premature end"),  # cut, then an end marker: libjpeg's warning
        (lambda b: b[:-2], "truncated"),
        (lambda b: b[:300], "truncated"),
        (lambda b: b[:4] + b"\x00\x01" + b[6:], "length 1"),
        (lambda b: b[:2] + b"\x00" + b[3:], "where a marker must start"),
        (lambda b: b"", "empty"),
    ],
    ids=["half", "half-with-eoi", "no-eoi", "in-headers", "segment-length", "marker", "empty"],
)
def test_damaged_jpeg_is_refused_with_the_reason(field_jpeg: bytes, damage, words: str):
    with pytest.raises(UnreadableImageError) as refusal:
        decode_image(damage(field_jpeg), "field.jpg")
    assert "field.jpg" in str(refusal.value) and words in str(refusal.value).lower()


def test_corrupt_entropy_coded_data_with_the_end_marker_intact_is_refused(field_jpeg: bytes):
    # The second case: middle bytes damaged, FFD9 still at the end; libjpeg warns "Corrupt JPEG data".
    damaged = bytearray(field_jpeg)
    middle = len(damaged) // 2
    damaged[middle : middle + 20] = bytes(value ^ 0x55 for value in damaged[middle : middle + 20])
    with pytest.raises(UnreadableImageError, match="decoder reported a damaged file"):
        decode_image(bytes(damaged))


def test_restart_markers_out_of_order_are_refused(field_jpeg: bytes):
    image = decode_image(field_jpeg)
    with_restarts = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])[1].tobytes()
    assert np.array_equal(decode_image(with_restarts), cv2.imdecode(np.frombuffer(with_restarts, np.uint8), cv2.IMREAD_COLOR))
    second = with_restarts.index(b"\xff\xd1")
    skipped_one = with_restarts[:second] + with_restarts[with_restarts.index(b"\xff\xd2") :]  # RST1's interval lost
    with pytest.raises(UnreadableImageError, match="RST2 where RST1 belongs"):
        decode_image(skipped_one)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:-12], "before its iend"),
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "fails its crc"),
        (lambda b: b[:-20] + bytes([b[-20] ^ 0x40]) + b[-19:], "fails its crc"),
        (lambda b: b[:12] + b"IHDX" + b[16:], "fails its crc"),
        (lambda b: b[:8] + b"\xff\xff\xff\xff" + b[12:], "broken chunk header"),
    ],
    ids=["half", "no-iend", "pixel-data-bit", "late-bit", "chunk-type", "chunk-length"],
)
def test_damaged_png_is_refused_with_the_reason(field_png: bytes, damage, words: str):
    with pytest.raises(UnreadableImageError) as refusal:
        decode_image(damage(field_png))
    assert words in str(refusal.value).lower()


def test_truncated_bmp_is_refused(field_jpeg: bytes):
    bmp = cv2.imencode(".bmp", decode_image(field_jpeg))[1].tobytes()
    assert np.array_equal(decode_image(bmp), decode_image(field_jpeg))
    with pytest.raises(UnreadableImageError, match="truncated"):
        decode_image(bmp[: len(bmp) * 2 // 3])


def test_not_an_image_is_refused():
    with pytest.raises(UnreadableImageError, match="not an image file"):
        decode_image(b"just text, no image" * 10)


def test_read_image_names_the_file_and_is_a_capture_error(tmp_path: Path, field_jpeg: bytes):
    path = tmp_path / "feld ö.jpg"  # non-ASCII names read too
    path.write_bytes(field_jpeg)
    assert read_image(path).shape == (480, 640, 3)
    path.write_bytes(field_jpeg[:1000])
    with pytest.raises(UnreadableImageError, match="feld ö.jpg") as refusal:
        read_image(path)
    assert isinstance(refusal.value, CaptureError) and isinstance(refusal.value, LeukoedgeError)
    with pytest.raises(UnreadableImageError, match="cannot read"):
        read_image(tmp_path / "missing.jpg")


def test_decoder_messages_collects_fault_lines_and_passes_everything_on(capfd: pytest.CaptureFixture[str]):
    with decoder_messages() as faults:
        os.write(2, b"Corrupt JPEG data: bad Huffman code\n")
        os.write(2, b"an unrelated log line\n")
    assert faults == ["Corrupt JPEG data: bad Huffman code"]
    assert capfd.readouterr().err == "Corrupt JPEG data: bad Huffman code\nan unrelated log line\n"


def test_threads_decoding_at_once_each_get_their_own_verdict(field_jpeg: bytes):
    damaged = bytearray(field_jpeg)
    middle = len(damaged) // 2
    damaged[middle : middle + 20] = bytes(value ^ 0x55 for value in damaged[middle : middle + 20])
    outcomes: dict[int, list[bool]] = {}

    def decode_many(worker: int) -> None:
        results = []
        for turn in range(20):
            data = bytes(damaged) if (worker + turn) % 2 else field_jpeg
            try:
                decode_image(data)
                results.append(data == field_jpeg)
            except UnreadableImageError:
                results.append(data != field_jpeg)
        outcomes[worker] = results

    threads = [threading.Thread(target=decode_many, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(all(results) for results in outcomes.values())


def test_a_jpeg_s_quality_is_read_from_its_quantization_table(field_jpeg: bytes, field_png: bytes, tmp_path: Path):
    field = decode_image(field_jpeg)
    for quality in (5, 10, 30, 50, 70, 75, 90, 95, 100):
        assert jpeg_quality(cv2.imencode(".jpg", field, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()) == quality
    assert jpeg_quality(field_png) is None  # another format has none
    assert jpeg_quality(field_jpeg[:20]) is None  # cut before its table
    saved = tmp_path / "field.jpg"
    saved.write_bytes(cv2.imencode(".jpg", field, [cv2.IMWRITE_JPEG_QUALITY, 60])[1].tobytes())
    assert file_jpeg_quality(saved) == 60 and file_jpeg_quality(tmp_path / "missing.jpg") is None


def _compressed(frame: np.ndarray, quality: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


def test_the_quality_a_frame_was_compressed_at_is_read_from_its_pixels(field_jpeg: bytes):
    field = decode_image(field_jpeg)
    assert pixel_jpeg_quality(field) == jpeg_quality(field_jpeg)  # the shipped sample, decoded: the file's own quality
    # Resampled, the frame keeps no block lattice: a camera's uncompressed frame.
    uncompressed = cv2.resize(field, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    assert pixel_jpeg_quality(uncompressed) is None
    for quality in (20, 40, 50, 60, 70, 75, 80):  # an MJPEG camera at these settings
        # Neighbouring qualities can scale the lowest frequencies' steps alike: of those, the highest is returned.
        assert quality <= pixel_jpeg_quality(_compressed(uncompressed, quality)) <= quality + 2
    assert pixel_jpeg_quality(_compressed(uncompressed, 95)) is None  # steps under 3 drown in the decoder's rounding
    # Compressed, then saved again at a higher quality: the harder compression shows.
    assert 50 <= pixel_jpeg_quality(_compressed(_compressed(uncompressed, 50), 95)) <= 52
    # Cropped off the 8-px grid, or smaller than a block: nothing to read.
    assert pixel_jpeg_quality(_compressed(uncompressed, 50)[3:, 5:]) is None
    assert pixel_jpeg_quality(field[:7, :7]) is None


def test_the_pixels_quality_is_read_whatever_the_channel_order(field_jpeg: bytes):
    # The luma lattice holds in a mix with red and blue swapped too (the chroma's steps at these frequencies are
    # lattices of their own): a camera handing RGB frames is read alike.
    uncompressed = cv2.resize(decode_image(field_jpeg), None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    compressed = _compressed(uncompressed, 40)
    assert pixel_jpeg_quality(compressed) == 40 == pixel_jpeg_quality(np.ascontiguousarray(compressed[:, :, ::-1]))


def test_frames_of_an_mjpeg_recording_hold_their_compression(field_jpeg: bytes, tmp_path: Path):
    # OpenCV's own MJPG writer (quality about 75, its own table scaling): what a camera recording hands over.
    field = cv2.resize(decode_image(field_jpeg), None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    path = tmp_path / "session.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (field.shape[1], field.shape[0]))
    if not writer.isOpened():
        pytest.skip("this OpenCV build writes no MJPG")
    writer.write(field)
    writer.release()
    ok, frame = cv2.VideoCapture(str(path)).read()
    assert ok and 70 <= pixel_jpeg_quality(frame) <= 77


def _with_header_size(kind: str, width: int, height: int) -> bytes:
    """A small image of that kind whose header states width x height."""
    data = bytearray(cv2.imencode(f".{kind}", np.full((16, 16, 3), 128, np.uint8))[1].tobytes())
    if kind == "jpg":
        sof = data.find(b"\xff\xc0")
        data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    elif kind == "png":
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC, so only its size is wrong
    else:
        data[18:26] = width.to_bytes(4, "little", signed=True) + height.to_bytes(4, "little", signed=True)
    return bytes(data)


@pytest.mark.parametrize("kind", ["jpg", "png", "bmp"])
def test_an_image_larger_than_any_bundle_judges_is_refused_from_its_header_before_decoding(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    huge = _with_header_size(kind, 20000, 20000)
    monkeypatch.setattr(cv2, "imdecode", lambda *args: pytest.fail("decoded an image its header said was too large"))
    with pytest.raises(UnreadableImageError, match=r"header says 20000x20000 px, larger than any bundle judges \(16384 px a side\)"):
        decode_image(huge, f"huge.{kind}")


@pytest.mark.parametrize("kind", ["jpg", "png", "bmp"])
def test_the_header_size_check_passes_an_image_of_a_judged_size(kind: str) -> None:
    assert decode_image(cv2.imencode(f".{kind}", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()).shape == (48, 64, 3)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def _indexed_png(indices: np.ndarray, palette: np.ndarray) -> bytes:
    height, width = indices.shape
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 3, 0, 0, 0])  # 8 bits, colour type 3
    rows = b"".join(b"\0" + row.tobytes() for row in indices.astype(np.uint8))
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")
    )


def _indexed_bmp(indices: np.ndarray, palette: np.ndarray) -> bytes:
    height, width = indices.shape
    stride = (width + 3) // 4 * 4
    rows = b"".join(row.tobytes().ljust(stride, b"\0") for row in indices[::-1].astype(np.uint8))  # bottom-up
    colours = b"".join(bytes([b, g, r, 0]) for r, g, b in palette.astype(np.uint8))
    info = (40).to_bytes(4, "little") + width.to_bytes(4, "little") + height.to_bytes(4, "little") + (1).to_bytes(2, "little") + (8).to_bytes(2, "little")
    info += bytes(4) + len(rows).to_bytes(4, "little") + bytes(8) + (len(palette)).to_bytes(4, "little") + bytes(4)
    offset = 14 + len(info) + len(colours)
    return b"BM" + (offset + len(rows)).to_bytes(4, "little") + bytes(4) + offset.to_bytes(4, "little") + info + colours + rows


@pytest.mark.parametrize(("encode", "words"), [(_indexed_png, "an indexed-colour PNG"), (_indexed_bmp, "a BMP of 8 bits per pixel")], ids=["png", "bmp"])
def test_an_indexed_colour_image_is_refused_naming_its_palette(encode, words: str):
    # A palette of 256 stain-like colours: OpenCV decodes it to colour pixels, which the domain check would misread as
    # sensor noise; it is refused as what it is, with what to do instead.
    rng = np.random.default_rng(0)
    palette = np.stack([rng.integers(120, 250, 256), rng.integers(60, 200, 256), rng.integers(120, 250, 256)], axis=1)
    data = encode(rng.integers(0, 256, (48, 64)), palette)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)
    with pytest.raises(UnsupportedImageError, match=f"{words}.*save frames in full colour"):
        decode_image(data, "field")
