"""Field validation: record a session from a camera or a recording, then compare it with a hematologist.

1. At the microscope, record (Ctrl-C stops cleanly and still writes the summary):
       python examples/capture_session.py --source csi://0 --bundle models/default --out sessions/clinic-01
   The folder gets frames/, overlays/, results.jsonl, cells.csv, timings.csv, summary.json and
   summary.html (open it: counts, blast fraction with its 95 % interval, latency, overlay thumbnails).
2. When the hematologist has counted the same smear:
       python examples/capture_session.py review sessions/clinic-01 --blasts 12 --total 200
   prints the agreement and stores it as review.json.
3. A session that was killed (SIGKILL, power cut) has no summary; review rebuilds it from the
   per-frame records, or on its own:
       python examples/capture_session.py repair sessions/clinic-01
A full disk ends the session early: the summary says so and why, and the exit code is 2.

Sources: csi://0, v4l2:///dev/video0, 0, rtsp://..., gst://... ! appsink, clip.mp4, folder:///path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from leukoedge import Detector, LeukoedgeError, default_bundle
from leukoedge.session import ProgressDisplay, capture_session, format_review, format_summary, repair_session, review_session


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def record(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="Record a field-validation session into a folder.")
    parser.add_argument("--source", required=True, help="camera, stream, video file or image folder (URI)")
    parser.add_argument("--bundle", type=Path, default=default_bundle(), help="model bundle (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the session folder (must not hold a session yet)")
    parser.add_argument("--frames", type=positive_int, default=None, help="stop after this many frames (default: end of source or Ctrl-C)")
    parser.add_argument("--save-every", type=positive_int, default=10, help="keep every k-th frame and its overlay (default: %(default)s)")
    args = parser.parse_args(argv)
    detector = Detector.load(args.bundle)
    progress = ProgressDisplay()
    try:
        summary = capture_session(args.source, detector, args.out, max_frames=args.frames, save_every=args.save_every, on_frame=progress)
    except KeyboardInterrupt:  # a second Ctrl-C: the summary was written first all the same
        print(f"\nstopped by a second Ctrl-C; the session is in {args.out}", file=sys.stderr)
        return 130
    finally:
        progress.close()
    print(format_summary(summary))
    print(f"session written to {args.out}; open {args.out / 'summary.html'}")
    return 0


def review(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="capture_session.py review", description="Compare a session with a hematologist's count.")
    parser.add_argument("session", type=Path, help="the session folder")
    parser.add_argument("--blasts", type=int, required=True, help="blasts the hematologist counted")
    parser.add_argument("--total", type=int, required=True, help="white cells the hematologist counted")
    args = parser.parse_args(argv)
    print(format_review(review_session(args.session, args.blasts, args.total)))
    print(f"stored in {args.session / 'review.json'}")
    return 0


def repair(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="capture_session.py repair", description="Rebuild the summary of a session that was killed before writing it.")
    parser.add_argument("session", type=Path, help="the session folder")
    args = parser.parse_args(argv)
    print(format_summary(repair_session(args.session)))
    print(f"summary written to {args.session}; open {args.session / 'summary.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"review": review, "repair": repair}
    try:
        return commands[argv[0]](argv[1:]) if argv[:1] and argv[0] in commands else record(argv)
    except LeukoedgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
