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
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from streamvae.frames import SPATIAL_MULTIPLE
from streamvae.model import WanDecoder, WanEncoder

__all__ = [
    "SNAPSHOT_FORMAT",
    "SnapshotError",
    "SnapshotState",
    "dtype_name",
    "pack",
    "read_state",
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


@dataclass(frozen=True)
class SnapshotState:
    """A snapshot's counters, each checked (:func:`read_state`); what ``restore`` sets."""

    height: int
    width: int
    frames: int
    latents: int
    timestamps: list[float | None]
    numbers: list[int | None]
    last_number: int | None
    gap_pending: bool
    exact_from: int
    dropped_frames: int
    last_slot: int
    layers: dict[str, int]


def read_state(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, group_size: int
) -> SnapshotState:
    """The counters of a snapshot (as :func:`unpack` gives it), every one checked, its tensors
    checked to be finite: :class:`SnapshotError` naming the first thing wrong, before a
    stream is touched.

    The counters must agree with each other as a stream makes them: ``latents`` is what
    ``frames`` complete in groups of ``group_size`` (``1 + (frames - 1) // group_size``), and
    there is a timestamp (and a frame number) for each frame no emitted latent has taken yet.

    >>> import torch
    >>> read_state({"group": torch.zeros(1, 3, 1, 16, 16)}, {"size": "16x16", "state": "{}"},
    ...            group_size=4)
    Traceback (most recent call last):
    ...
    streamvae.snapshot.SnapshotError: malformed snapshot metadata: 'frames' is missing
    """
    try:
        size = metadata["size"]
        text = metadata["state"]
    except KeyError as exc:
        raise SnapshotError(f"malformed snapshot metadata: no {exc.args[0]!r}") from None
    parts = size.split("x") if isinstance(size, str) else []
    if len(parts) != 2 or not all(
        p.isdigit() and int(p) > 0 and int(p) % SPATIAL_MULTIPLE == 0 for p in parts
    ):
        raise SnapshotError(
            f"malformed snapshot metadata: size {size!r} is not HxW (multiples of "
            f"{SPATIAL_MULTIPLE})"
        )
    group = tensors.get("group")
    if group is None or group.dim() != 5 or tuple(group.shape[-2:]) != tuple(map(int, parts)):
        shape = None if group is None else tuple(group.shape)
        raise SnapshotError(f"malformed snapshot: its pending frames {shape} are not of {size}")
    try:
        state = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"malformed snapshot metadata: the state is not JSON ({exc})") from None
    if not isinstance(state, dict):
        raise SnapshotError("malformed snapshot metadata: the state is not a JSON object")

    def whole(name: str, low: int, default: Any = ...) -> int:
        value = state.get(name, default)
        if value is ...:
            raise SnapshotError(f"malformed snapshot metadata: {name!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SnapshotError(
                f"malformed snapshot metadata: {name} is {value!r}, expected an integer >= {low}"
            )
        return value

    frames, latents = whole("frames", 0), whole("latents", 0)
    expected = 0 if frames == 0 else 1 + (frames - 1) // group_size
    if latents != expected:
        raise SnapshotError(
            f"malformed snapshot: {frames} frames complete {expected} latents, it says {latents}"
        )
    pending = frames - (0 if latents == 0 else 1 + (latents - 1) * group_size)
    stamps = state.get("timestamps")
    if not isinstance(stamps, list) or len(stamps) != pending:
        found = f"{len(stamps)}" if isinstance(stamps, list) else repr(stamps)
        raise SnapshotError(
            f"malformed snapshot: {found} timestamps, expected {pending} (one per frame no "
            "latent has taken yet)"
        )
    for stamp in stamps:
        if stamp is not None and (
            isinstance(stamp, bool)
            or not isinstance(stamp, (int, float))
            or not math.isfinite(stamp)
        ):
            raise SnapshotError(f"malformed snapshot: timestamp {stamp!r} is not a finite number")
    numbers = state.get("numbers", [None] * pending)
    if not isinstance(numbers, list) or len(numbers) != pending:
        raise SnapshotError(f"malformed snapshot: frame numbers {numbers!r}, expected {pending}")
    for number in [*numbers, state.get("last_number")]:
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int) or number < 0
        ):
            raise SnapshotError(f"malformed snapshot: frame number {number!r} is not an int >= 0")
    gap_pending = state.get("gap_pending", False)
    if not isinstance(gap_pending, bool):
        raise SnapshotError(f"malformed snapshot: gap_pending is {gap_pending!r}, not a bool")
    layers = state.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in layers.values()
    ):
        raise SnapshotError(f"malformed snapshot: layers {layers!r} are not integer counters")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SnapshotError(f"snapshot tensor {name} holds NaN or infinite values")
    return SnapshotState(
        height=int(parts[0]),
        width=int(parts[1]),
        frames=frames,
        latents=latents,
        timestamps=[None if t is None else float(t) for t in stamps],
        numbers=list(numbers),
        last_number=state.get("last_number"),
        gap_pending=gap_pending,
        exact_from=whole("exact_from", 0, 0),
        dropped_frames=whole("dropped_frames", 0, 0),
        last_slot=whole("last_slot", -1),
        layers={str(k): v for k, v in layers.items()},
    )
