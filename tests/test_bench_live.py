"""Live mode: the shipped source (a paced ``synthetic://`` FrameSource, its own drop rule) and
``encode_to_sinks``, measured at the sink."""

from __future__ import annotations

import torch

from streamvae.bench.live import run_live


def test_live_mode_counts_the_source_drops_when_behind(narrow_encoder):
    """At 5000 frames/s the encoder cannot keep up: the source drops whole groups (its rule,
    two groups queued at most, as ``streamvae live``), and every group is either a latent at
    the sink or a dropped group."""
    fast = run_live(
        narrow_encoder, 5000, 33, (16, 16), torch.channels_last_3d, "frame", cuda_graphs=False
    )
    assert fast.groups == 9  # frame 0, then eight groups of four
    assert fast.dropped_groups > 0
    assert len(fast.latency_s) + fast.dropped_groups == fast.groups
    assert fast.frames_encoded + fast.dropped_frames == 33
    assert fast.dropped_frames == 4 * fast.dropped_groups  # whole groups only
    report = fast.as_json()
    assert report["latents"] == len(fast.latency_s) and report["dropped_groups"] > 0
    assert report["latency_ms"]["p50"] > 0


def test_live_mode_with_room_to_queue_encodes_every_group(narrow_encoder):
    """With room for every group in the source's queue nothing is dropped, however slow the
    encoder: each latent's latency is measured at the sink, from its last frame's capture."""
    run = run_live(
        narrow_encoder,
        2000,
        17,
        (16, 16),
        torch.channels_last_3d,
        "frame",
        cuda_graphs=False,
        max_queued_groups=64,
    )
    assert run.groups == 5 and run.dropped_groups == 0 and run.dropped_frames == 0
    assert run.frames_encoded == 17 and len(run.latency_s) == 5
    assert all(t > 0 for t in run.latency_s)
