"""Ingest: a source's frames into JetStream, one subject per stream, retained for replays.

>>> from streamvae.fleet import NatsSettings, ingest
>>> async def main():                                                      # doctest: +SKIP
...     settings = NatsSettings.from_url("nats://127.0.0.1:4222")
...     async with open_source("rtsp://cam1.local/live", size="480x832") as source:
...         stats = await ingest(source, settings, stream_id="cam1", codec="jpeg")

Each frame goes to ``svae.frames.<stream-id>`` (see :mod:`streamvae.fleet.messages`), and the
subject keeps its last ``retain`` frames (at least the receptive field ``R`` plus 8, so a worker
taking the stream over can rebuild its state exactly; the default 256 also covers a lease TTL
plus a replay at 30 fps). The stream is registered in the ``svae_streams`` bucket with its run
id, size, codec and the stream sequence of the run's first frame; at the end of the source an
end message closes the run. A source that reconnects (a frame with ``gap``) starts a new run.

When NATS is away, a publish is retried with backoff until it is stored (the source meanwhile
drops whole groups if it is live, or waits if it is a file); ``Nats-Msg-Id`` makes a retry of a
frame that was in fact stored a no-op. Frames are numbered by their source's count (drops
included), so frames dropped meanwhile travel as a hole in the indices, which workers encode as
a gap.

**One ingest per stream id.** An ingest holds its stream id in the ``svae_ingests`` bucket (a
key that lapses :data:`INGEST_TTL` seconds after its holder stops renewing it). A second ingest
of a live stream id is refused (:class:`IngestRefused`) unless it takes the stream over
(``take_over=True``): the first one then stops with an error at its next renewal. A run id that
the stream already used (a restart with the same ``run``), a frame JetStream reports as a
duplicate of one stored before, and frames whose size the encoder refuses (not multiples of 8)
are refused too, before anything of them is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from streamvae.config import WAN21
from streamvae.fleet.broker import (
    NatsSettings,
    connect,
    ensure_frames_stream,
    open_bucket,
    retrying,
)
from streamvae.fleet.messages import CODECS, encode_frame, end_headers
from streamvae.fleet.names import (
    INGESTS_BUCKET,
    STREAMS_BUCKET,
    frames_subject,
    validate_fleet_id,
)
from streamvae.frames import SPATIAL_MULTIPLE, Frame
from streamvae.receptive import receptive_field

__all__ = [
    "DEFAULT_RETAIN",
    "INGEST_TTL",
    "IngestRefused",
    "IngestStats",
    "ingest",
    "minimum_retain",
]

log = logging.getLogger(__name__.rpartition(".")[0])  # one logger for the fleet: streamvae.fleet

DEFAULT_RETAIN = 256
INGEST_TTL = 6.0
"""Seconds a dead ingest keeps its stream id (``svae_ingests`` bucket TTL); renewed every third."""


class IngestRefused(ValueError):
    """The ingest cannot publish this stream as asked; the message says why and what to do."""


def minimum_retain() -> int:
    """``R + 8``: the fewest frames per subject a takeover can replay exactly from (Wan 2.1)."""
    return receptive_field(WAN21) + 8


@dataclass
class IngestStats:
    """What an ingest has published."""

    stream: str = ""
    runs: list[str] = field(default_factory=list)
    frames: int = 0
    bytes: int = 0
    retries: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    started: float = field(default_factory=time.time)
    elapsed: float = 0.0

    def summary(self) -> dict[str, object]:
        return asdict(self)


async def ingest(
    source: AsyncIterable[Frame],
    settings: NatsSettings,
    *,
    stream_id: str,
    codec: str = "jpeg",
    retain: int = DEFAULT_RETAIN,
    run: str | None = None,
    max_frames: int | None = None,
    jpeg_quality: int = 90,
    stats: IngestStats | None = None,
    take_over: bool = False,
) -> IngestStats:
    """Publish every frame of ``source`` to ``svae.frames.<stream_id>``; returns the counts."""
    validate_fleet_id(stream_id)
    if codec not in CODECS:
        raise ValueError(f"frame codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if retain < minimum_retain():
        raise ValueError(
            f"retain must be at least R + 8 = {minimum_retain()} frames per stream (a takeover "
            f"replays up to R + 3 frames), got {retain}"
        )
    stats = stats or IngestStats(stream=stream_id)
    stats.stream = stream_id
    nc = await connect(settings, name=f"streamvae-ingest-{stream_id}")
    holder: _Holder | None = None
    try:
        js = nc.jetstream(timeout=2.0)
        await retrying("creating the frames stream", lambda: ensure_frames_stream(js, retain))
        streams = await retrying(
            "opening the streams bucket", lambda: open_bucket(js, STREAMS_BUCKET)
        )
        holders = await retrying(
            "opening the ingests bucket", lambda: open_bucket(js, INGESTS_BUCKET, ttl=INGEST_TTL)
        )
        subject = frames_subject(stream_id)
        session = run or f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
        holder = await _Holder.claim(js, holders, stream_id, session, take_over=take_over)
        if run is not None:
            previous = await _registered_run(streams, stream_id)
            if previous is not None and (previous == run or previous.startswith(run + ".")):
                raise IngestRefused(
                    f"stream {stream_id} has had a run {previous!r} already: its workers took it "
                    f"as ended; give a new --run-id (or none, for a fresh one)"
                )
        current: str | None = None
        index = 0  # the next frame's index in the run (its source number, drops included)
        first_number = 0  # the source number of the run's first frame
        size: tuple[int, int] | None = None

        async def publish(payload: bytes, headers: dict[str, str]) -> int:
            attempts = 0

            async def once() -> int:
                nonlocal attempts
                attempts += 1
                holder.check()
                ack = await js.publish(subject, payload, headers=headers, timeout=2.0)
                if ack.duplicate and attempts == 1:  # not a retry of ours: someone else's
                    raise IngestRefused(
                        f"JetStream already holds {headers.get('Nats-Msg-Id')} (stream "
                        f"{stream_id}): run id {headers.get('Svae-Run')!r} was published before, "
                        "within the duplicate window; its workers would skip these frames. "
                        "Give a new --run-id (or none)"
                    )
                seq: int = ack.seq
                return seq

            seq = await retrying(f"publishing to {subject}", once)
            stats.retries += attempts - 1
            return seq

        async def end_run() -> None:
            if current is None:
                return
            await publish(b"", end_headers(run=current, frames=index, stream_id=stream_id))
            await register(current, state="ended")

        async def register(run_id: str, *, state: str, start_seq: int | None = None) -> None:
            entry = {
                "run": run_id,
                "size": f"{size[0]}x{size[1]}" if size else None,
                "codec": codec,
                "start_seq": start_seq if start_seq is not None else registered.get("start_seq"),
                "state": state,
                "frames": index,
                "time": time.time(),
            }
            registered.update(entry)
            await retrying(
                "registering the stream",
                lambda: streams.put(stream_id, json.dumps(entry).encode()),
            )

        registered: dict[str, object] = {}
        async for frame in source:
            if max_frames is not None and stats.frames >= max_frames:
                break
            image = np.asarray(frame.image)
            number = frame.number
            if current is None or frame.gap:
                _check_size(image, stream_id)
                await end_run()
                current = session if not stats.runs else f"{session}.{len(stats.runs)}"
                stats.runs.append(current)
                index = 0
                first_number = number or 0
                size = image.shape[:2]
            elif number is not None:
                # Frames the source dropped (whole groups) leave a hole the workers see.
                index = max(index, number - first_number)
            payload, headers = encode_frame(
                image,
                index=index,
                run=current,
                timestamp=frame.timestamp,
                codec=codec,
                stream_id=stream_id,
                jpeg_quality=jpeg_quality,
            )
            seq = await publish(payload, headers)
            if not registered.get("start_seq") or registered.get("run") != current:
                await register(current, state="live", start_seq=seq)
            stats.first_seq = seq if stats.first_seq is None else stats.first_seq
            stats.last_seq = seq
            stats.frames += 1
            stats.bytes += len(payload)
            index += 1
        await end_run()
    finally:
        stats.elapsed = time.time() - stats.started
        if holder is not None:
            await asyncio.shield(holder.release())
        await asyncio.shield(nc.close())
    return stats


def _check_size(image: np.ndarray, stream_id: str) -> None:
    """Refuse frames the encoder refuses, before anything of the run is published."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise IngestRefused(f"stream {stream_id}: frames are RGB [H, W, 3], got {image.shape}")
    height, width = image.shape[:2]
    if height % SPATIAL_MULTIPLE or width % SPATIAL_MULTIPLE or not height or not width:
        raise IngestRefused(
            f"stream {stream_id}: the source's frames are {height}x{width}; the encoder needs "
            f"height and width multiples of {SPATIAL_MULTIPLE}: pass --size HxW (resized) or "
            "--size HxW --resize crop"
        )


async def _registered_run(streams: Any, stream_id: str) -> str | None:
    try:
        entry = await streams.get(stream_id)
        value = json.loads(entry.value) if entry.value else None
    except (KeyNotFoundError, ValueError):
        return None
    run = value.get("run") if isinstance(value, dict) else None
    return run if isinstance(run, str) else None


class _Holder:
    """This ingest's hold on its stream id (a key in ``svae_ingests``, renewed in the background)."""

    def __init__(self, js: Any, kv: Any, stream_id: str, value: bytes, revision: int) -> None:
        self.js = js
        self.kv = kv
        self.stream_id = stream_id
        self.value = value
        self.revision = revision
        self.lost: str | None = None
        self.task = asyncio.ensure_future(self._renew())

    @classmethod
    async def claim(
        cls, js: Any, kv: Any, stream_id: str, session: str, *, take_over: bool
    ) -> _Holder:
        me = {
            "ingest": f"{socket.gethostname()}-{os.getpid()}",
            "run": session,
            "time": time.time(),
        }
        value = json.dumps(me).encode()
        try:
            revision = await retrying("holding the stream id", lambda: kv.create(stream_id, value))
        except KeyWrongLastSequenceError:
            try:
                other = json.loads((await kv.get(stream_id)).value)
            except Exception:
                other = {}
            who = f"{other.get('ingest', '?')}, run {other.get('run', '?')}"
            if not take_over:
                raise IngestRefused(
                    f"stream id {stream_id} is live: another ingest ({who}) publishes it. Stop "
                    f"that one (its hold lapses {INGEST_TTL:g} s after it stops), choose another "
                    "--stream-id, or pass --take-over to replace it"
                ) from None
            log.warning("stream %s: taking over from the ingest %s", stream_id, who)
            revision = await retrying("taking the stream id", lambda: kv.put(stream_id, value))
        return cls(js, kv, stream_id, value, revision)

    def check(self) -> None:
        if self.lost is not None:
            raise IngestRefused(self.lost)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(INGEST_TTL / 3)
            try:
                self.revision = await self.kv.update(self.stream_id, self.value, last=self.revision)
            except KeyWrongLastSequenceError:
                try:  # the key's last record: another ingest's value, or its delete marker
                    await self.js.get_last_msg(
                        f"KV_{INGESTS_BUCKET}", f"$KV.{INGESTS_BUCKET}.{self.stream_id}"
                    )
                    taken = True
                except NotFoundError:  # nothing: lapsed (an outage), and nobody took it
                    taken = False
                try:
                    if taken:
                        raise KeyWrongLastSequenceError
                    self.revision = await self.kv.create(self.stream_id, self.value)
                except KeyWrongLastSequenceError:
                    self.lost = (
                        f"stream id {self.stream_id} was taken over by another ingest "
                        "(--take-over); this one stops"
                    )
                    log.error("%s", self.lost)
                    return
            except Exception as exc:  # NATS away: try again at the next renewal
                log.info("stream %s: renewing the hold: %s", self.stream_id, type(exc).__name__)

    async def release(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        if self.lost is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.kv.delete(self.stream_id, last=self.revision), 2.0)
