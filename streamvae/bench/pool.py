"""Benchmarks of many streams: ``streamvae bench --streams 1,2,4,8`` and ``--sweep``.

Streams (``--streams``): N streams of ``--size`` frames, one frame each per tick, through one
:class:`~streamvae.StreamPool` and through N separate :class:`~streamvae.StreamEncoder`\\ s on
the same encoder, interleaved repeats in one run (pool, separate, pool, ...; best of
``--repeats``). After warm-up ticks (every stream past its first frames), ``--ticks`` timed
ticks: aggregate frames/s and GFLOP/s (FLOPs counted on the meta device), per-stream latency
(a tick's frames arrive together; a stream's latency is from the tick's start to its latent:
for the pool the whole push, for separate encoders stepped in turn the pushes up to its own),
and the pool's mean batch. Phase schedules (``--phases``): ``aligned`` (all streams start
together: one cohort), ``staggered`` (four start ticks, streams of one start in adjacent slots:
four contiguous cohorts), ``interleaved`` (start tick ``i % 4``: cohorts in non-adjacent slots,
stepped split into runs or, ``gather``, copied into one batch).

Sweep (``--sweep 32x32,64x64,...``): one stream per size, GFLOP/s of a steady-state group.

    streamvae bench --random-weights --device cpu --streams 1,2,4,8 --size 64x64 --json out.json
    streamvae bench --random-weights --device cpu --sweep 32x32,64x64,128x128,240x416
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamvae.bench.clips import synthetic_frames
from streamvae.bench.timing import Clock, percentiles_ms
from streamvae.model import WanEncoder
from streamvae.pool import StreamPool, TickBreakdown
from streamvae.stream import StreamEncoder

__all__ = [
    "PHASES",
    "StreamsResult",
    "SweepResult",
    "bench_streams",
    "bench_sweep",
    "format_breakdown",
    "format_stages",
    "format_streams",
    "format_sweep",
    "stage_times",
    "start_ticks",
    "stream_flops",
]

PHASES = ("aligned", "staggered", "interleaved", "interleaved-gather")
WARMUP_TICKS = 8


def start_ticks(streams: int, phases: str) -> list[int]:
    """The tick at which each stream's first frame comes, by phase schedule.

    >>> start_ticks(8, "aligned"), start_ticks(8, "staggered"), start_ticks(8, "interleaved")
    ([0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 3, 0, 1, 2, 3])
    """
    if phases == "aligned":
        return [0] * streams
    if phases == "staggered":
        return [i * 4 // streams for i in range(streams)]
    if phases.startswith("interleaved"):
        return [i % 4 for i in range(streams)]
    raise ValueError(f"phases must be one of {PHASES}, got {phases!r}")


@dataclass
class TickRun:
    seconds: float  # the timed ticks, end to end
    frames: int
    latencies: list[float] = field(default_factory=list)
    mean_batch: float = 1.0
    breakdown: dict[str, float] = field(default_factory=dict)  # the pool's, ms per tick


def _clips(streams: int, ticks: int, size: tuple[int, int]) -> list[list[np.ndarray]]:
    base = synthetic_frames(ticks + 4, *size)
    return [base[i % 4 : i % 4 + ticks] for i in range(streams)]


def run_ticks(
    encoder: WanEncoder,
    size: tuple[int, int],
    starts: Sequence[int],
    ticks: int,
    *,
    pooled: bool,
    gather: bool = False,
    cuda_graphs: bool = False,
    clock: Clock | None = None,
) -> TickRun:
    """``WARMUP_TICKS + ticks`` ticks of len(starts) streams; times the last ``ticks``."""
    clock = clock or Clock(encoder.device)
    ids = [f"s{i}" for i in range(len(starts))]
    clips = _clips(len(ids), WARMUP_TICKS + ticks, size)
    pool = StreamPool(encoder, cuda_graphs=cuda_graphs) if pooled else None
    alone = {} if pooled else {sid: StreamEncoder(encoder, cuda_graphs=cuda_graphs) for sid in ids}
    if pool is not None:
        pool.gather = gather
        for sid in ids:
            pool.add(sid, size=size)
    run = TickRun(0.0, 0)
    stepped_before = steps_before = 0
    for tick in range(WARMUP_TICKS + ticks):
        timed = tick >= WARMUP_TICKS
        if timed and tick == WARMUP_TICKS and pool is not None:
            stepped_before, steps_before = pool.stats.stepped_streams, pool.stats.steps
            pool.breakdown = TickBreakdown()  # the timed ticks only
        frames = {sid: clips[i][tick - starts[i]] for i, sid in enumerate(ids) if tick >= starts[i]}
        start = clock.now()
        if pool is not None:
            out = pool.push(frames)
            done = clock.now()
            got = [sid for sid, latents in out.items() if latents]
            run.latencies += [done - start] * len(got)
        else:
            for sid, frame in frames.items():
                latents = alone[sid].push(frame)
                if latents:
                    run.latencies.append(clock.now() - start)
            done = clock.now()
        if timed:
            run.seconds += done - start
            run.frames += len(frames)
    if pool is not None:
        steps = pool.stats.steps - steps_before
        run.mean_batch = (pool.stats.stepped_streams - stepped_before) / max(steps, 1)
        run.breakdown = pool.breakdown.per_tick_ms()
    return run


_FLOPS: dict[tuple[Any, ...], list[int]] = {}


def stream_flops(encoder: WanEncoder, size: tuple[int, int], frames: int) -> list[int]:
    """FLOPs of one stream's first ``k`` frames, for k = 0..frames, pushed one step each.

    Counted once per (config, dtype, size) on the meta device in one pass
    (:class:`torch.utils.flop_counter.FlopCounterMode`), as the pool steps them (shifted
    windows: a stream's first frames skip the time taps over the zeros before it).
    """
    from torch.utils.flop_counter import FlopCounterMode

    key = (encoder.config, encoder.dtype, size)
    known = _FLOPS.get(key, [0])
    if len(known) > frames:
        return known[: frames + 1]
    with torch.device("meta"):
        meta = WanEncoder(encoder.config).to(encoder.dtype)
    state = meta.new_state(*size, ring=False)
    frame = torch.zeros(1, 3, 1, *size, dtype=encoder.dtype, device="meta")
    counts = [0]
    with FlopCounterMode(display=False) as counter:
        for _ in range(frames):
            meta.step(frame, state)
            counts.append(int(counter.get_total_flops()))
    _FLOPS[key] = counts
    return counts


def _flops(encoder: WanEncoder, size: tuple[int, int], starts: Sequence[int], ticks: int) -> int:
    """FLOPs of the timed ticks (each stream's frames in them)."""
    end = WARMUP_TICKS + ticks
    upto = stream_flops(encoder, size, end)
    return sum(upto[end - s] - upto[max(WARMUP_TICKS - s, 0)] for s in starts)


@dataclass
class StreamsResult:
    """One (streams, phases) row: the pool against the same streams stepped alone."""

    streams: int
    phases: str
    size: tuple[int, int]
    pool_fps: float
    alone_fps: float
    pool_gflops: float
    alone_gflops: float
    pool_latency_ms: dict[str, float | None]
    alone_latency_ms: dict[str, float | None]
    mean_batch: float
    pool_breakdown_ms: dict[str, float] = field(default_factory=dict)
    """The pool's tick, ms per tick: host, uploads, each step, downloads, every sync
    (:meth:`streamvae.pool.TickBreakdown.per_tick_ms`), of its fastest repeat."""

    @property
    def speedup(self) -> float:
        return self.pool_fps / self.alone_fps

    def pixels_per_s(self) -> float:
        return self.pool_fps * self.size[0] * self.size[1]


def bench_streams(
    encoder: WanEncoder,
    size: tuple[int, int],
    counts: Sequence[int],
    *,
    phases: Sequence[str] = ("aligned",),
    ticks: int = 8,
    repeats: int = 3,
    cuda_graphs: bool = False,
) -> list[StreamsResult]:
    """Pool vs separate encoders for each stream count and phase schedule (interleaved repeats)."""
    results = []
    clock = Clock(encoder.device)
    for count in counts:
        for phase in phases:
            starts = start_ticks(count, phase)
            gather = phase.endswith("gather")
            flops = _flops(encoder, size, starts, ticks)
            pool_runs: list[TickRun] = []
            alone_runs: list[TickRun] = []
            for _ in range(repeats):
                for pooled, runs in ((True, pool_runs), (False, alone_runs)):
                    runs.append(
                        run_ticks(
                            encoder,
                            size,
                            starts,
                            ticks,
                            pooled=pooled,
                            gather=gather and pooled,
                            cuda_graphs=cuda_graphs,
                            clock=clock,
                        )
                    )
            pool = min(pool_runs, key=lambda r: r.seconds)
            alone = min(alone_runs, key=lambda r: r.seconds)
            results.append(
                StreamsResult(
                    streams=count,
                    phases=phase,
                    size=size,
                    pool_fps=pool.frames / pool.seconds,
                    alone_fps=alone.frames / alone.seconds,
                    pool_gflops=flops / pool.seconds / 1e9,
                    alone_gflops=flops / alone.seconds / 1e9,
                    pool_latency_ms=percentiles_ms(pool.latencies),
                    alone_latency_ms=percentiles_ms(alone.latencies),
                    mean_batch=pool.mean_batch,
                    pool_breakdown_ms=pool.breakdown,
                )
            )
    return results


def stage_times(
    encoder: WanEncoder, size: tuple[int, int], streams: int, *, ticks: int = 8
) -> dict[str, float]:
    """Milliseconds per tick spent in each stage of the encoder, ``streams`` aligned streams.

    Stages: ``stage0`` (``conv_in`` and the blocks before the first downsample, the downsample
    included), ``stage1``..``stage3``, ``mid``, ``head`` (``conv_out``). On CUDA, device time
    between CUDA events around each stage (no synchronisation inside a tick); elsewhere wall
    time. Over ``ticks`` ticks after the warm-up.
    """
    cuda = encoder.device.type == "cuda"
    marks: list[tuple[str, Any, Any]] = []
    timing = [False]

    def timed(name: str, step: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not timing[0]:
                return step(*args, **kwargs)
            if cuda:
                events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                events[0].record()
                out = step(*args, **kwargs)
                events[1].record()
                marks.append((name, *events))
            else:
                began = time.perf_counter()
                out = step(*args, **kwargs)
                marks.append((name, began, time.perf_counter()))
            return out

        return wrapper

    modules: list[tuple[str, Any]] = [("stage0", encoder.conv_in)]
    stage = 0
    for block in encoder.down_blocks:
        modules.append((f"stage{stage}", block))
        stage += type(block).__name__ == "Downsample"
    modules += [("mid", encoder.mid_block), ("head", encoder.conv_out)]
    for name, module in modules:
        module.step = timed(name, module.step)  # an instance attribute over the method
    try:
        pool = StreamPool(encoder)
        ids = [f"s{i}" for i in range(streams)]
        for sid in ids:
            pool.add(sid, size=size)
        frames = synthetic_frames(WARMUP_TICKS + ticks, *size)
        for tick, frame in enumerate(frames):
            timing[0] = tick >= WARMUP_TICKS
            pool.push(dict.fromkeys(ids, frame))
        Clock(encoder.device).sync()
    finally:
        for _, module in modules:
            del module.step
    totals: dict[str, float] = {name: 0.0 for name, _ in modules}
    for name, begin, end in marks:
        totals[name] += begin.elapsed_time(end) if cuda else (end - begin) * 1000
    return {name: total / ticks for name, total in totals.items()}


def format_stages(rows: dict[int, dict[str, float]]) -> str:
    names = list(next(iter(rows.values())))
    lines = [
        "| streams | " + " | ".join(f"{n} ms" for n in names) + " | ms per stream |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for streams, times in rows.items():
        cells = " | ".join(f"{times[n]:.2f}" for n in names)
        lines.append(f"| {streams} | {cells} | {sum(times.values()) / streams:.2f} |")
    return "\n".join(lines)


@dataclass
class SweepResult:
    size: tuple[int, int]
    ms_per_frame: float
    gflops: float


def bench_sweep(
    encoder: WanEncoder, sizes: Sequence[tuple[int, int]], *, repeats: int = 3
) -> list[SweepResult]:
    """One stream per size: a steady-state group's frames (5-8), best of ``repeats``."""
    clock = Clock(encoder.device)
    out = []
    for size in sizes:
        upto = stream_flops(encoder, size, 9)
        flops = upto[9] - upto[5]
        frames = synthetic_frames(9, *size)
        best = float("inf")
        for _ in range(repeats):
            stream = StreamEncoder(encoder)
            for frame in frames[:5]:
                stream.push(frame)
            start = clock.now()
            for frame in frames[5:]:
                stream.push(frame)
            best = min(best, clock.now() - start)
        out.append(SweepResult(size, best * 1000 / 4, flops / best / 1e9))
    return out


def _ms(values: dict[str, float | None], key: str) -> str:
    value = values.get(key)
    return "-" if value is None else f"{value:.1f}"


def format_streams(results: Sequence[StreamsResult]) -> str:
    lines = [
        "| streams | size | phases | mean batch | pool fps | alone fps | pool / alone "
        "| pool GFLOP/s | alone GFLOP/s | pool p50 / p99 ms | alone p50 / p99 ms "
        "| pool Mpixel/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.streams} | {r.size[0]}x{r.size[1]} | {r.phases} | {r.mean_batch:.2f} "
            f"| {r.pool_fps:.2f} | {r.alone_fps:.2f} | **{r.speedup:.2f}x** "
            f"| {r.pool_gflops:.1f} | {r.alone_gflops:.1f} "
            f"| {_ms(r.pool_latency_ms, 'p50')} / {_ms(r.pool_latency_ms, 'p99')} "
            f"| {_ms(r.alone_latency_ms, 'p50')} / {_ms(r.alone_latency_ms, 'p99')} "
            f"| {r.pixels_per_s() / 1e6:.3f} |"
        )
    return "\n".join(lines)


def format_breakdown(results: Sequence[StreamsResult]) -> str:
    """Where the pool's tick goes, one row per result: ms per tick in each part."""
    parts = ["total", "host", "uploads", "steps", "downloads", "syncs"]
    lines = [
        "| streams | size | phases | "
        + " | ".join(f"{p} ms" for p in parts)
        + " | each step, sync |",
        "|---|---|---|" + "---|" * (len(parts) + 1),
    ]
    for r in results:
        row = r.pool_breakdown_ms
        each = ", ".join(
            f"{key.removeprefix('step ')} {value:.2f}"
            for key, value in row.items()
            if key.startswith(("step ", "device step ", "sync "))
        )
        cells = " | ".join(f"{row.get(p, 0.0):.2f}" for p in parts)
        lines.append(f"| {r.streams} | {r.size[0]}x{r.size[1]} | {r.phases} | {cells} | {each} |")
    return "\n".join(lines)


def format_sweep(results: Sequence[SweepResult]) -> str:
    lines = ["| size | ms / frame | GFLOP/s |", "|---|---|---|"]
    lines += [
        f"| {r.size[0]}x{r.size[1]} | {r.ms_per_frame:.1f} | {r.gflops:.0f} |" for r in results
    ]
    return "\n".join(lines)
