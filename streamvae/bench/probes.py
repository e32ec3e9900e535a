"""Memory probes: peak RSS (and CUDA allocation) of a block, and memory against stream length,
each point measured in a fresh process on the CPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamvae.bench.clips import frames_to_video, synthetic_frame
from streamvae.bench.peers import DiffusersPeer, new_stream
from streamvae.model import WanEncoder

__all__ = [
    "MemoryPeak",
    "live_memory",
    "memory_against_length",
    "memory_probe_main",
    "track_memory",
]

MEMORY_SAMPLE_S = 0.001


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS so that RSS tracks live memory (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def live_memory(device: torch.device) -> tuple[int, int | None]:
    """This process's memory now, in bytes: its RSS once freed heap memory is given back to
    the OS, and on CUDA the bytes ``device``'s allocator has allocated (else ``None``)."""
    gc.collect()
    _malloc_trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return _rss(), int(torch.cuda.memory_allocated(device))
    return _rss(), None


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


# The package whose __main__ runs a probe in a fresh process (python -m streamvae.bench): a
# process to start, not a module to import.
_PROBE_PACKAGE = __name__.rpartition(".")[0]


def _run_probe(probe: dict[str, Any]) -> float | str:
    import subprocess

    # glibc: blocks of 64 KiB and more come from mmap and go back to the OS when freed, so the
    # child's RSS follows its live memory and its high-water mark is the true peak (the heap's
    # retention would otherwise add tens of MB of noise). Costs speed; the child is not timed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run(
        [sys.executable, "-m", _PROBE_PACKAGE, "--memory-probe", json.dumps(probe)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def memory_probe_main(text: str) -> int:
    """Child process of :func:`memory_against_length` (``python -m streamvae.bench --memory-probe
    JSON``): load the model, measure one point, print ``{"peak_mb": ...}``."""
    from streamvae.config import WanConfig

    probe = json.loads(text)
    torch.set_num_threads(int(probe["threads"]))
    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in probe["config"].items()
    }
    config = WanConfig(**fields)
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
