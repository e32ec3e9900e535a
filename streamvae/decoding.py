"""StreamDecoder: Wan VAE latents in, one at a time, RGB frames out, exactly as Wan's decode.

>>> import torch
>>> from streamvae import StreamDecoder, narrow, random_decoder
>>> stream = StreamDecoder(random_decoder(narrow(8)))
>>> latent = torch.zeros(16, 2, 2)                        # normalised, [z, h, w]
>>> [frame.index for frame in stream.push(latent)]        # latent 0 -> frame 0
[0]
>>> [frame.index for frame in stream.push(latent)]        # latent k -> frames 4k-3 .. 4k
[1, 2, 3, 4]
>>> stream.push(latent)[0].to_rgb().shape
(16, 16, 3)

``push`` takes what :class:`streamvae.StreamEncoder` emits (a :class:`~streamvae.Latent`, whose
timestamps and gap the frames carry on) or its normalised ``data``. :meth:`StreamDecoder.iter_push`
yields a latent's frames one by one as each is complete (the first long before the last);
:meth:`StreamDecoder.stream` decodes an iterable or async iterable of latents.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamvae.model import DecoderState, WanDecoder
from streamvae.model.encoder import default_memory_format
from streamvae.stepping import OutputStream, StreamCore, check_snapshot_meta
from streamvae.stream import Latent, warmup_steps

__all__ = ["DecodedFrame", "FrameStream", "LatentError", "StreamDecoder", "decoder_receptive_field"]

LatentLike = Latent | torch.Tensor


class LatentError(ValueError):
    """A latent was refused (wrong type, shape, channels, dtype, size, or not finite)."""


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame of a stream.

    ``data`` is float32 ``[3, H, W]`` RGB in [-1, 1] (clamped, as Wan's ``decode``); ``index``
    counts the stream's frames (latent 0 gives frame 0, latent ``k`` frames ``4k-3 .. 4k``);
    ``latent`` is the index of the latent it came from (the pushed :class:`Latent`'s own
    index where one was pushed). ``timestamp`` is the capture time of the source frame it
    reconstructs, where the latent carried one; ``gap`` is true for the first frame after a
    restart of the source (a latent with ``gap``). ``ready_time`` / ``ready_monotonic``: when
    ``data`` was ready (``time.time()`` / ``time.monotonic()``). ``approximate``: from a
    stream resumed from fewer latents than the receptive field.
    """

    data: torch.Tensor
    index: int
    latent: int
    timestamp: float | None = None
    gap: bool = False
    ready_time: float = 0.0
    ready_monotonic: float | None = None
    approximate: bool = False

    def to_rgb(self) -> np.ndarray:
        """uint8 ``[H, W, 3]``: ``round((x + 1) * 127.5)``, the inverse of the encoder's input map."""
        rgb = (self.data.detach().float().cpu() + 1.0).mul_(127.5).round_().clamp_(0, 255)
        return np.ascontiguousarray(rgb.to(torch.uint8).permute(1, 2, 0).numpy())


@dataclass(frozen=True)
class _Checked:
    """A latent accepted by :meth:`StreamDecoder._check`: raw (de-normalised) data."""

    raw: torch.Tensor  # [z, h, w] float32, not normalised, on the CPU or the decoder's device
    index: int | None
    timestamps: tuple[float | None, ...]
    gap: bool


class FrameStream(OutputStream[DecodedFrame]):
    """The async iterator returned by :meth:`StreamDecoder.stream`; also an async context manager."""


class StreamDecoder(StreamCore[DecoderState, DecodedFrame]):
    """A stateful stream over a loaded :class:`WanDecoder` (weights are shared, state is not).

    Options: ``normalized`` (default): the latents are normalised as the encoder emits them by
    default (``False``: raw means, as ``StreamEncoder(normalize=False)`` emits them);
    ``output_device`` (``"cpu"``, default, or ``None`` for the decoder's device),
    ``memory_format`` of the state (``None``: the fastest measured for the device and dtype).
    The state has capacity 1: every layer steps one frame at a time, so each output frame is
    ready as soon as causality allows.

    Not thread-safe; use one per stream (any number may share a decoder).
    """

    def __init__(
        self,
        decoder: WanDecoder,
        *,
        normalized: bool = True,
        output_device: str | torch.device | None = "cpu",
        memory_format: torch.memory_format | None = None,
    ) -> None:
        self.decoder = decoder
        self.normalized = normalized
        self.output_device = None if output_device is None else torch.device(output_device)
        self.memory_format = memory_format or default_memory_format(decoder.device, decoder.dtype)
        self.group_size = decoder.config.temporal_stride
        self._receptive_field: int | None = None
        super().__init__(decoder.device, what="decoder")

    def _begin_run(self) -> None:
        self._latents = 0
        self._size: tuple[int, int] | None = None
        self._exact_from = 0

    # -- public state ----

    @property
    def latents_pushed(self) -> int:
        """Latents decoded since the last reset (the next latent's position in the stream)."""
        return self._latents

    @property
    def frames_emitted(self) -> int:
        """Frames decoded since the last reset: 1 + 4 (n - 1) after n latents."""
        return 0 if self._latents == 0 else 1 + self.group_size * (self._latents - 1)

    @property
    def latent_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of this stream's latents, fixed by the first; ``None`` before it."""
        return self._size

    @property
    def state_nbytes(self) -> int:
        return 0 if self._state is None else self._state.nbytes

    @property
    def pending_frames(self) -> tuple[DecodedFrame, ...]:
        """Frames computed but not yet handed out (a cancelled :meth:`stream` consumer's, or the
        rest of an :meth:`iter_push` closed early); the next call returns them first."""
        return self._pending_outputs()

    # -- pushing ----

    def push(self, latent: LatentLike) -> list[DecodedFrame]:
        """Decode one latent; return the frames it completes (1 for latent 0, else 4), in order.

        A refused latent raises :class:`LatentError` and leaves the stream as it was.
        """
        return self.push_many([latent])

    def push_many(self, latents: Iterable[LatentLike]) -> list[DecodedFrame]:
        """Decode a burst of latents; every latent is checked before any is used. The frames
        equal those of pushing the latents one by one."""
        self._check_usable()
        checked = self._check_all(list(latents))
        return self._with_pending(lambda: [f for item in checked for f in self._decode(item)])

    def iter_push(self, latent: LatentLike) -> Iterator[DecodedFrame]:
        """Decode one latent, yielding each frame as soon as it is complete.

        The latent is checked at the call and decoded as the iterator is read. Closing the iterator early keeps the frames not yet
        taken in :attr:`pending_frames` (they are computed), so nothing is lost.
        """
        self._check_usable()
        checked = self._check_all([latent])
        return self._iterate(checked[0])

    def _iterate(self, item: _Checked) -> Iterator[DecodedFrame]:
        taken = list(self._pending)
        self._pending.clear()
        frames = self._decode(item)
        try:
            while taken:
                yield taken.pop(0)
            # Not ``yield from``: closing this iterator must not close ``frames``.
            for frame in frames:  # noqa: UP028
                yield frame
        finally:
            # Closed early: what is left is computed and kept for the next call.
            self._pending.extend(taken)
            self._pending.extend(frames)

    def flush(self) -> list[DecodedFrame]:
        """End the stream: return any pending frames, then reset (every latent's frames are
        complete when its push returns, so there is nothing else to finish)."""
        self._check_usable()
        frames = self._with_pending(list)
        self.reset()
        return frames

    # -- warming up ----

    def warmup(self, height: int, width: int) -> int:
        """Decode a stream's first latents of ``height x width`` (latent size) on a throwaway
        state before the first latent (as :meth:`streamvae.StreamEncoder.warmup`: cuDNN's
        autotuning on CUDA, oneDNN's first calls on the CPU); the stream is left as it was.
        Returns the latents stepped."""
        self._check_usable()
        if height < 1 or width < 1:
            raise LatentError(f"a latent size is positive, got {height}x{width}")
        state = self._allocate(height, width)
        raw = torch.zeros(
            (1, self.decoder.config.z_dim, 1, height, width),
            dtype=self.decoder.dtype,
            device=self._device,
        )
        return self._run_on_lane(warmup_steps, state, lambda _: self.decoder.step(raw, state), 1)

    # -- resuming and moving ----

    @property
    def receptive_field(self) -> int:
        """``R``: the latents a frame depends on, ending at its own latent."""
        if self._receptive_field is None:
            self._receptive_field = decoder_receptive_field(self.decoder)
        return self._receptive_field

    def resume(
        self, latents: Iterable[LatentLike], *, first_index: int, approximate: bool = False
    ) -> list[DecodedFrame]:
        """Rebuild the stream from latents ``first_index .. m-1`` (a replay after a takeover).

        Afterwards the stream decodes exactly as if latents ``0 .. m-1`` had been pushed,
        because a frame depends only on its last :attr:`receptive_field` latents. With
        ``first_index > 0`` at least ``R`` latents are needed, else ``ValueError``
        (``approximate=True`` accepts fewer and flags the frames whose window reaches back
        before ``first_index``). Returns the replayed latents' exact frames (with
        ``approximate=True`` also the flagged ones).
        """
        items = list(latents)
        if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
            raise ValueError(f"first_index must be an integer >= 0, got {first_index!r}")
        if not items:
            raise ValueError("resume needs at least one latent (it fixes the latent size)")
        needed = self.receptive_field
        if first_index > 0 and len(items) < needed and not approximate:
            raise ValueError(
                f"resuming at latent {first_index} needs the last {needed} latents (the "
                f"receptive field), got {len(items)}; pass approximate=True to accept frames "
                "flagged approximate until the window is full"
            )
        checked = self._check_all(items, fresh=True)
        self.reset()
        if first_index == 0:
            return [f for item in checked for f in self._decode(item)]
        first = checked[0]
        self._ensure_state(first.raw.shape[1], first.raw.shape[2])
        assert self._state is not None
        self._run_on_lane(self._state.start_mid_stream)
        self._latents = first_index
        self._exact_from = first_index + needed - 1
        frames = [f for item in checked for f in self._decode(item)]
        return frames if approximate else [f for f in frames if not f.approximate]

    def snapshot(self) -> bytes:
        """This stream's state and counters as safetensors bytes, for :meth:`restore` elsewhere
        (fingerprint of the weights, latent size and dtype included; never a pickle)."""
        from streamvae.snapshot import dtype_name, pack, weights_fingerprint

        self._check_usable()
        if self._state is None or self._size is None:
            raise ValueError("nothing to snapshot: this stream has no latent yet")
        with self._lane():
            tensors, counters = self._state.memory()
        if self._cuda is not None:
            self._cuda.stream.synchronize()
        state = {"latents": self._latents, "exact_from": self._exact_from, "layers": counters}
        return pack(
            tensors,
            {
                "kind": "decoder",
                "model": weights_fingerprint(self.decoder),
                "config": self.decoder.config.name,
                "dtype": dtype_name(self.decoder.dtype),
                "size": f"{self._size[0]}x{self._size[1]}",
                "state": json.dumps(state),
            },
        )

    def restore(self, data: bytes) -> None:
        """Continue from a :meth:`snapshot`, replacing this stream's state.

        Refused with :class:`streamvae.SnapshotError` (the stream left as it was) for a snapshot
        of another model, dtype, kind (an encoder's) or of another latent size than this
        stream's so far.
        """
        from streamvae.snapshot import SnapshotError, dtype_name, unpack, weights_fingerprint

        tensors, meta = unpack(data)
        mine = {
            "kind": "decoder",
            "dtype": dtype_name(self.decoder.dtype),
            "model": weights_fingerprint(self.decoder),
        }
        check_snapshot_meta(meta, mine)
        try:
            height, width = (int(v) for v in meta["size"].split("x"))
            state = json.loads(meta["state"])
            counters = {str(k): int(v) for k, v in state["layers"].items()}
            latents, exact_from = int(state["latents"]), int(state["exact_from"])
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"malformed snapshot metadata: {exc!r}") from None
        if self._size is not None and self._latents > 0 and self._size != (height, width):
            raise SnapshotError(
                f"snapshot of {height}x{width} latents; this stream's are "
                f"{self._size[0]}x{self._size[1]} (reset() first to take another size)"
            )
        if latents < 1:
            raise SnapshotError("snapshot counters are out of range")
        target = self._state
        if target is None or (target.height, target.width) != (height, width):
            target = self._allocate(height, width)
        try:
            target.check_memory(tensors, counters)
        except ValueError as exc:
            raise SnapshotError(f"snapshot does not fit this decoder: {exc}") from None
        self._run_on_lane(target.load_memory, tensors, counters)
        self._state = target
        self._broken = False
        self._pending.clear()
        self._begin_run()
        self._latents, self._exact_from = latents, exact_from
        self._size = (height, width)

    # -- async ----

    def stream(
        self, items: Iterable[Any] | AsyncIterable[Any], *, flush: bool = True
    ) -> FrameStream:
        """Decode an iterable or async iterable of latents; an async iterator of frames.

        As :meth:`streamvae.StreamEncoder.stream`: the decoder runs in a worker thread, a sync
        source is read in another; cancelling waits for the push in flight and keeps its
        frames in :attr:`pending_frames`.
        """
        return FrameStream(self, items, flush=flush)

    # -- internals ----

    def _check_all(self, latents: list[Any], *, fresh: bool = False) -> list[_Checked]:
        size = None if fresh else self._size
        checked = []
        for position, latent in enumerate(latents):
            item = self._check(latent, position)
            shape = (item.raw.shape[1], item.raw.shape[2])
            if item.index == 0 or item.gap:
                size = None  # a new run (see _decode) may take another size
            if size is not None and shape != size:
                raise LatentError(
                    f"latent {position}: got {shape[0]}x{shape[1]} latents in a stream of "
                    f"{size[0]}x{size[1]}; the size is fixed for a stream: call reset() first"
                )
            size = shape
            checked.append(item)
        return checked

    def _check(self, latent: Any, position: int) -> _Checked:
        z = self.decoder.config.z_dim
        index: int | None = None
        stamps: tuple[float | None, ...] = ()
        gap = False
        data = latent
        if isinstance(latent, Latent):
            data, index, stamps, gap = latent.data, latent.index, latent.timestamps, latent.gap
        where = f"latent {position}"
        if not isinstance(data, torch.Tensor):
            raise LatentError(
                f"{where}: expected a Latent or a [{z}, h, w] tensor, got {type(data).__name__}"
            )
        if data.dim() != 3:
            raise LatentError(f"{where}: expected a [{z}, h, w] tensor, got {tuple(data.shape)}")
        if data.shape[0] != z:
            raise LatentError(
                f"{where}: {self.decoder.config.name} decodes {z} latent channels, got "
                f"{data.shape[0]}"
            )
        if data.shape[1] < 1 or data.shape[2] < 1:
            raise LatentError(f"{where}: empty latent {tuple(data.shape)}")
        if not data.is_floating_point():
            raise LatentError(
                f"{where}: expected a float tensor (normalised latent), got {data.dtype}"
            )
        # Checked where it is (a latent on the CPU: no wait for the GPU); uploaded by _stage.
        data = data.detach()
        if data.device.type != "cpu":
            data = data.to(self._device)
        raw = self.decoder.denormalize(data) if self.normalized else data.float()
        if not bool(torch.isfinite(raw).all()):
            raise LatentError(f"{where}: the latent holds NaN or infinite values")
        return _Checked(raw, index, tuple(stamps), gap)

    def _allocate(self, height: int, width: int) -> DecoderState:
        return self._run_on_lane(
            self.decoder.new_state, height, width, capacity=1, memory_format=self.memory_format
        )

    def _ensure_state(self, height: int, width: int) -> None:
        state = self._state
        if state is not None and (state.height, state.width) == (height, width):
            return
        self._state = None  # free the old buffers before allocating new ones
        self._state = self._allocate(height, width)

    def _decode(self, item: _Checked) -> Iterator[DecodedFrame]:
        """Step one checked latent; a generator of its frames (run it to the end)."""
        x = self._stage(item)
        state = self._state
        assert state is not None
        steps = self.decoder.step(x, state)
        done = 0
        while True:
            with self._lane():
                chunk = self._guarded(lambda: next(steps, None))
                if chunk is None:
                    break
                out = chunk.float().clamp(-1.0, 1.0)
            frames = self._frames_of(item, self._deliver(out, self.output_device), done)
            done += len(frames)
            yield from frames
        self._latents += 1

    def _starts_run(self, item: _Checked) -> bool:
        return item.gap or item.index == 0

    def _stage(self, item: _Checked) -> torch.Tensor:
        """Before the step of a latent: a new run where it starts one (the encoder restarted),
        the state for its size; the step's input ``[1, z, 1, h, w]``.

        With :meth:`_frames_of` and ``_latents += 1`` after the step, the halves of
        :meth:`_decode` around the model's step, so that :class:`streamvae.StreamPool` can step
        many streams' latents as one batch.
        """
        if self._latents > 0 and self._starts_run(item):
            self.reset()
        if self._latents == 0:
            self._ensure_state(item.raw.shape[1], item.raw.shape[2])
            self._size = (item.raw.shape[1], item.raw.shape[2])
        return self._upload(item.raw[None, :, None].to(self.decoder.dtype))

    def _frames_of(self, item: _Checked, out: torch.Tensor, done: int) -> list[DecodedFrame]:
        """The frames in ``out`` (``[1, 3, k, H, W]``, clamped, delivered) of the latent being
        decoded, of which ``done`` frames were handed out before."""
        position = self._latents
        first = 0 if position == 0 else self.group_size * position - self.group_size + 1
        latent_index = position if item.index is None else item.index
        ready, ready_monotonic = time.time(), time.monotonic()
        frames = []
        for k in range(out.shape[2]):
            count = done + k
            frames.append(
                DecodedFrame(
                    data=out[0, :, k],
                    index=first + count,
                    latent=latent_index,
                    timestamp=item.timestamps[count] if count < len(item.timestamps) else None,
                    gap=item.gap and count == 0,
                    ready_time=ready,
                    ready_monotonic=ready_monotonic,
                    approximate=position < self._exact_from,
                )
            )
        return frames


def decoder_receptive_field(decoder: WanDecoder) -> int:
    """``R``: how many latents, ending at a frame's own latent, the frame depends on.

    Walked off the decoder's modules, as :func:`streamvae.receptive_field` walks the encoder's:
    each causal 3x3x3 conv looks back two frames at its own rate; a temporal upsample maps
    output frame ``f >= 1`` to input ``(f + 1) // 2``, whose time conv looks back two inputs.
    """
    from streamvae.model.decoder import Upsample
    from streamvae.model.layers import CausalConv3d

    layers: list[str] = []
    for name, module in decoder.named_modules():
        if isinstance(module, CausalConv3d):
            layers.append("causal")
        elif isinstance(module, Upsample) and module.time_conv is not None:
            layers.append("up")
        elif (
            isinstance(module, torch.nn.Conv3d)
            and module.kernel_size[0] != 1
            and not name.endswith("time_conv")
        ):
            raise NotImplementedError(
                f"layer {name!r} mixes frames in a way this walk does not know"
            )
    latent = 1 << 20
    stride = decoder.config.temporal_stride
    first = stride * latent - stride + 1
    for kind in reversed(layers):
        first = first - 2 if kind == "causal" else (first + 1) // 2 - 2
    return latent - first + 1
