"""Deletion and Insertion (Petsiuk et al., RISE, BMVC 2018; Wang et al. 2020 Table 3).

Pixels are visited in order of decreasing saliency (ties: row-major order). With P = H * W
pixels and a step of s pixels (default s = round(1% of P)), curve point t = 0..T,
T = ceil(P / s), is the class probability p_t = softmax(f(X_t))_c of the input X_t in which
the first min(t s, P) pixels of that order (all colour channels) are taken from the
*finish* image and the others from the *start* image:

* Deletion: start = X, finish = substrate 0 (zeros of the normalised input, i.e. the
  normalisation mean colour, as RISE's ``torch.zeros_like``). A good map makes p drop fast.
* Insertion: start = blur(X), finish = X; blur = RISE's reference substrate, a 2-D
  convolution (zero padding klen // 2, each colour channel alone) with the kernel
  ``scipy.ndimage.gaussian_filter`` gives for a unit impulse in a klen x klen grid
  (klen = 11, sigma = 5; i.e. a sampled Gaussian folded back at the grid's edges, sum 1).
  A good map makes p rise fast.

The score is the area under the curve over the fraction of pixels changed,
x_t = min(t s, P) / P, by the trapezoid rule:

    AUC = sum_{t=1..T} (x_t - x_{t-1}) (p_t + p_{t-1}) / 2

which equals RISE's ``auc`` (``(sum p - p_0/2 - p_T/2) / T``) when s divides P.
Deletion: lower is better; insertion: higher is better.

Cost: N (T + 1) forward passes per metric (101 per image at the default step), batched
across images and steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from scorecam_explorer.baselines import DEFAULT_BATCH_SIZE, ModelLike, TargetLike, module_of
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.metrics._common import (
    MapsLike,
    batched_probabilities,
    inputs_with_maps,
    logits_of,
    protocol_attrs,
    targets_for,
)

DEFAULT_STEP_FRACTION = 0.01
DEFAULT_BLUR_KERNEL = 11
DEFAULT_BLUR_SIGMA = 5.0
_GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


def gaussian_kernel_1d(sigma: float, truncate: float = _GAUSSIAN_TRUNCATE) -> np.ndarray:
    """scipy's sampled Gaussian: exp(-x^2 / 2 sigma^2) for |x| <= int(truncate sigma + 0.5), sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def check_blur(klen: int, sigma: float) -> None:
    """ScorecamError unless ``klen`` is a positive odd integer and ``sigma`` > 0."""
    if isinstance(klen, (bool, np.bool_)) or not isinstance(klen, (int, np.integer)) or klen < 1 or klen % 2 == 0:
        raise ScorecamError(f"the blur kernel length must be a positive odd number, got {klen!r}")
    if not sigma > 0:
        raise ScorecamError(f"the blur sigma must be positive, got {sigma}")


def rise_blur_kernel(klen: int = DEFAULT_BLUR_KERNEL, sigma: float = DEFAULT_BLUR_SIGMA) -> np.ndarray:
    """RISE's ``gkern(klen, sigma)`` for one channel: gaussian_filter of a centred impulse, (klen, klen).

    The filter is separable; scipy's default boundary mode ``reflect`` (d c b a | a b c d)
    folds the Gaussian's tails back into the klen x klen grid.
    """
    check_blur(klen, sigma)
    weights = gaussian_kernel_1d(sigma)
    radius = weights.size // 2
    impulse = np.zeros(klen)
    impulse[klen // 2] = 1.0
    padded = np.pad(impulse, radius, mode="symmetric")  # numpy "symmetric" == scipy "reflect"
    profile = np.correlate(padded, weights, mode="valid")
    return np.outer(profile, profile)


def rise_blur(inputs: torch.Tensor, klen: int = DEFAULT_BLUR_KERNEL, sigma: float = DEFAULT_BLUR_SIGMA) -> torch.Tensor:
    """Blur each colour channel of (N, C, H, W) with :func:`rise_blur_kernel`, zero padding klen // 2."""
    kernel = torch.as_tensor(rise_blur_kernel(klen, sigma), dtype=inputs.dtype)
    channels = inputs.shape[1]
    weight = kernel[None, None].repeat(channels, 1, 1, 1)
    return F.conv2d(inputs, weight, padding=klen // 2, groups=channels)


def saliency_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Position of each pixel in decreasing-saliency order (ties: row-major); (N, H, W) -> (N, H*W)."""
    flat = maps.reshape(maps.shape[0], -1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return ranks


def check_step_fraction(step_fraction: float) -> float:
    """``step_fraction`` unchanged; ScorecamError unless 0 < step_fraction <= 1."""
    if not 0.0 < step_fraction <= 1.0:
        raise ScorecamError(f"step_fraction must be in (0, 1], got {step_fraction}")
    return step_fraction


def step_size(n_pixels: int, step_fraction: float) -> int:
    """Pixels changed per step: round(step_fraction * P), at least 1."""
    check_step_fraction(step_fraction)
    return max(1, int(round(step_fraction * n_pixels)))


def curve_area(fractions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Trapezoid area under p(x) along the last axis: sum (x_t - x_{t-1}) (p_t + p_{t-1}) / 2."""
    widths = np.diff(fractions)
    return ((scores[..., 1:] + scores[..., :-1]) / 2.0 * widths).sum(axis=-1)


def _curve_inputs(
    start: torch.Tensor,
    finish: torch.Tensor,
    ranks: torch.Tensor,
    classes: list[int],
    counts: np.ndarray,
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of X_t (image-major, then t) and their classes, built lazily."""
    n_images = start.shape[0]
    shape = start.shape[2:]
    pairs = [(i, t) for i in range(n_images) for t in range(counts.size)]
    for offset in range(0, len(pairs), batch_size):
        chunk = pairs[offset : offset + batch_size]
        image_index = [i for i, _ in chunk]
        images = torch.as_tensor(image_index)
        changed = torch.as_tensor(counts[[t for _, t in chunk]])
        replace = (ranks[images] < changed[:, None]).reshape(len(chunk), 1, *shape)
        yield torch.where(replace, finish[images], start[images]), torch.as_tensor([classes[i] for i in image_index])


def _causal_metric(
    mode: str,
    model: ModelLike,
    inputs: Any,
    maps: MapsLike,
    target: TargetLike,
    step_fraction: float,
    blur_kernel: int,
    blur_sigma: float,
    batch_size: int,
) -> xr.Dataset:
    check_step_fraction(step_fraction)
    if mode == "insertion":
        check_blur(blur_kernel, blur_sigma)
    batch, saliency = inputs_with_maps(model, inputs, maps)
    logits = logits_of(module_of(model), batch.tensor, batch_size)
    classes = targets_for(model, maps, target, logits)
    n_pixels = int(saliency.shape[1] * saliency.shape[2])
    step = step_size(n_pixels, step_fraction)
    n_steps = math.ceil(n_pixels / step)
    counts = np.minimum(np.arange(n_steps + 1) * step, n_pixels)
    if mode == "deletion":
        start, finish = batch.tensor, torch.zeros_like(batch.tensor)
        substrate = "zeros of the normalised input (the normalisation mean colour)"
    else:
        start, finish = rise_blur(batch.tensor, blur_kernel, blur_sigma), batch.tensor
        substrate = f"RISE gaussian blur of the normalised input (klen={blur_kernel}, sigma={blur_sigma}, zero padding)"
    ranks = saliency_ranks(saliency)
    probabilities, passes = batched_probabilities(
        model, _curve_inputs(start, finish, ranks, classes, counts, batch_size)
    )
    curves = probabilities.numpy().astype(np.float64).reshape(len(batch), counts.size)
    fractions = counts / n_pixels
    areas = curve_area(fractions, curves)
    protocol = {
        "metric": mode,
        "source": "Petsiuk et al. 2018 (RISE), as in Wang et al. 2020 Table 3",
        "score": "softmax probability of the target class",
        "order": "decreasing saliency, ties in row-major order",
        "step_fraction": step_fraction,
        "step_pixels": step,
        "steps": n_steps,
        "substrate": substrate,
        "start": "input X" if mode == "deletion" else "blurred input",
        "auc": "trapezoid over the fraction of pixels changed",
    }
    if mode == "insertion":
        protocol.update(blur_kernel=blur_kernel, blur_sigma=blur_sigma)
    return xr.Dataset(
        {"curve": (("image", "step"), curves), "auc": ("image", areas)},
        coords={
            "image": batch.image_ids,
            "target": ("image", np.asarray(classes, dtype=np.int64)),
            "step": np.arange(counts.size),
            "fraction": ("step", fractions),
        },
        attrs={
            "mean_auc": float(areas.mean()),
            "forward_passes": int(passes + len(batch)),  # the curve plus f(X) for the class
            **protocol_attrs(protocol),
        },
    )


def deletion(
    model: ModelLike,
    inputs: Any,
    maps: MapsLike,
    target: TargetLike = None,
    *,
    step_fraction: float = DEFAULT_STEP_FRACTION,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> xr.Dataset:
    """Deletion curve and AUC of saliency ``maps`` (lower is better; see the module doc).

    Returns a Dataset with ``curve`` (image, step), its ``fraction`` coordinate, ``auc``
    (image), attributes ``mean_auc``, ``forward_passes`` and ``protocol`` (JSON).
    """
    return _causal_metric(
        "deletion", model, inputs, maps, target, step_fraction, DEFAULT_BLUR_KERNEL, DEFAULT_BLUR_SIGMA, batch_size
    )


def insertion(
    model: ModelLike,
    inputs: Any,
    maps: MapsLike,
    target: TargetLike = None,
    *,
    step_fraction: float = DEFAULT_STEP_FRACTION,
    blur_kernel: int = DEFAULT_BLUR_KERNEL,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> xr.Dataset:
    """Insertion curve and AUC of saliency ``maps`` (higher is better; see the module doc).

    Returns a Dataset like :func:`deletion`'s.
    """
    return _causal_metric(
        "insertion", model, inputs, maps, target, step_fraction, blur_kernel, blur_sigma, batch_size
    )


def deletion_insertion(
    model: ModelLike,
    inputs: Any,
    maps: MapsLike,
    target: TargetLike = None,
    *,
    step_fraction: float = DEFAULT_STEP_FRACTION,
    blur_kernel: int = DEFAULT_BLUR_KERNEL,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Both :func:`deletion` and :func:`insertion` of the same maps."""
    return (
        deletion(model, inputs, maps, target, step_fraction=step_fraction, batch_size=batch_size),
        insertion(
            model,
            inputs,
            maps,
            target,
            step_fraction=step_fraction,
            blur_kernel=blur_kernel,
            blur_sigma=blur_sigma,
            batch_size=batch_size,
        ),
    )
