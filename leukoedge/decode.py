"""Decoding that reports every fault: a frame leukoedge reads is the whole image, or it is refused.

OpenCV's decoders do not say when they guessed. A JPEG cut short may come back grey below the cut
(older builds, JetPack's among them), a JPEG with damaged entropy-coded data comes back with smeared
blocks, an AVI cut inside a frame gives a half-decoded last frame: each only with a message that
libjpeg, libpng or FFmpeg writes to the process's stderr. A confident blast flag on such a frame
is the worst answer the runtime can give, so every image and recorded frame is read here:

- JPEG: the marker structure is walked (SOI, segments of the stated lengths, a frame header before
  the first scan, restart markers in order, an EOI after the last scan), and libjpeg must decode
  without a warning.
- PNG: every chunk's CRC is checked, from IHDR to IEND, and libpng must decode without an error.
- BMP: the file must be as long as its header says.
- Other formats (TIFF, WebP, ...) and video frames: the decoder must not report a fault.

JPEG has no checksum, so damaged entropy-coded data can still decode as valid codes that end on the
right byte, without any message. Two more checks see what such damage leaves:

- Huffman tables: no symbol may be listed twice in one table (a flipped table byte that libjpeg
  accepts, after which every code using it decodes to the wrong coefficients).
- Block seams (`block_seam`): each block's mean (its DC coefficient) is coded as a difference from
  the previous block's, so a wrong code shifts the brightness or colour of every block after it. In
  the decoded pixels that is a step lying exactly on an 8-px block row boundary and running along
  the rest of the block row, with no such step in the rows beside it. Natural edges cross block
  boundaries at any angle and rarely run along one.

Damage that leaves no such trace (a single wrong block, a quantization table entry changed) is not
seen: it gives slightly wrong pixels.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from .errors import UnreadableImageError, UnsupportedImageError

T = TypeVar("T")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI, _JPEG_SOS, _JPEG_TEM = 0xD9, 0xDA, 0x01
_JPEG_RST = range(0xD0, 0xD8)
# SOF0..SOF15 without DHT (C4), JPG (C8) and DAC (CC): the markers that start a frame header.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_DHT = 0xC4

# The largest side (px) any bundle may judge (bundle.MAX_FRAME_SIDE reads it). A larger image is refused from its header,
# before decoding: a 16-KB JPEG whose header says 20000x20000 would otherwise make the decoder allocate 1.2 GB first.
MAX_DECODED_SIDE = 16384

# Block seams, measured on the 8,367 intact JPEGs of ../shared/data (five sources) and samples/: the
# longest run of bins stepping >= SEAM_STEP along one block row boundary is 4 bins (one PBC image), so
# none is refused at 5 or more. Damaged JPEGs of the fuzz run that libjpeg decodes silently give 8 to 13
# (tests/runtime/test_decode_seams.py prints the refusals and the margin; SECURITY.md, "Frame input").
SEAM_BLOCK = 8  # px: JPEG's (and MJPG's) DCT block; an MCU row of 4:2:0 chroma is two of them
SEAM_BIN = 16  # px of a boundary averaged into one step, so that noise and single edges average out
SEAM_STEP = 8.0  # grey levels per channel, mean over a bin
SEAM_RATIO = 2.0  # the step across the boundary against the largest one between the 3 rows either side
SEAM_RUN = 6  # bins in a row (96 px) on one boundary, one sign, one channel

# Lines a native decoder writes on a fault: libjpeg's warnings and errors, libpng's errors, libtiff's,
# FFmpeg's log lines ("[mjpeg @ 0x55d0...] overread 8"), OpenCV's own codec warnings. Anything else
# written to stderr meanwhile (another thread's log line) is passed on untouched and decides nothing.
_DECODER_FAULT = re.compile(
    rb"JPEG|Huffman|[Mm]arker|Bogus|libpng error|TIFF|\[[\w-]+ @ 0x[0-9a-fA-F]+\]|imgcodecs|grfmt"
)
_stderr_lock = threading.Lock()


@contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """Collects the fault messages native decoders write to stderr (file descriptor 2) inside the block.

    libjpeg, libpng and FFmpeg report through stderr only, so the descriptor is pointed at a
    temporary file for the block (one block at a time, process-wide) and whatever was written is
    passed on to the real stderr afterwards. The yielded list is filled when the block ends.
    """
    faults: list[str] = []
    with _stderr_lock, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield faults
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            written = sink.read()
            if written:
                os.write(2, written)
            faults.extend(line.decode("utf-8", "replace").strip() for line in written.splitlines() if _DECODER_FAULT.search(line))


def decode_checked(decode: Callable[[], T]) -> tuple[T, list[str]]:
    """decode() and the fault messages native decoders wrote while it ran."""
    with decoder_messages() as faults:
        value = decode()
    return value, faults


def decode_image(data: bytes | np.ndarray, name: str = "image") -> np.ndarray:
    """HxWx3 uint8 BGR pixels of an encoded image (any format cv2.imdecode reads), all of them.

    Raises UnreadableImageError, naming `name` and the fault, when the data is empty, truncated,
    corrupt or not an image; UnsupportedImageError (one of them) for an indexed-colour image (from its header, before
    decoding), a greyscale image or one of more than 8 bits per channel. An alpha channel is dropped (it holds no pixel
    of the smear).
    """
    encoded = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if not encoded:
        raise UnreadableImageError(f"cannot read {name}: the file is empty")
    problem = structure_problem(encoded)
    if problem:
        raise UnreadableImageError(f"cannot read {name}: {problem}")
    if palette := indexed_colour(encoded):
        raise UnsupportedImageError(
            f"cannot judge {name}: {palette}, its colours quantized (and often dithered: the domain check would read that as sensor noise); "
            "save frames in full colour (JPEG, or a truecolour PNG, BMP or TIFF)"
        )
    buffer = np.frombuffer(encoded, np.uint8)
    try:
        # As stored (its channels and bit depth), so a greyscale or deeper image is refused rather than converted.
        image, faults = decode_checked(lambda: cv2.imdecode(buffer, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH))
    except cv2.error as error:
        raise UnreadableImageError(f"cannot read {name}: the decoder failed ({error})") from error
    if faults:
        raise UnreadableImageError(f"cannot read {name}: the decoder reported a damaged file ({'; '.join(faults[:3])})")
    if image is None or image.size == 0:
        raise UnreadableImageError(f"cannot read {name}: not an image file OpenCV can decode")
    if image.ndim == 2 or image.shape[2] == 1:
        raise UnsupportedImageError(f"cannot judge {name}: a greyscale image; leukoedge judges colour frames of a stained smear")
    if image.dtype != np.uint8:
        raise UnsupportedImageError(
            f"cannot judge {name}: {8 * image.dtype.itemsize} bits per channel; leukoedge reads 8: export 8-bit frames with the camera's "
            "own display scaling (a plain shift darkens 12-bit data stored in 16 bits)"
        )
    seam = block_seam(image) if encoded.startswith(_JPEG_SOI) else ""
    if seam:
        raise UnreadableImageError(f"cannot read {name}: {seam}, the mark of damaged JPEG data (JPEG has no checksum)")
    return image


def read_image(path: str | Path) -> np.ndarray:
    """decode_image of a file's bytes (non-ASCII paths too); UnreadableImageError when it cannot be read."""
    return read_image_file(path)[0]


def read_image_file(path: str | Path) -> tuple[np.ndarray, int | None]:
    """read_image and the file's jpeg_quality (None for another format), from one read of the file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UnreadableImageError(f"cannot read {path}: {error.strerror or error}") from error
    return decode_image(data, str(path)), jpeg_quality(data[:JPEG_HEADER_BYTES].tobytes())


# The standard luminance quantization table (ITU-T T.81 Annex K), natural order, that libjpeg-based encoders (OpenCV,
# Pillow, most camera firmware) scale by their quality setting; only its sum is compared (jpeg_quality), so the order
# a file stores its table in does not matter.
_STANDARD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
_JPEG_DQT = 0xDB
JPEG_HEADER_BYTES = 1 << 16  # the quantization tables come before the image data: the first 64 KB hold them


def _scaled_table(quality: int) -> np.ndarray:
    """The standard luminance table (8x8) as libjpeg scales it for `quality` (jcparam.c)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((np.array(_STANDARD_LUMINANCE).reshape(8, 8) * scale + 50) // 100, 1, 255)


_SCALED_TABLES = {quality: _scaled_table(quality) for quality in range(1, 101)}
_TABLE_SUMS = {quality: int(table.sum()) for quality, table in _SCALED_TABLES.items()}


def jpeg_quality(data: bytes) -> int | None:
    """The quality (1-100) a JPEG was saved at, estimated from its luminance quantization table (table 0) as libjpeg
    scales the standard one: the quality whose table sum is nearest. Exact for libjpeg-made files; an estimate for
    encoders with tables of their own. None for another format or a JPEG without a table."""
    if not data.startswith(_JPEG_SOI):
        return None
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker, length = data[position + 1], int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == _JPEG_SOS or length < 2:
            return None
        if marker == _JPEG_DQT:
            table, end = position + 4, min(position + 2 + length, len(data))
            while table < end:
                precision, identifier = data[table] >> 4, data[table] & 0x0F
                size = 64 * (2 if precision else 1)
                values = data[table + 1 : table + 1 + size]
                if len(values) < size:
                    return None
                if identifier == 0:
                    total = sum(int.from_bytes(values[i : i + 2], "big") for i in range(0, size, 2)) if precision else sum(values)
                    return min(_TABLE_SUMS, key=lambda quality: (abs(_TABLE_SUMS[quality] - total), -quality))
                table += 1 + size
        position += 2 + length
    return None


# A frame that was JPEG-compressed and decoded (an MJPEG camera, a JPEG saved again as PNG, a file compressed before
# it was saved at a higher quality) keeps its compression in its pixels: the luma of each 8x8 block, transformed by the
# DCT the encoder used, holds multiples of the quantization step at each frequency, up to the decoder's rounding
# (about half a grey level). pixel_jpeg_quality finds the largest step whose lattice holds the coefficients at the lowest
# AC frequencies (non-zero in most blocks of a smear) and the quality whose scaled standard table has those steps.
_DCT = np.sqrt(2 / 8) * np.cos((2 * np.arange(8)[None, :] + 1) * np.arange(8)[:, None] * np.pi / 16)
_DCT[0] /= np.sqrt(2)  # orthonormal: JPEG's forward DCT, coefficient for coefficient
_LATTICE_FREQUENCIES = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1), (0, 3), (3, 0), (2, 2))
_ROWS = _DCT[[u for u, _ in _LATTICE_FREQUENCIES]].astype(np.float32)
_COLUMNS = _DCT[[v for _, v in _LATTICE_FREQUENCIES]].astype(np.float32)
_LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)  # JPEG's Y from B, G, R
# Steps 2 and under drown in the rounding; 32 is the step of the (2, 2) frequency at quality 25: a harder compression
# still shows a lattice at a divisor of its step, and maps to a quality as low.
LATTICE_STEPS = np.arange(3, 33)
LATTICE_SHARE = 0.8  # of the coefficients beyond half a step that lie within one grey level of a multiple of it
LATTICE_SLACK = 0.1  # and at most this much less than the best-fitting step's share
LATTICE_MIN_COEFFICIENTS = 30  # fewer coefficients beyond half a step (flat blocks) say nothing of the step
# A block with a value clipped at 0 or 255 (a background overexposed at white, a ringing overshoot) is off the lattice
# there; up to this many of its 192 values shift its coefficients by little. Beyond, the block is left out: a field
# whose background is clipped almost everywhere (half of Taleqani's) leaves too few blocks to read.
MAX_CLIPPED_VALUES = 8
PIXEL_QUALITY_BLOCKS = 800  # blocks read, an even grid of them: enough coefficients, under a millisecond
# Coefficient magnitudes under 256 are counted in bins of a quarter grey level (larger ones, strong edges, are few), so
# testing every step is two small products with fixed tables of which bins lie beyond half the step and which of those
# within one grey level of a multiple of it.
_BIN = 0.25
_BIN_CENTRES = np.arange(int(256 / _BIN)) * _BIN
_BEYOND_HALF = (_BIN_CENTRES[None, :] > LATTICE_STEPS[:, None] / 2).astype(np.float32)
_NEAR_MULTIPLE = np.abs(_BIN_CENTRES[None, :] - LATTICE_STEPS[:, None] * np.round(_BIN_CENTRES[None, :] / LATTICE_STEPS[:, None])) <= 1.0
_ON_LATTICE = (_NEAR_MULTIPLE & (_BEYOND_HALF > 0)).astype(np.float32)
_QUALITIES = np.array(sorted(_SCALED_TABLES))
_TABLE_STEPS = np.array([[_SCALED_TABLES[quality][frequency] for frequency in _LATTICE_FREQUENCIES] for quality in _QUALITIES])


def pixel_jpeg_quality(frame: np.ndarray) -> int | None:
    """The JPEG quality (1-100) a decoded BGR frame was last compressed at, estimated from its pixels; None where no
    block lattice shows (never compressed, compressed at 90 or more, or resized or cropped off the 8-px grid since).
    On frames compressed once by a libjpeg-based encoder with the standard tables, the quality or one to two above it
    (neighbouring qualities can scale the lowest frequencies' steps alike; of those the highest is returned); where a
    frame was compressed twice, the harder compression's steps dominate."""
    rows, columns = frame.shape[0] // 8, frame.shape[1] // 8
    if rows * columns == 0:
        return None
    stride = max(1, int(np.ceil(np.sqrt(rows * columns / PIXEL_QUALITY_BLOCKS))))
    grid = frame[: rows * 8, : columns * 8].reshape(rows, 8, columns, 8, 3)[::stride, :, ::stride]
    blocks = grid.transpose(0, 2, 1, 3, 4).reshape(-1, 8, 8, 3)
    unclipped = np.count_nonzero((blocks + np.uint8(1)).reshape(len(blocks), -1) <= 1, axis=1) <= MAX_CLIPPED_VALUES  # 255 and 0 wrap to 0 and 1
    luma = blocks[unclipped].astype(np.float32) @ _LUMA_BGR
    coefficients = np.abs((np.matmul(_ROWS[None], luma) * _COLUMNS[None]).sum(axis=2))  # (blocks, frequencies)
    frequencies = len(_LATTICE_FREQUENCIES)
    bins = (coefficients / _BIN + 0.5).astype(np.int64) + np.arange(frequencies) * _BIN_CENTRES.size  # one histogram each
    histogram = np.bincount(bins[coefficients < _BIN_CENTRES[-1]], minlength=frequencies * _BIN_CENTRES.size)
    histogram = histogram.reshape(frequencies, -1).astype(np.float32)
    counted, on_lattice = histogram @ _BEYOND_HALF.T, histogram @ _ON_LATTICE.T  # (frequencies, steps)
    share = np.where(counted >= LATTICE_MIN_COEFFICIENTS, on_lattice / np.maximum(counted, 1), 0.0)
    # A step's lattice must hold nearly as much as the best-fitting step's: a frame compressed twice (at 51, then at 70)
    # holds 80 % on twice the second step's lattice too, where most coefficients sit at one multiple.
    held = share >= np.maximum(LATTICE_SHARE, share.max(axis=1, keepdims=True) - LATTICE_SLACK)
    largest = np.where(held.any(axis=1), LATTICE_STEPS[::-1][np.argmax(held[:, ::-1], axis=1)], 0)  # per frequency
    found = np.where(largest >= 4, largest, -1)  # 3 still fits the rounding of an uncompressed frame at times
    if (found < 0).all():
        return None
    matches = (_TABLE_STEPS == found[None, :]).sum(axis=1)
    return int(_QUALITIES[np.flatnonzero(matches == matches.max())[-1]])  # of equal fits, the highest quality


def file_jpeg_quality(path: str | Path) -> int | None:
    """jpeg_quality of a file's first JPEG_HEADER_BYTES; None where it is not a JPEG or cannot be read."""
    try:
        with open(path, "rb") as file:
            return jpeg_quality(file.read(JPEG_HEADER_BYTES))
    except OSError:
        return None


def structure_problem(data: bytes) -> str:
    """What is wrong with a JPEG's, PNG's or BMP's structure ("" when nothing is, or for other formats)."""
    if data.startswith(_JPEG_SOI):
        return jpeg_problem(data)
    if data.startswith(_PNG_SIGNATURE):
        return png_problem(data)
    if data.startswith(b"BM"):
        return bmp_problem(data)
    return ""


def jpeg_problem(data: bytes) -> str:
    """Walks a JPEG's markers from SOI to EOI; "" when the structure is whole."""
    position, frame_header, scans = 2, False, 0
    while True:
        if position >= len(data):
            return "the JPEG ends before its end-of-image marker (truncated file)"
        if data[position] != 0xFF:
            return f"the JPEG has byte 0x{data[position]:02x} at offset {position} where a marker must start (corrupt file)"
        while position < len(data) and data[position] == 0xFF:  # fill bytes before a marker
            position += 1
        if position >= len(data):
            return "the JPEG ends before its end-of-image marker (truncated file)"
        marker = data[position]
        position += 1
        if marker == _JPEG_EOI:
            return "" if scans else "the JPEG ends without image data"
        if marker in _JPEG_RST or marker == _JPEG_TEM:
            continue  # markers without a length; libjpeg judges whether they belong here
        if marker in (0x00, 0xD8):
            return f"the JPEG has marker 0xff{marker:02x} at offset {position - 2} (corrupt file)"
        if position + 2 > len(data):
            return "the JPEG ends inside a segment header (truncated file)"
        length = int.from_bytes(data[position : position + 2], "big")
        end = position + length
        if length < 2:
            return f"the JPEG's segment 0xff{marker:02x} at offset {position - 2} has length {length} (corrupt file)"
        if end > len(data):
            return "the JPEG ends inside a segment (truncated file)"
        if marker in _JPEG_SOF:
            frame_header = True
            if length >= 7 and (problem := size_problem(int.from_bytes(data[position + 5 : position + 7], "big"), int.from_bytes(data[position + 3 : position + 5], "big"))):
                return problem
        if marker == _JPEG_DHT:
            problem = _huffman_problem(data[position + 2 : end], position - 2)
            if problem:
                return problem
        if marker == _JPEG_SOS:
            if not frame_header:
                return "the JPEG has a scan before its frame header (corrupt file)"
            scans += 1
            position, problem = _skip_entropy_coded_data(data, end)
            if problem:
                return problem
            continue
        position = end


def _skip_entropy_coded_data(data: bytes, position: int) -> tuple[int, str]:
    """The offset of the marker ending a scan that starts at `position`, checking its restart markers
    come in order (RST0..RST7, RST0, ...); (offset, "") or (offset, the problem)."""
    expected_restart = 0
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data), "the JPEG ends inside its image data (truncated file)"
        following = data[position + 1]
        if following == 0x00 or following == 0xFF:  # a stuffed 0xff data byte, or fill before a marker
            position += 1 if following == 0xFF else 2
            continue
        if following in _JPEG_RST:
            if following - 0xD0 != expected_restart:
                return position, f"the JPEG has restart marker RST{following - 0xD0} where RST{expected_restart} belongs (corrupt or missing data)"
            expected_restart = (expected_restart + 1) % 8
            position += 2
            continue
        return position, ""


def _huffman_problem(segment: bytes, offset: int) -> str:
    """A DHT segment's tables (class/id byte, 16 code counts, the symbols): "" unless one lists a symbol twice.

    libjpeg checks the counts (they must fill the segment and fit the code space) but not the symbols:
    a flipped symbol byte decodes every code of both symbols to one of them, silently.
    """
    position = 0
    while position + 17 <= len(segment):
        count = sum(segment[position + 1 : position + 17])
        symbols = segment[position + 17 : position + 17 + count]
        if len(set(symbols)) != len(symbols):
            return f"the JPEG's Huffman table at offset {offset} lists a symbol twice (corrupt file)"
        position += 17 + count
    return ""


def block_seam(image: np.ndarray) -> str:
    """Where a decoded JPEG or MJPG frame shows a damaged-data step along a block row boundary ("" where none).

    Per channel, the mean step between the rows either side of each 8-px block boundary is taken over
    bins of SEAM_BIN columns; a bin steps where that mean is at least SEAM_STEP and SEAM_RATIO times
    every step between the 3 rows above and below it. SEAM_RUN stepping bins in a row, of one sign, is
    a seam. About 2 ms for a 640x480 frame.
    """
    height, width = image.shape[:2]
    bins = width // SEAM_BIN
    boundaries = np.arange(SEAM_BLOCK, height - 3, SEAM_BLOCK)
    if bins < SEAM_RUN or len(boundaries) == 0:
        return ""
    # Each row's mean over each bin (INTER_AREA on float32 averages exactly, ten times faster than numpy's
    # reduction over a middle axis); steps[r]: the change of those means from row r to row r + 1.
    binned = cv2.resize(image[:, : bins * SEAM_BIN].astype(np.float32), (bins, height), interpolation=cv2.INTER_AREA)
    binned = binned.reshape(height, bins, -1)  # a one-channel frame stays 3-D
    steps = binned[1:] - binned[:-1]
    across = steps[boundaries - 1]
    beside = np.max([np.abs(steps[boundaries - 1 + offset]) for offset in (-3, -2, -1, 1, 2, 3)], axis=0)
    stepping = (np.abs(across) >= SEAM_STEP) & (np.abs(across) >= SEAM_RATIO * beside)
    for sign in (1, -1):
        marked = stepping & (np.sign(across) == sign)
        in_a_row = np.cumsum(marked, axis=1)
        runs = (in_a_row[:, SEAM_RUN - 1 :] - np.pad(in_a_row, ((0, 0), (1, 0), (0, 0)))[:, : bins - SEAM_RUN + 1]) == SEAM_RUN
        if runs.any():
            row, first_bin, _ = np.argwhere(runs)[0]
            return (
                f"a step along the block boundary at row {boundaries[row]} from column {first_bin * SEAM_BIN} "
                f"over {SEAM_RUN * SEAM_BIN} px or more"
            )
    return ""


def png_problem(data: bytes) -> str:
    """Checks every PNG chunk's CRC from IHDR to IEND; "" when all are whole."""
    position, first = len(_PNG_SIGNATURE), True
    while True:
        if position + 8 > len(data):
            return "the PNG ends before its IEND chunk (truncated file)"
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        end = position + 12 + length
        if not kind.isalpha() or length >= 1 << 31:
            return f"the PNG has a broken chunk header at offset {position} (corrupt file)"
        if end > len(data):
            return f"the PNG ends inside its {kind.decode('ascii')} chunk (truncated file)"
        if zlib.crc32(data[position + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"the PNG's {kind.decode('ascii')} chunk at offset {position} fails its CRC (corrupt file)"
        if first and kind != b"IHDR":
            return f"the PNG starts with chunk {kind.decode('ascii')}, not IHDR (corrupt file)"
        if first and length >= 8 and (problem := size_problem(int.from_bytes(data[position + 8 : position + 12], "big"), int.from_bytes(data[position + 12 : position + 16], "big"))):
            return problem
        if kind == b"IEND":
            return ""
        position, first = end, False


def bmp_problem(data: bytes) -> str:
    """A BMP shorter than its header's file size (0 there means the writer left it out)."""
    if len(data) < 14:
        return "the BMP ends inside its header (truncated file)"
    stated = int.from_bytes(data[2:6], "little")
    if stated and len(data) < stated:
        return f"the BMP holds {len(data)} of the {stated} bytes its header states (truncated file)"
    if len(data) >= 26 and int.from_bytes(data[14:18], "little") >= 40:  # a BITMAPINFOHEADER or later: signed 32-bit sides
        return size_problem(abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little", signed=True)))
    return ""


def indexed_colour(data: bytes) -> str:
    """What an image of indexed colour is ("an indexed-colour PNG ..."), "" for any other: a PNG of colour type 3, a BMP
    of 8 bits per pixel or fewer (a palette). A colour frame saved so (a GIF converted, a "reduce file size" option) holds
    at most 256 colours: the stain's shades are gone, and the dither that replaces them is not the smear's."""
    if data.startswith(_PNG_SIGNATURE) and len(data) > 25 and data[12:16] == b"IHDR" and data[25] == 3:
        return "an indexed-colour PNG (a palette of at most 256 colours)"
    if data.startswith(b"BM") and len(data) >= 30 and int.from_bytes(data[14:18], "little") >= 40:  # a BITMAPINFOHEADER or later
        bits = int.from_bytes(data[28:30], "little")
        if 0 < bits <= 8:
            return f"a BMP of {bits} bits per pixel (a palette of at most 256 colours)"
    return ""


def size_problem(width: int, height: int) -> str:
    """"" unless the header's size exceeds MAX_DECODED_SIDE."""
    if max(width, height) > MAX_DECODED_SIDE:
        return f"its header says {width}x{height} px, larger than any bundle judges ({MAX_DECODED_SIDE} px a side): not decoded"
    return ""
