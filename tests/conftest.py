"""Fixtures shared by the test suite: tiny CNNs and, for integration tests, the default model."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import TinyCNN


@pytest.fixture
def one_thread():
    """Small models run faster on one thread, and much faster on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="session")
def default_model():
    """The embedded EfficientNet-Lite0 (pretrained, offline); loaded once per test session."""
    from scorecam_explorer.models import load_model

    return load_model()
