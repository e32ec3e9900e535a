"""The fleet under hostile input and faults (issue 21, items 1-7), and the worker's pool.

Against a real nats-server on loopback. Workers and ingests run in this process (one event
loop, so a test can call a worker's claim pass itself), except where a process must die."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import zlib

import fleet_fixtures
import numpy as np
import pytest
from fleet_fixtures import FleetProcess, read_latents

from streamvae import StreamEncoder, narrow
from streamvae.fleet import FleetWorker, NatsSettings, WorkerOptions
from streamvae.fleet.broker import ensure_frames_stream, open_bucket
from streamvae.fleet.ingest import IngestRefused, ingest
from streamvae.fleet.messages import FrameMessageError, decode_frame, encode_frame, end_headers
from streamvae.frames import Frame
from streamvae.io.sources import synthetic_frame
from streamvae.weights import random_encoder

pytestmark = [pytest.mark.network]

LEASE_TTL = 1.5
TOLERANCE = 1e-5


nats_server = fleet_fixtures.nats_server  # a real nats-server on loopback, per test


@pytest.fixture(scope="module")
def encoder():
    return random_encoder(narrow(8), seed=0)


async def until(condition, what: str, timeout: float = 60.0) -> None:
    """Wait (polling) until ``condition()`` (a coroutine function too); fail saying ``what``
    after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_worker(url: str, encoder, worker_id: str = "wA", **options):
    """A FleetWorker in this event loop; ``worker.events`` collects its events."""
    events: list[dict] = []
    options.setdefault("capacity", 4)
    worker = FleetWorker(
        NatsSettings.from_url(url),
        encoder,
        WorkerOptions(worker_id=worker_id, lease_ttl=LEASE_TTL, **options),
        on_event=events.append,
    )
    worker.events = events  # type: ignore[attr-defined]
    stop = asyncio.Event()
    task = asyncio.ensure_future(worker.run(stop))
    try:
        await until(
            lambda: any(e["event"] == "worker_started" for e in events) or task.done(), "start"
        )
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def named(worker, event: str, stream: str | None = None) -> list[dict]:
    return [
        e
        for e in worker.events
        if e["event"] == event and (stream is None or e.get("stream") == stream)
    ]


def frame_item(image, index: int, run: str, stream_id: str, codec: str = "png"):
    return encode_frame(
        image, index=index, run=run, timestamp=100.0 + index, codec=codec, stream_id=stream_id
    )


async def publish(url: str, stream_id: str, items, *, register: dict | None = None) -> list[int]:
    """Publish (payload, headers) to ``svae.frames.<stream_id>`` as an ingest would; register
    the stream (its run, size, first sequence) after the first message unless told otherwise."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_frames_stream(js, 512)
        streams = await open_bucket(js, "svae_streams")
        seqs = []
        for payload, headers in items:
            ack = await js.publish(f"svae.frames.{stream_id}", payload, headers=headers)
            seqs.append(ack.seq)
            if len(seqs) == 1 and register is not False:
                entry = {
                    "run": headers["Svae-Run"],
                    "size": headers.get("Svae-Size"),
                    "codec": headers.get("Svae-Codec"),
                    "start_seq": ack.seq,
                    "state": "live",
                    **(register or {}),
                }
                await streams.put(stream_id, json.dumps(entry).encode())
        return seqs
    finally:
        await nc.close()


async def kv_get(url: str, bucket: str, key: str) -> dict | None:
    import nats

    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        return json.loads((await kv.get(key)).value)
    except Exception:  # no such bucket or key (yet)
        return None
    finally:
        await nc.close()


async def frames_stored(url: str, stream_id: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(
            "SVAE_FRAMES", subjects_filter=f"svae.frames.{stream_id}"
        )
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


def reference(encoder, images, first_timestamp_index: int = 0):
    stream = StreamEncoder(encoder)
    out = []
    for i, image in enumerate(images):
        out += stream.push(image, timestamp=100.0 + first_timestamp_index + i)
    return out


def assert_equal_latents(got, expected) -> None:
    assert [lat.index for lat in got] == [lat.index for lat in expected]
    for g, e in zip(got, expected):
        assert g.frames == e.frames
        assert float((g.data - e.data).abs().max() / e.data.abs().max()) <= TOLERANCE


# -- item 1: a refused message changes nothing ----


def test_a_refused_frame_message_changes_nothing_and_later_frames_encode(nats_server, encoder):
    """A message with an unknown codec claiming index 100, and a valid frame claiming index
    10**9, in the middle of a run: both refused and counted; every real frame still encodes,
    with no gap, as an uninterrupted run over the real frames."""
    run, sid = "r1", "cam-refused"
    images = [synthetic_frame(i, 16, 16) for i in range(21)]
    items = [frame_item(images[i], i, run, sid) for i in range(9)]
    payload, headers = frame_item(images[9], 100, run, sid)
    items.append((payload, {**headers, "Svae-Codec": "webp"}))
    items += [frame_item(images[i], i, run, sid) for i in range(9, 13)]
    items.append(frame_item(images[13], 1_000_000_000, run, sid))
    items += [frame_item(images[i], i, run, sid) for i in range(13, 21)]
    items.append((b"", end_headers(run=run, frames=21, stream_id=sid)))

    async def main():
        await publish(nats_server.url, sid, items)
        async with running_worker(nats_server.url, encoder) as worker:
            await until(lambda: named(worker, "ended", sid), "the stream ended")
        return named(worker, "ended", sid)[0]

    ended = asyncio.run(main())
    assert ended["bad_frames"] == 2 and ended["gaps"] == 0
    received = asyncio.run(read_latents(nats_server.url, sid))
    assert [(lat.meta["run"], lat.gap) for _, lat in received] == [(run, False)] * 6
    assert_equal_latents([lat for _, lat in received], reference(encoder, images))


# -- item 2: one ingest per stream id; no claim loop on a finished stream ----


async def _frames(count: int, *, size: int = 16, hold: asyncio.Event | None = None, pace=0.0):
    for i in range(count):
        if hold is not None and i == count // 2:
            await hold.wait()
        if pace:
            await asyncio.sleep(pace)
        yield Frame(synthetic_frame(i, size, size), 100.0 + i, number=i)


def test_a_second_ingest_of_a_live_stream_id_is_refused_or_takes_over(nats_server):
    """While one ingest publishes cam-x, a second is refused with the reason; with take_over it
    replaces the first, which then stops with an error instead of interleaving its frames."""
    settings = NatsSettings.from_url(nats_server.url)

    async def forever():
        i = 0
        while True:
            yield Frame(synthetic_frame(i, 16, 16), 100.0 + i, number=i)
            i += 1
            await asyncio.sleep(0.05)

    async def main():
        first = asyncio.ensure_future(ingest(forever(), settings, stream_id="cam-x", codec="png"))

        async def holds():
            return first.done() or await kv_get(nats_server.url, "svae_ingests", "cam-x")

        await until(holds, "the first ingest holds cam-x")
        with pytest.raises(IngestRefused, match="stream id cam-x is live: another ingest"):
            await ingest(_frames(5), settings, stream_id="cam-x", codec="png")
        assert not first.done()
        second = await ingest(_frames(9), settings, stream_id="cam-x", codec="png", take_over=True)
        with pytest.raises(IngestRefused, match="was taken over by another ingest"):
            await asyncio.wait_for(first, 30)
        return second

    assert asyncio.run(main()).frames == 9


def test_interleaved_runs_of_one_stream_id_end_and_are_never_claimed_again(nats_server, encoder):
    """Two runs interleaved on one subject (what two ingests of one id used to make): the worker
    ends each run once (the registered one completely), then never claims the stream again,
    however often it looks."""
    sid = "cam-twice"
    a = [frame_item(synthetic_frame(i, 16, 16), i, "A", sid) for i in range(9)]
    b = [frame_item(synthetic_frame(50 + i, 16, 16), i, "B", sid) for i in range(9)]
    items = [b[0]] + [m for pair in zip(a[1:], b[1:]) for m in pair]
    items.insert(0, a[0])
    items += [
        (b"", end_headers(run="A", frames=9, stream_id=sid)),
        (b"", end_headers(run="B", frames=9, stream_id=sid)),
    ]

    async def main():
        import nats

        seqs = await publish(nats_server.url, sid, items, register=False)
        nc = await nats.connect(nats_server.url)
        streams = await open_bucket(nc.jetstream(), "svae_streams")
        entry = {"run": "B", "size": "16x16", "codec": "png", "start_seq": seqs[1]}
        await streams.put(sid, json.dumps({**entry, "state": "ended"}).encode())
        await nc.close()
        async with running_worker(nats_server.url, encoder) as worker:

            async def settled():
                progress = await kv_get(nats_server.url, "svae_progress", sid) or {}
                running = any(not future.done() for _, future in worker.tasks.values())
                return not running and progress.get("done_runs", [])[-1:] == ["B"]

            await until(settled, "run B done and no stream task running")
            claims = len(named(worker, "claimed", sid))
            for _ in range(3):
                await worker._claim_some()
            assert len(named(worker, "claimed", sid)) == claims <= 3
            assert not worker.tasks
        return await kv_get(nats_server.url, "svae_progress", sid)

    progress = asyncio.run(main())
    assert set(progress["done_runs"]) <= {"A", "B"} and progress["run"] == "B"
    received = asyncio.run(read_latents(nats_server.url, sid))
    assert [lat.index for _, lat in received if lat.meta["run"] == "B"] == [0, 1, 2]


# -- item 3: a run id used before is an error ----


def test_an_ingest_restarted_with_the_same_run_id_is_an_error(nats_server, tmp_path):
    settings = NatsSettings.from_url(nats_server.url)

    async def main():
        import nats

        await ingest(_frames(5), settings, stream_id="cam-run", codec="png", run="r7")
        # The registry moved on (another run in between): JetStream still holds r7's frames,
        # and says so with ack.duplicate.
        nc = await nats.connect(nats_server.url)
        streams = await open_bucket(nc.jetstream(), "svae_streams")
        await streams.put("cam-run", json.dumps({"run": "other", "start_seq": 1}).encode())
        await nc.close()
        with pytest.raises(IngestRefused, match="JetStream already holds cam-run:r7:0"):
            await ingest(_frames(5), settings, stream_id="cam-run", codec="png", run="r7")

    asyncio.run(main())
    again = FleetProcess(
        "again",
        ["ingest", "synthetic://moving?frames=5&size=16x16", "--nats", nats_server.url,
         "--stream-id", "cam-run", "--frame-codec", "png", "--run-id", "other"],
        tmp_path,
    ).start()  # fmt: skip
    assert again.wait(120) == 1
    assert "has had a run 'other' already" in again.stderr_path.read_text()
    assert "give a new --run-id" in again.stderr_path.read_text()


# -- item 4: sizes the model refuses ----


def test_ingest_refuses_a_frame_size_the_encoder_refuses_before_publishing(nats_server):
    settings = NatsSettings.from_url(nats_server.url)

    async def main():
        with pytest.raises(IngestRefused, match="frames are 36x36; the encoder needs"):
            await ingest(_frames(5, size=36), settings, stream_id="cam-36", codec="png")
        return await kv_get(nats_server.url, "svae_streams", "cam-36")

    assert asyncio.run(main()) is None
    assert asyncio.run(frames_stored(nats_server.url, "cam-36")) == 0


def test_a_stream_that_cannot_be_encoded_is_failed_once_and_never_claimed_again(
    nats_server, encoder, caplog
):
    sid = "cam-odd"
    images = [np.full((36, 36, 3), i, np.uint8) for i in range(6)]
    items = [frame_item(image, i, "r", sid, codec="raw") for i, image in enumerate(images)]

    async def main():
        await publish(nats_server.url, sid, items)
        async with running_worker(nats_server.url, encoder) as worker:
            await until(lambda: named(worker, "failed", sid), "the stream failed")
            async with running_worker(nats_server.url, encoder, "wB") as other:
                for w in (worker, other, worker, other):
                    await w._claim_some()
                assert not named(other, "claimed", sid) and not other.tasks
            assert len(named(worker, "claimed", sid)) == 1
        return named(worker, "failed", sid)[0]

    with caplog.at_level(logging.ERROR, logger="streamvae.fleet"):
        failed = asyncio.run(main())
    assert "36x36" in failed["failed"]
    assert "stream cam-odd: run r cannot be encoded" in caplog.text
    progress = asyncio.run(kv_get(nats_server.url, "svae_progress", sid))
    assert progress["done"] and "36x36" in progress["failed"]


# -- item 5: image bombs ----


def _png_declaring(height: int, width: int) -> bytes:
    """A PNG whose header declares height x width, with a tiny (incomplete) image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(bytes(1 + 3 * min(width, 64)) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_an_image_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    import streamvae.fleet.messages as messages

    decoded = []
    real = messages.cv2.imdecode
    monkeypatch.setattr(
        messages.cv2, "imdecode", lambda *a: decoded.append(1) or real(*a), raising=True
    )
    _, headers = frame_item(synthetic_frame(0, 16, 16), 0, "r", "c")
    with pytest.raises(FrameMessageError, match="declares 16000x16000 in its image header"):
        decode_frame(headers, _png_declaring(16000, 16000), size=(16, 16))
    assert decoded == []
    jpeg = bytearray(frame_item(synthetic_frame(0, 16, 16), 0, "r", "c", "jpeg")[0])
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (16000).to_bytes(2, "big") * 2
    jpeg_headers = {**headers, "Svae-Codec": "jpeg"}
    with pytest.raises(FrameMessageError, match="declares 16000x16000 in its image header"):
        decode_frame(jpeg_headers, bytes(jpeg), size=(16, 16))
    assert decoded == []
    with pytest.raises(FrameMessageError, match="no valid header"):
        decode_frame(headers, b"\x89PNG", size=(16, 16))


def test_the_worker_decodes_frames_off_its_event_loop(nats_server, encoder, monkeypatch):
    import streamvae.fleet.worker as worker_module

    threads = []
    real = worker_module.decode_frame

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "decode_frame", recording)
    sid = "cam-bomb"
    images = [synthetic_frame(i, 16, 16) for i in range(5)]
    items = [frame_item(images[0], 0, "r", sid)]
    _, headers = frame_item(images[1], 1, "r", sid)
    items.append((_png_declaring(16000, 16000), {**headers, "Nats-Msg-Id": "bomb"}))
    items += [frame_item(images[i], i, "r", sid) for i in range(1, 5)]
    items.append((b"", end_headers(run="r", frames=5, stream_id=sid)))

    async def main():
        await publish(nats_server.url, sid, items)
        async with running_worker(nats_server.url, encoder) as worker:
            await until(lambda: named(worker, "ended", sid), "the stream ended")
        return threading.get_ident(), named(worker, "ended", sid)[0]

    loop_thread, ended = asyncio.run(main())
    assert ended["bad_frames"] == 1 and len(threads) == 6 and loop_thread not in threads
    received = asyncio.run(read_latents(nats_server.url, sid))
    assert_equal_latents([lat for _, lat in received], reference(encoder, images))


# -- item 6: a torn last record in the worker's file ----


def test_a_worker_restarted_onto_a_torn_file_repairs_it_and_resumes_exactly(
    nats_server, encoder, tmp_path, caplog
):
    from streamvae.io.filesink import read_latents as read_file

    sid, run = "cam-torn", "r"
    images = [synthetic_frame(i, 16, 16) for i in range(33)]
    path = tmp_path / "out" / sid / f"{run}.wA.latents"

    async def main():
        await publish(nats_server.url, sid, [frame_item(images[i], i, run, sid) for i in range(21)])
        options = {"output_dir": tmp_path / "out", "jetstream_latents": False}
        async with running_worker(nats_server.url, encoder, **options) as worker:
            await until(lambda: worker.stream_stats.get(sid, None) and
                        worker.stream_stats[sid].latents == 6, "latents 0..5")  # fmt: skip
        # A power cut in the middle of the last record:
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size - 10)
        rest = [frame_item(images[i], i, run, sid) for i in range(21, 33)]
        rest.append((b"", end_headers(run=run, frames=33, stream_id=sid)))
        await publish(nats_server.url, sid, rest, register=False)
        async with running_worker(nats_server.url, encoder, **options) as worker:
            await until(lambda: named(worker, "ended", sid), "the stream ended")

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert "repair: cutting off the incomplete record 5" in caplog.text
    assert_equal_latents(read_file(path), reference(encoder, images))


# -- item 7: frames dropped at ingest travel as a gap ----


def test_frames_dropped_at_ingest_travel_as_a_gap(nats_server, encoder):
    """A live source dropped the whole group 9..12 (as during a NATS outage): the ingest keeps
    the source's numbers, and the worker starts a new segment there with gap=True."""
    settings = NatsSettings.from_url(nats_server.url)
    numbers = [*range(9), *range(13, 21)]

    async def source():
        for n in numbers:
            yield Frame(synthetic_frame(n, 16, 16), 100.0 + n, number=n)

    async def main():
        await ingest(source(), settings, stream_id="cam-drop", codec="png", run="r")
        async with running_worker(nats_server.url, encoder) as worker:
            await until(lambda: named(worker, "ended", "cam-drop"), "the stream ended")
        return named(worker, "ended", "cam-drop")[0]

    ended = asyncio.run(main())
    assert ended["gaps"] == 1
    received = [lat for _, lat in asyncio.run(read_latents(nats_server.url, "cam-drop"))]
    assert [(lat.meta["run"], lat.index, lat.gap) for lat in received] == [
        ("r", 0, False), ("r", 1, False), ("r", 2, False), ("r~1", 0, True), ("r~1", 1, False)
    ]  # fmt: skip
    assert received[3].frames == range(0, 1) and received[3].timestamps == (113.0,)
    after = StreamEncoder(encoder)
    expected = []
    for n in range(13, 21):
        expected += after.push(synthetic_frame(n, 16, 16), timestamp=100.0 + n)
    assert_equal_latents(received[3:], expected)


# -- the worker's pool: many streams, a kill -9 ----


@pytest.mark.slow
def test_kill_9_of_a_worker_batching_8_streams_loses_and_duplicates_nothing(
    nats_server, encoder, tmp_path
):
    """wA (a process) steps 8 streams through its pool and is killed with kill -9 mid-stream;
    wB takes every stream over and batches them too: each stream's latents arrive once each,
    equal to a batched single-process run (and stream cam0's to its own StreamEncoder)."""
    from streamvae import StreamPool

    sids = [f"cam{k}" for k in range(8)]
    images = {sid: [synthetic_frame(7 * k + i, 16, 16) for i in range(9)] for k, sid in
              enumerate(sids)}  # fmt: skip
    a = FleetProcess(
        "wA",
        ["worker", "--nats", nats_server.url, "--capacity", "8", "--random-weights",
         "--config", "narrow8", "--seed", "0", "--worker-id", "wA", "--lease-ttl", str(LEASE_TTL),
         "--json", "--threads", "1"],
        tmp_path,
    ).start()  # fmt: skip

    async def main():
        for sid in sids:
            await publish(nats_server.url, sid, [frame_item(images[sid][i], i, "r", sid)
                                                  for i in range(5)])  # fmt: skip

        async def all_going():
            assert a.process.poll() is None, a.stderr_path.read_text()[-3000:]
            progress = [await kv_get(nats_server.url, "svae_progress", sid) for sid in sids]
            return all(p and p["last_index"] >= 1 and p["worker"] == "wA" for p in progress)

        await until(all_going, "wA has published latent 1 of every stream", 120)
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        for sid in sids:
            rest = [frame_item(images[sid][i], i, "r", sid) for i in range(5, 9)]
            rest.append((b"", end_headers(run="r", frames=9, stream_id=sid)))
            await publish(nats_server.url, sid, rest, register=False)
        async with running_worker(nats_server.url, encoder, "wB", capacity=8) as b:
            await until(lambda: all(named(b, "ended", sid) for sid in sids), "all ended", 120)
        return b

    try:
        b = asyncio.run(main())
    finally:
        a.stop()
    assert len(named(b, "takeover_done")) == 8
    assert b.slots is not None and b.slots.batched_frames > b.slots.ticks  # batches of > 1
    pool = StreamPool(encoder)
    expected: dict[str, list] = {sid: [] for sid in sids}
    for sid in sids:
        pool.add(sid)
    for i in range(9):
        out = pool.push({sid: images[sid][i] for sid in sids},
                        timestamps={sid: 100.0 + i for sid in sids})  # fmt: skip
        for sid, latents in out.items():
            expected[sid] += latents
    assert_equal_latents(expected["cam0"], reference(encoder, images["cam0"]))
    for sid in sids:
        received = asyncio.run(read_latents(nats_server.url, sid))
        keys = [(lat.meta["stream"], lat.meta["run"], lat.index) for _, lat in received]
        assert keys == [(sid, "r", i) for i in range(3)], (sid, keys)
        assert_equal_latents([lat for _, lat in received], expected[sid])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
