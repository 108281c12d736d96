"""The pytorch-grad-cam and torchcam presets against the real libraries.

Same model, input, layer and class; the cache is computed with the library's own mask
convention, then the preset recomposes the map. Agreement: Pearson r >= 0.999 and
max |difference| <= 1e-3 after min-max normalisation, at the library's output resolution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from scorecam_explorer.compose import resolve_targets, scorecam
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.models import from_module

# The test extra installs both libraries: a missing one is a broken setup, reported as an
# error (never a silent skip).
try:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam import methods as torchcam_methods
except ImportError as error:
    raise ImportError(
        f"{error}: the comparisons with the published libraries need grad-cam and torchcam; "
        "install the test extra (pip install -e '.[test]')."
    ) from error


def min_max(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[bool, str]:
    """Whether two maps agree (r >= 0.999 and max |difference| <= 1e-3 after min-max), and how far."""
    ours, theirs = min_max(ours), min_max(theirs)
    assert ours.shape == theirs.shape
    assert theirs.max() > 0 and ours.max() > 0, "a map is all zero: nothing to compare"
    r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    difference = np.abs(ours - theirs).max()
    return bool(r >= 0.999 and difference <= 1e-3), f"Pearson r = {r:.6f}, max |difference| = {difference:.2e}"


def assert_agrees(ours: np.ndarray, theirs: np.ndarray) -> None:
    agrees, how = agreement(ours, theirs)
    assert agrees, how


def grad_cam_map(module: torch.nn.Module, layer: str, inputs: torch.Tensor, cls: int) -> np.ndarray:
    """grad-cam's ScoreCAM map (H, W), hooks released by the context manager."""
    with pytorch_grad_cam.ScoreCAM(model=module, target_layers=[module.get_submodule(layer)]) as cam:
        cam.batch_size = 16
        return cam(input_tensor=inputs, targets=[ClassifierOutputTarget(cls)])[0]


def torchcam_maps(module: torch.nn.Module, layer: str, inputs: torch.Tensor, classes: list[int]) -> list[np.ndarray]:
    """torchcam's ScoreCAM maps (fy, fx), one per class, from one hooked forward pass."""
    shape = tuple(inputs.shape[1:])
    with torchcam_methods.ScoreCAM(module, target_layer=layer, batch_size=16, input_shape=shape) as extractor:
        with torch.no_grad():
            module(inputs)
        return [extractor(class_idx=cls)[0][0].numpy() for cls in classes]


class Case:
    """A model, an input, a layer and two classes, with a cache per library convention."""

    def __init__(self, loaded, picture: str, layer: str, classes: list) -> None:
        self.loaded, self.layer = loaded, layer
        self.caches = {
            convention: compute_cache(loaded, picture, layer, convention=convention, progress=False, batch_size=16)
            for convention in ("pytorch-grad-cam", "torchcam")
        }
        cache = self.caches["pytorch-grad-cam"]
        self.inputs = torch.from_numpy(cache["input"].values)
        self.classes = [int(resolve_targets(cache, target)[0]) for target in classes]

    def check_grad_cam(self) -> None:
        for cls in self.classes:
            ours = scorecam(self.caches["pytorch-grad-cam"], self.layer, cls, preset="pytorch-grad-cam", image=0)
            theirs = grad_cam_map(self.loaded.module, self.layer, self.inputs, cls)
            assert ours.shape == theirs.shape == tuple(self.inputs.shape[2:])
            assert_agrees(ours.values, theirs)

    def check_torchcam(self) -> None:
        theirs = torchcam_maps(self.loaded.module, self.layer, self.inputs, self.classes)
        for cls, their_map in zip(self.classes, theirs, strict=True):
            ours = scorecam(self.caches["torchcam"], self.layer, cls, preset="torchcam", image=0, resolution="feature")
            assert ours.shape == their_map.shape
            assert_agrees(ours.values, their_map)


@pytest.fixture(scope="module")
def resnet_case() -> Case:
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    loaded = from_module(module, name="resnet18-random", input_size=64)
    # top-1 class and one far down the ranking
    return Case(loaded, "sample:chelsea", "layer2", [None, 500])


@pytest.fixture(scope="module")
def lite0_case(default_model) -> Case:
    # blocks.15: the last block, signed activations (no ReLU): the stress case
    return Case(default_model, "sample:chelsea", "blocks.15", ["tiger cat", "espresso"])


def test_resnet18_grad_cam(resnet_case):
    resnet_case.check_grad_cam()


def test_resnet18_torchcam(resnet_case):
    resnet_case.check_torchcam()


@pytest.mark.slow
def test_lite0_last_block_grad_cam(lite0_case):
    lite0_case.check_grad_cam()


@pytest.mark.slow
def test_lite0_last_block_torchcam(lite0_case):
    lite0_case.check_torchcam()


def test_the_two_libraries_differ_where_the_presets_say(resnet_case):
    """The presets differ in their mask convention (align_corners, where min-max happens):
    that changes the map beyond the agreement tolerance, so a preset that agrees with one
    library does not agree with the other, and the agreement tests can fail. Their
    weightings, on one cache, give the same map (softmax is shift invariant)."""
    layer, cls = resnet_case.layer, resnet_case.classes[0]
    grad_cam_cache, torchcam_cache = resnet_case.caches["pytorch-grad-cam"], resnet_case.caches["torchcam"]
    # the masks: the same weighting on each library's cache gives maps that do not agree...
    on_grad_cam_masks = scorecam(grad_cam_cache, layer, cls, preset="torchcam", resolution="feature", image=0)
    on_torchcam_masks = scorecam(torchcam_cache, layer, cls, preset="torchcam", resolution="feature", image=0)
    agrees, how = agreement(on_grad_cam_masks.values, on_torchcam_masks.values)
    assert not agrees, how
    # ...and torchcam's own map agrees with its convention's cache only
    theirs = torchcam_maps(resnet_case.loaded.module, layer, resnet_case.inputs, [cls])[0]
    assert_agrees(on_torchcam_masks.values, theirs)
    agrees, how = agreement(on_grad_cam_masks.values, theirs)
    assert not agrees, how
    # ...as each library's whole pipeline at input resolution
    own = [
        scorecam(resnet_case.caches[name], layer, cls, preset=name, image=0).values
        for name in ("pytorch-grad-cam", "torchcam")
    ]
    agrees, how = agreement(*own)
    assert not agrees, how
    # the weightings: one cache, the same map (softmax of shifted scores rounds differently,
    # the float32 sum over 128 channels by ~1e-7)
    np.testing.assert_allclose(
        scorecam(grad_cam_cache, layer, cls, preset="pytorch-grad-cam", resolution="feature", image=0).values,
        on_grad_cam_masks.values,
        atol=1e-5,
    )
