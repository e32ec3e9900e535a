"""How far back in time a latent looks: the encoder's receptive field, from its layer topology.

The Wan encoder has no recurrence: every layer that mixes frames is a finite causal kernel (the
3x3x3 causal convs, the temporal downsamples' ``time_conv``), and everything else (norms, SiLU,
attention, 1x1 convs, the spatial downsample) acts on one frame at a time. So a latent depends
only on a fixed window of input frames ending at its last frame, and a stream's state can be
rebuilt exactly by replaying that window (:meth:`streamvae.StreamEncoder.resume`).

>>> from streamvae import WAN21, narrow
>>> from streamvae.receptive import latent_dependencies, receptive_field
>>> receptive_field(WAN21)
113
>>> receptive_field(narrow(8))        # the topology decides, not the width
113
>>> latent_dependencies(WAN21, 40)    # latent 40 ends at frame 160
range(48, 161)
>>> latent_dependencies(WAN21, 0), latent_dependencies(WAN21, 3)
(range(0, 1), range(0, 13))

The numbers are derived by walking the encoder's layers (built on the ``meta`` device, no
memory), not written down: :func:`time_layers` lists each layer that mixes frames with its time
kernel and stride, and :func:`latent_dependencies` maps a latent's frame range back through
them. A 1x1 (time kernel 1) conv on a parallel branch, such as a residual shortcut, adds
nothing; a layer with a time kernel that this module does not know how to place raises, so a
new layer type cannot silently give a wrong window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from streamvae.config import WanConfig
from streamvae.model import WanEncoder
from streamvae.model.layers import CausalConv3d, Downsample

__all__ = ["TimeLayer", "latent_dependencies", "receptive_field", "time_layers"]


@dataclass(frozen=True)
class TimeLayer:
    """One layer that mixes frames, in the encoder's order.

    ``kind="causal"``: output frame ``t`` reads input frames ``t - (kernel - 1) .. t`` (zeros
    before the first). ``kind="downsample"``: the first output frame is the first input frame;
    output ``j >= 1`` reads inputs ``stride * j - (kernel - 1) .. stride * j``.
    """

    name: str
    kind: Literal["causal", "downsample"]
    kernel: int
    stride: int = 1


def time_layers(model: WanConfig | WanEncoder) -> list[TimeLayer]:
    """The encoder's frame-mixing layers in forward order, read off its modules.

    Modules are visited in registration order, which is the order the encoder applies them
    (its ``step`` runs ``conv_in``, the down blocks, the mid block, ``conv_out``).
    """
    encoder = model if isinstance(model, WanEncoder) else _meta_encoder(model)
    layers: list[TimeLayer] = []
    claimed: set[int] = set()
    for name, module in encoder.named_modules():
        if id(module) in claimed:
            continue
        if isinstance(module, CausalConv3d):
            layers.append(TimeLayer(name, "causal", int(module.kernel_size[0])))
        elif isinstance(module, Downsample) and module.time_conv is not None:
            conv = module.time_conv
            layers.append(
                TimeLayer(
                    f"{name}.time_conv", "downsample", int(conv.kernel_size[0]), int(conv.stride[0])
                )
            )
            claimed.add(id(conv))
        elif isinstance(module, nn.Conv3d) and (
            module.kernel_size[0] != 1 or module.stride[0] != 1
        ):
            raise NotImplementedError(
                f"layer {name!r} ({type(module).__name__}, time kernel {module.kernel_size[0]}, "
                f"stride {module.stride[0]}) mixes frames in a way receptive_field does not know; "
                "teach streamvae.receptive.time_layers its rule"
            )
    return layers


def latent_dependencies(model: WanConfig | WanEncoder, index: int) -> range:
    """The input frames latent ``index`` depends on (counted from the stream's first frame).

    Walks :func:`time_layers` backwards from the latent, applying each layer's rule (causal
    kernels look back ``kernel - 1`` frames; downsamples map output ``j`` to inputs
    ``stride * j - (kernel - 1) .. stride * j`` and output 0 to input 0).
    """
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"a latent index is an integer >= 0, got {index!r}")
    return _walk(time_layers(model), index, clamp=True)


def receptive_field(model: WanConfig | WanEncoder) -> int:
    """``R``: how many frames, ending at a latent's last frame, a latent depends on.

    Steady state (a latent far enough from the stream's start that no window is clipped at
    frame 0). Replaying ``R`` frames from a group's first frame into a zeroed mid-stream state
    makes every later latent exact (:meth:`streamvae.StreamEncoder.resume`).
    """
    # Unclipped at frame 0: the window of any latent past the start-up transient.
    return len(_walk(time_layers(model), 1 << 20, clamp=False))


def _walk(layers: list[TimeLayer], index: int, *, clamp: bool) -> range:
    first = last = index
    for layer in reversed(layers):
        reach = layer.kernel - 1
        if layer.kind == "causal":
            first -= reach
        else:
            first = 0 if clamp and first == 0 else layer.stride * first - reach
            last = layer.stride * last
        if clamp:
            first = max(0, first)
    return range(first, last + 1)


def _meta_encoder(config: WanConfig) -> WanEncoder:
    if not isinstance(config, WanConfig):
        raise TypeError(f"expected a WanConfig or a WanEncoder, got {type(config).__name__}")
    with torch.device("meta"):
        return WanEncoder(config)
