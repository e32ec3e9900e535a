"""FLOPs counted on the meta device, held to diffusers' count of the same network."""

from __future__ import annotations

from helpers import require
from streamvae import narrow
from streamvae.bench.flops import streamvae_flops
from streamvae.weights import random_encoder

require("diffusers")


def test_flop_count_is_the_model_cost():
    """Issue 17: ``flops > 5x one conv`` held for any model. Now each steady-state group of four
    frames is held to diffusers' count of the same network, to the FLOP: they differ only by
    the log-variance half of the 1x1x1 quant conv, which streamvae never computes."""
    from streamvae.bench import diffusers_flops

    config = narrow(8)
    encoder = random_encoder(config)
    ours = [streamvae_flops(encoder, t, 16, 16) for t in (1, 5, 9, 13)]
    theirs = [diffusers_flops(encoder, t, 16, 16) for t in (1, 5, 9, 13)]
    group = ours[2] - ours[1]
    assert ours[3] - ours[2] == group > 0  # every group costs the same
    z, latent_pixels = config.z_dim, (16 // 8) ** 2
    logvar_half = 2 * (2 * z) * z * latent_pixels  # 1x1x1 conv, 2z -> z more channels
    assert [b - a for a, b in zip(theirs, theirs[1:])] == [group + logvar_half] * 3
    first_conv = 2 * 3 * 8 * 9 * 16 * 16  # conv_in on frame 0: one time tap of three
    assert theirs[0] > ours[0] > first_conv  # frame 0: streamvae skips the zero time taps
