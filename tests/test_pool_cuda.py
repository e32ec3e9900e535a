"""CUDA: a StreamPool on the GPU, eager and with CUDA graphs, equals each stream's own
StreamEncoder (true float32), whatever the schedule. Needs a GPU (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from helpers import random_encoder, random_video, rel_err
from streamvae import WAN21, StreamEncoder, StreamPool, narrow

pytestmark = pytest.mark.cuda


@pytest.fixture
def exact_fp32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("config, size", [(narrow(8), (32, 48)), (WAN21, (64, 64))])
def test_gpu_pool_equals_own_streams(exact_fp32, config, size, cuda_graphs):
    encoder = random_encoder(config, seed=4).to("cuda")
    ids = ["a", "b", "c", "d"]
    clips = {sid: list(random_video(13, *size, seed=i)[0].numpy()) for i, sid in enumerate(ids)}
    pool = StreamPool(encoder, cuda_graphs=cuda_graphs)
    own = {sid: StreamEncoder(encoder) for sid in ids}
    got: dict[str, list] = {sid: [] for sid in ids}
    expected: dict[str, list] = {sid: [] for sid in ids}
    for sid in ids:
        pool.add(sid, size=size)
    cursor = dict.fromkeys(ids, 0)
    for tick in range(16):  # c skips every third tick, d joins late: several cohorts
        frames = {}
        for sid in ids:
            if (sid == "c" and tick % 3 == 2) or (sid == "d" and tick < 3):
                continue
            if cursor[sid] < 13:
                frames[sid] = clips[sid][cursor[sid]]
                cursor[sid] += 1
        for sid, latents in pool.push(frames).items():
            got[sid] += latents
            expected[sid] += own[sid].push(frames[sid])
    for sid in ids:
        got[sid] += pool.remove(sid)
        expected[sid] += own[sid].flush()
        assert [x.index for x in got[sid]] == [x.index for x in expected[sid]]
        for a, b in zip(got[sid], expected[sid]):
            assert rel_err(a.data, b.data) <= 1e-5, sid
    assert max(pool.stats.batches) >= 2
    # The tick's breakdown: one pinned upload per batch, one wait for the copies back per batch
    # with latents (never one per stream); the parts sum to the tick; device times read.
    tick = pool.breakdown
    assert tick.parts == pytest.approx(tick.total, rel=1e-9, abs=1e-9)
    assert 0 < tick.sync_counts.get("downloads", 0) <= pool.stats.steps
    assert tick.device_steps and all(v > 0 for v in tick.device_steps.values())


def test_gpu_decoder_pool_equals_own_decoders(exact_fp32):
    from streamvae import StreamDecoder, random_decoder

    decoder = random_decoder(narrow(8), seed=4).to("cuda")
    generator = torch.Generator().manual_seed(0)
    clips = {sid: [torch.randn(16, 4, 6, generator=generator) for _ in range(4)] for sid in "ab"}
    pool = StreamPool(decoder)
    own = {sid: StreamDecoder(decoder) for sid in "ab"}
    for sid in "ab":
        pool.add(sid)
    for k in range(4):
        tick = {sid: clips[sid][k] for sid in "ab" if not (sid == "b" and k == 0)}
        for sid, frames in pool.push(tick).items():
            expected = own[sid].push(tick[sid])
            assert [f.index for f in frames] == [f.index for f in expected]
            for a, b in zip(frames, expected):
                assert a.data.device.type == "cpu" and rel_err(a.data, b.data) <= 1e-5
    assert pool.breakdown.sync_counts.get("downloads", 0) == pool.breakdown.ticks
