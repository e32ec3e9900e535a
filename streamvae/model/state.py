"""Streaming state of the causal layers: explicit, preallocated, updated in place.

Each causal layer of the encoder owns one of these per stream. A state is sized once, when the
frame size is known, and never grows: it holds the frames the layer must remember (two for a
3x3x3 causal conv, up to two for a temporal downsample, one for Wan 2.2's average-pool shortcut
across time) plus ``capacity`` slots that the new
frames of one step are written into, so the layer's convolution reads one contiguous window
``[remembered, new]`` and no per-step concatenation or cache reallocation happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ConvState",
    "FrameWindow",
    "PairState",
    "TimeDownState",
    "TimeUpState",
    "check_memory",
]


@dataclass(frozen=True)
class FrameWindow:
    """A preallocated ``[B, C, keep + capacity, H, W]`` buffer of frames.

    ``frames[:, :, :held]`` are remembered frames; a step writes its new frames after them.
    """

    frames: torch.Tensor

    @classmethod
    def allocate(
        cls,
        batch: int,
        channels: int,
        keep: int,
        capacity: int,
        height: int,
        width: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> FrameWindow:
        shape = (batch, channels, keep + capacity, height, width)
        frames = torch.zeros(shape, dtype=dtype, device=device).to(memory_format=memory_format)
        return cls(frames)

    @property
    def length(self) -> int:
        return self.frames.shape[2]

    def slots(self, start: int, count: int) -> torch.Tensor:
        return self.frames[:, :, start : start + count]

    def shift_to_front(self, start: int, count: int) -> None:
        """Move frames ``[start, start + count)`` to ``[0, count)`` in place.

        Frame by frame from the front, so overlapping ranges (``start < count``) are safe:
        each source frame is read before it is overwritten.
        """
        if start == 0:
            return
        for i in range(count):
            self.frames[:, :, i].copy_(self.frames[:, :, start + i])

    @property
    def nbytes(self) -> int:
        return self.frames.numel() * self.frames.element_size()


class ConvState:
    """State of one causal 3x3x3 convolution: its last two input frames (zeros before frame 0).

    Two ways to keep them, the same frames either way:

    - **shift** (any capacity): ``window.frames[:, :, :2]`` are the remembered frames in time
      order; ``slots(n)`` are where the ``n`` new input frames of a step are written (by the
      norm and SiLU in front of the conv); after the step the last two frames are copied to
      the front.
    - **ring** (one frame per step): the window's three frames are a ring; the new frame is
      written over the oldest (at ``head``) and nothing is copied. The frames are then in time
      order only up to a rotation, which the conv undoes by rotating its kernel's time taps
      instead (:meth:`taps`). Saves two frame copies per conv per step.
    """

    KEEP = 2

    def __init__(self, window: FrameWindow, *, ring: bool = False) -> None:
        if ring and window.length != self.KEEP + 1:
            raise ValueError(
                f"a ring window holds {self.KEEP + 1} frames (capacity 1), got {window.length}"
            )
        self.window = window
        self.ring = ring
        # How many of the remembered frames are real (the others are the zeros before frame 0).
        self.history = 0
        # Where the next new frame is written: always KEEP when shifting; moves round a ring.
        self.head = self.KEEP

    @property
    def capacity(self) -> int:
        return self.window.length - self.KEEP

    def slots(self, count: int) -> torch.Tensor:
        if self.ring and count != 1:
            raise ValueError(f"a ring state takes one frame per step, got {count}")
        return self.window.slots(self.head, count)

    def taps(self) -> tuple[int, ...]:
        """For each frame of the window, the kernel's time tap that reads it in this step.

        Tap 2 reads the newest frame (the one just written at ``head``), tap 1 the one before,
        tap 0 the oldest: ``(0, 1, 2)`` when shifting one frame per step, a rotation of it on a
        ring.
        """
        size = self.KEEP + 1
        return tuple(self.KEEP - (self.head - position) % size for position in range(size))

    def advance(self, count: int) -> None:
        """After a step over ``count`` new frames: the last two input frames become the memory."""
        if self.ring:
            self.head = (self.head + 1) % (self.KEEP + 1)
        else:
            self.window.shift_to_front(count, self.KEEP)
        self.history = min(self.history + count, self.KEEP)

    def reset(self) -> None:
        self.window.frames.zero_()
        self.history = 0
        self.head = self.KEEP

    def batch_view(self, start: int, stop: int) -> ConvState:
        """Streams ``start:stop`` of this batched state (a view of the window, the same
        Python-side state)."""
        view = ConvState(FrameWindow(self.window.frames[start:stop]), ring=self.ring)
        view.history, view.head = self.history, self.head
        return view

    @property
    def nbytes(self) -> int:
        return self.window.nbytes


class TimeDownState:
    """State of a temporal downsample: whether frame 0 has passed, the last frame used, a pending one.

    Whole-sequence rule: ``u[0] = s[0]`` and ``u[j] = time_conv(s[2j-2], s[2j-1], s[2j])``.
    ``held`` counts the frames at the front of the window: 0 before the first frame, then 1
    (the previous pair's last frame ``s[2j-2]``) or 2 (that frame and a pending odd frame).
    """

    def __init__(self, window: FrameWindow) -> None:
        self.window = window
        self.held = 0
        self.started = False

    @property
    def capacity(self) -> int:
        return self.window.length - 2

    def reset(self) -> None:
        self.window.frames.zero_()
        self.held = 0
        self.started = False

    @property
    def nbytes(self) -> int:
        return self.window.nbytes


class PairState:
    """State of an average-pool shortcut across time (Wan 2.2): its pending unpaired frame.

    The shortcut averages frame pairs ``(0, s0), (s1, s2), (s3, s4), ...`` of its input (the
    reference pads each chunk at the front to an even length, and its chunks are 1, 4, 4, ...
    frames, so chunk 0 pairs frame 0 with a zero frame). The window holds ``held`` frames at
    its front: before frame 0 that is the zero frame (``held == 1``), then 0 or 1 pending
    frame; a step writes its new frames after them and averages the complete pairs.
    """

    def __init__(self, window: FrameWindow) -> None:
        self.window = window
        self.held = 1

    @property
    def capacity(self) -> int:
        return self.window.length - 1

    def reset(self) -> None:
        self.window.frames.zero_()
        self.held = 1

    @property
    def nbytes(self) -> int:
        return self.window.nbytes


class TimeUpState:
    """State of a temporal upsample (the decoder's): whether frame 0 has passed, and the time
    conv's memory.

    Wan's rule (``Resample``'s ``'Rep'`` marker): the stream's first frame passes through
    without the time conv (one frame out); every later frame ``s[j]`` goes through the causal
    (3, 1, 1) time conv over ``[s[j-2], s[j-1], s[j]]``, where frame 0 and the frames before
    it count as zeros, and gives two frames. ``conv`` is that time conv's :class:`ConvState`.
    """

    def __init__(self, window: FrameWindow) -> None:
        self.conv = ConvState(window)
        self.started = False

    @property
    def window(self) -> FrameWindow:
        return self.conv.window

    def reset(self) -> None:
        self.conv.reset()
        self.started = False

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes


def check_memory(
    tensors: dict[str, torch.Tensor],
    counters: dict[str, int],
    shapes: dict[str, tuple[int, ...]],
    ranges: dict[str, tuple[int, int]],
    dtype: torch.dtype,
    model: str,
) -> None:
    """Raise ``ValueError`` unless a state's remembered ``tensors`` and ``counters`` (from a
    snapshot) have exactly the names, ``shapes``, ``dtype`` and counter ``ranges`` expected."""
    if set(tensors) != set(shapes) or set(counters) != set(ranges):
        missing = sorted(set(shapes) - set(tensors))
        extra = sorted(set(tensors) - set(shapes))
        raise ValueError(
            f"state tensors do not match this {model}: missing {missing[:4]}, "
            f"unexpected {extra[:4]} (of {len(shapes)} expected)"
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"state tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )
        if tensors[name].dtype != dtype:
            raise ValueError(f"state tensor {name} is {tensors[name].dtype}, expected {dtype}")
    for name, (low, high) in ranges.items():
        if not low <= counters[name] <= high:
            raise ValueError(f"state counter {name}={counters[name]} is outside {low}..{high}")
