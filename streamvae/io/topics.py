"""MQTT topic names and the checks that keep a stream id to one safe topic level.

>>> latent_topic("lab/floor1", "cam1")
'lab/floor1/cam1/latents'
>>> latent_topic("lab", "cam1/#")
Traceback (most recent call last):
...
ValueError: stream id must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit (no '/', '+', '#' or spaces); got 'cam1/#'
"""

from __future__ import annotations

import re

__all__ = ["PASSWORD_ENV", "latent_topic", "status_topic", "validate_prefix", "validate_stream_id"]

PASSWORD_ENV = "STREAMVAE_MQTT_PASSWORD"
"""The environment variable the MQTT password is read from (unless a password file is given)."""

_STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def validate_stream_id(stream_id: str) -> str:
    """Return ``stream_id`` if it is safe as one topic level, else raise ``ValueError``.

    >>> validate_stream_id("cam-1")
    'cam-1'
    >>> validate_stream_id("cam/#")
    Traceback (most recent call last):
    ...
    ValueError: stream id must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit (no '/', '+', '#' or spaces); got 'cam/#'
    """
    if not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id):
        raise ValueError(
            "stream id must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or "
            f"digit (no '/', '+', '#' or spaces); got {stream_id!r}"
        )
    return stream_id


def validate_prefix(prefix: str) -> str:
    """A topic prefix: ``/``-separated non-empty levels without ``+``, ``#``, NUL or a leading ``$``."""
    levels = prefix.split("/")
    if (
        not prefix
        or len(prefix) > 200
        or prefix.startswith("$")
        or any(not level or set(level) & {"+", "#", "\0"} for level in levels)
    ):
        raise ValueError(
            "topic prefix must be non-empty '/'-separated levels without '+', '#', empty levels "
            f"or a leading '$'; got {prefix!r}"
        )
    return prefix


def latent_topic(prefix: str, stream_id: str) -> str:
    """``<prefix>/<stream_id>/latents`` (``stream_id`` may be ``+`` to subscribe to all)."""
    if stream_id != "+":
        validate_stream_id(stream_id)
    return f"{validate_prefix(prefix)}/{stream_id}/latents"


def status_topic(prefix: str, stream_id: str) -> str:
    """``<prefix>/<stream_id>/status``: retained ``online``/``offline`` JSON."""
    if stream_id != "+":
        validate_stream_id(stream_id)
    return f"{validate_prefix(prefix)}/{stream_id}/status"
