"""The Triton kernel (residual add + RMS norm + SiLU, one pass; CUDA's path) run on the CPU
under Triton's interpreter, against the eager path it replaces.

float32: equal within float32 rounding. The kernel keeps ATen's rounding points (the sum
rounded to the activations' dtype before the norm, ``(1 / norm) * sqrt(C)``, the normalised
value rounded to the output's dtype before SiLU); what differs is the order of the float32 sum
of squares (a tree in registers, not ATen's reduction): about 1e-7 relative. bfloat16: within
the eager path's own bfloat16 error (in practice equal: the float32 norms round alike).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (the kernel reads it per call)

import pytest
import torch
import torch.nn.functional as F

from helpers import random_encoder, random_video, rel_err, require, to_model_video
from streamvae import narrow
from streamvae.model import kernels, triton_kernels

require("triton")

CHANNELS_LAST = torch.channels_last_3d


@pytest.fixture
def on_cpu(monkeypatch):
    """The kernels enabled on the CPU (interpreter), self-checks rerun."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_kernels, "TRITON_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(triton_kernels, "_CHECKED", {})


def textbook(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Wan's RMS_norm then SiLU, in float64."""
    c = x.shape[1]
    return F.silu(F.normalize(x.double(), dim=1) * c**0.5 * gamma.double())


@pytest.mark.parametrize("channels", [20, 32])  # 20: a partly masked block of channels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_silu_equals_the_eager_path(on_cpu, channels, dtype):
    generator = torch.Generator().manual_seed(channels)
    shape = (2, channels, 1, 3, 5)
    x = torch.randn(shape, generator=generator)
    x[0, :, 0, 1, 2] = 0.0  # an all-zero channel vector: zero out, not NaN
    residual = torch.randn(shape, generator=generator)
    residual[0, :, 0, 1, 2] = 0.0
    gamma = (1 + 0.1 * torch.randn(channels, 1, 1, 1, generator=generator)).to(dtype)
    x, residual = (t.to(dtype, memory_format=CHANNELS_LAST) for t in (x, residual))
    scale = channels**0.5

    eager_sum = x + residual
    eager = torch.empty_like(x)
    kernels.rms_silu_into(eager_sum, gamma, scale, eager, fused=False)
    # Into a frame slot of a channels-last conv window, the other frames untouched.
    window = torch.full((2, channels, 3, 3, 5), 7.0, dtype=dtype).to(memory_format=CHANNELS_LAST)
    slot = window[:, :, 2:3]
    got_sum = x.clone()
    assert triton_kernels.applies(got_sum, slot, residual)
    kernels.add_rms_silu_into(got_sum, residual, gamma, scale, slot)

    assert torch.equal(got_sum, eager_sum)  # one add, rounded once, either way
    assert (window[:, :, :2] == 7.0).all()
    assert torch.isfinite(slot.float()).all() and (slot[0, :, 0, 1, 2] == 0).all()
    if dtype == torch.float32:
        assert rel_err(slot, eager) <= 1e-6  # the sum of squares' order only
    else:
        expected = textbook(eager_sum, gamma)
        eager_error = rel_err(eager, expected)
        assert rel_err(slot, expected) <= max(eager_error, 2**-8)
        assert rel_err(slot, eager) <= 2**-7  # at most an ulp apart, where they differ
    # Without a residual: the plain norm (rms_silu_into's default path where it applies).
    out = torch.empty_like(x)
    kernels.rms_silu_into(eager_sum, gamma, scale, out)
    assert rel_err(out, eager) <= (1e-6 if dtype == torch.float32 else 2**-7)


def test_layouts_the_kernel_cannot_read_take_the_eager_path(on_cpu):
    x = torch.randn(1, 16, 1, 4, 4)  # contiguous: channels are not innermost
    assert not triton_kernels.applies(x, torch.empty_like(x))
    cl = x.to(memory_format=CHANNELS_LAST)
    assert triton_kernels.applies(cl, torch.empty_like(cl))
    assert not triton_kernels.applies(cl, torch.empty_like(cl), x)  # a contiguous residual
    assert not triton_kernels.applies(cl.double(), torch.empty_like(cl.double()))


def test_a_failed_self_check_leaves_the_eager_path(on_cpu, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(triton_kernels, "add_rms_silu_into", broken)
    x = torch.randn(1, 16, 1, 4, 4).to(memory_format=CHANNELS_LAST)
    assert not triton_kernels.applies(x, torch.empty_like(x))
    described = triton_kernels.describe(x.device, x.dtype)
    assert described.startswith("eager (self-check raised") and "no kernel image" in described
    out = torch.empty_like(x)
    kernels.rms_silu_into(x, torch.ones(16, 1, 1, 1), 4.0, out)  # still computed, eagerly
    assert rel_err(out, textbook(x, torch.ones(16, 1, 1, 1))) <= 1e-6


def test_the_cpu_runs_the_kernel_only_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernels, "TRITON_DEVICES", frozenset({"cpu"}))
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(1, 16, 1, 4, 4).to(memory_format=CHANNELS_LAST)
    assert not triton_kernels.applies(x, torch.empty_like(x))
    assert "TRITON_INTERPRET" in triton_kernels.describe(x.device, x.dtype)
    monkeypatch.setattr(triton_kernels, "TRITON_DEVICES", frozenset({"cuda"}))
    assert triton_kernels.describe(x.device, x.dtype).startswith("eager (not used on cpu")


def test_encoder_with_the_kernels_equals_the_eager_encoder(on_cpu, monkeypatch):
    """A narrow encoder's first frame with every norm (and the residual adds between blocks)
    in the kernel: the eager encoder's latent within float32 rounding."""
    encoder = random_encoder(narrow(8), seed=3)
    video = to_model_video(random_video(1, 16, 16, seed=4)).contiguous(memory_format=CHANNELS_LAST)
    calls: list[bool] = []
    launch = triton_kernels.add_rms_silu_into

    def counted(*args, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "TRITON_DEVICES", frozenset())
    expected = encoder.encode(video, normalize=False)
    monkeypatch.setattr(triton_kernels, "TRITON_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(triton_kernels, "add_rms_silu_into", counted)
    got = encoder.encode(video, normalize=False)
    assert rel_err(got, expected) <= 1e-5
    # Every residual block's norms, and a residual add in each block that follows another.
    assert sum(1 for fused in calls if not fused) >= 10 and sum(calls) >= 4, calls
