"""The fleet on a real nats-server: real ingest and worker processes, a worker killed with
kill -9, planned moves, bad frames, an outage, credentials. Each test reports its figures on
stdout (run with -s to see them)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from fleet_fixtures import FleetProcess, NatsServer, fleet_env, read_latents

from streamvae import StreamEncoder, narrow
from streamvae.fleet.messages import decode_frame, is_end, latent_headers
from streamvae.fleet.names import LEASES_BUCKET, WORKERS_BUCKET
from streamvae.frames import Frame
from streamvae.weights import random_encoder

pytestmark = [pytest.mark.network]

LEASE_TTL = 2.0
SIZE = "16x16"
TOLERANCE = 1e-5


def worker_args(url: str, worker_id: str, *extra: str) -> list[str]:
    return [
        "worker", "--nats", url, "--capacity", "2", "--random-weights", "--config", "narrow8",
        "--seed", "0", "--worker-id", worker_id, "--lease-ttl", str(LEASE_TTL), "--json",
        "--threads", "1", *extra,
    ]  # fmt: skip


def ingest_args(url: str, stream_id: str, frames: int, fps: float, *extra: str) -> list[str]:
    return [
        "ingest", f"synthetic://moving?frames={frames}&fps={fps}&size={SIZE}", "--nats", url,
        "--stream-id", stream_id, "--frame-codec", "png", "--retain", "512", "--json", *extra,
    ]  # fmt: skip


async def _kv_get(url: str, bucket: str, key: str) -> dict | None:
    import nats

    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        try:
            return json.loads((await kv.get(key)).value)
        except Exception:
            return None
    finally:
        await nc.close()


def wait_progress(url: str, stream_id: str, at_least: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_progress = asyncio.run(_kv_get(url, "svae_progress", stream_id))
        if with_progress and with_progress.get("last_index", -1) >= at_least:
            return with_progress
        time.sleep(0.2)
    raise AssertionError(f"{stream_id}: progress did not reach latent {at_least} in {timeout} s")


def wait_for_kv(url: str, bucket: str, key: str, timeout: float) -> dict:
    """The JSON value of ``key`` in KV ``bucket`` once it exists (polled; a hung test ends at
    ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = asyncio.run(_kv_get(url, bucket, key))
        if value is not None:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{bucket}/{key} did not appear in {timeout} s")


async def _frames_of(url: str, stream_id: str) -> list:
    """The retained frame messages of the stream's (last) run, decoded, in order."""
    import nats

    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().subscribe(f"svae.frames.{stream_id}", ordered_consumer=True)
        frames = []
        while True:
            try:
                message = await sub.next_msg(timeout=2.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                return frames
            if is_end(message.headers):
                continue
            try:
                frames.append(decode_frame(message.headers, message.data))
            except ValueError:
                frames.append(None)
    finally:
        await nc.close()


def reference_latents(frames) -> dict:
    """One uninterrupted single-process run over the same frames and weights, by (segment,
    index): a jump in the frame indices (frames the ingest's source dropped, say during an
    outage) starts a new segment, as the workers do (gap=True, indices from 0 again)."""
    stream = StreamEncoder(random_encoder(narrow(8), seed=0))
    out = {}
    segment, expected = 0, None
    for frame in frames:
        gap = expected is not None and frame.index != expected
        segment += gap
        expected = frame.index + 1
        for latent in stream.push(Frame(frame.image, frame.timestamp, gap=gap)):
            out[(segment, latent.index)] = latent
    return out


def check_against_reference(received, reference) -> dict:
    """Every reference latent arrives exactly once per (stream, run, index), equal within 1e-5,
    in a message whose ``Nats-Msg-Id`` is ``<stream>:<run>:<index>`` (the header by which
    JetStream drops a latent published twice around a takeover): duplicates and losses are
    counted from what JetStream holds, and both must be zero."""
    keys = [(lat.meta["stream"], lat.meta["run"], lat.index) for _, lat in received]
    for (headers, _), (stream, run, index) in zip(received, keys, strict=True):
        assert headers.get("Nats-Msg-Id") == f"{stream}:{run}:{index}", headers
    duplicates = len(keys) - len(set(keys))
    by_key = {}
    for _, latent in received:
        run = latent.meta["run"]
        segment = int(run.rpartition("~")[2]) if "~" in run else 0
        by_key.setdefault((segment, latent.index), latent)
    lost = sorted(set(reference) - set(by_key))
    unexpected = sorted(set(by_key) - set(reference))
    assert duplicates == 0 and not lost and not unexpected, (duplicates, lost, unexpected)
    worst = 0.0
    for key, ref in reference.items():
        got = by_key[key]
        assert got.frames == ref.frames and got.timestamps == ref.timestamps
        assert got.gap == ref.gap
        worst = max(worst, float((got.data - ref.data).abs().max() / ref.data.abs().max()))
    assert worst <= TOLERANCE
    return {
        "latents": len(reference),
        "segments": 1 + max(segment for segment, _ in reference),
        "lost": len(lost),
        "duplicates_received": duplicates,
        "max_rel_err": worst,
    }


@pytest.fixture
def server(tmp_path):
    srv = NatsServer(tmp_path / "nats").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_takeover_after_kill_9_loses_no_latent(server, tmp_path):
    a = FleetProcess("wA", worker_args(server.url, "wA"), tmp_path).start()
    b = None
    ingest = None
    try:
        a.wait_event(lambda e: e["event"] == "worker_started", 120)
        ingest = FleetProcess("ingest", ingest_args(server.url, "cam1", 300, 25), tmp_path).start()
        a.wait_event(lambda e: e["event"] == "claimed", 60)
        b = FleetProcess("wB", worker_args(server.url, "wB"), tmp_path).start()
        b.wait_event(lambda e: e["event"] == "worker_started", 120)
        progress = wait_progress(server.url, "cam1", 33, 120)
        os.kill(a.pid, signal.SIGKILL)
        killed_at = time.time()
        a.wait(10)
        done = b.wait_event(lambda e: e["event"] == "takeover_done", 60)
        ended = b.wait_event(lambda e: e["event"] == "ended", 120)
        assert ingest.wait(60) == 0
    finally:
        for proc in (ingest, b, a):
            if proc is not None:
                proc.stop()
    frames = asyncio.run(_frames_of(server.url, "cam1"))
    received = asyncio.run(read_latents(server.url, "cam1"))
    figures = check_against_reference(received, reference_latents(frames))
    assert done["from_worker"] == "wA" and done["last_index"] >= progress["last_index"]
    assert done["first_latent"] == done["last_index"] + 1  # nothing skipped, nothing reset
    figures.update(
        lease_ttl_s=LEASE_TTL,
        retain_frames=512,
        kill_to_claim_s=round(done["claimed_at"] - killed_at, 3),
        replay_s=round(done["replay_done_at"] - done["claimed_at"], 3),
        kill_to_first_latent_s=round(done["first_latent_at"] - killed_at, 3),
        frames_replayed=done["frames_replayed"],
        replay_from_frame=done["replay_from_frame"],
        last_index_before_kill=done["last_index"],
        suppressed_by_b=ended["suppressed"],
        duplicates_dropped_by_broker=ended["duplicates"],
    )
    print("\nTAKEOVER", json.dumps(figures))
    assert figures["duplicates_received"] == 0
    assert done["frames_replayed"] >= 113


def test_planned_move_hands_over_at_a_group_boundary_without_duplicate(server, tmp_path):
    # Both workers run before the stream starts (a worker's start can take longer than the
    # stream on a loaded machine); the one that claims it moves it to the other.
    a = FleetProcess("wA", worker_args(server.url, "wA"), tmp_path).start()
    b = FleetProcess("wB", worker_args(server.url, "wB"), tmp_path).start()
    ingest = None
    try:
        a.wait_event(lambda e: e["event"] == "worker_started", 120)
        b.wait_event(lambda e: e["event"] == "worker_started", 120)
        ingest = FleetProcess("ingest", ingest_args(server.url, "cam2", 400, 25), tmp_path).start()
        progress = wait_progress(server.url, "cam2", 31, 120)
        if progress["worker"] == "wB":
            a, b = b, a
        move = FleetProcess(
            "move",
            ["move", "cam2", "--nats", server.url, "--to", b.name, "--json"],
            tmp_path,
        ).start()
        assert move.wait(60) == 0
        released = a.wait_event(lambda e: e["event"] == "released", 60)
        done = b.wait_event(lambda e: e["event"] == "takeover_done", 60)
        ended = b.wait_event(lambda e: e["event"] == "ended", 120)
        assert ingest.wait(60) == 0
    finally:
        for proc in (ingest, b, a):
            if proc is not None:
                proc.stop()
    frames = asyncio.run(_frames_of(server.url, "cam2"))
    received = asyncio.run(read_latents(server.url, "cam2"))
    figures = check_against_reference(received, reference_latents(frames))
    assert done["first_latent"] == done["last_index"] + 1
    assert ended["duplicates"] == 0 and figures["duplicates_received"] == 0
    assert released["latents"] == done["last_index"] + 1  # A published 0..L, B starts at L+1
    print(
        "\nMOVE",
        json.dumps(
            {
                **figures,
                "frames_replayed": done["frames_replayed"],
                "handover_at": done["last_index"],
            }
        ),
    )


async def _publish_frames(url: str, stream_id: str, items: list, pace: float = 0.0) -> str:
    """Publish (payload, headers) items as an ingest would, registering the stream first."""
    import nats

    from streamvae.fleet.broker import ensure_frames_stream, open_bucket

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_frames_stream(js, 512)
        streams = await open_bucket(js, "svae_streams")
        first = None
        for payload, headers in items:
            ack = await js.publish(f"svae.frames.{stream_id}", payload, headers=headers)
            if pace:
                await asyncio.sleep(pace)
            if first is None:
                first = ack.seq
                entry = {
                    "run": headers["Svae-Run"],
                    "size": SIZE,
                    "codec": "png",
                    "start_seq": first,
                    "state": "live",
                }
                await streams.put(stream_id, json.dumps(entry).encode())
        return headers["Svae-Run"]
    finally:
        await nc.close()


def test_bad_frames_are_refused_counted_logged_and_the_stream_goes_on_with_a_gap(server, tmp_path):
    import numpy as np

    from streamvae.fleet.messages import encode_frame, end_headers
    from streamvae.io.sources import synthetic_frame

    run = "r-bad"
    images = [synthetic_frame(i, 16, 16) for i in range(24)]

    def good(i):
        return encode_frame(
            images[i], index=i, run=run, timestamp=100.0 + i, codec="png", stream_id="camb"
        )

    items = [good(i) for i in range(9)]
    payload, headers = good(9)
    items.append((b"\x89PNG not really", headers))  # does not decode
    wrong = np.zeros((8, 16, 3), np.uint8)
    items.append(
        encode_frame(wrong, index=10, run=run, timestamp=110.0, codec="raw", stream_id="camb")
    )
    payload, headers = good(11)
    items.append((payload, {**headers, "Svae-Codec": "webp"}))  # unknown codec
    items += [good(i) for i in range(12, 24)]
    items.append((b"", end_headers(run=run, frames=24, stream_id="camb")))
    asyncio.run(_publish_frames(server.url, "camb", items))

    a = FleetProcess("wA", worker_args(server.url, "wA"), tmp_path).start()
    try:
        ended = a.wait_event(lambda e: e["event"] == "ended", 120)
    finally:
        a.stop()
    assert ended["bad_frames"] == 3 and ended["gaps"] == 1
    log = a.stderr_path.read_text()
    assert log.count("stream camb: refused frame message") == 3
    for reason in ("does not decode", "8x16", "unknown frame codec 'webp'"):
        assert reason in log
    received = asyncio.run(read_latents(server.url, "camb"))
    runs = [(lat.meta["run"], lat.index, lat.gap) for _, lat in received]
    # Frames 0..8 -> latents 0..2; frames 12..23 are a new segment: latents 0..2 again, the
    # first with gap=True, under the run label r-bad~1 (the de-dup key stays unique).
    assert runs == [(run, 0, False), (run, 1, False), (run, 2, False),
                    (f"{run}~1", 0, True), (f"{run}~1", 1, False), (f"{run}~1", 2, False)]  # fmt: skip
    stream = StreamEncoder(random_encoder(narrow(8), seed=0))
    expected = []
    for i in range(12, 24):
        expected += stream.push(images[i])
    assert len(expected) == 3
    for (_, got), ref in zip(received[3:], expected):
        assert float((got.data - ref.data).abs().max() / ref.data.abs().max()) <= TOLERANCE


def one_worker_interrupted(server, tmp_path, stream_id, at_latent, interrupt):
    """One worker and one ingest (200 frames at 25 frames/s) on stream ``stream_id``; once the
    stream's progress reaches latent ``at_latent``, ``interrupt(worker)`` runs; then both run
    to the end. Returns the worker, its ``ended`` event, the stream's frames and what
    :func:`check_against_reference` found (every latent once, exact)."""
    a = FleetProcess("wA", worker_args(server.url, "wA"), tmp_path).start()
    ingest = None
    try:
        a.wait_event(lambda e: e["event"] == "worker_started", 120)
        ingest = FleetProcess(
            "ingest", ingest_args(server.url, stream_id, 200, 25), tmp_path
        ).start()
        a.wait_event(lambda e: e["event"] == "claimed", 60)
        wait_progress(server.url, stream_id, at_latent, 120)
        interrupt(a)
        ended = a.wait_event(lambda e: e["event"] == "ended", 120)
        assert ingest.wait(60) == 0
    finally:
        for proc in (ingest, a):
            if proc is not None:
                proc.stop()
    frames = asyncio.run(_frames_of(server.url, stream_id))
    received = asyncio.run(read_latents(server.url, stream_id))
    return a, ended, frames, check_against_reference(received, reference_latents(frames))


def test_nats_outage_the_worker_keeps_its_state_and_goes_on(server, tmp_path):
    def outage(_worker):
        server.stop()  # the broker goes away for about a second (less than the lease TTL)
        time.sleep(1.0)
        server.start()

    a, ended, frames, figures = one_worker_interrupted(server, tmp_path, "camo", 12, outage)
    # The lease was never lost, re-created after expiring, or handed over; nothing replayed.
    events = [e["event"] for e in a.events()]
    assert events.count("claimed") == 1, events
    assert "lease_reclaimed" not in events and "lease_lost" not in events, events
    assert ended["takeovers"] == [] and ended["suppressed"] == 0
    assert "reconnected" in a.stderr_path.read_text()
    print("\nOUTAGE", json.dumps({**figures, "frames": len(frames)}))


async def _kv_delete(url: str, bucket: str, key: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await (await nc.jetstream().key_value(bucket)).delete(key)
    finally:
        await nc.close()


def test_a_lease_that_expired_under_its_worker_is_reclaimed_visibly(server, tmp_path):
    """What the outage test rules out, shown to be visible: a worker whose lease vanished (it
    expired during an outage longer than the TTL; here deleted) creates it again on its next
    renewal and says so with a ``lease_reclaimed`` event; the stream goes on exactly."""

    def lease_deleted(worker):
        asyncio.run(_kv_delete(server.url, LEASES_BUCKET, "caml"))
        worker.wait_event(lambda e: e["event"] == "lease_reclaimed" and e["stream"] == "caml", 30)
        assert wait_for_kv(server.url, LEASES_BUCKET, "caml", timeout=30)["worker"] == "wA"

    a, _, _, _ = one_worker_interrupted(server, tmp_path, "caml", 4, lease_deleted)
    events = [e["event"] for e in a.events()]
    assert events.count("claimed") == 1 and "lease_lost" not in events, events


def test_credentials_come_from_the_environment_or_a_file_and_are_never_shown(tmp_path):
    secret = "s3cret-Pa55"
    srv = NatsServer(
        tmp_path / "nats", config=f'authorization {{ user: fleet, password: "{secret}" }}\n'
    ).start()
    url = f"nats://fleet@127.0.0.1:{srv.port}"
    password_file = tmp_path / "password"
    password_file.write_text(secret + "\n")
    in_url = f"nats://fleet:{secret}@127.0.0.1:{srv.port}"
    procs = {
        "wA": FleetProcess(
            "wA", worker_args(url, "wA"), tmp_path, env=fleet_env(STREAMVAE_NATS_PASSWORD=secret)
        ),
        "ingest": FleetProcess(
            "ingest",
            ingest_args(url, "camc", 9, 50, "--nats-password-file", str(password_file)),
            tmp_path,
        ),
        "in_url": FleetProcess(
            "in_url",
            ["ingest", "synthetic://moving?frames=1", "--nats", in_url, "--stream-id", "x"],
            tmp_path,
        ),
        "wrong": FleetProcess(
            "wrong",
            ingest_args(url, "camw", 1, 50),
            tmp_path,
            env=fleet_env(STREAMVAE_NATS_PASSWORD="nope"),
        ),
    }
    try:
        a = procs["wA"].start()
        a.wait_event(lambda e: e["event"] == "worker_started", 120)
        assert procs["ingest"].start().wait(60) == 0
        a.wait_event(lambda e: e["event"] == "ended", 60)
        cmdline = Path(f"/proc/{a.pid}/cmdline").read_bytes().decode()
        assert procs["in_url"].start().wait(60) != 0
        assert procs["wrong"].start().wait(60) != 0
    finally:
        for proc in procs.values():
            if proc.process is not None:
                proc.stop()
        srv.stop()
    assert "refusing a password inside the NATS URL" in procs["in_url"].stderr_path.read_text()
    assert "refused the credentials" in procs["wrong"].stderr_path.read_text()
    for proc in procs.values():
        assert secret not in proc.stdout_path.read_text() + proc.stderr_path.read_text()
    assert secret not in cmdline


def test_a_new_stream_goes_to_the_least_loaded_worker(server, tmp_path):
    a = FleetProcess("wA", worker_args(server.url, "wA"), tmp_path).start()
    b = first = second = None
    try:
        a.wait_event(lambda e: e["event"] == "worker_started", 120)
        first = FleetProcess("ingest1", ingest_args(server.url, "cam1", 600, 25), tmp_path).start()
        a.wait_event(lambda e: e["event"] == "claimed" and e["stream"] == "cam1", 60)
        b = FleetProcess("wB", worker_args(server.url, "wB"), tmp_path).start()
        b.wait_event(lambda e: e["event"] == "worker_started", 120)
        # Claims go by the workers' load records: wait until B's is there (written when it
        # renews its leases) before the second stream starts.
        wait_for_kv(server.url, WORKERS_BUCKET, "wB", timeout=60)
        second = FleetProcess("ingest2", ingest_args(server.url, "cam2", 40, 25), tmp_path).start()
        b.wait_event(lambda e: e["event"] == "claimed" and e["stream"] == "cam2", 60)
        b.wait_event(lambda e: e["event"] == "ended" and e["stream"] == "cam2", 60)
        assert second.wait(60) == 0
    finally:
        for proc in (first, second, b, a):
            if proc is not None:
                proc.stop()
    assert not any(e["event"] == "claimed" and e["stream"] == "cam2" for e in a.events())
    received = asyncio.run(read_latents(server.url, "cam2"))
    assert [lat.index for _, lat in received] == list(range(10))


def test_takeover_within_a_later_segment_keeps_its_label_and_indices(server, tmp_path):
    """A bad frame made segment 1; the worker dies inside it; the taker continues segment 1."""
    from streamvae.fleet.messages import encode_frame, end_headers
    from streamvae.io.sources import synthetic_frame

    run = "r-seg"
    images = [synthetic_frame(i, 16, 16) for i in range(400)]

    def good(i):
        return encode_frame(
            images[i], index=i, run=run, timestamp=100.0 + i, codec="png", stream_id="cams"
        )

    a = FleetProcess("wA", worker_args(server.url, "wA"), tmp_path).start()
    b = None
    try:
        a.wait_event(lambda e: e["event"] == "worker_started", 120)
        b = FleetProcess("wB", worker_args(server.url, "wB"), tmp_path).start()
        b.wait_event(lambda e: e["event"] == "worker_started", 120)
        _, headers = good(5)
        items = [good(i) for i in range(5)] + [(b"broken", headers)]
        items += [good(i) for i in range(6, 400)]
        items.append((b"", end_headers(run=run, frames=400, stream_id="cams")))
        publisher = threading.Thread(
            target=asyncio.run, args=(_publish_frames(server.url, "cams", items, pace=0.02),)
        )
        publisher.start()
        deadline = time.monotonic() + 60
        while not any(e["event"] == "claimed" for p in (a, b) for e in p.events()):
            assert time.monotonic() < deadline, "nobody claimed the stream"
            time.sleep(0.1)
        owner, other = (a, b) if any(e["event"] == "claimed" for e in a.events()) else (b, a)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            progress = asyncio.run(_kv_get(server.url, "svae_progress", "cams"))
            if progress and progress["segment"] == 1 and progress["last_index"] >= 33:
                break
            time.sleep(0.1)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        done = other.wait_event(lambda e: e["event"] == "takeover_done", 60)
        other.wait_event(lambda e: e["event"] == "ended", 120)
        publisher.join(60)
    finally:
        for proc in (a, b):
            if proc is not None:
                proc.stop()
    assert done["first_latent"] == done["last_index"] + 1
    received = asyncio.run(read_latents(server.url, "cams"))
    labels = [(lat.meta["run"], lat.index) for _, lat in received]
    expected = [(run, 0), (run, 1)] + [(f"{run}~1", k) for k in range(1 + (394 - 1) // 4)]
    assert sorted(set(labels), key=labels.index) == expected
    stream = StreamEncoder(random_encoder(narrow(8), seed=0))
    reference = []
    for i in range(6, 400):
        reference += stream.push(images[i], timestamp=100.0 + i)
    got = {lat.index: lat for _, lat in received if lat.meta["run"] == f"{run}~1"}
    assert (
        max(float((got[r.index].data - r.data).abs().max() / r.data.abs().max()) for r in reference)
        <= TOLERANCE
    )
    assert got[0].gap and not any(lat.gap for i, lat in got.items() if i > 0)


def test_a_latent_published_twice_is_stored_once_by_its_msg_id(server):
    """The de-dup rule on the JetStream side: a second publish of (stream, run, index) with the
    headers the worker sends (``latent_headers``, which ``_StreamTask.publish`` uses) is a
    no-op."""
    import nats

    from streamvae import Latent
    from streamvae.fleet.broker import ensure_latents_stream
    from streamvae.io.wire import encode_latent

    async def main():
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_latents_stream(js)
            latent = Latent(torch.zeros(16, 2, 2), index=7, frames=range(25, 29))
            headers = latent_headers(stream_id="camd", run="r1", index=7)
            acks = []
            for ready in (1.0, 2.0):  # the copy differs only in ready_time
                payload = encode_latent(
                    Latent(latent.data, 7, latent.frames, ready_time=ready),
                    {"stream": "camd", "run": "r1"},
                )
                acks.append(await js.publish("svae.latents.camd", payload, headers=headers))
            return acks
        finally:
            await nc.close()

    first, second = asyncio.run(main())
    assert not first.duplicate and second.duplicate and second.seq == first.seq
    received = asyncio.run(read_latents(server.url, "camd"))
    assert [(lat.meta["run"], lat.index, lat.ready_time) for _, lat in received] == [("r1", 7, 1.0)]


@pytest.mark.network
def test_sigterm_ends_an_ingest_that_cannot_reach_nats(tmp_path):
    """An ingest whose NATS never answers retried its first connection forever and ignored
    SIGTERM (a supervisor could only SIGKILL it). Now a stop signal ends the source at once and
    gives up STOP_GRACE_S later, saying what was lost, with exit status 1."""
    from io_fixtures import free_port
    from streamvae.fleet.commands import STOP_GRACE_S

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    ingest = FleetProcess("ingest", ingest_args(url, "cam-unreachable", 1000, 25), tmp_path)
    ingest.start()
    try:
        deadline = time.monotonic() + 60
        while "Connect call failed" not in ingest.stderr_path.read_text():
            assert time.monotonic() < deadline, ingest.stderr_path.read_text()[-2000:]
            time.sleep(0.2)
        ingest.process.send_signal(signal.SIGTERM)
        code = ingest.process.wait(timeout=STOP_GRACE_S + 30)
    finally:
        if ingest.process.poll() is None:
            ingest.process.kill()
            ingest.process.wait()
    assert code == 1
    assert "stopped before every frame reached NATS" in ingest.stderr_path.read_text()
