"""The Wan VAE decoders as a chain of stepping layers; batch decode is one fresh-state pass.

>>> import torch
>>> from streamvae.config import WAN22, narrow
>>> from streamvae.model.decoder import WanDecoder
>>> WanDecoder(narrow(8)).eval().decode(torch.zeros(1, 16, 3, 4, 4)).shape
torch.Size([1, 3, 9, 32, 32])
>>> WanDecoder(narrow(8, WAN22)).eval().decode(torch.zeros(1, 48, 2, 2, 3)).shape
torch.Size([1, 3, 5, 32, 48])

Latent 0 gives one frame, every later latent ``config.temporal_stride`` (4). The layers are the
encoder's (:mod:`streamvae.model.layers`: causal convs, residual blocks, attention, norms) plus
the upsampling ones defined here, each with its own explicit state: :class:`Upsample` (Wan's
``Resample`` upsample2d / upsample3d, whose time conv doubles the frames after the first) and
Wan 2.2's parameter-free stage shortcut :class:`DupShortcut` (``DupUp3D``). :meth:`WanDecoder.step`
walks the chain depth first, so with a state of capacity 1 each output frame is emitted as soon
as causality allows: a latent's first frame before its last is computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from streamvae.config import WAN21, WanConfig
from streamvae.model.encoder import default_memory_format
from streamvae.model.graphs import Signature
from streamvae.model.kernels import PackedConv
from streamvae.model.layers import (
    CausalConv3d,
    MidBlock,
    ResidualBlock,
    ResidualState,
    RMSNorm,
    StateSpec,
)
from streamvae.model.state import ConvState, FrameWindow, TimeUpState, check_memory

__all__ = ["DecoderState", "DupShortcut", "UpBlock", "UpState", "Upsample", "WanDecoder"]


def _channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d)


class Upsample(nn.Module):
    """Space x2 per frame (nearest, then a 3x3 conv); optionally time x2 first (Wan's ``Resample``).

    The time conv (kernel (3, 1, 1), ``dim -> 2 * dim``) follows Wan's ``'Rep'`` rule (see
    :class:`~streamvae.model.state.TimeUpState`): the stream's first frame passes through,
    every later frame gives two, the first ``dim`` output channels then the second.
    """

    def __init__(self, dim: int, out_dim: int, *, temporal: bool) -> None:
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)
        self.time_conv = nn.Conv3d(dim, dim * 2, (3, 1, 1)) if temporal else None
        self.kernel = PackedConv(stride=(1, 1), padding=(1, 1))
        self.time_kernel = PackedConv(stride=(1, 1, 1), padding=(0, 0, 0))

    def new_state(self, spec: StateSpec, height: int, width: int) -> TimeUpState | None:
        if self.time_conv is None:
            return None
        return TimeUpState(spec.window(self.dim, ConvState.KEEP, height, width))

    def step(self, x: torch.Tensor, state: TimeUpState | None) -> torch.Tensor:
        if self.time_conv is not None:
            assert state is not None
            x = self.temporal(x, state)
        return self.spatial(x)

    def temporal(self, x: torch.Tensor, state: TimeUpState) -> torch.Tensor:
        """Time x2: ``[B, C, n, H, W] -> [B, C, 2n, H, W]`` (``2n - 1`` from the stream's start)."""
        assert self.time_conv is not None
        first = None
        if not state.started:
            first, x = x[:, :, :1], x[:, :, 1:]
            state.started = True
        count = x.shape[2]
        if count == 0:
            assert first is not None
            return first
        conv = state.conv
        conv.slots(count).copy_(x)
        both = self.time_kernel(
            conv.window.slots(0, ConvState.KEEP + count), self.time_conv.weight, self.time_conv.bias
        )
        conv.advance(count)
        b, c, _, h, w = x.shape
        layout = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
        start = 0 if first is None else 1
        out = torch.empty(
            (b, c, start + 2 * count, h, w), dtype=x.dtype, device=x.device, memory_format=layout
        )
        if first is not None:
            out[:, :, :1].copy_(first)
        out[:, :, start::2].copy_(both[:, :c])
        out[:, :, start + 1 :: 2].copy_(both[:, c:])
        return out

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Per frame: every pixel repeated 2x2 (Wan's nearest-exact x2), then the 3x3 conv."""
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
        up = torch.empty(
            (b * t, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=layout
        )
        up.unflatten(3, (w, 2)).unflatten(2, (h, 2)).copy_(
            frames[:, :, :, None, :, None].expand(b * t, c, h, 2, w, 2)
        )
        out = self.kernel(up, self.conv.weight, self.conv.bias)
        return out.reshape(b, t, -1, 2 * h, 2 * w).transpose(1, 2)


class DupShortcut(nn.Module):
    """Wan 2.2's parameter-free stage shortcut (``DupUp3D``): channels spread into time and space.

    Output channel ``o`` at frame offset ``a``, row offset ``i`` and column offset ``j`` (of
    ``frames x pixels x pixels`` output positions per input position) is input channel
    ``(o * F + a * p * p + i * p + j) // repeats`` (``F = frames * p * p``, ``repeats =
    out_dim * F / in_dim``). On the stream's first frame only the last frame offset is kept
    (Wan's ``first_chunk``), as the main path's upsample gives one frame there.
    """

    def __init__(self, in_dim: int, out_dim: int, *, frames: int, pixels: int) -> None:
        super().__init__()
        factor = frames * pixels * pixels
        if out_dim * factor % in_dim:
            raise ValueError(
                f"out_dim * {factor} must be divisible by in_dim ({in_dim} -> {out_dim})"
            )
        self.out_dim = out_dim
        self.frames = frames
        self.pixels = pixels
        self.repeats = out_dim * factor // in_dim
        self._sources: dict[torch.device, torch.Tensor] = {}

    def step(self, x: torch.Tensor, *, first: bool) -> torch.Tensor:
        sources = self._sources.get(x.device)
        if sources is None:
            count = self.out_dim * self.frames * self.pixels**2
            sources = torch.arange(count, device=x.device) // self.repeats
            self._sources[x.device] = sources
        b, _, t, h, w = x.shape
        ft, p = self.frames, self.pixels
        spread = x.index_select(1, sources).reshape(b, self.out_dim, ft, p, p, t, h, w)
        out = spread.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * p, w * p)
        return out[:, :, ft - 1 :] if first else out


class UpState:
    """The states of one decoder stage: its residual blocks' and its temporal upsample's."""

    def __init__(self, resnets: list[ResidualState], up: TimeUpState | None) -> None:
        self.resnets = resnets
        self.up = up

    def parts(self) -> list[ResidualState | TimeUpState]:
        return [*self.resnets, *([] if self.up is None else [self.up])]

    def reset(self) -> None:
        for part in self.parts():
            part.reset()

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts())


def _blocks(modules: nn.ModuleList) -> Sequence[ResidualBlock]:
    return cast("Sequence[ResidualBlock]", modules)


class UpBlock(nn.Module):
    """One decoder stage: ``num_res_blocks + 1`` residual blocks, then an optional upsample.

    Wan 2.1 (names as diffusers' ``WanUpBlock``: ``resnets.M``, ``upsamplers.0``): the upsample
    halves the channels. Wan 2.2 (``residual``, as ``WanResidualUpBlock``: ``resnets.M``,
    ``upsampler``): the upsample keeps them, and a :class:`DupShortcut` of the stage's input is
    added to its output where the stage upsamples.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        *,
        spatial: bool,
        temporal: bool,
        residual: bool,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.residual = residual
        up = (
            Upsample(out_dim, out_dim if residual else out_dim // 2, temporal=temporal)
            if spatial
            else None
        )
        self.upsamplers: nn.ModuleList | None = None
        self.upsampler: Upsample | None = None
        self.avg_shortcut: DupShortcut | None = None
        if residual:
            self.upsampler = up
            if spatial:
                self.avg_shortcut = DupShortcut(
                    in_dim, out_dim, frames=2 if temporal else 1, pixels=2
                )
        elif up is not None:
            self.upsamplers = nn.ModuleList([up])

    @property
    def up(self) -> Upsample | None:
        if self.upsamplers is not None:
            return cast("Upsample", self.upsamplers[0])
        return self.upsampler

    def new_state(self, spec: StateSpec, height: int, width: int) -> UpState:
        resnets = [resnet.new_state(spec, height, width) for resnet in _blocks(self.resnets)]
        up = self.up
        return UpState(resnets, None if up is None else up.new_state(spec, height, width))

    def step(self, x: torch.Tensor, state: UpState) -> torch.Tensor:
        shortcut = None
        if self.avg_shortcut is not None:
            first = state.up is not None and not state.up.started
            shortcut = self.avg_shortcut.step(x, first=first)
        h = x
        for resnet, resnet_state in zip(_blocks(self.resnets), state.resnets):
            h = resnet.step(h, resnet_state)
        up = self.up
        if up is not None:
            h = up.step(h, state.up)
        return h if shortcut is None else h.add_(shortcut)


class DecoderState:
    """Everything one decoded stream remembers: one state object per causal layer.

    Allocated once by :meth:`WanDecoder.new_state` for ``height x width`` latents; never grows.
    """

    def __init__(
        self,
        spec: StateSpec,
        height: int,
        width: int,
        conv_in: ConvState,
        mid: list[ResidualState],
        blocks: list[UpState],
        conv_out: ConvState,
    ) -> None:
        self.spec = spec
        self.height = height
        self.width = width
        self.conv_in = conv_in
        self.mid = mid
        self.blocks = blocks
        self.conv_out = conv_out
        self._convs: list[ConvState] = []
        self._ups: list[TimeUpState] = []
        for part in self._leaves():
            if isinstance(part, ConvState):
                self._convs.append(part)
            elif isinstance(part, ResidualState):
                self._convs += [part.conv1, part.conv2]
            else:
                self._convs.append(part.conv)
                self._ups.append(part)

    def _leaves(self) -> Iterator[ConvState | ResidualState | TimeUpState]:
        yield self.conv_in
        yield from self.mid
        for block in self.blocks:
            yield from block.parts()
        yield self.conv_out

    def windows(self) -> list[FrameWindow]:
        """Every frame buffer this state owns, in the order the decoder steps its layers."""
        return [conv.window for conv in self._convs]

    def reset(self) -> None:
        """Back to the state before latent 0, in place (no reallocation)."""
        for conv in self._convs:
            conv.reset()
        for up in self._ups:
            up.started = False

    def start_mid_stream(self) -> None:
        """Zeros as every causal layer's memory, counted as real: the state of a stream whose
        activations so far were all zero, after its first latent. Latents pushed from here on
        give exactly the real stream's frames once the receptive field is full."""
        self.reset()
        for conv in self._convs:
            conv.history = ConvState.KEEP
        for up in self._ups:
            up.started = True

    def memory(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """What the state remembers, for a snapshot: ``conv.N`` the two remembered frames of
        causal conv ``N`` (time convs included), ``conv.N.history``, ``up.N.started``."""
        keep = ConvState.KEEP
        tensors: dict[str, torch.Tensor] = {}
        counters: dict[str, int] = {}
        for i, conv in enumerate(self._convs):
            tensors[f"conv.{i}"] = conv.window.frames[:, :, :keep].contiguous().clone()
            counters[f"conv.{i}.history"] = conv.history
        for i, up in enumerate(self._ups):
            counters[f"up.{i}.started"] = int(up.started)
        return tensors, counters

    def memory_layout(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]]]:
        """Shapes of :meth:`memory`'s tensors and the allowed range of each counter."""
        shapes: dict[str, tuple[int, ...]] = {}
        ranges: dict[str, tuple[int, int]] = {}
        for i, conv in enumerate(self._convs):
            b, c, _, h, w = conv.window.frames.shape
            shapes[f"conv.{i}"] = (b, c, ConvState.KEEP, h, w)
            ranges[f"conv.{i}.history"] = (0, ConvState.KEEP)
        for i in range(len(self._ups)):
            ranges[f"up.{i}.started"] = (0, 1)
        return shapes, ranges

    def check_memory(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Raise ``ValueError`` unless :meth:`load_memory` can take these as they are."""
        shapes, ranges = self.memory_layout()
        check_memory(tensors, counters, shapes, ranges, self.spec.dtype, "decoder")

    def load_memory(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Set the state to what :meth:`memory` returned (checked first)."""
        self.check_memory(tensors, counters)
        keep = ConvState.KEEP
        for i, conv in enumerate(self._convs):
            conv.window.frames[:, :, :keep].copy_(tensors[f"conv.{i}"])
            conv.window.frames[:, :, keep:].zero_()
            conv.history = counters[f"conv.{i}.history"]
            conv.head = keep
        for i, up in enumerate(self._ups):
            up.started = bool(counters[f"up.{i}.started"])

    def signature(self) -> Signature:
        """The Python-side state that decides which kernels the next step launches (the
        :class:`streamvae.StreamPool` batches streams of one signature)."""
        return (
            *((conv.history, conv.head) for conv in self._convs),
            *(up.started for up in self._ups),
        )

    def restore(self, signature: Signature) -> None:
        """Set the Python-side state to ``signature``."""
        convs = len(self._convs)
        for conv, history_head in zip(self._convs, signature[:convs]):
            conv.history, conv.head = history_head  # type: ignore[misc]
        for up, started in zip(self._ups, signature[convs:]):
            up.started = bool(started)

    def buffers(self) -> list[torch.Tensor]:
        """Every state tensor (``[B, ...]``), in one fixed order for states of one layout."""
        return [window.frames for window in self.windows()]

    def batch_view(self, start: int, stop: int) -> DecoderState:
        """Streams ``start:stop`` of this batched state, as a state of their own (views, no
        copy); its Python-side state starts as this state's (see
        :meth:`streamvae.model.EncoderState.batch_view`)."""
        spec = self.spec.batch_view(start, stop)

        def conv(state: ConvState) -> ConvState:
            return state.batch_view(start, stop)

        def residual(state: ResidualState) -> ResidualState:
            return ResidualState(conv(state.conv1), conv(state.conv2))

        def up(state: TimeUpState | None) -> TimeUpState | None:
            if state is None:
                return None
            view = TimeUpState(FrameWindow(state.window.frames[start:stop]))
            view.conv = state.conv.batch_view(start, stop)
            view.started = state.started
            return view

        blocks = [UpState([residual(r) for r in b.resnets], up(b.up)) for b in self.blocks]
        mid = [residual(m) for m in self.mid]
        return DecoderState(
            spec, self.height, self.width, conv(self.conv_in), mid, blocks, conv(self.conv_out)
        )

    @property
    def nbytes(self) -> int:
        return sum(conv.nbytes for conv in self._convs)


class WanDecoder(nn.Module):
    """A Wan VAE decoder (``post_quant_conv`` plus the decoder trunk): latents to RGB frames.

    Parameter names follow diffusers' ``AutoencoderKLWan`` (``post_quant_conv``, and after the
    ``decoder.`` prefix, which is dropped: ``conv_in``, ``mid_block``, ``up_blocks.N``,
    ``norm_out``, ``conv_out``); :mod:`streamvae.weights` maps Wan's original names onto them.
    The widths are ``config.decoder_dims`` (Wan 2.2's decoder is wider than its encoder).
    """

    def __init__(self, config: WanConfig = WAN21) -> None:
        super().__init__()
        self.config = config
        dims = config.decoder_dims
        z = config.z_dim
        self.post_quant_conv = nn.Conv3d(z, z, 1)
        self.conv_in = CausalConv3d(z, dims[0])
        self.mid_block = MidBlock(dims[0])
        ups = tuple(reversed(config.temporal_downsample))
        last = len(config.dim_mult) - 1
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            spatial = i != last
            if i > 0 and not config.residual:
                in_dim //= 2  # Wan 2.1's upsamples halve the channels
            blocks.append(
                UpBlock(
                    in_dim,
                    out_dim,
                    config.num_res_blocks,
                    spatial=spatial,
                    temporal=spatial and ups[i],
                    residual=config.residual,
                )
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], config.conv_in_channels)
        self._latent_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def _blocks(self) -> Sequence[UpBlock]:
        return cast("Sequence[UpBlock]", self.up_blocks)

    # -- state ----

    def new_state(
        self,
        height: int,
        width: int,
        *,
        batch: int = 1,
        capacity: int = 1,
        memory_format: torch.memory_format | None = None,
    ) -> DecoderState:
        """Allocate the state for ``batch`` streams of ``height x width`` latents.

        ``capacity`` is the most frames one layer steps at once: 1 steps every layer frame by
        frame (each output frame emitted as soon as it is complete), ``temporal_stride`` steps
        a latent's frames together at every level.
        """
        if memory_format is None:
            memory_format = default_memory_format(self.device, self.dtype)
        spec = StateSpec(batch, capacity, self.dtype, self.device, memory_format)
        h, w = height, width
        conv_in = self.conv_in.new_state(spec, h, w)
        mid = self.mid_block.new_state(spec, h, w)
        blocks = []
        for block in self._blocks:
            blocks.append(block.new_state(spec, h, w))
            if block.up is not None:
                h, w = 2 * h, 2 * w
        conv_out = self.conv_out.new_state(spec, h, w)
        return DecoderState(spec, height, width, conv_in, mid, blocks, conv_out)

    # -- stepping ----

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`WanEncoder.normalize`: ``z * std + mean`` per channel, float32."""
        stats = self._latent_stats.get(latents.device)
        if stats is None:
            mean = torch.tensor(self.config.latents_mean, dtype=torch.float32)
            std = torch.tensor(self.config.latents_std, dtype=torch.float32)
            stats = self._latent_stats[latents.device] = (
                mean.to(latents.device),
                std.to(latents.device),
            )
        shape = (1, -1, 1, 1, 1) if latents.dim() == 5 else (-1, 1, 1)
        return latents.float() * stats[1].view(shape) + stats[0].view(shape)

    @torch.inference_mode()
    def step(self, latents: torch.Tensor, state: DecoderState) -> Iterator[torch.Tensor]:
        """Advance ``state`` by ``latents`` (``[B, z_dim, n, h, w]``, raw: not normalised).

        Yields the output frames in order as they become complete, ``[B, 3, k, H, W]`` in the
        model's dtype, not clamped (``k`` is 1 with a state of capacity 1). Latent 0 of a
        stream gives one frame, every later latent ``config.temporal_stride``.
        """
        for latent in latents.split(1, dim=2):
            x = F.conv3d(
                latent.to(self.dtype), self.post_quant_conv.weight, self.post_quant_conv.bias
            )
            state.conv_in.slots(1).copy_(x)
            h = self.conv_in.step(state.conv_in, 1)
            h = self.mid_block.step(h, state.mid)
            yield from self._walk(0, h, state)

    def _walk(self, index: int, x: torch.Tensor, state: DecoderState) -> Iterator[torch.Tensor]:
        """Depth first from up block ``index``: each chunk goes all the way to the output."""
        blocks = self._blocks
        for chunk in x.split(state.spec.capacity, dim=2):
            if index == len(blocks):
                yield self._head(chunk, state)
            else:
                out = blocks[index].step(chunk, state.blocks[index])
                yield from self._walk(index + 1, out, state)

    def _head(self, x: torch.Tensor, state: DecoderState) -> torch.Tensor:
        count = x.shape[2]
        self.norm_out.silu_into(x, state.conv_out.slots(count))
        out = self.conv_out.step(state.conv_out, count)
        p = self.config.patch_size
        if p == 1:
            return out
        b, _, n, h, w = out.shape
        channels = self.config.in_channels
        # Channel c * p * p + j * p + i holds pixel (p * y + i, p * x + j) (Wan's unpatchify).
        pixels = out.reshape(b, channels, p, p, n, h, w).permute(0, 1, 4, 5, 3, 6, 2)
        return pixels.reshape(b, channels, n, h * p, w * p)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
        """Decode whole clips: ``[B, z, T, h, w]`` latents -> ``[B, 3, 1 + 4 (T - 1), h s, w s]``.

        float32 frames clamped to [-1, 1], as Wan's ``Wan2_1_VAE.decode``. ``latents`` are
        normalised (as :meth:`WanEncoder.encode` returns them) unless ``normalized=False``
        (the raw mean, as diffusers' ``decode`` takes). The streaming code path from a fresh
        state, a latent's frames stepped together.
        """
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
            raise ValueError(f"decode expects a [B, z, T, h, w] tensor, got {got}")
        b, z, t, h, w = latents.shape
        if z != self.config.z_dim:
            raise ValueError(f"decode expects {self.config.z_dim} latent channels, got {z}")
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"decode needs T, h, w >= 1, got T={t}, h={h}, w={w}")
        raw = self.denormalize(latents) if normalized else latents.float()
        state = self.new_state(h, w, batch=b, capacity=self.config.temporal_stride)
        frames = list(self.step(raw.to(self.device), state))
        return torch.cat(frames, dim=2).float().clamp_(-1.0, 1.0)
