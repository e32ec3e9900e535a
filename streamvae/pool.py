"""StreamPool: many live streams through one encoder (or decoder), stepped together as batches.

>>> import numpy as np
>>> from streamvae import StreamPool, WanEncoder, narrow
>>> pool = StreamPool(WanEncoder(narrow(8)))
>>> pool.add("cam-a"); pool.add("cam-b")
>>> frame = np.zeros((32, 32, 3), dtype=np.uint8)
>>> out = pool.push({"cam-a": frame, "cam-b": frame})      # one tick: both stepped as one batch
>>> {stream: [latent.index for latent in latents] for stream, latents in out.items()}
{'cam-a': [0], 'cam-b': [0]}
>>> out = pool.push({"cam-a": frame})                      # cam-b does not advance this tick
>>> pool.frames_pushed("cam-a"), pool.frames_pushed("cam-b")
(2, 1)
>>> pool.remove("cam-a")                                   # flush: a partial group is dropped
[]

A pool built with a :class:`~streamvae.WanDecoder` decodes as this one encodes: a tick maps
streams to latents (a :class:`~streamvae.Latent` or its ``[z, h, w]`` data) and gives back each
stream's :class:`~streamvae.DecodedFrame` list, as its own :class:`~streamvae.StreamDecoder`
would:

>>> import torch
>>> from streamvae import random_decoder
>>> decoders = StreamPool(random_decoder(narrow(8)))
>>> decoders.add("cam-a"); decoders.add("cam-b")
>>> latent = torch.zeros(16, 4, 4)                         # normalised, as the encoder emits
>>> out = decoders.push({"cam-a": latent, "cam-b": latent})
>>> {stream: [frame.index for frame in frames] for stream, frames in out.items()}
{'cam-a': [0], 'cam-b': [0]}
>>> [frame.index for frame in decoders.push({"cam-a": latent})["cam-a"]]
[1, 2, 3, 4]
>>> decoders.latents_pushed("cam-a"), decoders.latents_pushed("cam-b")
(2, 1)

Asynchronously, over a mapping of sources (each tick takes what each source has ready, waiting
at most ``deadline`` seconds for the others once one has a frame)::

    async with pool.stream({"cam-a": source_a, "cam-b": source_b}) as latents:
        async for stream_id, latent in latents:
            ...

How streams are batched (docs/design.md has the measurements):
streams of one frame size share a *bank*, one batched state with a slot per stream; each
stream's own state object is a view of its slot (allocated when the stream is admitted, never
growing). A tick groups the streams given a frame into *cohorts* of equal step signature (the
Python-side state that decides which kernels a step runs: in frame mode the phase of the
stream within its group, and the warm-up of its first frames) and steps each cohort's runs of
contiguous slots as one batch, on views of the bank. A stream that skips a tick falls out of
its cohort's phase and forms its own; nothing is copied to keep cohorts together. (A decoder's
step has no phase: every latent after the second steps the same kernels, so decoder streams
that joined at different times step as one batch from their fourth latent on.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Hashable,
    Iterable,
    Mapping,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, cast, overload

import torch
from typing_extensions import TypeVar

from streamvae.decoding import DecodedFrame, LatentError, StreamDecoder, _Checked
from streamvae.frames import SPATIAL_MULTIPLE, CheckedFrame, FrameError, FrameLike
from streamvae.model import DecoderState, EncoderState, WanDecoder, WanEncoder, state_nbytes
from streamvae.model.graphs import StepGraphs
from streamvae.stepping import _END, _SyncReader
from streamvae.stream import (
    Latent,
    Mode,
    StreamBroken,
    StreamEncoder,
    _in_worker,
    _wait_thread_exit,
    warmup_steps,
)

__all__ = [
    "AdmissionError",
    "PoolSourceError",
    "PoolStepError",
    "PoolStream",
    "StreamPool",
    "TickBreakdown",
    "TickStats",
]


class AdmissionError(RuntimeError):
    """A stream was refused (too many streams, or its state would not fit the memory budget).

    Nothing changed: the pool is as it was before the call.
    """


class PoolStepError(RuntimeError):
    """The model raised during a tick (e.g. out of memory); the original is ``__cause__``.

    The tick's streams are in one of three groups:

    - ``latents``: streams whose frame was used (their batch ran before the failure, or their
      frame needed no step): their latents of this tick, as :meth:`StreamPool.push` returns;
    - ``broken``: the streams of the batch that raised: their state is undefined, and their
      next push raises :class:`~streamvae.StreamBroken` until :meth:`StreamPool.reset` (or
      :meth:`StreamPool.remove`);
    - ``not_advanced``: streams whose batch had not run: their frame was not used and their
      state is unchanged (push that frame again).
    """

    def __init__(
        self,
        message: str,
        latents: dict[str, list[Latent]],
        broken: frozenset[str],
        not_advanced: frozenset[str],
    ) -> None:
        super().__init__(message)
        self.latents = latents
        self.broken = broken
        self.not_advanced = not_advanced


class PoolSourceError(RuntimeError):
    """Streams of :meth:`StreamPool.stream` failed: their source raised, or the pool refused
    one of their frames (:class:`~streamvae.FrameError`, :class:`AdmissionError`,
    :class:`~streamvae.StreamBroken`); ``errors`` maps each stream to its exception.

    Raised when the iteration ends (every other source had its frames encoded first).
    """

    def __init__(self, errors: dict[str, BaseException]) -> None:
        names = ", ".join(f"{sid!r}: {type(e).__name__}: {e}" for sid, e in errors.items())
        super().__init__(f"{len(errors)} source(s) failed: {names}")
        self.errors = errors


@dataclass
class TickStats:
    """What the pool's ticks did, summed since it was made (for benchmarks and stats lines)."""

    ticks: int = 0
    frames: int = 0
    steps: int = 0  # batched model steps
    stepped_streams: int = 0  # stream-steps inside them (so the mean batch is this / steps)
    batches: dict[int, int] = field(default_factory=dict)  # batch size -> steps

    @property
    def mean_batch(self) -> float:
        return self.stepped_streams / self.steps if self.steps else 0.0


@dataclass
class TickBreakdown:
    """Where the wall time of the pool's ticks went, in seconds summed since it was made
    (:attr:`StreamPool.breakdown`; assign a fresh one to start over).

    Every moment inside :meth:`StreamPool.push` is counted in exactly one part, so the parts
    sum to ``total``:

    - ``host``: the checks, admission, grouping into cohorts, the outputs' labels (Python);
    - ``uploads``: inputs to the model's device and into the streams' input buffers (on CUDA
      one pinned, double-buffered, asynchronous copy per batch);
    - ``steps``: each batched model step, by ``"HxW xB"`` (size and batch); on CUDA the time
      to launch it (the device runs it asynchronously: ``device_steps`` has its device time,
      read from CUDA events once the tick has synchronised);
    - ``downloads``: outputs to ``output_device`` (on CUDA one asynchronous copy per batch);
    - ``syncs``: every wait for the device, by where: ``"upload buffer"`` (a pinned buffer
      still being read by the copy of two ticks ago), ``"downloads"`` (the tick's copies back,
      once per tick); ``sync_counts`` counts them. The CPU has none.
    """

    ticks: int = 0
    total: float = 0.0
    host: float = 0.0
    uploads: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    downloads: float = 0.0
    syncs: dict[str, float] = field(default_factory=dict)
    sync_counts: dict[str, int] = field(default_factory=dict)
    device_steps: dict[str, float] = field(default_factory=dict)
    # CUDA events of steps whose device time is not read yet (read once they have completed).
    _events: list[tuple[str, Any, Any]] = field(default_factory=list, repr=False, compare=False)

    @property
    def parts(self) -> float:
        """The sum of the parts (equal to ``total`` up to float rounding)."""
        return (self.host + self.uploads + sum(self.steps.values()) + self.downloads) + sum(
            self.syncs.values()
        )

    def per_tick_ms(self) -> dict[str, float]:
        """Milliseconds per tick: total, host, uploads, steps, downloads, syncs (summed), and
        each step and synchronisation on its own (``step HxW xB``, ``sync WHERE``)."""
        ticks = max(self.ticks, 1)
        row = {
            "total": self.total,
            "host": self.host,
            "uploads": self.uploads,
            "steps": sum(self.steps.values()),
            "downloads": self.downloads,
            "syncs": sum(self.syncs.values()),
        }
        row |= {f"step {key}": value for key, value in self.steps.items()}
        row |= {f"device step {key}": value for key, value in self.device_steps.items()}
        row |= {f"sync {key}": value for key, value in self.syncs.items()}
        return {key: value * 1000 / ticks for key, value in row.items()}


class _TickClock:
    """Attributes the time since the last mark to a part of a :class:`TickBreakdown`."""

    def __init__(self, into: TickBreakdown, device: torch.device) -> None:
        self.into = into
        self.cuda = device.type == "cuda"
        self.start = self.last = time.perf_counter()
        self.copies: Any = None  # on CUDA: an event after the tick's copies back

    def mark(self, part: str, key: str | None = None) -> None:
        now = time.perf_counter()
        spent, self.last = now - self.last, now
        into = self.into
        if key is None:
            setattr(into, part, getattr(into, part) + spent)
            return
        table: dict[str, float] = getattr(into, part)
        table[key] = table.get(key, 0.0) + spent
        if part == "syncs":
            into.sync_counts[key] = into.sync_counts.get(key, 0) + 1

    def step_events(self, key: str) -> tuple[Any, Any] | None:
        """CUDA events to record around a step (its device time), ``None`` elsewhere."""
        if not self.cuda:
            return None
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.into._events.append((key, *events))
        return events

    def copied(self) -> None:
        """A copy back was enqueued (on the current stream): :meth:`wait_copies` waits for it."""
        if self.copies is None:
            self.copies = torch.cuda.Event()
        self.copies.record()  # on one stream: the last record covers every earlier copy

    def wait_copies(self) -> None:
        if self.copies is not None:
            self.mark("host")
            self.copies.synchronize()
            self.copies = None
            self.mark("syncs", "downloads")

    def finish(self) -> None:
        """End of the tick: wait for the copies back (once), read the steps' device times."""
        self.wait_copies()
        waiting = []
        for key, begin, end in self.into._events:
            if end.query():  # never waits: a step still running is read at a later tick
                seconds = begin.elapsed_time(end) / 1000
                table = self.into.device_steps
                table[key] = table.get(key, 0.0) + seconds
            else:
                waiting.append((key, begin, end))
        self.into._events = waiting
        self.mark("host")
        self.into.ticks += 1
        self.into.total += self.last - self.start


class _PinnedUploads:
    """CUDA: host tensors to the device as one batch, through double-buffered pinned memory,
    copied asynchronously on the caller's current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[tuple[Any, ...], list[tuple[torch.Tensor, Any]]] = {}
        self.turns: dict[tuple[Any, ...], int] = {}

    def upload(self, tensors: list[torch.Tensor], clock: _TickClock) -> torch.Tensor:
        first = tensors[0]
        key = (len(tensors), tuple(first.shape), first.dtype)
        if key not in self.buffers:
            shape = (len(tensors), *first.shape)
            self.buffers[key] = [
                (torch.empty(shape, dtype=first.dtype).pin_memory(), torch.cuda.Event())
                for _ in range(2)
            ]
            self.turns[key] = 0
        self.turns[key] ^= 1
        buffer, done = self.buffers[key][self.turns[key]]
        clock.mark("uploads")
        done.synchronize()  # the copy that last read this buffer (two uploads ago) has ended
        clock.mark("syncs", "upload buffer")
        torch.stack(tensors, out=buffer)
        out = buffer.to(self.device, non_blocking=True)
        done.record()
        return out


class _PooledStream(StreamEncoder):
    """A StreamEncoder whose state is a slot of its pool's bank; the pool steps it in batches."""

    def __init__(
        self,
        pool: StreamPool[Any],
        stream_id: str,
        options: dict[str, Any],
        acquire: Callable[[Any, int, int], None],
    ) -> None:
        assert pool.encoder is not None
        super().__init__(pool.encoder, **options)
        self.stream_id = stream_id
        # All work runs on the caller's (the pool's) current CUDA stream, in one order.
        self._cuda = None
        self._acquire = acquire
        self.slot: int | None = None
        self.bank: _Bank | None = None
        self.reserved: tuple[int, int] | None = None

    def _ensure_state(self, height: int, width: int) -> None:
        _ensure_slot(self, height, width)


class _PooledDecoder(StreamDecoder):
    """A StreamDecoder whose state is a slot of its pool's bank; the pool steps it in batches."""

    def __init__(
        self,
        pool: StreamPool[Any],
        stream_id: str,
        options: dict[str, Any],
        acquire: Callable[[Any, int, int], None],
    ) -> None:
        assert pool.decoder is not None
        super().__init__(pool.decoder, **options)
        self.stream_id = stream_id
        self._cuda = None  # as _PooledStream: the pool's current CUDA stream
        self._acquire = acquire
        self.slot: int | None = None
        self.bank: _Bank | None = None
        self.reserved: tuple[int, int] | None = None

    def _ensure_state(self, height: int, width: int) -> None:
        _ensure_slot(self, height, width)

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # the pool uploads a batch's latents together (_decode_run)


_Pooled = _PooledStream | _PooledDecoder
_State = EncoderState | DecoderState
OutT = TypeVar("OutT", default=Latent)


def _ensure_slot(stream: _Pooled, height: int, width: int) -> None:
    """A pooled stream's ``_ensure_state``: a slot of the bank of that size (admitted before)."""
    state = stream._state
    if state is not None and (state.height, state.width) == (height, width):
        return
    stream._acquire(stream, height, width)


class _Bank:
    """The batched state of one frame size: a slot per stream, views for batches of slots."""

    def __init__(self, pool: StreamPool[Any], size: tuple[int, int], capacity: int) -> None:
        self.pool = pool
        self.size = size
        self.state = pool._new_state(size, capacity)
        self.capacity = capacity
        self.members: dict[int, Any] = {}  # slot -> _PooledStream or _PooledDecoder
        self._views: dict[tuple[int, int], _State] = {}

    @property
    def nbytes(self) -> int:
        return self.state.nbytes

    def free_slot(self) -> int | None:
        return next((i for i in range(self.capacity) if i not in self.members), None)

    def attach(self, stream: Any, slot: int) -> None:
        self.members[slot] = stream
        stream.bank, stream.slot = self, slot
        view = self.pool._with_graphs(self.state.batch_view(slot, slot + 1))
        view.reset()
        stream._state = view

    def detach(self, stream: _Pooled) -> None:
        assert stream.slot is not None
        del self.members[stream.slot]
        stream.bank = stream.slot = None
        stream._state = None

    def grow(self, capacity: int) -> None:
        """More slots: a new batched state, the old slots copied in, members re-pointed."""
        new = self.pool._new_state(self.size, capacity)
        for old_buffer, new_buffer in zip(self.state.buffers(), new.buffers()):
            new_buffer[: self.capacity].copy_(old_buffer)
        for slot, stream in self.members.items():
            assert stream._state is not None
            signature = stream._state.signature()
            view = self.pool._with_graphs(new.batch_view(slot, slot + 1))
            view.restore(signature)
            stream._state = view
        self.state, self.capacity = new, capacity
        self._views.clear()

    def view(self, start: int, stop: int) -> _State:
        view = self._views.get((start, stop))
        if view is None:
            view = self.pool._with_graphs(self.state.batch_view(start, stop))
            self._views[(start, stop)] = view
        return view


class StreamPool(Generic[OutT]):
    """Many streams over one :class:`~streamvae.WanEncoder` (or :class:`~streamvae.WanDecoder`),
    stepped as batches, exact per stream.

    ``StreamPool(encoder, max_streams=None, memory_budget=None, mode="frame", pad_tail=False,
    normalize=True, output_device="cpu", memory_format=None)``; the stream options are
    :class:`~streamvae.StreamEncoder`'s and apply to every stream.

    - :meth:`add` a stream (optionally with its frame ``size``, which admits it and allocates
      its state at once), :meth:`push` a tick (a mapping ``stream_id -> frame``), get back
      ``stream_id -> [Latent]`` for the streams given a frame; a stream not given a frame does
      not advance. :meth:`remove` flushes a stream and returns its last latents.
    - Each stream's latents (index, frames, timestamps, gap, data) are those of its own
      StreamEncoder on the same frames (float32: within 1e-5 relative; the batches change only
      the order of float sums). Streams of several frame sizes may share a pool; frames of one
      stream keep one size until it is reset or a gap frame restarts it.
    - Every frame of a tick is checked before any is used: a refused frame raises
      :class:`~streamvae.FrameError` naming its stream, and no stream advances.
    - ``max_streams`` and ``memory_budget`` (bytes of state; on CUDA by default 90% of the
      memory free when the pool is made) refuse a stream that would not fit, with
      :class:`AdmissionError`, at :meth:`add` (with ``size``) or at its first frame; nothing
      changes then.
    - If the model raises during a tick, :class:`PoolStepError` says which streams advanced,
      which are broken and which did not advance.
    - ``cuda_graphs`` (CUDA): each batch's step is captured once per signature and batch of
      slots and replayed (one launch per batch instead of hundreds). All work runs on the
      caller's current CUDA stream.

    **Decoding.** ``StreamPool(decoder, max_streams=None, memory_budget=None, normalized=True,
    output_device="cpu", memory_format=None)`` (a :class:`~streamvae.WanDecoder`; the options are
    :class:`~streamvae.StreamDecoder`'s): the same banks, cohorts, admission (by the decoder's
    state size) and failure rules, with latents in and frames out. :meth:`push` takes
    ``stream_id -> latent`` (a :class:`~streamvae.Latent`, whose timestamps and gap the frames
    carry on, or its ``[z, h, w]`` data) and returns ``stream_id -> [DecodedFrame]`` (one frame
    for a stream's latent 0, else four), each equal to its own StreamDecoder's; a refused latent
    raises :class:`~streamvae.LatentError` naming its stream, and no stream advances. ``size``
    (in :meth:`add`) is the latents' ``(h, w)``; :meth:`latents_pushed`, :meth:`frames_emitted`
    and :meth:`latent_size` replace the encoder's counters.

    Not thread-safe: one caller (or :meth:`stream`'s worker) at a time.
    """

    @overload
    def __init__(
        self: StreamPool[Latent],
        model: WanEncoder,
        /,
        *,
        max_streams: int | None = None,
        memory_budget: int | None = None,
        mode: Mode = "frame",
        pad_tail: bool = False,
        normalize: bool = True,
        output_device: str | torch.device | None = "cpu",
        memory_format: torch.memory_format | None = None,
        cuda_graphs: bool = False,
    ) -> None: ...

    @overload
    def __init__(
        self: StreamPool[DecodedFrame],
        model: WanDecoder,
        /,
        *,
        max_streams: int | None = None,
        memory_budget: int | None = None,
        normalized: bool = True,
        output_device: str | torch.device | None = "cpu",
        memory_format: torch.memory_format | None = None,
    ) -> None: ...

    def __init__(
        self,
        model: WanEncoder | WanDecoder,
        /,
        *,
        max_streams: int | None = None,
        memory_budget: int | None = None,
        mode: Mode = "frame",
        pad_tail: bool = False,
        normalize: bool = True,
        normalized: bool = True,
        output_device: str | torch.device | None = "cpu",
        memory_format: torch.memory_format | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if max_streams is not None and max_streams < 1:
            raise ValueError(f"max_streams must be >= 1 or None, got {max_streams}")
        if memory_budget is None and model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            memory_budget = int(free * 0.9)
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes or None, got {memory_budget}")
        self.model = model
        self.encoder = model if isinstance(model, WanEncoder) else None
        self.decoder = model if isinstance(model, WanDecoder) else None
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda" and self.decoder is None
        self.max_streams = max_streams
        self.memory_budget = memory_budget
        self._options: dict[str, Any]
        if self.decoder is not None:
            self._options = {
                "normalized": normalized,
                "output_device": output_device,
                "memory_format": memory_format,
            }
            self.mode: Mode = "frame"
            self._frames_per_step = 1
            decoding = StreamDecoder(self.decoder, **self._options)
            self._memory_format: torch.memory_format | None = decoding.memory_format
        else:
            assert self.encoder is not None
            self._options = {
                "mode": mode,
                "pad_tail": pad_tail,
                "normalize": normalize,
                "output_device": output_device,
                "memory_format": memory_format,
            }
            # Validates the options once, as a StreamEncoder would.
            probe = StreamEncoder(self.encoder, **self._options)
            self.mode = probe.mode
            self._frames_per_step = probe.group_size if mode == "group" else 1
            self._memory_format = memory_format
        self._streams: dict[str, Any] = {}  # _PooledStream or _PooledDecoder, by the model
        self._banks: dict[tuple[int, int], _Bank] = {}
        self._slot_bytes: dict[tuple[int, int], int] = {}
        # Stragglers: a cohort whose slots are not contiguous is stepped in its contiguous runs
        # (default), or, with ``gather``, as one batch copied into a scratch state and back.
        # Measured on the CPU (benchmarks/RESULTS.md, "Many streams"): see the README.
        self.gather = False
        self._scratches: dict[tuple[tuple[int, int], int], _State] = {}
        self.stats = TickStats()
        self.breakdown = TickBreakdown()
        """Where the ticks' time went (see :class:`TickBreakdown`)."""
        cuda = model.device.type == "cuda"
        self._uploads = _PinnedUploads(model.device) if cuda else None
        self._clock = _TickClock(TickBreakdown(), model.device)  # the tick's, set by push

    @property
    def decoding(self) -> bool:
        """Whether this pool decodes (built with a :class:`~streamvae.WanDecoder`)."""
        return self.decoder is not None

    # -- streams ----

    def add(self, stream_id: str, *, size: tuple[int, int] | None = None) -> None:
        """Add a stream. With ``size=(H, W)`` (a decoder pool: the latents' ``(h, w)``) it is
        admitted and its state allocated now; without, at its first frame (whose size it then
        keeps).

        Raises ``ValueError`` for an id already in the pool or a bad size, and
        :class:`AdmissionError` when ``max_streams`` or the memory budget refuses it.
        """
        if not isinstance(stream_id, str) or not stream_id:
            raise ValueError(f"a stream id is a non-empty string, got {stream_id!r}")
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} is already in the pool")
        if self.max_streams is not None and len(self._streams) >= self.max_streams:
            raise AdmissionError(
                f"stream {stream_id!r} refused: the pool holds its max_streams={self.max_streams} "
                "streams; remove one first"
            )
        if size is not None:
            size = _check_size(stream_id, size, 1 if self.decoding else SPATIAL_MULTIPLE)
            self._admit({stream_id: size})
        stream: _Pooled
        if self.decoding:
            stream = _PooledDecoder(self, stream_id, self._options, self._acquire)
        else:
            stream = _PooledStream(self, stream_id, self._options, self._acquire)
        self._streams[stream_id] = stream
        if size is not None:
            stream.reserved = size
            stream._ensure_state(*size)

    def remove(self, stream_id: str, *, pad: bool | None = None, flush: bool = True) -> list[OutT]:
        """Flush the stream (see :meth:`StreamEncoder.flush`), drop it; return its last latents
        (a decoder pool: ``[]``, every latent's frames come with its push; ``pad`` is the
        encoder's).

        ``flush=False`` (and a broken stream) drops it with no latents; its slot is freed.
        """
        stream = self._get(stream_id)
        try:
            tail: list[Any] = []
            if flush and not stream._broken:
                tail = stream.flush() if self.decoding else stream.flush(pad=pad)
        finally:
            self._release(stream)
            del self._streams[stream_id]
        return tail

    def _release(self, stream: _Pooled) -> None:
        bank = stream.bank
        if bank is None:
            return
        bank.detach(stream)
        if not bank.members:  # a size no stream uses any more: free its bank
            del self._banks[bank.size]

    def reset(self, stream_id: str) -> None:
        """Forget the stream's frames (a broken stream becomes usable); it stays in the pool."""
        self._get(stream_id).reset()

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def stream_ids(self) -> list[str]:
        return list(self._streams)

    def frames_pushed(self, stream_id: str) -> int:
        """Frames the stream accepted since it was added or reset (an encoder pool)."""
        return self._encoding(stream_id).frames_pushed

    def latents_emitted(self, stream_id: str) -> int:
        return self._encoding(stream_id).latents_emitted

    def dropped_frames(self, stream_id: str) -> int:
        """Frames of partial groups the stream dropped (at gaps and flushes)."""
        return self._encoding(stream_id).dropped_frames

    def frame_size(self, stream_id: str) -> tuple[int, int] | None:
        stream = self._encoding(stream_id)
        return stream.frame_size or stream.reserved

    def latents_pushed(self, stream_id: str) -> int:
        """Latents the stream decoded since it was added or reset (a decoder pool)."""
        return self._decoding(stream_id).latents_pushed

    def frames_emitted(self, stream_id: str) -> int:
        """Frames the stream decoded since it was added or reset (a decoder pool)."""
        return self._decoding(stream_id).frames_emitted

    def latent_size(self, stream_id: str) -> tuple[int, int] | None:
        """``(h, w)`` of the stream's latents (a decoder pool); ``None`` before it has one."""
        stream = self._decoding(stream_id)
        return stream.latent_size or stream.reserved

    def state(self, stream_id: str) -> EncoderState | DecoderState | None:
        """The stream's own state object (a view of its slot), ``None`` before it has one."""
        state: _State | None = self._get(stream_id)._state
        return state

    @property
    def state_nbytes(self) -> int:
        """Bytes of state the pool has allocated (every bank's slots, every stream's buffer)."""
        return self._allocated()

    # -- warming up ----

    def warmup(self, size: tuple[int, int], *, streams: int = 1) -> int:
        """Run the first steps of ``streams`` streams of ``size`` (frames ``(H, W)``; a decoder
        pool: latents ``(h, w)``), batched as a cohort of them would be, on a throwaway state
        before they go live: cuDNN's autotuning on CUDA, oneDNN's first calls on the CPU, for
        the shapes their ticks will step (see :meth:`streamvae.StreamEncoder.warmup`). No
        stream, bank or counter changes. Returns the steps run.

        >>> from streamvae import WanEncoder, narrow
        >>> pool = StreamPool(WanEncoder(narrow(8)))
        >>> pool.warmup((16, 16), streams=2) > 0, pool.state_nbytes, pool.stats.ticks
        (True, 0, 0)
        """
        size = _check_size("warmup", size, 1 if self.decoding else SPATIAL_MULTIPLE)
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        state = self._new_state(size, streams)
        device, dtype = self.model.device, self.model.dtype
        step: Callable[[int], Any]
        if self.decoder is not None:
            decoder = self.decoder
            assert isinstance(state, DecoderState)
            latents = torch.zeros(
                (streams, decoder.config.z_dim, 1, *size), dtype=dtype, device=device
            )
            step = lambda _: decoder.step(latents, state)  # noqa: E731
        else:
            encoder = self.encoder
            assert encoder is not None and isinstance(state, EncoderState)
            frames = torch.zeros(
                (streams, 3, self._frames_per_step, *size), dtype=dtype, device=device
            )
            step = lambda count: encoder.step(frames[:, :, :count], state)  # noqa: E731
        stepped = warmup_steps(state, step, self._frames_per_step)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return stepped

    # -- ticks ----

    def push(
        self,
        frames: Mapping[str, Any],
        *,
        timestamps: Mapping[str, float | None] | None = None,
    ) -> dict[str, list[OutT]]:
        """One tick: one frame for each stream in ``frames`` (a decoder pool: one latent); their
        latents (frames), by stream id.

        Every frame is checked before any is used; a refused frame raises
        :class:`~streamvae.FrameError` naming its stream (a decoder pool:
        :class:`~streamvae.LatentError`; an unknown stream id raises ``KeyError``, a broken
        stream :class:`~streamvae.StreamBroken`, a stream that does not fit
        :class:`AdmissionError`), and then no stream has advanced. ``timestamps`` are the
        encoder's (a latent carries its own).
        """
        stamps = dict(timestamps or {})
        unknown = [sid for sid in frames if sid not in self._streams]
        if unknown:
            raise KeyError(f"not in the pool: {unknown!r}; add() them first")
        if set(stamps) - set(frames):
            raise ValueError(
                f"timestamps for streams given no frame: {sorted(set(stamps) - set(frames))!r}"
            )
        if self.decoding and stamps:
            raise ValueError("a decoder pool takes no timestamps: a Latent carries its own")
        self._clock = _TickClock(self.breakdown, self.model.device)
        try:
            if self.decoding:
                return cast("dict[str, list[OutT]]", self._push_latents(frames))
            return cast("dict[str, list[OutT]]", self._push_frames(frames, stamps))
        finally:
            self._clock.finish()

    def _push_frames(
        self, frames: Mapping[str, FrameLike], stamps: Mapping[str, float | None]
    ) -> dict[str, list[Latent]]:
        checked = self._check_tick(frames, stamps)
        self._admit(
            {
                sid: (item.height, item.width)
                for sid, item in checked.items()
                if self._needs_slot(self._streams[sid], item)
            }
        )
        self.stats.ticks += 1
        self.stats.frames += len(checked)
        out: dict[str, list[Latent]] = {}
        cohorts: dict[Hashable, list[_PooledStream]] = {}
        for sid, item in checked.items():
            stream = self._streams[sid]
            latents: list[Latent] = []
            if item.gap and stream._frames > 0:
                latents += stream._end_run()
                stream.reset()
                stream._gap_pending = True
            elif item.gap:
                stream._gap_pending = True
            if stream._frames == 0:
                stream._ensure_state(item.height, item.width)
                stream._size = (item.height, item.width)
                stream.reserved = None  # add(size=) holds the size up to the first frame
            out[sid] = latents
            count = self._step_frames(stream)
            if count == 0:  # group mode, mid-group: buffered, no step
                self._clock.mark("host")
                stream._stage(item)
                self._clock.mark("uploads")
                out[sid] += stream._commit(item, None)
                continue
            assert stream._state is not None and stream.bank is not None
            key = (stream.bank.size, count, stream._state.signature())
            cohorts.setdefault(key, []).append(stream)
        self._step_cohorts(cohorts, out, lambda run: self._step_run(run, checked))
        return out

    def _push_latents(self, latents: Mapping[str, Any]) -> dict[str, list[DecodedFrame]]:
        checked = self._check_latents(latents)
        self._admit(
            {
                sid: (item.raw.shape[1], item.raw.shape[2])
                for sid, item in checked.items()
                if self._needs_latent_slot(self._streams[sid], item)
            }
        )
        self.stats.ticks += 1
        self.stats.frames += len(checked)
        out: dict[str, list[DecodedFrame]] = {}
        cohorts: dict[Hashable, list[_PooledDecoder]] = {}
        inputs: dict[str, torch.Tensor] = {}
        for sid, item in checked.items():
            stream: _PooledDecoder = self._streams[sid]
            inputs[sid] = stream._stage(item)  # a new run where it starts one; its slot
            stream.reserved = None
            out[sid] = []
            assert stream._state is not None and stream.bank is not None
            cohorts.setdefault((stream.bank.size, stream._state.signature()), []).append(stream)
        self._step_cohorts(cohorts, out, lambda run: self._decode_run(run, checked, inputs))
        return out

    def _step_cohorts(
        self,
        cohorts: Mapping[Hashable, list[Any]],
        out: dict[str, list[Any]],
        step: Callable[[list[Any]], dict[str, list[Any]]],
    ) -> None:
        """Step each cohort's runs of slots (``step(run)``), adding their outputs to ``out``;
        if one raises, :class:`PoolStepError` (see there)."""
        runs: list[list[Any]] = []
        for members in cohorts.values():
            split = _contiguous_runs(members)
            runs += [sorted(members, key=_slot_of)] if self.gather and len(split) > 1 else split
        for done, run in enumerate(runs):
            try:
                outputs = step(run)
            except BaseException as error:
                for stream in run:
                    stream._broken = True
                    out.pop(stream.stream_id, None)
                waiting = frozenset(s.stream_id for later in runs[done + 1 :] for s in later)
                for sid in waiting:
                    out.pop(sid, None)
                broken = frozenset(s.stream_id for s in run)
                if not isinstance(error, Exception):  # KeyboardInterrupt, cancellation: as is
                    raise
                raise PoolStepError(
                    f"the model raised while stepping streams {sorted(broken)!r} "
                    f"({type(error).__name__}: {error}); they are broken until reset(); "
                    f"streams {sorted(waiting)!r} did not advance",
                    out,
                    broken,
                    waiting,
                ) from error
            for sid, items in outputs.items():
                out[sid] += items

    def _step_frames(self, stream: _PooledStream) -> int:
        """Frames the stream's next frame makes the model step (0: buffered, group mode)."""
        index = stream._frames
        if self.mode == "frame" or index == 0:
            return 1
        slot = stream._slot(index)
        return slot + 1 if slot == stream.group_size - 1 else 0

    def _batch_view(self, run: list[Any]) -> tuple[_State, bool]:
        """The state to step a run of one cohort with (its slots' view, or a scratch batch the
        slots were copied into: then ``True``), its signature restored."""
        first = run[0]
        assert first.bank is not None and first.slot is not None and first._state is not None
        signature = first._state.signature()
        contiguous = run[-1].slot == first.slot + len(run) - 1
        view: _State
        if len(run) == 1:
            view = first._state
        elif contiguous:
            view = first.bank.view(first.slot, first.slot + len(run))
        else:  # gather: the streams' slots copied into a scratch batch, and back after
            view = self._scratch(first.bank.size, len(run))
            for i, stream in enumerate(run):
                assert stream._state is not None
                for into, slot in zip(view.buffers(), stream._state.buffers()):
                    into[i : i + 1].copy_(slot)
        view.restore(signature)
        return view, len(run) > 1 and not contiguous

    def _after_run(self, run: list[Any], view: _State, gathered: bool) -> None:
        """After a run's step: the scratch copied back, each stream's signature the view's."""
        after = view.signature()
        if gathered:
            for i, stream in enumerate(run):
                assert stream._state is not None
                for scratch, slot in zip(view.buffers(), stream._state.buffers()):
                    slot.copy_(scratch[i : i + 1])
        self.stats.steps += 1
        self.stats.stepped_streams += len(run)
        self.stats.batches[len(run)] = self.stats.batches.get(len(run), 0) + 1
        for stream in run:
            if stream._state is not view:
                stream._state.restore(after)

    def _step_run(
        self, run: list[_PooledStream], checked: dict[str, CheckedFrame]
    ) -> dict[str, list[Latent]]:
        """Step streams of one cohort in contiguous slots as one batch."""
        assert self.encoder is not None
        clock = self._clock
        clock.mark("host")
        items = self._uploaded([checked[stream.stream_id] for stream in run])
        inputs = []
        for stream, item in zip(run, items):
            step_input = stream._stage(item)
            assert step_input is not None
            inputs.append(step_input)
        clock.mark("uploads")
        view, gathered = self._batch_view(run)
        assert isinstance(view, EncoderState)
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=0)
        label = self._step_label(run)
        events = clock.step_events(label)
        if events is not None:
            events[0].record()
        mean = self.encoder.step(x, view)
        if events is not None:
            events[1].record()
        clock.mark("steps", label)
        self._after_run(run, view, gathered)
        if mean is not None:
            # One copy back for the batch; the streams label (and normalise) their slices
            # on the host, so it must have arrived: one wait per batch, not one per stream.
            mean = self._download(mean, run[0].output_device)
            clock.mark("downloads")
            clock.wait_copies()
        result = {}
        for i, (stream, item) in enumerate(zip(run, items)):
            out = None if mean is None else mean[i : i + 1]
            result[stream.stream_id] = stream._commit(item, out)
        return result

    def _decode_run(
        self,
        run: list[_PooledDecoder],
        checked: dict[str, _Checked],
        inputs: dict[str, torch.Tensor],
    ) -> dict[str, list[DecodedFrame]]:
        """Step decoder streams of one cohort in contiguous slots as one batch."""
        assert self.decoder is not None
        clock = self._clock
        clock.mark("host")
        view, gathered = self._batch_view(run)
        assert isinstance(view, DecoderState)
        parts = [inputs[stream.stream_id] for stream in run]
        if self._uploads is not None and all(part.device.type == "cpu" for part in parts):
            x = self._uploads.upload([part[0] for part in parts], clock)
        else:
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            x = x.to(self.decoder.device)
        clock.mark("uploads")
        label = self._step_label(run)
        events = clock.step_events(label)
        if events is not None:
            events[0].record()
        chunks = list(self.decoder.step(x, view))
        frames = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
        frames = frames.float().clamp(-1.0, 1.0)
        if events is not None:
            events[1].record()
        clock.mark("steps", label)
        self._after_run(run, view, gathered)
        # One copy back for the batch, waited for once at the end of the tick (the frames'
        # labels need no data).
        frames = self._download(frames, run[0].output_device)
        clock.mark("downloads")
        result = {}
        for i, stream in enumerate(run):
            item = checked[stream.stream_id]
            result[stream.stream_id] = stream._frames_of(item, frames[i : i + 1], 0)
            stream._latents += 1
        return result

    def _step_label(self, run: list[Any]) -> str:
        height, width = run[0].bank.size
        return f"{height}x{width} x{len(run)}"

    def _uploaded(self, items: list[CheckedFrame]) -> list[CheckedFrame]:
        """On CUDA: the run's frames uploaded as one batch (pinned, asynchronous), as items
        whose tensors are on the device; elsewhere (or frames already there) ``items``."""
        if self._uploads is None or len({(i.tensor.shape, i.tensor.dtype) for i in items}) != 1:
            return items
        if any(item.tensor.device.type != "cpu" for item in items):
            return items
        batch = self._uploads.upload([item.tensor for item in items], self._clock)
        return [replace(item, tensor=batch[k]) for k, item in enumerate(items)]

    def _download(self, data: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        """``data`` on ``device`` (``None``: where it is). CUDA to the CPU: an asynchronous copy
        into pinned memory, complete after :meth:`_TickClock.wait_copies`."""
        if device is None or device == data.device:
            return data
        if data.device.type == "cuda" and device.type == "cpu":
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host.copy_(data, non_blocking=True)
            self._clock.copied()
            return host
        return data.to(device)

    # -- checks and admission ----

    def _check_tick(
        self, frames: Mapping[str, FrameLike], stamps: Mapping[str, float | None]
    ) -> dict[str, CheckedFrame]:
        checked: dict[str, CheckedFrame] = {}
        for sid, frame in frames.items():
            stream = self._streams[sid]
            try:
                stream._check_usable()
                (item,) = stream._check_all([frame], [stamps.get(sid)])
            except StreamBroken as error:
                raise StreamBroken(f"stream {sid!r}: {error}") from None
            except FrameError as error:
                raise FrameError(f"stream {sid!r}: {error}; no stream advanced") from None
            self._check_reserved(stream, (item.height, item.width), "frame", FrameError)
            checked[sid] = item
        return checked

    def _check_latents(self, latents: Mapping[str, Any]) -> dict[str, _Checked]:
        checked: dict[str, _Checked] = {}
        for sid, latent in latents.items():
            stream = self._streams[sid]
            try:
                stream._check_usable()
                (item,) = stream._check_all([latent])
            except StreamBroken as error:
                raise StreamBroken(f"stream {sid!r}: {error}") from None
            except LatentError as error:
                raise LatentError(f"stream {sid!r}: {error}; no stream advanced") from None
            size = (item.raw.shape[1], item.raw.shape[2])
            self._check_reserved(stream, size, "latent", LatentError)
            checked[sid] = item
        return checked

    def _check_reserved(
        self, stream: _Pooled, size: tuple[int, int], what: str, error: type[ValueError]
    ) -> None:
        reserved = stream.reserved
        if reserved is not None and size != reserved:
            h, w = reserved
            raise error(
                f"stream {stream.stream_id!r}: got a {size[0]}x{size[1]} {what}, but the stream "
                f"was added with size=({h}, {w}); no stream advanced"
            )

    def _needs_slot(self, stream: _PooledStream, item: CheckedFrame) -> bool:
        starts = stream._frames == 0 or item.gap
        return starts and not _has_state(stream, (item.height, item.width))

    def _needs_latent_slot(self, stream: _PooledDecoder, item: _Checked) -> bool:
        starts = stream.latents_pushed == 0 or stream._starts_run(item)
        return starts and not _has_state(stream, (item.raw.shape[1], item.raw.shape[2]))

    def _admit(self, new: dict[str, tuple[int, int]]) -> None:
        """Refuse (AdmissionError, nothing changed) unless the new streams' state fits the budget.

        Counts what would be allocated: the bank slots beyond the free ones, and each stream's
        input buffer.
        """
        if not new or self.memory_budget is None:
            return
        in_use = self._allocated()
        wanting: dict[tuple[int, int], int] = {}
        for sid, size in new.items():
            wanting[size] = wanting.get(size, 0) + 1
            total = in_use + sum(self._growth_bytes(sz, n) for sz, n in wanting.items())
            if total > self.memory_budget:
                unit = " latents" if self.decoding else ""
                raise AdmissionError(
                    f"stream {sid!r} refused: its state at {size[0]}x{size[1]}{unit} needs "
                    f"{self._need(size):,} bytes; memory_budget is {self.memory_budget:,} "
                    f"bytes, {in_use:,} in use; nothing changed"
                )

    def _growth_bytes(self, size: tuple[int, int], streams: int) -> int:
        """Bytes that ``streams`` more streams of ``size`` add (slots past the free ones, buffers)."""
        bank = self._banks.get(size)
        free = 0 if bank is None else bank.capacity - len(bank.members)
        slots = max(0, streams - free)
        return slots * self._slot_nbytes(size) + streams * self._buffer_nbytes(size)

    def _need(self, size: tuple[int, int]) -> int:
        return self._slot_nbytes(size) + self._buffer_nbytes(size)

    def _slot_nbytes(self, size: tuple[int, int]) -> int:
        if size not in self._slot_bytes:
            if self.decoder is not None:
                self._slot_bytes[size] = _decoder_state_nbytes(self.decoder, size)
            else:
                assert self.encoder is not None
                self._slot_bytes[size] = state_nbytes(
                    self.encoder.config,
                    *size,
                    dtype=self.encoder.dtype,
                    capacity=self._frames_per_step,
                )
        return self._slot_bytes[size]

    def _buffer_nbytes(self, size: tuple[int, int]) -> int:
        if self.encoder is None:
            return 0  # a decoder stream has no input buffer
        element = torch.empty((), dtype=self.encoder.dtype).element_size()
        return 3 * self._frames_per_step * size[0] * size[1] * element

    def _allocated(self) -> int:
        banks = sum(bank.nbytes for bank in self._banks.values())
        buffers = sum(
            group.numel() * group.element_size()
            for stream in self._streams.values()
            if (group := getattr(stream, "_group", None)) is not None
        )
        return int(banks + buffers)

    def _acquire(self, stream: _Pooled, height: int, width: int) -> None:
        """Give ``stream`` a slot in the bank of ``height x width`` (admitted before)."""
        size = (height, width)
        self._release(stream)
        if isinstance(stream, _PooledStream):
            stream._group = stream._last = None
        bank = self._banks.get(size)
        if bank is None:
            bank = self._banks[size] = _Bank(self, size, self._bank_capacity(size, 1))
        slot = bank.free_slot()
        if slot is None:
            bank.grow(self._bank_capacity(size, bank.capacity + 1, bank))
            slot = bank.free_slot()
            assert slot is not None
        bank.attach(stream, slot)
        if isinstance(stream, _PooledStream):
            assert self.encoder is not None
            shape = (1, 3, self._frames_per_step, height, width)
            stream._group = torch.zeros(shape, dtype=self.encoder.dtype, device=self.encoder.device)

    def _bank_capacity(self, size: tuple[int, int], needed: int, bank: _Bank | None = None) -> int:
        """Doubling, within ``max_streams`` and the memory budget (at least ``needed``)."""
        current = 0 if bank is None else bank.capacity
        capacity = max(needed, 2 * current)
        if self.max_streams is not None:
            capacity = min(capacity, self.max_streams)
        if self.memory_budget is not None:
            spare = self.memory_budget - self._allocated() - self._buffer_nbytes(size)
            fits = current + spare // self._slot_nbytes(size)
            capacity = min(capacity, max(int(fits), needed))
        return max(capacity, needed)

    def _new_state(self, size: tuple[int, int], capacity: int) -> _State:
        if self.decoder is not None:
            return self.decoder.new_state(
                *size, batch=capacity, capacity=1, memory_format=self._memory_format
            )
        assert self.encoder is not None
        return self.encoder.new_state(
            *size,
            batch=capacity,
            capacity=self._frames_per_step,
            memory_format=self._memory_format,
            ring=False,
        )

    def _scratch(self, size: tuple[int, int], batch: int) -> _State:
        state = self._scratches.get((size, batch))
        if state is None:
            state = self._with_graphs(self._new_state(size, batch))
            self._scratches[(size, batch)] = state
        return state

    def _with_graphs(self, state: _State) -> _State:
        """With ``cuda_graphs``: the state's steps captured and replayed (its buffers are fixed:
        a bank's views live as long as the bank, which is replaced only when it grows)."""
        if self.cuda_graphs and isinstance(state, EncoderState):
            state.graphs = StepGraphs(self.model.device)
        return state

    def _get(self, stream_id: str) -> Any:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise KeyError(f"stream {stream_id!r} is not in the pool") from None

    def _encoding(self, stream_id: str) -> _PooledStream:
        stream = self._get(stream_id)
        if not isinstance(stream, _PooledStream):
            raise TypeError(
                "a decoder pool counts latents_pushed / frames_emitted and has latent_size"
            )
        return stream

    def _decoding(self, stream_id: str) -> _PooledDecoder:
        stream = self._get(stream_id)
        if not isinstance(stream, _PooledDecoder):
            raise TypeError("an encoder pool counts frames_pushed / latents_emitted")
        return stream

    # -- async ----

    def stream(
        self,
        sources: Mapping[str, Iterable[Any] | AsyncIterable[Any]],
        *,
        deadline: float = 0.025,
        flush: bool = True,
        open_ended: bool = False,
    ) -> PoolStream[OutT]:
        """Encode many sources at once: an async iterator of ``(stream_id, latent)`` (a decoder
        pool: sources of latents, ``(stream_id, DecodedFrame)`` out).

        Each source (an async or sync iterable of frames) is read by its own task, at most one
        frame ahead. A tick starts when any source has a frame, waits at most ``deadline``
        seconds for the other live sources, then pushes what each has (one frame per source):
        a slow or stalled source never holds the others back, and does not advance while it
        has nothing. Streams not yet in the pool are added (and removed at the end). A source
        that ends is flushed (``flush=False``: removed without flushing); a source that raises,
        or gives a frame the pool refuses (a :class:`~streamvae.FrameError`, say), ends its own
        stream the same way (the other streams of that tick advance), and
        :class:`PoolSourceError` is raised once the others have ended. The model runs in a
        worker thread; cancelling waits for the tick in flight, never for a read of a sync
        source (a read blocked in a hung capture is left to its own daemon thread).

        ``open_ended=True``: sources come and go while it runs (a server's sessions, say).
        :meth:`PoolStream.add` admits another between ticks; the iteration does not end when
        no source is left, but once :meth:`PoolStream.end_input` has been called and every
        source has ended::

            async with pool.stream({}, open_ended=True) as latents:
                ended = await latents.add("tab-1", source, size=(64, 64))  # AdmissionError?
                async for stream_id, latent in latents:
                    ...
        """
        if not (isinstance(deadline, (int, float)) and math.isfinite(deadline) and deadline >= 0):
            raise ValueError(f"deadline must be a finite number of seconds >= 0, got {deadline!r}")
        return PoolStream(
            self, sources, deadline=float(deadline), flush=flush, open_ended=open_ended
        )


class PoolStream(AsyncIterator[tuple[str, OutT]]):
    """The async iterator returned by :meth:`StreamPool.stream`; also an async context manager."""

    def __init__(
        self,
        pool: StreamPool[OutT],
        sources: Mapping[str, Iterable[Any] | AsyncIterable[Any]],
        *,
        deadline: float,
        flush: bool,
        open_ended: bool = False,
    ) -> None:
        self.dropped_frames: dict[str, int] = {}
        """Per stream whose source has ended: the frames its encoder dropped in all (partial
        groups at gaps and at the end)."""
        self._control = _Additions(open=open_ended)
        self._gen = _pool_latents(
            pool,
            dict(sources),
            deadline=deadline,
            flush=flush,
            dropped=self.dropped_frames,
            control=self._control,
        )

    async def add(
        self,
        stream_id: str,
        source: Iterable[Any] | AsyncIterable[Any],
        *,
        size: tuple[int, int] | None = None,
    ) -> asyncio.Future[int]:
        """Admit another source (an ``open_ended`` stream only) at the next tick boundary.

        Returns once it is in the pool, with a future that is done once its source has ended
        and its last latents have been yielded: its result is the frames its encoder dropped;
        if the source raised, the future holds that error (and it is not raised again at the
        end of the iteration). Raises what :meth:`StreamPool.add` raises (``ValueError``,
        :class:`AdmissionError`: nothing changed), and ``RuntimeError`` if the stream is not
        open-ended, was told :meth:`end_input`, or has ended. It waits for the iteration to
        reach a tick boundary, so the stream must be being iterated (by another task).

        Cancelled while waiting: a source not yet admitted is never admitted; one the pool
        admitted just before the cancellation stays in the pool (its slot held) until its
        source ends, so the caller must make it end (e.g. stop the source it passed).
        """
        control = self._control
        if control.finished:
            raise RuntimeError("this pool stream has ended")
        if not control.open:
            raise RuntimeError(
                "this pool stream takes no more sources (made without open_ended=True, or "
                "end_input() was called)"
            )
        loop = asyncio.get_running_loop()
        admitted: asyncio.Future[None] = loop.create_future()
        ended: asyncio.Future[int] = loop.create_future()
        control.pending.append((stream_id, source, size, admitted, ended))
        control.wake()
        await admitted
        return ended

    def end_input(self) -> None:
        """No more :meth:`add`: the iteration ends once the sources in it have ended."""
        self._control.open = False
        self._control.wake()

    def __aiter__(self) -> PoolStream[OutT]:
        return self

    async def __anext__(self) -> tuple[str, OutT]:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> PoolStream[OutT]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(frozen=True)
class _Ended:
    error: BaseException | None = None


_Addition = tuple[
    str,
    "Iterable[Any] | AsyncIterable[Any]",
    "tuple[int, int] | None",
    "asyncio.Future[None]",
    "asyncio.Future[int]",
]


@dataclass
class _Additions:
    """Sources waiting to join an open-ended pool stream, and the event that wakes its loop."""

    open: bool
    pending: list[_Addition] = field(default_factory=list)
    arrived: asyncio.Event | None = None
    finished: bool = False

    def wake(self) -> None:
        if self.arrived is not None:
            self.arrived.set()


async def _read_source(
    source: Iterable[Any] | AsyncIterable[Any],
    queue: asyncio.Queue[Any],
    arrived: asyncio.Event,
) -> None:
    """Copy a source's frames into its queue (one ahead), then an :class:`_Ended`."""
    try:
        if isinstance(source, AsyncIterable):
            async for frame in source:
                await queue.put(frame)
                arrived.set()
        else:  # read in a daemon thread: a sync source may block (a file, a hung camera)
            reader = _SyncReader(iter(source))
            try:
                while (item := await reader.next()) is not _END:
                    await queue.put(item)
                    arrived.set()
            finally:
                await reader.aclose()  # a read still blocked is left to its thread
        end = _Ended()
    except asyncio.CancelledError:
        raise
    except Exception as error:
        end = _Ended(error)
    await queue.put(end)
    arrived.set()


async def _pool_latents(
    pool: StreamPool[OutT],
    sources: dict[str, Iterable[Any] | AsyncIterable[Any]],
    *,
    deadline: float,
    flush: bool,
    dropped: dict[str, int],
    control: _Additions | None = None,
) -> AsyncGenerator[tuple[str, OutT], None]:
    control = control or _Additions(open=False)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamvae-pool")
    added = [sid for sid in sources if sid not in pool]
    for sid in added:
        pool.add(sid)
    arrived = asyncio.Event()
    control.arrived = arrived
    queues: dict[str, asyncio.Queue[Any]] = {sid: asyncio.Queue(maxsize=1) for sid in sources}
    reader_of = {  # each live stream's reader (all of them are in ``readers``)
        sid: asyncio.create_task(_read_source(src, queues[sid], arrived), name=f"streamvae-{sid}")
        for sid, src in sources.items()
    }
    readers = list(reader_of.values())
    live = set(sources)
    errors: dict[str, BaseException] = {}
    joined: dict[str, asyncio.Future[int]] = {}  # added while running: their end goes here
    loop = asyncio.get_running_loop()

    def admit_pending() -> None:
        while control.pending:
            sid, source, size, admitted, ended = control.pending.pop(0)
            if admitted.cancelled():
                continue
            if sid in live or sid in pool:
                admitted.set_exception(ValueError(f"stream {sid!r} is already in the pool"))
                continue
            try:
                pool.add(sid, size=size)
            except Exception as error:  # AdmissionError, ValueError: nothing changed
                admitted.set_exception(error)
                continue
            added.append(sid)
            joined[sid] = ended
            queues[sid] = asyncio.Queue(maxsize=1)
            reader_of[sid] = asyncio.create_task(
                _read_source(source, queues[sid], arrived), name=f"streamvae-{sid}"
            )
            readers.append(reader_of[sid])
            live.add(sid)
            admitted.set_result(None)

    try:
        while True:
            admit_pending()
            if not live and not control.open:
                break
            while not any(queues[sid].qsize() for sid in live):
                arrived.clear()
                if control.pending or (not live and not control.open):
                    break
                await arrived.wait()
            if not any(queues[sid].qsize() for sid in live):
                continue  # woken for an addition or the end of input
            closes = loop.time() + deadline
            while not all(queues[sid].qsize() for sid in live):
                left = closes - loop.time()
                if left <= 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            frames: dict[str, Any] = {}
            ended: list[str] = []
            for sid in sorted(live):
                if queues[sid].qsize():
                    item = queues[sid].get_nowait()
                    if isinstance(item, _Ended):
                        ended.append(sid)
                        if item.error is not None:
                            errors[sid] = item.error
                    else:
                        frames[sid] = item
            if frames:
                out, refused = await _in_worker(executor, _push_tick, pool, frames)
                for sid, latents in out.items():
                    for latent in latents:
                        yield sid, latent
                for sid, refusal in refused.items():  # this stream ends; the others go on
                    errors[sid] = refusal
                    ended.append(sid)
                    reader_of[sid].cancel()
            for sid in ended:
                live.discard(sid)
                queues.pop(sid, None)  # an ended stream's reader and queue are let go
                reader_of.pop(sid, None)
                if sid in pool:
                    tail = await _in_worker(executor, _finish, pool, sid, flush, dropped)
                    for latent in tail:
                        yield sid, latent
                future = joined.pop(sid, None)
                if future is not None and not future.done():
                    error = errors.pop(sid, None)
                    if error is None:
                        future.set_result(dropped.get(sid, 0))
                    else:
                        future.set_exception(error)
            if ended:
                readers = [task for task in readers if not task.done()]
        if errors:
            raise PoolSourceError(errors) from next(iter(errors.values()))
    finally:
        control.finished = True
        for _, _, _, admitted, _ in control.pending:
            if not admitted.done():
                admitted.set_exception(RuntimeError("the pool stream ended before admitting it"))
        control.pending.clear()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        executor.shutdown(wait=False)
        await _wait_thread_exit(executor)
        for sid in added:  # cancelled or failed part of the way: drop what we added
            if sid in pool:
                pool.remove(sid, flush=False)
        for future in joined.values():  # cancelled before these ended
            if not future.done():
                future.cancel()


_REFUSALS = (FrameError, LatentError, StreamBroken, AdmissionError)
"""What :meth:`StreamPool.push` raises for a stream's frame (latent) before any stream advanced."""


def _push_tick(
    pool: StreamPool[OutT], frames: dict[str, Any]
) -> tuple[dict[str, list[OutT]], dict[str, Exception]]:
    """One tick of :meth:`StreamPool.stream`: the latents, and the streams whose frame the pool
    refused. A tick refused as a whole (nothing advanced) is pushed again stream by stream, so
    that only the refused streams are left out."""
    try:
        return pool.push(frames), {}
    except _REFUSALS:
        pass
    out: dict[str, list[OutT]] = {}
    refused: dict[str, Exception] = {}
    for sid, frame in frames.items():
        try:
            out.update(pool.push({sid: frame}))
        except _REFUSALS as error:
            refused[sid] = error
    return out, refused


def _finish(pool: StreamPool[OutT], sid: str, flush: bool, dropped: dict[str, int]) -> list[OutT]:
    """Flush (or not) and remove a stream whose source ended; record its dropped frames."""
    stream = pool._get(sid)
    tail: list[OutT] = stream.flush() if flush and not stream._broken else []
    dropped[sid] = getattr(stream, "dropped_frames", 0)  # a decoder drops nothing
    pool.remove(sid, flush=False)
    return tail


def _check_size(stream_id: str, size: Any, multiple: int) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 and v % multiple == 0 for v in size)
    ):
        which = "positive integers" if multiple == 1 else f"positive multiples of {multiple}"
        raise ValueError(f"stream {stream_id!r}: size must be (H, W), {which}, got {size!r}")
    return (int(size[0]), int(size[1]))


def _has_state(stream: _Pooled, size: tuple[int, int]) -> bool:
    state = stream._state
    return state is not None and (state.height, state.width) == size


def _decoder_state_nbytes(decoder: WanDecoder, size: tuple[int, int]) -> int:
    """Bytes of one decoder stream's state (capacity 1) for ``size`` latents, allocating nothing."""
    with torch.device("meta"):
        model = WanDecoder(decoder.config).to(decoder.dtype)
        return model.new_state(*size, capacity=1).nbytes


def _slot_of(stream: _Pooled) -> int:
    return -1 if stream.slot is None else stream.slot


def _contiguous_runs(members: list[Any]) -> list[list[Any]]:
    """A cohort's streams split where their slots are not consecutive."""
    ordered = sorted(members, key=_slot_of)
    runs: list[list[_PooledStream]] = []
    for stream in ordered:
        if runs and runs[-1][-1].slot is not None and stream.slot == runs[-1][-1].slot + 1:
            runs[-1].append(stream)
        else:
            runs.append([stream])
    return runs
