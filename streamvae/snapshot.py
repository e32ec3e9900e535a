"""The snapshot format of one stream's state: safetensors bytes with a fingerprint of the model.

:meth:`streamvae.StreamEncoder.snapshot` writes, :meth:`~streamvae.StreamEncoder.restore` reads.
One safetensors file: the tensors of :meth:`streamvae.model.EncoderState.memory` (plus the
stream's pending input frames, ``group``) and string metadata:

==================  ===========================================================================
``format``          ``streamvae.stream-state/1``
``model``           :func:`weights_fingerprint` of the encoder (sha256 of every weight's name,
                    dtype, shape and bytes, and the config)
``dtype``           the encoder's dtype (``float32``, ``bfloat16``, ...)
``size``            the frame size, ``"HxW"``
``mode``            ``frame`` or ``group``
``state``           JSON: the stream's counters (frames, latents, timestamps, ...) and the
                    layers' counters
==================  ===========================================================================

The weights themselves are never in a snapshot, and nothing in it is unpickled: safetensors
holds only tensors and strings, and :func:`unpack` checks the header before loading.

>>> from streamvae import StreamEncoder, WanEncoder, narrow
>>> import numpy as np
>>> encoder = WanEncoder(narrow(8)).eval()
>>> stream = StreamEncoder(encoder)
>>> _ = stream.push_many([np.zeros((16, 16, 3), np.uint8)] * 6)
>>> data = stream.snapshot()
>>> other = StreamEncoder(encoder)
>>> other.restore(data)
>>> other.frames_pushed, other.latents_emitted
(6, 2)
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from typing import Any

import safetensors.torch
import torch

from streamvae.model import WanDecoder, WanEncoder

__all__ = [
    "SNAPSHOT_FORMAT",
    "SnapshotError",
    "dtype_name",
    "pack",
    "unpack",
    "weights_fingerprint",
]

SNAPSHOT_FORMAT = "streamvae.stream-state/1"
MAX_HEADER_BYTES = 1 << 20

_FINGERPRINTS: weakref.WeakKeyDictionary[WanEncoder | WanDecoder, tuple[Any, str]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


class SnapshotError(ValueError):
    """A snapshot was refused (another model, size, dtype or mode, or not a snapshot at all).

    The stream it was meant for is unchanged.
    """


def weights_fingerprint(encoder: WanEncoder | WanDecoder) -> str:
    """sha256 over the config and every tensor's name, dtype, shape and bytes; cached per encoder.

    The cache is keyed on the tensors' addresses and versions, so moving, casting or changing
    the weights in place computes it again.
    """
    tensors = list(encoder.state_dict().items())
    key = (encoder.config, *((t.data_ptr(), t._version, t.dtype, t.device) for _, t in tensors))
    with _LOCK:
        cached = _FINGERPRINTS.get(encoder)
        if cached is not None and cached[0] == key:
            return cached[1]
    digest = hashlib.sha256(repr(encoder.config).encode())
    for name, tensor in tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{cpu.dtype}:{tuple(cpu.shape)}".encode())
        digest.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
    result = digest.hexdigest()
    with _LOCK:
        _FINGERPRINTS[encoder] = (key, result)
    return result


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Tensors (any device, any layout) and string metadata as safetensors bytes."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return safetensors.torch.save(cpu, metadata={"format": SNAPSHOT_FORMAT, **metadata})


def unpack(data: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What :func:`pack` wrote; :class:`SnapshotError` for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"a snapshot is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise SnapshotError(f"{len(data)} bytes are too short for a snapshot")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise SnapshotError(f"not a snapshot: header of {size} bytes in {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnapshotError(f"not a snapshot: the header is not JSON ({exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != SNAPSHOT_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise SnapshotError(
            f"not a streamvae snapshot: format {found!r}, expected {SNAPSHOT_FORMAT!r}"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotError(f"safetensors refused the snapshot: {exc}") from None
    return tensors, metadata


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")
