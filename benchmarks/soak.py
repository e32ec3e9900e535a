"""Soak: push many frames through one StreamEncoder; memory must stay flat, latency stable.

    python benchmarks/soak.py --frames 2000 --size 32x32            # full Wan 2.1 config
    python benchmarks/soak.py --frames 10000 --size 16x16 --narrow 8

Prints (and returns) RSS after warm-up and at the end, the bytes each frame after warm-up added
to the RSS and to Python's heap (tracemalloc), the push-latency medians of the first and last
windows after warm-up, and the exact latent count. A leak of one small frame per push shows in
the bytes per frame (a 16x16 uint8 frame is 768 B) where a percentage of a ~500 MB RSS cannot.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import psutil
import torch

from streamvae import WAN21, StreamEncoder, WanEncoder, narrow
from streamvae.weights import random_encoder


@dataclass(frozen=True)
class SoakResult:
    frames: int
    latents: int
    expected_latents: int
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_growth: float
    rss_bytes_per_frame: float
    python_bytes_per_frame: float
    push_ms_p50_first: float
    push_ms_p50_last: float
    latency_drift: float
    state_bytes: int


def run_soak(
    encoder: WanEncoder,
    frames: int,
    height: int,
    width: int,
    warmup: int = 200,
    *,
    on_latents: Callable[[list], None] | None = None,
) -> SoakResult:
    """Push ``frames`` synthetic frames (a moving gradient) one at a time and measure.

    ``on_latents`` sees each push's latents (the tests use it to plant a leak on purpose).
    """
    stream = StreamEncoder(encoder)
    process = psutil.Process()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    window = max(50, min(1000, (frames - warmup) // 4))
    push_ms = np.zeros(frames)  # preallocated: a growing list would count as a leak
    latents = 0
    rss_warm = 0.0
    traced_warm = 0
    tracing = tracemalloc.is_tracing()
    try:
        for t in range(frames):
            shift = t % width
            frame = np.ascontiguousarray(base[:, shift : shift + width])
            started = time.perf_counter()
            out = stream.push(frame, timestamp=time.time())
            push_ms[t] = (time.perf_counter() - started) * 1e3
            latents += len(out)
            if on_latents is not None:
                on_latents(out)
            del out, frame
            if t == warmup - 1:
                gc.collect()
                rss_warm = process.memory_info().rss / 2**20
                if not tracing:
                    tracemalloc.start()
                traced_warm = tracemalloc.get_traced_memory()[0]
        latents += len(stream.flush())
        gc.collect()
        traced_end = tracemalloc.get_traced_memory()[0]
    finally:
        if not tracing:
            tracemalloc.stop()
    rss_end = process.memory_info().rss / 2**20
    measured = max(1, frames - warmup)
    after = push_ms[warmup:]
    first, last = float(np.median(after[:window])), float(np.median(after[-window:]))
    return SoakResult(
        frames=frames,
        latents=latents,
        expected_latents=1 + (frames - 1) // 4,
        rss_after_warmup_mb=round(rss_warm, 1),
        rss_end_mb=round(rss_end, 1),
        rss_growth=round(rss_end / rss_warm - 1, 4),
        rss_bytes_per_frame=round((rss_end - rss_warm) * 2**20 / measured, 1),
        python_bytes_per_frame=round((traced_end - traced_warm) / measured, 2),
        push_ms_p50_first=round(first, 3),
        push_ms_p50_last=round(last, 3),
        latency_drift=round(last / first, 3),
        state_bytes=stream.state_nbytes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", default="32x32")
    parser.add_argument(
        "--narrow", type=int, default=0, help="base width of a narrow config (0: Wan 2.1)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    config = narrow(args.narrow) if args.narrow else WAN21
    encoder = random_encoder(config, dtype=getattr(torch, args.dtype))
    result = run_soak(encoder, args.frames, height, width)
    print(
        json.dumps(
            {"config": config.name, "size": args.size, "dtype": args.dtype, **asdict(result)},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
