"""JPEG damage that decodes without a message: a Huffman table listing a symbol twice, and the step a
wrong DC code leaves along a block row boundary (leukoedge/decode.py, block_seam).

The fast tests rebuild the fuzz run's cases from the shipped samples. The slow one reads every intact
image of ../shared/data and samples/ through read_image and prints how many are refused (it must be
none), how many would be at a shorter seam run (the margin), and block_seam's time per 640x480 frame:

    OMP_NUM_THREADS=1 python -m pytest -m slow -s tests/runtime/test_decode_seams.py
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import decode
from leukoedge.decode import block_seam, decode_image, read_image
from leukoedge.errors import UnreadableImageError

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "samples"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def _zeroed(name: str, start: int, end: int) -> bytes:
    """A shipped sample with bytes start..end of its entropy-coded data zeroed (a failing card's sector)."""
    data = bytearray((SAMPLES / name).read_bytes())
    data[start:end] = bytes(end - start)
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "start", "end"),
    [
        ("pbc_lymphocyte_LY_131013.jpg", 6841, 6870),  # the fuzz run's flagged frame: 2 blasts, FLAGGED
        ("pbc_neutrophil_BNE_101082.jpg", 8928, 9008),
    ],
)
def test_a_jpeg_whose_zeroed_data_decodes_without_a_warning_is_refused_by_its_seam(name: str, start: int, end: int):
    damaged = _zeroed(name, start, end)
    image = cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and not np.array_equal(image, read_image(SAMPLES / name))  # decoded, and wrong
    with pytest.raises(UnreadableImageError, match=r"step along the block boundary at row \d+.*damaged JPEG data"):
        decode_image(damaged, name)


def test_a_huffman_table_listing_a_symbol_twice_is_refused():
    # The fuzz run's case: one symbol byte of bccd_BloodImage_00002.jpg's DHT flipped; libjpeg decodes it silently.
    data = bytearray((SAMPLES / "bccd_BloodImage_00002.jpg").read_bytes())
    data[249] ^= 0x50
    with pytest.raises(UnreadableImageError, match="Huffman table at offset 210 lists a symbol twice"):
        decode_image(bytes(data), "flipped.jpg")


def _smooth_field(height: int = 240, width: int = 320) -> np.ndarray:
    """A smear-like frame: soft gradients and round cells, no straight edges."""
    rows, cols = np.mgrid[0:height, 0:width]
    field = np.stack([200 + 20 * np.sin(cols / 37.0), 180 + 15 * np.cos(rows / 29.0), 210 - 10 * np.sin((rows + cols) / 53.0)], axis=-1)
    for center_x, center_y in ((80, 70), (200, 150), (260, 60)):
        field[(cols - center_x) ** 2 + (rows - center_y) ** 2 < 30**2] -= 60
    return np.clip(field, 0, 255).astype(np.uint8)


def test_a_brightness_shift_from_a_block_onwards_is_a_seam_and_the_same_shift_off_the_grid_is_not():
    shifted = _smooth_field().astype(np.int16)
    shifted[64:72, 112:] += 20  # from the damaged block to the end of its block row ...
    shifted[72:] += 20  # ... and every block row after it
    assert block_seam(np.clip(shifted, 0, 255).astype(np.uint8)).startswith("a step along the block boundary at row 64")
    natural = _smooth_field().astype(np.int16)
    natural[61:] += 20  # an edge between block boundaries is content, not damage
    assert block_seam(np.clip(natural, 0, 255).astype(np.uint8)) == ""
    assert block_seam(_smooth_field()) == ""


def test_the_shipped_samples_and_frames_too_small_to_check_pass():
    for path in sorted(SAMPLES.glob("*.jpg")):
        assert block_seam(read_image(path)) == "", path.name
    assert block_seam(np.zeros((8, 640, 3), np.uint8)) == ""  # no boundary with 3 rows either side
    assert block_seam(np.zeros((480, 80, 3), np.uint8)) == ""  # narrower than one run


def _refusals(folders: list[Path], monkeypatch: pytest.MonkeyPatch, seam_run: int) -> tuple[collections.Counter, list[str]]:
    """(images read per source and format, refusals) for every image file under `folders`, at a seam run of `seam_run` bins."""
    monkeypatch.setattr(decode, "SEAM_RUN", seam_run)
    read: collections.Counter = collections.Counter()
    refused = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                read_image(path)
            except UnreadableImageError as refusal:
                if "greyscale image" not in str(refusal):  # label masks (Zheng's) are refused for their one channel, not damage
                    refused.append(str(refusal))
            read[(folder.name if folder == SAMPLES else path.relative_to(folder).parts[0], path.suffix.lower())] += 1
    return read, refused


@pytest.mark.slow
def test_no_intact_image_of_the_data_folder_or_the_samples_is_refused(data_root: Path, monkeypatch: pytest.MonkeyPatch):
    read, refused = _refusals([data_root, SAMPLES], monkeypatch, decode.SEAM_RUN)
    print(f"\n{sum(read.values())} intact images read through read_image:")
    for (source, suffix), count in sorted(read.items()):
        print(f"  {source:16s} {suffix:5s} {count:5d}")
    print(f"refused: {len(refused)}")
    for refusal in refused:
        print("  ", refusal)
    assert sum(read.values()) >= 9000 and not refused
    for shorter in (decode.SEAM_RUN - 1, decode.SEAM_RUN - 2):  # the margin: how close intact images come
        jpegs = [data_root / source for source in ("bccd", "pbc", "all-taleqani", "txl-pbc", "all-idb2")] + [SAMPLES]
        print(f"at a seam run of {shorter} bins: {len(_refusals(jpegs, monkeypatch, shorter)[1])} JPEGs would be refused")
    frame = read_image(SAMPLES / "bccd_BloodImage_00002.jpg")
    assert frame.shape == (480, 640, 3)
    started = time.perf_counter()
    for _ in range(200):
        block_seam(frame)
    milliseconds = (time.perf_counter() - started) * 1000 / 200
    print(f"block_seam: {milliseconds:.2f} ms per 640x480 frame")
    assert milliseconds < 20


def test_a_recorded_frame_with_a_seam_is_skipped_and_counted(tmp_path: Path):
    from leukoedge.capture import open_source

    field = _smooth_field()
    damaged = field.astype(np.int16)
    damaged[64:72, 112:] += 40
    damaged[72:] += 40
    recording = tmp_path / "recording.avi"
    writer = cv2.VideoWriter(str(recording), cv2.VideoWriter_fourcc(*"MJPG"), 10, (field.shape[1], field.shape[0]))
    for frame in (field, np.clip(damaged, 0, 255).astype(np.uint8), field):
        writer.write(frame)
    writer.release()
    source = open_source(recording)
    try:
        frames = [frame.image for frame in source]
    finally:
        source.close()
    assert len(frames) == 2 and source.skipped == 1
