"""Capture: one forward pass of the unmasked input that records the chosen layers' activations.

Forward hooks keyed by ``named_modules()`` names record each layer's output O while the model
computes its logits f(X); the layer's layout (:mod:`scorecam_explorer.layouts`, ``nchw``
unless told otherwise) turns O into the channel maps A (N, C, h, w). Hooks are removed when the pass ends, also when it
raises; the model runs in eval mode and without autograd (``torch.inference_mode``), and
every module's train/eval flag is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from scorecam_explorer.errors import NonFiniteError, ScorecamError, UnknownLayerError, closest_names
from scorecam_explorer.layouts import NCHW, LayerLayout, maps_of


@dataclass
class Capture:
    """What one unmasked forward pass recorded.

    Attributes:
        activations: layer name -> A, float32 (N, C, h, w), detached, on the model's device.
        logits: f(X), float32 (N, K).
    """

    activations: dict[str, torch.Tensor]
    logits: torch.Tensor


def check_layer_names(module: nn.Module, names: Sequence[str]) -> list[str]:
    """The requested layer names in model order (shallow to deep), without duplicates.

    Raises UnknownLayerError for a name the model does not have, listing the closest valid
    names first.
    """
    order = {name: index for index, (name, _) in enumerate(module.named_modules()) if name}
    for name in names:
        if name not in order:
            close = closest_names(name, order, limit=8)
            shown = close or list(order)[-8:]
            raise UnknownLayerError(
                f"the model has no layer {name!r}. "
                f"{'Closest' if close else 'Some'} valid names: {', '.join(shown)}."
            )
    return sorted(set(names), key=order.__getitem__)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside; each submodule's train/eval flag and each
    parameter's ``requires_grad`` restored on exit, also after an exception."""
    flags = [(sub, sub.training) for sub in module.modules()]
    requires_grad = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    try:
        module.eval()
        for parameter, _ in requires_grad:
            parameter.requires_grad_(False)
        yield module
    finally:
        for sub, training in flags:
            sub.training = training
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


@contextmanager
def forward_call_counter(module: nn.Module) -> Iterator[list[int]]:
    """Count the model's forward calls: yields a one-item list holding the count.

    A forward pre-hook on the top module adds one per call (one call per batch); it is
    removed on exit, also after an exception.
    """
    count = [0]

    def _count(_module: nn.Module, _inputs: object) -> None:
        count[0] += 1

    handle = module.register_forward_pre_hook(_count)
    try:
        yield count
    finally:
        handle.remove()


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError if ``tensor`` holds NaN or inf (``what`` names it)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"{what} contains {bad} non-finite value(s) (NaN or inf); check the model's weights "
            f"and the input (is it preprocessed as the model expects?)."
        )


def check_logits(output: object) -> torch.Tensor:
    """The model output as a float32 (N, K) tensor, or a clear error if it is not one."""
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        kind = type(output).__name__ if not isinstance(output, torch.Tensor) else f"shape {tuple(output.shape)}"
        raise ScorecamError(
            f"the model must return one (N, classes) tensor of scores, got {kind}; wrap it in a "
            f"module whose forward returns the logits."
        )
    return output.float()


def capture(
    module: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[str],
    layouts: Mapping[str, LayerLayout] | None = None,
) -> Capture:
    """Forward ``inputs`` (N, 3, H, W) once and record the activations of ``layers``.

    Each layer's output O is read through its layout in ``layouts`` (``nchw``, A = O, for a
    layer not in it), for an input of the size of ``inputs``: A = ``to_maps(O)``, (N, C, h, w).

    Raises:
        UnknownLayerError: a name the model does not have (closest names listed), or a layer
            whose output does not fit its layout (not one 4-D (N, C, H, W) tensor for nchw).
        ScorecamError: a layer that runs more than once per forward pass (a module reused at
            several places).
        NonFiniteError: NaN or inf in an activation or in the logits.
    """
    names = check_layer_names(module, layers)
    modules = dict(module.named_modules())
    recorded: dict[str, list[object]] = {name: [] for name in names}

    def _recorder(name: str):
        def _hook(_module: nn.Module, _inputs: object, output: object) -> None:
            # Clone: a later in-place op (``out += identity``, ReLU(inplace=True)) would
            # otherwise change the recorded activation.
            recorded[name].append(output.detach().clone() if isinstance(output, torch.Tensor) else output)

        return _hook

    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(_recorder(name)))
        with eval_mode(module), torch.inference_mode():
            logits = check_logits(module(inputs))
    finally:
        for handle in handles:
            handle.remove()

    layouts = layouts or {}
    activations = {
        name: _single_activation(name, recorded[name], inputs, layouts.get(name, NCHW)) for name in names
    }
    for name, activation in activations.items():
        check_finite(activation, f"the activation of layer {name!r}")
    check_finite(logits, "the model's output on the unmasked input")
    return Capture(activations=activations, logits=logits)


def _single_activation(name: str, outputs: list[object], inputs: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """The maps (N, C, h, w) of the one output a hooked layer produced, or a clear error."""
    if not outputs:
        raise ScorecamError(
            f"layer {name!r} did not run during the forward pass; choose a layer that the model "
            f"uses to compute its output."
        )
    if len(outputs) > 1:
        raise ScorecamError(
            f"layer {name!r} runs {len(outputs)} times per forward pass (the same module is used "
            f"at several places), so its activation is ambiguous; choose a module that runs once."
        )
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    return maps_of(layout, outputs[0], name, int(inputs.shape[0]), size).float()
