"""Which layers of a model Score-CAM can target, found by one probe forward pass.

A layer is *targetable* when its module runs exactly once per forward pass and returns a 4-D
(N, C, H, W) tensor: a module that runs twice (a shared activation, as in some EfficientNet
ports) would give a hook the wrong activation, so it is never offered. Of the targetable
layers, the *listed* ones are those a person picks from: direct children of the model and
children of ``nn.Sequential`` containers (stages, blocks, the layers of a VGG ``features``);
the internals of a residual block are targetable by name but not listed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from scorecam_explorer.capture import eval_mode

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class LayerInfo:
    """A targetable layer: its ``named_modules()`` name and output shape at the model's input size."""

    name: str
    channels: int
    height: int
    width: int
    listed: bool = True


def _is_listed(name: str, modules: dict[str, nn.Module]) -> bool:
    if "." not in name:
        return True
    parent = modules.get(name.rsplit(".", 1)[0])
    return isinstance(parent, nn.Sequential)


def probe_layers(model: nn.Module, input_size: int) -> tuple[list[LayerInfo], str | None]:
    """All targetable layers in the order they finish (shallow to deep) and the default target.

    The default target is the last listed layer with a spatial map larger than 1x1 that is not a
    pooling layer (nor a container whose output *is* a pooling layer's output): ``layer4`` for
    a ResNet, ``features.29`` for VGG-16, the head activation for EfficientNet.
    """
    modules = dict(model.named_modules())
    calls: Counter[str] = Counter()
    # Outputs are kept alive during the probe so that "the same tensor" is decided by identity.
    outputs: dict[str, tuple[tuple[int, ...], object, bool]] = {}
    order: list[str] = []
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, _inputs: object, output: object) -> None:
            calls[name] += 1
            if name not in outputs:
                order.append(name)
            if isinstance(output, torch.Tensor):
                outputs[name] = (tuple(output.shape), output, isinstance(module, _POOLING))
            else:
                outputs[name] = ((), None, False)

        return hook

    try:
        for name, module in modules.items():
            if name:  # the model itself is not a layer
                handles.append(module.register_forward_hook(make_hook(name)))
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with eval_mode(model), torch.inference_mode():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()

    layers = []
    pooled_outputs = [tensor for _shape, tensor, is_pool in outputs.values() if is_pool]
    default: str | None = None
    for name in order:
        shape, tensor, is_pool = outputs[name]
        if calls[name] != 1 or len(shape) != 4:
            continue
        info = LayerInfo(name, shape[1], shape[2], shape[3], _is_listed(name, modules))
        layers.append(info)
        if info.listed and info.height * info.width > 1 and not is_pool and not any(tensor is pooled for pooled in pooled_outputs):
            default = name
    return layers, default


def why_not_targetable(model: nn.Module, name: str, input_size: int) -> str:
    """Why the module called ``name`` is not targetable, from one probe pass of its own:
    it does not run, runs more than once, or returns something other than an (N, C, H, W)
    tensor (said with the shape it returned)."""
    module = dict(model.named_modules())[name]
    outputs: list[object] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with eval_mode(model), torch.inference_mode():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        handle.remove()
    if not outputs:
        return "it does not run in a forward pass"
    if len(outputs) > 1:
        return f"it runs more than once per forward pass ({len(outputs)} times), so its activation is ambiguous"
    output = outputs[0]
    if not isinstance(output, torch.Tensor):
        return f"it returns a {type(output).__name__}, not a 4-D (N, C, H, W) tensor"
    return f"it outputs shape {tuple(output.shape)}, not a 4-D (N, C, H, W) tensor"
