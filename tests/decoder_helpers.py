"""Decoder test helpers: Wan's official and diffusers' decoders holding a streamvae decoder's weights."""

from __future__ import annotations

import torch

from helpers import official_module, random_tensor
from streamvae import WanConfig
from streamvae.model.decoder import WanDecoder
from streamvae.weights import (
    diffusers_config,
    diffusers_to_streamvae_decoder_name,
    wan_to_streamvae_decoder_name,
)


def official_vae(config: WanConfig):
    """Wan's own ``WanVAE_`` (vae2_1.py or vae2_2.py, loaded by path) built for ``config``."""
    module = official_module("2_2" if config.residual else "2_1")
    kwargs = {
        "dim": config.base_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(config.temporal_downsample),
        "dropout": 0.0,
    }
    if config.residual:
        kwargs["dec_dim"] = config.decoder_base_dim
    return module.WanVAE_(**kwargs).eval()


class OfficialDecoder:
    """Wan's ``WanVAE_`` (vae2_1.py / vae2_2.py) for ``config`` with random, well-scaled decoder
    weights, and streamvae's :class:`WanDecoder` holding the same (mapped by streamvae's names)."""

    def __init__(self, config: WanConfig, seed: int = 0) -> None:
        self.model = official_vae(config)
        generator = torch.Generator().manual_seed(seed)
        state = self.model.state_dict()
        ours: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            target = wan_to_streamvae_decoder_name(name, config.num_res_blocks)
            if target is None:
                continue
            state[name] = random_tensor(name, tuple(tensor.shape), generator)
            ours[target] = state[name].clone()
        self.model.load_state_dict(state)
        self.decoder = WanDecoder(config)
        self.decoder.load_state_dict(ours, strict=True)
        self.decoder.eval().requires_grad_(False)
        self.config = config

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Wan's ``decode`` of normalised latents, clamped as ``Wan2_1_VAE.decode`` does."""
        mean = torch.tensor(self.config.latents_mean)
        scale = [mean, 1.0 / torch.tensor(self.config.latents_std)]
        with torch.no_grad():
            return self.model.decode(latents.float(), scale).float().clamp_(-1, 1)


def diffusers_decoder_twin(decoder: WanDecoder):
    """diffusers' ``AutoencoderKLWan`` holding ``decoder``'s weights (its encoder random)."""
    from diffusers import AutoencoderKLWan

    config = decoder.config
    kwargs = diffusers_config(config, decoder_base_dim=config.decoder_base_dim)
    reference = AutoencoderKLWan(**kwargs).eval()
    ours = decoder.state_dict()
    theirs = reference.state_dict()
    mapped = 0
    for name in theirs:
        target = diffusers_to_streamvae_decoder_name(name)
        if target is not None:
            theirs[name] = ours[target].float().clone()
            mapped += 1
    assert mapped == len(ours), (mapped, len(ours))
    reference.load_state_dict(theirs, strict=True)
    return reference


def random_latents(config: WanConfig, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Normalised latents ``[1, z, t, h, w]`` (unit scale, as the encoder emits them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, config.z_dim, t, h, w), generator=generator)
