"""``streamvae bench --precision``: the rows (speed, error against float32, global and per
latent channel) and the table, on the CPU at a tiny size."""

from __future__ import annotations

import json

import torch

from helpers import random_encoder
from streamvae import narrow
from streamvae.bench.precision import bench_precision, format_precision, per_channel_errors
from streamvae.cli import main


def test_per_channel_errors_are_per_channel():
    expected = torch.ones(1, 3, 2, 2, 2)
    expected[:, 1] *= 4.0
    got = expected.clone()
    got[0, 1, 0, 0, 0] += 1.0  # channel 1: 1 / 4
    got[0, 2, 1, 1, 1] -= 0.5  # channel 2: 0.5 / 1
    assert per_channel_errors(got, expected) == [0.0, 0.25, 0.5]


def test_precision_rows_on_the_cpu(capsys):
    encoder = random_encoder(narrow(8), seed=31)
    rows = bench_precision(encoder, (16, 16), 5, 1, precisions=("float32", "tf32", "bfloat16"))
    by_name = {row["precision"]: row for row in rows}
    assert list(by_name) == ["float32", "tf32", "bfloat16"]
    assert by_name["tf32"]["status"].startswith("CUDA only")
    assert by_name["float32"]["error_vs_float32"] == 0.0
    low = by_name["bfloat16"]
    assert low["fps"] > 0 and 0 < low["error_vs_float32"] <= 5e-2
    assert len(low["error_per_channel"]) == 16
    assert max(low["error_per_channel"]) >= low["error_vs_float32"] * 0.999  # the worst channel
    assert low["error_per_channel"][low["worst_channel"]] == max(low["error_per_channel"])
    table = format_precision(rows)
    assert "bfloat16" in table and f"(z{low['worst_channel']})" in table
    assert "CUDA only" in table and "TF32 off" in table


def test_bench_precision_command_writes_json(tmp_path, capsys):
    out = tmp_path / "precision.json"
    args = ["bench", "--random-weights", "--config", "narrow8", "--device", "cpu"]
    args += ["--size", "16x16", "--frames", "5", "--repeats", "1"]
    assert main([*args, "--precision", "float32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["precision"] for row in report["precision"]] == ["float32"]
    assert "x float32" in capsys.readouterr().out
