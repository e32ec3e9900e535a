"""``streamvae bench``: one tiny run end to end (its JSON and PNG), and its measuring parts."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from helpers import rel_err, require
from streamvae import StreamEncoder, narrow
from streamvae.bench import (
    Clock,
    DiffusersPeer,
    frames_to_video,
    last_push_shares,
    parse_numbers,
    parse_size,
    percentiles_ms,
    run_live,
    run_stream,
    streamvae_flops,
    synthetic_frames,
    track_memory,
)
from streamvae.cli import main

require("diffusers")
require("matplotlib")


def test_bench_tiny_run_writes_its_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    status = main(
        [
            "bench",
            "--random-weights",
            "--config",
            "narrow8",
            "--device",
            "cpu",
            "--size",
            "16x24",
            "--frames",
            "9",
            "--repeats",
            "2",
            "--fps",
            "120",
            "--live-frames",
            "9",
            "--lengths",
            "9",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert status == 0
    table = capsys.readouterr().out
    assert "streamvae" in table and "diffusers_batch" in table and "targets:" in table

    report = json.loads(out_json.read_text())
    for key in ("p50", "p95", "p99"):
        assert report["latency_ms"][key] > 0
    assert report["latency_ms"]["n"] == 2 * 3  # 3 latents per 9-frame clip, 2 repeats
    assert report["first_latent_ms"] > 0 and report["fps"] > 0
    assert set(report["vs_diffusers"]) >= {"batch_speedup", "group_speedup"}
    assert all(v > 0 for v in report["vs_diffusers"].values() if v is not None)
    assert report["error"]["vs_diffusers"] <= 1e-5  # float32: the same latents
    assert report["error"]["diffusers_group_vs_batch"] <= 1e-5
    assert set(report["peak_memory_mb"]) == {"streamvae", "diffusers_batch", "diffusers_group"}
    assert report["state_bytes"] > 0
    assert report["flops_per_frame"] > 0 and report["achieved_flops"] > 0
    assert report["peak_flops"] >= report["peak_flops_by_kernel"]["conv3d"] > 0
    assert 0 < report["last_push_share"] < 1
    run = report["run"]
    assert run["device"] == "cpu" and run["dtype"] == "float32" and run["size"] == [16, 24]
    assert run["frames"] == 9 and run["config"] == "wan2.1-narrow8"
    assert run["versions"]["torch"] == torch.__version__ and run["versions"]["diffusers"]
    assert run["device_name"]
    sweep = report["memory_vs_length"]
    assert sweep["lengths"] == [9] and len(sweep["streamvae_mb"]) == 1
    assert all(isinstance(v, float) for v in sweep["streamvae_mb"] + sweep["diffusers_batch_mb"])
    (live,) = report["live"]
    assert live["fps"] == 120 and live["groups"] == 2
    assert live["latents"] + live["dropped_groups"] == 1 + live["groups"]
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"last", "float32"}
    assert out_png.stat().st_size > 10_000


def test_bench_bfloat16_reports_its_error_against_float32(tmp_path):
    out_json = tmp_path / "bench.json"
    args = "bench --random-weights --config narrow8 --device cpu --dtype bfloat16 --size 16x16"
    args += " --frames 5 --repeats 1 --fps 0 --lengths 0 --json " + str(out_json)
    assert main(args.split()) == 0
    report = json.loads(out_json.read_text())
    assert report["run"]["dtype"] == "bfloat16"
    assert 0 < report["error"]["vs_float32"] <= 3e-2
    assert report["vs_diffusers"]["batch_float32_speedup"] > 0
    assert report["live"] == [] and report["memory_vs_length"] is None


def test_parsers():
    assert parse_size("480x832") == (480, 832)
    for bad in ("480", "480x830", "0x8", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
    assert parse_numbers("16,24,30") == (16.0, 24.0, 30.0)
    assert parse_numbers("0") == () == parse_numbers("none")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_numbers("-1")


def test_statistics():
    stats = percentiles_ms([0.001 * i for i in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01)
    assert percentiles_ms([])["p50"] is None
    # frames 1..4 are group one: its last push (frame 4) took 4 of 1 + 1 + 1 + 4 s (group two
    # is incomplete)
    assert last_push_shares([9, 1, 1, 1, 4, 1, 1], 4) == [4 / 7]


def test_streaming_and_peers_agree(narrow_encoder):
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


def test_flop_count_is_the_model_cost():
    """Issue 17: ``flops > 5x one conv`` held for any model. Now each steady-state group of four
    frames is held to diffusers' count of the same network, to the FLOP: they differ only by
    the log-variance half of the 1x1x1 quant conv, which streamvae never computes."""
    from streamvae.bench import diffusers_flops
    from streamvae.weights import random_encoder

    config = narrow(8)
    encoder = random_encoder(config)
    ours = [streamvae_flops(encoder, t, 16, 16) for t in (1, 5, 9, 13)]
    theirs = [diffusers_flops(encoder, t, 16, 16) for t in (1, 5, 9, 13)]
    group = ours[2] - ours[1]
    assert ours[3] - ours[2] == group > 0  # every group costs the same
    z, latent_pixels = config.z_dim, (16 // 8) ** 2
    logvar_half = 2 * (2 * z) * z * latent_pixels  # 1x1x1 conv, 2z -> z more channels
    assert [b - a for a, b in zip(theirs, theirs[1:])] == [group + logvar_half] * 3
    first_conv = 2 * 3 * 8 * 9 * 16 * 16  # conv_in on frame 0: one time tap of three
    assert theirs[0] > ours[0] > first_conv  # frame 0: streamvae skips the zero time taps


def test_live_mode_drops_whole_groups_when_behind(narrow_encoder):
    frames = synthetic_frames(33, 16, 16)
    fast = run_live(
        narrow_encoder, 1e5, frames, torch.contiguous_format, "frame", cuda_graphs=False
    )
    assert fast.groups == 8
    assert fast.dropped_groups > 0  # frames arrive every 10 us: the encoder cannot keep up
    assert len(fast.latency_s) + fast.dropped_groups == 1 + fast.groups


def test_track_memory_sees_an_allocation():
    with track_memory(torch.device("cpu")) as peak:
        block = np.ones(64 * 2**20, dtype=np.uint8)
        del block
    assert peak.rss >= 60 * 2**20


def test_bench_wan22_runs_against_diffusers_on_the_same_weights(tmp_path):
    """``--config wan2.2-narrow8``: the diffusers peer patchifies as diffusers' encode does, so
    its batch and grouped latents equal streamvae's."""
    out_json = tmp_path / "bench.json"
    args = "bench --random-weights --config wan2.2-narrow8 --device cpu --size 32x48"
    args += " --frames 9 --repeats 1 --fps 0 --lengths 9 --json " + str(out_json)
    assert main(args.split()) == 0
    report = json.loads(out_json.read_text())
    assert report["run"]["config"] == "wan2.2-narrow8"
    assert report["error"]["vs_diffusers"] <= 1e-5
    assert report["error"]["diffusers_group_vs_batch"] <= 1e-5
    assert report["state_bytes"] > 0 and report["memory_vs_length"]["lengths"] == [9]


def test_bench_refuses_a_size_the_model_cannot_take():
    args = "bench --random-weights --config wan2.2-narrow8 --device cpu --size 40x48"
    with pytest.raises(SystemExit, match="multiples of 16"):
        main(args.split())


def test_wan22_peer_groups_patchify(narrow_encoder):
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
