"""StreamEncoder: one live stream of frames in, Wan VAE latents out, exactly as the batch encoder.

>>> import numpy as np
>>> from streamvae import StreamEncoder, WanEncoder, narrow
>>> stream = StreamEncoder(WanEncoder(narrow(8)).eval())
>>> frame = np.zeros((32, 32, 3), dtype=np.uint8)
>>> [latent.index for latent in stream.push(frame)]          # frame 0 -> latent 0 at once
[0]
>>> [len(stream.push(frame)) for _ in range(4)]              # frame 4k -> latent k
[0, 0, 0, 1]
>>> stream.push(frame), stream.flush(), stream.dropped_frames  # a partial group is dropped
([], [], 1)

Asynchronously, over any sync or async iterable of frames (the model runs in a worker thread)::

    async with stream.stream(frames) as latents:
        async for latent in latents:
            ...
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from streamvae.frames import CheckedFrame, FrameError, FrameLike, check_frame, to_model_input
from streamvae.model import EncoderState, WanEncoder
from streamvae.stepping import (
    OutputStream,
    StreamBroken,
    StreamCore,
    check_snapshot_meta,
    in_worker,
    wait_thread_exit,
)

__all__ = ["Latent", "LatentStream", "StreamBroken", "StreamEncoder", "warmup_steps"]

# The stepping core's async helpers under the names streamvae.pool imports them by.
_in_worker = in_worker
_wait_thread_exit = wait_thread_exit


@dataclass(frozen=True)
class Latent:
    """One latent frame of a stream.

    ``data`` is float32 ``[z_dim, H/s, W/s]`` (``s`` = ``config.spatial_stride``: 8 for Wan 2.1,
    16 for Wan 2.2; normalised unless the stream was made with
    ``normalize=False``). ``frames`` are the indices of the source frames it covers, counted
    from the stream's first frame (``range(0, 1)`` for latent 0, ``range(4k-3, 4k+1)`` for
    latent k). ``timestamps`` are those frames' capture times where known (``None`` entries
    where not). ``ready_time`` is the wall-clock time (``time.time()``) at which ``data`` was
    ready on its device. ``padded`` counts repeated copies of the last frame that completed
    the group (``flush(pad=True)``); ``gap`` is true for the first latent after a restart of
    the source (see :class:`streamvae.frames.Frame`).

    Where the frames carry their source's numbers (:class:`streamvae.io.SourceFrame` does):
    ``source_frames`` are those numbers (``None`` entries where not known), and
    ``dropped_before`` counts the source frames missing since the previous latent of the run
    (a live source that fell behind drops whole groups). A latent with ``dropped_before > 0``
    is encoded exactly, but the encoder's causal memory spans the hole: it differs from what
    encoding the source's true consecutive frames would give, and a consumer that needs
    temporal continuity should treat it as a cut (as after ``gap``).

    ``captured`` is the ``time.monotonic()`` capture time of the last frame and
    ``ready_monotonic`` the ``time.monotonic()`` time the latent was ready: latencies within
    this process are ``ready_monotonic - captured`` (neither is sent over the wire).

    ``approximate`` is true for a latent of a stream resumed from fewer frames than the
    receptive field (see :meth:`StreamEncoder.resume`): its window reached back before the
    replayed frames.
    """

    data: torch.Tensor
    index: int
    frames: range
    timestamps: tuple[float | None, ...] = ()
    ready_time: float = 0.0
    padded: int = 0
    gap: bool = False
    meta: dict[str, str] = field(default_factory=dict)
    source_frames: tuple[int | None, ...] = ()
    dropped_before: int = 0
    captured: float | None = None
    ready_monotonic: float | None = None
    approximate: bool = False

    def __repr__(self) -> str:
        """One line: the tensor by dtype and shape (never its values), then the labels."""
        dtype = str(self.data.dtype).removeprefix("torch.")
        shape = ", ".join(str(n) for n in self.data.shape)
        flags = "".join(
            f", {name}={value!r}"
            for name, value in (
                ("padded", self.padded),
                ("gap", self.gap),
                ("dropped_before", self.dropped_before),
                ("approximate", self.approximate),
            )
            if value
        )
        return (
            f"Latent(index={self.index}, frames={self.frames.start}:{self.frames.stop}, "
            f"data={dtype}[{shape}] on {self.data.device}{flags})"
        )


Mode = Literal["frame", "group"]


class StreamEncoder(StreamCore[EncoderState, Latent]):
    """A stateful stream over a loaded :class:`WanEncoder` (weights are shared, state is not).

    Options:

    - ``mode="frame"`` (default, lowest latency): each pushed frame advances through the network
      as far as causality allows, so the push of a group's 4th frame does only the remaining
      work. ``mode="group"`` buffers a group's frames and runs them in one step when the 4th
      arrives (fewer, larger kernel launches; may pay off for throughput on a GPU).
    - ``pad_tail``: what :meth:`flush` does with frames that do not complete a group. ``False``
      (default, as the reference encoder) drops them and counts them in ``dropped_frames``;
      ``True`` repeats the last frame until the group is complete and emits that latent with
      ``padded`` set.
    - ``normalize``: Wan's per-channel latent normalisation (default) or the raw mean.
    - ``output_device``: where ``Latent.data`` is delivered; ``"cpu"`` (default) or ``None``
      for the encoder's device.
    - ``memory_format``: layout of the state buffers; ``None`` (default) picks the fastest
      measured for the encoder's device and dtype (channels-last on the CPU, see
      :func:`streamvae.model.default_memory_format`).
    - ``cuda_graphs``: on CUDA, capture each kind of step into a CUDA graph and replay it (one
      launch per step instead of hundreds; see :mod:`streamvae.model.graphs`).

    A StreamEncoder is not thread-safe; use one per stream (any number may share an encoder).
    On CUDA each StreamEncoder runs its uploads, compute and state updates on its own
    ``torch.cuda.Stream``, so several streams on one GPU overlap.
    """

    def __init__(
        self,
        encoder: WanEncoder,
        *,
        mode: Mode = "frame",
        pad_tail: bool = False,
        normalize: bool = True,
        output_device: str | torch.device | None = "cpu",
        memory_format: torch.memory_format | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if mode not in ("frame", "group"):
            raise ValueError(f"mode must be 'frame' or 'group', got {mode!r}")
        if encoder.config.in_channels != 3:
            raise ValueError(
                f"streams carry RGB frames, but {encoder.config.name} takes "
                f"{encoder.config.in_channels} channels; encode such clips with WanEncoder.encode"
            )
        self.encoder = encoder
        self.mode: Mode = mode
        self.pad_tail = pad_tail
        self.normalize = normalize
        self.output_device = None if output_device is None else torch.device(output_device)
        self.memory_format = memory_format
        self.cuda_graphs = cuda_graphs
        self.group_size = encoder.config.temporal_stride
        self._group: torch.Tensor | None = None  # group mode: frames waiting for their group
        self._last: torch.Tensor | None = None  # the last frame, for pad_tail
        self.dropped_frames = 0
        self._receptive_field: int | None = None
        super().__init__(encoder.device, what="encoder")

    # -- public state ----

    @property
    def frames_pushed(self) -> int:
        """Frames accepted since the last reset (the next frame's index)."""
        return self._frames

    @property
    def latents_emitted(self) -> int:
        return self._latents

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of this stream, fixed by its first frame; ``None`` before it."""
        return self._size

    @property
    def state_nbytes(self) -> int:
        """Bytes of this stream's allocated state (0 before the first frame fixes the size)."""
        total = 0 if self._state is None else self._state.nbytes
        if self._group is not None:
            total += self._group.numel() * self._group.element_size()
        return total

    def _begin_run(self) -> None:
        self._frames = 0
        self._latents = 0
        # Capture times of the frames not yet covered by an emitted latent (at most a group).
        self._timestamps: deque[float | None] = deque()
        self._numbers: deque[int | None] = deque()  # their source numbers (Frame.number)
        self._captured: deque[float | None] = deque()  # their monotonic capture times
        self._last_number: int | None = None  # the source number of the last frame emitted
        self._size: tuple[int, int] | None = None
        self._gap_pending = False
        self._exact_from = 0  # latents before this index are approximate (see resume)

    @property
    def pending_latents(self) -> tuple[Latent, ...]:
        """Latents computed but not yet handed out: those of a push in flight when a consumer of
        :meth:`stream` was cancelled. The next :meth:`push`, :meth:`push_many`, :meth:`flush` or
        :meth:`stream` returns them first; :meth:`reset` discards them."""
        return self._pending_outputs()

    # -- pushing ----

    def push(self, frame: FrameLike, *, timestamp: float | None = None) -> list[Latent]:
        """Add one frame; return the latents it completed (``[]`` or one latent).

        A refused frame raises :class:`streamvae.frames.FrameError` and leaves the stream as it
        was.
        """
        return self.push_many([frame], timestamps=None if timestamp is None else [timestamp])

    def push_many(
        self, frames: Iterable[FrameLike], *, timestamps: Iterable[float | None] | None = None
    ) -> list[Latent]:
        """Add a burst of frames at once; every frame is checked before any is used.

        The latents equal those of pushing the frames one by one.
        """
        frames = list(frames)
        stamps: list[float | None] = (
            [None] * len(frames) if timestamps is None else list(timestamps)
        )
        if len(stamps) != len(frames):
            raise ValueError(f"got {len(frames)} frames but {len(stamps)} timestamps")
        self._check_usable()
        checked = self._check_all(frames, stamps)
        return self._with_pending(lambda: self._push_checked(checked))

    def _push_checked(self, checked: list[CheckedFrame]) -> list[Latent]:
        latents: list[Latent] = []
        start = 0
        for i, item in enumerate(checked):
            if item.gap and (i > 0 or self._frames > 0):
                latents += self._process(checked[start:i])
                latents += self._end_run()
                self.reset()
                self._gap_pending = True
                start = i
            elif item.gap:
                self._gap_pending = True
        latents += self._process(checked[start:])
        return latents

    def flush(self, *, pad: bool | None = None) -> list[Latent]:
        """End the stream: handle a partial group (see ``pad_tail``), then reset.

        Returns the latents still to come (in group mode, or with padding). The frames of a
        dropped partial group are added to ``dropped_frames``.
        """
        self._check_usable()
        latents = self._with_pending(
            lambda: self._end_run(pad=self.pad_tail if pad is None else pad)
        )
        self.reset()
        return latents

    # -- warming up ----

    def warmup(self, height: int, width: int) -> int:
        """Run a stream's first steps at ``height x width`` before its first frame, so that
        what the first steps pay once happens here and not on the live path: on CUDA cuDNN's
        autotuning and (``cuda_graphs``) the graph captures, on the CPU oneDNN's first calls.

        The stream is left as it was: its latents are exactly those of a cold stream. Zero
        frames are stepped through every step signature once (:func:`warmup_steps`) on a
        throwaway state; with ``cuda_graphs`` on CUDA, and no frame pushed yet, on the state
        the stream will use (its graphs read its buffers), twice (seen, then captured), and
        that state is then reset in place. Returns the frames stepped.

        >>> import numpy as np
        >>> from streamvae import WanEncoder, narrow
        >>> stream = StreamEncoder(WanEncoder(narrow(8)).eval())
        >>> stream.warmup(16, 16) > 0, stream.frames_pushed
        (True, 0)
        """
        self._check_usable()
        problem = self.encoder.config.size_error(height, width)
        if problem is not None:
            raise FrameError(problem)
        graphs = self.cuda_graphs and self._device.type == "cuda" and self._frames == 0
        if graphs:
            self._ensure_state(height, width)
            state = self._state
        else:
            state, _ = self._allocate(height, width)
        assert state is not None
        group = self.group_size if self.mode == "group" else 1

        def run() -> int:
            stepped = 0
            for _ in range(2 if graphs else 1):
                state.reset()
                stepped += warmup_steps(
                    state, lambda count: self.encoder.step(frames[:, :, :count], state), group
                )
            state.reset()
            return stepped

        frames = torch.zeros(
            (1, 3, group, height, width), dtype=self.encoder.dtype, device=self._device
        )
        return self._run_on_lane(run)

    # -- resuming and moving ----

    @property
    def receptive_field(self) -> int:
        """``R``: the frames a latent depends on, ending at its last (see :mod:`streamvae.receptive`)."""
        if self._receptive_field is None:
            from streamvae.receptive import receptive_field

            self._receptive_field = receptive_field(self.encoder)
        return self._receptive_field

    def resume(
        self,
        frames: Iterable[FrameLike],
        *,
        first_index: int,
        timestamps: Iterable[float | None] | None = None,
        approximate: bool = False,
    ) -> list[Latent]:
        """Rebuild the stream from source frames ``first_index .. m-1`` (a replay after a takeover).

        ``first_index`` is 0 or the first frame of a group (1, 5, 9, ...). Afterwards the stream
        behaves exactly as if frames ``0 .. m-1`` had been pushed: the next latents have the
        same index, frames, timestamps and data (bit-identical on the CPU in float32), because
        a latent depends only on its last :attr:`receptive_field` frames. Any earlier state is
        discarded (as by :meth:`reset`).

        With ``first_index > 0`` at least ``R`` frames are needed, else ``ValueError``;
        ``approximate=True`` accepts fewer, and the latents whose window reaches back before
        ``first_index`` come out with ``approximate=True``.

        Returns the latents that the replayed frames complete and that are exact (with
        ``approximate=True`` also the approximate ones, flagged); a caller that already has
        some of them (a takeover) drops those by index.

        >>> import numpy as np
        >>> from streamvae import WanEncoder, narrow
        >>> stream = StreamEncoder(WanEncoder(narrow(8)).eval())
        >>> frames = [np.full((16, 16, 3), i, np.uint8) for i in range(121, 240)]
        >>> [latent.index for latent in stream.resume(frames, first_index=121)]
        [59]
        >>> stream.frames_pushed, stream.latents_emitted
        (240, 60)
        """
        frames = list(frames)
        stamps: list[float | None] = (
            [None] * len(frames) if timestamps is None else list(timestamps)
        )
        if len(stamps) != len(frames):
            raise ValueError(f"got {len(frames)} frames but {len(stamps)} timestamps")
        group = self.group_size
        if (
            isinstance(first_index, bool)
            or not isinstance(first_index, int)
            or first_index < 0
            or (first_index > 0 and (first_index - 1) % group)
        ):
            raise ValueError(
                f"first_index must be 0 or the first frame of a group (1, {1 + group}, "
                f"{1 + 2 * group}, ...), got {first_index!r}"
            )
        if not frames:
            raise ValueError("resume needs at least one frame (it fixes the frame size)")
        needed = self.receptive_field
        if first_index > 0 and len(frames) < needed and not approximate:
            raise ValueError(
                f"resuming at frame {first_index} needs the last {needed} frames (the receptive "
                f"field), got {len(frames)}; pass approximate=True to accept latents flagged "
                "approximate until the window is full"
            )
        checked = self._check_all(frames, stamps, fresh=True)
        if any(item.gap for item in checked[1:]):
            raise FrameError("a replay is one run of frames: only its first frame may be a gap")
        self.reset()
        if first_index == 0:
            return self._process(checked)
        first = checked[0]
        self._ensure_state(first.height, first.width)
        self._size = (first.height, first.width)
        assert self._state is not None
        self._run_on_lane(self._state.start_mid_stream, first_index)
        self._frames = first_index
        self._latents = (first_index - 1) // group + 1
        # The first latent whose window [last - R + 1, last] starts at or after first_index.
        self._exact_from = -(-(first_index + needed - 1) // group)
        latents = self._process(checked)
        return latents if approximate else [lat for lat in latents if not lat.approximate]

    def snapshot(self) -> bytes:
        """This stream's state and counters as safetensors bytes, for :meth:`restore` elsewhere.

        Carries a fingerprint of the model's weights, the frame size, dtype and mode, so that a
        restore into another model, size or dtype is refused. Exact: a stream restored from it
        (in another process, or on another device) continues as this one would. Nothing here is
        a pickle; the weights are not included.
        """
        from streamvae.snapshot import dtype_name, pack, weights_fingerprint

        self._check_usable()
        if self._state is None or self._size is None or self._group is None:
            raise ValueError("nothing to snapshot: this stream has no frame yet")
        with self._lane():
            tensors, counters = self._state.memory()
            tensors["group"] = self._group.clone()
        if self._cuda is not None:
            self._cuda.stream.synchronize()
        last = -1
        if self._last is not None:
            last = (self._last.data_ptr() - self._group.data_ptr()) // (
                self._group.stride(2) * self._group.element_size()
            )
        state = {
            "frames": self._frames,
            "latents": self._latents,
            "timestamps": list(self._timestamps),
            "numbers": list(self._numbers),
            "last_number": self._last_number,
            "gap_pending": self._gap_pending,
            "exact_from": self._exact_from,
            "dropped_frames": self.dropped_frames,
            "last_slot": last,
            "layers": counters,
        }
        return pack(
            tensors,
            {
                "model": weights_fingerprint(self.encoder),
                "config": self.encoder.config.name,
                "dtype": dtype_name(self.encoder.dtype),
                "size": f"{self._size[0]}x{self._size[1]}",
                "mode": self.mode,
                "state": json.dumps(state),
            },
        )

    def restore(self, data: bytes) -> None:
        """Continue from a :meth:`snapshot`, replacing this stream's state.

        Refused with :class:`streamvae.snapshot.SnapshotError` (a ``ValueError``), the stream
        left as it was, when the snapshot is of another model (weights), dtype or mode, or of
        another frame size than this stream's frames so far, or is malformed in any way (see
        :func:`streamvae.snapshot.read_state`): everything is checked before the stream is
        touched.
        """
        from streamvae.snapshot import (
            SnapshotError,
            dtype_name,
            read_state,
            unpack,
            weights_fingerprint,
        )

        tensors, meta = unpack(data)
        mine = {
            "dtype": dtype_name(self.encoder.dtype),
            "mode": self.mode,
            "model": weights_fingerprint(self.encoder),
        }
        check_snapshot_meta(meta, mine)
        state = read_state(tensors, meta, group_size=self.group_size)  # all checked
        height, width, counters = state.height, state.width, state.layers
        frames, latents, last_slot = state.frames, state.latents, state.last_slot
        if self._size is not None and self._frames > 0 and self._size != (height, width):
            raise SnapshotError(
                f"snapshot of {height}x{width} frames; this stream's frames are "
                f"{self._size[0]}x{self._size[1]} (reset() first to take another size)"
            )
        group = tensors.pop("group", None)
        # Check everything against a state of that size before anything is changed.
        if self._state is not None and (self._state.height, self._state.width) == (height, width):
            target, target_group = self._state, self._group
        else:
            target, target_group = self._allocate(height, width)
        assert target_group is not None
        try:
            target.check_memory(tensors, counters)
        except ValueError as exc:
            raise SnapshotError(f"snapshot does not fit this encoder: {exc}") from None
        if group is None or group.shape != target_group.shape or group.dtype != target_group.dtype:
            raise SnapshotError("snapshot's pending frames do not fit this stream's mode and size")
        if not (frames >= 0 and latents >= 0 and -1 <= last_slot < target_group.shape[2]):
            raise SnapshotError("snapshot counters are out of range")
        with self._lane():
            target.load_memory(tensors, counters)
            target_group.copy_(group)
        if self._cuda is not None:
            self._cuda.stream.synchronize()
        self._state, self._group = target, target_group
        self._broken = False
        self._begin_run()
        self._frames, self._latents = frames, latents
        self._pending.clear()
        frames_left = len(state.timestamps)
        self._timestamps.extend(state.timestamps)
        self._numbers.extend(state.numbers)
        self._captured.extend([None] * frames_left)  # monotonic times mean nothing elsewhere
        self._last_number = state.last_number
        self._size = (height, width)
        self._gap_pending = state.gap_pending
        self._exact_from = state.exact_from
        self.dropped_frames = state.dropped_frames
        self._last = None if last_slot < 0 else target_group[:, :, last_slot : last_slot + 1]

    # -- async ----

    def stream(
        self, frames: Iterable[FrameLike] | AsyncIterable[FrameLike], *, flush: bool = True
    ) -> LatentStream:
        """Encode an iterable or async iterable of frames; an async iterator of latents.

        The model runs in a worker thread and a sync iterable is read in another, never on the
        event loop. One frame is read per push: a slow consumer slows the source. When the
        source is exhausted the stream is flushed (``flush=False`` keeps it open for more). If
        the source raises, the iteration ends with that exception after the latents already
        complete. Latents still pending from a cancelled iteration come first.

        Cancelling the consumer (once or repeatedly) waits for the push in flight, so the
        worker never touches the StreamEncoder after the cancel returns, and keeps that push's
        latents in :attr:`pending_latents`. It never waits for a read of a sync source: a read
        blocked in a hung capture is left to finish in its own daemon thread, and the frame it
        returns is discarded. The StreamEncoder can then go on (``push``, ``stream``), or be
        :meth:`reset`.
        """
        return LatentStream(self, frames, flush=flush)

    # -- internals ----

    def _check_all(
        self, frames: list[Any], stamps: list[float | None], *, fresh: bool = False
    ) -> list[CheckedFrame]:
        size = None if fresh else self._size
        checked = []
        for frame, stamp in zip(frames, stamps):
            item = check_frame(frame, self._device, stamp)
            problem = self.encoder.config.size_error(item.height, item.width)
            if problem is not None:  # the model's own rule (Wan 2.2: multiples of 16)
                raise FrameError(
                    f"{problem} (resize or crop it, e.g. open_source(..., size='HxW'))"
                )
            if item.gap:
                size = None
            if size is not None and (item.height, item.width) != size:
                raise FrameError(
                    f"got a {item.height}x{item.width} frame in a stream of {size[0]}x{size[1]} "
                    "frames; the frame size is fixed for a stream: call reset() (or flush()) "
                    "before changing it"
                )
            size = (item.height, item.width)
            checked.append(item)
        return checked

    def _ensure_state(self, height: int, width: int) -> None:
        state = self._state
        if state is not None and (state.height, state.width) == (height, width):
            return
        self._state = None  # free the old buffers before allocating new ones
        self._group = self._last = None
        self._state, self._group = self._allocate(height, width)

    def _allocate(self, height: int, width: int) -> tuple[EncoderState, torch.Tensor]:
        """A new state and group buffer for ``height x width`` (not yet this stream's)."""
        capacity = self.group_size if self.mode == "group" else 1

        def allocate() -> tuple[EncoderState, torch.Tensor]:
            state = self.encoder.new_state(
                height,
                width,
                capacity=capacity,
                memory_format=self.memory_format,
                cuda_graphs=self.cuda_graphs,
            )
            shape = (1, 3, capacity, height, width)
            return state, torch.zeros(shape, dtype=self.encoder.dtype, device=self._device)

        return self._run_on_lane(allocate)

    def _process(self, items: list[CheckedFrame]) -> list[Latent]:
        latents: list[Latent] = []
        for item in items:
            if self._frames == 0:
                self._ensure_state(item.height, item.width)
                self._size = (item.height, item.width)
            latents += self._advance(item)
        return latents

    def _advance(self, item: CheckedFrame) -> list[Latent]:
        state = self._state
        assert state is not None

        def step() -> list[Latent]:
            step_input = self._stage(item)
            with self._lane():
                out = None if step_input is None else self.encoder.step(step_input, state)
            return self._commit(item, out)

        # The state may advance part of the way before a step raises: then broken until reset.
        return self._guarded(step)

    def _stage(self, item: CheckedFrame) -> torch.Tensor | None:
        """Write the frame into this stream's input buffer; the step's input (``[1, 3, n, H, W]``)
        when this frame completes one (every frame in frame mode), else ``None``.

        Together with :meth:`_commit` the two halves of :meth:`_advance` around the model's
        step, so that :class:`streamvae.StreamPool` can step many streams' inputs as one batch.
        """
        assert self._group is not None
        index = self._frames
        x = self._upload(item.tensor)
        slot = self._slot(index)
        with self._lane(), torch.no_grad():
            self._group[0, :, slot].copy_(to_model_input(x, self.encoder.dtype))
        if self.mode == "frame" or index == 0 or slot == self.group_size - 1:
            return self._group[:, :, : slot + 1]
        return None

    def _slot(self, index: int) -> int:
        return 0 if self.mode == "frame" or index == 0 else (index - 1) % self.group_size

    def _commit(self, item: CheckedFrame, out: torch.Tensor | None) -> list[Latent]:
        """After the step (if any) of the frame :meth:`_stage` took: count it, emit the latents."""
        assert self._group is not None
        slot = self._slot(self._frames)
        self._frames += 1
        self._last = self._group[:, :, slot : slot + 1]
        self._timestamps.append(item.timestamp)
        self._numbers.append(item.number)
        self._captured.append(item.captured)
        return [] if out is None else self._emit(out)

    def _end_run(self, pad: bool = False) -> list[Latent]:
        """Finish the current run: pad or drop a partial group. Leaves counters for the caller."""
        if self._frames == 0:
            return []
        pending = (self._frames - 1) % self.group_size
        if pending == 0:
            return []
        if not pad:
            self.dropped_frames += pending
            return []
        assert self._last is not None
        with self._lane():
            last = self._last.clone()
        latents: list[Latent] = []
        missing = self.group_size - pending
        for _ in range(missing):
            latents += self._advance(CheckedFrame(last[0, :, 0], 0, 0, None, False))
        # The padded frames are not source frames: take them back out of the bookkeeping.
        self._frames -= missing
        return [_with_padding(latent, missing, self._frames) for latent in latents]

    def _emit(self, mean: torch.Tensor) -> list[Latent]:
        latents = []
        with self._lane():
            data = self.encoder.normalize(mean) if self.normalize else mean.float()
        data = self._deliver(data, self.output_device)
        ready, ready_monotonic = time.time(), time.monotonic()
        for i in range(data.shape[2]):
            index = self._latents
            frames = (
                range(0, 1)
                if index == 0
                else range(
                    self.group_size * index - self.group_size + 1, self.group_size * index + 1
                )
            )
            stamps = tuple(self._timestamps.popleft() for _ in frames)
            numbers = tuple(self._numbers.popleft() for _ in frames)
            captures = [self._captured.popleft() for _ in frames]
            captured = next((c for c in reversed(captures) if c is not None), None)
            latents.append(
                Latent(
                    data=data[0, :, i],
                    index=index,
                    frames=frames,
                    timestamps=stamps,
                    ready_time=ready,
                    gap=self._gap_pending,
                    source_frames=numbers if any(n is not None for n in numbers) else (),
                    dropped_before=self._count_dropped(numbers),
                    captured=captured,
                    ready_monotonic=ready_monotonic,
                    approximate=index < self._exact_from,
                )
            )
            self._gap_pending = False
            self._latents += 1
        return latents

    def _count_dropped(self, numbers: tuple[int | None, ...]) -> int:
        """Source numbers missing before and among ``numbers`` since the last latent's frames."""
        dropped, last = 0, self._last_number
        for number in numbers:
            if number is not None:
                if last is not None and number > last + 1:
                    dropped += number - last - 1
                last = number
        self._last_number = last
        return dropped


def warmup_steps(state: Any, step: Callable[[int], Any], group: int) -> int:
    """Step ``state`` (``step(count)`` steps it by ``count`` frames or latents) through every
    step signature it can reach once, from where it is; the frames stepped.

    The next signature is a function of the current one (and the count), so the walk stops
    at the first that repeats: the stream's first steps, then one cycle of its steady state.
    ``group`` > 1 (group mode): 1 frame, then ``group`` at a time.
    """
    seen: set[Any] = set()
    stepped = 0
    while True:
        count = 1 if stepped == 0 else group
        key = (count, state.signature())
        if key in seen:
            return stepped
        seen.add(key)
        out = step(count)
        if isinstance(out, Iterator):  # a decoder's step yields its frames as they complete
            for _ in out:
                pass
        stepped += count


def _with_padding(latent: Latent, padded: int, real_frames: int) -> Latent:
    frames = range(latent.frames.start, min(latent.frames.stop, real_frames))
    return replace(
        latent,
        frames=frames,
        timestamps=latent.timestamps[: len(frames)],
        source_frames=latent.source_frames[: len(frames)],
        padded=padded,
    )


class LatentStream(OutputStream[Latent]):
    """The async iterator returned by :meth:`StreamEncoder.stream`; also an async context manager."""
