r"""Array work the explorer needs beyond :mod:`scorecam_explorer.compose` (numpy, no torch).

* :func:`channel_mask`: the mask H_k that multiplied the input for channel k, rebuilt from the
  cached activation under the cache's mask convention.
* :func:`masked_picture`: the masked input X * H_k, shown as a picture.
* :func:`fidelity_curve`: how close the map of the k heaviest channels is to the full map,
  as a Pearson correlation, for every k at once.
* :func:`pearson`: the correlation of two maps.
* :func:`top_predictions`: the classes the model ranks highest on the unmasked input.

Everything reads a cache (``docs/cache.md``) and returns DataArrays with named dims.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xarray as xr

from scorecam_explorer.compose import cached_layers, channel_weights, scorecam
from scorecam_explorer.errors import CacheError, ScorecamError, UnknownLayerError, did_you_mean
from scorecam_explorer.presets import get_preset
from scorecam_explorer.resize import interpolation_matrix, resize_bilinear

# Presets that apply ReLU after upsampling need every top-k map at input resolution: the
# curve is then computed at this many k at most (see fidelity_curve), this many pixels at once.
_SAMPLED_POINTS = 32
_UPSAMPLE_BLOCK_PIXELS = 2_000_000


# ---- reading the cache ------------------------------------------------------------------


def mask_convention(cache: xr.DataTree) -> dict[str, Any]:
    """The cache's mask convention as a dict (name, align_corners, normalize, eps)."""
    text = cache.attrs.get("mask_convention", "{}")
    try:
        return dict(json.loads(text)) if isinstance(text, str) else dict(text)
    except (ValueError, TypeError) as error:
        raise CacheError(f"the cache's mask_convention attribute is not JSON: {error}.") from None


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
    logits = cache["logits"].isel(image=image).values.astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")[: max(1, int(count))]
    names = cache["class_name"].values
    return xr.DataArray(
        probabilities[order],
        dims=("rank",),
        coords={"rank": np.arange(order.size), "class": ("rank", order), "class_name": ("rank", names[order])},
        name="probability",
    )


def class_probabilities(cache: xr.DataTree, image: int = 0) -> np.ndarray:
    """softmax(f(X)) over all classes for one image (float64)."""
    logits = cache["logits"].isel(image=image).values.astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    return probabilities / probabilities.sum()


# ---- one channel ------------------------------------------------------------------------


def _min_max(maps: np.ndarray, eps: float) -> np.ndarray:
    """(M - min M) / (max M - min M + eps) over the last two axes; exactly 0 where constant."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    safe = np.where(span > 0, span + eps, 1.0)
    return np.where(span > 0, (maps - low) / safe, 0.0)


def channel_mask(cache: xr.DataTree, layer: str, channel: int, image: int = 0) -> xr.DataArray:
    r"""The mask H_k of channel ``channel`` at input resolution, in [0, 1]: dims (y, x).

    As the cache's mask convention built it (see :mod:`scorecam_explorer.conventions`):

        after_upsample:   H_k = (U - min U) / (max U - min U + eps),  U = Up(A_k)
        before_upsample:  H_k = Up((A_k - min A_k) / (max A_k - min A_k + eps))

    with Up bilinear (the convention's align_corners) and H_k = 0 for a constant map.
    Computed in float64; the engine's float32 masks agree to about 1e-6.
    """
    maps = activation(cache, layer, image)
    n_channels = maps.sizes["channel"]
    if not 0 <= int(channel) < n_channels:
        raise ScorecamError(f"channel {channel} is out of range: layer {layer!r} has channels 0..{n_channels - 1}.")
    values = maps.isel(channel=int(channel)).values.astype(np.float64)
    convention = mask_convention(cache)
    align = bool(convention.get("align_corners", False))
    eps = float(convention.get("eps", 0.0))
    size = (cache.dataset.sizes["y"], cache.dataset.sizes["x"])
    if convention.get("normalize", "after_upsample") == "before_upsample":
        normalised = _min_max(values, eps)
        mask = normalised if normalised.shape == size else resize_bilinear(normalised, size, align_corners=align)
    else:
        mask = _min_max(resize_bilinear(values, size, align_corners=align), eps)
    return xr.DataArray(mask, dims=("y", "x"), name="mask", attrs={"layer": layer, "channel": int(channel)})


def _preprocessing(cache: xr.DataTree) -> dict[str, Any] | None:
    text = cache.attrs.get("preprocessing", "null")
    try:
        described = json.loads(text) if isinstance(text, str) else text
    except (ValueError, TypeError):
        return None
    return described if isinstance(described, dict) and "mean" in described and "std" in described else None


def masked_picture(cache: xr.DataTree, mask: xr.DataArray, image: int = 0) -> xr.DataArray:
    r"""The masked input X * H_k shown as a picture: uint8 (y, x, rgb).

    Pixels are (X * H_k * std + mean) * 255, so a masked-out pixel (H = 0) shows the mean
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


def pearson(first: xr.DataArray | np.ndarray, second: xr.DataArray | np.ndarray) -> float:
    r"""Pearson's r of two maps over their pixels; 0 when either map is constant.

    r = sum (a - mean a)(b - mean b) / sqrt(sum (a - mean a)^2 sum (b - mean b)^2). A
    constant map (e.g. all zero after ReLU) has no variance; it shares nothing with the
    other map, so r is taken as 0 rather than undefined.
    """
    a = np.asarray(getattr(first, "values", first), dtype=np.float64).ravel()
    b = np.asarray(getattr(second, "values", second), dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ScorecamError(f"cannot correlate maps of {a.size} and {b.size} pixels: resize one first.")
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _align_corners(cache: xr.DataTree, preset_align: bool | None) -> bool:
    if preset_align is not None:
        return preset_align
    return bool(mask_convention(cache).get("align_corners", False))


def _correlations_after_upsampling(
    relu_maps: np.ndarray, full_map: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    r"""r(Up(R_k), M) for feature maps R_k (k, fy, fx), without upsampling any of them.

    Up(R) = Ry R Rx^T is linear, so with n = H W input pixels
        sum Up(R)         = <Ry^T 1 1^T Rx, R>
        sum Up(R)^2       = <Gy R Gx, R>,   Gy = Ry^T Ry, Gx = Rx^T Rx
        sum Up(R) * M     = <Ry^T M Rx, R>
    and r follows from these sums. Maps R_k that are constant get r = 0 (see :func:`pearson`).
    """
    n = full_map.size
    count, height, width = relu_maps.shape
    column_sums = np.outer(rows.sum(axis=0), cols.sum(axis=0)).ravel()
    flat = relu_maps.reshape(count, height * width)
    sums = flat @ column_sums
    # Gy R_k Gx for every k as two plain matrix products (no stacked small products).
    right = (relu_maps.reshape(count * height, width) @ (cols.T @ cols)).reshape(count, height, width)
    both = np.tensordot(rows.T @ rows, right, axes=(1, 1)).transpose(1, 0, 2).reshape(count, height * width)
    squares = np.einsum("kp,kp->k", both, flat)
    cross = flat @ (rows.T @ full_map @ cols).ravel()
    full_centred = full_map - full_map.mean()
    full_variance = (full_centred**2).sum()
    variance = squares - sums**2 / n
    covariance = cross - sums * full_map.mean()
    # A map that is constant in theory can leave rounding noise in `variance`.
    constant = np.ptp(flat, axis=1) == 0
    valid = (~constant) & (variance > 0) & (full_variance > 0)
    safe = np.where(valid, variance * full_variance, 1.0)
    return np.where(valid, covariance / np.sqrt(safe), 0.0)


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
    then also samples the other presets). An all-zero top-k map has r = 0.

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
        align_corners=_align_corners(cache, chosen.align_corners),
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
    order = np.argsort(np.where(on, -weights, np.inf), kind="stable")[: int(on.sum())]
    cumulative = np.cumsum(weights[order, None, None] * maps[order].astype(np.float64), axis=0)  # (k, fy, fx)
    full = np.asarray(full, dtype=np.float64)
    height, width = full.shape
    rows = interpolation_matrix(maps.shape[-2], height, align_corners=align_corners)
    cols = interpolation_matrix(maps.shape[-1], width, align_corners=align_corners)

    if relu_at == "feature" and max_points is None:
        ks = np.arange(1, len(order) + 1)
        values = _correlations_after_upsampling(np.maximum(cumulative, 0.0), full, rows, cols)
    else:
        ks = _sampled_ks(len(order), max_points or _SAMPLED_POINTS)
        values = np.empty(len(ks))
        block = max(1, _UPSAMPLE_BLOCK_PIXELS // (height * width))
        # float32 maps with float64 sums: r to about 1e-6, at half the memory traffic.
        rows32, cols32 = rows.astype(np.float32), cols.astype(np.float32)
        full_centred = (full - full.mean()).ravel().astype(np.float32)
        full_norm = np.sqrt(np.einsum("p,p->", full_centred, full_centred, dtype=np.float64))
        for start in range(0, len(ks), block):
            chunk = cumulative[ks[start : start + block] - 1].astype(np.float32)
            if relu_at == "feature":
                upsampled = rows32 @ np.maximum(chunk, 0.0) @ cols32.T
            else:
                upsampled = np.maximum(rows32 @ chunk @ cols32.T, 0.0)
            flat = upsampled.reshape(len(chunk), -1)
            flat -= flat.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
            norms = np.sqrt(np.einsum("kp,kp->k", flat, flat, dtype=np.float64)) * full_norm
            cross = np.einsum("kp,p->k", flat, full_centred, dtype=np.float64)
            constant = np.ptp(chunk.reshape(len(chunk), -1), axis=1) == 0
            valid = (norms > 0) & ~constant
            values[start : start + block] = np.where(valid, cross / np.where(valid, norms, 1.0), 0.0)
    return xr.DataArray(
        values,
        dims=("k",),
        coords={"k": ks, "channel": ("k", order[ks - 1])},
        name="pearson_r",
        attrs={**(attrs or {}), "switched_off": len(off), "complete": int(len(ks) == len(order))},
    )
