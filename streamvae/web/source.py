"""A WebRTC video track as a live :class:`~streamvae.io.FrameSource`: a browser is a camera.

>>> from streamvae.web import TrackSource
>>> async def on_track(track, encoder):                                    # doctest: +SKIP
...     async with TrackSource(track, size="64x64") as source:   # an aiortc MediaStreamTrack
...         async for latent in encoder.stream(source):
...             ...

The track's decoded frames enter exactly as a camera's do: a reader thread converts them to
RGB and brings them to ``size``, and the live queue drops the oldest *whole groups* when the
encoder falls behind (see :mod:`streamvae.io.sources`), counted in ``stats``.

**Clocks.** Each frame carries ``captured``, the server's ``time.monotonic()`` when aiortc
handed the decoded frame over: latency measured from it (``latent_latency``) is *server
receive -> latent ready*, exact, and leaves out the browser's capture, encoding and the network
before it. ``timestamp`` (wall clock, the label that goes on the wire) is the browser's capture
time where ``capture_clock`` knows it (:class:`streamvae.web.rtcp.SenderClock`: from the
browser's RTCP sender reports, on the *browser's* wall clock, from about a second in; see
``capture_times_since``), else the server's ``time.time()`` at receipt. ``stream_time`` is the
frame's RTP time in seconds since the track's first frame (the browser's 90 kHz media clock).

**Resolution changes.** A browser that switches cameras (or changes its send resolution) starts
a new run: its first frame at the new size has ``gap=True`` (the encoder ends the old run and
restarts), and ``resets`` counts these. Frames are still brought to ``size`` when one is given.

**Ends.** The track ending (the tab closed, the peer connection gone) or :meth:`TrackSource.finish`
ends the iteration cleanly after the frames already received; a track that sends no frame for
``first_frame_timeout`` seconds at the start, or ``frame_timeout`` seconds later, ends it with
:class:`~streamvae.io.SourceError`. :meth:`~streamvae.io.FrameSource.stop` ends it at once
(queued frames discarded and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streamvae.io.backoff import Backoff
from streamvae.io.sources import (
    GROUP_FRAMES,
    FrameSource,
    ResizeMode,
    SourceError,
    parse_size,
)

__all__ = ["TrackSource", "VideoTrack"]


class VideoTrack(Protocol):
    """What :class:`TrackSource` reads: an aiortc ``MediaStreamTrack`` of kind ``"video"``.

    ``recv()`` returns the next decoded frame (an ``av.VideoFrame``, or anything with
    ``to_ndarray(format="rgb24")`` and optional ``pts`` / ``time_base``) and raises aiortc's
    ``MediaStreamError`` once the track has ended.
    """

    kind: str

    async def recv(self) -> Any: ...


@dataclass(frozen=True)
class _Arrival:
    frame: Any
    timestamp: float
    captured: float
    stream_time: float | None


class _End:
    """The track ended (cleanly); ``error`` if reading it failed."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class _TrackCapture:
    """The reader thread's side of the feed: frames in arrival order, a run per resolution."""

    total_frames: int | None = None
    fps: float | None = None

    def __init__(
        self, feed: queue.Queue[_Arrival | _End], name: str, first_timeout: float, timeout: float
    ) -> None:
        self._feed = feed
        self._name = name
        self._first_timeout = first_timeout
        self._timeout = timeout
        self._received = 0
        self.resolution: tuple[int, int] | None = None
        self.held: tuple[np.ndarray, _Arrival] | None = None  # the first frame of the next run
        self.ended = False
        self.stream_time: float | None = None

    def read(self) -> tuple[np.ndarray, float, float] | None:
        """The next RGB frame; ``None`` at the end of the track or of a run (a new resolution:
        that frame is ``held`` for the next run). Raises :class:`SourceError` on a timeout."""
        if self.held is not None:
            image, arrival = self.held
            self.held = None
            return self._give(image, arrival)
        timeout = self._first_timeout if self._received == 0 else self._timeout
        try:
            item = self._feed.get(timeout=timeout)
        except queue.Empty:
            what = "no frame" if self._received == 0 else "no further frame"
            raise SourceError(
                f"{self._name}: the browser sent {what} for {timeout:g} s "
                f"({self._received} frame(s) received)"
            ) from None
        if isinstance(item, _End):
            self.ended = True
            if item.error is not None:
                raise SourceError(f"{self._name}: reading the track failed: {item.error!r}")
            return None
        self._received += 1
        image = _rgb(item.frame)
        size = (int(image.shape[0]), int(image.shape[1]))
        if self.resolution is not None and size != self.resolution:
            self.resolution = size
            self.held = (image, item)
            return None
        self.resolution = size
        return self._give(image, item)

    def _give(self, image: np.ndarray, item: _Arrival) -> tuple[np.ndarray, float, float]:
        self.stream_time = item.stream_time
        return image, item.timestamp, item.captured

    def release(self) -> None:
        pass  # the track belongs to its peer connection


def _rgb(frame: Any) -> np.ndarray:
    image = frame.to_ndarray(format="rgb24")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise SourceError(f"a video frame gave {type(image).__name__} instead of RGB [H, W, 3]")
    return image


def _stream_time(frame: Any) -> float | None:
    pts, base = getattr(frame, "pts", None), getattr(frame, "time_base", None)
    if pts is None or base is None:
        return None
    return float(pts * base)


class TrackSource(FrameSource):
    """Frames of a WebRTC video track, live (see the module docstring); a :class:`FrameSource`.

    ``TrackSource(track, size=None, resize="resize", max_queued_groups=2, first_frame_timeout=10,
    frame_timeout=5, name="webrtc", capture_clock=None)``: ``size`` (``"HxW"`` or ``(H, W)``,
    multiples of 8) as :func:`~streamvae.io.open_source` takes it; ``capture_clock(frame)``
    gives a frame's capture time on the sender's wall clock, or ``None`` where unknown. ``resets`` counts resolution changes;
    ``resolution`` is the track's current ``(H, W)`` as received (``None`` before a frame).
    """

    def __init__(
        self,
        track: VideoTrack,
        *,
        size: str | tuple[int, int] | None = None,
        resize: ResizeMode = "resize",
        max_queued_groups: int = 2,
        first_frame_timeout: float = 10.0,
        frame_timeout: float = 5.0,
        name: str = "webrtc",
        group_frames: int = GROUP_FRAMES,
        capture_clock: Callable[[Any], float | None] | None = None,
    ) -> None:
        if getattr(track, "kind", None) != "video":
            raise ValueError(
                f"TrackSource takes a video track, got kind={getattr(track, 'kind', None)!r}"
            )
        if resize not in ("resize", "crop"):
            raise ValueError(f"resize must be 'resize' or 'crop', got {resize!r}")
        if max_queued_groups < 1:
            raise ValueError(f"max_queued_groups must be >= 1, got {max_queued_groups}")
        for label, value in (
            ("first_frame_timeout", first_frame_timeout),
            ("frame_timeout", frame_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be > 0 seconds, got {value!r}")
        super().__init__(
            f"webrtc://{name}",
            kind="webrtc",
            size=parse_size(size),
            resize=resize,
            live=True,
            reconnect=False,
            max_queued_groups=max_queued_groups,
            backoff=Backoff(),
            max_reconnects=0,
            open_timeout=first_frame_timeout,
            read_timeout=frame_timeout,
            ffmpeg_options=None,
            group_frames=group_frames,
        )
        self.track = track
        self.name = name
        self.resets = 0
        self.capture_clock = capture_clock
        self.capture_times_since: float | None = None
        """``captured`` (monotonic) of the first frame stamped with the browser's capture time;
        every later frame is too (``None``: none yet)."""
        self.transits: deque[float] = deque(maxlen=1000)
        """Seconds from the browser's capture to the server's receipt (the most recent 1000):
        encoding, network, decoding; on two clocks (see the module docstring)."""
        self._feed: queue.Queue[_Arrival | _End] = queue.Queue()
        self._capture = _TrackCapture(self._feed, name, first_frame_timeout, frame_timeout)
        self._receiver: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"TrackSource({self.name!r}, size={self.size})"

    @property
    def resolution(self) -> tuple[int, int] | None:
        return self._capture.resolution

    def _start(self) -> Any:
        started = self._queue is None
        queue_ = super()._start()
        if started:
            self._receiver = asyncio.ensure_future(self._receive())
        return queue_

    async def _receive(self) -> None:
        """On the event loop: hand each decoded frame to the reader thread, stamped on arrival."""
        from aiortc.mediastreams import MediaStreamError

        end = _End()
        try:
            while True:
                frame = await self.track.recv()
                received, captured = time.time(), time.monotonic()
                browser = None if self.capture_clock is None else self.capture_clock(frame)
                if browser is not None:
                    self.transits.append(received - browser)
                    if self.capture_times_since is None:
                        self.capture_times_since = captured
                timestamp = received if browser is None else browser
                self._feed.put(_Arrival(frame, timestamp, captured, _stream_time(frame)))
        except MediaStreamError:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            end = _End(exc)
        finally:
            self._feed.put(end)

    def finish(self) -> None:
        """End cleanly: the frames received so far are still delivered, then the iteration ends."""
        self._feed.put(_End())
        if self._receiver is not None:
            self._receiver.cancel()

    def stop(self) -> None:
        super().stop()
        self._feed.put(_End())
        if self._receiver is not None:
            self._receiver.cancel()

    async def aclose(self, *, timeout: float | None = None) -> None:
        await super().aclose(timeout=timeout)
        if self._receiver is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver

    def _read_loop(self) -> None:
        """The reader thread: one run per resolution, until the track ends or times out."""
        queue_ = self._queue
        assert queue_ is not None
        capture = self._capture
        run = 0
        error: BaseException | None = None
        try:
            while not self._stop.is_set():
                self._pump(capture, queue_, run)
                if capture.held is None or self._stop.is_set():
                    break  # the track ended (or the source stopped)
                run += 1
                self.resets += 1
        except SourceError as exc:
            self.stats.last_error = str(exc)
            error = exc
        except BaseException as exc:  # an unexpected failure: the consumer sees it
            error = SourceError(f"reading {self.name} failed: {exc!r}")
            error.__cause__ = exc
        finally:
            queue_.close(error)
