"""Fixtures shared by the test suite: tiny CNNs and, for integration tests, the default model."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv blocks and a linear head: 3x32x32 -> 10 classes, fast on any CPU."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(inputs)), 1))


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="session")
def default_model():
    """The embedded EfficientNet-Lite0 (pretrained, offline); loaded once per test session."""
    from scorecam_explorer.models import load_model

    return load_model()
