"""The application loop to copy: a source, the detector, one result per frame, a clean stop.

    python examples/integrate.py SOURCE [--bundle B]     e.g. csi://0, 0, rtsp://..., clip.mp4
"""

from __future__ import annotations

import argparse
import logging
import sys

from leukoedge import CaptureError, Detector, InvalidFrameError, LeukoedgeError, ThreadedReader, default_bundle, open_source
from leukoedge.result import verdict_summary

log = logging.getLogger("integrate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="camera, stream, video file or image folder (URI)")
    parser.add_argument("--bundle", default=str(default_bundle()), help="model bundle (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        detector = Detector.load(args.bundle)  # BundleError: missing, tampered or too new a bundle
        # Grabs on its own thread. From a camera or stream it hands out the newest frame, so latency
        # never piles up; from a video file or folder every frame in order (drop_frames=True drops
        # them as from a camera). A camera that fails is re-opened with backoff.
        # CaptureError here: the source cannot be opened.
        reader = ThreadedReader(lambda: open_source(args.source))
    except LeukoedgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with detector, reader:  # however the loop ends: stops the capture thread, then releases the models
            for frame in reader:  # ends with the file; a camera runs until Ctrl-C
                try:
                    result = detector.run(frame.image, capture_ms=frame.capture_ms, jpeg_quality=frame.jpeg_quality)
                except InvalidFrameError as error:  # one odd frame: skip it, keep the device running
                    log.warning("frame %d skipped: %s", frame.index, error)
                    continue
                verdict = result.verdict
                # Your application goes here: display, store, alert on verdict.flagged; a frame with
                # verdict.status other than "ok" was not judged (verdict.reason says why).
                # verdict.subtype: the frame's B-ALL subtype, meaningful on flagged frames.
                # result.draw(frame.image): the frame with the cells and the verdict drawn, for a display.
                print(f"frame {frame.index}: {verdict_summary(verdict)}  ({result.timings['total']:.0f} ms)")
    except CaptureError as error:  # the camera failed and could not be re-opened
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the with-block has already stopped the reader
        pass
    print(f"capture: {reader.stats()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
