"""``streamvae bench --streams`` and ``--sweep``: the pool bench's rows, its CLI and JSON."""

from __future__ import annotations

import json
import subprocess

import pytest

from io_fixtures import REPO, cli_env, streamvae_command
from streamvae.bench.pool import bench_streams, bench_sweep, start_ticks


def test_rows_against_separate_streams(narrow_encoder):
    rows = bench_streams(
        narrow_encoder,
        (8, 8),
        [1, 4],
        phases=["aligned", "staggered", "interleaved", "interleaved-gather"],
        ticks=4,
        repeats=1,
    )
    batches = {(r.streams, r.phases): r.mean_batch for r in rows}
    assert batches[(4, "aligned")] == 4.0  # one cohort of four
    assert batches[(4, "staggered")] == 1.0  # four phases, one stream each
    assert batches[(1, "aligned")] == 1.0
    for row in rows:
        assert row.pool_fps > 0 and row.alone_fps > 0 and row.pool_gflops > 0
        assert row.pool_latency_ms["p50"] is not None and row.alone_latency_ms["p99"] is not None
        tick = row.pool_breakdown_ms  # the pool's tick, part by part
        parts = ("host", "uploads", "steps", "downloads", "syncs")
        assert tick["total"] == pytest.approx(sum(tick[p] for p in parts))
        assert tick["steps"] > 0 and any(key.startswith("step 8x8 x") for key in tick)


def test_start_ticks_refuses_unknown_schedules():
    assert start_ticks(4, "staggered") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="phases must be one of"):
        start_ticks(4, "random")


def test_sweep(narrow_encoder):
    (row,) = bench_sweep(narrow_encoder, [(8, 16)], repeats=1)
    assert row.size == (8, 16) and row.ms_per_frame > 0 and row.gflops > 0


def test_bench_streams_command_writes_json(tmp_path):
    out = tmp_path / "pool.json"
    result = subprocess.run(
        streamvae_command(
            "bench", "--random-weights", "--config", "narrow8", "--device", "cpu",
            "--streams", "1,2", "--phases", "aligned,interleaved", "--size", "8x8",
            "--ticks", "4", "--repeats", "1", "--sweep", "8x8", "--json", str(out),
        ),
        capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "| streams | size | phases |" in result.stdout and "| size | ms / frame |" in result.stdout
    )
    report = json.loads(out.read_text())
    assert [(r["streams"], r["phases"]) for r in report["streams"]] == [
        (1, "aligned"), (1, "interleaved"), (2, "aligned"), (2, "interleaved"),
    ]  # fmt: skip
    assert report["sweep"][0]["size"] == [8, 8]
    assert (
        "where the pool's tick goes" in result.stdout and "| total ms | host ms |" in result.stdout
    )
    assert report["streams"][0]["pool_breakdown_ms"]["total"] > 0
