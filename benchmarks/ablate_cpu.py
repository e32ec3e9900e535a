"""Ablation of issue 6's CPU changes, interleaved with diffusers' float32 batch encode.

Each variant switches the changes on one by one (by patching the model's internals, for this
measurement only): ``cl`` channels-last state (with the channels-last padded downsample),
``pack`` oneDNN convolutions on packed weights, ``skip`` no time taps over the zeros before a
stream's first frame, ``norm`` the 3-pass RMS norm + SiLU, ``all`` every one of them. A bare
``float32`` / ``bfloat16`` is the code as it was before issue 6.

    python benchmarks/wait_quiet.py && python benchmarks/ablate_cpu.py --repeats 5 --frames 9 \\
        float32 float32+cl float32+cl+pack float32+cl+pack+skip float32+all

Prints, per variant, the min and median clip time over the repeats and the speedup against
diffusers' float32 batch encode of the same clip (same weights), with the latents' error.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

import streamvae.model.kernels as kernels
import streamvae.model.layers as layers
from streamvae import WAN21, StreamEncoder
from streamvae.bench.clips import frames_to_video, synthetic_frames
from streamvae.bench.peers import DiffusersPeer, run_stream
from streamvae.bench.timing import Clock, rel_err
from streamvae.weights import random_encoder

__all__ = ["FEATURES", "configure", "main"]

FEATURES = frozenset({"cl", "pack", "skip", "norm"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_PACKED = kernels._ONEDNN
_STEP = layers.CausalConv3d.step
_SILU_INTO = layers.RMSNorm.silu_into


def _step_without_skip(self: layers.CausalConv3d, state: Any, count: int) -> torch.Tensor:
    out = self.kernel(state.window.slots(0, 2 + count), self.weight, self.bias)
    state.advance(count)
    return out


def _textbook_silu_into(self: layers.RMSNorm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    torch.mul(self._normalized(x) * self.scale, self.gamma, out=out)
    return F.silu(out, inplace=True)


def configure(flags: set[str]) -> None:
    """Switch the model's internals to the variant ``flags`` (process-wide)."""
    kernels._ONEDNN = _PACKED and "pack" in flags
    layers.CausalConv3d.step = _STEP if "skip" in flags else _step_without_skip  # type: ignore[method-assign]
    layers.RMSNorm.silu_into = _SILU_INTO if "norm" in flags else _textbook_silu_into  # type: ignore[method-assign]


def _flags(variant: str) -> tuple[str, set[str]]:
    dtype, *rest = variant.split("+")
    flags = set(rest)
    if "all" in flags:
        flags |= FEATURES
    if dtype not in DTYPES or not flags <= FEATURES | {"all"}:
        raise SystemExit(f"unknown variant {variant!r}: DTYPE[+cl][+pack][+skip][+norm][+all]")
    return dtype, flags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    reference = random_encoder(WAN21)
    encoders = {"float32": reference, "bfloat16": copy.deepcopy(reference).to(torch.bfloat16)}
    peer = DiffusersPeer(reference)
    frames = synthetic_frames(args.frames, args.size, args.size)
    video = frames_to_video(frames, torch.device("cpu"), torch.float32)
    clock = Clock(torch.device("cpu"))
    expected = peer.batch(video)

    runs: dict[str, tuple[set[str], StreamEncoder]] = {}
    for variant in args.variants:
        dtype, flags = _flags(variant)
        layout = torch.channels_last_3d if "cl" in flags else torch.contiguous_format
        runs[variant] = flags, StreamEncoder(encoders[dtype], normalize=False, memory_format=layout)
    times: dict[str, list[float]] = {name: [] for name in ["diffusers float32", *runs]}
    errors: dict[str, float] = {}

    for flags, stream in runs.values():  # warm-up
        configure(flags)
        run_stream(stream, frames, clock, idle_before_push=True)
    for _ in range(args.repeats):
        began = time.perf_counter()
        peer.batch(video)
        times["diffusers float32"].append(time.perf_counter() - began)
        for name, (flags, stream) in runs.items():
            configure(flags)
            run = run_stream(stream, frames, clock, idle_before_push=True)
            times[name].append(run.total_s)
            errors[name] = rel_err(run.latents, expected)
    configure(set(FEATURES))

    base = times["diffusers float32"]
    print(
        f"{args.frames} frames {args.size}x{args.size}, {args.repeats} repeats, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'variant':<26}{'min s':>8}{'median s':>10}{'x diffusers (min)':>19}{'(median)':>10}  error"
    )
    for name, values in times.items():
        print(
            f"{name:<26}{min(values):>8.3f}{statistics.median(values):>10.3f}"
            f"{min(base) / min(values):>19.2f}"
            f"{statistics.median(base) / statistics.median(values):>10.2f}"
            f"  {errors.get(name, 0.0):.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
