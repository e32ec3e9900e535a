"""``streamvae bench``: latency, throughput, memory and roofline of streaming encode, against diffusers.

One run, with the same weights, device, dtype and frames for every encoder:

1. **streamvae**: a :class:`~streamvae.stream.StreamEncoder` fed uint8 frames one push at a time.
   Per-latent latency is the time from the push of the last frame a latent needs to that latent
   being on the host; the device is idle before each push (on CUDA each push is followed by a
   synchronisation), so the latency is not inflated by queued work. First-latent latency, the
   share of a group's push time spent in its last push, and sustained frames/s (frames pushed
   back to back, from the first push to the last latent on the host) come from the same runs.
2. **Peers**, on a float video already on the device (which favours them): diffusers'
   ``AutoencoderKLWan.encode`` over the whole clip (``diffusers_batch``), and diffusers driven
   group by group with its own cache (``diffusers_group``: chunks of 1, 4, 4, ... frames through
   ``vae.encoder(chunk, feat_cache=..., feat_idx=[0])`` and ``quant_conv``, as its ``_encode``
   does; what a diffusers user would write to stream). In a lower precision, diffusers in
   float32 runs too on the CPU (``diffusers_batch_float32``): the CPU target is stated against it.
3. **Memory against stream length**: peak memory while encoding 17, 65, 257 frames (at a small
   size on the CPU), streamvae against the batch encoder holding its clip.
4. **Live mode**: frames paced at 16, 24, 30 frames/s by a synthetic source thread; latency from
   a group's last frame's capture to its latent, and whole groups dropped when a newer group
   is already waiting (the encoder cannot keep up).
5. **Roofline**: FLOPs per frame counted with :class:`torch.utils.flop_counter.FlopCounterMode`
   on the meta device, achieved FLOP/s of each encoder, and the device's own peak measured in
   the same run (a large conv3d and a large matmul in the same dtype).

Timing: wall clock around synchronised work (``torch.cuda.synchronize`` on CUDA), plus CUDA
events for the peers' device time; every encoder is warmed up first (on CUDA twice: the second
pass captures the CUDA graphs) and the repeats are interleaved (streamvae, batch, group,
streamvae, ...) so that load from other processes hits all of them alike. Times are medians
over the repeats. On CUDA, TF32 is off unless ``--tf32`` (float32 means float32) and cuDNN picks
its fastest algorithm per shape (``--no-cudnn-benchmark`` to not). Memory is, on CUDA,
``max_memory_allocated`` above the level before the run and, on every device, the process RSS
above its level before the run (the kernel's high-water mark, reset at the start).

    streamvae bench --random-weights --device cpu --size 128x128 --frames 9 \\
        --json out/bench.json --plot out/bench.png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import streamvae
from streamvae.model import WanEncoder, default_memory_format
from streamvae.model import encoder as encoder_module
from streamvae.stream import StreamEncoder

__all__ = [
    "BenchOptions",
    "DiffusersPeer",
    "add_bench_command",
    "count_flops",
    "measure_peak_flops",
    "run_bench",
    "synthetic_frame",
]

DEFAULT_LIVE_FPS = (16, 24, 30)
DEFAULT_LENGTHS = (17, 65, 257)
MEMORY_SAMPLE_S = 0.001

# The targets of issues 5 and 6, stated where they apply (device, dtype, size, config).
CPU_TARGET_SIZE = (128, 128)
GPU_TARGET_SIZE = (480, 832)


# -- options ----


@dataclass(frozen=True)
class BenchOptions:
    """What one ``streamvae bench`` run measures."""

    size: tuple[int, int] = (128, 128)
    frames: int = 9
    repeats: int = 3
    live_fps: tuple[float, ...] = DEFAULT_LIVE_FPS
    live_frames: int = 33
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    memory_size: tuple[int, int] = (32, 32)
    mode: str = "frame"
    memory_format: str = "auto"
    peers: bool = True
    tf32: bool = False
    cuda_graphs: bool = True
    cudnn_benchmark: bool = True
    label: str = ""
    command: str = ""


def parse_size(text: str) -> tuple[int, int]:
    """``"480x832"`` -> ``(480, 832)``; both multiples of 8."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 128x128, got {text!r}") from None
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise argparse.ArgumentTypeError(f"H and W must be positive multiples of 8, got {text!r}")
    return height, width


def parse_numbers(text: str) -> tuple[float, ...]:
    """``"16,24,30"`` -> ``(16.0, 24.0, 30.0)``; ``"0"`` or ``"none"`` -> ``()`` (skip)."""
    if text.strip().lower() in ("", "0", "none", "off"):
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 16,24,30, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


# -- synthetic frames ----


def synthetic_frame(index: int, height: int, width: int) -> np.ndarray:
    """A deterministic ``[H, W, 3]`` uint8 RGB frame: moving gradients plus per-frame noise."""
    ys = np.arange(height, dtype=np.int32)[:, None]
    xs = np.arange(width, dtype=np.int32)[None, :]
    noise = np.random.default_rng(index).integers(0, 32, (height, width, 3), dtype=np.int32)
    frame = np.empty((height, width, 3), dtype=np.int32)
    frame[..., 0] = xs * 2 + index * 5
    frame[..., 1] = ys * 2 + index * 3
    frame[..., 2] = (xs + ys) + index * 7
    return ((frame + noise) % 256).astype(np.uint8)


def synthetic_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    return [synthetic_frame(i, height, width) for i in range(count)]


def frames_to_video(
    frames: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` frames -> ``[1, 3, T, H, W]`` in [-1, 1], as the stream converts them."""
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None]
    return (video.float() / 127.5 - 1.0).to(device=device, dtype=dtype)


# -- clocks and memory ----


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


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS so that RSS tracks live memory (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux); ``False`` where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return _rss_peak() is not None
    except OSError:
        return False


def _rss_peak() -> int | None:
    """The kernel's RSS high-water mark (``VmHWM``) in bytes, or ``None``."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class MemoryPeak:
    """Peak memory above the level at the start of a :func:`track_memory` block, in bytes."""

    rss: int = 0
    cuda: int | None = None

    def as_mb(self) -> dict[str, float | None]:
        return {
            "rss": round(self.rss / 2**20, 1),
            "cuda": None if self.cuda is None else round(self.cuda / 2**20, 1),
        }


@contextlib.contextmanager
def track_memory(device: torch.device) -> Iterator[MemoryPeak]:
    """Peak RSS (and CUDA allocation) above the level at the start of the block.

    RSS: the kernel's high-water mark, reset at the start (Linux), else sampled every
    millisecond by a thread. Freed heap memory is returned to the OS first (``malloc_trim``);
    memory the allocator kept from earlier work can still hide part of a peak, which is why
    :func:`memory_against_length` measures each point in a fresh process.
    """
    peak = MemoryPeak()
    gc.collect()
    _malloc_trim()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    base = _rss()
    highest = base
    done = threading.Event()
    sampler = None
    if not _reset_rss_peak():

        def sample() -> None:
            nonlocal highest
            while not done.wait(MEMORY_SAMPLE_S):
                highest = max(highest, _rss())

        sampler = threading.Thread(target=sample, name="streamvae-bench-rss", daemon=True)
        sampler.start()
    try:
        yield peak
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        highest = max(highest, _rss(), _rss_peak() or 0) if sampler is None else highest
        done.set()
        if sampler is not None:
            sampler.join()
            highest = max(highest, _rss())
        peak.rss = max(0, highest - base)
        if cuda:
            peak.cuda = max(0, torch.cuda.max_memory_allocated(device) - cuda_base)


# -- statistics ----


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


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in float32: the project's exactness measure."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- streamvae ----


def new_stream(
    encoder: WanEncoder, memory_format: torch.memory_format, mode: str, *, cuda_graphs: bool
) -> StreamEncoder:
    """The StreamEncoder the benchmark measures (raw latent means, delivered to the host)."""
    return StreamEncoder(
        encoder,
        normalize=False,
        memory_format=memory_format,
        mode=mode,  # type: ignore[arg-type]
        cuda_graphs=cuda_graphs and encoder.device.type == "cuda",
    )


@dataclass
class StreamRun:
    """One pass of a clip through a StreamEncoder."""

    push_s: list[float]
    latent_s: list[float]
    total_s: float
    latents: torch.Tensor  # [1, z, m, h, w] float32 raw means, on the CPU


def run_stream(
    stream: StreamEncoder, frames: Sequence[np.ndarray], clock: Clock, *, idle_before_push: bool
) -> StreamRun:
    """Push ``frames`` one at a time from a reset stream; time each push.

    ``idle_before_push`` waits for the device after every push, so that each push's time is
    its own work (latency); without it, pushes are back to back (throughput).
    """
    stream.reset()
    clock.sync()
    push_s: list[float] = []
    latent_s: list[float] = []
    data: list[torch.Tensor] = []
    start = time.perf_counter()
    for frame in frames:
        began = time.perf_counter()
        latents = stream.push(frame)
        if idle_before_push:
            clock.sync()
        took = time.perf_counter() - began
        push_s.append(took)
        for latent in latents:
            latent_s.append(took)
            data.append(latent.data)
    latents_left = stream.flush()
    data += [latent.data for latent in latents_left]
    total = clock.now() - start
    stacked = torch.stack(data, dim=1)[None].cpu() if data else torch.empty(0)
    return StreamRun(push_s, latent_s, total, stacked)


def last_push_shares(push_s: Sequence[float], group: int) -> list[float]:
    """For each complete group of pushes (frames ``gk-g+1 .. gk``), its last push's share of its time."""
    shares = []
    for end in range(group, len(push_s), group):
        times = push_s[end - group + 1 : end + 1]
        if len(times) == group and sum(times) > 0:
            shares.append(times[-1] / sum(times))
    return shares


# -- diffusers ----


class DiffusersPeer:
    """diffusers' ``AutoencoderKLWan`` holding exactly a :class:`WanEncoder`'s weights.

    Built on the meta device; only the encoder and ``quant_conv`` are materialised (sharing the
    streamvae encoder's tensors), the decoder is never allocated.
    """

    def __init__(self, encoder: WanEncoder) -> None:
        from diffusers import AutoencoderKLWan

        from streamvae.weights import diffusers_config, diffusers_to_streamvae_name

        config = encoder.config
        with torch.device("meta"):
            vae = AutoencoderKLWan(**diffusers_config(config))
        ours = encoder.state_dict()
        for prefix, module in (("encoder.", vae.encoder), ("quant_conv.", vae.quant_conv)):
            theirs = {}
            for name in module.state_dict():
                target = diffusers_to_streamvae_name(prefix + name)
                if target is None or target not in ours:
                    raise KeyError(f"diffusers tensor {prefix + name} has no streamvae twin")
                theirs[name] = ours[target]
            module.load_state_dict(theirs, strict=True, assign=True)
        self.vae = vae.eval().requires_grad_(False)
        self.z_dim = config.z_dim
        self.group = config.temporal_stride

    @torch.inference_mode()
    def batch(self, video: torch.Tensor) -> torch.Tensor:
        """``encode`` on the whole clip; the raw latent mean on the host."""
        return self.vae.encode(video).latent_dist.mean.cpu()

    @torch.inference_mode()
    def groups(self, video: torch.Tensor, clock: Clock) -> tuple[list[float], torch.Tensor]:
        """Chunks of 1, g, g, ... frames through diffusers' cache; each chunk's time to the host."""
        vae = self.vae
        if vae.config.patch_size:  # Wan 2.2: diffusers' encode patchifies before its chunks
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            video = patchify(video, patch_size=vae.config.patch_size)
        vae.clear_cache()
        times: list[float] = []
        means: list[torch.Tensor] = []
        frames = video.shape[2]
        bounds = [(0, 1)] + [
            (start, start + self.group) for start in range(1, frames - self.group + 1, self.group)
        ]
        for start, stop in bounds:
            began = clock.now()
            vae._enc_conv_idx = [0]
            out = vae.encoder(
                video[:, :, start:stop], feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx
            )
            means.append(vae.quant_conv(out)[:, : self.z_dim].cpu())
            times.append(clock.now() - began)
        vae.clear_cache()
        return times, torch.cat(means, dim=2)


def _cuda_event_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of device time of ``fn``'s work on the current stream (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


# -- FLOPs and peak ----


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
    """The device's achievable FLOP/s in ``dtype``: a large 3x3x3 conv3d and a large matmul."""
    clock = Clock(device)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    channels, frames, height, width = (384, 6, 128, 256) if cuda else (192, 6, 64, 64)
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
                    times.append(_cuda_event_time(fn, device))
                else:
                    began = clock.now()
                    fn()
                    times.append(clock.now() - began)
        return flops / min(times)

    conv = best(lambda: torch.nn.functional.conv3d(x, w, padding=(0, 1, 1)), conv_flops)
    matmul = best(lambda: a @ b, matmul_flops)
    return {"conv3d": conv, "matmul": matmul, "peak": max(conv, matmul)}


# -- memory against stream length ----


def memory_against_length(
    encoder: WanEncoder,
    lengths: Sequence[int],
    size: tuple[int, int],
    memory_format: torch.memory_format,
    mode: str,
    *,
    peers: bool,
) -> dict[str, Any]:
    """Peak memory encoding ``n`` frames, for each ``n``: streamvae (frames made one at a time,
    held nowhere) and diffusers' batch encode (which must hold its clip).

    On the CPU each point runs in a fresh process (the model loaded and warmed up on a short
    stream, then the peak RSS above that level), so that memory kept by the allocator from one
    point cannot hide the next; on CUDA the points run here (after the main run has warmed the
    model up) and report ``max_memory_allocated`` above the model. Memory the encoder holds
    once for all streams (on the CPU, its oneDNN-packed weights) is in ``peak_memory_mb``.
    """
    device = encoder.device
    result: dict[str, Any] = {
        "size": list(size),
        "lengths": list(lengths),
        "streamvae_mb": [],
        "diffusers_batch_mb": [],
        "measure": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "peak rss of a fresh process above its loaded, warmed-up model",
    }
    kinds = ["streamvae"] + (["diffusers"] if peers else [])
    if device.type == "cuda":
        peer = DiffusersPeer(encoder) if peers else None
        for length in lengths:
            result["streamvae_mb"].append(
                _memory_point(encoder, peer, "streamvae", length, size, memory_format, mode)
            )
            result["diffusers_batch_mb"].append(
                _memory_point(encoder, peer, "diffusers", length, size, memory_format, mode)
                if peer is not None
                else None
            )
        return result
    import tempfile

    with tempfile.TemporaryDirectory(prefix="streamvae-bench-") as folder:
        weights = Path(folder) / "encoder.pt"
        torch.save(encoder.state_dict(), weights)
        config = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in vars(encoder.config).items()
        }
        for length in lengths:
            for kind in ("streamvae", "diffusers"):
                if kind not in kinds:
                    result["diffusers_batch_mb"].append(None)
                    continue
                probe = {
                    "weights": str(weights),
                    "config": config,
                    "dtype": str(encoder.dtype).replace("torch.", ""),
                    "kind": kind,
                    "length": length,
                    "size": list(size),
                    "channels_last": memory_format == torch.channels_last_3d,
                    "mode": mode,
                    "threads": torch.get_num_threads(),
                }
                key = "streamvae_mb" if kind == "streamvae" else "diffusers_batch_mb"
                result[key].append(_run_probe(probe))
    return result


def _memory_point(
    encoder: WanEncoder,
    peer: DiffusersPeer | None,
    kind: str,
    length: int,
    size: tuple[int, int],
    memory_format: torch.memory_format,
    mode: str,
) -> float | str:
    """Peak memory (MB) of one stream of ``length`` frames, in this process."""
    device = encoder.device
    try:
        with track_memory(device) as peak:
            if kind == "streamvae":
                # Eager: a stream's CUDA graphs are captured during its first frames, which
                # would show as growth between the shortest streams.
                stream = new_stream(encoder, memory_format, mode, cuda_graphs=False)
                for i in range(length):
                    stream.push(synthetic_frame(i, *size))
                stream.flush()
                del stream
            else:
                assert peer is not None
                video = frames_to_video(
                    [synthetic_frame(i, *size) for i in range(length)], device, encoder.dtype
                )
                peer.batch(video)
                del video
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    value = peak.cuda if peak.cuda is not None else peak.rss
    return round(value / 2**20, 2)


def _run_probe(probe: dict[str, Any]) -> float | str:
    import subprocess

    # glibc: blocks of 64 KiB and more come from mmap and go back to the OS when freed, so the
    # child's RSS follows its live memory and its high-water mark is the true peak (the heap's
    # retention would otherwise add tens of MB of noise). Costs speed; the child is not timed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run(
        [sys.executable, "-m", "streamvae.bench", "--memory-probe", json.dumps(probe)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def _memory_probe_main(text: str) -> int:
    """Child process of :func:`memory_against_length`: load the model, measure one point."""
    from streamvae.config import WanConfig

    probe = json.loads(text)
    torch.set_num_threads(int(probe["threads"]))
    config = WanConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in probe["config"].items()}
    )
    with torch.device("meta"):
        encoder = WanEncoder(config)
    state = torch.load(probe["weights"], map_location="cpu", weights_only=True)
    encoder.load_state_dict(state, assign=True)
    encoder = encoder.eval().requires_grad_(False)
    peer = DiffusersPeer(encoder) if probe["kind"] == "diffusers" else None
    memory_format = torch.channels_last_3d if probe["channels_last"] else torch.contiguous_format
    size = (int(probe["size"][0]), int(probe["size"][1]))
    # Warm the encoder up first (oneDNN packs its weights and builds its kernels once per
    # encoder, not per stream): the point measures what one more stream of n frames costs.
    warm_up = 2 * config.temporal_stride + 1
    _memory_point(encoder, peer, probe["kind"], warm_up, size, memory_format, probe["mode"])
    peak = _memory_point(
        encoder, peer, probe["kind"], int(probe["length"]), size, memory_format, probe["mode"]
    )
    print(json.dumps({"peak_mb": peak}))
    return 0


# -- live mode ----


@dataclass
class LiveResult:
    """What one paced live run saw."""

    fps: float
    frames: int
    group_size: int
    latency_s: list[float] = field(default_factory=list)
    groups: int = 0
    dropped_groups: int = 0

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
            "latents": len(self.latency_s),
            "on_time_fraction": round(on_time / len(self.latency_s), 3) if self.latency_s else None,
            "group_period_ms": round(self.group_period * 1e3, 2),
        }


def run_live(
    encoder: WanEncoder,
    fps: float,
    frames: Sequence[np.ndarray],
    memory_format: torch.memory_format,
    mode: str,
    *,
    cuda_graphs: bool,
) -> LiveResult:
    """Frames arrive every ``1 / fps`` s from a source thread; the encoder takes them as it can.

    Latency of a latent: from the capture of its last frame to the latent on the host (queueing
    included). When a group is about to start while a whole newer group is already waiting, the
    older group is dropped (all its frames), so that latency stays bounded.
    """
    group = encoder.config.temporal_stride
    stream = new_stream(encoder, memory_format, mode, cuda_graphs=cuda_graphs)
    # Allocate the state and warm up (on CUDA: run, then capture, each kind of step) unpaced.
    cuda = encoder.device.type == "cuda"
    for _ in range(2 if cuda else 1):
        for frame in frames if cuda else frames[: 2 * group + 1]:
            stream.push(frame)
        stream.reset()
    arrivals: queue.Queue[tuple[int, float]] = queue.Queue()
    result = LiveResult(fps=fps, frames=len(frames), group_size=group)
    start = time.perf_counter() + 0.05

    def source() -> None:
        for i in range(len(frames)):
            delay = start + i / fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            arrivals.put((i, time.perf_counter()))

    producer = threading.Thread(target=source, name="streamvae-bench-source", daemon=True)
    producer.start()
    index = 0
    while index < len(frames):
        i, captured = arrivals.get()
        if i % group == 1:
            result.groups += 1
            if arrivals.qsize() >= group and i + group < len(frames):
                result.dropped_groups += 1
                for _ in range(group - 1):
                    arrivals.get()
                index = i + group
                continue
        for _latent in stream.push(frames[i]):
            result.latency_s.append(time.perf_counter() - captured)
        index = i + 1
    producer.join()
    stream.flush()
    return result


# -- the run ----


MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last_3d,
}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {
        "streamvae": streamvae.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:
        versions["diffusers"] = None
    return versions


def run_bench(
    encoder: WanEncoder, options: BenchOptions, reference: WanEncoder | None = None
) -> dict[str, Any]:
    """Measure everything; return the JSON-ready report.

    ``reference`` is the same model in float32 when ``encoder`` runs in a lower precision: the
    precision error and the float32 diffusers peer use it.
    """
    device, dtype = encoder.device, encoder.dtype
    clock = Clock(device)
    height, width = options.size
    group = encoder.config.temporal_stride
    memory_format = (
        default_memory_format(device, dtype)
        if options.memory_format == "auto"
        else MEMORY_FORMATS[options.memory_format]
    )
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = options.tf32
        torch.backends.cuda.matmul.allow_tf32 = options.tf32
        torch.backends.cudnn.benchmark = options.cudnn_benchmark
    load_before = os.getloadavg()
    frames = synthetic_frames(options.frames, height, width)
    video = frames_to_video(frames, device, dtype)
    notes: list[str] = []

    peer: DiffusersPeer | None = None
    peer32: DiffusersPeer | None = None
    if options.peers:
        try:
            peer = DiffusersPeer(encoder)
            # The CPU target is stated against diffusers in float32; on CUDA the peer is
            # diffusers in the same dtype, and 11 more float32 passes would only cost time.
            if reference is not None and device.type != "cuda":
                peer32 = DiffusersPeer(reference)
        except ImportError:
            notes.append("diffusers is not installed: peers skipped (pip install diffusers)")

    # Warm-up, each encoder once; memory is tracked on these passes (no timing is taken).
    stream = new_stream(encoder, memory_format, options.mode, cuda_graphs=options.cuda_graphs)
    memory: dict[str, Any] = {}
    with track_memory(device) as peak:
        cold_began = time.perf_counter()
        first = stream.push(frames[0])
        clock.sync()
        cold_first = time.perf_counter() - cold_began
        assert first, "frame 0 yields latent 0"
        for frame in frames[1:]:
            stream.push(frame)
        stream.flush()
    memory["streamvae"] = peak.as_mb()
    if clock.cuda:  # the second pass captures the CUDA graphs of the steps the first one ran
        run_stream(stream, frames, clock, idle_before_push=True)
    if peer is not None:
        with track_memory(device) as peak:
            peer.batch(video)
        memory["diffusers_batch"] = peak.as_mb()
        with track_memory(device) as peak:
            peer.groups(video, clock)
        memory["diffusers_group"] = peak.as_mb()
    video32 = None
    if peer32 is not None:
        video32 = video.float()
        peer32.batch(video32)

    # Timed, interleaved repeats.
    latency_runs: list[StreamRun] = []
    throughput_s: list[float] = []
    batch_s: list[float] = []
    batch_device_s: list[float] = []
    group_latency_s: list[float] = []
    group_total_s: list[float] = []
    batch32_s: list[float] = []
    batch_mean = group_mean = None
    for _ in range(options.repeats):
        latency_runs.append(run_stream(stream, frames, clock, idle_before_push=True))
        if clock.cuda:
            throughput_s.append(run_stream(stream, frames, clock, idle_before_push=False).total_s)
        else:  # on the CPU a push is synchronous: the latency pass is the throughput pass
            throughput_s.append(latency_runs[-1].total_s)
        if peer is not None:
            began = clock.now()
            batch_mean = peer.batch(video)
            batch_s.append(clock.now() - began)
            if clock.cuda:
                batch_device_s.append(_cuda_event_time(lambda: peer.batch(video), device))
            times, group_mean = peer.groups(video, clock)
            group_latency_s += times
            group_total_s.append(sum(times))
        if peer32 is not None and video32 is not None:
            began = clock.now()
            peer32.batch(video32)
            batch32_s.append(clock.now() - began)
    stream_latents = latency_runs[-1].latents
    latent_s = [t for run in latency_runs for t in run.latent_s]
    first_latent_s = [run.push_s[0] for run in latency_runs]
    shares = [s for run in latency_runs for s in last_push_shares(run.push_s, group)]
    clip_s = _median(throughput_s)
    fps = options.frames / clip_s

    # Precision.
    error: dict[str, float | None] = {"vs_diffusers": None, "vs_float32": None}
    if batch_mean is not None:
        error["vs_diffusers"] = rel_err(stream_latents, batch_mean)
    if group_mean is not None and batch_mean is not None:
        error["diffusers_group_vs_batch"] = rel_err(group_mean, batch_mean)
    if reference is not None:
        expected = reference.encode(video.float(), normalize=False)
        error["vs_float32"] = rel_err(stream_latents, expected)
        if batch_mean is not None:
            error["diffusers_vs_float32"] = rel_err(batch_mean, expected)

    # Roofline.
    flops_clip = streamvae_flops(encoder, options.frames, height, width)
    flops_clip_diffusers = diffusers_flops(encoder, options.frames, height, width)
    peak_flops = measure_peak_flops(device, dtype, memory_format)

    encoders: dict[str, Any] = {
        "streamvae": {
            "clip_s": round(clip_s, 4),
            "fps": round(fps, 3),
            "latency_ms": percentiles_ms(latent_s),
            "latency_samples_ms": [round(t * 1e3, 3) for t in latent_s],
            "achieved_flops": flops_clip / clip_s,
        }
    }
    vs: dict[str, float | None] = {}
    if batch_s:
        batch_clip = _median(batch_s)
        encoders["diffusers_batch"] = {
            "clip_s": round(batch_clip, 4),
            "device_clip_s": round(_median(batch_device_s), 4) if batch_device_s else None,
            "fps": round(options.frames / batch_clip, 3),
            # Every latent of a batch encode is ready when the whole clip is done.
            "latency_ms": percentiles_ms(batch_s),
            "latency_samples_ms": [round(t * 1e3, 3) for t in batch_s],
            "achieved_flops": (flops_clip_diffusers or flops_clip) / batch_clip,
        }
        group_clip = _median(group_total_s)
        encoders["diffusers_group"] = {
            "clip_s": round(group_clip, 4),
            "fps": round(options.frames / group_clip, 3),
            "latency_ms": percentiles_ms(group_latency_s),
            "latency_samples_ms": [round(t * 1e3, 3) for t in group_latency_s],
            "achieved_flops": (flops_clip_diffusers or flops_clip) / group_clip,
        }
        vs["batch_speedup"] = round(batch_clip / clip_s, 3)
        vs["group_speedup"] = round(group_clip / clip_s, 3)
        p50, peer_p50 = percentiles_ms(latent_s)["p50"], percentiles_ms(group_latency_s)["p50"]
        vs["group_latency_ratio"] = round(peer_p50 / p50, 3) if p50 and peer_p50 else None
    if batch32_s:
        batch32_clip = _median(batch32_s)
        encoders["diffusers_batch_float32"] = {
            "clip_s": round(batch32_clip, 4),
            "fps": round(options.frames / batch32_clip, 3),
            "achieved_flops": (flops_clip_diffusers or flops_clip) * 1.0 / batch32_clip,
        }
        vs["batch_float32_speedup"] = round(batch32_clip / clip_s, 3)

    live = [
        run_live(
            encoder,
            fps_value,
            synthetic_frames(options.live_frames, height, width),
            memory_format,
            options.mode,
            cuda_graphs=options.cuda_graphs,
        ).as_json()
        for fps_value in options.live_fps
    ]
    sweep = (
        memory_against_length(
            encoder,
            options.lengths,
            options.memory_size,
            memory_format,
            options.mode,
            peers=peer is not None,
        )
        if options.lengths
        else None
    )
    state_bytes = stream.state_nbytes
    load_after = os.getloadavg()
    report: dict[str, Any] = {
        "run": {
            "device": str(device),
            "device_name": _device_name(device),
            "dtype": str(dtype).replace("torch.", ""),
            "size": [height, width],
            "frames": options.frames,
            "repeats": options.repeats,
            "config": encoder.config.name,
            "weights": options.label,
            "mode": options.mode,
            "memory_format": "channels_last_3d"
            if memory_format == torch.channels_last_3d
            else "contiguous",
            "threads": torch.get_num_threads(),
            "tf32": options.tf32 if device.type == "cuda" else None,
            "cuda_graphs": options.cuda_graphs if device.type == "cuda" else None,
            "cudnn_benchmark": options.cudnn_benchmark if device.type == "cuda" else None,
            "versions": _versions(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "command": options.command,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "latency_ms": percentiles_ms(latent_s),
        "first_latent_ms": round(_median(first_latent_s) * 1e3, 3),
        "cold_first_latent_ms": round(cold_first * 1e3, 3),
        "fps": round(fps, 3),
        "last_push_share": round(_median(shares), 4) if shares else None,
        "vs_diffusers": vs,
        "error": error,
        "peak_memory_mb": memory,
        "state_bytes": state_bytes,
        "flops_per_frame": flops_clip / options.frames,
        "flops_per_frame_diffusers": (
            flops_clip_diffusers / options.frames if flops_clip_diffusers else None
        ),
        "achieved_flops": encoders["streamvae"]["achieved_flops"],
        "peak_flops": peak_flops["peak"],
        "peak_flops_by_kernel": {k: v for k, v in peak_flops.items() if k != "peak"},
        "encoders": encoders,
        "live": live,
        "memory_vs_length": sweep,
        "notes": notes,
    }
    report["targets"] = check_targets(report)
    return report


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue targets that apply to this run, each with its value and whether it is met."""
    run = report["run"]
    vs = report["vs_diffusers"]
    # The CPU targets hold for both full models; the CUDA ones are stated for Wan 2.1.
    full = run["config"] in ("wan2.1", "wan2.2")
    wan21 = run["config"] == "wan2.1"
    size = tuple(run["size"])
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float, at_least: bool) -> None:
        met = None if value is None else (value >= bound if at_least else value <= bound)
        sign = ">=" if at_least else "<="
        targets.append({"target": f"{name} {sign} {bound:g}", "value": value, "met": met})

    share = report["last_push_share"]
    add("last push share of a group", share, 0.5, at_least=False)
    sweep = report["memory_vs_length"]
    if sweep and sweep["streamvae_mb"]:
        values = [v for v in sweep["streamvae_mb"] if isinstance(v, (int, float))]
        # Flat: the longest stream costs at most 16 MB (or 10%: allocator noise) more than the
        # shortest one. All points are in the report.
        if len(values) >= 2:
            bound = max(16.0, 0.1 * values[0])
            add(
                "streamvae memory, longest minus shortest stream (MB)",
                round(values[-1] - values[0], 2),
                round(bound, 1),
                at_least=False,
            )
    if run["device"] == "cpu" and full and size == CPU_TARGET_SIZE:
        if run["dtype"] == "float32":
            add("float32 speedup vs diffusers float32 batch", vs.get("batch_speedup"), 1.3, True)
        else:
            add(
                f"{run['dtype']} speedup vs diffusers float32 batch",
                vs.get("batch_float32_speedup"),
                2.5,
                True,
            )
            add(f"{run['dtype']} error vs float32", report["error"]["vs_float32"], 3e-2, False)
    if (
        run["device"].startswith("cuda")
        and wan21
        and run["dtype"] == "bfloat16"
        and size == GPU_TARGET_SIZE
    ):
        add("frames/s, one stream", report["fps"], 200, True)
        add(
            "p99 latency after a group's last frame (ms)",
            report["latency_ms"]["p99"],
            10,
            False,
        )
        add("speedup vs diffusers bfloat16 batch", vs.get("batch_speedup"), 2, True)
    if run["dtype"] == "float32" and report["error"]["vs_diffusers"] is not None:
        add("float32 error vs diffusers", report["error"]["vs_diffusers"], 1e-5, False)
    return targets


# -- output ----


def _gflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def format_report(report: dict[str, Any]) -> str:
    """The terminal table."""
    run = report["run"]
    lines = [
        f"streamvae bench: {run['config']} {run['dtype']} {run['size'][0]}x{run['size'][1]}, "
        f"{run['frames']} frames x {run['repeats']} repeats on {run['device']} "
        f"({run['device_name']}, {run['threads']} threads), {run['memory_format']}, "
        f"mode={run['mode']}",
        f"weights: {run['weights']}",
        f"load average before/after: {run['load_average_before'][0]:.2f} / "
        f"{run['load_average_after'][0]:.2f}",
        "",
        f"{'encoder':<26}{'clip s':>9}{'frames/s':>10}{'p50 ms':>10}{'p95 ms':>10}"
        f"{'p99 ms':>10}{'GFLOP/s':>10}",
    ]
    for name, entry in report["encoders"].items():
        latency = entry.get("latency_ms") or {}
        lines.append(
            f"{name:<26}{entry['clip_s']:>9.3f}{entry['fps']:>10.2f}{_ms(latency.get('p50')):>10}"
            f"{_ms(latency.get('p95')):>10}{_ms(latency.get('p99')):>10}"
            f"{_gflops(entry.get('achieved_flops')):>10}"
        )
    vs = report["vs_diffusers"]
    lines += [
        "",
        "streamvae: first latent {} ms (cold {} ms), last push share of a group {}, state {:.2f} MB".format(
            _ms(report["first_latent_ms"]),
            _ms(report["cold_first_latent_ms"]),
            report["last_push_share"],
            report["state_bytes"] / 2**20,
        ),
        "vs diffusers: " + ", ".join(f"{k} {v}x" for k, v in vs.items() if v is not None),
        "error: " + ", ".join(f"{k} {v:.2e}" for k, v in report["error"].items() if v is not None),
        "roofline: {} GFLOP/frame, streamvae {} GFLOP/s, device peak {} GFLOP/s "
        "(conv3d {}, matmul {})".format(
            f"{report['flops_per_frame'] / 1e9:.2f}",
            _gflops(report["achieved_flops"]),
            _gflops(report["peak_flops"]),
            _gflops(report["peak_flops_by_kernel"]["conv3d"]),
            _gflops(report["peak_flops_by_kernel"]["matmul"]),
        ),
        "peak memory MB (rss / cuda): "
        + ", ".join(
            f"{name} {values['rss']} / {values['cuda'] if values['cuda'] is not None else '-'}"
            for name, values in report["peak_memory_mb"].items()
        ),
    ]
    sweep = report["memory_vs_length"]
    if sweep:
        lines.append(
            f"memory vs stream length at {sweep['size'][0]}x{sweep['size'][1]} "
            f"({sweep['measure']}, MB): "
            + ", ".join(
                f"{n} frames: streamvae {s} / batch {b}"
                for n, s, b in zip(
                    sweep["lengths"], sweep["streamvae_mb"], sweep["diffusers_batch_mb"]
                )
            )
        )
    for live in report["live"]:
        latency = live["latency_ms"]
        lines.append(
            f"live {live['fps']:g} fps: p50 {_ms(latency['p50'])} ms, p99 {_ms(latency['p99'])} ms, "
            f"{live['dropped_groups']}/{live['groups']} groups dropped, "
            f"on time {live['on_time_fraction']}"
        )
    if report["targets"]:
        lines.append("")
        lines.append("targets:")
        for target in report["targets"]:
            mark = {True: "met", False: "NOT MET", None: "n/a"}[target["met"]]
            value = target["value"]
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"  {target['target']:<58} {shown:>10}  {mark}")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _plot_cdf(ax: Any, samples: Sequence[float], **style: Any) -> None:
    xs = np.sort(np.asarray(samples, dtype=np.float64))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(np.r_[xs[0], xs], np.r_[0.0, ys], where="post", **style)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Latency CDF per encoder (and live rate), memory against stream length, roofline bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    run = report["run"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for name, entry in report["encoders"].items():
        samples = entry.get("latency_samples_ms")
        if samples:
            _plot_cdf(ax, samples, label=name)
    for live in report["live"]:
        if live.get("latency_samples_ms"):
            _plot_cdf(
                ax,
                live["latency_samples_ms"],
                label=f"streamvae live {live['fps']:g} fps",
                linestyle="--",
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("latency after a latent's last frame (ms, log)")
    ax.set_ylabel("fraction of latents")
    ax.set_title("latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    sweep = report["memory_vs_length"]
    if sweep:
        lengths = sweep["lengths"]
        for key, label in (
            ("streamvae_mb", "streamvae"),
            ("diffusers_batch_mb", "diffusers batch"),
        ):
            values = [v if isinstance(v, (int, float)) else np.nan for v in sweep[key]]
            if not all(np.isnan(values)):
                ax.plot(lengths, values, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(bottom=0)
        ax.set_title(f"peak memory vs stream length ({sweep['size'][0]}x{sweep['size'][1]})")
        ax.set_ylabel("peak MB above the loaded model")
        ax.legend(fontsize=8)
    else:
        ax.set_title("memory vs stream length: not measured")
    ax.set_xlabel("frames")
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    names = list(report["encoders"])
    values = [report["encoders"][n]["achieved_flops"] / 1e9 for n in names]
    ax.barh(names, values, color="tab:blue")
    for kernel, value in report["peak_flops_by_kernel"].items():
        ax.axvline(
            value / 1e9,
            linestyle="--",
            color="tab:red" if kernel == "conv3d" else "k",
            label=f"measured {kernel} peak",
        )
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("GFLOP/s")
    ax.set_title("achieved vs measured device peak")
    ax.grid(True, axis="x", alpha=0.3)

    fig.suptitle(
        f"streamvae bench: {run['config']} {run['dtype']} {run['size'][0]}x{run['size'][1]} "
        f"on {run['device_name']} ({run['device']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- CLI ----


def add_bench_command(subparsers: Any) -> None:
    """Add ``streamvae bench`` to the CLI's subcommands."""
    from streamvae.cli import add_model_arguments

    parser = subparsers.add_parser(
        "bench",
        help="latency, throughput, memory and roofline against diffusers",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--size", type=parse_size, default=(128, 128), help="HxW (128x128)")
    parser.add_argument("--frames", type=int, default=9, help="frames per clip (9)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed passes per encoder (CPU 3, CUDA 10)"
    )
    parser.add_argument(
        "--fps",
        type=parse_numbers,
        default=DEFAULT_LIVE_FPS,
        help="live mode rates, comma-separated (16,24,30); 0 skips live mode",
    )
    parser.add_argument(
        "--live-frames", type=int, default=None, help="frames per live run (max(frames, 33))"
    )
    parser.add_argument(
        "--lengths",
        type=parse_numbers,
        default=DEFAULT_LENGTHS,
        help="stream lengths for memory vs length (17,65,257); 0 skips it",
    )
    parser.add_argument(
        "--memory-size",
        type=parse_size,
        default=None,
        help="frame size for memory vs length (CPU 32x32, CUDA: --size)",
    )
    parser.add_argument("--mode", choices=["frame", "group"], default="frame")
    parser.add_argument(
        "--memory-format",
        choices=["auto", *MEMORY_FORMATS],
        default="auto",
        help="state layout (auto: the device's default)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (float32 runs)")
    parser.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="on CUDA, cuDNN's default algorithms instead of the fastest measured per shape",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, launch every step's kernels instead of replaying captured CUDA graphs",
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--plot", type=Path, help="write the PNG here")
    from streamvae.bench_pool import add_pool_arguments

    add_pool_arguments(parser)  # --streams, --phases, --ticks, --sweep
    parser.set_defaults(run=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    """Run ``streamvae bench`` from parsed arguments."""
    from streamvae.cli import DTYPES, model_from_args

    dtype = DTYPES[args.dtype]
    args32 = copy.copy(args)
    args32.dtype = "float32"
    choice = model_from_args(args32)
    reference = None
    encoder = choice.encoder
    if dtype != torch.float32:
        reference = encoder
        encoder = copy.deepcopy(reference).to(dtype)
    if getattr(args, "streams", None) or getattr(args, "sweep", None):
        from streamvae.bench_pool import pool_bench_command

        return pool_bench_command(args, encoder)
    cuda = encoder.device.type == "cuda"
    options = BenchOptions(
        size=args.size,
        frames=args.frames,
        repeats=args.repeats or (10 if cuda else 3),
        live_fps=tuple(args.fps),
        live_frames=args.live_frames or max(args.frames, 33),
        lengths=tuple(int(n) for n in args.lengths),
        memory_size=args.memory_size or (args.size if cuda else (32, 32)),
        mode=args.mode,
        memory_format=args.memory_format,
        peers=not args.no_peers,
        tf32=args.tf32,
        cuda_graphs=not args.no_cuda_graphs,
        cudnn_benchmark=not args.no_cudnn_benchmark,
        label=choice.label,
        command="streamvae " + " ".join(sys.argv[1:]) if sys.argv else "",
    )
    if options.frames < 1 + encoder.config.temporal_stride:
        raise SystemExit(
            f"streamvae bench: --frames must be at least {1 + encoder.config.temporal_stride}"
        )
    for flag, size in (("--size", options.size), ("--memory-size", options.memory_size)):
        problem = encoder.config.size_error(*size)
        if problem is not None:
            raise SystemExit(f"streamvae bench: {flag} {size[0]}x{size[1]}: {problem}")
    report = run_bench(encoder, options, reference)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        sys.exit(_memory_probe_main(sys.argv[2]))
    sys.exit("usage: streamvae bench ... (this module's own entry point is internal)")
