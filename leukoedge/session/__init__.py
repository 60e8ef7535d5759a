"""Field-validation sessions: record what leukoedge sees on a source, summarize it, and compare the
summary with a hematologist's count of the same smear.

A session folder holds:
    session.json       written first: source, heads and class names, save_every, start time
    frames/            every save_every-th frame, PNG
    overlays/          the same frames with the cells drawn (draw_overlay), PNG
    results.jsonl      one JSON object per frame: index, timestamp, bundle, verdict, timings, cells (no masks)
    cells.csv          one row per cell: frame, id, box, areas, label, blast_probability, and for each
                       head its top class and that class's probability ({head}_class, {head}_class_probability)
    timings.csv        one row per frame: milliseconds per stage
    summary.json       written when the session ends, however it ends; ended_early and stopped_by say
                       whether it ran to its end and why not
    summary.html       the same for a reader, with a plot (summary_plot.png) and overlay thumbnails
    review.json        written by review_session once the hematologist's count is in
    .summary-reserve   space held back while recording, given up so the summary fits on a disk that filled

What a reader can rely on, whatever stopped the session (Ctrl-C, SIGTERM, a failing camera, a full
disk, SIGKILL, a power cut):
- A frame's lines are written whole or not at all, in cells.csv, timings.csv and results.jsonl
  together: a write that fails is cut back, and the session ends with StorageError.
- results.jsonl is the record; the other files are views of it. A session killed before its summary
  is rebuilt from it by repair_session (review_session does so on its own).
- results.jsonl is synced to disk at least every SYNC_INTERVAL_S, and when the session ends.
Only numpy, OpenCV and the standard library are needed; matplotlib draws the plot where it is installed.

The modules, one job each: files (names, whole writes, CSV views), readers (frames for a session),
recorder (the recorder, the loop, signals, progress), tally (the numbers and format_summary), report
(summary.json, summary.html and the plot), review (repair_session, review_session).
"""

from __future__ import annotations

from .files import (
    CELLS_FILE,
    RESERVE_BYTES,
    RESERVE_FILE,
    RESULTS_FILE,
    REVIEW_FILE,
    SESSION_FILE,
    STAGES,
    SUMMARY_FILE,
    SUMMARY_HTML,
    SUMMARY_PLOT,
    SYNC_INTERVAL_S,
    TIMINGS_FILE,
    RecordFile,
    read_records,
    write_file,
    write_file_atomically,
    write_png,
)
from .readers import SequentialReader, open_reader
from .recorder import POLL_S, ProgressDisplay, SessionRecorder, capture_session, deferred_signals, run_session, stop_on_signals
from .report import plot_session, write_summary_html
from .review import format_review, repair_session, review_session
from .tally import NORMAL_STOPS, STOPPED_UNRECORDED, SessionTally, format_summary, not_judged_text, wilson_interval

__all__ = [
    "CELLS_FILE", "RESERVE_BYTES", "RESERVE_FILE", "RESULTS_FILE", "REVIEW_FILE", "SESSION_FILE", "STAGES", "SUMMARY_FILE",
    "SUMMARY_HTML", "SUMMARY_PLOT", "SYNC_INTERVAL_S", "TIMINGS_FILE", "RecordFile", "read_records", "write_file",
    "write_file_atomically", "write_png", "SequentialReader", "open_reader", "POLL_S", "ProgressDisplay", "SessionRecorder",
    "capture_session", "deferred_signals", "run_session", "stop_on_signals", "plot_session", "write_summary_html",
    "format_review", "repair_session", "review_session", "NORMAL_STOPS", "STOPPED_UNRECORDED", "SessionTally",
    "format_summary", "not_judged_text", "wilson_interval",
]
