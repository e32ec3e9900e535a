"""Latency of `streamvae web` with a real browser: capture -> latent ready, and page -> MQTT.

Starts a mosquitto and `streamvae web --random-weights` on loopback, opens the page in headless
chromium (its fake camera, the tests' flags), streams for ``--seconds`` after ``--warmup``, and
reads three clocks' worth of figures, per latent:

- server: latent ready - frame received by the server, both on the server's monotonic clock
  (exact; what the page calls "latency");
- capture -> ready: latent ready (server wall clock) - the frame's capture time on the
  browser's wall clock (mapped through the browser's RTCP sender reports); one machine here, so
  one clock;
- page -> MQTT: the subscriber's receipt (wall clock) - the same capture time: what a consumer
  of the latents sees.

Each figure is over the latents whose last frame was captured after the warm-up, for the latent's
*last* frame (the one that completes it). Drops are reported beside: a full model on a CPU
falls behind the camera and the live queue drops whole groups (which bounds the latency).

    flock /tmp/bench.lock python3 benchmarks/web_latency.py --config narrow8 --size 64x64
    flock /tmp/bench.lock python3 benchmarks/web_latency.py --config wan2.1 --size 64x64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from io_fixtures import Broker, cli_env  # noqa: E402
from streamvae.io import MqttSettings, decode_latent  # noqa: E402
from web_fixtures import chromium  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values) * 1000
    return {
        "n": len(values),
        "p50": round(float(np.percentile(array, 50)), 1),
        "p90": round(float(np.percentile(array, 90)), 1),
        "p99": round(float(np.percentile(array, 99)), 1),
        "max": round(float(array.max()), 1),
    }


async def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="web-latency-"))
    broker = Broker(folder).start()
    settings = MqttSettings.from_url(broker.url)
    log_path = folder / "web.log"
    command = [
        sys.executable, "-m", "streamvae.cli", "web", "--random-weights", "--config",
        args.config, "--size", args.size, "--port", "0", "--mqtt", broker.url, "-v", "--json",
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += ["--max-queued-groups", str(args.max_queued_groups)]
    log = log_path.open("w")
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=cli_env(), cwd=ROOT)
    received: list[tuple[float, object]] = []
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            found = re.search(r"open (http://\S+/)", log_path.read_text())
            url = found[1] if found else None
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"streamvae web did not start: {log_path.read_text()}")
            await asyncio.sleep(0.05)

        async def subscribe(ready: asyncio.Event) -> None:
            async with settings.client(identifier="web-latency") as client:
                await client.subscribe(f"{settings.prefix}/+/latents", qos=1)
                ready.set()
                async for message in client.messages:
                    received.append((time.time(), decode_latent(message.payload)))

        ready = asyncio.Event()
        subscriber = asyncio.ensure_future(subscribe(ready))
        await asyncio.wait_for(ready.wait(), 10)
        with chromium() as driver:
            await asyncio.to_thread(driver.get, url)
            await asyncio.sleep(1.0)
            driver.find_element("id", "start").click()
            started = time.time()
            await asyncio.sleep(args.warmup + args.seconds)
            if args.screenshot:
                driver.save_screenshot(str(args.screenshot))
            page = driver.execute_script("return window.streamvaeLatents;")
            with urllib.request.urlopen(url + "api/sessions", timeout=10) as response:
                sessions = json.loads(response.read())
            driver.find_element("id", "stop").click()
            await asyncio.sleep(3.0)
        subscriber.cancel()
        await asyncio.gather(subscriber, return_exceptions=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            stdout, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            stdout, _ = server.communicate()
        log.close()
        broker.stop()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    session = summary["sessions"]["web-1"]
    measured_from = started + args.warmup
    page_to_mqtt = [
        when - latent.timestamps[-1]
        for when, latent in received
        if latent.meta.get("capture_clock") == "browser-capture"
        and latent.timestamps[-1] is not None
        and latent.timestamps[-1] >= measured_from
    ]
    # The page got every latent in order, as MQTT did: pair them by position.
    pairs = list(zip(page, received))
    if [r["index"] for r in page] != [latent.index for _, latent in received][: len(page)]:
        raise SystemExit("the page's latents and MQTT's are not the same sequence")
    late = [
        (record, latent)
        for record, (_, latent) in pairs
        if latent.timestamps[-1] is not None and latent.timestamps[-1] >= measured_from
    ]
    server_latency = [r["latency_ms"] / 1000 for r, _ in late]
    capture_to_ready = [
        r["capture_to_ready_ms"] / 1000 for r, _ in late if r["capture_to_ready_ms"] is not None
    ]
    return {
        "config": args.config,
        "size": args.size,
        "max_queued_groups": args.max_queued_groups,
        "cpu": cpu_model(),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "frames_received": session["frames_received"],
        "frames_encoded": session["frames_encoded"],
        "frames_per_second_in": round(session["frames_received"] / session["seconds"], 2),
        "latents": session["latents"],
        "latents_on_mqtt": len(received),
        "dropped_groups": session["dropped_groups"],
        "gaps": session["gaps"],
        "server_receive_to_ready_ms": stats(server_latency),
        "capture_to_ready_ms": stats(capture_to_ready),
        "capture_to_receive_ms": sessions["web-1"]["capture_to_receive_ms"],
        "page_to_mqtt_ms": stats(page_to_mqtt),
        "latents_on_the_page": len(page),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="narrow8", help="narrow8 or wan2.1 (random weights)")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not measured first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument(
        "--max-queued-groups", type=int, default=2, help="the server's live queue (default 2)"
    )
    parser.add_argument("--screenshot", type=Path, help="save the page here at the end")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
