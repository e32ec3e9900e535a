"""``streamvae bench --decode`` (streamvae.bench.decode): what it measures, on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

from streamvae import WAN22, narrow, random_decoder
from streamvae.bench.decode import decode_bench, format_decode_report


def test_report_holds_every_decoder_and_their_errors():
    report = decode_bench(random_decoder(narrow(8), seed=1), (2, 2), 3, repeats=1)
    results = report["results"]
    assert set(results) == {
        "streamvae",
        "streamvae_batch",
        "diffusers",
        "diffusers_per_latent",
        "official_wan",
    }
    assert report["frames"] == 9 and report["size"] == "16x16"
    for name, entry in results.items():
        assert entry["error"] <= 1e-5, (name, entry)  # the same frames, float32
        assert entry["frames_per_s"] > 0
    ours = results["streamvae"]
    assert set(ours["first_frame_ms"]) == {"latent0", "steady"}
    assert 0 < ours["first_of_last_share"] <= 1
    text = format_decode_report(report)
    assert "| streamvae |" in text and "vs diffusers:" in text


def test_wan22_and_no_peers():
    report = decode_bench(
        random_decoder(narrow(4, WAN22), seed=2), (1, 1), 2, repeats=1, peers=False
    )
    assert set(report["results"]) == {"streamvae", "streamvae_batch"}
    assert report["results"]["streamvae_batch"]["error"] <= 1e-5


def test_command_line(tmp_path):
    out = tmp_path / "decode.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "streamvae.cli", "bench", "--decode", "--random-weights",
            "--config", "narrow8", "--device", "cpu", "--size", "16x16", "--frames", "5",
            "--repeats", "1", "--no-peers", "--json", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| streamvae |" in result.stdout
    assert json.loads(out.read_text())["latents"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "streamvae.cli", "bench", "--decode", "--random-weights",
         "--config", "narrow8", "--device", "cpu", "--frames", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "at least 5" in bad.stderr
