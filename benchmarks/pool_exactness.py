"""Exactness per stream of a StreamPool: full Wan 2.1, float32, four streams at 32x32 in one pool
(c skips a tick, d joins two ticks late), against each stream's own StreamEncoder.

    python benchmarks/pool_exactness.py
"""

from __future__ import annotations

import numpy as np
import torch

from streamvae import WAN21, StreamEncoder, StreamPool, random_encoder


def main() -> None:
    torch.set_num_threads(1)
    encoder = random_encoder(WAN21, seed=2)
    rng = np.random.default_rng(0)
    ids = "abcd"
    clips = {s: rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8) for s in ids}
    pool, own = StreamPool(encoder), {s: StreamEncoder(encoder) for s in ids}
    for s in ids:
        pool.add(s)
    got: dict[str, list] = {s: [] for s in ids}
    expected: dict[str, list] = {s: [] for s in ids}
    cursor = dict.fromkeys(ids, 0)
    for tick in range(11):
        frames = {
            s: clips[s][cursor[s]]
            for s in ids
            if cursor[s] < 9 and not (s == "c" and tick == 3) and not (s == "d" and tick < 2)
        }
        for s in frames:
            cursor[s] += 1
        for s, latents in pool.push(frames).items():
            got[s] += latents
            expected[s] += own[s].push(frames[s])
    for s in ids:
        got[s] += pool.remove(s)
        expected[s] += own[s].flush()
        errors = [
            float((a.data - b.data).abs().max() / b.data.abs().max())
            for a, b in zip(got[s], expected[s])
        ]
        same = [(a.index, a.frames, a.gap) for a in got[s]] == [
            (b.index, b.frames, b.gap) for b in expected[s]
        ]
        print(
            f"stream {s}: {len(got[s])} latents, metadata equal {same}, max rel err {max(errors):.2e}"
        )
    print("batches (size: steps):", dict(sorted(pool.stats.batches.items())))


if __name__ == "__main__":
    main()
