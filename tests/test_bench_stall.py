"""``streamvae bench --warmup-stall``: a live stream's latency while another stream starts, on
the CPU at a tiny size (the figure that matters is the GPU's: gpu_check.sh runs it there)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from helpers import random_encoder
from streamvae import narrow
from streamvae.bench.stall import _Paced, _push_paced, bench_warmup_stall, format_stall
from streamvae.cli import main


class _SlowStream:
    """A stand-in for the live stream whose every fourth push takes ``work`` seconds and
    returns a latent: what the latency measure must see when the encoder falls behind."""

    def __init__(self, work: float) -> None:
        self.work = work
        self.pushed = 0

    def push(self, frame: np.ndarray) -> list[int]:
        self.pushed += 1
        if self.pushed % 4:
            return []
        time.sleep(self.work)
        return [self.pushed]


def test_latency_counts_from_the_due_time_so_a_backlog_shows():
    """Pushes that overrun the frame interval make the next frames late: each latent's latency
    runs from its last frame's due time, so it grows with the backlog instead of staying at
    one push's own time."""
    record = _Paced()
    fps = 200.0  # 5 ms a frame; each fourth push takes 40 ms
    pushed = _push_paced(_SlowStream(0.04), [np.zeros(1)] * 16, fps, record)  # type: ignore[arg-type]
    assert pushed == 16 and len(record.latency) == 4
    # Latent k's last frame is due at (4k + 3) / fps; pushes before it wait behind k earlier
    # 40 ms pushes: the latency grows by about 40 - 4 * 5 = 20 ms a latent.
    assert record.latency[-1] > record.latency[0] + 0.04
    assert all(b > a for a, b in zip(record.latency, record.latency[1:], strict=False))


def test_rows_on_the_cpu_overlap_the_joining_stream():
    encoder = random_encoder(narrow(8), seed=5)
    rows = bench_warmup_stall(encoder, (16, 16), 60.0, 21)
    by_join = {row.join: row for row in rows}
    assert list(by_join) == ["alone", "warmed", "cold"]
    alone = by_join["alone"]
    assert alone.live_frames == 21 and alone.live_ms["n"] == 6  # latent 0, then one per 4
    assert alone.stall_ms is not None and alone.stall_ms >= 0  # the noise floor
    for join in ("warmed", "cold"):
        row = by_join[join]
        # The live stream ran for as long as the other stream did, and some of its latents
        # were in flight while the other started: the measure saw the overlap.
        assert row.live_frames >= 21
        assert row.during_join_ms["n"] >= 1
        assert row.join_first_latent_ms is not None and row.join_start_ms is not None
        assert row.stall_ms is not None and row.stall_ms >= 0
        assert row.within_one_frame in (True, False)
    assert by_join["warmed"].join_warmup_ms is not None and by_join["cold"].join_warmup_ms is None
    table = format_stall(rows)
    assert "| none (alone) |" in table and "| warmed |" in table and "| cold |" in table


def test_warmup_stall_refuses_a_rate_or_a_join_it_does_not_know():
    encoder = random_encoder(narrow(8), seed=5)
    with pytest.raises(ValueError, match="fps must be > 0"):
        bench_warmup_stall(encoder, (16, 16), 0.0, 9)
    with pytest.raises(ValueError, match="choose from alone, warmed, cold"):
        bench_warmup_stall(encoder, (16, 16), 30.0, 9, joins=("hot",))


def test_bench_warmup_stall_command_writes_json(tmp_path, capsys):
    out = tmp_path / "stall.json"
    args = ["bench", "--random-weights", "--config", "narrow8", "--device", "cpu"]
    args += ["--size", "16x16", "--live-frames", "9"]
    assert main([*args, "--warmup-stall", "60", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["join"] for row in report["warmup_stall"]] == ["alone", "warmed", "cold"]
    assert all(row["fps"] == 60.0 for row in report["warmup_stall"])
    assert "within one frame" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--warmup-stall", "0"])
    assert stopped.value.code == 2
    assert "--warmup-stall 0: frames/s > 0" in capsys.readouterr().err
