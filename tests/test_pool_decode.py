"""StreamPool with a WanDecoder: per-stream frames equal each stream's own StreamDecoder's,
whatever the schedule; stragglers rejoin the batch; bad latents refused with nothing changed;
admission by the decoder's state size; the async iterator over latent sources."""

from __future__ import annotations

import asyncio

import pytest
import torch

from streamvae import (
    WAN22,
    AdmissionError,
    Latent,
    LatentError,
    PoolSourceError,
    StreamDecoder,
    StreamPool,
    narrow,
    random_decoder,
)

# The batch changes only the order of float sums inside a conv: 0.0 or float32 rounding.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def decoder():
    return random_decoder(narrow(8), seed=3)


@pytest.fixture(
    scope="module",
    params=[narrow(8), pytest.param(narrow(8, WAN22), marks=pytest.mark.slow)],
    ids=lambda c: c.name,
)
def any_decoder(request):
    """Wan 2.1 and Wan 2.2 (its DupUp3D shortcuts, first_chunk trim) for the exactness test."""
    return random_decoder(request.param, seed=3)


def latents_of(decoder, seed: int, count: int, h: int = 4, w: int = 4) -> list[torch.Tensor]:
    """``count`` normalised latents ``[z, h, w]`` (32x32 frames for narrow8 Wan 2.1)."""
    generator = torch.Generator().manual_seed(seed)
    z = decoder.config.z_dim
    return [torch.randn(z, h, w, generator=generator) for _ in range(count)]


def latent_hw(decoder) -> tuple[int, int]:
    side = 32 // decoder.config.spatial_stride  # 32x32 frames
    return side, side


def assert_same_frames(got, expected, label=""):
    assert [(f.index, f.latent, f.timestamp, f.gap) for f in got] == [
        (f.index, f.latent, f.timestamp, f.gap) for f in expected
    ], label
    for a, b in zip(got, expected):
        assert a.data.shape == b.data.shape and a.data.dtype == torch.float32
        err = float((a.data - b.data).abs().max() / b.data.abs().max().clamp_min(1e-12))
        assert err <= TOLERANCE, f"{label} frame {a.index}: {err:.2e}"


class Mirror:
    """A decoder pool and one StreamDecoder per stream, fed the same latents."""

    def __init__(self, decoder, **options):
        self.decoder = decoder
        self.pool = StreamPool(decoder, **options)
        self.own: dict[str, StreamDecoder] = {}
        self.got: dict[str, list] = {}
        self.expected: dict[str, list] = {}

    def add(self, sid, **kwargs):
        self.pool.add(sid, **kwargs)
        self.own[sid] = StreamDecoder(self.decoder)
        self.got[sid], self.expected[sid] = [], []

    def push(self, latents):
        out = self.pool.push(latents)
        assert set(out) == set(latents)
        for sid, latent in latents.items():
            self.expected[sid] += self.own[sid].push(latent)
            self.got[sid] += out[sid]

    def check(self):
        for sid in self.got:
            assert self.got[sid], sid
            assert_same_frames(self.got[sid], self.expected[sid], sid)


def test_streams_joining_at_different_times_equal_their_own_decoders(any_decoder):
    """Stragglers: b joins a tick late, c two ticks late, a skips a tick; from their fourth
    latent on (a decoder step has no phase) they step as one batch again."""
    decoder = any_decoder
    h, w = latent_hw(decoder)
    mirror = Mirror(decoder)
    clips = {sid: latents_of(decoder, 10 + i, 5, h, w) for i, sid in enumerate("abc")}
    start = {"a": 0, "b": 1, "c": 2}
    sent = dict.fromkeys("abc", 0)
    for tick in range(6):
        tick_latents = {}
        for sid in "abc":
            if tick == start[sid]:
                mirror.add(sid)
            if tick >= start[sid] and not (sid == "a" and tick == 2) and sent[sid] < 5:
                tick_latents[sid] = clips[sid][sent[sid]]
                sent[sid] += 1
        mirror.push(tick_latents)
    mirror.check()
    pool = mirror.pool
    assert [pool.latents_pushed(sid) for sid in "abc"] == [sent[sid] for sid in "abc"]
    assert pool.frames_emitted("a") == 1 + 4 * (sent["a"] - 1)
    assert pool.latent_size("b") == (h, w)
    assert max(pool.stats.batches) == 3  # the three streams stepped as one batch
    assert pool.state_nbytes > 0


def test_latents_carry_their_labels_and_a_gap_restarts_the_stream(decoder):
    h, w = 2, 2
    mirror = Mirror(decoder)
    mirror.add("a")
    mirror.add("b")
    data = latents_of(decoder, 20, 4, h, w)
    for k, latent in enumerate(data):
        labelled = Latent(
            data=latent,
            index=k,
            frames=range(0, 1) if k == 0 else range(4 * k - 3, 4 * k + 1),
            timestamps=(float(k),) if k == 0 else tuple(float(4 * k - 3 + i) for i in range(4)),
            gap=k == 2,  # the source restarted: a new run, frame 0 again
        )
        mirror.push({"a": labelled, "b": latent})
    mirror.check()
    assert mirror.got["a"][-5].index == 0 and mirror.got["a"][-5].gap


def test_a_bad_latent_is_refused_with_nothing_changed_and_the_others_go_on(decoder):
    h, w = 2, 2
    mirror = Mirror(decoder)
    for sid in "ab":
        mirror.add(sid)
    clips = {sid: latents_of(decoder, 30 + i, 4, h, w) for i, sid in enumerate("ab")}
    mirror.push({sid: clips[sid][0] for sid in "ab"})
    mirror.push({sid: clips[sid][1] for sid in "ab"})
    pool = mirror.pool
    before = [t.clone() for t in pool.state("b").buffers()]
    signature = pool.state("b").signature()
    z = decoder.config.z_dim
    nan = clips["b"][2].clone()
    nan[0, 0, 0] = float("nan")
    bad = {
        "NaN": nan,
        "channels": torch.zeros(z + 1, h, w),
        "size": torch.zeros(z, h + 1, w),
        "dtype": torch.zeros(z, h, w, dtype=torch.int64),
    }
    for what, latent in bad.items():
        with pytest.raises(LatentError, match=r"stream 'b'.*no stream advanced"):
            pool.push({"a": clips["a"][2], "b": latent})
        assert pool.latents_pushed("a") == 2 and pool.latents_pushed("b") == 2, what
    assert pool.state("b").signature() == signature
    assert all(torch.equal(x, y) for x, y in zip(pool.state("b").buffers(), before))
    mirror.push({"a": clips["a"][2]})  # the other stream goes on
    mirror.push({sid: clips[sid][3 if sid == "a" else 2] for sid in "ab"})
    mirror.check()
    with pytest.raises(ValueError, match="timestamps"):
        pool.push({"a": clips["a"][0]}, timestamps={"a": 1.0})


def test_admission_by_the_decoders_state_size(decoder):
    h, w = latent_hw(decoder)
    alone = StreamDecoder(decoder)
    alone.push(latents_of(decoder, 40, 1, h, w)[0])
    need = alone.state_nbytes
    pool = StreamPool(decoder, memory_budget=2 * need + need // 2)
    pool.add("a", size=(h, w))
    pool.add("b", size=(h, w))
    allocated = pool.state_nbytes
    assert allocated == 2 * need
    with pytest.raises(AdmissionError, match=f"'c' refused.*latents needs {need:,} bytes"):
        pool.add("c", size=(h, w))
    assert "c" not in pool and pool.state_nbytes == allocated
    pool.add("c")  # no size: admitted at its first latent
    latent = latents_of(decoder, 41, 1, h, w)[0]
    with pytest.raises(AdmissionError, match="'c' refused"):
        pool.push({"a": latent, "c": latent})
    assert pool.latents_pushed("a") == 0 and pool.state_nbytes == allocated
    with pytest.raises(LatentError, match="added with size"):
        pool.push({"a": latents_of(decoder, 42, 1, h, 2 * w)[0]})
    pool.remove("b")
    out = pool.push({"a": latent, "c": latent})  # b's slot is free now
    assert [f.index for f in out["c"]] == [0] and pool.latents_pushed("a") == 1
    with pytest.raises(ValueError, match="positive integers"):
        pool.add("d", size=(0, 4))
    with pytest.raises(TypeError, match="decoder pool"):
        pool.frames_pushed("a")


def test_stream_decodes_latent_sources_and_a_bad_source_ends_alone(decoder):
    h, w = 2, 2
    clips = {sid: latents_of(decoder, 50 + i, 3, h, w) for i, sid in enumerate("ab")}
    broken = [*clips["b"][:1], torch.zeros(decoder.config.z_dim + 1, h, w)]

    async def run():
        pool = StreamPool(decoder)
        got: dict[str, list] = {"a": [], "b": []}
        with pytest.raises(PoolSourceError) as info:
            async with pool.stream({"a": clips["a"], "b": broken}) as frames:
                async for sid, frame in frames:
                    got[sid].append(frame)
        return pool, got, info.value

    pool, got, error = asyncio.run(run())
    assert set(error.errors) == {"b"} and isinstance(error.errors["b"], LatentError)
    own = StreamDecoder(decoder)
    assert_same_frames(got["a"], [f for latent in clips["a"] for f in own.push(latent)], "a")
    assert [f.index for f in got["b"]] == [0]
    assert len(pool) == 0
