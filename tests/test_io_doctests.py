"""The usage examples in the streamvae.io docstrings run as written (those not marked SKIP)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "streamvae.io",
    "streamvae.io.backoff",
    "streamvae.io.commands",
    "streamvae.io.filesink",
    "streamvae.io.mqtt",
    "streamvae.io.pipeline",
    "streamvae.io.redact",
    "streamvae.io.sources",
    "streamvae.io.topics",
    "streamvae.io.wire",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
