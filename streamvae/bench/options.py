"""What one ``streamvae bench`` run measures, and the parsers of its values."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_LENGTHS",
    "DEFAULT_LIVE_FPS",
    "MEMORY_FORMATS",
    "BenchOptions",
    "parse_counts",
    "parse_lengths",
    "parse_numbers",
    "parse_size",
]

DEFAULT_LIVE_FPS = (16, 24, 30)
DEFAULT_LENGTHS = (17, 65, 257)

MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last_3d,
}


@dataclass(frozen=True)
class BenchOptions:
    """What one ``streamvae bench`` run measures."""

    size: tuple[int, int] = (128, 128)
    frames: int = 9
    repeats: int = 3
    live_fps: tuple[float, ...] = DEFAULT_LIVE_FPS
    live_frames: int = 33
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    memory_size: tuple[int, int] = (32, 32)
    mode: str = "frame"
    memory_format: str = "auto"
    peers: bool = True
    tf32: bool = False
    cuda_graphs: bool = True
    cudnn_benchmark: bool = True
    label: str = ""
    command: str = ""


def parse_size(text: str) -> tuple[int, int]:
    """``"480x832"`` -> ``(480, 832)``; both multiples of 8."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 128x128, got {text!r}") from None
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise argparse.ArgumentTypeError(f"H and W must be positive multiples of 8, got {text!r}")
    return height, width


def parse_counts(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]``: whole numbers >= 1 (``--streams``).

    >>> parse_counts("1,2,4")
    [1, 2, 4]
    """
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2,4,8, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return values


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"17,65,257"`` -> ``(17, 65, 257)``: whole frame counts; ``"0"`` or ``"none"`` -> ``()``."""
    if text.strip().lower() in ("", "0", "none", "off"):
        return ()
    return tuple(parse_counts(text))


def parse_numbers(text: str) -> tuple[float, ...]:
    """``"16,24,30"`` -> ``(16.0, 24.0, 30.0)``; ``"0"`` or ``"none"`` -> ``()`` (skip)."""
    if text.strip().lower() in ("", "0", "none", "off"):
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 16,24,30, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values
