"""``streamvae bench --decode``: the streaming decoder against diffusers' and Wan's decode.

Same weights (the peers hold a :class:`WanDecoder`'s tensors under their own names), same
latents (seeded, normalised, ``[1, z, T, h, w]`` for ``--frames`` frames at ``--size``):

- ``streamvae``: :class:`streamvae.StreamDecoder`, latent by latent, each frame taken as soon
  as it is complete (:meth:`~streamvae.StreamDecoder.iter_push`): time from a latent's arrival
  to its first and to its last frame;
- ``streamvae_batch``: :meth:`WanDecoder.decode` of the whole clip;
- ``diffusers`` (whole clip) and ``diffusers_per_latent`` (its own cache stepped one latent a
  call, as its ``_decode`` loop does): a latent's frames all arrive when its call returns;
- ``official_wan``: Wan's ``WanVAE_.decode`` (vae2_1.py / vae2_2.py) of the whole clip;
- ``streamdiffusionv2``: StreamDiffusionV2's ``stream_decode`` (Wan 2.1 only), called as its
  streaming loop calls it (latents 0 and 1, then one latent a call): a latent's frames all
  arrive when its call returns.

Also the error of a bfloat16 copy of the decoder (StreamDecoder) against its float32 frames
(on the GPU over the clip; on the CPU over three latents at ``--memory-size``), and memory against stream length: one stream of tiny latents (``--memory-size``,
default 8x8 pixels) read at ``--memory-latents`` (default 100 and 1000 pushed latents): RSS
(and on CUDA the allocator's bytes) with the stream's state, which must stay flat.

Frames/s over the clip, per-latent first/last-frame times (median over the later latents, the
steady state), and each peer's error against streamvae's frames (``max |a - b| / max |b|``,
clamped as Wan's wrapper clamps).

    streamvae bench --decode --random-weights --device cpu --size 64x64 --frames 9 \
        --memory-latents 100,1000,10000
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamvae.bench.peers import (
    OFFICIAL_WAN,
    PeerUnavailable,
    StreamDiffusionV2Decoder,
    diffusers_model,
    load_peer_file,
    wan_model,
)
from streamvae.bench.probes import live_memory
from streamvae.bench.report import write_json
from streamvae.bench.timing import Clock, median, rel_err
from streamvae.decoding import StreamDecoder
from streamvae.model import WanDecoder
from streamvae.model_args import decoder_from_args
from streamvae.usage import usage_error

__all__ = [
    "decode_bench",
    "decode_bench_command",
    "decode_memory_against_length",
    "format_decode_report",
]


def decode_bench_command(args: argparse.Namespace) -> int:
    """``streamvae bench --decode`` from parsed arguments (``--size``, ``--frames``,
    ``--repeats``, ``--no-peers``, ``--json`` and the model options)."""
    decoder, label, _ = decoder_from_args(args)
    stride = decoder.config.spatial_stride
    height, width = args.size
    if height % stride or width % stride:
        usage_error(f"--size {height}x{width}: multiples of {stride} for {decoder.config.name}")
    group = decoder.config.temporal_stride
    if args.frames < 1 + group:
        usage_error(f"--frames {args.frames}: at least {1 + group} (latent 0 and one more)")
    latents = 1 + (args.frames - 1) // group
    memory_size = args.memory_size or (stride, stride)
    if memory_size[0] % stride or memory_size[1] % stride:
        usage_error(
            f"--memory-size {memory_size[0]}x{memory_size[1]}: multiples of {stride} for "
            f"{decoder.config.name}"
        )
    cuda = decoder.device.type == "cuda"
    report = decode_bench(
        decoder,
        (height // stride, width // stride),
        latents,
        repeats=args.repeats or (10 if cuda else 3),
        peers=not args.no_peers,
        memory_latents=[n for n in args.memory_latents if n > 0],
        memory_size=(memory_size[0] // stride, memory_size[1] // stride),
    )
    report["label"] = label
    report["command"] = "streamvae " + " ".join(sys.argv[1:]) if sys.argv else ""
    print(format_decode_report(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def decode_bench(
    decoder: WanDecoder,
    latent_size: tuple[int, int],
    latents: int,
    *,
    repeats: int = 3,
    peers: bool = True,
    seed: int = 0,
    bf16: bool = True,
    memory_latents: Sequence[int] = (),
    memory_size: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """Measure the decoders on ``latents`` latents of ``latent_size``; the JSON-ready report.

    ``bf16``: also the error of a bfloat16 copy of the decoder; ``memory_latents``: read the
    memory of one stream of ``memory_size`` latents at these lengths
    (:func:`decode_memory_against_length`)."""
    config = decoder.config
    clock = Clock(decoder.device)
    z = _latents(decoder, latent_size, latents, seed)
    raw = decoder.denormalize(z).to(decoder.dtype)  # diffusers takes latents in its dtype
    frames_total = 1 + config.temporal_stride * (latents - 1)
    results: dict[str, dict[str, Any]] = {}

    runners: dict[str, Callable[[], _Run]] = {}

    def ours() -> _Run:  # streamvae, latent by latent, each frame as soon as it is complete
        stream = StreamDecoder(decoder, output_device=None)
        firsts, lasts, frames = [], [], []
        start = clock.now()
        for i in range(latents):
            arrived = clock.now()
            for k, frame in enumerate(stream.iter_push(z[0, :, i])):
                if k == 0:
                    firsts.append(clock.now() - arrived)
                frames.append(frame.data)
            lasts.append(clock.now() - arrived)
        seconds = clock.now() - start
        return _Run(seconds, torch.stack(frames, dim=1)[None], firsts, lasts)

    runners["streamvae"] = ours
    runners["streamvae_batch"] = lambda: _timed(clock, lambda: decoder.decode(z))
    if peers:
        twin = _diffusers_twin(decoder)
        if twin is not None:
            runners["diffusers"] = lambda: _timed(
                clock, lambda: _no_grad(lambda: twin.decode(raw).sample)
            )

            def stepped() -> _Run:  # a latent's frames all arrive when its call returns
                start = clock.now()
                out, times = _diffusers_per_latent(twin, raw, clock)
                return _Run(clock.now() - start, out, times, times)

            runners["diffusers_per_latent"] = stepped
        else:
            results["diffusers"] = {"unavailable": "diffusers is not installed"}
        runners["official_wan"] = lambda: _timed(clock, lambda: _official(decoder).decode(z))
        try:
            sdv2 = StreamDiffusionV2Decoder(decoder)
        except PeerUnavailable as exc:
            results["streamdiffusionv2"] = {"unavailable": str(exc)}
        else:

            def sdv2_run() -> _Run:  # its first call holds latents 0 and 1: both arrive then
                start = clock.now()
                times, out = sdv2.latents(z, clock)
                per = [times[0], *times]
                return _Run(clock.now() - start, out, per, per)

            runners["streamdiffusionv2"] = sdv2_run
    # A warm-up run of each (weight packing, allocation; the frames the errors are taken on),
    # then the timed runs interleaved (streamvae, its batch, diffusers, ..., streamvae, ...), so
    # that a burst of load from another process hits every decoder, not the one timed then.
    warm: dict[str, _Run] = {}
    for name, runner in list(runners.items()):
        try:
            warm[name] = runner()
        except PeerUnavailable as exc:
            results[name] = {"unavailable": str(exc)}
            del runners[name]
    timed: dict[str, list[_Run]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            timed[name].append(runner())
    reference = warm["streamvae"].frames.cpu()
    for name, runs in timed.items():
        first = last = None
        if runs[0].first is not None and runs[0].last is not None:
            first = [median([r.first[i] for r in runs if r.first]) for i in range(latents)]
            last = [median([r.last[i] for r in runs if r.last]) for i in range(latents)]
        results[name] = _entry([r.seconds for r in runs], frames_total, first=first, last=last)
        if name != "streamvae":
            # A latent's frames all arrive together: no share of first to last to report.
            results[name].pop("first_of_last_share", None)
        frames = warm[name].frames.float().clamp(-1, 1).cpu()
        results[name]["error"] = 0.0 if name == "streamvae" else rel_err(frames, reference)
    results = {name: results[name] for name in [*runners, *results] if name in results}
    extra: dict[str, Any] = {}
    if bf16 and decoder.dtype != torch.bfloat16:
        # On the GPU over the clip; on the CPU, where bfloat16 convolutions may take PyTorch's
        # slow path (no oneDNN bfloat16), over three latents of ``memory_size``.
        cuda = decoder.device.type == "cuda"
        extra.update(_bf16_error(decoder, z if cuda else _latents(decoder, memory_size, 3, seed)))
    if memory_latents:
        extra["memory_vs_length"] = decode_memory_against_length(
            decoder, memory_latents, memory_size, seed=seed
        )
    return {
        "config": config.name,
        "device": str(decoder.device),
        "dtype": str(decoder.dtype).removeprefix("torch."),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "size": f"{latent_size[0] * config.spatial_stride}x{latent_size[1] * config.spatial_stride}",
        "latents": latents,
        "frames": frames_total,
        "repeats": repeats,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
        **extra,
    }


@dataclass(frozen=True)
class _Run:
    """One timed run of a decoder over the clip: its seconds and frames ``[1, 3, T, H, W]``,
    and where it hands frames out as latents arrive, each latent's time from its arrival to
    its first and to its last frame."""

    seconds: float
    frames: torch.Tensor
    first: list[float] | None = None
    last: list[float] | None = None


def _timed(clock: Clock, fn: Callable[[], torch.Tensor]) -> _Run:
    start = clock.now()
    out = fn()
    return _Run(clock.now() - start, out)


def _latents(
    decoder: WanDecoder, latent_size: tuple[int, int], count: int, seed: int
) -> torch.Tensor:
    """Seeded normalised latents ``[1, z, count, h, w]`` on the decoder's device."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((1, decoder.config.z_dim, count, *latent_size), generator=generator)
    return z.to(decoder.device)


def _bf16_error(decoder: WanDecoder, z: torch.Tensor) -> dict[str, Any]:
    """The error of a bfloat16 copy of ``decoder`` (StreamDecoder) against its float32 frames
    of the latents ``z``, and the size it was taken at."""
    latents = list(z[0].unbind(1))
    exact = torch.stack([f.data for f in StreamDecoder(decoder).push_many(latents)], dim=1)
    half = copy.deepcopy(decoder).to(torch.bfloat16)
    frames = torch.stack([f.data for f in StreamDecoder(half).push_many(latents)], dim=1)
    stride = decoder.config.spatial_stride
    return {
        "bf16_error": rel_err(frames, exact),
        "bf16_size": f"{z.shape[3] * stride}x{z.shape[4] * stride}, {z.shape[2]} latents",
    }


def decode_memory_against_length(
    decoder: WanDecoder, lengths: Sequence[int], latent_size: tuple[int, int], *, seed: int = 0
) -> dict[str, Any]:
    """Memory of one :class:`StreamDecoder` stream as it grows: pushed ``max(lengths)`` latents
    of ``latent_size`` (seeded, normalised; their frames dropped as they come), the process's
    memory read after latent 1 (the state allocated) and after each of ``lengths`` latents.
    A streaming decoder's memory is flat: what it holds does not grow with the stream."""
    config = decoder.config
    inputs = _latents(decoder, latent_size, 16, seed)[0]  # [z, 16, h, w], pushed in turn
    stream = StreamDecoder(decoder, output_device=None)
    points = sorted(set(lengths))
    rss: list[float] = []
    cuda: list[float] = []
    readings = sorted({1, *points})
    started = time.monotonic()
    for n in range(1, points[-1] + 1):
        stream.push(inputs[:, n % inputs.shape[1]])
        if n in readings:
            host, device = live_memory(decoder.device)
            rss.append(round(host / 2**20, 1))
            if device is not None:
                cuda.append(round(device / 2**20, 1))
    stride = config.spatial_stride
    return {
        "size": f"{latent_size[0] * stride}x{latent_size[1] * stride}",
        "latents": readings,
        "rss_mb": rss,
        "cuda_allocated_mb": cuda or None,
        "state_mb": round(stream.state_nbytes / 2**20, 3),
        "growth_mb": round(rss[-1] - rss[0], 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def _entry(
    seconds: list[float],
    frames: int,
    *,
    first: list[float] | None = None,
    last: list[float] | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"seconds": median(seconds), "frames_per_s": frames / median(seconds)}
    if first is not None and last is not None:
        entry["first_frame_ms"] = _ms(first)
        entry["last_frame_ms"] = _ms(last)
        steady = [f / t for f, t in zip(first[1:], last[1:]) if t > 0]
        entry["first_of_last_share"] = round(median(steady), 3) if steady else None
    return entry


def _ms(seconds: list[float]) -> dict[str, float]:
    """Latent 0's time and the median of the later latents' (the steady state), in ms."""
    later = seconds[1:] or seconds
    return {"latent0": round(seconds[0] * 1e3, 3), "steady": round(median(later) * 1e3, 3)}


def _no_grad(fn: Any) -> Any:
    with torch.inference_mode():
        return fn()


def _diffusers_twin(decoder: WanDecoder) -> Any:
    """diffusers' ``AutoencoderKLWan`` holding ``decoder``'s tensors (its encoder never built
    beyond the meta device); ``None`` without diffusers."""
    try:
        return diffusers_model(decoder)
    except ImportError:
        return None


@torch.inference_mode()
def _diffusers_per_latent(
    vae: Any, raw: torch.Tensor, clock: Clock
) -> tuple[torch.Tensor, list[float]]:
    """diffusers' decode loop, one latent a call (its ``_decode`` without the concatenation):
    the frames and each call's seconds."""
    vae.clear_cache()
    x = vae.post_quant_conv(raw)
    outs, times = [], []
    for i in range(raw.shape[2]):
        start = clock.now()
        vae._conv_idx = [0]
        out = vae.decoder(
            x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
        )
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)  # type: ignore[no-untyped-call]
        outs.append(out)
        times.append(clock.now() - start)
    vae.clear_cache()
    return torch.cat(outs, dim=2), times


class _OfficialDecoder:
    """Wan's own ``WanVAE_.decode`` holding a :class:`WanDecoder`'s tensors (Wan's names)."""

    def __init__(self, decoder: WanDecoder) -> None:
        config = decoder.config
        version = "2_2" if config.residual else "2_1"
        extra = {"dec_dim": config.decoder_base_dim} if config.residual else {}
        self.model = wan_model(load_peer_file(OFFICIAL_WAN[version]), decoder, **extra)
        self.dtype = decoder.dtype
        self.scale = [
            torch.tensor(config.latents_mean, device=decoder.device),
            1.0 / torch.tensor(config.latents_std, device=decoder.device),
        ]

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype  # latents and scale in the weights' dtype
        scale = [s.to(dtype) for s in self.scale]
        out: torch.Tensor = self.model.decode(z.to(dtype), scale)
        return out.float().clamp_(-1, 1)


_OFFICIAL: dict[int, _OfficialDecoder] = {}


def _official(decoder: WanDecoder) -> _OfficialDecoder:
    if id(decoder) not in _OFFICIAL:
        _OFFICIAL[id(decoder)] = _OfficialDecoder(decoder)
    return _OFFICIAL[id(decoder)]


def format_decode_report(report: dict[str, Any]) -> str:
    """The report as a markdown table (one row per decoder) and the ratios that matter."""
    lines = [
        f"decode: {report['config']} {report['dtype']} on {report['device']} "
        f"({report['threads']} threads), {report['size']}, {report['latents']} latents -> "
        f"{report['frames']} frames, median of {report['repeats']}",
        "",
        "| decoder | frames/s | first frame ms (steady) | last frame ms (steady) | error |",
        "|---|---:|---:|---:|---:|",
    ]
    results = report["results"]
    for name, entry in results.items():
        if "unavailable" in entry:
            lines.append(f"| {name} | unavailable: {entry['unavailable']} | | | |")
            continue
        first = entry.get("first_frame_ms", {}).get("steady", "")
        last = entry.get("last_frame_ms", {}).get("steady", "")
        lines.append(
            f"| {name} | {entry['frames_per_s']:.2f} | {first} | {last} | {entry['error']:.2e} |"
        )
    ours = results["streamvae"]
    lines.append("")
    lines.append(
        f"streamvae: first frame of a latent at {ours['first_of_last_share']} of the time to its "
        "last (steady state)"
    )
    for peer in ("diffusers", "diffusers_per_latent", "official_wan", "streamdiffusionv2"):
        entry = results.get(peer, {})
        if "frames_per_s" in entry:
            ratio = ours["frames_per_s"] / entry["frames_per_s"]
            lines.append(f"streamvae frames/s vs {peer}: {ratio:.2f}x")
    for peer in ("streamdiffusionv2", "diffusers_per_latent"):
        theirs = results.get(peer, {}).get("first_frame_ms", {}).get("steady")
        if theirs:
            share = ours["first_frame_ms"]["steady"] / theirs
            lines.append(
                f"streamvae's first frame of a latent at {share:.2f} of the time of {peer}'s "
                "call for that latent (steady state)"
            )
    if "bf16_error" in report:
        lines.append(
            f"bfloat16 decoder: error {report['bf16_error']:.2e} against float32 "
            f"({report['bf16_size']})"
        )
    memory = report.get("memory_vs_length")
    if memory:
        readings = ", ".join(f"{n}: {mb} MB" for n, mb in zip(memory["latents"], memory["rss_mb"]))
        lines.append(
            f"memory against stream length ({memory['size']}, RSS after n latents): {readings}; "
            f"growth {memory['growth_mb']} MB, the stream's state {memory['state_mb']} MB"
        )
        if memory["cuda_allocated_mb"]:
            lines.append(f"  CUDA allocated: {memory['cuda_allocated_mb']} MB")
    return "\n".join(lines)
