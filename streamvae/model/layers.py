"""The Wan encoders' building blocks, each with a ``step`` over the frames new since its last call.

Tensors are ``[B, C, T, H, W]``. Layers without memory (norms, SiLU, attention, 1x1 convs, the
spatial downsample, Wan 2.2's patchify and spatial average pooling) act per frame. The causal
ones (3x3x3 convs, the temporal downsample, Wan 2.2's average-pool shortcut across time) keep
what they must remember in a state object owned by the stream (see :mod:`streamvae.model.state`),
so one set of weights serves any number of streams.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from streamvae.model.kernels import PackedConv, add_rms_silu_into, rms_silu_into
from streamvae.model.state import ConvState, FrameWindow, PairState, TimeDownState

__all__ = [
    "Attention",
    "AvgShortcut",
    "CausalConv3d",
    "Downsample",
    "MidBlock",
    "Patchify",
    "RMSNorm",
    "ResidualBlock",
    "ResidualStage",
    "ResidualState",
    "StageState",
    "StateSpec",
    "step_resnets",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Guards the causal convs' caches of rotated weights (see CausalConv3d.rotated_weight).
_ROTATION_LOCK = threading.Lock()


class StateSpec:
    """What a stream's states are allocated with: batch, window capacity, dtype, device, layout."""

    def __init__(
        self,
        batch: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
        *,
        ring: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 frame per step, got {capacity}")
        if ring and capacity != 1:
            raise ValueError(f"ring windows take one frame per step, got capacity {capacity}")
        self.batch = batch
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.memory_format = memory_format
        self.ring = ring

    def batch_view(self, start: int, stop: int) -> StateSpec:
        """The spec of streams ``start:stop`` of a state of this spec (``ValueError`` outside)."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"batch view {start}:{stop} outside a state of {self.batch}")
        return StateSpec(
            stop - start, self.capacity, self.dtype, self.device, self.memory_format, ring=self.ring
        )

    def window(self, channels: int, keep: int, height: int, width: int) -> FrameWindow:
        return FrameWindow.allocate(
            self.batch,
            channels,
            keep,
            self.capacity,
            height,
            width,
            dtype=self.dtype,
            device=self.device,
            memory_format=self.memory_format,
        )


class RMSNorm(nn.Module):
    """``x / max(||x||_2 over C, 1e-12) * sqrt(C) * gamma``; in float32 for half-precision input."""

    def __init__(self, dim: int, *, images: bool = False) -> None:
        super().__init__()
        self.scale: float = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _LOW_PRECISION:
            return F.normalize(x.float(), dim=1)
        return F.normalize(x, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._normalized(x) * self.scale * self.gamma).to(x.dtype)

    def silu_into(
        self, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``silu(norm(x))`` written into ``out`` (a slot of a conv's frame window); with
        ``residual``, ``x += residual`` first (in place, in the same pass where the Triton
        kernel runs)."""
        if residual is not None:
            add_rms_silu_into(x, residual, self.gamma, self.scale, out)
            return out
        return rms_silu_into(x, self.gamma, self.scale, out)


class CausalConv3d(nn.Conv3d):
    """A 3D conv causal in time: ``2 * (k // 2)`` frames of memory in front, symmetric spatial padding.

    ``step`` reads the state's window ``[last two input frames, new frames]``; the caller has
    written the new frames into ``state.slots(n)``. The two frames before a stream's first frame
    are zeros; a one-frame step skips the kernel's time taps that would read them (they add
    exactly zero), so a stream's first two frames cost one and two thirds of a frame.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        pad = kernel_size // 2
        super().__init__(in_channels, out_channels, kernel_size, padding=(0, pad, pad))
        if kernel_size != 3:
            raise ValueError("the Wan encoder's causal convs are 3x3x3")
        self.kernel = PackedConv(stride=(1, 1, 1), padding=(0, pad, pad))
        self._rotated: dict[tuple[object, ...], tuple[torch.Tensor, int]] = {}
        self._rotated_of: tuple[object, ...] | None = None

    def new_state(self, spec: StateSpec, height: int, width: int) -> ConvState:
        window = spec.window(self.in_channels, ConvState.KEEP, height, width)
        return ConvState(window, ring=spec.ring)

    def step(self, state: ConvState, count: int) -> torch.Tensor:
        if state.ring:
            # Frames in ring order; zeros where a stream's first frames have no history yet
            # (they add exactly zero, so no first-frame special case).
            window = state.window.frames
            rotated = self.rotated_weight(state.taps(), window)
            out = self.kernel(window, rotated, self.bias, source=self.weight)
            state.advance(count)
            return out
        keep = ConvState.KEEP
        history = state.history
        if count == 1 and history < keep:
            first = keep - history  # the window's first real frame
            window = state.window.slots(first, history + 1)
            # Once per stream: no packed copy of the sliced weights is kept.
            out = self.kernel(window, self.weight[:, :, first:], self.bias, keep_packed=False)
        else:
            out = self.kernel(state.window.slots(0, keep + count), self.weight, self.bias)
        state.advance(count)
        return out

    def rotated_weight(self, taps: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The weight with time tap ``taps[i]`` at position ``i``, in ``like``'s layout.

        One tensor per rotation and layout, shared by all streams and kept at a fixed address
        (CUDA graphs read it): rebuilt when the weight is replaced, moved or cast, refilled in
        place when it is changed in place.
        """
        weight = self.weight
        layout = (
            torch.channels_last_3d
            if like.is_contiguous(memory_format=torch.channels_last_3d) and not like.is_contiguous()
            else torch.contiguous_format
        )
        identity = (weight.data_ptr(), weight.dtype, weight.device)
        key = (taps, layout)
        entry = self._rotated.get(key)
        if identity == self._rotated_of and entry is not None and entry[1] == weight._version:
            return entry[0]
        # Streams in other threads may share this layer: one thread builds, the others wait
        # and use its tensor (a replaced tensor could still be read by a captured CUDA graph).
        with _ROTATION_LOCK:
            if identity != self._rotated_of:
                self._rotated.clear()
                self._rotated_of = identity
            entry = self._rotated.get(key)
            version = weight._version
            if entry is None or entry[1] != version:
                # A normal tensor even in an inference-mode step: PackedConv keys on versions.
                with torch.inference_mode(False), torch.no_grad():
                    rotated = weight.detach()[:, :, list(taps)]
                    if entry is None:
                        entry = (rotated.contiguous(memory_format=layout), version)
                    else:
                        entry[0].copy_(rotated)
                        entry = (entry[0], version)
                self._rotated[key] = entry
            return entry[0]


class ResidualState:
    """The two causal convs' states of a residual block."""

    def __init__(self, conv1: ConvState, conv2: ConvState) -> None:
        self.conv1 = conv1
        self.conv2 = conv2

    def reset(self) -> None:
        self.conv1.reset()
        self.conv2.reset()

    @property
    def nbytes(self) -> int:
        return self.conv1.nbytes + self.conv2.nbytes


class ResidualBlock(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, causal conv; plus a 1x1x1 shortcut when widths differ."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim)
        self.conv_shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else None
        self.shortcut_kernel = PackedConv(stride=(1, 1, 1), padding=(0, 0, 0))

    halves_space = False

    def new_state(self, spec: StateSpec, height: int, width: int) -> ResidualState:
        return ResidualState(
            self.conv1.new_state(spec, height, width), self.conv2.new_state(spec, height, width)
        )

    def step(self, x: torch.Tensor, state: ResidualState) -> torch.Tensor:
        h, shortcut = self.step_unsummed(x, state)
        return h.add_(shortcut)

    def step_unsummed(
        self, x: torch.Tensor, state: ResidualState, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's main path and shortcut, not yet added (``step`` adds them), so that a
        next block adds them in its first norm's pass (``residual``: the previous block's
        shortcut, added to ``x`` in place first, as ``step`` would have)."""
        count = x.shape[2]
        self.norm1.silu_into(x, state.conv1.slots(count), residual)
        shortcut = (
            x
            if self.conv_shortcut is None
            else self.shortcut_kernel(x, self.conv_shortcut.weight, self.conv_shortcut.bias)
        )
        h = self.conv1.step(state.conv1, count)
        self.norm2.silu_into(h, state.conv2.slots(count))
        h = self.conv2.step(state.conv2, count)
        return h, shortcut


def step_resnets(
    blocks: Sequence[ResidualBlock], x: torch.Tensor, states: Sequence[ResidualState]
) -> torch.Tensor:
    """Consecutive residual blocks: each block's residual add done in the next one's norm pass
    (the same ops in the same order as ``step`` after ``step``; one pass with Triton)."""
    residual = None
    for block, state in zip(blocks, states):
        x, residual = block.step_unsummed(x, state, residual)
    return x if residual is None else x.add_(residual)


class Downsample(nn.Module):
    """Spatial /2 per frame (pad right and bottom by one, 3x3 conv stride 2); optionally time /2.

    The time conv (kernel (3, 1, 1), stride 2) passes the very first frame through and then emits
    one frame per two new ones: ``u[0] = s[0]``, ``u[j] = time_conv(s[2j-2], s[2j-1], s[2j])``.
    """

    def __init__(self, dim: int, *, temporal: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.kernel = PackedConv(stride=(2, 2), padding=(0, 0))
        self.time_kernel = PackedConv(stride=(2, 1, 1), padding=(0, 0, 0))

    halves_space = True

    def new_state(self, spec: StateSpec, height: int, width: int) -> TimeDownState | None:
        if self.time_conv is None:
            return None
        channels = self.conv.out_channels
        return TimeDownState(spec.window(channels, 2, height // 2, width // 2))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Per frame: pad right and bottom by one zero, 3x3 conv with stride 2.

        The padded frames keep the input's layout (channels-last stays channels-last), so that
        the conv runs on the fast path; ``F.pad`` would return them contiguous.
        """
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last_3d) and c > 1:
            padded = torch.empty(
                (b * t, c, h + 1, w + 1),
                dtype=x.dtype,
                device=x.device,
                memory_format=torch.channels_last,
            )
            padded[:, :, h].zero_()
            padded[:, :, :h, w].zero_()
            padded[:, :, :h, :w].copy_(frames)
        else:
            padded = F.pad(frames, (0, 1, 0, 1))
        frames = self.kernel(padded, self.conv.weight, self.conv.bias)
        return frames.reshape(b, t, c, h // 2, w // 2).transpose(1, 2)

    def step(self, x: torch.Tensor, state: TimeDownState | None) -> torch.Tensor | None:
        """The output frames this step can produce, or ``None`` when it can produce none yet."""
        s = self.spatial(x)
        if self.time_conv is None:
            return s
        assert state is not None
        window = state.window
        count = s.shape[2]
        window.slots(state.held, count).copy_(s)
        available = state.held + count
        first = None
        if not state.started:
            first = window.slots(0, 1).clone()
            state.started = True
        pairs = (available - 1) // 2
        out = None
        if pairs:
            out = self.time_kernel(
                window.slots(0, 1 + 2 * pairs), self.time_conv.weight, self.time_conv.bias
            )
        keep = available - 2 * pairs
        window.shift_to_front(2 * pairs, keep)
        state.held = keep
        if first is None:
            return out
        return first if out is None else torch.cat([first, out], dim=2)


class Patchify(nn.Module):
    """Wan 2.2's pixel patchify: ``[B, C, n, H, W] -> [B, C * p * p, n, H/p, W/p]``, per frame.

    Output channel ``c * p * p + j * p + i`` holds pixel ``(p * y + i, p * x + j)`` of input
    channel ``c`` (the width offset ``j`` before the height offset ``i``, as in Wan's
    ``rearrange(x, "b c f (h q) (w r) -> b (c r q) f h w")``).
    """

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def write_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Patchify ``x`` into ``out`` (a slot of ``conv_in``'s window) in one copy."""
        p = self.patch_size
        if p == 1:
            out.copy_(x)
            return
        b, c, n, h, w = x.shape
        patches = x.reshape(b, c, n, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
        out.unflatten(1, (c, p, p)).copy_(patches)


class AvgShortcut(nn.Module):
    """Wan 2.2's parameter-free stage shortcut (``AvgDown3D``): space-to-depth, then group means.

    Each output frame is made from ``frames`` consecutive input frames and ``pixels x pixels``
    blocks: the input's channels are spread over (channel, frame offset, row offset, column
    offset), in that order, and every ``in_dim * frames * pixels**2 / out_dim`` consecutive of
    those are averaged into one output channel. With ``frames == 2`` it pairs the stream's
    frames ``(0, s0), (s1, s2), ...`` and keeps the unpaired one in a :class:`PairState`.
    """

    def __init__(self, in_dim: int, out_dim: int, *, frames: int, pixels: int) -> None:
        super().__init__()
        if frames not in (1, 2):
            raise ValueError(f"the shortcut averages 1 or 2 frames, got {frames}")
        factor = frames * pixels * pixels
        if in_dim * factor % out_dim:
            raise ValueError(
                f"in_dim * {factor} must be divisible by out_dim ({in_dim}, {out_dim})"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.frames = frames
        self.pixels = pixels
        self.group = in_dim * factor // out_dim

    @property
    def identity(self) -> bool:
        return self.frames == 1 and self.pixels == 1 and self.in_dim == self.out_dim

    def new_state(self, spec: StateSpec, height: int, width: int) -> PairState | None:
        if self.frames == 1:
            return None
        return PairState(spec.window(self.in_dim, 1, height, width))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut of complete frame groups ``x`` (``[B, in_dim, frames * k, H, W]``)."""
        if self.identity:
            return x
        b, c, t, h, w = x.shape
        ft, fs = self.frames, self.pixels
        spread = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(
            0, 1, 3, 5, 7, 2, 4, 6
        )
        grouped = spread.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return grouped.mean(dim=2)

    def step(self, x: torch.Tensor, state: PairState | None) -> torch.Tensor | None:
        """The shortcut frames this step completes, or ``None`` when it completes none."""
        if state is None:
            return self.pool(x)
        count = x.shape[2]
        window = state.window
        window.slots(state.held, count).copy_(x)
        available = state.held + count
        pairs = available // 2
        out = self.pool(window.slots(0, 2 * pairs)) if pairs else None
        keep = available - 2 * pairs
        window.shift_to_front(2 * pairs, keep)
        state.held = keep
        return out


def _blocks(modules: nn.ModuleList) -> Sequence[ResidualBlock]:
    """``modules`` as what it holds (``nn.ModuleList`` is typed as holding any ``nn.Module``)."""
    return cast("Sequence[ResidualBlock]", modules)


class StageState:
    """The states of one Wan 2.2 stage: its residual blocks', its downsample's, its shortcut's."""

    def __init__(
        self,
        resnets: list[ResidualState],
        down: TimeDownState | None,
        shortcut: PairState | None,
    ) -> None:
        self.resnets = resnets
        self.down = down
        self.shortcut = shortcut

    def parts(self) -> list[ResidualState | TimeDownState | PairState]:
        """The leaf states, in the order the stage steps them."""
        parts: list[ResidualState | TimeDownState | PairState] = list(self.resnets)
        parts += [s for s in (self.down, self.shortcut) if s is not None]
        return parts

    def reset(self) -> None:
        for part in self.parts():
            part.reset()

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts())


class ResidualStage(nn.Module):
    """A Wan 2.2 stage: residual blocks, an optional downsample, plus the average-pool shortcut
    of the stage's input (names as in diffusers' ``WanResidualDownBlock``)."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, *, spatial: bool, temporal: bool
    ) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.downsampler = Downsample(out_dim, temporal=temporal) if spatial else None
        self.avg_shortcut = AvgShortcut(
            in_dim, out_dim, frames=2 if temporal else 1, pixels=2 if spatial else 1
        )

    @property
    def halves_space(self) -> bool:
        return self.downsampler is not None

    def new_state(self, spec: StateSpec, height: int, width: int) -> StageState:
        resnets = [resnet.new_state(spec, height, width) for resnet in _blocks(self.resnets)]
        down = None if self.downsampler is None else self.downsampler.new_state(spec, height, width)
        return StageState(resnets, down, self.avg_shortcut.new_state(spec, height, width))

    def step(self, x: torch.Tensor, state: StageState) -> torch.Tensor | None:
        # Before the blocks: the pair state copies x, or the pooled result is a new tensor.
        shortcut = self.avg_shortcut.step(x, state.shortcut)
        h = step_resnets(_blocks(self.resnets), x, state.resnets)
        out: torch.Tensor | None = h
        if self.downsampler is not None:
            out = self.downsampler.step(h, state.down)
        if out is None or shortcut is None:
            assert out is None and shortcut is None, "main path and shortcut out of step"
            return None
        return out.add_(shortcut)


class Attention(nn.Module):
    """Single-head self-attention over the ``h * w`` positions of each frame, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)
        # q, k, v each dense [B*T, 1, H*W, C] with canonical strides (channels innermost: the
        # fused kernels need unit stride along the head dimension). Not views of one tensor:
        # their row stride is 3C, and where H*W or B*T is 1 PyTorch calls such a view
        # contiguous whatever its strides along length-1 axes (a 1x1 frame gives stride 1
        # along the sequence), so `.contiguous()` keeps it and CUDA's memory-efficient kernel
        # finds none to launch ("cutlassF: no kernel found to launch!", float32, 1x1 frames).
        # `clone(memory_format=contiguous_format)` always allocates canonical strides.
        q, k, v = (
            part.unsqueeze(1).clone(memory_format=torch.contiguous_format)
            for part in qkv.chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
        attended = attended.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out: torch.Tensor = self.proj(attended).reshape(b, t, c, h, w).transpose(1, 2)
        return x + out


class MidBlock(nn.Module):
    """Residual block, attention, residual block (names as in diffusers' ``WanMidBlock``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([Attention(dim)])

    def new_state(self, spec: StateSpec, height: int, width: int) -> list[ResidualState]:
        return [resnet.new_state(spec, height, width) for resnet in _blocks(self.resnets)]

    def step(self, x: torch.Tensor, states: list[ResidualState]) -> torch.Tensor:
        first, second = _blocks(self.resnets)
        x = first.step(x, states[0])
        x = self.attentions[0](x)
        return second.step(x, states[1])
