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
frame that was in fact stored a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterable
from dataclasses import asdict, dataclass, field

import numpy as np

from streamvae.config import WAN21
from streamvae.fleet.broker import (
    NatsSettings,
    connect,
    ensure_frames_stream,
    open_bucket,
    retrying,
)
from streamvae.fleet.messages import CODECS, encode_frame, end_headers
from streamvae.fleet.names import STREAMS_BUCKET, frames_subject, validate_fleet_id
from streamvae.frames import Frame
from streamvae.receptive import receptive_field

__all__ = ["DEFAULT_RETAIN", "IngestStats", "ingest", "minimum_retain"]

log = logging.getLogger(__name__.rpartition(".")[0])  # one logger for the fleet: streamvae.fleet

DEFAULT_RETAIN = 256


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
    try:
        js = nc.jetstream(timeout=2.0)
        await retrying("creating the frames stream", lambda: ensure_frames_stream(js, retain))
        streams = await retrying(
            "opening the streams bucket", lambda: open_bucket(js, STREAMS_BUCKET)
        )
        subject = frames_subject(stream_id)
        session = run or f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
        current: str | None = None
        index = 0
        size: tuple[int, int] | None = None

        async def publish(payload: bytes, headers: dict[str, str]) -> int:
            attempts = 0

            async def once() -> int:
                nonlocal attempts
                attempts += 1
                ack = await js.publish(subject, payload, headers=headers, timeout=2.0)
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
            if current is None or frame.gap:
                await end_run()
                current = session if not stats.runs else f"{session}.{len(stats.runs)}"
                stats.runs.append(current)
                index = 0
                size = image.shape[:2]
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
            if index == 0:
                await register(current, state="live", start_seq=seq)
            stats.first_seq = seq if stats.first_seq is None else stats.first_seq
            stats.last_seq = seq
            stats.frames += 1
            stats.bytes += len(payload)
            index += 1
        await end_run()
    finally:
        stats.elapsed = time.time() - stats.started
        await asyncio.shield(nc.close())
    return stats
