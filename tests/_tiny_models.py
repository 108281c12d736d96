"""Small models the Dask tests build on worker processes (importable, so factories pickle by name).

``tiny_model`` is a fixed-seed CNN for 32x32 inputs. ``sabotaged_model`` is the same network
(same weights, same fingerprint) that fails once, mid-computation, in whichever worker process
first claims a marker file: it raises, or it kills its process. ``FORWARD_CALLS`` counts the
forward passes of every tiny model in this process. ``batchnorm_cnn`` is a small network with
BatchNorm for the folding and fusion tests, and ``AWKWARD_MODELS`` are small networks built to
trip those rewrites (shared convolutions, subclasses with their own forward, a hidden flag,
reflect padding, affine-free BatchNorm, outputs read twice, an in-place addition into an
alias). ``tiny_vit`` and ``tiny_swin`` are small random-weight torchvision transformers with
fixed seeds. ``normal`` and ``uniform`` draw seeded test inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from scorecam_explorer.models import LoadedModel, from_module
from scorecam_explorer.preprocessing import Preprocessing

INPUT_SIZE = 32
FORWARD_CALLS = 0


def normal(*shape: int, seed: int, **options) -> torch.Tensor:
    """``torch.randn(*shape)`` from its own seeded generator: the same values in every run,
    whatever ran before (the global generator is neither used nor changed)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **options)


def uniform(*shape: int, seed: int, **options) -> torch.Tensor:
    """``torch.rand(*shape)`` from its own seeded generator (see :func:`normal`)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), **options)


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


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm running statistics (and affine parameters, where it has them)
    far from the identity, from a seeded generator, so that folding changes every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            size = norm.num_features
            norm.running_mean.copy_(torch.rand(size, generator=generator) * 2 - 1)
            norm.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            if norm.affine:
                norm.weight.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
                norm.bias.copy_(torch.rand(size, generator=generator) * 2 - 1)
    return model.eval()


def _conv_bn(cin: int, cout: int, **options) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, **options), nn.BatchNorm2d(cout)]


class _Head(nn.Module):
    """Global average pool and a linear layer into 5 classes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class SharedConvNet(nn.Module):
    """One convolution called at two places, a ReLU after the first call only (BiT-style
    weight sharing, a recurrent block): fusing each call site would give both the same
    fused module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_norm = _conv_bn(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_norm(self.stem(x)))
        x = torch.relu(self.shared(x))
        x = self.norm(self.shared(x))
        return self.head(torch.relu(x))


class WeightStandardisedConv(nn.Conv2d):
    """BiT / ResNetV2's convolution: W' = (W - mean) / sqrt(var + 1e-6) over each output
    channel's weights, then conv(x, W') + b. Folding a BatchNorm into W would be undone by
    the standardisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.standardised(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def standardised(self) -> torch.Tensor:
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return (self.weight - mean) / torch.sqrt(var + 1e-6)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x


class StandardisedSamePaddingConv(WeightStandardisedConv):
    """Weight standardisation with TensorFlow "same" padding in a ``static_padding`` child,
    as the EfficientNet ports pad (but not their plain convolution)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)
        self.static_padding = nn.ZeroPad2d((1, 1, 1, 1))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return self.static_padding(x)


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: BatchNorm then ReLU in one module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class ShiftedReLU(nn.ReLU):
    """max(x - 0.25, 0): a ReLU subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - 0.25)


class SubclassNet(nn.Module):
    """Convolution, BatchNorm and ReLU subclasses with their own forward, each next to a
    plain module that a rewrite would pair it with: a weight-standardised convolution
    before a BatchNorm, one with "same" padding in a child module, a BatchNorm with a ReLU
    inside after a plain convolution, and a shifted ReLU after a plain pair."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = WeightStandardisedConv(3, 8, 3, padding=1)
        self.stem_norm = nn.BatchNorm2d(8)
        self.same = StandardisedSamePaddingConv(8, 8, 3)
        self.same_norm = nn.BatchNorm2d(8)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)
        self.norm_act = BatchNormAct(8)
        self.last, self.last_norm = _conv_bn(8, 8)
        self.shifted = ShiftedReLU()
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_norm(self.stem(x)))
        x = torch.relu(self.same_norm(self.same(x)))
        x = self.norm_act(self.plain(x))
        return self.head(self.shifted(self.last_norm(self.last(x))))


class HiddenFlagNet(nn.Module):
    """A forward that reads a flag ``repr`` does not show, as torchvision Inception3 and
    GoogLeNet read ``transform_input``: the input is re-normalised when it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.transform_input = True
        self.conv1, self.norm1 = _conv_bn(3, 8)
        self.conv2, self.norm2 = _conv_bn(8, 8)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            x = torch.cat([x[:, :1] * 0.458 - 0.03, x[:, 1:2] * 0.448 - 0.088, x[:, 2:] * 0.45 - 0.188], 1)
        x = torch.relu(self.norm1(self.conv1(x)))
        return self.head(torch.relu(self.norm2(self.conv2(x))))


class ReflectPaddingNet(nn.Module):
    """Convolutions with reflect and replicate padding (the fused operators pad with zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv_bn(3, 8, padding_mode="reflect")
        self.conv2, self.norm2 = _conv_bn(8, 8, padding_mode="replicate")
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        return self.head(F.relu6(self.norm2(self.conv2(x))))


class AffineFreeNet(nn.Module):
    """BatchNorm without affine parameters (g = 1, beta = 0), and a convolution without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(8, affine=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(8, affine=False, eps=0.1)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        return self.head(torch.relu(self.norm2(self.conv2(x))))


class ReadTwiceNet(nn.Module):
    """Outputs read twice: a convolution's output by its BatchNorm and by the head, a
    BatchNorm's output by a ReLU and an addition, a folded convolution-BatchNorm's output by
    a ReLU and the head (neither in place nor fused), a residual sum by a ReLU and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv_bn(3, 8)
        self.conv2, self.norm2 = _conv_bn(8, 8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = _Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.norm1(y)
        a = torch.relu(z) + z
        b = self.norm2(self.conv2(a))
        c = nn.functional.relu(b)
        s = self.conv3(c) + a
        return self.head(torch.cat([torch.relu(s), s, b, y], 1))


class AliasedAdditionNet(nn.Module):
    """``out = skip; out += conv(skip)`` then reads ``skip``: the addition writes into
    ``skip`` as well. ``torch.fx`` traces ``+=`` on a traced value as ``+``, so a traced
    copy computes another function; only the check of the copy against the model sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv_bn(3, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.norm1(self.conv1(x)))
        out = skip
        out += self.conv2(skip)  # writes into skip too
        return self.head(torch.cat([out, skip], 1))


AWKWARD_MODELS: dict[str, type[nn.Module]] = {
    "shared convolution": SharedConvNet,
    "subclasses": SubclassNet,
    "hidden flag": HiddenFlagNet,
    "reflect padding": ReflectPaddingNet,
    "affine-free batchnorm": AffineFreeNet,
    "outputs read twice": ReadTwiceNet,
    "addition into an alias": AliasedAdditionNet,
}
"""Name -> class of each awkward model (3 x H x W inputs -> 5 classes)."""


def awkward_model(name: str) -> nn.Module:
    """The awkward model ``name`` with weights and BatchNorm statistics from seed 0, in eval mode."""
    torch.manual_seed(0)
    return randomise_batchnorm(AWKWARD_MODELS[name]())


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


def _seeded(build, seed: int) -> nn.Module:
    """``build()`` with torch's global generator seeded (and put back afterwards), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_vit(seed: int = 0) -> LoadedModel:
    """A random-weight torchvision VisionTransformer for 32 x 32 inputs (patch 8, 2 layers,
    hidden 32, 5 classes), the same weights in every process."""
    import torchvision

    module = _seeded(
        lambda: torchvision.models.VisionTransformer(
            image_size=INPUT_SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
        ),
        seed,
    )
    return from_module(module, name="tiny-vit")


def tiny_swin(seed: int = 0) -> LoadedModel:
    """A random-weight torchvision SwinTransformer (patch 4, embed 16, two stages of one
    block, window 4, 5 classes) probed at 32 x 32, the same weights in every process."""
    import torchvision

    module = _seeded(
        lambda: torchvision.models.SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=5
        ),
        seed,
    )
    return from_module(module, name="tiny-swin", input_size=INPUT_SIZE)
