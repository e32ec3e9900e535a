import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter runs the CUDA kernels on the CPU (tests/test_triton_kernels.py), but
    # only if TRITON_INTERPRET is set before anything imports triton (triton.language reads it
    # at import): a bench test that imports triton first would otherwise leave the kernels'
    # self-check failing for the rest of the process. Off a GPU nothing else uses Triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import random_encoder, require
from streamvae import WAN21, narrow

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in several worker processes (pyproject's addopts: -n 2): one torch thread each,
    # so that the workers share the cores instead of fighting over them.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def narrow_encoder():
    """Wan 2.1 topology, 8 channels wide, random weights: fast."""
    return random_encoder(narrow(8), seed=1)


@pytest.fixture(scope="session")
def wan21_encoder():
    """The full-size Wan 2.1 encoder with random weights (about 1 s per 9x64x64 clip here)."""
    return random_encoder(WAN21, seed=2)


@pytest.fixture
def offline_hub(monkeypatch):
    """huggingface_hub in offline mode: repo ids resolve from a cache the test builds."""
    huggingface_hub = require("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
