"""The pipeline's counts and latencies: measured on the monotonic clock, labelled by wall clock."""

from __future__ import annotations

import time

import pytest
import torch

from streamvae import Latent, StreamEncoder
from streamvae.io import encode_to_sinks, open_source
from streamvae.io.pipeline import latent_latency


def test_latency_uses_the_monotonic_clock_where_known():
    latent = Latent(
        torch.zeros(16, 1, 1),
        1,
        range(1, 5),
        timestamps=(1e9, 1e9, 1e9, 1e9),  # a wall clock that stepped back by decades
        ready_time=2e9,
        captured=100.0,
        ready_monotonic=100.025,
    )
    assert latent_latency(latent) == pytest.approx(0.025)
    assert latent_latency(latent, now=1e9 + 0.5) == pytest.approx(0.5)  # wall clock, on request
    unlabelled = Latent(torch.zeros(16, 1, 1), 0, range(0, 1), timestamps=(10.0,), ready_time=10.5)
    assert latent_latency(unlabelled) == pytest.approx(0.5)


async def test_a_wall_clock_step_does_not_corrupt_the_latencies(
    narrow_encoder, monkeypatch: pytest.MonkeyPatch
):
    """Issue 17 (lesser): latency was time.time() - time.time(): a clock step went straight
    into the percentiles. Here the wall clock jumps 100 s at every reading."""
    real = time.time
    readings = 0

    def stepping() -> float:
        nonlocal readings
        readings += 1
        return real() + 100.0 * readings

    monkeypatch.setattr(time, "time", stepping)
    async with open_source("synthetic://moving?frames=9", size="16x16") as source:
        stats = await encode_to_sinks(source, StreamEncoder(narrow_encoder), [])
    assert readings > 9 and stats.latents == 3 and len(stats.latencies) == 3
    assert all(0 <= latency < 30 for latency in stats.latencies), list(stats.latencies)
