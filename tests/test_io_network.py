"""Network sources on loopback: RTSP pushed by ffmpeg, MJPEG over HTTP served by ffmpeg.

Each stream plays for a couple of seconds, stops (the source sees the stream die), and a second
stream starts: the source reconnects, the frames after it are marked ``gap`` and the encoder
starts a new run, whose first latent says so.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import io_fixtures
from io_fixtures import StreamServer
from streamvae import StreamEncoder
from streamvae.io import Backoff, encode_to_sinks, open_source

pytestmark = pytest.mark.network

stream_server = io_fixtures.stream_server  # fixtures
one_torch_thread = io_fixtures.one_torch_thread


class CollectingSink:
    def __init__(self) -> None:
        self.latents = []

    async def send(self, latent) -> None:
        self.latents.append(latent)


@pytest.mark.parametrize("stream_server", ["rtsp", "mjpeg"], indirect=True)
async def test_stream_dies_and_comes_back(
    stream_server: StreamServer, narrow_encoder, one_torch_thread
):
    listen = {"rtsp_flags": "listen", "listen_timeout": "10"}
    options = listen if stream_server.kind == "rtsp" else {}
    source = open_source(
        stream_server.url,
        size="32x32",
        ffmpeg_options=options,
        open_timeout=15,
        read_timeout=3,
        backoff=Backoff(initial=0.1, maximum=0.5),
    )
    assert source.kind == "network" and source.live and source.reconnect
    threads_before = set(threading.enumerate())
    sink = CollectingSink()
    stream_server.serve(2.0)
    stream_server.serve(6.0)  # after the first has ended; stopped once latents came of it

    async def stop_when_done() -> None:
        for _ in range(600):
            if any(latent.gap for latent in sink.latents) and sink.latents[-1].index >= 2:
                break
            await asyncio.sleep(0.05)
        source.stop()

    delivered = []

    async def recorded():
        async for frame in source:
            delivered.append((frame.run, frame.number))
            yield frame

    async with source:
        stopper = asyncio.ensure_future(stop_when_done())
        stats = await encode_to_sinks(recorded(), StreamEncoder(narrow_encoder), [sink])
        await stopper
    stream_server.close()
    assert source.stats.disconnects >= 1 and source.stats.reconnects >= 1, source.stats
    assert stream_server.sessions >= 1 and source.stats.disconnects == 1
    gap_latents = [latent for latent in sink.latents if latent.gap]
    assert len(gap_latents) == 1 and gap_latents[0].index == 0
    assert sink.latents[0].index == 0 and sink.latents[-1].index >= 2
    assert all(latent.data.shape == (16, 4, 4) for latent in sink.latents)
    assert stats.frames == source.stats.frames_delivered
    # Drops are of whole groups (frame 0 alone, then 1-4, 5-8, ...), never inside one.
    for run in (0, 1):
        numbers = [number for r, number in delivered if r == run]
        assert numbers[0] == 0
        missing = sorted(set(range(numbers[-1])) - set(numbers))
        assert len(missing) % 4 == 0
        assert all(
            missing[i] % 4 == 1 and missing[i + 3] == missing[i] + 3
            for i in range(0, len(missing), 4)
        )
    # The reader thread is gone once the source is closed.
    assert not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    print(
        f"{stream_server.kind}: {stats.frames} frames, {len(sink.latents)} latents, "
        f"{source.stats.dropped_frames} dropped, {source.stats.reconnects} reconnect(s)"
    )
