"""The Wan 2.1 VAE encoder as a chain of stepping layers; batch encode is one fresh-state pass.

>>> import torch
>>> from streamvae.config import narrow
>>> from streamvae.model import WanEncoder
>>> encoder = WanEncoder(narrow(8)).eval()
>>> encoder.encode(torch.zeros(1, 3, 9, 32, 32)).shape
torch.Size([1, 16, 3, 4, 4])
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch import nn

from streamvae.config import WAN21, WanConfig
from streamvae.model.graphs import Signature, StepGraphs
from streamvae.model.kernels import (
    PackedConv,
    SlowPathWarning,
    cpu_slow_path_reason,
    onednn_available,
)
from streamvae.model.layers import (
    CausalConv3d,
    Downsample,
    MidBlock,
    ResidualBlock,
    ResidualState,
    RMSNorm,
    StateSpec,
)
from streamvae.model.state import ConvState, FrameWindow, TimeDownState

__all__ = ["EncoderState", "WanEncoder", "default_memory_format", "state_nbytes"]

# Where frame-at-a-time states keep their conv windows as rings by default. Not the CPU: there
# the two frame copies a shift costs are a few per cent of a step, and every conv would keep
# three oneDNN-packed rotations of its weights (600 MB more in float32).
RING_DEVICES = frozenset({"cuda"})

Block = ResidualBlock | Downsample
BlockState = ResidualState | TimeDownState | None


class EncoderState:
    """Everything one stream remembers: one state object per causal layer, sized for ``H x W``.

    Allocated once by :meth:`WanEncoder.new_state`; never grows with stream length.
    """

    def __init__(
        self,
        spec: StateSpec,
        height: int,
        width: int,
        conv_in: ConvState,
        blocks: list[BlockState],
        mid: list[ResidualState],
        conv_out: ConvState,
    ) -> None:
        self.spec = spec
        self.height = height
        self.width = width
        self.conv_in = conv_in
        self.blocks = blocks
        self.mid = mid
        self.conv_out = conv_out
        self.graphs: StepGraphs | None = None
        self._convs = [part for part in self._parts() if isinstance(part, ConvState)] + [
            conv
            for part in self._parts()
            if isinstance(part, ResidualState)
            for conv in (part.conv1, part.conv2)
        ]
        self._time_downs = [part for part in self._parts() if isinstance(part, TimeDownState)]

    def signature(self) -> Signature:
        """The Python-side state that decides which kernels the next step launches."""
        return (
            *((conv.history, conv.head) for conv in self._convs),
            *((down.held, down.started) for down in self._time_downs),
        )

    def restore(self, signature: Signature) -> None:
        """Set the Python-side state to ``signature`` (after a replayed CUDA graph)."""
        convs = len(self._convs)
        for conv, history_head in zip(self._convs, signature[:convs]):
            conv.history, conv.head = history_head  # type: ignore[misc]
        for down, held_started in zip(self._time_downs, signature[convs:]):
            down.held, down.started = held_started  # type: ignore[misc]

    def _parts(self) -> Iterator[ConvState | ResidualState | TimeDownState]:
        yield self.conv_in
        yield from (s for s in self.blocks if s is not None)
        yield from self.mid
        yield self.conv_out

    def reset(self) -> None:
        """Back to the state before frame 0, in place (no reallocation)."""
        for part in self._parts():
            part.reset()

    def buffers(self) -> list[torch.Tensor]:
        """Every state tensor (``[B, ...]``), in one fixed order for states of one layout."""
        return [
            window.frames
            for part in self._parts()
            for window in (
                (part.conv1.window, part.conv2.window)
                if isinstance(part, ResidualState)
                else (part.window,)
            )
        ]

    def batch_view(self, start: int, stop: int) -> EncoderState:
        """Streams ``start:stop`` of this batched state, as a state of their own (views, no copy).

        Stepping the view steps those streams in the shared buffers. Its Python-side state
        (the :meth:`signature`) starts as this state's and is the view's own from then on.

        >>> from streamvae import WanEncoder, narrow
        >>> state = WanEncoder(narrow(8)).new_state(16, 16, batch=4)
        >>> view = state.batch_view(1, 3)
        >>> view.spec.batch, view.conv_in.window.frames.data_ptr() > state.conv_in.window.frames.data_ptr()
        (2, True)
        """
        if not 0 <= start < stop <= self.spec.batch:
            raise ValueError(f"batch view {start}:{stop} outside a state of {self.spec.batch}")
        old = self.spec
        spec = StateSpec(
            stop - start, old.capacity, old.dtype, old.device, old.memory_format, ring=old.ring
        )

        def conv(state: ConvState) -> ConvState:
            view = ConvState(FrameWindow(state.window.frames[start:stop]), ring=state.ring)
            view.history, view.head = state.history, state.head
            return view

        def part(state: BlockState) -> BlockState:
            if isinstance(state, ResidualState):
                return ResidualState(conv(state.conv1), conv(state.conv2))
            if isinstance(state, TimeDownState):
                view = TimeDownState(FrameWindow(state.window.frames[start:stop]))
                view.held, view.started = state.held, state.started
                return view
            return None

        mid = [ResidualState(conv(m.conv1), conv(m.conv2)) for m in self.mid]
        blocks = [part(b) for b in self.blocks]
        return EncoderState(
            spec, self.height, self.width, conv(self.conv_in), blocks, mid, conv(self.conv_out)
        )

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._parts())


class WanEncoder(nn.Module):
    """The Wan 2.1 VAE encoder (encoder trunk plus ``quant_conv``), returning the latent mean.

    Parameter names follow diffusers' ``AutoencoderKLWan`` (``conv_in``, ``down_blocks.N``,
    ``mid_block``, ``norm_out``, ``conv_out``, ``quant_conv``) with the ``encoder.`` prefix
    dropped; :mod:`streamvae.weights` maps Wan's original names onto them.
    """

    def __init__(self, config: WanConfig = WAN21) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        self.conv_in = CausalConv3d(config.in_channels, dims[0])
        blocks: list[Block] = []
        last_stage = len(config.dim_mult) - 1
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage != last_stage:
                blocks.append(Downsample(out_dim, temporal=config.temporal_downsample[stage]))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim)
        self.quant_conv = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.quant_kernel = PackedConv(stride=(1, 1, 1), padding=(0, 0, 0))
        # float32 whatever the model's dtype: kept out of the module's buffers so .to(dtype)
        # cannot round them.
        self._latent_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._params: tuple[nn.Parameter, ...] | None = None

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    # -- state ----

    def new_state(
        self,
        height: int,
        width: int,
        *,
        batch: int = 1,
        capacity: int = 1,
        memory_format: torch.memory_format | None = None,
        cuda_graphs: bool = False,
        ring: bool | None = None,
    ) -> EncoderState:
        """Allocate the streaming state for ``batch`` streams of ``height x width`` frames.

        ``capacity`` is the most frames one :meth:`step` call feeds each layer at once; longer
        inputs are stepped through in chunks of that many frames. ``memory_format`` is the
        layout of the state buffers, which the activations follow (default: the fastest
        measured for the encoder's device and dtype, see :func:`default_memory_format`).
        ``cuda_graphs`` (CUDA only) captures the steps into CUDA graphs and replays them (see
        :mod:`streamvae.model.graphs`); the state's buffers must then not be replaced.
        ``ring`` (capacity 1 only) keeps each causal conv's frames as a ring and rotates the
        kernel's time taps instead of copying two frames per step (see
        :class:`~streamvae.model.state.ConvState`); default: on the devices in
        :data:`RING_DEVICES` when ``capacity`` is 1.
        """
        if memory_format is None:
            memory_format = default_memory_format(self.device, self.dtype)
        if ring is None:
            ring = capacity == 1 and self.device.type in RING_DEVICES
        reason = cpu_slow_path_reason(self.device, self.dtype, memory_format)
        if reason is not None and self.device.type != "meta":
            warnings.warn(f"streamvae: slow path: {reason}", SlowPathWarning, stacklevel=2)
        spec = StateSpec(batch, capacity, self.dtype, self.device, memory_format, ring=ring)
        h, w = height, width
        conv_in = self.conv_in.new_state(spec, h, w)
        blocks: list[BlockState] = []
        for block in self.down_blocks:
            blocks.append(block.new_state(spec, h, w))
            if isinstance(block, Downsample):
                h, w = h // 2, w // 2
        mid = self.mid_block.new_state(spec, h, w)
        conv_out = self.conv_out.new_state(spec, h, w)
        state = EncoderState(spec, height, width, conv_in, blocks, mid, conv_out)
        if cuda_graphs and self.device.type == "cuda":
            state.graphs = StepGraphs(self.device)
        return state

    # -- stepping ----

    @torch.inference_mode()
    def step(self, video: torch.Tensor, state: EncoderState) -> torch.Tensor | None:
        """Advance ``state`` by the frames of ``video`` (``[B, 3, n, H, W]``, model dtype, [-1, 1]).

        Returns the raw latent means ``[B, z_dim, m, H/8, W/8]`` (model dtype) of the latent
        frames that became complete, or ``None`` when none did.
        """
        outs = [
            out
            for chunk in video.split(state.spec.capacity, dim=2)
            if (out := self._step_chunk(chunk, state)) is not None
        ]
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _step_chunk(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor | None:
        count = x.shape[2]
        state.conv_in.slots(count).copy_(x)
        if state.graphs is None:
            return self._advance(count, state)
        return state.graphs.run(
            (count,),
            self._weights_key(),
            lambda: self._advance(count, state),
            state.signature,
            state.restore,
        )

    def _weights_key(self) -> Hashable:
        """Changes when any parameter is moved, cast or changed in place.

        CUDA graphs read the parameters' addresses, and the ring convs' rotated copies of the
        weights, which are refreshed only by an eager step. The parameter list is cached
        (walking the module tree each step costs about 0.1 ms) and dropped by ``_apply``
        (``.to``, ``.cuda``, ``.half``...) and ``load_state_dict``.
        """
        if self._params is None:
            self._params = tuple(self.parameters())
        return (self.dtype, *((param.data_ptr(), param._version) for param in self._params))

    def _apply(self, fn: Any, recurse: bool = True) -> WanEncoder:
        self._params = None
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._params = None
        return super().load_state_dict(*args, **kwargs)

    def _advance(self, count: int, state: EncoderState) -> torch.Tensor | None:
        """The step after the input frames were written into ``conv_in``'s window."""
        h: torch.Tensor | None = self.conv_in.step(state.conv_in, count)
        for block, block_state in zip(self.down_blocks, state.blocks):
            if isinstance(block, ResidualBlock):
                h = block.step(h, block_state)
            else:
                h = block.step(h, block_state)
                if h is None:
                    return None
        assert h is not None
        h = self.mid_block.step(h, state.mid)
        count = h.shape[2]
        self.norm_out.silu_into(h, state.conv_out.slots(count))
        h = self.conv_out.step(state.conv_out, count)
        z = self.config.z_dim
        return self.quant_kernel(h, self.quant_conv.weight[:z], self.quant_conv.bias[:z])

    def normalize(self, mean: torch.Tensor) -> torch.Tensor:
        """Wan's latent normalisation ``(mu - mean) / std`` per channel, in float32."""
        stats = self._latent_stats.get(mean.device)
        if stats is None:
            shift = torch.tensor(self.config.latents_mean, dtype=torch.float32)
            scale = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32)
            stats = self._latent_stats[mean.device] = (shift.to(mean.device), scale.to(mean.device))
        shape = (1, -1, 1, 1, 1) if mean.dim() == 5 else (-1, 1, 1)
        return (mean.float() - stats[0].view(shape)) * stats[1].view(shape)

    # -- batch ----

    @torch.inference_mode()
    def encode(
        self, video: torch.Tensor, *, normalize: bool = True, chunk_frames: int = 4
    ) -> torch.Tensor:
        """Encode whole clips: ``[B, 3, T, H, W]`` RGB in [-1, 1] -> ``[B, 16, 1 + (T-1)//4, H//8, W//8]``.

        Returns float32 latent means, normalised with Wan's per-channel mean and std (the raw
        mean with ``normalize=False``, which is what diffusers' ``latent_dist.mean`` returns).
        As in the reference, frames after the last complete group of four (frames past
        ``1 + 4 * ((T - 1) // 4)``) are ignored. This is the streaming code path run from a fresh
        state over chunks of ``chunk_frames`` frames; any chunking gives the same latents.
        """
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"encode expects a [B, 3, T, H, W] tensor, got {got}")
        b, c, t, h, w = video.shape
        if c != self.config.in_channels:
            raise ValueError(f"encode expects {self.config.in_channels} channels (RGB), got {c}")
        if not video.is_floating_point():
            raise TypeError(f"encode expects a float tensor in [-1, 1], got {video.dtype}")
        if t < 1 or h < self.config.spatial_stride or w < self.config.spatial_stride:
            raise ValueError(f"encode needs T >= 1 and H, W >= 8, got T={t}, H={h}, W={w}")
        stride = self.config.temporal_stride
        used = 1 + stride * ((t - 1) // stride)
        video = video[:, :, :used].to(device=self.device, dtype=self.dtype)
        state = self.new_state(h, w, batch=b, capacity=min(chunk_frames, used))
        mean = self.step(video, state)
        assert mean is not None
        return self.normalize(mean) if normalize else mean.float()


def default_memory_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """The state layout streamvae runs fastest with, by device and dtype.

    On the CPU (float32, bfloat16, with oneDNN): channels-last, which lets the convolutions run
    through oneDNN on packed weights (with the other CPU paths that need it, a 9-frame 128x128
    stream runs 1.35x faster in float32 and 2x in bfloat16 than contiguous; see
    ``benchmarks/RESULTS.md``).
    On CUDA in half precision: channels-last too, predicted, not yet measured: cuDNN's tensor-core
    convolutions work on channels-last data (contiguous input costs layout transposes), and the
    norms run as one fused kernel only when the channels are innermost (about a third of the
    memory traffic of the eager norm). ``benchmarks/gpu_check.sh`` measures it against
    contiguous. Elsewhere (CUDA float32, other devices) contiguous.
    """
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and onednn_available():
        return torch.channels_last_3d
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.channels_last_3d
    return torch.contiguous_format


def state_nbytes(
    config: WanConfig,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
    capacity: int = 1,
) -> int:
    """Bytes of one stream's state at ``height x width``, computed without allocating anything."""
    with torch.device("meta"):
        encoder = WanEncoder(config).to(dtype)
        state = encoder.new_state(height, width, batch=batch, capacity=capacity)
    return state.nbytes
