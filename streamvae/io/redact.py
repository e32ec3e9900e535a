"""Keeping passwords out of messages.

>>> redact_url("rtsp://admin:hunter2@10.0.0.5:554/stream")
'rtsp://admin:***@10.0.0.5:554/stream'
>>> redact_url("http://10.0.0.5/video.cgi?user=admin&pwd=hunter2&channel=1")
'http://10.0.0.5/video.cgi?user=admin&pwd=***&channel=1'
>>> redact_url("mqtt://broker:1883/lab")
'mqtt://broker:1883/lab'
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["SECRET_QUERY_KEYS", "redact_url"]

SECRET_QUERY_KEYS = re.compile(
    r"pass|pwd|secret|token|auth|key|sig|cred|session|ticket", re.IGNORECASE
)
"""Query parameters whose values are masked: any name containing one of these (IP cameras take
``?user=...&pwd=...``; signed URLs ``?token=...``, ``?signature=...``)."""

_QUERY_PAIR = re.compile(r"(?P<key>[^&;=]*)=(?P<value>[^&;]*)")


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part and the values of secret-looking
    query parameters (see :data:`SECRET_QUERY_KEYS`) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:  # a malformed URL: show nothing after the scheme rather than a secret
        return url.split("://", 1)[0] + "://***"
    if password is not None:
        netloc = f"{parts.username}:***@{parts.hostname or ''}" + (f":{port}" if port else "")
        parts = parts._replace(netloc=netloc)
    if parts.query:
        parts = parts._replace(query=_QUERY_PAIR.sub(_mask_pair, parts.query))
    if parts.fragment and "=" in parts.fragment:
        parts = parts._replace(fragment=_QUERY_PAIR.sub(_mask_pair, parts.fragment))
    return parts.geturl() if (password is not None or parts.query or parts.fragment) else url


def _mask_pair(match: re.Match[str]) -> str:
    key = match["key"]
    return f"{key}=***" if SECRET_QUERY_KEYS.search(key) else match[0]
