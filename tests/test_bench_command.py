"""``streamvae bench``: tiny runs end to end (the JSON, the table, the PNG), through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import in_ci, require
from io_fixtures import REPO, cli_env
from streamvae.bench.run import PEERS
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
    printed = capsys.readouterr()
    table = printed.out
    assert "streamvae" in table and "diffusers_batch" in table and "targets:" in table
    # Progress on stderr as the run goes (a long run is not silent), the table on stdout.
    for step in ("warm-up: streamvae", "repeat 1/2", "repeat 2/2", "live mode", "done"):
        assert step in printed.err, printed.err
    assert "repeat 1/2" not in table
    assert "norm kernels: eager" in table  # no Triton kernels on the CPU (outside the tests)

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
    assert run["norm_kernels"].startswith("eager (not used on cpu")
    sweep = report["memory_vs_length"]
    assert sweep["lengths"] == [9] and len(sweep["streamvae_mb"]) == 1
    assert all(isinstance(v, float) for v in sweep["streamvae_mb"] + sweep["diffusers_batch_mb"])
    (live,) = report["live"]
    assert live["fps"] == 120 and live["groups"] == 3  # frame 0 and two groups of four
    assert live["latents"] + live["dropped_groups"] == live["groups"]
    assert live["frames_encoded"] + live["dropped_frames"] == 9
    # Every peer is in the report: measured, on the same weights (within 1e-5 of Wan's own
    # code), or, outside CI, with the reason it could not run.
    assert list(report["peers"]) == ["streamvae", *PEERS]
    for name, row in report["peers"].items():
        if row["status"] != "measured":
            assert not in_ci() and row["status"].startswith("not installed"), (name, row)
            continue
        assert row["fps"] > 0 and row["latency_after_group_ms"]["p50"] > 0, name
        # The latency definition, pinned by its sample count (9 frames: groups 1-4 and 5-8, two
        # repeats): one sample a group for the encoders that see a group as it completes (the
        # 4th frame's push, or a whole 4-frame call); one a clip for the batch encoders. A
        # report that took every push (9 a clip) or lost a call would change it.
        per_clip = 1 if name in ("diffusers_batch", "official_wan") else 2
        assert row["latency_after_group_ms"]["n"] == 2 * per_clip, name
        assert row["error_vs_official"] <= 1e-5, name
        if name != "streamvae":
            assert row["latency_ratio"] > 0 and row["throughput_ratio"] > 0, name
    assert "every peer, same weights and frames" in table
    # The summary's ratio is the table's (one definition: latent 0 left out of both).
    ratio = report["vs_diffusers"]["group_latency_ratio"]
    assert ratio == report["peers"]["diffusers_group"]["latency_ratio"]
    peer_table = table.split("every peer, same weights and frames", 1)[1]
    (group_row,) = [text for text in peer_table.splitlines() if text.startswith("diffusers_group ")]
    assert f" {ratio} " in group_row + " "
    assert f"latency after a group's last frame {ratio}x streamvae's" in table
    after = report["latency_after_group_ms"]
    assert after == report["peers"]["streamvae"]["latency_after_group_ms"] and after["n"] == 2 * 2
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


def test_python_m_streamvae_bench_runs_the_bench_without_peers(tmp_path):
    """``python -m streamvae.bench ARGS`` is ``streamvae bench ARGS``; ``--no-peers`` reports
    each peer as skipped, not as missing."""
    out_json = tmp_path / "bench.json"
    args = "--random-weights --config narrow8 --device cpu --size 16x16 --frames 5 --repeats 1"
    args += " --fps 0 --lengths 0 --no-peers --threads 1 --json " + str(out_json)
    done = subprocess.run(
        [sys.executable, "-m", "streamvae.bench", *args.split()],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out_json.read_text())
    assert report["peers"]["streamvae"]["status"] == "measured"
    assert {row["status"] for name, row in report["peers"].items() if name != "streamvae"} == {
        "skipped (--no-peers)"
    }
