"""Convolutions fused with the ReLU / ReLU6 / residual addition after them (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import fx, nn
from _tiny_models import batchnorm_cnn

from scorecam_explorer import runtime
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
        torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused(x.contiguous(memory_format=torch.channels_last)), model(x), rtol=1e-6, atol=1e-6)


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
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def broken(self, *args):
        raise RuntimeError("unsupported by this oneDNN")

    monkeypatch.setattr(FusedConv2d, "forward", broken)
    cache = compute_cache(model, x, "5", progress=False)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    np.testing.assert_allclose(cache["5"]["masked_logits"].values, plain["5"]["masked_logits"].values, rtol=1e-5, atol=1e-5)


def test_folded_and_fused_resnet18_equals_the_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # running statistics that are not the identity, so folding does something
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 2)
    folded = runtime._fold(model)
    fused = fuse_pointwise(folded)
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 20  # every convolution
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused(x), folded(x), rtol=1e-5, atol=1e-5)


def test_compute_cache_with_fusion_gives_the_scores_of_the_plain_model(tiny_cnn_with_batchnorm):
    model = tiny_cnn_with_batchnorm
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    folded = compute_cache(model, x, "5", progress=False, fuse_pointwise=False)
    fused = compute_cache(model, x, "5", progress=False)
    for other in (folded, fused):
        np.testing.assert_allclose(other["5"]["masked_logits"].values, plain["5"]["masked_logits"].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused["5"]["masked_logits"].values, folded["5"]["masked_logits"].values)
    assert fused.attrs["forward_passes"] == plain.attrs["forward_passes"] + 1  # the fused copy's check pass
    assert not runtime.has_hooks(model)


def test_a_fused_copy_that_differs_is_rejected_and_the_folded_one_used(tiny_cnn_with_batchnorm, monkeypatch):
    model = tiny_cnn_with_batchnorm
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    real_forward = FusedConv2d.forward
    monkeypatch.setattr(FusedConv2d, "forward", lambda self, *args: real_forward(self, *args) + 1.0)
    broken = compute_cache(model, x, "5", progress=False)
    folded = runtime.folded_batchnorm(model, runtime.copy_key(model, weights_fingerprint(model), "cpu"))  # the engine's copy
    assert folded is not None and runtime.fused_copy(folded) is None  # rejected for good
    monkeypatch.setattr(FusedConv2d, "forward", real_forward)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    np.testing.assert_allclose(broken["5"]["masked_logits"].values, plain["5"]["masked_logits"].values, rtol=1e-5, atol=1e-5)
    # the failed check of the fused copy, then the folded copy's check
    assert broken.attrs["forward_passes"] == plain.attrs["forward_passes"] + 2


def test_bfloat16_runs_unfused(tiny_cnn_with_batchnorm):
    calls: list[str] = []
    model = tiny_cnn_with_batchnorm
    x = torch.randn(1, 3, 32, 32)
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
