r"""Score-CAM maps recomposed from a cache, with no model and no forward pass.

A cache (see ``docs/cache.md``) holds, per layer, each channel's activation A_k and the
model's full output f(X∘H_k) on the input masked by that channel. Everything here is array
work on it:

    w = preset.weights(scores of the target class)            (image, channel)
    w_k <- 0 for channels switched off (``channels``, ``top_k``)
    S   = sum_k w_k A_k                                        (image, fy, fx)

and then, where the preset says (:mod:`scorecam_explorer.presets`):

    relu_at="feature":  L_feature = N(ReLU(S)),   L_input = N(Up(L_feature))
    relu_at="input":    L_feature = N(ReLU(S)),   L_input = N(ReLU(Up(S)))

with N the min-max normalisation (M - min M) / (max M - min M + eps) (all zero when M is
constant, so a map that ReLU removed entirely stays zero, never NaN) and Up bilinear
upsampling to the input size. Upsampling is linear, so sum_k w_k Up(A_k) = Up(S): the
channels are combined at feature resolution and only one map per image is upsampled. With
N applied before Up (as pytorch-grad-cam does), the result is the same up to epsilon: Up
preserves constants, so it commutes with the affine map N.

The numpy maths (min-max, the preset weights pipeline, channel rankings, Pearson's r) is
:mod:`scorecam_explorer.kernels`, shared with dataset analysis, the explorer and the
metrics; ``pearson`` is re-exported here.

No torch is imported: a saved cache is explored on a machine without it. Arrays are read
from a cache once per (cache object, layer) and kept while the cache object lives; treat a
cache as read-only. From a lazily opened cache or dataset store (``load_cache(lazy=True)``,
``open_dataset``) a call reads the layer's arrays of the images it asks for only (``image=``),
never the whole store: a store of many images holds images x channels x classes masked
outputs per layer.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from scorecam_explorer.cache import cache_layers, cache_sampler, convention_fields
from scorecam_explorer.errors import (
    CacheError,
    NonFiniteError,
    ScorecamError,
    UnknownClassError,
    UnknownLayerError,
    did_you_mean,
)
from scorecam_explorer.kernels import log_normalizer as _log_normalizer
from scorecam_explorer.kernels import min_max as _min_max
from scorecam_explorer.kernels import pearson, preset_weights, rank_order, target_scores, top_k_mask
from scorecam_explorer.presets import PRESETS, Preset, Resolution, TargetScores, check_preset_applies, get_preset
from scorecam_explorer.resize import resize_adjoint, resize_bilinear
from scorecam_explorer.targets import class_index, names_table

__all__ = [
    "PRESETS",
    "cached_layers",
    "channel_contributions",
    "channel_weights",
    "pearson",
    "resolve_targets",
    "scorecam",
    "top_channels_by_variance",
    "top_channels_by_weight",
    "upsampling_align_corners",
]

ImageSelector = int | str | None
Target = int | str | Sequence[int | str] | np.ndarray | xr.DataArray | None
Channels = Sequence[int] | np.ndarray | xr.DataArray | None


# ---- arrays pulled from a cache once ------------------------------------------------------


@dataclass
class _LayerArrays:
    """One layer's cached arrays as numpy, plus quantities derived from them on first use."""

    activation: np.ndarray  # (image, channel, fy, fx)
    masked_logits: np.ndarray  # (image, channel, class)
    constant: np.ndarray  # (image, channel) bool
    _log_normalizer: np.ndarray | None = None
    _variance: np.ndarray | None = None

    def log_normalizer(self) -> np.ndarray:
        """logsumexp_j f^j(X∘H_k) per (image, channel): the softmax denominator."""
        if self._log_normalizer is None:
            self._log_normalizer = _log_normalizer(self.masked_logits)
        return self._log_normalizer

    def variance(self) -> np.ndarray:
        """Var_{x,y} A_k(x, y) per (image, channel) (population variance, float64)."""
        if self._variance is None:
            self._variance = self.activation.astype(np.float64).var(axis=(-2, -1))
        return self._variance


@dataclass
class _CacheArrays:
    """The root arrays of a cache and its layers' arrays, read on demand."""

    logits: np.ndarray  # (image, class)
    baseline_logits: np.ndarray  # (image, class)
    class_names: list[str]
    image_ids: list[str]
    input_size: tuple[int, int]
    mask_convention: dict[str, Any]
    layer_names: list[str]
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "scorecam", "samples": 1})
    layers: dict[str, _LayerSource] = field(default_factory=dict)
    _names_lower: dict[str, list[int]] | None = None

    def class_index_by_name(self) -> dict[str, list[int]]:
        if self._names_lower is None:
            self._names_lower = names_table(self.class_names)
        return self._names_lower


# Image selections of a lazy cache kept per layer (the explorer asks for one image at a time).
_KEPT_SELECTIONS = 4


def _in_memory(dataset: xr.Dataset) -> bool:
    """Whether every data variable is a numpy array already (not dask, not a lazy store read)."""
    return all(variable.variable._in_memory for variable in dataset.data_vars.values())


def _read_layer(node: xr.Dataset) -> _LayerArrays:
    """A layer node's arrays as numpy (reads the images ``node`` holds, all of them).

    A lazy node's three arrays are read in one computation: on a dataset store each read of
    a row has an overhead of its own, larger than decoding one image's data."""
    node = node[["activation", "masked_logits", "constant"]].compute()
    return _LayerArrays(
        activation=np.asarray(node["activation"].transpose("image", "channel", "fy", "fx").values),
        masked_logits=np.asarray(node["masked_logits"].transpose("image", "channel", "class").values),
        constant=np.asarray(node["constant"].transpose("image", "channel").values, dtype=bool),
    )


@dataclass
class _LayerSource:
    """Where a layer's arrays come from: read whole once when the cache is in memory; per
    image selection (the last few kept) when it is lazy, so that one image's map never reads
    the other images' masked outputs."""

    node: xr.Dataset
    lazy: bool
    n_channels: int
    whole: _LayerArrays | None = None
    parts: OrderedDict[tuple[int, ...], _LayerArrays] = field(default_factory=OrderedDict)

    def select(self, indices: list[int]) -> tuple[_LayerArrays, np.ndarray]:
        """Arrays holding the images ``indices`` and the rows of those images in them."""
        if not self.lazy:
            if self.whole is None:
                self.whole = _read_layer(self.node)
            return self.whole, np.asarray(indices, dtype=np.int64)
        key = tuple(int(i) for i in indices)
        if key in self.parts:
            self.parts.move_to_end(key)
        else:
            self.parts[key] = _read_layer(self.node.isel(image=list(key)))
            while len(self.parts) > _KEPT_SELECTIONS:
                self.parts.popitem(last=False)
        return self.parts[key], np.arange(len(key))


# id(cache) -> (weak reference to the cache, its arrays). The weak reference both checks that
# an id was not reused by a new object and drops the entry when the cache is collected.
_ARRAYS: dict[int, tuple[weakref.ref, _CacheArrays]] = {}


def _root_arrays(cache: xr.DataTree) -> _CacheArrays:
    if not isinstance(cache, xr.DataTree):
        raise CacheError(
            f"expected a Score-CAM cache (an xarray.DataTree from compute_cache or load_cache), "
            f"got {type(cache).__name__}."
        )
    entry = _ARRAYS.get(id(cache))
    if entry is not None and entry[0]() is cache:
        return entry[1]
    arrays = _read_root(cache)
    key = id(cache)
    _ARRAYS[key] = (weakref.ref(cache, lambda _ref, key=key: _ARRAYS.pop(key, None)), arrays)
    return arrays


def _read_root(cache: xr.DataTree) -> _CacheArrays:
    missing = [name for name in ("logits", "baseline_logits") if name not in cache.dataset.data_vars]
    if missing:
        raise CacheError(
            f"this is not a Score-CAM cache: its root lacks {', '.join(missing)} "
            "(see docs/cache.md); compute one with compute_cache or open one with load_cache."
        )
    logits = cache["logits"]
    class_names = (
        [str(name) for name in logits["class_name"].values]
        if "class_name" in logits.coords
        else [str(index) for index in range(logits.sizes["class"])]
    )
    if "h" in cache.dataset.sizes and "w" in cache.dataset.sizes:
        input_size = (int(cache.dataset.sizes["h"]), int(cache.dataset.sizes["w"]))
    elif "y" in cache.dataset.sizes and "x" in cache.dataset.sizes:
        input_size = (int(cache.dataset.sizes["y"]), int(cache.dataset.sizes["x"]))
    else:
        raise CacheError("this cache has neither an `input` nor an `image` variable: no input size.")
    return _CacheArrays(
        logits=np.asarray(logits.transpose("image", "class").values),
        baseline_logits=np.asarray(cache["baseline_logits"].transpose("image", "class").values),
        class_names=class_names,
        image_ids=[str(image_id) for image_id in logits["image"].values]
        if "image" in logits.coords
        else [str(index) for index in range(logits.sizes["image"])],
        input_size=input_size,
        mask_convention=convention_fields(cache),
        layer_names=cache_layers(cache),
        sampler=cache_sampler(cache),
    )


def _layer_source(cache: xr.DataTree, layer: str) -> tuple[_CacheArrays, _LayerSource]:
    """The root arrays and where ``layer``'s arrays come from (nothing of the layer read yet)."""
    root = _root_arrays(cache)
    if not isinstance(layer, str) or layer not in root.layer_names:
        raise UnknownLayerError(
            f"layer {layer!r} is not in this cache; it holds: {', '.join(root.layer_names) or 'none'}."
            f"{did_you_mean(str(layer), root.layer_names)}"
        )
    if layer not in root.layers:
        node = cache.children[layer].dataset
        missing = [name for name in ("activation", "masked_logits", "constant") if name not in node.data_vars]
        if missing:
            raise CacheError(f"layer {layer!r} of this cache lacks {', '.join(missing)} (see docs/cache.md).")
        root.layers[layer] = _LayerSource(node=node, lazy=not _in_memory(node), n_channels=int(node.sizes["channel"]))
    return root, root.layers[layer]


def _layer_rows(
    cache: xr.DataTree, layer: str, image: ImageSelector
) -> tuple[_CacheArrays, _LayerArrays, list[int], np.ndarray]:
    """Root arrays, the layer's arrays for the selected images (read only those from a lazy
    cache), the selected image indices, and their rows in the layer's arrays."""
    root, source = _layer_source(cache, layer)
    indices = _image_indices(root, image)
    arrays, rows = source.select(indices)
    return root, arrays, indices, rows


def cached_layers(cache: xr.DataTree) -> list[str]:
    """The layer names a cache holds, shallow to deep."""
    return list(_root_arrays(cache).layer_names)


# ---- arguments: images, targets, channels -------------------------------------------------


def _image_indices(root: _CacheArrays, image: ImageSelector) -> list[int]:
    count = len(root.image_ids)
    if image is None:
        return list(range(count))
    if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
        if not 0 <= int(image) < count:
            raise CacheError(
                f"image index {image} is out of range: this cache holds {count} image(s) (0..{count - 1})."
            )
        return [int(image)]
    if isinstance(image, str):
        if image in root.image_ids:
            return [root.image_ids.index(image)]
        raise CacheError(
            f"image {image!r} is not in this cache; its images are: {', '.join(root.image_ids)}."
            f"{did_you_mean(image, root.image_ids)}"
        )
    raise CacheError(f"image must be an index or an image id, not {type(image).__name__}.")


def _class_index(root: _CacheArrays, target: int | str | np.integer) -> int:
    return class_index(target, root.class_names, table=root.class_index_by_name())


def resolve_targets(cache: xr.DataTree, target: Target, image: ImageSelector = None) -> np.ndarray:
    """Class indices (one per selected image) for ``target``.

    ``target`` is a class index, a class name (case-insensitive), ``None`` (each image's
    top-1 class), or one of those per image of the cache. Raises UnknownClassError for
    out-of-range indices and unknown names, naming the closest classes (or, when none is
    close, the first few).
    """
    root = _root_arrays(cache)
    indices = _image_indices(root, image)
    return _targets_for(root, target, indices)


def _targets_for(root: _CacheArrays, target: Target, indices: list[int]) -> np.ndarray:
    if target is None:
        return root.logits[indices].argmax(axis=-1).astype(np.int64)
    if isinstance(target, (str, int, np.integer)):
        return np.full(len(indices), _class_index(root, target), dtype=np.int64)
    values = target.values if isinstance(target, xr.DataArray) else target
    values = list(np.asarray(values, dtype=object).ravel())
    if len(values) != len(root.image_ids):
        raise UnknownClassError(
            f"got {len(values)} targets for a cache of {len(root.image_ids)} image(s): give one "
            "target for all images or one per image."
        )
    return np.array([_class_index(root, values[i]) for i in indices], dtype=np.int64)


def _channel_mask(channels: Channels, n_channels: int, n_images: int, indices: list[int]) -> np.ndarray:
    """A bool (selected image, channel) mask from a channel subset (see :func:`scorecam`)."""
    if channels is None:
        return np.ones((len(indices), n_channels), dtype=bool)
    values = np.asarray(channels.values if isinstance(channels, xr.DataArray) else channels)
    if values.ndim == 0 or values.ndim > 2:
        raise ScorecamError(
            f"channels must be a list of channel ids or a boolean mask, got an array of shape {values.shape}."
        )
    if values.ndim == 2 and values.shape[0] != n_images:
        raise ScorecamError(
            f"per-image channels need one row per image of the cache ({n_images}), got {values.shape[0]}."
        )
    rows = values[indices] if values.ndim == 2 else np.broadcast_to(values, (len(indices), *values.shape))
    if values.dtype == bool:
        if rows.shape[-1] != n_channels:
            raise ScorecamError(f"a boolean channel mask needs {n_channels} entries, got {rows.shape[-1]}.")
        return np.array(rows, dtype=bool)
    if not np.issubdtype(values.dtype, np.integer):
        if values.size == 0:
            return np.zeros((len(indices), n_channels), dtype=bool)
        raise ScorecamError(f"channel ids must be integers, got {values.dtype}.")
    if values.size and (values.min() < 0 or values.max() >= n_channels):
        raise ScorecamError(
            f"channel ids must lie in 0..{n_channels - 1}; got {int(values.min())}..{int(values.max())}."
        )
    mask = np.zeros((len(indices), n_channels), dtype=bool)
    for row, ids in enumerate(rows):
        mask[row, ids] = True
    return mask


def check_top_k(top_k: int, n_channels: int, layer: str, name: str = "top_k") -> int:
    """``top_k`` as an int if it is a whole number in 1..``n_channels``, else a :class:`ScorecamError`
    that says the layer's channel count (``name``: how the caller calls the option)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ScorecamError(f"{name} must be a positive integer, not {top_k!r}.")
    if not 1 <= top_k <= n_channels:
        raise ScorecamError(
            f"layer {layer} has {n_channels} channels; {name} must be between 1 and {n_channels}, not {top_k}."
        )
    return int(top_k)


def _keep_top_k(weights: np.ndarray, active: np.ndarray, top_k: int | None, layer: str) -> np.ndarray:
    """Restrict ``active`` to the ``top_k`` largest weights per image (ties: lower channel id);
    ``top_k`` must lie in 1..(the layer's channels)."""
    if top_k is None:
        return active
    return top_k_mask(weights, check_top_k(top_k, weights.shape[-1], layer), active)


# ---- the pipeline ------------------------------------------------------------------------


@dataclass
class _Weights:
    """Everything the pipeline computes for one (layer, target, preset) before mapping."""

    root: _CacheArrays
    layer: _LayerArrays
    indices: list[int]  # the selected images, as indices of the cache
    rows: np.ndarray  # their rows in ``layer``'s arrays
    targets: np.ndarray
    scores: TargetScores
    preset: Preset
    all_weights: np.ndarray  # (image, channel) as the preset gives them
    weights: np.ndarray  # (image, channel) with switched-off channels at 0
    active: np.ndarray  # (image, channel) bool


def _weights(
    cache: xr.DataTree,
    layer: str,
    target: Target,
    preset: str | Preset,
    image: ImageSelector,
    channels: Channels = None,
    top_k: int | None = None,
) -> _Weights:
    chosen = get_preset(preset)
    root, arrays, indices, rows = _layer_rows(cache, layer, image)
    check_preset_applies(chosen, root.sampler)
    targets = _targets_for(root, target, indices)
    selected = np.asarray(indices, dtype=np.int64)
    scores = target_scores(
        arrays.masked_logits,
        root.logits[selected],
        root.baseline_logits[selected],
        arrays.constant,
        targets,
        rows=rows,
        normalizer=lambda: arrays.log_normalizer()[rows],
    )
    all_weights = preset_weights(chosen, scores, layer=layer)
    active = _channel_mask(channels, arrays.activation.shape[1], len(root.image_ids), indices)
    active = _keep_top_k(all_weights, active, top_k, layer)
    return _Weights(
        root=root,
        layer=arrays,
        indices=indices,
        rows=rows,
        targets=targets,
        scores=scores,
        preset=chosen,
        all_weights=all_weights,
        weights=np.where(active, all_weights, 0.0),
        active=active,
    )


def _weighted_sum(weights: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """S = sum_k w_k A_k: (image, channel) x (image, channel, fy, fx) -> (image, fy, fx)."""
    n_images, n_channels, height, width = activation.shape
    flat = activation.reshape(n_images, n_channels, height * width)
    summed = np.matmul(weights[:, None, :], flat.astype(np.float64, copy=False))[:, 0, :]
    return summed.reshape(n_images, height, width)


def _align_corners(preset: Preset, root: _CacheArrays) -> bool:
    if preset.align_corners is not None:
        return preset.align_corners
    return bool(root.mask_convention.get("align_corners", False))


def upsampling_align_corners(cache: xr.DataTree, preset: str | Preset = "paper") -> bool:
    """Whether :func:`scorecam` upsamples ``preset``'s maps of ``cache`` with ``align_corners``:
    the preset's own choice, else the cache's mask convention's."""
    return _align_corners(get_preset(preset), _root_arrays(cache))


def _map(summed: np.ndarray, preset: Preset, resolution: Resolution, root: _CacheArrays) -> np.ndarray:
    """The preset's map from S = sum_k w_k A_k (see the module docstring)."""
    eps = preset.normalize_eps
    if resolution == "feature":
        return _min_max(np.maximum(summed, 0.0), eps)
    align = _align_corners(preset, root)
    if preset.relu_at == "feature":
        feature_map = _min_max(np.maximum(summed, 0.0), eps)
        return _min_max(resize_bilinear(feature_map, root.input_size, align_corners=align), eps)
    upsampled = resize_bilinear(summed, root.input_size, align_corners=align)
    return _min_max(np.maximum(upsampled, 0.0), eps)


def _check_resolution(resolution: str) -> Resolution:
    if resolution not in ("input", "feature"):
        raise ScorecamError(f"resolution must be 'input' or 'feature', not {resolution!r}.")
    return resolution  # type: ignore[return-value]


def _image_coords(state: _Weights) -> dict[str, Any]:
    names = [state.root.class_names[t] for t in state.targets]
    return {
        "image": ("image", [state.root.image_ids[i] for i in state.indices]),
        "target": ("image", state.targets),
        "target_name": ("image", names),
    }


def scorecam(
    cache: xr.DataTree,
    layer: str,
    target: Target,
    *,
    preset: str | Preset = "paper",
    channels: Channels = None,
    resolution: Resolution = "input",
    image: ImageSelector = None,
    top_k: int | None = None,
) -> xr.DataArray:
    r"""The Score-CAM map of ``layer`` for ``target``, recomposed from ``cache``.

    L^c = N(ReLU(sum_{k in K} w_k^c A_k)), with w^c the preset's channel weights for class c
    (see :mod:`scorecam_explorer.presets`), K the channels kept, ReLU and the bilinear
    upsampling placed where the preset says, and N min-max normalisation to [0, 1].

    Args:
        cache: a cache from ``compute_cache`` or ``load_cache``.
        layer: a layer name the cache holds.
        target: class index, class name (case-insensitive), None for each image's top-1
            class, or a sequence with one of those per image.
        preset: a name in :data:`PRESETS` or a :class:`~scorecam_explorer.presets.Preset`.
        channels: the channels kept (the others get weight 0): channel ids, a boolean mask
            over channels, or per image (a 2-D array / DataArray with one row per image, as
            :func:`top_channels_by_variance` returns).
        resolution: ``"input"`` (dims image, y, x) or ``"feature"`` (dims image, fy, fx).
        image: an image index or id to select one image (the ``image`` dim is dropped).
        top_k: keep only the k channels of largest weight (among ``channels``) per image; k
            must lie in 1..(the layer's channels), else a :class:`ScorecamError` says so.

    Returns:
        float32 DataArray with values in [0, 1]; coordinates ``target``, ``target_name`` along
        ``image``; an all-zero map (ReLU removed everything) stays all zero.

    No forward pass: array work on the cache only.
    """
    resolution = _check_resolution(resolution)
    state = _weights(cache, layer, target, preset, image, channels, top_k)
    summed = _weighted_sum(state.weights, state.layer.activation[state.rows])
    if not np.isfinite(summed).all():
        raise NonFiniteError(f"the activation of layer {layer!r} in this cache holds NaN or inf.")
    values = _map(summed, state.preset, resolution, state.root).astype(np.float32)
    dims = ("image", "y", "x") if resolution == "input" else ("image", "fy", "fx")
    result = xr.DataArray(
        values,
        dims=dims,
        coords={**_image_coords(state), "channels_used": ("image", state.active.sum(axis=-1))},
        name="scorecam",
        attrs={
            "layer": layer,
            "preset": state.preset.name,
            "resolution": resolution,
            "mask_convention": str(state.root.mask_convention.get("name", "")),
            "top_k": -1 if top_k is None else int(top_k),
        },
    )
    return result.isel(image=0) if image is not None else result


def channel_weights(
    cache: xr.DataTree,
    layer: str,
    target: Target,
    *,
    preset: str | Preset = "paper",
    channels: Channels = None,
    image: ImageSelector = None,
    top_k: int | None = None,
) -> xr.DataArray:
    """The channel weights w_k :func:`scorecam` uses (0 for channels switched off).

    Dims (image, channel), or (channel) with ``image=``; float64.
    """
    state = _weights(cache, layer, target, preset, image, channels, top_k)
    result = _per_channel(state, state.weights, "weight")
    result.attrs.update({"layer": layer, "preset": state.preset.name})
    return result.isel(image=0) if image is not None else result


def _per_channel(state: _Weights, values: np.ndarray, name: str) -> xr.DataArray:
    return xr.DataArray(
        values,
        dims=("image", "channel"),
        coords={**_image_coords(state), "channel": np.arange(values.shape[-1])},
        name=name,
    )


def _shares(state: _Weights, contribution: np.ndarray) -> np.ndarray:
    r"""share_k = sum_{p in P} w_k A_k(p) / sum_{p in P} S(p), P = where the map survives ReLU.

    The shares of one image sum to 1 (0 everywhere when ReLU leaves nothing). For presets
    that apply ReLU after upsampling, P and the sums are at input resolution, computed with
    the upsampling's adjoint: sum_{p in P} Up(A_k)(p) = <Up^T 1_P, A_k>.
    """
    summed = contribution.sum(axis=1)
    if state.preset.relu_at == "feature":
        region = (summed > 0).astype(np.float64)
    else:
        align = _align_corners(state.preset, state.root)
        upsampled = resize_bilinear(summed, state.root.input_size, align_corners=align)
        region = resize_adjoint((upsampled > 0).astype(np.float64), summed.shape[-2:], align_corners=align)
    numerators = np.einsum("ncyx,nyx->nc", contribution, region)
    totals = numerators.sum(axis=-1, keepdims=True)
    return np.where(totals > 0, numerators / np.where(totals > 0, totals, 1.0), 0.0)


def channel_contributions(
    cache: xr.DataTree,
    layer: str,
    target: Target,
    *,
    preset: str | Preset = "paper",
    channels: Channels = None,
    image: ImageSelector = None,
    top_k: int | None = None,
) -> xr.Dataset:
    r"""Per channel k: what the preset makes of it and what it adds to the map.

    ``channels`` and ``top_k`` select the channels K exactly as in :func:`scorecam` (same
    forms, same validation, same tie rule). Every channel of the layer stays in the result;
    those outside K have ``selected`` False and weight, contribution and share 0. So, with
    S = sum_k contribution_k = sum_{k in K} w_k A_k, the map of :func:`scorecam` called with
    the same arguments is N(ReLU(S)) (ReLU, upsampling and N placed as the preset says).

    Variables (dims image, channel unless said):

    * ``score``: s_k, the number the preset turns into a weight (see ``preset.score_name``),
    * ``probability``: p^c(X∘H_k), softmax over classes of the masked output,
    * ``weight``: w_k for k in K, else 0 (as :func:`channel_weights` returns),
    * ``contribution``: w_k A_k at feature resolution (image, channel, fy, fx), 0 outside K,
    * ``share``: channel k's part of the map's total after ReLU (see :func:`_shares`); the
      shares of K sum to 1 per image (all 0 when ReLU leaves nothing),
    * ``selected``: k is in K,
    * ``variance``: Var_{x,y} A_k (what Faster Score-CAM ranks channels by),
    * ``constant``: A_k was constant, its mask all zero.

    ``score``, ``probability``, ``variance`` and ``constant`` do not depend on K: they are
    given for every channel. Dims (channel, ...) instead with ``image=``.
    """
    state = _weights(cache, layer, target, preset, image, channels, top_k)
    activation = state.layer.activation[state.rows].astype(np.float64)
    contribution = state.weights[:, :, None, None] * activation
    dims = ("image", "channel")
    result = xr.Dataset(
        {
            "score": (dims, state.preset.scores(state.scores)),
            "probability": (dims, state.scores.masked_probability),
            "weight": (dims, state.weights),
            "contribution": ((*dims, "fy", "fx"), contribution),
            "share": (dims, _shares(state, contribution)),
            "selected": (dims, state.active),
            "variance": (dims, state.layer.variance()[state.rows]),
            "constant": (dims, state.scores.constant),
        },
        coords={**_image_coords(state), "channel": np.arange(activation.shape[1])},
        attrs={
            "layer": layer,
            "preset": state.preset.name,
            "score_name": state.preset.score_name,
            "top_k": -1 if top_k is None else int(top_k),
        },
    )
    return result.isel(image=0) if image is not None else result


def _ranking(state_image_ids: list[str], order: np.ndarray, values: np.ndarray, name: str) -> xr.DataArray:
    ranked_values = np.take_along_axis(values, order, axis=-1)
    return xr.DataArray(
        order,
        dims=("image", "rank"),
        coords={"image": state_image_ids, "rank": np.arange(order.shape[-1]), name: (("image", "rank"), ranked_values)},
        name="channel",
    )


def _check_count(count: int, n_channels: int, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ScorecamError(f"{what} must be a positive integer, not {count!r}.")
    return min(int(count), n_channels)


def top_channels_by_weight(
    cache: xr.DataTree,
    layer: str,
    target: Target,
    k: int,
    *,
    preset: str | Preset = "paper",
    image: ImageSelector = None,
) -> xr.DataArray:
    """The ids of the ``k`` channels of largest preset weight w_k, per image, best first.

    Dims (image, rank) (or (rank) with ``image=``), with a ``weight`` coordinate. Ties go to
    the lower channel id. Pass the result as ``channels=`` to :func:`scorecam`.
    """
    state = _weights(cache, layer, target, preset, image)
    count = _check_count(k, state.all_weights.shape[-1], "k")
    order = rank_order(state.all_weights)[:, :count]
    image_ids = [state.root.image_ids[i] for i in state.indices]
    result = _ranking(image_ids, order, state.all_weights, "weight")
    result.attrs.update({"layer": layer, "preset": state.preset.name})
    return result.isel(image=0) if image is not None else result


def top_channels_by_variance(cache: xr.DataTree, layer: str, n: int, *, image: ImageSelector = None) -> xr.DataArray:
    """Faster Score-CAM's channel choice: the ``n`` channels of largest Var_{x,y} A_k, per image.

    tf-keras-vis ``Scorecam(max_N=n)`` keeps the n channels of largest spatial standard
    deviation of the activation (same order as the variance) and scores only those; from a
    cache the same map is ``scorecam(..., channels=top_channels_by_variance(cache, layer, n))``.
    (tf-keras-vis takes the union of the per-image choices over a batch; here each image
    keeps its own.) Dims (image, rank) (or (rank) with ``image=``), with a ``variance``
    coordinate; ties go to the lower channel id.
    """
    root, arrays, indices, rows = _layer_rows(cache, layer, image)
    variance = arrays.variance()[rows]
    count = _check_count(n, variance.shape[-1], "n")
    order = rank_order(variance)[:, :count]
    result = _ranking([root.image_ids[i] for i in indices], order, variance, "variance")
    result.attrs.update({"layer": layer})
    return result.isel(image=0) if image is not None else result
