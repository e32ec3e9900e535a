"""Frame sources: webcams, RTSP/HTTP streams, video files and a synthetic pattern, as async iterators.

>>> from streamvae.io import open_source
>>> async def main():                                                      # doctest: +SKIP
...     async with open_source("rtsp://camera.local/stream", size="480x832") as source:
...         async for frame in source:           # SourceFrame: RGB uint8 [H, W, 3] + capture time
...             ...
...     print(source.stats.dropped_frames)

What a URI opens (``kind="auto"``):

- ``0``, ``"1"``, ``"/dev/video0"``: a webcam (OpenCV's default backend);
- ``rtsp://``, ``rtsps://``, ``rtmp://``, ``http(s)://``, ``udp://``, ``tcp://``, ``srt://``: a network
  stream read by OpenCV's FFmpeg backend (MJPEG over HTTP and anything else FFmpeg reads);
- ``synthetic://moving?frames=N&fps=F&size=HxW``: a built-in moving test pattern (no camera, no
  file); with ``fps`` it is paced like a camera, otherwise it is as fast as it is consumed;
- anything else: a video file (``file://`` prefix optional).

Frames are decoded, converted to RGB and resized in a reader thread, never on the event loop,
and handed over through a bounded queue. Each frame carries its capture time twice: as a label
(``timestamp``, ``time.time()`` when it was grabbed) and for measuring latency (``captured``,
``time.monotonic()`` at the same moment, which a wall-clock step cannot disturb).

**When the consumer falls behind.** Files (and the synthetic source without ``fps``) never drop:
the reader waits (backpressure). Live sources (webcams, network streams, paced synthetic) keep
the newest frames and drop the oldest *whole groups*: the encoder groups frames as frame 0
alone, then 1-4, 5-8, ...; a group is dropped only if none of its frames has been handed out, and
frame 0 of the newest run is never dropped (an older run's frame 0 goes only with the whole of
that run), so every group the encoder sees is four consecutive source frames (dropping a frame inside a group would silently change the latent). Every drop is counted
in :attr:`FrameSource.stats`.

**When a live source fails** (a camera unplugged, a stream that ends or stalls past
``read_timeout``), the reader reopens it with exponential backoff. The first frame after a
reconnect has ``gap=True``: :class:`streamvae.StreamEncoder` then ends the current run (a partial
group is dropped and counted there), restarts from that frame, and marks the next latent
``gap=True``. Files end at their last frame (a partial last group is the encoder's to drop or pad).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import parse_qs, quote, urlsplit

import cv2
import numpy as np

from streamvae.frames import SPATIAL_MULTIPLE, Frame
from streamvae.io.backoff import Backoff
from streamvae.io.redact import redact_url

__all__ = [
    "GROUP_FRAMES",
    "SOURCE_PASSWORD_ENV",
    "FrameSource",
    "ResizeMode",
    "SourceError",
    "SourceFrame",
    "SourceKind",
    "SourceStats",
    "fit_frame",
    "open_source",
    "parse_size",
    "source_kind",
    "synthetic_frame",
]

log = logging.getLogger(__name__)

GROUP_FRAMES = 4
"""Frames per latent after the first (Wan 2.1's temporal stride): the unit live sources drop."""

SOURCE_PASSWORD_ENV = "STREAMVAE_SOURCE_PASSWORD"
"""The environment variable the CLI reads a network source's password from (or
``--source-password-file``), so that it never needs to be in the URL on the command line."""

SourceKind = Literal["file", "webcam", "network", "synthetic", "webrtc"]
"""What a source reads; ``"webrtc"`` is a browser's camera (``streamvae.web.TrackSource``)."""
ResizeMode = Literal["resize", "crop"]

NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt", "rtp"})
SYNTHETIC_PATTERNS = ("moving",)
DEFAULT_SYNTHETIC_SIZE = (256, 256)

# OpenCV reads OPENCV_FFMPEG_CAPTURE_OPTIONS when a capture opens; opens that set it take turns.
_FFMPEG_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_FFMPEG_ENV_LOCK = threading.Lock()


class SourceError(RuntimeError):
    """A source could not be opened or read (and was not going to recover)."""


@dataclass(frozen=True)
class SourceFrame(Frame):
    """A :class:`streamvae.frames.Frame` from a source, with its place in the source.

    ``number`` counts frames since the source (re)opened, drops included; ``run`` counts the
    reconnections before it (0 until the first). ``gap`` is true on the first frame of every run
    after the first. ``stream_time`` is the stream's own time of the frame in seconds where the
    source gives one (a file's or an RTSP stream's presentation time, as OpenCV reports it),
    else ``None``: a label, like ``timestamp``.
    """

    number: int = 0
    run: int = 0
    stream_time: float | None = None


@dataclass
class SourceStats:
    """What a source has done so far (updated by the reader thread; read at any time)."""

    frames_read: int = 0
    frames_delivered: int = 0
    dropped_frames: int = 0
    dropped_groups: int = 0
    disconnects: int = 0
    reconnects: int = 0
    discarded_at_stop: int = 0
    """Frames read but never handed out because :meth:`FrameSource.stop` ended the iteration:
    ``frames_read == frames_delivered + dropped_frames + discarded_at_stop`` once it ends."""
    last_error: str | None = None


def parse_size(size: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"HxW"`` or ``(H, W)`` -> ``(H, W)``, both positive multiples of 8; ``None`` stays ``None``.

    >>> parse_size("480x832")
    (480, 832)
    >>> parse_size("100x100")
    Traceback (most recent call last):
    ...
    ValueError: size must be HxW with H and W positive multiples of 8, got '100x100' (the nearest is 104x104)
    """
    if size is None:
        return None
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
        if not match:
            raise ValueError(f"size must be HxW (for example 480x832), got {size!r}")
        height, width = int(match[1]), int(match[2])
    else:
        height, width = (int(v) for v in size)
    if height <= 0 or width <= 0 or height % SPATIAL_MULTIPLE or width % SPATIAL_MULTIPLE:
        near = [
            max(SPATIAL_MULTIPLE, int(v / SPATIAL_MULTIPLE + 0.5) * SPATIAL_MULTIPLE)
            for v in (height, width)
        ]
        shown = size if isinstance(size, str) else f"{height}x{width}"
        raise ValueError(
            f"size must be HxW with H and W positive multiples of {SPATIAL_MULTIPLE}, got "
            f"{shown!r} (the nearest is {near[0]}x{near[1]})"
        )
    return height, width


def fit_frame(image: np.ndarray, size: tuple[int, int] | None, mode: ResizeMode) -> np.ndarray:
    """Bring an ``[h, w, C]`` image to ``size = (H, W)``.

    ``"resize"`` scales to exactly ``H x W`` (the aspect ratio may change); ``"crop"`` scales so
    the image covers ``H x W`` and keeps its centre.
    """
    if size is None or image.shape[:2] == size:
        return image
    height, width = size
    h, w = image.shape[:2]
    if mode == "resize":
        return _scale(image, height, width)
    if mode != "crop":
        raise ValueError(f"resize must be 'resize' or 'crop', got {mode!r}")
    scale = max(height / h, width / w)
    scaled_h, scaled_w = (
        max(height, math.ceil(h * scale - 1e-6)),
        max(width, math.ceil(w * scale - 1e-6)),
    )
    scaled = _scale(image, scaled_h, scaled_w)
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    return np.ascontiguousarray(scaled[top : top + height, left : left + width])


def _scale(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def synthetic_frame(number: int, height: int, width: int) -> np.ndarray:
    """Frame ``number`` of the built-in moving pattern: drifting gradients and a sliding square.

    Deterministic: the same ``(number, height, width)`` always gives the same RGB uint8 image.
    """
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)[None, :]
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = (x * 255 // max(width - 1, 1) + 3 * number) % 256
    image[..., 1] = (y * 255 // max(height - 1, 1) + 2 * number) % 256
    image[..., 2] = ((x + y + 5 * number) % 64) * 4
    side = max(4, min(height, width) // 4)
    top = (number * 2) % max(1, height - side)
    left = (number * 3) % max(1, width - side)
    image[top : top + side, left : left + side] = (255, 255, 255)
    return image


def source_kind(uri: str | int) -> SourceKind:
    """What ``open_source(uri)`` opens by default (see the module docstring)."""
    if isinstance(uri, int) or (isinstance(uri, str) and uri.strip().isdigit()):
        return "webcam"
    if uri.startswith("/dev/video"):
        return "webcam"
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "synthetic":
        return "synthetic"
    if scheme in NETWORK_SCHEMES:
        return "network"
    return "file"


# -- captures: what the reader thread reads from ----


class _Capture(Protocol):
    total_frames: int | None
    fps: float | None

    def read(self) -> tuple[np.ndarray, float, float] | None:
        """The next RGB frame and its capture time (wall clock, monotonic), or ``None`` at the
        end or on failure."""

    def release(self) -> None: ...


class _OpenCvCapture:
    def __init__(
        self,
        target: int | str,
        *,
        backend: int,
        params: list[int],
        ffmpeg_options: Mapping[str, str] | None,
    ) -> None:
        if ffmpeg_options:
            options = "|".join(f"{key};{value}" for key, value in ffmpeg_options.items())
            with _FFMPEG_ENV_LOCK:
                before = os.environ.get(_FFMPEG_ENV)
                os.environ[_FFMPEG_ENV] = options
                try:
                    self._cap = cv2.VideoCapture(target, backend, params)
                finally:
                    if before is None:
                        os.environ.pop(_FFMPEG_ENV, None)
                    else:
                        os.environ[_FFMPEG_ENV] = before
        else:
            self._cap = cv2.VideoCapture(target, backend, params)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"could not open {_shown(target)}")
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.total_frames = int(count) if count and count > 0 else None
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        self.stream_time: float | None = None  # of the frame last read
        self.stream_times = False  # whether the backend's positions are presentation times

    def read(self) -> tuple[np.ndarray, float, float] | None:
        if not self._cap.grab():
            return None
        timestamp, captured = time.time(), time.monotonic()
        position = self._cap.get(cv2.CAP_PROP_POS_MSEC)
        self.stream_time = position / 1000 if self.stream_times and position >= 0 else None
        ok, image = self._cap.retrieve()
        if not ok or image is None:
            return None
        if image.ndim == 2:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), timestamp, captured
        if image.shape[2] == 4:
            return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB), timestamp, captured
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), timestamp, captured

    def release(self) -> None:
        self._cap.release()


class _SyntheticCapture:
    def __init__(
        self, *, frames: int | None, fps: float | None, size: tuple[int, int], stop: threading.Event
    ) -> None:
        self.total_frames = frames
        self.fps = fps
        self._size = size
        self._stop = stop
        self._number = 0
        self._start = time.monotonic()

    def read(self) -> tuple[np.ndarray, float, float] | None:
        if self.total_frames is not None and self._number >= self.total_frames:
            return None
        if self.fps is not None:
            due = self._start + self._number / self.fps
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return None
        image = synthetic_frame(self._number, *self._size)
        self._number += 1
        return image, time.time(), time.monotonic()

    def release(self) -> None:
        pass


LISTEN_TIMEOUT = 10
"""Seconds an RTSP listener (``rtsp_flags=listen``) waits for a push per attempt when no
``listen_timeout`` is given (FFmpeg's own default, -1, is refused by its TCP layer)."""


def _listens(options: Mapping[str, str]) -> bool:
    """Whether FFmpeg's options make it wait for an RTSP push (``rtsp_flags=listen``)."""
    return "listen" in str(options.get("rtsp_flags", "")).replace("+", " ").split()


def _listen_options(
    options: Mapping[str, str], open_timeout: float
) -> tuple[dict[str, str], float]:
    """A listener's FFmpeg options with a valid ``listen_timeout`` (seconds), and an OpenCV open
    timeout that outlasts it (else OpenCV interrupts the wait for the push).

    FFmpeg's default ``listen_timeout`` of -1 ("wait for ever") is passed on to its TCP layer as
    -1000 ms, which refuses it (``Value -1000.000000 for parameter 'listen_timeout' out of
    range``): without a timeout of its own, a listener never opens.
    """
    chosen = dict(options)
    if "listen_timeout" not in chosen:
        chosen["listen_timeout"] = str(max(LISTEN_TIMEOUT, math.ceil(open_timeout)))
    try:
        seconds = float(chosen["listen_timeout"])
    except ValueError:
        seconds = open_timeout
    return chosen, max(open_timeout, seconds + 5)


def _check_camera_exists(target: int | str) -> None:
    """On Linux, refuse a camera whose device node does not exist (OpenCV would only warn)."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/dev"):
        return
    if isinstance(target, int):
        node = f"/dev/video{target}"
    elif target.startswith("/dev/video"):
        node = target
    else:
        return  # a file read through the webcam code path (kind="webcam")
    if not os.path.exists(node):
        found = sorted(str(p) for p in Path("/dev").glob("video*"))
        here = ", ".join(found) if found else "none"
        raise SourceError(f"no camera at {node} (cameras on this machine: {here})")


def _shown(target: int | str) -> str:
    """A target for messages, without any password in a URL."""
    return f"camera {target}" if isinstance(target, int) else redact_url(target)


# -- the queue between the reader thread and the consumer ----


@dataclass
class _Group:
    """Consecutive frames that the encoder turns into one latent (frame 0 alone, then fours)."""

    key: tuple[int, int]  # (run, group number within the run)
    size: int  # frames in a complete group
    frames: list[SourceFrame] = field(default_factory=list)
    taken: int = 0


def _group_number(frame_number: int, group_frames: int) -> int:
    return 0 if frame_number == 0 else (frame_number - 1) // group_frames + 1


class _GroupQueue:
    """Frames in encoder groups; live: drop oldest untouched whole groups; otherwise: block."""

    def __init__(
        self,
        *,
        max_groups: int,
        drop: bool,
        group_frames: int,
        stats: SourceStats,
        wake: Callable[[], None],
        abandoned: Callable[[], bool] = lambda: False,
    ) -> None:
        self._abandoned = abandoned  # the consumer's event loop is gone: stop waiting for it
        self._cond = threading.Condition()
        self._groups: deque[_Group] = deque()
        self._max_groups = max_groups
        self._drop = drop
        self._group_frames = group_frames
        self._stats = stats
        self._wake = wake
        self._closed = False
        self._error: BaseException | None = None

    def put(self, frame: SourceFrame) -> bool:
        """Queue a frame (blocking when full unless dropping); ``False`` once the queue is closed."""
        number = _group_number(frame.number, self._group_frames)
        key = (frame.run, number)
        with self._cond:
            if self._closed:
                self._stats.discarded_at_stop += 1
                return False
            if self._groups and self._groups[-1].key == key:
                self._groups[-1].frames.append(frame)
            else:
                if not self._drop:
                    while len(self._groups) >= self._max_groups and not self._closed:
                        if self._abandoned():
                            self._closed = True
                            break
                        self._cond.wait(0.5)
                    if self._closed:
                        self._stats.discarded_at_stop += 1
                        return False
                size = 1 if number == 0 else self._group_frames
                self._groups.append(_Group(key, size, [frame]))
                if self._drop:
                    self._drop_overflow()
        self._wake()
        return True

    def _drop_overflow(self) -> None:
        # Protected, and not counted against max_groups: a group already handed out in part
        # (it must be finished) and frame 0 of the newest run (so that the encoder's groups
        # stay aligned with the source's). The newest group is the one being filled: it stays
        # too. Frame 0 of an older run goes only with the whole of that run (nothing of it has
        # been handed out yet), so a flapping camera cannot grow the queue a group per reconnect.
        newest_run = self._groups[-1].key[0]
        waiting = [g for g in self._groups if not g.taken and g.key != (newest_run, 0)]
        excess = len(waiting) - self._max_groups
        for group in waiting[:-1]:
            if excess <= 0:
                break
            if group.key[1] == 0:
                doomed = [g for g in waiting[:-1] if g.key[0] == group.key[0]]
            elif group in self._groups:
                doomed = [group]
            else:
                continue  # gone with its run
            for old in doomed:
                self._groups.remove(old)
                self._stats.dropped_frames += len(old.frames)
                self._stats.dropped_groups += 1
                excess -= 1

    def take(self) -> SourceFrame | None:
        """The next frame, or ``None`` if none is ready yet. Raises :class:`_Ended` at the end."""
        with self._cond:
            while self._groups:
                first = self._groups[0]
                if first.taken < len(first.frames):
                    frame = first.frames[first.taken]
                    first.taken += 1
                    self._stats.frames_delivered += 1
                    self._retire_first()
                    self._cond.notify_all()
                    return frame
                if len(self._groups) > 1 or len(first.frames) >= first.size:
                    self._groups.popleft()
                    self._cond.notify_all()
                    continue
                break  # the reader is still filling this group
            if self._closed:
                raise _Ended(self._error)
            return None

    def _retire_first(self) -> None:
        first = self._groups[0]
        done = first.taken == len(first.frames)
        if done and (len(first.frames) >= first.size or len(self._groups) > 1):
            self._groups.popleft()

    def ended(self) -> tuple[bool, BaseException | None]:
        """Whether the reader has closed the queue, and the error it closed it with."""
        with self._cond:
            return self._closed, self._error

    def close(self, error: BaseException | None = None, *, discard: bool = False) -> None:
        """No more frames: the consumer gets what is queued (unless ``discard``), then the end."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._error = error
            if discard:
                self._stats.discarded_at_stop += sum(len(g.frames) - g.taken for g in self._groups)
                self._groups.clear()
            self._cond.notify_all()
        self._wake()


class _Ended(Exception):
    def __init__(self, error: BaseException | None) -> None:
        super().__init__()
        self.error = error


# -- the source ----


class FrameSource:
    """An async iterator of :class:`SourceFrame` read by a worker thread; an async context manager.

    Made by :func:`open_source`. ``stats`` counts frames read, delivered and dropped, and
    reconnections; ``total_frames`` and ``fps`` are known once the source has opened (``None``
    for live sources or where the container does not say). :meth:`stop` ends the iteration
    promptly from anywhere in the event loop; :meth:`aclose` (or leaving the ``async with``)
    also waits for the reader thread to finish.
    """

    def __init__(
        self,
        uri: str | int,
        *,
        kind: SourceKind,
        size: tuple[int, int] | None,
        resize: ResizeMode,
        live: bool,
        reconnect: bool,
        max_queued_groups: int,
        backoff: Backoff,
        max_reconnects: int | None,
        open_timeout: float,
        read_timeout: float,
        ffmpeg_options: Mapping[str, str] | None,
        group_frames: int,
        password: str | None = None,
    ) -> None:
        self.uri = uri
        self._password = password
        self.kind: SourceKind = kind
        self.size = size
        self.resize: ResizeMode = resize
        self.live = live
        self.reconnect = reconnect
        self.stats = SourceStats()
        self.total_frames: int | None = None
        self.fps: float | None = None
        self._backoff = backoff
        self._max_reconnects = max_reconnects
        self._open_timeout = open_timeout
        self._read_timeout = read_timeout
        self._ffmpeg_options = dict(ffmpeg_options or {})
        self._group_frames = group_frames
        self._max_queued_groups = max_queued_groups
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._queue: _GroupQueue | None = None
        self._opened = False  # set once by the reader thread, read by the event loop
        self._synthetic = _synthetic_options(uri) if kind == "synthetic" else None

    def __repr__(self) -> str:
        return f"FrameSource({_shown(self.uri) if isinstance(self.uri, str) else self.uri!r}, kind={self.kind!r}, live={self.live})"

    # -- async iteration ----

    def _start(self) -> _GroupQueue:
        if self._queue is not None:
            return self._queue
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._queue = _GroupQueue(
            max_groups=self._max_queued_groups,
            drop=self.live,
            group_frames=self._group_frames,
            stats=self.stats,
            wake=self._wake,
            abandoned=self._loop_closed,
        )
        self._thread = threading.Thread(
            target=self._read_loop, name=f"streamvae-source-{self.kind}", daemon=True
        )
        self._thread.start()
        return self._queue

    def _loop_closed(self) -> bool:
        """The consumer's event loop has closed (a source never closed): the reader stops."""
        loop = self._loop
        return loop is not None and loop.is_closed()

    def _wake(self) -> None:
        loop, ready = self._loop, self._ready
        if loop is None or ready is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(ready.set)

    def __aiter__(self) -> FrameSource:
        return self

    async def __anext__(self) -> SourceFrame:
        queue = self._start()
        assert self._ready is not None
        while True:
            try:
                frame = queue.take()
            except _Ended as end:
                if end.error is not None:
                    raise end.error from None
                raise StopAsyncIteration from None
            if frame is not None:
                return frame
            self._ready.clear()
            await self._ready.wait()

    async def __aenter__(self) -> FrameSource:
        self._start()
        return self

    @property
    def has_opened(self) -> bool:
        """Whether the source has opened at least once (see :meth:`opened`)."""
        return self._opened

    async def opened(self) -> bool:
        """Wait until the source has opened for the first time (starting its reader if need be):
        ``True`` then, and ``total_frames`` and ``fps`` are known; ``False`` if it was stopped
        first. Raises :class:`SourceError` if it ended before opening (a file that is no video or
        has no frame, a stream that gave up reconnecting), so that a command can refuse a bad input
        before it creates any output. A reconnecting source keeps retrying meanwhile::

            async with open_source("clip.mp4") as source:
                await source.opened()  # SourceError: could not open clip.mp4
        """
        queue = self._start()
        assert self._ready is not None
        while not self._opened:
            ended, error = queue.ended()
            if error is not None:
                raise error
            if ended:
                return False
            self._ready.clear()
            await self._ready.wait()
        return True

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def stop(self) -> None:
        """End the iteration now (queued frames are discarded and counted in
        ``stats.discarded_at_stop``); the reader thread winds down. A source never stopped or
        closed stops its reader by itself once its event loop has closed."""
        self._stop.set()
        if self._queue is not None:
            self._queue.close(discard=True)

    async def aclose(self, *, timeout: float | None = None) -> None:
        """Stop, then wait (up to ``timeout``, default ``open_timeout + read_timeout + 1`` s) for
        the reader thread; a thread still blocked in OpenCV after that is logged and left as a
        daemon."""
        self.stop()
        thread = self._thread
        if thread is None:
            return
        limit = timeout if timeout is not None else self._open_timeout + self._read_timeout + 1
        deadline = time.monotonic() + limit
        while thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if thread.is_alive():
            log.warning("the reader of %r is still blocked after %.1f s; leaving it", self, limit)

    # -- the reader thread ----

    def _open(self) -> _Capture:
        if self.kind == "synthetic":
            assert self._synthetic is not None
            frames, fps, size = self._synthetic
            return _SyntheticCapture(
                frames=frames,
                fps=fps,
                size=size or self.size or DEFAULT_SYNTHETIC_SIZE,
                stop=self._stop,
            )
        target: int | str = self.uri
        if isinstance(target, str) and target.strip().isdigit():
            target = int(target)
        if isinstance(target, str) and target.startswith("file://"):
            target = target[len("file://") :]
        if isinstance(target, str) and self._password is not None:
            target = with_password(target, self._password)
        backend = cv2.CAP_ANY if self.kind in ("webcam", "file") else cv2.CAP_FFMPEG
        params: list[int] = []
        ffmpeg_options = self._ffmpeg_options
        if self.kind == "network":
            open_timeout = self._open_timeout
            if _listens(ffmpeg_options):
                ffmpeg_options, open_timeout = _listen_options(ffmpeg_options, open_timeout)
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(open_timeout * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(self._read_timeout * 1000),
            ]
        if self.kind == "webcam":
            _check_camera_exists(target)
        try:
            capture = _OpenCvCapture(
                target, backend=backend, params=params, ffmpeg_options=ffmpeg_options
            )
        except SourceError as exc:
            if self.kind != "file":
                raise
            raise SourceError(
                f"{exc}: not a video OpenCV can decode (expected a video file such as .mp4, "
                ".mkv, .avi or .webm)"
            ) from None
        if self.kind == "webcam":
            capture._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a backlog
        else:  # files and streams: OpenCV's position is the frame's presentation time
            capture.stream_times = True
        return capture

    def _read_loop(self) -> None:
        queue = self._queue
        assert queue is not None
        run = 0
        delivered_any = False
        failures = 0
        error: BaseException | None = None
        try:
            while not self._stop.is_set():
                try:
                    capture = self._open()
                except SourceError as exc:
                    self.stats.last_error = str(exc)
                    failures += 1
                    if not self.reconnect or (
                        self._max_reconnects is not None and failures > self._max_reconnects
                    ):
                        error = exc
                        break
                    delay = self._backoff.next_delay()
                    log.info("%s; retrying in %.1f s", exc, delay)
                    self._stop.wait(delay)
                    continue
                if delivered_any:
                    run += 1
                    self.stats.reconnects += 1
                self.total_frames, self.fps = capture.total_frames, capture.fps
                if self.reconnect:  # a camera or stream: opening is enough (frames may wait)
                    self._mark_opened()
                number = self._pump(capture, queue, run)
                if not number and not self.reconnect and not self._stop.is_set():
                    # a file OpenCV opens but that has no frame it can decode: refused like one
                    # it cannot open, so that no command writes an empty output for it
                    error = SourceError(
                        f"{_shown(self.uri)} opened but gave no frame (expected a video with at "
                        "least one frame OpenCV can decode)"
                    )
                    break
                if number:
                    delivered_any = True
                    failures = 0
                    self._backoff.reset()
                if not self.reconnect or self._stop.is_set():
                    break
                self.stats.disconnects += 1
                self.stats.last_error = f"{_shown(self.uri)} stopped after {number} frames"
                if not number:  # opened, then nothing: as much a failed attempt as no open
                    failures += 1
                    if self._max_reconnects is not None and failures > self._max_reconnects:
                        error = SourceError(
                            f"{_shown(self.uri)} opened but gave no frame {failures} times in a "
                            f"row (max_reconnects={self._max_reconnects})"
                        )
                        break
                delay = self._backoff.next_delay()
                log.info("%s; reopening in %.1f s", self.stats.last_error, delay)
                self._stop.wait(delay)
        except BaseException as exc:  # an unexpected failure: the consumer sees it
            error = SourceError(f"reading {_shown(self.uri)} failed: {exc!r}")
            error.__cause__ = exc
        finally:
            queue.close(error)

    def _mark_opened(self) -> None:
        if not self._opened:
            self._opened = True
            self._wake()

    def _pump(self, capture: _Capture, queue: _GroupQueue, run: int) -> int:
        """Read until the capture ends, fails or the source stops; the number of frames read."""
        number = 0
        try:
            while not self._stop.is_set():
                if self._loop_closed():
                    self._stop.set()  # nobody can read what we would queue
                    break
                item = capture.read()
                if item is None:
                    break
                image, timestamp, captured = item
                image = fit_frame(image, self.size, self.resize)
                frame = SourceFrame(
                    image,
                    timestamp,
                    gap=run > 0 and number == 0,
                    number=number,
                    run=run,
                    captured=captured,
                    stream_time=getattr(capture, "stream_time", None),
                )
                self.stats.frames_read += 1
                number += 1
                self._mark_opened()  # a file or synthetic source: opened once it gives a frame
                if not queue.put(frame):
                    break
        finally:
            capture.release()
        return number


def _synthetic_options(uri: str | int) -> tuple[int | None, float | None, tuple[int, int] | None]:
    assert isinstance(uri, str)
    parts = urlsplit(uri)
    pattern = parts.netloc or parts.path.strip("/")
    if pattern not in SYNTHETIC_PATTERNS:
        raise ValueError(
            f"unknown synthetic pattern {pattern!r} in {uri!r}; known: "
            + ", ".join(f"synthetic://{name}" for name in SYNTHETIC_PATTERNS)
        )
    query = {
        key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()
    }
    unknown = set(query) - {"frames", "fps", "size"}
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} in {uri!r}; synthetic sources take frames=N, "
            "fps=F and size=HxW"
        )
    try:
        frames = int(query["frames"]) if "frames" in query else None
        fps = float(query["fps"]) if "fps" in query else None
    except ValueError:
        raise ValueError(f"frames must be an integer and fps a number in {uri!r}") from None
    if (frames is not None and frames < 1) or (fps is not None and not 0 < fps < 10_000):
        raise ValueError(f"frames must be >= 1 and fps in (0, 10000) in {uri!r}")
    return frames, fps, parse_size(query["size"]) if "size" in query else None


def _unknown_scheme(uri: str) -> str:
    """The message for ``scheme://...`` with a scheme no source reads (a typo, most often)."""
    scheme = uri.split("://", 1)[0]
    known = sorted(NETWORK_SCHEMES | {"synthetic", "file"})
    swapped = [name for name in known if sorted(name) == sorted(scheme.lower())]  # rstp -> rtsp
    close = swapped or difflib.get_close_matches(scheme.lower(), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}://? " if close else ""
    return (
        f"unknown scheme {scheme + '://'!r} in {redact_url(uri)!r} ({hint}sources read "
        + ", ".join(f"{name}://" for name in known)
        + ", a camera such as 0 or /dev/video0, or a file path)"
    )


def with_password(url: str, password: str) -> str:
    """``scheme://user@host/...`` with ``password`` put in (percent-encoded); only ever passed to
    OpenCV, never shown (messages use :func:`streamvae.io.redact.redact_url`)."""
    parts = urlsplit(url)
    if not parts.username:
        raise ValueError(
            f"a source password needs the user in the URL (scheme://USER@host/...), got "
            f"{redact_url(url)!r}"
        )
    if parts.password is not None:
        raise ValueError(f"the URL {redact_url(url)!r} already holds a password")
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username}:{quote(password, safe='')}@{host}").geturl()


def open_source(
    uri: str | int | Path,
    *,
    size: str | tuple[int, int] | None = None,
    resize: ResizeMode = "resize",
    kind: SourceKind | Literal["auto"] = "auto",
    live: bool | None = None,
    reconnect: bool | None = None,
    max_queued_groups: int = 2,
    backoff: Backoff | None = None,
    max_reconnects: int | None = None,
    open_timeout: float = 10.0,
    read_timeout: float = 5.0,
    ffmpeg_options: Mapping[str, str] | None = None,
    group_frames: int = GROUP_FRAMES,
    password: str | None = None,
) -> FrameSource:
    """Open a video source as an async iterator of :class:`SourceFrame` (see the module docstring).

    - ``size``: ``"HxW"`` or ``(H, W)``, multiples of 8; frames are brought to it by ``resize``
      (``"resize"`` scales, ``"crop"`` scales to cover and keeps the centre). ``None`` keeps the
      source's size (the encoder then needs it to be a multiple of 8).
    - ``kind``: override what the URI is taken for; e.g. ``kind="webcam"`` with a file path runs
      the webcam code path (live, reconnecting) on a file.
    - ``live``: drop whole groups when the consumer falls behind (default for webcams, network
      streams and a synthetic source with ``fps``) rather than wait (files).
    - ``reconnect``: reopen after a failure with ``backoff`` (default: live sources do;
      ``max_reconnects`` failed attempts in a row end the source with :class:`SourceError`, an
      open that gives no frame counting as a failed attempt; ``None`` never gives up).
    - ``max_queued_groups``: how many groups wait between the reader and the consumer.
    - ``open_timeout`` / ``read_timeout``: seconds before OpenCV gives up opening or reading a
      network stream (which then counts as a failure).
    - ``ffmpeg_options``: FFmpeg demuxer options for network streams, e.g.
      ``{"rtsp_transport": "tcp"}`` or ``{"rtsp_flags": "listen"}`` to receive an RTSP push.
    - ``password``: a network stream's password, put into ``scheme://user@host/...`` only when
      OpenCV opens it, so that it need not be in the URL (see :data:`SOURCE_PASSWORD_ENV`).
      Messages and logs never show it, nor a password in the URL, nor the values of
      secret-looking query parameters (``?pwd=...``, ``?token=...``).
    """
    if isinstance(uri, Path):
        uri = str(uri)
    chosen: SourceKind = source_kind(uri) if kind == "auto" else kind
    if chosen not in ("file", "webcam", "network", "synthetic"):
        raise ValueError(f"kind must be auto, file, webcam, network or synthetic, got {kind!r}")
    if resize not in ("resize", "crop"):
        raise ValueError(f"resize must be 'resize' or 'crop', got {resize!r}")
    if max_queued_groups < 1:
        raise ValueError(f"max_queued_groups must be >= 1, got {max_queued_groups}")
    if chosen == "file" and isinstance(uri, str):
        path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
        if path.is_dir():
            raise IsADirectoryError(
                f"{str(path)!r} is a directory, not a video file (serve takes several sources: "
                "streamvae serve --source ID=URI ...)"
            )
        if not path.is_file():
            typed = uri[len("file://") :] if uri.startswith("file://") else uri
            if "://" in typed:
                raise ValueError(_unknown_scheme(typed))
            raise FileNotFoundError(
                f"no video file at {typed!r} (a camera is 0 or /dev/video0; streams start "
                "with rtsp://, http://, ...; synthetic://moving is a built-in test pattern)"
            )
    if password is not None:
        if chosen != "network" or not isinstance(uri, str):
            raise ValueError(f"a password is for network streams, not a {chosen} source")
        with_password(uri, password)  # checked now: a clear error before anything runs
    synthetic_paced = chosen == "synthetic" and _synthetic_options(uri)[1] is not None
    is_live = live if live is not None else chosen in ("webcam", "network") or synthetic_paced
    return FrameSource(
        uri,
        kind=chosen,
        size=parse_size(size),
        resize=resize,
        live=is_live,
        reconnect=reconnect if reconnect is not None else chosen in ("webcam", "network"),
        max_queued_groups=max_queued_groups,
        backoff=backoff or Backoff(),
        max_reconnects=max_reconnects,
        open_timeout=open_timeout,
        read_timeout=read_timeout,
        ffmpeg_options=ffmpeg_options,
        group_frames=group_frames,
        password=password,
    )
