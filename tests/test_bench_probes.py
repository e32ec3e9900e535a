"""Memory probes."""

from __future__ import annotations

import numpy as np
import torch

from streamvae.bench.probes import track_memory


def test_track_memory_sees_an_allocation():
    with track_memory(torch.device("cpu")) as peak:
        block = np.ones(64 * 2**20, dtype=np.uint8)
        del block
    assert peak.rss >= 60 * 2**20
