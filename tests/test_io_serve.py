"""``streamvae serve`` as a user runs it: a real subprocess, a real mosquitto on loopback, a real
ffmpeg stream that dies and comes back."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest
from test_io_cli import cli_encoder, direct_latents

import io_fixtures
from helpers import rel_err
from io_fixtures import REPO, Broker, StreamServer, cli_env, read_video_frames, streamvae_command
from streamvae.io import MqttSettings, decode_latent, read_latents
from streamvae.io.serve import SourceSpec, read_sources
from streamvae.io.sources import synthetic_frame

broker = io_fixtures.broker  # fixtures
test_video = io_fixtures.test_video
stream_server = io_fixtures.stream_server
auth_broker = io_fixtures.auth_broker

NARROW = ("--random-weights", "--config", "narrow8")
_ = cli_encoder  # a fixture


class Subscriber:
    """Every latent on ``<prefix>/+/latents``, by stream, decoded with decode_latent."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.by_stream: dict[str, list] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        async with self.settings.client(identifier=f"serve-test-{id(self)}") as client:
            await client.subscribe(f"{self.settings.prefix}/+/latents", qos=1)
            self._ready.set()
            async for message in client.messages:
                latent = decode_latent(message.payload)
                self.by_stream.setdefault(latent.meta["stream"], []).append(latent)

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def until_received(self, counts: dict[str, int], timeout: float = 60) -> None:
        """Wait until ``counts[stream]`` latents of each stream have arrived (those still in
        flight when the publisher ended); the timeout only ends a hung test."""
        await io_fixtures.wait_until(
            lambda: all(len(self.by_stream.get(sid, [])) >= n for sid, n in counts.items()),
            timeout,
            f"the subscriber to receive {counts} (has "
            f"{ {sid: len(got) for sid, got in self.by_stream.items()} })",
        )

    async def until_published(self, summary: dict, timeout: float = 60) -> None:
        """Wait for every latent ``serve``'s summary says it published."""
        await self.until_received(
            {sid: entry["mqtt"]["published"] for sid, entry in summary["streams"].items()},
            timeout,
        )

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def statuses(settings: MqttSettings, streams: list[str]) -> dict[str, dict]:
    async with settings.client(identifier="serve-status") as client:
        await client.subscribe(f"{settings.prefix}/+/status", qos=1)
        found: dict[str, dict] = {}
        async with asyncio.timeout(10):
            async for message in client.messages:
                found[str(message.topic).split("/")[-2]] = json.loads(message.payload)
                if set(streams) <= set(found):
                    return found
    return found


async def serve_until(
    args: list[str], until, what: str, *, logged: tuple[str, ...] = ()
) -> tuple[int, dict, str]:
    """Run ``serve`` until ``until()`` holds and its stderr so far has each of ``logged``, then
    Ctrl-C it; its exit code, summary, stderr."""
    process = await asyncio.create_subprocess_exec(
        *streamvae_command("serve", *args, "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    err: list[bytes] = []

    async def read_stderr(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            err.append(line)

    reading = [
        asyncio.ensure_future(process.stdout.read()),
        asyncio.ensure_future(read_stderr(process.stderr)),
    ]

    def done() -> bool:
        text = b"".join(err).decode(errors="replace")
        return until() and all(part in text for part in logged)

    try:
        await io_fixtures.wait_until(done, 120, what + "".join(f", {x!r} logged" for x in logged))
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 60)
        stdout = (await asyncio.wait_for(asyncio.gather(*reading), 60))[0]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for task in reading:
            task.cancel()
    stderr = b"".join(err).decode(errors="replace")
    assert process.returncode == 0, stderr
    return process.returncode, json.loads(stdout.decode().strip().splitlines()[-1]), stderr


async def run_serve(*args: str, timeout: float = 180) -> tuple[int, dict, str]:
    process = await asyncio.create_subprocess_exec(
        *streamvae_command("serve", *args, "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=REPO,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    lines = stdout.decode().strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    return process.returncode, summary, stderr.decode()


@pytest.mark.network
async def test_serve_many_sources_to_mqtt_and_files(
    broker: Broker, test_video: Path, cli_encoder, tmp_path: Path
):
    config = tmp_path / "cameras.toml"
    config.write_text(
        f'mqtt = "{broker.url}"\n'
        'size = "32x32"\n'
        "[sources.syn-a]\n"
        'uri = "synthetic://moving?frames=9&size=32x32"\n'
        "[sources.syn-b]\n"
        'uri = "synthetic://moving?frames=13&size=16x32"\n'
        'size = "16x32"\n'
    )
    settings = MqttSettings.from_url(broker.url)
    async with Subscriber(settings) as subscriber:
        code, summary, stderr = await run_serve(
            str(config), "--source", f"clip={test_video}", "--output-dir", str(tmp_path / "out"),
            *NARROW,
        )  # fmt: skip
        assert code == 0, stderr
        await subscriber.until_published(summary)
    frames = {
        "syn-a": [synthetic_frame(n, 32, 32) for n in range(9)],
        "syn-b": [synthetic_frame(n, 16, 32) for n in range(13)],
        "clip": read_video_frames(test_video, (32, 32)),
    }
    for sid, clip in frames.items():
        expected = direct_latents(cli_encoder, clip)
        received = subscriber.by_stream[sid]
        assert [x.index for x in received] == list(range(expected.shape[1])), sid
        for latent in received:
            assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5, sid
            assert latent.meta["meaningless"] == "true"
        stored = read_latents(tmp_path / "out" / f"{sid}.latents")
        assert [x.index for x in stored] == [x.index for x in received]
        entry = summary["streams"][sid]
        assert entry["latents"] == len(received) == entry["mqtt"]["published"]
        assert entry["mqtt"]["sent"] == entry["mqtt"]["published"]
        assert entry["error"] is None
    assert summary["pool"]["mean_batch"] > 1  # the streams were stepped together
    status = await statuses(settings, list(frames))
    assert all(status[sid]["status"] == "offline" for sid in frames)


@pytest.mark.network
async def test_ctrl_c_drains_every_stream(broker: Broker):
    settings = MqttSettings.from_url(broker.url)
    async with Subscriber(settings) as subscriber:
        _, summary, text = await serve_until(
            [
                "--source", "north=synthetic://moving?fps=20",
                "--source", "south=synthetic://moving?fps=20", "--size", "16x16",
                "--mqtt", broker.url, *NARROW, "--stats-interval", "0.5",
            ],
            lambda: all(len(subscriber.by_stream.get(s, [])) >= 3 for s in ("north", "south")),
            "three latents on each stream",
            logged=("north: last ", "south: last "),  # a stats line of each
        )  # fmt: skip
        await subscriber.until_published(summary)
    assert "stopping" in text and "north: last " in text and "south: last " in text
    for sid in ("north", "south"):
        entry = summary["streams"][sid]
        received = subscriber.by_stream[sid]
        assert entry["latents"] == entry["mqtt"]["sent"] == entry["mqtt"]["published"]
        assert entry["latents"] == len(received)
        assert [x.index for x in received] == list(range(len(received)))
        assert entry["mqtt"]["unsent"] == entry["mqtt"]["discarded"] == 0
    status = await statuses(settings, ["north", "south"])
    assert status["north"]["status"] == status["south"]["status"] == "offline"


@pytest.mark.network
@pytest.mark.parametrize("stream_server", ["mjpeg"], indirect=True)
async def test_a_failing_source_reconnects_and_flags_a_gap_on_its_own_stream(
    broker: Broker, stream_server: StreamServer
):
    settings = MqttSettings.from_url(broker.url)
    stream_server.serve(2.0)
    stream_server.serve(8.0)  # after the first has ended: the source reconnects to it
    async with Subscriber(settings) as subscriber:
        _, summary, _ = await serve_until(
            [
                "--source", f"cam={stream_server.url}",
                "--source", "steady=synthetic://moving?fps=15", "--size", "16x16",
                "--mqtt", broker.url, *NARROW, "--stats-interval", "1",
            ],
            lambda: (
                any(x.gap for x in subscriber.by_stream.get("cam", []))
                and subscriber.by_stream["cam"][-1].index >= 1
            ),
            "a gap latent on cam and one after it",
        )  # fmt: skip
        await subscriber.until_published(summary)
    cam, steady = subscriber.by_stream["cam"], subscriber.by_stream["steady"]
    gaps = [x for x in cam if x.gap]
    assert len(gaps) == 1 and gaps[0].index == 0
    assert summary["streams"]["cam"]["source"]["reconnects"] >= 1
    assert summary["streams"]["cam"]["gaps"] == 1
    # The other stream ran on, untouched: no gap, indices unbroken.
    assert not any(x.gap for x in steady)
    assert [x.index for x in steady] == list(range(len(steady)))
    assert summary["streams"]["steady"]["source"]["disconnects"] == 0


def test_sources_from_toml_and_flags(tmp_path: Path):
    config = tmp_path / "s.toml"
    config.write_text(
        'size = "64x64"\n[sources.a]\nuri = "0"\n[sources.b]\nuri = "x.mp4"\nsize = "32x32"\n'
    )
    specs, defaults = read_sources(config, ["c=rtsp://h/s"])
    assert specs == [
        SourceSpec("a", "0"),
        SourceSpec("b", "x.mp4", "32x32"),
        SourceSpec("c", "rtsp://h/s"),
    ]
    assert defaults == {"size": "64x64"}
    with pytest.raises(ValueError, match="'a' is given twice"):
        read_sources(config, ["a=1"])
    with pytest.raises(ValueError, match="ID=URI"):
        read_sources(None, ["nouri"])
    with pytest.raises(ValueError, match="stream id must be"):
        read_sources(None, ["a/b=0"])
    config.write_text('[sources.a]\nurl = "0"\n')
    with pytest.raises(ValueError, match=r"\[sources.a\] needs uri"):
        read_sources(config, [])
    config.write_text('mqt = "x"\n')
    with pytest.raises(ValueError, match="unknown keys"):
        read_sources(config, [])
    with pytest.raises(ValueError, match="give sources"):
        read_sources(None, [])


def test_serve_refuses_bad_arguments_clearly():
    result = subprocess.run(
        streamvae_command("serve", "--source", "a=synthetic://moving", *NARROW),
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "give --mqtt URL and/or --output-dir DIR" in result.stderr


@pytest.mark.network
async def test_latents_not_delivered_make_serve_fail(auth_broker: Broker, tmp_path: Path):
    """Issue 17 item 3 for serve: with the wrong password nothing reaches the broker, and serve
    says so per stream and exits 1 (it would report success)."""
    wrong = tmp_path / "password"
    wrong.write_text("wrong-" + io_fixtures.MQTT_PASSWORD + "\n")
    url = f"mqtts://{io_fixtures.MQTT_USER}@127.0.0.1:{auth_broker.port}/test"
    code, summary, stderr = await run_serve(
        "--source", "a=synthetic://moving?frames=5",
        "--source", "b=synthetic://moving?frames=5",
        "--mqtt", url, "--mqtt-ca-file", str(auth_broker.tls[0]),
        "--mqtt-password-file", str(wrong), "--drain-timeout", "1",
        "--size", "16x16", *NARROW,
    )  # fmt: skip
    assert code == 1, stderr
    for sid in ("a", "b"):
        entry = summary["streams"][sid]
        assert entry["mqtt"]["published"] == 0 and entry["mqtt"]["undelivered"] == 2
        assert entry["error"].startswith("2 of 2 latent(s) not delivered to MQTT")
    assert "wrong-" not in stderr


async def test_one_bad_source_ends_alone_and_serve_says_which(tmp_path: Path, cli_encoder):
    """Issue 21 item 8: a source whose frames the pool refuses (40x36: not multiples of 8)
    ended every stream: exit 1, no summary, empty files for all. Now it ends alone: the others
    are encoded whole, the summary names the failure, the exit status is 1."""
    bad = io_fixtures.make_video(tmp_path / "bad.avi", frames=10, size="40x36")
    out = tmp_path / "out"
    code, summary, stderr = await run_serve(
        "--source", "good=synthetic://moving?frames=41&size=32x32", "--source", f"bad={bad}",
        "--output-dir", str(out), *NARROW, "--stats-interval", "0",
    )  # fmt: skip
    assert code == 1, stderr
    assert "Traceback" not in stderr
    streams = summary["streams"]
    assert streams["good"]["error"] is None and streams["good"]["latents"] == 11
    assert "FrameError" in streams["bad"]["error"] and "36x40" in streams["bad"]["error"]
    expected = direct_latents(cli_encoder, [synthetic_frame(n, 32, 32) for n in range(41)])
    stored = read_latents(out / "good.latents")
    assert [x.index for x in stored] == list(range(11))
    for latent in stored:
        assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5
    assert not (out / "bad.latents").exists()  # it failed before any latent: no empty file


async def test_serve_warms_up_before_going_live_and_encodes_as_cold(tmp_path: Path, cli_encoder):
    """Issue 25 item 5: ``--warmup on`` runs the streams' first steps (two streams of one size:
    one batch) before the pool goes live; the latents are a cold run's."""
    out = tmp_path / "out"
    code, summary, stderr = await run_serve(
        "--source", "a=synthetic://moving?frames=9", "--source", "b=synthetic://moving?frames=9",
        "--size", "32x32", "--output-dir", str(out), "--warmup", "on", *NARROW,
        "--stats-interval", "0",
    )  # fmt: skip
    assert code == 0, stderr
    assert "streamvae: warmed up 32x32 for 2 stream(s)" in stderr
    assert summary["streams"]["a"]["latents"] == 3
    expected = direct_latents(cli_encoder, [synthetic_frame(n, 32, 32) for n in range(9)])
    for sid in "ab":
        stored = read_latents(out / f"{sid}.latents")
        assert [x.index for x in stored] == [0, 1, 2]
        for latent in stored:
            assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5
