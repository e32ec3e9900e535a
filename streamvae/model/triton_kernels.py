"""Triton kernels for the memory-bound work of a step: residual add + RMS norm + SiLU, one pass.

Wan's ``RMS_norm`` (``F.normalize`` over the channels, times ``sqrt(C)`` and ``gamma``, plus a
bias where there is one) followed by SiLU reads and writes the activations many times in
eager PyTorch; on CUDA it is a fifth of a frame's kernel time. :func:`add_rms_silu_into` does it
in one pass over channels-last activations (channels innermost, one row of ``C`` values per
pixel), adding the residual first where there is one, and writes the result straight into the
next causal conv's window slot.

Optional: where Triton does not import, or the kernel fails its self-check on a device
(:func:`kernel_path`), the eager path runs. On the CPU the kernel runs only under Triton's
interpreter (``TRITON_INTERPRET=1``), which the tests use; it is slow and never the default.

Rounding points are ATen's: the residual sum is rounded to the activations' dtype before the
norm reads it (as ``h.add_(shortcut)`` does), the normalised value is rounded to the output's
dtype before SiLU (as ``out.copy_(normed)`` then ``F.silu(out, inplace=True)``), the norm's
scale is ``(1 / norm) * sqrt(C)`` as in the eager path. What differs: the order of the
float32 sum of squares (a tree in registers, not ATen's reduction), about 1e-7 relative.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import torch

__all__ = [
    "TRITON_DEVICES",
    "add_rms_silu_into",
    "applies",
    "describe",
    "kernel_path",
    "triton_available",
]

TRITON_DEVICES = frozenset({"cuda"})
"""Where the encoder uses the kernels by default (the tests add ``"cpu"`` under the
interpreter)."""

_LOCK = threading.Lock()
_CHECKED: dict[tuple[str, torch.dtype], str | None] = {}  # (device, dtype) -> failure or None
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton() -> Any:
    """The ``triton`` module, or ``None`` where it does not import."""
    try:
        import triton
        import triton.language
    except Exception:  # ImportError, or a broken install (missing compiler, driver)
        return None
    return triton


def triton_available() -> bool:
    return _triton() is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The kernel, compiled for the GPU or wrapped by Triton's interpreter (CPU tensors)."""
    import streamvae.model._triton_norm as _triton_norm

    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_triton_norm.add_rms_silu)
    return _triton().jit(_triton_norm.add_rms_silu)


def _rows(t: torch.Tensor) -> tuple[int, int] | None:
    """``(batch stride, frame stride)`` of a ``[B, C, T, H, W]`` tensor whose pixels are rows
    of ``C`` dense channels (channels-last, or a frame slot of a channels-last window), else
    ``None``."""
    if t.dim() != 5:
        return None
    _, c, _, h, w = t.shape
    if t.stride(1) != 1 and c > 1:
        return None
    if w > 1 and t.stride(4) != c:
        return None
    if h > 1 and t.stride(3) != w * c:
        return None
    return t.stride(0), t.stride(2)


def applies(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether the kernel can run on these tensors here (device, dtype, layout, Triton)."""
    device = x.device.type
    if device not in TRITON_DEVICES or (device == "cpu" and not _interpreting()):
        return False
    if device not in ("cuda", "cpu") or not triton_available():
        return False
    if x.dtype not in _KERNEL_DTYPES or out.dtype not in _KERNEL_DTYPES or x.requires_grad:
        return False
    if out.shape != x.shape or out.device != x.device:
        return False
    tensors = (x, out) if residual is None else (x, out, residual)
    if residual is not None and (residual.shape != x.shape or residual.device != x.device):
        return False
    if any(_rows(t) is None for t in tensors):
        return False
    return kernel_path(x.device, x.dtype) is None


def kernel_path(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` where the kernel runs on ``device`` in ``dtype`` (it passed its self-check
    there, run once), else why the eager path runs."""
    if device.type not in TRITON_DEVICES:
        return f"not used on {device.type} (eager norms)"
    if not triton_available():
        return "triton does not import (pip install triton)"
    if device.type == "cpu" and not _interpreting():
        return "on the CPU only under TRITON_INTERPRET=1"
    key = (str(device), dtype)
    with _LOCK:
        if key not in _CHECKED:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return "not yet self-checked (first use inside a CUDA graph capture)"
            _CHECKED[key] = _self_check(device, dtype)
        return _CHECKED[key]


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """Which norm path a step runs on ``device`` in ``dtype``, in words (``streamvae bench``)."""
    why = kernel_path(device, dtype)
    if why is None:
        return "triton (residual add + RMS norm + SiLU in one pass, channels-last)"
    return f"eager ({why})"


def _self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the kernel on a small input and compare with the eager chain; the failure or None."""
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 24, 2, 3, 5, generator=generator)
        residual = torch.randn(1, 24, 2, 3, 5, generator=generator)
        gamma = 1 + 0.1 * torch.randn(24, 1, 1, 1, generator=generator)
        layout = torch.channels_last_3d
        x, residual = (t.to(device, dtype, memory_format=layout) for t in (x, residual))
        gamma = gamma.to(device, dtype)
        expected_sum = x + residual
        total = expected_sum.float()
        norm = torch.linalg.vector_norm(total, dim=1, keepdim=True).clamp_min(1e-12)
        expected = torch.nn.functional.silu(total / norm * 24**0.5 * gamma.float())
        got_sum, got = x.clone(), torch.empty_like(x)
        add_rms_silu_into(got_sum, gamma, 24**0.5, got, residual=residual, sum_out=got_sum)
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        for name, a, b in (("sum", got_sum, expected_sum), ("norm", got, expected)):
            err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
            if not err <= bound:
                return f"self-check failed on {device} {dtype}: {name} error {err:.2e}"
    except Exception as exc:  # a compiler or driver problem: the eager path runs
        return f"self-check raised on {device} {dtype}: {type(exc).__name__}: {exc}"
    return None


def add_rms_silu_into(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = silu((x [+ residual]) / max(||.||_2 over C, 1e-12) * scale * gamma [+ bias])``;
    with ``residual``, the sum is also written to ``sum_out`` (may be ``x`` itself).

    The caller checks :func:`applies` first; tensors are ``[B, C, T, H, W]`` with channels
    innermost (see :func:`_rows`).
    """
    triton = _triton()
    b, c, t, h, w = x.shape
    rows = b * t * h * w
    if rows == 0:
        return out
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(64, 4096 // block_c))
    sx = _rows(x)
    so = _rows(out)
    assert sx is not None and so is not None, "add_rms_silu_into: channels must be innermost"
    res = residual if residual is not None else x
    sr = _rows(res)
    store = sum_out if sum_out is not None else x
    ss = _rows(store)
    assert sr is not None and ss is not None, "add_rms_silu_into: channels must be innermost"
    low = (torch.float16, torch.bfloat16)
    kernel = _kernel(x.device.type == "cpu")
    grid = (triton.cdiv(rows, block_r),)
    kernel[grid](
        x,
        res,
        store,
        out,
        gamma.contiguous(),
        bias.contiguous() if bias is not None else gamma,
        rows,
        c,
        t,
        h * w,
        *sx,
        *sr,
        *ss,
        *so,
        float(scale),
        HAS_RES=residual is not None,
        STORE_SUM=residual is not None and sum_out is not None,
        HAS_BIAS=bias is not None,
        ROUND_SUM=store.dtype in low,
        ROUND_OUT=out.dtype in low,
        S_BF16=store.dtype == torch.bfloat16,
        O_BF16=out.dtype == torch.bfloat16,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out
