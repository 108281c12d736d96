r"""Per-channel Score-CAM statistics across the images of a dataset store, computed lazily.

For a layer with channels k = 1..C, a class c and a weighting preset (see
:mod:`scorecam_explorer.presets`), image i gives channel weights w_ik (what
:func:`~scorecam_explorer.compose.channel_weights` returns for that image alone). Across
the N complete images of a store:

    weight_mean_k        = (1/N) sum_i w_ik
    weight_std_k         = sqrt((1/N) sum_i (w_ik - weight_mean_k)^2)      (population)
    weight_min_k, weight_max_k
    top_k_frequency_k    = (1/N) #{i : k is among the top_k largest w_i.}  (ties: lower id)
    constant_frequency_k = (1/N) #{i : A_ik is constant}  (its mask is zero: it cannot matter)

Everything returned is a dask-backed ``xarray`` object: building it reads nothing but the
``complete`` flags and the class names; ``.compute()`` (or ``.values``) reads the store one
image at a time, on the Dask cluster if a ``Client`` is active. The weights of a block of
images come from the same kernels as :mod:`scorecam_explorer.compose`
(:func:`scorecam_explorer.kernels.target_scores`, :func:`~scorecam_explorer.kernels.preset_weights`),
so they are bit-identical to ``channel_weights``. No torch is imported.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import xarray as xr

from scorecam_explorer.cache import cache_layers, cache_sampler
from scorecam_explorer.errors import (
    CacheError,
    ScorecamError,
    UnknownLayerError,
    did_you_mean,
)
from scorecam_explorer.dataset_store import complete_rows, open_dataset
from scorecam_explorer.kernels import preset_weights, rank_order, ranks, target_scores, top_k_mask
from scorecam_explorer.presets import Preset, check_preset_applies, get_preset
from scorecam_explorer.targets import class_index

__all__ = ["channel_statistics", "dataset_channel_maps", "dataset_channel_weights", "dataset_top_channels"]

Dataset = Union[str, os.PathLike, xr.DataTree]
ClassTarget = Union[int, str, None]
STATISTICS = ("weight_mean", "weight_std", "weight_min", "weight_max", "top_k_frequency", "constant_frequency")


def dataset_channel_weights(
    dataset: Dataset, layer: str, target: ClassTarget, *, preset: str | Preset = "paper"
) -> xr.DataArray:
    """The channel weights w_ik of every image, lazily: dims (image, channel), float64.

    Args:
        dataset: a dataset store's path, or a cache (from ``open_dataset``, ``load_cache``
            or ``compute_cache``). Of a path, only the complete images are used.
        layer: a layer the store holds.
        target: a class index, a class name (case-insensitive), or None for each image's
            top-1 class.
        preset: a weighting preset name or object (``paper``, ``official``, ...); one that
            does not apply to the store's mask sampler (``official`` on an SS-CAM or IS-CAM
            store, which keeps the mean of S outputs) is refused with a ScorecamError.

    The coordinate ``target`` (along image) holds the class each image was weighted for.
    """
    tree = _open(dataset)
    chosen = check_preset_applies(get_preset(preset), cache_sampler(tree))
    node = _layer_node(tree, layer)
    class_index = _class_index(tree, target)
    masked_logits = node["masked_logits"].chunk({"channel": -1, "class": -1})
    logits = tree["logits"].chunk({"class": -1})
    baseline = tree["baseline_logits"].chunk({"class": -1})
    constant = node["constant"].chunk({"channel": -1})
    weights = xr.apply_ufunc(
        _weights_block,
        masked_logits,
        logits,
        baseline,
        constant,
        input_core_dims=[["channel", "class"], ["class"], ["class"], ["channel"]],
        output_core_dims=[["channel"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        kwargs={"target": class_index, "preset": chosen, "layer": layer},
    )
    if class_index is None:
        targets = logits.argmax("class")
    else:
        targets = xr.full_like(logits.isel({"class": 0}), class_index, dtype=np.int64)
    weights = weights.transpose("image", "channel").assign_coords(
        channel=node["channel"].values, target=("image", targets.data)
    )
    weights.name = "weight"
    weights.attrs = {"layer": layer, "preset": chosen.name, "target": _target_label(tree, class_index)}
    return weights


def channel_statistics(
    dataset: Dataset,
    layer: str,
    target: ClassTarget,
    *,
    preset: str | Preset = "paper",
    top_k: int = 10,
) -> xr.Dataset:
    """Per-channel statistics of the weights across images (see the module docstring), lazily.

    Returns a Dataset with dim ``channel`` and the variables of :data:`STATISTICS`; its
    attributes say the layer, preset, target, ``top_k`` and the number of images. Channels
    with ``top_k_frequency`` 0 never rank among an image's ``top_k``; channels with
    ``constant_frequency`` 1 never carry a signal at all.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ScorecamError(f"top_k must be a positive integer, not {top_k!r}.")
    tree = _open(dataset)
    weights = dataset_channel_weights(tree, layer, target, preset=preset)
    count = min(int(top_k), weights.sizes["channel"])
    in_top = xr.apply_ufunc(
        _top_k_block,
        weights,
        input_core_dims=[["channel"]],
        output_core_dims=[["channel"]],
        dask="parallelized",
        output_dtypes=[bool],
        kwargs={"count": count},
    )
    constant = _layer_node(tree, layer)["constant"]
    statistics = xr.Dataset(
        {
            "weight_mean": weights.mean("image"),
            "weight_std": weights.std("image"),
            "weight_min": weights.min("image"),
            "weight_max": weights.max("image"),
            "top_k_frequency": in_top.mean("image"),
            "constant_frequency": constant.astype(np.float64).mean("image"),
        }
    ).drop_vars("target", errors="ignore")
    statistics.attrs = {**weights.attrs, "top_k": count, "images": int(weights.sizes["image"])}
    return statistics


def dataset_top_channels(statistics: xr.Dataset, k: int, *, by: str = "weight_mean") -> xr.DataArray:
    """The ``k`` channels of largest ``statistics[by]``, best first (computes that variable).

    Dims (rank), values the channel ids, with the statistic as a coordinate named ``by``.
    Ties go to the lower channel id. ``by`` is one of :data:`STATISTICS`.
    """
    if by not in STATISTICS or by not in statistics.data_vars:
        raise ScorecamError(
            f"cannot rank channels by {by!r}; choose one of {', '.join(STATISTICS)}.{did_you_mean(by, STATISTICS)}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ScorecamError(f"k must be a positive integer, not {k!r}.")
    values = np.asarray(statistics[by].values, dtype=np.float64)
    order = rank_order(values)[: int(k)]
    channels = np.asarray(statistics["channel"].values)[order]
    return xr.DataArray(
        channels,
        dims=("rank",),
        coords={"rank": np.arange(len(order)), by: ("rank", values[order])},
        name="channel",
        attrs={**statistics.attrs, "by": by},
    )


def dataset_channel_maps(
    dataset: Dataset, layer: str, channel: int, target: ClassTarget, *, preset: str | Preset = "paper"
) -> xr.Dataset:
    """One channel across the images, lazily: its maps, weight and contribution per image.

    Variables: ``activation`` A_ik (image, fy, fx), ``weight`` w_ik (image),
    ``contribution`` w_ik A_ik (image, fy, fx), ``weight_rank`` (image: the channel's place among
    the image's weights, 0 = largest; ties to the lower id) and ``constant`` (image).
    """
    tree = _open(dataset)
    node = _layer_node(tree, layer)
    channels = node.sizes["channel"]
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= int(channel) < channels:
        raise ScorecamError(f"channel must be an integer in 0..{channels - 1}, not {channel!r}.")
    weights = dataset_channel_weights(tree, layer, target, preset=preset)
    rank = xr.apply_ufunc(
        _rank_block,
        weights,
        input_core_dims=[["channel"]],
        output_core_dims=[["channel"]],
        dask="parallelized",
        output_dtypes=[np.int64],
    )
    activation = node["activation"].isel(channel=int(channel))
    weight = weights.isel(channel=int(channel))
    maps = xr.Dataset(
        {
            "activation": activation,
            "weight": weight,
            "contribution": weight * activation,
            "weight_rank": rank.isel(channel=int(channel)),
            "constant": node["constant"].isel(channel=int(channel)),
        }
    )
    maps.attrs = {**weights.attrs, "channel": int(channel)}
    return maps


# ---- blocks: numpy on a chunk of images --------------------------------------------------


def _weights_block(
    masked_logits: np.ndarray,
    logits: np.ndarray,
    baseline_logits: np.ndarray,
    constant: np.ndarray,
    *,
    target: int | None,
    preset: Preset,
    layer: str,
) -> np.ndarray:
    """w (n, C) for n images, computed as :func:`scorecam_explorer.compose.channel_weights` does."""
    n_images = masked_logits.shape[0]
    targets = logits.argmax(axis=-1) if target is None else np.full(n_images, target, dtype=np.int64)
    scores = target_scores(masked_logits, logits, baseline_logits, constant, targets)
    return preset_weights(
        preset,
        scores,
        layer=layer,
        reason="the store holds NaN or inf in its masked outputs (an incomplete or damaged row)",
    )


def _top_k_block(weights: np.ndarray, *, count: int) -> np.ndarray:
    """Whether each channel is among the ``count`` largest weights of its image."""
    return top_k_mask(weights, count)


def _rank_block(weights: np.ndarray) -> np.ndarray:
    """Each channel's place among its image's weights (0 = largest, ties to the lower id)."""
    return ranks(weights)


# ---- arguments ---------------------------------------------------------------------------


def _open(dataset: Dataset) -> xr.DataTree:
    if isinstance(dataset, xr.DataTree):
        tree = complete_rows(dataset)
    elif isinstance(dataset, (str, os.PathLike)):
        tree = open_dataset(dataset)
    else:
        raise CacheError(f"expected a dataset store path or a cache (xarray.DataTree), not {type(dataset).__name__}.")
    if tree.sizes.get("image", 0) == 0:
        raise CacheError("the dataset holds no complete image yet; run compute_dataset on it first.")
    return tree


def _layer_node(tree: xr.DataTree, layer: str) -> xr.Dataset:
    layers = cache_layers(tree)
    if not isinstance(layer, str) or layer not in layers:
        raise UnknownLayerError(
            f"layer {layer!r} is not in this dataset; it holds: {', '.join(layers) or 'none'}."
            f"{did_you_mean(str(layer), layers)}"
        )
    return tree[layer].to_dataset()


def _class_names(tree: xr.DataTree) -> list[str]:
    if "class_name" in tree.dataset.coords:
        return [str(name) for name in tree["class_name"].values]
    return [str(index) for index in range(tree.sizes["class"])]


def _class_index(tree: xr.DataTree, target: ClassTarget) -> int | None:
    return None if target is None else class_index(target, _class_names(tree))


def _target_label(tree: xr.DataTree, class_index: int | None) -> str:
    if class_index is None:
        return "top-1 class of each image"
    return f"{class_index} ({_class_names(tree)[class_index]})"
