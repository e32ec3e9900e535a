"""The batch encoder against diffusers' AutoencoderKLWan (the independent oracle), narrow configs."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    channel_rel_err,
    diffusers_twin,
    random_video,
    rel_err,
    to_model_video,
)
from streamvae import WAN21, WanEncoder, narrow, state_nbytes

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def narrow_twin(narrow_encoder):
    return diffusers_twin(narrow_encoder)


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 17])
def test_narrow_matches_diffusers_over_lengths(narrow_encoder, narrow_twin, frames):
    video = to_model_video(random_video(frames, 16, 24, seed=frames))
    with torch.no_grad():
        expected = narrow_twin.encode(video).latent_dist.mean
    got = narrow_encoder.encode(video, normalize=False)
    assert got.dtype == torch.float32
    assert got.shape == (1, 16, 1 + (frames - 1) // 4, 2, 3)
    assert rel_err(got, expected) <= TOLERANCE


@pytest.mark.parametrize("size", [(8, 8), (16, 40), (40, 16), (24, 24), (12, 20)])
def test_narrow_matches_diffusers_over_sizes(narrow_encoder, narrow_twin, size):
    h, w = size
    video = to_model_video(random_video(5, h, w, seed=h * w))
    with torch.no_grad():
        expected = narrow_twin.encode(video).latent_dist.mean
    got = narrow_encoder.encode(video, normalize=False)
    assert got.shape == (1, 16, 2, h // 8, w // 8)
    assert rel_err(got, expected) <= TOLERANCE


def test_batch_of_clips_equals_each_clip(narrow_encoder):
    video = to_model_video(random_video(5, 16, 16, seed=3, batch=3))
    together = narrow_encoder.encode(video)
    for i in range(3):
        assert rel_err(together[i : i + 1], narrow_encoder.encode(video[i : i + 1])) <= TOLERANCE


@pytest.mark.parametrize("chunk_frames", [1, 2, 3, 5, 9])
def test_any_chunking_gives_the_same_latents(narrow_encoder, chunk_frames):
    video = to_model_video(random_video(9, 16, 16, seed=4))
    reference = narrow_encoder.encode(video, chunk_frames=4)
    assert rel_err(narrow_encoder.encode(video, chunk_frames=chunk_frames), reference) <= TOLERANCE


def test_normalisation_is_wans(narrow_encoder):
    video = to_model_video(random_video(5, 16, 16, seed=5))
    raw = narrow_encoder.encode(video, normalize=False)
    mean = torch.tensor(WAN21.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21.latents_std).view(1, -1, 1, 1, 1)
    assert rel_err(narrow_encoder.encode(video), (raw - mean) / std) <= TOLERANCE


def test_frames_past_the_last_group_are_ignored(narrow_encoder):
    video = to_model_video(random_video(8, 16, 16, seed=6))
    changed = video.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]
    assert torch.equal(narrow_encoder.encode(video), narrow_encoder.encode(changed))


@pytest.mark.parametrize(
    "dtype, bound, channel_bound", [(torch.bfloat16, 3e-2, 5e-2), (torch.float16, 5e-3, 1e-2)]
)
def test_half_precision_error_is_bounded(
    narrow_encoder, dtype, bound, channel_bound, record_property
):
    video = to_model_video(random_video(9, 16, 24, seed=7))
    expected = narrow_encoder.encode(video)
    low = WanEncoder(narrow_encoder.config)
    low.load_state_dict(narrow_encoder.state_dict())
    low = low.to(dtype).eval()
    got = low.encode(video)
    assert got.dtype == torch.float32
    error = rel_err(got, expected)
    record_property(f"rel_err_{dtype}", error)
    worst = channel_rel_err(got, expected)
    print(f"{dtype}: relative error against float32 = {error:.2e}, worst channel {worst:.2e}")
    assert error <= bound
    # Issue 17: the global measure divides by the largest channel's range; each channel is held
    # to its own (measured here: bf16 3.4e-2, fp16 4.9e-3 in the worst of the 16 channels).
    assert worst <= channel_bound


def test_bad_video_is_refused_clearly(narrow_encoder):
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        narrow_encoder.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="3 channels"):
        narrow_encoder.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(TypeError, match="float"):
        narrow_encoder.encode(torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="T >= 1"):
        narrow_encoder.encode(torch.zeros(1, 3, 0, 16, 16))


def test_state_size_is_known_up_front_and_does_not_grow(narrow_encoder):
    state = narrow_encoder.new_state(16, 24)
    expected = state_nbytes(narrow_encoder.config, 16, 24)
    assert state.nbytes == expected
    pointers = [part.window.frames.data_ptr() for part in _windows(state)]
    video = to_model_video(random_video(21, 16, 24, seed=8))
    for t in range(21):
        narrow_encoder.step(video[:, :, t : t + 1], state)
    assert state.nbytes == expected
    assert [part.window.frames.data_ptr() for part in _windows(state)] == pointers


def test_state_reset_starts_a_new_stream(narrow_encoder):
    video = to_model_video(random_video(5, 16, 16, seed=9))
    state = narrow_encoder.new_state(16, 16)
    first = narrow_encoder.step(video, state)
    state.reset()
    again = narrow_encoder.step(video, state)
    assert first is not None and again is not None
    assert torch.equal(first, again)


def test_wan21_state_size_at_video_resolutions():
    """Each causal layer holds 3 frames of its input (2 remembered, 1 slot for the new frame).

    Elements per input pixel, layer by layer (input channels x 3 frames x share of the pixels):
    conv_in 3*3; stage 0: 4 convs of 96 -> 1152; stage 1 at 1/4: (96+192+192+192)*3/4 = 504;
    its time conv at 1/16: 192*3/16 = 36; stage 2 at 1/16: (192+384*3)*3/16 = 252; its time conv
    at 1/64: 384*3/64 = 18; stage 3, middle and head at 1/64: 9 convs of 384 -> 162.
    Total 2133, of which 1404 are the remembered frames of the reference's cache.
    """
    for h, w in [(480, 832), (720, 1280)]:
        nbytes = state_nbytes(WAN21, h, w, dtype=torch.bfloat16, capacity=1)
        assert nbytes == 2133 * h * w * 2


def test_narrow_config_keeps_the_topology():
    config = narrow(8)
    assert config.dims == (8, 8, 16, 32, 32)
    assert config.temporal_downsample == WAN21.temporal_downsample
    assert WanEncoder(config).state_dict().keys() == WanEncoder(WAN21).state_dict().keys()


def _windows(state):
    yield state.conv_in
    for block in state.blocks:
        if block is None:
            continue
        if hasattr(block, "conv1"):
            yield block.conv1
            yield block.conv2
        else:
            yield block
    for res in state.mid:
        yield res.conv1
        yield res.conv2
    yield state.conv_out
