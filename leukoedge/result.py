"""What Detector.run returns: plain dataclasses with numpy arrays inside and to_dict() for JSON.

The label map convention is the runtime's public contract: 0 background, 1 cytoplasm, 2 nucleus.
Masks go into JSON as run-length encodings (row-major), so a result with masks stays small and
exact.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from leukoedge.errors import InvalidFrameError

BACKGROUND, CYTOPLASM, NUCLEUS = 0, 1, 2

Box = tuple[int, int, int, int]


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Run lengths of a 2-D mask read row by row, starting with a run of False (possibly 0 long)."""
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    size = [int(side) for side in mask.shape]
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        return {"size": size, "counts": []}
    run_starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], run_starts, [flat.size])))
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": size, "counts": counts.tolist()}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The bool mask an rle_encode dict describes."""
    height, width = (int(side) for side in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {counts.sum()}, but size {height}x{width} has {height * width} pixels")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(height, width)


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays, tuples and non-string keys -> what json.dumps accepts."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Cell:
    """One white blood cell; masks are box-local, box is (x0, y0, x1, y1) in frame pixels, ends exclusive."""

    id: int
    box: Box
    mask: np.ndarray  # bool (y1 - y0, x1 - x0): the whole cell, cytoplasm and nucleus
    nucleus_mask: np.ndarray  # bool, same shape
    label: str  # the primary head's class
    scores: dict[str, float]  # primary head: class -> probability
    blast_probability: float
    head_scores: dict[str, dict[str, float]]  # every classifier head: head -> class -> probability
    # Where the field segmenter found the cell, when refinement (bundles with a refiner) moved box and
    # masks; the classifier's crop is cut around it (classifier_box). None: box.
    found_box: Box | None = None

    def __post_init__(self) -> None:
        # A mask that does not match its box would draw and serialize in the wrong place, silently.
        x0, y0, x1, y1 = self.box
        expected = (y1 - y0, x1 - x0)
        if self.mask.shape != expected or self.nucleus_mask.shape != expected:
            raise ValueError(
                f"cell {self.id}: masks must have the box's shape {expected}, "
                f"got mask {self.mask.shape} and nucleus_mask {self.nucleus_mask.shape}"
            )

    @property
    def classifier_box(self) -> Box:
        """The box the classifier's crop was cut around."""
        return self.box if self.found_box is None else self.found_box

    @property
    def area_px(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def nucleus_area_px(self) -> int:
        return int(np.count_nonzero(self.nucleus_mask))

    def to_dict(self, include_masks: bool = False) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "box": self.box,
            "area_px": self.area_px,
            "nucleus_area_px": self.nucleus_area_px,
            "label": self.label,
            "scores": self.scores,
            "blast_probability": self.blast_probability,
            "head_scores": self.head_scores,
            "classifier_box": self.classifier_box,
        }
        if include_masks:
            record["mask"] = rle_encode(self.mask)
            record["nucleus_mask"] = rle_encode(self.nucleus_mask)
        return _plain(record)


@dataclass
class Timings:
    """Milliseconds per stage; capture is set only when leukoedge itself read the frame. The domain check runs on a
    thread of its own beside the segmenter and the classifier (Detector.run): check_ms is its own time, which overlaps
    segment_ms and classify_ms; the other stages run one after another, and total_ms is the frame's time from end to end."""

    capture_ms: float | None = None
    preprocess_ms: float = 0.0
    segment_ms: float = 0.0
    postprocess_ms: float = 0.0
    refine_ms: float = 0.0  # 0 where the bundle has no refiner
    gate_ms: float = 0.0  # 0 where the bundle has no gate
    check_ms: float = 0.0  # the domain check (colours, uncertainty, cell size, focus); 0 where the bundle has none
    classify_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        stages = {} if self.capture_ms is None else {"capture": float(self.capture_ms)}
        stages.update(
            preprocess=float(self.preprocess_ms),
            segment=float(self.segment_ms),
            postprocess=float(self.postprocess_ms),
            refine=float(self.refine_ms),
            gate=float(self.gate_ms),
            check=float(self.check_ms),
            classify=float(self.classify_ms),
            total=float(self.total_ms),
        )
        return stages


# Verdict.status: only "ok" frames were judged; every other status is a refusal to judge, never a flag.
STATUS_OK = "ok"  # judged: flagged or not
STATUS_NO_CELLS = "no_cells"  # no white cell found: nothing to judge
STATUS_OUTSIDE_DOMAIN = "outside_domain"  # colours, segmenter confidence, cell size or focus unlike anything validated
STATUS_TOO_SMALL = "too_small"  # the frame cannot hold a white cell at the bundle's scale
VERDICT_STATUSES = (STATUS_OK, STATUS_NO_CELLS, STATUS_OUTSIDE_DOMAIN, STATUS_TOO_SMALL)


@dataclass
class Verdict:
    """The frame-level call.

    status says whether the frame was judged at all (VERDICT_STATUSES); `reason` says why not, for a
    person. Only a judged frame ("ok") can be flagged: a frame the bundle cannot judge is never a
    leukemia flag. cell_count and the blast fraction count white cells only; objects the cell-or-not
    gate rejected (red cells, platelets, debris) and fragments of a white cell (postprocess.fragments) are in
    non_wbc_count and nowhere else. subtype: the
    frame's B-ALL subtype (the mean of its cells' subtype probabilities; None without cells or without
    a subtype head). A judged frame is flagged when its blast fraction reaches flag_fraction and it holds
    at least min_blast_count blasts: one blast-like cell alone (a lone white cell called a blast, the
    commonest false flag on a normal smear) is counted, in the frame and in a session's tally, but does
    not flag the frame.
    """

    cell_count: int
    blast_count: int
    blast_fraction: float
    flagged: bool
    blast_threshold: float
    flag_fraction: float
    subtype: str | None
    subtype_scores: dict[str, float]
    status: str = STATUS_OK
    reason: str = ""
    non_wbc_count: int = 0
    domain: dict[str, float] = field(default_factory=dict)  # the domain check's scores (bundles with one)
    min_blast_count: int = 1  # bundles before 0.5.0 flag from one blast

    def __post_init__(self) -> None:
        if self.status not in VERDICT_STATUSES:
            raise ValueError(f"verdict status must be one of {VERDICT_STATUSES}, got {self.status!r}")
        if self.flagged and self.status != STATUS_OK:
            raise ValueError(f"a frame with status {self.status!r} was not judged and cannot be flagged")

    @property
    def judged(self) -> bool:
        return self.status == STATUS_OK

    @property
    def flagging_fraction(self) -> float:
        """The blast fraction as the flag reads it: 0 where the frame holds fewer than min_blast_count blasts
        (a judged frame is flagged exactly when this reaches flag_fraction; the flag fraction is chosen on it)."""
        return self.blast_fraction if self.blast_count >= self.min_blast_count else 0.0

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    as_dict = to_dict

    def __getitem__(self, key: str) -> Any:
        """verdict["flagged"]: dict-style access from 0.1; use the attributes (removed in 0.3)."""
        warnings.warn(
            f'verdict["{key}"] is deprecated and goes in leukoedge 0.3: use verdict.{key} (or verdict.to_dict() for JSON)',
            DeprecationWarning,
            stacklevel=2,
        )
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def not_judged(cls, status: str, reason: str, blast_threshold: float, flag_fraction: float, **extra: Any) -> "Verdict":
        """The verdict of a frame the bundle cannot judge: no count, no fraction, never flagged."""
        if status == STATUS_OK:
            raise ValueError("not_judged needs a refusal status, not 'ok'")
        return cls(
            cell_count=0, blast_count=0, blast_fraction=0.0, flagged=False, blast_threshold=float(blast_threshold),
            flag_fraction=float(flag_fraction), subtype=None, subtype_scores={}, status=status, reason=reason, **extra,
        )


SUBTYPE_HEAD = "subtype"


def frame_subtype(cells: Sequence[Cell]) -> tuple[str | None, dict[str, float]]:
    """(most likely subtype, mean subtype probabilities) over the frame's cells. The subtype is a
    property of the sample, not of one cell: a field of Pro-B blasts also holds cells that look Pre-B
    on their own, and the mean over cells is what was validated (leukoedge evaluate)."""
    if not cells or SUBTYPE_HEAD not in cells[0].head_scores:
        return None, {}
    classes = list(cells[0].head_scores[SUBTYPE_HEAD])
    means = np.mean([[cell.head_scores[SUBTYPE_HEAD][name] for name in classes] for cell in cells], axis=0)
    return classes[int(np.argmax(means))], {name: float(p) for name, p in zip(classes, means)}


def flagged_subtype(verdict: Verdict) -> str:
    """"B-ALL subtype Pro, p 0.97" for a flagged frame with a subtype, else "": the subtype head learnt
    B-ALL fields only (Taleqani), so its call is shown where the frame is flagged and nowhere else."""
    if not (verdict.flagged and verdict.subtype):
        return ""
    return f"B-ALL subtype {verdict.subtype}, p {verdict.subtype_scores[verdict.subtype]:.2f}"


def verdict_summary(verdict: Verdict) -> str:
    """One line for a person: "3 cells, 1 blast (33 %)  FLAGGED" or "NOT JUDGED (outside_domain): why"."""
    if not verdict.judged:
        return f"NOT JUDGED ({verdict.status}): {verdict.reason}"
    text = f"{verdict.cell_count} cells, {verdict.blast_count} blast ({100 * verdict.blast_fraction:.0f} %)"
    if verdict.flagged:
        text += "  FLAGGED"
    elif verdict.blast_count and verdict.blast_fraction >= verdict.flag_fraction:
        text += f"  (not flagged: a frame is flagged from {verdict.min_blast_count} blasts)"
    return text


def make_verdict(
    cells: Sequence[Cell],
    blast_threshold: float,
    flag_fraction: float,
    non_wbc_count: int = 0,
    domain: dict[str, float] | None = None,
    min_blast_count: int = 1,
) -> Verdict:
    """A cell is a blast when blast_probability >= blast_threshold; the frame is flagged when it has
    cells, the blast fraction reaches flag_fraction and at least min_blast_count cells are blasts; the
    subtype from frame_subtype. A frame without cells gets status "no_cells" (not judged, not flagged)."""
    cell_count = len(cells)
    blast_count = sum(1 for cell in cells if cell.blast_probability >= blast_threshold)
    blast_fraction = blast_count / cell_count if cell_count else 0.0
    subtype, subtype_scores = frame_subtype(cells)
    return Verdict(
        cell_count=cell_count,
        blast_count=blast_count,
        blast_fraction=blast_fraction,
        flagged=cell_count > 0 and blast_fraction >= flag_fraction and blast_count >= min_blast_count,
        blast_threshold=float(blast_threshold),
        flag_fraction=float(flag_fraction),
        subtype=subtype,
        subtype_scores=subtype_scores,
        status=STATUS_OK if cell_count else STATUS_NO_CELLS,
        reason="" if cell_count else "no white cell found in the frame",
        non_wbc_count=int(non_wbc_count),
        domain=dict(domain or {}),
        min_blast_count=int(min_blast_count),
    )


@dataclass
class Result:
    """Everything Detector.run found in one frame."""

    label_map: np.ndarray  # HxW uint8 in frame pixels: BACKGROUND, CYTOPLASM, NUCLEUS
    cells: list[Cell]
    verdict: Verdict  # make_verdict(...) or Verdict.not_judged(...)
    timings: dict[str, float]  # ms per stage, Timings.as_dict()
    frame_shape: tuple[int, int]
    bundle_name: str
    model_version: str

    def to_dict(self, include_masks: bool = False) -> dict[str, Any]:
        record: dict[str, Any] = {
            "bundle_name": self.bundle_name,
            "model_version": self.model_version,
            "frame_shape": self.frame_shape,
            "verdict": self.verdict.to_dict(),
            "timings": self.timings,
            "cells": [cell.to_dict(include_masks) for cell in self.cells],
        }
        if include_masks:
            record["label_map"] = {
                "cytoplasm": rle_encode(self.label_map == CYTOPLASM),
                "nucleus": rle_encode(self.label_map == NUCLEUS),
            }
        return _plain(record)

    def to_json(self, include_masks: bool = False, **json_kwargs: Any) -> str:
        """json.dumps of to_dict(); json_kwargs go to json.dumps (indent=2, ...)."""
        return json.dumps(self.to_dict(include_masks), **json_kwargs)

    def draw(self, frame_bgr: np.ndarray) -> np.ndarray:
        """The overlay of this result on the frame it came from (draw_overlay): a BGR uint8 copy with
        cytoplasm and nucleus tinted, a labelled box per cell and the verdict, a not-judged frame's
        status and reason included, on the top lines. InvalidFrameError for a frame of another size."""
        return draw_overlay(frame_bgr, self)


_TINT_ALPHA = 0.45
_CYTOPLASM_BGR = (230, 190, 60)
_NUCLEUS_BGR = (170, 40, 150)
_LABEL_BGR = {"blast": (0, 0, 255), "normal": (0, 200, 0)}
_OTHER_LABEL_BGR = (0, 215, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text_style(image: np.ndarray) -> tuple[float, int]:
    """(font scale, line thickness): text scales with the frame so it stays legible from 16 px thumbnails to 4K fields."""
    font_scale = max(0.35, min(image.shape[:2]) / 1000.0)
    return font_scale, max(1, round(font_scale * 2))


def draw_cell_boxes(image_bgr: np.ndarray, cells: Sequence[Cell], captions: Sequence[str]) -> None:
    """Draw each cell's box with its caption above it, in place (blast red, normal green, other labels yellow)."""
    font_scale, thickness = _text_style(image_bgr)
    for cell, caption in zip(cells, captions):
        x0, y0, x1, y1 = cell.box
        colour = _LABEL_BGR.get(cell.label, _OTHER_LABEL_BGR)
        cv2.rectangle(image_bgr, (x0, y0), (x1 - 1, y1 - 1), colour, thickness)
        (_, text_height), _ = cv2.getTextSize(caption, _FONT, font_scale, thickness)
        cv2.putText(image_bgr, caption, (x0, max(y0 - 3, text_height)), _FONT, font_scale, colour, thickness, cv2.LINE_AA)


def draw_overlay(frame_bgr: np.ndarray, result: Result) -> np.ndarray:
    """A BGR uint8 copy of the frame: cytoplasm and nucleus tinted, a labelled box per cell
    (blast red, normal green), the verdict on the top line."""
    if frame_bgr.shape[:2] != result.label_map.shape:
        raise InvalidFrameError(
            f"draw_overlay needs the frame the result came from: result is {result.label_map.shape[1]}x"
            f"{result.label_map.shape[0]}, frame is {frame_bgr.shape[1]}x{frame_bgr.shape[0]}"
        )
    overlay = np.array(frame_bgr, dtype=np.uint8, order="C", copy=True)
    for value, colour in ((CYTOPLASM, _CYTOPLASM_BGR), (NUCLEUS, _NUCLEUS_BGR)):
        region = result.label_map == value
        tinted = _TINT_ALPHA * np.asarray(colour, np.float32) + (1.0 - _TINT_ALPHA) * overlay[region]
        overlay[region] = np.round(tinted).astype(np.uint8)

    draw_cell_boxes(overlay, result.cells, [f"{cell.id} {cell.label} p(blast)={cell.blast_probability:.2f}" for cell in result.cells])

    font_scale, thickness = _text_style(overlay)
    verdict = result.verdict
    if verdict.judged:
        flag = "FLAGGED" if verdict.flagged else "not flagged"
        lines = [
            f"cells {verdict.cell_count}  blasts {verdict.blast_count} ({verdict.blast_fraction:.0%})  "
            f"{flag} (at >={verdict.flag_fraction:.0%})",
            flagged_subtype(verdict),
        ]
    else:
        lines = [f"NOT JUDGED: {verdict.status}", verdict.reason]
    line_colour = (0, 0, 255) if verdict.flagged else (0, 215, 255) if not verdict.judged else (255, 255, 255)
    top = 0
    for line in filter(None, lines):
        (text_width, text_height), baseline = cv2.getTextSize(line, _FONT, font_scale, thickness)
        cv2.rectangle(overlay, (0, top), (text_width + 6, top + text_height + baseline + 6), (0, 0, 0), cv2.FILLED)
        cv2.putText(overlay, line, (3, top + text_height + 3), _FONT, font_scale, line_colour, thickness, cv2.LINE_AA)
        top += text_height + baseline + 6
    return overlay
