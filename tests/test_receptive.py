"""receptive_field and latent_dependencies, checked by perturbation: change frame f, see which
latents change (any bit) and which stay bit-identical."""

from __future__ import annotations

import pytest
import torch

from helpers import random_encoder, random_video, to_model_video
from streamvae import WAN21, narrow
from streamvae.receptive import latent_dependencies, receptive_field, time_layers


def changed_latents(
    encoder, clip: torch.Tensor, frames: list[int], seed: int = 7
) -> list[set[int]]:
    """For each frame f: the latents that differ in any bit when frame f alone is replaced."""
    t = clip.shape[1]
    variants = [clip]
    generator = torch.Generator().manual_seed(seed)
    for f in frames:
        other = clip.clone()
        other[0, f] = torch.randint(
            0, 256, other[0, f].shape, generator=generator, dtype=torch.uint8
        )
        variants.append(other)
    video = to_model_video(torch.cat(variants))
    latents = encoder.encode(video, normalize=False)
    base = latents[0]
    count = 1 + (t - 1) // 4
    return [
        {k for k in range(count) if not torch.equal(latents[i + 1, :, k], base[:, k])}
        for i in range(len(frames))
    ]


def expected_changed(config, frame: int, count: int) -> set[int]:
    return {k for k in range(count) if frame in latent_dependencies(config, k)}


def test_wan21_topology_gives_r_113():
    # The issue measured 113 at 16x16 (full Wan 2.1); here it is derived by the walk.
    assert receptive_field(WAN21) == 113
    assert receptive_field(narrow(8)) == receptive_field(WAN21)
    assert latent_dependencies(WAN21, 40) == range(48, 161)


def test_time_layers_follow_the_encoder_order():
    layers = time_layers(WAN21)
    assert layers[0].name == "conv_in" and layers[-1].name == "conv_out"
    downs = [layer for layer in layers if layer.kind == "downsample"]
    assert [(d.kernel, d.stride) for d in downs] == [(3, 2), (3, 2)]
    assert len(layers) - len(downs) == 1 + 2 * 2 * 4 + 2 * 2 + 1  # conv_in, 16 res, 4 mid, out


def test_receptive_field_follows_the_topology():
    """Another topology, another R: one temporal downsample instead of two."""
    from dataclasses import replace

    config = replace(narrow(8), temporal_downsample=(False, True, False))
    # stage 0: conv_in + 4 convs (10 frames); stage 1: 4 convs (8) + down(2); after it every
    # frame at half rate costs 2: 4 + 4 + 4 res/mid convs and conv_out -> 13 convs -> 26 at
    # rate 1/2 = 52 frames.
    assert receptive_field(config) == 1 + 10 + 8 + 2 + 2 * 2 * 13


def test_unknown_time_layer_is_refused():
    encoder = random_encoder(narrow(8))
    encoder.quant_conv = torch.nn.Conv3d(32, 32, (2, 1, 1))
    with pytest.raises(NotImplementedError, match="quant_conv"):
        receptive_field(encoder)


def test_bad_latent_index_is_refused():
    with pytest.raises(ValueError, match="latent index"):
        latent_dependencies(WAN21, -1)


def test_perturbation_matches_the_derived_windows_narrow(narrow_encoder):
    config = narrow_encoder.config
    clip = random_video(4 * 41 + 1, 8, 8, seed=11)
    frames = [0, 2, 47, 48, 160, 161]
    changed = changed_latents(narrow_encoder, clip, frames)
    for frame, seen in zip(frames, changed):
        assert seen == expected_changed(config, frame, 42), frame
    # The window of a latent far from the start is exactly R frames long and ends at its last frame.
    r = receptive_field(config)
    assert 47 not in latent_dependencies(config, 40) and 48 in latent_dependencies(config, 40)
    assert len(latent_dependencies(config, 40)) == r


@pytest.mark.slow
def test_perturbation_full_wan21_at_16x16(wan21_encoder):
    """The issue's measurement, derived: latent 40 (last frame 160) sees frame 160 - R + 1, not the one before."""
    r = receptive_field(wan21_encoder)
    first = 160 - r + 1
    clip = random_video(161, 16, 16, seed=12)
    before, at, last = changed_latents(wan21_encoder, clip, [first - 1, first, 160])
    assert 40 not in before and 40 in at and 40 in last
    assert before == expected_changed(WAN21, first - 1, 41)
    assert at == expected_changed(WAN21, first, 41)
    assert r == 113
