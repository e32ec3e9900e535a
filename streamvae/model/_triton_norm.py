"""The Triton kernel of :mod:`streamvae.model.triton_kernels` (imported only where Triton
imports; not decorated here: the caller compiles it, or wraps it in Triton's interpreter)."""

from __future__ import annotations

from typing import Any

import triton.language as tl

__all__ = ["add_rms_silu"]


def add_rms_silu(
    X: Any,
    R: Any,
    S: Any,
    O: Any,  # noqa: E741
    G: Any,
    B: Any,
    rows: Any,
    C: Any,
    T: Any,
    HW: Any,
    sxb: Any,
    sxt: Any,
    srb: Any,
    srt: Any,
    ssb: Any,
    sst: Any,
    sob: Any,
    sot: Any,
    scale: Any,
    HAS_RES: tl.constexpr,
    STORE_SUM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_SUM: tl.constexpr,
    ROUND_OUT: tl.constexpr,
    S_BF16: tl.constexpr,
    O_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (r < rows)[:, None] & cmask[None, :]
    # Row r is pixel p of frame t of batch item b; channels are innermost and dense.
    b = r // (T * HW)
    t = (r // HW) % T
    p = r % HW
    cols = c[None, :]
    x = tl.load(X + (b * sxb + t * sxt + p * C)[:, None] + cols, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RES:
        res = tl.load(R + (b * srb + t * srt + p * C)[:, None] + cols, mask=mask, other=0.0)
        x = x + res.to(tl.float32)
        if ROUND_SUM:  # the sum as the activations' dtype holds it
            if S_BF16:  # to nearest even by hand: the interpreter's cast truncates
                bits = x.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                x = bits.to(tl.float32, bitcast=True)
            x = x.to(S.dtype.element_ty).to(tl.float32)
        if STORE_SUM:
            tl.store(
                S + (b * ssb + t * sst + p * C)[:, None] + cols,
                x.to(S.dtype.element_ty),
                mask=mask,
            )
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    inv = (1.0 / tl.maximum(norm, 1e-12)) * scale
    gamma = tl.load(G + c, mask=cmask, other=0.0).to(tl.float32)
    y = x * inv[:, None] * gamma[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ROUND_OUT:  # eager rounds the normalised value to the output's dtype before SiLU
        if O_BF16:
            bits = y.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            y = bits.to(tl.float32, bitcast=True)
        y = y.to(O.dtype.element_ty).to(tl.float32)
    y = y / (1.0 + tl.exp(-y))
    if O_BF16:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = bits.to(tl.float32, bitcast=True)
    tl.store(O + (b * sob + t * sot + p * C)[:, None] + cols, y.to(O.dtype.element_ty), mask=mask)
