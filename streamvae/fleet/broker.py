"""Connecting to NATS (credentials kept out of URLs, logs and command lines) and the fleet's
JetStream streams and KV buckets.

>>> settings = NatsSettings.from_url("nats://fleet@127.0.0.1:4222")
>>> settings.display, settings.servers
('nats://fleet@127.0.0.1:4222', ('nats://127.0.0.1:4222',))

Credentials: ``nats://user@host:port`` with the password in ``$STREAMVAE_NATS_PASSWORD`` or a
file (its first line), or a NATS ``.creds`` file (JWT + NKey seed). A password inside the URL is
refused. The password is passed to nats-py on its own, never in a server URL, so it does not
appear in nats-py's reconnect messages either.

**Outages.** nats-py reconnects by itself (forever, ``reconnect_wait`` apart, with jitter) and
buffers publishes meanwhile; the fleet's own calls that fail while the server is away are
retried by the caller with :class:`streamvae.io.backoff.Backoff`. Nothing in a worker's stream
state depends on the connection, so an outage costs time, never state.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import nats
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from streamvae.fleet.names import (
    FRAMES_STREAM,
    LATENTS_STREAM,
    LEASES_BUCKET,
    PROGRESS_BUCKET,
    STREAMS_BUCKET,
    WORKERS_BUCKET,
)
from streamvae.io.backoff import Backoff
from streamvae.io.redact import redact_url

__all__ = [
    "NATS_PASSWORD_ENV",
    "FleetBuckets",
    "NatsSettings",
    "connect",
    "ensure_frames_stream",
    "ensure_latents_stream",
    "open_bucket",
    "open_buckets",
    "retrying",
]

log = logging.getLogger(__name__.rpartition(".")[0])  # one logger for the fleet: streamvae.fleet

NATS_PASSWORD_ENV = "STREAMVAE_NATS_PASSWORD"
"""The environment variable the NATS password is read from (unless a password file is given)."""

T = TypeVar("T")


@dataclass(frozen=True)
class NatsSettings:
    """Where and how to connect; the password never shows in ``repr`` or :attr:`display`."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    reconnect_wait: float = 0.5
    connect_timeout: float = 2.0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password_file: str | os.PathLike[str] | None = None,
        password_env: str = NATS_PASSWORD_ENV,
        creds_file: str | None = None,
        **options: Any,
    ) -> NatsSettings:
        """``nats://[user@]host[:port][,host2:port2...]`` (``tls://`` for TLS).

        The password comes from ``password_file`` (first line) or ``$password_env``; one inside
        the URL is refused.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls"):
            raise ValueError(f"a NATS URL starts with nats:// or tls://, got {redact_url(url)!r}")
        if "@" in parts.netloc and ":" in parts.netloc.split("@", 1)[0]:
            raise ValueError(
                f"refusing a password inside the NATS URL; give it in ${password_env} or a "
                "password file (--nats-password-file) instead"
            )
        user, _, hosts = parts.netloc.rpartition("@")
        if not hosts:
            raise ValueError(f"no host in NATS URL {redact_url(url)!r}")
        servers = []
        for host in hosts.split(","):
            if not host:
                raise ValueError(f"empty host in NATS URL {redact_url(url)!r}")
            servers.append(f"{parts.scheme}://{host if ':' in host else host + ':4222'}")
        password = None
        if password_file is not None:
            lines = Path(password_file).read_text().splitlines()
            password = lines[0] if lines else ""
        elif os.environ.get(password_env):
            password = os.environ[password_env]
        if creds_file is not None and not Path(creds_file).is_file():
            raise FileNotFoundError(f"no NATS credentials file at {creds_file!r}")
        return cls(
            servers=tuple(servers),
            user=unquote(user) if user else None,
            password=password,
            creds_file=creds_file,
            **options,
        )

    @property
    def display(self) -> str:
        user = f"{self.user}@" if self.user else ""
        hosts = ",".join(s.split("://", 1)[1] for s in self.servers)
        scheme = self.servers[0].split("://", 1)[0]
        return f"{scheme}://{user}{hosts}"

    def redact(self, text: str) -> str:
        return text.replace(self.password, "***") if self.password else text


async def connect(settings: NatsSettings, *, name: str, backoff: Backoff | None = None) -> Any:
    """A connected nats-py client that reconnects forever; the first connection is retried too.

    Disconnections and reconnections are logged (INFO), without credentials.
    """
    backoff = backoff or Backoff(initial=0.2, maximum=5.0)

    async def on_error(exc: Exception) -> None:
        log.warning(
            "NATS %s: %s", settings.display, settings.redact(str(exc) or type(exc).__name__)
        )

    async def on_disconnected() -> None:
        log.info("NATS %s: disconnected", settings.display)

    async def on_reconnected() -> None:
        log.warning("NATS %s: reconnected", settings.display)

    options: dict[str, Any] = {
        "servers": list(settings.servers),
        "name": name,
        "reconnect_time_wait": settings.reconnect_wait,
        "connect_timeout": settings.connect_timeout,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    if settings.user is not None:
        options["user"] = settings.user
        options["password"] = settings.password or ""
    if settings.creds_file is not None:
        options["user_credentials"] = settings.creds_file
    # The first connection is tried once per attempt here (so refused credentials end it);
    # once connected, nats-py reconnects forever by itself.
    options["allow_reconnect"] = False
    while True:
        try:
            nc = await nats.connect(**options)
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            return nc
        except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            delay = backoff.next_delay()
            message = settings.redact(str(exc) or type(exc).__name__)
            if "authorization" in message.lower():
                raise PermissionError(f"NATS {settings.display} refused the credentials") from None
            log.warning("NATS %s: %s; retrying in %.1f s", settings.display, message, delay)
            await asyncio.sleep(delay)


async def retrying(
    what: str, call: Callable[[], Awaitable[T]], *, backoff: Backoff | None = None
) -> T:
    """``await call()``, retried with backoff while NATS is unreachable (timeouts, no responders,
    a connection being re-established); other errors propagate."""
    backoff = backoff or Backoff(initial=0.1, maximum=2.0)
    while True:
        try:
            return await call()
        except (asyncio.TimeoutError, nats.errors.Error, OSError) as exc:
            if isinstance(exc, (NotFoundError, BadRequestError)):
                raise
            delay = backoff.next_delay()
            log.info("%s: %s; retrying in %.1f s", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)


async def ensure_frames_stream(js: JetStreamContext, retain: int) -> None:
    """``SVAE_FRAMES`` on ``svae.frames.>``, keeping at least ``retain`` frames per subject.

    An existing stream with a smaller per-subject limit is raised to ``retain``; a larger one
    is kept (another ingest may need it).
    """
    config = StreamConfig(
        name=FRAMES_STREAM,
        subjects=["svae.frames.>"],
        max_msgs_per_subject=retain,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=120.0,
    )
    await _ensure_stream(js, config, lambda old: (old.max_msgs_per_subject or 0) < retain)


async def ensure_latents_stream(js: JetStreamContext, retain: int = 4096) -> None:
    """``SVAE_LATENTS`` on ``svae.latents.>``: the last ``retain`` latents per stream, and a
    two-minute ``Nats-Msg-Id`` window that drops a latent published twice around a takeover."""
    config = StreamConfig(
        name=LATENTS_STREAM,
        subjects=["svae.latents.>"],
        max_msgs_per_subject=retain,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=120.0,
    )
    await _ensure_stream(js, config, lambda old: False)


async def _ensure_stream(
    js: JetStreamContext, config: StreamConfig, needs_update: Callable[[Any], bool]
) -> None:
    name = config.name
    assert name is not None, "the fleet's stream configs are always named"
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError:  # created meanwhile by another process
            info = await js.stream_info(name)
    if needs_update(info.config):
        info.config.max_msgs_per_subject = config.max_msgs_per_subject
        await js.update_stream(info.config)


@dataclass
class FleetBuckets:
    """The fleet's KV buckets (see :mod:`streamvae.fleet.names`)."""

    streams: KeyValue
    leases: KeyValue
    progress: KeyValue
    workers: KeyValue


async def open_bucket(js: JetStreamContext, name: str, *, ttl: float | None = None) -> KeyValue:
    """Open (or create) KV bucket ``name``; one with another TTL than ``ttl`` is refused."""
    try:
        kv = await js.key_value(name)
    except (NotFoundError, nats.js.errors.BucketNotFoundError):
        try:
            return await js.create_key_value(
                KeyValueConfig(bucket=name, history=1, ttl=ttl, storage=StorageType.FILE)
            )
        except BadRequestError:  # created meanwhile by another process
            kv = await js.key_value(name)
    if ttl is not None:
        status = await kv.status()
        if status.ttl is not None and abs(status.ttl - ttl) > 1e-3:
            raise ValueError(
                f"bucket {name} has a TTL of {status.ttl} s, this worker {ttl} s; give every "
                "worker the same --lease-ttl (or delete the bucket)"
            )
    return kv


async def open_buckets(js: JetStreamContext, *, lease_ttl: float) -> FleetBuckets:
    """Open (or create) the buckets; ``lease_ttl`` seconds is the lease and worker-record TTL.

    The leases bucket's TTL is fixed when it is created: a worker with another ``lease_ttl``
    is refused rather than silently holding leases of another length.
    """
    return FleetBuckets(
        streams=await open_bucket(js, STREAMS_BUCKET),
        leases=await open_bucket(js, LEASES_BUCKET, ttl=lease_ttl),
        progress=await open_bucket(js, PROGRESS_BUCKET),
        workers=await open_bucket(js, WORKERS_BUCKET, ttl=lease_ttl),
    )
