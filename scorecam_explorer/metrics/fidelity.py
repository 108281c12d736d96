"""Top-k channel fidelity: how much of a Score-CAM map its k heaviest channels already give.

For a cached layer with C channels, class c and the preset's weights w_k (Score-CAM's paper
preset: a softmax over channels of the masked scores), let K_k be the k channels of largest
weight and L_k = N(ReLU(sum_{j in K_k} w_j A_j)) the map they compose (same preset, same
upsampling and normalisation as the full map L_C). Fidelity at k is

    r(k) = Pearson( L_k, L_C )      over the pixels of the map

so r(C) = 1, and a curve that reaches 0.99 at small k says a few channels carry the
explanation (the idea behind Faster Score-CAM's channel pruning). Computed from the cache
only, with the explorer's rule (:func:`scorecam_explorer.kernels.cumulative_fidelity`: r is
invariant to the normalisations, so L_k need not be composed map by map): no forward pass.
r is NaN when either map is constant (all zero after ReLU).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import xarray as xr

from scorecam_explorer.baselines import TargetLike
from scorecam_explorer.cache import cache_layers
from scorecam_explorer.errors import ScorecamError, UnknownLayerError, did_you_mean
from scorecam_explorer.kernels import cumulative_fidelity, rank_order
from scorecam_explorer.metrics._common import protocol_attrs


def default_ks(n_channels: int) -> list[int]:
    """1, 2, 4, ... up to and including the number of channels."""
    ks, k = [], 1
    while k < n_channels:
        ks.append(k)
        k *= 2
    return [*ks, n_channels]


def cache_layer(cache: xr.DataTree, layer: str | None) -> str:
    """``layer`` if the cache holds it; None picks the cache's only (or deepest) layer."""
    layers = cache_layers(cache)
    if layer is None:
        if not layers:
            raise UnknownLayerError("the cache holds no layer")
        return str(layers[-1])
    if layer not in layers:
        raise UnknownLayerError(f"the cache holds no layer {layer!r}; it has: {', '.join(layers)}.{did_you_mean(layer, layers)}")
    return layer


def topk_fidelity(
    cache: xr.DataTree,
    layer: str | None = None,
    target: TargetLike = None,
    ks: Sequence[int] | None = None,
    *,
    preset: str = "paper",
    resolution: str = "input",
) -> xr.DataArray:
    """Pearson r between the map of the k heaviest channels and the full map, dims (image, k).

    ``target``: as for ``compose.scorecam`` (None: each image's top-1 class). ``ks``: the k
    to evaluate (default 1, 2, 4, ..., C). Attribute ``mean_by_k`` (JSON: k -> mean r over
    the images where it is defined), ``protocol``, ``forward_passes`` (0).
    """
    from scorecam_explorer.compose import channel_weights, scorecam, upsampling_align_corners
    from scorecam_explorer.presets import get_preset

    layer = cache_layer(cache, layer)
    n_channels = int(cache[layer].sizes["channel"])
    ks = list(ks) if ks is not None else default_ks(n_channels)
    if not ks or any(isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= n_channels for k in ks):
        raise ScorecamError(f"every k must be an integer in 1..{n_channels} (the layer's channels); got {ks}")
    chosen = get_preset(preset)
    full = scorecam(cache, layer, target, preset=chosen, resolution=resolution)
    targets = [int(t) for t in full.coords["target"].values]
    weights = channel_weights(cache, layer, targets, preset=chosen).values
    activation = cache[layer]["activation"].transpose("image", "channel", "fy", "fx").values
    # the full map's ReLU: after upsampling only for such a preset's input-resolution maps
    relu_at = chosen.relu_at if resolution == "input" else "feature"
    align = upsampling_align_corners(cache, chosen)
    chosen_ks = np.asarray([int(k) for k in ks])
    values = np.empty((full.sizes["image"], len(ks)))
    for row in range(full.sizes["image"]):
        order = rank_order(weights[row])  # the k heaviest channels come first (ties: lower id)
        if relu_at == "feature":  # every k at once, in float64, then the k asked for
            every_k = cumulative_fidelity(weights[row], activation[row], full.values[row], order, None, align_corners=align)
            values[row] = every_k[chosen_ks - 1]
        else:
            values[row] = cumulative_fidelity(
                weights[row], activation[row], full.values[row], order, chosen_ks, relu_at=relu_at, align_corners=align
            )
    means = {
        int(k): (float(np.nanmean(values[:, i])) if np.isfinite(values[:, i]).any() else None)
        for i, k in enumerate(ks)
    }
    protocol = {
        "metric": "topk_fidelity",
        "definition": "Pearson r between the map of the k channels of largest weight and the full map",
        "preset": preset,
        "layer": layer,
        "resolution": resolution,
    }
    return xr.DataArray(
        values,
        dims=("image", "k"),
        coords={
            "image": full.coords["image"].values,
            "target": ("image", np.asarray(targets, dtype=np.int64)),
            "k": np.asarray([int(k) for k in ks]),
        },
        name="pearson_r",
        attrs={"mean_by_k": json.dumps(means), "forward_passes": 0, **protocol_attrs(protocol)},
    )
