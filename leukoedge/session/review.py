"""After the session: rebuild the summary of a killed one, compare one with a hematologist's count.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from ..errors import LeukoedgeError, StorageError
from .files import CELLS_FILE, RESERVE_FILE, RESULTS_FILE, REVIEW_FILE, SESSION_FILE, SUMMARY_FILE, TIMINGS_FILE, cells_header, cells_lines, csv_line, read_records, timings_header, timings_line, why, write_file_atomically
from .tally import STOPPED_UNRECORDED, SessionTally, iso_time, wilson_interval
from .report import write_report

log = logging.getLogger("leukoedge.session")


def repair_session(folder: str | Path) -> dict[str, Any]:
    """Rebuild the summary of a session that ended without one (killed, power lost) from results.jsonl:
    summary.json says so (ended_early, stopped_by), and cells.csv, timings.csv and summary.html are
    rewritten from the same records. A session that has its summary is left as it is. Returns the summary."""
    folder = Path(folder)
    if (folder / SUMMARY_FILE).is_file():
        return json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    results_path, header_path = folder / RESULTS_FILE, folder / SESSION_FILE
    if not (results_path.is_file() and header_path.is_file()):
        raise LeukoedgeError(f"{folder} holds no session to rebuild: expected {RESULTS_FILE} and {SESSION_FILE} (sessions recorded before {SESSION_FILE} existed cannot be)")
    header = json.loads(header_path.read_text(encoding="utf-8"))
    records, whole = read_records(results_path)
    (folder / RESERVE_FILE).unlink(missing_ok=True)
    try:
        if whole < results_path.stat().st_size:
            os.truncate(results_path, whole)
    except OSError as error:
        raise StorageError(f"cannot cut the partial last line off {results_path}: {why(error)}") from error
    tally = SessionTally(header["heads"], header["primary_head"])
    for record in records:
        tally.add(record)
    write_file_atomically(folder / CELLS_FILE, (csv_line(cells_header(tally.heads)) + "".join(cells_lines(r, tally.heads) for r in records)).encode("utf-8"))
    write_file_atomically(folder / TIMINGS_FILE, (csv_line(timings_header()) + "".join(timings_line(r) for r in records)).encode("utf-8"))
    ended = records[-1]["timestamp"] if records else header["started"]
    fps = tally.frames_processed / (ended - header["started"]) if ended > header["started"] else 0.0
    # A reader's dropped frames are the gaps in the frame numbers; reconnects are not in the records.
    capture = {"frames": tally.last_index + 1, "dropped": tally.last_index + 1 - tally.frames_processed - tally.frames_refused}
    summary = {**tally.summary(header, ended, fps, capture, STOPPED_UNRECORDED), "repaired": iso_time(time.time())}
    write_report(folder, summary, tally)
    return summary


def review_session(folder: str | Path, blasts: int, total: int) -> dict[str, Any]:
    """Compare the session's blast fraction with a hematologist's count of `blasts` blasts among
    `total` white cells; writes review.json and returns it. difference is leukoedge minus hematologist.
    A session killed before its summary gets one first (repair_session)."""
    if total <= 0 or not 0 <= blasts <= total:
        raise LeukoedgeError(f"expected a hematologist's count with 0 <= blasts <= total and total > 0; got blasts={blasts}, total={total}")
    folder = Path(folder)
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        if not (folder / RESULTS_FILE).is_file():
            raise LeukoedgeError(f"{summary_path} not found, nor {RESULTS_FILE} to rebuild it from: expected the folder of a session")
        log.warning("%s has no summary (the session was killed?): rebuilding it from %s", folder, RESULTS_FILE)
        repair_session(folder)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    hematologist_fraction = blasts / total
    fraction = summary["blast_fraction"]
    low, high = summary["blast_fraction_ci95"]
    found_cells = fraction is not None
    review = {
        "session": str(folder),
        "reviewed": iso_time(time.time()),
        "session_ended_early": summary.get("ended_early", False),
        "hematologist": {"blasts": blasts, "total": total, "blast_fraction": hematologist_fraction, "blast_fraction_ci95": list(wilson_interval(blasts, total))},
        "leukoedge": {"blasts": summary["blasts"], "cells": summary["cells"], "blast_fraction": fraction, "blast_fraction_ci95": [low, high]},
        "difference": fraction - hematologist_fraction if found_cells else None,
        "hematologist_within_leukoedge_ci": low <= hematologist_fraction <= high if found_cells else None,
        "cell_count_ratio": summary["cells"] / total,
    }
    write_file_atomically(folder / REVIEW_FILE, json.dumps(review, indent=2).encode("utf-8"))
    return review


def format_review(review: Mapping[str, Any]) -> str:
    """The agreement in a few lines for a terminal."""
    hematologist, leukoedge = review["hematologist"], review["leukoedge"]
    lines = [f"hematologist: {hematologist['blasts']} blasts of {hematologist['total']} cells = {hematologist['blast_fraction']:.1%}"]
    if leukoedge["blast_fraction"] is None:
        lines.append("leukoedge:    no cells found in the session: nothing to compare")
    else:
        low, high = leukoedge["blast_fraction_ci95"]
        verdict = "within" if review["hematologist_within_leukoedge_ci"] else "OUTSIDE"
        lines += [
            f"leukoedge:    {leukoedge['blasts']} blasts of {leukoedge['cells']} cells = {leukoedge['blast_fraction']:.1%} (95 % CI {low:.1%} to {high:.1%})",
            f"difference (leukoedge - hematologist): {review['difference']:+.1%}; the hematologist's fraction is {verdict} leukoedge's interval",
        ]
    lines.append(f"cell count ratio (leukoedge / hematologist): {review['cell_count_ratio']:.2f}")
    return "\n".join(lines)
