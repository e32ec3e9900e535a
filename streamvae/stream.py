"""StreamEncoder: one live stream of frames in, Wan 2.1 latents out, exactly as the batch encoder.

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

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import torch

from streamvae.frames import CheckedFrame, FrameError, FrameLike, check_frame, to_model_input
from streamvae.model import EncoderState, WanEncoder

__all__ = ["Latent", "LatentStream", "StreamBroken", "StreamEncoder"]

T = TypeVar("T")


@dataclass(frozen=True)
class Latent:
    """One latent frame of a stream.

    ``data`` is float32 ``[z_dim, H/8, W/8]`` (normalised unless the stream was made with
    ``normalize=False``). ``frames`` are the indices of the source frames it covers, counted
    from the stream's first frame (``range(0, 1)`` for latent 0, ``range(4k-3, 4k+1)`` for
    latent k). ``timestamps`` are those frames' capture times where known (``None`` entries
    where not). ``ready_time`` is the wall-clock time (``time.time()``) at which ``data`` was
    ready on its device. ``padded`` counts repeated copies of the last frame that completed
    the group (``flush(pad=True)``); ``gap`` is true for the first latent after a restart of
    the source (see :class:`streamvae.frames.Frame`).
    """

    data: torch.Tensor
    index: int
    frames: range
    timestamps: tuple[float | None, ...] = ()
    ready_time: float = 0.0
    padded: int = 0
    gap: bool = False
    meta: dict[str, str] = field(default_factory=dict)


class StreamBroken(RuntimeError):
    """The model raised mid-step; the stream's state is undefined until :meth:`StreamEncoder.reset`."""


Mode = Literal["frame", "group"]


class StreamEncoder:
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
        self.encoder = encoder
        self.mode: Mode = mode
        self.pad_tail = pad_tail
        self.normalize = normalize
        self.output_device = None if output_device is None else torch.device(output_device)
        self.memory_format = memory_format
        self.cuda_graphs = cuda_graphs
        self.group_size = encoder.config.temporal_stride
        self._device = encoder.device
        self._cuda = _CudaLane(self._device) if self._device.type == "cuda" else None
        self._state: EncoderState | None = None
        self._group: torch.Tensor | None = None  # group mode: frames waiting for their group
        self._last: torch.Tensor | None = None  # the last frame, for pad_tail
        self._broken = False
        self.dropped_frames = 0
        self._begin_run()

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
        self._size: tuple[int, int] | None = None
        self._gap_pending = False

    def reset(self) -> None:
        """Forget everything; the next frame is a first frame again (of any size).

        The state buffers are kept and zeroed in place, and reused when the size stays.
        """
        if self._state is not None:
            self._run_on_lane(self._state.reset)
        self._broken = False
        self._begin_run()

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
        stamps = [None] * len(frames) if timestamps is None else list(timestamps)
        if len(stamps) != len(frames):
            raise ValueError(f"got {len(frames)} frames but {len(stamps)} timestamps")
        self._check_usable()
        checked = self._check_all(frames, stamps)
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
        latents = self._end_run(pad=self.pad_tail if pad is None else pad)
        self.reset()
        return latents

    # -- async ----

    def stream(
        self, frames: Iterable[FrameLike] | AsyncIterable[FrameLike], *, flush: bool = True
    ) -> LatentStream:
        """Encode an iterable or async iterable of frames; an async iterator of latents.

        The model (and the reading of sync iterables) runs in a worker thread, never on the
        event loop. One frame is read per push: a slow consumer slows the source. When the
        source is exhausted the stream is flushed (``flush=False`` keeps it open for more). If
        the source raises, the iteration ends with that exception after the latents already
        complete. Cancelling the consumer waits for the push in flight, so no thread outlives
        the iteration; the StreamEncoder is then usable after :meth:`reset`.
        """
        return LatentStream(self, frames, flush=flush)

    # -- internals ----

    def _check_usable(self) -> None:
        if self._broken:
            raise StreamBroken(
                "the encoder raised during an earlier push and this stream's state is undefined; "
                "call reset() to start a new stream"
            )

    def _check_all(self, frames: list[Any], stamps: list[float | None]) -> list[CheckedFrame]:
        size = self._size
        checked = []
        for frame, stamp in zip(frames, stamps):
            item = check_frame(frame, self._device, stamp)
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
        capacity = self.group_size if self.mode == "group" else 1
        if state is not None and (state.height, state.width) == (height, width):
            return
        self._state = None  # free the old buffers before allocating new ones
        self._group = self._last = None

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

        self._state, self._group = self._run_on_lane(allocate)

    def _process(self, items: list[CheckedFrame]) -> list[Latent]:
        latents: list[Latent] = []
        for item in items:
            if self._frames == 0:
                self._ensure_state(item.height, item.width)
                self._size = (item.height, item.width)
            latents += self._advance(item)
        return latents

    def _advance(self, item: CheckedFrame) -> list[Latent]:
        assert self._state is not None
        try:
            step_input = self._stage(item)
            with self._lane():
                out = None if step_input is None else self.encoder.step(step_input, self._state)
            return self._commit(item, out)
        except BaseException:
            # The state may have advanced part of the way: only a reset makes it defined again.
            self._broken = True
            raise

    def _stage(self, item: CheckedFrame) -> torch.Tensor | None:
        """Write the frame into this stream's input buffer; the step's input (``[1, 3, n, H, W]``)
        when this frame completes one (every frame in frame mode), else ``None``.

        Together with :meth:`_commit` the two halves of :meth:`_advance` around the model's
        step, so that :class:`streamvae.StreamPool` can step many streams' inputs as one batch.
        """
        assert self._group is not None
        index = self._frames
        if self._cuda is not None:
            x = self._cuda.upload(item.tensor)
        else:
            x = item.tensor.to(self._device)
        slot = self._slot(index)
        with self._lane():
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
            if self.output_device is not None and self.output_device != data.device:
                data = self._to_output(data)
        if self._cuda is not None:
            self._cuda.wait()
            if data.device.type == "cuda":
                # Left on the GPU for the caller: its later reads are on its own stream, so the
                # lane's allocator must not hand this memory out again before they are done.
                data.record_stream(torch.cuda.current_stream(data.device))
        ready = time.time()
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
            latents.append(
                Latent(
                    data=data[0, :, i],
                    index=index,
                    frames=frames,
                    timestamps=stamps,
                    ready_time=ready,
                    gap=self._gap_pending,
                )
            )
            self._gap_pending = False
            self._latents += 1
        return latents

    def _to_output(self, data: torch.Tensor) -> torch.Tensor:
        if (
            self._cuda is not None
            and self.output_device is not None
            and self.output_device.type == "cpu"
        ):
            return self._cuda.download(data)
        return data.to(self.output_device)

    def _lane(self) -> Any:
        return self._cuda.context() if self._cuda is not None else nullcontext()

    def _run_on_lane(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lane():
            result = fn(*args, **kwargs)
        if self._cuda is not None:
            self._cuda.stream.synchronize()
        return result


def _with_padding(latent: Latent, padded: int, real_frames: int) -> Latent:
    frames = range(latent.frames.start, min(latent.frames.stop, real_frames))
    return replace(
        latent, frames=frames, timestamps=latent.timestamps[: len(frames)], padded=padded
    )


class _CudaLane:
    """A StreamEncoder's own CUDA stream, pinned upload buffers and completion events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._pinned: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._upload_done: dict[tuple[tuple[int, ...], torch.dtype], list[torch.cuda.Event]] = {}
        self._turn = 0
        self._ready = torch.cuda.Event(blocking=True)

    def context(self) -> Any:
        return torch.cuda.stream(self.stream)

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host -> device through double-buffered pinned memory, enqueued on this lane's stream.

        The lane first waits for the work queued on the caller's current stream (its frame, or
        weights it has just moved or cast, must be ready before this lane reads them).
        """
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if tensor.device.type == "cuda":
            tensor.record_stream(self.stream)  # the caller may free it while we still read it
            return tensor
        # numpy frames arrive as [H, W, 3] memory viewed as [3, H, W]: upload that memory as it is.
        hwc = tensor.permute(1, 2, 0)
        src, channels_last = (hwc, True) if hwc.is_contiguous() else (tensor.contiguous(), False)
        key = (tuple(src.shape), src.dtype)
        if key not in self._pinned:
            self._pinned[key] = [torch.empty_like(src).pin_memory() for _ in range(2)]
            self._upload_done[key] = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn ^= 1
        buffer, done = self._pinned[key][self._turn], self._upload_done[key][self._turn]
        done.synchronize()  # the copy that last read this buffer has finished
        buffer.copy_(src)
        with torch.cuda.stream(self.stream):
            out = buffer.to(self.device, non_blocking=True)
            done.record(self.stream)
        return out.permute(2, 0, 1) if channels_last else out

    def download(self, data: torch.Tensor) -> torch.Tensor:
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
        host.copy_(data, non_blocking=True)
        return host

    def wait(self) -> None:
        """Block this thread (without spinning) until the lane's queued work has completed."""
        self._ready.record(self.stream)
        self._ready.synchronize()


class LatentStream(AsyncIterator[Latent]):
    """The async iterator returned by :meth:`StreamEncoder.stream`; also an async context manager."""

    def __init__(
        self,
        encoder: StreamEncoder,
        frames: Iterable[FrameLike] | AsyncIterable[FrameLike],
        *,
        flush: bool,
    ) -> None:
        self._gen = _latents(encoder, frames, flush=flush)

    def __aiter__(self) -> LatentStream:
        return self

    async def __anext__(self) -> Latent:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> LatentStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_END = object()


async def _latents(
    encoder: StreamEncoder,
    frames: Iterable[FrameLike] | AsyncIterable[FrameLike],
    *,
    flush: bool,
) -> AsyncIterator[Latent]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamvae-encode")
    try:
        if isinstance(frames, AsyncIterable):
            source = frames.__aiter__()

            async def next_frame() -> Any:
                try:
                    return await source.__anext__()
                except StopAsyncIteration:
                    return _END
        else:
            iterator = iter(frames)

            async def next_frame() -> Any:
                return await _in_worker(executor, next, iterator, _END)

        while (frame := await next_frame()) is not _END:
            for latent in await _in_worker(executor, encoder.push, frame):
                yield latent
        if flush:
            for latent in await _in_worker(executor, encoder.flush):
                yield latent
    finally:
        executor.shutdown(wait=False)
        await _wait_thread_exit(executor)


async def _in_worker(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in the worker; if cancelled, wait for it to finish before re-raising."""
    future = executor.submit(fn, *args)
    try:
        return await asyncio.shield(asyncio.wrap_future(future))
    except asyncio.CancelledError:
        await asyncio.wait([asyncio.wrap_future(future)])
        raise


async def _wait_thread_exit(executor: ThreadPoolExecutor) -> None:
    threads: set[threading.Thread] = set(getattr(executor, "_threads", ()))
    while any(t.is_alive() for t in threads):
        await asyncio.sleep(0.001)
