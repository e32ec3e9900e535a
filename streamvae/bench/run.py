"""One ``streamvae bench`` run: streamvae and every peer on the same weights and frames, timed
in interleaved repeats, then memory, live mode and the roofline; the JSON-ready report."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import streamvae
from streamvae.bench.clips import frames_to_video, synthetic_frames
from streamvae.bench.flops import diffusers_flops, measure_peak_flops, streamvae_flops
from streamvae.bench.live import run_live
from streamvae.bench.options import MEMORY_FORMATS, BenchOptions
from streamvae.bench.peers import (
    OFFICIAL_WAN,
    STREAMDIFFUSIONV2,
    DiffusersPeer,
    OfficialWanPeer,
    PeerUnavailable,
    StreamDiffusionV2Peer,
    StreamRun,
    last_push_shares,
    new_stream,
    run_stream,
)
from streamvae.bench.probes import memory_against_length, track_memory
from streamvae.bench.report import check_targets
from streamvae.bench.timing import (
    Clock,
    Progress,
    cuda_event_time,
    median,
    percentiles_ms,
    rel_err,
)
from streamvae.model import WanEncoder, default_memory_format, triton_kernels

__all__ = ["PEERS", "peer_table", "run_bench"]

PEERS = ("diffusers_batch", "diffusers_group", "official_wan", "streamdiffusionv2")
"""Every peer one run measures (each reported, measured or with the reason it was not)."""


def peer_table(
    encoders: dict[str, Any],
    group_latencies: dict[str, list[float]],
    official_errors: dict[str, float],
    unavailable: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """streamvae and each peer: latency after a group's last frame, frames/s, error against
    Wan's official code, and the ratios of streamvae to it (measured in this run).

    ``latency_after_group_ms``: from the arrival of the last frame of a group (frames 1-4, 5-8,
    ...) to its latent on the host; latent 0 (frame 0 alone) is left out, as a peer that takes
    frame 0 with the first group has no time of its own for it. ``latency_ratio`` is the
    peer's p50 over streamvae's, ``throughput_ratio`` streamvae's frames/s over the peer's.
    """
    ours = percentiles_ms(group_latencies["streamvae"])
    table: dict[str, dict[str, Any]] = {}
    for name in ("streamvae", *PEERS):
        entry = encoders.get(name)
        if entry is None:
            table[name] = {"status": unavailable.get(name) or "not measured"}
            continue
        latency = percentiles_ms(group_latencies[name])
        row: dict[str, Any] = {
            "status": "measured",
            "latency_after_group_ms": latency,
            "fps": entry["fps"],
            "error_vs_official": official_errors.get(name),
        }
        if name != "streamvae":
            p50, theirs = ours["p50"], latency["p50"]
            row["latency_ratio"] = round(theirs / p50, 3) if p50 and theirs else None
            row["throughput_ratio"] = round(encoders["streamvae"]["fps"] / entry["fps"], 3)
        table[name] = row
    return table


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
    for peer in (OFFICIAL_WAN["2_1"], STREAMDIFFUSIONV2):  # the peers' code, loaded by path
        try:
            versions[peer.distribution] = importlib.metadata.version(peer.distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[peer.distribution] = None
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
    progress = Progress()
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
    official: OfficialWanPeer | None = None
    sdv2: StreamDiffusionV2Peer | None = None
    unavailable: dict[str, str] = {}
    if options.peers:
        try:
            official = OfficialWanPeer(encoder)
        except PeerUnavailable as exc:
            unavailable["official_wan"] = str(exc)
        try:
            sdv2 = StreamDiffusionV2Peer(encoder)
        except PeerUnavailable as exc:
            unavailable["streamdiffusionv2"] = str(exc)
    notes += [f"{name}: {why}" for name, why in unavailable.items()]

    # Which norm kernels the steps run (the Triton ones self-check here, before any capture).
    norm_kernels = triton_kernels.describe(device, dtype)
    progress(f"norm kernels: {norm_kernels}")
    # Warm-up, each encoder once; memory is tracked on these passes (no timing is taken).
    progress(f"warm-up: streamvae, {options.frames} frames at {height}x{width}")
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
        progress("warm-up: peers")
        with track_memory(device) as peak:
            peer.batch(video)
        memory["diffusers_batch"] = peak.as_mb()
        with track_memory(device) as peak:
            peer.groups(video, clock)
        memory["diffusers_group"] = peak.as_mb()
    if official is not None:
        official.batch(video)
    if sdv2 is not None:
        sdv2.groups(video, clock)
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
    group_after_s: list[float] = []
    batch32_s: list[float] = []
    official_s: list[float] = []
    sdv2_latency_s: list[float] = []
    sdv2_total_s: list[float] = []
    batch_mean = group_mean = official_mean = sdv2_mean = None
    for repeat in range(options.repeats):
        progress(f"repeat {repeat + 1}/{options.repeats}")
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
                batch_device_s.append(cuda_event_time(lambda: peer.batch(video), device))
            times, group_mean = peer.groups(video, clock)
            group_latency_s += times
            group_after_s += times[1:]  # chunk 0 is frame 0 alone
            group_total_s.append(sum(times))
        if official is not None:
            began = clock.now()
            official_mean = official.batch(video)
            official_s.append(clock.now() - began)
        if sdv2 is not None:
            times, sdv2_mean = sdv2.groups(video, clock)
            sdv2_latency_s += times
            sdv2_total_s.append(sum(times))
        if peer32 is not None and video32 is not None:
            began = clock.now()
            peer32.batch(video32)
            batch32_s.append(clock.now() - began)
    stream_latents = latency_runs[-1].latents
    latent_s = [t for run in latency_runs for t in run.latent_s]
    first_latent_s = [run.push_s[0] for run in latency_runs]
    shares = [s for run in latency_runs for s in last_push_shares(run.push_s, group)]
    clip_s = median(throughput_s)
    fps = options.frames / clip_s

    # Precision.
    progress("errors, roofline")
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

    official_errors: dict[str, float] = {}
    if official_mean is not None:
        for name, got in (
            ("streamvae", stream_latents),
            ("diffusers_batch", batch_mean),
            ("diffusers_group", group_mean),
            ("streamdiffusionv2", sdv2_mean),
        ):
            if got is not None:
                official_errors[name] = rel_err(got, official_mean)
        official_errors["official_wan"] = 0.0  # the reference itself
        error["vs_official"] = official_errors["streamvae"]

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
        batch_clip = median(batch_s)
        encoders["diffusers_batch"] = {
            "clip_s": round(batch_clip, 4),
            "device_clip_s": round(median(batch_device_s), 4) if batch_device_s else None,
            "fps": round(options.frames / batch_clip, 3),
            # Every latent of a batch encode is ready when the whole clip is done.
            "latency_ms": percentiles_ms(batch_s),
            "latency_samples_ms": [round(t * 1e3, 3) for t in batch_s],
            "achieved_flops": (flops_clip_diffusers or flops_clip) / batch_clip,
        }
        group_clip = median(group_total_s)
        encoders["diffusers_group"] = {
            "clip_s": round(group_clip, 4),
            "fps": round(options.frames / group_clip, 3),
            "latency_ms": percentiles_ms(group_latency_s),
            "latency_samples_ms": [round(t * 1e3, 3) for t in group_latency_s],
            "achieved_flops": (flops_clip_diffusers or flops_clip) / group_clip,
        }
        vs["batch_speedup"] = round(batch_clip / clip_s, 3)
        vs["group_speedup"] = round(group_clip / clip_s, 3)
    if batch32_s:
        batch32_clip = median(batch32_s)
        encoders["diffusers_batch_float32"] = {
            "clip_s": round(batch32_clip, 4),
            "fps": round(options.frames / batch32_clip, 3),
            "achieved_flops": (flops_clip_diffusers or flops_clip) * 1.0 / batch32_clip,
        }
        vs["batch_float32_speedup"] = round(batch32_clip / clip_s, 3)

    if official_s:
        official_clip = median(official_s)
        encoders["official_wan"] = {
            "clip_s": round(official_clip, 4),
            "fps": round(options.frames / official_clip, 3),
            "latency_ms": percentiles_ms(official_s),  # a batch encoder: the whole clip
            "latency_samples_ms": [round(t * 1e3, 3) for t in official_s],
            "achieved_flops": (flops_clip_diffusers or flops_clip) / official_clip,
        }
    if sdv2_total_s:
        sdv2_clip = median(sdv2_total_s)
        encoders["streamdiffusionv2"] = {
            "clip_s": round(sdv2_clip, 4),
            "fps": round(options.frames / sdv2_clip, 3),
            "latency_ms": percentiles_ms(sdv2_latency_s),  # each call: a group's whole time
            "latency_samples_ms": [round(t * 1e3, 3) for t in sdv2_latency_s],
            "achieved_flops": (flops_clip_diffusers or flops_clip) / sdv2_clip,
        }
    group_latencies = {
        "streamvae": [t for run in latency_runs for t in run.latent_s[1:]],
        "diffusers_batch": batch_s,
        "diffusers_group": group_after_s,
        "official_wan": official_s,
        "streamdiffusionv2": sdv2_latency_s,
    }
    if not options.peers:
        unavailable = dict.fromkeys(PEERS, "skipped (--no-peers)")
    elif peer is None:
        missing = "not installed (pip install diffusers)"
        unavailable |= dict.fromkeys(("diffusers_batch", "diffusers_group"), missing)
    peers = peer_table(encoders, group_latencies, official_errors, unavailable)
    if "group_speedup" in vs:  # the peer table's ratio: one definition (latent 0 left out)
        vs["group_latency_ratio"] = peers["diffusers_group"].get("latency_ratio")

    def live_run(fps_value: float) -> dict[str, Any]:
        progress(f"live mode at {fps_value:g} frames/s")
        return run_live(
            encoder,
            fps_value,
            options.live_frames,
            (height, width),
            memory_format,
            options.mode,
            cuda_graphs=options.cuda_graphs,
        ).as_json()

    live = [live_run(fps_value) for fps_value in options.live_fps]
    if options.lengths:
        progress(f"memory vs stream length: {', '.join(map(str, options.lengths))} frames")
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
            "norm_kernels": norm_kernels,
            "versions": _versions(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "command": options.command,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "latency_ms": percentiles_ms(latent_s),
        "latency_after_group_ms": peers["streamvae"]["latency_after_group_ms"],
        "first_latent_ms": round(median(first_latent_s) * 1e3, 3),
        "cold_first_latent_ms": round(cold_first * 1e3, 3),
        "fps": round(fps, 3),
        "last_push_share": round(median(shares), 4) if shares else None,
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
        "peers": peers,
        "live": live,
        "memory_vs_length": sweep,
        "notes": notes,
    }
    report["targets"] = check_targets(report)
    progress("done")
    return report
