"""Fixtures shared by the test suite: tiny CNNs and, for integration tests, the default model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _tiny_models import TinyCNN


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same random state, whatever ran before it or in which order:
    the weights of modules built in a test (their initialisers draw from the global generators)
    and any draw a test makes are the same in every run. Tests still seed their own draws."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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
