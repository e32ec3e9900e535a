"""Warm-up (issue 25 item 5): StreamEncoder.warmup, StreamDecoder.warmup and StreamPool.warmup
run a stream's first steps before its first input and leave everything as it was: a warmed
stream's outputs equal a cold one's exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import random_video
from streamvae import FrameError, StreamDecoder, StreamEncoder, StreamPool, narrow, random_decoder


def frames(count: int, seed: int = 0, size: int = 16) -> list:
    return list(random_video(count, size, size, seed=seed)[0].numpy())


def latents(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 2, 2, generator=generator) for _ in range(count)]


def assert_same_snapshot(a: bytes, b: bytes) -> None:
    """Snapshots' tensors and metadata equal (their bytes need not be)."""
    from streamvae.snapshot import unpack

    (tensors_a, meta_a), (tensors_b, meta_b) = unpack(a), unpack(b)
    assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def assert_equal(got, expected):
    assert [x.index for x in got] == [x.index for x in expected] and got
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, expected))


@pytest.fixture(scope="module")
def decoder():
    return random_decoder(narrow(8), seed=2)


@pytest.mark.parametrize("mode", ["frame", "group"])
def test_a_warmed_encoder_stream_equals_a_cold_one(narrow_encoder, mode):
    clip = frames(9)
    cold, warm = (StreamEncoder(narrow_encoder, mode=mode) for _ in range(2))
    stepped = warm.warmup(16, 16)
    assert stepped >= 9  # the first steps and one cycle of the steady state
    assert warm.frames_pushed == 0 and warm.state_nbytes == 0  # the throwaway state is gone
    got = [lat for frame in clip for lat in warm.push(frame)]
    assert_equal(got, [lat for frame in clip for lat in cold.push(frame)])
    with pytest.raises(FrameError, match="multiple"):
        warm.warmup(15, 16)


def test_warming_up_mid_stream_leaves_the_stream_as_it_was(narrow_encoder):
    clip = frames(9, seed=1)
    cold, warm = StreamEncoder(narrow_encoder), StreamEncoder(narrow_encoder)
    head = [lat for frame in clip[:3] for lat in warm.push(frame)]
    before = warm.snapshot()
    warm.warmup(32, 16)  # another size, too
    assert_same_snapshot(warm.snapshot(), before)
    got = head + [lat for frame in clip[3:] for lat in warm.push(frame)]
    assert_equal(got, [lat for frame in clip for lat in cold.push(frame)])


def test_a_warmed_decoder_stream_equals_a_cold_one(decoder):
    data = latents(3)
    cold, warm = StreamDecoder(decoder), StreamDecoder(decoder)
    warm.push(data[0])
    before = warm.snapshot()
    assert warm.warmup(2, 2) >= 2
    assert_same_snapshot(warm.snapshot(), before)
    got = [f for latent in data[1:] for f in warm.push(latent)]
    cold.push(data[0])
    assert_equal(got, [f for latent in data[1:] for f in cold.push(latent)])


def test_pool_warmup_changes_no_stream_bank_or_counter(narrow_encoder, decoder):
    pool, cold = StreamPool(narrow_encoder), StreamPool(narrow_encoder)
    assert pool.warmup((16, 16), streams=2) >= 9
    assert pool.state_nbytes == 0 and pool.stats.ticks == 0 and pool.breakdown.ticks == 0
    clip = {sid: frames(5, seed=i) for i, sid in enumerate("ab")}
    for p in (pool, cold):
        p.add("a")
        p.add("b")
    for t in range(5):
        tick = {sid: clip[sid][t] for sid in "ab"}
        got, expected = pool.push(tick), cold.push(tick)
        for sid in "ab":
            assert [x.index for x in got[sid]] == [x.index for x in expected[sid]]
            assert all(torch.equal(a.data, b.data) for a, b in zip(got[sid], expected[sid]))
    decoders = StreamPool(decoder)
    assert decoders.warmup((2, 2), streams=2) >= 2 and decoders.state_nbytes == 0
    with pytest.raises(ValueError, match="streams must be"):
        decoders.warmup((2, 2), streams=0)


@pytest.mark.cuda
def test_a_warmed_cuda_graph_stream_captured_before_its_first_frame():
    from helpers import random_encoder, rel_err

    encoder = random_encoder(narrow(8), seed=4).to("cuda")
    clip = frames(13, seed=3, size=32)
    cold = StreamEncoder(encoder, cuda_graphs=True)
    warm = StreamEncoder(encoder, cuda_graphs=True)
    warm.warmup(32, 32)
    assert warm._state is not None and warm._state.graphs is not None
    assert warm._state.graphs.graphs  # captured before the first frame
    assert warm.frames_pushed == 0
    got = [lat for frame in clip for lat in warm.push(frame)]
    expected = [lat for frame in clip for lat in cold.push(frame)]
    assert [x.index for x in got] == [x.index for x in expected]
    assert all(rel_err(a.data, b.data) <= 1e-6 for a, b in zip(got, expected))
