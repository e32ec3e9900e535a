"""Keeping passwords out of messages.

>>> redact_url("rtsp://admin:hunter2@10.0.0.5:554/stream")
'rtsp://admin:***@10.0.0.5:554/stream'
>>> redact_url("mqtt://broker:1883/lab")
'mqtt://broker:1883/lab'
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["redact_url"]


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:  # a malformed URL: show nothing after the scheme rather than a secret
        return url.split("://", 1)[0] + "://***"
    if password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname or ''}" + (f":{port}" if port else "")
    return parts._replace(netloc=netloc).geturl()
