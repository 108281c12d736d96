"""Grad-CAM and Grad-CAM++ against pytorch-grad-cam, in-place safety, hooks and model state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from _tiny_models import normal, uniform

from scorecam_explorer.baselines import gradcam, gradcam_pp, gradcam_pp_weights, gradcam_weights
from scorecam_explorer.errors import ScorecamError, UnknownClassError, UnknownLayerError
from scorecam_explorer.metrics._common import pearson

METHODS = [(gradcam, GradCAM), (gradcam_pp, GradCAMPlusPlus)]


def total_hooks(module: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )


def reference_maps(cam_class, module: nn.Module, layer: str, inputs: torch.Tensor, targets: list[int]) -> np.ndarray:
    target_layer = dict(module.named_modules())[layer]
    with cam_class(module, [target_layer]) as cam:
        return cam(inputs.clone(), [ClassifierOutputTarget(t) for t in targets])


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.mark.parametrize(("ours", "theirs"), METHODS, ids=["gradcam", "gradcam++"])
@pytest.mark.parametrize("layer", ["layer4", "layer2"])
def test_matches_pytorch_grad_cam_on_resnet(resnet, ours, theirs, layer):
    torch.manual_seed(1)
    inputs = torch.randn(2, 3, 64, 64)
    targets = [3, 7]
    result = ours(resnet, inputs, layer, targets)
    expected = reference_maps(theirs, resnet, layer, inputs, targets)
    assert result.dims == ("image", "y", "x")
    assert result.shape == (2, 64, 64)
    assert list(result.coords["target"].values) == targets
    assert result.attrs["layer"] == layer
    for index in range(2):
        ours_map = result.values[index]
        assert ours_map.std() > 0.01, "degenerate map: the comparison would say nothing"
        assert pearson(ours_map, expected[index]) >= 0.999
    assert float(result.min()) >= 0.0 and float(result.max()) <= 1.0
    assert total_hooks(resnet) == 0


@pytest.mark.parametrize(("ours", "theirs"), METHODS, ids=["gradcam", "gradcam++"])
def test_matches_pytorch_grad_cam_on_tiny_cnn(tiny_cnn, ours, theirs):
    torch.manual_seed(2)
    inputs = torch.randn(3, 3, 32, 32)
    logits = tiny_cnn(inputs)
    top = logits.argmax(1).tolist()
    result = ours(tiny_cnn, inputs, "features.3")  # target None: each image's top-1 class
    assert list(result.coords["target"].values) == top
    expected = reference_maps(theirs, tiny_cnn, "features.3", inputs, top)
    for index in range(3):
        assert pearson(result.values[index], expected[index]) >= 0.999


def test_weights_by_hand():
    activations = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]])  # (1, 1, 2, 2), sum 4
    gradients = torch.tensor([[[[0.5, -1.0], [0.0, 2.0]]]])
    assert gradcam_weights(activations, gradients).item() == pytest.approx((0.5 - 1.0 + 0.0 + 2.0) / 4)
    # alpha = g^2 / (2 g^2 + 4 g^3); weight = sum alpha * relu(g) (g = 0 contributes nothing)
    expected = sum(
        g * g / (2 * g * g + 4 * g**3 + 1e-6) * max(g, 0.0) for g in (0.5, -1.0, 2.0)
    )
    assert gradcam_pp_weights(activations, gradients).item() == pytest.approx(expected, rel=1e-6)


class InplaceNet(nn.Module):
    """conv -> (in-place ReLU, in-place residual add) -> pooled head; ``inplace`` toggles both."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.conv1(x))
        out = self.conv2(identity)
        if self.inplace:
            out += identity
        else:
            out = out + identity
        out = self.relu(out)
        return self.head(out.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", [gradcam, gradcam_pp], ids=["gradcam", "gradcam++"])
@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_inplace_operations_after_the_layer_do_not_change_the_map(method, layer):
    torch.manual_seed(3)
    plain = InplaceNet(inplace=False).eval()
    inplace = InplaceNet(inplace=True).eval()
    inplace.load_state_dict(plain.state_dict())
    inputs = torch.randn(2, 3, 16, 16)
    expected = method(plain, inputs, layer, 1).values
    result = method(inplace, inputs, layer, 1).values
    assert expected.std() > 0.01
    np.testing.assert_allclose(result, expected, atol=1e-6)


def test_class_names_and_per_image_targets(tiny_cnn):
    from scorecam_explorer.models import from_module

    names = [f"thing{i}" for i in range(10)]
    model = from_module(tiny_cnn, class_names=names, input_size=32)
    inputs = normal(2, 3, 32, 32, seed=0)
    by_name = gradcam(model, inputs, "features.3", ["thing2", "THING5"])
    by_index = gradcam(tiny_cnn, inputs, "features.3", [2, 5])
    np.testing.assert_array_equal(by_name.values, by_index.values)
    assert list(by_name.coords["target_name"].values) == ["thing2", "thing5"]
    with pytest.raises(UnknownClassError, match="thing"):
        gradcam(model, inputs, "features.3", "thingg9x")
    with pytest.raises(UnknownClassError, match="out of range"):
        gradcam(tiny_cnn, inputs, "features.3", 10)
    with pytest.raises(UnknownClassError, match="one per image"):
        gradcam(tiny_cnn, inputs, "features.3", [1, 2, 3])


def test_pictures_use_the_models_preprocessing(tiny_cnn):
    from scorecam_explorer.models import from_module

    model = from_module(tiny_cnn, input_size=32)
    picture = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    result = gradcam(model, [picture, picture], "features.3", 0)
    tensor = model.preprocessing.to_tensor(Image.fromarray(picture))
    expected = gradcam(tiny_cnn, torch.stack([tensor, tensor]), "features.3", 0)
    assert result.shape == (2, 32, 32)
    np.testing.assert_allclose(result.values, expected.values, atol=1e-6)
    assert list(result.coords["image"].values) == ["image-0", "image-1"]
    with pytest.raises(ScorecamError, match="preprocessing"):  # a bare module has none
        gradcam(tiny_cnn, [picture], "features.3", 0)


def test_model_state_is_restored_and_no_gradients_are_left(tiny_cnn):
    tiny_cnn.train()
    tiny_cnn.features[0].weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in tiny_cnn.named_parameters()}
    inputs = normal(2, 3, 32, 32, seed=1)
    result = gradcam_pp(tiny_cnn, inputs, "features.3", 4)
    assert tiny_cnn.training and all(m.training for m in tiny_cnn.modules())
    assert {name: p.requires_grad for name, p in tiny_cnn.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_cnn.parameters())
    # the map was computed in eval mode: same as on the model put in eval mode by hand
    tiny_cnn.eval()
    np.testing.assert_array_equal(result.values, gradcam_pp(tiny_cnn, inputs, "features.3", 4).values)


class Exploding(nn.Module):
    """Raises in the head, after the hooked layer ran."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv(x)
        raise RuntimeError("boom")


def test_hooks_removed_and_state_restored_after_an_exception():
    model = Exploding().train()
    with pytest.raises(RuntimeError, match="boom"):
        gradcam(model, normal(1, 3, 8, 8, seed=2), "conv", 0)
    assert total_hooks(model) == 0
    assert model.training
    assert all(p.requires_grad for p in model.parameters())


def test_batches_give_the_same_maps(resnet):
    inputs = normal(5, 3, 48, 48, seed=3)
    whole = gradcam(resnet, inputs, "layer3", 1, batch_size=16)
    pieces = gradcam(resnet, inputs, "layer3", 1, batch_size=2)
    # other batch sizes reorder float32 sums (oneDNN picks kernels by shape); min-max scaling to [0, 1]
    # magnifies that rounding (1e-6 seen), which stays far below 1e-4
    np.testing.assert_allclose(whole.values, pieces.values, atol=1e-4)


class SharedActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))).mean(dim=(2, 3)))


def test_bad_layers_are_clear_errors(tiny_cnn):
    inputs = normal(1, 3, 32, 32, seed=4)
    with pytest.raises(UnknownLayerError, match="features.3"):
        gradcam(tiny_cnn, inputs, "features.33")
    with pytest.raises(UnknownLayerError, match="4-D"):
        gradcam(tiny_cnn, inputs, "classifier", 0)
    shared = SharedActivation()
    with pytest.raises(UnknownLayerError, match="2 times"):
        gradcam(shared, normal(1, 3, 8, 8, seed=5), "act", 0)
    assert total_hooks(shared) == 0
    with pytest.raises(ScorecamError, match=r"\(N, 3, H, W\)"):
        gradcam(tiny_cnn, normal(1, 1, 32, 32, seed=6), "features.3", 0)


def test_default_layer_for_a_bare_module(tiny_cnn):
    from scorecam_explorer.models import from_module

    inputs = normal(1, 3, 32, 32, seed=7)
    default = from_module(tiny_cnn, input_size=32).default_layer
    result = gradcam(tiny_cnn, inputs, target=0)
    assert result.attrs["layer"] == default
    np.testing.assert_array_equal(result.values, gradcam(tiny_cnn, inputs, default, 0).values)


def test_all_negative_evidence_gives_a_zero_map_not_nan():
    # one channel, all gradients negative -> ReLU removes everything
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(1.0)
        model[4].weight.copy_(torch.tensor([[-1.0], [1.0]]))
    result = gradcam(model, uniform(1, 3, 8, 8, seed=8), "1", 0)
    assert np.isfinite(result.values).all()
    assert float(abs(result).max()) == 0.0


@pytest.mark.parametrize(("ours", "theirs"), METHODS, ids=["gradcam", "gradcam++"])
@pytest.mark.parametrize("layer", ["head", "blocks.15"])
def test_matches_pytorch_grad_cam_on_the_default_model(default_model, ours, theirs, layer):
    result = ours(default_model, ["sample:chelsea", "sample:coffee"], layer)
    inputs = torch.stack([default_model.preprocessing.to_tensor(default_model_picture(n)) for n in ("chelsea", "coffee")])
    expected = reference_maps(theirs, default_model.module, layer, inputs, list(result.coords["target"].values))
    assert list(result.coords["image"].values) == ["sample:chelsea", "sample:coffee"]
    assert result.coords["target_name"].values[1] == "espresso"
    for index in range(2):
        assert pearson(result.values[index], expected[index]) >= 0.999
    assert total_hooks(default_model.module) == 0


def default_model_picture(name: str):
    from scorecam_explorer.images import load_image

    return load_image(f"sample:{name}")


def test_class_names_follow_the_rules_of_compose(tiny_cnn):
    from scorecam_explorer.baselines import targets_from_logits
    from scorecam_explorer.models import from_module, imagenet_class_names

    names = imagenet_class_names()
    logits = torch.zeros(1, 1000)
    assert targets_from_logits(" tabby", logits, names) == [281]  # spaces and case are ignored
    assert targets_from_logits("TABBY ", logits, names) == [281]
    with pytest.raises(UnknownClassError, match="ambiguous: classes 264, 474"):  # "Cardigan" and "cardigan"
        targets_from_logits("cardigan", logits, names)
    with pytest.raises(UnknownClassError, match="Did you mean: tabby"):
        targets_from_logits("tabbyy", logits, names)
    model = from_module(tiny_cnn, class_names=[f"thing{i}" for i in range(8)] + ["Twin", "twin"], input_size=32)
    inputs = normal(1, 3, 32, 32, seed=9)
    with pytest.raises(UnknownClassError, match="ambiguous: classes 8, 9"):
        gradcam(model, inputs, "features.3", "twin")
    np.testing.assert_array_equal(
        gradcam(model, inputs, "features.3", "  Thing3 ").values, gradcam(model, inputs, "features.3", 3).values
    )


class UnusedBranch(nn.Module):
    """``aux`` runs in every forward pass but the logits do not use its output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.aux(h)
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", [gradcam, gradcam_pp], ids=["gradcam", "gradcam++"])
def test_a_layer_that_does_not_feed_the_output_is_a_clear_error(method):
    model = UnusedBranch().train()
    with pytest.raises(UnknownLayerError, match="output does not depend on layer 'aux'"):
        method(model, normal(2, 3, 8, 8, seed=10), "aux", 0)
    assert total_hooks(model) == 0
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert method(model, normal(2, 3, 8, 8, seed=11), "a", 0).shape == (2, 8, 8)  # the used layer works


@pytest.mark.parametrize("method", [gradcam, gradcam_pp], ids=["gradcam", "gradcam++"])
@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True, None])
def test_batch_size_must_be_a_positive_integer(tiny_cnn, method, batch_size):
    calls = []
    tiny_cnn.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ScorecamError, match="batch_size must be a positive integer"):
        method(tiny_cnn, normal(2, 3, 32, 32, seed=12), "features.3", 0, batch_size=batch_size)
    assert not calls
    assert method(tiny_cnn, normal(3, 3, 32, 32, seed=13), "features.3", 0, batch_size=np.int64(2)).shape == (3, 32, 32)
