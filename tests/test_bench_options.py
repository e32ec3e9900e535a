"""The bench's option parsers."""

from __future__ import annotations

import argparse

import pytest

from streamvae.bench.options import parse_numbers, parse_size


def test_parsers():
    assert parse_size("480x832") == (480, 832)
    for bad in ("480", "480x830", "0x8", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
    assert parse_numbers("16,24,30") == (16.0, 24.0, 30.0)
    assert parse_numbers("0") == () == parse_numbers("none")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_numbers("-1")
