"""Frame messages on ``svae.frames.<stream-id>``: one frame, its index, run and capture time.

Payload: the frame as ``raw`` RGB bytes (``H * W * 3``), ``png`` (lossless) or ``jpeg``;
headers ``Svae-Index`` (frame number in the run, from 0), ``Svae-Run`` (the run id: a new one
each time the ingest restarts or its source reconnects), ``Svae-Time`` (capture time, seconds
since the epoch), ``Svae-Codec`` and ``Svae-Size`` (``HxW``), and ``Nats-Msg-Id``
``<stream>:<run>:<index>`` so a publish retried after a lost acknowledgement is stored once.
The end of a run is a message with ``Svae-End: 1`` and no payload.

>>> import numpy as np
>>> image = np.zeros((16, 24, 3), np.uint8)
>>> payload, headers = encode_frame(
...     image, index=5, run="r1", timestamp=12.5, codec="png", stream_id="cam1"
... )
>>> decoded = decode_frame(headers, payload)
>>> decoded.index, decoded.run, decoded.timestamp, decoded.image.shape
(5, 'r1', 12.5, (16, 24, 3))
>>> decode_frame({**headers, "Svae-Codec": "webp"}, payload)
Traceback (most recent call last):
...
streamvae.fleet.messages.FrameMessageError: unknown frame codec 'webp' (expected raw, png, jpeg)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from streamvae.fleet.names import (
    HEADER_CODEC,
    HEADER_END,
    HEADER_INDEX,
    HEADER_RUN,
    HEADER_SIZE,
    HEADER_TIME,
)

__all__ = [
    "CODECS",
    "FrameMessage",
    "FrameMessageError",
    "declared_size",
    "decode_frame",
    "encode_frame",
    "end_headers",
    "is_end",
    "latent_headers",
]

CODECS = ("raw", "png", "jpeg")
MAX_SIDE = 8192


class FrameMessageError(ValueError):
    """A frame message was refused; the message says why."""


@dataclass(frozen=True)
class FrameMessage:
    """A decoded frame message: RGB uint8 ``[H, W, 3]`` plus where it belongs."""

    image: np.ndarray
    index: int
    run: str
    timestamp: float | None


def encode_frame(
    image: np.ndarray,
    *,
    index: int,
    run: str,
    timestamp: float | None,
    codec: str,
    stream_id: str,
    jpeg_quality: int = 90,
) -> tuple[bytes, dict[str, str]]:
    """``(payload, headers)`` of one RGB uint8 ``[H, W, 3]`` frame."""
    if codec not in CODECS:
        raise ValueError(f"frame codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"frames are RGB uint8 [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if codec == "raw":
        payload = np.ascontiguousarray(image).tobytes()
    else:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if codec == "jpeg" else []
        ok, buffer = cv2.imencode(".png" if codec == "png" else ".jpg", bgr, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {height}x{width} frame as {codec}")
        payload = buffer.tobytes()
    headers = {
        HEADER_INDEX: str(index),
        HEADER_RUN: run,
        HEADER_CODEC: codec,
        HEADER_SIZE: f"{height}x{width}",
        "Nats-Msg-Id": f"{stream_id}:{run}:{index}",
    }
    if timestamp is not None:
        headers[HEADER_TIME] = repr(float(timestamp))
    return payload, headers


def end_headers(*, run: str, frames: int, stream_id: str) -> dict[str, str]:
    """Headers of the message that ends run ``run`` after ``frames`` frames."""
    return {
        HEADER_END: "1",
        HEADER_RUN: run,
        HEADER_INDEX: str(frames),
        "Nats-Msg-Id": f"{stream_id}:{run}:end",
    }


def latent_headers(*, stream_id: str, run: str, index: int) -> dict[str, str]:
    """Headers of latent ``index`` of run ``run`` on ``svae.latents.<stream_id>``.

    ``Nats-Msg-Id`` (``<stream>:<run>:<index>``) is what makes a latent published twice (by a
    worker that died after publishing, then by the one that took over) stored once: JetStream
    drops a message whose id it has seen within the stream's duplicate window.

    >>> latent_headers(stream_id="door", run="r1", index=7)["Nats-Msg-Id"]
    'door:r1:7'
    """
    return {
        "Nats-Msg-Id": f"{stream_id}:{run}:{index}",
        "Svae-Stream": stream_id,
        HEADER_RUN: run,
        HEADER_INDEX: str(index),
    }


def is_end(headers: Mapping[str, str] | None) -> bool:
    return headers is not None and headers.get(HEADER_END) == "1"


def decode_frame(
    headers: Mapping[str, str] | None, payload: bytes, *, size: tuple[int, int] | None = None
) -> FrameMessage:
    """The frame of a message; :class:`FrameMessageError` if it does not decode, is not of
    ``size`` (when given), or names an unknown codec."""
    headers = headers or {}
    try:
        index = int(headers[HEADER_INDEX])
        run = headers[HEADER_RUN]
        codec = headers[HEADER_CODEC]
        height, width = (int(v) for v in headers[HEADER_SIZE].split("x"))
        stamp = float(headers[HEADER_TIME]) if HEADER_TIME in headers else None
    except KeyError as exc:
        raise FrameMessageError(f"frame message lacks the header {exc.args[0]}") from None
    except ValueError as exc:
        raise FrameMessageError(f"malformed frame header: {exc}") from None
    if index < 0 or not run or (stamp is not None and not math.isfinite(stamp)):
        raise FrameMessageError(f"frame header out of range: index={index}, run={run!r}")
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise FrameMessageError(f"frame size {height}x{width} is out of range")
    if size is not None and (height, width) != size:
        raise FrameMessageError(
            f"frame {index} is {height}x{width}, this stream's frames are {size[0]}x{size[1]}"
        )
    if codec not in CODECS:
        raise FrameMessageError(f"unknown frame codec {codec!r} (expected {', '.join(CODECS)})")
    if codec == "raw":
        if len(payload) != height * width * 3:
            raise FrameMessageError(
                f"raw frame {index} has {len(payload)} bytes, a {height}x{width} RGB frame "
                f"{height * width * 3}"
            )
        image: np.ndarray = np.frombuffer(payload, np.uint8).reshape(height, width, 3).copy()
    else:
        # The image's own header first: a small message may declare a huge image (an image
        # bomb); nothing is decoded unless it declares the size the message says.
        declared = declared_size(codec, payload)
        if declared is None:
            raise FrameMessageError(f"{codec} frame {index} does not decode (no valid header)")
        if declared != (height, width):
            raise FrameMessageError(
                f"{codec} frame {index} declares {declared[0]}x{declared[1]} in its image "
                f"header, its message header says {height}x{width}; not decoded"
            )
        bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FrameMessageError(f"{codec} frame {index} does not decode")
        if bgr.shape[:2] != (height, width):
            raise FrameMessageError(
                f"{codec} frame {index} decodes to {bgr.shape[0]}x{bgr.shape[1]}, its header "
                f"says {height}x{width}"
            )
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return FrameMessage(image, index, run, stamp)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...; not DHT, JPG, DAC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def declared_size(codec: str, payload: bytes) -> tuple[int, int] | None:
    """``(height, width)`` as a PNG's IHDR or a JPEG's start-of-frame declares it, read from the
    bytes alone (nothing is decoded); ``None`` if there is no such header.

    >>> png = cv2.imencode(".png", np.zeros((16, 24, 3), np.uint8))[1].tobytes()
    >>> declared_size("png", png), declared_size("jpeg", png)
    ((16, 24), None)
    """
    data = memoryview(payload)
    if codec == "png":
        if len(data) < 24 or bytes(data[:8]) != _PNG_SIGNATURE or bytes(data[12:16]) != b"IHDR":
            return None
        width = int.from_bytes(data[16:20], "big")
        height = int.from_bytes(data[20:24], "big")
        return height, width
    if codec == "jpeg":
        if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
            return None
        at = 2
        while at + 4 <= len(data):
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
                at += 2
                continue
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            if marker in _JPEG_SOF:
                if at + 9 > len(data) or length < 7:
                    return None
                height = int.from_bytes(data[at + 5 : at + 7], "big")
                width = int.from_bytes(data[at + 7 : at + 9], "big")
                return height, width
            if marker in (0xD9, 0xDA) or length < 2:  # end, or scan data before any frame
                return None
            at += 2 + length
        return None
    return None
