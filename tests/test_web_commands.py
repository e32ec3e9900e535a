"""``streamvae web`` in a real browser: headless chromium's fake camera -> WebRTC -> the pool ->
a real mosquitto, checked against a StreamEncoder over the frames the server recorded."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_io_serve import Subscriber, statuses
from test_web_server import Pattern, Peer, running

import io_fixtures
from helpers import rel_err, require
from io_fixtures import REPO, Broker, cli_env, streamvae_command
from streamvae import StreamEncoder, narrow
from streamvae.io import MqttSettings, read_latents
from streamvae.web.commands import _summary
from streamvae.weights import random_encoder
from web_fixtures import banner_shown, chromium, layout, page_numbers

broker = io_fixtures.broker  # a fixture

require("aiortc")
require("aiohttp")

TOLERANCE = 1e-5  # pooled streams: batches change only the order of float sums


class WebServer:
    """``streamvae web`` as a subprocess on a free loopback port (stderr to a file)."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.log = folder / "web.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            streamvae_command("web", "--port", "0", "--json", "-v", *args),
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=cli_env(),
            cwd=REPO,
        )
        self.url = ""

    def wait_listening(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"open (http://\S+/)", self.log.read_text())
            if found:
                self.url = found[1]
                return self.url
            if self.process.poll() is not None:
                pytest.fail(f"streamvae web exited: {self.log.read_text()}")
            time.sleep(0.05)
        pytest.fail(f"streamvae web did not listen within {timeout} s: {self.log.read_text()}")

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> tuple[int, dict]:
        """Ctrl-C: its exit status and JSON summary."""
        self.process.send_signal(signal.SIGINT)
        stdout, _ = self.process.communicate(timeout=60)
        self._log_file.close()
        lines = stdout.decode().strip().splitlines()
        return self.process.returncode, json.loads(lines[-1]) if lines else {}

    def kill(self) -> None:
        io_fixtures.stop_process(self.process)
        self._log_file.close()


def wait_page(driver, predicate, timeout: float, what: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        numbers = page_numbers(driver)
        if predicate(numbers):
            return numbers
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; the page: {numbers}")
        time.sleep(0.1)


def start_tab(driver) -> None:
    driver.find_element("id", "start").click()


@pytest.mark.network
@pytest.mark.slow
async def test_browser_tabs_stream_exactly_to_mqtt_and_the_page_shows_the_servers_numbers(
    broker: Broker, tmp_path: Path
):
    settings = MqttSettings.from_url(broker.url)
    record = tmp_path / "record"
    server = WebServer(
        tmp_path,
        "--random-weights",
        "--config",
        "narrow8",
        "--size",
        "64x64",
        "--mqtt",
        broker.url,
        "-o",
        str(tmp_path / "out"),
        "--record",
        str(record),
        "--max-sessions",
        "2",
    )
    try:
        url = await asyncio.to_thread(server.wait_listening)
        async with Subscriber(settings) as subscriber:
            with chromium(tmp_path) as driver:
                # Tab 1: the page, the banner, the model; then streaming.
                driver.set_window_size(1280, 1000)
                await asyncio.to_thread(driver.get, url)
                first = driver.current_window_handle
                info = await asyncio.to_thread(
                    wait_page, driver, lambda n: n["dtype"] == "float32", 20, "the model info"
                )
                assert banner_shown(driver)  # random weights: said once, by the banner
                assert info["size"] == "64x64" and info["model-name"] == "random"
                assert driver.page_source.count("RANDOM WEIGHTS") == 1
                before = layout(driver)
                page_text = driver.page_source
                assert broker.url not in page_text and "mqtt://" not in page_text
                start_tab(driver)
                await asyncio.to_thread(
                    wait_page, driver, lambda n: int(n["latents"]) >= 3, 30, "tab 1's latents"
                )
                # Tab 2: a second stream of the same pool.
                driver.switch_to.new_window("tab")
                second = driver.current_window_handle
                await asyncio.to_thread(driver.get, url)
                start_tab(driver)
                await asyncio.to_thread(
                    wait_page, driver, lambda n: int(n["latents"]) >= 3, 30, "tab 2's latents"
                )
                # Tab 3: the pool holds its --max-sessions 2: refused, and the page says so.
                driver.switch_to.new_window("tab")
                await asyncio.to_thread(driver.get, url)
                start_tab(driver)
                refused = await asyncio.to_thread(
                    wait_page, driver, lambda n: n["error"], 20, "tab 3's refusal"
                )
                assert "server is full" in refused["error"] and "max_streams=2" in refused["error"]
                driver.close()
                # Tab 2 closed: its stream ends cleanly (flushed, status offline).
                driver.switch_to.window(second)
                driver.close()
                await io_fixtures.wait_until(
                    lambda: server.api("/api/sessions")["web-2"]["state"] == "ended",
                    30,
                    "web-2 to end after its tab closed",
                )
                found = await statuses(settings, ["web-1", "web-2"])
                assert found["web-2"]["status"] == "offline"
                assert found["web-1"]["status"] == "online"
                # Tab 1 goes on streaming; a screenshot, then Stop: flushed, final numbers.
                driver.switch_to.window(first)
                await asyncio.to_thread(
                    wait_page, driver, lambda n: int(n["latents"]) >= 12, 60, "12 latents"
                )
                driver.save_screenshot(str(tmp_path / "web.png"))
                assert (tmp_path / "web.png").stat().st_size > 10_000
                # Streaming moved nothing, and the plot is above the fold at 1280x1000.
                streaming = layout(driver)
                assert streaming == before, (before, streaming)
                assert streaming["plot"]["bottom"] <= streaming["view"]["bottom"], streaming
                numbers = page_numbers(driver)
                assert float(numbers["fps"]) > 0 and float(numbers["lps"]) > 0
                # The round trip beside the camera preview; random weights still said.
                assert int(numbers["decoded-count"]) > 0 and banner_shown(driver)
                assert (
                    driver.execute_script("return document.getElementById('decoded').naturalWidth")
                    == 64
                )
                assert re.fullmatch(
                    r"MQTT \d+ of \d+ published, file \d+ written", numbers["outputs"]
                )
                driver.find_element("id", "stop").click()
                final = await asyncio.to_thread(
                    wait_page, driver, lambda n: n["state"].startswith("ended"), 30, "the end"
                )
                # The rates are current: a stream that has ended has none.
                assert (final["fps"], final["lps"]) == ("0.0", "0.00"), final
            sessions = server.api("/api/sessions")  # both ended: their final numbers
            # The last MQTT messages in flight: wait for every latent the server counted.
            await subscriber.until_received({sid: sessions[sid]["latents"] for sid in sessions})
        code, summary = await asyncio.to_thread(server.stop)
    finally:
        if server.process.poll() is None:
            server.kill()
    assert code == 0, server.log.read_text()
    assert sorted(summary["sessions"]) == ["web-1", "web-2"] and summary["meaningless"]
    # The page's numbers are the server's.
    one = sessions["web-1"]
    assert final["state"] == "ended (flushed)" and final["error"] == ""
    assert int(final["latents"]) == one["latents"] == int(final["latents-seen"])
    assert int(final["frames"]) == one["frames_received"]
    assert int(final["dropped-groups"]) == one["dropped_groups"]
    assert int(final["decoded-count"]) == one["decoded"]["frames"] > 0
    assert final["resolution"] == one["resolution"] == "64x64"
    # Every latent reached MQTT and the file, and equals a StreamEncoder over the frames the
    # server received (recorded losslessly), drops and all.
    encoder = random_encoder(narrow(8), seed=0)  # what --random-weights --config narrow8 builds
    from streamvae.web.record import read_recording

    for sid in ("web-1", "web-2"):
        got = subscriber.by_stream[sid]
        frames = read_recording(record / sid)
        numbers = summary["sessions"][sid]
        assert len(frames) == numbers["frames_encoded"]
        assert numbers["frames_received"] == len(frames) + numbers["dropped_frames"]
        own = StreamEncoder(encoder)
        expected = [x for frame in frames for x in own.push(frame)] + own.flush()
        assert len(got) == len(expected) == numbers["latents"] >= 3, sid
        stored = list(read_latents(tmp_path / "out" / f"{sid}.latents"))
        assert len(stored) == len(expected)
        for a, b, c in zip(got, stored, expected):
            assert (a.index, a.gap, a.source_frames) == (c.index, c.gap, c.source_frames)
            assert rel_err(a.data, c.data) < TOLERANCE and rel_err(b.data, c.data) < TOLERANCE
            assert a.meta["meaningless"] == "true" and a.meta["stream"] == sid
    assert len(subscriber.by_stream["web-1"]) == one["latents"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--size", "60x60"], "size must be HxW with H and W positive multiples of 8"),
        (["--keyfile", "key.pem"], "--keyfile needs --certfile"),
        (["--port", "70000"], "--port must be 0-65535"),
        (["--max-sessions", "0"], "--max-sessions: expected a positive integer, got '0'"),
        (["--frame-timeout", "0"], "--frame-timeout: expected a number of seconds > 0, got '0'"),
    ],
)
def test_bad_arguments_are_refused_clearly(args, says):
    """A command line that cannot run is a usage error: status 2, the reason, no traceback."""
    from test_io_cli import run_cli

    result = run_cli("web", "--random-weights", "--config", "narrow8", *args)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr


@pytest.mark.network
async def test_the_exit_status_is_1_when_a_sessions_output_failed(narrow_encoder, capsys):
    @contextlib.asynccontextmanager
    async def factory(stream_id: str):
        raise OSError("the broker refused")
        yield []

    async with running(narrow_encoder, factory) as (server, http, client, _pool):
        peer = Peer(Pattern())
        assert (await peer.connect(client, http))[0] == 200
        await asyncio.wait_for(peer.ended.wait(), 30)
        await peer.close()
    assert _summary(argparse.Namespace(json=False), server, True) == 1
    assert "output failed (outputs, opening its outputs)" in capsys.readouterr().out


@pytest.mark.network
async def test_a_restarted_server_never_replaces_a_recording(tmp_path: Path):
    """Issue 21 item 13: ``web -o DIR`` after a restart wrote its first session to
    ``web-1.latents`` again, replacing the last run's recording. A restarted server numbers
    its sessions on past the files there."""
    import aiohttp

    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        name: f"the last run's {name}".encode() for name in ("web-1.latents", "web-2.latents")
    }
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    server = WebServer(
        tmp_path, "--random-weights", "--config", "narrow8", "--size", "64x64", "-o", str(out)
    )
    try:
        url = server.wait_listening()

        class Http:  # what Peer.connect needs of aiohttp's TestServer
            @staticmethod
            def make_url(path: str) -> str:
                return url + path.lstrip("/")

        peer = Peer(Pattern())
        async with aiohttp.ClientSession() as client:
            status, body = await peer.connect(client, Http())
            assert status == 200 and body["session"] == "web-3", body
            for _ in range(600):
                if server.api("/api/sessions")["web-3"]["latents"] >= 2:
                    break
                await asyncio.sleep(0.1)
        await peer.close()
        code, summary = server.stop()
    finally:
        if server.process.poll() is None:
            server.kill()
    assert code == 0, server.log.read_text()
    for name, data in earlier.items():
        assert (out / name).read_bytes() == data  # untouched
    written = read_latents(out / "web-3.latents")
    assert len(written) == summary["sessions"]["web-3"]["latents"] >= 2


def test_web_warms_up_before_it_listens_when_asked(tmp_path: Path):
    """Issue 25 item 5: ``web --warmup on --size HxW`` runs the first steps before the server
    listens (``auto``, the default, only on CUDA: not here)."""
    server = WebServer(tmp_path, "--random-weights", "--config", "narrow8", "--size", "32x32",
                       "--warmup", "on")  # fmt: skip
    try:
        server.wait_listening()
        log = server.log.read_text()
        assert "streamvae web: warmed up 32x32 in " in log
        assert log.index("warmed up") < log.index("open http://")
        code, _ = server.stop()
        assert code == 0
    finally:
        server.kill()
    (tmp_path / "cold").mkdir()
    cold = WebServer(tmp_path / "cold", "--random-weights", "--config", "narrow8")
    try:
        cold.wait_listening()
        assert "warmed up" not in cold.log.read_text()
    finally:
        cold.kill()
