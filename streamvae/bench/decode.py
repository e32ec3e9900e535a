"""``streamvae bench --decode``: the streaming decoder against diffusers' and Wan's decode.

Same weights (the peers hold a :class:`WanDecoder`'s tensors under their own names), same
latents (seeded, normalised, ``[1, z, T, h, w]`` for ``--frames`` frames at ``--size``):

- ``streamvae``: :class:`streamvae.StreamDecoder`, latent by latent, each frame taken as soon
  as it is complete (:meth:`~streamvae.StreamDecoder.iter_push`): time from a latent's arrival
  to its first and to its last frame;
- ``streamvae_batch``: :meth:`WanDecoder.decode` of the whole clip;
- ``diffusers`` (whole clip) and ``diffusers_per_latent`` (its own cache stepped one latent a
  call, as its ``_decode`` loop does): a latent's frames all arrive when its call returns;
- ``official_wan``: Wan's ``WanVAE_.decode`` (vae2_1.py / vae2_2.py) of the whole clip.

Frames/s over the clip, per-latent first/last-frame times (median over the later latents, the
steady state), and each peer's error against streamvae's frames (``max |a - b| / max |b|``,
clamped as Wan's wrapper clamps).

    streamvae bench --decode --random-weights --device cpu --size 64x64 --frames 9
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

from streamvae.bench.peers import OFFICIAL_WAN, PeerUnavailable, load_peer_file
from streamvae.bench.timing import Clock, median, rel_err
from streamvae.decoding import StreamDecoder
from streamvae.model import WanDecoder
from streamvae.model_args import decoder_from_args
from streamvae.usage import usage_error
from streamvae.weights import (
    diffusers_config,
    diffusers_to_streamvae_decoder_name,
    wan_to_streamvae_decoder_name,
)

__all__ = ["decode_bench", "decode_bench_command", "format_decode_report"]


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
    cuda = decoder.device.type == "cuda"
    report = decode_bench(
        decoder,
        (height // stride, width // stride),
        latents,
        repeats=args.repeats or (10 if cuda else 3),
        peers=not args.no_peers,
    )
    report["label"] = label
    report["command"] = "streamvae " + " ".join(sys.argv[1:]) if sys.argv else ""
    print(format_decode_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
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
) -> dict[str, Any]:
    """Measure the decoders on ``latents`` latents of ``latent_size``; the JSON-ready report."""
    config = decoder.config
    clock = Clock(decoder.device)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((1, config.z_dim, latents, *latent_size), generator=generator)
    z = z.to(decoder.device)
    raw = decoder.denormalize(z).to(decoder.dtype)  # diffusers takes latents in its dtype
    frames_total = 1 + config.temporal_stride * (latents - 1)
    results: dict[str, dict[str, Any]] = {}

    # streamvae, latent by latent, frame by frame.
    runs = []
    reference: torch.Tensor | None = None
    for _ in range(repeats + 1):  # the first run warms up (weight packing, allocation)
        stream = StreamDecoder(decoder, output_device=None)
        firsts, lasts, frames = [], [], []
        start = clock.now()
        for i in range(latents):
            arrived = clock.now()
            for k, frame in enumerate(stream.iter_push(z[0, :, i])):
                done = clock.now()
                if k == 0:
                    firsts.append(done - arrived)
                frames.append(frame.data)
            lasts.append(clock.now() - arrived)
        runs.append((clock.now() - start, firsts, lasts))
        reference = torch.stack(frames, dim=1)[None].cpu()
    assert reference is not None
    timed = runs[1:]
    results["streamvae"] = _entry(
        [t for t, _, _ in timed],
        frames_total,
        first=[median([r[1][i] for r in timed]) for i in range(latents)],
        last=[median([r[2][i] for r in timed]) for i in range(latents)],
    )
    results["streamvae"]["error"] = 0.0

    def batch_run(name: str, fn: Any) -> None:
        try:
            out = fn()  # warm-up, and the frames the error is taken on
        except PeerUnavailable as exc:
            results[name] = {"unavailable": str(exc)}
            return
        seconds = []
        for _ in range(repeats):
            start = clock.now()
            fn()
            seconds.append(clock.now() - start)
        results[name] = _entry(seconds, frames_total)
        results[name]["error"] = rel_err(out.float().clamp(-1, 1).cpu(), reference)

    batch_run("streamvae_batch", lambda: decoder.decode(z))
    if peers:
        twin = _diffusers_twin(decoder)
        if twin is not None:
            batch_run("diffusers", lambda: _no_grad(lambda: twin.decode(raw).sample))
            calls: list[list[float]] = []  # per run, each latent's call (the first warms up)

            def stepped() -> torch.Tensor:
                out, times = _diffusers_per_latent(twin, raw, clock)
                calls.append(times)
                return out

            batch_run("diffusers_per_latent", stepped)
            if len(calls) > 1:
                # A latent's frames all arrive when its call returns: first = last.
                per = [median([run[i] for run in calls[1:]]) for i in range(latents)]
                results["diffusers_per_latent"]["first_frame_ms"] = _ms(per)
                results["diffusers_per_latent"]["last_frame_ms"] = _ms(per)
        else:
            results["diffusers"] = {"unavailable": "diffusers is not installed"}
        batch_run("official_wan", lambda: _official(decoder).decode(z))
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
        from diffusers import AutoencoderKLWan
    except ImportError:
        return None
    config = decoder.config
    kwargs = diffusers_config(config, decoder_base_dim=config.decoder_base_dim)
    with torch.device("meta"):
        vae: Any = AutoencoderKLWan(**kwargs)  # type: ignore[no-untyped-call]
    ours = decoder.state_dict()
    for prefix, module in (("decoder.", vae.decoder), ("post_quant_conv.", vae.post_quant_conv)):
        theirs = {}
        for name in module.state_dict():
            target = diffusers_to_streamvae_decoder_name(prefix + name)
            if target is None or target not in ours:
                raise KeyError(f"diffusers tensor {prefix + name} has no streamvae twin")
            theirs[name] = ours[target]
        module.load_state_dict(theirs, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


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
        module = load_peer_file(OFFICIAL_WAN["2_2" if config.residual else "2_1"])
        shared = diffusers_config(config)
        keys = ("z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")
        kwargs: dict[str, Any] = {"dim": config.base_dim, "dropout": 0.0}
        kwargs |= {k: shared[k] for k in keys}
        if config.residual:
            kwargs["dec_dim"] = config.decoder_base_dim
        elif config.decoder_base_dim != config.base_dim:
            raise PeerUnavailable("Wan 2.1's code builds its decoder as wide as its encoder")
        with torch.device("meta"):
            model = module.WanVAE_(**kwargs)
        ours = decoder.state_dict()
        for prefix in ("decoder.", "conv2."):
            part = getattr(model, prefix[:-1])
            theirs = {}
            for name in part.state_dict():
                target = wan_to_streamvae_decoder_name(prefix + name, config.num_res_blocks)
                if target is None or target not in ours:
                    raise PeerUnavailable(f"Wan's {prefix + name} has no streamvae twin")
                theirs[name] = ours[target]
            part.load_state_dict(theirs, strict=True, assign=True)
        self.model = model.eval().requires_grad_(False)
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
    for peer in ("diffusers", "diffusers_per_latent", "official_wan"):
        entry = results.get(peer, {})
        if "frames_per_s" in entry:
            ratio = ours["frames_per_s"] / entry["frames_per_s"]
            lines.append(f"streamvae frames/s vs {peer}: {ratio:.2f}x")
    return "\n".join(lines)
