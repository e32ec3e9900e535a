"""The encoders the bench drives: streamvae's StreamEncoder, push by push, and its peers.

Every peer holds exactly a :class:`~streamvae.model.WanEncoder`'s weights (its tensors, shared,
not copied), is built on the meta device with only its encoder materialised, and returns raw
latent means ``[1, z, m, h, w]`` on the host:

- :class:`DiffusersPeer`: diffusers' ``AutoencoderKLWan`` (batch ``encode``, and group by group
  through its own cache);
- :class:`OfficialWanPeer`: Wan's own ``WanVAE_.encode`` from ``wan/modules/vae2_1.py`` (or
  ``vae2_2.py``), PyPI ``wan22`` 2.2.11;
- :class:`StreamDiffusionV2Peer`: StreamDiffusionV2's ``WanVAE_.stream_encode`` from
  ``models/wan/wan_base/modules/vae.py``, PyPI ``streamdiffusionv2`` 0.1.1.

``streamvae bench --decode`` builds its peers with the same loaders (:func:`wan_model`,
:func:`diffusers_model` take a :class:`~streamvae.model.WanDecoder` too), and
:class:`StreamDiffusionV2Decoder` is that file's ``stream_decode``.

The last two files are loaded by path (``import wan`` or ``import models`` would pull in the
rest of those projects); they need only torch and einops. A peer that cannot run here raises
:class:`PeerUnavailable` saying why (not installed, or not built for this model).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from streamvae.bench.timing import Clock
from streamvae.model import WanDecoder, WanEncoder
from streamvae.stream import StreamEncoder
from streamvae.weights import (
    diffusers_config,
    diffusers_to_streamvae_decoder_name,
    diffusers_to_streamvae_name,
    streamvae_to_wan_name,
    wan_to_streamvae_decoder_name,
)

__all__ = [
    "OFFICIAL_WAN",
    "STREAMDIFFUSIONV2",
    "DiffusersPeer",
    "OfficialWanPeer",
    "PeerUnavailable",
    "StreamDiffusionV2Decoder",
    "StreamDiffusionV2Peer",
    "StreamRun",
    "diffusers_model",
    "last_push_shares",
    "load_peer_file",
    "new_stream",
    "run_stream",
    "timed_calls",
    "wan_model",
]


@dataclass(frozen=True)
class PeerFile:
    """Where a peer's code lives: a file of an installed distribution, and how to install it."""

    distribution: str
    path: str
    install: str


OFFICIAL_WAN = {
    "2_1": PeerFile("wan22", "wan/modules/vae2_1.py", "pip install --no-deps wan22==2.2.11"),
    "2_2": PeerFile("wan22", "wan/modules/vae2_2.py", "pip install --no-deps wan22==2.2.11"),
}
"""Wan's official VAE files (PyPI ``wan22``), by version."""

STREAMDIFFUSIONV2 = PeerFile(
    "streamdiffusionv2",
    "models/wan/wan_base/modules/vae.py",
    "pip install --no-deps streamdiffusionv2==0.1.1",
)
"""StreamDiffusionV2's VAE file (PyPI ``streamdiffusionv2``; its torch pin needs ``--no-deps``)."""

_LOADED: dict[PeerFile, ModuleType] = {}


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


class PeerUnavailable(RuntimeError):
    """A peer cannot run here: its package is not installed, or it has no code for this model.

    The message says which and what to do; the bench reports it in place of the peer's figures.
    """


def load_peer_file(where: PeerFile) -> ModuleType:
    """The peer's Python file, loaded by path once per process; :class:`PeerUnavailable` if its
    distribution (or the file in it, or a module it imports) is missing."""
    if where in _LOADED:
        return _LOADED[where]
    try:
        dist = importlib.metadata.distribution(where.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PeerUnavailable(f"not installed ({where.install})") from None
    path = Path(str(dist.locate_file(where.path)))
    if not path.is_file():
        raise PeerUnavailable(f"{where.distribution} has no {where.path} ({where.install})")
    name = "streamvae_peer_" + where.distribution + "_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PeerUnavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise PeerUnavailable(f"{path} needs {exc.name} ({exc})") from None
    _LOADED[where] = module
    return module


def wan_model(module: ModuleType, half: WanEncoder | WanDecoder, **extra: object) -> Any:
    """``module.WanVAE_`` for ``half``'s config on the meta device with only that half
    materialised: an encoder's ``encoder`` and ``conv1``, or a decoder's ``decoder`` and
    ``conv2``, assigned ``half``'s tensors (shared) under Wan's own names (strict: every tensor,
    right shapes); :class:`PeerUnavailable` where the file's model cannot hold them.

    Untyped third-party code, so ``Any``: the typed peer classes are its only callers.
    """
    config = half.config
    shared = diffusers_config(config)
    keys = ("z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")
    decoding = isinstance(half, WanDecoder)
    # Wan 2.1's code builds its decoder as wide as ``dim``; Wan 2.2's takes ``dec_dim``.
    dim = config.decoder_base_dim if decoding and not config.residual else config.base_dim
    kwargs = {"dim": dim, "dropout": 0.0, **{k: shared[k] for k in keys}, **extra}
    with torch.device("meta"):
        model = module.WanVAE_(**kwargs)
    ours = half.state_dict()
    parts = ("decoder", "conv2") if decoding else ("encoder", "conv1")
    if decoding:
        wan = {}
        for part in parts:
            for name in getattr(model, part).state_dict():
                target = wan_to_streamvae_decoder_name(f"{part}.{name}", config.num_res_blocks)
                if target is None or target not in ours:
                    raise PeerUnavailable(f"Wan's {part}.{name} has no streamvae twin")
                wan[f"{part}.{name}"] = ours[target]
    else:
        wan = {streamvae_to_wan_name(n, config): t for n, t in ours.items()}
    for part in parts:
        tensors = {n[len(part) + 1 :]: t for n, t in wan.items() if n.startswith(part + ".")}
        try:
            getattr(model, part).load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise PeerUnavailable(f"cannot hold {config.name}: {str(exc)[:300]}") from None
    held = [t for part in parts for t in getattr(model, part).state_dict().values()]
    if any(t.is_meta for t in held):
        raise PeerUnavailable(f"{module.__name__}: a tensor of its {parts[0]} has no weights")
    return model.eval().requires_grad_(False)


def diffusers_model(half: WanEncoder | WanDecoder) -> Any:
    """diffusers' ``AutoencoderKLWan`` for ``half``'s config, built on the meta device with only
    that half materialised (``encoder`` and ``quant_conv``, or ``decoder`` and
    ``post_quant_conv``), sharing ``half``'s tensors; the other half is never allocated."""
    from diffusers import AutoencoderKLWan

    config = half.config
    decoding = isinstance(half, WanDecoder)
    kwargs = diffusers_config(
        config, decoder_base_dim=config.decoder_base_dim if decoding else None
    )
    with torch.device("meta"):
        vae: Any = AutoencoderKLWan(**kwargs)  # type: ignore[no-untyped-call]
    ours = half.state_dict()
    rename = diffusers_to_streamvae_decoder_name if decoding else diffusers_to_streamvae_name
    for part in ("decoder", "post_quant_conv") if decoding else ("encoder", "quant_conv"):
        module = getattr(vae, part)
        theirs = {}
        for name in module.state_dict():
            target = rename(f"{part}.{name}")
            if target is None or target not in ours:
                raise KeyError(f"diffusers tensor {part}.{name} has no streamvae twin")
            theirs[name] = ours[target]
        module.load_state_dict(theirs, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def timed_calls(
    bounds: Sequence[tuple[int, int]],
    call: Callable[[int, int], torch.Tensor],
    clock: Clock,
) -> tuple[list[float], torch.Tensor]:
    """``call(start, stop)`` for each of ``bounds`` in turn: each call's time, and their outputs
    joined along time (dim 2)."""
    times: list[float] = []
    outputs: list[torch.Tensor] = []
    for start, stop in bounds:
        began = clock.now()
        outputs.append(call(start, stop))
        times.append(clock.now() - began)
    return times, torch.cat(outputs, dim=2)


class OfficialWanPeer:
    """Wan's own ``WanVAE_.encode`` (the reference), holding exactly a WanEncoder's weights.

    Wan 2.1's topology (and LightVAE's, narrow ones) runs ``vae2_1.py``; Wan 2.2's ``vae2_2.py``.
    ``encode`` splits the clip into 1, 4, 4, ... frames itself: a batch encoder, its latents
    ready when the whole clip is.
    """

    name = "official_wan"

    def __init__(self, encoder: WanEncoder) -> None:
        version = "2_2" if encoder.config.residual else "2_1"
        extra = {"dec_dim": encoder.config.base_dim} if encoder.config.residual else {}
        self.model = wan_model(load_peer_file(OFFICIAL_WAN[version]), encoder, **extra)
        self.file = OFFICIAL_WAN[version].path

    @torch.inference_mode()
    def batch(self, video: torch.Tensor) -> torch.Tensor:
        """Wan's ``encode`` of the whole clip with scale ``(0, 1)``: the raw means, on the host."""
        mean: torch.Tensor = self.model.encode(video, [0.0, 1.0])
        return mean.cpu()


class StreamDiffusionV2Peer:
    """StreamDiffusionV2's ``WanVAE_.stream_encode``, holding exactly a WanEncoder's weights.

    As its pipeline calls it: the first call takes frame 0 and the first group (1 + 4 frames,
    two latents), every later call one group of four (one latent), the cache carried between
    calls. Wan 2.1's topology only (the file has no Wan 2.2 code).
    """

    name = "streamdiffusionv2"

    def __init__(self, encoder: WanEncoder) -> None:
        if encoder.config.residual:
            raise PeerUnavailable(
                f"not applicable to {encoder.config.name}: StreamDiffusionV2's VAE is Wan 2.1's"
            )
        self.model = wan_model(load_peer_file(STREAMDIFFUSIONV2), encoder)
        self.group = encoder.config.temporal_stride

    def calls(self, frames: int) -> list[tuple[int, int]]:
        """The frame ranges of its calls for a clip of ``frames`` frames (a partial group left)."""
        first = 1 + self.group
        if frames < first:
            return []
        return [(0, first)] + [
            (start, start + self.group)
            for start in range(first, frames - self.group + 1, self.group)
        ]

    @torch.inference_mode()
    def groups(self, video: torch.Tensor, clock: Clock) -> tuple[list[float], torch.Tensor]:
        """Its calls over the clip from a fresh cache; each call's time (latents on the host)."""
        model = self.model
        model.first_encode = True  # the next call starts a stream (and clears its cache)
        timed = timed_calls(
            self.calls(video.shape[2]),
            lambda start, stop: model.stream_encode(video[:, :, start:stop], None).cpu(),
            clock,
        )
        model.first_encode = True
        model.clear_cache_encode()
        return timed


class StreamDiffusionV2Decoder:
    """StreamDiffusionV2's ``WanVAE_.stream_decode``, holding exactly a WanDecoder's weights.

    Called as its pipeline's streaming loop calls it: the first call takes latents 0 and 1 (its
    first-decode branch steps latent 0, then the rest in one step), every later call one
    latent, the cache carried between calls. Normalised latents in (its scale is Wan's mean
    and 1 / std), frames out clamped to [-1, 1] as Wan's wrapper clamps. Wan 2.1's topology
    only (the file has no Wan 2.2 code).
    """

    name = "streamdiffusionv2"

    def __init__(self, decoder: WanDecoder) -> None:
        config = decoder.config
        if config.residual:
            raise PeerUnavailable(
                f"not applicable to {config.name}: StreamDiffusionV2's VAE is Wan 2.1's"
            )
        self.model = wan_model(load_peer_file(STREAMDIFFUSIONV2), decoder)
        self.dtype = decoder.dtype  # its convs take latents and scale in the weights' dtype
        self.scale = [
            torch.tensor(config.latents_mean, device=decoder.device, dtype=self.dtype),
            1.0 / torch.tensor(config.latents_std, device=decoder.device, dtype=self.dtype),
        ]

    @staticmethod
    def calls(latents: int) -> list[tuple[int, int]]:
        """The latent ranges of its calls for a stream of ``latents`` latents."""
        if latents < 2:
            return []
        return [(0, 2)] + [(i, i + 1) for i in range(2, latents)]

    @torch.inference_mode()
    def latents(self, z: torch.Tensor, clock: Clock) -> tuple[list[float], torch.Tensor]:
        """Its calls over ``z`` (``[1, z, n, h, w]``, normalised) from a fresh cache; each
        call's time, the frames on the host."""
        model = self.model
        model.first_decode = True  # the next call starts a stream (and clears its cache)
        z = z.to(self.dtype)
        timed = timed_calls(
            self.calls(z.shape[2]),
            lambda start, stop: (
                model.stream_decode(z[:, :, start:stop], self.scale).float().clamp_(-1, 1).cpu()
            ),
            clock,
        )
        model.first_decode = True
        model.clear_cache_decode()
        return timed


class DiffusersPeer:
    """diffusers' ``AutoencoderKLWan`` holding exactly a :class:`WanEncoder`'s weights.

    Built on the meta device; only the encoder and ``quant_conv`` are materialised (sharing the
    streamvae encoder's tensors), the decoder is never allocated.
    """

    name = "diffusers"

    def __init__(self, encoder: WanEncoder) -> None:
        config = encoder.config
        self.vae = diffusers_model(encoder)
        self.z_dim = config.z_dim
        self.group = config.temporal_stride

    @torch.inference_mode()
    def batch(self, video: torch.Tensor) -> torch.Tensor:
        """``encode`` on the whole clip; the raw latent mean on the host."""
        mean: torch.Tensor = self.vae.encode(video).latent_dist.mean
        return mean.cpu()

    @torch.inference_mode()
    def groups(self, video: torch.Tensor, clock: Clock) -> tuple[list[float], torch.Tensor]:
        """Chunks of 1, g, g, ... frames through diffusers' cache; each chunk's time to the host."""
        vae = self.vae
        if vae.config.patch_size:  # Wan 2.2: diffusers' encode patchifies before its chunks
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            video = patchify(video, patch_size=vae.config.patch_size)  # type: ignore[no-untyped-call]
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
