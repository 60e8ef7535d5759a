"""What a badly set camera does to the verdict: defocus, exposure, sensor noise and compression, and what the capture
checks (focus, domain.edge_width; motion, domain.edge_isotropy; noise, domain.noise_level; compression, the JPEG file's
quality and the pixels') refuse.

Every field of a split is spoilt as a capture fault spoils it, at each level:
- defocus (--fault defocus): a Gaussian blur whose sigma is the level times the sharp field's median white-cell
  side, so the same level is the same defocus at every magnification;
- exposure (--fault exposure): the frame's values times the level (a gain), clipped to 0-255: under 1 too dark,
  over 1 overexposed (a pale background and pale cytoplasm clip first);
- noise (--fault noise): Gaussian sensor noise of the level's standard deviation in grey levels, every channel;
- jpeg (--fault jpeg): the frame saved as a JPEG of the level's quality and read back (0: as captured); with --camera
  handed over without the file's quality, as an MJPEG camera's decoded frame (only the pixels tell its compression);
- vignette (--fault vignette): a circular field of view, as a camera on an eyepiece or a phone adapter sees it: the
  frame black outside a centred circle whose radius is the level times the frame's half-diagonal (1: no corner lost).
- motion (--fault motion): the stage moving while the shutter is open: a horizontal box blur whose length is the level
  times the median white-cell side;
- illumination (--fault illumination): uneven lighting (a misaligned condenser): the frame's gain falls linearly from 1
  at its right edge to 1 - level at its left;
- scale (--fault scale): another pixel size (camera or objective): the frame resized by the level;
- channels (--fault channels): red and blue swapped (level 1), an integrator passing RGB where BGR is expected;
- truncated (--fault truncated): the frame's last `level` share of rows grey, as OpenCV decodes a JPEG cut short (a
  camera buffer not fully written looks the same).
- torn (--fault torn): the frame's lower half written shifted sideways by the level's share of its width (wrapped
  round), as a camera buffer that lost its line sync.
- zoom (--fault zoom): a higher magnification than the source's (a camera's region of interest cut around the field's
  centre, a relay lens): the frame's central 1/level enlarged to the frame's size, so cells span `level` times the share.
Each spoilt field goes through the bundle once and is judged twice, with its capture checks and without them (the
domain section less max_edge_width, max_noise and min_jpeg_quality, and without the edge isotropy and the pixels' JPEG
quality), and the table prints, per source and level: the fields' edge
widths and noise, how many the capture checks refuse, how many are judged, and the verdicts without the checks, with
the bundle's bars and with each device's own focus bar as `leukoedge adapt` would set it from that device's fields
without the fault (adapt.device_threshold; fitted on the same fields it is then measured on) (normal fields
flagged; Taleqani's malignant fields flagged; PBC's white-cell type of the central cell). docs/training.md, "Bundle
0.11.0: out of focus", "Bundle 0.12.0: sensor noise", "Bundle 0.13.0: compressed files" and "Uneven light,
and other capture faults measured" quote it:

    python scripts/capture_study.py --data ../shared/data [--fault defocus|exposure|noise|jpeg|vignette|motion|illumination|scale|channels|truncated|torn|zoom]
        [--bundle models/default] [--split val] [--without-evening]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.adapt import DEVICE_BARS, FrameMeasure, device_threshold  # noqa: E402
from leukoedge.decode import file_jpeg_quality  # noqa: E402
from leukoedge.domain import failed_checks, median_cell_side  # noqa: E402
from leukoedge.preprocess import cpu  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.detection import evenly_spaced  # noqa: E402
from leukoedge.training.gate import NOT_WBC_TYPES  # noqa: E402

SOURCES = ("pbc", "wbc-seg-zheng", "bccd", "txl-pbc", "all-taleqani", "all-idb2")


def study_records(data_root: Path, split: str, per_source: int) -> list[data.Record]:
    """Up to per_source fields of each source/device (evenly spaced; PBC's white cells only; Taleqani's every benign
    field and as many malignant ones)."""
    records = []
    for source in SOURCES:
        fields = data.load_records(data_root, source, split)
        if source == "pbc":
            fields = [record for record in fields if record.wbc_type not in NOT_WBC_TYPES]
        if source == "all-taleqani":
            benign = [record for record in fields if record.blast == 0]
            records += benign + evenly_spaced([record for record in fields if record.blast == 1], len(benign))
            continue
        for device in sorted({record.device for record in fields}, key=str):
            records += evenly_spaced([record for record in fields if record.device == device], per_source)
    return records


LEVELS = {
    "defocus": [0.0, 0.015, 0.03, 0.045, 0.06, 0.09],
    "exposure": [1.0, 0.5, 0.35, 0.25, 1.15, 1.3, 1.6],
    "noise": [0.0, 4.0, 8.0, 16.0],
    "jpeg": [0.0, 50.0, 20.0, 10.0],
    "vignette": [1.0, 0.9, 0.8, 0.7],
    "motion": [0.0, 0.1, 0.2, 0.4],
    "illumination": [0.0, 0.3, 0.5, 0.7],
    "scale": [1.0, 0.5, 0.7, 1.5, 2.0],
    "channels": [0.0, 1.0],
    "truncated": [0.0, 0.03, 0.1, 0.3],
    "torn": [0.0, 0.05, 0.15, 0.3],
    "zoom": [1.0, 1.5, 2.0, 3.0],
}  # each fault's first level is no fault


def spoilt(frame: np.ndarray, fault: str, level: float, cell_side: float) -> np.ndarray:
    """The frame with the fault at the level (see the module doc); the frame itself at no fault."""
    if level == LEVELS[fault][0]:
        return frame
    if fault == "defocus":
        return cv2.GaussianBlur(frame, (0, 0), level * cell_side)
    if fault == "exposure":
        return np.clip(frame.astype(np.float32) * level, 0, 255).astype(np.uint8)
    if fault == "vignette":
        height, width = frame.shape[:2]
        inside = np.zeros((height, width), np.uint8)
        cv2.circle(inside, (width // 2, height // 2), int(round(level * np.hypot(width, height) / 2)), 255, -1)
        return np.where(inside[..., None] > 0, frame, 0).astype(np.uint8)
    if fault == "motion":
        length = max(1, int(round(level * cell_side)))
        kernel = np.full((1, length), 1.0 / length, np.float32)
        return cv2.filter2D(frame, -1, kernel, borderType=cv2.BORDER_REFLECT)
    if fault == "illumination":
        gain = np.linspace(1.0 - level, 1.0, frame.shape[1], dtype=np.float32)[None, :, None]
        return np.clip(frame.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    if fault == "scale":
        size = (max(1, int(round(frame.shape[1] * level))), max(1, int(round(frame.shape[0] * level))))
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if level < 1 else cv2.INTER_LINEAR)
    if fault == "channels":
        return np.ascontiguousarray(frame[..., ::-1])
    if fault == "truncated":
        cut = frame.copy()
        cut[frame.shape[0] - max(1, int(round(level * frame.shape[0]))) :] = 128  # as OpenCV shows a JPEG cut short
        return cut
    if fault == "torn":
        torn = frame.copy()  # the rows below the middle written shifted sideways by the level's share of the width
        torn[frame.shape[0] // 2 :] = np.roll(frame[frame.shape[0] // 2 :], int(round(level * frame.shape[1])), axis=1)
        return torn
    if fault == "zoom":
        height, width = frame.shape[:2]
        cut_height, cut_width = max(1, int(round(height / level))), max(1, int(round(width / level)))
        y0, x0 = (height - cut_height) // 2, (width - cut_width) // 2
        return cv2.resize(frame[y0 : y0 + cut_height, x0 : x0 + cut_width], (width, height), interpolation=cv2.INTER_LINEAR)
    if fault == "noise":
        noise = np.random.default_rng(int(level)).normal(0.0, level, frame.shape)  # the same noise for every rerun
        return np.clip(frame.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(level)])[1]
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)


def three_ways(rows: list[dict], outcome: str) -> str:
    """How many rows had the outcome without the capture checks / with the bundle's bars / with the device's own bars."""
    return " / ".join(str(sum(row[key] for row in rows)) for key in (outcome, f"{outcome}_with", f"{outcome}_device"))


# The capture checks: domain key -> the score it bounds and its name in domain.failed_checks. Only focus has a
# device's own bar as well (adapt.DEVICE_BARS).
CAPTURE_CHECKS = {"max_edge_width": ("edge_width", "focus"), "max_noise": ("noise", "noise"), "min_jpeg_quality": ("jpeg_quality", "compression")}
# The capture checks of every bundle with a domain check (runtime constants, not in the manifest): the scores they read,
# left out of the run without the capture checks: domain.MIN_EDGE_ISOTROPY's (motion), domain.MIN_PIXEL_JPEG_QUALITY's,
# domain.MAX_TEAR's (a torn frame) and domain.MIN_WHOLE_BLASTS' (a flag resting on cells cut by the frame's edge; these
# two read on flagged frames only), domain.MAX_EMPTY_FOREGROUND's (no white cell kept in a frame the segmenter marks
# as mostly white cell), domain.MIN_FLAG_DETAIL's (a flag on small cells with less fine detail than validated ones).
RUNTIME_CAPTURE_SCORES = ("edge_isotropy", "pixel_jpeg_quality", "tear_score", "whole_blasts", "empty_foreground", "flag_detail")
# The domain.failed_checks names counted as refused for the capture: those checks', and the field-of-view,
# incomplete-frame, motion, torn-frame, cut-cell, cell-fills-frame and detail checks' (not bundle thresholds:
# domain.MAX_OUTSIDE_FIELD, preprocess.cpu.MAX_DARK_SHARE, domain.MAX_INCOMPLETE and the constants above).
CAPTURE_REFUSALS = frozenset({name for _, name in CAPTURE_CHECKS.values()} | {"field_of_view", "incomplete", "motion", "torn", "cut_cells", "cell_fills_frame", "detail"})


def group(record: data.Record) -> str:
    return record.domain + (" malignant" if record.blast == 1 and record.source == "all-taleqani" else "")


def central_type(result, frame: np.ndarray) -> str | None:
    """The WBC type of the cell nearest the frame's centre (PBC centres its one white cell)."""
    if not result.cells:
        return None
    centre = np.array([frame.shape[1], frame.shape[0]]) / 2
    cell = min(result.cells, key=lambda c: np.abs(np.array([(c.box[0] + c.box[2]) / 2, (c.box[1] + c.box[3]) / 2]) - centre).sum())
    scores = cell.head_scores.get("wbc_type")
    return None if scores is None else max(scores, key=scores.get)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="a bundle with a focus check")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--per-source", type=int, default=60, help="fields per source/device (default: %(default)s)")
    parser.add_argument("--fault", choices=tuple(LEVELS), default="defocus", help="what spoils the fields (default: %(default)s)")
    parser.add_argument(
        "--without-evening", action="store_true",
        help="run without evening uneven light (preprocess.cpu.even_illumination), as leukoedge ran before it: the figures it was measured against",
    )
    parser.add_argument(
        "--camera", action="store_true",
        help="hand every frame over without its file's JPEG quality, as a camera does (the compression check reads the pixels only)",
    )
    parser.add_argument(
        "--levels", type=float, nargs="+", default=None,
        help="defocus: sigmas as shares of the median cell side; exposure: gains; noise: standard deviations; jpeg: qualities; "
        "vignette: field-of-view radii as shares of the half-diagonal; motion: blur lengths as shares of the median cell side; "
        "illumination: darkening at the far edge; scale: resize factors; channels: 1 swaps red and blue; truncated: shares of rows "
        "lost; torn: sideways shifts as shares of the width; zoom: magnifications (default: %s)" % LEVELS,
    )
    args = parser.parse_args()
    if args.without_evening:
        cpu.EVEN_FROM = float("inf")  # even_illumination then leaves every frame as it is, in training.data and the runtime
    no_fault = LEVELS[args.fault][0]
    # The fields without the fault are measured always: each device's own focus bar is fitted on them.
    levels = sorted({no_fault, *(args.levels or LEVELS[args.fault])})

    checked = Detector.load(args.bundle)
    bars = {key: score for key, (score, _) in CAPTURE_CHECKS.items() if key in (checked.domain_spec or {})}
    if not bars:
        print(f"error: {args.bundle} has no capture check ({', '.join(CAPTURE_CHECKS)}): fit them with scripts/refit_domain.py", file=sys.stderr)
        return 2
    # The same models without the capture bars: only the verdict differs, so it judges the checked run's cells and scores.
    unchecked = Detector.load(args.bundle)
    unchecked.domain_spec = {key: value for key, value in checked.domain_spec.items() if key not in CAPTURE_CHECKS}

    outcomes = []  # one per field and level
    for record in tqdm(study_records(args.data, args.split, args.per_source), desc="fields", unit="field"):
        frame = data.read_image(record)
        captured_quality = None if args.camera else file_jpeg_quality(record.image_path)
        as_captured = checked.run(frame, jpeg_quality=captured_quality)
        side = median_cell_side([cell.box for cell in as_captured.cells])
        if side is None:
            continue  # no white cell found in the field as it is: nothing to measure a defocus against
        for level in levels:
            faulty = spoilt(frame, args.fault, level, side)
            # A frame saved again as a JPEG carries that file's quality; any other fault keeps the file's own.
            quality = int(level) if args.fault == "jpeg" and level != no_fault and not args.camera else captured_quality
            with_result = as_captured if level == no_fault else checked.run(faulty, jpeg_quality=quality)
            with_check = with_result.verdict
            # A frame too small to judge has no domain scores: it is refused with or without the capture checks.
            unchecked_scores = {key: value for key, value in with_check.domain.items() if key not in RUNTIME_CAPTURE_SCORES}
            without = unchecked.judge(with_result.cells, with_check.non_wbc_count, unchecked_scores) if with_check.domain else with_check
            outcomes.append({
                "group": group(record), "domain": record.domain, "level": level, "scores": with_check.domain,
                "judged": without.status == "ok", "flagged": bool(without.flagged),
                "refused_for_capture": bool(with_check.domain and CAPTURE_REFUSALS & set(failed_checks(checked.domain_spec, with_check.domain))),
                "judged_with": with_check.status == "ok", "flagged_with": bool(with_check.flagged),
                "typed": None if record.source != "pbc" else central_type(with_result, faulty) == record.wbc_type,
            })

    # Each device's own bars, as `leukoedge adapt` sets them from the device's frames: here its fields without the fault.
    device_bars = {
        domain: {
            key: device_threshold(checked.domain_spec[key], [FrameMeasure(np.zeros(3), 0.0, False, False, scores=o["scores"])
                                                             for o in outcomes if o["domain"] == domain and o["level"] == no_fault], key)
            for key in DEVICE_BARS if key in bars
        }
        for domain in {o["domain"] for o in outcomes}
    }
    for o in outcomes:
        beyond = any(score in o["scores"] and o["scores"][score] > device_bars[o["domain"]][key] for key, (score, _) in DEVICE_BARS.items() if key in bars)
        o["judged_device"], o["flagged_device"] = o["judged_with"] and not beyond, o["flagged_with"] and not beyond
        o["refused_device"] = o["refused_for_capture"] or (o["judged_with"] and beyond)

    print(f"{args.bundle} ({checked.bundle.model_version}), {args.split} split, {args.fault}{' (camera frames)' if args.camera else ''}; the bundle's bars: "
          + ", ".join(f"{score} {'>=' if key.startswith('min_') else '<='} {checked.domain_spec[key]:.2f}" for key, score in bars.items()))
    print("each device's own focus bar (leukoedge adapt, fitted on its fields without the fault): "
          + "; ".join(f"{domain} " + ", ".join(f"{bars[key]} {bar:.2f}" for key, bar in own.items()) for domain, own in sorted(device_bars.items())))
    level_name = {
        "defocus": "blur (x cell side)", "exposure": "gain", "noise": "noise (grey levels)", "jpeg": "JPEG quality (0: as captured)",
        "vignette": "field-of-view radius (x half-diagonal)", "motion": "motion blur (x cell side)",
        "illumination": "darkening across the frame", "scale": "scale (x pixels)", "channels": "red and blue swapped",
        "truncated": "share of rows lost", "torn": "lower half shifted (x width)", "zoom": "magnification (x)",
    }[args.fault]
    shown = (*bars.values(), *RUNTIME_CAPTURE_SCORES)
    medians = " | ".join(f"{score} median (p95)" for score in shown)
    print(f"| fields | {level_name} | n | {medians} | refused by the capture checks: bundle's / device's bars | judged: no capture check / bundle's / device's bars "
          "| flagged: no capture check / bundle's / device's | PBC type right among judged: no capture check / bundle's / device's |")
    print("|---|---|---|" + "---|" * len(shown) + "---|---|---|---|")
    for name, level in sorted({(o["group"], o["level"]) for o in outcomes}):
        rows = [o for o in outcomes if o["group"] == name and o["level"] == level]
        spreads = []
        for score in shown:
            values = np.array([o["scores"][score] for o in rows if score in o["scores"]] or [np.nan])
            spreads.append(f"{np.median(values):.2f} ({np.quantile(values, 0.95):.2f})")
        typed = " / ".join(str(sum(bool(o["typed"]) and o[key] for o in rows)) for key in ("judged", "judged_with", "judged_device")) if name == "pbc" else ""
        print(
            f"| {name} | {level:.3f} | {len(rows)} | {' | '.join(spreads)} | "
            f"{sum(o['refused_for_capture'] for o in rows)} / {sum(o['refused_device'] for o in rows)} | {three_ways(rows, 'judged')} | {three_ways(rows, 'flagged')} | {typed} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
