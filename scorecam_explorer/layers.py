"""Which layers of a model Score-CAM can target, found by one probe forward pass.

A layer is *targetable* when its module runs exactly once per forward pass and its output,
read through the layer's layout (:mod:`scorecam_explorer.layouts`; ``nchw`` unless given),
gives channel maps (N, C, h, w): for the default layout, a 4-D (N, C, H, W) tensor. A module
that runs twice (a shared activation, as in some EfficientNet ports) would give a hook the
wrong activation, so it is never offered. Of the targetable
layers, the *listed* ones are those a person picks from: direct children of the model and
children of ``nn.Sequential`` containers (stages, blocks, the layers of a VGG ``features``);
the internals of a residual block are targetable by name but not listed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from scorecam_explorer.capture import eval_mode
from scorecam_explorer.layouts import NCHW, LayerLayout, hint, maps_or_problem

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class LayerInfo:
    """A targetable layer: its ``named_modules()`` name and the size of its channel maps
    (through its layout) at the model's input size."""

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


LayoutFor = Callable[[str], LayerLayout]
"""A layer name -> its layout (``LoadedModel.layout_for``)."""

InputSize = Union[int, tuple[int, int]]
"""The probe input's size: a side (square) or (height, width)."""


def input_hw(input_size: InputSize) -> tuple[int, int]:
    """``input_size`` as (height, width)."""
    if not isinstance(input_size, (tuple, list)):
        return (int(input_size), int(input_size))
    height, width = input_size
    return (int(height), int(width))


def _probe_input(model: nn.Module, input_size: InputSize) -> torch.Tensor:
    """Zeros (1, 3, H, W) on the model's device."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.zeros(1, 3, *input_hw(input_size), device=device)


def probe_layers(
    model: nn.Module, input_size: InputSize, layout_for: LayoutFor | None = None
) -> tuple[list[LayerInfo], str | None]:
    """All targetable layers in the order they finish (shallow to deep) and the default target.

    The probe input is zeros of ``input_size`` (a side, or (height, width)). ``layout_for`` gives each layer's layout (default: ``nchw`` for every layer); a layer whose
    output does not fit its layout is not targetable.

    The default target is the last listed layer with a spatial map larger than 1x1 that is not a
    pooling layer (nor a container whose output *is* a pooling layer's output): ``layer4`` for
    a ResNet, ``features.29`` for VGG-16, the head activation for EfficientNet.
    """
    modules = dict(model.named_modules())
    calls: Counter[str] = Counter()
    # Outputs are kept alive during the probe so that "the same tensor" is decided by identity.
    outputs: dict[str, tuple[object, bool]] = {}
    order: list[str] = []
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, _inputs: object, output: object) -> None:
            calls[name] += 1
            if name not in outputs:
                order.append(name)
            outputs[name] = (output, isinstance(module, _POOLING) and isinstance(output, torch.Tensor))

        return hook

    try:
        for name, module in modules.items():
            if name:  # the model itself is not a layer
                handles.append(module.register_forward_hook(make_hook(name)))
        with eval_mode(model), torch.inference_mode():
            model(_probe_input(model, input_size))
    finally:
        for handle in handles:
            handle.remove()

    layers = []
    layout_for = layout_for or (lambda _name: NCHW)
    pooled_outputs = [tensor for tensor, is_pool in outputs.values() if is_pool]
    default: str | None = None
    for name in order:
        tensor, is_pool = outputs[name]
        maps = maps_or_problem(layout_for(name), tensor, 1, input_hw(input_size)) if calls[name] == 1 else None
        if not isinstance(maps, torch.Tensor):
            continue
        channels, height, width = (int(size) for size in maps.shape[1:])
        info = LayerInfo(name, channels, height, width, _is_listed(name, modules))
        layers.append(info)
        if info.listed and info.height * info.width > 1 and not is_pool and not any(tensor is pooled for pooled in pooled_outputs):
            default = name
    return layers, default


def why_not_targetable(model: nn.Module, name: str, input_size: InputSize, layout: LayerLayout = NCHW) -> str:
    """Why the module called ``name`` is not targetable, from one probe pass of its own:
    it does not run, runs more than once, or returns something that ``layout`` does not turn
    into (N, C, h, w) maps (said with the shape it returned, and how to pass a layout)."""
    module = dict(model.named_modules())[name]
    outputs: list[object] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        with eval_mode(model), torch.inference_mode():
            model(_probe_input(model, input_size))
    finally:
        handle.remove()
    if not outputs:
        return "it does not run in a forward pass"
    if len(outputs) > 1:
        return f"it runs more than once per forward pass ({len(outputs)} times), so its activation is ambiguous"
    problem = maps_or_problem(layout, outputs[0], 1, input_hw(input_size))
    if isinstance(problem, torch.Tensor):
        return "its output fits its layout in a probe pass of its own (is its output shared with another layer?)"
    return f"it {problem}; {hint(layout)}"
