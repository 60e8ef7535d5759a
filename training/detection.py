"""Only white cells are cells: box recall and precision, red cells called white cells, false flags and refusals.

Measured per device on the fields with boxes of every object class (BCCD, TXL-PBC raabin and bcd) and,
for the false-flag rate, on every normal field (PBC, BCCD, Zheng, TXL-PBC: no leukemia in any of them).
A found cell matches a WBC box at IoU >= 0.5 (each box matched once, best IoU first); a found cell that
matches no WBC box but overlaps a red-cell box at IoU >= 0.5 is a red cell called a white cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from leukoedge.detector import Detector
from leukoedge.domain import DOMAIN_CHECKS, failed_checks
from leukoedge.result import STATUS_OUTSIDE_DOMAIN

from . import data

Box = tuple[int, int, int, int]
MATCH_IOU = 0.5
# Normal smears (no leukemic cell): a flag on one of these fields is a false flag.
NORMAL_SOURCES = ("pbc", "bccd", "wbc-seg-zheng", "txl-pbc")


def box_iou(boxes_a: Sequence[Box], boxes_b: Sequence[Box]) -> np.ndarray:
    """len(a) x len(b) intersection over union of boxes (x0, y0, x1, y1), ends exclusive."""
    if not len(boxes_a) or not len(boxes_b):
        return np.zeros((len(boxes_a), len(boxes_b)))
    a = np.asarray(boxes_a, np.float64)[:, None, :]
    b = np.asarray(boxes_b, np.float64)[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    intersection = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return intersection / (area_a + area_b - intersection)


def greedy_matches(iou: np.ndarray, threshold: float = MATCH_IOU) -> list[tuple[int, int]]:
    """(row, column) pairs, best IoU first, each row and column used once, IoU >= threshold."""
    pairs = []
    if iou.size == 0:
        return pairs
    order = np.dstack(np.unravel_index(np.argsort(-iou, axis=None), iou.shape))[0]
    used_rows, used_columns = set(), set()
    for row, column in order:
        if iou[row, column] < threshold:
            break
        if row in used_rows or column in used_columns:
            continue
        pairs.append((int(row), int(column)))
        used_rows.add(row)
        used_columns.add(column)
    return pairs


@dataclass
class FieldCounts:
    """What one field contributes to a device's figures."""

    found: int = 0  # white cells the detector reported
    wbc_boxes: int = 0
    matched: int = 0  # found cells matching a WBC box
    rbc_boxes: int = 0
    rbc_called_wbc: int = 0


def count_field(found_boxes: Sequence[Box], boxes: dict[str, list[Box]]) -> FieldCounts:
    """A field's counts from the found cells' boxes and the field's boxes per class."""
    wbc, rbc = boxes.get("WBC", []), boxes.get("RBC", [])
    matches = greedy_matches(box_iou(found_boxes, wbc))
    unmatched = [box for index, box in enumerate(found_boxes) if index not in {row for row, _ in matches}]
    rbc_hits = greedy_matches(box_iou(unmatched, rbc))
    return FieldCounts(len(found_boxes), len(wbc), len(matches), len(rbc), len(rbc_hits))


@dataclass
class DeviceFigures:
    """One device's (source's) figures; every rate is None where its denominator is 0."""

    domain: str
    fields: int = 0
    counts: FieldCounts = field(default_factory=FieldCounts)
    judged: int = 0
    flagged: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    failed_checks: dict[str, int] = field(default_factory=dict)  # outside the domain: fields per check failed (a field may fail both)

    def add(self, counts: FieldCounts | None, status: str, flagged: bool, failed_checks: Sequence[str] = ()) -> None:
        self.fields += 1
        if counts is not None:
            for name in vars(counts):
                setattr(self.counts, name, getattr(self.counts, name) + getattr(counts, name))
        if status == "ok":
            self.judged += 1
            self.flagged += int(flagged)
        elif status != "no_cells":
            self.refused[status] = self.refused.get(status, 0) + 1
        for check in failed_checks:
            self.failed_checks[check] = self.failed_checks.get(check, 0) + 1

    def as_row(self) -> dict[str, float | int | str | None]:
        counts = self.counts
        refused = sum(self.refused.values())
        return {
            "domain": self.domain,
            "fields": self.fields,
            "box_recall": counts.matched / counts.wbc_boxes if counts.wbc_boxes else None,
            "box_precision": counts.matched / counts.found if counts.wbc_boxes and counts.found else None,
            "rbc_called_wbc_per_1000": 1000.0 * counts.rbc_called_wbc / counts.rbc_boxes if counts.rbc_boxes else None,
            "refused_rate": refused / self.fields if self.fields else None,
            **{f"refused_{check}_rate": self.failed_checks.get(check, 0) / self.fields if self.fields else None for check in DOMAIN_CHECKS},
            "false_flag_rate": self.flagged / self.judged if self.judged else None,
            "flagged": self.flagged,
            "judged": self.judged,
            "wbc_boxes": counts.wbc_boxes,  # what one box is worth in recall (scripts/compare_evaluations.py)
            "found": counts.found,
        }


def detection_figures(detector: Detector, records: Iterable[data.Record], description: str = "fields") -> list[dict]:
    """Per device: box recall/precision at IoU 0.5 and red cells called white per 1000 (fields with
    boxes), refusal rate (and the share of fields outside the domain by each check), and the false-flag
    rate among judged fields (every record is a normal field)."""
    figures: dict[str, DeviceFigures] = {}
    for record in tqdm(list(records), desc=description, unit="field", leave=False):
        result = data.run_record(detector, record)
        boxes = data.object_boxes(record)
        counts = count_field([cell.box for cell in result.cells], boxes) if boxes else None
        failed = failed_checks(detector.domain_spec, result.verdict.domain) if result.verdict.status == STATUS_OUTSIDE_DOMAIN else []
        figures.setdefault(record.domain, DeviceFigures(record.domain)).add(counts, result.verdict.status, result.verdict.flagged, failed)
    return [figures[name].as_row() for name in sorted(figures)]


def evenly_spaced(records: list[data.Record], limit: int | None) -> list[data.Record]:
    """At most `limit` of the records, evenly spaced over the list (deterministic); all of them for None."""
    if limit is None or len(records) <= limit:
        return records
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, limit)]


def records_per_domain(data_root: Path, split: str, sources: Sequence[str], limit: int | None = None) -> list[data.Record]:
    """A split's records of the sources, at most `limit` per source/device (evenly spaced, deterministic)."""
    chosen = []
    for source in sources:
        by_domain: dict[str, list[data.Record]] = {}
        for record in data.load_records(data_root, source, split):
            by_domain.setdefault(record.domain, []).append(record)
        for records in by_domain.values():
            chosen.extend(evenly_spaced(records, limit))
    return chosen


def normal_records(data_root: Path, split: str, sources: Sequence[str] = NORMAL_SOURCES, limit: int | None = None) -> list[data.Record]:
    """The normal fields of a split, at most `limit` per source/device."""
    return records_per_domain(data_root, split, sources, limit)


def format_table(rows: Sequence[dict], title: str) -> str:
    """A markdown table of detection_figures rows."""
    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"### {title}",
        "",
        "| source/device | fields | WBC box recall | WBC box precision | RBC called WBC / 1000 | refused | false flags among judged |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        by_check = ", ".join(f"{check} {row[f'refused_{check}_rate']:.3f}" for check in DOMAIN_CHECKS if row.get(f"refused_{check}_rate"))
        refused = number(row["refused_rate"]) + (f" ({by_check})" if by_check else "")
        lines.append(
            f"| {row['domain']} | {row['fields']} | {number(row['box_recall'])} | {number(row['box_precision'])} | "
            f"{number(row['rbc_called_wbc_per_1000'], 1)} | {refused} | "
            f"{number(row['false_flag_rate'])} ({row['flagged']} of {row['judged']}) |"
        )
    return "\n".join(lines)
