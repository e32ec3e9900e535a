"""streamvae's driver and every peer, on the same weights: their latents match streamvae's."""

from __future__ import annotations

import pytest
import torch

from helpers import in_ci, rel_err, require
from streamvae import StreamEncoder, narrow
from streamvae.bench.clips import frames_to_video, synthetic_frames
from streamvae.bench.peers import DiffusersPeer, run_stream
from streamvae.bench.timing import Clock


def test_streaming_and_peers_agree(narrow_encoder):
    require("diffusers")
    frames = synthetic_frames(9, 16, 16)
    clock = Clock(torch.device("cpu"))
    stream = StreamEncoder(narrow_encoder, normalize=False)
    run = run_stream(stream, frames, clock, idle_before_push=True)
    assert len(run.push_s) == 9 and len(run.latent_s) == 3
    peer = DiffusersPeer(narrow_encoder)
    video = frames_to_video(frames, torch.device("cpu"), torch.float32)
    batch = peer.batch(video)
    times, grouped = peer.groups(video, clock)
    assert len(times) == 3
    assert rel_err(run.latents, batch) <= 1e-5 and rel_err(grouped, batch) <= 1e-5


def test_wan22_peer_groups_patchify(narrow_encoder):
    require("diffusers")
    from streamvae import WAN22
    from streamvae.weights import random_encoder

    encoder = random_encoder(narrow(8, WAN22), seed=3)
    frames = synthetic_frames(5, 32, 32)
    video = frames_to_video(frames, torch.device("cpu"), torch.float32)
    peer = DiffusersPeer(encoder)
    times, grouped = peer.groups(video, Clock(torch.device("cpu")))
    assert len(times) == 2 and grouped.shape == (1, 48, 2, 2, 2)
    assert rel_err(grouped, encoder.encode(video, normalize=False)) <= 1e-5
    assert rel_err(peer.batch(video), grouped) <= 1e-5


def built_or_skip(build, encoder):
    """The peer, or (outside CI) a skip saying why it cannot run; in CI a missing peer fails:
    scripts/install.sh installs every one."""
    from streamvae.bench.peers import PeerUnavailable

    try:
        return build(encoder)
    except PeerUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI: peer {build.__name__} unavailable: {exc}", pytrace=False)
        pytest.skip(str(exc))


def test_official_wan_peer_holds_the_same_weights(narrow_encoder):
    """Wan's own ``WanVAE_.encode`` on weights mapped from streamvae's state dict (Wan's .pth
    names) gives streamvae's latents: the map is right, tensor for tensor."""
    from streamvae.bench.peers import OfficialWanPeer

    frames = synthetic_frames(9, 16, 24)
    video = frames_to_video(frames, torch.device("cpu"), torch.float32)
    official = built_or_skip(OfficialWanPeer, narrow_encoder)
    run = run_stream(
        StreamEncoder(narrow_encoder, normalize=False),
        frames,
        Clock(video.device),
        idle_before_push=True,
    )
    got = official.batch(video)
    assert got.shape == run.latents.shape == (1, 16, 3, 2, 3)
    assert rel_err(run.latents, got) <= 1e-5
    # Not trivially equal: another seed's weights give other latents.
    from streamvae.weights import random_encoder

    other = built_or_skip(OfficialWanPeer, random_encoder(narrow(8), seed=2))
    assert rel_err(other.batch(video), got) > 1e-2


def test_official_wan_peer_runs_wan22_with_vae2_2():
    from streamvae import WAN22
    from streamvae.bench.peers import OfficialWanPeer
    from streamvae.weights import random_encoder

    encoder = random_encoder(narrow(8, WAN22), seed=3)
    official = built_or_skip(OfficialWanPeer, encoder)
    assert official.file.endswith("vae2_2.py")
    video = frames_to_video(synthetic_frames(5, 32, 32), torch.device("cpu"), torch.float32)
    assert rel_err(official.batch(video), encoder.encode(video, normalize=False)) <= 1e-5


def test_streamdiffusionv2_peer_streams_the_same_latents(narrow_encoder):
    """StreamDiffusionV2's ``stream_encode``: a first call of 1 + 4 frames, then 4 a call, its
    cache carried; the latents equal streamvae's, and a second pass (a fresh stream) again."""
    from streamvae.bench.peers import StreamDiffusionV2Peer

    frames = synthetic_frames(13, 16, 16)
    video = frames_to_video(frames, torch.device("cpu"), torch.float32)
    peer = built_or_skip(StreamDiffusionV2Peer, narrow_encoder)
    assert peer.calls(13) == [(0, 5), (5, 9), (9, 13)]
    assert peer.calls(12) == [(0, 5), (5, 9)] and peer.calls(4) == []
    expected = narrow_encoder.encode(video, normalize=False)
    for _ in range(2):
        times, got = peer.groups(video, Clock(video.device))
        assert len(times) == 3 and all(t > 0 for t in times)
        assert got.shape == expected.shape == (1, 16, 4, 2, 2)
        assert rel_err(got, expected) <= 1e-5


def test_streamdiffusionv2_peer_refuses_wan22():
    from streamvae import WAN22
    from streamvae.bench.peers import PeerUnavailable, StreamDiffusionV2Peer
    from streamvae.weights import random_encoder

    with pytest.raises(PeerUnavailable, match=r"not applicable to wan2\.2-narrow8"):
        StreamDiffusionV2Peer(random_encoder(narrow(8, WAN22), seed=3))


def test_a_missing_peer_package_is_reported_not_raised():
    from streamvae.bench.peers import PeerFile, PeerUnavailable, load_peer_file

    missing = PeerFile("streamvae-no-such-dist", "x.py", "pip install streamvae-no-such-dist")
    with pytest.raises(PeerUnavailable, match=r"not installed \(pip install streamvae-no-such"):
        load_peer_file(missing)


def test_peer_table_names_every_peer_and_its_ratios():
    from streamvae.bench.run import PEERS, peer_table

    encoders = {"streamvae": {"fps": 10.0}, "streamdiffusionv2": {"fps": 5.0}}
    table = peer_table(
        encoders,
        {"streamvae": [0.01, 0.01], "streamdiffusionv2": [0.05, 0.05]},
        {"streamvae": 1e-6, "streamdiffusionv2": 2e-6},
        {"official_wan": "not installed (pip install --no-deps wan22==2.2.11)"},
    )
    assert list(table) == ["streamvae", *PEERS]
    row = table["streamdiffusionv2"]
    assert row["latency_ratio"] == 5.0 and row["throughput_ratio"] == 2.0
    assert table["official_wan"]["status"].startswith("not installed")
    assert table["diffusers_batch"]["status"] == "not measured"
