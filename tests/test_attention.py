"""The mid block's attention at every frame size and dtype: what it hands to
``F.scaled_dot_product_attention`` (dense, canonical strides: CUDA's memory-efficient kernel
found no kernel for views of one qkv tensor at 1x1, issue 25 item 3) and what it returns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamvae.model.layers import Attention

SIZES = [(1, 1), (1, 3), (3, 1), (3, 5), (2, 2)]


def canonical_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def textbook(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    """The same block in float64, written out: per frame, softmax(q k^T / sqrt(C)) v."""
    b, c, t, h, w = x.shape
    frames = x.double().transpose(1, 2).reshape(b * t, c, h, w)
    normed = F.normalize(frames, dim=1) * c**0.5 * attention.norm.gamma.double()
    qkv = F.conv2d(normed, attention.to_qkv.weight.double(), attention.to_qkv.bias.double())
    q, k, v = qkv.reshape(b * t, 3, c, h * w).transpose(2, 3).unbind(1)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(b * t, c, h, w)
    out = F.conv2d(attended, attention.proj.weight.double(), attention.proj.bias.double())
    return x.double() + out.reshape(b, t, c, h, w).transpose(1, 2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("frames", [1, 2])
def test_attention_inputs_are_dense_at_every_size(monkeypatch, layout, dtype, bound, frames):
    torch.manual_seed(0)
    attention = Attention(16).eval().requires_grad_(False)
    with torch.no_grad():
        attention.norm.gamma.uniform_(0.5, 1.5)
    attention = attention.to(dtype)
    seen: list[torch.Tensor] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.extend((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for h, w in SIZES:
        seen.clear()
        x = torch.randn(1, 16, frames, h, w).to(dtype, memory_format=layout)
        with torch.inference_mode():
            got = attention(x)
        assert len(seen) == 3
        for part in seen:
            assert part.shape == (frames, 1, h * w, 16)
            assert part.stride() == canonical_strides(part.shape), (h, w, part.stride())
            assert part.data_ptr() % 16 == 0
        expected = textbook(attention, x)
        err = (got.double() - expected).norm() / expected.norm()
        assert err <= bound, (h, w, dtype, float(err))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_attention_on_cuda_at_every_size(monkeypatch, dtype, bound):
    """The kernels that failed: CUDA's fused attention at 1x1 and odd frame sizes."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # true float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(1)
    cpu = Attention(16).eval().requires_grad_(False)
    gpu = Attention(16).eval().requires_grad_(False)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(device="cuda", dtype=dtype)
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        for h, w in SIZES:
            x = torch.randn(1, 16, 2, h, w)
            with torch.inference_mode():
                got = gpu(x.to(device="cuda", dtype=dtype, memory_format=layout)).cpu()
            expected = textbook(cpu, x)
            err = (got.double() - expected).norm() / expected.norm()
            assert err <= bound, (h, w, layout, float(err))
