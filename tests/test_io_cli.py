"""``streamvae encode`` and ``streamvae live`` as a user runs them: subprocesses, real broker."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import io_fixtures
from helpers import MEGAMIND, rel_err, shared_file
from io_fixtures import (
    MQTT_PASSWORD,
    MQTT_USER,
    REPO,
    Broker,
    cli_env,
    read_video_frames,
    stop_process,
    streamvae_command,
    wait_until,
)
from streamvae import WAN22, narrow
from streamvae.io import MqttSettings, decode_latent, read_latents
from streamvae.io.mqtt import latent_topic, status_topic
from streamvae.io.sources import synthetic_frame
from streamvae.weights import random_encoder

broker = io_fixtures.broker  # fixtures
auth_broker = io_fixtures.auth_broker
test_video = io_fixtures.test_video

NARROW = ("--random-weights", "--config", "narrow8")


@pytest.fixture(scope="module")
def cli_encoder():
    """The encoder ``--random-weights --config narrow8`` builds (seed 0)."""
    return random_encoder(narrow(8), seed=0)


def direct_latents(encoder, frames: list[np.ndarray]) -> torch.Tensor:
    """``[16, T', h, w]``: the batch encode of the same frames (the oracle for the CLI)."""
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    return encoder.encode(video)[0]


def run_cli(
    *args: str, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        streamvae_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_encode_a_file_equals_the_batch_encode(tmp_path: Path, test_video: Path, cli_encoder):
    output = tmp_path / "clip.latents"
    result = run_cli(
        "encode", str(test_video), "-o", str(output), "--size", "32x32", *NARROW, "--json"
    )
    summary = summary_of(result)
    assert (summary["frames"], summary["latents"], summary["dropped_by_encoder"]) == (21, 6, 0)
    assert summary["meaningless"] is True and set(summary["latency_ms"]) == {
        "p50",
        "p90",
        "p99",
        "max",
    }
    assert "RANDOM WEIGHTS" in result.stderr
    latents = read_latents(output)
    expected = direct_latents(cli_encoder, read_video_frames(test_video, (32, 32)))
    assert [latent.index for latent in latents] == list(range(6))
    for latent in latents:
        assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5
        assert latent.meta["meaningless"] == "true" and latent.meta["config"] == "wan2.1-narrow8"
        assert latent.meta["normalization"] == "wan2.1"


@pytest.mark.parametrize(
    "config, seconds",
    [("wan2.2-narrow8", 120), pytest.param("wan2.2", 300, marks=pytest.mark.slow)],
)
def test_encode_wan22_equals_the_batch_encode(tmp_path: Path, test_video: Path, config, seconds):
    """``--config wan2.2``: 48-channel latents at 1/16 of the frame, labelled with the model."""
    output = tmp_path / "clip.latents"
    frames = "9" if config == "wan2.2" else "21"
    result = run_cli(
        "encode", str(test_video), "-o", str(output), "--size", "32x48", "--random-weights",
        "--config", config, "--frames", frames, "--json", timeout=seconds,
    )  # fmt: skip
    summary = summary_of(result)
    latents = read_latents(output)
    assert summary["latents"] == len(latents) == 1 + (int(frames) - 1) // 4
    family = WAN22 if config == "wan2.2" else narrow(8, WAN22)
    encoder = random_encoder(family, seed=0)
    video = read_video_frames(test_video, (32, 48))[: int(frames)]
    expected = direct_latents(encoder, video)
    for latent in latents:
        assert latent.data.shape == (48, 2, 3)
        assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5
        assert latent.meta["config"] == config and latent.meta["z_dim"] == "48"
        assert latent.meta["normalization"] == "wan2.2" and latent.meta["stride"] == "4x16x16"


def test_a_size_the_model_cannot_take_is_refused_with_its_rule(tmp_path: Path):
    model = ("--random-weights", "--config", "wan2.2-narrow8", "-o", str(tmp_path / "x.latents"))
    given = run_cli("encode", "synthetic://moving?frames=5", "--size", "40x64", *model)
    assert given.returncode != 0
    assert "--size 40x64" in given.stderr and "multiples of 16" in given.stderr
    assert "nearest size is 32x64" in given.stderr
    native = run_cli("encode", "synthetic://moving?frames=5&size=40x64", *model)
    assert native.returncode != 0 and "Traceback" not in native.stderr
    assert "got 40x64 frames" in native.stderr and "multiples of 16" in native.stderr


def test_readme_first_command_is_true(tmp_path: Path):
    """The README's first command, as written (the narrow network at 64x64, 33 frames): it says
    what ran, the encoder's own latency and the queue's share, and how long it all took."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)\n```", readme, re.S)[1]
    command = block.split("&&", 1)[1].strip()
    args = shlex.split(command)
    assert args[:2] == ["streamvae", "encode"]
    output = Path(args[args.index("-o") + 1])
    args[args.index("-o") + 1] = str(tmp_path / output.name)
    result = run_cli(*args[1:], "--json", timeout=300)
    summary = summary_of(result)
    assert (summary["frames"], summary["latents"]) == (33, 9)
    assert len(summary["encoder_latency_ms"]) == len(summary["queue_wait_ms"]) == 4
    assert summary["command_seconds"] > 0
    latents = read_latents(tmp_path / output.name)
    assert len(latents) == 9 and latents[0].data.shape == (16, 8, 8)
    text = run_cli(*args[1:], "--quiet", timeout=300)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "; the whole command took " in lines[0]
    assert "narrow" in lines[1] and "not the real model's speed" in lines[1]
    assert lines[2].startswith("encoder latency p50 ") and "(push of a latent's last" in lines[2]
    assert lines[3].startswith("read-ahead queue p50 ") and "mostly queueing" in lines[3]


def test_encode_of_a_camera_that_does_not_exist_fails_fast(tmp_path: Path):
    """Issue 23: ``encode 3`` without /dev/video3 hung behind OpenCV's warnings; a finite job
    now gives up after a few failed opens, with the reason, status 1 and no output."""
    if not Path("/dev").is_dir() or sys.platform != "linux":
        pytest.skip("the device check is Linux's /dev/videoN")
    index = next(n for n in range(90, 200) if not Path(f"/dev/video{n}").exists())
    output = tmp_path / "camera.latents"
    result = run_cli("encode", str(index), "-o", str(output), *NARROW, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"no camera at /dev/video{index}" in result.stderr
    assert "Traceback" not in result.stderr and not output.exists()


def test_a_mistyped_scheme_is_refused_as_typed_with_a_hint(tmp_path: Path):
    output = tmp_path / "x.latents"
    result = run_cli("encode", "rstp://127.0.0.1:8554/x", "-o", str(output), *NARROW)
    assert result.returncode == 2, result.stderr
    assert "'rstp://127.0.0.1:8554/x'" in result.stderr and "did you mean rtsp://?" in result.stderr
    assert not output.exists()


async def test_live_stopped_before_its_camera_opened_leaves_no_file(tmp_path: Path):
    """Issue 23: Ctrl-C before the camera ever opened left an empty .latents file."""
    if not Path("/dev").is_dir() or sys.platform != "linux":
        pytest.skip("the device check is Linux's /dev/videoN")
    index = next(n for n in range(90, 200) if not Path(f"/dev/video{n}").exists())
    output = tmp_path / "camera.latents"
    process = await asyncio.create_subprocess_exec(
        *streamvae_command("live", str(index), "-o", str(output), *NARROW, "--stats-interval", "0.2"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(), cwd=REPO,
    )  # fmt: skip
    try:
        seen = b""
        while b"source not open yet" not in seen:
            line = await asyncio.wait_for(process.stderr.readline(), 60)
            assert line, seen.decode()
            seen += line
        assert b"no camera at" in seen
        process.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not output.exists()
    assert "removed" in out.decode() and "the source never opened" in out.decode()


def test_without_weights_the_cli_says_how_to_get_them(tmp_path: Path):
    result = run_cli("encode", "synthetic://moving?frames=5", "-o", str(tmp_path / "x.latents"))
    assert result.returncode != 0
    assert "--weights" in result.stderr and "--random-weights" in result.stderr
    result = run_cli("encode", "synthetic://moving", "-o", "x", "--size", "30x40", *NARROW)
    assert result.returncode != 0 and "multiples of 8" in result.stderr and "32x40" in result.stderr


def test_megamind_through_encode(tmp_path: Path, cli_encoder):
    """The real clip (720x528, 270 frames) at 64x96: 68 latents, the first equal to the batch.
    Found wherever the checkout is (``helpers.shared_file``); in CI, a missing clip fails."""
    clip = shared_file(MEGAMIND)
    output = tmp_path / "megamind.latents"
    result = run_cli(
        "encode",
        str(clip),
        "-o",
        str(output),
        "--size",
        "64x96",
        *NARROW,
        "--json",
        timeout=300,
    )
    summary = summary_of(result)
    assert (summary["frames"], summary["latents"], summary["dropped_by_encoder"]) == (270, 68, 1)
    latents = read_latents(output)
    assert [x.index for x in latents] == list(range(68)) and latents[-1].frames == range(265, 269)
    expected = direct_latents(cli_encoder, read_video_frames(clip, (64, 96))[:9])
    for latent in latents[:3]:
        assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5
    print(f"Megamind: {summary['frames_per_second']} frames/s, latency {summary['latency_ms']}")


async def collect(settings: MqttSettings, topic: str, received: list, ready: asyncio.Event) -> None:
    """An independent subscriber: plain aiomqtt and decode_latent."""
    async with settings.client(identifier=f"cli-test-{time.monotonic_ns()}") as client:
        await client.subscribe(topic, qos=1)
        ready.set()
        async for message in client.messages:
            received.append((decode_latent(message.payload), time.time()))


async def start_subscriber(settings: MqttSettings, topic: str) -> tuple[asyncio.Task, list]:
    received: list = []
    ready = asyncio.Event()
    task = asyncio.ensure_future(collect(settings, topic, received, ready))
    await asyncio.wait_for(ready.wait(), 10)
    return task, received


async def stop_task(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def retained_status(settings: MqttSettings, stream: str) -> dict:
    async with settings.client(identifier=f"status-{time.monotonic_ns()}") as client:
        await client.subscribe(status_topic(settings.prefix, stream), qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(client.messages))
    return json.loads(message.payload)


@pytest.mark.network
async def test_live_file_to_mqtt_equals_the_batch_encode(
    broker: Broker, test_video: Path, cli_encoder, tmp_path: Path
):
    settings = MqttSettings.from_url(broker.url)
    task, received = await start_subscriber(settings, latent_topic("test", "clip"))
    try:
        process = await asyncio.create_subprocess_exec(
            *streamvae_command(
                "live", str(test_video), "--mqtt", broker.url, "--stream-id", "clip",
                "--size", "32x32", *NARROW, "-o", str(tmp_path / "also.latents"), "--json",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, stderr.decode()
        await wait_until(lambda: len(received) == 6, 10, "six latents")
    finally:
        await stop_task(task)
    summary = json.loads(stdout.decode().splitlines()[-1])
    assert summary["mqtt"]["published"] == summary["mqtt"]["sent"] == 6
    assert summary["mqtt"]["discarded"] == summary["mqtt"]["unsent"] == 0
    expected = direct_latents(cli_encoder, read_video_frames(test_video, (32, 32)))
    assert [latent.index for latent, _ in received] == list(range(6))
    for latent, _ in received:
        assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5
        assert latent.meta["stream"] == "clip" and latent.meta["meaningless"] == "true"
        assert latent.meta["config"] == "wan2.1-narrow8" and latent.meta["z_dim"] == "16"
    assert [x.index for x in read_latents(tmp_path / "also.latents")] == list(range(6))
    status = await retained_status(settings, "clip")
    assert status["status"] == "offline" and status["reason"] == "stopped"
    assert status["config"] == "wan2.1-narrow8" and status["z_dim"] == "16"
    delays = [arrived - latent.ready_time for latent, arrived in received]
    print(f"latent ready -> decoded by the subscriber: max {max(delays) * 1000:.2f} ms")


@pytest.mark.network
async def test_live_stops_cleanly_on_sigint(broker: Broker, cli_encoder):
    settings = MqttSettings.from_url(broker.url)
    task, received = await start_subscriber(settings, latent_topic("test", "syn"))
    process = await asyncio.create_subprocess_exec(
        *streamvae_command(
            "live", "synthetic://moving?fps=25", "--mqtt", broker.url, "--stream-id", "syn",
            "--size", "32x32", *NARROW, "--json", "--stats-interval", "0.5",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )  # fmt: skip
    try:
        await wait_until(lambda: len(received) >= 4, 60, "four latents")
        assert (await retained_status(settings, "syn"))["status"] == "online"
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.sleep(0.2)
        await stop_task(task)
    assert process.returncode == 0, stderr.decode()
    assert "stopping" in stderr.decode() and " frames/s, out " in stderr.decode()  # stats lines
    summary = json.loads(stdout.decode().splitlines()[-1])
    mqtt = summary["mqtt"]
    assert mqtt["published"] == mqtt["sent"] == summary["latents"] == len(received)
    assert mqtt["unsent"] == mqtt["discarded"] == 0
    assert [latent.index for latent, _ in received] == list(range(len(received)))
    # Issue 17: the frames to compare against were built and never compared. Up to the first
    # latent after a drop (dropped_before > 0), the latents equal the batch encode of the
    # pattern's frames 0..4k, which the source numbers name.
    intact = []
    for latent, _ in received:
        if latent.dropped_before:
            break
        intact.append(latent)
    assert intact and intact[0].source_frames == (0,)
    assert [x.source_frames for x in intact] == [tuple(x.frames) for x in intact]
    pattern = [synthetic_frame(n, 32, 32) for n in range(intact[-1].frames.stop)]
    expected = direct_latents(cli_encoder, pattern)
    for latent in intact:
        assert latent.data.shape == (16, 4, 4)
        assert rel_err(latent.data, expected[:, latent.index]) <= 1e-5
    print(f"{len(intact)} of {len(received)} latents before any drop, equal to the batch encode")
    status = await retained_status(settings, "syn")
    assert status == {
        "status": "offline",
        "reason": "stopped",
        "model": "RANDOM WEIGHTS wan2.1-narrow8 (latents are meaningless)",
        "config": "wan2.1-narrow8",
        "z_dim": "16",
        "meaningless": "true",
        "stream": "syn",
    }


@pytest.mark.network
async def test_a_killed_publisher_is_marked_offline_by_its_will(broker: Broker):
    settings = MqttSettings.from_url(broker.url)
    process = subprocess.Popen(
        streamvae_command(
            "live", "synthetic://moving?fps=10", "--mqtt", broker.url, "--stream-id", "doomed",
            "--size", "16x16", *NARROW, "--stats-interval", "0",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (await retained_status(settings, "doomed")).get("status") != "online":
            assert time.monotonic() < deadline and process.poll() is None
            await asyncio.sleep(0.2)
    except TimeoutError:
        pass
    finally:
        stop_process(process, sig=signal.SIGKILL)
    status = {}
    for _ in range(50):
        status = await retained_status(settings, "doomed")
        if status["status"] == "offline":
            break
        await asyncio.sleep(0.1)
    assert status["status"] == "offline" and status["reason"] == "connection lost"


@pytest.mark.network
async def test_password_stays_out_of_argv_logs_and_errors(auth_broker: Broker, tmp_path: Path):
    url = f"mqtts://{MQTT_USER}@127.0.0.1:{auth_broker.port}/test"
    cert = str(auth_broker.tls[0])
    args = streamvae_command(
        "live", "synthetic://moving?frames=9", "--mqtt", url, "--mqtt-ca-file", cert,
        "--stream-id", "secure", "--size", "16x16", *NARROW, "--json", "--verbose",
        "--drain-timeout", "3",
    )  # fmt: skip
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(STREAMVAE_MQTT_PASSWORD=MQTT_PASSWORD),
    )
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        stop_process(process)
    assert MQTT_PASSWORD.encode() not in cmdline
    assert process.returncode == 0, stderr
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["mqtt"]["published"] == 3
    assert MQTT_PASSWORD not in stdout + stderr
    # The wrong password, from a file: refused, reported, and not shown.
    wrong = tmp_path / "password"
    wrong.write_text("wrong-" + MQTT_PASSWORD + "\n")
    result = run_cli(
        *args[3:-2],  # the same command, without --threads 1 (added again by run_cli)
        "--mqtt-password-file", str(wrong),
        "--drain-timeout", "1",
    )  # fmt: skip
    # Issue 17 item 3: the stream ran but nothing was delivered: that is a failure (it was 0).
    assert result.returncode == 1
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["mqtt"]["published"] == 0 and summary["mqtt"]["unsent"] == 3
    assert summary["error"].startswith("3 of 3 latent(s) not delivered to MQTT")
    assert "Not authorized" in result.stderr
    assert "wrong-" not in result.stdout + result.stderr


def test_unreadable_tls_files_are_refused_before_streaming(tmp_path: Path):
    """Issue 17 item 3: a missing CA file ended the publisher silently and live exited 0."""
    missing = tmp_path / "no-such-ca.pem"
    result = run_cli(
        "live", "synthetic://moving?frames=5", "--mqtt", "mqtts://127.0.0.1:1/x",
        "--mqtt-ca-file", str(missing), "--size", "16x16", *NARROW,
    )  # fmt: skip
    assert result.returncode != 0
    assert "cannot load the MQTT CA file" in result.stderr and str(missing) in result.stderr
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    result = run_cli(
        "live", "synthetic://moving?frames=5", "--mqtt", "mqtts://127.0.0.1:1/x",
        "--mqtt-cert-file", str(bad), "--mqtt-key-file", str(bad), "--size", "16x16", *NARROW,
    )  # fmt: skip
    assert result.returncode != 0 and "client certificate" in result.stderr


def test_mqtt_url_with_a_password_is_refused_without_echo():
    result = run_cli(
        "live", "synthetic://moving", "--mqtt", "mqtt://u:topsecret@127.0.0.1/x", *NARROW
    )
    assert result.returncode != 0 and "refusing a password" in result.stderr
    assert "topsecret" not in result.stderr + result.stdout
    result = run_cli(
        "live", "synthetic://moving", "--mqtt", "mqtt://127.0.0.1/x", "--stream-id", "a/#", *NARROW
    )
    assert result.returncode != 0 and "stream id" in result.stderr


def test_progress_bar_on_a_terminal_and_on_a_pipe():
    from streamvae.io.commands import _ProgressBar
    from streamvae.io.pipeline import PipelineStats

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stats = PipelineStats(frames=135, latents=34)
    terminal = Terminal()
    bar = _ProgressBar(terminal, lambda: 270, enabled=True)
    bar.update(stats, force=True)
    bar.finish(stats)
    assert terminal.getvalue().startswith("\r[###############               ] 135/270 frames")
    assert terminal.getvalue().endswith("\n")
    pipe = io.StringIO()
    bar = _ProgressBar(pipe, lambda: None, enabled=True)
    bar.update(stats)  # too soon after the start for a pipe
    bar.update(stats, force=True)
    assert pipe.getvalue().startswith("135 frames") and "\r" not in pipe.getvalue()


# Every command that takes a video and writes an output, with {input} and {out} to fill in.
OUTPUT_COMMANDS = {
    "encode": ("encode", "{input}", "-o", "{out}/x.latents"),
    "live": ("live", "{input}", "-o", "{out}/x.latents"),
    "serve": ("serve", "--source", "cam={input}", "--output-dir", "{out}"),
}


@pytest.mark.parametrize("command", OUTPUT_COMMANDS.values(), ids=OUTPUT_COMMANDS.keys())
def test_a_file_that_is_not_a_video_is_refused_before_any_output(tmp_path: Path, command):
    """The error comes first (no summary), exit status 1, and no output file is created."""
    not_video = tmp_path / "notes.md"
    not_video.write_text("# not a video\n")
    out = tmp_path / "out"
    args = [a.format(input=not_video, out=out) for a in command]
    result = run_cli(*args, *NARROW, "--json")
    assert result.returncode == 1, result.stderr
    assert "could not open" in result.stderr and str(not_video) in result.stderr
    assert "not a video" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # no summary of a run that never started
    assert not list(out.glob("*")) if out.exists() else True


@pytest.mark.parametrize("command", OUTPUT_COMMANDS.values(), ids=OUTPUT_COMMANDS.keys())
def test_a_video_with_no_frame_is_refused_before_any_output(tmp_path: Path, command):
    """A file OpenCV opens but that holds no frame: an error, not an empty output and status 0."""
    empty = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    writer.release()  # a valid AVI header, no frame
    assert cv2.VideoCapture(str(empty)).isOpened()
    out = tmp_path / "out"
    result = run_cli(*[a.format(input=empty, out=out) for a in command], *NARROW, "--json")
    assert result.returncode == 1, result.stderr
    assert "opened but gave no frame" in result.stderr and str(empty) in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not list(out.glob("*")) if out.exists() else True


def test_a_bad_input_leaves_an_existing_output_as_it_was(tmp_path: Path):
    existing = tmp_path / "x.latents"
    existing.write_bytes(b"keep me")
    not_video = tmp_path / "notes.md"
    not_video.write_text("# not a video\n")
    result = run_cli("encode", str(not_video), "-o", str(existing), *NARROW)
    assert result.returncode == 1 and "could not open" in result.stderr
    assert existing.read_bytes() == b"keep me"


def test_an_output_that_cannot_be_written_is_a_usage_error(tmp_path: Path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for output, expected in [
        (tmp_path, "is a directory"),
        (a_file / "x.latents", "is a file, not a directory"),
    ]:
        result = run_cli("encode", "synthetic://moving?frames=1", "-o", str(output), *NARROW)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_failed_encode_removes_only_the_output_it_created(tmp_path: Path):
    from streamvae.io.commands import _removed_on_failure

    created = tmp_path / "new.latents"
    with _removed_on_failure(created, created=True) as outcome:
        created.write_bytes(b"partial")
        outcome.failed = True
    assert outcome.removed and not created.exists()
    before = tmp_path / "old.latents"
    before.write_bytes(b"partial")
    with _removed_on_failure(before, created=False) as outcome:
        outcome.failed = True
    assert not outcome.removed and before.exists()
    with pytest.raises(RuntimeError), _removed_on_failure(created, created=True) as outcome:
        created.write_bytes(b"partial")
        raise RuntimeError("the model failed")
    assert outcome.removed and not created.exists()
    with _removed_on_failure(created, created=True) as outcome:
        created.write_bytes(b"complete")
    assert not outcome.removed and created.read_bytes() == b"complete"


async def test_a_second_ctrl_c_aborts_a_stuck_drain():
    """No broker: the first Ctrl-C starts the drain (up to 60 s); the second one aborts."""
    dead_port = io_fixtures.free_port()
    process = await asyncio.create_subprocess_exec(
        *streamvae_command(
            "live", "synthetic://moving?fps=25", "--mqtt", f"mqtt://127.0.0.1:{dead_port}/x",
            "--size", "16x16", *NARROW, "--drain-timeout", "60", "--stats-interval", "0.2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )  # fmt: skip
    try:

        async def line_with(text: str) -> None:
            while text not in (await process.stderr.readline()).decode():
                assert not process.stderr.at_eof()

        await asyncio.wait_for(line_with("mqtt DISCONNECTED"), 60)  # running, buffering
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(line_with("stopping"), 10)
        await asyncio.sleep(0.5)
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130


def test_the_cli_runs_what_the_bench_measures():
    """Issue 17 (lesser): the CLI built StreamEncoders without CUDA graphs and cuDNN's benchmark
    mode while the bench measured with both. Now both default as the bench's, with its flags."""
    import torch

    from streamvae.bench.options import BenchOptions
    from streamvae.cli import build_parser
    from streamvae.io.commands import cuda_options

    bench = BenchOptions()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for command in (["encode", "x.mp4", "-o", "x.latents"], ["live", "0", "--mqtt", "mqtt://h/p"]):
        args = build_parser().parse_args(command)
        assert (
            cuda_options(args, cuda)
            == {
                "cuda_graphs": bench.cuda_graphs,
                "cudnn_benchmark": bench.cudnn_benchmark,
                "tf32": bench.tf32,
            }
            == {"cuda_graphs": True, "cudnn_benchmark": True, "tf32": False}
        )
        assert not any(cuda_options(args, cpu).values())
        flags = ["--no-cuda-graphs", "--no-cudnn-benchmark", "--tf32"]
        args = build_parser().parse_args(command + flags)
        assert cuda_options(args, cuda) == {
            "cuda_graphs": False,
            "cudnn_benchmark": False,
            "tf32": True,
        }


async def test_the_stats_line_says_when_a_source_is_not_open_yet(tmp_path: Path):
    from streamvae.io import Backoff, open_source
    from streamvae.io.commands import _not_open_text

    not_video = tmp_path / "notes.md"
    not_video.write_text("# not a video\n")
    down = open_source(not_video, kind="webcam", backoff=Backoff(initial=0.01, maximum=0.01))
    async with down:
        await wait_until(lambda: down.stats.last_error is not None, 10, "a failed open")
        assert not down.has_opened
        assert "| source not open yet: could not open" in _not_open_text(down)
        assert "(retrying)" in _not_open_text(down)
    async with open_source("synthetic://moving?frames=2", size="16x16") as up:
        assert await up.opened() and up.has_opened
        assert _not_open_text(up) == ""


async def test_the_stats_line_says_which_figures_are_current_and_which_cumulative():
    """Issue 23: rates were per interval but latencies and drops cumulative, unlabelled. The
    line gives the last interval's rates and latencies, then the counts since the start."""
    from streamvae.io import PipelineStats, open_source
    from streamvae.io.commands import _live_stats_line

    stats = PipelineStats()
    stats.latents, stats.latencies = 12, deque([1.0] * 10 + [0.010, 0.020])
    async with open_source("synthetic://moving?frames=2", size="16x16") as source:
        await source.opened()
        source.stats.frames_read, source.stats.dropped_frames = 50, 8
        line = _live_stats_line(2.0, 40, 10, source, stats, None)
    assert line.startswith("last 2.0 s: in 5.0 frames/s, out 1.0 latents/s, latency p50 15.0 ms")
    assert "max 20.0 ms" in line  # only the interval's two latents, not the 1 s ones before
    assert "| since start: 12 latents, dropped 8 frames" in line
    quiet = _live_stats_line(2.0, source.stats.frames_read, 12, source, stats, None)
    assert "in 0.0 frames/s, out 0.0 latents/s, latency n/a" in quiet


def test_live_on_a_full_disk_names_the_file_and_leaves_no_torn_record(tmp_path: Path):
    """Issue 21 item 15: ``live`` said ``No space left on device`` without the file's name and
    left a torn record. A file size limit makes the disk "full" part of the way through a
    record (``EFBIG``: the same path as ``ENOSPC``)."""
    resource = pytest.importorskip("resource")
    output = tmp_path / "cam.latents"

    def limited() -> None:  # in the child: writes past 3000 bytes of a file fail
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (3000, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )

    result = subprocess.run(
        streamvae_command(
            "live", "synthetic://moving?frames=60&size=32x32", "-o", str(output), *NARROW,
            "--stats-interval", "0",
        ),
        capture_output=True, text=True, timeout=120, env=cli_env(), cwd=REPO,
        stdin=subprocess.DEVNULL, preexec_fn=limited,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"{output}: File too large" in result.stderr and "Traceback" not in result.stderr
    data = output.read_bytes()
    written = read_latents(output)
    assert 0 < len(data) <= 3000 and written
    from streamvae.io import FileSink

    with FileSink(output, append=True):  # refused if the file ended in a torn record
        pass
    assert [latent.index for latent in written] == list(range(len(written)))


async def _run_until(
    args: list[str], ready, sig: int, timeout: float = 120
) -> tuple[int, str, str]:
    """Start ``streamvae *args``; once ``ready(stderr so far)`` holds, send ``sig``; its exit
    status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *streamvae_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env()
    )
    err = bytearray()

    async def collect() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            err.extend(line)

    collecting = asyncio.ensure_future(collect())
    try:
        async with asyncio.timeout(timeout):
            while not ready(err.decode()):
                assert not collecting.done(), f"ended before it was ready: {err.decode()}"
                await asyncio.sleep(0.05)
            process.send_signal(sig)
            assert process.stdout is not None
            out = await process.stdout.read()
            await process.wait()
            await collecting
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        collecting.cancel()
    return process.returncode, out.decode(), err.decode()


async def test_encode_stopped_by_sigterm_says_so_and_exits_143(tmp_path: Path):
    """Issue 21 item 16: ``encode`` of 400 frames stopped by SIGTERM exited 0 with no word of
    the stop. It is a job not done: 143 (130 for Ctrl-C), and the summary says it stopped."""
    output = tmp_path / "clip.latents"
    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        output.unlink(missing_ok=True)
        code, out, err = await _run_until(
            [
                "encode", "synthetic://moving?frames=400&fps=25&size=32x32", "-o", str(output),
                *NARROW, "--json",
            ],
            lambda text: "RANDOM WEIGHTS" in text  # its signal handlers are in place
            and output.exists()
            and output.stat().st_size > 2000,  # latents are coming
            sig,
        )  # fmt: skip
        assert code == status, err
        summary = json.loads(out.splitlines()[-1])
        assert summary["stopped_by"] == signal.Signals(sig).name, summary
        assert 0 < summary["frames"] < 400
        assert len(read_latents(output)) == summary["latents"]  # what it did is kept


async def test_live_stopped_before_its_camera_opened_exits_130_and_leaves_no_file(
    tmp_path: Path,
):
    """Issue 21 item 16: ``live`` of a camera that never opened, stopped with Ctrl-C, exited 0
    and left an empty file. Nothing was done: 130, and no file."""
    output = tmp_path / "cam.latents"
    dead = f"rtsp://127.0.0.1:{io_fixtures.free_port()}/none"
    code, out, err = await _run_until(
        ["live", dead, "-o", str(output), *NARROW, "--size", "32x32", "--stats-interval", "0.2"],
        lambda text: "source not open yet" in text,  # retrying, never opened
        signal.SIGINT,
    )
    assert code == 130, err
    assert "stopped by SIGINT before the source opened" in out + err
    assert not output.exists()
