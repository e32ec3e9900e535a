"""Shared test helpers: random weights with real names, the diffusers oracle, error measures."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from streamvae import WanConfig, WanEncoder
from streamvae.weights import diffusers_config

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared"
MEGAMIND = SHARED / "data" / "Megamind.avi"


def in_ci() -> bool:
    """Whether the tests run in CI (``.ci/run`` and CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(name: str) -> ModuleType:
    """Import a test dependency: where it is missing, skip, except in CI, where that is a
    failure (a broken install must not turn whole files of tests into skips). Use it for test
    dependencies only: a missing GPU stays a skip (the ``cuda`` marker)."""
    if not in_ci():
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(
            f"CI: the test dependency {name!r} does not import ({exc}); scripts/install.sh "
            "installs it",
            pytrace=False,
        )


def wan21_keys() -> list[tuple[str, tuple[int, ...]]]:
    """All 194 tensor names and shapes of the real Wan2.1_VAE.pth (a copy of shared/fixtures)."""
    data = json.loads((FIXTURES / "wan21_vae_keys.json").read_text())
    return [(name, tuple(shape)) for name, shape in data["keys"]]


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values that keep activations O(1) through the network: gammas near 1, small weights."""
    if name.endswith("gamma"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=generator)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
    return torch.randn(shape, generator=generator) * (1.0 / fan_in) ** 0.5


def random_wan_state_dict(seed: int = 0, keys=None) -> dict[str, torch.Tensor]:
    """A random state dict with Wan's real names and shapes (all 194 tensors by default)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, generator) for name, shape in (keys or wan21_keys())}


def random_encoder(config: WanConfig, seed: int = 0, dtype=torch.float32) -> WanEncoder:
    """A streamvae encoder of ``config`` with random, well-scaled weights."""
    encoder = WanEncoder(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), generator))
    return encoder.to(dtype).eval().requires_grad_(False)


def diffusers_reference(config: WanConfig):
    """diffusers' AutoencoderKLWan with ``config``'s hyper-parameters (random init)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**diffusers_config(config)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the project's exactness measure."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def channel_rel_err(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> float:
    """The worst channel's ``max |a_c - b_c| / max |b_c|`` (channels along ``dim``): unlike
    :func:`rel_err`, a large error in a channel of small values cannot hide behind the largest
    channel's range."""
    a, b = a.float().movedim(dim, 0).flatten(1), b.float().movedim(dim, 0).flatten(1)
    scale = b.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((a - b).abs().amax(dim=1) / scale).max())


BF16_BOUND = 3e-2
"""bfloat16 against float32: :func:`rel_err` bound."""
BF16_CHANNEL_BOUND = 5e-2
"""... and :func:`channel_rel_err` bound (measured worst channels: narrow8 3.4e-2, Wan 2.1
2.4e-2 on the CPU paths)."""


def assert_bf16_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """A bfloat16 result against float32: overall and in every latent channel (dim 1)."""
    error, worst = rel_err(got, expected), channel_rel_err(got, expected)
    assert error <= BF16_BOUND and worst <= BF16_CHANNEL_BOUND, (error, worst)


def random_video(t: int, h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """uint8 frames ``[B, T, H, W, 3]`` (as a camera delivers them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, t, h, w, 3), generator=generator, dtype=torch.uint8)


def to_model_video(frames: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, W, 3]`` uint8 -> ``[B, 3, T, H, W]`` float in [-1, 1], as the stream converts."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
