"""Network sources on loopback: RTSP pushed by ffmpeg, MJPEG over HTTP served by ffmpeg.

Each stream plays for a couple of seconds, stops (the source sees the stream die), and a second
stream starts: the source reconnects, the frames after it are marked ``gap`` and the encoder
starts a new run, whose first latent says so.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import io_fixtures
from io_fixtures import Broker, StreamServer
from streamvae import StreamEncoder
from streamvae.io import Backoff, encode_to_sinks, open_source, read_latents

pytestmark = pytest.mark.network

stream_server = io_fixtures.stream_server  # fixtures
broker = io_fixtures.broker
one_torch_thread = io_fixtures.one_torch_thread


class CollectingSink:
    def __init__(self) -> None:
        self.latents = []

    async def send(self, latent) -> None:
        self.latents.append(latent)


@pytest.mark.parametrize("stream_server", ["rtsp", "mjpeg"], indirect=True)
async def test_stream_dies_and_comes_back(
    stream_server: StreamServer, narrow_encoder, one_torch_thread
):
    listen = {"rtsp_flags": "listen", "listen_timeout": "10"}
    options = listen if stream_server.kind == "rtsp" else {}
    source = open_source(
        stream_server.url,
        size="32x32",
        ffmpeg_options=options,
        open_timeout=15,
        read_timeout=3,
        backoff=Backoff(initial=0.1, maximum=0.5),
    )
    assert source.kind == "network" and source.live and source.reconnect
    threads_before = set(threading.enumerate())
    sink = CollectingSink()
    stream_server.serve(2.0)
    stream_server.serve(6.0)  # after the first has ended; stopped once latents came of it

    async def stop_when_done() -> None:
        for _ in range(600):
            if any(latent.gap for latent in sink.latents) and sink.latents[-1].index >= 2:
                break
            await asyncio.sleep(0.05)
        source.stop()

    delivered = []

    async def recorded():
        async for frame in source:
            delivered.append((frame.run, frame.number))
            yield frame

    async with source:
        stopper = asyncio.ensure_future(stop_when_done())
        stats = await encode_to_sinks(recorded(), StreamEncoder(narrow_encoder), [sink])
        await stopper
    stream_server.close()
    assert source.stats.disconnects >= 1 and source.stats.reconnects >= 1, source.stats
    assert stream_server.sessions >= 1 and source.stats.disconnects == 1
    gap_latents = [latent for latent in sink.latents if latent.gap]
    assert len(gap_latents) == 1 and gap_latents[0].index == 0
    assert sink.latents[0].index == 0 and sink.latents[-1].index >= 2
    assert all(latent.data.shape == (16, 4, 4) for latent in sink.latents)
    assert stats.frames == source.stats.frames_delivered
    # Drops are of whole groups (frame 0 alone, then 1-4, 5-8, ...), never inside one.
    for run in (0, 1):
        numbers = [number for r, number in delivered if r == run]
        assert numbers[0] == 0
        missing = sorted(set(range(numbers[-1])) - set(numbers))
        assert len(missing) % 4 == 0
        assert all(
            missing[i] % 4 == 1 and missing[i + 3] == missing[i] + 3
            for i in range(0, len(missing), 4)
        )
    # The reader thread is gone once the source is closed.
    assert not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    print(
        f"{stream_server.kind}: {stats.frames} frames, {len(sink.latents)} latents, "
        f"{source.stats.dropped_frames} dropped, {source.stats.reconnects} reconnect(s)"
    )


README = io_fixtures.REPO / "README.md"


def readme_listen_command() -> list[str]:
    """The README's documented RTSP-push command, as written (``streamvae live rtsp://... --ffmpeg-option
    rtsp_flags=listen ...``)."""
    for line in README.read_text().splitlines():
        if line.startswith("streamvae live rtsp://") and "rtsp_flags=listen" in line:
            return shlex.split(line.split("#")[0])
    pytest.fail("the README documents no `streamvae live rtsp://... rtsp_flags=listen` command")


def test_the_readmes_rtsp_push_command_receives_a_push(tmp_path: Path):
    """Issue 23: the documented form failed (FFmpeg refused its default listen_timeout) and the
    tests always added one. This runs the README's command as written, on a free port, with an
    ffmpeg pushing to it; only the port and the output path change, and --frames ends it."""
    args = readme_listen_command()
    url = next(a for a in args if a.startswith("rtsp://"))
    assert "listen_timeout" not in " ".join(args)
    port = io_fixtures.free_port()
    parts = urlsplit(url)
    server = StreamServer("rtsp", port, path=parts.path.strip("/"))
    args[args.index(url)] = f"rtsp://{parts.hostname}:{port}{parts.path}"
    output = tmp_path / "pushed.latents"
    if "-o" in args:
        args[args.index("-o") + 1] = str(output)
    else:
        args += ["-o", str(output)]
    server.serve(8.0)
    try:
        result = subprocess.run(
            io_fixtures.streamvae_command(*args[1:], "--frames", "9", "--json"),
            capture_output=True, text=True, timeout=120, env=io_fixtures.cli_env(),
            cwd=tmp_path, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 9 and summary["latents"] >= 3, summary
    assert len(read_latents(output)) == summary["latents"]


def test_the_rtsp_example_listens_for_a_push(broker: Broker):
    """Issue 23: ``examples/rtsp_to_mqtt.py --listen`` receives a push and publishes it."""
    server = StreamServer("rtsp", io_fixtures.free_port(), path="cam")
    server.serve(8.0)
    try:
        result = subprocess.run(
            [sys.executable, str(io_fixtures.REPO / "examples" / "rtsp_to_mqtt.py"), server.url,
             "--listen", "--mqtt", broker.url, "--size", "32x32", "--frames", "9",
             "--random-weights", "--config", "narrow8", "--threads", "1"],
            capture_output=True, text=True, timeout=120, env=io_fixtures.cli_env(),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert "encoded 9 frames" in result.stdout, result.stdout
    published = re.search(r"mqtt: (\d+)/(\d+) published, 0 discarded", result.stdout)
    assert published and published[1] == published[2] and int(published[1]) >= 3, result.stdout
