"""The calibration set: real images of the TRAIN split, stratified by source and class, spread over stain.

INT8 ranges are only as good as the activations they were measured on. A set drawn from one source
(or from the first files of a folder, often one slide) would clip the activations of every other
stain. So each source gets an equal share, each class within a source an equal share (a stratum
too small to fill its share passes the rest on), and within a stratum the images are taken at even
quantiles along the main axis of their L*a*b* means: pale and dark, bluish and reddish smears alike.
"""

from __future__ import annotations

import csv
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

from leukoedge.preprocess.cpu import Box, lab_statistics, to_rgb_float
from leukoedge.training import data

log = logging.getLogger("leukoedge.calibration")

# Every kind of field the segmenter is shown at run time (PBC single cells included).
FIELD_SOURCES = ("wbc-seg-zheng", "all-idb2", "all-taleqani", "pbc", "bccd")
# The classifier's sources, as in training.pipeline: the cells whose classes it learned.
CELL_SOURCES = ("all-idb2", "all-taleqani", "pbc")
CSV_COLUMNS = ("model", "source", "label", "image", "box", "lab_l", "lab_a", "lab_b")
# Stain statistics of a thumbnail this size match the full image's to well under a unit of L*a*b*.
_THUMBNAIL_SIDE = 96
# Images tried per calibration slot before the slot stays empty (each PBC try runs the segmenter).
_MAX_TRIES = 4


@dataclass(frozen=True)
class CalibrationItem:
    """One calibration input: a whole field (segmenter) or one cell of an image (classifier)."""

    model: str  # "segmenter" | "classifier"
    source: str
    label: str  # the class the item was stratified by ("" where the source has none)
    record: data.Record
    box: Box | None  # classifier: the cell, in image pixels
    lab_mean: tuple[float, float, float]


def class_label(record: data.Record) -> str:
    """The class a record is stratified by: blast/normal, B-ALL subtype or WBC type."""
    if record.source == "all-idb2":
        return "blast" if record.blast else "normal"
    if record.source == "all-taleqani":
        return record.subtype or ""
    return record.wbc_type or ""


def image_lab_mean(image: np.ndarray) -> tuple[float, float, float]:
    """Mean L*a*b* colour of a BGR image (on a thumbnail: the stain, not the detail, matters here)."""
    scale = min(1.0, _THUMBNAIL_SIDE / max(image.shape[:2]))
    thumbnail = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1.0 else image
    mean, _ = lab_statistics(to_rgb_float(thumbnail))
    return (float(mean[0]), float(mean[1]), float(mean[2]))


def share_out(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` equally over the strata, none above what it has; a stratum's unused share goes to the rest."""
    shares = {key: 0 for key in available}
    open_keys = sorted(key for key, count in available.items() if count > 0)
    left = min(total, sum(available.values()))
    while left > 0 and open_keys:
        each, extra = divmod(left, len(open_keys))
        for position, key in enumerate(open_keys):
            take = min(each + (position < extra), available[key] - shares[key])
            shares[key] += take
            left -= take
        open_keys = [key for key in open_keys if shares[key] < available[key]]
    return shares


def stain_order(lab_means: np.ndarray) -> np.ndarray:
    """Indices sorted along the direction in which these L*a*b* means differ most (first right-singular vector)."""
    centred = lab_means - lab_means.mean(axis=0)
    if len(lab_means) < 2:
        return np.arange(len(lab_means))
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    return np.argsort(centred @ axis, kind="stable")


def quantile_positions(length: int, count: int) -> np.ndarray:
    """`count` distinct positions at even quantiles of 0..length-1 (all of them if count >= length)."""
    count = max(0, min(count, length))
    return ((np.arange(count) + 0.5) * length / count).astype(int) if count else np.zeros(0, int)


def _outward(position: int, length: int) -> Iterator[int]:
    """position, position+1, position-1, position+2, ...: the nearest stains first."""
    for step in range(length):
        for candidate in ((position + step, position - step) if step else (position,)):
            if 0 <= candidate < length:
                yield candidate


def _candidates(records: list[data.Record], limit: int | None) -> list[data.Record]:
    """At most `limit` records spread evenly over the (sorted) list, so reading stays cheap on big sources."""
    if limit is None or len(records) <= limit:
        return records
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, limit).round()]


def select_items(
    data_root: Path,
    model: str,
    sources: Sequence[str],
    total: int,
    split: str = "train",
    candidates_per_class: int | None = 200,
    cell_box: Callable[[data.Record, np.ndarray], Box | None] | None = None,
) -> list[CalibrationItem]:
    """`total` items (fewer where the data has fewer) from `sources`, stratified by source and class,
    stain-diverse within each stratum. Classifier items need `cell_box` (record, BGR image) -> box or None."""
    by_stratum: dict[str, dict[str, list[data.Record]]] = {}
    for source in sources:
        for record in data.load_records(data_root, source, split):
            by_stratum.setdefault(source, {}).setdefault(class_label(record), []).append(record)
    source_shares = share_out({source: sum(map(len, classes.values())) for source, classes in by_stratum.items()}, total)
    items: list[CalibrationItem] = []
    for source, classes in sorted(by_stratum.items()):
        class_shares = share_out({label: len(records) for label, records in classes.items()}, source_shares[source])
        for label, records in sorted(classes.items()):
            candidates = _candidates(records, candidates_per_class)
            images = [data.read_image(record) for record in candidates]
            lab_means = np.array([image_lab_mean(image) for image in images])
            order = stain_order(lab_means)
            used: set[int] = set()
            for position in quantile_positions(len(candidates), class_shares[label]):
                # An image without a findable cell is replaced by its nearest unused neighbour in stain.
                tries = (index for index in (order[p] for p in _outward(int(position), len(order))) if index not in used)
                for index in itertools.islice(tries, _MAX_TRIES):
                    used.add(index)
                    box = cell_box(candidates[index], images[index]) if cell_box is not None else None
                    if cell_box is None or box is not None:
                        items.append(CalibrationItem(model, source, label, candidates[index], box, tuple(lab_means[index])))
                        break
                    log.debug("calibration: no cell found in %s, trying its stain neighbour", candidates[index].image_path.name)
    return items


def write_calibration_csv(items: Sequence[CalibrationItem], data_root: Path, path: Path) -> Path:
    """The list of files (and cell boxes) calibration used, relative to the data folder: it travels in the bundle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(CSV_COLUMNS)
        for item in items:
            writer.writerow(
                [
                    item.model,
                    item.source,
                    item.label,
                    item.record.image_path.relative_to(data_root).as_posix(),
                    "" if item.box is None else " ".join(map(str, item.box)),
                    *(f"{value:.3f}" for value in item.lab_mean),
                ]
            )
    return path
