"""Latents over MQTT (aiomqtt): a reconnecting publisher and a size-limited subscriber.

>>> from streamvae.io import MqttSettings, MqttSink, LatentSubscriber
>>> settings = MqttSettings.from_url("mqtt://127.0.0.1:1883/lab")          # doctest: +SKIP
>>> async with MqttSink(settings, stream_id="cam1") as sink:                # doctest: +SKIP
...     async for latent in stream.stream(source):
...         await sink.send(latent)
>>> async with LatentSubscriber(settings) as latents:                      # doctest: +SKIP
...     async for message in latents:
...         print(message.stream_id, message.latent.index)

Topics, for a prefix ``P`` and a stream id ``S``:

- ``P/S/latents``: one message per latent, its payload the latent's safetensors bytes
  (:mod:`streamvae.io.wire`); MQTT 5 content type ``application/vnd.streamvae.latent+safetensors``
  and user properties ``stream``, ``index``, ``run``. QoS 1 by default (at least once:
  a message whose acknowledgement was lost in a reconnection is sent again, so consumers
  de-duplicate on ``(stream, run, index)``; a run label is unique to the sink that made it, so
  two processes, or one restarted, never share one).
- ``P/S/status``: retained JSON ``{"status": "online" | "offline", ...}``; ``offline`` is also
  the connection's last will, so a publisher that dies is seen offline.

Stream ids are one topic level: 1-64 letters, digits, ``_``, ``-``, ``.``, starting with a letter
or digit (never ``/``, ``+`` or ``#``). Credentials: ``mqtt://user@host:port/prefix`` (or
``mqtts://`` for TLS); the password comes from the ``STREAMVAE_MQTT_PASSWORD`` environment
variable or a file, never from the URL or the command line, and it is never logged or shown.

**When the broker goes away**, :class:`MqttSink` keeps accepting latents into a buffer of
``buffer_messages`` and reconnects with exponential backoff. Overflow policy: when the buffer is
full, the *oldest* buffered latent is discarded (a live consumer wants the newest) and counted in
``stats.discarded``. A latent counts as published when the broker acknowledged it (QoS 1/2) or it
was written to the socket (QoS 0); one in flight when the connection drops goes back to the front
of the buffer. At :meth:`MqttSink.aclose` the buffer is drained for up to ``drain_timeout``
seconds; what is left then is counted in ``stats.unsent``, and the retained status still
becomes ``offline`` (reason ``drain timeout: N latent(s) unsent``; if even that cannot be
published, the connection is ended with MQTT 5 reason 0x04 so that the broker publishes the
will). So at the end ``sent == published + discarded + unsent``, and ``stats.undelivered``
counts what never reached the broker.

**When the sink cannot work at all** (an unreadable CA file, a bad key: anything retrying
cannot mend), ``stats.failed`` is set, ``stats.last_error`` says why, and :meth:`MqttSink.send`
raises :class:`streamvae.io.SinkError`, so a pipeline ends instead of buffering into nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import ssl
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamvae.io.backoff import Backoff
from streamvae.io.pipeline import SinkError
from streamvae.io.redact import redact_url
from streamvae.io.topics import (
    PASSWORD_ENV,
    latent_topic,
    status_topic,
    validate_prefix,
    validate_stream_id,
)
from streamvae.io.wire import (
    CONTENT_TYPE,
    DEFAULT_MAX_PAYLOAD_BYTES,
    WireError,
    decode_latent,
    encode_latent,
)
from streamvae.stream import Latent

__all__ = [
    "PASSWORD_ENV",
    "LatentSubscriber",
    "MqttSettings",
    "MqttSink",
    "MqttSinkStats",
    "ReceivedLatent",
    "SubscriberStats",
    "latent_topic",
    "new_session_label",
    "status_topic",
    "validate_prefix",
    "validate_stream_id",
]

log = logging.getLogger(__name__)

_PACKET_OVERHEAD = 64 * 1024  # topic, properties and MQTT framing around a payload


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to connect. The password is kept out of ``repr`` and every message.

    Build it from a URL with :meth:`from_url`; ``tls_insecure`` skips the host-name check (for
    self-signed test certificates only).
    """

    host: str
    port: int = 1883
    prefix: str = "streamvae"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        if not self.host:
            raise ValueError("MQTT host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"MQTT port must be in 1..65535, got {self.port}")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password_file: str | os.PathLike[str] | None = None,
        password_env: str = PASSWORD_ENV,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        tls_insecure: bool = False,
        **options: object,
    ) -> MqttSettings:
        """``mqtt://[user@]host[:port][/prefix]`` or ``mqtts://`` (TLS, port 8883 by default).

        The password is read from ``password_file`` (its first line) if given, else from the
        environment variable ``password_env`` when set. A password inside the URL is refused
        (URLs end up in shell history, process lists and logs).
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(
                f"an MQTT URL starts with mqtt:// or mqtts://, got {redact_url(url)!r}"
            )
        if parts.password is not None:
            raise ValueError(
                f"refusing a password inside the MQTT URL; give it in ${password_env} or a "
                "password file (--mqtt-password-file) instead"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"an MQTT URL takes no query or fragment: {redact_url(url)!r}")
        if not parts.hostname:
            raise ValueError(f"no host in MQTT URL {url!r}")
        tls = parts.scheme == "mqtts"
        password: str | None = None
        if password_file is not None:
            lines = Path(password_file).read_text().splitlines()
            password = lines[0] if lines else ""
        elif os.environ.get(password_env):
            password = os.environ[password_env]
        prefix = unquote(parts.path.strip("/")) or "streamvae"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            prefix=prefix,
            username=unquote(parts.username) if parts.username else None,
            password=password,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            tls_insecure=tls_insecure,
            **options,  # type: ignore[arg-type]
        )

    @property
    def display(self) -> str:
        """The broker as ``mqtt://user@host:port/prefix``, never with the password."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}/{self.prefix}"

    def redact(self, text: str) -> str:
        """``text`` with the password (if any) replaced by ``***``."""
        return text.replace(self.password, "***") if self.password else text

    def client(
        self,
        *,
        identifier: str,
        will: aiomqtt.Will | None = None,
        clean_start: bool = True,
        properties: Properties | None = None,
    ) -> aiomqtt.Client:
        """An (unconnected) MQTT 5 ``aiomqtt.Client`` for these settings."""
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=clean_start,
            properties=properties,
            keepalive=self.keepalive,
            timeout=self.connect_timeout,
            tls_context=self.tls_context(),
            logger=log,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of ``mqtts://`` (``None`` without TLS).

        Raises ``OSError`` (``ssl.SSLError`` included) for a missing or unreadable CA file,
        certificate or key: call it up front to refuse a bad configuration before streaming.
        """
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except OSError as exc:
            raise OSError(f"cannot load the MQTT CA file {self.ca_file!r}: {exc}") from exc
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except OSError as exc:
                raise OSError(
                    f"cannot load the MQTT client certificate {self.cert_file!r} "
                    f"(key {self.key_file!r}): {type(exc).__name__}: {exc}"
                ) from exc
        if self.tls_insecure:
            context.check_hostname = False
        return context


# -- publishing ----


@dataclass
class MqttSinkStats:
    """Counts of an :class:`MqttSink`:
    ``sent == published + discarded + unsent + buffered + in_flight``."""

    sent: int = 0
    published: int = 0
    discarded: int = 0
    unsent: int = 0
    buffered: int = 0
    in_flight: int = 0
    """Publishes sent and awaiting their acknowledgement now (at most ``max_in_flight``)."""
    connects: int = 0
    connection_failures: int = 0
    connected: bool = False
    last_error: str | None = None
    failed: bool = False
    """The connection task died of an error that retrying cannot mend (see ``last_error``)."""
    publish_latency: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    """Seconds from :meth:`MqttSink.send` to the broker's acknowledgement, recent messages."""

    @property
    def undelivered(self) -> int:
        """Latents accepted by :meth:`MqttSink.send` that never reached the broker (so far)."""
        return self.discarded + self.unsent


@dataclass
class _Outgoing:
    payload: bytes
    properties: Properties
    accepted: float


Overflow = Literal["drop-oldest"]


def new_session_label() -> str:
    """A label no other process makes: the time in UTC and 32 random bits.

    >>> len(new_session_label()), new_session_label() != new_session_label()
    (25, True)
    """
    now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{now}-{secrets.token_hex(4)}"


class MqttSink:
    """Publishes latents to ``<prefix>/<stream_id>/latents``; an async context manager.

    :meth:`send` never waits for the network: it encodes the latent and buffers it; a task
    publishes in order, reconnecting with ``backoff`` when the broker goes away (see the module
    docstring for the overflow policy and the counts in :attr:`stats`).

    - ``labels``: string metadata added to every latent (model, normalization, ...); the sink
      adds ``stream`` and ``run``: ``<session>-<n>``, where :attr:`session` is unique to this
      sink (its start time in UTC and 32 random bits: two processes publishing one stream id,
      or one restarted, never share a label) and ``n`` counts the latents with ``gap``.
    - ``qos``: 0, 1 (default) or 2; ``dtype``: the storage dtype of the tensor.
    - ``buffer_messages``: latents held while the broker is unreachable.
    - ``message_expiry``: seconds after which the broker may drop an undelivered latent (MQTT 5).
    - ``max_in_flight``: publishes awaiting their acknowledgement at once (QoS 1/2; default
      16), in order. One at a time, a 256-latent backlog at a 50 ms round trip would take
      12.8 s to drain, past the 5 s default ``drain_timeout``; 16 take 0.8 s.
    - ``run``: a fixed ``run`` label (e.g. a fleet's run id, which survives a takeover) instead
      of the count of gaps; may be changed between latents.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        stream_id: str,
        labels: Mapping[str, str] | None = None,
        qos: int = 1,
        dtype: str = "float32",
        buffer_messages: int = 256,
        backoff: Backoff | None = None,
        drain_timeout: float = 5.0,
        message_expiry: int | None = None,
        max_in_flight: int = 16,
        run: str | None = None,
    ) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        if not 1 <= max_in_flight <= 20:  # paho queues what goes beyond its own window of 20
            raise ValueError(f"max_in_flight must be in 1..20, got {max_in_flight}")
        if buffer_messages < 1:
            raise ValueError(f"buffer_messages must be >= 1, got {buffer_messages}")
        self.settings = settings
        self.stream_id = validate_stream_id(stream_id)
        self.labels = {**(labels or {}), "stream": stream_id}
        self.qos = qos
        self.dtype = dtype
        self.buffer_messages = buffer_messages
        self.drain_timeout = drain_timeout
        self.message_expiry = message_expiry
        self.max_in_flight = max_in_flight
        self.topic = latent_topic(settings.prefix, stream_id)
        self.status_topic = status_topic(settings.prefix, stream_id)
        self.stats = MqttSinkStats()
        self._backoff = backoff or Backoff(initial=0.2, maximum=5.0)
        self._buffer: deque[_Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = False
        self._abandon = asyncio.Event()  # the drain timed out: stop publishing, say offline
        self._task: asyncio.Task[None] | None = None
        self._run_number = 0
        self.run = run  # a fixed run label (a fleet's run id) instead of the gap counter
        self.session = new_session_label()
        """The first part of this sink's run labels (see the class docstring)."""
        self._identifier = f"streamvae-{stream_id}-{uuid.uuid4().hex[:8]}"

    # -- public ----

    async def __aenter__(self) -> MqttSink:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start connecting (done by ``async with``); latents sent before are buffered."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"streamvae-mqtt-{self.stream_id}"
            )

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until connected (or ``timeout`` seconds); whether it is."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    async def send(self, latent: Latent) -> None:
        """Buffer one latent for publishing (never blocks on the network).

        Raises :class:`streamvae.io.SinkError` once the sink has failed for good (a TLS file
        that cannot be read, a bad key, ...): nothing sent after that could be published.
        """
        self._queue(latent)

    def _queue(self, latent: Latent) -> None:
        if self.stats.failed:
            raise SinkError(
                f"the MQTT sink for {self.settings.display} stopped: {self.stats.last_error}"
            )
        if self._closing:
            raise RuntimeError("the MQTT sink is closed")
        if latent.gap:
            self._run_number += 1
        run = f"{self.session}-{self._run_number}" if self.run is None else self.run
        payload = encode_latent(latent, {**self.labels, "run": run}, dtype=self.dtype)
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = CONTENT_TYPE
        properties.PayloadFormatIndicator = 0
        properties.UserProperty = [
            ("stream", self.stream_id),
            ("index", str(latent.index)),
            ("run", run),
        ]
        if self.message_expiry is not None:
            properties.MessageExpiryInterval = self.message_expiry
        self._buffer.append(_Outgoing(payload, properties, time.monotonic()))
        self.stats.sent += 1
        self._trim()
        self._wakeup.set()

    def _trim(self) -> None:
        while len(self._buffer) > self.buffer_messages:
            self._buffer.popleft()
            self.stats.discarded += 1
        self.stats.buffered = len(self._buffer)

    async def aclose(self) -> None:
        """Publish what is buffered (for up to ``drain_timeout`` s), publish ``offline``, disconnect."""
        if self._task is None or self._closing:
            self._closing = True
            self.stats.unsent += len(self._buffer)  # never started: nothing was sent
            self._buffer.clear()
            self.stats.buffered = 0
            return
        self._closing = True
        self._wakeup.set()
        try:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.drain_timeout)
            except asyncio.TimeoutError:
                log.warning(
                    "MQTT %s: %d latent(s) not published within %.1f s of closing",
                    self.settings.display,
                    len(self._buffer),
                    self.drain_timeout,
                )
                # Cancelling now would end in a normal DISCONNECT, after which the broker drops
                # the will: the status would stay "online". Say "offline" first.
                self._abandon.set()
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), self._status_timeout + 1)
                except asyncio.TimeoutError:
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task
        except asyncio.CancelledError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            raise
        finally:
            self.stats.unsent += len(self._buffer)
            self._buffer.clear()
            self.stats.buffered = 0
            self.stats.connected = False

    # -- the connection task ----

    def _status(self, status: str, reason: str) -> bytes:
        shown = ("model", "config", "z_dim", "meaningless", "stream")
        labels = {k: v for k, v in self.labels.items() if k in shown}
        return json.dumps({"status": status, "reason": reason, **labels}).encode()

    async def _run(self) -> None:
        try:
            await self._connect_and_publish()
        except (aiomqtt.MqttError, asyncio.CancelledError):
            raise
        except Exception as exc:  # e.g. an unreadable CA file or key: retrying cannot mend it
            self.stats.failed = True
            self.stats.connected = False
            self._connected.clear()
            self.stats.last_error = self.settings.redact(f"{type(exc).__name__}: {exc}")
            log.error(
                "MQTT %s: the publisher stopped: %s (%d latent(s) buffered will not be sent)",
                self.settings.display,
                self.stats.last_error,
                len(self._buffer),
            )

    async def _connect_and_publish(self) -> None:
        will = aiomqtt.Will(
            self.status_topic, self._status("offline", "connection lost"), qos=1, retain=True
        )
        while True:
            if self._closing and not self._buffer and self.stats.connects == 0:
                return  # closed before ever connecting, with nothing to send
            if self._abandon.is_set():
                return  # the drain timed out while disconnected: the will speaks for us
            try:
                async with self.settings.client(identifier=self._identifier, will=will) as client:
                    self.stats.connects += 1
                    self.stats.connected = True
                    self._connected.set()
                    self._backoff.reset()
                    log.info("MQTT connected to %s", self.settings.display)
                    await self._publish_status(client, "online", "started")
                    if await self._publish_buffer(client):
                        await self._publish_status(client, "offline", "stopped")
                    else:
                        await self._give_up(client)
                    return
            except aiomqtt.MqttError as exc:
                self.stats.connected = False
                self._connected.clear()
                self.stats.connection_failures += 1
                self.stats.last_error = self.settings.redact(str(exc))
                delay = self._backoff.next_delay()
                log.warning(
                    "MQTT %s: %s; reconnecting in %.1f s (%d latent(s) buffered)",
                    self.settings.display,
                    self.stats.last_error,
                    delay,
                    len(self._buffer),
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._abandon.wait(), delay)

    @property
    def _status_timeout(self) -> float:
        """How long the ``offline`` status may take after a drain timeout, at most 2 s."""
        return min(self.settings.connect_timeout, 2.0)

    async def _give_up(self, client: aiomqtt.Client) -> None:
        """The drain timed out: publish ``offline``, or else leave so that the will fires."""
        reason = f"drain timeout: {len(self._buffer)} latent(s) unsent"
        try:
            await asyncio.wait_for(
                self._publish_status(client, "offline", reason), self._status_timeout
            )
        except (asyncio.TimeoutError, aiomqtt.MqttError):
            _disconnect_with_will(client)

    async def _publish_status(self, client: aiomqtt.Client, status: str, reason: str) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = "application/json"
        await client.publish(
            self.status_topic,
            self._status(status, reason),
            qos=1,
            retain=True,
            properties=properties,
        )

    async def _publish_buffer(self, client: aiomqtt.Client) -> bool:
        """Publish in order, up to ``max_in_flight`` awaiting their acknowledgement at once,
        until closing with an empty buffer (``True``) or until the drain is abandoned
        (``False``); raise MqttError on disconnect."""
        watcher = asyncio.ensure_future(_until_disconnected(client))
        abandoned = asyncio.ensure_future(self._abandon.wait())
        in_flight: deque[tuple[_Outgoing, asyncio.Future[None]]] = deque()
        try:
            while True:
                while in_flight and in_flight[0][1].done():  # acknowledged, counted in order
                    message, publish = in_flight.popleft()
                    publish.result()
                    self.stats.published += 1
                    self.stats.publish_latency.append(time.monotonic() - message.accepted)
                if self._abandon.is_set():
                    raise _Abandoned
                while self._buffer and len(in_flight) < self.max_in_flight:
                    message = self._buffer.popleft()
                    publish = asyncio.ensure_future(
                        client.publish(
                            self.topic,
                            message.payload,
                            qos=self.qos,
                            properties=message.properties,
                            timeout=self.settings.connect_timeout * 2,
                        )
                    )
                    in_flight.append((message, publish))
                self.stats.buffered = len(self._buffer)
                self.stats.in_flight = len(in_flight)
                if not in_flight and self._closing:
                    return True
                waits: set[asyncio.Future[Any]] = {watcher, abandoned}
                if in_flight:
                    waits.add(in_flight[0][1])
                woken = None
                if len(in_flight) < self.max_in_flight:
                    self._wakeup.clear()
                    if not self._buffer:
                        woken = asyncio.ensure_future(self._wakeup.wait())
                        waits.add(woken)
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if woken is not None:
                        woken.cancel()
                if watcher.done():
                    watcher.result()  # raises: the connection is gone
        except BaseException as exc:
            self._requeue(in_flight)
            if isinstance(exc, _Abandoned):
                return False
            raise
        finally:
            self.stats.in_flight = 0
            abandoned.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await watcher

    def _requeue(self, in_flight: deque[tuple[_Outgoing, asyncio.Future[None]]]) -> None:
        """After a disconnect: count what was acknowledged; the rest goes back to the front of
        the buffer in order (published again after the reconnection; maybe discarded)."""
        unacknowledged: list[_Outgoing] = []
        for message, publish in in_flight:
            acknowledged = (
                publish.done() and not publish.cancelled() and publish.exception() is None
            )
            if acknowledged and not unacknowledged:  # and all before it too
                self.stats.published += 1
                self.stats.publish_latency.append(time.monotonic() - message.accepted)
                continue
            publish.cancel()
            unacknowledged.append(message)
        self._buffer.extendleft(reversed(unacknowledged))
        self._trim()


class _Abandoned(Exception):
    """The drain timed out while a publish was in flight."""


def _disconnect_with_will(client: aiomqtt.Client) -> None:
    """End the connection with MQTT 5 reason 0x04, so the broker publishes the will."""
    from paho.mqtt.reasoncodes import ReasonCode

    with contextlib.suppress(Exception):
        reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        client._client.disconnect(reasoncode=reason)  # aiomqtt's paho client: no public way


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Returns never; raises ``MqttError`` when the connection drops (aiomqtt's signal for it)."""
    async for _ in client.messages:
        pass
    raise aiomqtt.MqttError("message iteration ended")


# -- subscribing ----


@dataclass(frozen=True)
class ReceivedLatent:
    """A decoded latent with the stream it came from and when it arrived (``time.time()``)."""

    stream_id: str
    latent: Latent
    topic: str
    received_time: float


@dataclass
class SubscriberStats:
    received: int = 0
    decoded: int = 0
    rejected: int = 0
    last_error: str | None = None


class LatentSubscriber:
    """Receives and decodes latents from ``<prefix>/<stream>/latents``; an async iterator.

    - ``streams``: stream ids to follow (default all, ``+``).
    - ``max_payload_bytes``: larger messages are refused: the broker is asked not to send
      packets over this size (MQTT 5 maximum packet size) and any that still arrive are
      counted in ``stats.rejected`` and skipped, as are payloads that do not decode: no
      payload, however hostile, ends the iteration (each is logged as a warning).
    - ``session_expiry``: seconds the broker keeps this subscriber's session and queued QoS 1
      messages while it is disconnected (with a fixed ``identifier``).

    The iterator ends with ``aiomqtt.MqttError`` if the connection drops.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        streams: str | Sequence[str] = "+",
        qos: int = 1,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        identifier: str | None = None,
        session_expiry: int | None = None,
    ) -> None:
        ids = [streams] if isinstance(streams, str) else list(streams)
        self.topics = [latent_topic(settings.prefix, stream) for stream in ids]
        self.settings = settings
        self.qos = qos
        self.max_payload_bytes = max_payload_bytes
        self.stats = SubscriberStats()
        self._identifier = identifier or f"streamvae-sub-{uuid.uuid4().hex[:8]}"
        self._session_expiry = session_expiry
        self._client: aiomqtt.Client | None = None
        self._messages: aiomqtt.client.MessagesIterator | None = None

    async def __aenter__(self) -> LatentSubscriber:
        properties = Properties(PacketTypes.CONNECT)
        properties.MaximumPacketSize = self.max_payload_bytes + _PACKET_OVERHEAD
        if self._session_expiry:
            properties.SessionExpiryInterval = self._session_expiry
        client = self.settings.client(
            identifier=self._identifier,
            clean_start=not self._session_expiry,
            properties=properties,
        )
        await client.__aenter__()
        self._client = client
        try:
            for topic in self.topics:
                await client.subscribe(topic, qos=self.qos)
        except BaseException:
            await self.aclose()
            raise
        self._messages = client.messages
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    def __aiter__(self) -> LatentSubscriber:
        return self

    async def __anext__(self) -> ReceivedLatent:
        if self._messages is None:
            raise RuntimeError("use LatentSubscriber in 'async with' before iterating")
        while True:
            message = await self._messages.__anext__()
            self.stats.received += 1
            topic = str(message.topic)
            payload = message.payload
            try:
                if not isinstance(payload, (bytes, bytearray)):
                    raise WireError(f"payload is {type(payload).__name__}, not bytes")
                latent = decode_latent(payload, max_bytes=self.max_payload_bytes)
                stream_id = topic.split("/")[-2]
            except Exception as exc:  # no payload may end the subscription: count, log, go on
                self.stats.rejected += 1
                self.stats.last_error = f"{topic}: {exc}"
                log.warning("rejected a message on %s: %s", topic, exc)
                continue
            self.stats.decoded += 1
            return ReceivedLatent(stream_id, latent, topic, time.time())
