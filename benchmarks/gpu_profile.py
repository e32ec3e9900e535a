"""Where a stream's step time goes, by kernel, and the costs the GPU defaults were chosen by.

For the one short GPU run a session may get: after ``streamvae bench`` says *how fast*, this
says *why*, so that the next change is chosen from a measurement. It prints and writes (JSON):

1. A profile of ``--frames`` frames pushed one at a time (eager, no CUDA graphs, after
   ``--warmup`` frames: 13 reach every layer's steady state, packed weights and cuDNN's
   choices included): device time by kernel, grouped into convolutions, norms, element-wise work
   (SiLU, residual adds, casts), copies (the frame windows' shifts, uploads) and the rest;
   device time per frame and the frames/s it bounds. Then the same with each default that was
   chosen by prediction (ring windows, fused norms) switched off alone: its measured effect.
2. Micro-benchmarks at the widest layer's shape (``C = base_dim`` at full size): the fused and
   the eager RMS norm + SiLU, a window shift (two frame copies), the 3x3x3 conv of a frame
   step and of a group step (per frame), each in both layouts, and the frame step as a 2D conv
   over the three frames stacked as channels; milliseconds and GB/s or GFLOP/s.

    python benchmarks/gpu_profile.py --device cuda --dtype bfloat16 --size 480x832 --json out.json
    python benchmarks/gpu_profile.py --device cpu --config narrow8 --size 32x32   # smoke test
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from streamvae import WAN21, StreamEncoder, narrow, random_encoder
from streamvae.bench.clips import synthetic_frames
from streamvae.bench.options import parse_size
from streamvae.bench.timing import Clock
from streamvae.model import encoder as encoder_module
from streamvae.model import kernels, triton_kernels
from streamvae.model.kernels import _fused_norm_applies, rms_silu_into

CATEGORIES = (  # first match wins; kernel names differ between CPU, cuDNN and CUTLASS builds
    ("attention", re.compile(r"attention|fmha|flash|sdpa|softmax|bmm", re.I)),
    ("conv", re.compile(r"conv|cudnn|xmma|implicit|gemm|cutlass|sm\d+_|brg|jit", re.I)),
    ("norm", re.compile(r"norm|reduce", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|fill|cat", re.I)),
    ("elementwise", re.compile(r"elementwise|silu|mul|add|div|reciprocal|clamp|vectorized", re.I)),
)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
# The per-device defaults that were chosen by prediction (see benchmarks/RESULTS.md), each
# switched off by emptying its set of devices.
WITHOUT = (
    ("ring windows", encoder_module, "RING_DEVICES"),
    ("fused norms", kernels, "FUSED_NORM_DEVICES"),
    ("triton kernels", triton_kernels, "TRITON_DEVICES"),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 20) -> float:
    """Median wall time of ``fn`` in ms, synchronised, after two warm-up calls."""
    clock = Clock(device)
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = clock.now()
        fn()
        samples.append((clock.now() - start) * 1e3)
    return statistics.median(samples)


def profile_stream(
    stream: StreamEncoder, frames: list, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Device (CUDA) or CPU self time per kernel over ``frames[warmup:]`` pushed one at a time."""
    clock = Clock(device)
    for frame in frames[:warmup]:
        stream.push(frame)
    clock.sync()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for frame in frames[warmup:]:
            stream.push(frame)
        clock.sync()
    use_device = device.type == "cuda"
    kernels: dict[str, dict[str, float]] = {}
    for event in prof.key_averages():
        if use_device:
            # Kernels are the device-side events; ops (aten::...) have no self device time.
            us = float(
                getattr(event, "self_device_time_total", None)
                or getattr(event, "self_cuda_time_total", 0)  # the name before torch 2.4
                or 0
            )
            if us <= 0 or event.key.startswith("aten::"):
                continue
        else:
            us = float(event.self_cpu_time_total)
            if not event.key.startswith(("aten::", "mkldnn::")) or us <= 0:
                continue
        kernels[event.key] = {"us": us, "calls": float(event.count)}
    total_us = sum(k["us"] for k in kernels.values()) or 1.0
    pushed = len(frames) - warmup
    by_category: dict[str, float] = {}
    for name, k in kernels.items():
        by_category[category(name)] = by_category.get(category(name), 0.0) + k["us"]
    top = sorted(kernels.items(), key=lambda item: -item[1]["us"])[:25]
    per_frame_ms = total_us / 1e3 / pushed
    return {
        "frames_profiled": pushed,
        "time_per_frame_ms": per_frame_ms,
        "frames_per_s_bound": 1e3 / per_frame_ms,
        "share_by_category": {k: v / total_us for k, v in sorted(by_category.items())},
        "top": [
            {"name": name[:120], "ms_per_frame": k["us"] / 1e3 / pushed, "calls": k["calls"]}
            for name, k in top
        ],
    }


def micro(
    channels: int, height: int, width: int, dtype: torch.dtype, device: torch.device
) -> list[dict[str, Any]]:
    """The widest layer's norm, window shift and conv, per layout."""
    rows = []
    frame_bytes = channels * height * width * torch.empty((), dtype=dtype).element_size()
    gamma = torch.rand(channels, 1, 1, 1, dtype=dtype, device=device) + 0.5
    weight = torch.randn(channels, channels, 3, 3, 3, dtype=dtype, device=device) * 0.02
    flops = 2 * channels * channels * 27 * height * width  # one output frame
    for name, layout in LAYOUTS.items():
        window = torch.randn(1, channels, 3, height, width, dtype=dtype, device=device)
        window = window.to(memory_format=layout)
        x = torch.randn(1, channels, 1, height, width, dtype=dtype, device=device)
        x = x.to(memory_format=layout)
        slot = window[:, :, 2:3]
        scale = channels**0.5
        for fused in (True, False):
            if fused and not _fused_norm_applies(x, scale, slot):
                continue  # the fused norm needs channels innermost
            ms = time_ms(partial(rms_silu_into, x, gamma, scale, slot, fused=fused), device)
            rows.append(
                {
                    "what": f"norm+silu {'fused' if fused else 'eager'}",
                    "layout": name,
                    "ms": ms,
                    "GB/s (2 passes' bytes)": 2 * frame_bytes / ms / 1e6,
                }
            )

        def shift(w: torch.Tensor = window) -> None:
            w[:, :, 0].copy_(w[:, :, 1])
            w[:, :, 1].copy_(w[:, :, 2])

        ms = time_ms(shift, device)
        rows.append(
            {"what": "window shift", "layout": name, "ms": ms, "GB/s": 4 * frame_bytes / ms / 1e6}
        )
        w = weight.to(memory_format=layout)
        ms = time_ms(partial(F.conv3d, window, w, None, 1, (0, 1, 1)), device)
        rows.append(
            {"what": "conv 3x3x3 step", "layout": name, "ms": ms, "GFLOP/s": flops / ms / 1e6}
        )
        # A group step (6 frames in, 4 out), per output frame.
        group = torch.randn(1, channels, 6, height, width, dtype=dtype, device=device)
        group = group.to(memory_format=layout)
        ms = time_ms(partial(F.conv3d, group, w, None, 1, (0, 1, 1)), device) / 4
        rows.append(
            {"what": "conv 3x3x3 group/4", "layout": name, "ms": ms, "GFLOP/s": flops / ms / 1e6}
        )
    # The same step as a 2D conv over the three frames stacked as channels (frames outer,
    # channels inner per pixel): what a frame-stacked window layout would run.
    layout2d = torch.channels_last
    stacked = torch.randn(1, 3 * channels, height, width, dtype=dtype, device=device)
    stacked = stacked.to(memory_format=layout2d)
    w2d = weight.transpose(1, 2).reshape(channels, 3 * channels, 3, 3).contiguous()
    w2d = w2d.to(memory_format=layout2d)
    ms = time_ms(partial(F.conv2d, stacked, w2d, None, 1, 1), device)
    rows.append(
        {
            "what": "conv 2d, frames stacked",
            "layout": "channels_last",
            "ms": ms,
            "GFLOP/s": flops / ms / 1e6,
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", type=parse_size, default=(480, 832))
    parser.add_argument("--config", default="wan2.1", help="wan2.1 or narrowN")
    parser.add_argument("--frames", type=int, default=8, help="frames profiled (8: two groups)")
    parser.add_argument("--warmup", type=int, default=13, help="frames pushed first (13)")
    parser.add_argument("--memory-format", choices=["auto", *LAYOUTS], default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup < 0:
        parser.error("--frames must be at least 1 and --warmup at least 0")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    config = WAN21 if args.config == "wan2.1" else narrow(int(args.config.removeprefix("narrow")))
    encoder = random_encoder(config, device=device, dtype=dtype)
    height, width = args.size
    layout = None if args.memory_format == "auto" else LAYOUTS[args.memory_format]
    frames = synthetic_frames(args.warmup + args.frames, height, width)

    def profiled() -> dict[str, Any]:
        stream = StreamEncoder(encoder, normalize=False, memory_format=layout)
        return profile_stream(stream, frames, args.warmup, device)

    def profiled_without(attribute: tuple[Any, str] | None) -> dict[str, Any]:
        if attribute is None:
            return profiled()
        module, name = attribute
        saved = getattr(module, name)
        setattr(module, name, frozenset())
        try:
            return profiled()
        finally:
            setattr(module, name, saved)

    # The defaults, then each default that is a prediction switched off alone (its measured
    # effect); two interleaved rounds, the faster of each kept, against drifting clocks.
    variants: dict[str, tuple[Any, str] | None] = {"defaults": None}
    variants.update({name: (module, attribute) for name, module, attribute in WITHOUT})
    with torch.inference_mode():
        profiled()  # discarded: the profiler's and the allocator's first-use costs
        runs: dict[str, dict[str, Any]] = {}
        for _round in range(2):
            for name, attribute in variants.items():
                run = profiled_without(attribute)
                if name not in runs or run["time_per_frame_ms"] < runs[name]["time_per_frame_ms"]:
                    runs[name] = run
        report: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype,
            "size": f"{height}x{width}",
            "config": config.name,
            "memory_format": args.memory_format,
            "torch": torch.__version__,
            "profile": runs.pop("defaults"),
            "without": runs,
            "micro": micro(config.base_dim, height, width, dtype, device),
        }
    prof = report["profile"]
    print(
        f"{report['device']} {args.dtype} {report['size']} {config.name}, torch {torch.__version__}"
    )
    print(
        f"profile over {prof['frames_profiled']} frames: {prof['time_per_frame_ms']:.3f} ms of "
        f"kernel time per frame (bounds {prof['frames_per_s_bound']:.0f} frames/s)"
    )
    print("share: " + ", ".join(f"{k} {v:.1%}" for k, v in prof["share_by_category"].items()))
    for row in prof["top"]:
        print(f"  {row['ms_per_frame']:8.3f} ms/frame  {int(row['calls']):5d}x  {row['name']}")
    for name, other in report["without"].items():
        ratio = other["time_per_frame_ms"] / prof["time_per_frame_ms"]
        print(
            f"without {name}: {other['time_per_frame_ms']:.3f} ms per frame ({ratio:.2f}x the "
            "defaults); share: "
            + ", ".join(f"{k} {v:.1%}" for k, v in other["share_by_category"].items())
        )
    print(f"micro-benchmarks at C={config.base_dim}, {report['size']}:")
    for row in report["micro"]:
        rate = ", ".join(
            f"{k} {v:.1f}" for k, v in row.items() if k not in ("what", "layout", "ms")
        )
        print(f"  {row['what']:24s} {row['layout']:14s} {row['ms']:8.3f} ms  {rate}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
