"""A session's numbers, added up record by record: counts, blast fraction with its Wilson interval,
frames flagged and not judged, latency; and the summary in a few lines for a terminal.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .files import STAGES, top_classes



NORMAL_STOPS = ("end of source", "frame limit", "interrupted")  # any other stopped_by: the session ended early


STOPPED_UNRECORDED = "not recorded: the session ended without its summary (killed or power lost); rebuilt from results.jsonl"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n (z 1.96: 95 %); (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"expected 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    proportion = successes / n
    denominator = 1.0 + z * z / n
    centre = (proportion + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def iso_time(wall_time: float) -> str:
    return datetime.fromtimestamp(wall_time, timezone.utc).isoformat(timespec="seconds")


class SessionTally:
    """A session's numbers, added up from its results.jsonl records one by one: the recorder keeps one
    as it records, repair_session rebuilds one from the file, and both give the same summary."""

    def __init__(self, heads: Mapping[str, Sequence[str]], primary_head: str) -> None:
        self.heads = {head: list(classes) for head, classes in heads.items()}
        self.primary_head = primary_head
        self.frames_processed = self.frames_refused = self.frames_not_judged = 0
        self.cell_count = self.blast_count = self.flagged_frames = 0
        self.not_judged: Counter[str] = Counter()  # frames not judged, by verdict status (no_cells, outside_domain, ...)
        self.last_index = -1
        self.class_counts = {head: dict.fromkeys(classes, 0) for head, classes in self.heads.items()}
        self.stage_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.per_frame: list[dict[str, Any]] = []  # index, elapsed_s, latency and cell counts: the plot
        self.saved: list[dict[str, Any]] = []  # frames written to frames/ and overlays/: the thumbnail table
        self.bundle: dict[str, Any] = {}

    @property
    def blast_fraction(self) -> float | None:
        return self.blast_count / self.cell_count if self.cell_count else None

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one results.jsonl record: a processed frame, or a refused one (with "error")."""
        self.last_index = max(self.last_index, record["index"])
        if "error" in record:
            self.frames_refused += 1
            return
        verdict, timings = record["verdict"], record["timings"]
        self.frames_processed += 1
        status = verdict.get("status", "ok")
        self.frames_not_judged += status != "ok"
        if status != "ok":
            self.not_judged[status] += 1
        self.cell_count += verdict["cell_count"]
        self.blast_count += verdict["blast_count"]
        self.flagged_frames += bool(verdict["flagged"])
        for cell in record["cells"]:
            for head, (class_name, _) in top_classes(cell, self.heads).items():
                counted = cell["label"] if head == self.primary_head else class_name
                self.class_counts[head][counted] = self.class_counts[head].get(counted, 0) + 1
        for stage, ms in timings.items():
            self.stage_ms.setdefault(stage, []).append(ms)
        counts = {"cells": verdict["cell_count"], "blasts": verdict["blast_count"]}
        self.per_frame.append({"index": record["index"], "elapsed_s": record["elapsed_s"], "total_ms": timings["total"], "end_to_end_ms": timings["end_to_end"], **counts})
        if record.get("overlay_file") is not None:
            labels = dict(Counter(cell["label"] for cell in record["cells"]))
            files = {"frame_file": record["frame_file"], "overlay_file": record["overlay_file"]}
            verdict_text = "FLAGGED" if verdict["flagged"] else "not flagged" if status == "ok" else f"not judged: {status}"
            self.saved.append({**files, "index": record["index"], "elapsed_s": record["elapsed_s"], **counts, "labels": labels, "verdict": verdict_text})
        self.bundle = {**record.get("bundle", {}), "blast_threshold": verdict["blast_threshold"]}

    def summary(self, header: Mapping[str, Any], ended_wall: float, fps: float, capture_stats: Mapping[str, Any], stopped_by: str) -> dict[str, Any]:
        """summary.json; header is session.json's content."""
        low, high = wilson_interval(self.blast_count, self.cell_count)
        return {
            "source": header["source"],
            "bundle": self.bundle,
            "started": iso_time(header["started"]),
            "ended": iso_time(ended_wall),
            "duration_s": ended_wall - header["started"],
            "stopped_by": stopped_by,
            "ended_early": stopped_by not in NORMAL_STOPS,
            "frames_processed": self.frames_processed,
            "frames_refused": self.frames_refused,
            "frames_not_judged": self.frames_not_judged,
            "frames_not_judged_by_status": dict(sorted(self.not_judged.items())),
            "frames_saved": len(self.saved),
            "save_every": header["save_every"],
            "fps": fps,
            "dropped_frames": int(capture_stats.get("dropped", 0)),
            "reconnects": int(capture_stats.get("reconnects", 0)),
            "files_skipped": int(capture_stats.get("skipped") or 0),  # files or video frames unreadable, damaged, greyscale or deeper than 8 bits: never judged
            "capture": dict(capture_stats),
            "cells": self.cell_count,
            "blasts": self.blast_count,
            "blast_fraction": self.blast_fraction,
            "blast_fraction_ci95": [low, high],
            "flagged_frames": self.flagged_frames,
            "class_counts": self.class_counts,
            "latency_ms": {
                stage: {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "frames": len(values)}
                for stage, values in self.stage_ms.items()
                if values
            },
        }


def not_judged_text(summary: Mapping[str, Any]) -> str:
    """"3 (no_cells 2, outside_domain 1)": frames the bundle did not judge, by status (never counted as negative)."""
    by_status = summary.get("frames_not_judged_by_status", {})
    details = ", ".join(f"{status} {count}" for status, count in by_status.items())
    return f"{summary.get('frames_not_judged', 0)}{f' ({details})' if details else ''}"


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines for a terminal: frames, capture faults, cells, blast fraction with its interval, latency."""
    low, high = summary["blast_fraction_ci95"]
    fraction = "-" if summary["blast_fraction"] is None else f"{summary['blast_fraction']:.1%} (95 % CI {low:.1%} to {high:.1%})"
    lines = [f"ENDED EARLY: {summary['stopped_by']}"] if summary.get("ended_early") else []
    lines += [
        f"frames processed {summary['frames_processed']} (refused {summary['frames_refused']}, dropped {summary['dropped_frames']}, "
        f"reconnects {summary['reconnects']}), {summary['fps']:.1f} fps, stopped by: {summary['stopped_by']}",
        *([f"files or frames skipped {skipped} (unreadable, damaged, greyscale or deeper than 8 bits: never judged; see the messages above)"] if (skipped := summary.get("files_skipped", 0)) else []),
        f"cells {summary['cells']}, blasts {summary['blasts']}: blast fraction {fraction}",
        f"frames flagged {summary['flagged_frames']}, not judged {not_judged_text(summary)}",
    ]
    latency = summary["latency_ms"]
    if latency:
        lines.append("latency ms (median / p95): " + ", ".join(f"{stage} {v['median']:.0f} / {v['p95']:.0f}" for stage, v in latency.items()))
    return "\n".join(lines)
