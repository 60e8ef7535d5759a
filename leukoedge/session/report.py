"""summary.json and summary.html (with its plot and overlay thumbnails) of a session.
"""

from __future__ import annotations

import html
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StorageError
from .files import SUMMARY_FILE, SUMMARY_HTML, SUMMARY_PLOT, write_file_atomically
from .tally import SessionTally, not_judged_text

log = logging.getLogger("leukoedge.session")


def write_report(folder: Path, summary: Mapping[str, Any], tally: SessionTally) -> None:
    """summary.json, then summary.html (and its plot)."""
    try:
        write_file_atomically(folder / SUMMARY_FILE, json.dumps(summary, indent=2).encode("utf-8"))
    except StorageError as error:
        raise StorageError(f"{error}; results.jsonl is whole: `python examples/capture_session.py repair {folder}` writes the summary from it") from error
    try:
        write_summary_html(folder, summary, tally.per_frame, tally.saved)
    except StorageError as error:
        raise StorageError(f"{error}; summary.json is written") from error


def plot_session(path: Path, per_frame: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """PNG of per-frame latency and blast fraction (with the running session fraction and its interval).
    Raises ImportError naming the package when matplotlib is missing, StorageError when the file cannot be written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the session plot needs matplotlib: pip install matplotlib") from error

    index = [frame["index"] for frame in per_frame]
    figure = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas, without pyplot touching a host application's backend
    latency_axes, fraction_axes = figure.subplots(2, 1, sharex=True)
    latency_axes.plot(index, [frame["total_ms"] for frame in per_frame], ".-", label="Detector.run total")
    latency_axes.plot(index, [frame["end_to_end_ms"] for frame in per_frame], ".-", label="grab to result")
    latency_axes.set_ylabel("latency (ms)")
    latency_axes.legend(loc="upper right")
    with_cells = [frame for frame in per_frame if frame["cells"]]
    fraction_axes.plot([f["index"] for f in with_cells], [f["blasts"] / f["cells"] for f in with_cells], "o", alpha=0.5, label="per frame")
    cells, blasts = np.cumsum([f["cells"] for f in per_frame]), np.cumsum([f["blasts"] for f in per_frame])
    running = np.divide(blasts, cells, out=np.full(len(cells), np.nan), where=cells > 0)
    fraction_axes.plot(index, running, "-", label="session so far")
    if summary["cells"]:
        fraction_axes.axhspan(*summary["blast_fraction_ci95"], alpha=0.15, label="session 95 % CI")
    fraction_axes.set_ylim(-0.02, 1.02)
    fraction_axes.set_ylabel("blast fraction")
    fraction_axes.set_xlabel("frame")
    fraction_axes.legend(loc="upper right")
    png = io.BytesIO()
    figure.savefig(png, format="png")
    write_file_atomically(path, png.getvalue())


def write_summary_html(folder: Path, summary: Mapping[str, Any], per_frame: Sequence[Mapping[str, Any]], saved: Sequence[Mapping[str, Any]]) -> Path:
    """summary.html: the key numbers, latency per stage, counts per class, the plot (summary_plot.png,
    when matplotlib is installed) and a table of overlay thumbnails with a column for the reviewer's count.
    Raises StorageError when a file cannot be written."""
    if per_frame:
        try:
            plot_session(folder / SUMMARY_PLOT, per_frame, summary)
            plot = f'<img src="{SUMMARY_PLOT}" alt="per-frame latency and blast fraction">'
        except ImportError as error:
            log.warning("%s; summary.html is written without it", error)
            plot = f"<p>No plot: {html.escape(str(error))}.</p>"
    else:
        plot = "<p>No plot: no frame was processed.</p>"
    low, high = summary["blast_fraction_ci95"]
    fraction = "- (no cells)" if summary["blast_fraction"] is None else f"{summary['blast_fraction']:.1%} (95 % CI {low:.1%} to {high:.1%})"
    key_numbers = [
        ("source", summary["source"]),
        ("bundle", f"{summary['bundle'].get('name', '-')} {summary['bundle'].get('model_version', '')}"),
        ("started / ended (UTC)", f"{summary['started']} / {summary['ended']}"),
        ("stopped by", f"{summary['stopped_by']}{' (ENDED EARLY)' if summary.get('ended_early') else ''}"),
        ("frames processed", f"{summary['frames_processed']} ({summary['fps']:.1f} frames/s)"),
        ("frames refused / dropped / reconnects", f"{summary['frames_refused']} / {summary['dropped_frames']} / {summary['reconnects']}"),
        ("files or frames skipped (unreadable, damaged, greyscale, deeper than 8 bits, indexed colour)", summary.get("files_skipped", 0)),
        ("cells / blasts", f"{summary['cells']} / {summary['blasts']}"),
        ("blast fraction", fraction),
        ("frames flagged", summary["flagged_frames"]),
        ("frames not judged (status)", not_judged_text(summary)),
    ]
    latency_rows = [(stage, f"{v['median']:.1f}", f"{v['p95']:.1f}") for stage, v in summary["latency_ms"].items()]
    count_rows = [(head, class_name, count) for head, counts in summary["class_counts"].items() for class_name, count in counts.items()]
    thumbnail_rows = [
        (
            saved_frame["index"],
            f"{saved_frame['elapsed_s']:.1f}",
            f'<a href="{saved_frame["overlay_file"]}"><img src="{saved_frame["overlay_file"]}" width="320" loading="lazy" alt="overlay"></a>'
            f'<br><a href="{saved_frame["frame_file"]}">frame without overlay</a>',
            saved_frame["cells"],
            saved_frame["blasts"],
            html.escape(saved_frame.get("verdict", "")),
            html.escape(", ".join(f"{label} {n}" for label, n in sorted(saved_frame["labels"].items())) or "-"),
            "",
        )
        for saved_frame in saved
    ]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>leukoedge session: {html.escape(folder.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}} .note{{color:#555;max-width:60em}}</style>
</head><body>
<h1>leukoedge session: {html.escape(folder.name)}</h1>
{html_table(("", "value"), [(name, html.escape(str(value))) for name, value in key_numbers], escape=False)}
<p class="note">Each processed frame counts the cells in it: a field that stays under the camera for several
frames counts its cells several times, and the interval, which treats every cell as independent, is then too
narrow. Compare with a manual count of the same fields: <code>python examples/capture_session.py review
{html.escape(str(folder))} --blasts N --total M</code>.</p>
<h2>Latency per stage (ms)</h2>
{html_table(("stage", "median", "p95"), latency_rows)}
<h2>Cells per class</h2>
<p class="note">The primary head counts the label (for blast: probability at or above the bundle's threshold);
the other heads count their most probable class.</p>
{html_table(("head", "class", "cells"), count_rows)}
<h2>Per frame</h2>
{plot}
<h2>Saved frames (one processed frame in {summary['save_every']})</h2>
{html_table(("frame", "seconds", "overlay", "cells", "blasts", "verdict", "labels", "reviewer's count"), thumbnail_rows, escape=False)}
</body></html>
"""
    path = folder / SUMMARY_HTML
    write_file_atomically(path, page.encode("utf-8"))
    return path


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], escape: bool = True) -> str:
    def cell(value: Any) -> str:
        return html.escape(str(value)) if escape else str(value)

    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"
