"""Sanity check by cascading model parameter randomisation (Adebayo et al., NeurIPS 2018).

An explanation that reflects what the model learned must change when the learned weights are
destroyed. Starting from the output layer, the parameters of one group of layers after the
other are re-initialised (cumulatively: step s has the top s groups random), the map is
recomputed for the same image and class, and compared with the original map by Spearman's
rank correlation

    rho_s = Pearson( rank(L_0), rank(L_s) )       (ranks over pixels, ties averaged)

A method that passes the check decorrelates: rho falls towards 0 as more layers are random.
A map that stays similar (rho near 1) is insensitive to the model, like an edge detector.

Groups are the modules that own parameters, grouped by the first ``depth`` parts of their
``named_modules()`` name (``depth=2``: ``layer4.1``, ``blocks.15``, ``features.28``; one
block each), in reverse model order. A group is re-initialised with each module's own
``reset_parameters()`` (what Quantus' model parameter randomisation test does; batch norm
thus becomes the identity), with the CPU generator and those of the model's GPUs seeded
with ``seed + step`` and restored afterwards, so the caller's random state is left alone;
parameters of modules without ``reset_parameters`` are drawn from N(0, std of the original
values). The user's model is never modified: the cascade runs on a deep copy.

Methods come from the registry (:mod:`scorecam_explorer.methods`): one that needs masked
passes (Score-CAM) is computed through a cache, any other with its ``compute`` function.

Cost per step: Grad-CAM / Grad-CAM++ one forward and one backward pass per batch of images;
Score-CAM a whole cache (unmasked, baseline and masked batches, plus the engine's check of
each faster copy of the freshly randomised model). The result's ``forward_passes`` counts
model calls as they happen (a call holds up to ``batch_size`` inputs): the pass that resolves
the targets (and the probe that finds a plain module's default layer), then per step the
calls the engine records in each cache (``forward_passes``, ``docs/cache.md``) or the
gradient method's forward calls. It is measured, never derived from a formula.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from scorecam_explorer.baselines import (
    DEFAULT_BATCH_SIZE,
    ModelLike,
    TargetLike,
    check_batch_size,
    class_names_of,
    model_inputs,
    module_of,
    resolve_layer,
)
from scorecam_explorer.capture import forward_call_counter
from scorecam_explorer.errors import ScorecamError, did_you_mean
from scorecam_explorer.methods import get_method, method_keys
from scorecam_explorer.metrics._common import logits_of, protocol_attrs, spearman, targets_for


def __getattr__(name: str) -> Any:
    if name == "SANITY_METHODS":  # every registered method, read when asked (methods may be added)
        return method_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_depth(depth: int, name: str = "depth") -> int:
    """``depth`` as an int; ScorecamError (naming the setting ``name``) unless it is an integer >= 1."""
    if isinstance(depth, (bool, np.bool_)) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ScorecamError(f"{name} must be an integer of at least 1, got {depth!r}")
    return int(depth)


def check_method(method: str) -> str:
    """The registered key of ``method`` (a key or an alias, any case); UnknownMethodError
    (a ScorecamError) for a name the registry (:mod:`scorecam_explorer.methods`) lacks."""
    return get_method(method).key


def _needs_masked_passes(method: str) -> bool:
    return "masked_passes" in get_method(method).needs


def cascade_groups(module: nn.Module, depth: int = 2) -> list[str]:
    """Names of the parameter groups, top (output) first; see the module doc."""
    depth = check_depth(depth)
    groups: list[str] = []
    for name, sub in module.named_modules():
        if not name or not any(p is not None for p in sub._parameters.values()):
            continue
        group = ".".join(name.split(".")[:depth])
        if group not in groups:
            groups.append(group)
    return groups[::-1]


def cuda_devices_of(module: nn.Module) -> list[int]:
    """Indices of the CUDA devices that hold the module's parameters (empty on the CPU)."""
    devices = {
        p.device.index if p.device.index is not None else torch.cuda.current_device()
        for p in module.parameters()
        if p.device.type == "cuda"
    }
    return sorted(devices)


def randomise_group(module: nn.Module, group: str, seed: int) -> int:
    """Re-initialise every parameter under ``group`` (in place, on ``module``); returns the count.

    The draws come from the CPU generator and those of the CUDA devices that hold the module,
    seeded with ``seed`` inside ``fork_rng``: the caller's random state, on the CPU and on
    every GPU, is the same afterwards.
    """
    count = 0
    devices = cuda_devices_of(module)
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        # torch.manual_seed would also reseed GPUs that fork_rng does not restore
        torch.random.default_generator.manual_seed(seed)
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        for name, sub in module.named_modules():
            if not (name == group or name.startswith(group + ".")):
                continue
            own = [p for p in sub._parameters.values() if p is not None]
            if not own:
                continue
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for parameter in own:
                    spread = float(parameter.std()) if parameter.numel() > 1 else 1.0
                    parameter.normal_(0.0, spread if spread > 0 else 1.0)
            count += sum(p.numel() for p in own)
    if count == 0:
        raise ScorecamError(f"no parameters under {group!r} to randomise")
    return count


def _scorecam_maps(
    module: nn.Module, inputs: torch.Tensor, image_ids: list[str], layer: str, targets: list[int], preset: str,
    batch_size: int | None, model: ModelLike, tune_allocator: bool = True,
) -> tuple[np.ndarray, int]:
    """Score-CAM maps (image, y, x) with ``preset``, from a cache computed with the preset's
    own mask convention (as :func:`scorecam_explorer.evaluation.evaluate` computes it), and
    the model calls the engine recorded for them."""
    from scorecam_explorer.compose import scorecam
    from scorecam_explorer.methods.scorecam import scorecam_cache

    cache = scorecam_cache(
        _with_layouts(model, module),
        inputs,
        layer,
        preset=preset,
        batch_size=batch_size,
        image_ids=image_ids,
        tune_allocator=tune_allocator,
        preprocessing=getattr(model, "preprocessing", None),
    )
    maps = scorecam(cache, layer, targets, preset=preset).values
    return maps, int(cache.attrs["forward_passes"])


def _with_layouts(model: ModelLike, module: nn.Module) -> Any:
    """``module`` with the layer layouts ``model`` gives (a LoadedModel with its own layouts),
    else ``module`` as it is (a plain module's family layouts follow its type)."""
    import dataclasses

    layouts, default = getattr(model, "layouts", None), getattr(model, "default_layout", None)
    own = bool(layouts) or (default is not None and getattr(default, "name", "nchw") != "nchw")
    if own and dataclasses.is_dataclass(model) and not isinstance(model, type):
        return dataclasses.replace(model, module=module)
    return module


def module_device_is_cpu(module: nn.Module) -> bool:
    parameter = next(module.parameters(), None)
    return parameter is None or parameter.device.type == "cpu"


def _maps_for(
    method: str, module: nn.Module, inputs: torch.Tensor, image_ids: list[str], layer: str,
    targets: list[int], preset: str, batch_size: int, model: ModelLike, tune_allocator: bool = True,
) -> tuple[np.ndarray, int]:
    """The method's maps (image, y, x) and the model calls made to compute them.

    A LoadedModel's layer layouts (``reshape=`` / ``layout=``) are kept for ``module``."""
    if _needs_masked_passes(method):
        return _scorecam_maps(module, inputs, image_ids, layer, targets, preset, batch_size, model, tune_allocator)
    with forward_call_counter(module) as calls:
        maps = get_method(method).compute(_with_layouts(model, module), inputs, layer, targets, batch_size=batch_size)
    return maps.values, calls[0]


def sanity_check(
    model: ModelLike,
    inputs: Any,
    layer: str | None = None,
    target: TargetLike = None,
    *,
    method: str = "gradcam",
    groups: Sequence[str] | None = None,
    depth: int = 2,
    seed: int = 0,
    preset: str = "paper",
    batch_size: int = DEFAULT_BATCH_SIZE,
    keep_maps: bool = False,
    tune_allocator: bool = True,
) -> xr.Dataset:
    """Cascading randomisation: Spearman rho between the original and each randomised map.

    ``method``: a registered method's key or alias (:mod:`scorecam_explorer.methods`):
    ``scorecam`` (``compute_cache`` + ``compose.scorecam`` with ``preset``), ``gradcam``,
    ``gradcam++`` or any method registered since. ``groups``: the cascade, top first (default
    :func:`cascade_groups` at ``depth``). ``target`` is resolved once on the original model
    (default: each image's top-1 class) and kept for every step.

    Returns a Dataset with ``spearman`` (image, step) (step 0: the original model, rho = 1),
    ``constant_map`` (image, step: the map was all zero, rho undefined = NaN), coordinate
    ``randomised`` (step: the group made random at that step), attributes ``method``,
    ``layer``, ``forward_passes`` (model calls made, measured: see the module doc),
    ``protocol``; with ``keep_maps`` also ``maps`` (step, image, y, x).
    ``tune_allocator`` is passed to ``compute_cache`` (Score-CAM only).
    """
    method = check_method(method)
    depth = check_depth(depth)
    batch_size = check_batch_size(batch_size)
    if _needs_masked_passes(method):
        from scorecam_explorer.presets import get_preset

        get_preset(preset)
    batch = model_inputs(model, inputs)
    original_module = module_of(model)
    with forward_call_counter(original_module) as target_calls:  # the layer probe and f(X) for the targets
        layer_name = resolve_layer(model, layer, tuple(batch.tensor.shape[2:]))
        logits = logits_of(original_module, batch.tensor, batch_size)
    targets = targets_for(model, None, target, logits)
    available = cascade_groups(original_module, depth)
    cascade = list(groups) if groups is not None else available
    every_name = [name for name, _ in original_module.named_modules() if name]
    for group in cascade:
        if group not in every_name:
            raise ScorecamError(f"the model has no module {group!r} to randomise.{did_you_mean(group, available)}")

    work = copy.deepcopy(original_module).eval()  # the user's model stays as it is
    maps, passes = _maps_for(
        method, work, batch.tensor, batch.image_ids, layer_name, targets, preset, batch_size, model, tune_allocator
    )
    passes += target_calls[0]
    original_flat = maps.reshape(maps.shape[0], -1)
    all_maps = [maps] if keep_maps else []
    rho = np.empty((len(batch), len(cascade) + 1))
    constant = np.zeros_like(rho, dtype=bool)
    rho[:, 0] = [spearman(m, m) for m in original_flat]
    constant[:, 0] = original_flat.max(axis=1) == original_flat.min(axis=1)
    for step, group in enumerate(cascade, start=1):
        randomise_group(work, group, seed + step)
        maps, step_passes = _maps_for(
            method, work, batch.tensor, batch.image_ids, layer_name, targets, preset, batch_size, model, tune_allocator
        )
        passes += step_passes
        flat = maps.reshape(maps.shape[0], -1)
        constant[:, step] = flat.max(axis=1) == flat.min(axis=1)
        rho[:, step] = [spearman(a, b) for a, b in zip(original_flat, flat)]
        if keep_maps:
            all_maps.append(maps)
    protocol = {
        "metric": "sanity_check",
        "source": "Adebayo et al. 2018, cascading model parameter randomisation",
        "method": method,
        "layer": layer_name,
        "similarity": "Spearman rank correlation over pixels (ties averaged)",
        "randomisation": "reset_parameters() per module, top group first, cumulative",
        "depth": depth,
        "seed": seed,
    }
    if _needs_masked_passes(method):
        protocol["preset"] = preset
    names = class_names_of(model)
    variables: dict[str, Any] = {
        "spearman": (("image", "step"), rho),
        "constant_map": (("image", "step"), constant),
    }
    if keep_maps:
        variables["maps"] = (("step", "image", "y", "x"), np.stack(all_maps).astype(np.float32))
    return xr.Dataset(
        variables,
        coords={
            "image": batch.image_ids,
            "target": ("image", np.asarray(targets, dtype=np.int64)),
            "target_name": ("image", [names[t] if names else str(t) for t in targets]),
            "step": np.arange(len(cascade) + 1),
            "randomised": ("step", ["none", *cascade]),
        },
        attrs={"method": method, "layer": layer_name, "forward_passes": int(passes), **protocol_attrs(protocol)},
    )
