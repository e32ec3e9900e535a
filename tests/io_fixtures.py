"""Loopback servers for the IO tests: mosquitto brokers, ffmpeg streams, small test videos.

Every process started here is stopped at teardown (terminate, then kill), and every wait is
bounded. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, timeout: float = 10.0, process: subprocess.Popen | None = None
) -> None:
    """Until something accepts on ``port``; early failure if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"the server exited with status {process.returncode}")
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.settimeout(0.2)
            sock.connect((HOST, port))
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout} s")


def stop_process(
    process: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 5.0
) -> None:
    """Signal, wait, then kill: the process is gone when this returns."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        pytest.fail(f"{name} is not installed (scripts/install.sh installs it)")
    return found


@dataclass
class Broker:
    """A mosquitto on 127.0.0.1:``port`` with its own config, persistence and log in ``folder``."""

    folder: Path
    port: int = field(default_factory=free_port)
    password_file: Path | None = None
    tls: tuple[Path, Path] | None = None  # (certificate, key)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt{'s' if self.tls else ''}://{HOST}:{self.port}/test"

    def write_config(self) -> Path:
        lines = [
            # As root, mosquitto would switch to the 'mosquitto' user, who cannot read tmp_path.
            f"user {getpass.getuser()}",
            f"listener {self.port} {HOST}",
            "persistence true",
            f"persistence_location {self.folder}/",
            f"log_dest file {self.folder / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 10000",
        ]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines += ["allow_anonymous true"]
        if self.tls is not None:
            lines += [f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"]
        config = self.folder / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> Broker:
        assert self.process is None or self.process.poll() is not None
        config = self.write_config()
        with open(self.folder / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(
                [_binary("mosquitto"), "-c", str(config)], stdout=stderr, stderr=stderr
            )
        try:
            wait_for_port(self.port, process=self.process)
        except TimeoutError:
            self.stop()
            log = self.folder / "mosquitto.log"
            output = (self.folder / "stderr.log").read_text()
            raise RuntimeError(
                f"mosquitto did not start: {output} {log.read_text() if log.exists() else ''}"
            ) from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: mosquitto saves its sessions and retained messages, as a broker restart does."""
        if self.process is not None:
            stop_process(self.process, sig=sig)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """An anonymous mosquitto on a free loopback port."""
    folder = tmp_path / "broker"
    folder.mkdir()
    instance = Broker(folder).start()
    yield instance
    instance.stop()


MQTT_USER = "streamer"
MQTT_PASSWORD = "s3cret-Pa55-word-7731"


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto that wants MQTT_USER / MQTT_PASSWORD, over TLS with a self-signed certificate."""
    folder = tmp_path / "auth-broker"
    folder.mkdir()
    passwords = folder / "passwords"
    subprocess.run(
        [_binary("mosquitto_passwd"), "-b", "-c", str(passwords), MQTT_USER, MQTT_PASSWORD],
        check=True,
        capture_output=True,
        timeout=30,
    )
    passwords.chmod(0o600)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            _binary("openssl"),
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={HOST}",
            "-addext", f"subjectAltName=IP:{HOST}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    instance = Broker(folder, password_file=passwords, tls=(cert, key)).start()
    yield instance
    instance.stop()


def make_video(path: Path, *, frames: int, size: str = "64x64", rate: int = 25) -> Path:
    """A small deterministic test video (ffmpeg's testsrc pattern, MPEG-4 part 2)."""
    subprocess.run(
        [
            _binary("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}",
            "-frames:v", str(frames), "-c:v", "mpeg4", "-q:v", "3", "-pix_fmt", "yuv420p",
            str(path),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return path


@pytest.fixture(scope="session")
def test_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """21 frames of 64x64: latents 0..5 (frame 0, then five groups of four)."""
    return make_video(tmp_path_factory.mktemp("video") / "clip.avi", frames=21)


def read_video_frames(path: Path, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Every frame of a video, decoded with OpenCV as the sources do (RGB), resized if asked."""
    import cv2

    from streamvae.io.sources import fit_frame

    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            frames.append(fit_frame(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), size, "resize"))
    finally:
        capture.release()
    return frames


def streamvae_command(*args: str) -> list[str]:
    """``python -m streamvae.cli ARGS`` with one torch thread (the tests share two cores)."""
    return [sys.executable, "-m", "streamvae.cli", *args, "--threads", "1"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("STREAMVAE_MQTT_PASSWORD", None)
    env.update(extra)
    return env


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


class StreamServer:
    """Runs ffmpeg streaming ``testsrc`` for ``seconds`` (retrying until a listener takes it).

    ``kind="rtsp"`` pushes to ``rtsp://127.0.0.1:PORT/live`` (a listening source receives it);
    ``kind="mjpeg"`` serves ``http://127.0.0.1:PORT/`` (multipart JPEG) for one client.
    Runs in a thread; :meth:`close` stops ffmpeg for good.
    """

    def __init__(self, kind: str, port: int, path: str = "live") -> None:
        self.kind = kind
        self.port = port
        self.path = path
        self.sessions = 0
        self._process: subprocess.Popen | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return (
            f"rtsp://{HOST}:{self.port}/{self.path}"
            if self.kind == "rtsp"
            else f"http://{HOST}:{self.port}/"
        )

    def _command(self, seconds: float) -> list[str]:
        source = ["-re", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-t", str(seconds)]
        if self.kind == "rtsp":
            output = [
                "-c:v",
                "mpeg4",
                "-q:v",
                "5",
                "-f",
                "rtsp",
                "-rtsp_transport",
                "tcp",
                self.url,
            ]
        else:
            output = ["-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg", "-listen", "1", self.url]
        return [_binary("ffmpeg"), "-hide_banner", "-loglevel", "error", *source, *output]

    def serve(self, seconds: float, *, deadline: float = 30.0) -> None:
        """Stream once for ``seconds`` in the background (after the previous stream ended)."""
        previous = self._thread

        def run() -> None:
            if previous is not None:
                previous.join(deadline)
            end = time.monotonic() + deadline
            while not self._closed.is_set() and time.monotonic() < end:
                started = time.monotonic()
                self._process = subprocess.Popen(
                    self._command(seconds), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                self._process.wait()
                if time.monotonic() - started > seconds / 2:  # it streamed
                    self.sessions += 1
                    return
                self._closed.wait(0.2)  # nobody listening yet: try again

        self._thread = threading.Thread(target=run, name=f"ffmpeg-{self.kind}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._process is not None:
            stop_process(self._process, sig=signal.SIGKILL)
        if self._thread is not None:
            self._thread.join(10)


@pytest.fixture
def stream_server(request: pytest.FixtureRequest) -> Iterator[StreamServer]:
    server = StreamServer(request.param, free_port())
    yield server
    server.close()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: ffmpeg and the reader threads need the other core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
