"""Checkpoint layouts, name mapping and loading: ``load_encoder`` takes every real Wan-family VAE file.

>>> import streamvae
>>> encoder = streamvae.load_encoder("Wan2.1_VAE.pth")                   # Wan's own file  # doctest: +SKIP
>>> encoder = streamvae.load_encoder("wan_2.1_vae.safetensors")          # ComfyUI's  # doctest: +SKIP
>>> encoder = streamvae.load_encoder("Wan2.1-T2V-1.3B-Diffusers/vae")    # diffusers' folder  # doctest: +SKIP
>>> encoder = streamvae.load_encoder("Wan-AI/Wan2.1-T2V-1.3B", dtype=torch.bfloat16)  # hub  # doctest: +SKIP
>>> encoder = streamvae.load_encoder("Wan2.2_VAE.pth")                   # Wan 2.2 (z 48)  # doctest: +SKIP
>>> encoder = streamvae.load_encoder("Wan-AI/Wan2.2-TI2V-5B-Diffusers")  # its diffusers repo  # doctest: +SKIP
>>> encoder = streamvae.load_encoder("lightvaew2_1.safetensors")         # LightVAE  # doctest: +SKIP
>>> encoder = streamvae.load_encoder("Qwen-Image/vae")                   # Qwen-Image's  # doctest: +SKIP

The model is told from the tensors: Wan 2.2's stages are nested (``encoder.downsamples.N.
downsamples.M`` in Wan's names, ``encoder.down_blocks.N.resnets.M`` in diffusers'), and the
widths come from the shapes (``conv_in`` 96 wide: Wan 2.1; 24: LightVAE; 160 with 12 input
channels: Wan 2.2). A diffusers folder's ``config.json`` (``AutoencoderKLWan`` or
``AutoencoderKLQwenImage``) gives the configuration instead. Two name layouts exist:

- ``wan``: Wan's original names (``encoder.conv1``, ``encoder.downsamples.N.residual.{0,2,3,6}``
  or, in Wan 2.2, ``encoder.downsamples.N.downsamples.M...``, ``encoder.middle.{0,1,2}``,
  ``encoder.head.{0,2}``, top-level ``conv1``), in ``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth`` and
  ComfyUI's safetensors files;
- ``diffusers``: ``AutoencoderKLWan``'s names (``encoder.conv_in``, ``encoder.down_blocks.N``,
  ``encoder.mid_block``, ``encoder.norm_out``, ``encoder.conv_out``, ``quant_conv``).

Only the encoder's tensors are read; the decoder's are skipped without being loaded. Tensors are
converted one at a time into the parameters of a model built on the meta device, so the weights
are never held twice.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from streamvae.config import LIGHTVAE, QWEN_IMAGE, WAN21, WAN22, WanConfig, narrow
from streamvae.model import WanDecoder, WanEncoder

__all__ = [
    "CheckpointError",
    "load_decoder",
    "load_encoder",
    "random_decoder",
    "random_encoder",
    "wan_to_streamvae_name",
]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_HUB_FILE = "Wan2.1_VAE.pth"
# Single files looked for in a hub repo (after diffusers' vae/ folder), in this order.
HUB_FILES = (WAN_HUB_FILE, "Wan2.2_VAE.pth", "wan_2.1_vae.safetensors", "wan2.2_vae.safetensors")
DIFFUSERS_CLASSES = {"AutoencoderKLWan": "Wan", "AutoencoderKLQwenImage": "Qwen-Image"}
DECODER_PREFIXES = ("decoder.", "conv2.", "post_quant_conv.")


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message says what was wrong and what was expected."""


# -- name mapping ----

_WAN_RESIDUAL = {"0": "norm1", "2": "conv1", "3": "norm2", "6": "conv2"}
_STREAMVAE_RESIDUAL = {v: k for k, v in _WAN_RESIDUAL.items()}

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _rules(*pairs: tuple[str, Callable[[re.Match[str]], str]]) -> list[Rule]:
    return [(re.compile(pattern), build) for pattern, build in pairs]


def _rename(rules: list[Rule], name: str) -> str | None:
    for pattern, build in rules:
        match = pattern.fullmatch(name)
        if match:
            return build(match)
    return None


def _wan_residual(index: str) -> str:
    return _WAN_RESIDUAL.get(index, "residual." + index)


# Wan's names after "encoder." -> streamvae's (Wan 2.2's nested stages first).
_FROM_WAN = _rules(
    (
        r"downsamples\.(\d+)\.downsamples\.(\d+)\.residual\.(\d+)\.(.+)",
        lambda m: f"down_blocks.{m[1]}.resnets.{m[2]}.{_wan_residual(m[3])}.{m[4]}",
    ),
    (
        r"downsamples\.(\d+)\.downsamples\.(\d+)\.shortcut\.(.+)",
        lambda m: f"down_blocks.{m[1]}.resnets.{m[2]}.conv_shortcut.{m[3]}",
    ),
    (
        r"downsamples\.(\d+)\.downsamples\.\d+\.resample\.1\.(.+)",
        lambda m: f"down_blocks.{m[1]}.downsampler.conv.{m[2]}",
    ),
    (
        r"downsamples\.(\d+)\.downsamples\.\d+\.time_conv\.(.+)",
        lambda m: f"down_blocks.{m[1]}.downsampler.time_conv.{m[2]}",
    ),
    (r"conv1\.(.+)", lambda m: f"conv_in.{m[1]}"),
    (
        r"downsamples\.(\d+)\.residual\.(\d+)\.(.+)",
        lambda m: f"down_blocks.{m[1]}.{_wan_residual(m[2])}.{m[3]}",
    ),
    (r"downsamples\.(\d+)\.shortcut\.(.+)", lambda m: f"down_blocks.{m[1]}.conv_shortcut.{m[2]}"),
    (r"downsamples\.(\d+)\.resample\.1\.(.+)", lambda m: f"down_blocks.{m[1]}.conv.{m[2]}"),
    (r"downsamples\.(\d+)\.time_conv\.(.+)", lambda m: f"down_blocks.{m[1]}.time_conv.{m[2]}"),
    (
        r"middle\.([02])\.residual\.(\d+)\.(.+)",
        lambda m: f"mid_block.resnets.{int(m[1]) // 2}.{_wan_residual(m[2])}.{m[3]}",
    ),
    (r"middle\.1\.(.+)", lambda m: f"mid_block.attentions.0.{m[1]}"),
    (r"head\.0\.(.+)", lambda m: f"norm_out.{m[1]}"),
    (r"head\.2\.(.+)", lambda m: f"conv_out.{m[1]}"),
)

# streamvae's names -> Wan's (whole names); Wan 2.2's downsampler is given its index later.
_TO_WAN = _rules(
    (
        r"down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2)\.(.+)",
        lambda m: (
            f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.residual."
            f"{_STREAMVAE_RESIDUAL[m[3]]}.{m[4]}"
        ),
    ),
    (
        r"down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.+)",
        lambda m: f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.shortcut.{m[3]}",
    ),
    (
        r"down_blocks\.(\d+)\.downsampler\.conv\.(.+)",
        lambda m: f"encoder.downsamples.{m[1]}.downsamples.{{R}}.resample.1.{m[2]}",
    ),
    (
        r"down_blocks\.(\d+)\.downsampler\.time_conv\.(.+)",
        lambda m: f"encoder.downsamples.{m[1]}.downsamples.{{R}}.time_conv.{m[2]}",
    ),
    (r"quant_conv\.(.+)", lambda m: f"conv1.{m[1]}"),
    (r"conv_in\.(.+)", lambda m: f"encoder.conv1.{m[1]}"),
    (
        r"down_blocks\.(\d+)\.(norm1|conv1|norm2|conv2)\.(.+)",
        lambda m: f"encoder.downsamples.{m[1]}.residual.{_STREAMVAE_RESIDUAL[m[2]]}.{m[3]}",
    ),
    (
        r"down_blocks\.(\d+)\.conv_shortcut\.(.+)",
        lambda m: f"encoder.downsamples.{m[1]}.shortcut.{m[2]}",
    ),
    (r"down_blocks\.(\d+)\.conv\.(.+)", lambda m: f"encoder.downsamples.{m[1]}.resample.1.{m[2]}"),
    (
        r"down_blocks\.(\d+)\.time_conv\.(.+)",
        lambda m: f"encoder.downsamples.{m[1]}.time_conv.{m[2]}",
    ),
    (
        r"mid_block\.resnets\.(\d)\.(norm1|conv1|norm2|conv2)\.(.+)",
        lambda m: f"encoder.middle.{2 * int(m[1])}.residual.{_STREAMVAE_RESIDUAL[m[2]]}.{m[3]}",
    ),
    (r"mid_block\.attentions\.0\.(.+)", lambda m: f"encoder.middle.1.{m[1]}"),
    (r"norm_out\.(.+)", lambda m: f"encoder.head.0.{m[1]}"),
    (r"conv_out\.(.+)", lambda m: f"encoder.head.2.{m[1]}"),
)


def wan_to_streamvae_name(name: str) -> str | None:
    """Map one of Wan's original tensor names to streamvae's; ``None`` if it is not an encoder's."""
    if name.startswith("conv1."):
        return "quant_conv." + name[len("conv1.") :]
    if not name.startswith("encoder."):
        return None
    rest = name[len("encoder.") :]
    # An unknown encoder tensor keeps its name and is reported as unexpected.
    return _rename(_FROM_WAN, rest) or name


def streamvae_to_wan_name(name: str, config: WanConfig = WAN21) -> str:
    """The inverse of :func:`wan_to_streamvae_name` (used to name missing tensors).

    Wan 2.2 numbers a stage's downsample after its residual blocks, so ``config`` is needed
    (its ``num_res_blocks``).
    """
    renamed = _rename(_TO_WAN, name)
    if renamed is None:
        raise KeyError(name)
    return renamed.replace("{R}", str(config.num_res_blocks))


# diffusers' "resample.1" (the conv after nn.ZeroPad2d) is streamvae's "conv".
_DIFFUSERS_RESAMPLE = re.compile(r"^(down_blocks\.\d+(?:\.downsampler)?)\.resample\.1\.")
_STREAMVAE_RESAMPLE = re.compile(r"^(down_blocks\.\d+(?:\.downsampler)?)\.conv\.")


def streamvae_to_diffusers_name(name: str, config: WanConfig = WAN21) -> str:
    """The inverse of :func:`diffusers_to_streamvae_name`."""
    if name.startswith("quant_conv."):
        return name
    return "encoder." + _STREAMVAE_RESAMPLE.sub(r"\1.resample.1.", name)


def diffusers_to_streamvae_name(name: str) -> str | None:
    """Map one of diffusers' ``AutoencoderKLWan`` names to streamvae's; ``None`` if not an encoder's."""
    if name.startswith("quant_conv."):
        return name
    if not name.startswith("encoder."):
        return None
    return _DIFFUSERS_RESAMPLE.sub(r"\1.conv.", name[len("encoder.") :])


# -- the decoder's names ----

_DECODER_FROM_WAN = _rules(
    (r"conv1\.(.+)", lambda m: f"conv_in.{m[1]}"),
    (
        r"middle\.([02])\.residual\.(\d+)\.(.+)",
        lambda m: f"mid_block.resnets.{int(m[1]) // 2}.{_wan_residual(m[2])}.{m[3]}",
    ),
    (r"middle\.1\.(.+)", lambda m: f"mid_block.attentions.0.{m[1]}"),
    (r"head\.0\.(.+)", lambda m: f"norm_out.{m[1]}"),
    (r"head\.2\.(.+)", lambda m: f"conv_out.{m[1]}"),
    # Wan 2.2's nested stages: upsamples.N.upsamples.M (the upsample after the blocks).
    (
        r"upsamples\.(\d+)\.upsamples\.(\d+)\.residual\.(\d+)\.(.+)",
        lambda m: f"up_blocks.{m[1]}.resnets.{m[2]}.{_wan_residual(m[3])}.{m[4]}",
    ),
    (
        r"upsamples\.(\d+)\.upsamples\.(\d+)\.shortcut\.(.+)",
        lambda m: f"up_blocks.{m[1]}.resnets.{m[2]}.conv_shortcut.{m[3]}",
    ),
    (
        r"upsamples\.(\d+)\.upsamples\.\d+\.resample\.1\.(.+)",
        lambda m: f"up_blocks.{m[1]}.upsampler.conv.{m[2]}",
    ),
    (
        r"upsamples\.(\d+)\.upsamples\.\d+\.time_conv\.(.+)",
        lambda m: f"up_blocks.{m[1]}.upsampler.time_conv.{m[2]}",
    ),
)

# Wan 2.1's flat list: upsamples.K, K counting num_res_blocks + 1 blocks and one upsample a stage.
_WAN21_UPSAMPLE = re.compile(
    r"upsamples\.(\d+)\.(residual\.(\d+)|shortcut|resample\.1|time_conv)\.(.+)"
)


def wan_to_streamvae_decoder_name(name: str, num_res_blocks: int = 2) -> str | None:
    """Map one of Wan's tensor names to streamvae's :class:`WanDecoder` name; ``None`` if it is
    not a decoder's. Wan 2.1 numbers its stages' layers in one flat list, so ``num_res_blocks``
    is needed to place them."""
    if name.startswith("conv2."):
        return "post_quant_conv." + name[len("conv2.") :]
    if not name.startswith("decoder."):
        return None
    rest = name[len("decoder.") :]
    renamed = _rename(_DECODER_FROM_WAN, rest)
    if renamed is not None:
        return renamed
    match = _WAN21_UPSAMPLE.fullmatch(rest)
    if match is None:
        return name  # reported as unexpected
    per_stage = num_res_blocks + 2
    stage, position = divmod(int(match[1]), per_stage)
    if position <= num_res_blocks:
        part = match[2]
        if match[3] is not None:
            part = _wan_residual(match[3])
        elif part == "shortcut":
            part = "conv_shortcut"
        else:
            return name
        return f"up_blocks.{stage}.resnets.{position}.{part}.{match[4]}"
    part = "conv" if match[2] == "resample.1" else match[2]
    if part not in ("conv", "time_conv"):
        return name
    return f"up_blocks.{stage}.upsamplers.0.{part}.{match[4]}"


_DIFFUSERS_UP_RESAMPLE = re.compile(r"^(up_blocks\.\d+\.upsamplers?(?:\.0)?)\.resample\.1\.")


def diffusers_to_streamvae_decoder_name(name: str) -> str | None:
    """Map one of diffusers' ``AutoencoderKLWan`` names to streamvae's :class:`WanDecoder` name;
    ``None`` if it is not a decoder's."""
    if name.startswith("post_quant_conv."):
        return name
    if not name.startswith("decoder."):
        return None
    return _DIFFUSERS_UP_RESAMPLE.sub(r"\1.conv.", name[len("decoder.") :])


@dataclass(frozen=True)
class Layout:
    name: str
    describe: str
    to_streamvae: Callable[[str], str | None]
    from_streamvae: Callable[[str, WanConfig], str]
    to_decoder: Callable[[str, int], str | None]


WAN_LAYOUT = Layout(
    "wan",
    "Wan's original names (Wan2.1_VAE.pth, Wan2.2_VAE.pth / ComfyUI)",
    wan_to_streamvae_name,
    streamvae_to_wan_name,
    wan_to_streamvae_decoder_name,
)
DIFFUSERS_LAYOUT = Layout(
    "diffusers",
    "diffusers' AutoencoderKLWan names",
    diffusers_to_streamvae_name,
    streamvae_to_diffusers_name,
    lambda name, _blocks: diffusers_to_streamvae_decoder_name(name),
)


def detect_layout(names: list[str], origin: str, *, decoder: bool = False) -> Layout:
    """The checkpoint's naming (Wan's or diffusers'), from the half that is to be loaded."""
    if decoder:
        if any(
            n.startswith(("decoder.conv1.", "decoder.upsamples.", "decoder.head.")) for n in names
        ):
            return WAN_LAYOUT
        if any(
            n.startswith(("decoder.conv_in.", "decoder.up_blocks.", "decoder.mid_block."))
            for n in names
        ):
            return DIFFUSERS_LAYOUT
        if any(n.startswith("encoder.") for n in names):
            raise CheckpointError(
                f"{origin} holds only encoder tensors ({len(names)} tensors, none named "
                "'decoder.*'); decoding needs the decoder: use the full VAE checkpoint "
                "(Wan2.1_VAE.pth, Wan2.2_VAE.pth, ComfyUI's wan_2.1_vae / wan2.2_vae.safetensors "
                "or diffusers' vae/ folder)"
            )
        sample = ", ".join(names[:5]) or "no tensors at all"
        raise CheckpointError(
            f"{origin} is not a Wan VAE checkpoint with a decoder: expected tensors named "
            f"'decoder.conv1.*' (Wan's layout) or 'decoder.conv_in.*' (diffusers' layout), "
            f"found {sample}"
        )
    if any(
        n.startswith(("encoder.downsamples.", "encoder.conv1.", "encoder.head.")) for n in names
    ):
        return WAN_LAYOUT
    if any(
        n.startswith(("encoder.down_blocks.", "encoder.conv_in.", "encoder.mid_block."))
        for n in names
    ):
        return DIFFUSERS_LAYOUT
    if any(n.startswith(DECODER_PREFIXES) for n in names):
        raise CheckpointError(
            f"{origin} holds only decoder tensors ({len(names)} tensors, none named 'encoder.*'); "
            "streamvae needs the encoder: use the full VAE checkpoint (Wan2.1_VAE.pth, "
            "Wan2.2_VAE.pth, ComfyUI's wan_2.1_vae / wan2.2_vae.safetensors or diffusers' vae/ "
            "folder)"
        )
    sample = ", ".join(names[:5]) or "no tensors at all"
    raise CheckpointError(
        f"{origin} is not a Wan VAE checkpoint (Wan 2.1, Wan 2.2, LightVAE or Qwen-Image's): "
        "expected tensors named 'encoder.conv1.*' (Wan's layout) or 'encoder.conv_in.*' "
        f"(diffusers' layout), found {sample}"
    )


# -- tensor sources ----


class TensorSource:
    """Names, shapes and lazy reading of the tensors in one checkpoint file."""

    def __init__(
        self,
        origin: str,
        shapes: dict[str, tuple[int, ...]],
        read: Callable[[str], torch.Tensor],
    ) -> None:
        self.origin = origin
        self.shapes = shapes
        self.read = read


@contextmanager
def open_tensors(path: Path) -> Iterator[TensorSource]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with _open_safetensors(path) as source:
            yield source
    elif suffix in (".pth", ".pt", ".ckpt", ".bin"):
        yield _open_pickle(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {suffix!r}; expected .pth (Wan), .safetensors "
            "(ComfyUI or diffusers) or a diffusers folder with config.json"
        )


@contextmanager
def _open_safetensors(path: Path) -> Iterator[TensorSource]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
            yield TensorSource(str(path), shapes, handle.get_tensor)
    except SafetensorError as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({error}); is it truncated?"
        ) from error


def _open_pickle(path: Path) -> TensorSource:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was refused: it is a pickle that holds more than tensors (loading it would "
            f"run code, which streamvae never does: it loads with weights_only=True). {error}"
        ) from error
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as error:
        if "mmap" in str(error) or "zip" in str(error).lower():
            state = _load_legacy_pickle(path)
        else:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({error}); is it truncated?"
            ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} does not hold a dict of tensors (got {type(state).__name__})"
        )
    tensors: dict[str, torch.Tensor] = state
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return TensorSource(str(path), shapes, lambda name: tensors.pop(name))


def _load_legacy_pickle(path: Path) -> Any:
    """Checkpoints saved without the zip container cannot be memory-mapped."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was refused: it is a pickle that holds more than tensors (loading it would "
            f"run code, which streamvae never does: it loads with weights_only=True). {error}"
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({error}); is it truncated?"
        ) from error


# -- configs ----


def diffusers_config(config: WanConfig, *, decoder_base_dim: int | None = None) -> dict[str, Any]:
    """``config`` as the keyword arguments of diffusers' ``AutoencoderKLWan`` (the inverse of
    :func:`config_from_diffusers`).

    ``decoder_base_dim`` sizes the decoder, which streamvae never uses (default: diffusers'
    own, the encoder's width); a narrow one makes a reference model cheap to build.
    """
    channels = config.conv_in_channels
    return {
        "base_dim": config.base_dim,
        "decoder_base_dim": decoder_base_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(config.temporal_downsample),
        "dropout": 0.0,
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
        "is_residual": config.residual,
        "in_channels": channels,
        "out_channels": channels,
        "patch_size": config.patch_size if config.patch_size > 1 else None,
        "scale_factor_temporal": config.temporal_stride,
        "scale_factor_spatial": config.spatial_stride,
    }


def _family_config(family: WanConfig, base_dim: int, **fields: Any) -> WanConfig:
    """``family`` at ``base_dim`` wide, named ``family-narrowN`` when narrower (LightVAE by name)."""
    base = family if base_dim == family.base_dim else narrow(base_dim, family)
    config = replace(base, **fields)
    if replace(config, name=LIGHTVAE.name) == LIGHTVAE:
        return LIGHTVAE
    return config


def config_from_diffusers(config_path: Path) -> WanConfig:
    """The :class:`WanConfig` of a diffusers ``config.json`` (``AutoencoderKLWan`` for Wan 2.1
    and Wan 2.2, ``AutoencoderKLQwenImage`` for Qwen-Image)."""
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path} is not a readable JSON config ({error})") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    cls = raw.get("_class_name", "AutoencoderKLWan")
    if cls not in DIFFUSERS_CLASSES:
        raise CheckpointError(
            f"{config_path} describes a {cls}; streamvae encodes with "
            f"{' or '.join(DIFFUSERS_CLASSES)} (the Wan 2.1 / 2.2, LightVAE and Qwen-Image VAEs)"
        )
    if raw.get("attn_scales"):
        raise CheckpointError(f"{config_path}: attention inside the stages is not a Wan VAE layout")
    residual = bool(raw.get("is_residual", False))
    patch = int(raw.get("patch_size") or 1)
    if cls == "AutoencoderKLQwenImage":
        family, channels = QWEN_IMAGE, int(raw.get("input_channels", 3))
    else:
        family = WAN22 if residual else WAN21
        conv_in = int(raw.get("in_channels", 3 * patch * patch))
        if conv_in % (patch * patch):
            raise CheckpointError(
                f"{config_path}: in_channels={conv_in} is not a whole number of "
                f"{patch}x{patch} patches"
            )
        channels = conv_in // (patch * patch)
    fields: dict[str, Any] = {"residual": residual, "patch_size": patch, "in_channels": channels}
    for key in ("z_dim", "num_res_blocks"):
        if key in raw:
            fields[key] = int(raw[key])
    if "dim_mult" in raw:
        fields["dim_mult"] = tuple(int(m) for m in raw["dim_mult"])
    if "temperal_downsample" in raw:
        fields["temporal_downsample"] = tuple(bool(t) for t in raw["temperal_downsample"])
    z_dim = fields.get("z_dim", family.z_dim)
    for key in ("latents_mean", "latents_std"):
        values = raw.get(key)
        if values and len(values) == z_dim:
            fields[key] = tuple(float(v) for v in values)
        elif z_dim == family.z_dim:
            fields[key] = getattr(family, key)
        elif values:
            fields[key] = tuple(float(v) for v in values)  # reported as a mismatch below
    try:
        return _family_config(family, int(raw.get("base_dim", family.base_dim)), **fields)
    except ValueError as error:
        raise CheckpointError(f"{config_path}: {error}") from error


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> WanConfig:
    """The model a checkpoint holds, from its tensors' streamvae names and shapes.

    Nested stages (``down_blocks.N.resnets.M``) are Wan 2.2's topology, flat ones Wan 2.1's;
    the width is ``conv_in``'s (narrow test models too: ``wan2.1-narrow8``), and 24 wide is
    LightVAE. Wan 2.2's ``conv_in`` reads 12 channels: RGB patchified 2x2. Anything else that
    does not fit is reported as missing or mis-shaped tensors against the model found.
    """
    residual = any(re.match(r"down_blocks\.\d+\.resnets\.", name) for name in shapes)
    family = WAN22 if residual else WAN21
    conv_in = shapes.get("conv_in.weight")
    if not conv_in or len(conv_in) != 5:
        return family
    fields: dict[str, Any] = {}
    if residual:
        patch = 2 if conv_in[1] == 4 * 3 else 1  # Wan's vae2_2.py: RGB patchified 2x2, always
        fields = {"patch_size": patch, "in_channels": conv_in[1] // (patch * patch)}
    return _family_config(family, conv_in[0], **fields)


# -- loading ----


def load_encoder(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> WanEncoder:
    """Load a Wan-family VAE encoder from any of its real checkpoint layouts, in eval mode.

    The model (Wan 2.1, Wan 2.2, LightVAE, Qwen-Image; see :data:`streamvae.config.PRESETS`)
    is told from the tensors' names and shapes, or from diffusers' ``config.json``;
    ``encoder.config.name`` says which it is. ``source`` is a ``.pth`` or ``.safetensors``
    file with Wan's names (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``, ComfyUI's files), diffusers'
    folder (with ``config.json`` and ``diffusion_pytorch_model.safetensors``) or that
    safetensors file, or a hub repo id (``Wan-AI/Wan2.1-T2V-1.3B``, ``Wan-AI/Wan2.2-TI2V-5B``
    or their ``-Diffusers`` repos), fetched through ``huggingface_hub`` (``pip install
    streamvae[hub]``; ``revision`` and ``cache_dir`` are passed on to it). ``device`` defaults
    to the CPU and ``dtype`` to float32 (``torch.bfloat16`` and ``torch.float16`` are
    supported). Decoder tensors are never read.

    Raises :class:`CheckpointError` naming the layout it saw and every missing, unexpected or
    mis-shaped tensor.
    """
    encoder = _load(source, WanEncoder, device, dtype, revision, cache_dir)
    assert isinstance(encoder, WanEncoder)
    return encoder


def load_decoder(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> WanDecoder:
    """Load a Wan-family VAE decoder from any of its real checkpoint layouts, in eval mode.

    Takes everything :func:`load_encoder` takes (Wan's ``.pth`` holds both halves, ComfyUI's
    files, diffusers' folder or file, hub ids); only the decoder's tensors (``decoder.*`` and
    ``conv2`` / ``post_quant_conv``) are read, the encoder's are skipped without being loaded.
    The model is told as for the encoder; the decoder's width comes from its own tensors (Wan
    2.2's decoder is 256 wide against the encoder's 160).

    >>> decoder = streamvae.load_decoder("Wan2.1_VAE.pth")  # doctest: +SKIP
    >>> frames = decoder.decode(latents)                     # doctest: +SKIP
    """
    decoder = _load(source, WanDecoder, device, dtype, revision, cache_dir)
    assert isinstance(decoder, WanDecoder)
    return decoder


def _decoder_config(config: WanConfig, shapes: dict[str, tuple[int, ...]]) -> WanConfig:
    """``config`` with the decoder's width read off its ``conv_out`` (``[3 p p, d, 3, 3, 3]``)."""
    conv_out = shapes.get("conv_out.weight")
    if not conv_out or len(conv_out) != 5 or conv_out[1] == config.decoder_base_dim:
        return config
    return replace(config, decoder_dim=conv_out[1])


def _decoder_family(shapes: dict[str, tuple[int, ...]]) -> WanConfig:
    """The model of a checkpoint holding only a decoder, from its tensors."""
    residual = any(re.match(r"up_blocks\.\d+\.upsampler\.", name) for name in shapes)
    family = WAN22 if residual else WAN21
    conv_out = shapes.get("conv_out.weight")
    if residual or not conv_out or len(conv_out) != 5:
        return family
    return _family_config(family, conv_out[1])


def _load(
    source: str | os.PathLike[str],
    model: type[WanEncoder] | type[WanDecoder],
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> WanEncoder | WanDecoder:
    """One half of a checkpoint (``model``), its tensors read one at a time; the other half's
    are never read."""
    device = torch.device("cpu" if device is None else device)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype}")
    decoding = model is WanDecoder
    weights_path, config_path = _resolve(source, revision=revision, cache_dir=cache_dir)
    with open_tensors(weights_path) as tensors:
        names = list(tensors.shapes)
        layout = detect_layout(names, str(weights_path), decoder=decoding)
        encoder_names: dict[str, str] = {}  # streamvae name -> checkpoint name
        decoder_names: dict[str, str] = {}
        unexpected: list[str] = []
        # Wan 2.1's flat decoder list is placed by num_res_blocks: the encoder's, or 2.
        blocks = config_from_diffusers(config_path).num_res_blocks if config_path else 2
        for name in names:
            if name.startswith(DECODER_PREFIXES):
                ours = layout.to_decoder(name, blocks)
                if ours is not None:
                    decoder_names[ours] = name
                continue
            ours = layout.to_streamvae(name)
            if ours is None:
                unexpected.append(name)
                continue
            encoder_names[ours] = name
        encoder_shapes = {k: tensors.shapes[v] for k, v in encoder_names.items()}
        decoder_shapes = {k: tensors.shapes[v] for k, v in decoder_names.items()}
        if config_path:
            config = config_from_diffusers(config_path)
        elif encoder_names:
            config = config_from_shapes(encoder_shapes)
        else:
            config = _decoder_family(decoder_shapes)
        mapped, shapes = (
            (decoder_names, decoder_shapes) if decoding else (encoder_names, encoder_shapes)
        )
        if decoding:
            config = _decoder_config(config, decoder_shapes)
        with torch.device("meta"):
            built = model(config)
        expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
        unexpected += [mapped[k] for k in mapped if k not in expected]
        missing = [
            f"{f'{k} (streamvae name)' if decoding else layout.from_streamvae(k, config)} "
            f"{list(expected[k])}"
            for k in expected
            if k not in mapped
        ]
        misshaped = [
            f"{mapped[k]}: {list(shapes[k])}, expected {list(expected[k])}"
            for k in expected
            if k in mapped and shapes[k] != expected[k]
        ]
        if missing or unexpected or misshaped:
            raise CheckpointError(
                _mismatch_message(
                    str(weights_path),
                    layout,
                    config,
                    missing,
                    unexpected,
                    misshaped,
                    "decoder" if decoding else "encoder",
                )
            )
        state = {}
        for ours in expected:
            tensor = tensors.read(mapped[ours])
            state[ours] = tensor.to(device=device, dtype=dtype, copy=True)
            del tensor
    built.load_state_dict(state, strict=True, assign=True)
    return built.eval().requires_grad_(False)


def _mismatch_message(
    origin: str,
    layout: Layout,
    config: WanConfig,
    missing: list[str],
    unexpected: list[str],
    misshaped: list[str],
    half: str = "encoder",
) -> str:
    lines = [
        f"{origin} does not fit the {config.name} {half} (layout detected: {layout.name}, "
        f"{layout.describe}):"
    ]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {len(items)} {title}: " + "; ".join(shown))
    return "\n".join(lines)


def _resolve(
    source: str | os.PathLike[str], *, revision: str | None, cache_dir: Any
) -> tuple[Path, Path | None]:
    """The weights file and, for diffusers' layout, its config.json."""
    path = Path(source).expanduser()
    if path.is_dir():
        config = path / "config.json"
        weights = path / DIFFUSERS_WEIGHTS
        if not config.is_file() or not weights.is_file():
            nested = path / "vae"
            if (nested / "config.json").is_file():
                return _resolve(nested, revision=revision, cache_dir=cache_dir)
            raise CheckpointError(
                f"{path} is a folder but not diffusers' VAE layout: expected config.json and "
                f"{DIFFUSERS_WEIGHTS} in it (found: {sorted(p.name for p in path.iterdir())[:10]})"
            )
        return weights, config
    if path.is_file():
        sibling = path.parent / "config.json"
        if path.name == DIFFUSERS_WEIGHTS and sibling.is_file():
            return path, sibling
        return path, None
    text = os.fspath(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        return _from_hub(text, revision=revision, cache_dir=cache_dir)
    raise CheckpointError(
        f"{text}: no such file or folder (and not a hub repo id like 'Wan-AI/Wan2.1-T2V-1.3B' "
        "or 'Wan-AI/Wan2.2-TI2V-5B')"
    )


def _from_hub(repo_id: str, *, revision: str | None, cache_dir: Any) -> tuple[Path, Path | None]:
    try:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as error:
        raise CheckpointError(
            f"{repo_id} looks like a hub repo id, but huggingface_hub is not installed: "
            "pip install 'streamvae[hub]', or download the file and pass its path"
        ) from error

    def fetch(filename: str) -> Path | None:
        try:
            return Path(
                huggingface_hub.hf_hub_download(
                    repo_id, filename, revision=revision, cache_dir=cache_dir
                )
            )
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None

    attempts = []
    candidates: list[tuple[str, str | None]] = [("vae/" + DIFFUSERS_WEIGHTS, "vae/config.json")]
    for weights_name, config_name in candidates + [(name, None) for name in HUB_FILES]:
        attempts.append(weights_name)
        try:
            config = fetch(config_name) if config_name else None
            if config_name and config is None:
                continue
            weights = fetch(weights_name)
        except Exception as error:  # network, auth, unknown repo
            raise CheckpointError(f"could not fetch {repo_id} from the hub: {error}") from error
        if weights is not None:
            return weights, config
    raise CheckpointError(
        f"{repo_id}: none of {attempts} found on the hub or in its local cache "
        "(offline? set HF_HUB_CACHE to where the files were downloaded)"
    )


def random_encoder(
    config: WanConfig = WAN21,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> WanEncoder:
    """An encoder with random weights (PyTorch's default init, seeded): for timing and plumbing only.

    Its latents mean nothing; anything that shows them should say so.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = WanEncoder(config)
    return (
        encoder.to(device=device or "cpu", dtype=dtype or torch.float32)
        .eval()
        .requires_grad_(False)
    )


def random_decoder(
    config: WanConfig = WAN21,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> WanDecoder:
    """A decoder with random weights (PyTorch's default init, seeded): for timing and plumbing
    only. Its frames mean nothing; anything that shows them should say so.

    >>> from streamvae import narrow
    >>> random_decoder(narrow(8)).config.name
    'wan2.1-narrow8'
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = WanDecoder(config)
    return (
        decoder.to(device=device or "cpu", dtype=dtype or torch.float32)
        .eval()
        .requires_grad_(False)
    )
