"""The explorer's state: what is selected, and the arrays compose makes of it.

A :class:`Selection` is an immutable record of every choice a user makes (image, layer,
class, preset, top k, channels switched off, the inspected channel, ...).
:class:`ExplorerState` holds the current one, checks changes, tells the panels which fields
changed (once per change, whatever the number of fields), and asks
:mod:`scorecam_explorer.compose` and :mod:`scorecam_explorer.explorer.analysis` for the
arrays the panels draw, remembering recent results so that moving back and forth costs
nothing. No torch: everything here is array work on the cache.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from scorecam_explorer.cache import cache_sampler
from scorecam_explorer.colormaps import COLORMAPS
from scorecam_explorer.compose import (
    cached_layers,
    channel_contributions,
    channel_weights,
    resolve_targets,
    scorecam,
)
from scorecam_explorer.errors import ScorecamError, UnknownLayerError, did_you_mean
from scorecam_explorer.explorer import analysis
from scorecam_explorer.figures.channels import SORT_KEYS, channel_order
from scorecam_explorer.presets import PRESETS, check_preset_applies
from scorecam_explorer.sampling import family_label

Listener = Callable[[frozenset[str]], None]

GALLERY_SIZE = 8
"""Channels shown in the gallery of contributions."""
ATLAS_EXAMPLES = 9
"""Pictures in the atlas's grid of a channel's top pictures."""
ATLAS_CHANNELS = 10
"""Channels the atlas lists for the current class."""


@dataclass(frozen=True)
class Selection:
    """Every choice a user makes in the explorer.

    ``top_k`` None means every channel that is switched on; ``channel`` is the channel in
    the inspector.
    """

    image: int = 0
    layer: str = ""
    target: int = 0
    preset: str = "paper"
    top_k: int | None = None
    switched_off: frozenset[int] = field(default_factory=frozenset)
    channel: int = 0
    sort_by: str = "weight"
    colormap: str = "jet"
    opacity: float = 0.5


def kept_channels(weights: np.ndarray, switched_off: Iterable[int], top_k: int | None) -> np.ndarray:
    """Which channels the current map uses: switched on and among the ``top_k`` heaviest.

    Same rule as ``compose.scorecam(channels=..., top_k=...)``: rank by weight among the
    channels switched on, ties to the lower channel id. Boolean (channel).
    """
    on = np.ones(len(weights), dtype=bool)
    on[list(switched_off)] = False
    if top_k is None:
        return on
    order = np.argsort(np.where(on, -weights, np.inf), kind="stable")[: int(top_k)]
    kept = np.zeros_like(on)
    kept[order] = True
    return kept & on


def _family_caches(cache: xr.DataTree, others: Sequence[xr.DataTree]) -> dict[str, xr.DataTree]:
    """The other family members' caches by label, checked: same model weights, same pictures
    (image ids and inputs), each a different family member."""
    labels = [family_label(cache_sampler(cache))]
    result: dict[str, xr.DataTree] = {}
    for other in others:
        if not isinstance(other, xr.DataTree):
            raise ScorecamError(f"others must be caches (xarray.DataTree), not {type(other).__name__}.")
        label = family_label(cache_sampler(other))
        if label in labels:
            raise ScorecamError(f"two caches of {label} were given; Compare puts different family members side by side.")
        if other.attrs.get("weights_fingerprint") != cache.attrs.get("weights_fingerprint"):
            raise ScorecamError(f"the {label} cache was computed with other model weights than this cache.")
        both = set(cache.dataset.data_vars) & set(other.dataset.data_vars)
        pictures = "input" if "input" in both else "picture"
        same_images = list(other["image"].values) == list(cache["image"].values)
        if not same_images or not np.array_equal(other[pictures].values, cache[pictures].values):
            raise ScorecamError(f"the {label} cache holds other pictures than this cache.")
        labels.append(label)
        result[label] = other
    return result


class ExplorerState:
    """The current :class:`Selection` over a cache, the listeners, and memoised arrays.

    Args:
        cache: a Score-CAM cache (``docs/cache.md``).
        layer, target, preset, image: the first selection. An unknown layer or class does
            not raise: the state starts on the deepest cached layer / the top-1 class and
            :attr:`notice` says why.
        others: caches of the same pictures and model computed with other members of the
            Score-CAM family (``compute_cache(..., family="ss-cam")``), for Compare to put
            beside this one (:meth:`family_map`).
    """

    def __init__(
        self,
        cache: xr.DataTree,
        *,
        layer: str | None = None,
        target: int | str | None = None,
        preset: str = "paper",
        image: int = 0,
        others: Sequence[xr.DataTree] = (),
    ) -> None:
        self._cache = cache
        self._others = _family_caches(cache, others)
        self._listeners: list[Listener] = []
        self._memo: OrderedDict[Hashable, Any] = OrderedDict()
        self.notice = ""
        layers = cached_layers(cache)
        notices = []
        if layer is not None and layer not in layers:
            notices.append(
                f"Layer {layer!r} is not in this cache (it holds {', '.join(layers)}).{did_you_mean(layer, layers)} "
                f"Showing {layers[-1]!r}."
            )
            layer = None
        start = Selection(image=int(image), layer=layer or layers[-1], preset=preset)
        start = self._checked(start)
        try:
            index = int(resolve_targets(cache, target, start.image)[0])
        except ScorecamError as error:
            notices.append(f"{error} Showing the top-1 class.")
            index = int(resolve_targets(cache, None, start.image)[0])
        self._selection = dataclasses.replace(start, target=index)
        self._selection = dataclasses.replace(self._selection, channel=self._heaviest_channel(self._selection))
        self.notice = " ".join(notices)

    # ---- the selection ------------------------------------------------------------------

    @property
    def cache(self) -> xr.DataTree:
        """The cache the panels read."""
        return self._cache

    @property
    def selection(self) -> Selection:
        """The current selection (immutable; change it with :meth:`update`)."""
        return self._selection

    @property
    def layers(self) -> list[str]:
        """The cached layers, shallow to deep."""
        return cached_layers(self._cache)

    @property
    def family(self) -> str:
        """The Score-CAM family member the cache was computed with, in words
        (``"Score-CAM"``, ``"SS-CAM, 35 samples, σ = 2"``, ``"IS-CAM, 10 samples"``)."""
        try:
            return family_label(cache_sampler(self._cache))
        except ScorecamError:
            return "?"

    @property
    def families(self) -> list[str]:
        """This cache's family member (:attr:`family`) and those of the other caches given."""
        return [self.family, *self._others]

    def family_map(self, family: str, selection: Selection | None = None) -> xr.DataArray:
        """The full map of the current selection from the cache of ``family`` (one of
        :attr:`families`), for Compare; a ScorecamError when that cache lacks the layer or the
        preset does not apply to it."""
        s = selection or self._selection
        if family == self.family:
            return self.full_map(s)
        if family not in self._others:
            raise ScorecamError(f"no {family} cache to compare with; the explorer holds {', '.join(self.families)}.")
        other = self._others[family]
        if s.layer not in cached_layers(other):
            raise ScorecamError(f"the {family} cache does not hold layer {s.layer!r} (it holds {', '.join(cached_layers(other))}).")
        return self._remember(
            ("family", family, s.layer, s.target, s.preset, s.image),
            lambda: scorecam(other, s.layer, s.target, preset=s.preset, image=s.image),
        )

    @property
    def presets(self) -> list[str]:
        """The presets that apply to the cache (``official`` needs one sample per channel)."""
        try:
            sampler = cache_sampler(self._cache)
        except ScorecamError:
            return list(PRESETS)
        return [name for name, preset in PRESETS.items() if not (preset.one_sample_only and int(sampler["samples"]) > 1)]

    @property
    def class_names(self) -> list[str]:
        """The class names, by class index."""
        return self._remember(("class_names",), lambda: [str(name) for name in self._cache["class_name"].values])

    @property
    def image_ids(self) -> list[str]:
        """The ids of the cached pictures, by image index."""
        return self._remember(("image_ids",), lambda: [str(name) for name in self._cache["image"].values])

    def channel_count(self, layer: str | None = None) -> int:
        """Channels of ``layer`` (default: the selected one)."""
        name = layer or self._selection.layer
        return self._remember(("channels", name), lambda: int(self._cache[name].sizes["channel"]))

    def observe(self, listener: Listener) -> None:
        """Call ``listener(changed_fields)`` after every change of the selection or cache."""
        self._listeners.append(listener)

    def update(self, **changes: Any) -> frozenset[str]:
        """Change fields of the selection; returns the names of the fields that changed.

        Values are checked first (ScorecamError saying what is wrong; nothing changes then).
        ``target`` may be a class index or name. A new layer resets the channels switched
        off, the top k and the inspected channel (channel ids differ between layers).
        Listeners are told once, with every field that changed.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(Selection)}
        if unknown:
            raise ScorecamError(f"unknown selection field(s): {', '.join(sorted(unknown))}.")
        current = self._selection
        if "target" in changes:
            changes["target"] = int(resolve_targets(self._cache, changes["target"], changes.get("image", current.image))[0])
        if "switched_off" in changes:
            changes["switched_off"] = frozenset(int(k) for k in changes["switched_off"])
        proposed = dataclasses.replace(current, **changes)
        if proposed.layer != current.layer:
            self._check_layer(proposed.layer)
            proposed = dataclasses.replace(proposed, switched_off=frozenset(), top_k=None)
            proposed = dataclasses.replace(proposed, channel=self._heaviest_channel(proposed))
        proposed = self._checked(proposed)
        changed = frozenset(
            f.name for f in dataclasses.fields(Selection) if getattr(proposed, f.name) != getattr(current, f.name)
        )
        if changed:
            self._selection = proposed
            self._notify(changed)
        return changed

    def replace_cache(self, cache: xr.DataTree, *, layer: str | None = None) -> None:
        """Swap in a cache with more layers (same pictures and model); optionally select ``layer``."""
        self._cache = cache
        self._memo.clear()
        if layer is not None and layer != self._selection.layer:
            self._selection = dataclasses.replace(self._selection, layer=layer)
            self._selection = dataclasses.replace(
                self._selection,
                switched_off=frozenset(),
                top_k=None,
                channel=self._heaviest_channel(self._selection),
            )
        self._notify(frozenset({"cache", "layer", "switched_off", "top_k", "channel"}))

    def _notify(self, changed: frozenset[str]) -> None:
        for listener in list(self._listeners):
            listener(changed)

    def _check_layer(self, layer: str) -> None:
        layers = cached_layers(self._cache)
        if layer not in layers:
            raise UnknownLayerError(
                f"layer {layer!r} is not in this cache; it holds: {', '.join(layers)}.{did_you_mean(str(layer), layers)}"
            )

    def _checked(self, selection: Selection) -> Selection:
        """``selection`` if every field is valid (top k of all channels becomes None)."""
        self._check_layer(selection.layer)
        n_images = self._cache.dataset.sizes["image"]
        if not 0 <= selection.image < n_images:
            raise ScorecamError(f"image {selection.image} is out of range: the cache holds {n_images} image(s).")
        if selection.preset not in PRESETS:
            raise ScorecamError(
                f"unknown preset {selection.preset!r}; choose one of {', '.join(PRESETS)}."
                f"{did_you_mean(selection.preset, PRESETS)}"
            )
        check_preset_applies(PRESETS[selection.preset], cache_sampler(self._cache))
        n_channels = self.channel_count(selection.layer)
        if selection.top_k is not None:
            if isinstance(selection.top_k, bool) or int(selection.top_k) < 1:
                raise ScorecamError(f"top k must be a positive number of channels, not {selection.top_k!r}.")
            top_k = int(selection.top_k)
            selection = dataclasses.replace(selection, top_k=None if top_k >= n_channels else top_k)
        bad = [k for k in selection.switched_off if not 0 <= k < n_channels]
        if bad:
            raise ScorecamError(f"channel(s) {', '.join(map(str, sorted(bad)))} do not exist: {selection.layer!r} has 0..{n_channels - 1}.")
        if len(selection.switched_off) >= n_channels:
            raise ScorecamError("every channel would be switched off: keep at least one (or press Reset).")
        if not 0 <= int(selection.channel) < n_channels:
            raise ScorecamError(f"channel {selection.channel} does not exist: {selection.layer!r} has channels 0..{n_channels - 1}.")
        if selection.sort_by not in SORT_KEYS:
            raise ScorecamError(f"sort by one of {', '.join(SORT_KEYS)}, not {selection.sort_by!r}.")
        if selection.colormap not in COLORMAPS:
            raise ScorecamError(f"unknown colour map {selection.colormap!r}; choose one of {', '.join(COLORMAPS)}.")
        if not 0.0 <= float(selection.opacity) <= 1.0:
            raise ScorecamError(f"opacity must lie in [0, 1], not {selection.opacity}.")
        return selection

    def _heaviest_channel(self, selection: Selection) -> int:
        weights = channel_weights(
            self._cache, selection.layer, selection.target, preset=selection.preset, image=selection.image
        ).values
        return int(np.argmax(weights))

    # ---- arrays, memoised ---------------------------------------------------------------

    def _remember(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        value = compute()
        self._memo[key] = value
        if len(self._memo) > 96:
            self._memo.popitem(last=False)
        return value

    def contributions(self, selection: Selection | None = None) -> xr.Dataset:
        """``compose.channel_contributions`` for the selected layer, class, preset and image."""
        s = selection or self._selection
        return self._remember(
            ("contributions", s.layer, s.target, s.preset, s.image),
            lambda: channel_contributions(self._cache, s.layer, s.target, preset=s.preset, image=s.image),
        )

    def full_map(self, selection: Selection | None = None) -> xr.DataArray:
        """The Score-CAM map with every channel (dims y, x)."""
        s = selection or self._selection
        return self._remember(
            ("full", s.layer, s.target, s.preset, s.image),
            lambda: scorecam(self._cache, s.layer, s.target, preset=s.preset, image=s.image),
        )

    def current_map(self, selection: Selection | None = None) -> xr.DataArray:
        """The map of the channels switched on, restricted to the top k (dims y, x)."""
        s = selection or self._selection
        if s.top_k is None and not s.switched_off:
            return self.full_map(s)
        return self._remember(
            ("current", s.layer, s.target, s.preset, s.image, s.top_k, s.switched_off),
            lambda: scorecam(
                self._cache,
                s.layer,
                s.target,
                preset=s.preset,
                image=s.image,
                channels=self._on_mask(s),
                top_k=s.top_k,
            ),
        )

    def _on_mask(self, s: Selection) -> np.ndarray:
        on = np.ones(self.channel_count(s.layer), dtype=bool)
        on[list(s.switched_off)] = False
        return on

    def kept(self, selection: Selection | None = None) -> np.ndarray:
        """Boolean (channel): the channels the current map uses."""
        s = selection or self._selection
        return self._remember(
            ("kept", s.layer, s.target, s.preset, s.image, s.top_k, s.switched_off),
            lambda: kept_channels(self.contributions(s)["weight"].values, s.switched_off, s.top_k),
        )

    def fidelity(self, selection: Selection | None = None) -> xr.DataArray:
        """:func:`analysis.fidelity_curve` for the selection's channels switched on."""
        s = selection or self._selection
        preset = PRESETS[s.preset]

        def compute() -> xr.DataArray:
            align = preset.align_corners
            if align is None:
                align = bool(analysis.mask_convention(self._cache).get("align_corners", False))
            return analysis.fidelity_from_arrays(
                self.contributions(s)["weight"].values,
                self.activation(s),
                self.full_map(s).values,
                switched_off=s.switched_off,
                relu_at=preset.relu_at,
                align_corners=align,
                attrs={"layer": s.layer, "preset": s.preset},
            )

        return self._remember(("fidelity", s.layer, s.target, s.preset, s.image, s.switched_off), compute)

    def activation(self, selection: Selection | None = None) -> np.ndarray:
        """A_k of the selected layer and picture: (channel, fy, fx) numpy."""
        s = selection or self._selection
        return self._remember(("activation", s.layer, s.image), lambda: analysis.activation(self._cache, s.layer, s.image).values)

    def current_fidelity(self, selection: Selection | None = None) -> float:
        """Pearson r of the current map with the full map; NaN when either is constant (all
        zero): undefined, shown with :func:`analysis.describe_r`, never as 0."""
        s = selection or self._selection
        return self._remember(
            ("r", s.layer, s.target, s.preset, s.image, s.top_k, s.switched_off),
            lambda: analysis.pearson(self.current_map(s), self.full_map(s)),
        )

    def order(self, selection: Selection | None = None) -> np.ndarray:
        """Channel ids in the channel chart's order."""
        s = selection or self._selection
        return channel_order(self.contributions(s), s.sort_by)

    def gallery(self, selection: Selection | None = None) -> xr.DataArray:
        """w_k A_k of the first channels in chart order: (rank, fy, fx) with channel, share."""
        s = selection or self._selection

        def compute() -> xr.DataArray:
            contributions = self.contributions(s)
            chosen = self.order(s)[:GALLERY_SIZE]
            tiles = contributions["contribution"].isel(channel=chosen)
            return xr.DataArray(
                tiles.values,
                dims=("rank", "fy", "fx"),
                coords={
                    "rank": np.arange(len(chosen)),
                    "channel": ("rank", chosen),
                    "share": ("rank", contributions["share"].values[chosen]),
                },
                name="contribution",
            )

        return self._remember(("gallery", s.layer, s.target, s.preset, s.image, s.sort_by), compute)

    def channel_pictures(self, selection: Selection | None = None) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
        """The inspected channel's activation (fy, fx), mask (y, x) and masked picture (y, x, rgb)."""
        s = selection or self._selection

        def compute() -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
            mask = analysis.channel_mask(self._cache, s.layer, s.channel, s.image)
            return (
                analysis.activation(self._cache, s.layer, s.image).isel(channel=s.channel),
                mask,
                analysis.masked_picture(self._cache, mask, s.image),
            )

        return self._remember(("channel", s.layer, s.image, s.channel), compute)

    def picture(self, selection: Selection | None = None) -> xr.DataArray:
        """The selected picture, uint8 (y, x, rgb)."""
        s = selection or self._selection
        return self._remember(("picture", s.image), lambda: analysis.picture(self._cache, s.image).load())

    def predictions(self, image: int | None = None, count: int = 10) -> xr.DataArray:
        """The top ``count`` classes of the unmasked input with their probabilities."""
        index = self._selection.image if image is None else image
        return self._remember(("predictions", index, count), lambda: analysis.top_predictions(self._cache, index, count))

    def probability(self, target: int, image: int | None = None) -> float:
        """p(class ``target``) on the unmasked input."""
        index = self._selection.image if image is None else image
        probabilities = self._remember(("probabilities", index), lambda: analysis.class_probabilities(self._cache, index))
        return float(probabilities[int(target)])

    def map_for(self, **changes: Any) -> xr.DataArray:
        """The full map of the current selection with some fields changed (for Compare)."""
        s = self._selection
        if "target" in changes:
            changes["target"] = int(resolve_targets(self._cache, changes["target"], s.image)[0])
        return self.full_map(dataclasses.replace(s, **changes))

    # ---- across the pictures of the set (the atlas) ------------------------------------

    @property
    def image_count(self) -> int:
        """How many pictures the cache holds (the atlas is shown for more than one)."""
        return int(self._cache.dataset.sizes["image"])

    def atlas_ready(self, selection: Selection | None = None) -> bool:
        """Whether the atlas of the selected layer and preset can be shown without reading
        every picture from disk (:func:`scorecam_explorer.atlas.tables_ready`): always for a
        cache in memory; for a dataset store, once its atlas index is fresh or the pictures
        were read (:meth:`prepare_atlas`)."""
        from scorecam_explorer import atlas

        s = selection or self._selection
        return atlas.tables_ready(self._cache, s.layer, preset=s.preset)

    def prepare_atlas(self, on_image: Callable[[int, int], None] | None = None, selection: Selection | None = None) -> None:
        """Read every picture once for the atlas of the selected layer and preset (the scan of
        :func:`scorecam_explorer.atlas.atlas_tables`, remembered for this cache);
        ``on_image(done, total)`` after each picture."""
        from scorecam_explorer import atlas

        s = selection or self._selection
        atlas.atlas_tables(self._cache, s.layer, preset=s.preset, on_image=on_image)

    def atlas_examples(self, by: str = "weight", k: int = ATLAS_EXAMPLES, selection: Selection | None = None) -> xr.Dataset:
        """``atlas.channel_examples`` for the selected layer, channel and preset: the ``k``
        pictures where the channel weighs most for each picture's own top class
        (``by="weight"``) or where it fires most (``by="activation"``), masks loaded."""
        from scorecam_explorer import atlas

        s = selection or self._selection
        return self._remember(
            ("atlas-examples", s.layer, s.channel, s.preset, by, k),
            lambda: atlas.channel_examples(self._cache, s.layer, s.channel, by=by, k=k, preset=s.preset).load(),
        )

    def atlas_profile(self, selection: Selection | None = None) -> xr.Dataset:
        """``atlas.channel_profile`` of the selected channel: its mean weight per class over
        the pictures, (1/N) sum_i w_ikc, and how often it is constant."""
        from scorecam_explorer import atlas

        s = selection or self._selection
        return self._remember(
            ("atlas-profile", s.layer, s.channel, s.preset),
            lambda: atlas.channel_profile(self._cache, s.layer, s.channel, preset=s.preset).load(),
        )

    def atlas_class_channels(self, k: int = ATLAS_CHANNELS, selection: Selection | None = None) -> xr.Dataset:
        """``atlas.class_channels`` for the selected class: the ``k`` channels of the selected
        layer with the highest mean weight over the pictures."""
        from scorecam_explorer import atlas

        s = selection or self._selection
        return self._remember(
            ("atlas-class", s.layer, s.target, s.preset, k),
            lambda: atlas.class_channels(self._cache, s.layer, s.target, k, preset=s.preset).load(),
        )

    def flat_channels(self, layer: str, image: int) -> tuple[int, int]:
        """(flagged constant, and of those all zero): channel counts of ``layer`` on picture
        ``image``, read in one go and remembered."""

        def compute() -> tuple[int, int]:
            node = self._cache[layer].to_dataset(inherit=False)[["constant", "activation"]].isel(image=int(image)).compute()
            constant = node["constant"].values.astype(bool)
            zero = int((constant & (abs(node["activation"]).max(dim=("fy", "fx")).values == 0)).sum())
            return int(constant.sum()), zero

        return self._remember(("flat-channels", layer, int(image)), compute)

    def picture_of(self, image: int) -> xr.DataArray:
        """Picture ``image`` (an index), uint8 (y, x, rgb); only that picture is read."""
        return self.picture(dataclasses.replace(self._selection, image=int(image)))

    def pictures_of(self, images: Sequence[int]) -> list[xr.DataArray]:
        """Pictures ``images`` (indices), uint8 (y, x, rgb): those not remembered yet are read
        in one go (on a dataset store, one computation for all of them rather than one each)."""
        indices = [int(image) for image in images]
        missing = sorted({index for index in indices if ("picture", index) not in self._memo})
        if len(missing) > 1:
            loaded = self._cache["picture"].isel(image=missing).load()
            for row, index in enumerate(missing):
                self._remember(("picture", index), lambda row=row: loaded.isel(image=row))
        return [self.picture_of(index) for index in indices]

    def warm_up(self) -> None:
        """Read every layer's arrays once so that the first visit to a layer is fast.

        A layer whose arrays cannot be used (NaN in its masked outputs, ...) is skipped: the
        panels say why when it is selected.
        """
        s = self._selection
        for layer in self.layers:
            try:
                self.contributions(dataclasses.replace(s, layer=layer))
            except ScorecamError:
                continue
