"""A fleet worker: claims streams by lease, encodes them, and takes over the streams of dead workers.

>>> from streamvae import random_encoder, narrow
>>> from streamvae.fleet import FleetWorker, NatsSettings, WorkerOptions
>>> async def main():                                                      # doctest: +SKIP
...     worker = FleetWorker(
...         NatsSettings.from_url("nats://127.0.0.1:4222"),
...         random_encoder(narrow(8)),
...         WorkerOptions(capacity=4, worker_id="gpu0"),
...     )
...     await worker.run(stop_event)

**Ownership.** A stream belongs to the worker whose key it is in the ``svae_leases`` bucket.
The bucket's TTL is the lease TTL: the owner rewrites its key every ``lease_ttl / 3`` seconds
(compare-and-set on the key's revision), so a live owner never loses it and a dead one's key is
gone ``lease_ttl`` seconds after its last renewal. A worker claims a key with ``create`` (which
succeeds only while no one holds it), so a stream has one owner at a time; an owner whose
renewal fails because someone else holds the key stops that stream at once.

**Which worker claims.** Workers publish their capacity and load in ``svae_workers``. An
unowned stream is claimed at once by the least loaded live worker with room (load = owned /
capacity, then fewer owned, then the smaller worker id); the others claim it only if it is still
unowned ``claim_grace`` seconds later (the least loaded one may have just died).

**Progress and replay.** After every latent it publishes, the owner writes ``svae_progress``:
the run, the latent's index, and the stream sequence of the first frame of the group that
holds ``last frame - R + 1``. A worker taking the stream over (after ``kill -9``: when the lease
expires) reads the retained frames from there, rebuilds the state with
:meth:`streamvae.StreamEncoder.resume` (exact: a latent depends only on its last ``R`` frames),
does not publish the latents up to the recorded index again, and continues. So every latent
index arrives, in order, none is skipped and none restarts at 0.

**Duplicates.** A latent is published before its progress is written; a worker that dies
between the two leaves progress one latent behind, and the next owner publishes that latent
again, identical in data, index, frames and timestamps (only ``ready_time`` differs). On the
JetStream subject the broker drops it (``Nats-Msg-Id`` = ``<stream>:<run>:<index>``, two-minute
window; the worker counts it in ``duplicates``); an MQTT or file consumer drops a latent whose
``(stream, run, index)`` it has already seen.

**Planned moves** (SIGTERM, or a ``release`` request on ``svae.control.<worker>``): the owner
stops after a latent, at a group boundary, with its progress written, and deletes its lease; the
next owner (the requested one if it is alive) replays up to that latent without publishing it
again: no duplicate.

**Bad frames**: a message that does not decode, has the wrong size, an unknown codec, an image
header declaring another size (checked before decoding), an index more than
:data:`MAX_INDEX_JUMP` ahead, or a run already done, is refused, counted (``bad_frames``) and
logged with the stream id, and changes nothing. A jump in frame indices (frames lost, or dropped
at the ingest) starts a new segment at the next good frame (its first latent has ``gap=True``,
index 0, and the run label ``<run>~<segment>``).

**Runs done, streams failed**: the progress remembers the last :data:`DONE_RUNS` runs done, and
no worker enters them again. A stream the model cannot encode is marked failed in its progress
(logged) and not claimed again until its ingest starts a new run.

**Encoding**: all of a worker's streams go through one :class:`streamvae.StreamPool`
(:class:`PoolSlots`), one batch per tick of whatever frames are ready; each stream sees it as
a :class:`PooledSlot` (``resume``/``push``/``flush``/``reset``). ``WorkerOptions(batch=False)``
gives each stream its own :class:`streamvae.StreamEncoder` (:class:`EncoderSlot`) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import nats
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from streamvae.fleet.broker import (
    FleetBuckets,
    NatsSettings,
    connect,
    ensure_latents_stream,
    open_buckets,
    retrying,
)
from streamvae.fleet.messages import (
    FrameMessage,
    FrameMessageError,
    decode_frame,
    is_end,
    latent_headers,
)
from streamvae.fleet.names import (
    CONTROL_SUBJECT,
    FRAMES_STREAM,
    HEADER_RUN,
    frames_subject,
    latents_subject,
    validate_fleet_id,
)
from streamvae.frames import Frame
from streamvae.io.backoff import Backoff
from streamvae.io.filesink import FileSink
from streamvae.io.wire import encode_latent
from streamvae.model import WanEncoder
from streamvae.stream import Latent, Mode, StreamEncoder

__all__ = [
    "MAX_INDEX_JUMP",
    "EncoderSlot",
    "FleetWorker",
    "PoolSlots",
    "PooledSlot",
    "StreamStats",
    "WorkerOptions",
    "group_start",
]

log = logging.getLogger(__name__.rpartition(".")[0])  # one logger for the fleet: streamvae.fleet


MAX_INDEX_JUMP = 1 << 20
"""The most frames a frame message's index may skip (about 9.7 hours at 30 fps): a message
further ahead is refused, never trusted as the stream's new position."""


DONE_RUNS = 32
"""How many finished runs a stream's progress remembers (a worker never enters them again)."""


def group_start(frame: int, group: int = 4) -> int:
    """The first frame of the group that holds ``frame`` (0 for frame 0 and anything before).

    >>> [group_start(f) for f in (-3, 0, 1, 4, 5, 48)]
    [0, 0, 1, 1, 5, 45]
    """
    return 0 if frame <= 0 else group * ((frame - 1) // group) + 1


@dataclass
class WorkerOptions:
    """How a worker behaves (see the module docstring)."""

    capacity: int
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    lease_ttl: float = 3.0
    claim_grace: float | None = None  # default: lease_ttl
    mode: str = "frame"
    normalize: bool = True
    latent_dtype: str = "float32"
    labels: dict[str, str] = field(default_factory=dict)
    jetstream_latents: bool = True
    mqtt: Any = None  # streamvae.io.MqttSettings
    output_dir: Path | None = None
    fetch_batch: int = 16
    batch: bool = True  # every stream through one StreamPool (False: a StreamEncoder each)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 stream, got {self.capacity}")
        if not 0.3 <= self.lease_ttl <= 3600:
            raise ValueError(f"lease_ttl must be in 0.3..3600 s, got {self.lease_ttl}")
        validate_fleet_id(self.worker_id, "worker id")
        if not (self.jetstream_latents or self.mqtt or self.output_dir):
            raise ValueError("a worker needs somewhere to publish: JetStream, MQTT or a folder")

    @property
    def renew_every(self) -> float:
        return self.lease_ttl / 3

    @property
    def grace(self) -> float:
        return self.lease_ttl if self.claim_grace is None else self.claim_grace


@dataclass
class StreamStats:
    """What a worker did with one stream (frames read, latents published, replays...)."""

    stream: str
    frames: int = 0
    latents: int = 0
    suppressed: int = 0
    duplicates: int = 0
    bad_frames: int = 0
    gaps: int = 0
    takeovers: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    failed: str | None = None


class EncoderSlot:
    """One stream's encoder as the worker uses it: four coroutines and two properties.

    A :class:`PooledSlot` of the worker's :class:`PoolSlots` (every stream of a worker stepped
    through one :class:`streamvae.StreamPool`); this class, one :class:`StreamEncoder` run in a
    thread, is the reference the pooled slot is measured against.
    """

    def __init__(self, make: Callable[[], StreamEncoder]) -> None:
        self.encoder = make()

    @property
    def receptive_field(self) -> int:
        return self.encoder.receptive_field

    async def warmup(self, height: int, width: int) -> None:
        """Autotune and capture for ``height x width`` frames before the stream goes live."""
        await asyncio.to_thread(self.encoder.warmup, height, width)

    @property
    def at_group_boundary(self) -> bool:
        pushed = self.encoder.frames_pushed
        return pushed == 0 or (pushed - 1) % self.encoder.group_size == 0

    async def resume(self, frames: list[FrameMessage], first_index: int) -> list[Latent]:
        images = [f.image for f in frames]
        stamps = [f.timestamp for f in frames]
        return await asyncio.to_thread(
            self.encoder.resume, images, first_index=first_index, timestamps=stamps
        )

    async def push(self, frame: FrameMessage, *, gap: bool = False) -> list[Latent]:
        return await asyncio.to_thread(
            self.encoder.push, Frame(frame.image, frame.timestamp, gap=gap)
        )

    async def flush(self) -> list[Latent]:
        return await asyncio.to_thread(self.encoder.flush)

    async def reset(self) -> None:
        await asyncio.to_thread(self.encoder.reset)

    async def close(self) -> None:
        pass


class PoolSlots:
    """Every stream of a worker in one :class:`streamvae.StreamPool`, stepped as batches.

    Each owned stream gets a :class:`PooledSlot`. A slot's ``push`` queues its frame and waits;
    one tick at a time, the frames queued meanwhile (at most one per stream: a stream awaits its
    push before the next) go to the pool as one :meth:`StreamPool.push`, in the pool's own
    thread, so the streams are batched without any waiting for stragglers. Everything else
    (``resume``, ``flush``, ``reset``, adding and removing streams) runs in that same thread, in
    the order asked, so the pool has one caller. A tick the pool refuses (a bad frame, a model
    error) is taken apart: the streams whose frame was used keep their latents, the others are
    pushed one by one, so an error reaches only the stream it belongs to.
    """

    def __init__(self, encoder: WanEncoder, *, mode: str, normalize: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from streamvae.pool import StreamPool

        self.pool: StreamPool[Latent] = StreamPool(
            encoder, mode=cast(Mode, mode), normalize=normalize
        )
        self.group_size = 4
        self.receptive_field = StreamEncoder(encoder).receptive_field
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="streamvae-pool")
        self._queued: dict[str, tuple[Frame, asyncio.Future[list[Latent]]]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._serial = 0
        self.ticks = 0
        self.batched_frames = 0

    async def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in the pool's thread, after everything asked before."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: function(*args, **kwargs))

    async def slot(self, stream_id: str) -> PooledSlot:
        self._serial += 1
        key = f"{stream_id}#{self._serial}"  # a stream claimed again never meets its old slot
        await self.call(self.pool.add, key)
        return PooledSlot(self, key)

    def queue(self, key: str, frame: Frame) -> asyncio.Future[list[Latent]]:
        future: asyncio.Future[list[Latent]] = asyncio.get_running_loop().create_future()
        self._queued[key] = (frame, future)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick_while_queued())
        return future

    def unqueue(self, key: str) -> None:
        self._queued.pop(key, None)

    async def _tick_while_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, {}
            frames = {key: frame for key, (frame, _) in batch.items()}
            try:
                results = await self.call(self._tick, frames)
            except BaseException as exc:  # cancelled: nobody waits for these any more
                for _, future in batch.values():
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError())
                raise
            self.ticks += 1
            self.batched_frames += len(frames)
            for key, (_, future) in batch.items():
                if future.done():
                    continue
                outcome = results[key]
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _tick(self, frames: dict[str, Frame]) -> dict[str, list[Latent] | BaseException]:
        """One :meth:`StreamPool.push` (in the pool's thread); a refused tick one by one."""
        from streamvae.pool import PoolStepError

        out: dict[str, list[Latent] | BaseException] = {}
        try:
            return dict(self.pool.push(frames))
        except PoolStepError as exc:
            out.update(exc.latents)
            for key in exc.broken:
                out[key] = exc
            again = [key for key in frames if key not in out]
        except Exception:  # a refused frame: no stream advanced
            again = list(frames)
        for key in again:
            try:
                out[key] = self.pool.push({key: frames[key]})[key]
            except Exception as exc:
                out[key] = exc
        return out

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(BaseException):
                await self._ticker
        self._thread.shutdown(wait=True)


class PooledSlot:
    """One stream of a :class:`PoolSlots`: :class:`EncoderSlot`'s calls, batched with the rest."""

    def __init__(self, slots: PoolSlots, key: str) -> None:
        self.slots = slots
        self.key = key
        self.receptive_field = slots.receptive_field
        self._frames = 0

    @property
    def at_group_boundary(self) -> bool:
        return self._frames == 0 or (self._frames - 1) % self.slots.group_size == 0

    async def resume(self, frames: list[FrameMessage], first_index: int) -> list[Latent]:
        pool, key = self.slots.pool, self.key
        height, width = frames[0].image.shape[:2]

        def resume() -> list[Latent]:
            pool.remove(key, flush=False)
            pool.add(key, size=(height, width))
            # The pool's streams are StreamEncoders on a slot of its bank; a replay runs on
            # that one stream (StreamPool has no resume of its own).
            stream: StreamEncoder = pool._get(key)
            return stream.resume(
                [f.image for f in frames],
                first_index=first_index,
                timestamps=[f.timestamp for f in frames],
            )

        latents: list[Latent] = await self.slots.call(resume)
        self._frames = first_index + len(frames)
        return latents

    async def push(self, frame: FrameMessage, *, gap: bool = False) -> list[Latent]:
        future = self.slots.queue(self.key, Frame(frame.image, frame.timestamp, gap=gap))
        try:
            latents = await asyncio.shield(future)
        except asyncio.CancelledError:
            self.slots.unqueue(self.key)
            raise
        self._frames = 1 if gap else self._frames + 1
        return latents

    async def flush(self) -> list[Latent]:
        pool, key = self.slots.pool, self.key

        def flush() -> list[Latent]:
            tail = pool.remove(key)
            pool.add(key)
            return tail

        latents: list[Latent] = await self.slots.call(flush)
        self._frames = 0
        return latents

    async def reset(self) -> None:
        await self.slots.call(self.slots.pool.reset, self.key)
        self._frames = 0

    async def warmup(self, height: int, width: int) -> None:
        """Autotune and capture for ``height x width`` frames before the stream goes live."""
        await self.slots.call(self.slots.pool.warmup, (height, width))

    async def close(self) -> None:
        pool, key = self.slots.pool, self.key

        def remove() -> None:
            if key in pool:
                pool.remove(key, flush=False)

        await self.slots.call(remove)


class _StreamTask:
    """One owned stream: read its frames from JetStream, encode, publish, record progress."""

    def __init__(self, worker: FleetWorker, stream_id: str, claimed_at: float) -> None:
        self.worker = worker
        self.sid = stream_id
        self.claimed_at = claimed_at
        self.slot: EncoderSlot | PooledSlot = worker.slots_placeholder
        self.r = worker.receptive_field
        self.stats = worker.stream_stats.setdefault(stream_id, StreamStats(stream_id))
        self.release_requested = False
        self.prefer: str | None = None
        self.lease_revision = 0
        # Where we are: run, segment (a new one after each gap), the next frame index.
        self.run: str | None = None
        self.segment = 0
        self.segment_start = 0
        self.segment_seq = 0
        self.expected = 0
        self.size: tuple[int, int] | None = None
        self.gap_next = False  # the next good frame starts a new segment
        self.push_gap = False  # the next push is a segment's first frame (gap=True)
        self.replay: list[FrameMessage] | None = None
        self.replay_first = 0
        self.suppress_upto = -1
        self.replay_until = -1  # frames up to this index were encoded by the previous owner
        self.takeover: dict[str, Any] | None = None
        self.seqs: OrderedDict[int, int] = OrderedDict()
        self.last_seq = 0
        self.sinks: dict[str, Any] = {}
        self.file_last: dict[str, int] = {}  # per file sink: the last index the file holds
        self.progress: dict[str, Any] | None = None
        self.left_runs: set[str] = set()  # runs this stream has ended or left: never again

    @property
    def run_label(self) -> str:
        assert self.run is not None
        return self.run if self.segment == 0 else f"{self.run}~{self.segment}"

    # -- planning ----

    async def plan(self) -> int | None:
        """Read the registry and the progress; the stream sequence to read from (None: done)."""
        buckets = self.worker.buckets
        registry = await _get_json(buckets.streams, self.sid)
        progress = self.progress = await _get_json(buckets.progress, self.sid)
        if registry is None or registry.get("start_seq") is None:
            return None
        self.size = _parse_size(registry.get("size"))
        if progress is not None:
            # Runs already done (the newest DONE_RUNS) are never entered again, so claims of
            # a stream whose runs are interleaved (two ingests) end once each run is done.
            self.left_runs.update(str(r) for r in progress.get("done_runs", ()))
            if progress.get("done") and progress.get("run"):
                self.left_runs.add(str(progress["run"]))
        if progress is not None and progress.get("run") == registry["run"]:
            if progress.get("done"):
                return None
            self.run = progress["run"]
            self.segment = int(progress["segment"])
            self.segment_start = int(progress["segment_start"])
            self.segment_seq = int(progress["segment_seq"])
            last = int(progress["last_index"])
            self.takeover = {
                "stream": self.sid,
                "from_worker": progress.get("worker"),
                "last_index": last,
                "claimed_at": self.claimed_at,
                "frames_replayed": 0,
            }
            if last < 0:
                self.expected = self.segment_start
                self.push_gap = self.segment > 0
                return self.segment_seq
            first = group_start(4 * last - self.r + 1)
            self.suppress_upto = last
            self.replay_until = self.segment_start + 4 * last
            self.expected = self.segment_start + first
            self.takeover["replay_from_frame"] = self.expected
            if first > 0:
                self.replay, self.replay_first = [], first
            else:
                self.push_gap = self.segment > 0
            return int(progress["replay_seq"])
        self.run = registry["run"]
        self.segment_seq = int(registry["start_seq"])
        return self.segment_seq

    # -- the loop ----

    async def run_stream(self) -> str:
        start = await self.plan()
        if start is None:
            return "ended"
        self.slot = await self.worker.new_slot(self.sid)
        if self.size is not None and self.worker.encoder.device.type == "cuda":
            await self.slot.warmup(*self.size)  # autotuning and graph capture before it goes live
        if self.takeover is not None:
            self.worker.event("takeover_started", **self.takeover, start_seq=start)
        js = self.worker.js
        subject = frames_subject(self.sid)
        backoff = Backoff(initial=0.1, maximum=2.0)
        sub = await self._subscribe(js, subject, start)
        try:
            while True:
                if self.release_requested and self.replay is None and self.slot.at_group_boundary:
                    return "released"
                try:
                    messages = await sub.fetch(
                        self.worker.options.fetch_batch, timeout=self.worker.options.renew_every
                    )
                except nats.errors.TimeoutError:
                    continue
                except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
                    delay = backoff.next_delay()
                    log.warning(
                        "stream %s: reading frames failed (%s); again from sequence %d in %.1f s",
                        self.sid,
                        type(exc).__name__,
                        self.last_seq + 1,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = await self._subscribe(js, subject, self.last_seq + 1)
                    continue
                backoff.reset()
                for message in messages:
                    seq = message.metadata.sequence.stream
                    if seq <= self.last_seq:
                        continue
                    self.last_seq = seq
                    if await self.handle(message, seq):
                        return "ended"
                    if (
                        self.release_requested
                        and self.replay is None
                        and self.slot.at_group_boundary
                    ):
                        return "released"
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            for sink in self.sinks.values():
                with contextlib.suppress(Exception):
                    await sink.aclose()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.slot.close())

    async def _subscribe(self, js: Any, subject: str, start: int) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start),
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            filter_subject=subject,
        )
        return await retrying(
            f"stream {self.sid}: subscribing",
            lambda: js.pull_subscribe(subject, stream=FRAMES_STREAM, config=config),
        )

    async def handle(self, message: Any, seq: int) -> bool:
        """One frame message; True when the run has ended."""
        headers = message.headers or {}
        run = headers.get(HEADER_RUN)
        if is_end(headers):
            if run == self.run:
                for latent in await self.slot.flush():
                    await self.publish(latent)
                await self.write_progress(done=True)
                self.stats.ended = True
                return True
            return False
        # A refused message changes nothing: the run, the next index expected and the state
        # stay as they were. If it held a real frame, the next good frame's index shows the hole.
        new_run = run != self.run
        try:
            frame = await asyncio.to_thread(  # off the event loop: leases keep being renewed
                decode_frame, headers, message.data, size=None if new_run else self.size
            )
            if frame.run in self.left_runs:
                raise FrameMessageError(f"frame {frame.index} of run {frame.run}, which has ended")
            base = 0 if new_run else self.expected
            if frame.index > base + MAX_INDEX_JUMP:
                raise FrameMessageError(
                    f"frame index {frame.index} is more than {MAX_INDEX_JUMP} frames ahead of "
                    f"frame {base}, the next expected; not trusted"
                )
        except FrameMessageError as exc:
            self.stats.bad_frames += 1
            log.warning("stream %s: refused frame message (sequence %d): %s", self.sid, seq, exc)
            return False
        if new_run:
            await self.new_run(frame.run, seq)
        if self.size is None:
            self.size = frame.image.shape[:2]
        if frame.index < self.expected:
            return False
        if frame.index > self.expected:
            log.warning(
                "stream %s: frames %d..%d are missing; continuing as a new segment",
                self.sid,
                self.expected,
                frame.index - 1,
            )
            self.gap_next = True
        if self.gap_next:
            await self.new_segment(frame.index, seq)
        gap, self.push_gap = self.push_gap, False
        self.expected = frame.index + 1
        self.stats.frames += 1
        self.seqs[frame.index] = seq
        while len(self.seqs) > self.r + 16:
            self.seqs.popitem(last=False)
        if self.takeover is not None and frame.index <= self.replay_until:
            self.takeover["frames_replayed"] += 1
        if self.replay is not None:
            self.replay.append(frame)
            if len(self.replay) < self.r:
                return False
            frames, self.replay = self.replay, None
            latents = await self.slot.resume(frames, self.replay_first)
            if self.takeover is not None:
                self.takeover["replay_done_at"] = time.time()
        else:
            latents = await self.slot.push(frame, gap=gap)
        for latent in latents:
            await self.publish(latent)
        return False

    async def new_run(self, run: str, seq: int) -> None:
        if self.run is not None:
            self.left_runs.add(self.run)
        self.run = run
        self.size = None
        self.segment = 0
        self.segment_start = 0
        self.segment_seq = seq
        self.expected = 0
        self.replay = None
        self.suppress_upto = -1
        self.gap_next = False
        self.push_gap = False
        await self.slot.reset()
        self.worker.event("run_started", stream=self.sid, run=run)

    async def new_segment(self, index: int, seq: int) -> None:
        self.segment += 1
        self.segment_start = index
        self.segment_seq = seq
        self.replay = None
        self.suppress_upto = -1
        self.gap_next = False
        self.push_gap = True
        self.stats.gaps += 1
        await self.slot.reset()

    # -- publishing ----

    async def publish(self, latent: Latent) -> None:
        worker = self.worker
        label = self.run_label
        if latent.index <= self.suppress_upto:
            self.stats.suppressed += 1
            # Published before; a file of ours that lost it (a torn last record) gets it back.
            for sink in self._sinks(label):
                if isinstance(sink, FileSink):
                    await self._send_file(sink, latent)
            return
        labels = {**worker.options.labels, "stream": self.sid, "run": label}
        if worker.options.jetstream_latents:
            payload = encode_latent(latent, labels, dtype=worker.options.latent_dtype)
            headers = latent_headers(stream_id=self.sid, run=label, index=latent.index)
            subject = latents_subject(self.sid)
            ack = await retrying(
                f"stream {self.sid}: publishing latent {latent.index}",
                lambda: worker.js.publish(subject, payload, headers=headers, timeout=2.0),
            )
            if ack.duplicate:
                self.stats.duplicates += 1
        for sink in self._sinks(label):
            if isinstance(sink, FileSink):
                await self._send_file(sink, latent)
            else:
                await sink.send(latent)
        self.stats.latents += 1
        if self.takeover is not None and "first_latent_at" not in self.takeover:
            self.takeover["first_latent_at"] = time.time()
            self.takeover["first_latent"] = latent.index
            self.stats.takeovers.append(self.takeover)
            worker.event("takeover_done", **self.takeover)
        await self.write_progress(last=latent)

    def _sinks(self, label: str) -> list[Any]:
        options = self.worker.options
        sinks = []
        if options.mqtt is not None:
            sink = self.sinks.get("mqtt")
            if sink is None:
                from streamvae.io.mqtt import MqttSink

                sink = self.sinks["mqtt"] = MqttSink(
                    options.mqtt,
                    stream_id=self.sid,
                    labels=options.labels,
                    dtype=options.latent_dtype,
                    run=label,
                )
                sink.start()
            sink.run = label
            sinks.append(sink)
        if options.output_dir is not None:
            key = f"file:{label}"
            if key not in self.sinks:
                folder = options.output_dir / self.sid
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{label}.{options.worker_id}.latents"
                self.sinks[key] = self._open_file(path, label)
            sinks.append(self.sinks[key])
        return sinks

    def _open_file(self, path: Path, label: str) -> FileSink:
        """This worker's file of the run: a new one, or the one it wrote before a restart,
        continued after its last complete latent (a torn last record is cut off, logged)."""
        from streamvae.io.filesink import iter_latents

        options = self.worker.options
        last = -1
        if path.exists():
            for latent in iter_latents(path):  # a torn tail: a warning, then it stops
                last = latent.index
        sink = FileSink(
            path,
            labels={**options.labels, "stream": self.sid, "run": label},
            dtype=options.latent_dtype,
            append=path.exists(),
            repair=True,
        )
        self.file_last[str(path)] = last
        if last >= 0:
            log.info("stream %s: %s holds latents up to %d; continuing it", self.sid, path, last)
        return sink

    async def _send_file(self, sink: FileSink, latent: Latent) -> None:
        """Each index once, in order: what the file already holds is not written again."""
        key = str(sink.path)
        if latent.index <= self.file_last.get(key, -1):
            return
        if latent.index > self.file_last.get(key, -1) + 1 and self.file_last.get(key, -1) >= 0:
            log.warning(
                "stream %s: %s ends at latent %d, the next one here is %d: a hole in the file",
                self.sid,
                sink.path,
                self.file_last[key],
                latent.index,
            )
        await sink.send(latent)
        self.file_last[key] = latent.index

    async def write_progress(
        self, *, last: Latent | None = None, done: bool = False, failed: str | None = None
    ) -> None:
        entry = dict(self.progress or {})
        done_runs = [str(r) for r in entry.get("done_runs", ())]
        if done and self.run is not None and self.run not in done_runs:
            done_runs = [*done_runs, self.run][-DONE_RUNS:]
        if last is not None or entry.get("run") != self.run:
            index = -1 if last is None else last.index
            first = 0 if index < 0 else group_start(4 * index - self.r + 1)
            frame = self.segment_start + first
            entry = {
                "run": self.run,
                "segment": self.segment,
                "segment_start": self.segment_start,
                "segment_seq": self.segment_seq,
                "last_index": index,
                "last_frame": None if last is None else self.segment_start + last.frames.stop - 1,
                "replay_seq": self.seqs.get(frame, self.segment_seq),
            }
        entry.update(
            worker=self.worker.options.worker_id, time=time.time(), done=done, done_runs=done_runs
        )
        if failed is not None:
            entry["failed"] = failed
        if self.prefer:
            entry["prefer"] = self.prefer
        self.progress = entry
        payload = json.dumps(entry).encode()
        await retrying(
            f"stream {self.sid}: writing progress",
            lambda: self.worker.buckets.progress.put(self.sid, payload),
        )


class FleetWorker:
    """Claims up to ``capacity`` streams, encodes them and publishes their latents (see above)."""

    def __init__(
        self,
        settings: NatsSettings,
        encoder: WanEncoder,
        options: WorkerOptions,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.options = options
        self.on_event = on_event
        self.stream_stats: dict[str, StreamStats] = {}
        self.tasks: dict[str, tuple[_StreamTask, asyncio.Task[str]]] = {}
        self.unowned_since: dict[str, float] = {}
        self.cooldown: dict[str, float] = {}
        self.nc: Any = None
        self.js: Any = None
        self.buckets: FleetBuckets = None  # type: ignore[assignment]
        self._stopping = False
        self.receptive_field = StreamEncoder(encoder).receptive_field
        self.slots: PoolSlots | None = None
        self.slots_placeholder = EncoderSlot(self.make_stream)  # until a task gets its own
        self.claimed_at_revision: dict[str, int] = {}  # the registry entry a claim started from
        self.ended_at_revision: dict[str, int] = {}  # ... and the same after it ended

    def make_stream(self) -> StreamEncoder:
        return StreamEncoder(self.encoder, mode=self.options.mode, normalize=self.options.normalize)  # type: ignore[arg-type]

    async def new_slot(self, stream_id: str) -> EncoderSlot | PooledSlot:
        """A stream's encoder: a slot of the worker's pool (or its own StreamEncoder)."""
        if not self.options.batch:
            return EncoderSlot(self.make_stream)
        if self.slots is None:
            self.slots = PoolSlots(
                self.encoder, mode=self.options.mode, normalize=self.options.normalize
            )
        return await self.slots.slot(stream_id)

    def event(self, name: str, **fields: Any) -> None:
        record = {"event": name, "worker": self.options.worker_id, "time": time.time(), **fields}
        log.info("%s", json.dumps(record))
        if self.on_event is not None:
            self.on_event(record)

    def summary(self) -> dict[str, Any]:
        return {
            "worker": self.options.worker_id,
            "streams": {sid: asdict(stats) for sid, stats in self.stream_stats.items()},
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; then hand every stream over at a group boundary."""
        self.nc = await connect(self.settings, name=f"streamvae-worker-{self.options.worker_id}")
        try:
            self.js = self.nc.jetstream(timeout=2.0)
            if self.options.jetstream_latents:
                await retrying(
                    "creating the latents stream", lambda: ensure_latents_stream(self.js)
                )
            self.buckets = await retrying(
                "opening the fleet's buckets",
                lambda: open_buckets(self.js, lease_ttl=self.options.lease_ttl),
            )
            control = await self.nc.subscribe(
                CONTROL_SUBJECT.format(worker=self.options.worker_id), cb=self._on_control
            )
            self.event("worker_started", capacity=self.options.capacity)
            loops = [
                asyncio.ensure_future(self._renew_loop()),
                asyncio.ensure_future(self._claim_loop()),
            ]
            try:
                await stop.wait()
            finally:
                self._stopping = True
                await self._release_all()
                for loop in loops:
                    loop.cancel()
                for loop in loops:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await loop
                with contextlib.suppress(Exception):
                    await control.unsubscribe()
                with contextlib.suppress(Exception):
                    await self.buckets.workers.delete(self.options.worker_id)
                if self.slots is not None:
                    await self.slots.close()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)

    # -- leases ----

    async def _renew_loop(self) -> None:
        while True:
            await self._safely("renewing leases", self._renew_all)
            await asyncio.sleep(self.options.renew_every)

    async def _safely(self, what: str, call: Callable[[], Any]) -> None:
        try:
            await call()
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
            log.info("%s: %s (NATS away?); trying again", what, type(exc).__name__)

    def _lease_value(self) -> bytes:
        return json.dumps({"worker": self.options.worker_id, "time": time.time()}).encode()

    async def _renew_all(self) -> None:
        await self.buckets.workers.put(
            self.options.worker_id,
            json.dumps(
                {
                    "capacity": self.options.capacity,
                    "owned": len(self.tasks),
                    "time": time.time(),
                }
            ).encode(),
        )
        for sid, (task, future) in list(self.tasks.items()):
            if future.done():
                continue
            try:
                task.lease_revision = await self.buckets.leases.update(
                    sid, self._lease_value(), last=task.lease_revision
                )
                continue
            except KeyWrongLastSequenceError:
                pass
            holder = await _get_json(self.buckets.leases, sid)
            if holder is None:  # it expired (an outage longer than the TTL) and nobody took it
                try:
                    task.lease_revision = await self.buckets.leases.create(sid, self._lease_value())
                    log.warning("stream %s: lease had expired; claimed it again", sid)
                    self.event("lease_reclaimed", stream=sid)
                    continue
                except KeyWrongLastSequenceError:
                    holder = await _get_json(self.buckets.leases, sid)
            log.warning(
                "stream %s: lease now held by %s; stopping this copy",
                sid,
                holder.get("worker") if holder else "?",
            )
            self.event("lease_lost", stream=sid, holder=holder.get("worker") if holder else None)
            future.cancel()

    async def _claim_loop(self) -> None:
        while not self._stopping:
            await self._safely("looking for streams", self._claim_some)
            await asyncio.sleep(self.options.renew_every)

    async def _claim_some(self) -> None:
        if self._stopping:
            return
        for sid, (_, future) in list(self.tasks.items()):
            if future.done():
                del self.tasks[sid]
        if len(self.tasks) >= self.options.capacity:
            return
        try:
            streams = await self.buckets.streams.keys()
        except NoKeysError:
            return
        now = time.time()
        for sid in sorted(streams):
            if sid in self.tasks or len(self.tasks) >= self.options.capacity:
                continue
            if self.cooldown.get(sid, 0) > now:
                continue
            registry, revision = await _get_entry(self.buckets.streams, sid)
            if self.ended_at_revision.get(sid) == revision:
                continue  # this worker ended it and its ingest has published nothing new since
            progress = await _get_json(self.buckets.progress, sid)
            if registry is None or (
                progress is not None
                and progress.get("done")
                and progress.get("run") == registry.get("run")
            ):
                continue
            if await _get_json(self.buckets.leases, sid) is not None:
                self.unowned_since.pop(sid, None)
                continue
            first_seen = self.unowned_since.setdefault(sid, now)
            waited = now - first_seen
            if waited < self.options.grace and not await self._am_first_choice(progress):
                continue
            try:
                lease = await self.buckets.leases.create(sid, self._lease_value())
            except KeyWrongLastSequenceError:
                continue
            self.unowned_since.pop(sid, None)
            self.claimed_at_revision[sid] = revision
            self._start(sid, lease)

    async def _am_first_choice(self, progress: dict[str, Any] | None) -> bool:
        """Whether this worker is the one to claim now: the preferred one of a planned move,
        else the least loaded live worker with room."""
        live: dict[str, dict[str, Any]] = {}
        try:
            for wid in await self.buckets.workers.keys():
                entry = await _get_json(self.buckets.workers, wid)
                if entry is not None:
                    live[wid] = entry
        except NoKeysError:
            pass
        me = self.options.worker_id
        live[me] = {"capacity": self.options.capacity, "owned": len(self.tasks)}
        prefer = (progress or {}).get("prefer")
        if prefer in live:
            return bool(prefer == me)
        with_room = {
            wid: e for wid, e in live.items() if int(e.get("owned", 0)) < int(e.get("capacity", 1))
        }

        def load(wid: str) -> tuple[float, int, str]:
            entry = with_room[wid]
            return (int(entry["owned"]) / max(1, int(entry["capacity"])), int(entry["owned"]), wid)

        return min(with_room, key=load) == me

    def _start(self, sid: str, revision: int) -> None:
        task = _StreamTask(self, sid, claimed_at=time.time())
        task.lease_revision = revision
        future = asyncio.ensure_future(self._serve(task))
        self.tasks[sid] = (task, future)
        self.event("claimed", stream=sid)

    async def _serve(self, task: _StreamTask) -> str:
        sid = task.sid
        frames_before = task.stats.frames
        try:
            outcome = await task.run_stream()
        except asyncio.CancelledError:
            self.event("stopped", stream=sid, reason="lease lost or worker stopping")
            raise
        except (OSError, RuntimeError):  # a full disk, a full GPU: another try later may work
            log.exception("stream %s: failed; releasing it, to be tried again", sid)
            self.cooldown[sid] = time.time() + 5 * self.options.lease_ttl
            outcome = "failed"
        except Exception as exc:  # frames the model refuses (ValueError): not worth a retry
            reason = f"{type(exc).__name__}: {exc}"
            log.error(
                "stream %s: run %s cannot be encoded (%s); marked failed, not claimed again "
                "until its ingest starts a new run",
                sid,
                task.run,
                reason,
                exc_info=True,
            )
            task.stats.failed = reason
            outcome = "failed"
            with contextlib.suppress(Exception):
                await task.write_progress(done=True, failed=reason)
        if sid in self.claimed_at_revision and (
            outcome == "failed" or (outcome == "ended" and task.stats.frames == frames_before)
        ):  # nothing to do here until its ingest writes something new: no claim loop
            self.ended_at_revision[sid] = self.claimed_at_revision[sid]
        if outcome == "released":
            await task.write_progress()
        with contextlib.suppress(Exception):
            await retrying(
                f"stream {sid}: releasing the lease",
                lambda: self.buckets.leases.delete(sid, last=task.lease_revision),
            )
        self.event(outcome, **asdict(task.stats))
        return outcome

    # -- planned moves ----

    async def _on_control(self, message: Any) -> None:
        try:
            request = json.loads(message.data)
            sid = request["release"]
        except (ValueError, KeyError, TypeError):
            log.warning("control: ignoring a malformed request")
            return
        entry = self.tasks.get(sid)
        if entry is None:
            if message.reply:
                await message.respond(json.dumps({"ok": False, "error": "not owned"}).encode())
            return
        task, _ = entry
        task.prefer = request.get("to")
        task.release_requested = True
        self.event("release_requested", stream=sid, to=task.prefer)
        if message.reply:
            await message.respond(json.dumps({"ok": True}).encode())

    async def _release_all(self) -> None:
        for task, _ in self.tasks.values():
            task.release_requested = True
        futures = [future for _, future in self.tasks.values()]
        if futures:
            _, pending = await asyncio.wait(futures, timeout=30)
            for future in pending:
                future.cancel()


async def _get_entry(kv: Any, key: str) -> tuple[dict[str, Any] | None, int]:
    """A JSON entry and its revision (0: none)."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None, 0
    try:
        value = json.loads(entry.value) if entry.value is not None else None
    except ValueError:
        value = None
    return (value if isinstance(value, dict) else None), int(entry.revision or 0)


async def _get_json(kv: Any, key: str) -> dict[str, Any] | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # also a deleted key
        return None
    if entry.value is None:
        return None
    try:
        value = json.loads(entry.value)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _parse_size(text: Any) -> tuple[int, int] | None:
    if not isinstance(text, str) or "x" not in text:
        return None
    height, width = (int(v) for v in text.split("x"))
    return height, width
