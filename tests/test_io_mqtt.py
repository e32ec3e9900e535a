"""The MQTT sink and subscriber against a real mosquitto on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path

import aiomqtt
import pytest
import torch
from test_io_wire import hostile_overflow_payload, make_latent

import io_fixtures
from io_fixtures import MQTT_PASSWORD, MQTT_USER, Broker, wait_until
from streamvae.io import (
    Backoff,
    LatentSubscriber,
    MqttSettings,
    MqttSink,
    SinkError,
    decode_latent,
)
from streamvae.io.mqtt import latent_topic, status_topic, validate_prefix, validate_stream_id
from streamvae.io.wire import CONTENT_TYPE, encode_latent

pytestmark = pytest.mark.network

broker = io_fixtures.broker  # fixtures
auth_broker = io_fixtures.auth_broker


def settings_for(instance: Broker, **options) -> MqttSettings:
    return MqttSettings.from_url(instance.url, **options)


async def retained(settings: MqttSettings, topic: str, timeout: float = 5.0) -> dict | None:
    """The retained message on ``topic`` as JSON (``None`` if there is none)."""
    async with settings.client(identifier=f"probe-{time.monotonic_ns()}") as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for message in client.messages:
                    return json.loads(message.payload)
        except TimeoutError:
            return None
    return None


async def test_round_trip_properties_and_status(broker: Broker):
    settings = settings_for(broker)
    latents = [make_latent(i, h=8, w=8, gap=i == 0) for i in range(20)]
    async with LatentSubscriber(settings) as subscriber:
        received = []

        async def receive() -> None:
            async for message in subscriber:
                received.append(message)
                if len(received) == len(latents):
                    return

        receiving = asyncio.ensure_future(receive())
        sink = MqttSink(settings, stream_id="cam1", labels={"model": "m", "meaningless": "true"})
        async with sink:
            assert await sink.wait_connected(10)
            assert (await retained(settings, sink.status_topic))["status"] == "online"
            for latent in latents:
                # The capture time of the latent's last frame is "now": round trip = receipt - now.
                now = time.time()
                latent = type(latent)(
                    **{**latent.__dict__, "timestamps": (now,), "ready_time": now}
                )
                await sink.send(latent)
            await asyncio.wait_for(receiving, 20)
        assert (await retained(settings, sink.status_topic))["status"] == "offline"
    assert sink.stats.published == sink.stats.sent == 20 and sink.stats.discarded == 0
    for original, message in zip(latents, received, strict=True):
        assert message.stream_id == "cam1" and message.topic == "test/cam1/latents"
        assert torch.equal(message.latent.data, original.data)
        assert message.latent.index == original.index and message.latent.gap == original.gap
        assert message.latent.meta == {
            "model": "m",
            "meaningless": "true",
            "stream": "cam1",
            "run": f"{sink.session}-1",
        }
    latency = sorted(m.received_time - m.latent.timestamps[-1] for m in received)
    print(  # for the record only: speed belongs to the bench
        f"MQTT round trip on loopback: median {latency[10] * 1000:.2f} ms, max {latency[-1] * 1000:.2f} ms"
    )
    assert all(lag >= 0 for lag in latency)  # received after it was captured, on one clock


async def _within_loop_steps(condition, steps: int = 200) -> bool:
    """Whether ``condition()`` holds within ``steps`` turns of the event loop, with no timer
    let run: work done at once passes, work held back by a sleep (or anything else that waits
    for time) does not, however fast or slow the machine."""
    for _ in range(steps):
        if condition():
            return True
        await asyncio.sleep(0)
    return condition()


def record_publishes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Every ``aiomqtt.Client.publish`` call as it starts: ``(topic, the "index" user
    property)``, in call order."""
    calls: list[tuple[str, str | None]] = []
    original = aiomqtt.Client.publish

    async def publish(self, topic, payload=None, *args, **kwargs):
        properties = kwargs.get("properties")
        user = dict(getattr(properties, "UserProperty", None) or [])
        calls.append((str(topic), user.get("index")))
        return await original(self, topic, payload, *args, **kwargs)

    monkeypatch.setattr(aiomqtt.Client, "publish", publish)
    return calls


async def test_each_latent_is_handed_to_the_client_as_soon_as_it_is_queued(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
):
    """Issue 24 item 3: what the sink controls is that it adds no delay: with room in flight,
    a latent it is sent goes to the MQTT client within a few turns of the event loop, before
    any timer could fire, and in the order sent. (How fast the broker answers is the bench's.)"""
    calls = record_publishes(monkeypatch)
    settings = settings_for(broker)
    sink = MqttSink(settings, stream_id="cam11")
    topic = latent_topic("test", "cam11")
    async with sink:
        assert await sink.wait_connected(10)
        # The first once published: the sink's "online" status (which it awaits) is out of the way.
        await sink.send(make_latent(0, h=2, w=2))
        await wait_until(lambda: sink.stats.published == 1, 10, "the first publish")
        for index in range(1, 10):
            await sink.send(make_latent(index, h=2, w=2))
            handed = await _within_loop_steps(
                lambda n=index + 1: sum(1 for t, _ in calls if t == topic) == n
            )
            assert handed, f"latent {index} was queued but not handed to the client: {calls}"
            await wait_until(lambda n=index + 1: sink.stats.published == n, 10, "a publish")
    latents = [index for t, index in calls if t == topic]
    assert latents == [str(n) for n in range(10)]  # each once, in order
    statuses = [t for t, _ in calls if t != topic]
    assert statuses == [sink.status_topic, sink.status_topic]  # online, then offline
    assert (sink.stats.sent, sink.stats.published) == (10, 10)


async def test_mqtt5_properties_reach_an_independent_subscriber(broker: Broker):
    settings = settings_for(broker)
    async with settings.client(identifier="raw-sub") as client:
        await client.subscribe(latent_topic("test", "+"), qos=1)
        async with MqttSink(settings, stream_id="cam2", qos=1) as sink:
            await sink.send(make_latent(4))
            async with asyncio.timeout(10):
                message = await anext(aiter(client.messages))
    assert message.qos == 1
    assert message.properties.ContentType == CONTENT_TYPE
    run = f"{sink.session}-0"
    assert dict(message.properties.UserProperty) == {"stream": "cam2", "index": "4", "run": run}
    assert decode_latent(message.payload).index == 4


async def test_broker_restart_loses_only_what_the_overflow_policy_says(broker: Broker):
    """Broker stopped mid-stream, restarted (after two failed reconnections) on the same port
    and persistence.

    A subscriber with a persistent session (QoS 1) sees every latent the sink published;
    the sink's buffer holds 5 latents: of the 20 sent while the broker was away, the 15 oldest
    are discarded and counted; the rest are published after the reconnection.
    """
    settings = settings_for(broker)
    received: dict[int, int] = {}
    subscribed = asyncio.Event()

    async def subscribe_forever() -> None:
        while True:
            try:
                async with LatentSubscriber(
                    settings, identifier="restart-sub", session_expiry=300
                ) as sub:
                    subscribed.set()  # its session (and subscription) is on the broker
                    async for message in sub:
                        received[message.latent.index] = received.get(message.latent.index, 0) + 1
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    subscriber = asyncio.ensure_future(subscribe_forever())
    sink = MqttSink(settings, stream_id="cam4", buffer_messages=5, backoff=Backoff(0.1, 0.3))
    try:
        async with sink:
            assert await sink.wait_connected(10)
            await asyncio.wait_for(subscribed.wait(), 10)
            for index in range(10):
                await sink.send(make_latent(index, h=2, w=2))
                await wait_until(lambda n=index + 1: sink.stats.published == n, 10, "a publish")
            broker.stop()
            await wait_until(lambda: not sink.stats.connected, 10, "the sink to see the loss")
            failures = sink.stats.connection_failures
            for index in range(10, 30):
                await sink.send(make_latent(index, h=2, w=2))
            await wait_until(  # the sink keeps trying while the broker is away
                lambda: sink.stats.connection_failures >= failures + 2, 20, "two failed reconnects"
            )
            broker.start()
            await wait_until(lambda: sink.stats.published == 15, 20, "the buffer published")
            for index in range(30, 40):
                await sink.send(make_latent(index, h=2, w=2))
                await wait_until(lambda n=index - 14: sink.stats.published == n, 10, "a publish")
            await wait_until(lambda: len(received) == 25, 20, "the subscriber to catch up")
    finally:
        subscriber.cancel()
        await asyncio.gather(subscriber, return_exceptions=True)
    stats = sink.stats
    print(
        f"broker restart: sent {stats.sent}, published {stats.published}, discarded {stats.discarded}"
    )
    assert (stats.sent, stats.published, stats.discarded, stats.unsent) == (40, 25, 15, 0)
    assert stats.connects == 2
    assert sorted(received) == [*range(10), *range(25, 40)]  # 10..24: the oldest, discarded


async def test_subscriber_refuses_oversized_and_hostile_payloads(broker: Broker):
    settings = settings_for(broker)
    small = encode_latent(make_latent(1, h=2, w=2), {"stream": "cam5"})
    big = encode_latent(make_latent(2, h=64, w=64), {"stream": "cam5"})
    async with LatentSubscriber(
        settings, streams="cam5", max_payload_bytes=len(small) + 100
    ) as sub:
        async with settings.client(identifier="attacker") as client:
            topic = latent_topic("test", "cam5")
            await client.publish(topic, big, qos=1)  # over the limit: the broker withholds it
            await client.publish(topic, b"\x80\x04\x95 a pickle, or anything", qos=1)
            await client.publish(topic, small, qos=1)
        async with asyncio.timeout(10):
            message = await anext(sub)
    assert message.latent.index == 1
    assert sub.stats.rejected == 1 and "not valid JSON" not in (sub.stats.last_error or "x")


async def test_no_payload_ends_a_subscriber(broker: Broker, monkeypatch: pytest.MonkeyPatch):
    """Issue 17 item 1: a 400-digit timestamp (OverflowError) ended every subscriber; so would
    any decoder failure that is not a WireError. Each is counted and skipped instead."""
    import streamvae.io.mqtt as mqtt

    settings = settings_for(broker)
    calls = 0

    def flaky_decode(payload, **options):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a decoder bug")
        return decode_latent(payload, **options)

    monkeypatch.setattr(mqtt, "decode_latent", flaky_decode)
    async with LatentSubscriber(settings, streams="cam7") as sub:
        async with settings.client(identifier="attacker2") as client:
            topic = latent_topic("test", "cam7")
            await client.publish(topic, hostile_overflow_payload(), qos=1)
            await client.publish(topic, encode_latent(make_latent(1, h=2, w=2)), qos=1)
            await client.publish(topic, encode_latent(make_latent(2, h=2, w=2)), qos=1)
        async with asyncio.timeout(10):
            message = await anext(sub)
    assert message.latent.index == 2
    assert (sub.stats.received, sub.stats.rejected, sub.stats.decoded) == (3, 2, 1)
    assert "a decoder bug" in sub.stats.last_error


def test_stream_ids_and_prefixes_are_checked_before_becoming_topics():
    for good in ("cam1", "Front_Door-2", "a.b"):
        assert validate_stream_id(good) == good
    for bad in ("", "cam/1", "cam+", "#", "a b", "-x", ".hidden", "x" * 65, "cam\n", "é"):
        with pytest.raises(ValueError, match="stream id"):
            validate_stream_id(bad)
        with pytest.raises(ValueError):
            MqttSink(MqttSettings("127.0.0.1"), stream_id=bad)
    assert status_topic("a/b", "cam") == "a/b/cam/status"
    for bad in ("", "a//b", "a/+/b", "a/#", "$SYS/x", "/a"):
        with pytest.raises(ValueError, match="prefix"):
            validate_prefix(bad)


def test_passwords_never_come_from_urls_or_show(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with pytest.raises(ValueError, match="refusing a password") as refused:
        MqttSettings.from_url("mqtt://user:hunter2@host/p")
    assert "hunter2" not in str(refused.value)
    monkeypatch.setenv("STREAMVAE_MQTT_PASSWORD", "from-env-123")
    settings = MqttSettings.from_url("mqtt://user@host:1884/a/b")
    assert (settings.username, settings.password, settings.port, settings.prefix) == (
        "user",
        "from-env-123",
        1884,
        "a/b",
    )
    assert "from-env-123" not in repr(settings) and "from-env-123" not in settings.display
    password_file = tmp_path / "pw"
    password_file.write_text("from-file-456\n")
    settings = MqttSettings.from_url("mqtts://user@host/p", password_file=password_file)
    assert settings.password == "from-file-456" and settings.tls and settings.port == 8883
    assert "from-file-456" not in repr(settings)


async def test_user_password_and_tls(
    auth_broker: Broker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("STREAMVAE_MQTT_PASSWORD", MQTT_PASSWORD)
    url = f"mqtts://{MQTT_USER}@127.0.0.1:{auth_broker.port}/test"
    cert = str(auth_broker.tls[0])
    good = MqttSettings.from_url(url, ca_file=cert)
    async with (
        LatentSubscriber(good, streams="cam6") as sub,
        MqttSink(good, stream_id="cam6") as sink,
    ):
        await sink.send(make_latent(5))
        async with asyncio.timeout(10):
            message = await anext(sub)
    assert message.latent.index == 5 and sink.stats.published == 1
    # A wrong password: refused, counted, and the password in no message or log.
    wrong = MqttSettings(**{**good.__dict__, "password": "not-" + MQTT_PASSWORD})
    sink = MqttSink(wrong, stream_id="cam6", backoff=Backoff(0.1, 0.1), drain_timeout=0.5)
    async with sink:
        await sink.send(make_latent(6))
        await wait_until(lambda: sink.stats.connection_failures >= 2, 10, "refused connections")
    assert sink.stats.published == 0 and sink.stats.unsent == 1
    assert "not authorized" in sink.stats.last_error.lower()
    # Without the CA the server certificate is not trusted.
    untrusted = MqttSettings(**{**good.__dict__, "ca_file": None})
    sink = MqttSink(untrusted, stream_id="cam6", backoff=Backoff(0.1, 0.1), drain_timeout=0.5)
    async with sink:
        await wait_until(lambda: sink.stats.connection_failures >= 1, 10, "a refused certificate")
    assert "certificate" in sink.stats.last_error.lower()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert MQTT_PASSWORD not in logged and MQTT_PASSWORD not in sink.stats.last_error


async def test_a_sink_that_cannot_work_fails_loudly(tmp_path: Path):
    """Issue 17 item 3: a missing CA file or a bad key ended the publishing task silently;
    send() went on buffering into nothing and last_error stayed empty."""
    bad_key = tmp_path / "key.pem"
    bad_key.write_text("not a key\n")
    for options, expected in (
        ({"ca_file": str(tmp_path / "missing-ca.pem")}, "missing-ca.pem"),
        ({"cert_file": str(bad_key), "key_file": str(bad_key)}, "SSLError"),
    ):
        settings = MqttSettings.from_url("mqtts://127.0.0.1:1/test", **options)
        with pytest.raises(OSError):
            settings.tls_context()  # what the CLI calls up front
        sink = MqttSink(settings, stream_id="cam8", backoff=Backoff(0.05, 0.05))
        async with sink:
            await sink.send(make_latent(0))
            await wait_until(lambda s=sink: s.stats.failed, 10, "the sink to fail")
            assert expected in sink.stats.last_error
            with pytest.raises(SinkError, match="stopped"):
                await sink.send(make_latent(1))
        assert (sink.stats.sent, sink.stats.unsent, sink.stats.undelivered) == (1, 1, 1)


async def test_a_drain_timeout_still_leaves_the_status_offline(broker: Broker):
    """Issue 17 item 4: cancelling the task at the drain timeout ended in a normal DISCONNECT,
    so the broker dropped the will and the retained status stayed "online"."""
    settings = settings_for(broker, connect_timeout=1.0)
    sink = MqttSink(settings, stream_id="cam9", drain_timeout=0.5)
    async with sink:
        assert await sink.wait_connected(10)
        await sink.send(make_latent(0, h=2, w=2))
        await wait_until(lambda: sink.stats.published == 1, 10, "a publish")
        assert (await retained(settings, sink.status_topic))["status"] == "online"
        broker.process.send_signal(signal.SIGSTOP)  # the connection stays up; nothing is acked
        try:
            for index in range(1, 4):
                await sink.send(make_latent(index, h=2, w=2))
            await wait_until(lambda: sink.stats.in_flight == 3, 10, "three in flight")
        except BaseException:
            broker.process.send_signal(signal.SIGCONT)
            raise
    broker.process.send_signal(signal.SIGCONT)
    assert sink.stats.unsent == 3 and sink.stats.undelivered == 3
    status = None
    for _ in range(50):
        status = await retained(settings, sink.status_topic)
        if status and status["status"] == "offline":
            break
        await asyncio.sleep(0.1)
    assert status is not None and status["status"] == "offline", status


async def test_publishes_are_pipelined_up_to_max_in_flight(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
):
    """Issue 17 (lesser): QoS 1 kept one message in flight, so a 256-message backlog at a
    50 ms round trip outlasted the 5 s drain default. A stopped broker acknowledges nothing:
    the sink has exactly max_in_flight publishes out, in order, and none is lost or doubled."""
    calls = record_publishes(monkeypatch)
    settings = settings_for(broker)
    sink = MqttSink(settings, stream_id="cam10", max_in_flight=8, drain_timeout=20)
    topic = latent_topic("test", "cam10")
    received: list[int] = []
    async with LatentSubscriber(settings, streams="cam10") as sub:

        async def receive() -> None:
            async for message in sub:
                received.append(message.latent.index)
                if len(received) == 30:
                    return

        receiving = asyncio.ensure_future(receive())
        async with sink:
            assert await sink.wait_connected(10)
            broker.process.send_signal(signal.SIGSTOP)
            try:
                for index in range(30):
                    await sink.send(make_latent(index, h=2, w=2))
                await wait_until(lambda: sink.stats.in_flight == 8, 10, "eight in flight")
                # The publisher has run since the last send (it counted eight in flight): it
                # waits for an acknowledgement now, and the other 22 stay buffered.
                assert not await _within_loop_steps(
                    lambda: sum(1 for t, _ in calls if t == topic) > 8
                )
                assert [i for t, i in calls if t == topic] == [str(n) for n in range(8)]
                assert (sink.stats.in_flight, sink.stats.buffered, sink.stats.published) == (
                    8,
                    22,
                    0,
                )
            finally:
                broker.process.send_signal(signal.SIGCONT)
            await wait_until(lambda: sink.stats.published == 30, 20, "all published")
        await asyncio.wait_for(receiving, 20)
    assert received == list(range(30))
    assert (sink.stats.sent, sink.stats.published, sink.stats.unsent) == (30, 30, 0)
    with pytest.raises(ValueError, match="max_in_flight"):
        MqttSink(settings, stream_id="x", max_in_flight=0)


def test_run_labels_differ_between_processes_publishing_one_stream():
    """Issue 21 item 10: run labels restarted at "0" in every process, so two ``live --stream-id
    door`` runs (or ``serve``, or ``web``'s ``web-1`` after a restart) published the same
    ``(stream, run, index)`` keys and a de-duplicating subscriber dropped the second run's
    latents. Each run's label is now unique (UTC time and 32 random bits), in every process."""
    import subprocess
    import sys

    from streamvae.io import decode_latent

    script = (
        "import asyncio, sys\n"
        "from test_io_wire import make_latent\n"
        "from streamvae.io import MqttSettings, MqttSink\n"
        "async def main():\n"
        "    sink = MqttSink(MqttSettings.from_url('mqtt://127.0.0.1:9/site'), stream_id='door')\n"
        "    await sink.send(make_latent(0))\n"
        "    sys.stdout.buffer.write(sink._buffer[0].payload)\n"
        "asyncio.run(main())\n"
    )
    tests = str(Path(__file__).parent)
    payloads = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, check=True, timeout=120, cwd=tests
        ).stdout
        for _ in range(2)
    ]
    first, second = (decode_latent(p) for p in payloads)
    assert (first.meta["stream"], first.index) == (second.meta["stream"], second.index)
    assert first.meta["run"] != second.meta["run"]
    for latent in (first, second):
        session, _, number = latent.meta["run"].rpartition("-")
        stamp, _, random_part = session.partition("-")
        assert number == "0" and len(stamp) == 16 and stamp.endswith("Z"), latent.meta["run"]
        assert len(random_part) == 8 and int(random_part, 16) >= 0
