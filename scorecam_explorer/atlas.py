r"""The channel atlas: what one channel responds to, and for which classes it matters, across images.

Pure array work on a cache holding several images or on a dataset store (no model, no torch).
For a layer with channels k = 1..C, classes c = 1..K and a weighting preset (see
:mod:`scorecam_explorer.presets`), image i gives the Score-CAM weight w_ikc of channel k for
class c: exactly what :func:`~scorecam_explorer.compose.channel_weights` returns for that
image and class (the same kernels, :func:`~scorecam_explorer.kernels.target_scores` and
:func:`~scorecam_explorer.kernels.preset_weights`). Let t_i = argmax_c f^c(X_i) be image i's
own top class and A_ik channel k's activation map. Over the N complete images:

    own weight           u_ik = w_ik,t_i                   (the weight for what the model predicted)
    activation peak      a_ik = max_(y,x) A_ik(y, x)       (how strongly the channel fires anywhere)
    mean class weight    m_kc = (1/N) sum_i w_ikc          (how much class c leans on channel k)
    constant frequency   q_k  = (1/N) #{i : A_ik is constant}  (its mask is zero: it cannot matter)

* :func:`channel_examples`: the k images of largest u_ik (or w_ikc for a chosen class c, or
  a_ik with ``by="activation"``), highest first, each with the channel's mask H_ik (the
  engine's mask: upsampled, min-max normalised, as it was forwarded).
* :func:`channel_profile`: m_k. over every class, q_k and (1/N) sum_i u_ik.
* :func:`class_channels`: the k channels of largest m_.c for one class.

Ties go to the lower image index (examples) or the lower channel id (channels).

Cost: one scan reads each image's masked outputs once (N x C x K numbers) and computes the
weights for every class, (K x C) per image; :func:`atlas_tables` returns what it finds and
the three functions reuse it for the same data, layer and preset (remembered while the data
object lives). On a dataset store, only its complete images are used; ``attrs["pending"]``
says how many rows are not computed yet.

A dataset store (its path, or the tree :func:`~scorecam_explorer.dataset_store.open_dataset`
returned, unchanged) with a fresh atlas index (:mod:`scorecam_explorer.atlas_index`) is
answered from the index instead: the same tables, read by memory map, so a question reads
only the rows it shows. Fresh means built from exactly these complete images, this layer
and preset, and the store's current attributes; it is checked on every call, and anything
else is scanned. ``attrs["source"]`` says which answered: ``"index"`` or ``"scan"`` (the
weights for a chosen class in :func:`channel_examples` are never in the index: N x C numbers
per class; they are always scanned).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import xarray as xr

from scorecam_explorer.cache import cache_layers, cache_sampler, convention_fields
from scorecam_explorer.atlas_index import indexed_arrays
from scorecam_explorer.dataset_store import complete_rows, open_dataset, opened_from
from scorecam_explorer.errors import CacheError, ScorecamError, UnknownLayerError, did_you_mean
from scorecam_explorer.kernels import engine_mask, log_normalizer, preset_weights, rank_order, target_scores
from scorecam_explorer.presets import PRESETS, Preset, check_preset_applies, get_preset
from scorecam_explorer.targets import class_index

__all__ = [
    "EXAMPLE_ORDERS",
    "atlas_tables",
    "channel_examples",
    "channel_profile",
    "class_channels",
    "scan_tables",
    "tables_ready",
]

Data = Union[str, os.PathLike, xr.DataTree]
OnImage = Callable[[int, int], None]
ClassTarget = Union[int, str, None]
EXAMPLE_ORDERS = ("weight", "activation")
"""What :func:`channel_examples` ranks images by."""

_remembered: dict[int, dict[tuple[object, ...], xr.Dataset]] = {}
"""Tables already scanned, by id() of the data object passed in (dropped when it is collected)."""
_remembered_lock = threading.Lock()


def atlas_tables(
    data: Data, layer: str, *, preset: str | Preset = "paper", on_image: OnImage | None = None
) -> xr.Dataset:
    r"""The per-image and per-class tables of the module docstring, from one scan of the images.

    Returns a Dataset with dims (image, channel, class):

    * ``own_weight`` (image, channel) u_ik, float64, and ``own_target`` (image) t_i,
    * ``activation_peak`` (image, channel) a_ik, float64,
    * ``constant`` (image, channel) bool,
    * ``weight_mean`` (channel, class) m_kc, float64,

    with coordinates ``image`` (ids), ``channel``, ``class`` and ``class_name``, and attrs
    ``layer``, ``preset``, ``images`` (N), ``pending`` (rows of a store not complete yet) and
    ``source`` (``"index"`` or ``"scan"``). Reads each image's masked outputs once, unless a
    fresh atlas index answers; the result is remembered for this data object, layer and preset.
    ``on_image(done, total)`` is called after each image a scan reads (for a progress display).
    """
    source = _Source.open(data, layer)
    chosen = check_preset_applies(get_preset(preset), cache_sampler(source.tree))
    return source.tables(chosen, on_image)


def tables_ready(data: Data, layer: str, *, preset: str | Preset = "paper") -> bool:
    """Whether :func:`atlas_tables` can answer without reading every image from disk: the
    data is in memory, its tables are remembered, or the store's atlas index is fresh.

    For a caller (the explorer) that must not start a scan of a large store unasked. Reads
    nothing but the index's manifest.
    """
    source = _Source.open(data, layer)
    chosen = check_preset_applies(get_preset(preset), cache_sampler(source.tree))
    return source.ready(chosen)


def scan_tables(
    data: Data, layer: str, presets: Sequence[str | Preset] = ("paper",), *, on_image: OnImage | None = None
) -> list[xr.Dataset]:
    """:func:`atlas_tables` for each of ``presets`` from one scan, never from an index or memory.

    The masked outputs are read once and the target scores computed once per image for every
    preset. ``on_image(done, total)`` is called after each image.
    """
    source = _Source.open(data, layer)
    chosen = [check_preset_applies(get_preset(preset), cache_sampler(source.tree)) for preset in presets]
    return source._scan(chosen, on_image)


def channel_examples(
    data: Data,
    layer: str,
    channel: int,
    *,
    target: ClassTarget = None,
    by: str = "weight",
    k: int = 9,
    preset: str | Preset = "paper",
) -> xr.Dataset:
    r"""The ``k`` images where ``channel`` weighs most (or fires most), highest first, with its mask on each.

    ``by="weight"``: ranked by u_ik, the channel's weight for each image's own top class
    (``target=None``), or by w_ikc for the class ``target`` (an index or a name) in every
    image. ``by="activation"``: ranked by the activation peak a_ik = max A_ik; ``target`` then
    only names the class shown beside each image. Ties go to the lower image index.

    Returns a Dataset with dim ``rank`` (min(k, N) long) and variables ``image`` (id),
    ``image_index`` (position among the complete images), ``value`` (the ranking value),
    ``weight`` (the channel's weight for ``target_class``), ``activation_peak``,
    ``target_class`` and ``target_name`` (the class weighed), ``constant`` and ``mask``
    (rank, y, x) float32 in [0, 1]: H_ik, the mask the engine forwarded for that image (all
    zero for a constant channel). Attrs: layer, channel, by, preset, target, images, pending.
    """
    source = _Source.open(data, layer)
    channel = source.check_channel(channel)
    if by not in EXAMPLE_ORDERS:
        raise ScorecamError(f"cannot rank images by {by!r}; choose one of {', '.join(EXAMPLE_ORDERS)}.{did_you_mean(str(by), EXAMPLE_ORDERS)}")
    count = _positive(k, "k")
    chosen = check_preset_applies(get_preset(preset), cache_sampler(source.tree))
    tables = source.tables(chosen)
    chosen_class = source.class_index(target)
    if chosen_class is None:
        weight = tables["own_weight"].values[:, channel]
        classes = tables["own_target"].values
    else:
        weight = source.class_weights(chosen, chosen_class)[:, channel]
        classes = np.full(source.images, chosen_class, dtype=np.int64)
    peak = tables["activation_peak"].values[:, channel]
    value = weight if by == "weight" else peak
    order = rank_order(value)[:count]
    constant = tables["constant"].values[order, channel]
    masks = source.masks(order, channel, constant)
    names = source.class_names
    examples = xr.Dataset(
        {
            "image": ("rank", np.asarray(tables["image"].values)[order].astype(str)),
            "image_index": ("rank", order.astype(np.int64)),
            "value": ("rank", value[order].astype(np.float64)),
            "weight": ("rank", weight[order].astype(np.float64)),
            "activation_peak": ("rank", peak[order].astype(np.float64)),
            "target_class": ("rank", classes[order].astype(np.int64)),
            "target_name": ("rank", np.asarray([names[c] for c in classes[order]], dtype=str)),
            "constant": ("rank", constant.astype(bool)),
            "mask": (("rank", "y", "x"), masks.astype(np.float32)),
        },
        coords={"rank": np.arange(len(order))},
    )
    examples.attrs = {
        **source.attrs(chosen),
        "channel": channel,
        "by": by,
        "target": "top-1 class of each image" if chosen_class is None else f"{chosen_class} ({names[chosen_class]})",
    }
    return examples


def channel_profile(data: Data, layer: str, channel: int, *, preset: str | Preset = "paper") -> xr.Dataset:
    r"""Which classes lean on ``channel`` across the images.

    Returns a Dataset with dim ``class`` (coords ``class`` and ``class_name``) and variables
    ``weight_mean`` m_kc = (1/N) sum_i w_ikc for every class c, and the scalars
    ``own_weight_mean`` (1/N) sum_i u_ik and ``constant_frequency`` q_k (the fraction of images
    where the channel's activation is constant). Attrs: layer, channel, preset, images, pending.
    """
    source = _Source.open(data, layer)
    channel = source.check_channel(channel)
    chosen = check_preset_applies(get_preset(preset), cache_sampler(source.tree))
    tables = source.tables(chosen)
    profile = xr.Dataset(
        {
            "weight_mean": tables["weight_mean"].isel(channel=channel, drop=True),
            "own_weight_mean": tables["own_weight"].isel(channel=channel, drop=True).mean("image"),
            "constant_frequency": tables["constant"].isel(channel=channel, drop=True).astype(np.float64).mean("image"),
        }
    )
    profile.attrs = {**source.attrs(chosen), "channel": channel}
    return profile


def class_channels(data: Data, layer: str, target: int | str, k: int = 10, *, preset: str | Preset = "paper") -> xr.Dataset:
    r"""The ``k`` channels that matter most for class ``target`` across the images.

    Channels are ranked by the mean weight m_kc = (1/N) sum_i w_ikc over every image (not
    only those predicted as c: a channel that raises class c's score where c is absent
    matters to c too), largest first, ties to the lower channel id. Returns a Dataset with dim
    ``rank`` and variables ``channel``, ``weight_mean`` and ``constant_frequency``. Attrs:
    layer, preset, target, images, pending.
    """
    source = _Source.open(data, layer)
    chosen_class = source.class_index(target)
    if chosen_class is None:
        raise ScorecamError("class_channels needs a class (an index or a name), not None.")
    count = _positive(k, "k")
    chosen = check_preset_applies(get_preset(preset), cache_sampler(source.tree))
    tables = source.tables(chosen)
    means = tables["weight_mean"].values[:, chosen_class]
    order = rank_order(means)[:count]
    constant_frequency = tables["constant"].values.astype(np.float64).mean(axis=0)
    channels = xr.Dataset(
        {
            "channel": ("rank", np.asarray(tables["channel"].values)[order].astype(np.int64)),
            "weight_mean": ("rank", means[order]),
            "constant_frequency": ("rank", constant_frequency[order]),
        },
        coords={"rank": np.arange(len(order))},
    )
    channels.attrs = {**source.attrs(chosen), "target": f"{chosen_class} ({source.class_names[chosen_class]})"}
    return channels


# ---- reading the data --------------------------------------------------------------------


class _Source:
    """The complete images of a cache or store, one layer of it, and how many rows are pending."""

    def __init__(self, data: object, tree: xr.DataTree, layer: str, pending: int) -> None:
        self.data = data
        self.tree = tree
        self.layer = layer
        self.pending = pending
        self.node = tree[layer].to_dataset(inherit=False)
        self.images = int(tree.sizes["image"])
        self.channels = int(self.node.sizes["channel"])
        names = tree["class_name"].values if "class_name" in tree.dataset.coords else range(tree.sizes["class"])
        self.class_names = [str(name) for name in names]
        self.answered_by = "scan"  # "index" once tables() read a fresh atlas index

    @classmethod
    def open(cls, data: Data, layer: str) -> _Source:
        if isinstance(data, xr.DataTree):
            whole = data
        elif isinstance(data, (str, os.PathLike)):
            whole = open_dataset(data, complete_only=False)
        else:
            raise CacheError(f"expected a cache (xarray.DataTree) or a dataset store path, not {type(data).__name__}.")
        tree = complete_rows(whole)
        pending = int(whole.sizes.get("image", 0)) - int(tree.sizes.get("image", 0))
        if tree.sizes.get("image", 0) == 0:
            detail = f" ({pending} image(s) pending)" if pending else ""
            raise CacheError(f"the data holds no complete image yet{detail}; run compute_dataset on it first.")
        layers = cache_layers(tree)
        if not isinstance(layer, str) or layer not in layers:
            raise UnknownLayerError(
                f"layer {layer!r} is not in this data; it holds: {', '.join(layers) or 'none'}.{did_you_mean(str(layer), layers)}"
            )
        return cls(data, tree, layer, pending)

    def check_channel(self, channel: int) -> int:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= int(channel) < self.channels:
            raise ScorecamError(
                f"channel {channel!r} is out of range: layer {self.layer!r} has channels 0..{self.channels - 1}."
            )
        return int(channel)

    def class_index(self, target: ClassTarget) -> int | None:
        return None if target is None else class_index(target, self.class_names)

    def attrs(self, preset: Preset) -> dict[str, object]:
        return {
            "layer": self.layer,
            "preset": preset.name,
            "images": self.images,
            "pending": self.pending,
            "source": self.answered_by,
        }

    def tables(self, preset: Preset, on_image: OnImage | None = None) -> xr.Dataset:
        """The store's fresh atlas index if it has one, else :meth:`_scan`, remembered for the
        data object passed in while it lives.

        The key holds what the tables depend on and can be checked without reading data: the
        layer, the preset object (two presets may share a name), the complete images' ids and
        the identity of every array read (a variable replaced in the cache, or a row completed
        in a store, gives a new key).
        """
        key = self._key(preset)
        indexed = self._indexed(preset)
        if indexed is not None:
            return indexed
        if not isinstance(self.data, xr.DataTree):  # a path is opened afresh by every call: nothing to remember
            return self._scan([preset], on_image)[0]
        with _remembered_lock:
            known = _remembered.get(id(self.data), {}).get(key)
        if known is not None:
            return known
        tables = self._scan([preset], on_image)[0]
        with _remembered_lock:
            if id(self.data) not in _remembered:
                weakref.finalize(self.data, _forget, id(self.data))
                _remembered[id(self.data)] = {}
            _remembered[id(self.data)] = {**{k: v for k, v in _remembered[id(self.data)].items() if k[:2] != key[:2]}, key: tables}
        return tables

    def ready(self, preset: Preset) -> bool:
        """See :func:`tables_ready`."""
        whole = self.data if isinstance(self.data, xr.DataTree) else self.tree
        if isinstance(self.data, xr.DataTree) and all(variable._in_memory for variable in self._variables(whole)):
            return True
        with _remembered_lock:
            if self._key(preset) in _remembered.get(id(self.data), {}):
                return True
        store = opened_from(self.data) if isinstance(self.data, xr.DataTree) else Path(self.data)
        if store is None or PRESETS.get(preset.name) is not preset:
            return False
        return indexed_arrays(store, self.tree, self.layer, preset.name) is not None

    def _variables(self, whole: xr.DataTree) -> list[xr.Variable]:
        """The arrays the tables are computed from."""
        arrays = [whole[self.layer][name].variable for name in ("masked_logits", "activation", "constant")]
        return arrays + [whole[name].variable for name in ("logits", "baseline_logits")]

    def _key(self, preset: Preset) -> tuple[object, ...]:
        """What the tables depend on, checked without reading data (see :meth:`tables`)."""
        whole = self.data if isinstance(self.data, xr.DataTree) else self.tree
        images = tuple(np.asarray(self.tree["image"].values).astype(str))
        return (self.layer, preset, images, *(id(variable._data) for variable in self._variables(whole)))

    def _indexed(self, preset: Preset) -> xr.Dataset | None:
        """The tables from the store's atlas index when it is fresh for these images; else None.

        Only a registered preset (a preset object of another definition may share its name)
        and only data known to come from a store: its path, or a tree ``open_dataset`` returned
        and nobody changed since.
        """
        store = opened_from(self.data) if isinstance(self.data, xr.DataTree) else Path(self.data)
        if store is None or PRESETS.get(preset.name) is not preset:
            return None
        arrays = indexed_arrays(store, self.tree, self.layer, preset.name)
        if arrays is None:
            return None
        self.answered_by = "index"
        return self._as_tables(arrays, preset)

    def class_weights(self, preset: Preset, target: int) -> np.ndarray:
        """w_ikc for one class c in every image: (image, channel); always a scan."""
        self.answered_by = "scan"
        logits = np.asarray(self.tree["logits"].values)
        masked = self.node["masked_logits"]
        constant = np.asarray(self.node["constant"].values, dtype=bool)
        baseline = np.asarray(self.tree["baseline_logits"].values)
        rows = []
        for image in range(self.images):
            block = np.asarray(masked.isel(image=[image]).values)
            scores = target_scores(block, logits[[image]], baseline[[image]], constant[[image]], np.asarray([target]))
            rows.append(preset_weights(preset, scores, layer=self.layer))
        return np.concatenate(rows, axis=0)

    def masks(self, images: np.ndarray, channel: int, constant: np.ndarray) -> np.ndarray:
        """H_ik of ``channel`` on each of ``images`` (row indices): (image, y, x) float32. The
        activations are read in one go (one read per image chunk of a store, a single dask
        computation: per-read overhead, not data, is what a few masks cost)."""
        size = (int(self.tree.dataset.sizes["y"]), int(self.tree.dataset.sizes["x"]))
        if len(images) == 0:
            return np.zeros((0, *size), dtype=np.float32)
        values = np.asarray(self.node["activation"].isel(image=np.asarray(images, dtype=np.int64), channel=channel).values)
        convention = convention_fields(self.tree)
        return np.stack([engine_mask(values[rank], size, convention, bool(flag)) for rank, flag in enumerate(constant)])

    def _scan(self, presets: Sequence[Preset], on_image: OnImage | None = None) -> list[xr.Dataset]:
        """One pass over the images: u, t, a, the constant flags and the sum of w over images,
        for each preset (the masked outputs read and the target scores computed once)."""
        logits = np.asarray(self.tree["logits"].values, dtype=np.float64)
        baseline = np.asarray(self.tree["baseline_logits"].values)
        own_target = logits.argmax(axis=-1)
        n_classes = logits.shape[-1]
        own_weight = [np.empty((self.images, self.channels), dtype=np.float64) for _ in presets]
        peak = np.empty((self.images, self.channels), dtype=np.float64)
        constant = np.empty((self.images, self.channels), dtype=bool)
        weight_sum = [np.zeros((self.channels, n_classes), dtype=np.float64) for _ in presets]
        every_class = np.arange(n_classes)
        for image in range(self.images):
            row = self.node.isel(image=image)
            masked = np.asarray(row["masked_logits"].values)  # (channel, class)
            flags = np.asarray(row["constant"].values, dtype=bool)
            normalizer = log_normalizer(masked)  # (channel,): shared by every class
            # Every class of this image as a row of its own: (class, channel) weights at once.
            scores = target_scores(
                masked[None],
                np.broadcast_to(logits[image], (n_classes, n_classes)),
                np.broadcast_to(baseline[image], (n_classes, n_classes)),
                flags[None],
                every_class,
                rows=np.zeros(n_classes, dtype=np.int64),
                normalizer=lambda normalizer=normalizer: np.broadcast_to(normalizer, (n_classes, self.channels)),
            )
            for number, preset in enumerate(presets):
                weights = preset_weights(preset, scores, layer=self.layer)  # (class, channel)
                weight_sum[number] += weights.T
                own_weight[number][image] = weights[own_target[image]]
            constant[image] = flags
            peak[image] = np.asarray(row["activation"].values, dtype=np.float64).max(axis=(-2, -1))
            if on_image is not None:
                on_image(image + 1, self.images)
        self.answered_by = "scan"
        return [
            self._as_tables(
                {
                    "own_weight": own_weight[number],
                    "own_target": own_target.astype(np.int64),
                    "activation_peak": peak,
                    "constant": constant,
                    "weight_mean": weight_sum[number] / self.images,
                },
                preset,
            )
            for number, preset in enumerate(presets)
        ]

    def _as_tables(self, arrays: dict[str, np.ndarray], preset: Preset) -> xr.Dataset:
        """The tables Dataset of :func:`atlas_tables` around ``arrays`` (scanned, or memory maps)."""
        n_classes = arrays["weight_mean"].shape[-1]
        tables = xr.Dataset(
            {
                "own_weight": (("image", "channel"), arrays["own_weight"]),
                "own_target": ("image", arrays["own_target"]),
                "activation_peak": (("image", "channel"), arrays["activation_peak"]),
                "constant": (("image", "channel"), arrays["constant"]),
                "weight_mean": (("channel", "class"), arrays["weight_mean"]),
            },
            coords={
                "image": np.asarray(self.tree["image"].values).astype(str),
                "channel": np.asarray(self.node["channel"].values),
                "class": np.arange(n_classes),
                "class_name": ("class", np.asarray(self.class_names, dtype=str)),
            },
        )
        tables.attrs = self.attrs(preset)
        return tables


def _forget(identity: int) -> None:
    with _remembered_lock:
        _remembered.pop(identity, None)


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ScorecamError(f"{name} must be a positive integer, not {value!r}.")
    return int(value)
