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


async def test_the_event_loop_runs_while_a_push_is_in_flight(narrow_encoder, monkeypatch):
    """No push runs on the event loop's thread, and the loop serves other tasks while one is in
    flight: the third step waits for an event that only a task on the loop sets (had the push
    run on the loop's thread, the wait would time out and the step raise). No wall clock."""
    frames = [f.numpy() for f in random_video(5, 16, 16, seed=2)[0]]
    expected = await collect(StreamEncoder(narrow_encoder), frames)
    loop_thread = threading.get_ident()
    step_threads: list[int] = []
    loop_ran = threading.Event()
    real = narrow_encoder.step

    def step(*args, **kwargs):
        step_threads.append(threading.get_ident())
        if len(step_threads) == 3 and not loop_ran.wait(30):
            raise AssertionError("the event loop did not run while a push was in flight")
        return real(*args, **kwargs)

    async def on_the_loop() -> None:
        while len(step_threads) < 3:
            await asyncio.sleep(0.001)
        loop_ran.set()

    monkeypatch.setitem(narrow_encoder.__dict__, "step", step)
    helper = asyncio.create_task(on_the_loop())
    latents = await collect(StreamEncoder(narrow_encoder), frames)
    await helper
    assert len(step_threads) == 5 and loop_thread not in step_threads
    assert all(torch.equal(a.data, b.data) for a, b in zip(latents, expected, strict=True))


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


class BlockingStep:
    """Wraps ``encoder.step``: its ``at``-th call (1-based) waits for ``release``."""

    def __init__(self, encoder, at: int) -> None:
        self.real, self.at, self.calls = encoder.step, at, 0
        self.entered, self.release, self.finished = (threading.Event() for _ in range(3))

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.entered.set()
            self.release.wait(60)
            try:
                return self.real(*args, **kwargs)
            finally:
                self.finished.set()
        return self.real(*args, **kwargs)


async def _wait_event(event: threading.Event) -> None:
    deadline = time.monotonic() + 60
    while not event.is_set():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_cancel_keeps_the_latents_of_the_push_in_flight(
    narrow_encoder, monkeypatch, cancels
):
    """Issue 17 item 7: the latents of the push in flight were thrown away, and a second
    cancel ended the wait while the worker still ran on the encoder the caller reuses."""
    frames = [f.numpy() for f in random_video(13, 16, 16, seed=10)[0]]
    fresh = await collect(StreamEncoder(narrow_encoder), frames)
    blocking = BlockingStep(narrow_encoder, at=5)  # frame 4: the push that completes latent 1
    monkeypatch.setitem(narrow_encoder.__dict__, "step", blocking)
    stream = StreamEncoder(narrow_encoder)
    seen = []

    async def consume():
        async with stream.stream(iter(frames)) as latents:
            async for latent in latents:
                seen.append(latent)

    task = asyncio.create_task(consume())
    await _wait_event(blocking.entered)
    for _ in range(cancels):
        task.cancel()
        await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the push in flight, however often cancelled
    blocking.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert blocking.finished.is_set() and encode_threads() == []
    assert [x.index for x in seen] == [0]
    assert [x.index for x in stream.pending_latents] == [1]
    # The stream goes on where it was: latent 1 first, then the rest, as a fresh run.
    rest = [x for frame in frames[5:] for x in stream.push(frame)] + stream.flush()
    assert [x.index for x in rest] == [1, 2, 3]
    assert all(torch.equal(a.data, b.data) for a, b in zip(rest, fresh[1:], strict=True))


async def test_a_cancel_never_waits_for_a_hung_source_read(narrow_encoder):
    """Issue 17 item 7: a sync source's next() ran in the worker, so cancelling the consumer
    of a hung capture waited for it forever."""
    frames = [f.numpy() for f in random_video(3, 8, 8, seed=11)[0]]
    reading, hang = threading.Event(), threading.Event()

    def camera():
        yield frames[0]
        reading.set()
        hang.wait(60)  # a capture that never returns (until the test ends)
        yield frames[1]

    seen = []

    async def consume():
        async with StreamEncoder(narrow_encoder).stream(camera()) as latents:
            async for latent in latents:
                seen.append(latent.index)

    task = asyncio.create_task(consume())
    try:
        await _wait_event(reading)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
        assert seen == [0] and encode_threads() == []
    finally:
        hang.set()
