"""Small models the Dask tests build on worker processes (importable, so factories pickle by name).

``tiny_model`` is a fixed-seed CNN for 32x32 inputs. ``sabotaged_model`` is the same network
(same weights, same fingerprint) that fails once, mid-computation, in whichever worker process
first claims a marker file: it raises, or it kills its process. ``FORWARD_CALLS`` counts the
forward passes of every tiny model in this process. ``batchnorm_cnn`` is a small network with
BatchNorm for the folding and fusion tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from scorecam_explorer.models import LoadedModel, from_module
from scorecam_explorer.preprocessing import Preprocessing

INPUT_SIZE = 32
FORWARD_CALLS = 0


def batchnorm_cnn(conv_type: type[nn.Conv2d] = nn.Conv2d, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """conv-BN-ReLU, conv-BN-``activation``, pooled into 4 classes (3x?x? inputs), with
    random BatchNorm statistics and affine parameters, so that folding changes every weight."""
    torch.manual_seed(0)
    model = nn.Sequential(
        conv_type(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), activation(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    return model.eval()


class TinyCNN(nn.Module):
    """Two conv blocks and a linear head: 3x32x32 -> 10 classes."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
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
        global FORWARD_CALLS
        FORWARD_CALLS += 1
        return self.classifier(torch.flatten(self.pool(self.features(inputs)), 1))


class SabotagedCNN(TinyCNN):
    """TinyCNN that fails once, at its ``after``-th forward in a process, if it claims ``marker``."""

    def __init__(self, marker: str, how: str, after: int) -> None:
        super().__init__()
        self.marker, self.how, self.after, self.calls = marker, how, after, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.after and _claim(self.marker):
            if self.how == "exit":
                os._exit(1)  # the worker process dies mid-task, as on a crash or a kill
            raise RuntimeError("sabotaged forward pass (test)")
        return super().forward(inputs)


def _claim(marker: str) -> bool:
    """True for exactly one caller across processes: renaming a file succeeds once."""
    try:
        os.rename(marker, f"{marker}.claimed-{os.getpid()}")
    except FileNotFoundError:
        return False
    return True


def _wrap(module: nn.Module, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    fresh = TinyCNN()
    module.load_state_dict(fresh.state_dict())
    return from_module(
        module.eval(),
        name="tiny",
        preprocessing=Preprocessing(resize=INPUT_SIZE, crop=INPUT_SIZE),
        class_names=[f"class {index}" for index in range(10)],
        default_layer="features",
    )


def tiny_model(seed: int = 0) -> LoadedModel:
    """The tiny CNN with weights drawn from ``seed``."""
    return _wrap(TinyCNN(), seed)


def sabotaged_model(marker: str, how: str = "raise", after: int = 3, seed: int = 0) -> LoadedModel:
    """The same model as ``tiny_model(seed)``, failing once as :class:`SabotagedCNN` says."""
    return _wrap(SabotagedCNN(marker, how, after), seed)


def per_process_model() -> LoadedModel:
    """A factory that breaks the rules: other weights in every process."""
    return tiny_model(seed=os.getpid())


def forward_calls() -> int:
    """Forward passes of tiny models made in this process so far."""
    return FORWARD_CALLS


def write_images(folder: Path, count: int, size: int = INPUT_SIZE) -> list[Path]:
    """``count`` random RGB PNG pictures, ``image-00.png`` ..., into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
        path = folder / f"image-{index:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
