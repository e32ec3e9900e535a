"""StreamDecoder (streamvae.decoding): exact to Wan's official decode however the latents arrive."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from decoder_helpers import OfficialDecoder, random_latents
from helpers import random_encoder, rel_err
from streamvae import (
    WAN21,
    WAN22,
    DecodedFrame,
    LatentError,
    SnapshotError,
    StreamBroken,
    StreamDecoder,
    StreamEncoder,
    narrow,
    random_decoder,
)
from streamvae.decoding import decoder_receptive_field

BOUND = 1e-5


@pytest.fixture(scope="module", params=[narrow(8), narrow(8, WAN22)], ids=lambda c: c.name)
def official(request) -> OfficialDecoder:
    return OfficialDecoder(request.param, seed=5)


def as_list(latents: torch.Tensor) -> list[torch.Tensor]:
    """``[1, z, T, h, w]`` -> T latents ``[z, h, w]``."""
    return [latents[0, :, i] for i in range(latents.shape[2])]


def stacked(frames: list[DecodedFrame]) -> torch.Tensor:
    return torch.stack([f.data for f in frames], dim=1)[None]


def assert_frames_match(frames: list[DecodedFrame], expected: torch.Tensor) -> None:
    assert [f.index for f in frames] == list(range(expected.shape[2]))
    got = stacked(frames)
    errors = [rel_err(got[:, :, i], expected[:, :, i]) for i in range(expected.shape[2])]
    assert max(errors) <= BOUND, errors


@pytest.mark.parametrize("bursts", [None, [1, 2, 1], [4]])
def test_push_matches_wan_official(official, bursts):
    latents = random_latents(official.config, 4, 2, 3, seed=1)
    expected = official.decode(latents)
    stream = StreamDecoder(official.decoder)
    frames: list[DecodedFrame] = []
    if bursts is None:
        for latent in as_list(latents):
            frames += stream.push(latent)
    else:
        start = 0
        for size in bursts:
            frames += stream.push_many(as_list(latents)[start : start + size])
            start += size
    assert_frames_match(frames, expected)
    assert [f.latent for f in frames] == [0] + [k for k in (1, 2, 3) for _ in range(4)]
    assert all(f.data.dtype == torch.float32 and f.data.shape[0] == 3 for f in frames)
    assert stream.latents_pushed == 4 and stream.frames_emitted == 13
    assert stream.flush() == [] and stream.latents_pushed == 0


def test_iter_push_yields_each_frame_before_the_next_is_computed(official, monkeypatch):
    decoder = official.decoder
    latents = as_list(random_latents(official.config, 2, 2, 2, seed=2))
    stream = StreamDecoder(decoder)
    stream.push(latents[0])
    heads = []
    original = decoder._head
    monkeypatch.setattr(decoder, "_head", lambda x, s: heads.append(1) or original(x, s))
    frames = stream.iter_push(latents[1])
    assert heads == []  # nothing computed before it is read
    first = next(frames)
    assert first.index == 1 and len(heads) == 1  # the first frame before the others exist
    rest = list(frames)
    assert [f.index for f in rest] == [2, 3, 4] and len(heads) == 4


def test_iter_push_closed_early_keeps_the_rest(official):
    latents = as_list(random_latents(official.config, 3, 2, 2, seed=3))
    reference = StreamDecoder(official.decoder).push_many(latents)
    stream = StreamDecoder(official.decoder)
    got = stream.push(latents[0])
    frames = stream.iter_push(latents[1])
    got.append(next(frames))
    frames.close()
    assert [f.index for f in stream.pending_frames] == [2, 3, 4]
    got += stream.push(latents[2])
    assert [f.index for f in got] == list(range(9))
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, reference))


def test_latents_from_the_encoder_carry_timestamps_and_gaps(tmp_path):
    encoder = random_encoder(narrow(8), seed=4)
    decoder = random_decoder(narrow(8), seed=4)
    frames = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    latents = StreamEncoder(encoder).push_many(
        list(frames), timestamps=[10.0 + i for i in range(6)]
    )
    decoded = StreamDecoder(decoder).push_many(latents)
    assert [f.timestamp for f in decoded] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert decoded[0].to_rgb().shape == (16, 16, 3) and decoded[0].to_rgb().dtype == np.uint8
    # A gap latent (a restarted source) starts a new run: frame 0 again, flagged.
    restarted = StreamEncoder(encoder)
    again = restarted.push(frames[0])
    again = [type(again[0])(**{**again[0].__dict__, "gap": True})]
    stream = StreamDecoder(decoder)
    stream.push_many(latents)
    out = stream.push_many(again)
    assert [(f.index, f.latent, f.gap) for f in out] == [(0, 0, True)]
    fresh = StreamDecoder(decoder).push(again[0].data)
    assert torch.equal(out[0].data, fresh[0].data)  # decoded from a fresh state


def test_to_rgb_inverts_the_encoders_input_map():
    values = torch.tensor([-1.0, -0.5, 0.0, 0.99, 1.0]).view(1, 1, 5).expand(3, 1, 5)
    frame = DecodedFrame(values.clone(), 0, 0)
    assert frame.to_rgb()[0, :, 0].tolist() == [0, 64, 128, 254, 255]


def bad_inputs(z: int) -> list[tuple[object, str]]:
    nan = torch.zeros(z, 2, 2)
    nan[0, 0, 0] = float("nan")
    return [
        (torch.zeros(z + 1, 2, 2), f"decodes {z} latent channels, got {z + 1}"),
        (nan, "NaN or infinite"),
        (torch.zeros(z, 2, 3), "2x3 latents in a stream of 2x2"),
        (torch.zeros(z, 2, 2, dtype=torch.int64), "float tensor"),
        (
            torch.zeros(1, z, 2, 2),
            r"\[16, h, w\] tensor, got \(1, 16, 2, 2\)" if z == 16 else "h, w",
        ),
        (np.zeros((z, 2, 2)), "got ndarray"),
    ]


def test_bad_input_is_refused_and_leaves_the_state(official):
    latents = as_list(random_latents(official.config, 3, 2, 2, seed=6))
    reference = StreamDecoder(official.decoder).push_many(latents)
    stream = StreamDecoder(official.decoder)
    got = stream.push(latents[0])
    for bad, message in bad_inputs(official.config.z_dim):
        with pytest.raises(LatentError, match=message):
            stream.push(bad)  # type: ignore[arg-type]
        with pytest.raises(LatentError):
            stream.push_many([latents[1], bad])  # type: ignore[list-item]
    got += stream.push(latents[1]) + stream.push(latents[2])
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, reference))


def test_a_failing_step_breaks_the_stream_until_reset(official, monkeypatch):
    decoder = official.decoder
    stream = StreamDecoder(decoder)
    latent = torch.zeros(official.config.z_dim, 2, 2)
    stream.push(latent)
    monkeypatch.setattr(decoder, "_head", lambda x, s: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        stream.push(latent)
    monkeypatch.undo()
    with pytest.raises(StreamBroken, match="decoder raised"):
        stream.push(latent)
    stream.reset()
    assert [f.index for f in stream.push(latent)] == [0]


def test_snapshot_restore_continues_exactly(official):
    latents = as_list(random_latents(official.config, 5, 2, 2, seed=7))
    stream = StreamDecoder(official.decoder)
    stream.push_many(latents[:3])
    snapshot = stream.snapshot()
    expected = stream.push_many(latents[3:])
    other = StreamDecoder(official.decoder)
    other.push(torch.zeros(official.config.z_dim, 4, 4))  # any state: replaced
    other.reset()
    other.restore(snapshot)
    got = other.push_many(latents[3:])
    assert [f.index for f in got] == [f.index for f in expected] == list(range(9, 17))
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, expected))


def test_restore_refuses_other_weights_and_encoder_snapshots(official):
    config = official.config
    stream = StreamDecoder(official.decoder)
    stream.push(torch.zeros(config.z_dim, 2, 2))
    snapshot = stream.snapshot()
    with pytest.raises(SnapshotError, match="other weights"):
        StreamDecoder(random_decoder(config, seed=9)).restore(snapshot)
    encoder = StreamEncoder(random_encoder(narrow(8), seed=1))
    encoder.push(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(SnapshotError, match="kind"):
        StreamDecoder(random_decoder(narrow(8))).restore(encoder.snapshot())
    sized = StreamDecoder(official.decoder)
    sized.push(torch.zeros(config.z_dim, 3, 3))
    with pytest.raises(SnapshotError, match="2x2 latents"):
        sized.restore(snapshot)


def test_receptive_field_is_walked_off_the_layers():
    # 13 causal convs at the output rate, 6 after the first upsample, 11 before the second.
    assert decoder_receptive_field(random_decoder(narrow(8))) == 39
    assert decoder_receptive_field(random_decoder(narrow(4, WAN22))) == 39
    assert decoder_receptive_field(random_decoder(narrow(4, WAN21))) == 39


def test_resume_from_the_last_r_latents_is_exact():
    official = OfficialDecoder(narrow(4), seed=8)
    stream = StreamDecoder(official.decoder)
    r = stream.receptive_field
    total = r + 4
    latents = as_list(random_latents(official.config, total, 1, 2, seed=9))
    full = StreamDecoder(official.decoder).push_many(latents)
    first = total - r - 1  # resume from R + 1 latents: the last two latents' frames are exact
    resumed = stream.resume(latents[first:], first_index=first)
    exact = [f for f in full if f.latent >= first + r - 1]
    assert [f.index for f in resumed] == [f.index for f in exact] and len(resumed) == 8
    assert all(torch.equal(a.data, b.data) for a, b in zip(resumed, exact))
    nxt = stream.push(latents[-1])
    assert nxt[0].index == full[-1].index + 1
    # One latent fewer than R: the last latent's frames are not exact (all R are needed).
    short = StreamDecoder(official.decoder)
    with pytest.raises(ValueError, match="needs the last 39 latents"):
        short.resume(latents[first + 2 :], first_index=first + 2)
    approx = short.resume(latents[first + 2 :], first_index=first + 2, approximate=True)
    last = [f for f in approx if f.latent == total - 1]
    assert len(last) == 4 and all(f.approximate for f in last)
    assert any(not torch.equal(f.data, full[f.index].data) for f in last)


def test_stream_async_matches_push(official):
    latents = as_list(random_latents(official.config, 3, 2, 2, seed=10))
    expected = StreamDecoder(official.decoder).push_many(latents)

    async def run() -> list[DecodedFrame]:
        out = []
        async with StreamDecoder(official.decoder).stream(latents) as frames:
            async for frame in frames:
                out.append(frame)
        return out

    got = asyncio.run(run())
    assert [f.index for f in got] == list(range(9))
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, expected))


def test_reset_takes_another_size():
    stream = StreamDecoder(random_decoder(narrow(8)))
    stream.push(torch.zeros(16, 2, 2))
    with pytest.raises(LatentError, match="fixed"):
        stream.push(torch.zeros(16, 3, 3))
    stream.reset()
    assert stream.push(torch.zeros(16, 3, 3))[0].data.shape == (3, 24, 24)
    assert stream.latent_size == (3, 3) and stream.state_nbytes > 0


def test_raw_latents_with_normalized_false(official):
    latents = random_latents(official.config, 2, 2, 2, seed=11)
    raw = official.decoder.denormalize(latents)
    normal = StreamDecoder(official.decoder).push_many(as_list(latents))
    unnormal = StreamDecoder(official.decoder, normalized=False).push_many(as_list(raw))
    assert all(rel_err(a.data, b.data) <= BOUND for a, b in zip(unnormal, normal))


def test_cancelled_consumer_keeps_the_frames_pending(official):
    latents = as_list(random_latents(official.config, 3, 2, 2, seed=12))
    expected = StreamDecoder(official.decoder).push_many(latents)
    stream = StreamDecoder(official.decoder)

    async def take_one_then_cancel() -> DecodedFrame:
        async def source():
            for latent in latents[:2]:
                yield latent

        frames = stream.stream(source(), flush=False)
        first = await frames.__anext__()
        task = asyncio.ensure_future(frames.__anext__())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await frames.aclose()
        return first

    first = asyncio.run(take_one_then_cancel())
    assert [f.index for f in stream.pending_frames] == [1, 2, 3, 4]  # the push in flight
    got = [first, *stream.push(latents[2])]  # the pending frames come first
    assert [f.index for f in got] == list(range(9))
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, expected))
