"""The ``official`` preset against a transcription of the authors' released Score-CAM.

The transcription follows haofanwang/Score-CAM ``cam/scorecam.py`` step by step: one
masked forward pass per channel, skipping channels whose upsampled map is constant, the
class probability as the weight, raw upsampled maps summed at input resolution, ReLU, then
min-max (``None`` for a constant map, here all zero).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from scorecam_explorer.compose import channel_weights, scorecam
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.models import from_module


def official_scorecam(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, class_idx: int) -> np.ndarray:
    """The published algorithm for one image (1, 3, h, w), written as the authors wrote it."""
    activations = {}
    # clone: the published hook keeps a reference, which a later in-place op (ResNet's
    # ``out += identity`` after bn2) would overwrite; the algorithm means the layer's output
    handle = layer.register_forward_hook(
        lambda _module, _inputs, output: activations.__setitem__("value", output.detach().clone())
    )
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    _, _, h, w = inputs.size()
    activation = activations["value"]
    _, k, _, _ = activation.size()
    score_saliency_map = torch.zeros((1, 1, h, w))
    with torch.no_grad():
        for i in range(k):
            saliency_map = torch.unsqueeze(activation[:, i, :, :], 1)
            saliency_map = F.interpolate(saliency_map, size=(h, w), mode="bilinear", align_corners=False)
            if saliency_map.max() == saliency_map.min():
                continue
            norm_saliency_map = (saliency_map - saliency_map.min()) / (saliency_map.max() - saliency_map.min())
            output = model(inputs * norm_saliency_map)
            output = F.softmax(output, dim=1)
            score = output[0][class_idx]
            score_saliency_map += score * saliency_map
    score_saliency_map = F.relu(score_saliency_map)
    low, high = score_saliency_map.min(), score_saliency_map.max()
    if low == high:
        return np.zeros((h, w))
    return ((score_saliency_map - low) / (high - low))[0, 0].numpy()


def assert_same_map(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert theirs.max() == 1.0
    r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert r >= 0.99999 and np.abs(ours - theirs).max() <= 1e-4, (r, np.abs(ours - theirs).max())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    loaded = from_module(module, name="resnet18-random", input_size=64)
    # a signed layer (batch norm before the residual sum): ReLU after upsampling matters
    cache = compute_cache(loaded, "sample:chelsea", SIGNED_LAYER, convention="official", progress=False, batch_size=16)
    return loaded, cache


SIGNED_LAYER = "layer1.1.bn2"


def test_official_preset_matches_the_published_code_on_resnet18(resnet):
    loaded, cache = resnet
    inputs = torch.from_numpy(cache["input"].values)
    assert cache[SIGNED_LAYER]["activation"].values.min() < 0
    top1 = int(cache["logits"].values[0].argmax())
    for cls in (top1, 7):
        theirs = official_scorecam(loaded.module, loaded.module.get_submodule(SIGNED_LAYER), inputs, cls)
        ours = scorecam(cache, SIGNED_LAYER, cls, preset="official", image=0)
        assert_same_map(ours.values, theirs)


def test_official_preset_skips_constant_channels_as_the_published_code(tiny_cnn):
    """Channels 0-2 are all zero and channel 3 is a constant 0.5: all four are skipped."""
    conv = tiny_cnn.features[3]
    with torch.no_grad():
        conv.weight[:4] = 0.0
        conv.bias[:3] = -1.0
        conv.bias[3] = 0.5
    loaded = from_module(tiny_cnn, input_size=32)
    cache = compute_cache(loaded, "sample:coffee", "features.4", convention="official", progress=False, batch_size=16)
    assert cache["features.4"]["constant"].values[0].tolist()[:5] == [True, True, True, True, False]
    inputs = torch.from_numpy(cache["input"].values)
    for cls in (0, 3, 9):
        theirs = official_scorecam(tiny_cnn, tiny_cnn.features[4], inputs, cls)
        ours = scorecam(cache, "features.4", cls, preset="official", image=0)
        assert_same_map(ours.values, theirs)
        weights = channel_weights(cache, "features.4", cls, preset="official", image=0).values
        assert (weights[:4] == 0).all() and (weights[4:] > 0).all()
    # the softmax presets keep the constant 0.5 channel (the libraries forward it too)
    assert channel_weights(cache, "features.4", 0, preset="paper", image=0).values[3] > 0
