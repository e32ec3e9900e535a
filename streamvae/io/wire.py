"""The wire format of one latent: the bytes of a safetensors file, never a pickle.

One tensor named ``latent`` (``[z_dim, h, w]``: 16 channels for Wan 2.1, 48 for Wan 2.2; float32
unless another storage dtype is chosen) and string metadata:

========================  ===================================================================
``format``                ``streamvae.latent/1``
``index``                 the latent's index in its run (``"0"``, ``"1"``, ...)
``frames``                the source frames it covers, ``"start:stop"`` (``"1:5"``)
``timestamps``            their capture times, a JSON list (``null`` where unknown)
``ready_time``            when the latent was ready (seconds since the epoch)
``padded`` / ``gap``      as in :class:`streamvae.Latent` (``"0"``, ``"true"``/``"false"``)
``source_frames``         the source's numbers of those frames, a JSON list (``null`` where
                          unknown; ``[]`` when the frames carried none)
``dropped_before``        source frames missing since the previous latent of the run (``"0"``)
``dtype``                 the storage dtype (``float32``, ``float16``, ``bfloat16``)
labels                    added by the sinks: ``stream``, ``run``, ``model``, ``config``
                          (``wan2.1``, ``wan2.2``, ...), ``z_dim``, ``stride`` (``4x16x16``),
                          ``normalization`` (``wan2.1``, ``wan2.2`` or ``none``),
                          ``meaningless`` (``"true"`` for random weights)
``approximate``           ``"true"`` only on a latent of a stream resumed from fewer frames
                          than the receptive field (absent otherwise)
========================  ===================================================================

>>> import torch
>>> from streamvae import Latent
>>> latent = Latent(torch.zeros(16, 4, 4), index=1, frames=range(1, 5), timestamps=(1.0,) * 4)
>>> decoded = decode_latent(encode_latent(latent, {"stream": "cam1"}))
>>> decoded.index, decoded.frames, decoded.meta["stream"]
(1, range(1, 5), 'cam1')

:func:`decode_latent` checks the header itself before handing anything to safetensors: size
limits, exactly the expected tensor, dtype, shape and offsets, and string-only metadata, so a
truncated, oversized or hostile payload is refused with :class:`WireError`. ``source_frames``
and ``dropped_before`` are optional when decoding (payloads from before they existed decode with
``()`` and ``0``). A latent with NaN or infinite values (e.g. a float16 overflow) is refused at
both ends: :func:`encode_latent` raises ``ValueError`` and :func:`decode_latent` ``WireError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from streamvae.stream import Latent

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_HEADER_BYTES",
    "STORAGE_DTYPES",
    "WIRE_FORMAT",
    "WireError",
    "decode_latent",
    "encode_latent",
]

WIRE_FORMAT = "streamvae.latent/1"
CONTENT_TYPE = "application/vnd.streamvae.latent+safetensors"
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
"""Default limit on a received payload: a 1080x1920 latent in float32 is 2 MiB."""

STORAGE_DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "float32": (torch.float32, "F32", 4),
    "float16": (torch.float16, "F16", 2),
    "bfloat16": (torch.bfloat16, "BF16", 2),
}
_BY_CODE = {code: (name, size) for name, (_, code, size) in STORAGE_DTYPES.items()}
_REQUIRED = frozenset(
    {"format", "index", "frames", "timestamps", "ready_time", "padded", "gap", "dtype"}
)
_OPTIONAL = frozenset({"source_frames", "dropped_before", "approximate"})
_RESERVED = _REQUIRED | _OPTIONAL
_MAX_CHANNELS = 1024
_MAX_TIMESTAMPS = 64
_MAX_COUNT = 2**63 - 1  # indices and frame numbers are int64 everywhere downstream
_MAX_EXACT_SECONDS = 2**53  # larger JSON integers are no time anyone means (and may overflow)


class WireError(ValueError):
    """A payload is not a valid streamvae latent; the message says what is wrong."""


def encode_latent(
    latent: Latent, labels: Mapping[str, str] | None = None, *, dtype: str = "float32"
) -> bytes:
    """One latent as safetensors bytes: the tensor ``latent`` plus string metadata.

    ``labels`` and ``latent.meta`` are added to the metadata (string keys and values; they may
    not reuse the format's own keys).
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    extra = {**latent.meta, **(labels or {})}
    clash = (_RESERVED | _OPTIONAL) & set(extra)
    if clash:
        raise ValueError(f"labels may not use the wire format's own keys {sorted(clash)}")
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"labels must map str to str, got {key!r}: {value!r}")
    metadata = {
        "format": WIRE_FORMAT,
        "index": str(latent.index),
        "frames": f"{latent.frames.start}:{latent.frames.stop}",
        "timestamps": json.dumps(list(latent.timestamps)),
        "ready_time": repr(float(latent.ready_time)),
        "padded": str(latent.padded),
        "gap": "true" if latent.gap else "false",
        "source_frames": json.dumps(list(latent.source_frames)),
        "dropped_before": str(latent.dropped_before),
        "dtype": dtype,
        **({"approximate": "true"} if latent.approximate else {}),
        **extra,
    }
    data = latent.data.detach().to("cpu", STORAGE_DTYPES[dtype][0]).contiguous()
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        raise ValueError(
            f"latent {latent.index} has {bad} NaN or infinite value(s) in {dtype} (of "
            f"{data.numel()}); refusing to send it"
            + (
                " (float16 overflows beyond 65504: store float32 or bfloat16)"
                if dtype == "float16"
                else ""
            )
        )
    return safetensors.torch.save({"latent": data}, metadata=metadata)


def decode_latent(
    payload: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> Latent:
    """A payload made by :func:`encode_latent` back into a :class:`streamvae.Latent`.

    ``data`` is float32 whatever the storage dtype; ``meta`` holds the labels (``stream``,
    ``model``, ...). Raises :class:`WireError` for anything else, payloads over ``max_bytes``
    included.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"a latent payload is bytes, got {type(payload).__name__}")
    try:
        return _decode(bytes(payload), max_bytes)
    except WireError:
        raise
    except Exception as exc:  # a decoder bug must not end a subscriber: it is a refusal too
        raise WireError(f"payload refused: {type(exc).__name__}: {exc}") from None


def _decode(payload: bytes, max_bytes: int) -> Latent:
    if len(payload) > max_bytes:
        raise WireError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")
    if len(payload) < 8:
        raise WireError(f"payload of {len(payload)} bytes is too short for a safetensors header")
    header_size = int.from_bytes(payload[:8], "little")
    if header_size > MAX_HEADER_BYTES:
        raise WireError(f"header of {header_size} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if 8 + header_size > len(payload):
        raise WireError(
            f"truncated payload: the header says {header_size} bytes, {len(payload) - 8} follow"
        )
    header = _parse_header(payload[8 : 8 + header_size])
    metadata = _check_metadata(header.pop("__metadata__", None))
    shape = _check_tensor_entry(header, data_bytes=len(payload) - 8 - header_size)
    try:
        data = safetensors.torch.load(payload)["latent"]
    except Exception as exc:  # safetensors raises its own error types
        raise WireError(f"safetensors refused the payload: {exc}") from None
    if tuple(data.shape) != shape:
        raise WireError(f"tensor shape {tuple(data.shape)} differs from its header {shape}")
    if not bool(torch.isfinite(data).all()):
        raise WireError("the latent holds NaN or infinite values")
    return _latent_from(data.float(), metadata)


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    names = set(header) - {"__metadata__"}
    if names != {"latent"}:
        raise WireError(f"payload must hold exactly one tensor named 'latent', got {sorted(names)}")
    return header


def _check_metadata(metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise WireError("payload has no metadata (a streamvae latent always has some)")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise WireError(f"metadata values must be strings, {key!r} is {type(value).__name__}")
    if metadata.get("format") != WIRE_FORMAT:
        raise WireError(f"metadata format is {metadata.get('format')!r}, expected {WIRE_FORMAT!r}")
    missing = _REQUIRED - set(metadata)
    if missing:
        raise WireError(f"metadata lacks {sorted(missing)}")
    return metadata


def _check_tensor_entry(header: dict[str, Any], *, data_bytes: int) -> tuple[int, ...]:
    entry = header["latent"]
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise WireError("tensor entry must have exactly dtype, shape and data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in _BY_CODE:
        raise WireError(f"tensor dtype {code!r} is not one of {sorted(_BY_CODE)}")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(type(v) is int and v > 0 for v in shape)
        or shape[0] > _MAX_CHANNELS
    ):
        raise WireError(f"tensor shape must be [channels, h, w] of positive sizes, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(v) is int for v in offsets)
    ):
        raise WireError(f"data_offsets must be two integers, got {offsets!r}")
    nbytes = math.prod(shape) * _BY_CODE[code][1]
    if offsets != [0, nbytes]:
        raise WireError(f"data_offsets {offsets} do not match a {code} tensor of shape {shape}")
    if data_bytes != nbytes:
        raise WireError(f"the tensor needs {nbytes} bytes of data, the payload has {data_bytes}")
    return tuple(shape)


def _finite_number(value: Any) -> bool:
    """A JSON number that is finite as a float (an integer of 310+ digits is not)."""
    if type(value) is int:
        return abs(value) <= _MAX_EXACT_SECONDS
    return type(value) is float and math.isfinite(value)


def _latent_from(data: torch.Tensor, metadata: dict[str, str]) -> Latent:
    try:
        index = int(metadata["index"])
        start, stop = (int(v) for v in metadata["frames"].split(":"))
        stamps = json.loads(metadata["timestamps"])
        ready_time = float(metadata["ready_time"])
        padded = int(metadata["padded"])
        numbers = json.loads(metadata.get("source_frames", "[]"))
        dropped = int(metadata.get("dropped_before", "0"))
    except (ValueError, RecursionError, OverflowError) as exc:
        raise WireError(f"malformed metadata: {exc}") from None
    if (
        not 0 <= index <= _MAX_COUNT
        or not 0 <= start <= stop <= _MAX_COUNT
        or not 0 <= padded <= _MAX_COUNT
        or not math.isfinite(ready_time)
    ):
        raise WireError(
            f"metadata out of range: index={index}, frames={start}:{stop}, padded={padded}"
        )
    if (
        not isinstance(stamps, list)
        or len(stamps) > _MAX_TIMESTAMPS
        or not all(s is None or _finite_number(s) for s in stamps)
    ):
        raise WireError("timestamps must be a JSON list of finite numbers or nulls")
    if (
        not isinstance(numbers, list)
        or len(numbers) > _MAX_TIMESTAMPS
        or not all(n is None or (type(n) is int and 0 <= n <= _MAX_COUNT) for n in numbers)
        or not 0 <= dropped <= _MAX_COUNT
    ):
        raise WireError(
            "source_frames must be a JSON list of frame numbers or nulls, and dropped_before "
            "a count"
        )
    if metadata["gap"] not in ("true", "false"):
        raise WireError(f"gap must be 'true' or 'false', got {metadata['gap']!r}")
    labels = {key: value for key, value in metadata.items() if key not in _RESERVED | _OPTIONAL}
    return Latent(
        data=data,
        index=index,
        frames=range(start, stop),
        timestamps=tuple(None if s is None else float(s) for s in stamps),
        ready_time=ready_time,
        padded=padded,
        gap=metadata["gap"] == "true",
        meta=labels,
        source_frames=tuple(numbers),
        dropped_before=dropped,
        approximate=metadata.get("approximate") == "true",
    )
