"""``streamvae bench --warmup-stall``: what a stream starting up costs the streams already live.

A server (``serve``, ``web``, ``fleet worker``) starts a new stream while others run. Its start
does work once that its later frames do not: cuDNN's autotuning and, with CUDA graphs, one
capture per step signature (a capture synchronises the whole device first). This measures what
that costs a stream that is already live, three times on the same weights:

- ``alone``: the live stream by itself, for the baseline;
- ``warmed``: another stream joins as the servers start one: ``StreamEncoder.warmup`` first,
  then its frames;
- ``cold``: another stream joins without warming up (its first steps autotune and capture on
  the live path).

The live stream is a warmed :class:`~streamvae.StreamEncoder` fed frames at ``fps`` (each frame
due at ``start + i / fps``); the joining stream is another StreamEncoder on the same encoder,
in its own thread (on CUDA its own CUDA stream, as every StreamEncoder), fed at the same rate
once it has warmed up. A latent's latency is the time from its last frame's *due* time to the
latent on the host, so a push that waits behind the other stream's work, and any backlog it
leaves, are counted. The *stall* is the live stream's worst latency while the other stream was
starting (every live latent in flight between the other stream's first call and its latent 3,
by when each of its step signatures has run twice: eagerly, then captured) minus the alone
run's median: the target is less than one frame interval (``1000 / fps`` ms). The alone row's
own stall (its worst minus its median) is the noise floor the others are read against.

    streamvae bench --random-weights --device cuda --dtype bfloat16 --size 480x832 \\
        --warmup-stall 30
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamvae.bench.clips import synthetic_frames
from streamvae.bench.peers import new_stream
from streamvae.bench.timing import Progress, percentiles_ms
from streamvae.model import WanEncoder, default_memory_format
from streamvae.stream import StreamEncoder

__all__ = ["JOINS", "StallRow", "bench_warmup_stall", "format_stall"]

JOINS = ("alone", "warmed", "cold")

# A stream has started once latent 3 (frames 9-12) is out: by then each of its step
# signatures has run twice (the first time eagerly, the second captured into a CUDA graph).
_STARTED_AT = 3


@dataclass
class _Paced:
    """Latencies (seconds) of one paced stream's latents, each with its last frame's due time."""

    due: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)


@dataclass
class StallRow:
    """One run: the live stream's latencies (ms) over the whole run and while the other stream
    was starting, and the joining stream's warm-up and first latent."""

    join: str
    fps: float
    live_frames: int
    live_ms: dict[str, float | None]
    during_join_ms: dict[str, float | None]
    stall_ms: float | None = None
    join_warmup_ms: float | None = None
    join_first_latent_ms: float | None = None
    join_start_ms: float | None = None  # the other stream's first call to its latent 3

    @property
    def frame_interval_ms(self) -> float:
        return 1000.0 / self.fps

    @property
    def within_one_frame(self) -> bool | None:
        return None if self.stall_ms is None else self.stall_ms < self.frame_interval_ms


def _push_paced(
    stream: StreamEncoder,
    frames: Sequence[np.ndarray],
    fps: float,
    record: _Paced,
    *,
    until: threading.Event | None = None,
) -> int:
    """Push ``frames`` (cycled) at ``fps``, each due ``i / fps`` after the first; record each
    latent's latency from its last frame's due time. Stops after ``len(frames)`` frames, or,
    with ``until``, once that is set and at least ``len(frames)`` were pushed. Returns the
    frames pushed."""
    start = time.perf_counter()
    i = 0
    while i < len(frames) or (until is not None and not until.is_set()):
        due = start + i / fps
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        latents = stream.push(frames[i % len(frames)])
        ready = time.perf_counter()
        for _ in latents:
            record.due.append(due)
            record.latency.append(ready - due)
        i += 1
    return i


def _run(
    encoder: WanEncoder,
    live: StreamEncoder,
    join: str,
    frames: Sequence[np.ndarray],
    fps: float,
    cuda_graphs: bool,
    size: tuple[int, int],
    memory_format: torch.memory_format,
) -> StallRow:
    live.reset()
    record = _Paced()
    if join == "alone":
        pushed = _push_paced(live, frames, fps, record)
        stats = percentiles_ms(record.latency)
        return StallRow(join, fps, pushed, stats, percentiles_ms([]))

    joined = threading.Event()  # the other stream has ended: the live one may stop
    times: dict[str, float] = {}
    failure: list[BaseException] = []
    other = new_stream(encoder, memory_format, "frame", cuda_graphs=cuda_graphs)

    def join_run() -> None:
        try:
            times["began"] = time.perf_counter()
            if join == "warmed":
                other.warmup(*size)
            times["warm"] = time.perf_counter()
            mine = _Paced()
            _push_paced(other, frames, fps, mine)
            times["first_latency"] = mine.latency[0]
            # Its start: every step signature seen twice (eager, then captured) by latent 3.
            last = min(_STARTED_AT, len(mine.due) - 1)
            times["started"] = mine.due[last] + mine.latency[last]
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            joined.set()

    # The other stream starts a quarter of the way into the live stream's frames.
    thread = threading.Thread(target=join_run, name="streamvae-bench-join", daemon=True)
    starter = threading.Timer(max(1, len(frames) // 4) / fps, thread.start)
    starter.start()
    pushed = _push_paced(live, frames, fps, record, until=joined)
    starter.join()
    thread.join()
    if failure:
        raise failure[0]
    began = times["began"]
    started = times["started"]
    # Every live latent in flight while the other stream was starting.
    during = [
        lat
        for due, lat in zip(record.due, record.latency, strict=True)
        if due <= started and due + lat >= began
    ]
    return StallRow(
        join,
        fps,
        pushed,
        percentiles_ms(record.latency),
        percentiles_ms(during),
        join_warmup_ms=round((times["warm"] - began) * 1e3, 3) if join == "warmed" else None,
        join_first_latent_ms=round(times["first_latency"] * 1e3, 3),
        join_start_ms=round((started - began) * 1e3, 3),
    )


def bench_warmup_stall(
    encoder: WanEncoder,
    size: tuple[int, int],
    fps: float,
    frames: int,
    *,
    joins: Sequence[str] = JOINS,
    cuda_graphs: bool = True,
    progress: Progress | None = None,
) -> list[StallRow]:
    """One :class:`StallRow` per way of joining (``alone`` always runs first: the baseline).

    The live stream is pushed ``frames`` frames at ``fps`` (in a joining run, for as long as
    the other stream runs too); both streams hold ``encoder``'s weights, in frame mode, with
    ``cuda_graphs`` on CUDA. ``stall_ms``: a joining row's ``during_join_ms`` max (the alone
    row's own max: the noise floor) minus the alone row's median."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    unknown = sorted(set(joins) - set(JOINS))
    if unknown:
        raise ValueError(f"joins: choose from {', '.join(JOINS)}, got {', '.join(unknown)}")
    progress = progress or Progress()
    device = encoder.device
    graphs = cuda_graphs and device.type == "cuda"
    memory_format = default_memory_format(device, encoder.dtype)
    clip = synthetic_frames(frames, *size)
    live = new_stream(encoder, memory_format, "frame", cuda_graphs=graphs)
    progress(f"warmup stall: warming the live stream at {size[0]}x{size[1]}")
    live.warmup(*size)
    rows: list[StallRow] = []
    baseline: StallRow | None = None
    for join in ("alone", *(j for j in joins if j != "alone")):
        progress(f"warmup stall: {join} ({frames} live frames at {fps:g} frames/s)")
        row = _run(encoder, live, join, clip, fps, graphs, size, memory_format)
        if join == "alone":
            baseline = row
        assert baseline is not None
        typical = baseline.live_ms["p50"]
        worst = row.live_ms["max"] if join == "alone" else row.during_join_ms["max"]
        if worst is not None and typical is not None:
            row.stall_ms = round(max(0.0, worst - typical), 3)
        rows.append(row)
    if "alone" not in joins:
        rows = [row for row in rows if row.join != "alone"]
    return rows


def _cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_stall(rows: Sequence[StallRow]) -> str:
    """The table: per run, the live stream's latency (p50, p99, max over the run; max while
    the other stream started), the stall against the alone run, and the other stream's start."""
    lines = [
        "| other stream | live p50 ms | live p99 ms | live max ms | max while it started ms "
        "| stall ms | frame interval ms | within one frame | its warm-up ms "
        "| its first latent ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        within = {None: "-", True: "yes", False: "no"}[row.within_one_frame]
        lines.append(
            f"| {'none (alone)' if row.join == 'alone' else row.join} "
            f"| {_cell(row.live_ms['p50'])} | {_cell(row.live_ms['p99'])} "
            f"| {_cell(row.live_ms['max'])} | {_cell(row.during_join_ms['max'])} "
            f"| {_cell(row.stall_ms)} | {_cell(row.frame_interval_ms)} | {within} "
            f"| {_cell(row.join_warmup_ms)} | {_cell(row.join_first_latent_ms)} |"
        )
    return "\n".join(lines)
