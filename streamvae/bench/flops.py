"""FLOP counting on the meta device, and the device's measured peak (the roofline's two ends)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from streamvae.bench.peers import DiffusersPeer
from streamvae.bench.timing import Clock, cuda_event_time
from streamvae.model import WanEncoder
from streamvae.model import encoder as encoder_module
from streamvae.model.kernels import onednn_bf16_available

__all__ = ["count_flops", "diffusers_flops", "measure_peak_flops", "streamvae_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn`` as counted by :class:`torch.utils.flop_counter.FlopCounterMode`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def streamvae_flops(encoder: WanEncoder, frames: int, height: int, width: int) -> int:
    """FLOPs of streaming ``frames`` frames one step each, counted on the meta device.

    As the encoder's device runs them: ring windows (``RING_DEVICES``) compute a stream's
    first frames over the zeros before it; shifted windows skip those time taps.
    """
    with torch.device("meta"):
        meta = WanEncoder(encoder.config).to(encoder.dtype)
    state = meta.new_state(height, width, ring=encoder.device.type in encoder_module.RING_DEVICES)
    video = torch.zeros(1, 3, frames, height, width, dtype=encoder.dtype, device="meta")
    return count_flops(lambda: [meta.step(video[:, :, i : i + 1], state) for i in range(frames)])


def diffusers_flops(encoder: WanEncoder, frames: int, height: int, width: int) -> int | None:
    """FLOPs of diffusers' batch encode of the clip (meta device); ``None`` if that fails."""
    try:
        with torch.device("meta"):
            meta = WanEncoder(encoder.config).to(encoder.dtype)
        peer = DiffusersPeer(meta)
        video = torch.zeros(1, 3, frames, height, width, dtype=encoder.dtype, device="meta")
        return count_flops(lambda: peer.vae.encode(video))
    except Exception:  # diffusers' code on the meta device is not guaranteed
        return None


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format, repeats: int = 5
) -> dict[str, float]:
    """The device's achievable FLOP/s in ``dtype``: a large 3x3x3 conv3d and a large matmul.

    On a CPU without fast kernels for ``dtype`` (float16; bfloat16 without AVX-512, where
    PyTorch's reference convolution runs at a fraction of a GFLOP/s) the problems are small,
    so that the measurement takes a fraction of a second, not minutes.
    """
    clock = Clock(device)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    channels, frames, height, width = (384, 6, 128, 256) if cuda else (192, 6, 64, 64)
    slow = device.type == "cpu" and (
        dtype == torch.float16 or (dtype == torch.bfloat16 and not onednn_bf16_available())
    )
    if slow:
        n, (channels, frames, height, width), repeats = 256, (16, 4, 16, 16), min(repeats, 2)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(1, channels, frames, height, width, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, 3, device=device, dtype=dtype) * 0.02
    if memory_format == torch.channels_last_3d:
        x, w = x.to(memory_format=memory_format), w.to(memory_format=memory_format)
    conv_flops = 2 * channels * channels * 27 * (frames - 2) * height * width
    matmul_flops = 2 * n**3

    def best(fn: Callable[[], Any], flops: int) -> float:
        with torch.inference_mode():
            fn()
            times = []
            for _ in range(repeats):
                if cuda:
                    times.append(cuda_event_time(fn, device))
                else:
                    began = clock.now()
                    fn()
                    times.append(clock.now() - began)
        return flops / min(times)

    conv = best(lambda: torch.nn.functional.conv3d(x, w, padding=(0, 1, 1)), conv_flops)
    matmul = best(lambda: a @ b, matmul_flops)
    return {"conv3d": conv, "matmul": matmul, "peak": max(conv, matmul)}
