"""The usage examples in the streamvae.io docstrings run as written (those not marked SKIP).

Each module listed has examples that run (``attempted > 0``): a module whose examples were all
removed, or all marked SKIP, fails here instead of passing on nothing. (``streamvae.io.commands``
has none: the CLI's tests cover it.)"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "streamvae.io",
    "streamvae.io.backoff",
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
    assert result.attempted > 0 and result.failed == 0, result
