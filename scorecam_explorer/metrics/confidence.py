"""Average Drop % and Average Increase in Confidence % (Chattopadhyay et al., WACV 2018).

For image i with class c, let Y_i = softmax(f(X_i))_c be the class probability on the image
and O_i = softmax(f(E_i))_c the probability on its *explanation map* E_i = X_i o M_i, the
image multiplied pixel-wise by the saliency map. Then

    Average Drop %     = (100 / N) sum_i max(0, Y_i - O_i) / Y_i        (lower is better)
    Increase in Conf % = (100 / N) sum_i 1[O_i > Y_i]                    (higher is better)

Wang et al. (Score-CAM, CVPR-W 2020, Table 1) keep only the most salient half of the map:
M_i = H_i * 1[pixel among the top ``keep_fraction`` of H_i] (``keep_fraction=0.5``, the
default; 1.0 gives Grad-CAM++'s original E = X o H). The top pixels are chosen by rank, so
exactly round(keep_fraction * H * W) pixels are kept; ties go to the earlier pixel in
row-major order.

Where the product is taken changes the numbers (Zhang et al., Opti-CAM, 2024), so it is a
parameter recorded with every result:

* ``space="input"`` (default): E = X∘M on the normalised model input; a removed pixel is
  the normalisation mean colour, the same "masked out" as Score-CAM's own masks.
* ``space="pixels"``: E = norm(P o M) with P = X * std + mean the [0, 1] pixels; a removed
  pixel is black. Needs the model's preprocessing (a LoadedModel).

Cost: 2 N extra forward passes (Y and O), batched.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import xarray as xr

from scorecam_explorer.baselines import DEFAULT_BATCH_SIZE, ModelLike, TargetLike, module_of
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.metrics._common import (
    MapsLike,
    batched_probabilities,
    chunks,
    inputs_with_maps,
    logits_of,
    protocol_attrs,
    targets_for,
)

DEFAULT_KEEP_FRACTION = 0.5
SPACES = ("input", "pixels")


def check_keep_fraction(keep_fraction: float) -> float:
    """``keep_fraction`` unchanged; ScorecamError unless 0 < keep_fraction <= 1."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ScorecamError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    return keep_fraction


def check_space(space: str) -> str:
    """``space`` unchanged; ScorecamError unless it is one of :data:`SPACES`."""
    if space not in SPACES:
        raise ScorecamError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")
    return space


def keep_top_fraction(maps: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """M = H * 1[top ``keep_fraction`` of H by rank]; (N, H, W) -> (N, H, W).

    Exactly k = round(keep_fraction * H * W) pixels keep their value (at least one); ties are
    broken in row-major order.
    """
    check_keep_fraction(keep_fraction)
    n_images = maps.shape[0]
    flat = maps.reshape(n_images, -1)
    keep = max(1, int(round(keep_fraction * flat.shape[1])))
    if keep >= flat.shape[1]:
        return maps.clone()
    order = torch.argsort(-flat, dim=1, stable=True)[:, :keep]
    selected = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return torch.where(selected, flat, torch.zeros_like(flat)).reshape(maps.shape)


def explanation_inputs(
    inputs: torch.Tensor,
    masks: torch.Tensor,
    space: str = "input",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """E = X∘M (``space="input"``) or E = ((X std + mean)∘M - mean) / std (``"pixels"``)."""
    if space == "input":
        return inputs * masks[:, None]
    if space == "pixels":
        if mean is None or std is None:
            raise ScorecamError("space='pixels' needs the model's mean and std: pass a LoadedModel")
        mean_t = torch.as_tensor(mean, dtype=inputs.dtype)[None, :, None, None]
        std_t = torch.as_tensor(std, dtype=inputs.dtype)[None, :, None, None]
        pixels = inputs * std_t + mean_t
        return (pixels * masks[:, None] - mean_t) / std_t
    raise ScorecamError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")


def drop_and_increase(full: np.ndarray, explained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image drop 100 max(0, Y - O) / Y and increase 100 * 1[O > Y]."""
    full = np.asarray(full, dtype=np.float64)
    explained = np.asarray(explained, dtype=np.float64)
    if np.any(full <= 0):
        raise ScorecamError("a class probability Y is 0: Average Drop is undefined for that image")
    drop = 100.0 * np.maximum(0.0, full - explained) / full
    increase = 100.0 * (explained > full).astype(np.float64)
    return drop, increase


def average_drop_increase(
    model: ModelLike,
    inputs: Any,
    maps: MapsLike,
    target: TargetLike = None,
    *,
    keep_fraction: float = DEFAULT_KEEP_FRACTION,
    space: Literal["input", "pixels"] = "input",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> xr.Dataset:
    """Average Drop % and Increase in Confidence % of saliency ``maps`` (see the module doc).

    ``maps``: (image, y, x) in [0, 1] at input resolution (a DataArray from :func:`gradcam` or
    ``compose.scorecam``, or an array); ``target``: the explained class (default: the maps'
    ``target`` coordinate, else each image's top-1 class).

    Returns a Dataset along ``image`` with ``probability`` (Y), ``explanation_probability`` (O),
    ``drop`` and ``increase`` (per image, in %), attributes ``average_drop`` and
    ``average_increase`` (the means), ``forward_passes`` and ``protocol`` (JSON).
    """
    check_space(space)
    check_keep_fraction(keep_fraction)
    batch, saliency = inputs_with_maps(model, inputs, maps)
    module = module_of(model)
    logits = logits_of(module, batch.tensor, batch_size)
    classes = targets_for(model, maps, target, logits)
    full = torch.softmax(logits, dim=1).gather(1, torch.as_tensor(classes)[:, None])[:, 0]
    preprocessing = getattr(model, "preprocessing", None)
    explained_inputs = explanation_inputs(
        batch.tensor,
        keep_top_fraction(saliency, keep_fraction),
        space,
        getattr(preprocessing, "mean", None),
        getattr(preprocessing, "std", None),
    )
    explained, passes = batched_probabilities(model, chunks(explained_inputs, classes, batch_size))
    drop, increase = drop_and_increase(full.numpy(), explained.numpy())
    protocol = {
        "metric": "average_drop_increase",
        "source": "Chattopadhyay et al. 2018 (Grad-CAM++), as in Wang et al. 2020 Table 1",
        "score": "softmax probability of the target class",
        "keep_fraction": keep_fraction,
        "space": space,
        "explanation_input": "X∘M" if space == "input" else "normalise((X * std + mean)∘M)",
    }
    return xr.Dataset(
        {
            "probability": ("image", full.numpy().astype(np.float64)),
            "explanation_probability": ("image", explained.numpy().astype(np.float64)),
            "drop": ("image", drop),
            "increase": ("image", increase),
        },
        coords={"image": batch.image_ids, "target": ("image", np.asarray(classes, dtype=np.int64))},
        attrs={
            "average_drop": float(drop.mean()),
            "average_increase": float(increase.mean()),
            "forward_passes": int(passes + len(batch)),
            **protocol_attrs(protocol),
        },
    )
