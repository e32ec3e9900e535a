"""The web server: one page, WebRTC signalling, and one pooled stream per browser session.

>>> from streamvae import StreamPool
>>> from streamvae.web.server import PageInfo, WebServer
>>> async def main(encoder, open_sinks):                                   # doctest: +SKIP
...     pool = StreamPool(encoder, max_streams=4)
...     info = PageInfo(model="Wan2.1_VAE.pth", config="wan2.1", dtype="float32", size=(64, 64))
...     async with WebServer(pool, info, open_sinks) as server:
...         await server.serve("127.0.0.1", 8000)      # until server.stop()

``open_sinks(stream_id)`` is an async context manager giving that stream's sinks (MQTT, files:
``streamvae web`` passes the ones ``streamvae serve`` makes); it is entered when a session is
admitted and left once the stream has ended and been flushed (an MQTT sink then publishes its
status ``offline``).

**Sessions.** The page POSTs its WebRTC offer to ``/api/offer``; the server answers with its
own (host candidates only, no STUN: loopback needs none) and admits the session's video track as
a :class:`~streamvae.web.TrackSource` into the pool (``PoolStream.add``): several tabs are
several streams of one pool, stepped together; a session the pool refuses (``max_streams``,
memory) gets HTTP 503 with the reason, which the page shows. An error of the pool itself
(an encoder step failing) ends every session as failed with the reason, and later offers get
503 ("the encoder stopped: ..."). The session's data channel carries
the server's numbers to the page (JSON: ``hello``, ``stats`` twice a second, ``latent`` per
latent with its picture, ``ended``); the page sends ``{"type": "stop"}`` to end its stream
cleanly. A closed tab (the connection closed or failed) ends its stream the same way: flushed,
sinks closed. ``/api/sessions`` gives the sessions' numbers as JSON (what the page shows): the
live ones and the most recent :data:`HISTORY` finished ones (older finished ones are freed).

**The latent picture.** A fixed projection of the latent's channels to RGB (a seeded Gaussian
``3 x z_dim`` matrix, the same for every latent and run; not a decoder: colours mean nothing by
themselves, but a change of the scene changes them), ``128 + 64 * P z`` clipped to bytes.

**The round trip.** With a ``decoder`` (``streamvae web`` passes the weights' own, unless
``--no-decode``), each session's latents are also decoded by a
:class:`~streamvae.StreamDecoder` of its own, in a worker thread, and the last frame of each
latent goes to the page as a JPEG (``decoded`` messages) beside the camera preview. A decoder
that falls behind (more than :data:`ROUND_TRIP_QUEUE` latents waiting) lets the waiting ones go
and starts again at the next latent (counted as a restart: its frames are then not exact); the
latents sent to the sinks are never held back by it.

Nothing secret reaches the page: it is told the model's label, config, dtype and size, and
which kinds of sink there are (never a broker URL, user or password).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import itertools
import json
import logging
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel

from streamvae.decoding import StreamDecoder
from streamvae.frames import SPATIAL_MULTIPLE
from streamvae.io.pipeline import LatentSink, PipelineStats, SinkError, latent_latency, percentiles
from streamvae.io.sources import ResizeMode, SourceError, SourceFrame
from streamvae.model import WanDecoder
from streamvae.pool import AdmissionError, PoolStream, StreamPool
from streamvae.stream import Latent
from streamvae.web.record import FrameRecorder
from streamvae.web.rtcp import SenderClock
from streamvae.web.source import TrackSource

__all__ = [
    "EncoderStopped",
    "PageInfo",
    "SessionSettings",
    "WebServer",
    "allowed_host",
    "jpeg_bytes",
    "latent_picture",
    "make_app",
]

# streamvae.web: the package that holds this module (its logger name and its static/ files)
_PACKAGE = __name__.rpartition(".")[0]
log = logging.getLogger(_PACKAGE)

STATS_INTERVAL = 0.5
"""Seconds between the ``stats`` messages each session's page gets."""

RATE_WINDOW = 4.0
"""Seconds the page's rates (frames in/s, latents out/s) are measured over: current, not averages."""

CLOCKED_FRAMES = 1024
"""Frames per session remembered as stamped with the browser's capture time."""

HELD_MESSAGES = 256
"""Messages to a page kept while its data channel is still opening (the oldest go beyond)."""

LATENCY_WINDOW = 100
"""Latencies (the most recent) the page's and the API's percentiles are taken over."""

SESSION_PREFIX = "web-"
"""Sessions are named ``web-1``, ``web-2``, ... (from ``WebServer(first_session=)``)."""

HISTORY = 100
"""Finished sessions kept (the most recent) for ``/api/sessions``; older ones are freed."""


ROUND_TRIP_QUEUE = 4
"""Latents a session's decoder may have waiting; beyond, it restarts at the next one."""

JPEG_BYTES = 48 * 1024
"""The most a decoded frame's JPEG may take in a data channel message (halved in size until
it fits: SCTP messages of 64 KiB reach every browser)."""


class EncoderStopped(RuntimeError):
    """The pool's stream stopped on an error: the server takes no more sessions."""


SinkFactory = Callable[[str], AbstractAsyncContextManager[Sequence[LatentSink]]]


@dataclass(frozen=True)
class PageInfo:
    """What the page is told about the model (nothing secret)."""

    model: str
    config: str
    dtype: str
    size: tuple[int, int] | None
    random_weights: bool = False
    z_dim: int = 16
    sinks: tuple[str, ...] = ()
    decodes: bool = False
    """Whether the page gets the decoded frames (the round trip)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "decodes": self.decodes,
            "model": self.model,
            "config": self.config,
            "dtype": self.dtype,
            "size": None if self.size is None else f"{self.size[0]}x{self.size[1]}",
            "random_weights": self.random_weights,
            "z_dim": self.z_dim,
            "sinks": list(self.sinks),
            "clocks": CLOCKS,
        }


CLOCKS = (
    "'latency' = latent ready - frame received, both on the server's monotonic clock (exact): "
    "the time in the server (queue, encoder) after aiortc decoded the frame. 'capture to "
    "ready' = latent ready (server wall clock) - the frame's capture time on the browser's "
    "wall clock, mapped from its RTP timestamp by the browser's RTCP sender reports (from "
    "about a second in): it adds the browser's encoding, the network and decoding, and is "
    "right only as far as the two wall clocks agree (one machine: the same clock). Latents "
    "on MQTT say which clock their timestamps are on (meta 'capture_clock')"
)


@dataclass(frozen=True)
class SessionSettings:
    """How each session's track becomes a source (see :class:`~streamvae.web.TrackSource`)."""

    size: tuple[int, int] | None = None
    resize: ResizeMode = "resize"
    max_queued_groups: int = 2
    first_frame_timeout: float = 10.0
    frame_timeout: float = 5.0
    record_dir: Path | None = None
    """Record every frame each stream's encoder gets, losslessly, under ``record_dir/ID``."""


def latent_picture(data: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[z, h, w]`` latent -> ``[h, w, 3]`` uint8 through the fixed projection (module docstring)."""
    if data.ndim != 3:
        raise ValueError(f"a latent is [z, h, w], got shape {tuple(data.shape)}")
    z = data.shape[0]
    projection = np.random.default_rng(seed).standard_normal((3, z)) / math.sqrt(z)
    rgb: np.ndarray = np.einsum("cz,zhw->hwc", projection, np.nan_to_num(data.astype(np.float64)))
    picture: np.ndarray = np.clip(128 + 64 * rgb, 0, 255).astype(np.uint8)
    return picture


def jpeg_bytes(rgb: np.ndarray, limit: int = JPEG_BYTES) -> tuple[bytes, int, int]:
    """``[h, w, 3]`` uint8 as a JPEG (PyAV's MJPEG encoder: no other dependency) of at most
    ``limit`` bytes, halving the size until it fits; the bytes and the height and width."""
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    height, width = rgb.shape[:2]
    while True:
        codec: Any = av.CodecContext.create("mjpeg", "w")
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuvj420p"
        codec.time_base = Fraction(1, 25)
        codec.options = {"qmin": "2", "qmax": "8"}
        scaled = frame.reformat(width=width, height=height, format="yuvj420p")
        data = b"".join(bytes(p) for p in [*codec.encode(scaled), *codec.encode(None)])
        if len(data) <= limit or min(height, width) < 16:
            return data, height, width
        height, width = height // 2 // 2 * 2, width // 2 // 2 * 2


class _RoundTrip:
    """One session's decoder: its latents decoded in order in a worker thread, the last frame of
    each sent to the page (module docstring)."""

    def __init__(self, decoder: WanDecoder, normalized: bool, session: _Session) -> None:
        self.stream = StreamDecoder(decoder, normalized=normalized)
        self.session = session
        self.queue: asyncio.Queue[Latent | None] = asyncio.Queue()
        self.latents = 0
        self.frames = 0
        self.restarts = 0
        self.skipped = 0
        self.error: str | None = None
        self._restart = False
        self.task = asyncio.ensure_future(self._run())

    def offer(self, latent: Latent) -> None:
        """Queue a latent; with :data:`ROUND_TRIP_QUEUE` waiting, let them go and restart."""
        if self.error is not None:
            return
        if self.queue.qsize() >= ROUND_TRIP_QUEUE:
            while not self.queue.empty():
                self.queue.get_nowait()
                self.skipped += 1
            self._restart = True
        self.queue.put_nowait(latent)

    async def finish(self) -> None:
        """Decode what is queued, then stop."""
        self.queue.put_nowait(None)
        await self.task

    def numbers(self) -> dict[str, Any]:
        return {
            "latents": self.latents,
            "frames": self.frames,
            "restarts": self.restarts,
            "skipped": self.skipped,
            "error": self.error,
        }

    async def _run(self) -> None:
        while (latent := await self.queue.get()) is not None:
            restart, self._restart = self._restart, False
            try:
                message = await asyncio.to_thread(self._decode, latent, restart)
            except Exception as exc:  # the round trip only: the session streams on
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: decoding stopped: %s", self.session.id, self.error)
                return
            self.session.send(message)

    def _decode(self, latent: Latent, restart: bool) -> dict[str, Any]:
        if restart:
            self.stream.reset()  # the next latent is decoded as a first one: not exact
            self.restarts += 1
        started = time.monotonic()
        frames = self.stream.push(latent)
        took = time.monotonic() - started
        self.latents += 1
        self.frames += len(frames)
        last = frames[-1]
        data, height, width = jpeg_bytes(last.to_rgb())
        return {
            "type": "decoded",
            "latent": last.latent,
            "frame": last.index,
            "frames": len(frames),
            "height": height,
            "width": width,
            "decode_ms": round(took * 1000, 2),
            "exact": self.restarts == 0 and not last.approximate,
            "count": self.frames,
            "restarts": self.restarts,
            "jpeg": base64.b64encode(data).decode("ascii"),
        }


@dataclass
class _Session:
    id: str
    pc: RTCPeerConnection
    source: TrackSource
    started: float = field(default_factory=time.monotonic)
    channel: RTCDataChannel | None = None
    stats: PipelineStats = field(default_factory=PipelineStats)
    sinks: Sequence[LatentSink] = ()
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    recorder: FrameRecorder | None = None
    state: str = "starting"
    error: str | None = None
    output_failed: bool = False
    """Whether ``error`` came from its outputs (its detail is in the server's log only)."""
    dropped_by_encoder: int = 0
    last_latent: dict[str, Any] | None = None
    rates: deque[tuple[float, int, int]] = field(
        default_factory=lambda: deque(maxlen=round(RATE_WINDOW / STATS_INTERVAL))
    )
    end_to_end: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    round_trip: _RoundTrip | None = None

    clocked: dict[float, None] = field(default_factory=dict)
    """Timestamps of the recent frames stamped with the browser's capture time (the newest
    :data:`CLOCKED_FRAMES`): a latent is on that clock if its group's first frame is."""

    def sample(self) -> None:
        """Note the counts now (every :data:`STATS_INTERVAL`): the rates are over the samples."""
        self.rates.append((time.monotonic(), self.source.stats.frames_read, self.stats.latents))

    def numbers(self) -> dict[str, Any]:
        """The session's numbers as the page shows them (the server's); reading them changes
        nothing. The rates are current: over the ticks' samples of the last
        :data:`RATE_WINDOW` seconds, and 0 once the session no longer streams; the counts and
        latency percentiles are since its start (the latencies: its last
        :data:`LATENCY_WINDOW` latents)."""
        now = time.monotonic()
        stats, source = self.stats, self.source.stats
        then, frames_then, latents_then = self.rates[0] if self.rates else (self.started, 0, 0)
        span = now - then if self.state in ("starting", "streaming") else 0.0
        latencies = list(stats.latencies)[-LATENCY_WINDOW:]
        return {
            "session": self.id,
            "state": self.state,
            "error": self.error,
            "seconds": round((stats.finished or now) - self.started, 3),
            "frames_received": source.frames_read,
            "frames_encoded": stats.frames,
            "frames_per_second": round((source.frames_read - frames_then) / span, 2)
            if span > 0
            else 0.0,
            "latents": stats.latents,
            "latents_per_second": round((stats.latents - latents_then) / span, 2)
            if span > 0
            else 0.0,
            "gaps": stats.gaps,
            "dropped_groups": source.dropped_groups,
            "dropped_frames": source.dropped_frames,
            "dropped_by_encoder": self.dropped_by_encoder,
            "resets": self.source.resets,
            "rate_window_s": RATE_WINDOW,
            "resolution": None
            if self.source.resolution is None
            else f"{self.source.resolution[0]}x{self.source.resolution[1]}",
            "latency_ms": _ms(latencies),
            "capture_to_receive_ms": _ms(list(self.source.transits)[-LATENCY_WINDOW:]),
            "capture_to_ready_ms": _ms(list(self.end_to_end)[-LATENCY_WINDOW:]),
            "sinks": [_sink_status(sink) for sink in self.sinks],
            "decoded": None if self.round_trip is None else self.round_trip.numbers(),
        }

    held: deque[str] = field(default_factory=lambda: deque(maxlen=HELD_MESSAGES))

    @property
    def finished(self) -> bool:
        return self.state in ("ended", "failed")

    def output_lost(self) -> bool:
        """Whether an output of this session failed or MQTT did not deliver all its latents."""
        undelivered = sum(
            status.get("sent", 0) - status.get("published", 0)
            for status in map(_sink_status, self.sinks)
            if status["kind"] == "MqttSink"
        )
        return self.output_failed or undelivered > 0

    def send(self, message: dict[str, Any]) -> None:
        """To the page; held (the newest :data:`HELD_MESSAGES`) until its channel opens."""
        text = json.dumps(message)
        channel = self.channel
        if channel is None or channel.readyState != "open":
            self.held.append(text)
            return
        while self.held:
            channel.send(self.held.popleft())
        channel.send(text)


def _output_failed(session: _Session, doing: str, kind: str, error: BaseException) -> None:
    """An output's failure: the detail (it may name a broker, a user) to the server's log only;
    the page and the API get its kind."""
    detail = str(error) if isinstance(error, SinkError) else f"{type(error).__name__}: {error}"
    log.warning("%s: its output failed (%s), ending it: %s", session.id, doing, detail)
    session.output_failed = True
    session.error = session.error or f"output failed ({kind}, {doing}): see the server log"


def _ms(seconds: list[float]) -> dict[str, float]:
    return {k: round(v * 1000, 2) for k, v in percentiles(seconds).items()}


def _sink_status(sink: LatentSink) -> dict[str, Any]:
    """A sink's kind and delivery counts, for the page (no addresses, no credentials)."""
    status: dict[str, Any] = {"kind": type(sink).__name__}
    stats = getattr(sink, "stats", None)
    for name in ("published", "sent", "connected", "discarded"):
        if stats is not None and hasattr(stats, name):
            status[name] = getattr(stats, name)
    if hasattr(sink, "latents_written"):
        status["written"] = sink.latents_written
    return status


class WebServer:
    """The page, the signalling and the sessions' streams through one pool (module docstring).

    An async context manager: entering starts the pool's open-ended stream; leaving ends every
    session cleanly (each stream flushed, its sinks closed) and closes the peer connections.
    :meth:`serve` listens until :meth:`stop`.
    """

    def __init__(
        self,
        pool: StreamPool,
        info: PageInfo,
        open_sinks: SinkFactory,
        settings: SessionSettings | None = None,
        *,
        deadline: float = 0.025,
        allowed_hosts: Sequence[str] = (),
        history: int = HISTORY,
        first_session: int = 1,
        decoder: WanDecoder | None = None,
        normalized: bool = True,
    ) -> None:
        if history < 0:
            raise ValueError(f"history must be >= 0 sessions, got {history}")
        self.pool = pool
        self.history = history
        """Finished sessions kept in :attr:`sessions` (the most recent); older ones are freed."""
        self.forgotten = 0
        """Finished sessions freed from :attr:`sessions` (beyond :attr:`history`)."""
        self.forgotten_lost_output = 0
        """Of those, the ones whose output failed or was not all delivered."""
        self.allowed_hosts = tuple(allowed_hosts)
        """More names a ``Host`` header may give (a reverse proxy's public name)."""
        self.decoder = decoder
        """Decodes each session's latents for the page (the round trip); ``None``: not."""
        self.normalized = normalized
        """Whether the pool's latents carry Wan's normalisation (what the decoder is told)."""
        self.info = dataclasses.replace(info, decodes=decoder is not None)
        self.settings = settings or SessionSettings(size=info.size)
        self._open_sinks = open_sinks
        self._deadline = deadline
        self.sessions: dict[str, _Session] = {}
        self._ids = itertools.count(first_session)  # sessions are web-N from N = first_session
        self._latents: PoolStream | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.host: str | None = None
        """The host :meth:`serve` listens on (a ``Host`` header may name it)."""
        self.failure: str | None = None
        """Why the pool's stream stopped (an encoder error), if it did: then every session has
        failed with it and new offers are refused (HTTP 503)."""
        self.app = make_app(self)

    # -- lifetime ----

    async def __aenter__(self) -> WebServer:
        self._latents = self.pool.stream({}, deadline=self._deadline, open_ended=True)
        self._consumer = asyncio.ensure_future(self._consume(self._latents))
        self._ticker = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End every session cleanly, then the pool's stream."""
        for session in list(self.sessions.values()):
            session.source.finish()
        if self._latents is not None:
            self._latents.end_input()
        try:
            if self._consumer is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._consumer
        finally:
            try:
                if self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)
            finally:
                if self._ticker is not None:
                    self._ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._ticker

    def stop(self) -> None:
        """Make :meth:`serve` return (it then closes the listener; leaving the ``async with``
        ends the sessions)."""
        self._stopped.set()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        listening: Callable[[str], None] | None = None,
    ) -> None:
        """Listen on ``host:port`` (``0``: a free port) until :meth:`stop`; ``listening`` is
        called with the page's URL once the socket is open."""
        self.host = host
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
            if listening is not None:
                bound_host, bound_port = runner.addresses[0][:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                scheme = "https" if ssl_context is not None else "http"
                listening(f"{scheme}://{shown}:{bound_port}/")
            await self._stopped.wait()
        finally:
            await runner.cleanup()

    # -- sessions ----

    async def offer(self, sdp: str, kind: str) -> dict[str, Any]:
        """Answer a browser's offer: admit its video track as a new stream.

        Raises :class:`~streamvae.AdmissionError` when the pool refuses it,
        :class:`EncoderStopped` once the pool's stream has stopped on an error, and
        ``ValueError`` for an offer without video or whose SDP cannot be read (nothing is left
        behind either way, also when this is cancelled: a stream the pool had already admitted
        is ended, freeing its slot).
        """
        if self._latents is None:
            raise RuntimeError("the server is not running (use it as an async context manager)")
        if self.failure is not None:
            raise EncoderStopped(self.failure)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session: _Session | None = None
        tracks: list[Any] = []
        channels: list[RTCDataChannel] = []
        pc.on("track", lambda track: tracks.append(track) if track.kind == "video" else None)
        pc.on("datachannel", channels.append)
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
            except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
                # aiortc's SDP parser raises these for a malformed line (a=setup:x, a bad
                # a=candidate, ...): the offer is refused (HTTP 400), not the server's fault.
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                raise ValueError(f"the offer's SDP could not be read ({detail})") from None
            if not tracks:
                raise ValueError("the offer has no video track (the page sends its camera)")
            sid = f"{SESSION_PREFIX}{next(self._ids)}"
            settings = self.settings
            receivers = [t.receiver for t in pc.getTransceivers() if t.receiver.track is tracks[0]]
            clock = SenderClock(receivers[0]) if receivers else None
            source = TrackSource(
                tracks[0],
                size=settings.size,
                resize=settings.resize,
                max_queued_groups=settings.max_queued_groups,
                first_frame_timeout=settings.first_frame_timeout,
                frame_timeout=settings.frame_timeout,
                name=sid,
                capture_clock=None if clock is None else clock.capture_time,
            )
            session = _Session(sid, pc, source)
            if self.decoder is not None:
                session.round_trip = _RoundTrip(self.decoder, self.normalized, session)
            try:
                ended = await self._latents.add(sid, self._frames(session), size=settings.size)
            except AdmissionError:
                raise
            except RuntimeError as exc:  # the pool's stream ended meanwhile
                raise EncoderStopped(self.failure or str(exc)) from exc
            except BaseException:
                # Cancelled (or failed) after the pool may have admitted it: its frames end at
                # once, so the stream (if in) ends and frees its slot.
                source.stop()
                session.ready.set()
                raise
        except BaseException:
            await pc.close()
            if session is not None and session.round_trip is not None:
                await session.round_trip.finish()
            raise
        self.sessions[sid] = session
        pc.on("datachannel", lambda channel: self._attach(session, channel))
        for channel in channels:
            self._attach(session, channel)

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                log.info("%s: connection %s: ending its stream", sid, pc.connectionState)
                session.source.finish()

        task = asyncio.ensure_future(self._run_session(session, ended))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        local = pc.localDescription
        return {"sdp": local.sdp, "type": local.type, "session": sid}

    def _attach(self, session: _Session, channel: RTCDataChannel) -> None:
        session.channel = channel

        @channel.on("open")
        def on_open() -> None:  # hello first, then what was held
            hello = {"type": "hello", "session": session.id, **self.info.as_json()}
            session.held.appendleft(json.dumps(hello))
            session.send({"type": "stats", **session.numbers()})

        @channel.on("message")
        def on_message(message: object) -> None:
            try:
                kind = json.loads(message).get("type") if isinstance(message, str) else None
            except (ValueError, AttributeError):
                kind = None
            if kind == "stop":
                log.info("%s: the page asked to stop", session.id)
                session.source.finish()

        if channel.readyState == "open":
            on_open()

    async def _frames(self, session: _Session) -> AsyncIterator[SourceFrame]:
        """The session's frames as the pool reads them: once its sinks are open; recorded.

        Without a ``size``, a camera whose size the encoder cannot take ends this session
        only (a :class:`~streamvae.io.SourceError`), not the pool."""
        await session.ready.wait()
        async with session.source as source:
            async for frame in source:
                since = session.source.capture_times_since
                stamped = since is not None and (frame.captured or -math.inf) >= since
                if stamped and frame.timestamp is not None:
                    session.clocked[frame.timestamp] = None
                    if len(session.clocked) > CLOCKED_FRAMES:
                        del session.clocked[next(iter(session.clocked))]
                height, width = frame.image.shape[:2]
                if height % SPATIAL_MULTIPLE or width % SPATIAL_MULTIPLE or not height * width:
                    raise SourceError(
                        f"{session.id}: the camera sends {height}x{width}, which the encoder "
                        f"cannot take (height and width must be positive multiples of "
                        f"{SPATIAL_MULTIPLE}): choose another camera size, or start the "
                        "server with --size HxW"
                    )
                session.stats.frames += 1
                if session.recorder is not None:
                    session.recorder.add(frame)
                yield frame

    async def _run_session(self, session: _Session, ended: asyncio.Future[int]) -> None:
        outcome = "failed"
        try:
            try:
                session.sinks = await session.stack.enter_async_context(
                    self._open_sinks(session.id)
                )
                if self.settings.record_dir is not None:
                    session.recorder = session.stack.enter_context(
                        FrameRecorder(self.settings.record_dir / session.id)
                    )
            except BaseException as exc:
                _output_failed(session, "opening its outputs", "outputs", exc)
                session.source.stop()
                raise
            finally:
                session.state = "streaming"
                session.ready.set()
            outcome = "ended"
            try:
                session.dropped_by_encoder = await ended
            except asyncio.CancelledError:
                if not ended.cancelled():
                    raise  # this task itself was cancelled
                outcome = "failed"  # the pool's stream stopped before this one ended
                session.error = session.error or (
                    f"the encoder stopped: {self.failure}"
                    if self.failure is not None
                    else "the encoder stopped before this stream ended"
                )
                log.warning("%s: %s", session.id, session.error)
            except Exception as exc:
                outcome = "failed"
                session.error = session.error or str(exc)
                log.warning("%s: %s", session.id, str(exc))  # a string: no traceback kept
        except Exception as exc:
            outcome = "failed"
            log.warning("%s: %s", session.id, str(exc))
            with contextlib.suppress(Exception):
                await ended
        finally:
            session.stats.finished = time.monotonic()
            session.state = "closing"
            try:
                await session.stack.aclose()  # flushed by now: MQTT offline, files closed
            except Exception as exc:
                _output_failed(session, "closing its outputs", "outputs", exc)
                outcome = "failed"
            if session.round_trip is not None:
                await session.round_trip.finish()  # the page gets every decoded frame first
            if session.error is not None:  # an output failed, though the stream ended cleanly
                outcome = "failed"
            session.state = outcome  # "ended" / "failed" once its outputs are closed
            final = session.numbers()
            log.info("%s: %s", session.id, json.dumps(final))
            session.send({"type": "ended", **final})
            await asyncio.sleep(0.2)  # let the channel carry the last message
            await session.pc.close()
            self._forget_old_sessions()

    def _forget_old_sessions(self) -> None:
        """Free the finished sessions beyond the newest :attr:`history` (their numbers were
        logged when they ended): memory stays flat however many sessions come and go."""
        finished = [sid for sid, session in self.sessions.items() if session.finished]
        for sid in finished[: max(0, len(finished) - self.history)]:
            session = self.sessions.pop(sid)
            self.forgotten += 1
            self.forgotten_lost_output += session.output_lost()

    async def _consume(self, latents: PoolStream) -> None:
        try:
            await self._consume_latents(latents)
        except Exception as exc:  # FrameError, AdmissionError, PoolStepError...: the pool's
            # stream is over; every live session fails with the reason, new offers get a 503
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("the encoder stopped, ending every session: %s", self.failure)
            for session in list(self.sessions.values()):
                if session.state in ("starting", "streaming"):
                    session.error = session.error or f"the encoder stopped: {self.failure}"
                    session.source.stop()

    async def _consume_latents(self, latents: PoolStream) -> None:
        async with latents:
            async for sid, latent in latents:
                session = self.sessions.get(sid)
                if session is None or session.error is not None:
                    continue
                first = latent.timestamps[0] if latent.timestamps else None
                browser = first is not None and first in session.clocked
                clock = "browser-capture" if browser else "server-receive"
                latent = dataclasses.replace(latent, meta={**latent.meta, "capture_clock": clock})
                try:
                    for sink in session.sinks:
                        await sink.send(latent)
                except Exception as exc:  # SinkError, or a sink refusing the latent: this
                    # session ends (its source stopped); the other sessions go on
                    _output_failed(session, "sending a latent", type(sink).__name__, exc)
                    session.source.stop()
                    continue
                self._count(session, latent)

    def _count(self, session: _Session, latent: Latent) -> None:
        stats = session.stats
        stats.latents += 1
        stats.gaps += latent.gap
        latency = latent_latency(latent)
        if latency is not None:
            stats.latencies.append(latency)
        end_to_end = None
        if (
            latent.meta.get("capture_clock") == "browser-capture"
            and latent.timestamps[-1] is not None
        ):
            end_to_end = latent.ready_time - latent.timestamps[-1]
            session.end_to_end.append(end_to_end)
        picture = latent_picture(latent.data.float().numpy())
        message = {
            "type": "latent",
            "index": latent.index,
            "count": stats.latents,
            "gap": latent.gap,
            "frames": [latent.frames.start, latent.frames.stop],
            "source_frames": list(latent.source_frames),
            "dropped_before": latent.dropped_before,
            "latency_ms": None if latency is None else round(latency * 1000, 2),
            "capture_to_ready_ms": None if end_to_end is None else round(end_to_end * 1000, 2),
            "height": int(picture.shape[0]),
            "width": int(picture.shape[1]),
            "rgb": base64.b64encode(picture.tobytes()).decode("ascii"),
        }
        session.last_latent = {k: v for k, v in message.items() if k != "rgb"}
        session.send(message)
        if session.round_trip is not None:
            session.round_trip.offer(latent)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self._send_stats()  # (no session held across the sleep: a finished one is freed)

    def _send_stats(self) -> None:
        for session in list(self.sessions.values()):
            if session.state in ("starting", "streaming"):
                session.sample()
                session.send({"type": "stats", **session.numbers()})


STATIC = "static"


def _static(name: str) -> bytes:
    return resources.files(_PACKAGE).joinpath(STATIC, name).read_bytes()


def allowed_host(header: str, bound: str | None, more: Sequence[str] = ()) -> bool:
    """Whether a request's ``Host`` header may be served: an IP address, ``localhost``, the
    host the server listens on, this machine's name, or one of ``more``. A DNS name pointing elsewhere (DNS
    rebinding: a page on another site made to reach this server) is not.

    >>> allowed_host("127.0.0.1:8000", None), allowed_host("evil.example:8000", "127.0.0.1")
    (True, False)
    """
    name = header.strip().lower()
    if name.startswith("["):  # [IPv6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return True
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    names.update(n.lower().rstrip(".") for n in more)
    if bound:
        names.add(bound.lower().strip("[]"))
    return name in names or name.endswith(".localhost")


def make_app(server: WebServer) -> web.Application:
    """The aiohttp application: ``/`` (the page), ``/app.js``, ``/api/info``, ``/api/offer``,
    ``/api/sessions``.

    Requests whose ``Host`` is not :func:`allowed_host` get 403; ``/api/offer`` takes
    ``Content-Type: application/json`` only (415 otherwise: a cross-site page cannot POST it
    without the browser asking first)."""

    @web.middleware
    async def check_host(
        request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if not allowed_host(request.headers.get("Host", ""), server.host, server.allowed_hosts):
            return web.json_response(
                {"error": "this server answers only to its own address (Host refused)"},
                status=403,
            )
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(client_max_size=1 << 20, middlewares=[check_host])

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html")

    async def script(request: web.Request) -> web.Response:
        return web.Response(body=_static("app.js"), content_type="application/javascript")

    async def info(request: web.Request) -> web.Response:
        return web.json_response(server.info.as_json())

    async def sessions(request: web.Request) -> web.Response:
        return web.json_response(
            {sid: session.numbers() for sid, session in server.sessions.items()}
        )

    async def offer(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return web.json_response(
                {"error": "expected Content-Type: application/json"}, status=415
            )
        try:
            body = await request.json()
            sdp, kind = body["sdp"], body["type"]
            if not isinstance(sdp, str) or kind != "offer":
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):  # nested too deep: too
            return web.json_response(
                {"error": 'expected JSON {"sdp": "...", "type": "offer"}'}, status=400
            )
        try:
            return web.json_response(await server.offer(sdp, kind))
        except AdmissionError as exc:
            return web.json_response({"error": f"the server is full: {exc}"}, status=503)
        except EncoderStopped as exc:
            return web.json_response({"error": f"the encoder stopped: {exc}"}, status=503)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def no_icon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app.router.add_get("/", page)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_get("/app.js", script)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_post("/api/offer", offer)
    return app
