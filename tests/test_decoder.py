"""WanDecoder (streamvae.model.decoder) against Wan's official decode and diffusers', float32."""

from __future__ import annotations

import pytest
import torch

from decoder_helpers import OfficialDecoder, diffusers_decoder_twin, random_latents
from helpers import rel_err, require
from streamvae import WAN22, narrow
from streamvae.model.decoder import WanDecoder

BOUND = 1e-5
CONFIGS = [narrow(8), narrow(8, WAN22)]


def frame_errors(got: torch.Tensor, expected: torch.Tensor) -> list[float]:
    """Each frame's max |a - b| / max |b| (frames along dim 2)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return [rel_err(got[:, :, i], expected[:, :, i]) for i in range(expected.shape[2])]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.name)
def official(request) -> OfficialDecoder:
    return OfficialDecoder(request.param, seed=3)


def test_decode_matches_wan_official(official):
    latents = random_latents(official.config, 4, 2, 3, seed=1)
    expected = official.decode(latents)
    got = official.decoder.decode(latents)
    stride = official.config.spatial_stride
    assert got.shape == (1, 3, 13, 2 * stride, 3 * stride)
    # Not a saturated picture: most values are inside the clamp.
    assert (expected.abs() < 1).float().mean() > 0.5
    assert max(frame_errors(got, expected)) <= BOUND


@pytest.mark.parametrize("capacity", [1, 2, 4])
def test_step_frame_by_frame_matches_wan_official(official, capacity):
    decoder = official.decoder
    latents = random_latents(official.config, 3, 2, 2, seed=2)
    expected = official.decode(latents)
    state = decoder.new_state(2, 2, capacity=capacity)
    raw = decoder.denormalize(latents)
    frames = []
    for i in range(3):  # latents arrive one by one
        frames += list(decoder.step(raw[:, :, i : i + 1], state))
    if capacity == 1:
        assert [f.shape[2] for f in frames] == [1] * 9  # each frame as soon as it is complete
    got = torch.cat(frames, dim=2).float().clamp(-1, 1)
    assert max(frame_errors(got, expected)) <= BOUND


def test_step_in_bursts_equals_one_by_one(official):
    decoder = official.decoder
    latents = decoder.denormalize(random_latents(official.config, 5, 2, 2, seed=4))
    one = decoder.new_state(2, 2)
    single = [f for i in range(5) for f in decoder.step(latents[:, :, i : i + 1], one)]
    burst = decoder.new_state(2, 2)
    bursts = list(decoder.step(latents[:, :, :2], burst)) + list(
        decoder.step(latents[:, :, 2:], burst)
    )
    assert torch.equal(torch.cat(single, 2), torch.cat(bursts, 2))


def test_decode_matches_diffusers(official):
    require("diffusers")
    decoder = official.decoder
    reference = diffusers_decoder_twin(decoder)
    latents = random_latents(official.config, 3, 2, 3, seed=5)
    raw = decoder.denormalize(latents)
    with torch.no_grad():
        expected = reference.decode(raw).sample
    got = decoder.decode(latents)
    assert max(frame_errors(got, expected)) <= BOUND
    assert torch.equal(got, decoder.decode(raw, normalized=False))


def test_batch_of_streams_decodes_each(official):
    decoder = official.decoder
    latents = torch.cat([random_latents(official.config, 2, 2, 2, seed=s) for s in (6, 7)])
    both = decoder.decode(latents)
    for i in range(2):
        alone = decoder.decode(latents[i : i + 1])
        assert rel_err(both[i : i + 1], alone) <= BOUND


def test_reset_state_decodes_again(official):
    decoder = official.decoder
    latents = decoder.denormalize(random_latents(official.config, 2, 2, 2, seed=8))
    state = decoder.new_state(2, 2)
    first = torch.cat(list(decoder.step(latents, state)), 2)
    state.reset()
    again = torch.cat(list(decoder.step(latents, state)), 2)
    assert torch.equal(first, again)
    assert first.shape[2] == 5


def test_decode_refuses_bad_latents():
    decoder = WanDecoder(narrow(8)).eval()
    with pytest.raises(ValueError, match="16 latent channels, got 4"):
        decoder.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, z, T, h, w\]"):
        decoder.decode(torch.zeros(16, 1, 2, 2))


def test_state_size_is_fixed_and_counted():
    decoder = WanDecoder(narrow(8)).eval()
    state = decoder.new_state(2, 2)
    before = state.nbytes
    assert before == sum(w.nbytes for w in state.windows())
    list(decoder.step(torch.zeros(1, 16, 3, 2, 2), state))
    assert state.nbytes == before
