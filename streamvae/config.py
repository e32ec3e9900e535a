"""Encoder configuration: the Wan 2.1 preset and narrow configs of the same topology.

>>> from streamvae.config import WAN21, narrow
>>> WAN21.dims
(96, 96, 192, 384, 384)
>>> narrow(8).dims
(8, 8, 16, 32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["WAN21", "WanConfig", "narrow"]

# Per-channel statistics of the Wan 2.1 latent space (Wan's `WanVAE` scale, diffusers' config).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan 2.1-style causal video VAE encoder.

    Stage ``i`` maps ``dims[i] -> dims[i + 1]`` with ``num_res_blocks`` residual blocks, followed
    (except for the last stage) by a spatial downsample that also halves time when
    ``temporal_downsample[i]`` is true.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    latents_mean: tuple[float, ...] = field(default=WAN21_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=WAN21_LATENTS_STD)
    name: str = "wan2.1"

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per downsampling "
                f"stage), got {len(self.temporal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean and latents_std need z_dim={self.z_dim} entries, got "
                f"{len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if self.base_dim < 1 or self.num_res_blocks < 1:
            raise ValueError("base_dim and num_res_blocks must be positive")

    @property
    def dims(self) -> tuple[int, ...]:
        """Channel widths at stage boundaries: ``[base] + [base * m for m in dim_mult]``."""
        return tuple(self.base_dim * m for m in (1, *self.dim_mult))

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


WAN21 = WanConfig()
"""The Wan 2.1 VAE encoder (also SkyReels-V2 and the Wan 2.2 A14B models)."""


def narrow(base_dim: int = 8) -> WanConfig:
    """The Wan 2.1 topology with ``base_dim`` channels instead of 96: for fast tests."""
    return replace(WAN21, base_dim=base_dim, name=f"wan2.1-narrow{base_dim}")
