"""The examples run as written (with the narrow random model and a file standing in for a camera)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import io_fixtures
from io_fixtures import REPO, Broker, cli_env, stop_process

broker = io_fixtures.broker  # fixtures
test_video = io_fixtures.test_video

EXAMPLES = REPO / "examples"
NARROW = ["--random-weights", "--config", "narrow8", "--threads", "1"]


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO,
    )  # fmt: skip


def test_encode_file_example(tmp_path: Path, test_video: Path):
    output = tmp_path / "clip.latents"
    result = run_example("encode_file.py", str(test_video), str(output), "--size", "32x32", *NARROW)
    assert result.returncode == 0, result.stderr
    assert f"{output}: 6 latents of shape (16, 4, 4) (meaningless: random weights)" in result.stdout
    assert "encoded 21 frames -> 6 latents" in result.stdout  # a sentence, not a dict's repr
    # The file says what the CLI's outputs say: random weights make meaningless latents.
    from streamvae.io import read_latents

    assert {latent.meta.get("meaningless") for latent in read_latents(output)} == {"true"}


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_use_the_public_api_only(example: str):
    tree = ast.parse((EXAMPLES / example).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    used = {
        f"streamvae.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "streamvae"
    }
    ours = {name for name in imported if name.split(".")[0] == "streamvae"}
    assert ours <= {"streamvae", "streamvae.io"}, f"{example} imports {sorted(ours)}"
    import streamvae

    assert all(name.split(".")[1] in streamvae.__all__ for name in used), sorted(used)


@pytest.mark.network
def test_webcam_to_mqtt_and_subscriber_examples(broker: Broker, test_video: Path):
    subscriber = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "mqtt_subscriber.py"), "--mqtt", broker.url, "--count", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert subscriber.stdout.readline().strip() == "subscribed"
        publisher = run_example(
            "webcam_to_mqtt.py", "--camera", str(test_video), "--mqtt", broker.url,
            "--stream-id", "desk", "--size", "32x32", "--frames", "13", *NARROW,
        )  # fmt: skip
        assert publisher.returncode == 0, publisher.stderr
        # 13 frames make 4 latents in one run; a file read as a webcam may also drop groups when
        # the encoder falls behind and, at its end, reopen (a new run: one more latent), so a
        # loaded machine can give more. Every latent sent must be published, none discarded.
        published = re.search(r"mqtt: (\d+)/(\d+) published, 0 discarded", publisher.stdout)
        assert published, publisher.stdout
        assert published[1] == published[2] and int(published[1]) >= 4, publisher.stdout
        out, err = subscriber.communicate(timeout=30)
    finally:
        stop_process(subscriber)
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("desk #0 frames 0-0 (16, 4, 4)"), err
    assert "(meaningless)" in lines[0]


@pytest.mark.network
@pytest.mark.slow  # 18 s on the loaded 2-core box (live, the example and mosquitto in one run)
def test_mqtt_decode_example_decodes_what_live_publishes(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """examples/mqtt_decode.py (in a thread of this process: no interpreter to start) against a
    real mosquitto, fed by ``streamvae live``: its PNGs are StreamDecoder's frames of the latents
    live wrote to its file, bit for bit."""
    import asyncio
    import runpy
    import threading
    import time

    import numpy as np
    from PIL import Image

    from streamvae import StreamDecoder, narrow, random_decoder, read_latents
    from streamvae.cli import main as streamvae_main

    example = runpy.run_path(str(EXAMPLES / "mqtt_decode.py"))  # not as __main__: nothing runs
    frames_dir, latents = tmp_path / "frames", tmp_path / "cam.latents"
    failures: list[BaseException] = []

    def subscribe() -> None:
        try:
            asyncio.run(example["main"](
                ["--mqtt", broker.url, "--count", "3", "--output", str(frames_dir), *NARROW]
            ))  # fmt: skip
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    thread = threading.Thread(target=subscribe, daemon=True)
    thread.start()
    printed = ""
    deadline = time.monotonic() + 60
    while "subscribed" not in printed and thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.05)  # bounded wait for the example's own "subscribed" line
        printed += capsys.readouterr().out
    assert "subscribed" in printed, (printed, failures)
    status = streamvae_main([
        "live", "synthetic://moving?frames=9&size=32x48", "--mqtt", broker.url,
        "--stream-id", "cam", "-o", str(latents), "--stats-interval", "0", *NARROW,
    ])  # fmt: skip
    assert status == 0
    thread.join(120)
    assert not thread.is_alive() and not failures, failures
    printed += capsys.readouterr().out
    assert "decoder: RANDOM WEIGHTS narrow8" in printed or "RANDOM WEIGHTS" in printed
    assert "cam #0 -> frames 0-0 (32x48)" in printed and "cam #2 -> frames 5-8" in printed
    assert "cam: 3 latents -> 9 frames" in printed and "0 latent(s) missed" in printed
    expected = StreamDecoder(random_decoder(narrow(8), seed=0)).push_many(read_latents(latents))
    written = sorted((frames_dir / "cam").glob("frame_*.png"))
    assert len(written) == len(expected) == 9
    for path, frame in zip(written, expected):
        assert np.array_equal(np.asarray(Image.open(path)), frame.to_rgb()), path


def test_rtsp_example_help():
    result = run_example("rtsp_to_mqtt.py", "--help")
    assert result.returncode == 0 and "rtsp://" in result.stdout


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_help_with_its_defaults(example: str):
    result = run_example(example, "--help")
    assert result.returncode == 0, result.stderr
    assert "(default: float32)" in result.stdout or "(default: mqtt://" in result.stdout
    assert "``" not in result.stdout
