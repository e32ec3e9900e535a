"""CPU kernels of the stepping layers: oneDNN convolutions with prepacked weights, fused norms.

On the CPU, PyTorch's ``F.conv3d`` reorders the weights into oneDNN's blocked layout on every
call, and picks its im2col fallback (``slow_conv3d``) for small-channel or small-frame shapes,
such as the one-frame steps of a stream. :class:`PackedConv` calls oneDNN directly on
channels-last input with the weights reordered once per (weights, input shape) and cached.
Elsewhere (CUDA, float16, contiguous layout, no oneDNN) it is ``F.conv3d`` / ``F.conv2d``.

Both paths compute the same convolution; they differ only in the order of the float sums
(about 1e-7 relative in float32).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import streamvae.model.triton_kernels as triton_kernels

__all__ = [
    "PackedConv",
    "SlowPathWarning",
    "add_rms_silu_into",
    "cpu_slow_path_reason",
    "onednn_available",
    "onednn_bf16_available",
    "rms_silu_into",
]

_TINY = torch.finfo(torch.float32).tiny
# Where rms_silu_into uses the fused norm by default (see its docstring for why not the CPU).
FUSED_NORM_DEVICES = frozenset({"cuda"})

_PACKABLE = (torch.float32, torch.bfloat16)
_PACK_LOCK = threading.Lock()
_CACHE_ENTRIES = 4  # input shapes per layer: frame steps, group steps, first frames...


def onednn_available() -> bool:
    """Whether this PyTorch has the oneDNN ops :class:`PackedConv` uses."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch._C._nn, "mkldnn_reorder_conv3d_weight")
    )


_ONEDNN = onednn_available()


def onednn_bf16_available() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU (it needs AVX-512 BF16 or AMX, or
    at least AVX-512: on an AVX2-only CPU it raises "bf16 path needs avx512")."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return _ONEDNN and check is not None and bool(check())


_ONEDNN_BF16 = onednn_bf16_available()


class SlowPathWarning(RuntimeWarning):
    """A state was allocated that the CPU's fast (oneDNN) convolutions cannot run on."""


def cpu_slow_path_reason(
    device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format
) -> str | None:
    """Why a CPU state of this dtype and layout cannot run the oneDNN convolutions, or ``None``.

    ``None`` also off the CPU (CUDA convs go to cuDNN whatever the layout).

    >>> cpu_slow_path_reason(torch.device("cpu"), torch.float32, torch.channels_last_3d) is None
    True
    >>> cpu_slow_path_reason(torch.device("cpu"), torch.float16, torch.channels_last_3d).split(":")[0]
    'float16 on the CPU'
    """
    if device.type != "cpu":
        return None
    if not _ONEDNN:
        return (
            f"this PyTorch build ({torch.__version__}) has no oneDNN convolution ops: the CPU "
            "runs PyTorch's reference convolutions (im2col, several times slower)"
        )
    if dtype == torch.bfloat16 and not _ONEDNN_BF16:
        return (
            "bfloat16 on a CPU without AVX-512: oneDNN has no bfloat16 convolutions here, so "
            "PyTorch's reference convolutions (im2col, several times slower) run; float32 is "
            "faster on this CPU"
        )
    if dtype not in _PACKABLE:
        return (
            f"{str(dtype).removeprefix('torch.')} on the CPU: oneDNN convolutions run in float32 "
            "and bfloat16 only, so PyTorch's reference convolutions (im2col, several times "
            "slower) run; cast the encoder to torch.float32 or torch.bfloat16"
        )
    if memory_format != torch.channels_last_3d:
        return (
            f"a {str(memory_format).removeprefix('torch.')} state on the CPU: oneDNN convolutions "
            "need channels-last activations, so PyTorch's convolutions (im2col for small "
            "steps) run; leave memory_format=None (channels-last on the CPU)"
        )
    return None


class PackedConv:
    """A convolution's weights kept in oneDNN's layout, per input shape (CPU, channels-last).

    One instance per conv layer. The cache is keyed on the weight tensor's identity, version and
    dtype, so that loading new weights or casting the module repacks them.
    """

    def __init__(
        self, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int] | None = None
    ) -> None:
        self.stride = list(stride)
        self.padding = list(padding)
        self.dilation = list(dilation) if dilation is not None else [1] * len(self.stride)
        self._packed: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self._weights: tuple[object, ...] | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> PackedConv:
        return PackedConv(self.stride, self.padding, self.dilation)  # packs are rebuilt lazily

    def __getstate__(self) -> dict[str, object]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["stride"], state["padding"], state["dilation"])  # type: ignore[misc]

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this call can run on oneDNN: CPU, float32/bfloat16, channels-last input.

        Parameters that require grad (any new ``nn.Module``'s, e.g. ``WanEncoder(config)``
        built directly) do not stop it where no graph is recorded (under ``inference_mode`` or
        ``no_grad``, as every step runs): the oneDNN op has no backward, so only a call that
        autograd would record must take ``F.conv3d``.
        """
        if not _ONEDNN or x.device.type != "cpu" or x.dtype not in _PACKABLE:
            return False
        if x.dtype == torch.bfloat16 and not _ONEDNN_BF16:
            return False
        if weight.dtype != x.dtype:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return False
        layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        return x.is_contiguous(memory_format=layout)

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        keep_packed: bool = True,
        source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The convolution; ``keep_packed=False`` for rare calls (oneDNN reorders the weights
        for this call only, and no packed copy is kept in memory). ``source``: the parameter
        that ``weight`` was derived from (e.g. with its taps rotated), when it is not ``weight``
        itself; the packs of all weights derived from one source are kept together."""
        if not self.applies(x, weight):
            conv = F.conv3d if x.dim() == 5 else F.conv2d
            return conv(x, weight, bias, self.stride, self.padding, self.dilation)
        if not keep_packed:
            out: torch.Tensor = torch.ops.aten.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, 1
            )
            return out
        packed = self._pack(weight, tuple(x.shape), weight if source is None else source)
        out = torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, self.padding, self.stride, self.dilation, 1, "none", [], ""
        )
        return out

    def _pack(
        self, weight: torch.Tensor, input_shape: tuple[int, ...], source: torch.Tensor
    ) -> torch.Tensor:
        # Streams in several threads may share this layer: the cache changes under a lock.
        with _PACK_LOCK:
            storage = source.untyped_storage()
            weights = (storage.data_ptr(), source._version, source.dtype)
            if weights != self._weights:  # new weights (loaded, cast, moved): drop old packs
                self._packed.clear()
                self._weights = weights
            key = (weight.data_ptr(), tuple(weight.shape), input_shape)
            packed = self._packed.get(key)
            if packed is not None:
                self._packed.move_to_end(key)
                return packed
            with torch.inference_mode():
                packed = _reorder(weight.detach().contiguous(), self, list(input_shape))
            self._packed[key] = packed
            while len(self._packed) > _CACHE_ENTRIES:
                self._packed.popitem(last=False)
            return packed

    def clear(self) -> None:
        self._packed.clear()


def _reorder(weight: torch.Tensor, conv: PackedConv, input_shape: list[int]) -> torch.Tensor:
    """``weight`` in oneDNN's layout for ``conv`` on inputs of ``input_shape``."""
    if hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"):
        # From the dense weight directly: no intermediate oneDNN copy (which, freed, would
        # leave the heap fragmented by as much as the packed weights themselves).
        packed: torch.Tensor = torch.ops.mkldnn._reorder_convolution_weight(
            weight, conv.padding, conv.stride, conv.dilation, 1, input_shape
        )
        return packed
    reorder = (
        torch._C._nn.mkldnn_reorder_conv3d_weight
        if weight.dim() == 5
        else torch._C._nn.mkldnn_reorder_conv2d_weight
    )
    # torch's _C/_nn.pyi omits these ops' last parameter (input_size), which they take.
    return reorder(weight.to_mkldnn(), conv.padding, conv.stride, conv.dilation, 1, input_shape)  # type: ignore[call-arg]


def rms_silu_into(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """``silu(x / max(||x||_2 over channels, 1e-12) * scale * gamma)`` written into ``out``.

    Two implementations of the same function:

    - **fused** (default on CUDA for channels-last activations): PyTorch's fused RMS-norm
      kernel over the channels, which are the innermost dimension in that layout, then SiLU
      written straight into ``out``: 4 passes over the activations' bytes (read, write, read,
      write). It computes ``x / sqrt(mean(x^2) + eps) * gamma`` in float32, which equals the
      above when ``scale == sqrt(C)`` (as in the encoder) for any channel vector whose norm is
      above about 1e-18 (``eps`` is float32's smallest normal number; a zero vector gives zero
      in both). Below that they differ, as ``max(norm, 1e-12)`` would; activations of the
      encoder never come near.
    - **eager** (elsewhere): the channel norm, one multiply by ``scale / norm``, then ``gamma``
      and SiLU in place. Half-precision input is normalised in float32 without a float32 copy
      of it: the norm accumulates in float32 and the multiply promotes. On the CPU this
      measured faster than the fused kernel (which PyTorch's CPU build runs unfused); on CUDA
      it makes about 13 passes over the activations' bytes in half precision.

    - **triton** (``fused=None`` where :func:`streamvae.model.triton_kernels.applies`: CUDA
      with Triton, channels innermost): one pass, read and write (see that module).

    ``fused=None`` picks by device (:data:`FUSED_NORM_DEVICES`) and layout; ``True`` takes the
    fused path wherever it applies (tests run it on the CPU); ``False`` the eager one.
    """
    if fused is None and triton_kernels.applies(x, out):
        return triton_kernels.add_rms_silu_into(x, gamma, scale, out)
    if fused is None:
        fused = x.device.type in FUSED_NORM_DEVICES
    if fused and _fused_norm_applies(x, scale, out):
        channels = x.shape[1]
        normed = F.rms_norm(_channels_innermost(x), (channels,), gamma.reshape(channels), _TINY)
        torch.ops.aten.silu.out(normed, out=_channels_innermost(out))
        return out
    low = x.dtype in (torch.float16, torch.bfloat16)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32 if low else None)
    inv = torch.reciprocal(norm.clamp_min_(1e-12)).mul_(scale)
    if not low and out.dtype == x.dtype:
        torch.mul(x, inv, out=out)
        out.mul_(gamma)
        return F.silu(out, inplace=True)
    normed = torch.mul(x, inv)  # float32
    normed.mul_(gamma)
    out.copy_(normed)
    return F.silu(out, inplace=True)


def add_rms_silu_into(
    x: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """``x += residual`` (in place, as ``x.add_(residual)``), then :func:`rms_silu_into` of it
    into ``out``: one pass with the Triton kernel where it applies, else the two ops."""
    if triton_kernels.applies(x, out, residual):
        triton_kernels.add_rms_silu_into(x, gamma, scale, out, residual=residual, sum_out=x)
        return x
    x.add_(residual)
    rms_silu_into(x, gamma, scale, out)
    return x


def _channels_innermost(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, *rest]`` as ``[B, *rest, C]`` (a view; dense when ``x`` is channels-last)."""
    return x.movedim(1, -1)


def _fused_norm_applies(x: torch.Tensor, scale: float, out: torch.Tensor) -> bool:
    """Whether the fused norm computes exactly this norm on these tensors without copies."""
    if not hasattr(F, "rms_norm") or x.dim() < 3 or x.requires_grad:
        return False
    if (
        x.dtype != out.dtype
        or x.shape != out.shape
        or abs(scale - x.shape[1] ** 0.5) > 1e-6 * scale
    ):
        return False
    # Channels innermost and dense in both: the norm reads rows of C, SiLU writes rows of C.
    return x.stride(1) == 1 and out.stride(1) == 1 and _channels_innermost(x).is_contiguous()
