"""Gradient baselines: Grad-CAM and Grad-CAM++ on the same layers as Score-CAM.

Both explain the score y^c of class c (the logit, before softmax) at a layer with activation
maps A_k (k = 1..C, each of size u x v) as

    L^c = ReLU( sum_k w_k^c A_k )

and differ only in the channel weights w_k^c, computed from the gradients
g_k,ij = d y^c / d A_k,ij:

* Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1):
  w_k = (1 / uv) sum_ij g_k,ij                          (global average of the gradient)
* Grad-CAM++ (Chattopadhyay et al., WACV 2018, eq. 19, with the exponential-score closed form
  used by pytorch-grad-cam, i.e. second and third derivatives g^2 and g^3):
  alpha_k,ij = g^2 / (2 g^2 + (sum_ab A_k,ab) g^3 + eps),   alpha = 0 where g = 0
  w_k = sum_ij alpha_k,ij ReLU(g_k,ij)

The map is computed at feature resolution, bilinearly upsampled (half-pixel centres, i.e.
``align_corners=False``, as OpenCV's ``resize``) to the input size and min-max normalised to
[0, 1] per image; an all-zero map stays all zero.

Gradients are taken exactly at the layer's output: a forward hook swaps the output for a copy
``Z`` of it whose gradient autograd computes, so in-place operations further on (ResNet's
``out += identity`` and ``ReLU(inplace=True)``) can neither change the recorded activation nor
the gradient, and back-propagation stops at the layer. Hooks are removed, and the model's
``requires_grad`` flags and train/eval modes restored, also when an exception is raised.
A layer whose output is not (N, C, H, W) is read through the layout its LoadedModel gives it
(:mod:`scorecam_explorer.layouts`): A = to_maps(O) and g = to_maps(d y^c / d O).

The weight rules live with their methods (:mod:`scorecam_explorer.methods.gradcam`,
:mod:`scorecam_explorer.methods.gradcam_pp`); this module is the pipeline they share.
:data:`GRADIENT_METHODS` is a live view of the registry's gradient methods.

This module also holds the small helpers the metrics share: turning a model argument into a
module, pictures into one input batch, and a target argument into one class per image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from scorecam_explorer.capture import eval_mode
from scorecam_explorer.errors import (
    NonFiniteError,
    ScorecamError,
    UnknownClassError,
    UnknownLayerError,
    did_you_mean,
)
from scorecam_explorer.inputs import InputBatch, prepare_inputs
from scorecam_explorer.layouts import NCHW, LayerLayout, layout_of, maps_of
from scorecam_explorer.methods import ComputeView
from scorecam_explorer.methods.gradcam import gradcam_weights
from scorecam_explorer.methods.gradcam_pp import EPS as GRADCAM_PP_EPS
from scorecam_explorer.methods.gradcam_pp import gradcam_pp_weights
from scorecam_explorer.targets import class_index, names_table

if TYPE_CHECKING:
    from scorecam_explorer.models import LoadedModel

ModelLike = Union["LoadedModel", nn.Module]
TargetLike = Union[int, str, Sequence[Union[int, str]], None]

DEFAULT_BATCH_SIZE = 16
_GRADCAM_PP_EPS = GRADCAM_PP_EPS  # pytorch-grad-cam's epsilon in the alpha denominator


# --------------------------------------------------------------------------------------------
# Model, inputs and targets (shared with the metrics)
# --------------------------------------------------------------------------------------------


def module_of(model: ModelLike) -> nn.Module:
    """The ``nn.Module`` of a LoadedModel, or the module itself."""
    if isinstance(model, nn.Module):
        return model
    module = getattr(model, "module", None)
    if isinstance(module, nn.Module):
        return module
    raise TypeError(f"expected a LoadedModel or a torch.nn.Module, got {type(model).__name__}")


def class_names_of(model: ModelLike) -> list[str] | None:
    """The model's class names when it is a LoadedModel that has them."""
    names = getattr(model, "class_names", None)
    return list(names) if names else None


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU when it has none)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def model_inputs(model: ModelLike, inputs: Any, image_ids: Sequence[str] | None = None) -> InputBatch:
    """The inputs as one float32 batch X (N, 3, H, W) with ids (:func:`scorecam_explorer.inputs.prepare_inputs`).

    ``inputs`` is a tensor (N, 3, H, W) or (3, H, W) that is already preprocessed, or one
    picture / a list of pictures (paths, ``"sample:NAME"``, PIL images, arrays) that are
    preprocessed with the LoadedModel's preprocessing (a bare module has none).
    """
    return prepare_inputs(inputs, getattr(model, "preprocessing", None), image_ids)


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` as an int; ScorecamError unless it is a positive integer."""
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ScorecamError(f"batch_size must be a positive integer, not {batch_size!r}.")
    return int(batch_size)


def targets_from_logits(target: TargetLike, logits: torch.Tensor, class_names: Sequence[str] | None) -> list[int]:
    """One class index per image.

    ``target`` is None (each image's top-1 class), an int, a class name, or a sequence with one
    int or name per image. Names follow the rules of ``compose.scorecam``: surrounding spaces
    and case are ignored, and a name that several classes share is refused. Raises
    UnknownClassError for an index out of range, an unknown name or an ambiguous one.
    """
    n_images, n_classes = int(logits.shape[0]), int(logits.shape[1])
    if target is None:
        return [int(c) for c in logits.argmax(dim=1).tolist()]
    if isinstance(target, (int, np.integer, str)):
        items: list[Any] = [target] * n_images
    else:
        items = list(target)
        if len(items) != n_images:
            raise UnknownClassError(f"{len(items)} targets given for {n_images} images: give one per image")
    table = names_table(class_names) if class_names else None
    return [class_index(item, class_names, count=n_classes, table=table) for item in items]


def resolve_layer(model: ModelLike, layer: str | None, input_size: int | tuple[int, int]) -> str:
    """The layer's ``named_modules()`` name; the model's default layer when ``layer`` is None.

    A bare module's default layer is its family's (torchvision's ViT and Swin,
    :func:`scorecam_explorer.models.model_family`), else the one a probe at ``input_size``
    (the input's side, or (height, width)) finds.
    """
    check = getattr(model, "check_layer", None)
    if callable(check):
        return str(check(layer)) if layer is not None else str(model.default_layer)  # type: ignore[union-attr]
    module = module_of(model)
    if layer is None:
        from scorecam_explorer.layers import probe_layers
        from scorecam_explorer.models import model_family

        family = model_family(module)
        if family is not None and family.default_layer is not None:
            return family.default_layer
        _, default = probe_layers(module, input_size, lambda name: layout_of(module, name))
        if default is None:
            raise UnknownLayerError("the model has no layer with a spatial output to explain: give layer=...")
        return default
    names = [name for name, _ in module.named_modules() if name]
    if layer not in names:
        raise UnknownLayerError(f"the model has no layer named {layer!r}.{did_you_mean(layer, names)}")
    return layer


def forward_in_batches(
    module: nn.Module, inputs: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE
) -> torch.Tensor:
    """f(X) for a batch, run in chunks of ``batch_size`` without gradients; float32 on the CPU."""
    batch_size = check_batch_size(batch_size)
    device = device_of(module)
    outputs = []
    with eval_mode(module), torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            outputs.append(module(inputs[start : start + batch_size].to(device)).float().cpu())
    logits = torch.cat(outputs)
    if not torch.isfinite(logits).all():
        raise NonFiniteError("the model's output holds NaN or inf values")
    return logits


# --------------------------------------------------------------------------------------------
# The Grad-CAM pipeline
# --------------------------------------------------------------------------------------------

WeightFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A method's weight rule: activations A and gradients g (N, C, u, v) -> channel weights (N, C).
Each rule lives in its method's module (:mod:`scorecam_explorer.methods`)."""


@dataclass
class _LayerCapture:
    """Forward hook that replaces the layer's output O with Z = detached copy of O requiring grad.

    O must fit ``layout`` (checked with :func:`~scorecam_explorer.layouts.maps_of`).
    """

    outputs: list[torch.Tensor]
    layer: str = ""
    layout: LayerLayout = NCHW
    input_size: tuple[int, int] | None = None
    calls: int = 0

    def __call__(self, module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
        self.calls += 1
        detached = output.detach() if isinstance(output, torch.Tensor) else output
        maps_of(self.layout, detached, self.layer, input_size=self.input_size)
        leaf = output.detach().clone().requires_grad_(True)  # type: ignore[union-attr]
        self.outputs.append(leaf)
        # Downstream modules get a differentiable copy: in-place operations there modify the
        # copy, never the recorded leaf, and its gradient is d y / d O exactly.
        return leaf.clone()


def layer_gradients(
    model: ModelLike,
    inputs: torch.Tensor,
    layer: str,
    target: TargetLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Activations A and gradients dy^c/dA at ``layer`` (both (N, C, u, v)), logits (N, K), classes.

    The layer's output O is read through its layout (a LoadedModel's ``layout_for``; for a bare
    module its family's, else ``nchw``, A = O; :func:`~scorecam_explorer.layouts.layout_of`) at
    the input's size: A = to_maps(O) and dy/dA = to_maps(dy/dO), exact because a layout only
    reorders and selects O's entries (:mod:`scorecam_explorer.layouts`).

    One forward and one backward pass per batch of images; image n's gradient is taken for its
    own class c_n (``target`` resolved by :func:`targets_from_logits`; None: the top-1 class).
    Images of a batch do not interact in eval mode, so the gradient of sum_n y^{c_n} with
    respect to A gives every image's own gradient.

    Raises UnknownLayerError when the class scores do not depend on the layer's output.
    """
    batch_size = check_batch_size(batch_size)
    module = module_of(model)
    layer_module = dict(module.named_modules())[layer]
    layout = layout_of(model, layer)
    device = device_of(module)
    n_images = int(inputs.shape[0])
    if target is not None and not isinstance(target, (int, np.integer, str)) and len(target) != n_images:
        raise UnknownClassError(f"{len(target)} targets given for {n_images} images: give one per image")
    activations, gradients, logits, classes = [], [], [], []
    with eval_mode(module), torch.enable_grad():
        for start in range(0, n_images, batch_size):
            batch = inputs[start : start + batch_size].to(device)
            size = (int(batch.shape[-2]), int(batch.shape[-1]))
            capture = _LayerCapture(outputs=[], layer=layer, layout=layout, input_size=size)
            handle = layer_module.register_forward_hook(capture)
            try:
                output = module(batch)
            finally:
                handle.remove()
            if capture.calls != 1:
                raise UnknownLayerError(
                    f"layer {layer!r} ran {capture.calls} times in one forward pass; "
                    "its activation is ambiguous: choose a layer that runs exactly once"
                )
            if not isinstance(output, torch.Tensor) or output.ndim != 2:
                raise ScorecamError("the model must return class scores of shape (N, classes)")
            batch_target = target
            if target is not None and not isinstance(target, (int, np.integer, str)):
                batch_target = list(target)[start : start + batch_size]
            batch_classes = targets_from_logits(batch_target, output.detach(), class_names_of(model))
            leaf = capture.outputs[0]
            scores = output.gather(1, torch.as_tensor(batch_classes, device=device)[:, None]).sum()
            # The parameters and inputs need no gradient here, so the scores need one only
            # through the layer's output.
            gradient = torch.autograd.grad(scores, leaf, allow_unused=True)[0] if scores.requires_grad else None
            if gradient is None:
                raise UnknownLayerError(
                    f"the model's output does not depend on layer {layer!r}: its output does not feed "
                    "the class scores; choose a layer on the path to the output"
                )
            activations.append(maps_of(layout, leaf.detach(), layer, input_size=size).float().cpu())
            gradients.append(maps_of(layout, gradient.detach(), layer, input_size=size).float().cpu())
            logits.append(output.detach().float().cpu())
            classes.extend(batch_classes)
    result = torch.cat(activations), torch.cat(gradients), torch.cat(logits)
    for name, tensor in zip(("activation", "gradient", "output"), result):
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"the {name} at layer {layer!r} holds NaN or inf values")
    return (*result, classes)


def weighted_map(activations: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU(sum_k w_k A_k), upsampled bilinearly to ``size`` and min-max normalised to [0, 1].

    (N, C, u, v) and (N, C) -> (N, H, W). A map that is zero everywhere stays zero.
    """
    cam = torch.relu((weights[:, :, None, None] * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    return normalise_maps(cam)


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of (N, H, W) to [0, 1]: (M - min M) / (max M - min M); constant -> 0."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low).clamp(min=0)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - low) / safe, torch.zeros_like(maps))


def gradient_cam(
    method: str,
    weight_function: WeightFunction,
    model: ModelLike,
    inputs: Any,
    layer: str | None,
    target: TargetLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> xr.DataArray:
    """Maps of the gradient method ``method`` whose weight rule is ``weight_function``.

    L^c = ReLU(sum_k w_k A_k) with w = weight_function(A, d y^c / d A), upsampled and min-max
    normalised (:func:`weighted_map`); arguments as for :func:`gradcam`.
    """
    batch = model_inputs(model, inputs)
    height, width = int(batch.tensor.shape[2]), int(batch.tensor.shape[3])
    layer_name = resolve_layer(model, layer, (height, width))
    activations, gradients, _, targets = layer_gradients(model, batch.tensor, layer_name, target, batch_size)
    maps = weighted_map(activations, weight_function(activations, gradients), (height, width))
    return maps_to_dataarray(maps.numpy(), batch.image_ids, targets, class_names_of(model), method, layer_name)


def maps_to_dataarray(
    maps: np.ndarray,
    image_ids: Sequence[str],
    targets: Sequence[int],
    class_names: Sequence[str] | None,
    method: str,
    layer: str,
) -> xr.DataArray:
    """Saliency maps (N, H, W) in [0, 1] as a DataArray with dims (image, y, x).

    Coordinates: ``image`` (ids), ``target`` and ``target_name`` along ``image``.
    Attributes: ``method``, ``layer``.
    """
    if not np.isfinite(maps).all():
        raise NonFiniteError(f"the {method} map at layer {layer!r} holds NaN or inf values")
    names = [class_names[t] if class_names and t < len(class_names) else str(t) for t in targets]
    return xr.DataArray(
        maps.astype(np.float32, copy=False),
        dims=("image", "y", "x"),
        coords={
            "image": list(image_ids),
            "target": ("image", np.asarray(targets, dtype=np.int64)),
            "target_name": ("image", names),
            "y": np.arange(maps.shape[1]),
            "x": np.arange(maps.shape[2]),
        },
        attrs={"method": method, "layer": layer},
        name="saliency",
    )


def gradcam(
    model: ModelLike,
    inputs: Any,
    layer: str | None = None,
    target: TargetLike = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> xr.DataArray:
    """Grad-CAM maps (Selvaraju et al. 2017) in [0, 1] at input resolution, dims (image, y, x).

    L^c = ReLU(sum_k w_k A_k) with w_k = (1/uv) sum_ij d y^c / d A_k,ij, y^c the logit.
    ``model``: LoadedModel or nn.Module; ``inputs``: tensor (N, 3, H, W) or pictures (with a
    LoadedModel's preprocessing); ``layer``: a ``named_modules()`` name (default: the model's
    default layer); ``target``: None (top-1 class), an int, a class name, or one per image.
    """
    return gradient_cam("gradcam", gradcam_weights, model, inputs, layer, target, batch_size)


def gradcam_pp(
    model: ModelLike,
    inputs: Any,
    layer: str | None = None,
    target: TargetLike = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> xr.DataArray:
    """Grad-CAM++ maps (Chattopadhyay et al. 2018) in [0, 1] at input resolution, dims (image, y, x).

    w_k = sum_ij alpha_k,ij ReLU(g_k,ij), alpha = g^2 / (2 g^2 + sum_ab A_k,ab g^3 + eps).
    Arguments as for :func:`gradcam`.
    """
    return gradient_cam("gradcam++", gradcam_pp_weights, model, inputs, layer, target, batch_size)


_gradient_cam = gradient_cam  # the former private name

GRADIENT_METHODS: Mapping[str, Callable[..., xr.DataArray]] = ComputeView("gradients")
"""A live view of the registered gradient methods: key (or alias) -> compute function."""
