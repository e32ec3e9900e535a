"""The streamvae command: encode, live, serve, web, fleet and bench.

Run ``streamvae COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamvae.config import LIGHTVAE, WAN21, WAN22, narrow
from streamvae.model import WanEncoder
from streamvae.usage import positive_int, usage_error

__all__ = [
    "CliParser",
    "HelpFormatter",
    "ModelChoice",
    "add_model_arguments",
    "checked_device",
    "main",
    "model_from_args",
    "plain_text",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIGS = {
    "wan2.1": WAN21,
    "narrow8": narrow(8),
    "wan2.2": WAN22,
    "wan2.2-narrow8": narrow(8, WAN22),
    "lightvae": LIGHTVAE,
}

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
        help="architecture for --random-weights: wan2.1 (default), wan2.2 (z 48, frames in "
        "multiples of 16), lightvae, or narrow8 / wan2.2-narrow8, the same networks 8 channels "
        "wide (fast: for tests and trying the pipeline)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
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
    from streamvae.weights import load_encoder, random_encoder

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
            encoder = load_encoder(args.weights, device=device, dtype=dtype)
        except (ValueError, OSError) as exc:  # CheckpointError: missing, unknown, mis-shaped
            raise SystemExit(f"streamvae: {exc}") from None
        return ModelChoice(encoder, str(args.weights), False)
    if args.random_weights:
        config = CONFIGS[config_name]
        encoder = random_encoder(config, seed=getattr(args, "seed", 0), device=device, dtype=dtype)
        return ModelChoice(encoder, f"RANDOM WEIGHTS {config.name} (latents are meaningless)", True)
    usage_error(NO_WEIGHTS_HELP)


# reStructuredText inline markup in docstrings reused as help: ``code``, :class:`Name`, **bold**.
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def plain_text(text: str) -> str:
    """``text`` with reStructuredText inline markup taken out (help is read in a terminal).

    >>> plain_text("The ``streamvae`` command; see :class:`StreamPool`.")
    'The streamvae command; see StreamPool.'
    """
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    return _RST_STRONG.sub(r"\1", text)


class HelpFormatter(argparse.HelpFormatter):
    """Plain-text help that shows every option's default, unless its help already says it or
    there is none to show (``None``, ``False``, an empty list)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action, ""):
            action = copy.copy(action)  # argparse leaves out the help line of help=None
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain_text(action.help or "")
        if not _shows_default(action, text):
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action, text: str) -> bool:
    default = action.default
    return not (
        not action.option_strings
        or "default" in text.lower()
        or default is None
        or default is False
        or default == []
        or default is argparse.SUPPRESS
    )


class CliParser(argparse.ArgumentParser):
    """The parser of ``streamvae`` and of every subcommand (``add_subparsers`` makes its own
    kind): help through :class:`HelpFormatter`, combined with any formatter a command asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        asked = kwargs.get("formatter_class", argparse.HelpFormatter)
        if not issubclass(asked, HelpFormatter):
            asked = type(f"Help{asked.__name__}", (HelpFormatter, asked), {})
        kwargs["formatter_class"] = asked
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = CliParser(
        prog="streamvae", description=__doc__.splitlines()[0]
    )
    from streamvae import __version__

    parser.add_argument(
        "--version",
        action="version",
        version=f"streamvae {__version__} (torch {torch.__version__})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    from streamvae.io import commands as io_commands

    io_commands.add_encode_command(commands)
    io_commands.add_live_command(commands)
    from streamvae.io import serve

    serve.add_serve_command(commands)
    try:
        fleet = importlib.import_module("streamvae.fleet.commands")
    except ModuleNotFoundError as exc:  # nats-py missing: no fleet commands
        if exc.name not in ("nats", "streamvae.fleet.commands"):
            raise
    else:
        fleet.add_fleet_command(commands)
    try:
        web = importlib.import_module("streamvae.web.commands")
    except ModuleNotFoundError as exc:  # the web extra (aiohttp, aiortc) missing: no web command
        if exc.name not in ("aiohttp", "aiortc", "av", "streamvae.web.commands"):
            raise
    else:
        web.add_web_command(commands)
    try:
        bench = importlib.import_module("streamvae.bench")
    except ModuleNotFoundError as exc:  # a checkout without the benchmark module
        if exc.name != "streamvae.bench":
            raise
    else:
        bench.add_bench_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
