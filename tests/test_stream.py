"""StreamEncoder: frame-at-a-time latents equal the batch encoder's, with explicit bounded state."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import random_video, rel_err, stacked, stream_all, to_model_video
from streamvae import FrameError, StreamBroken, StreamEncoder, WanEncoder
from streamvae.frames import Frame

TOLERANCE = 1e-5


@pytest.mark.parametrize("mode", ["frame", "group"])
def test_push_returns_latent_k_on_frame_4k(narrow_encoder, mode):
    stream = StreamEncoder(narrow_encoder, mode=mode)
    frames = random_video(13, 16, 24)[0]
    for t, frame in enumerate(frames):
        out = stream.push(frame.numpy())
        if t % 4 == 0:
            assert [latent.index for latent in out] == [t // 4]
        else:
            assert out == []
    assert stream.frames_pushed == 13 and stream.latents_emitted == 4


@pytest.mark.parametrize("mode", ["frame", "group"])
def test_streamed_latents_equal_the_batch_encoder(narrow_encoder, mode):
    frames = random_video(17, 16, 24, seed=3)
    expected = narrow_encoder.encode(to_model_video(frames))
    latents = stream_all(StreamEncoder(narrow_encoder, mode=mode), frames[0])
    assert [latent.index for latent in latents] == list(range(5))
    assert rel_err(stacked(latents), expected) <= TOLERANCE


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_burst_split_equals_the_batch_encoder(narrow_encoder, data):
    length = data.draw(st.integers(1, 14), label="frames")
    bursts = []
    remaining = length
    while remaining:
        size = data.draw(st.integers(1, remaining), label="burst")
        bursts.append(size)
        remaining -= size
    mode = data.draw(st.sampled_from(["frame", "group"]), label="mode")
    frames = random_video(length, 8, 16, seed=length)
    expected = narrow_encoder.encode(to_model_video(frames))
    stream = StreamEncoder(narrow_encoder, mode=mode)
    latents = stream_all(stream, frames[0], bursts)
    assert rel_err(stacked(latents), expected) <= TOLERANCE
    assert stream.dropped_frames == (length - 1) % 4


@pytest.mark.slow
@pytest.mark.parametrize("size", [(32, 32), (48, 80)])
def test_full_wan21_config_streams_exactly(wan21_encoder, size):
    frames = random_video(9, *size, seed=size[1])
    expected = wan21_encoder.encode(to_model_video(frames))
    latents = stream_all(StreamEncoder(wan21_encoder), frames[0])
    error = rel_err(stacked(latents), expected)
    print(f"Wan 2.1 {size}: streamed vs batch relative error {error:.2e}")
    assert error <= TOLERANCE


def test_latent_fields(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    frames = random_video(9, 16, 24)[0]
    latents = []
    for t, frame in enumerate(frames):
        latents += stream.push(frame.numpy(), timestamp=100.0 + t)
    assert [latent.frames for latent in latents] == [range(0, 1), range(1, 5), range(5, 9)]
    assert latents[1].timestamps == (101.0, 102.0, 103.0, 104.0)
    assert latents[0].timestamps == (100.0,)
    assert all(
        latent.data.shape == (16, 2, 3) and latent.data.dtype == torch.float32 for latent in latents
    )
    assert all(latent.data.device.type == "cpu" for latent in latents)
    assert latents[0].ready_time <= latents[1].ready_time <= latents[2].ready_time
    assert not any(latent.gap or latent.padded for latent in latents)


def test_a_latents_repr_is_one_short_line(narrow_encoder):
    """Issue 23: a Latent's repr printed its whole tensor."""
    stream = StreamEncoder(narrow_encoder)
    (latent,) = stream.push(np.zeros((64, 64, 3), np.uint8))
    text = repr(latent)
    assert text == "Latent(index=0, frames=0:1, data=float32[16, 8, 8] on cpu)"
    assert "tensor" not in text and "\n" not in text
    flagged = dataclasses.replace(latent, gap=True, dropped_before=8)
    assert repr(flagged).endswith("on cpu, gap=True, dropped_before=8)")


def test_the_package_exports_only_what_all_names():
    """Issue 23: ``streamvae.Any`` (typing's) was reachable as if it were the package's."""
    import types

    import streamvae

    public = {
        name
        for name in dir(streamvae)
        if not name.startswith("_") and not isinstance(getattr(streamvae, name), types.ModuleType)
    }
    assert public <= set(streamvae.__all__), sorted(public - set(streamvae.__all__))
    assert not hasattr(streamvae, "Any")
    assert all(getattr(streamvae, name, None) is not None for name in streamvae.__all__)


def test_unknown_timestamps_are_none(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    frames = random_video(5, 8, 8)[0]
    latents = [latent for frame in frames for latent in stream.push(frame.numpy())]
    assert latents[1].timestamps == (None, None, None, None)


def test_frame_kinds_give_identical_latents(narrow_encoder):
    frames = random_video(5, 16, 16, seed=5)[0]
    as_numpy = stream_all(StreamEncoder(narrow_encoder), frames)
    chw = StreamEncoder(narrow_encoder)
    as_uint8 = [lat for f in frames for lat in chw.push(f.permute(2, 0, 1))] + chw.flush()
    floats = StreamEncoder(narrow_encoder)
    as_float = [lat for f in frames for lat in floats.push(f.permute(2, 0, 1).float() / 127.5 - 1)]
    wrapped = StreamEncoder(narrow_encoder)
    as_frame = [lat for f in frames for lat in wrapped.push(Frame(f.numpy(), timestamp=1.0))]
    for other in (as_uint8, as_float, as_frame):
        assert torch.equal(stacked(other), stacked(as_numpy))


def test_flush_drops_a_partial_group_and_counts_it(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    frames = random_video(7, 8, 8)[0]
    latents = [lat for f in frames for lat in stream.push(f.numpy())]
    assert len(latents) == 2
    assert stream.flush() == []
    assert stream.dropped_frames == 2
    assert stream.frames_pushed == 0  # flush ends the stream


@pytest.mark.parametrize("mode", ["frame", "group"])
def test_flush_with_padding_repeats_the_last_frame(narrow_encoder, mode):
    frames = random_video(7, 16, 16, seed=7)
    padded = torch.cat([frames, frames[:, -1:].expand(1, 2, 16, 16, 3)], dim=1)
    expected = narrow_encoder.encode(to_model_video(padded))
    stream = StreamEncoder(narrow_encoder, mode=mode, pad_tail=True)
    latents = [lat for f in frames[0] for lat in stream.push(f.numpy(), timestamp=1.0)]
    tail = stream.flush()
    assert [(lat.index, lat.frames, lat.padded) for lat in tail] == [(2, range(5, 7), 2)]
    assert tail[0].timestamps == (1.0, 1.0)
    assert rel_err(stacked(latents + tail), expected) <= TOLERANCE
    assert stream.dropped_frames == 0


def test_reset_starts_a_new_stream_of_any_size(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    first = random_video(5, 16, 16, seed=1)[0]
    for frame in first[:3]:
        stream.push(frame.numpy())
    stream.reset()
    again = stream_all(stream, first)
    assert rel_err(stacked(again), stacked(stream_all(StreamEncoder(narrow_encoder), first))) == 0
    other = random_video(5, 8, 24, seed=2)[0]
    assert stacked(stream_all(stream, other)).shape == (1, 16, 2, 1, 3)


def test_size_change_mid_stream_is_refused_and_says_reset(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    stream.push(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(FrameError, match=r"16x24 frame in a stream of 16x16.*reset\(\)"):
        stream.push(np.zeros((16, 24, 3), np.uint8))
    assert stream.frames_pushed == 1


def test_state_is_allocated_once_and_bounded(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    assert stream.state_nbytes == 0
    frames = random_video(41, 16, 16, seed=3)[0]
    stream.push(frames[0].numpy())
    size = stream.state_nbytes
    assert size > 0
    for frame in frames[1:]:
        stream.push(frame.numpy())
    assert stream.state_nbytes == size
    assert len(stream._timestamps) <= 4


def test_gap_frame_restarts_the_stream_and_marks_the_next_latent(narrow_encoder):
    frames = random_video(11, 16, 16, seed=4)[0]
    stream = StreamEncoder(narrow_encoder)
    before = [lat for f in frames[:6] for lat in stream.push(f.numpy())]
    after = stream.push(Frame(frames[6].numpy(), gap=True))
    after += [lat for f in frames[7:] for lat in stream.push(f.numpy())]
    assert [lat.index for lat in before] == [0, 1]
    assert stream.dropped_frames == 1  # frame 5 was a partial group when the source restarted
    assert [(lat.index, lat.gap) for lat in after] == [(0, True), (1, False)]
    fresh = stream_all(StreamEncoder(narrow_encoder), frames[6:])
    assert torch.equal(stacked(after), stacked(fresh))


def test_streams_sharing_one_encoder_do_not_interfere(narrow_encoder):
    videos = [random_video(9, 16, 16, seed=s)[0] for s in range(3)]
    separate = [stacked(stream_all(StreamEncoder(narrow_encoder), v)) for v in videos]
    streams = [StreamEncoder(narrow_encoder) for _ in videos]
    outputs: list[list] = [[] for _ in videos]
    for t in range(9):  # interleaved pushes
        for i, stream in enumerate(streams):
            outputs[i] += stream.push(videos[i][t].numpy())
    for out, expected in zip(outputs, separate):
        assert torch.equal(stacked(out), expected)


def test_streams_in_threads_equal_separate_runs(narrow_encoder):
    videos = [random_video(13, 16, 16, seed=10 + s)[0] for s in range(4)]
    separate = [stacked(stream_all(StreamEncoder(narrow_encoder), v)) for v in videos]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = stacked(stream_all(StreamEncoder(narrow_encoder), videos[i]))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for i, expected in enumerate(separate):
        assert torch.equal(results[i], expected)


def test_model_exception_marks_the_stream_broken_until_reset(narrow_encoder, monkeypatch):
    stream = StreamEncoder(narrow_encoder)
    frames = random_video(5, 8, 8)[0]
    stream.push(frames[0].numpy())

    def failing_step(self, video, state):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(WanEncoder, "step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.push(frames[1].numpy())
    monkeypatch.undo()
    with pytest.raises(StreamBroken, match=r"reset\(\)"):
        stream.push(frames[1].numpy())
    stream.reset()
    assert torch.equal(
        stacked(stream_all(stream, frames)),
        stacked(stream_all(StreamEncoder(narrow_encoder), frames)),
    )


def test_options_are_checked(narrow_encoder):
    with pytest.raises(ValueError, match="mode"):
        StreamEncoder(narrow_encoder, mode="batch")


def test_raw_mean_option(narrow_encoder):
    frames = random_video(5, 8, 8, seed=6)
    raw = stream_all(StreamEncoder(narrow_encoder, normalize=False), frames[0])
    assert (
        rel_err(stacked(raw), narrow_encoder.encode(to_model_video(frames), normalize=False))
        <= TOLERANCE
    )


def test_each_frame_advances_as_far_as_causality_allows(narrow_encoder, monkeypatch):
    """Stages 0-1 run on every push, stage 2 on every 2nd frame, the rest on every 4th."""
    from streamvae.model.layers import MidBlock, ResidualBlock

    ran: list[str] = []
    stage_of = {id(block): i for i, block in enumerate(narrow_encoder.down_blocks)}
    # Every residual block steps through step_unsummed (step adds its shortcut; the encoder's
    # chains hand the add to the next block's norm).
    residual_step, mid_step = ResidualBlock.step_unsummed, MidBlock.step

    def recording_residual(self, x, state, *args, **kwargs):
        if id(self) in stage_of:
            ran.append(f"block{stage_of[id(self)]}")
        return residual_step(self, x, state, *args, **kwargs)

    def recording_mid(self, x, states):
        ran.append("mid")
        return mid_step(self, x, states)

    monkeypatch.setattr(ResidualBlock, "step_unsummed", recording_residual)
    monkeypatch.setattr(MidBlock, "step", recording_mid)
    stream = StreamEncoder(narrow_encoder)
    per_push = []
    for frame in random_video(9, 8, 8)[0]:
        ran.clear()
        stream.push(frame.numpy())
        per_push.append(sorted(set(ran)))
    stage01 = ["block0", "block1", "block3", "block4"]
    stage2 = ["block6", "block7"]
    stage3 = ["block10", "block9", "mid"]
    assert per_push[0] == sorted(stage01 + stage2 + stage3)
    for t in range(1, 9):
        expected = stage01 + (stage2 if t % 2 == 0 else []) + (stage3 if t % 4 == 0 else [])
        assert per_push[t] == sorted(expected), t


@pytest.mark.parametrize("mode", ["frame", "group"])
def test_frames_that_require_grad_are_not_kept(narrow_encoder, mode):
    """Issue 17 item 5: a float frame with requires_grad was copied into the group buffer
    outside no-grad: the autograd chain grew a node per push, held every frame and survived
    reset(). Now no pushed frame outlives its push, and the results equal a plain push."""
    import gc
    import weakref

    video = random_video(9, 8, 8, seed=9)[0]
    plain = stream_all(StreamEncoder(narrow_encoder, mode=mode), video)
    stream = StreamEncoder(narrow_encoder, mode=mode)
    refs, latents = [], []
    for frame in video:
        tensor = (frame.permute(2, 0, 1).float() / 127.5 - 1).requires_grad_(True)
        refs.append(weakref.ref(tensor))
        latents += stream.push(tensor)
        del tensor
    latents += stream.flush()
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * len(refs)
    assert not any(latent.data.requires_grad for latent in latents)
    assert torch.equal(stacked(latents), stacked(plain))


def test_source_numbers_reach_the_latents_and_drops_are_counted(narrow_encoder):
    """Issue 17 item 6: a live source drops whole groups, but the latents did not say so, and
    the source's frame numbers were discarded."""
    video = random_video(17, 8, 8, seed=12)[0]
    numbers = [0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15, 16]  # group 5-8 dropped by the source
    stream = StreamEncoder(narrow_encoder)
    latents = []
    for number in numbers:
        latents += stream.push(Frame(video[number].numpy(), number=number, captured=5.0 + number))
    assert [x.source_frames for x in latents] == [
        (0,),
        (1, 2, 3, 4),
        (9, 10, 11, 12),
        (13, 14, 15, 16),
    ]
    assert [x.dropped_before for x in latents] == [0, 0, 4, 0]
    assert [x.frames for x in latents] == [range(0, 1), range(1, 5), range(5, 9), range(9, 13)]
    assert [x.captured for x in latents] == [5.0, 9.0, 17.0, 21.0]
    assert all(x.ready_monotonic is not None for x in latents)
    # A gap starts a new run: its numbers start again and nothing counts as dropped.
    # Its frame 0 is a latent of its own at once (issue 24 item 6: no escape for a lost one).
    more = stream.push(Frame(video[0].numpy(), gap=True, number=0))
    assert [(x.index, x.gap, x.dropped_before, x.source_frames) for x in more] == [
        (0, True, 0, (0,))
    ]
    # Frames without numbers give latents without them.
    plain = StreamEncoder(narrow_encoder).push(video[0].numpy())
    assert (plain[0].source_frames, plain[0].dropped_before, plain[0].captured) == ((), 0, None)
    assert torch.equal(more[0].data, plain[0].data)  # the new run starts afresh
    with pytest.raises(FrameError, match="number must be"):
        stream.push(Frame(video[1].numpy(), number=-1))
