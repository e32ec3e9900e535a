"""The bench's statistics."""

from __future__ import annotations

import pytest

from streamvae.bench.peers import last_push_shares
from streamvae.bench.timing import percentiles_ms


def test_statistics():
    stats = percentiles_ms([0.001 * i for i in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01)
    assert percentiles_ms([])["p50"] is None
    # frames 1..4 are group one: its last push (frame 4) took 4 of 1 + 1 + 1 + 4 s (group two
    # is incomplete)
    assert last_push_shares([9, 1, 1, 1, 4, 1, 1], 4) == [4 / 7]
