"""Encoder configuration: the Wan VAE family's presets and narrow configs of the same topologies.

>>> from streamvae.config import WAN21, WAN22, narrow
>>> WAN21.dims, WAN21.spatial_stride
((96, 96, 192, 384, 384), 8)
>>> WAN22.dims, WAN22.z_dim, WAN22.spatial_stride, WAN22.conv_in_channels
((160, 160, 320, 640, 640), 48, 16, 12)
>>> narrow(8).dims, narrow(8, WAN22).name
((8, 8, 16, 32, 32), 'wan2.2-narrow8')
>>> [(s.in_dim, s.out_dim, s.spatial_down, s.temporal_down) for s in WAN22.stages()]
[(160, 160, True, False), (160, 320, True, True), (320, 640, True, True), (640, 640, False, False)]

The topology, stage by stage (what a receptive-field computation needs):

- ``patch_size`` p: the RGB frame is first rearranged into ``in_channels * p * p`` channels at
  ``H/p x W/p`` (Wan 2.2: p = 2; channel ``c * p * p + w_offset * p + h_offset``).
- ``conv_in``: causal 3x3x3 conv (2 frames of memory).
- each stage (:meth:`WanConfig.stages`): ``num_res_blocks`` residual blocks (two causal 3x3x3
  convs each), then, except in the last stage, a spatial downsample (pad right/bottom by one,
  3x3 conv with stride 2) that also halves time where ``temporal_downsample`` says so (a
  (3, 1, 1) time conv with stride 2 over ``[s[2j-2], s[2j-1], s[2j]]``, frame 0 passed
  through). With ``residual`` (Wan 2.2) the stage's input is added back after the stage through
  a parameter-free average-pool shortcut: 2x2 spatial means where the stage downsamples in
  space, paired frames ``(0, s0), (s1, s2), (s3, s4), ...`` where it downsamples in time,
  identity in the last stage. It reads a subset of what the main path reads.
- middle: residual block, single-head attention over each frame's positions, residual block.
- head: RMS norm, SiLU, causal 3x3x3 conv to ``2 * z_dim``; a 1x1x1 conv; the first ``z_dim``
  channels (the mean) are the latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

__all__ = [
    "LIGHTVAE",
    "PRESETS",
    "QWEN_IMAGE",
    "WAN21",
    "WAN22",
    "Stage",
    "WanConfig",
    "narrow",
]

# Per-channel statistics of the Wan 2.1 latent space (Wan's `WanVAE` scale, diffusers' config).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# The Wan 2.2 VAE's 48 (Wan's `Wan2_2_VAE.__init__`; the TI2V-5B-Diffusers vae/config.json).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


class Stage(NamedTuple):
    """One stage of the encoder trunk: widths, what it downsamples, its shortcut."""

    in_dim: int
    out_dim: int
    spatial_down: bool
    temporal_down: bool
    # Wan 2.2's average-pool shortcut around the stage (None for Wan 2.1's plain stages).
    shortcut: tuple[int, int] | None  # (frames averaged, pixels averaged per side)


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan-family causal video VAE encoder (Wan 2.1, Wan 2.2, ...).

    Stage ``i`` maps ``dims[i] -> dims[i + 1]`` with ``num_res_blocks`` residual blocks, followed
    (except for the last stage) by a spatial downsample that also halves time when
    ``temporal_downsample[i]`` is true. ``residual`` adds Wan 2.2's average-pool shortcut
    around each stage; ``patch_size`` is Wan 2.2's pixel patchify in front of ``conv_in``.
    ``in_channels`` counts the image's channels (3, RGB), before the patchify.
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
    patch_size: int = 1
    residual: bool = False
    # The decoder's base width where it differs from the encoder's (Wan 2.2: 256 against 160).
    decoder_dim: int | None = None

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
        if self.patch_size < 1 or self.in_channels < 1:
            raise ValueError(
                f"patch_size and in_channels must be positive, got {self.patch_size} and "
                f"{self.in_channels}"
            )
        for index, stage in enumerate(self.stages()):
            if stage.shortcut is None:
                continue
            frames, pixels = stage.shortcut
            if stage.in_dim * frames * pixels * pixels % stage.out_dim:
                raise ValueError(
                    f"stage {index}'s average-pool shortcut needs in_dim * {frames * pixels**2} "
                    f"divisible by out_dim, got {stage.in_dim} -> {stage.out_dim}"
                )

    @property
    def dims(self) -> tuple[int, ...]:
        """Channel widths at stage boundaries: ``[base] + [base * m for m in dim_mult]``."""
        return tuple(self.base_dim * m for m in (1, *self.dim_mult))

    @property
    def decoder_base_dim(self) -> int:
        """The decoder's base width: ``decoder_dim``, or the encoder's ``base_dim``."""
        return self.base_dim if self.decoder_dim is None else self.decoder_dim

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        """The decoder's widths at stage boundaries, from the latent side:
        ``[d * dim_mult[-1]] + [d * m for m in reversed(dim_mult)]``."""
        d = self.decoder_base_dim
        return tuple(d * m for m in (self.dim_mult[-1], *reversed(self.dim_mult)))

    @property
    def conv_in_channels(self) -> int:
        """Channels ``conv_in`` reads: the image's, times ``patch_size ** 2``."""
        return self.in_channels * self.patch_size**2

    def stages(self) -> tuple[Stage, ...]:
        """The trunk's stages, in order (see the module's description of the topology)."""
        dims = self.dims
        last = len(self.dim_mult) - 1
        stages = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            spatial = i != last
            temporal = spatial and self.temporal_downsample[i]
            shortcut = (2 if temporal else 1, 2 if spatial else 1) if self.residual else None
            stages.append(Stage(in_dim, out_dim, spatial, temporal, shortcut))
        return tuple(stages)

    @property
    def temporal_stride(self) -> int:
        return 1 << sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent along H and W: ``patch_size * 2 ** (stages - 1)`` (8 or 16)."""
        return self.patch_size << (len(self.dim_mult) - 1)

    @property
    def size_rule(self) -> str:
        """What frame sizes this model takes, in words (used in error messages)."""
        return f"height and width must be positive multiples of {self.spatial_stride}"

    def size_error(self, height: int, width: int) -> str | None:
        """Why ``height x width`` frames cannot be encoded (exactly), or ``None`` if they can."""
        step = self.spatial_stride
        if height > 0 and width > 0 and height % step == 0 and width % step == 0:
            return None
        near = [max(step, round(v / step) * step) for v in (height, width)]
        reason = (
            f" ({self.name} pools the input by 2 at every downsampling stage and patchifies "
            f"{self.patch_size}x{self.patch_size} first, so its reference refuses other sizes)"
            if self.residual
            else ""
        )
        return (
            f"got {height}x{width} frames; {self.name}: {self.size_rule}{reason}; the nearest "
            f"size is {near[0]}x{near[1]}"
        )


WAN21 = WanConfig()
"""The Wan 2.1 VAE encoder (also SkyReels-V2 and the Wan 2.2 A14B models)."""

WAN22 = WanConfig(
    base_dim=160,
    z_dim=48,
    latents_mean=WAN22_LATENTS_MEAN,
    latents_std=WAN22_LATENTS_STD,
    name="wan2.2",
    patch_size=2,
    residual=True,
    decoder_dim=256,
)
"""The Wan 2.2 VAE encoder (TI2V-5B; Lucy Edit, Cosmos3, Matrix-Game 3): z 48, stride (4, 16, 16)."""

LIGHTVAE = replace(WAN21, base_dim=24, name="lightvae")
"""LightX2V's LightVAE (``lightvaew2_1``): Wan 2.1 with 75% of the channels pruned (24, 24, 48, 96, 96)."""

QWEN_IMAGE = replace(WAN21, name="qwen-image")
"""Qwen-Image's VAE encoder: Wan 2.1's topology and statistics, used on images (T = 1)."""

PRESETS: dict[str, WanConfig] = {c.name: c for c in (WAN21, WAN22, LIGHTVAE, QWEN_IMAGE)}
"""The named models, by :attr:`WanConfig.name`."""


def narrow(base_dim: int = 8, family: WanConfig = WAN21) -> WanConfig:
    """``family``'s topology with ``base_dim`` channels instead of its own: for fast tests."""
    # Wan 2.2's decoder is wider than its encoder: its narrow configs keep it wider (1.5x).
    decoder_dim = None if family.decoder_dim is None else base_dim + base_dim // 2
    return replace(
        family, base_dim=base_dim, decoder_dim=decoder_dim, name=f"{family.name}-narrow{base_dim}"
    )
