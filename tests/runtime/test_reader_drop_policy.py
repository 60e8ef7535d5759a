"""ThreadedReader's drop policy: the newest frame from a camera, every frame from a file unless asked otherwise."""

from __future__ import annotations

import time

import numpy as np

from leukoedge.capture import Frame, FrameSource, ThreadedReader

FIELD = np.full((32, 40, 3), 128, np.uint8)


class Recording(FrameSource):
    """A finite source of `count` frames that delivers them far faster than anyone consumes them."""

    uri = "recording://test"

    def __init__(self, count: int, live: bool = False) -> None:
        self.count, self.live, self.delivered = count, live, 0

    def read(self) -> Frame | None:
        if self.delivered == self.count:
            return None
        self.delivered += 1
        return Frame(FIELD, self.delivered - 1, time.monotonic(), 0.0, self.uri)

    def close(self) -> None:
        pass


def slow_consumer(reader: ThreadedReader) -> list[int]:
    taken = []
    for frame in reader:
        taken.append(frame.index)
        time.sleep(0.005)  # a detector slower than the file reads
    return taken


def test_a_file_source_hands_out_every_frame_to_a_slow_consumer() -> None:
    with ThreadedReader(lambda: Recording(54)) as reader:
        taken = slow_consumer(reader)
        stats = reader.stats()
    assert taken == list(range(54))
    assert (stats["frames"], stats["dropped"]) == (54, 0)


def test_a_file_source_drops_frames_when_asked() -> None:
    with ThreadedReader(lambda: Recording(54), drop_frames=True) as reader:
        time.sleep(0.2)  # the whole recording is read before the first get
        taken = slow_consumer(reader)
        stats = reader.stats()
    assert taken == [53]
    assert (stats["frames"], stats["dropped"]) == (54, 53)


def test_a_live_source_keeps_only_the_newest_frame() -> None:
    with ThreadedReader(lambda: Recording(54, live=True), reconnect=False) as reader:
        time.sleep(0.2)
        newest = reader.get(timeout=1.0)
        assert newest is not None and newest.index == 53
        assert reader.stats()["dropped"] == 53


def test_stop_releases_a_grabbing_thread_waiting_for_the_slot() -> None:
    reader = ThreadedReader(lambda: Recording(10))
    time.sleep(0.1)  # the thread holds frame 1 and waits for frame 0 to be taken
    reader.stop(timeout=2.0)
    assert not reader.running
