import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest
import torch

from helpers import random_encoder, require
from streamvae import WAN21, narrow


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
