"""The Wan 2.2 encoder (z 48) against diffusers' AutoencoderKLWan and Wan's own vae2_2.py on the
same random weights; Wan's vae2_1.py as a second oracle for Wan 2.1. Narrow configs of the
same topologies for the many cases, the full widths in slow tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from helpers import (
    OfficialVAE,
    diffusers_twin,
    official_module,
    random_encoder,
    random_video,
    rel_err,
    stacked,
    stream_all,
    to_model_video,
    wan22_keys,
)
from streamvae import WAN21, WAN22, FrameError, StreamEncoder, WanEncoder, narrow, state_nbytes
from streamvae.model.layers import AvgShortcut, Patchify
from streamvae.weights import streamvae_to_wan_name

TOLERANCE = 1e-5
LENGTHS = [1, 2, 5, 9, 13]
SIZES = [(16, 16), (32, 32), (48, 32), (16, 64), (64, 48)]


@pytest.fixture(scope="module")
def narrow22():
    return random_encoder(narrow(8, WAN22), seed=5)


@pytest.fixture(scope="module")
def narrow22_diffusers(narrow22):
    return diffusers_twin(narrow22)


@pytest.fixture(scope="module")
def narrow22_official(narrow22):
    return OfficialVAE.twin(narrow22)


def reference_mean(reference, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference.encode(video).latent_dist.mean


def streamed(encoder: WanEncoder, frames: torch.Tensor, *, mode="frame", bursts=None):
    """``[T, H, W, 3]`` uint8 frames through a StreamEncoder: raw means ``[1, z, t, h, w]``."""
    return stacked(stream_all(StreamEncoder(encoder, mode=mode, normalize=False), frames, bursts))


# -- the model against both oracles ----


@pytest.mark.parametrize("frames", LENGTHS)
def test_narrow_matches_diffusers_and_wan_over_lengths(
    narrow22, narrow22_diffusers, narrow22_official, frames, record_property
):
    clip = random_video(frames, 32, 48, seed=frames)
    video = to_model_video(clip)
    from_diffusers = reference_mean(narrow22_diffusers, video)
    from_wan = narrow22_official.encode(video)
    shape = (1, 48, 1 + (frames - 1) // 4, 2, 3)
    assert from_diffusers.shape == from_wan.shape == shape
    got = narrow22.encode(video, normalize=False)
    frame_by_frame = streamed(narrow22, clip[0])
    group = streamed(narrow22, clip[0], mode="group")
    for name, result in [("batch", got), ("frames", frame_by_frame), ("group", group)]:
        assert result.shape == shape, name
        errors = (rel_err(result, from_diffusers), rel_err(result, from_wan))
        record_property(f"rel_err_{name}", errors)
        print(
            f"wan2.2-narrow8 {name}, {frames} frames: vs diffusers {errors[0]:.2e}, wan {errors[1]:.2e}"
        )
        assert max(errors) <= TOLERANCE, (name, errors)


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_narrow_matches_diffusers_and_wan_over_sizes(
    narrow22, narrow22_diffusers, narrow22_official, size
):
    h, w = size
    clip = random_video(5, h, w, seed=h + w)
    video = to_model_video(clip)
    got = narrow22.encode(video, normalize=False)
    assert got.shape == (1, 48, 2, h // 16, w // 16)
    assert rel_err(got, reference_mean(narrow22_diffusers, video)) <= TOLERANCE
    assert rel_err(got, narrow22_official.encode(video)) <= TOLERANCE
    assert rel_err(streamed(narrow22, clip[0]), got) <= TOLERANCE


@pytest.mark.parametrize("bursts", [[1, 4, 4], [3, 6], [9], [2, 2, 2, 3], [1, 1, 7]])
def test_bursts_give_the_same_latents(narrow22, narrow22_official, bursts):
    clip = random_video(9, 32, 32, seed=len(bursts))
    expected = narrow22_official.encode(to_model_video(clip))
    assert rel_err(streamed(narrow22, clip[0], bursts=bursts), expected) <= TOLERANCE


@pytest.mark.parametrize("chunk_frames", [1, 2, 3, 5, 13])
def test_any_chunking_gives_the_same_latents(narrow22, chunk_frames):
    video = to_model_video(random_video(13, 32, 16, seed=4))
    reference = narrow22.encode(video, chunk_frames=4)
    assert rel_err(narrow22.encode(video, chunk_frames=chunk_frames), reference) <= TOLERANCE


def test_normalisation_is_wans(narrow22, narrow22_official):
    video = to_model_video(random_video(5, 32, 32, seed=6))
    expected = narrow22_official.encode(video, normalize=True)
    assert rel_err(narrow22.encode(video), expected) <= TOLERANCE


def test_batch_of_clips_equals_each_clip(narrow22):
    video = to_model_video(random_video(5, 16, 32, seed=3, batch=2))
    together = narrow22.encode(video)
    for i in range(2):
        assert rel_err(together[i : i + 1], narrow22.encode(video[i : i + 1])) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("frames, size", [(5, (32, 48)), (9, (48, 32))])
def test_full_width_matches_diffusers_and_wan(frames, size, record_property):
    """The real widths (160, 160, 320, 640, 640; z 48): 149.6 M parameters."""
    encoder = random_encoder(WAN22, seed=7)
    assert sum(p.numel() for p in encoder.parameters()) == 149_637_088
    clip = random_video(frames, *size, seed=frames)
    video = to_model_video(clip)
    from_wan = OfficialVAE.twin(encoder).encode(video)
    from_diffusers = reference_mean(diffusers_twin(encoder), video)
    got = encoder.encode(video, normalize=False)
    errors = {
        "diffusers": rel_err(got, from_diffusers),
        "wan": rel_err(got, from_wan),
        "frames_vs_wan": rel_err(streamed(encoder, clip[0]), from_wan),
    }
    record_property("rel_err", errors)
    print(f"Wan 2.2 full width, {frames} frames {size}: {errors}")
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_error_is_bounded(narrow22, dtype, bound):
    video = to_model_video(random_video(9, 32, 48, seed=7))
    expected = narrow22.encode(video)
    low = WanEncoder(narrow22.config)
    low.load_state_dict(narrow22.state_dict())
    assert rel_err(low.to(dtype).eval().encode(video), expected) <= bound


# -- Wan 2.1 against Wan's vae2_1.py ----


@pytest.mark.parametrize(
    "frames, size", [(1, (16, 24)), (5, (24, 16)), (9, (16, 16)), (13, (8, 40))]
)
def test_wan21_matches_wans_vae2_1(narrow_encoder, frames, size):
    clip = random_video(frames, *size, seed=frames)
    video = to_model_video(clip)
    official = OfficialVAE.twin(narrow_encoder)
    expected = official.encode(video, normalize=True)
    assert rel_err(narrow_encoder.encode(video), expected) <= TOLERANCE
    stream = StreamEncoder(narrow_encoder)
    latents = [latent for frame in clip[0] for latent in stream.push(frame.numpy())]
    frame_by_frame = torch.stack([latent.data for latent in latents], dim=1)[None]
    assert rel_err(frame_by_frame, expected) <= TOLERANCE


@pytest.mark.slow
def test_wan21_full_width_matches_wans_vae2_1(wan21_encoder):
    video = to_model_video(random_video(5, 32, 48, seed=8))
    expected = OfficialVAE.twin(wan21_encoder).encode(video, normalize=True)
    assert rel_err(wan21_encoder.encode(video), expected) <= TOLERANCE


# -- the new parts, one by one, against Wan's own functions ----


def test_patchify_channel_order_is_wans():
    """Channel c*4 + 2*w_offset + h_offset: channel 1 holds pixel (1, 0) of the red plane."""
    wan = official_module("2_2")
    x = torch.randn(2, 3, 3, 8, 12)
    out = torch.empty(2, 12, 3, 4, 6)
    Patchify(2).write_into(x, out)
    assert torch.equal(out, wan.patchify(x, 2))
    assert torch.equal(out[:, 1], x[:, 0, :, 1::2, 0::2])
    assert torch.equal(out[:, 2], x[:, 0, :, 0::2, 1::2])


@pytest.mark.parametrize(
    "in_dim, out_dim, frames, pixels",
    [(8, 8, 1, 2), (8, 16, 2, 2), (16, 32, 2, 2), (32, 32, 1, 1), (8, 8, 2, 1)],
)
def test_shortcut_equals_wans_avgdown3d_over_the_chunks_1_4_4(in_dim, out_dim, frames, pixels):
    """Wan pads each chunk at the front to even length: frame 0 pairs with a zero frame, then
    (1, 2), (3, 4)... Frame by frame, the shortcut holds the odd frame until its pair comes."""
    from streamvae.model.layers import StateSpec

    wan = official_module("2_2").AvgDown3D(in_dim, out_dim, factor_t=frames, factor_s=pixels)
    x = torch.randn(1, in_dim, 9, 8, 8)
    expected = torch.cat([wan(x[:, :, :1]), wan(x[:, :, 1:5]), wan(x[:, :, 5:9])], dim=2)
    shortcut = AvgShortcut(in_dim, out_dim, frames=frames, pixels=pixels)
    state = shortcut.new_state(StateSpec(1, 1, torch.float32, torch.device("cpu")), 8, 8)
    outs = [shortcut.step(x[:, :, t : t + 1], state) for t in range(9)]
    produced = [t for t, out in enumerate(outs) if out is not None]
    assert produced == (list(range(9)) if frames == 1 else [0, 2, 4, 6, 8])
    got = torch.cat([out for out in outs if out is not None], dim=2)
    assert rel_err(got, expected) <= 1e-6
    if frames == 2 and out_dim == 2 * in_dim:  # Wan 2.2's stages 1 and 2: channels 2c, 2c+1
        assert torch.equal(got[:, 0::2, 0], torch.zeros_like(got[:, 0::2, 0]))  # frame 0: zeros


def test_latent_statistics_are_wans():
    """The 48 means and stds, read from Wan2_2_VAE.__init__ in Wan's source."""
    wan = official_module("2_2")
    tree = ast.parse(Path(wan.__file__).read_text())
    found = {}
    for node in ast.walk(next(n for n in tree.body if getattr(n, "name", "") == "Wan2_2_VAE")):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("mean", "std"):
            found[node.targets[0].id] = tuple(ast.literal_eval(node.value.args[0]))
    assert found == {"mean": WAN22.latents_mean, "std": WAN22.latents_std}


def test_key_fixture_is_wans_vae2_2():
    """tests/fixtures/wan22_vae_keys.json is the state dict Wan2_2_VAE loads strictly."""
    wan = official_module("2_2")
    with torch.device("meta"):
        model = wan.WanVAE_(
            dim=160,
            dec_dim=256,
            z_dim=48,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            dropout=0.0,
        )
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == wan22_keys()


def test_streamvae_names_are_wans():
    """Every parameter maps to one of Wan 2.2's names, with its shape, and back."""
    keys = dict(wan22_keys())
    state = WanEncoder(WAN22).state_dict()
    names = [streamvae_to_wan_name(name, WAN22) for name in state]
    assert len(set(names)) == len(names) == 86
    for ours, theirs in zip(state, names):
        assert keys[theirs] == tuple(state[ours].shape), theirs


# -- sizes and state ----


@pytest.mark.parametrize("size", [(40, 48), (32, 24), (8, 8)])
def test_sizes_wan22_cannot_take_are_refused_with_its_rule(narrow22, size):
    video = torch.zeros(1, 3, 1, *size)
    with pytest.raises(ValueError, match="multiples of 16"):
        narrow22.encode(video)
    stream = StreamEncoder(narrow22)
    frame = random_video(1, *size)[0, 0].numpy()
    with pytest.raises(FrameError, match="multiples of 16"):
        stream.push(frame)
    assert stream.frames_pushed == 0 and stream.state_nbytes == 0


def test_state_size_is_known_up_front_and_does_not_grow(narrow22):
    state = narrow22.new_state(32, 48)
    assert state.nbytes == state_nbytes(narrow22.config, 32, 48)
    pointers = [window.frames.data_ptr() for window in state.windows()]
    video = to_model_video(random_video(13, 32, 48, seed=8))
    for t in range(13):
        narrow22.step(video[:, :, t : t + 1], state)
    assert state.nbytes == state_nbytes(narrow22.config, 32, 48)
    assert [window.frames.data_ptr() for window in state.windows()] == pointers
    assert len(pointers) == 22 + 2 + 2  # causal convs, time convs, shortcut pairs
    first = narrow22.step(video[:, :, :5], narrow22.new_state(32, 48, capacity=5))
    state.reset()
    again = narrow22.step(video[:, :, :5], state)
    assert first is not None and again is not None
    assert rel_err(again, first) <= TOLERANCE


def test_wan22_state_size_at_video_resolutions():
    """Elements per input pixel (3 frames per causal conv input, 2 per shortcut pair state):
    conv_in 12*3/4 = 9; stage 0 at 1/4: 4 convs of 160 -> 480; stage 1 at 1/16: convs of
    160+320*3 -> 210, its pending stage input 160*2/16 = 20; its time conv at 1/64: 320*3/64 =
    15; stage 2 at 1/64: 320+640*3 -> 105, pending 320*2/64 = 10; time conv at 1/256: 7.5;
    stage 3, middle and head at 1/256: 9 convs of 640 -> 67.5. Total 924 (Wan 2.1: 2133)."""
    for h, w in [(480, 832), (704, 1280)]:
        assert state_nbytes(WAN22, h, w, dtype=torch.bfloat16) == 924 * h * w * 2
    assert 924 / 2133 < 0.44
    assert state_nbytes(WAN21, 480, 832) == 2133 * 480 * 832 * 4
