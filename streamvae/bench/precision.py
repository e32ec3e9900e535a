"""``streamvae bench --precision``: one stream in float32, TF32, float16 and bfloat16 on the same
weights and frames: speed, and the error of each against float32 (global and per latent channel).

float32 is true float32 (TF32 off) unless asked: TF32 is its own row, run with cuDNN's and
cuBLAS's TF32 allowed and restored after. TF32 exists on CUDA only (on the CPU its row says so).
Errors are the project's measure, ``max |a - b| / max |b|``, over the whole latent and per
channel (the worst channel is reported with its index).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from streamvae.bench.clips import synthetic_frames
from streamvae.bench.peers import new_stream, run_stream
from streamvae.bench.timing import Clock, Progress, median, rel_err
from streamvae.model import WanEncoder, default_memory_format

__all__ = ["PRECISIONS", "bench_precision", "format_precision", "per_channel_errors"]

PRECISIONS = ("float32", "tf32", "float16", "bfloat16")
_DTYPES = {
    "float32": torch.float32,
    "tf32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def per_channel_errors(got: torch.Tensor, expected: torch.Tensor) -> list[float]:
    """``max |a - b| / max |b|`` per latent channel (dim 1 of ``[B, z, m, h, w]``)."""
    diff = (got.float() - expected.float()).abs().transpose(0, 1).flatten(1).amax(dim=1)
    scale = expected.float().abs().transpose(0, 1).flatten(1).amax(dim=1).clamp_min(1e-30)
    return [round(float(v), 8) for v in diff / scale]


@contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def bench_precision(
    reference: WanEncoder,
    size: tuple[int, int],
    frames: int,
    repeats: int,
    *,
    precisions: Sequence[str] = PRECISIONS,
    cuda_graphs: bool = True,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per precision: frames/s of a stream (frame mode, back-to-back pushes, median of
    ``repeats``) and its latents' error against the float32 row's (``reference`` is float32)."""
    progress = progress or Progress()
    device = reference.device
    clock = Clock(device)
    clip = synthetic_frames(frames, *size)
    expected: torch.Tensor | None = None
    rows: list[dict[str, Any]] = []
    for name in ("float32", *(p for p in precisions if p != "float32")):
        if name == "tf32" and device.type != "cuda":
            rows.append({"precision": name, "status": "CUDA only (no TF32 on the CPU)"})
            continue
        progress(f"precision {name}: {frames} frames at {size[0]}x{size[1]}")
        dtype = _DTYPES[name]
        encoder = reference if dtype == torch.float32 else copy.deepcopy(reference).to(dtype)
        with _tf32(name == "tf32"):
            stream = new_stream(
                encoder, default_memory_format(device, dtype), "frame", cuda_graphs=cuda_graphs
            )
            for _ in range(2 if clock.cuda else 1):  # warm-up (and CUDA graph capture)
                run_stream(stream, clip, clock, idle_before_push=False)
            times, latents = [], None
            for _ in range(repeats):
                run = run_stream(stream, clip, clock, idle_before_push=False)
                times.append(run.total_s)
                latents = run.latents
        assert latents is not None
        if name == "float32":
            expected = latents
        assert expected is not None
        channels = per_channel_errors(latents, expected)
        worst = max(range(len(channels)), key=channels.__getitem__)
        rows.append(
            {
                "precision": name,
                "status": "measured",
                "dtype": str(dtype).removeprefix("torch."),
                "fps": round(frames / median(times), 3),
                "clip_s": round(median(times), 4),
                "error_vs_float32": rel_err(latents, expected),
                "error_per_channel": channels,
                "worst_channel": worst,
            }
        )
        if encoder is not reference:
            del encoder, stream
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "float32" not in precisions:
        rows = [row for row in rows if row["precision"] != "float32"]
    return rows


def format_precision(rows: Sequence[dict[str, Any]]) -> str:
    """The table: precision, frames/s, speed over float32, error vs float32 (global, worst
    channel)."""
    base = next((r["fps"] for r in rows if r["precision"] == "float32" and "fps" in r), None)
    lines = [
        f"{'precision':<11}{'frames/s':>10}{'x float32':>11}{'err vs float32':>16}"
        f"{'worst channel':>22}"
    ]
    for row in rows:
        if row["status"] != "measured":
            lines.append(f"{row['precision']:<11}{row['status']}")
            continue
        worst = row["worst_channel"]
        speed = f"{row['fps'] / base:.2f}" if base else "-"
        channel = f"{row['error_per_channel'][worst]:.2e} (z{worst})"
        lines.append(
            f"{row['precision']:<11}{row['fps']:>10.2f}{speed:>11}"
            f"{row['error_vs_float32']:>16.2e}{channel:>22}"
        )
    lines.append(
        "(errors: max |a - b| / max |b| against float32 with TF32 off, whole latent and the "
        "worst latent channel; float32 is true float32 unless --tf32)"
    )
    return "\n".join(lines)
