"""The Wan VAE encoders as a chain of stepping layers; batch encode is one fresh-state pass.

>>> import torch
>>> from streamvae.config import WAN22, narrow
>>> from streamvae.model import WanEncoder
>>> WanEncoder(narrow(8)).eval().encode(torch.zeros(1, 3, 9, 32, 32)).shape
torch.Size([1, 16, 3, 4, 4])
>>> WanEncoder(narrow(8, WAN22)).eval().encode(torch.zeros(1, 3, 9, 32, 48)).shape
torch.Size([1, 48, 3, 2, 3])

One code path for the whole family: Wan 2.2's patchify and stage shortcuts are layers like the
others (:class:`~streamvae.model.layers.Patchify`, :class:`~streamvae.model.layers.ResidualStage`).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, cast

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
    Patchify,
    ResidualBlock,
    ResidualStage,
    ResidualState,
    RMSNorm,
    StageState,
    StateSpec,
)
from streamvae.model.state import (
    ConvState,
    FrameWindow,
    PairState,
    TimeDownState,
    check_memory,
)

__all__ = ["EncoderState", "WanEncoder", "default_memory_format", "state_nbytes"]

# Where frame-at-a-time states keep their conv windows as rings by default. Not the CPU: there
# the two frame copies a shift costs are a few per cent of a step, and every conv would keep
# three oneDNN-packed rotations of its weights (600 MB more in float32).
RING_DEVICES = frozenset({"cuda"})

Block = ResidualBlock | Downsample | ResidualStage
BlockState = ResidualState | TimeDownState | StageState | None
Part = ConvState | ResidualState | TimeDownState | PairState


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
        self._pairs = [part for part in self._parts() if isinstance(part, PairState)]

    def signature(self) -> Signature:
        """The Python-side state that decides which kernels the next step launches."""
        return (
            *((conv.history, conv.head) for conv in self._convs),
            *((down.held, down.started) for down in self._time_downs),
            *(pair.held for pair in self._pairs),
        )

    def restore(self, signature: Signature) -> None:
        """Set the Python-side state to ``signature`` (after a replayed CUDA graph)."""
        convs = len(self._convs)
        downs = convs + len(self._time_downs)
        for conv, history_head in zip(self._convs, signature[:convs]):
            conv.history, conv.head = history_head  # type: ignore[misc]
        for down, held_started in zip(self._time_downs, signature[convs:downs]):
            down.held, down.started = held_started  # type: ignore[misc]
        for pair, held in zip(self._pairs, signature[downs:]):
            pair.held = held  # type: ignore[assignment]

    def _parts(self) -> Iterator[Part]:
        """Every layer's state, in the order the encoder steps them (stages flattened)."""
        yield self.conv_in
        for block in self.blocks:
            if isinstance(block, StageState):
                yield from block.parts()
            elif block is not None:
                yield block
        yield from self.mid
        yield self.conv_out

    def windows(self) -> list[FrameWindow]:
        """Every frame buffer this state owns, in the order the encoder steps its layers."""
        windows = []
        for part in self._parts():
            convs = (part.conv1, part.conv2) if isinstance(part, ResidualState) else (part,)
            windows += [conv.window for conv in convs]
        return windows

    def reset(self) -> None:
        """Back to the state before frame 0, in place (no reallocation)."""
        for part in self._parts():
            part.reset()

    def start_mid_stream(self, frames: int = 0) -> None:
        """Zeros as every causal layer's memory, counted as real, at a group boundary.

        The state of a stream that has run through ``frames`` frames whose activations were all
        zero, just after a latent: every causal conv remembers two (zero) frames (a ring window
        at the rotation ``frames`` steps give it), every temporal downsample has passed its
        first frame and holds one (zero) frame. Frames pushed from here on, from a group's
        first frame, give exactly the latents of the real stream once the receptive field is
        full (see :mod:`streamvae.receptive`).
        """
        self.reset()
        size = ConvState.KEEP + 1

        def place(conv: ConvState, steps: int) -> None:
            conv.history = ConvState.KEEP
            if conv.ring:
                conv.head = (ConvState.KEEP + steps) % size

        steps = frames  # how many frames each layer has stepped over at its own rate
        for part in self._parts():  # in the order the encoder steps them (stages flattened)
            if isinstance(part, ConvState):
                place(part, steps)
            elif isinstance(part, ResidualState):
                place(part.conv1, steps)
                place(part.conv2, steps)
            elif isinstance(part, TimeDownState):
                part.held = 1
                part.started = True
                steps = 0 if steps == 0 else 1 + (steps - 1) // 2
            else:
                # An average-pool shortcut (Wan 2.2) has paired every frame at a group
                # boundary: its input has run through an odd count (1 + 4k, then 1 + 2k).
                part.held = 0

    def memory(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """What the state remembers, layout- and device-independent, for a snapshot.

        Tensors: ``conv.N`` the two remembered frames of causal conv ``N`` in time order (a ring
        window is unrotated), ``down.N`` the two front frames of temporal downsample ``N``;
        counters: ``conv.N.history``, ``down.N.held``, ``down.N.started``; ``pair.N`` the pending
        frame of average-pool shortcut ``N`` (Wan 2.2) and ``pair.N.held``. Copies, contiguous.
        """
        keep = ConvState.KEEP
        tensors: dict[str, torch.Tensor] = {}
        counters: dict[str, int] = {}
        for i, conv in enumerate(self._convs):
            frames = conv.window.frames
            if conv.ring:
                order = [(conv.head + 1 + k) % (keep + 1) for k in range(keep)]
                remembered = frames[:, :, order]
            else:
                remembered = frames[:, :, :keep]
            tensors[f"conv.{i}"] = remembered.contiguous().clone()
            counters[f"conv.{i}.history"] = conv.history
        for i, down in enumerate(self._time_downs):
            tensors[f"down.{i}"] = down.window.frames[:, :, :2].contiguous().clone()
            counters[f"down.{i}.held"] = down.held
            counters[f"down.{i}.started"] = int(down.started)
        for i, pair in enumerate(self._pairs):
            tensors[f"pair.{i}"] = pair.window.frames[:, :, :1].contiguous().clone()
            counters[f"pair.{i}.held"] = pair.held
        return tensors, counters

    def check_memory(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Raise ``ValueError`` unless :meth:`load_memory` can take these exactly as they are."""
        shapes, ranges = self.memory_layout()
        check_memory(tensors, counters, shapes, ranges, self.spec.dtype, "encoder")

    def memory_layout(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]]]:
        """Shapes of :meth:`memory`'s tensors and the allowed range of each counter."""
        shapes: dict[str, tuple[int, ...]] = {}
        ranges: dict[str, tuple[int, int]] = {}
        for i, conv in enumerate(self._convs):
            b, c, _, h, w = conv.window.frames.shape
            shapes[f"conv.{i}"] = (b, c, ConvState.KEEP, h, w)
            ranges[f"conv.{i}.history"] = (0, ConvState.KEEP)
        for i, down in enumerate(self._time_downs):
            b, c, _, h, w = down.window.frames.shape
            shapes[f"down.{i}"] = (b, c, 2, h, w)
            ranges[f"down.{i}.held"] = (0, 2)
            ranges[f"down.{i}.started"] = (0, 1)
        for i, pair in enumerate(self._pairs):
            b, c, _, h, w = pair.window.frames.shape
            shapes[f"pair.{i}"] = (b, c, 1, h, w)
            ranges[f"pair.{i}.held"] = (0, 1)
        return shapes, ranges

    def load_memory(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Set the state to what :meth:`memory` returned (checked first: nothing is written
        unless everything fits)."""
        self.check_memory(tensors, counters)
        keep = ConvState.KEEP
        for i, conv in enumerate(self._convs):
            conv.window.frames[:, :, :keep].copy_(tensors[f"conv.{i}"])
            conv.window.frames[:, :, keep:].zero_()
            conv.history = counters[f"conv.{i}.history"]
            conv.head = keep
        for i, down in enumerate(self._time_downs):
            down.window.frames[:, :, :2].copy_(tensors[f"down.{i}"])
            down.window.frames[:, :, 2:].zero_()
            down.held = counters[f"down.{i}.held"]
            down.started = bool(counters[f"down.{i}.started"])
        for i, pair in enumerate(self._pairs):
            pair.window.frames[:, :, :1].copy_(tensors[f"pair.{i}"])
            pair.window.frames[:, :, 1:].zero_()
            pair.held = counters[f"pair.{i}.held"]

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
        spec = self.spec.batch_view(start, stop)

        def conv(state: ConvState) -> ConvState:
            return state.batch_view(start, stop)

        def leaf(state: Part) -> Part:
            if isinstance(state, ConvState):
                return conv(state)
            if isinstance(state, ResidualState):
                return ResidualState(conv(state.conv1), conv(state.conv2))
            if isinstance(state, TimeDownState):
                down = TimeDownState(FrameWindow(state.window.frames[start:stop]))
                down.held, down.started = state.held, state.started
                return down
            if isinstance(state, PairState):
                pair = PairState(FrameWindow(state.window.frames[start:stop]))
                pair.held = state.held
                return pair
            raise TypeError(f"no batch view of a {type(state).__name__}")

        def part(state: BlockState) -> BlockState:
            if state is None:
                return None
            if isinstance(state, StageState):
                return StageState(
                    [leaf(r) for r in state.resnets],  # type: ignore[misc]
                    None if state.down is None else leaf(state.down),  # type: ignore[arg-type]
                    None if state.shortcut is None else leaf(state.shortcut),  # type: ignore[arg-type]
                )
            return leaf(state)  # type: ignore[return-value]

        mid = [ResidualState(conv(m.conv1), conv(m.conv2)) for m in self.mid]
        blocks = [part(b) for b in self.blocks]
        return EncoderState(
            spec, self.height, self.width, conv(self.conv_in), blocks, mid, conv(self.conv_out)
        )

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._parts())


class WanEncoder(nn.Module):
    """A Wan VAE encoder (encoder trunk plus ``quant_conv``), returning the latent mean.

    Parameter names follow diffusers' ``AutoencoderKLWan`` (``conv_in``, ``down_blocks.N``,
    ``mid_block``, ``norm_out``, ``conv_out``, ``quant_conv``) with the ``encoder.`` prefix
    dropped; :mod:`streamvae.weights` maps Wan's original names onto them. Wan 2.1's
    ``down_blocks`` are a flat list of residual blocks and downsamples; with
    ``config.residual`` (Wan 2.2) they are one :class:`ResidualStage` per stage
    (``down_blocks.N.resnets.M``, ``down_blocks.N.downsampler``), as in diffusers.
    """

    def __init__(self, config: WanConfig = WAN21) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        self.patchify = Patchify(config.patch_size)
        self.conv_in = CausalConv3d(config.conv_in_channels, dims[0])
        blocks: list[Block] = []
        for stage in config.stages():
            if config.residual:
                blocks.append(
                    ResidualStage(
                        stage.in_dim,
                        stage.out_dim,
                        config.num_res_blocks,
                        spatial=stage.spatial_down,
                        temporal=stage.temporal_down,
                    )
                )
                continue
            in_dim = stage.in_dim
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, stage.out_dim))
                in_dim = stage.out_dim
            if stage.spatial_down:
                blocks.append(Downsample(stage.out_dim, temporal=stage.temporal_down))
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
        patch = self.config.patch_size
        h, w = height // patch, width // patch
        conv_in = self.conv_in.new_state(spec, h, w)
        blocks: list[BlockState] = []
        for block in self._blocks:
            blocks.append(block.new_state(spec, h, w))
            if block.halves_space:
                h, w = h // 2, w // 2
        mid = self.mid_block.new_state(spec, h, w)
        conv_out = self.conv_out.new_state(spec, h, w)
        state = EncoderState(spec, height, width, conv_in, blocks, mid, conv_out)
        if cuda_graphs and self.device.type == "cuda":
            state.graphs = StepGraphs(self.device)
        return state

    @property
    def _blocks(self) -> Sequence[Block]:
        """``down_blocks`` as what it holds (``nn.ModuleList`` is typed as any ``nn.Module``)."""
        return cast("Sequence[Block]", self.down_blocks)

    # -- stepping ----

    @torch.inference_mode()
    def step(self, video: torch.Tensor, state: EncoderState) -> torch.Tensor | None:
        """Advance ``state`` by the frames of ``video`` (``[B, 3, n, H, W]``, model dtype, [-1, 1]).

        Returns the raw latent means ``[B, z_dim, m, H/s, W/s]`` (model dtype; ``s`` is
        ``config.spatial_stride``) of the latent frames that became complete, or ``None`` when
        none did.
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
        self.patchify.write_into(x, state.conv_in.slots(count))
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
        applied: WanEncoder = nn.Module._apply(self, fn, recurse)
        return applied

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._params = None
        return super().load_state_dict(*args, **kwargs)

    def _advance(self, count: int, state: EncoderState) -> torch.Tensor | None:
        """The step after the input frames were written into ``conv_in``'s window."""
        h = self.conv_in.step(state.conv_in, count)
        residual: torch.Tensor | None = None  # a residual block's shortcut, not yet added
        for block, block_state in zip(self._blocks, state.blocks):
            # new_state made block_state for this block: the pairing is by position, which
            # the union types cannot express.
            if isinstance(block, ResidualBlock):  # its add in the next block's norm pass
                h, residual = block.step_unsummed(h, block_state, residual)  # type: ignore[arg-type]
                continue
            if residual is not None:
                h, residual = h.add_(residual), None
            out = block.step(h, block_state)  # type: ignore[arg-type]
            if out is None:  # a temporal downsample holds its frame for the next pair
                return None
            h = out
        if residual is not None:
            h = h.add_(residual)
        h = self.mid_block.step(h, state.mid)
        count = h.shape[2]
        self.norm_out.silu_into(h, state.conv_out.slots(count))
        h = self.conv_out.step(state.conv_out, count)
        z = self.config.z_dim
        bias = self.quant_conv.bias
        assert bias is not None, "quant_conv is built with a bias"
        return self.quant_kernel(h, self.quant_conv.weight[:z], bias[:z])

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
        """Encode whole clips: ``[B, 3, T, H, W]`` RGB in [-1, 1] -> ``[B, z, 1 + (T-1)//4, H//s, W//s]``.

        ``z`` is ``config.z_dim`` (16 for Wan 2.1, 48 for Wan 2.2), ``s`` is
        ``config.spatial_stride`` (8 or 16). Returns float32 latent means, normalised with the
        model's per-channel mean and std (the raw mean with ``normalize=False``, which is what
        diffusers' ``latent_dist.mean`` returns). As in the reference, frames after the last
        complete group of four (frames past ``1 + 4 * ((T - 1) // 4)``) are ignored; Wan 2.1
        ignores the rows and columns past a multiple of 8, and Wan 2.2 (whose reference fails
        on them) refuses sizes that are not multiples of 16. This is the streaming code path run
        from a fresh state over chunks of ``chunk_frames`` frames; any chunking gives the same
        latents.
        """
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"encode expects a [B, 3, T, H, W] tensor, got {got}")
        b, c, t, h, w = video.shape
        config = self.config
        if c != config.in_channels:
            kind = " (RGB)" if config.in_channels == 3 else ""
            raise ValueError(f"encode expects {config.in_channels} channels{kind}, got {c}")
        if not video.is_floating_point():
            raise TypeError(f"encode expects a float tensor in [-1, 1], got {video.dtype}")
        if config.residual and (problem := config.size_error(h, w)):
            raise ValueError(f"encode: {problem}")
        stride = config.spatial_stride
        if t < 1 or h < stride or w < stride:
            raise ValueError(f"encode needs T >= 1 and H, W >= {stride}, got T={t}, H={h}, W={w}")
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
