r"""The atlas index: the channel atlas' tables of a dataset store, saved beside it, read by memory map.

:func:`scorecam_explorer.atlas.atlas_tables` scans every complete image's masked outputs
(N x C x K numbers: about 5 GB for 1000 images of a 1280-channel layer and 1000 classes).
What the three atlas questions need of that scan is small, and this module keeps it on disk:

    own weight u_ik, activation peak a_ik, constant flag   (channel, image)    C x N each
    own class t_i                                          (image,)
    mean class weight m_kc = (1/N) sum_i w_ikc             (channel, class)    C x K

the very arrays the scan returns (float64, int64, bool), stored channel-major so that one
channel's row over the images is contiguous. An index lives in
``STORE.zarr.atlas-index/<layer>/<preset>/`` (beside the store, not inside it: zarr warns
about any folder of its own tree it does not know), as ``.npy`` files and a ``manifest.json``,
written whole into a hidden sibling folder and renamed into place.

An index is used only when it is **fresh**: its manifest records what it was built from (the
ids of the complete images, in order; the layer's shape and attributes; the store's root
attributes, which change with every run that fills it; the preset; the package version),
and a reader compares that with the data it was given on every call. A store whose rows are
written once and never changed after ``complete`` (see ``docs/distributed.md``) then gives
the same tables from the index as from a scan; anything else is scanned. A damaged index is
ignored, with a warning, and rebuilt by :func:`build_atlas_index`.

This module reads and writes; the scan itself is :func:`scorecam_explorer.atlas.scan_tables`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from scorecam_explorer._version import __version__
from scorecam_explorer.cache import cache_layers
from scorecam_explorer.dataset_store import complete_rows, open_dataset, opened_from
from scorecam_explorer.errors import CacheError, ScorecamError, UnknownLayerError, did_you_mean

if TYPE_CHECKING:
    from scorecam_explorer.presets import Preset

__all__ = [
    "INDEX_FORMAT",
    "IndexPlan",
    "IndexStatus",
    "build_atlas_index",
    "index_folder",
    "index_status",
    "indexed_arrays",
    "plan_atlas_index",
    "run_plan",
]

INDEX_FORMAT = "scorecam_explorer.atlas-index/1"
"""The ``format`` of every index manifest."""

IndexStatus = Literal["fresh", "stale", "missing"]
OnProgress = Callable[[int, int], None]

# name -> (stored dims, dtype); (channel, image) arrays are read back transposed to (image, channel).
TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "own_weight": (("channel", "image"), "float64"),
    "activation_peak": (("channel", "image"), "float64"),
    "constant": (("channel", "image"), "bool"),
    "own_target": (("image",), "int64"),
    "weight_mean": (("channel", "class"), "float64"),
}


# ---- where, and what it must match -----------------------------------------------------------


def index_folder(store: str | os.PathLike[str]) -> Path:
    """The folder holding a store's atlas indexes: ``STORE.zarr.atlas-index`` beside it."""
    path = Path(store).absolute()
    return path.with_name(path.name + ".atlas-index")


def _folder_name(name: str) -> bool:
    """Whether ``name`` (a layer or preset) can name a folder of the index: not empty, hidden or a path."""
    return bool(name) and not name.startswith(".") and "/" not in name and os.sep not in name


def _layer_preset_folder(store: str | os.PathLike[str], layer: str, preset: str) -> Path:
    for name in (layer, preset):
        if not _folder_name(name):
            raise ScorecamError(f"{name!r} cannot name an atlas index folder (empty, hidden or a path).")
    return index_folder(store) / layer / preset


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists, numpy scalars as numbers)."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


def expected_manifest(tree: xr.DataTree, layer: str, preset: str) -> dict[str, Any]:
    """What an index of ``tree``'s images (all complete rows) for ``layer`` and ``preset`` records."""
    node = tree[layer]
    return _plain(
        {
            "format": INDEX_FORMAT,
            "package_version": __version__,
            "layer": layer,
            "preset": preset,
            "images": [str(image) for image in np.asarray(tree["image"].values)],
            "sizes": {
                "channel": int(node.sizes["channel"]),
                "class": int(tree.sizes["class"]),
                "fy": int(node.sizes["fy"]),
                "fx": int(node.sizes["fx"]),
            },
            "layer_attrs": dict(node.attrs),
            "store_attrs": dict(tree.attrs),
        }
    )


def _shape(name: str, sizes: dict[str, int], images: int) -> tuple[int, ...]:
    lengths = {**sizes, "image": images}
    return tuple(lengths[dim] for dim in TABLES[name][0])


# ---- reading ---------------------------------------------------------------------------------


def _read(store: Path, tree: xr.DataTree, layer: str, preset: str) -> tuple[IndexStatus, dict[str, np.ndarray] | None]:
    """(status, the arrays by memory map when fresh) of the index of ``tree``'s complete rows."""
    if not (_folder_name(layer) and _folder_name(preset)):
        return "missing", None  # a layer name that no index can have
    folder = _layer_preset_folder(store, layer, preset)
    manifest_file = folder / "manifest.json"
    if not folder.is_dir():
        return "missing", None
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as error:
        _warn_damaged(store, folder, f"its manifest cannot be read: {type(error).__name__}: {error}")
        return "stale", None
    expected = expected_manifest(tree, layer, preset)
    if not isinstance(manifest, dict) or any(manifest.get(key) != value for key, value in expected.items()):
        return "stale", None
    arrays: dict[str, np.ndarray] = {}
    for name, (dims, dtype) in TABLES.items():
        shape = _shape(name, expected["sizes"], len(expected["images"]))
        try:
            array = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            _warn_damaged(store, folder, f"{name}.npy cannot be read: {type(error).__name__}: {error}")
            return "stale", None
        if array.shape != shape or array.dtype != np.dtype(dtype):
            _warn_damaged(store, folder, f"{name}.npy holds {array.dtype} {array.shape}, not {dtype} {shape}")
            return "stale", None
        arrays[name] = array.T if dims[:2] == ("channel", "image") else array
    return "fresh", arrays


def _warn_damaged(store: Path, folder: Path, reason: str) -> None:
    warnings.warn(
        f"the atlas index in {folder} is damaged ({reason}); it is ignored and the store scanned. "
        f"Rebuild it with `scorecam-explorer atlas-index {store}` (or build_atlas_index).",
        stacklevel=4,
    )


def indexed_arrays(store: str | os.PathLike[str], tree: xr.DataTree, layer: str, preset: str) -> dict[str, np.ndarray] | None:
    """The atlas tables' arrays for ``tree`` (the complete rows of ``store``) from the index, or
    None unless it is fresh. (image, channel) arrays are transposed memory maps: one channel's
    column is one contiguous read."""
    return _read(Path(store), tree, layer, preset)[1]


def index_status(data: str | os.PathLike[str] | xr.DataTree, layer: str, preset: str | Preset = "paper") -> IndexStatus:
    """``"fresh"``, ``"stale"`` or ``"missing"``: the atlas index of a store for ``layer`` and ``preset``.

    ``data`` is the store's path (its complete rows now: opening reads the ``complete``
    flags) or a tree :func:`~scorecam_explorer.dataset_store.open_dataset` returned (its
    complete rows when opened; nothing read but the manifest). A tree of another origin has
    no index: ``"missing"``; so has a preset object that is not the registered one of its name.
    A damaged index is ``"stale"`` (with a warning).
    """
    from scorecam_explorer.presets import PRESETS, get_preset

    chosen = get_preset(preset)
    registered = PRESETS.get(chosen.name) is chosen
    if isinstance(data, xr.DataTree):
        store = opened_from(data)
        whole = data
    elif isinstance(data, (str, os.PathLike)):
        store = Path(data)
        whole = open_dataset(store, complete_only=False)
    else:
        raise CacheError(f"expected a dataset store path or the tree open_dataset returned, not {type(data).__name__}.")
    _check_layer(whole, layer)
    tree = complete_rows(whole)
    if store is None or not registered or tree.sizes.get("image", 0) == 0:
        return "missing"
    return _read(store, tree, layer, chosen.name)[0]


def _check_layer(tree: xr.DataTree, layer: str) -> None:
    layers = cache_layers(tree)
    if not isinstance(layer, str) or layer not in layers:
        raise UnknownLayerError(
            f"layer {layer!r} is not in this data; it holds: {', '.join(layers) or 'none'}.{did_you_mean(str(layer), layers)}"
        )


# ---- building --------------------------------------------------------------------------------


@dataclass
class IndexPlan:
    """What :func:`build_atlas_index` will do: the store's complete and pending images, and per
    layer its (channels, classes) and the presets whose index is not fresh (to scan)."""

    store: Path
    images: int
    pending: int
    shapes: dict[str, tuple[int, int]]
    work: dict[str, list[str]]
    presets: list[str]
    tree: xr.DataTree = field(repr=False)
    """The complete rows as opened for the plan: the build scans exactly these."""

    @property
    def scans(self) -> int:
        """Layers to scan (one scan each, whatever the number of presets)."""
        return sum(1 for presets in self.work.values() if presets)

    def describe(self) -> str:
        """One paragraph for a person: the images, what is fresh and what will be read."""
        lines = [f"{self.store}: {self.images} complete image(s)" + (f", {self.pending} pending (not indexed)" if self.pending else "")]
        for layer, (channels, classes) in self.shapes.items():
            todo = self.work.get(layer, [])
            if todo:
                gigabytes = self.images * channels * classes * 4 / 1e9
                lines.append(
                    f"  {layer}: {channels} channels x {classes} classes; index {', '.join(todo)}: one scan of "
                    f"{self.images} x {channels} x {classes} masked outputs (~{gigabytes:.2g} GB)"
                )
            else:
                lines.append(f"  {layer}: fresh already")
        return "\n".join(lines)


def plan_atlas_index(
    store: str | os.PathLike[str],
    layers: str | Sequence[str] | None = None,
    presets: str | Sequence[str] = ("paper",),
    *,
    rebuild: bool = False,
) -> IndexPlan:
    """Check the arguments of :func:`build_atlas_index` and say what it would do (reads the
    store's layout and flags and the manifests, no data)."""
    from scorecam_explorer.presets import PRESETS

    path = Path(store)
    whole = open_dataset(path, complete_only=False)
    tree = complete_rows(whole)
    images = int(tree.sizes.get("image", 0))
    pending = int(whole.sizes.get("image", 0)) - images
    if images == 0:
        raise CacheError(
            f"the dataset store {path} holds no complete image yet ({pending} pending); run compute_dataset on it first."
        )
    chosen_layers = cache_layers(whole) if layers is None else [layers] if isinstance(layers, str) else list(layers)
    for layer in chosen_layers:
        _check_layer(whole, layer)
    chosen_presets = [presets] if isinstance(presets, str) else list(presets)
    for preset in chosen_presets:
        if preset not in PRESETS:
            raise ScorecamError(
                f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.{did_you_mean(str(preset), PRESETS)}"
            )
    if not chosen_layers or not chosen_presets:
        raise ScorecamError("an atlas index needs at least one layer and one preset.")
    shapes = {layer: (int(tree[layer].sizes["channel"]), int(tree.sizes["class"])) for layer in chosen_layers}
    work = {
        layer: [preset for preset in dict.fromkeys(chosen_presets) if rebuild or _read(path, tree, layer, preset)[0] != "fresh"]
        for layer in dict.fromkeys(chosen_layers)
    }
    return IndexPlan(path, images, pending, shapes, work, list(dict.fromkeys(chosen_presets)), tree)


def build_atlas_index(
    store: str | os.PathLike[str],
    layers: str | Sequence[str] | None = None,
    presets: str | Sequence[str] = ("paper",),
    *,
    progress: bool = True,
    on_progress: OnProgress | None = None,
    rebuild: bool = False,
) -> list[Path]:
    """Scan the store's complete images once per layer and save the atlas tables of each preset.

    ``layers``: names (default: every layer of the store). ``presets``: registered preset
    names. An index already fresh is kept unless ``rebuild`` (a stale or damaged one is
    replaced). ``progress`` shows a bar (image i of N, every layer scanned);
    ``on_progress(done, total)`` is called after each image of each layer scanned, ``total`` =
    images x layers scanned. Returns the index folders, written or kept. Rows completed later
    make the index stale (the atlas then scans again): build it when the store is finished,
    or again after.
    """
    plan = plan_atlas_index(store, layers, presets, rebuild=rebuild)
    return run_plan(plan, progress=progress, on_progress=on_progress)


def run_plan(plan: IndexPlan, *, progress: bool = True, on_progress: OnProgress | None = None) -> list[Path]:
    """Build what ``plan`` (:func:`plan_atlas_index`) says: see :func:`build_atlas_index`."""
    from scorecam_explorer.atlas import scan_tables

    tree = plan.tree
    total = plan.images * plan.scans
    bar = None
    if progress and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="atlas index", unit="image")
    done = 0
    current = ""

    def step(image: int, count: int) -> None:
        nonlocal done
        done += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{current}: image {image} of {count}", refresh=False)
        if on_progress is not None:
            on_progress(done, total)

    try:
        for layer, names in plan.work.items():
            if not names:
                continue
            current = layer
            for preset, tables in zip(names, scan_tables(tree, layer, names, on_image=step)):
                _write(_layer_preset_folder(plan.store, layer, preset), expected_manifest(tree, layer, preset), tables)
    finally:
        if bar is not None:
            bar.close()
    ids = [str(image) for image in np.asarray(tree["image"].values)]
    if root_outputs(plan.store, ids, dict(tree.attrs)) is None:
        write_root_outputs(plan.store, tree)
    return [_layer_preset_folder(plan.store, layer, preset) for layer in plan.shapes for preset in plan.presets]


# ---- the unmasked and baseline outputs of the complete images, in one file -------------------

ROOT_OUTPUTS = "root-outputs.npz"
"""File in the index folder holding the complete images' ``logits`` and ``baseline_logits``."""
ROOT_NAMES = ("logits", "baseline_logits")


def _root_manifest(image_ids: Sequence[str], attrs: dict[str, Any]) -> str:
    return json.dumps(
        _plain({"format": INDEX_FORMAT, "package_version": __version__, "images": list(image_ids), "store_attrs": attrs}),
        sort_keys=True,
    )


def root_outputs(store: str | os.PathLike[str], image_ids: Sequence[str], attrs: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The unmasked and baseline outputs (image, class) of the store's complete images
    ``image_ids`` (in that order) from its index folder, or None unless the file was written
    for exactly those images and the same store attributes. A store's root arrays come one
    image per chunk: this one file is what lets :func:`~scorecam_explorer.dataset_store.open_dataset`
    read a thousand images' outputs in milliseconds instead of seconds."""
    path = index_folder(store) / ROOT_OUTPUTS
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["manifest"]) != _root_manifest([str(i) for i in image_ids], attrs):
                return None
            arrays = {name: np.asarray(saved[name]) for name in ROOT_NAMES}
    except (OSError, ValueError, KeyError) as error:
        _warn_damaged(Path(store), path, f"it cannot be read: {type(error).__name__}: {error}")
        return None
    if any(array.ndim != 2 or array.shape[0] != len(image_ids) for array in arrays.values()):
        return None
    return arrays


def write_root_outputs(store: str | os.PathLike[str], tree: xr.DataTree) -> Path:
    """Save ``tree``'s (the store's complete rows) unmasked and baseline outputs for
    :func:`root_outputs`: a temporary file, then a rename."""
    folder = index_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ROOT_OUTPUTS
    ids = [str(image) for image in np.asarray(tree["image"].values)]
    arrays = {name: np.ascontiguousarray(tree[name].transpose("image", "class").values) for name in ROOT_NAMES}
    temporary = folder / f".{ROOT_OUTPUTS}.partial-{uuid.uuid4().hex[:8]}"
    try:
        _write_file(temporary, lambda file: np.savez(file, manifest=np.asarray(_root_manifest(ids, dict(tree.attrs))), **arrays))
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def _write(folder: Path, manifest: dict[str, Any], tables: xr.Dataset) -> None:
    """Write the index into a hidden sibling folder, flushed, then rename it to ``folder``
    (an older index there is renamed away first and removed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    temporary = folder.parent / f".{folder.name}.partial-{token}"
    retired = folder.parent / f".{folder.name}.old-{token}"
    temporary.mkdir()
    try:
        for name, (dims, dtype) in TABLES.items():
            array = np.ascontiguousarray(tables[name].transpose(*dims).values, dtype=dtype)
            _write_file(temporary / f"{name}.npy", lambda file, array=array: np.save(file, array, allow_pickle=False))
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _write_file(temporary / "manifest.json", lambda file: file.write(text))
        if folder.exists():
            os.rename(folder, retired)
        os.rename(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def _write_file(path: Path, write: Callable[[Any], Any]) -> None:
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())

