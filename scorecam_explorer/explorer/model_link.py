"""The explorer's optional link to the model: computing layers that are not cached yet, and
the registry's gradient methods (Grad-CAM, Grad-CAM++, ...) for Compare.

Everything that needs torch lives here and imports it only when called, so an explorer
built from a saved cache never imports torch unless the user asks for one of these.
The model may be given loaded, or as a function that loads it on first use (the web app
does so, so that a page opens without waiting for torch). Before it is used, its weights
fingerprint is checked against the cache's: a model with other weights would give scores
that do not belong with the cached ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import xarray as xr

from scorecam_explorer.errors import CacheError, ScorecamError
from scorecam_explorer.methods import LabelView, get_method

if TYPE_CHECKING:
    from torch import nn

    from scorecam_explorer.layers import LayerInfo
    from scorecam_explorer.models import LoadedModel

ModelSource = Union["LoadedModel", "nn.Module", Callable[[], "LoadedModel"], None]

BASELINE_METHODS: Mapping[str, str] = LabelView("gradients")
"""Gradient methods Compare offers when a model is present: a live view of the registry
(:mod:`scorecam_explorer.methods`), method key -> label; aliases (``"gradcam_pp"``) are looked up too."""


def merge_layers(cache: xr.DataTree, extra: xr.DataTree, order: Sequence[str] | None = None) -> xr.DataTree:
    """``cache`` with the layer nodes of ``extra`` added (a new tree; neither is modified).

    Both must come from the same model, weights, mask convention, mask sampler, precision
    and pictures (checked: fingerprint, convention, sampler (a cache without a
    ``mask_sampler`` attribute is Score-CAM's), ``dtype``, image ids and unmasked logits): a layer
    computed in float32 does not belong in a cache whose attributes say bfloat16. ``order`` lists layer names
    shallow to deep (default: the cache's layers, then the new ones). The root attributes
    ``layers``, ``forward_passes`` and ``seconds`` are updated.
    """
    from scorecam_explorer.cache import cache_layers, cache_sampler, validate_cache

    for attribute in ("weights_fingerprint", "mask_convention", "dtype"):
        if cache.attrs.get(attribute) != extra.attrs.get(attribute):
            raise CacheError(f"cannot merge caches with different {attribute}: {cache.attrs.get(attribute)} vs {extra.attrs.get(attribute)}.")
    if cache_sampler(cache) != cache_sampler(extra):
        raise CacheError(
            "cannot merge caches computed with different mask samplers: "
            f"{json.dumps(cache_sampler(cache), sort_keys=True)} vs {json.dumps(cache_sampler(extra), sort_keys=True)}."
        )
    if list(cache["image"].values) != list(extra["image"].values):
        raise CacheError("cannot merge caches of different images.")
    if not np.allclose(cache["logits"].values, extra["logits"].values, rtol=1e-4, atol=1e-4):
        raise CacheError("cannot merge: the model's unmasked outputs differ between the two caches.")
    existing = cache_layers(cache)
    added = [name for name in cache_layers(extra) if name not in existing]
    names = existing + added
    if order is not None:
        rank = {name: index for index, name in enumerate(order)}
        names = sorted(names, key=lambda name: rank.get(name, len(rank)))
    root = cache.to_dataset(inherit=False).copy()
    root.attrs = dict(cache.attrs)
    root.attrs["layers"] = json.dumps(names)
    root.attrs["forward_passes"] = int(cache.attrs.get("forward_passes", 0)) + int(extra.attrs.get("forward_passes", 0))
    root.attrs["seconds"] = float(cache.attrs.get("seconds", 0.0)) + float(extra.attrs.get("seconds", 0.0))
    nodes: dict[str, xr.Dataset] = {"/": root}
    for name in names:
        source = cache if name in existing else extra
        nodes[f"/{name}"] = source[name].to_dataset(inherit=False)
    return validate_cache(xr.DataTree.from_dict(nodes), check_values=False)


def compute_layers(
    cache: xr.DataTree,
    model: LoadedModel,
    layers: Sequence[str],
    *,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> xr.DataTree:
    """``cache`` plus the Score-CAM passes of ``layers`` for its pictures (same convention and
    mask sampler; a ScorecamError when the cache's sampler is not built in).

    ``progress`` and ``on_progress`` are those of :func:`~scorecam_explorer.engine.compute_cache`.

    The model's input is the cache's ``input`` (so the pictures are exactly the same), the
    class names and image ids are the cache's, and the masked passes run in the cache's
    precision (its ``dtype`` attribute: ``float32`` or ``bfloat16``), so the new layer's
    scores are computed as the cached ones were. A bfloat16 cache on a device without native
    bfloat16 is refused before any forward pass, with a ScorecamError that says so (see
    :func:`scorecam_explorer.device.check_native_precision`).
    """
    import torch

    from scorecam_explorer.cache import cache_convention, cache_sampler
    from scorecam_explorer.device import check_native_precision
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.sampling import sampler_from_fields

    precision = cache_precision(cache)
    try:
        check_native_precision(precision)  # on the device compute_cache picks below ("auto")
    except ScorecamError as error:
        raise ScorecamError(
            f"{error} This cache's scores come from bfloat16 passes, so its layers must too: add them on a "
            "machine with native bfloat16, or recompute the cache in float32 here."
        ) from None
    inputs = torch.from_numpy(np.ascontiguousarray(cache["input"].transpose("image", "c", "h", "w").values))
    model = model.at_input(cache_input_size(cache))  # a plain module: its layers at the cache's input size
    extra = compute_cache(
        model,
        inputs,
        list(layers),
        convention=cache_convention(cache),
        sampler=sampler_from_fields(cache_sampler(cache)),
        precision=precision,
        progress=progress,
        on_progress=on_progress,
        class_names=[str(name) for name in cache["class_name"].values],
        image_ids=[str(name) for name in cache["image"].values],
    )
    return merge_layers(cache, extra, order=model.layer_names(listed_only=False))


def cache_input_size(cache: xr.DataTree) -> tuple[int, int]:
    """The (height, width) of the cache's model input."""
    return (int(cache.sizes["h"]), int(cache.sizes["w"]))


def cache_precision(cache: xr.DataTree) -> str:
    """The precision the cache's masked passes ran in (its ``dtype`` attribute); a CacheError
    for a precision the engine cannot compute in, so no layer is added in another one."""
    from scorecam_explorer.cache import DTYPES

    precision = str(cache.attrs.get("dtype", ""))
    if precision not in DTYPES:
        raise CacheError(
            f"the cache's dtype attribute is {precision!r}, not one of {', '.join(DTYPES)}: layers cannot be "
            "added in the precision its scores were computed in; recompute the cache with compute_cache."
        )
    return precision


def gradient_map(
    method: str, model: LoadedModel, cache: xr.DataTree, layer: str, target: int, image: int = 0
) -> xr.DataArray:
    """A gradient method's map of the cached input: (y, x) in [0, 1].

    ``method``: the key or an alias of a registered method that needs gradients
    (:data:`BASELINE_METHODS`: ``"gradcam"``, ``"gradcam++"`` alias ``"gradcam_pp"``, ...).
    """
    if method not in BASELINE_METHODS:
        raise ScorecamError(f"unknown gradient method {method!r}; choose one of {', '.join(BASELINE_METHODS)}.")
    import torch

    record = get_method(method)
    inputs = torch.from_numpy(np.ascontiguousarray(cache["input"].isel(image=[image]).transpose("image", "c", "h", "w").values))
    maps = record.compute(model, inputs, layer, int(target))
    result = maps.isel(image=0)
    result.attrs.update({"layer": layer, "method": record.label})
    return result


def error_text(error: BaseException) -> str:
    """One line for the user: a ScorecamError's message, else the exception's type and the
    first line of its message (``"FileNotFoundError: weights.pth missing"``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, ScorecamError):
        return " ".join(lines)
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class ModelLink:
    """The model behind a cache, loaded on first use and checked against the cache.

    Args:
        source: a LoadedModel, an ``nn.Module``, a function returning a LoadedModel, or
            None (no model: nothing that needs one is offered).
        fingerprint: the cache's ``weights_fingerprint``; a model whose weights differ is
            refused with a CacheError.
    """

    def __init__(self, source: ModelSource, fingerprint: str | None) -> None:
        self._source = source
        self._fingerprint = fingerprint
        self._model: LoadedModel | None = None
        self._failure: str | None = None

    @property
    def available(self) -> bool:
        """Whether a model was given (it may still fail to load or not match)."""
        return self._source is not None and self._failure is None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def failure(self) -> str | None:
        """Why the model cannot be used, once loading or checking it failed."""
        return self._failure

    def get(self) -> LoadedModel:
        """The model, loading and checking it on first call.

        Raises ScorecamError when it is unusable: whatever loading it raised (other than
        KeyboardInterrupt / SystemExit) is kept as :attr:`failure`, and every later call
        raises it again without another try.
        """
        if self._model is not None:
            return self._model
        if self._failure is not None:
            raise ScorecamError(self._failure)
        if self._source is None:
            raise ScorecamError("no model is attached to this explorer; pass model= to use one.")
        try:
            model = self._load()
            if self._fingerprint and model.fingerprint() != self._fingerprint:
                raise CacheError(
                    f"the model's weights (fingerprint {model.fingerprint()}) are not the ones the cache was "
                    f"made with ({self._fingerprint}); layers cannot be added to it."
                )
        except ScorecamError as error:
            self._failure = str(error)
            raise
        except Exception as error:  # noqa: BLE001 - a broken loader (missing file, bad pickle) is reported, not raised
            self._failure = f"loading the model raised {error_text(error)}"
            raise ScorecamError(self._failure) from error
        self._model = model
        return model

    def _load(self) -> LoadedModel:
        from torch import nn

        from scorecam_explorer.models import LoadedModel, from_module

        source: Any = self._source
        if isinstance(source, LoadedModel):
            return source
        if isinstance(source, nn.Module):
            return from_module(source)
        if callable(source):
            model = source()
            return model if isinstance(model, LoadedModel) else from_module(model)
        raise ScorecamError(f"model must be a LoadedModel, an nn.Module or a function, not {type(source).__name__}.")

    def uncached_layers(self, cache: xr.DataTree) -> list[str]:
        """Targetable layers of the model that the cache does not hold, shallow to deep."""
        from scorecam_explorer.compose import cached_layers

        cached = set(cached_layers(cache))
        return [info.name for info in self.layers_for(cache) if info.name not in cached]

    def layers_for(self, cache: xr.DataTree) -> list[LayerInfo]:
        """The model's targetable (listed) layers at the cache's input size: a plain module's
        are probed at the size of the cache's input (not a fixed 224, which a ViT built for
        another size refuses and which gives a CNN's maps other sizes)."""
        return self.get().at_input(cache_input_size(cache)).layers()
