"""Which cache the app serves: found, checked, computed or opened, before any page asks.

:func:`prepare_cache` reuses the cache for a model, picture, convention and layers from the
cache directory (:func:`cache_dir`) after checking that it matches (weights fingerprint, mask
convention, the picture's pixels), computes what is missing with progress for the pages
(:func:`progress_reporter`), and saves it atomically; :func:`prepare_picture_set` does the same
for a folder of pictures or the bundled samples (``app --images``); :func:`prepare_dataset`
checks a dataset store, builds its atlas index where it is not fresh, and leaves the rest to
each page, which opens it lazily (:func:`open_for_app`). :func:`recall_cache` and
:func:`remember_cache` keep which cache each set of options served last.

Nothing here imports torch at module level: a saved cache served as it is needs no model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scorecam_explorer.errors import CacheError, ScorecamError
from scorecam_explorer.serving.status import AppStatus

if TYPE_CHECKING:
    import xarray as xr

    from scorecam_explorer.models import LoadedModel

DEFAULT_IMAGE = "sample:chelsea"

ENV_CACHE_DIR = "SCORECAM_EXPLORER_CACHE_DIR"
"""Overrides where computed caches are kept (default: the user's cache directory)."""

DEFAULT_APP_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.5", "blocks.11", "blocks.15", "head"),
}
"""Layers the app caches by default, per model: a few blocks and the default layer, so the
layer scrubber has something to scrub while the first run stays short on a CPU."""

Reporter = Callable[[AppStatus], None]
"""Receives the command's progress (see :mod:`scorecam_explorer.serving.status`)."""


# ---- where caches live ------------------------------------------------------------------


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the app keeps computed caches.

    ``$SCORECAM_EXPLORER_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/scorecam_explorer``, else
    ``~/.cache/scorecam_explorer``. Not created here.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_CACHE_DIR):
        return Path(env[ENV_CACHE_DIR]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "scorecam_explorer"
    return Path("~/.cache").expanduser() / "scorecam_explorer"


def picture_hash(pixels: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of a picture's pixels, shape included."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{pixels.dtype}:{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "image"


def default_cache_path(
    model_name: str, fingerprint: str, image: str, pixels: np.ndarray, convention: str, directory: Path | None = None
) -> Path:
    """``<cache dir>/<model>-<weights>-<picture>-<pixels>-<convention>.zarr``.

    The weights fingerprint and the hash of the picture's pixels are in the name, so
    another model, other weights or another picture never find this file.
    """
    stem = Path(image[len("sample:") :] if image.startswith("sample:") else image).stem
    name = f"{_slug(model_name)}-{fingerprint[:8]}-{_slug(stem)}-{picture_hash(pixels)[:10]}-{_slug(convention)}.zarr"
    return (directory or cache_dir()) / name


def default_layers(model: LoadedModel) -> list[str]:
    """The layers the app caches when none are named.

    :data:`DEFAULT_APP_LAYERS` for the models it lists; otherwise the last layer of each of
    the three deepest spatial resolutions and the default layer, shallow to deep.
    """
    known = DEFAULT_APP_LAYERS.get(model.name)
    names = model.layer_names()
    if known and all(layer in names for layer in known):
        return list(known)
    last_of_stage: dict[tuple[int, int], str] = {}
    for info in model.layers():
        if info.height > 1 or info.width > 1:
            last_of_stage[(info.height, info.width)] = info.name
    chosen = list(last_of_stage.values())[-3:]
    if model.default_layer not in chosen:
        chosen.append(model.default_layer)
    order = {name: index for index, name in enumerate(model.layer_names(listed_only=False))}
    return sorted(set(chosen), key=lambda name: order.get(name, len(order)))


# ---- preparing the cache ----------------------------------------------------------------


@dataclass
class PreparedCache:
    """What :func:`prepare_cache` did: where the cache is, and how it got there.

    ``status``: ``"computed"``, ``"reused"``, ``"extended"`` (layers added to a reused
    cache) or ``"opened"`` (a cache given by path, served as it is).
    """

    path: Path
    status: str
    layers: list[str]
    seconds: float = 0.0
    model_name: str = ""
    notes: list[str] = field(default_factory=list)
    tree: Any = field(default=None, repr=False, compare=False)
    """The cache as loaded and checked (when it was loaded), for :meth:`AppServer.ready`."""


def _refuse(path: Path, reason: str, *, given_alone: bool = False) -> CacheError:
    """The refusal of the cache at ``path``, saying what ``--recompute`` would compute there.

    ``given_alone``: the cache was named by path without --model, --image or --layer; then
    --recompute computes the defaults (the embedded model on the bundled photo), not what
    this cache held, and the message says so.
    """
    if given_alone:
        from scorecam_explorer.models import DEFAULT_MODEL

        remedy = (
            "Run again with --recompute and the --model, --weights, --image and --layer this cache was made with "
            f"to compute it afresh at this path (--recompute alone computes {DEFAULT_MODEL} on {DEFAULT_IMAGE} "
            "there instead; the old one is replaced only once the new one is complete)"
        )
    else:
        remedy = "Run again with --recompute to compute it afresh (it is replaced only once the new one is complete)"
    return CacheError(f"the cache at {path} cannot be used: {reason.rstrip('.')}. {remedy}, or pass another --cache path.")


def open_existing(path: Path, *, given_alone: bool = False) -> xr.DataTree:
    """Load a cache for the app; a damaged or foreign one is refused with the reason."""
    from scorecam_explorer.cache import load_cache

    try:
        return load_cache(path)
    except CacheError as error:
        raise _refuse(path, str(error), given_alone=given_alone) from None


def _check_model_and_convention(cache: xr.DataTree, path: Path, model: LoadedModel, convention: str) -> None:
    """Refuse a cache made with other weights or another convention."""
    from scorecam_explorer.cache import check_cache_matches

    try:
        check_cache_matches(cache, model=model, convention=convention)
    except CacheError as error:
        raise _refuse(path, str(error)) from None


def _extended(
    cache: xr.DataTree, path: Path, model: LoadedModel, missing: list[str], *, progress: bool, on_progress: Callable
) -> PreparedCache:
    """``cache`` with the layers ``missing`` computed and added, saved over ``path``."""
    from scorecam_explorer.cache import cache_layers, save_cache
    from scorecam_explorer.explorer.model_link import compute_layers

    started = time.perf_counter()
    cache = compute_layers(cache, model, missing, progress=progress, on_progress=on_progress)
    save_cache(cache, path, overwrite=True)
    return PreparedCache(path, "extended", cache_layers(cache), time.perf_counter() - started, model.name)


def _save_computed(cache: xr.DataTree, path: Path, *, recompute: bool, report: Reporter) -> None:
    """Save a freshly computed cache at ``path``, replacing what is there with ``recompute``."""
    from scorecam_explorer.cache import save_cache

    report(AppStatus("loading", "Saving the cache"))
    path.parent.mkdir(parents=True, exist_ok=True)
    if recompute and path.exists():
        replace_cache(cache, path)
    else:
        save_cache(cache, path)


def check_reusable(
    cache: xr.DataTree, path: Path, model: LoadedModel, convention: str, image_id: str, pixels: np.ndarray
) -> None:
    """Refuse a cache made with other weights, another convention or another picture."""
    _check_model_and_convention(cache, path, model, convention)
    images = [str(name) for name in cache["image"].values]
    index = images.index(image_id) if image_id in images else 0 if len(images) == 1 else None
    cached = None if index is None else np.asarray(cache["picture"].isel(image=index).values)
    if cached is None or cached.shape != pixels.shape or not np.array_equal(cached, pixels):
        raise _refuse(path, f"it was made for another picture (pixel hash {picture_hash(pixels)} differs)")


def prepare_cache(
    *,
    model_name: str | None,
    weights: str | None = "DEFAULT",
    image: str | None = None,
    layers: Sequence[str] | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    convention: str | None = None,
    recompute: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report: Reporter | None = None,
    images: str | os.PathLike[str] | None = None,
) -> PreparedCache:
    """Find, check, compute or extend the cache the app will serve.

    With only ``cache_path`` given (model, picture, layers and convention left as None) and
    a cache there, it is served as it is: no model is loaded. Otherwise the model
    (``model_name``, default the embedded one) and picture (default ``sample:chelsea``) are
    loaded and the cache at ``cache_path`` (default: :func:`default_cache_path`) is reused
    if it matches, extended with missing ``layers``, or computed. ``recompute`` computes
    afresh whatever is there (a folder that is not a cache is never replaced).
    ``report`` receives the progress (loading, computing layer k of n) for the app's pages.

    ``images`` (instead of ``image``): a folder (its image files, sorted by name) or
    ``"samples"`` (every bundled sample photo); one cache holds them all, by default at the
    model's default layer only (see :func:`prepare_picture_set`).
    """
    from scorecam_explorer.cache import cache_layers
    from scorecam_explorer.conventions import DEFAULT_CONVENTION

    if images is not None:
        if image is not None:
            raise ScorecamError("give either one picture (--image) or a set of pictures (--images), not both.")
        return prepare_picture_set(
            images, model_name=model_name, weights=weights, layers=layers, cache_path=cache_path, convention=convention,
            recompute=recompute, progress=progress, log=log, report=report,
        )
    path = Path(cache_path).expanduser() if cache_path is not None else None
    serve_as_is = path is not None and model_name is None and image is None and not layers and convention is None
    report = report or (lambda status: None)
    if serve_as_is and path.exists() and not recompute:
        report(AppStatus("loading", f"Opening the cache {path.name}"))
        cache = open_existing(path, given_alone=True)
        return PreparedCache(path, "opened", cache_layers(cache), model_name=str(cache.attrs.get("model_name", "")), tree=cache)

    report(AppStatus("loading", "Loading the model"))
    from scorecam_explorer.images import load_image
    from scorecam_explorer.models import DEFAULT_MODEL, load_model

    image = image or DEFAULT_IMAGE
    convention = convention or DEFAULT_CONVENTION
    picture = load_image(image)  # a bad path fails here, before the model loads
    log(f"loading model {model_name or DEFAULT_MODEL} ...")
    report(AppStatus("loading", f"Loading the model {model_name or DEFAULT_MODEL}"))
    model = load_model(model_name or DEFAULT_MODEL, weights=weights)
    wanted = [model.check_layer(layer) for layer in layers] if layers else default_layers(model)
    pixels = model.preprocessing.crop_image(picture)
    path = path or default_cache_path(model.name, model.fingerprint(), image, pixels, convention)
    from scorecam_explorer.images import image_id as make_image_id

    identifier = make_image_id(image)

    if path.exists() and not recompute:
        report(AppStatus("loading", f"Checking the cache {path.name}"))
        cache = open_existing(path)
        check_reusable(cache, path, model, convention, identifier, pixels)
        missing = [layer for layer in wanted if layer not in cache_layers(cache)]
        if not missing:
            return PreparedCache(path, "reused", cache_layers(cache), model_name=model.name, tree=cache)
        log(f"adding layer(s) {', '.join(missing)} to {path} ...")
        return _extended(cache, path, model, missing, progress=progress, on_progress=progress_reporter(report, model, missing))

    from scorecam_explorer.engine import compute_cache

    log(f"computing Score-CAM for {identifier} at {', '.join(wanted)} (one forward pass per channel) ...")
    started = time.perf_counter()
    cache = compute_cache(
        model, image, wanted, convention=convention, progress=progress, on_progress=progress_reporter(report, model, wanted)
    )
    _save_computed(cache, path, recompute=recompute, report=report)
    return PreparedCache(path, "computed", cache_layers(cache), time.perf_counter() - started, model.name)


# ---- a set of pictures ------------------------------------------------------------------

SAMPLES = "samples"
"""``--images samples``: every bundled sample photo (``scorecam_explorer/samples``)."""


def picture_set(images: str | os.PathLike[str]) -> list[str]:
    """The sources of ``--images``: ``sample:NAME`` for every bundled sample when ``images``
    is ``"samples"`` (a folder of that name: ``./samples``), else the image files directly
    inside the folder ``images``, sorted by name (by suffix: .jpg, .jpeg, .png, .bmp, .gif,
    .tif, .tiff, .webp).

    Raises ImageLoadError for a missing folder, a file, or a folder without image files.
    """
    from scorecam_explorer.errors import ImageLoadError
    from scorecam_explorer.images import IMAGE_SUFFIXES, SAMPLE_PREFIX, find_images, sample_names

    if str(images) == SAMPLES:  # as `evaluate --images samples`; a folder named so: ./samples
        return [f"{SAMPLE_PREFIX}{name}" for name in sample_names()]
    folder = Path(images).expanduser()
    if not folder.exists():
        raise ImageLoadError(f"image folder not found: {folder} (give a folder of pictures, or 'samples' for the bundled photos).")
    if not folder.is_dir():
        raise ImageLoadError(f"--images takes a folder of pictures, and {folder} is a file; for one picture use --image {folder}.")
    found = find_images(folder)
    if not found:
        raise ImageLoadError(f"no image files in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); put pictures there or use 'samples'.")
    return [str(path) for path in found]


def pictures_hash(ids: Sequence[str], pixels: Sequence[np.ndarray]) -> str:
    """sha256 (first 16 hex digits) of a set of pictures: each id and :func:`picture_hash`, in order."""
    digest = hashlib.sha256()
    for identifier, picture in zip(ids, pixels):
        digest.update(f"{identifier}\0{picture_hash(picture)}\0".encode())
    return digest.hexdigest()[:16]


def default_set_cache_path(
    model_name: str,
    fingerprint: str,
    images: str | os.PathLike[str],
    ids: Sequence[str],
    pixels: Sequence[np.ndarray],
    convention: str,
    directory: Path | None = None,
) -> Path:
    """``<cache dir>/<model>-<weights>-<folder or samples>-<N>images-<pixels>-<convention>.zarr``:
    another model, other weights, or another set of pictures (a picture added, removed,
    renamed or changed) never finds this file."""
    label = _slug(Path(str(images)).expanduser().resolve().name if str(images) != SAMPLES else SAMPLES)
    name = (
        f"{_slug(model_name)}-{fingerprint[:8]}-{label}-{len(ids)}images-{pictures_hash(ids, pixels)[:10]}-"
        f"{_slug(convention)}.zarr"
    )
    return (directory or cache_dir()) / name


def check_reusable_set(
    cache: xr.DataTree, path: Path, model: LoadedModel, convention: str, ids: Sequence[str], pixels: Sequence[np.ndarray]
) -> None:
    """Refuse a cache made with other weights, another convention or other pictures (ids, order
    or pixels)."""
    _check_model_and_convention(cache, path, model, convention)
    cached_ids = [str(name) for name in cache["image"].values]
    if cached_ids != list(ids):
        raise _refuse(path, f"it was made for other pictures ({len(cached_ids)} cached, {len(ids)} given, or in another order)")
    for index, picture in enumerate(pixels):
        cached = np.asarray(cache["picture"].isel(image=index).values)
        if cached.shape != picture.shape or not np.array_equal(cached, picture):
            raise _refuse(path, f"its picture {ids[index]} differs from the file now (pixel hash {picture_hash(picture)})")


def masked_passes(model: LoadedModel, layers: Sequence[str], n_images: int) -> int:
    """Masked forward passes Score-CAM makes for ``layers`` on ``n_images`` pictures at most:
    n_images x (sum of the layers' channels); constant channels are skipped, so fewer."""
    channels = {info.name: info.channels for info in model.layers(listed_only=False)}
    return int(n_images) * sum(int(channels.get(layer, 0)) for layer in layers)


def prepare_picture_set(
    images: str | os.PathLike[str],
    *,
    model_name: str | None,
    weights: str | None = "DEFAULT",
    layers: Sequence[str] | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    convention: str | None = None,
    recompute: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report: Reporter | None = None,
) -> PreparedCache:
    """:func:`prepare_cache` for a set of pictures (``images``: a folder or ``"samples"``).

    Every picture is read before the model loads (an unreadable one is named, and nothing is
    computed). The layers default to the model's default layer only: the cost is one
    masked pass per channel and picture (:func:`masked_passes`, said before computing). The
    cache (default :func:`default_set_cache_path`) is reused when its weights, convention,
    image ids and pixels all match, extended with missing ``layers``, else computed.
    """
    from scorecam_explorer.cache import cache_layers
    from scorecam_explorer.conventions import DEFAULT_CONVENTION
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.errors import ImageLoadError
    from scorecam_explorer.images import image_id as make_image_id
    from scorecam_explorer.images import load_image
    from scorecam_explorer.inputs import unique_ids
    from scorecam_explorer.models import DEFAULT_MODEL, load_model

    report = report or (lambda status: None)
    convention = convention or DEFAULT_CONVENTION
    sources = picture_set(images)
    report(AppStatus("loading", f"Reading {len(sources)} pictures"))
    pictures = []
    for source in sources:
        try:
            pictures.append(load_image(source))
        except ImageLoadError as error:
            raise ImageLoadError(f"{error}; remove or replace that file in {images}, then run again.") from None
    ids = unique_ids(make_image_id(source) for source in sources)
    log(f"loading model {model_name or DEFAULT_MODEL} ...")
    report(AppStatus("loading", f"Loading the model {model_name or DEFAULT_MODEL}"))
    model = load_model(model_name or DEFAULT_MODEL, weights=weights)
    wanted = [model.check_layer(layer) for layer in layers] if layers else [model.default_layer]
    pixels = [model.preprocessing.crop_image(picture) for picture in pictures]
    path = Path(cache_path).expanduser() if cache_path is not None else None
    path = path or default_set_cache_path(model.name, model.fingerprint(), images, ids, pixels, convention)

    if path.exists() and not recompute:
        report(AppStatus("loading", f"Checking the cache {path.name}"))
        cache = open_existing(path)
        check_reusable_set(cache, path, model, convention, ids, pixels)
        missing = [layer for layer in wanted if layer not in cache_layers(cache)]
        if not missing:
            return PreparedCache(path, "reused", cache_layers(cache), model_name=model.name, tree=cache)
        log(f"adding layer(s) {', '.join(missing)} to {path}: at most {masked_passes(model, missing, len(ids)):,} masked forward passes ...")
        on_progress = progress_reporter(report, model, missing, n_images=len(ids), echo=_echo(log) if progress else None)
        return _extended(cache, path, model, missing, progress=progress, on_progress=on_progress)

    passes = masked_passes(model, wanted, len(ids))
    log(
        f"computing Score-CAM for {len(ids)} pictures at {', '.join(wanted)}: at most {passes:,} masked forward passes "
        "(one per channel and picture; constant channels are skipped) ..."
    )
    report(AppStatus("loading", f"Computing {len(ids)} pictures at {', '.join(wanted)}: at most {passes:,} forward passes"))
    started = time.perf_counter()
    on_progress = progress_reporter(report, model, wanted, n_images=len(ids), echo=_echo(log) if progress else None)
    cache = compute_cache(model, pictures, wanted, convention=convention, image_ids=ids, progress=progress, on_progress=on_progress)
    _save_computed(cache, path, recompute=recompute, report=report)
    return PreparedCache(path, "computed", cache_layers(cache), time.perf_counter() - started, model.name)


def _echo(log: Callable[[str], None]) -> Callable[[str], None]:
    """Lines for the terminal that do not break the engine's progress bar."""
    if log is not print:
        return log
    from tqdm.auto import tqdm

    return tqdm.write


# ---- a dataset store ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoreRows:
    """How many rows of a dataset store are complete (served) and how many are not yet."""

    complete: int
    total: int

    @property
    def pending(self) -> int:
        return self.total - self.complete

    def describe(self, path: Path) -> str:
        """One line for a person."""
        text = f"dataset store {Path(path).name}: {self.complete} of {self.total} images complete"
        if self.pending:
            text += (
                f"; {self.pending} pending (still being written, or its run was interrupted: rerun compute-dataset "
                "to finish them); a page opened later shows those completed by then"
            )
        return text


def check_dataset_store(path: str | os.PathLike[str]) -> StoreRows:
    """Check that ``path`` is a dataset store (``compute_dataset``) with at least one complete
    image; count its rows. Reads the root metadata, the ids and the ``complete`` flags only.

    Raises CacheError for a missing path, a single-image cache (serve it with ``--cache``),
    anything else that is not a dataset store, and a store with no complete image yet.
    """
    from scorecam_explorer.dataset_store import existing_store_attrs, stored_images

    store = Path(path).expanduser()
    if not store.exists():
        raise CacheError(f"no dataset store at {store}: the path does not exist (make one with `scorecam-explorer compute-dataset`).")
    if not store.is_dir():
        raise CacheError(f"{store} is a file, not a dataset store (a Zarr folder made by `scorecam-explorer compute-dataset`).")
    try:
        existing_store_attrs(store)
    except CacheError:
        if _is_single_cache(store):
            raise CacheError(f"{store} is a single cache, not a dataset store: serve it with --cache {store}.") from None
        raise CacheError(
            f"{store} is not a dataset store (a Zarr folder made by `scorecam-explorer compute-dataset` or compute_dataset)."
        ) from None
    try:
        ids, complete = stored_images(store)
    except Exception as error:  # noqa: BLE001 - zarr raises many types for a damaged store
        raise CacheError(f"the dataset store {store} cannot be read: {type(error).__name__}: {error}") from None
    rows = StoreRows(int(np.count_nonzero(complete)), len(ids))
    if rows.complete == 0:
        raise CacheError(
            f"the dataset store {store} has no complete image yet ({rows.pending} pending): wait until "
            "compute-dataset has finished some, or rerun it to finish an interrupted run, then start the app again."
        )
    return rows


def _is_single_cache(path: Path) -> bool:
    try:
        attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return str(attributes.get("schema", "")).startswith("scorecam_explorer.cache") and "dataset_store" not in attributes


def is_dataset_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a dataset store (by its root metadata; nothing else is read)."""
    from scorecam_explorer.dataset_store import DATASET_STORE

    try:
        attributes = json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return attributes.get("dataset_store") == DATASET_STORE


def prepare_dataset(
    path: str | os.PathLike[str],
    *,
    log: Callable[[str], None] = print,
    report: Reporter | None = None,
    atlas_index: bool = True,
) -> PreparedCache:
    """Check the dataset store the app will serve (:func:`check_dataset_store`) and say how
    many images it holds and how many are pending; with ``atlas_index``, build its atlas index
    where it is not fresh (:func:`index_dataset_for_app`: the one time every image is read).
    Otherwise nothing of its arrays is read: the pages open it lazily (:func:`open_for_app`).
    ``status`` is ``"dataset"``; ``notes`` holds the lines said."""
    from scorecam_explorer.cache import recorded_layers

    store = Path(path).expanduser()
    report = report or (lambda status: None)
    report(AppStatus("loading", f"Opening the dataset store {store.name}"))
    rows = check_dataset_store(store)
    attributes = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    line = rows.describe(store)
    log(line)
    report(AppStatus("loading", line[0].upper() + line[1:]))
    notes = [line]
    if atlas_index:
        indexed = index_dataset_for_app(store, log=log, report=report)
        if indexed:
            notes.append(indexed)
    return PreparedCache(store, "dataset", recorded_layers(attributes), model_name=str(attributes.get("model_name", "")), notes=notes)


def index_dataset_for_app(store: Path, *, log: Callable[[str], None] = print, report: Reporter | None = None) -> str:
    """Build the store's atlas index (every layer, the ``paper`` preset) where it is not fresh,
    so that the Atlas panel of every page opens at once instead of reading every image.

    Nothing is built for a store of one complete image (no atlas) or when the folder beside
    the store cannot be written (then each page offers to read the images itself). Returns a
    line for the terminal and the page ("" when the index was fresh already).
    """
    from scorecam_explorer.atlas_index import index_folder, plan_atlas_index, run_plan

    report = report or (lambda status: None)
    plan = plan_atlas_index(store)
    if plan.images < 2 or not plan.scans:
        return ""
    folder = index_folder(store)
    if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
        line = f"the atlas index cannot be written at {folder} (no permission); the Atlas panel reads the images when asked"
        log(line)
        return line
    log(plan.describe())
    total = plan.images * plan.scans
    step = max(1, total // 100)

    def progress(done: int, count: int) -> None:
        if done == count or done % step == 0:
            report(AppStatus("computing", f"Atlas index: image {done} of {count}", done=done, total=count))

    started = time.perf_counter()
    run_plan(plan, progress=False, on_progress=progress)
    line = f"atlas index built in {time.perf_counter() - started:.0f} s ({plan.images} images, {plan.scans} layer(s)) at {folder}"
    log(line)
    return line


def open_for_app(path: str | os.PathLike[str]) -> tuple[xr.DataTree, str]:
    """What a page shows: a cache loaded and checked (:func:`open_existing`), or a dataset
    store opened lazily (its complete images only, every array dask-backed, nothing read
    but ids and flags until a panel shows something), with a note for above the explorer
    (how many images are complete and pending; "" for a cache)."""
    source = Path(path)
    if not is_dataset_store(source):
        return open_existing(source), ""
    from scorecam_explorer.dataset_store import open_dataset

    rows = check_dataset_store(source)
    return open_dataset(source, complete_only=True), rows.describe(source)


def _looks_like_damaged_cache(path: Path) -> bool:
    """A Zarr store whose root metadata is unreadable but that holds a cache's root arrays."""
    return (path / "zarr.json").is_file() and all((path / name / "zarr.json").is_file() for name in ("logits", "baseline_logits", "input"))


def replace_cache(cache: xr.DataTree, path: Path) -> None:
    """Save ``cache`` over the one at ``path``, also when that one is too damaged to be
    recognised; anything else (a folder that is not a cache) is never replaced."""
    from scorecam_explorer.cache import save_cache

    if not _looks_like_damaged_cache(path):
        save_cache(cache, path, overwrite=True)  # refuses what is not a cache
        return
    aside = path.with_name(f".{path.name}.damaged-{os.getpid()}")
    os.rename(path, aside)
    try:
        save_cache(cache, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def progress_reporter(
    report: Reporter,
    model: LoadedModel,
    layers: Sequence[str],
    *,
    n_images: int = 1,
    echo: Callable[[str], None] | None = None,
) -> Callable[[int, int], None]:
    """An ``on_progress`` for :func:`~scorecam_explorer.engine.compute_cache` of ``layers``
    on ``n_images`` pictures that passes "computing layer k of n" (and, for several pictures,
    "image i of m") to ``report``: the start at once, then at each new layer or picture, at
    the end, and otherwise at most every half second. ``echo``, when given, hears one line per
    new layer or picture (at most one a second, the last always), for the terminal.

    The engine counts the masked inputs of every layer together (images x channels), layer
    after layer in model order, and within a layer picture after picture. With C_l the
    channels of layer l and E_k = C_1 + ... + C_k, a count ``done`` of ``total`` is at the
    channel position p = done * m * E_n / total (m pictures), in layer k when
    m E_(k-1) <= p < m E_k, at picture i = floor((p - m E_(k-1)) / C_k) + 1 of that layer.
    """
    channels = {info.name: info.channels for info in model.layers(listed_only=False)}
    wanted = set(layers)
    order = [name for name in channels if name in wanted] + [name for name in layers if name not in channels]
    sizes = [channels.get(name, 0) for name in order]
    ends = [int(end) for end in np.cumsum(sizes)]  # per image
    per_image = ends[-1] if ends else 0
    m = max(int(n_images), 1)
    state: dict[str, Any] = {"at": (0, 0), "last": 0.0, "echoed": 0.0, "echoed_at": None}
    report(AppStatus("computing", _where(order[0] if order else "", 0, m), 0, len(order)))

    def on_progress(done: int, total: int) -> None:
        # layer k holds the counts below total * ends[k] / per_image (in integers: no rounding)
        step = next((k for k, end in enumerate(ends) if done * per_image < total * end), max(len(order) - 1, 0))
        image = 0
        if m > 1 and total > 0 and sizes and sizes[step] > 0:
            position = done * m * per_image // total - m * (ends[step] - sizes[step])
            image = min(max(position // sizes[step], 0), m - 1)
        now = time.monotonic()
        finished = done >= total
        if (step, image) == state["at"] and not finished and now - state["last"] < 0.5:
            return
        state.update(at=(step, image), last=now)
        layer = order[step] if order else ""
        where = _where(layer, image, m)
        report(AppStatus("computing", f"{where} ({done} of {total} channels in all)", step, len(order), done=done, total=total))
        if echo is not None and (state["echoed_at"] != (step, image) or finished):
            if finished or now - state["echoed"] >= 1.0:
                state.update(echoed=now, echoed_at=(step, image))
                echo(f"layer {step + 1} of {len(order)} ({where}): {done} of {total} masked passes")

    return on_progress


def _where(layer: str, image: int, n_images: int) -> str:
    """``"head"``, or ``"head, image 3 of 13"`` for several pictures (``image`` from 0)."""
    return f"{layer}, image {image + 1} of {n_images}" if n_images > 1 else layer


RECENT_CACHES = "app-recent.json"
"""In the cache directory: the cache each set of `app` options served last (a hint only)."""


def recent_key(**options: Any) -> str:
    """The key of a set of `app` options in :data:`RECENT_CACHES`."""
    return json.dumps(options, sort_keys=True, default=str)


def recall_cache(key: str, directory: Path | None = None) -> Path | None:
    """The cache served last for ``key``, if it still exists (else None)."""
    try:
        recent = json.loads(((directory or cache_dir()) / RECENT_CACHES).read_text())
        path = Path(recent[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_dir() else None


def remember_cache(key: str, path: Path, directory: Path | None = None, keep: int = 32) -> None:
    """Record that ``path`` was served for ``key`` (atomically; best effort)."""
    folder = directory or cache_dir()
    target = folder / RECENT_CACHES
    try:
        recent = json.loads(target.read_text())
        if not isinstance(recent, dict):
            recent = {}
    except (OSError, ValueError):
        recent = {}
    recent.pop(key, None)
    recent[key] = str(Path(path).resolve())
    recent = dict(list(recent.items())[-keep:])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{RECENT_CACHES}.", dir=folder)
        with os.fdopen(handle, "w") as stream:
            json.dump(recent, stream, indent=1)
        os.replace(temporary, target)
    except OSError:
        pass
