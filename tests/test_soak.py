"""Long runs: 10,000 frames through one stream, memory flat, latency stable, latent count exact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from soak import run_soak


@pytest.mark.slow
def test_ten_thousand_frames_keep_memory_flat(narrow_encoder):
    result = run_soak(narrow_encoder, frames=10_000, height=16, width=16, warmup=500)
    print(result)
    assert result.latents == result.expected_latents == 2500
    assert result.rss_growth < 0.05
    # Generous: a leak or a growing cache shows as a steady climb, not a few percent of noise.
    assert result.latency_drift < 2.0
