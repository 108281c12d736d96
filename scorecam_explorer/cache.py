"""The Score-CAM cache: build, validate, save and load the ``xarray.DataTree``.

The schema is documented in ``docs/cache.md``: a root node with the pictures, the model
input, the unmasked and baseline outputs, and one child node per layer with the activation
A (image, channel, fy, fx), the masked outputs f(X∘H_k) (image, channel, class) and the
constant-channel flags. Everything a map needs is in it, so a saved cache is explored with
no model.

This module never imports torch: a cache opens and recomposes on a machine without it.
Saving is atomic (written to a hidden sibling directory, then renamed into place), so an
interrupted save never leaves something that loads as a cache. A saved store also records a
checksum of every array; loading it into memory compares them, so a store with missing or
altered chunks (which Zarr would silently read back as fill values) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from scorecam_explorer._version import __version__
from scorecam_explorer.conventions import MaskConvention, get_convention
from scorecam_explorer.device import PRECISIONS
from scorecam_explorer.errors import CacheError, ScorecamError
from scorecam_explorer.sampling import MaskSampler, family_name, get_sampler, sampler_fields

SCHEMA = "scorecam_explorer.cache/1"
"""The value of the ``schema`` attribute of every cache this version writes and reads."""

ROOT_VARIABLES: dict[str, tuple[str, ...]] = {
    "picture": ("image", "y", "x", "rgb"),
    "input": ("image", "c", "h", "w"),
    "logits": ("image", "class"),
    "baseline_logits": ("image", "class"),
}
LAYER_VARIABLES: dict[str, tuple[str, ...]] = {
    "activation": ("image", "channel", "fy", "fx"),
    "masked_logits": ("image", "channel", "class"),
    "constant": ("image", "channel"),
}
REQUIRED_ATTRS = (
    "schema",
    "model_name",
    "weights_fingerprint",
    "preprocessing",
    "mask_convention",
    "dtype",
    "device",
    "forward_passes",
    "seconds",
    "package_version",
    "layers",
)
DTYPES = PRECISIONS
"""The values of the ``dtype`` attribute: the precision the masked passes ran in."""
# Channels per stored chunk of a layer's arrays (a chunk also holds a single image).
CHANNEL_BLOCK = 256
CHECKSUMS_ATTR = "checksums"
"""Root attribute of a saved store: :func:`content_checksums` of the cache as it was saved."""


DEFAULT_LAYOUT = "nchw"
"""The layer layout of a layer node without a ``layout`` attribute (every cache made before
layouts were recorded): the activation is the layer's (N, C, H, W) output itself."""


@dataclass
class LayerArrays:
    """One layer's arrays for :func:`build_cache` (numpy, float32 / bool), and the name of the
    layout that turned the layer's output into the activation maps."""

    activation: np.ndarray  # (N, C, fy, fx)
    masked_logits: np.ndarray  # (N, C, K)
    constant: np.ndarray  # (N, C) bool
    layout: str = DEFAULT_LAYOUT


def layer_node_attrs(name: str, layout: str = DEFAULT_LAYOUT) -> dict[str, str]:
    """A layer node's attributes: ``layer`` (its name) and, unless it is ``nchw``, ``layout``
    (:mod:`scorecam_explorer.layouts`), so that caches of convolutional layers stay as they were."""
    return {"layer": name} if layout == DEFAULT_LAYOUT else {"layer": name, "layout": str(layout)}


def layer_layout(cache: xr.DataTree, layer: str) -> str:
    """The name of the layout ``layer``'s activation was read with: ``nchw`` when not recorded."""
    return str(cache[layer].attrs.get("layout", DEFAULT_LAYOUT))


def build_cache(
    *,
    pictures: np.ndarray,
    inputs: np.ndarray,
    logits: np.ndarray,
    baseline_logits: np.ndarray,
    image_ids: Sequence[str],
    class_names: Sequence[str],
    layers: Mapping[str, LayerArrays],
    model_name: str,
    weights_fingerprint: str,
    preprocessing: Mapping[str, Any] | None,
    convention: MaskConvention,
    dtype: str,
    device: str,
    forward_passes: int,
    seconds: float,
    sampler: MaskSampler | None = None,
) -> xr.DataTree:
    """Assemble and validate a cache from numpy arrays (see ``docs/cache.md``).

    ``layers`` must be in model order (shallow to deep); its keys become the node names.
    ``sampler`` (default Score-CAM's) is recorded in the ``mask_sampler`` attribute, and its
    family (``score-cam``, ``ss-cam``, ``is-cam``) in ``family``, for readers.
    """
    n_images = inputs.shape[0]
    mask_sampler = get_sampler(sampler)
    root = xr.Dataset(
        {
            "picture": (ROOT_VARIABLES["picture"], np.asarray(pictures, dtype=np.uint8)),
            "input": (ROOT_VARIABLES["input"], np.asarray(inputs, dtype=np.float32)),
            "logits": (ROOT_VARIABLES["logits"], np.asarray(logits, dtype=np.float32)),
            "baseline_logits": (ROOT_VARIABLES["baseline_logits"], np.asarray(baseline_logits, dtype=np.float32)),
        },
        coords={
            "image": np.asarray([str(i) for i in image_ids], dtype=str),
            "class": np.arange(len(class_names), dtype=np.int64),
            "class_name": ("class", np.asarray([str(c) for c in class_names], dtype=str)),
        },
        attrs={
            "schema": SCHEMA,
            "model_name": str(model_name),
            "weights_fingerprint": str(weights_fingerprint),
            "preprocessing": json.dumps(dict(preprocessing) if preprocessing is not None else None, sort_keys=True),
            "mask_convention": convention.to_json(),
            "mask_sampler": mask_sampler.to_json(),
            "family": family_name(mask_sampler.describe()),
            "dtype": str(dtype),
            "device": str(device),
            "forward_passes": int(forward_passes),
            "seconds": float(seconds),
            "package_version": __version__,
            "layers": json.dumps(list(layers)),
        },
    )
    nodes: dict[str, xr.Dataset] = {"/": root}
    for name, arrays in layers.items():
        n_channels = arrays.activation.shape[1]
        nodes[f"/{name}"] = xr.Dataset(
            {
                "activation": (LAYER_VARIABLES["activation"], np.asarray(arrays.activation, dtype=np.float32)),
                "masked_logits": (LAYER_VARIABLES["masked_logits"], np.asarray(arrays.masked_logits, dtype=np.float32)),
                "constant": (LAYER_VARIABLES["constant"], np.asarray(arrays.constant, dtype=bool)),
            },
            coords={"channel": np.arange(n_channels, dtype=np.int64)},
            attrs=layer_node_attrs(name, arrays.layout),
        )
    if n_images != len(image_ids):
        raise ScorecamError(f"{n_images} inputs but {len(image_ids)} image ids.")
    return validate_cache(xr.DataTree.from_dict(nodes))


def recorded_layers(attrs: Mapping[str, Any]) -> list[str]:
    """The layer names a cache's (or dataset store's) root attributes record, as written.

    Raises KeyError when there is no ``layers`` attribute, ValueError or TypeError when it
    is not a JSON list: :func:`validate_cache` reports those; readers use :func:`cache_layers`.
    """
    return [str(name) for name in json.loads(attrs["layers"])]


def cache_layers(cache: xr.DataTree) -> list[str]:
    """The cached layer names, shallow to deep.

    The root's ``layers`` attribute (a JSON list) restricted to the layer nodes the tree
    holds; the nodes in tree order when that attribute is missing, unreadable or names none
    of them. The one rule every reader of a cache's layer list uses.
    """
    children = [str(name) for name in cache.children]
    try:
        listed = recorded_layers(cache.attrs)
    except (KeyError, ValueError, TypeError):
        listed = []
    return [name for name in listed if name in children] or children


def convention_fields(cache: xr.DataTree) -> dict[str, Any]:
    """The cache's ``mask_convention`` attribute as a dict (name, align_corners, normalize,
    eps, ...), ``{}`` when absent; CacheError when it is not JSON. For readers that need the
    fields only (no check that they name a known convention, as :func:`cache_convention` does)."""
    text = cache.attrs.get("mask_convention", "{}")
    try:
        return dict(json.loads(text)) if isinstance(text, str) else dict(text)
    except (ValueError, TypeError) as error:
        raise CacheError(f"the cache's mask_convention attribute is not JSON: {error}.") from None


def cache_convention(cache: xr.DataTree) -> MaskConvention:
    """The mask convention the cache was computed with."""
    return MaskConvention.from_json(cache.attrs["mask_convention"])


def cache_sampler(cache: xr.DataTree) -> dict[str, Any]:
    """The mask sampler the cache was computed with: its recorded fields (``name``,
    ``samples`` and the sampler's parameters), Score-CAM's (``{"name": "scorecam", "samples":
    1}``) for a cache without a ``mask_sampler`` attribute; CacheError when it is malformed.
    Rebuild a built-in sampler from them with
    :func:`scorecam_explorer.sampling.sampler_from_fields`."""
    try:
        return sampler_fields(cache.attrs)
    except ScorecamError as error:
        raise CacheError(str(error)) from None


def validate_cache(cache: xr.DataTree, *, check_values: bool = True) -> xr.DataTree:
    """Check that ``cache`` follows the schema; returns it, or raises CacheError saying why.

    ``check_values`` also checks that the outputs and activations are finite (needs the
    data in memory; a missing chunk in a damaged store reads back as NaN).
    """
    if not isinstance(cache, xr.DataTree):
        raise CacheError(f"expected an xarray.DataTree cache, got {type(cache).__name__}.")
    schema = cache.attrs.get("schema")
    if schema != SCHEMA:
        raise CacheError(
            f"not a scorecam_explorer cache: its 'schema' attribute is {schema!r}, expected {SCHEMA!r}"
            + (" (made by another version?)" if isinstance(schema, str) and schema.startswith("scorecam_explorer") else "")
            + "."
        )
    missing_attrs = [name for name in REQUIRED_ATTRS if name not in cache.attrs]
    if missing_attrs:
        raise CacheError(f"the cache lacks the attribute(s) {', '.join(missing_attrs)}.")
    try:
        layers = recorded_layers(cache.attrs)
        cache_convention(cache)
        sampler_fields(cache.attrs)  # optional: absent means Score-CAM
    except (ValueError, TypeError, ScorecamError) as error:
        raise CacheError(
            f"the cache's 'layers', 'mask_convention' or 'mask_sampler' attribute is malformed: {error}"
        ) from None
    root = cache.dataset
    _check_variables(root, ROOT_VARIABLES, "the root node")
    n_images, n_classes = root.sizes["image"], root.sizes["class"]
    if "class_name" not in root.coords:
        raise CacheError("the cache lacks the 'class_name' coordinate.")
    if not layers:
        raise CacheError("the cache holds no layer.")
    for name in layers:
        if name not in cache.children:
            raise CacheError(f"the cache lists layer {name!r} but has no node for it.")
        node = cache[name].to_dataset(inherit=False)
        _check_variables(node, LAYER_VARIABLES, f"layer node {name!r}")
        if node["constant"].dtype != bool:
            raise CacheError(f"layer node {name!r}: 'constant' must be boolean, not {node['constant'].dtype}.")
        for variable in LAYER_VARIABLES:
            sizes = dict(zip(node[variable].dims, node[variable].shape))
            if sizes["image"] != n_images or sizes.get("class", n_classes) != n_classes:
                raise CacheError(
                    f"layer node {name!r}: {variable} has sizes {sizes}, but the root holds {n_images} image(s) "
                    f"and {n_classes} classes."
                )
    if check_values:
        _check_finite(cache, layers)
    return cache


def _check_variables(dataset: xr.Dataset, expected: Mapping[str, tuple[str, ...]], where: str) -> None:
    for variable, dims in expected.items():
        if variable not in dataset.variables:
            raise CacheError(f"{where} lacks the variable {variable!r}; the cache is damaged or not a cache.")
        if tuple(dataset[variable].dims) != dims:
            raise CacheError(f"{where}: {variable!r} has dims {tuple(dataset[variable].dims)}, expected {dims}.")


def _check_finite(cache: xr.DataTree, layers: Sequence[str]) -> None:
    checks = [("logits", cache["logits"]), ("baseline_logits", cache["baseline_logits"])]
    for name in layers:
        checks += [(f"{name}/activation", cache[name]["activation"]), (f"{name}/masked_logits", cache[name]["masked_logits"])]
    for label, array in checks:
        if not np.isfinite(np.asarray(array.values)).all():
            raise CacheError(f"the cache's {label} holds NaN or inf (a damaged store, or missing chunks).")


# ---- saving and loading ------------------------------------------------------------------


def storage_encoding(cache: xr.DataTree) -> dict[str, dict[str, dict[str, Any]]]:
    """Chunks of one image (and a block of channels) per stored piece, zstd-compressed."""
    from zarr.codecs import ZstdCodec

    compressed = {"compressors": (ZstdCodec(level=3),)}
    root = cache.dataset
    encoding: dict[str, dict[str, dict[str, Any]]] = {
        "/": {
            "picture": {"chunks": (1, *root["picture"].shape[1:]), **compressed},
            "input": {"chunks": (1, *root["input"].shape[1:]), **compressed},
            "logits": {"chunks": (1, root.sizes["class"]), **compressed},
            "baseline_logits": {"chunks": (1, root.sizes["class"]), **compressed},
        }
    }
    for name in cache_layers(cache):
        node = cache[name]
        block = min(CHANNEL_BLOCK, max(1, node.sizes["channel"]))
        encoding[f"/{name}"] = {
            "activation": {"chunks": (1, block, node.sizes["fy"], node.sizes["fx"]), **compressed},
            "masked_logits": {"chunks": (1, block, root.sizes["class"]), **compressed},
            "constant": {"chunks": (1, node.sizes["channel"]), **compressed},
        }
    return encoding


def content_checksums(cache: xr.DataTree) -> dict[str, str]:
    """A blake2b digest (16 bytes, hex) of every variable and coordinate of every node, keyed
    ``/name`` for the root and ``/layer/name`` for a layer; the digest covers dtype, shape and
    values (strings by their text)."""
    sums: dict[str, str] = {}
    for node in cache.subtree:
        prefix = "" if node.path == "/" else node.path
        for name, variable in node.to_dataset(inherit=False).variables.items():
            sums[f"{prefix}/{name}"] = _digest(np.asarray(variable.values))
    return sums


def _digest(values: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(values.shape).encode())
    if values.dtype.kind in "OUS":
        digest.update(b"text")
        digest.update("\x00".join(str(value) for value in values.ravel()).encode())
    else:
        digest.update(values.dtype.str.encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _verify_checksums(tree: xr.DataTree, source: Path) -> xr.DataTree:
    """Compare a loaded store with the checksums recorded when it was saved (a store without
    them, such as a dataset store, is not compared); returns the tree without the attribute."""
    recorded = tree.attrs.get(CHECKSUMS_ATTR)
    if recorded is not None:
        actual = content_checksums(tree)
        differing = sorted(key for key in set(recorded) | set(actual) if recorded.get(key) != actual.get(key))
        if differing:
            raise CacheError(
                f"{source} is damaged: {', '.join(differing)} differ from what was saved (missing or altered "
                "chunks). Compute the cache again."
            )
    return _without_checksums(tree)


def _without_checksums(tree: xr.DataTree) -> xr.DataTree:
    tree.attrs = {key: value for key, value in tree.attrs.items() if key != CHECKSUMS_ATTR}
    return tree


def with_storable_strings(cache: xr.DataTree) -> xr.DataTree:
    """Store string coordinates as variable-length strings (zarr 3 has no fixed-width spec)."""
    root = cache.dataset.assign_coords(
        image=cache["image"].values.astype(object), class_name=("class", cache["class_name"].values.astype(object))
    )
    stored = cache.copy()
    stored.dataset = root
    return stored


def _is_cache_store(path: Path) -> bool:
    """Whether ``path`` is a directory holding a zarr group with this package's schema attr."""
    metadata = path / "zarr.json"
    if not metadata.is_file():
        return False
    try:
        attributes = json.loads(metadata.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return str(attributes.get("schema", "")).startswith("scorecam_explorer.cache")


def save_cache(cache: xr.DataTree, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``cache`` to a Zarr store at ``path`` atomically; returns the path.

    The store is written to a hidden sibling directory and renamed into place only when
    complete. ``overwrite=True`` replaces an existing cache (the old one stays intact if the
    save fails); something at ``path`` that is not a cache is never replaced.
    """
    validate_cache(cache)
    target = Path(path)
    if target.exists():
        if not overwrite:
            raise CacheError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
        if not _is_cache_store(target):
            raise CacheError(f"{target} exists and is not a scorecam_explorer cache; refusing to replace it.")
    if not target.parent.is_dir():
        raise CacheError(f"cannot save the cache: the folder {target.parent} does not exist.")
    token = uuid.uuid4().hex[:8]
    temporary = target.parent / f".{target.name}.partial-{token}"
    retired = target.parent / f".{target.name}.old-{token}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
            stored = with_storable_strings(cache)
            stored.attrs = {**cache.attrs, CHECKSUMS_ATTR: content_checksums(cache)}
            stored.to_zarr(
                temporary, mode="w-", encoding=storage_encoding(cache), consolidated=False, zarr_format=3
            )
        if target.exists():
            os.rename(target, retired)
        os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if retired.exists() and not target.exists():
            os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return target


def load_cache(path: str | os.PathLike[str], *, lazy: bool = False) -> xr.DataTree:
    """Open a cache written by :func:`save_cache` (no torch needed).

    ``lazy=False`` reads every array into memory (recomposing is then pure numpy);
    ``lazy=True`` reads nothing but the layout: the arrays are dask-backed (one chunk per
    image and block of channels, as stored) when dask is installed, else read on access.
    Raises CacheError, with the reason, for a path that is missing, not a Zarr store, not a
    valid cache, or a dataset store (``compute_dataset``) whose images are not all computed.
    An eager load also compares every array with the checksum :func:`save_cache` recorded,
    and refuses a store whose chunks are missing or altered; a lazy load reads no data, so
    it cannot (a missing float chunk then reads as NaN, which composing refuses).
    """
    source = Path(path)
    if not source.exists():
        raise CacheError(f"no cache at {source}: the path does not exist.")
    if not source.is_dir():
        raise CacheError(f"{source} is not a cache: a cache is a Zarr directory (e.g. made by `scorecam-explorer compute`).")
    try:
        tree = xr.open_datatree(source, engine="zarr", consolidated=False, **_lazy_chunks(lazy))
    except Exception as error:  # noqa: BLE001 - zarr/xarray raise many types for a bad store
        raise CacheError(f"{source} is not a readable cache: {type(error).__name__}: {error}") from None
    tree = validate_cache(with_plain_strings(tree), check_values=False)
    _refuse_unfinished_dataset(tree, source)
    if lazy:
        return _without_checksums(tree)
    try:
        tree = tree.load()
    except Exception as error:  # noqa: BLE001
        raise CacheError(f"{source} is not a readable cache: {type(error).__name__}: {error}") from None
    return validate_cache(_verify_checksums(tree, source))


def _lazy_chunks(lazy: bool) -> dict[str, Any]:
    """``chunks={}`` (dask arrays, chunked as stored) for a lazy load when dask is installed."""
    if not lazy:
        return {}
    try:
        import dask.array  # noqa: F401
    except ImportError:
        return {}
    return {"chunks": {}}


def _refuse_unfinished_dataset(tree: xr.DataTree, source: Path) -> None:
    """A dataset store (``compute_dataset``) has a ``complete`` flag per image; rows not yet
    computed hold NaN, so such a store is not a cache until it is finished."""
    if "complete" not in tree.dataset.data_vars:
        return
    complete = np.asarray(tree["complete"].values, dtype=bool)
    if complete.all():
        return
    raise CacheError(
        f"{source} is a dataset store with {int(complete.sum())} of {complete.size} images computed. "
        "Finish it by rerunning compute_dataset (CLI: compute-dataset) on it, or open the computed "
        "images with scorecam_explorer.open_dataset(path) or one with select_image(path, image)."
    )


def with_plain_strings(tree: xr.DataTree) -> xr.DataTree:
    """String coordinates back as numpy ``str`` arrays, as :func:`build_cache` makes them."""
    root = tree.dataset
    updates = {}
    if "image" in root.coords:
        updates["image"] = np.array([str(value) for value in root["image"].values.tolist()], dtype=str)
    if "class_name" in root.coords and "class" in root.dims:
        updates["class_name"] = ("class", np.array([str(v) for v in root["class_name"].values.tolist()], dtype=str))
    if updates:
        tree = tree.copy()
        tree.dataset = root.assign_coords(updates)
    return tree


# ---- reuse checks ------------------------------------------------------------------------


def check_cache_matches(
    cache: xr.DataTree,
    *,
    model: Any = None,
    convention: str | MaskConvention | None = None,
    layers: str | Sequence[str] | None = None,
    images: str | Sequence[str] | None = None,
    sampler: str | MaskSampler | None = None,
) -> xr.DataTree:
    """Refuse (CacheError, with the reason) a cache that was not made with these settings.

    Args:
        model: a ``LoadedModel`` (its name and weights fingerprint must match) or an
            ``nn.Module`` (its weights fingerprint must match).
        convention: a mask convention (name or object) that must build the same masks as the
            cache's (``paper`` and ``official`` do).
        layers: layer name(s) that must be cached.
        images: image id(s) that must be cached.
        sampler: a mask sampler (name or object) whose name, samples and parameters must be
            the cache's (a cache without a ``mask_sampler`` attribute is Score-CAM's). None
            checks nothing.

    Returns the cache, so calls can be chained.
    """
    if model is not None:
        if hasattr(model, "fingerprint") and hasattr(model, "name"):
            name, fingerprint = model.name, model.fingerprint()
        else:
            from scorecam_explorer.models import weights_fingerprint

            name, fingerprint = None, weights_fingerprint(model)
        if name is not None and name != cache.attrs["model_name"]:
            raise CacheError(f"the cache was made with model {cache.attrs['model_name']!r}, not {name!r}.")
        if fingerprint != cache.attrs["weights_fingerprint"]:
            raise CacheError(
                f"the cache was made with other weights (fingerprint {cache.attrs['weights_fingerprint']}, "
                f"this model's is {fingerprint}); recompute it."
            )
    if convention is not None:
        wanted = get_convention(convention)
        recorded = cache_convention(cache)
        if not wanted.same_masks(recorded):
            raise CacheError(
                f"the cache's masks follow the {recorded.name!r} convention ({recorded.to_json()}), "
                f"not {wanted.name!r} ({wanted.to_json()}); recompute it with convention={wanted.name!r}."
            )
    if sampler is not None:
        wanted_sampler = get_sampler(sampler).describe()
        recorded_sampler = cache_sampler(cache)
        if wanted_sampler != recorded_sampler:
            raise CacheError(
                f"the cache's masked inputs were sampled by {json.dumps(recorded_sampler, sort_keys=True)}, "
                f"not {json.dumps(wanted_sampler, sort_keys=True)}; recompute it with that sampler."
            )
    if layers is not None:
        cached = cache_layers(cache)
        for layer in [layers] if isinstance(layers, str) else layers:
            if layer not in cached:
                raise CacheError(f"the cache holds no layer {layer!r}; it holds {', '.join(cached)}.")
    if images is not None:
        cached_images = [str(i) for i in cache["image"].values]
        for image in [images] if isinstance(images, str) else images:
            if image not in cached_images:
                raise CacheError(f"the cache holds no image {image!r}; it holds {', '.join(cached_images)}.")
    return cache
