"""Source -> StreamEncoder -> sinks, with the counts and latencies the CLI reports.

>>> from streamvae.io import FileSink, encode_to_sinks, open_source
>>> async def main(encoder):                                               # doctest: +SKIP
...     async with open_source("clip.mp4", size="480x832") as source:
...         with FileSink("clip.latents") as sink:
...             stats = await encode_to_sinks(source, StreamEncoder(encoder), [sink])
...     print(stats.summary())
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streamvae.frames import Frame
from streamvae.stream import Latent, StreamEncoder

__all__ = [
    "LatentSink",
    "PipelineStats",
    "SinkError",
    "encode_to_sinks",
    "latent_latency",
    "percentiles",
]


class SinkError(RuntimeError):
    """A sink can no longer deliver latents (its connection task died); the message says why."""


class LatentSink(Protocol):
    """Anything latents can be sent to (:class:`FileSink`, :class:`MqttSink`, your own)."""

    async def send(self, latent: Latent) -> None: ...


def latent_latency(latent: Latent, now: float | None = None) -> float | None:
    """Seconds from the capture of a latent's last frame to its ready time, on the monotonic
    clock where the frames carry ``captured`` (a wall-clock step cannot corrupt it); else, or
    with ``now`` (wall-clock seconds), from its capture ``timestamps``."""
    if now is None and latent.captured is not None and latent.ready_monotonic is not None:
        return latent.ready_monotonic - latent.captured
    stamps = [s for s in latent.timestamps if s is not None]
    if not stamps:
        return None
    return (latent.ready_time if now is None else now) - max(stamps)


def percentiles(
    values: Iterable[float], points: Sequence[float] = (50, 90, 99)
) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ..., "max": ...}`` of ``values`` (empty if none)."""
    array = np.fromiter(values, dtype=np.float64)
    if array.size == 0:
        return {}
    result = {f"p{p:g}": float(np.percentile(array, p)) for p in points}
    result["max"] = float(array.max())
    return result


@dataclass
class PipelineStats:
    """Counts and timings of one :func:`encode_to_sinks` run (updated as it goes)."""

    frames: int = 0
    latents: int = 0
    gaps: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    """Capture of a latent's last frame -> latent ready, seconds (the most recent 100k)."""
    encoder_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    """The encoder's own time: push of a latent's last frame -> latent ready, seconds."""
    queue_waits: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    """Capture of a latent's last frame -> its push: the time it waited before the encoder took
    it (a file or an unpaced synthetic source is read ahead, so this is most of ``latencies``)."""
    dropped_by_encoder: int = 0
    """Frames of partial groups the encoder dropped (a source ending or restarting mid-group)."""

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.elapsed if self.elapsed > 0 else 0.0

    def latency_percentiles(self) -> dict[str, float]:
        return percentiles(self.latencies)

    def summary(self) -> dict[str, object]:
        """A JSON-ready summary (latencies in milliseconds)."""
        return {
            "frames": self.frames,
            "latents": self.latents,
            "gaps": self.gaps,
            "seconds": round(self.elapsed, 3),
            "frames_per_second": round(self.frames_per_second, 2),
            "latency_ms": _milliseconds(self.latencies),
            "encoder_latency_ms": _milliseconds(self.encoder_latencies),
            "queue_wait_ms": _milliseconds(self.queue_waits),
            "dropped_by_encoder": self.dropped_by_encoder,
        }


def _milliseconds(values: Iterable[float]) -> dict[str, float]:
    return {k: round(v * 1000, 2) for k, v in percentiles(values).items()}


async def _counted(
    frames: AsyncIterable[Frame],
    stats: PipelineStats,
    max_frames: int | None,
    pushed: deque[tuple[float, float]] | None = None,
) -> AsyncIterator[Frame]:
    if max_frames is not None and max_frames <= 0:
        return
    async for frame in frames:
        stats.frames += 1
        captured = getattr(frame, "captured", None)
        if pushed is not None and captured is not None:  # what this yields is pushed at once
            pushed.append((captured, time.monotonic()))
        yield frame
        if max_frames is not None and stats.frames >= max_frames:
            return


def _split_latency(
    latent: Latent, pushed: deque[tuple[float, float]], stats: PipelineStats
) -> None:
    """Record the encoder's own time and the queue's wait for ``latent``, from the push time of
    its last frame (found by its monotonic capture time; older entries are let go)."""
    if latent.captured is None or latent.ready_monotonic is None:
        return
    while pushed and pushed[0][0] < latent.captured:
        pushed.popleft()
    if pushed and pushed[0][0] == latent.captured:
        push_time = pushed[0][1]
        stats.encoder_latencies.append(latent.ready_monotonic - push_time)
        stats.queue_waits.append(push_time - latent.captured)


async def encode_to_sinks(
    frames: AsyncIterable[Frame],
    encoder: StreamEncoder,
    sinks: Sequence[LatentSink],
    *,
    meta: Mapping[str, str] | None = None,
    max_frames: int | None = None,
    on_latent: Callable[[Latent, PipelineStats], None] | None = None,
    stats: PipelineStats | None = None,
) -> PipelineStats:
    """Encode ``frames`` (a :class:`FrameSource` or any async iterable) and send every latent to
    every sink, in order; flushes the encoder at the end.

    ``meta`` is added to each latent's ``meta``; ``max_frames`` stops after that many frames;
    ``on_latent`` is called after each latent is sent (progress display). To stop early from
    elsewhere, stop the source (:meth:`FrameSource.stop`): the encoder is then flushed as at
    the end of a file. Pass ``stats`` to watch it while the run goes on.
    """
    stats = stats or PipelineStats()
    dropped_before = encoder.dropped_frames
    pushed: deque[tuple[float, float]] = deque()  # (captured, pushed) of frames, oldest first
    try:
        async with encoder.stream(_counted(frames, stats, max_frames, pushed)) as latents:
            async for latent in latents:
                if meta:
                    latent = dataclasses.replace(latent, meta={**latent.meta, **meta})
                for sink in sinks:
                    await sink.send(latent)
                stats.latents += 1
                stats.gaps += latent.gap
                latency = latent_latency(latent)
                if latency is not None:
                    stats.latencies.append(latency)
                _split_latency(latent, pushed, stats)
                if on_latent is not None:
                    on_latent(latent, stats)
    finally:
        stats.finished = time.monotonic()
        stats.dropped_by_encoder = encoder.dropped_frames - dropped_before
    return stats
