"""The streamvae command: encode, decode, live, serve, web, fleet and bench.

Run ``streamvae COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import torch

from streamvae.usage import CliParser

__all__ = ["build_parser", "main"]


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
    from streamvae.io import decode as decode_command

    decode_command.add_decode_command(commands)
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
        bench = importlib.import_module("streamvae.bench.command")
    except ModuleNotFoundError as exc:  # a checkout without the benchmark module
        if exc.name not in ("streamvae.bench", "streamvae.bench.command"):
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
