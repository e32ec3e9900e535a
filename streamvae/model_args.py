"""The model-choosing command-line options, shared by every command that loads an encoder.

``streamvae encode``, ``live``, ``serve``, ``bench`` and ``fleet work`` (and the examples) take the
same ``--weights`` / ``--random-weights`` / ``--dtype`` / ``--device`` / ``--config`` / ``--seed``
/ ``--threads`` options; this module adds them to a parser and turns the parsed values into an
encoder. It is a library module: commands import it, it imports no command.

>>> import argparse
>>> from streamvae.model_args import add_model_arguments, model_from_args
>>> parser = argparse.ArgumentParser()
>>> add_model_arguments(parser)
>>> args = parser.parse_args(["--random-weights", "--config", "narrow8", "--device", "cpu"])
>>> choice = model_from_args(args)
>>> choice.random, choice.encoder.config.name
(True, 'wan2.1-narrow8')
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamvae.config import LIGHTVAE, WAN21, WAN22, WanConfig, narrow
from streamvae.model import WanDecoder, WanEncoder
from streamvae.usage import positive_int, usage_error
from streamvae.weights import load_decoder, load_encoder, random_decoder, random_encoder

__all__ = [
    "CONFIGS",
    "DTYPES",
    "NO_WEIGHTS_HELP",
    "ModelChoice",
    "add_model_arguments",
    "checked_device",
    "decoder_from_args",
    "model_from_args",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""``--dtype`` names and the torch dtypes they stand for."""

CONFIGS: dict[str, WanConfig] = {
    "wan2.1": WAN21,
    "narrow8": narrow(8),
    "wan2.2": WAN22,
    "wan2.2-narrow8": narrow(8, WAN22),
    "lightvae": LIGHTVAE,
}
"""``--config`` names (the architecture of ``--random-weights``)."""

NO_WEIGHTS_HELP = (
    "no weights given. Pass --weights with a Wan VAE: a local Wan2.1_VAE.pth or Wan2.2_VAE.pth, "
    "ComfyUI's wan_2.1_vae / wan2.2_vae.safetensors, LightVAE's lightvaew2_1, diffusers' vae/ "
    "folder (Wan or Qwen-Image), or a hub id such as Wan-AI/Wan2.1-T2V-1.3B or "
    "Wan-AI/Wan2.2-TI2V-5B (pip install 'streamvae[hub]'; e.g. huggingface-cli download "
    "Wan-AI/Wan2.1-T2V-1.3B Wan2.1_VAE.pth). To try the pipeline without them, pass "
    "--random-weights: every output is then labelled as meaningless."
)


@dataclass(frozen=True)
class ModelChoice:
    """The loaded encoder and what to call it in outputs (``random`` marks meaningless latents)."""

    encoder: WanEncoder
    label: str
    random: bool


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``model`` option group (``--weights``, ``--random-weights``, ``--dtype``, ...)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--weights", help="anything streamvae.load_encoder takes (file, folder, hub id)"
    )
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights, for trying the pipeline: the latents mean nothing and are labelled so",
    )
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype")
    group.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    group.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default="wan2.1",
        help="architecture for --random-weights: wan2.1, wan2.2 (z 48, frame sizes in "
        "multiples of 16), lightvae, or narrow8 / wan2.2-narrow8, the same networks 8 channels "
        "wide (fast: for tests and trying the pipeline)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice)",
    )


def checked_device(name: str) -> torch.device:
    """``--device NAME`` as a device this machine has: a usage error (status 2) for a name
    that is no device, a failure (status 1) for a CUDA device this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        usage_error(f"--device {name}: not a device name (expected cpu, cuda, cuda:N, mps, ...)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = "" if torch.version.cuda else ", a build without CUDA"
            raise SystemExit(
                f"streamvae: --device {name}: no CUDA device here (torch {torch.__version__}"
                f"{built}); use --device cpu"
            )
        if device.index is not None and device.index >= count:
            raise SystemExit(f"streamvae: --device {name}: this machine has {count} CUDA device(s)")
    return device


def model_from_args(args: argparse.Namespace) -> ModelChoice:
    """The encoder the parsed model options ask for; ``SystemExit`` with the reason if none can be
    (status 2 for options that conflict or are missing, 1 for a checkpoint that does not load).

    ``--threads`` is applied to torch here. Exactly one of ``--weights`` and
    ``--random-weights`` must be given; ``--config`` applies to random weights only.
    """
    encoder, label, random = _model_from_args(args, load_encoder, random_encoder, "latents")
    assert isinstance(encoder, WanEncoder)
    return ModelChoice(encoder, label, random)


def decoder_from_args(args: argparse.Namespace) -> tuple[WanDecoder, str, bool]:
    """The decoder the parsed model options ask for (as :func:`model_from_args` the encoder):
    the decoder, its label, and whether its weights are random (its frames meaningless)."""
    decoder, label, random = _model_from_args(args, load_decoder, random_decoder, "frames")
    assert isinstance(decoder, WanDecoder)
    return decoder, label, random


def _model_from_args(
    args: argparse.Namespace,
    load: Callable[..., WanEncoder | WanDecoder],
    make_random: Callable[..., WanEncoder | WanDecoder],
    outputs: str,
) -> tuple[WanEncoder | WanDecoder, str, bool]:
    device = checked_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    config_name = getattr(args, "config", "wan2.1")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.weights and args.random_weights:
        usage_error("give --weights or --random-weights, not both")
    if args.weights and config_name != "wan2.1":
        usage_error("--config applies to --random-weights (weights fix the shape)")
    if args.weights:
        try:
            model = load(args.weights, device=device, dtype=dtype)
        except (ValueError, OSError) as exc:  # CheckpointError: missing, unknown, mis-shaped
            raise SystemExit(f"streamvae: {exc}") from None
        return model, str(args.weights), False
    if args.random_weights:
        config = CONFIGS[config_name]
        model = make_random(config, seed=getattr(args, "seed", 0), device=device, dtype=dtype)
        return model, f"RANDOM WEIGHTS {config.name} ({outputs} are meaningless)", True
    usage_error(NO_WEIGHTS_HELP)
