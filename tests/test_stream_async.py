"""StreamEncoder.stream: async iteration that never blocks the event loop and never leaks a thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from helpers import random_video, rel_err, to_model_video
from streamvae import StreamEncoder

TOLERANCE = 1e-5


def encode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamvae-encode")]


async def collect(stream: StreamEncoder, frames) -> list:
    async with stream.stream(frames) as latents:
        return [latent async for latent in latents]


async def test_sync_and_async_sources_equal_the_batch_encoder(narrow_encoder):
    frames = random_video(11, 16, 16, seed=1)
    expected = narrow_encoder.encode(to_model_video(frames))

    async def async_frames():
        for frame in frames[0]:
            await asyncio.sleep(0)
            yield frame.numpy()

    from_list = await collect(StreamEncoder(narrow_encoder), [f.numpy() for f in frames[0]])
    from_async = await collect(StreamEncoder(narrow_encoder), async_frames())
    for latents in (from_list, from_async):
        assert [latent.index for latent in latents] == [0, 1, 2]
        data = torch.stack([latent.data for latent in latents], dim=1)[None]
        assert rel_err(data, expected) <= TOLERANCE
    assert encode_threads() == []


async def test_the_event_loop_keeps_ticking_while_encoding(wan21_encoder):
    frames = [f.numpy() for f in random_video(5, 64, 64, seed=2)[0]]
    ticks: list[float] = []
    stop = asyncio.Event()

    async def heartbeat():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.001)

    beat = asyncio.create_task(heartbeat())
    started = time.perf_counter()
    latents = await collect(StreamEncoder(wan21_encoder), frames)
    encoding = time.perf_counter() - started
    stop.set()
    await beat
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(latents) == 2
    # Five pushes of the full model take a good fraction of a second here; had any run on the
    # loop's thread, one gap would be as long as a push.
    assert encoding > 0.1
    assert max(gaps) < min(0.05, encoding / 10), (max(gaps), encoding)


async def test_cancelling_the_consumer_leaves_no_thread_and_a_reusable_encoder(narrow_encoder):
    frames = [f.numpy() for f in random_video(13, 16, 16, seed=3)[0]]
    stream = StreamEncoder(narrow_encoder)
    first = asyncio.Event()
    seen = []

    async def consume():
        async with stream.stream(iter(frames)) as latents:
            async for latent in latents:
                seen.append(latent)
                first.set()
                await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert encode_threads() == []
    stream.reset()
    again = await collect(stream, frames)
    fresh = await collect(StreamEncoder(narrow_encoder), frames)
    assert [torch.equal(a.data, b.data) for a, b in zip(again, fresh)] == [True] * 4


async def test_breaking_out_of_the_loop_closes_the_worker(narrow_encoder):
    frames = [f.numpy() for f in random_video(9, 8, 8, seed=4)[0]]
    async with StreamEncoder(narrow_encoder).stream(frames) as latents:
        async for _ in latents:
            break
    assert encode_threads() == []


async def test_a_failing_source_ends_with_its_error_after_the_complete_latents(narrow_encoder):
    frames = [f.numpy() for f in random_video(7, 8, 8, seed=5)[0]]

    def camera():
        yield from frames
        raise OSError("camera unplugged")

    got = []
    with pytest.raises(OSError, match="camera unplugged"):
        async with StreamEncoder(narrow_encoder).stream(camera()) as latents:
            async for latent in latents:
                got.append(latent.index)
    assert got == [0, 1]
    assert encode_threads() == []


async def test_a_slow_consumer_slows_the_source(narrow_encoder):
    pulled = 0

    def source():
        nonlocal pulled
        for frame in random_video(41, 8, 8, seed=6)[0]:
            pulled += 1
            yield frame.numpy()

    consumed = 0
    async with StreamEncoder(narrow_encoder).stream(source()) as latents:
        async for latent in latents:
            consumed += 1
            # Latent k needs frames 0..4k: the source is never more than one frame ahead.
            assert pulled <= 4 * latent.index + 1
            await asyncio.sleep(0.01)
            if consumed == 4:
                break
    assert pulled <= 13


async def test_stream_without_flush_keeps_the_stream_open(narrow_encoder):
    frames = [f.numpy() for f in random_video(7, 8, 8, seed=7)[0]]
    stream = StreamEncoder(narrow_encoder)
    async with stream.stream(frames[:3], flush=False) as latents:
        first = [latent.index async for latent in latents]
    async with stream.stream(frames[3:]) as latents:
        rest = [latent.index async for latent in latents]
    assert (first, rest) == ([0], [1])
    assert stream.dropped_frames == 2


async def test_cancelling_during_a_push_waits_for_it_then_ends(narrow_encoder):
    frames = [f.numpy() for f in random_video(13, 16, 16, seed=8)[0]]
    in_flight = threading.Event()

    def source():
        for t, frame in enumerate(frames):
            if t == 6:
                in_flight.set()
            yield frame

    stream = StreamEncoder(narrow_encoder)

    async def consume():
        async with stream.stream(source()) as latents:
            async for _ in latents:
                pass

    task = asyncio.create_task(consume())
    while not in_flight.is_set():
        await asyncio.sleep(0)
    task.cancel()  # the worker is reading frame 6 or pushing it
    with pytest.raises(asyncio.CancelledError):
        await task
    assert encode_threads() == []
    assert 6 <= stream.frames_pushed <= 7
