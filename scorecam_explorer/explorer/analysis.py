r"""Array work the explorer needs beyond :mod:`scorecam_explorer.compose` (numpy, no torch).

* :func:`channel_mask`: the mask H_k that multiplied the input for channel k, rebuilt from the
  cached activation under the cache's mask convention, in float32 as the engine built it
  (all zero for a channel the cache flags constant).
* :func:`masked_picture`: the masked input X∘H_k, shown as a picture.
* :func:`fidelity_curve`: how close the map of the k heaviest channels is to the full map,
  as a Pearson correlation, for every k at once.
* :func:`pearson`: the correlation of two maps (NaN when one is constant: the metrics' rule),
  and :func:`describe_r` to show it.
* :func:`top_predictions`: the classes the model ranks highest on the unmasked input.

Everything reads a cache (``docs/cache.md``) and returns DataArrays with named dims; the
numpy maths (the engine's float32 masks, Pearson's r, the cumulative top-k correlations) is
:mod:`scorecam_explorer.kernels`, shared with compose and the metrics.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xarray as xr

from scorecam_explorer.cache import convention_fields
from scorecam_explorer.compose import cached_layers, channel_weights, scorecam, upsampling_align_corners
from scorecam_explorer.errors import ScorecamError, UnknownLayerError, did_you_mean
from scorecam_explorer.kernels import cumulative_fidelity, engine_mask, pearson, rank_order, softmax
from scorecam_explorer.presets import get_preset

__all__ = [
    "activation",
    "channel_mask",
    "class_probabilities",
    "describe_r",
    "engine_mask",
    "fidelity_curve",
    "fidelity_from_arrays",
    "layer_node",
    "mask_convention",
    "masked_picture",
    "pearson",
    "picture",
    "top_predictions",
]

# Presets that apply ReLU after upsampling need every top-k map at input resolution: the
# curve is then computed at this many k at most (see fidelity_curve).
_SAMPLED_POINTS = 32


# ---- reading the cache ------------------------------------------------------------------


def mask_convention(cache: xr.DataTree) -> dict[str, Any]:
    """The cache's mask convention as a dict (name, align_corners, normalize, eps)."""
    return convention_fields(cache)


def picture(cache: xr.DataTree, image: int = 0) -> xr.DataArray:
    """The picture as the model saw it, uint8 (y, x, rgb)."""
    return cache["picture"].isel(image=image)


def layer_node(cache: xr.DataTree, layer: str) -> xr.Dataset:
    """The dataset of one cached layer; UnknownLayerError with the cached names if absent."""
    layers = cached_layers(cache)
    if layer not in layers:
        raise UnknownLayerError(
            f"layer {layer!r} is not in this cache; it holds: {', '.join(layers)}.{did_you_mean(layer, layers)}"
        )
    return cache[layer].to_dataset(inherit=False)


def activation(cache: xr.DataTree, layer: str, image: int = 0) -> xr.DataArray:
    """A_k for every channel k of ``layer``: (channel, fy, fx)."""
    return layer_node(cache, layer)["activation"].isel(image=image)


def top_predictions(cache: xr.DataTree, image: int = 0, count: int = 10) -> xr.DataArray:
    """The ``count`` most probable classes of the unmasked input, best first.

    p = softmax(f(X)) over classes. Dims (rank); coords ``class`` (index), ``class_name``;
    values are the probabilities.
    """
    probabilities = class_probabilities(cache, image)
    order = rank_order(probabilities)[: max(1, int(count))]
    names = cache["class_name"].values
    return xr.DataArray(
        probabilities[order],
        dims=("rank",),
        coords={"rank": np.arange(order.size), "class": ("rank", order), "class_name": ("rank", names[order])},
        name="probability",
    )


def class_probabilities(cache: xr.DataTree, image: int = 0) -> np.ndarray:
    """softmax(f(X)) over all classes for one image (float64)."""
    return softmax(cache["logits"].isel(image=image).values.astype(np.float64))


# ---- one channel ------------------------------------------------------------------------


def channel_mask(cache: xr.DataTree, layer: str, channel: int, image: int = 0) -> xr.DataArray:
    r"""The mask H_k of channel ``channel`` at input resolution, in [0, 1]: dims (y, x), float32.

    The mask the engine forwarded, as the cache's mask convention built it (see
    :mod:`scorecam_explorer.conventions` and :func:`engine_mask`): float32, rounded as the
    engine rounds, and all zero for a channel the cache flags ``constant`` (the engine
    forwarded no mask of its own for it: its score is the baseline's). A channel that is
    nearly constant is thus shown as it was scored, not as a float64 rebuild would
    stretch its rounding noise to [0, 1].
    """
    maps = activation(cache, layer, image)
    n_channels = maps.sizes["channel"]
    if not 0 <= int(channel) < n_channels:
        raise ScorecamError(f"channel {channel} is out of range: layer {layer!r} has channels 0..{n_channels - 1}.")
    constant = bool(layer_node(cache, layer)["constant"].isel(image=image, channel=int(channel)).values)
    size = (cache.dataset.sizes["y"], cache.dataset.sizes["x"])
    values = maps.isel(channel=int(channel)).values
    mask = engine_mask(values, size, mask_convention(cache), constant)
    return xr.DataArray(
        mask, dims=("y", "x"), name="mask", attrs={"layer": layer, "channel": int(channel), "constant": int(constant)}
    )


def _preprocessing(cache: xr.DataTree) -> dict[str, Any] | None:
    text = cache.attrs.get("preprocessing", "null")
    try:
        described = json.loads(text) if isinstance(text, str) else text
    except (ValueError, TypeError):
        return None
    return described if isinstance(described, dict) and "mean" in described and "std" in described else None


def masked_picture(cache: xr.DataTree, mask: xr.DataArray, image: int = 0) -> xr.DataArray:
    r"""The masked input X∘H_k shown as a picture: uint8 (y, x, rgb).

    Pixels are (X∘H_k * std + mean) * 255, so a masked-out pixel (H = 0) shows the mean
    colour the model sees as "nothing". Without recorded preprocessing, X is mapped to
    [0, 255] with the range of the unmasked input.
    """
    inputs = cache["input"].isel(image=image).transpose("c", "h", "w").values.astype(np.float64)
    masked = inputs * np.asarray(mask.values, dtype=np.float64)[None]
    described = _preprocessing(cache)
    if described is not None:
        mean = np.asarray(described["mean"], dtype=np.float64)[:, None, None]
        std = np.asarray(described["std"], dtype=np.float64)[:, None, None]
        pixels = (masked * std + mean) * 255.0
    else:
        low, high = inputs.min(), inputs.max()
        pixels = (masked - low) / (high - low if high > low else 1.0) * 255.0
    rgb = np.clip(np.round(np.moveaxis(pixels, 0, -1)), 0, 255).astype(np.uint8)
    return xr.DataArray(rgb, dims=("y", "x", "rgb"), name="masked_picture")


# ---- comparing maps ---------------------------------------------------------------------


def describe_r(r: float, digits: int = 3) -> str:
    """``r`` for display: ``"0.873"``, or ``"undefined (constant map)"`` for NaN."""
    return "undefined (constant map)" if not np.isfinite(r) else f"{r:.{digits}f}"


def _sampled_ks(count: int, limit: int) -> np.ndarray:
    """1..count if that fits ``limit`` values; else every k up to limit / 2, then a geometric
    grid up to ``count`` (always included): about ``limit`` values in all."""
    if count <= limit:
        return np.arange(1, count + 1)
    head_count = min(count, max(1, limit // 2))
    head = np.arange(1, head_count + 1)
    tail = np.round(np.geomspace(head_count + 1, count, max(2, limit - head_count))).astype(np.int64)
    return np.unique(np.concatenate([head, tail, [count]]))


def fidelity_curve(
    cache: xr.DataTree,
    layer: str,
    target: int | str,
    *,
    preset: str = "paper",
    image: int = 0,
    switched_off: frozenset[int] | set[int] | tuple[int, ...] = (),
    max_points: int | None = None,
) -> xr.DataArray:
    r"""Pearson r between the top-k map and the full map, for k = 1 .. (channels switched on).

    The top-k map is ``scorecam(..., channels=<on>, top_k=k)``: the k channels of largest
    weight w_k among those switched on (ties: lower channel id). The full map is
    ``scorecam(...)`` with every channel. Both at input resolution, as displayed. r is
    invariant to the min-max normalisations, so for presets that apply ReLU at feature
    resolution, with R_k = ReLU(sum_{j <= k} w_(j) A_(j)) (channels in weight order),

        r_k = r(Up(R_k), M)

    computed for every k at once from the cumulative sums (see
    :func:`_correlations_after_upsampling`). Presets that apply ReLU after upsampling need
    Up of every cumulative sum: r is computed at up to 32 values of k (all of them for up
    to 32 channels; else every k up to 16, then geometrically spaced, and the last one),
    in float32 with float64 sums (r to about 1e-6); ``max_points`` sets another number (and
    then also samples the other presets). An all-zero top-k map has r = NaN (undefined, as
    in :func:`pearson` and ``topk_fidelity``).

    Returns dims (k) with coordinate ``channel``: the channel added at step k; attrs
    ``layer``, ``preset``, ``switched_off`` (count), ``complete`` (every k present).
    """
    chosen = get_preset(preset)
    weights = channel_weights(cache, layer, target, preset=chosen, image=image).values
    maps = activation(cache, layer, image).values
    full = scorecam(cache, layer, target, preset=chosen, image=image).values
    return fidelity_from_arrays(
        weights,
        maps,
        full,
        switched_off=switched_off,
        relu_at=chosen.relu_at,
        align_corners=upsampling_align_corners(cache, chosen),
        max_points=max_points,
        attrs={"layer": layer, "preset": chosen.name},
    )


def fidelity_from_arrays(
    weights: np.ndarray,
    maps: np.ndarray,
    full: np.ndarray,
    *,
    switched_off: frozenset[int] | set[int] | tuple[int, ...] = (),
    relu_at: str = "feature",
    align_corners: bool = False,
    max_points: int | None = None,
    attrs: dict[str, Any] | None = None,
) -> xr.DataArray:
    """:func:`fidelity_curve` from arrays: weights (channel), activation (channel, fy, fx),
    the full map (y, x), and where the preset applies ReLU."""
    n_channels = weights.shape[-1]
    on = np.ones(n_channels, dtype=bool)
    off = [int(k) for k in switched_off]
    if off and (min(off) < 0 or max(off) >= n_channels):
        raise ScorecamError(f"switched-off channels must lie in 0..{n_channels - 1}.")
    on[off] = False
    if not on.any():
        raise ScorecamError("every channel is switched off: there is no map to compare; reset some channels.")
    order = rank_order(weights, on)[: int(on.sum())]
    if relu_at == "feature" and max_points is None:
        ks = np.arange(1, len(order) + 1)
        values = cumulative_fidelity(weights, maps, full, order, None, align_corners=align_corners)
    else:
        ks = _sampled_ks(len(order), max_points or _SAMPLED_POINTS)
        values = cumulative_fidelity(weights, maps, full, order, ks, relu_at=relu_at, align_corners=align_corners)
    return xr.DataArray(
        values,
        dims=("k",),
        coords={"k": ks, "channel": ("k", order[ks - 1])},
        name="pearson_r",
        attrs={**(attrs or {}), "switched_off": len(off), "complete": int(len(ks) == len(order))},
    )
