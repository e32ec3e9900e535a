"""``streamvae bench --decode`` (streamvae.bench.decode): what it measures, on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamvae import WAN22, narrow, random_decoder
from streamvae.bench.decode import decode_bench, format_decode_report


def test_report_holds_every_decoder_and_their_errors():
    report = decode_bench(
        random_decoder(narrow(8), seed=1), (2, 2), 3, repeats=1, memory_latents=(3, 6)
    )
    results = report["results"]
    assert set(results) == {
        "streamvae",
        "streamvae_batch",
        "diffusers",
        "diffusers_per_latent",
        "official_wan",
        "streamdiffusionv2",
    }
    assert report["frames"] == 9 and report["size"] == "16x16"
    for name, entry in results.items():
        assert entry["error"] <= 1e-5, (name, entry)  # the same frames, float32
        assert entry["frames_per_s"] > 0
    ours = results["streamvae"]
    assert set(ours["first_frame_ms"]) == {"latent0", "steady"}
    assert 0 < ours["first_of_last_share"] <= 1
    # StreamDiffusionV2's stream_decode: its first call holds latents 0 and 1, then one a call.
    assert set(results["streamdiffusionv2"]["first_frame_ms"]) == {"latent0", "steady"}
    assert 0 < report["bf16_error"] < 0.2  # bfloat16 rounding, not another decode
    memory = report["memory_vs_length"]
    assert memory["latents"] == [1, 3, 6] and len(memory["rss_mb"]) == 3
    assert memory["size"] == "8x8" and memory["state_mb"] > 0
    text = format_decode_report(report)
    assert "| streamvae |" in text and "vs diffusers:" in text
    assert "of the time of streamdiffusionv2's call" in text
    assert "memory against stream length (8x8, RSS after n latents): 1:" in text


def test_wan22_and_no_peers():
    report = decode_bench(
        random_decoder(narrow(4, WAN22), seed=2), (1, 1), 2, repeats=1, peers=False, bf16=False
    )
    assert set(report["results"]) == {"streamvae", "streamvae_batch"}
    assert "bf16_error" not in report and "memory_vs_length" not in report
    assert report["results"]["streamvae_batch"]["error"] <= 1e-5


def test_command_line(tmp_path):
    out = tmp_path / "decode.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "streamvae.cli", "bench", "--decode", "--random-weights",
            "--config", "narrow8", "--device", "cpu", "--size", "16x16", "--frames", "5",
            "--repeats", "1", "--no-peers", "--memory-latents", "2", "--json", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| streamvae |" in result.stdout
    written = json.loads(out.read_text())
    assert written["latents"] == 2 and written["memory_vs_length"]["latents"] == [1, 2]
    bad = subprocess.run(
        [sys.executable, "-m", "streamvae.cli", "bench", "--decode", "--random-weights",
         "--config", "narrow8", "--device", "cpu", "--frames", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "at least 5" in bad.stderr


def test_stream_diffusion_v2_is_not_a_wan22_peer():
    from streamvae.bench.peers import PeerUnavailable, StreamDiffusionV2Decoder

    with pytest.raises(PeerUnavailable, match=r"StreamDiffusionV2's VAE is Wan 2\.1's"):
        StreamDiffusionV2Decoder(random_decoder(narrow(4, WAN22)))
