"""The dataset store: one Zarr store with the schema of a cache whose ``image`` dimension holds
every image of a set (``docs/distributed.md``). Its schema, creation, resumption, row writes,
opening and selection live here; running the computation on a Dask cluster is
:mod:`scorecam_explorer.distributed`.

Per image i and layer, exactly what a single-image cache holds:

    picture[i], input[i] = X_i, logits[i] = f(X_i), baseline_logits[i] = f(X_i * 0),
    activation[i, k] = A_k(X_i), masked_logits[i, k] = f(X_i∘H_ik), constant[i, k],

plus ``complete[i]`` (written last, after the row's data), ``image_forward_passes[i]`` and
``image_seconds[i]``. The store is created once, atomically, with one Zarr chunk per image
along ``image``; a row is always written whole, by one writer (``region=``).

Importing this module imports neither torch nor dask (a new store's template builds lazy
dask arrays, imported when it is made); zarr is imported where a store is read or written.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from scorecam_explorer.cache import (
    DEFAULT_LAYOUT,
    LAYER_VARIABLES,
    ROOT_VARIABLES,
    SCHEMA,
    layer_node_attrs,
    recorded_layers,
    storage_encoding,
    validate_cache,
    with_plain_strings,
    with_storable_strings,
)
from scorecam_explorer.conventions import MaskConvention
from scorecam_explorer.errors import CacheError, ScorecamError, did_you_mean
from scorecam_explorer.sampling import family_label, family_name, sampler_fields, seeded_noise_records

__all__ = [
    "DATASET_ATTRS",
    "DATASET_STORE",
    "DATASET_VARIABLES",
    "check_fits",
    "check_settings",
    "complete_rows",
    "create_store",
    "existing_store_attrs",
    "finalize_store",
    "open_dataset",
    "opened_from",
    "resume_rows",
    "select_image",
    "skip_record",
    "store_sampler",
    "store_template",
    "stored_images",
    "write_row",
]

DATASET_STORE = "scorecam_explorer.dataset/1"
"""The ``dataset_store`` attribute of every dataset store."""

# Root variables (image,) a dataset store has besides the cache schema.
DATASET_VARIABLES: dict[str, str] = {
    "complete": "bool",
    "image_forward_passes": "int64",
    "image_seconds": "float64",
}
# Root attributes a dataset store has besides the cache schema.
DATASET_ATTRS = ("dataset_store", "skipped_images", "runs")


# ---- schema, creation, resumption --------------------------------------------------------


def existing_store_attrs(path: Path) -> dict[str, Any] | None:
    """The root attributes of the dataset store at ``path``; None if nothing is there."""
    if not path.exists():
        return None
    metadata = path / "zarr.json"
    attributes: dict[str, Any] = {}
    if metadata.is_file():
        try:
            attributes = json.loads(metadata.read_text()).get("attributes", {})
        except (OSError, ValueError):
            attributes = {}
    if attributes.get("dataset_store") == DATASET_STORE:
        return attributes
    if str(attributes.get("schema", "")).startswith("scorecam_explorer.cache"):
        raise CacheError(
            f"{path} is a single-image cache, not a dataset store; choose another path for the dataset store."
        )
    raise CacheError(f"{path} exists and is not a scorecam_explorer dataset store; choose another path.")


def check_settings(
    attrs: dict[str, Any],
    path: Path,
    convention: MaskConvention,
    precision: str,
    layers: list[str] | None,
    sampler: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume a store made with another convention, precision, layers or mask
    sampler (``sampler``: the sampler's fields, ``MaskSampler.describe()``; None: Score-CAM's)."""
    recorded = MaskConvention.from_json(attrs["mask_convention"])
    if recorded != convention:
        raise CacheError(
            f"the dataset store {path} was made with the {recorded.name!r} mask convention ({recorded.to_json()}), "
            f"not {convention.name!r} ({convention.to_json()}); use convention={recorded.name!r} to resume it, "
            "or another store."
        )
    if attrs.get("dtype") != precision:
        raise CacheError(
            f"the dataset store {path} was computed in {attrs.get('dtype')}, not {precision}; "
            f"use precision={attrs.get('dtype')!r} to resume it, or another store."
        )
    stored_sampler = store_sampler(attrs, path)
    wanted = dict(sampler) if sampler is not None else {"name": "scorecam", "samples": 1}
    if stored_sampler != wanted:
        raise CacheError(
            f"the dataset store {path} was computed with {family_label(stored_sampler)} "
            f"({json.dumps(stored_sampler, sort_keys=True)}), not {family_label(wanted)} "
            f"({json.dumps(wanted, sort_keys=True)}); resume it with {_family_arguments(stored_sampler)}, "
            "or use another store."
        )
    stored_layers = recorded_layers(attrs)
    if layers is not None and sorted(set(layers)) != sorted(stored_layers):
        raise CacheError(
            f"the dataset store {path} holds the layers {', '.join(stored_layers)}, not {', '.join(layers)}; "
            "resume it with its layers, or use another store."
        )


def store_sampler(attrs: dict[str, Any], path: Path | str = "") -> dict[str, Any]:
    """The mask sampler a store's (or a cache's) root attributes record: Score-CAM's when
    there is none (stores made before samplers were recorded); CacheError when malformed."""
    try:
        return sampler_fields(attrs)
    except ScorecamError as error:
        raise CacheError(f"the dataset store {path}: {error}") from None


def _family_arguments(fields: dict[str, Any]) -> str:
    """The compute_dataset arguments that make the sampler ``fields`` describe."""
    parts = [f"family={family_name(fields)!r}"]
    if fields.get("name") != "scorecam":
        parts.append(f"samples={fields.get('samples')}")
    for key in ("std", "seed"):
        if key in fields:
            parts.append(f"{key}={fields[key]!r}")
    return ", ".join(parts)


def check_model(attrs: dict[str, Any], path: Path, summary: dict[str, Any]) -> None:
    if summary["model_name"] != attrs["model_name"]:
        raise CacheError(
            f"the dataset store {path} was made with model {attrs['model_name']!r}, not {summary['model_name']!r}; "
            "use another store."
        )
    if summary["weights_fingerprint"] != attrs["weights_fingerprint"]:
        raise CacheError(
            f"the dataset store {path} was made with other weights of {attrs['model_name']} (fingerprint "
            f"{attrs['weights_fingerprint']}, this model's is {summary['weights_fingerprint']}); use another store."
        )
    stored_layers = recorded_layers(attrs)
    if sorted(set(summary["layers"])) != sorted(stored_layers):
        raise CacheError(
            f"the dataset store {path} holds the layers {', '.join(stored_layers)}, but this run asks for "
            f"{', '.join(summary['layers'])}; resume it with its layers, or use another store."
        )


def skipped_ids(attrs: dict[str, Any]) -> list[str]:
    return [entry["image"] for entry in json.loads(attrs.get("skipped_images", "[]"))]


def check_image_set(path: Path, stored: list[str], skipped: list[str], ids: list[str]) -> None:
    """Refuse to resume with images other than the store's (its rows plus those it skipped)."""
    known = set(stored) | set(skipped)
    added = [image for image in ids if image not in known]
    missing = [image for image in stored if image not in set(ids)]
    if added or missing:
        details = []
        if added:
            details.append(f"{len(added)} not in the store ({_first_few(added)})")
        if missing:
            details.append(f"{len(missing)} of the store's are not given ({_first_few(missing)})")
        raise CacheError(
            f"the dataset store {path} was made for another image set: {' and '.join(details)}; "
            "resume it with the same images, or use another store."
        )


def _first_few(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def stored_images(path: Path) -> tuple[list[str], np.ndarray]:
    """(image ids, complete flags) of the store's rows."""
    import zarr

    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    ids = [str(image) for image in group["image"][:]]
    return ids, np.asarray(group["complete"][:], dtype=bool)


def store_template(
    summary: dict[str, Any],
    ids: list[str],
    convention: MaskConvention,
    precision: str,
    skipped: list[dict[str, str]],
    sampler: dict[str, Any] | None = None,
) -> xr.DataTree:
    """The store's layout as a lazy cache: every array's shape, no data (never computed).

    ``sampler``: the mask sampler's fields (None: Score-CAM's), recorded as a cache records
    it (``mask_sampler``, ``family``; a seeded SS-CAM's ``noise`` on each layer node, the same
    for every image)."""
    fields = dict(sampler) if sampler is not None else {"name": "scorecam", "samples": 1}
    noise = seeded_noise_records(fields, [name for name, *_ in summary["layer_shapes"]])
    import dask.array

    def empty(shape: tuple[int, ...], dtype: str) -> dask.array.Array:
        return dask.array.zeros(shape, dtype=dtype, chunks=shape)

    n_images, size, n_classes = len(ids), int(summary["input_size"]), len(summary["class_names"])
    root = xr.Dataset(
        {
            "picture": (ROOT_VARIABLES["picture"], empty((n_images, size, size, 3), "uint8")),
            "input": (ROOT_VARIABLES["input"], empty((n_images, 3, size, size), "float32")),
            "logits": (ROOT_VARIABLES["logits"], empty((n_images, n_classes), "float32")),
            "baseline_logits": (ROOT_VARIABLES["baseline_logits"], empty((n_images, n_classes), "float32")),
            **{name: ("image", empty((n_images,), dtype)) for name, dtype in DATASET_VARIABLES.items()},
        },
        coords={
            "image": np.asarray(ids, dtype=str),
            "class": np.arange(n_classes, dtype=np.int64),
            "class_name": ("class", np.asarray(summary["class_names"], dtype=str)),
        },
        attrs={
            "schema": SCHEMA,
            "model_name": summary["model_name"],
            "weights_fingerprint": summary["weights_fingerprint"],
            "preprocessing": json.dumps(summary["preprocessing"], sort_keys=True),
            "mask_convention": convention.to_json(),
            "mask_sampler": json.dumps(fields, sort_keys=True),
            "family": family_name(fields),
            "dtype": precision,
            "device": "",
            "forward_passes": 0,
            "seconds": 0.0,
            "package_version": summary["package_version"],
            "layers": json.dumps(summary["layers"]),
            "dataset_store": DATASET_STORE,
            "skipped_images": json.dumps(skipped),
            "runs": "[]",
        },
    )
    nodes: dict[str, xr.Dataset] = {"/": root}
    for name, channels, height, width in summary["layer_shapes"]:
        nodes[f"/{name}"] = xr.Dataset(
            {
                "activation": (LAYER_VARIABLES["activation"], empty((n_images, channels, height, width), "float32")),
                "masked_logits": (LAYER_VARIABLES["masked_logits"], empty((n_images, channels, n_classes), "float32")),
                "constant": (LAYER_VARIABLES["constant"], empty((n_images, channels), "bool")),
            },
            coords={"channel": np.arange(channels, dtype=np.int64)},
            attrs={
                **layer_node_attrs(name, summary.get("layer_layouts", {}).get(name, DEFAULT_LAYOUT)),
                **({"noise": json.dumps(noise[name], sort_keys=True)} if name in noise else {}),
            },
        )
    return validate_cache(xr.DataTree.from_dict(nodes), check_values=False)


def create_store(path: Path, template: xr.DataTree) -> None:
    """Write the store's metadata and coordinates (no data) atomically: a hidden sibling, renamed."""
    if not path.parent.is_dir():
        raise CacheError(f"cannot create the dataset store: the folder {path.parent} does not exist.")
    encoding = storage_encoding(template)
    for name in DATASET_VARIABLES:
        encoding["/"][name] = {"chunks": (1,)}
    temporary = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
            # compute=False writes metadata and coordinates only: the data arrays stay empty.
            with_storable_strings(template).to_zarr(
                temporary, mode="w-", encoding=encoding, consolidated=False, zarr_format=3, compute=False
            )
        if path.exists():
            raise CacheError(f"{path} appeared while the dataset store was being created; is another run using it?")
        os.rename(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def resume_rows(path: Path, attrs: dict[str, Any], summary: dict[str, Any], ids: list[str]) -> tuple[list[str], list[str]]:
    """(images already complete, images still to compute) of an existing store, after checking
    that it was made with this model (``summary``: name, fingerprint, layers) and these images."""
    check_model(attrs, path, summary)
    stored_ids, complete = stored_images(path)
    check_image_set(path, stored_ids, skipped_ids(attrs), ids)
    done = [image for image, flag in zip(stored_ids, complete) if flag]
    return done, [image for image, flag in zip(stored_ids, complete) if not flag]


def skip_record(image: str, reason: str, source_of: dict[str, Any]) -> dict[str, str]:
    source = source_of[image]
    return {"image": image, "source": source if isinstance(source, str) else image, "reason": reason}


def finalize_store(
    path: Path,
    run_record: dict[str, Any],
    computed: Sequence[str],
    devices: set[str],
    late_skipped: dict[str, dict[str, str]],
) -> None:
    """Update the root attributes after a run: totals over complete images, devices, skipped
    images (``late_skipped``: image -> :func:`skip_record`; images ``computed`` now are no
    longer skipped) and the run's record appended to ``runs``."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    attrs = dict(group.attrs)
    complete = np.asarray(group["complete"][:], dtype=bool)
    passes = np.asarray(group["image_forward_passes"][:])
    seconds = np.asarray(group["image_seconds"][:])
    skipped = {entry["image"]: entry for entry in json.loads(attrs.get("skipped_images", "[]"))}
    skipped.update(late_skipped)
    for image in computed:
        skipped.pop(image, None)
    known_devices = {device for device in str(attrs.get("device", "")).split(",") if device}
    known_devices.update(devices)
    runs = json.loads(attrs.get("runs", "[]"))
    runs.append(run_record)
    group.attrs.update(
        {
            "forward_passes": int(passes[complete].sum()),
            "seconds": float(seconds[complete].sum()),
            "device": ",".join(sorted(known_devices)),
            "skipped_images": json.dumps(list(skipped.values())),
            "runs": json.dumps(runs),
        }
    )


# ---- writing one image's row ----------------------------------------------------------------


def check_fits(cache: xr.DataTree, expected: dict[str, Any], group: Any, layers: list[str]) -> None:
    """Refuse to write a cache whose settings (its mask sampler and each layer's noise record
    included) or shapes differ from the store's."""
    for name in ("model_name", "weights_fingerprint", "mask_convention", "dtype", "layers", "preprocessing"):
        if cache.attrs[name] != expected[name]:
            raise CacheError(
                f"the computed cache's {name} ({cache.attrs[name]}) differs from the store's ({expected[name]})."
            )
    if store_sampler(dict(cache.attrs)) != store_sampler(expected):
        raise CacheError(
            f"the computed cache's mask sampler ({cache.attrs.get('mask_sampler')}) differs from the store's "
            f"({expected.get('mask_sampler')})."
        )
    for name in layers:
        stored_noise = group[name].attrs.get("noise")
        if cache[name].attrs.get("noise") != stored_noise:
            raise CacheError(
                f"layer {name}: the computed cache's noise record ({cache[name].attrs.get('noise')}) differs from "
                f"the store's ({stored_noise}); a dataset store's noise must be drawn from its seed."
            )
    arrays = [(f"/{name}", cache[f"/{name}"].to_dataset(inherit=False)) for name in layers]
    for path, dataset in [("/", cache.to_dataset(inherit=False)), *arrays]:
        for variable in dataset.data_vars:
            stored = group[f"{path.strip('/')}/{variable}" if path != "/" else variable]
            if tuple(stored.shape[1:]) != tuple(dataset[variable].shape[1:]):
                raise CacheError(
                    f"{path}{variable}: the computed shape {dataset[variable].shape[1:]} differs from the "
                    f"store's {stored.shape[1:]} (per image)."
                )


def write_row(cache: xr.DataTree, store: str, row: int) -> None:
    """Write a one-image cache into row ``row`` of every array, then ``complete[row] = True``."""
    region = {"image": slice(row, row + 1)}
    root = cache.to_dataset(inherit=False)
    root = root.assign(
        image_forward_passes=("image", np.asarray([cache.attrs["forward_passes"]], dtype=np.int64)),
        image_seconds=("image", np.asarray([cache.attrs["seconds"]], dtype=np.float64)),
    )
    pieces = [("/", root)] + [(f"/{name}", cache[name].to_dataset(inherit=False)) for name in cache.children]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        for path, dataset in pieces:
            _region_only(dataset).to_zarr(
                store, group=path, region=region, mode="r+", consolidated=False, zarr_format=3
            )
        # Last, and only after everything else is on disk: the row counts as done.
        xr.Dataset({"complete": ("image", np.asarray([True]))}).to_zarr(
            store, region=region, mode="r+", consolidated=False, zarr_format=3
        )


def _region_only(dataset: xr.Dataset) -> xr.Dataset:
    """The data variables along ``image``, without coordinates (those are in the store already)."""
    plain = dataset.reset_coords(drop=True)
    return plain.drop_vars([name for name in plain.variables if name == "image" or "image" not in plain[name].dims])


# ---- reading a dataset store -------------------------------------------------------------


def open_dataset(store: str | os.PathLike[str], *, complete_only: bool = True) -> xr.DataTree:
    """Open a dataset store (or any saved cache) lazily: every array dask-backed, one image a chunk.

    ``complete_only`` keeps only the images whose row is complete (all of them in a finished
    store; an interrupted one also has rows not yet computed, which hold NaN). Read into
    memory now: the ``complete`` flags, so the tree keeps the complete rows it was opened with
    (open the store again to see rows completed since), and, with ``complete_only``, the
    complete rows' unmasked and baseline outputs (:data:`ROOT_EAGER`, (image, class), up to
    :data:`EAGER_LIMIT_BYTES` each; from the atlas index's one file when it was written for
    those rows, :func:`scorecam_explorer.atlas_index.root_outputs`). Nothing else is read until
    you compute something. The tree remembers the store it came from
    (:func:`opened_from`).
    """
    source = Path(store)
    if not source.is_dir():
        raise CacheError(f"no dataset store at {source}: the folder does not exist.")
    try:
        tree = xr.open_datatree(source, engine="zarr", consolidated=False, chunks={})
    except Exception as error:  # noqa: BLE001 - zarr/xarray raise many types for a bad store
        raise CacheError(f"{source} is not a readable cache: {type(error).__name__}: {error}") from None
    tree = validate_cache(with_plain_strings(tree), check_values=False)
    if "complete" in tree.dataset.data_vars:
        # Read once, here, into memory: the tree's set of complete rows is the one it was opened
        # with (reading 1000 one-row chunks again on every question would take a second).
        import zarr

        group = zarr.open_group(str(source), mode="r", zarr_format=3)
        flags = np.asarray(group["complete"][:], dtype=bool)
        tree.dataset = tree.dataset.assign(complete=tree["complete"].variable.copy(data=flags))
        tree = complete_rows(tree) if complete_only else tree
        # The unmasked and baseline outputs, (image, class), are what every view of any image
        # needs (its top classes): small, but one chunk per image. Read now, from the atlas
        # index's single file when it was written for exactly these images, else with zarr.
        # (Only for the complete rows: a caller asking for every row wants the flags, and gets
        # the rest lazily, as before.)
        eager = [name for name in ROOT_EAGER if name in tree.dataset.data_vars and tree[name].nbytes <= EAGER_LIMIT_BYTES]
        if complete_only and eager:
            saved = _saved_root_outputs(source, tree)
            rows = np.flatnonzero(flags)
            values = {name: saved[name] if saved is not None else np.asarray(group[name][:])[rows] for name in eager}
            tree.dataset = tree.dataset.assign({name: tree[name].variable.copy(data=values[name]) for name in eager})
    else:
        tree = complete_rows(tree) if complete_only else tree
    _remember_source(tree, source)
    return tree


ROOT_EAGER = ("logits", "baseline_logits")
"""Root arrays of a dataset store that :func:`open_dataset` reads into memory at once."""
EAGER_LIMIT_BYTES = 64 * 2**20
"""... when each is at most this large (64 MiB: 16,000 images of 1000 classes); larger ones stay lazy."""


# Trees open_dataset returned: id(tree) -> (the store's folder, every variable's data and the
# root attributes as they were then). An entry is dropped when its tree is collected.
_opened: dict[int, tuple[Path, dict[tuple[str, str], object], dict[str, Any]]] = {}
_opened_lock = threading.Lock()


def _held_data(tree: xr.DataTree) -> dict[tuple[str, str], object]:
    return {(node.path, name): variable._data for node in tree.subtree for name, variable in node.dataset.variables.items()}


def _remember_source(tree: xr.DataTree, source: Path) -> None:
    entry = (source.absolute(), _held_data(tree), dict(tree.attrs))
    with _opened_lock:
        if id(tree) not in _opened:
            weakref.finalize(tree, _forget_source, id(tree))
        _opened[id(tree)] = entry


def _forget_source(identity: int) -> None:
    with _opened_lock:
        _opened.pop(identity, None)


def opened_from(tree: xr.DataTree) -> Path | None:
    """The dataset store :func:`open_dataset` opened ``tree`` from, while ``tree`` still holds
    exactly what it held then (no variable replaced, added, removed or loaded into memory, the
    same root attributes); None otherwise, and for any other tree. A tree derived from it
    (``isel``, ``copy``...) is another tree: None."""
    with _opened_lock:
        entry = _opened.get(id(tree))
    if entry is None:
        return None
    source, held, attrs = entry
    now = _held_data(tree)
    if now.keys() != held.keys() or any(now[key] is not held[key] for key in held) or dict(tree.attrs) != attrs:
        return None
    return source


def _saved_root_outputs(source: Path, tree: xr.DataTree) -> dict[str, np.ndarray] | None:
    """The complete rows' outputs from the store's atlas index, when written for these rows."""
    from scorecam_explorer.atlas_index import root_outputs

    ids = [str(image) for image in np.asarray(tree["image"].values)]
    return root_outputs(source, ids, dict(tree.attrs))


def complete_rows(tree: xr.DataTree) -> xr.DataTree:
    """``tree`` restricted to the images whose row is complete (reads the ``complete`` flags
    only); a tree without those flags (an ordinary cache) is returned as it is."""
    if "complete" in tree.dataset.data_vars:
        done = np.flatnonzero(np.asarray(tree["complete"].values, dtype=bool))
        if len(done) < tree.sizes["image"]:
            tree = tree.isel(image=done)
    return tree


def select_image(store_or_cache: str | os.PathLike[str] | xr.DataTree, image: int | str) -> xr.DataTree:
    """One image of a dataset store as an ordinary single-image cache, in memory.

    ``image`` is a row index or an image id. The result has the schema of ``docs/cache.md``
    (the dataset's own variables and attributes dropped; ``forward_passes`` and ``seconds``
    are this image's), so the explorer and ``compose`` use it like any cache.
    """
    if isinstance(store_or_cache, xr.DataTree):
        tree = store_or_cache
    elif isinstance(store_or_cache, (str, os.PathLike)):
        tree = open_dataset(store_or_cache, complete_only=False)
    else:
        raise CacheError(
            f"expected a dataset store path or a cache (xarray.DataTree), not {type(store_or_cache).__name__}."
        )
    ids = [str(value) for value in tree["image"].values]
    row = _image_row(ids, image)
    if "complete" in tree.dataset.data_vars and not bool(tree["complete"].values[row]):
        raise CacheError(
            f"image {ids[row]!r} of this dataset store is not computed yet; rerun compute_dataset "
            "(CLI: compute-dataset) on the store to finish it."
        )
    one = tree.isel(image=[row]).load()
    root = one.to_dataset(inherit=False)
    attrs = {name: value for name, value in root.attrs.items() if name not in DATASET_ATTRS}
    if "image_forward_passes" in root.data_vars:
        attrs["forward_passes"] = int(root["image_forward_passes"].values[0])
        attrs["seconds"] = float(root["image_seconds"].values[0])
    root = root.drop_vars([name for name in DATASET_VARIABLES if name in root.data_vars])
    root.attrs = attrs
    one = one.copy()
    one.dataset = root
    return validate_cache(one)


def _image_row(ids: list[str], image: int | str) -> int:
    if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
        if not 0 <= int(image) < len(ids):
            raise CacheError(f"image index {image} is out of range: the store holds {len(ids)} image(s).")
        return int(image)
    if isinstance(image, str):
        if image in ids:
            return ids.index(image)
        shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
        raise CacheError(f"no image {image!r} in this store; it holds {shown}.{did_you_mean(image, ids)}")
    raise CacheError(f"image must be a row index or an image id, not {type(image).__name__}.")
