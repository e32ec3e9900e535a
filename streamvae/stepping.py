"""The stepping core that StreamEncoder and StreamDecoder share.

One model (encoder or decoder), one stream's explicit state, and the rules around stepping it:

- **the CUDA lane** (:class:`CudaLane`): on CUDA each stream runs its uploads, compute and
  state updates on its own ``torch.cuda.Stream`` (pinned double-buffered uploads, completion
  events), so several streams on one GPU overlap;
- **broken streams**: a step that raises leaves the state undefined; every later call raises
  :class:`StreamBroken` until :meth:`StreamCore.reset`;
- **bad input** is checked before anything is touched (the subclasses' ``push`` check every
  item first), so a refused input leaves the stream as it was;
- **pending outputs**: outputs computed for a consumer of :meth:`StreamCore.stream` that was
  cancelled stay on the stream and come first from the next call;
- **async iteration** (:class:`OutputStream`): the model runs in a worker thread, a sync
  source is read in a daemon thread, never on the event loop; cancelling waits for the push in
  flight, never for a hung read.

A subclass supplies the model-specific parts: ``push_many`` / ``flush`` (checked input in,
outputs out), ``_begin_run`` (its counters), and a state whose ``reset`` zeroes it in place.
:class:`streamvae.StreamPool` drives the same objects: it replaces the lane (``_cuda``) by its
own stream and steps many streams' states as one batch between the subclasses' stage and
commit halves, so a pool can step a decoder's states as it steps an encoder's.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from queue import SimpleQueue
from typing import Any, Generic, Protocol, TypeVar

import torch

__all__ = [
    "CudaLane",
    "OutputStream",
    "StreamBroken",
    "StreamCore",
    "check_snapshot_meta",
    "in_worker",
]

T = TypeVar("T")
OutT = TypeVar("OutT")


class StreamBroken(RuntimeError):
    """The model raised mid-step; the stream's state is undefined until ``reset()``."""


class _Resettable(Protocol):
    def reset(self) -> None: ...


StateT = TypeVar("StateT", bound=_Resettable)


class StreamCore(Generic[StateT, OutT]):
    """State, lane, pending outputs and async iteration of one stream over a shared model.

    Not thread-safe: one per stream (any number may share a model).
    """

    def __init__(self, device: torch.device, *, what: str) -> None:
        self._device = device
        self._what = what  # "encoder" or "decoder", for messages
        self._cuda = CudaLane(device) if device.type == "cuda" else None
        self._state: StateT | None = None
        self._broken = False
        self._pending: deque[OutT] = deque()
        self._begin_run()

    # -- to be provided by the model's stream ----

    def _begin_run(self) -> None:
        """Reset the counters of a run (everything but the state's buffers)."""

    def push_many(self, items: Iterable[Any]) -> list[OutT]:
        raise NotImplementedError

    def flush(self) -> list[OutT]:
        raise NotImplementedError

    # -- shared ----

    def _pending_outputs(self) -> tuple[OutT, ...]:
        return tuple(self._pending)

    def reset(self) -> None:
        """Forget everything; the next input is a first input again (of any size).

        The state buffers are kept and zeroed in place, and reused when the size stays.
        Outputs still pending from a cancelled :meth:`stream` are discarded.
        """
        self._pending.clear()
        if self._state is not None:
            self._run_on_lane(self._state.reset)
        self._broken = False
        self._begin_run()

    def stream(
        self, items: Iterable[Any] | AsyncIterable[Any], *, flush: bool = True
    ) -> OutputStream[OutT]:
        """Push an iterable or async iterable one item at a time; an async iterator of outputs.

        The model runs in a worker thread and a sync iterable is read in another, never on the
        event loop. A slow consumer slows the source. When the source is exhausted the stream
        is flushed (``flush=False`` keeps it open for more). If the source raises, the
        iteration ends with that exception after the outputs already complete. Outputs still
        pending from a cancelled iteration come first.

        Cancelling the consumer (once or repeatedly) waits for the push in flight, so the
        worker never touches the stream after the cancel returns, and keeps that push's
        outputs pending. It never waits for a read of a sync source: a read blocked in a hung
        capture is left to finish in its own daemon thread, and the item it returns is
        discarded.
        """
        return OutputStream(self, items, flush=flush)

    def _check_usable(self) -> None:
        if self._broken:
            raise StreamBroken(
                f"the {self._what} raised during an earlier push and this stream's state is "
                "undefined; call reset() to start a new stream"
            )

    def _with_pending(self, work: Callable[[], list[OutT]]) -> list[OutT]:
        """The pending outputs, then those of ``work()`` (which may reset: they are taken first)."""
        taken = list(self._pending)
        self._pending.clear()
        try:
            return taken + work()
        except BaseException:
            self._pending.extendleft(reversed(taken))
            raise

    def _guarded(self, step: Callable[[], T]) -> T:
        """Run a step of the model; if it raises, the stream is broken until reset."""
        try:
            return step()
        except BaseException:
            self._broken = True
            raise

    def _lane(self) -> Any:
        return self._cuda.context() if self._cuda is not None else nullcontext()

    def _run_on_lane(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lane():
            result = fn(*args, **kwargs)
        if self._cuda is not None:
            self._cuda.stream.synchronize()
        return result

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the model's device (through the lane's pinned buffers on CUDA)."""
        if self._cuda is not None:
            return self._cuda.upload(tensor)
        return tensor.to(self._device)

    def _deliver(self, data: torch.Tensor, output_device: torch.device | None) -> torch.Tensor:
        """``data`` (computed on the lane) on ``output_device``, ready to be read by the caller."""
        with self._lane():
            if output_device is not None and output_device != data.device:
                if self._cuda is not None and output_device.type == "cpu":
                    data = self._cuda.download(data)
                else:
                    data = data.to(output_device)
        if self._cuda is not None:
            self._cuda.wait()
            if data.device.type == "cuda":
                # Left on the GPU for the caller: its later reads are on its own stream, so the
                # lane's allocator must not hand this memory out again before they are done.
                data.record_stream(torch.cuda.current_stream(data.device))
        return data


def check_snapshot_meta(meta: dict[str, str], mine: dict[str, str]) -> None:
    """Refuse (:class:`streamvae.SnapshotError`) a snapshot whose metadata differs from ``mine``
    (the model's weights fingerprint, dtype, mode or kind), naming what differs."""
    from streamvae.snapshot import SnapshotError

    for key, value in mine.items():
        if meta.get(key) != value:
            what = "model (other weights)" if key == "model" else key
            raise SnapshotError(
                f"snapshot of another {what}: it has {key}={meta.get(key)!r} (config "
                f"{meta.get('config')!r}), this stream {value!r}"
            )


class CudaLane:
    """A stream's own CUDA stream, pinned upload buffers and completion events."""

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

        The lane first waits for the work queued on the caller's current stream (its input, or
        weights it has just moved or cast, must be ready before this lane reads them).
        """
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if tensor.device.type == "cuda":
            tensor.record_stream(self.stream)  # the caller may free it while we still read it
            return tensor
        # numpy frames arrive as [H, W, 3] memory viewed as [3, H, W]: upload that memory as it is.
        hwc = tensor.permute(1, 2, 0) if tensor.dim() == 3 else tensor
        src, channels_last = (
            (hwc, True)
            if tensor.dim() == 3 and hwc.is_contiguous()
            else (tensor.contiguous(), False)
        )
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


class OutputStream(AsyncIterator[OutT]):
    """The async iterator returned by :meth:`StreamCore.stream`; also an async context manager."""

    def __init__(
        self,
        core: StreamCore[Any, OutT],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        flush: bool,
    ) -> None:
        self._gen = _outputs(core, items, flush=flush)

    def __aiter__(self) -> OutputStream[OutT]:
        return self

    async def __anext__(self) -> OutT:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> OutputStream[OutT]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_END = object()


async def _outputs(
    core: StreamCore[Any, OutT],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    flush: bool,
) -> AsyncGenerator[OutT, None]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"streamvae-{core._what}")
    reader: _SyncReader | None = None
    try:
        if isinstance(items, AsyncIterable):
            source = items.__aiter__()

            async def next_item() -> Any:
                try:
                    return await source.__anext__()
                except StopAsyncIteration:
                    return _END
        else:
            reader = _SyncReader(iter(items))
            next_item = reader.next

        pending = core._pending
        while pending:
            yield pending.popleft()
        while (item := await next_item()) is not _END:
            await in_worker(executor, _push_to_pending, core, item)
            while pending:
                yield pending.popleft()
        if flush:
            await in_worker(executor, _flush_to_pending, core)
            while pending:
                yield pending.popleft()
    finally:
        executor.shutdown(wait=False)
        await wait_thread_exit(executor)
        if reader is not None:
            await reader.aclose()


def _push_to_pending(core: StreamCore[Any, OutT], item: Any) -> None:
    """In the worker: push, keeping the outputs on the stream until the consumer takes them."""
    core._pending.extend(core.push_many([item]))


def _flush_to_pending(core: StreamCore[Any, OutT]) -> None:
    core._pending.extend(core.flush())


async def in_worker(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in the worker; if cancelled (however often), wait for it before re-raising."""
    future = asyncio.wrap_future(executor.submit(fn, *args))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            cancelled = True  # the worker may still run: a second cancel must not leave it
            continue
        except BaseException as exc:
            if cancelled:
                raise asyncio.CancelledError from exc
            raise
        if cancelled:
            raise asyncio.CancelledError
        return result


async def wait_thread_exit(executor: ThreadPoolExecutor) -> None:
    threads: set[threading.Thread] = set(getattr(executor, "_threads", ()))
    while any(t.is_alive() for t in threads):
        await asyncio.sleep(0.001)


class _SyncReader:
    """Reads a sync iterator in its own daemon thread, one ``next()`` per request.

    A cancelled :meth:`next` returns at once; a read still blocked (a hung capture) finishes in
    the thread on its own, and its item is discarded.
    """

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator
        self._requests: SimpleQueue[Future[Any] | None] = SimpleQueue()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="streamvae-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            if not request.set_running_or_notify_cancel():
                continue
            self._busy = True
            try:
                request.set_result(next(self._iterator, _END))
            except BaseException as exc:
                request.set_exception(exc)
            finally:
                self._busy = False

    async def next(self) -> Any:
        request: Future[Any] = Future()
        self._requests.put(request)
        return await asyncio.wrap_future(request)

    async def aclose(self) -> None:
        """Let the thread end; wait for it only when no read is in flight."""
        self._requests.put(None)
        while self._thread.is_alive() and not self._busy:
            await asyncio.sleep(0.001)
