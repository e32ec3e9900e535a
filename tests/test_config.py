"""WanConfig: the presets, the stage topology, the frame-size rule, and what is refused."""

from __future__ import annotations

import dataclasses
import doctest
import importlib

import pytest

from streamvae import LIGHTVAE, PRESETS, QWEN_IMAGE, WAN21, WAN22, WanConfig, narrow
from streamvae.config import Stage


@pytest.mark.parametrize("name", ["streamvae.config", "streamvae.model.encoder"])
def test_docstring_examples(name: str):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_presets():
    assert set(PRESETS) == {"wan2.1", "wan2.2", "lightvae", "qwen-image"}
    assert WAN22.dims == (160, 160, 320, 640, 640) and WAN22.z_dim == 48
    assert (WAN22.patch_size, WAN22.residual, WAN22.conv_in_channels) == (2, True, 12)
    assert (WAN22.temporal_stride, WAN22.spatial_stride) == (4, 16)
    assert (WAN21.temporal_stride, WAN21.spatial_stride, WAN21.conv_in_channels) == (4, 8, 3)
    assert LIGHTVAE.dims == (24, 24, 48, 96, 96) and LIGHTVAE.latents_mean == WAN21.latents_mean
    assert dataclasses.replace(QWEN_IMAGE, name="wan2.1") == WAN21
    assert narrow(8, WAN22) == dataclasses.replace(
        WAN22, base_dim=8, decoder_dim=12, name="wan2.2-narrow8"
    )
    assert WAN22.decoder_dims == (1024, 1024, 1024, 512, 256) and WAN21.decoder_base_dim == 96


def test_stage_topology():
    """What a receptive-field computation reads: each stage's widths, downsampling, shortcut."""
    assert WAN21.stages() == (
        Stage(96, 96, True, False, None),
        Stage(96, 192, True, True, None),
        Stage(192, 384, True, True, None),
        Stage(384, 384, False, False, None),
    )
    assert [stage.shortcut for stage in WAN22.stages()] == [(1, 2), (2, 2), (2, 2), (1, 1)]
    assert [stage.temporal_down for stage in WAN22.stages()] == [False, True, True, False]


@pytest.mark.parametrize(
    "config, size, ok",
    [
        (WAN22, (704, 1280), True),
        (WAN22, (480, 832), True),
        (WAN22, (480, 840), False),
        (WAN22, (8, 16), False),
        (WAN21, (480, 840), True),
        (WAN21, (100, 104), False),
    ],
)
def test_size_rule(config, size, ok):
    problem = config.size_error(*size)
    assert (problem is None) == ok
    if not ok:
        assert f"multiples of {config.spatial_stride}" in problem and config.name in problem
        assert "nearest size is" in problem


def test_inconsistent_configs_are_refused():
    with pytest.raises(ValueError, match="temporal_downsample needs 3 entries"):
        WanConfig(temporal_downsample=(True,))
    with pytest.raises(ValueError, match="z_dim=48"):
        dataclasses.replace(WAN21, z_dim=48)
    with pytest.raises(ValueError, match="average-pool shortcut needs in_dim"):
        dataclasses.replace(WAN22, dim_mult=(1, 3, 4, 4))  # 160 * 8 is not a multiple of 480
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(WAN22, patch_size=0)
