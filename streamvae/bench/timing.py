"""Clocks and statistics: wall time after synchronised work, CUDA event time, percentiles, errors."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Clock", "Progress", "cuda_event_time", "median", "percentiles_ms", "rel_err"]


class Progress:
    """Progress lines of a long run on stderr (``bench [12.3 s] repeat 2/10``), flushed as
    they are written, so that a run under ``timeout`` or in a pipe shows where it is."""

    def __init__(self, prefix: str = "bench", *, enabled: bool = True) -> None:
        self.prefix = prefix
        self.enabled = enabled
        self.began = time.perf_counter()

    def __call__(self, what: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.began
            print(f"{self.prefix} [{elapsed:.1f} s] {what}", file=sys.stderr, flush=True)


class Clock:
    """Wall-clock seconds after the device's queued work has finished."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def cuda_event_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of device time of ``fn``'s work on the current stream (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 / mean / max in milliseconds (``None`` for an empty sample)."""
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None, "n": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p95": round(float(np.percentile(ms, 95)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "mean": round(float(ms.mean()), 3),
        "max": round(float(ms.max()), 3),
        "n": len(seconds),
    }


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in float32: the project's exactness measure."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
