"""TrackSource: a WebRTC track's frames through the live source (drops, clocks, runs, ends)."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction

import numpy as np
import pytest

from helpers import require
from io_fixtures import wait_until
from streamvae.io import SourceError
from streamvae.stream import StreamEncoder

av = require("av")
mediastreams = require("aiortc.mediastreams")

from streamvae.web import TrackSource  # noqa: E402


class FakeTrack:
    """A video track whose frames a test puts in: ``put(image)``, ``end()``."""

    kind = "video"

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pts = 0

    def put(self, image: np.ndarray, step: int = 3000) -> None:
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = self.pts, Fraction(1, 90000)
        self.pts += step
        self.queue.put_nowait(frame)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def recv(self):
        frame = await self.queue.get()
        if frame is None:
            raise mediastreams.MediaStreamError
        return frame


def image(number: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.random.default_rng(number).integers(0, 256, (h, w, 3), dtype=np.uint8)


async def take(source, count: int, timeout: float = 10.0):
    frames = []

    async def read():
        async for frame in source:
            frames.append(frame)
            if len(frames) == count:
                break

    await asyncio.wait_for(read(), timeout)
    return frames


async def test_frames_arrive_exactly_with_server_clocks_and_rtp_stream_time():
    track = FakeTrack()
    source = TrackSource(track)
    for n in range(5):
        track.put(image(n))
    track.end()
    before_wall, before_mono = time.time(), time.monotonic()
    async with source:
        frames = [frame async for frame in source]
    assert [f.number for f in frames] == [0, 1, 2, 3, 4]
    for n, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.image, image(n))  # rgb24 in, the same RGB out
        assert frame.stream_time == pytest.approx(n * 3000 / 90000)
        assert before_mono <= frame.captured <= time.monotonic()
        assert before_wall - 1 <= frame.timestamp <= time.time() + 1
        assert not frame.gap
    assert source.kind == "webrtc" and source.live
    assert source.stats.frames_read == source.stats.frames_delivered == 5


async def test_frames_are_brought_to_size_as_any_source_does():
    track = FakeTrack()
    source = TrackSource(track, size="8x16")
    track.put(image(0, 48, 64))
    track.end()
    async with source:
        (frame,) = [f async for f in source]
    assert frame.image.shape == (8, 16, 3)
    assert source.resolution == (48, 64)


@pytest.mark.parametrize("max_queued_groups", [1, 2])
async def test_a_slow_consumer_loses_whole_groups_and_frame_zero_stays(max_queued_groups):
    """Issue 24 item 2: a consumer that has not read yet gets frame 0 and the newest
    ``max_queued_groups`` whole groups, exactly: the queue the source builds is its bound."""
    track = FakeTrack()
    source = TrackSource(track, max_queued_groups=max_queued_groups)
    for n in range(1 + 4 * 6):  # frame 0 and six groups, before the consumer reads any
        track.put(image(n))
    track.end()
    async with source:
        # The last frame read: the last group's first frame (which made the drops) is queued.
        await wait_until(lambda: source.stats.frames_read == 25, 30, "all 25 frames read")
        frames = [f async for f in source]
    numbers = [f.number for f in frames]
    kept = 4 * max_queued_groups
    assert numbers == [0, *range(25 - kept, 25)]  # frame 0 stays, the newest groups, whole
    assert source.stats.dropped_groups == 6 - max_queued_groups
    assert source.stats.dropped_frames == 25 - len(numbers) == 24 - kept


async def test_a_new_resolution_starts_a_new_run_with_a_gap(narrow_encoder):
    track = FakeTrack()
    source = TrackSource(track, max_queued_groups=8)  # room for every frame: no drops
    small = [image(n, 16, 16) for n in range(6)]
    large = [image(10 + n, 24, 32) for n in range(5)]
    for picture in small + large:
        track.put(picture)
    track.end()
    async with source:
        frames = [f async for f in source]
    assert [(f.run, f.number, f.gap) for f in frames] == [(0, n, False) for n in range(6)] + [
        (1, 0, True)
    ] + [(1, n, False) for n in range(1, 5)]
    assert source.resets == 1 and source.resolution == (24, 32)
    # The encoder ends the first run there and restarts: the next latent is marked.
    encoder = StreamEncoder(narrow_encoder)
    latents = [x for f in frames for x in encoder.push(f)] + encoder.flush()
    assert [(x.index, x.gap) for x in latents] == [(0, False), (1, False), (0, True), (1, False)]
    assert encoder.dropped_frames == 1  # frame 5 of the first run: a partial group


async def test_a_browser_that_sends_nothing_times_out():
    track = FakeTrack()
    source = TrackSource(track, first_frame_timeout=0.3, name="tab-1")
    with pytest.raises(SourceError, match=r"tab-1: the browser sent no frame for 0.3 s"):
        async with source:
            await take(source, 1)


async def test_a_browser_that_stops_sending_times_out_after_its_frames():
    track = FakeTrack()
    source = TrackSource(track, frame_timeout=0.3, name="tab-2")
    track.put(image(0))
    got = []
    with pytest.raises(SourceError, match=r"no further frame for 0.3 s \(1 frame\(s\) received\)"):
        async with source:
            async for frame in source:
                got.append(frame.number)
    assert got == [0]


async def test_finish_delivers_what_arrived_then_ends():
    track = FakeTrack()
    source = TrackSource(track)
    for n in range(3):
        track.put(image(n))
    async with source:
        first = await take(source, 1)
        await wait_until(lambda: source.stats.frames_read == 3, 30, "the other two frames")
        source.finish()
        rest = [f async for f in source]
    assert [f.number for f in first + rest] == [0, 1, 2]


async def test_stop_ends_at_once_and_counts_what_it_discards():
    track = FakeTrack()
    source = TrackSource(track, max_queued_groups=4)
    for n in range(5):
        track.put(image(n))
    async with source:
        await take(source, 1)
        await wait_until(lambda: source.stats.frames_read == 5, 30, "all five frames read")
        source.stop()
        rest = [f async for f in source]
    assert rest == []
    stats = source.stats
    assert (
        stats.frames_read == stats.frames_delivered + stats.dropped_frames + stats.discarded_at_stop
    )
    assert stats.discarded_at_stop == 4


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"size": "10x10"}, "multiples of 8"),
        ({"resize": "stretch"}, "resize must be"),
        ({"max_queued_groups": 0}, "max_queued_groups"),
        ({"frame_timeout": 0}, "frame_timeout must be > 0"),
    ],
)
def test_bad_options_are_refused(kwargs, says):
    with pytest.raises(ValueError, match=says):
        TrackSource(FakeTrack(), **kwargs)


def test_an_audio_track_is_refused():
    track = FakeTrack()
    track.kind = "audio"
    with pytest.raises(ValueError, match="video track, got kind='audio'"):
        TrackSource(track)


async def test_a_capture_clock_stamps_frames_with_the_senders_capture_time():
    track = FakeTrack()
    known = {0: None, 3000: None, 6000: 500.0, 9000: 500.1}  # no report before the third
    source = TrackSource(track, capture_clock=lambda frame: known[frame.pts])
    for n in range(4):
        track.put(image(n))
    track.end()
    async with source:
        frames = [f async for f in source]
    assert [f.timestamp for f in frames[2:]] == [500.0, 500.1]
    assert all(abs(f.timestamp - time.time()) < 60 for f in frames[:2])  # the server's receipt
    assert source.capture_times_since == frames[2].captured
    assert len(source.transits) == 2
