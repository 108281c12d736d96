"""Capture: activations from one forward pass, hooks always removed, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from scorecam_explorer.capture import capture, check_layer_names, eval_mode, forward_call_counter
from scorecam_explorer.errors import NonFiniteError, ScorecamError, UnknownLayerError


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def test_activations_equal_a_hand_computed_forward(tiny_cnn, inputs):
    result = capture(tiny_cnn, inputs, ["features.4", "features.1"])
    with torch.no_grad():
        expected_1 = tiny_cnn.features[:2](inputs)
        expected_4 = tiny_cnn.features(inputs)
        expected_logits = tiny_cnn(inputs)
    assert list(result.activations) == ["features.1", "features.4"]  # model order
    torch.testing.assert_close(result.activations["features.1"], expected_1, rtol=0, atol=0)
    torch.testing.assert_close(result.activations["features.4"], expected_4, rtol=0, atol=0)
    torch.testing.assert_close(result.logits, expected_logits, rtol=0, atol=0)
    assert not result.activations["features.4"].requires_grad
    assert_no_hooks(tiny_cnn)


def test_activation_is_not_changed_by_a_later_inplace_op():
    # In a ResNet block, bn2's output is changed in place by ``out += identity``.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    result = capture(model, x, ["layer4.1.bn2"])
    with torch.no_grad():
        features = model.layer4[0](model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
        block = model.layer4[1]
        expected = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(features)))))
    torch.testing.assert_close(result.activations["layer4.1.bn2"], expected, rtol=1e-6, atol=1e-6)
    assert bool((result.activations["layer4.1.bn2"] < 0).any())  # before the block's final ReLU


def test_hooks_removed_and_modes_restored_when_the_forward_raises(tiny_cnn, inputs):
    class Failing(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.inner.features(x)
            raise RuntimeError("boom")

    model = Failing(tiny_cnn).train()
    with pytest.raises(RuntimeError, match="boom"):
        capture(model, inputs, ["inner.features.4"])
    assert_no_hooks(model)
    assert all(module.training for module in model.modules())


def test_train_mode_restored_per_module(tiny_cnn, inputs):
    tiny_cnn.train()
    tiny_cnn.features[0].eval()  # a mixed state must come back exactly
    before = [module.training for module in tiny_cnn.modules()]
    capture(tiny_cnn, inputs, ["features.4"])
    assert [module.training for module in tiny_cnn.modules()] == before


def test_runs_in_eval_mode(inputs):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.9), nn.Flatten(), nn.LazyLinear(5))
    model(inputs)  # materialise the lazy layer
    model.train()
    first = capture(model, inputs, ["0"]).logits
    second = capture(model, inputs, ["0"]).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout off


def test_not_a_feature_map_is_a_clear_error(tiny_cnn, inputs):
    with pytest.raises(ScorecamError, match=r"'classifier' outputs shape \(2, 10\), not a 4-D"):
        capture(tiny_cnn, inputs, ["classifier"])
    assert_no_hooks(tiny_cnn)


def test_unknown_layer_lists_closest_names_first(tiny_cnn, inputs):
    with pytest.raises(UnknownLayerError) as caught:
        capture(tiny_cnn, inputs, ["featurs.3"])
    message = str(caught.value)
    assert "'featurs.3'" in message
    assert message.split("valid names: ")[1].startswith("features.3")


def test_check_layer_names_orders_and_deduplicates(tiny_cnn):
    assert check_layer_names(tiny_cnn, ["classifier", "features.0", "features.0"]) == ["features.0", "classifier"]


def test_reused_module_is_refused(inputs):
    class Reuses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.act(self.conv2(self.act(self.conv1(x))))
            return self.head(x.mean(dim=(2, 3)))

    model = Reuses().eval()
    with pytest.raises(ScorecamError, match="runs 2 times per forward pass"):
        capture(model, inputs, ["act"])
    assert_no_hooks(model)


def test_nan_activation_names_the_layer(tiny_cnn, inputs):
    with torch.no_grad():
        tiny_cnn.features[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'features.3'"):
        capture(tiny_cnn, inputs, ["features.3"])
    assert_no_hooks(tiny_cnn)


def test_inf_logits_are_refused(tiny_cnn, inputs):
    with torch.no_grad():
        tiny_cnn.classifier.bias[3] = float("inf")
    with pytest.raises(NonFiniteError, match="output on the unmasked input"):
        capture(tiny_cnn, inputs, ["features.4"])


def test_model_returning_a_tuple_is_a_clear_error(inputs):
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.mean(dim=(2, 3)), y

    with pytest.raises(ScorecamError, match="must return one"):
        capture(TwoOutputs(), inputs, ["conv"])


def test_call_counter_counts_and_is_removed(tiny_cnn, inputs):
    with forward_call_counter(tiny_cnn) as calls:
        tiny_cnn(inputs)
        tiny_cnn(inputs[:1])
    assert calls[0] == 2
    assert_no_hooks(tiny_cnn)


def test_eval_mode_restores_after_exception(tiny_cnn):
    tiny_cnn.train()
    tiny_cnn.features[0].eval()
    tiny_cnn.features[0].weight.requires_grad_(False)  # mixed flags must come back exactly
    training = [module.training for module in tiny_cnn.modules()]
    requires_grad = [parameter.requires_grad for parameter in tiny_cnn.parameters()]
    with pytest.raises(ValueError), eval_mode(tiny_cnn):
        assert not any(module.training for module in tiny_cnn.modules())
        assert not any(parameter.requires_grad for parameter in tiny_cnn.parameters())
        raise ValueError
    assert [module.training for module in tiny_cnn.modules()] == training
    assert [parameter.requires_grad for parameter in tiny_cnn.parameters()] == requires_grad
