"""What a frame may be, how it is checked, and how it reaches the model's device and layout.

Accepted frames (one video frame each):

- numpy ``[H, W, 3]`` in RGB order: ``uint8`` (0..255) or floating point in [-1, 1];
- torch ``[3, H, W]``: ``uint8`` (0..255) or floating point in [-1, 1], on the CPU or on the
  encoder's device;
- a :class:`Frame`, which wraps one of the above with its capture timestamp.

``H`` and ``W`` must be multiples of 8. uint8 frames travel to the device as uint8 and are
scaled there (``x / 127.5 - 1``), so a 480x832 frame uploads 1.2 MB, not 4.8 MB.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Frame", "FrameError", "FrameLike", "check_frame"]

# Float frames may stray this far outside [-1, 1] (rounding in the caller's conversion).
RANGE_TOLERANCE = 1e-3
SPATIAL_MULTIPLE = 8
MAX_FRAME_NUMBER = 2**63 - 1
"""The largest ``Frame.number``: numbers travel as int64 (the wire format, ``.latents`` files)."""


class FrameError(ValueError):
    """A frame was refused. The stream's state is unchanged."""


@dataclass(frozen=True)
class Frame:
    """A frame with what is known about it.

    ``timestamp`` is the capture time (seconds since the epoch) when the source knows it.
    ``gap`` marks the first frame after a discontinuity (a source that reconnected): the
    stream ends its current run before this frame and starts afresh from it.

    Keyword-only, both optional:

    - ``number``: the frame's number in its source's run, dropped frames included (as
      :class:`streamvae.io.SourceFrame` counts them). The stream carries the numbers into
      :attr:`streamvae.Latent.source_frames` and counts the missing ones in
      :attr:`streamvae.Latent.dropped_before`.
    - ``captured``: the capture time on this process's ``time.monotonic()`` clock, which
      latencies are measured on (a wall-clock step cannot corrupt them).

    ``gap`` must be a bool and ``number`` an integer in ``0 ..`` :data:`MAX_FRAME_NUMBER` (or
    ``None``): anything else raises :class:`FrameError` here, at construction.
    """

    image: Any
    timestamp: float | None = None
    gap: bool = False
    number: int | None = field(default=None, kw_only=True)
    captured: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _gap(self.gap)
        _frame_number(self.number)


FrameLike = np.ndarray | torch.Tensor | Frame


@dataclass(frozen=True)
class CheckedFrame:
    """A frame that passed every check: ``tensor`` is ``[3, H, W]`` (uint8 or float)."""

    tensor: torch.Tensor
    height: int
    width: int
    timestamp: float | None
    gap: bool
    number: int | None = None
    captured: float | None = None

    @property
    def is_uint8(self) -> bool:
        return self.tensor.dtype == torch.uint8


def _describe(frame: Any) -> str:
    if isinstance(frame, np.ndarray):
        return f"numpy array of shape {frame.shape} and dtype {frame.dtype}"
    if isinstance(frame, torch.Tensor):
        return f"torch tensor of shape {tuple(frame.shape)}, dtype {frame.dtype} on {frame.device}"
    return f"{type(frame).__name__}"


_EXPECTED = "expected numpy [H, W, 3] RGB or torch [3, H, W], uint8 (0..255) or float in [-1, 1]"


def _frame_number(number: object) -> int | None:
    if number is None:
        return None
    if (
        isinstance(number, bool)
        or not isinstance(number, numbers.Integral)
        or not 0 <= int(number) <= MAX_FRAME_NUMBER
    ):
        raise FrameError(
            f"number must be an integer in 0..{MAX_FRAME_NUMBER} (or None), got {number!r}"
        )
    return int(number)


def _gap(gap: object) -> bool:
    """``gap`` as a bool: ``True``/``False`` (numpy's too), nothing else ("no" is no bool)."""
    if not isinstance(gap, (bool, np.bool_)):
        raise FrameError(f"gap must be True or False, got {gap!r}")
    return bool(gap)


def check_frame(frame: Any, device: torch.device, timestamp: float | None = None) -> CheckedFrame:
    """Check one frame without touching any stream state; raise :class:`FrameError` if refused."""
    gap, number, captured = False, None, None
    if isinstance(frame, Frame):
        timestamp = frame.timestamp if timestamp is None else timestamp
        gap, number, captured = _gap(frame.gap), frame.number, frame.captured
        frame = frame.image
    timestamp = _seconds(timestamp, "timestamp")
    captured = _seconds(captured, "captured")
    number = _frame_number(number)
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise FrameError(f"got a {_describe(frame)}; {_EXPECTED}")
        tensor = _numpy_to_tensor(frame).permute(2, 0, 1)
    elif isinstance(frame, torch.Tensor):
        if frame.layout != torch.strided:
            raise FrameError(
                f"got a {_describe(frame)} of layout {frame.layout}; frames are dense (strided) "
                "tensors: call .to_dense() first"
            )
        if frame.dim() != 3 or frame.shape[0] != 3:
            raise FrameError(f"got a {_describe(frame)}; {_EXPECTED}")
        if frame.device.type != "cpu" and frame.device != device:
            raise FrameError(
                f"got a {_describe(frame)}; frames must be on the CPU or on the encoder's "
                f"device {device}"
            )
        tensor = frame.detach()  # never part of the caller's autograd graph (nor keeping it)
        if tensor.dtype not in (torch.uint8,) and not tensor.is_floating_point():
            raise FrameError(f"got a {_describe(frame)}; {_EXPECTED}")
    else:
        raise FrameError(f"got {_describe(frame)}; {_EXPECTED}")
    _, height, width = tensor.shape
    if height == 0 or width == 0 or height % SPATIAL_MULTIPLE or width % SPATIAL_MULTIPLE:
        raise FrameError(
            f"got a frame of {height}x{width}; height and width must be positive multiples of "
            f"{SPATIAL_MULTIPLE} (resize or crop it, e.g. open_source(..., size='HxW'))"
        )
    if tensor.is_floating_point():
        _check_float_values(tensor, frame)
    return CheckedFrame(tensor, height, width, timestamp, gap, number, captured)


def _seconds(value: Any, name: str) -> float | None:
    """A time in seconds as a float: any real number type (numpy's too), never a bool."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FrameError(f"{name} must be a finite number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise FrameError(f"{name} must be a finite number of seconds, got {value!r}")
    return seconds


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype.kind == "f":
        if array.dtype not in (np.float16, np.float32, np.float64):
            array = array.astype(np.float64)  # e.g. long double: checked, then cast later
        return torch.from_numpy(np.ascontiguousarray(array))
    raise FrameError(f"got a {_describe(array)}; {_EXPECTED}")


def _check_float_values(tensor: torch.Tensor, original: Any) -> None:
    values = tensor if tensor.dtype == torch.float64 else tensor.float()
    if not bool(torch.isfinite(values).all()):
        raise FrameError(f"got a {_describe(original)} containing NaN or Inf; {_EXPECTED}")
    low, high = float(values.min()), float(values.max())
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise FrameError(
            f"got a {_describe(original)} with values in [{low:.4g}, {high:.4g}]; float frames "
            f"must lie in [-1, 1] (uint8 frames are scaled as x / 127.5 - 1)"
        )


def to_model_input(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., 3, H, W]`` uint8 or float on the model's device -> model dtype in [-1, 1].

    uint8 is scaled in float32 first, so the values equal ``x.float() / 127.5 - 1`` exactly;
    float frames are only cast (no clamping), so they match :meth:`WanEncoder.encode`.
    """
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(127.5).sub_(1.0)
    return tensor.to(dtype)
