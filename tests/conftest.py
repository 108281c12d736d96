"""Fixtures shared by the test suite: tiny CNNs and, for integration tests, the default model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _tiny_models import TinyCNN, tiny_model


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


def _patched_bfloat16_support(monkeypatch, native: bool, found: str) -> None:
    from scorecam_explorer import device

    def support(where="auto"):
        return device.BFloat16Support(str(device.resolve_device(where)), native, "test CPU", found)

    monkeypatch.setattr(device, "bfloat16_support", support)


@pytest.fixture
def native_bfloat16(monkeypatch):
    """bfloat16 counted as native on every device (in this process), so that a test computing
    in bfloat16 gives the same verdict on CPUs with and without AVX512-BF16 / AMX."""
    _patched_bfloat16_support(monkeypatch, True, "native bfloat16 (a test says so)")


@pytest.fixture
def no_native_bfloat16(monkeypatch):
    """bfloat16 counted as not native on every device (in this process): it must be refused."""
    _patched_bfloat16_support(monkeypatch, False, "CPU capability AVX2: no AVX512-BF16, no AMX")


@pytest.fixture
def tiny_models(monkeypatch):
    """``load_model("tiny", weights=SEED)``: the tiny CNN (default layer ``features``) with
    weights from SEED (DEFAULT: 0); the calls made are returned for the test to check."""
    from scorecam_explorer.errors import UnknownModelError

    calls: list[tuple[str, object]] = []

    def load_model(name: str = "tiny", weights: object = "DEFAULT", device: object = None):
        calls.append((name, weights))
        if name != "tiny":
            raise UnknownModelError(f"unknown model {name!r} (test registry)")
        return tiny_model(seed=0 if weights in ("DEFAULT", None) else int(str(weights)))

    monkeypatch.setattr("scorecam_explorer.models.load_model", load_model)
    return calls


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty cache directory for the app (``SCORECAM_EXPLORER_CACHE_DIR``)."""
    from scorecam_explorer.serving.app_cache import ENV_CACHE_DIR

    home = tmp_path / "cache-home"
    monkeypatch.setenv(ENV_CACHE_DIR, str(home))
    return home
