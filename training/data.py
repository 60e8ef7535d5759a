"""One loader per source in ../shared/data, one label convention, and the committed splits.

Every source is read into `Record`s and every mask convention (grey levels, RGB colours, a
colour-threshold segmentation, VOC boxes) is converted into one label map:
0 background, 1 cytoplasm, 2 nucleus, 3 "a WBC pixel, nucleus/cytoplasm unknown" (weak masks),
255 no supervision. Train/val/test membership comes from the CSV files in `splits/`, written once
by `make_splits` (`python -m leukoedge.training.data --data ../shared/data`) and committed, so
every figure can be reproduced. Only numpy and OpenCV: evaluation imports this without torch.
"""

from __future__ import annotations

import argparse
import csv
import logging
import xml.etree.ElementTree as ET
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from leukoedge.errors import LabelError
from leukoedge.preprocess.cpu import Box, corrected_frame, resize_labels

log = logging.getLogger("leukoedge.adapt")  # a device's box files are read for `leukoedge adapt --labels`

LABEL_BACKGROUND = 0
LABEL_CYTOPLASM = 1
LABEL_NUCLEUS = 2
LABEL_WBC = 3  # some WBC pixel, nucleus/cytoplasm unknown (weak masks)
LABEL_IGNORE = 255  # no supervision

SOURCES = ("wbc-seg-zheng", "all-idb2", "all-taleqani", "pbc", "bccd", "txl-pbc")
# Object classes of the sources with boxes (BCCD VOC names; TXL-PBC YOLO classes 0, 1, 2 mapped to the same names).
BOX_CLASSES = ("WBC", "RBC", "Platelets")
TXL_PBC_CLASSES = {0: "WBC", 1: "RBC", 2: "Platelets"}
# The sources whose fields hold several objects with boxes of every class: where "only white cells are cells"
# is measured, per device (TXL-PBC holds two labs' devices: raabin and bcd).
BOX_SOURCES = ("bccd", "txl-pbc")
SPLITS = ("train", "val", "test")
ZHENG_WBC_TYPES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}
SPLITS_DIR = Path(__file__).parent / "splits"

# Zheng dataset1 masks are grey levels; each pixel takes the nearest level (the files hold only these).
_ZHENG_GREY_LEVELS = np.array([0, 128, 255])
_ZHENG_LABELS = np.array([LABEL_BACKGROUND, LABEL_CYTOPLASM, LABEL_NUCLEUS], np.uint8)
_ZHENG_LABEL_OF_GREY = _ZHENG_LABELS[np.abs(np.arange(256)[:, None] - _ZHENG_GREY_LEVELS[None, :]).argmin(axis=1)]
# ALL-IDB2 mask colours in OpenCV's BGR order: white background, blue cytoplasm, cyan nucleus.
_ALL_IDB2_COLOURS_BGR = np.array([(255, 255, 255), (255, 0, 0), (255, 255, 0)], np.int32)
_ALL_IDB2_LABELS = np.array([LABEL_BACKGROUND, LABEL_CYTOPLASM, LABEL_NUCLEUS], np.uint8)

# Taleqani weak masks (224x224 fields, a WBC is about 15-30 px across). Measured on the files:
# blacked-out background stays below ~12 (JPEG noise), segmented cells are mostly above 200.
_TALEQANI_FOREGROUND_MIN = 40
# Below this a component is JPEG or stain debris in the RBC areas: background.
_TALEQANI_SPECK_AREA = 30
# A kept WBC is at least ~12 px across; components between speck and this size are cell fragments
# or cells cut by the border, so they get no supervision rather than a wrong one.
_TALEQANI_MIN_CELL_AREA = 120
# Cells are compact; ragged components (area / convex hull below this) are threshold noise
# around RBC clumps and smudges, not cells: no supervision.
_TALEQANI_MIN_SOLIDITY = 0.8
# The authors' segmentation misses many cells (about half the Pro fields have none at all).
# Purple, saturated pixels of the original field outside the weak mask are therefore not called
# background. OpenCV hue 0-179: WBCs measure 119-140, the bluish RBCs of some fields 100-115.
_TALEQANI_STAINED_HUE = (118, 155)
_TALEQANI_STAINED_MIN_SATURATION = 50
# The mask edge is uncertain by a few pixels (threshold, JPEG): a ring of no supervision.
_TALEQANI_EDGE_RING = 3
# Where the kept cells hold less than this share of the field's stained pixels, the authors' threshold
# failed on the field (the pale Pro fields: 94 % of them in the train split; 1-5 % of the others), and
# its cells outside the stained hue would be taught as background: the field has no usable mask.
_TALEQANI_MIN_STAINED_SHARE = 0.2

# Sources whose mask marks the one cell of a single-cell image: a cell to classify is taken from the mask.
# Elsewhere (Taleqani fields, PBC) the cells to classify are those the segmenter finds, as at run time:
# the Taleqani weak masks miss most Pro cells, and cells taken from them taught a subtype head without Pro.
MARKED_CELL_SOURCES = ("wbc-seg-zheng", "all-idb2")


@dataclass(frozen=True)
class Record:
    """One image of one source with its labels and its split."""

    source: str
    image_path: Path
    label_path: Path | None  # mask / weak mask / VOC XML; None where the source has none for this image
    blast: int | None  # 1 blast, 0 normal, None unknown
    subtype: str | None  # Taleqani: "Benign" | "Early" | "Pre" | "Pro"
    wbc_type: str | None  # PBC cell_type; Zheng type name (labels unverified by experts)
    split: str  # "train" | "val" | "test", from the committed split file
    device: str | None = None  # TXL-PBC: the lab/device subset ("raabin" or "bcd"); None: the source is one device

    @property
    def domain(self) -> str:
        """The source, or source/device where one source holds several devices: the unit left out in
        leave-one-source-out figures."""
        return self.source if self.device is None else f"{self.source}/{self.device}"


@dataclass(frozen=True)
class _Entry:
    """A record before its split is known; `key` is the image path relative to the source folder."""

    key: str
    image_path: Path
    label_path: Path | None
    blast: int | None = None
    subtype: str | None = None
    wbc_type: str | None = None
    device: str | None = None
    split: str | None = None  # the dataset's own split where it has one (TXL-PBC)


def _source_dir(data_root: Path, source: str) -> Path:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    folder = Path(data_root) / source
    if not folder.is_dir():
        missing = data_root if not Path(data_root).is_dir() else folder
        raise FileNotFoundError(
            f"data folder {missing} not found: --data must point at the folder holding the sources "
            f"({', '.join(SOURCES)})"
        )
    return folder


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data must point at the folder holding the sources")
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _zheng_entries(folder: Path) -> list[_Entry]:
    dataset = folder / "dataset1"
    return [
        _Entry(
            key=f"dataset1/{row['image']}",
            image_path=dataset / row["image"],
            label_path=dataset / row["mask"],
            wbc_type=ZHENG_WBC_TYPES[int(row["wbc_type"])],
        )
        for row in _read_csv(dataset / "labels.csv")
    ]


def _all_idb2_entries(folder: Path) -> list[_Entry]:
    return [
        _Entry(row["image"], folder / row["image"], folder / row["mask"], blast=int(row["blast"]))
        for row in _read_csv(folder / "labels.csv")
    ]


def _taleqani_entries(folder: Path) -> list[_Entry]:
    return [
        _Entry(
            row["image"],
            folder / row["image"],
            folder / row["segmented"],
            blast=int(row["malignant"]),
            subtype=row["subtype"],
        )
        for row in _read_csv(folder / "labels.csv")
    ]


def _pbc_entries(folder: Path) -> list[_Entry]:
    # All PBC donors are healthy: every cell is a normal (non-blast) cell.
    return [
        _Entry(row["image"], folder / row["image"], None, blast=0, wbc_type=row["cell_type"])
        for row in _read_csv(folder / "labels.csv")
    ]


def _bccd_entries(folder: Path) -> list[_Entry]:
    entries = []
    for image_path in sorted((folder / "images").glob("*.jpg")):
        annotation = folder / "annotations" / f"{image_path.stem}.xml"
        entries.append(
            _Entry(f"images/{image_path.name}", image_path, annotation if annotation.is_file() else None)
        )
    return entries


def _txl_pbc_entries(folder: Path) -> list[_Entry]:
    return [
        _Entry(row["image"], folder / row["image"], folder / row["boxes"], device=row["subset"], split=row["txl_split"])
        for row in _read_csv(folder / "labels.csv")
    ]


_ENTRY_READERS: dict[str, Callable[[Path], list[_Entry]]] = {
    "wbc-seg-zheng": _zheng_entries,
    "all-idb2": _all_idb2_entries,
    "all-taleqani": _taleqani_entries,
    "pbc": _pbc_entries,
    "bccd": _bccd_entries,
    "txl-pbc": _txl_pbc_entries,
}


def _stratum(source: str, entry: _Entry) -> str:
    """The label a split keeps in proportion: blast, subtype or cell type; BCCD has none."""
    if source == "all-idb2":
        return str(entry.blast)
    if source == "all-taleqani":
        return str(entry.subtype)
    if source in ("pbc", "wbc-seg-zheng"):
        return str(entry.wbc_type)
    return ""


def _read_split_file(source: str) -> dict[str, str]:
    path = SPLITS_DIR / f"{source}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path} not found: write it with `python -m leukoedge.training.data --data <folder>`"
        )
    return {row["image"]: row["split"] for row in _read_csv(path)}


def load_records(data_root: Path, source: str, split: str | None = None) -> list[Record]:
    """Every image of `source` (or those of one split), sorted by path, with its committed split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or None")
    folder = _source_dir(data_root, source)
    entries = sorted(_ENTRY_READERS[source](folder), key=lambda entry: entry.key)
    assigned = _read_split_file(source)
    unassigned = [entry.key for entry in entries if entry.key not in assigned]
    unknown = sorted(set(assigned) - {entry.key for entry in entries})
    if unassigned or unknown:
        raise ValueError(
            f"{SPLITS_DIR / f'{source}.csv'} does not match the data in {folder}: "
            f"{len(unassigned)} images have no split (e.g. {unassigned[:3]}), "
            f"{len(unknown)} listed images are absent (e.g. {unknown[:3]}); "
            "the data changed or --data points at other data"
        )
    records = [
        Record(
            source=source,
            image_path=entry.image_path,
            label_path=entry.label_path,
            blast=entry.blast,
            subtype=entry.subtype,
            wbc_type=entry.wbc_type,
            split=assigned[entry.key],
            device=entry.device,
        )
        for entry in entries
    ]
    return [record for record in records if split is None or record.split == split]


def _read(path: Path, flags: int) -> np.ndarray:
    pixels = cv2.imread(str(path), flags)
    if pixels is None:
        raise ValueError(f"cannot read image file {path} (missing, truncated or not an image)")
    return pixels


def read_image(record: Record) -> np.ndarray:
    """The record's image as BGR uint8 HxWx3, corrected as the runtime corrects every frame (leukoedge.preprocess.cpu.
    corrected_frame: its light evened; the sources' own frames are almost all left as they are)."""
    return corrected_frame(read_image_as_captured(record))[0]


def read_image_as_captured(record: Record) -> np.ndarray:
    """The record's image as BGR uint8 HxWx3, as its file holds it (what a capture check measures)."""
    return _read(record.image_path, cv2.IMREAD_COLOR)


def run_record(detector, record: Record):
    """detector.run on the record's image as `leukoedge run` runs its file: as captured (Detector.run corrects it and
    measures the capture checks before), with the file's JPEG quality (the compression check reads it)."""
    from leukoedge.decode import file_jpeg_quality

    return detector.run(read_image_as_captured(record), jpeg_quality=file_jpeg_quality(record.image_path))


def _zheng_label_map(record: Record, image_shape: tuple[int, ...]) -> np.ndarray:
    mask = _read(record.label_path, cv2.IMREAD_GRAYSCALE)
    if mask.shape != image_shape[:2]:
        raise ValueError(
            f"mask {record.label_path} is {mask.shape}, its image {record.image_path} is {image_shape[:2]}"
        )
    return _ZHENG_LABEL_OF_GREY[mask]


def _all_idb2_label_map(record: Record, image_shape: tuple[int, ...]) -> np.ndarray:
    # The masks are full size (257 px) and the images 0.4x thumbnails; nearest-neighbour keeps classes crisp.
    mask = resize_labels(_read(record.label_path, cv2.IMREAD_COLOR), image_shape[1], image_shape[0])
    distance = ((mask.astype(np.int32)[:, :, None, :] - _ALL_IDB2_COLOURS_BGR[None, None]) ** 2).sum(axis=-1)
    return _ALL_IDB2_LABELS[distance.argmin(axis=-1)]


def _stained_pixels(image: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    low, high = _TALEQANI_STAINED_HUE
    stained = (hsv[..., 0] >= low) & (hsv[..., 0] <= high) & (hsv[..., 1] >= _TALEQANI_STAINED_MIN_SATURATION)
    # An opening drops isolated stained pixels (JPEG colour noise) that are no cell.
    return cv2.morphologyEx(stained.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)) > 0


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _solidity(component: np.ndarray) -> float:
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull_area = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    return float(component.sum()) / max(hull_area, 1.0)


def _taleqani_weak_mask(record: Record) -> tuple[np.ndarray | None, list[Box]]:
    """(label map, boxes of the kept WBC components) from the authors' colour-threshold segmentation;
    (None, []) where that segmentation failed on the field (see _TALEQANI_MIN_STAINED_SHARE)."""
    image = read_image(record)
    segmented = _read(record.label_path, cv2.IMREAD_COLOR)
    if segmented.shape != image.shape:
        raise ValueError(f"segmentation {record.label_path} is {segmented.shape}, its image {image.shape}")
    foreground = (segmented.max(axis=2) > _TALEQANI_FOREGROUND_MIN).astype(np.uint8)
    # Closing bridges one-pixel cracks that JPEG and the threshold leave inside a cell.
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, _disk(1))
    # Dark nuclei were thresholded away inside some cells: fill every hole.
    contours, _ = cv2.findContours(foreground, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(foreground, contours, -1, 1, thickness=cv2.FILLED)
    count, components, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    cells = np.zeros(count, bool)
    uncertain = np.zeros(count, bool)
    for index in range(1, count):
        area = stats[index, cv2.CC_STAT_AREA]
        if area < _TALEQANI_SPECK_AREA:
            continue
        x, y, width, height = stats[index, :4]
        component = components[y : y + height, x : x + width] == index
        if area >= _TALEQANI_MIN_CELL_AREA and _solidity(component) >= _TALEQANI_MIN_SOLIDITY:
            cells[index] = True
        else:
            uncertain[index] = True
    wbc = cells[components]
    stained = _stained_pixels(image)
    if (stained & wbc).sum() < _TALEQANI_MIN_STAINED_SHARE * stained.sum():
        return None, []
    unsupervised = (uncertain[components] | wbc).astype(np.uint8)
    ring = _disk(_TALEQANI_EDGE_RING)
    label_map = np.full(image.shape[:2], LABEL_BACKGROUND, np.uint8)
    label_map[cv2.dilate(unsupervised, ring) > 0] = LABEL_IGNORE
    label_map[cv2.dilate(stained.astype(np.uint8), ring) > 0] = LABEL_IGNORE
    label_map[wbc] = LABEL_WBC
    boxes = [
        (int(x), int(y), int(x + width), int(y + height))
        for x, y, width, height in (stats[index, :4] for index in np.flatnonzero(cells))
    ]
    return label_map, boxes


LabelledBox = tuple[int, str, Box]  # (its object's number in the file, from 1; its class as labelled; the box)


def _bccd_boxes(annotation: Path, image_shape: tuple[int, ...], strict: bool = False) -> list[LabelledBox]:
    """VOC objects (WBC, RBC, Platelets) -> boxes in pixels, ends exclusive, numbered as the file lists them.
    strict (a device's own labels): an object of another name, without corners or with corners that cannot be the
    frame's (not numbers, of no size, fractions of the frame, a <size> other than the frame's) is a LabelError; the
    sources' files are read as they have always been (other names skipped)."""
    try:
        root = ET.parse(annotation).getroot()
    except ET.ParseError as error:
        raise (LabelError if strict else ValueError)(f"cannot parse VOC annotation {annotation}: {error}") from error
    height, width = image_shape[:2]
    if strict:
        _check_voc_size(annotation, root, width, height)
    boxes = []
    for number, element in enumerate(root.iter("object"), 1):
        name = (element.findtext("name") or "").strip()
        if strict:
            name = _known_class(annotation, number, name)
        if name not in BOX_CLASSES:
            continue
        corners = element.find("bndbox")
        if strict:
            xmin, ymin, xmax, ymax = _voc_corners(annotation, number, corners)
            if xmax == xmin or ymax == ymin:  # corners inclusive: one pixel across (BCCD's own files hold two)
                log.warning("%s: object %d is a box one pixel across, left out", annotation, number)
                continue
            if xmin > width or ymin > height:
                raise LabelError(f"{annotation}: object {number} lies outside the {width}x{height} frame ({xmin:g}, {ymin:g}) - ({xmax:g}, {ymax:g})")
        else:
            xmin, ymin, xmax, ymax = (float(corners.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        # VOC corners are 1-based and inclusive: pixel columns xmin-1 .. xmax-1, i.e. [xmin-1, xmax).
        x0, y0 = max(0, int(round(xmin)) - 1), max(0, int(round(ymin)) - 1)
        x1, y1 = min(width, int(round(xmax))), min(height, int(round(ymax)))
        if x1 > x0 and y1 > y0:
            boxes.append((number, name, (x0, y0, x1, y1)))
    return boxes


def _txl_pbc_boxes(label_path: Path, image_shape: tuple[int, ...], strict: bool = False) -> list[LabelledBox]:
    """YOLO lines `class cx cy w h` (normalized to the image) -> boxes in pixels, ends exclusive, numbered by line.
    strict (a device's own labels): a line that is not numbers, a centre outside 0-1 or a size outside 0-1 (pixel
    coordinates, say) is a LabelError naming the file and line, not a box dropped or clipped without a word; a box of
    no size (or under a pixel) and a line repeated (TXL-PBC's own files hold two) are left out with a warning naming
    them; a box reaching past the frame's edge from a centre inside it is clipped, as every YOLO tool writes them."""
    height, width = image_shape[:2]
    boxes, seen = [], {}
    try:
        text = label_path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is not part of the line
    except UnicodeDecodeError as error:
        raise (LabelError if strict else ValueError)(f"{label_path}: not UTF-8 text ({error.reason})") from error
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if strict:
            cx, cy, box_width, box_height = _yolo_numbers(label_path, number, line, fields)
            if (key := tuple(fields)) in seen:
                log.warning("%s:%d: the same box as line %d, left out (each cell is boxed once)", label_path, number, seen[key])
                continue
            seen[key] = number
            if box_width == 0.0 or box_height == 0.0:
                log.warning("%s:%d: a box of no size, left out", label_path, number)
                continue
        elif len(fields) != 5 or int(fields[0]) not in TXL_PBC_CLASSES:
            raise ValueError(f"{label_path}:{number}: expected 'class cx cy w h' with class 0, 1 or 2, got {line!r}")
        else:
            cx, cy, box_width, box_height = (float(value) for value in fields[1:])
        x0, y0 = max(0, int(round((cx - box_width / 2) * width))), max(0, int(round((cy - box_height / 2) * height)))
        x1, y1 = min(width, int(round((cx + box_width / 2) * width))), min(height, int(round((cy + box_height / 2) * height)))
        if x1 > x0 and y1 > y0:
            boxes.append((number, TXL_PBC_CLASSES[int(fields[0])], (x0, y0, x1, y1)))
        elif strict:
            log.warning("%s:%d: a box under one pixel across, left out", label_path, number)
    return boxes


def _yolo_numbers(label_path: Path, number: int, line: str, fields: list[str]) -> tuple[float, float, float, float]:
    """A device's YOLO line's centre and size, checked (see _txl_pbc_boxes)."""
    where = f"{label_path}:{number}"
    if len(fields) != 5 or fields[0] not in {str(key) for key in TXL_PBC_CLASSES}:
        raise LabelError(f"{where}: expected 'class cx cy w h' with class 0 (WBC), 1 (RBC) or 2 (Platelets), got {line.strip()!r}")
    try:
        cx, cy, box_width, box_height = (float(value) for value in fields[1:])
    except ValueError:
        raise LabelError(f"{where}: expected four numbers after the class, got {line.strip()!r}") from None
    if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0 and 0.0 <= box_width <= 1.0 and 0.0 <= box_height <= 1.0):  # NaN fails too
        raise LabelError(
            f"{where}: centre and size must be fractions of the frame (0-1), got {line.strip()!r}: "
            "export YOLO coordinates normalized to the image, not in pixels"
        )
    return cx, cy, box_width, box_height


def _known_class(annotation: Path, number: int, name: str) -> str:
    """A device's VOC object name as one of BOX_CLASSES, whatever its case ("wbc", "Platelet" too); LabelError otherwise."""
    known = {class_name.lower(): class_name for class_name in BOX_CLASSES} | {"platelet": "Platelets"}
    if name.lower() not in known:
        raise LabelError(f"{annotation}: object {number} is named {name!r}: expected one of {', '.join(BOX_CLASSES)} (a white cell of any type is WBC)")
    return known[name.lower()]


def _voc_corners(annotation: Path, number: int, corners: ET.Element | None) -> tuple[float, float, float, float]:
    """A device's VOC object's corners, checked: four numbers, not swapped, in pixels."""
    where = f"{annotation}: object {number}"
    if corners is None:
        raise LabelError(f"{where} has no <bndbox>")
    try:
        xmin, ymin, xmax, ymax = (float(corners.findtext(tag) or "") for tag in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError:
        raise LabelError(f"{where}: <bndbox> needs numbers in xmin, ymin, xmax, ymax") from None
    if not (xmax >= xmin and ymax >= ymin):  # NaN fails too
        raise LabelError(f"{where}: corners swapped ({xmin:g}, {ymin:g}) - ({xmax:g}, {ymax:g}): xmin, ymin is the top left")
    if max(xmax, ymax) <= 1.0:
        raise LabelError(f"{where}: corners within 0-1 look like fractions of the frame: VOC corners are pixels")
    return xmin, ymin, xmax, ymax


def _check_voc_size(annotation: Path, root: ET.Element, width: int, height: int) -> None:
    """LabelError where a device's VOC file states a <size> other than the frame's: its boxes were drawn on another image."""
    size = root.find("size")
    if size is None:
        return
    try:
        stated = (int(float(size.findtext("width") or "")), int(float(size.findtext("height") or "")))
    except ValueError:
        return  # a <size> without numbers says nothing either way
    if stated != (width, height) and min(stated) > 0:  # some tools write 0x0 when they do not know the size
        raise LabelError(f"{annotation}: <size> says {stated[0]}x{stated[1]}, the frame is {width}x{height}: the boxes were drawn on another image")


def labelled_boxes(label_path: Path, image_shape: tuple[int, ...], strict: bool = False) -> list[LabelledBox]:
    """Every box of a labelling tool's file as labelled, numbered as the file lists them: Pascal VOC XML (`.xml`,
    object names WBC, RBC, Platelets, as BCCD's) or YOLO text (`.txt`, classes 0 WBC, 1 RBC, 2 Platelets, as
    TXL-PBC's). strict: a device's own labels, each line or object checked (LabelError)."""
    label_path = Path(label_path)
    if label_path.suffix.lower() == ".xml":
        return _bccd_boxes(label_path, image_shape, strict)
    if label_path.suffix.lower() == ".txt":
        return _txl_pbc_boxes(label_path, image_shape, strict)
    raise (LabelError if strict else ValueError)(f"{label_path}: expected a Pascal VOC .xml or a YOLO .txt box file")


def by_class(boxes: Sequence[LabelledBox]) -> dict[str, list[Box]]:
    grouped: dict[str, list[Box]] = {name: [] for name in BOX_CLASSES}
    for _, name, box in boxes:
        grouped[name].append(box)
    return grouped


def read_boxes(label_path: Path, image_shape: tuple[int, ...]) -> dict[str, list[Box]]:
    """Boxes per object class (BOX_CLASSES) of a labelling tool's file as labelled (labelled_boxes, strict): a device's
    own labels (`leukoedge adapt --labels`), which no correction of this repository touches."""
    return by_class(labelled_boxes(label_path, image_shape, strict=True))


# Boxes of the data sources whose labels were looked at again and found wrong (docs/training.md, "TXL-PBC's box
# labels looked at again"; found with scripts/box_label_audit.py, decided by a person looking at the cell).
BOX_CORRECTIONS = Path(__file__).parent / "box_corrections.csv"


def box_corrections() -> dict[tuple[str, str, int], tuple[str, str]]:
    """(source, image file name, box number) -> (class as labelled, class it is; "none" for no object)."""
    if not BOX_CORRECTIONS.is_file():
        return {}
    rows = _read_csv(BOX_CORRECTIONS)
    return {(row["source"], row["image"], int(row["box"])): (row["labelled"], row["corrected"]) for row in rows}


def object_boxes(record: Record, image_shape: tuple[int, ...] | None = None) -> dict[str, list[Box]]:
    """Boxes per object class (BOX_CLASSES: WBC, RBC, Platelets) of a BCCD or TXL-PBC field, with the box label
    corrections applied; {} for other sources and unannotated fields."""
    if record.label_path is None or record.source not in BOX_SOURCES:
        return {}
    boxes = labelled_boxes(record.label_path, read_image(record).shape if image_shape is None else image_shape)
    corrections = box_corrections()
    corrected = []
    for number, name, box in boxes:
        labelled, right = corrections.get((record.source, record.image_path.name, number), (name, name))
        if labelled != name:
            raise ValueError(f"{BOX_CORRECTIONS.name}: box {number} of {record.image_path.name} is labelled {name}, not {labelled}: the data changed")
        if right != "none":
            corrected.append((number, right, box))
    return by_class(corrected)


BOX_CORE = 0.7  # the ellipse inscribed in a WBC box, shrunk to this share of its axes: white cell for sure


def box_label_map(wbc_boxes: Sequence[Box], image_shape: tuple[int, ...]) -> np.ndarray:
    """Weak labels of a field whose white cells are boxed (every one of them): background outside the
    boxes (red cells, platelets and plasma are negatives), LABEL_WBC on each box's core ellipse (nucleus or
    cytoplasm, the model chooses, as on Taleqani's weak masks), no supervision on the rest of the box
    (its corners hold red cells and plasma, its rim the cell's edge)."""
    label_map = np.full(image_shape[:2], LABEL_BACKGROUND, np.uint8)
    for x0, y0, x1, y1 in wbc_boxes:
        label_map[y0:y1, x0:x1] = LABEL_IGNORE
    for x0, y0, x1, y1 in wbc_boxes:
        centre = (round((x0 + x1 - 1) / 2), round((y0 + y1 - 1) / 2))
        axes = (max(1, round((x1 - x0) * BOX_CORE / 2)), max(1, round((y1 - y0) * BOX_CORE / 2)))
        cv2.ellipse(label_map, centre, axes, 0, 0, 360, int(LABEL_WBC), thickness=-1)
    return label_map


def boxed_field_label_map(boxes: dict[str, list[Box]], image_shape: tuple[int, ...]) -> np.ndarray:
    """box_label_map of a field's WBC boxes, and where a red cell's or platelet's box core (its inscribed ellipse
    shrunk to BOX_CORE) reaches into a WBC box's unsupervised rim, background there: the red cells pressed against
    a white cell are what its mask must not spread into."""
    label_map = box_label_map(boxes.get("WBC", []), image_shape)
    others = np.zeros(image_shape[:2], np.uint8)
    for x0, y0, x1, y1 in boxes.get("RBC", []) + boxes.get("Platelets", []):
        centre = (round((x0 + x1 - 1) / 2), round((y0 + y1 - 1) / 2))
        axes = (max(1, round((x1 - x0) * BOX_CORE / 2)), max(1, round((y1 - y0) * BOX_CORE / 2)))
        cv2.ellipse(others, centre, axes, 0, 0, 360, 1, thickness=-1)
    label_map[(others == 1) & (label_map == LABEL_IGNORE)] = LABEL_BACKGROUND
    return label_map


def _bccd_label_map(record: Record, image_shape: tuple[int, ...]) -> np.ndarray | None:
    boxes = object_boxes(record, image_shape)["WBC"]
    if not boxes:
        # Every BCCD field shows a WBC; the two XMLs without one (00133, 00228) lack its box,
        # so "everything is background" would be a wrong label.
        return None
    return box_label_map(boxes, image_shape)


def read_label_map(record: Record) -> np.ndarray | None:
    """The record's labels: uint8 HxW (the image's size), values in {0, 1, 2, 3, 255}; None if it has none.

    BCCD and TXL-PBC: box_label_map of the WBC boxes; BCCD None without an annotation or with no WBC box in it.
    Taleqani: None where the authors' segmentation failed on the field.
    """
    if record.label_path is None:
        return None
    if record.source == "all-taleqani":
        return _taleqani_weak_mask(record)[0]
    image_shape = read_image(record).shape
    if record.source == "wbc-seg-zheng":
        return _zheng_label_map(record, image_shape)
    if record.source == "all-idb2":
        return _all_idb2_label_map(record, image_shape)
    if record.source == "bccd":
        return _bccd_label_map(record, image_shape)
    if record.source == "txl-pbc":
        return box_label_map(object_boxes(record, image_shape)["WBC"], image_shape)
    raise ValueError(f"{record.source} has no label maps")


def _largest_component_box(cell: np.ndarray) -> list[Box]:
    count, _, stats, _ = cv2.connectedComponentsWithStats(cell.astype(np.uint8), connectivity=8)
    if count < 2:
        return []
    largest = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    x, y, width, height = (int(value) for value in stats[largest, :4])
    return [(x, y, x + width, y + height)]


def wbc_boxes(record: Record) -> list[Box]:
    """WBC boxes (x0, y0, x1, y1), exclusive ends, in image coordinates; [] where unknown.

    BCCD: the annotated WBC boxes; Taleqani: the kept weak-mask components ([] where the weak mask
    failed: these are for segmentation, not the cells to classify, see CELL_BOX_SOURCES); Zheng and ALL-IDB2:
    the largest component of the expert mask's cell pixels; PBC: [] (no boxes).
    """
    if record.label_path is None:
        return []
    if record.source == "all-taleqani":
        return _taleqani_weak_mask(record)[1]
    if record.source in BOX_SOURCES:
        return object_boxes(record)["WBC"]
    label_map = read_label_map(record)
    return _largest_component_box((label_map == LABEL_CYTOPLASM) | (label_map == LABEL_NUCLEUS))


def _assign_splits(
    entries: Sequence[_Entry], source: str, seed: int, fractions: Sequence[float]
) -> dict[str, str]:
    """Split each stratum on its own (shuffled with a per-source seed) so each keeps its proportion."""
    strata: dict[str, list[str]] = defaultdict(list)
    for entry in sorted(entries, key=lambda entry: entry.key):
        strata[_stratum(source, entry)].append(entry.key)
    # Seeded by source name, so adding or reordering sources never changes another source's split.
    rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
    assigned = {}
    for stratum in sorted(strata):
        keys = [strata[stratum][index] for index in rng.permutation(len(strata[stratum]))]
        val_count = int(len(keys) * fractions[1] + 0.5)
        test_count = int(len(keys) * fractions[2] + 0.5)
        train_count = max(0, len(keys) - val_count - test_count)
        for position, key in enumerate(keys):
            if position < train_count:
                assigned[key] = "train"
            else:
                assigned[key] = "val" if position < train_count + val_count else "test"
    return assigned


def make_splits(
    data_root: Path, out_dir: Path, seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> None:
    """Write `<out_dir>/<source>.csv` (columns image,split) for every source; stratified, seeded, deterministic."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions}"
        )
    folders = {source: _source_dir(data_root, source) for source in SOURCES}
    per_source = {source: _ENTRY_READERS[source](folder) for source, folder in folders.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for source, entries in per_source.items():
        if all(entry.split for entry in entries):  # the dataset's own split (TXL-PBC): kept, so figures compare with its authors'
            assigned = {entry.key: entry.split for entry in entries}
        else:
            assigned = _assign_splits(entries, source, seed, fractions)
        with (out_dir / f"{source}.csv").open("w", newline="") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(["image", "split"])
            writer.writerows(sorted(assigned.items()))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m leukoedge.training.data --data ../shared/data`: rewrite the committed split files."""
    parser = argparse.ArgumentParser(description="Write the train/val/test split files of every data source.")
    parser.add_argument("--data", type=Path, required=True, help="folder holding the sources (../shared/data)")
    arguments = parser.parse_args(argv)
    make_splits(arguments.data, SPLITS_DIR)
    print(f"split files written to {SPLITS_DIR}")


if __name__ == "__main__":
    main()
