"""Live mode: what ``streamvae live`` runs, measured, at the rates a camera delivers.

The shipped pipeline, not a model of it: a paced ``synthetic://moving?fps=F`` source
(:func:`streamvae.io.open_source`, a live source: its reader thread keeps the newest frames and
drops the oldest whole groups when the encoder falls behind, as a webcam or RTSP stream does)
feeds :func:`streamvae.io.encode_to_sinks` with a :class:`~streamvae.StreamEncoder` (its worker
thread), and a sink records when each latent reaches it. Latency of a latent: from the capture
of its last frame (``SourceFrame.captured``) to the latent in the sink, queueing included.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from streamvae.bench.peers import new_stream
from streamvae.bench.timing import percentiles_ms
from streamvae.io.pipeline import encode_to_sinks
from streamvae.io.sources import open_source, synthetic_frame
from streamvae.model import WanEncoder
from streamvae.stream import Latent

__all__ = ["DEFAULT_MAX_QUEUED_GROUPS", "LatencySink", "LiveResult", "run_live"]

DEFAULT_MAX_QUEUED_GROUPS = 2
"""As ``streamvae live --max-queued-groups``' default."""


class LatencySink:
    """A :class:`~streamvae.io.LatentSink` that records, per latent, the seconds from the capture
    of its last frame to its arrival here (``time.monotonic()``, the sources' clock)."""

    def __init__(self) -> None:
        self.latency_s: list[float] = []
        self.indices: list[int] = []

    async def send(self, latent: Latent) -> None:
        if latent.captured is None:
            raise ValueError(f"latent {latent.index} carries no capture time: not from a source")
        self.latency_s.append(time.monotonic() - latent.captured)
        self.indices.append(latent.index)


@dataclass
class LiveResult:
    """What one paced live run saw (the source's counts and the sink's latencies)."""

    fps: float
    frames: int
    group_size: int
    latency_s: list[float] = field(default_factory=list)
    groups: int = 0
    """Groups the source produced (frame 0 alone, then every complete group of ``group_size``)."""
    dropped_groups: int = 0
    """Whole groups the source dropped because the encoder was behind (its ``SourceStats``)."""
    dropped_frames: int = 0
    frames_encoded: int = 0
    encode_fps: float = 0.0

    @property
    def group_period(self) -> float:
        """Seconds between two groups' last frames at this rate."""
        return self.group_size / self.fps

    def as_json(self) -> dict[str, Any]:
        on_time = sum(1 for t in self.latency_s if t <= self.group_period)
        return {
            "fps": self.fps,
            "frames": self.frames,
            "latency_ms": percentiles_ms(self.latency_s),
            "latency_samples_ms": [round(t * 1e3, 3) for t in self.latency_s],
            "groups": self.groups,
            "dropped_groups": self.dropped_groups,
            "dropped_frames": self.dropped_frames,
            "frames_encoded": self.frames_encoded,
            "encode_fps": round(self.encode_fps, 3),
            "latents": len(self.latency_s),
            "on_time_fraction": round(on_time / len(self.latency_s), 3) if self.latency_s else None,
            "group_period_ms": round(self.group_period * 1e3, 2),
            "pipeline": "open_source(synthetic://moving?fps=F) -> encode_to_sinks -> sink",
        }


def run_live(
    encoder: WanEncoder,
    fps: float,
    frames: int,
    size: tuple[int, int],
    memory_format: torch.memory_format,
    mode: str,
    *,
    cuda_graphs: bool,
    max_queued_groups: int = DEFAULT_MAX_QUEUED_GROUPS,
) -> LiveResult:
    """``frames`` frames of ``size`` from a source paced at ``fps``, through the shipped pipeline.

    The stream is warmed up first, unpaced, on the same pattern (on CUDA twice: the second pass
    captures its CUDA graphs), then reset: the paced run measures a warm encoder.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    group = encoder.config.temporal_stride
    stream = new_stream(encoder, memory_format, mode, cuda_graphs=cuda_graphs)
    cuda = encoder.device.type == "cuda"
    warm = frames if cuda else min(frames, 2 * group + 1)
    for _ in range(2 if cuda else 1):
        for number in range(warm):
            stream.push(synthetic_frame(number, *size))
        stream.reset()
    uri = f"synthetic://moving?frames={frames}&fps={fps:g}&size={size[0]}x{size[1]}"
    sink = LatencySink()

    async def main() -> tuple[Any, Any]:
        async with open_source(
            uri, max_queued_groups=max_queued_groups, group_frames=group
        ) as source:
            stats = await encode_to_sinks(source, stream, [sink])
        return source.stats, stats

    source_stats, stats = asyncio.run(main())
    return LiveResult(
        fps=fps,
        frames=frames,
        group_size=group,
        latency_s=sink.latency_s,
        groups=1 + (frames - 1) // group,
        dropped_groups=source_stats.dropped_groups,
        dropped_frames=source_stats.dropped_frames,
        frames_encoded=stats.frames,
        encode_fps=stats.frames_per_second,
    )
