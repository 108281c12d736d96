"""Convolutions fused with the ReLU / ReLU6 / residual addition after them (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import fx, nn
from _tiny_models import batchnorm_cnn, normal
from _float32 import assert_close_up_to_rounding

from scorecam_explorer import rewriting
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.fusion import FusedConv2d, fuse_pointwise, pointwise_fusion_available
from scorecam_explorer.models import weights_fingerprint

pytestmark = pytest.mark.skipif(not pointwise_fusion_available(), reason="this torch build has no oneDNN fused convolutions")


class Residual(nn.Module):
    """conv -> ReLU6, a depthwise conv -> ReLU, a residual addition then ReLU, a plain conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.clamp = nn.ReLU6()
        self.depthwise = nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8)
        self.inner = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.clamp(self.stem(x))
        y = torch.relu(self.depthwise(x))
        x = torch.relu(self.inner(y) + x)
        return self.pool(self.head(x)).flatten(1)


def test_every_plain_convolution_is_fused_with_what_follows_and_computes_the_same():
    torch.manual_seed(0)
    model = Residual().eval()
    traced = fx.symbolic_trace(model)
    fused = fuse_pointwise(traced)
    kinds = sorted((m.activation, m.weight.shape[1]) for m in fused.modules() if isinstance(m, FusedConv2d))
    assert kinds == [("hardtanh", 3), ("none", 8), ("relu", 1), ("relu", 8)]  # stem, head, depthwise, residual
    assert not any(type(m) is nn.Conv2d for m in fused.modules())
    assert "add" not in fused.code and "relu" not in fused.code  # absorbed into the fused calls
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        assert_close_up_to_rounding(fused(x), model(x))
        assert_close_up_to_rounding(fused(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_a_convolution_read_twice_keeps_its_own_output():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y  # y is read twice: the ReLU must not be fused into the convolution

    torch.manual_seed(0)
    model = Branching().eval()
    fused = fuse_pointwise(fx.symbolic_trace(model))
    assert [m.activation for m in fused.modules() if isinstance(m, FusedConv2d)] == ["none"]
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x))


def test_a_convolution_called_at_two_places_is_left_unfused():
    """Each call site would add its fused module under the same name, and both sites would
    run the last one (here: the ReLU after the first call lost)."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.conv(torch.relu(self.conv(x))).mean(dim=(2, 3))

    torch.manual_seed(0)
    model = Shared().eval()
    fused = fuse_pointwise(fx.symbolic_trace(model))
    assert [m.activation for m in fused.modules() if isinstance(m, FusedConv2d)] == ["relu"]  # the stem only
    assert fused.code.count("self.conv(") == 2
    x = normal(2, 3, 8, 8, seed=0)
    with torch.inference_mode():
        assert_close_up_to_rounding(fused(x), model(x))


def test_fused_modules_get_names_of_their_own():
    """``a.b`` and ``a_b`` would both become ``fused_a_b``: the second replaced the first."""

    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential()
            self.a.add_module("b", nn.Conv2d(3, 3, 3, padding=1))
            self.a_b = nn.Conv2d(3, 3, 1)
            self.fused_c = nn.Identity()  # the model's own module of a name fusion would pick
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.fused_c(self.c(self.a_b(torch.relu(self.a.b(x)))))

    torch.manual_seed(0)
    model = Clash().eval()
    fused = fuse_pointwise(fx.symbolic_trace(model))
    assert sorted(m.activation for m in fused.modules() if isinstance(m, FusedConv2d)) == ["none", "none", "relu"]
    x = normal(2, 3, 8, 8, seed=1)
    with torch.inference_mode():
        assert_close_up_to_rounding(fused(x), model(x))


def test_an_in_place_addition_into_another_tensor_is_not_fused():
    """``other += conv(x)`` writes into ``other``, which is read again; a fused call would
    write a new tensor instead. (``torch.fx`` traces Python's ``+=`` as ``+``, so the graphs
    are built by hand, as another tracer may leave them.)"""
    import operator

    torch.manual_seed(0)
    root = nn.Module()
    root.conv = nn.Conv2d(3, 3, 3, padding=1)
    inputs = normal(2, 3, 8, 8, seed=2)
    for conv_first in (False, True):
        graph = fx.Graph()
        x = graph.placeholder("x")
        other, conv = graph.call_function(torch.relu, (x,)), graph.call_module("conv", (x,))
        total = graph.call_function(operator.iadd, (conv, other) if conv_first else (other, conv))
        graph.output(graph.call_function(torch.cat, ([total, other], 1)))  # other read after the addition
        model = fx.GraphModule(root, graph).eval()
        fused = fuse_pointwise(model)
        # conv += other writes into the convolution's fresh output: that addition fuses
        assert ("iadd" in fused.code) != conv_first
        with torch.inference_mode():
            assert_close_up_to_rounding(fused(inputs), model(inputs))


def test_a_broadcast_residual_addition_runs_unfused_with_the_same_result():
    class BiasAfterConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return torch.relu(self.conv(x) + self.shift)  # "other" broadcasts: not a residual

    torch.manual_seed(0)
    model = BiasAfterConv().eval()
    fused = fuse_pointwise(fx.symbolic_trace(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x))
        torch.testing.assert_close(fused(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_a_fused_copy_that_fails_to_run_is_rejected(tiny_cnn_with_batchnorm, monkeypatch):
    model = tiny_cnn_with_batchnorm
    x = normal(2, 3, 32, 32, seed=3)

    def broken(self, *args):
        raise RuntimeError("unsupported by this oneDNN")

    monkeypatch.setattr(FusedConv2d, "forward", broken)
    cache = compute_cache(model, x, "5", progress=False)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    assert_close_up_to_rounding(cache["5"]["masked_logits"].values, plain["5"]["masked_logits"].values)


def test_folded_and_fused_resnet18_equals_the_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # running statistics that are not the identity, so folding does something
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 2)
    folded = rewriting._fold(model)
    fused = fuse_pointwise(folded)
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 20  # every convolution
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert_close_up_to_rounding(fused(x), model(x))
        assert_close_up_to_rounding(fused(x), folded(x))


def test_compute_cache_with_fusion_gives_the_scores_of_the_plain_model(tiny_cnn_with_batchnorm):
    model = tiny_cnn_with_batchnorm
    x = normal(2, 3, 32, 32, seed=1)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    folded = compute_cache(model, x, "5", progress=False, fuse_pointwise=False)
    fused = compute_cache(model, x, "5", progress=False)
    for other in (folded, fused):
        assert_close_up_to_rounding(other["5"]["masked_logits"].values, plain["5"]["masked_logits"].values)
    np.testing.assert_array_equal(fused["5"]["masked_logits"].values, folded["5"]["masked_logits"].values)
    assert fused.attrs["forward_passes"] == plain.attrs["forward_passes"] + 1  # the fused copy's check pass
    assert not rewriting.has_hooks(model)


def test_a_fused_copy_that_differs_is_rejected_and_the_folded_one_used(tiny_cnn_with_batchnorm, monkeypatch):
    model = tiny_cnn_with_batchnorm
    x = normal(2, 3, 32, 32, seed=2)
    real_forward = FusedConv2d.forward
    monkeypatch.setattr(FusedConv2d, "forward", lambda self, *args: real_forward(self, *args) + 1.0)
    broken = compute_cache(model, x, "5", progress=False)
    folded = rewriting.folded_batchnorm(model, rewriting.copy_key(model, weights_fingerprint(model), "cpu"))  # the engine's copy
    assert folded is not None and rewriting.fused_copy(folded) is None  # rejected for good
    monkeypatch.setattr(FusedConv2d, "forward", real_forward)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    assert_close_up_to_rounding(broken["5"]["masked_logits"].values, plain["5"]["masked_logits"].values)
    # the failed check of the fused copy, then the folded copy's check
    assert broken.attrs["forward_passes"] == plain.attrs["forward_passes"] + 2


def test_bfloat16_runs_unfused(tiny_cnn_with_batchnorm, native_bfloat16):
    calls: list[str] = []
    model = tiny_cnn_with_batchnorm
    x = normal(1, 3, 32, 32, seed=0)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, _args: calls.append(type(module).__name__) if isinstance(module, FusedConv2d) else None
    )
    try:
        compute_cache(model, x, "5", progress=False, precision="bfloat16")
    finally:
        handle.remove()
    assert calls == []


@pytest.fixture
def tiny_cnn_with_batchnorm() -> nn.Module:
    return batchnorm_cnn(activation=nn.ReLU6)
