"""Score-CAM caches of whole image sets, computed on a Dask cluster into one Zarr store.

:func:`compute_dataset` runs :func:`~scorecam_explorer.engine.compute_cache` for every image
of a set on Dask workers and writes the results into one *dataset store*: a Zarr store with
the schema of a cache (``docs/cache.md``) whose ``image`` dimension holds every image. Per
image i and layer, exactly what a single-image cache holds:

    picture[i], input[i] = X_i, logits[i] = f(X_i), baseline_logits[i] = f(X_i * 0),
    activation[i, k] = A_k(X_i), masked_logits[i, k] = f(X_i * H_ik), constant[i, k].

How it stays correct when workers fail or a run is interrupted (``docs/distributed.md``):

* The client creates the store once, atomically, with every array's shape and one Zarr
  chunk per image along ``image``; workers only ever write whole chunks of *their* image
  (``region=``), so no two writers share a chunk, and Zarr writes each chunk file
  atomically.
* Each image's row ends with ``complete[i] = True``, written after all of its data. A task
  that dies half-way leaves ``complete[i] = False``; its retry, or a later run, rewrites the
  whole row. Rows are indexed by image, so an image can never be stored twice.
* A rerun computes only the rows not complete, after checking that the model (name and
  weights fingerprint), mask convention, precision, layers and image set match the store.

Per image the store also records ``image_forward_passes`` and ``image_seconds`` (the model
calls and worker seconds of its computation), so :func:`select_image` gives back a cache
identical to the one ``compute_cache`` would have made for that image alone.

The model is never shipped to a worker: each worker calls ``model_factory`` once and keeps
the model (per factory and device) for every later task. Importing this module imports
neither torch nor dask: the functions that run on workers import what they need.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import xarray as xr

from scorecam_explorer.cache import (
    LAYER_VARIABLES,
    ROOT_VARIABLES,
    SCHEMA,
    storage_encoding,
    with_plain_strings,
    with_storable_strings,
    validate_cache,
)
from scorecam_explorer.conventions import DEFAULT_CONVENTION, MaskConvention, get_convention
from scorecam_explorer.errors import CacheError, ImageLoadError, ScorecamError, did_you_mean
from scorecam_explorer.images import find_images, image_id

if TYPE_CHECKING:
    from distributed import Client

    from scorecam_explorer.models import LoadedModel

__all__ = ["DATASET_STORE", "DatasetRun", "compute_dataset", "open_dataset", "select_image"]

DATASET_STORE = "scorecam_explorer.dataset/1"
"""The ``dataset_store`` attribute of every store :func:`compute_dataset` writes."""

# Root variables (image,) a dataset store has besides the cache schema.
DATASET_VARIABLES: dict[str, str] = {
    "complete": "bool",
    "image_forward_passes": "int64",
    "image_seconds": "float64",
}
# Root attributes a dataset store has besides the cache schema.
DATASET_ATTRS = ("dataset_store", "skipped_images", "runs")
PRECISIONS = ("float32", "bfloat16")
# A factory that pickles to more than this carries its weights with it (a warning says so).
_FACTORY_WARN_BYTES = 1 << 20

ImageSource = Union[str, Path, Any]
ModelFactory = Callable[[], Any]


@dataclass
class DatasetRun:
    """What one :func:`compute_dataset` call did.

    Attributes:
        store: the dataset store.
        computed: ids of the images computed by this run.
        already_complete: ids that were complete before this run (not recomputed).
        skipped: image id -> why it could not be read (left out of the store, or left
            incomplete when it became unreadable mid-run; see the store's ``skipped_images``).
        forward_passes: model calls made by this run's tasks.
        seconds: wall time of this run.
        workers: the number of workers the cluster had when the run started.
        devices: the devices the images of this run were computed on.
    """

    store: Path
    computed: list[str] = field(default_factory=list)
    already_complete: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    forward_passes: int = 0
    seconds: float = 0.0
    workers: int = 0
    devices: set[str] = field(default_factory=set)

    def open(self, *, complete_only: bool = True) -> xr.DataTree:
        """The store as a lazy (dask-backed) cache: see :func:`open_dataset`."""
        return open_dataset(self.store, complete_only=complete_only)


# ---- the client side ---------------------------------------------------------------------


def compute_dataset(
    model_factory: ModelFactory,
    images: str | os.PathLike[str] | Sequence[ImageSource],
    layers: str | Sequence[str] | None,
    store: str | os.PathLike[str],
    *,
    client: Client | str | None = None,
    convention: str | MaskConvention = DEFAULT_CONVENTION,
    batch_size: int | None = None,
    precision: str = "float32",
    device: str = "auto",
    workers: int | None = None,
    retries: int = 2,
    connect_timeout: float = 10.0,
    progress: bool = True,
) -> DatasetRun:
    """Compute the Score-CAM cache of every image on Dask workers, into one Zarr store.

    Every image is one task: the worker loads the picture, runs ``compute_cache`` (the
    unmasked, baseline and one masked forward pass per non-constant channel of each layer)
    and writes the image's row of the store, then marks it complete. Rerunning the same call
    on the same store computes only the images not yet complete; with all complete it makes
    no forward pass.

    Args:
        model_factory: a picklable callable with no arguments that returns a
            :class:`~scorecam_explorer.models.LoadedModel` or an ``nn.Module``, e.g.
            ``functools.partial(load_model, "resnet50")``. Each worker calls it once and
            keeps the model. It must build the same weights every time (seed random ones).
        images: a folder (its image files, sorted by name), or a list of image paths,
            ``"sample:NAME"`` names or in-memory pictures. Paths must be readable by the
            workers. Unreadable images are skipped with a warning and listed in the store's
            ``skipped_images`` attribute.
        layers: a layer name, a list of names, or None for the model's default layer.
        store: the Zarr store's path (a folder every worker can write to). An existing
            dataset store is resumed; it must have been made with the same model, convention,
            precision, layers and images.
        client: a ``dask.distributed.Client``, a scheduler address (``"tcp://host:8786"``),
            or None / ``"local"`` for a ``LocalCluster`` on this machine, closed afterwards.
        convention: the mask convention (see :mod:`scorecam_explorer.conventions`).
        batch_size: masked inputs per forward pass; None lets each worker measure.
        precision: ``"float32"`` or ``"bfloat16"``.
        device: the device each worker computes on (``"auto"``: its GPU if it has one).
        workers: worker processes of the local cluster (default: one per CPU core, or one
            if a GPU is present). Only with ``client=None``.
        retries: how often a failed task is retried (a worker that dies is also retried,
            by the scheduler, up to its ``allowed-failures``).
        connect_timeout: seconds to wait for a scheduler address to answer.
        progress: show a progress bar over finished images.

    Returns:
        A :class:`DatasetRun`; ``run.open()`` gives the store as a lazy cache.

    Raises:
        CacheError: the store exists but is not a dataset store, or was made with another
            model, convention, precision, layers or image set (the message says which).
        ScorecamError: the scheduler cannot be reached within ``connect_timeout``, or some
            images failed after their retries (the store keeps every finished image: rerun
            to compute the rest).
    """
    watch = time.perf_counter()
    factory_key = _check_factory(model_factory)
    mask_convention = get_convention(convention)
    if precision not in PRECISIONS:
        raise ScorecamError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ScorecamError(f"batch size must be a positive integer, not {batch_size!r}.")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ScorecamError(f"retries must be a non-negative integer, not {retries!r}.")
    requested_layers = _requested_layers(layers)
    sources, ids = _collect_sources(images)
    target = Path(store).absolute()
    existing = _existing_store_attrs(target)
    if existing is not None:
        _check_settings(existing, target, mask_convention, precision, requested_layers)

    with _connect(client, workers, connect_timeout) as dask_client:
        run = DatasetRun(store=target, workers=len(dask_client.nthreads()))
        summary = dask_client.submit(
            _describe_model, model_factory, factory_key, requested_layers, device, existing is None, pure=False
        ).result()
        if existing is None:
            pending = _start_store(dask_client, target, summary, sources, ids, mask_convention, precision, run)
        else:
            pending = _resume_store(target, existing, summary, ids, run)
        stored_ids, _complete = _stored_images(target)
        row_of = {image: row for row, image in enumerate(stored_ids)}
        source_of = dict(zip(ids, sources))
        store_layers = json.loads(_existing_store_attrs(target)["layers"])  # type: ignore[index]
        futures = [
            dask_client.submit(
                _compute_image,
                model_factory,
                factory_key,
                source_of[image],
                image,
                row_of[image],
                str(target),
                store_layers,
                mask_convention,
                precision,
                batch_size,
                device,
                key=f"scorecam-image-{row_of[image]}-{uuid.uuid4().hex[:8]}",
                retries=retries,
                pure=False,
            )
            for image in pending
        ]
        failures = _gather(dask_client, futures, pending, run, progress)
        late_skipped = {image: run.skipped[image] for image in pending if image in run.skipped}
        run.seconds = time.perf_counter() - watch
        _finalize_store(target, run, late_skipped, source_of, failed=len(failures))
    _warn_skipped(late_skipped, late=True)
    if failures:
        listed = "; ".join(f"{image}: {reason}" for image, reason in list(failures.items())[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise ScorecamError(
            f"{len(failures)} of {len(pending)} image(s) failed after {retries} retries: {listed}{more}. "
            f"The store keeps the {len(run.computed)} finished image(s); rerun to compute only the rest."
        )
    return run


def _start_store(
    client: Client,
    path: Path,
    summary: dict[str, Any],
    sources: list[Any],
    ids: list[str],
    convention: MaskConvention,
    precision: str,
    run: DatasetRun,
) -> list[str]:
    """Check which images can be read, create the store for those; returns the images to compute."""
    unreadable = _probe_images(client, sources, ids)
    readable = [image for image in ids if image not in unreadable]
    if not readable:
        raise ImageLoadError(
            f"none of the {len(ids)} image(s) could be read: "
            + "; ".join(f"{image}: {reason}" for image, reason in unreadable.items())
        )
    _warn_skipped(unreadable)
    run.skipped.update(unreadable)
    source_of = dict(zip(ids, sources))
    skipped = [_skip_record(image, reason, source_of) for image, reason in unreadable.items()]
    _create_store(path, _template(summary, readable, convention, precision, skipped))
    return readable


def _resume_store(
    path: Path, attrs: dict[str, Any], summary: dict[str, Any], ids: list[str], run: DatasetRun
) -> list[str]:
    """Check that the store was made with this model and these images; returns the images to compute."""
    _check_model(attrs, path, summary)
    stored_ids, complete = _stored_images(path)
    _check_image_set(path, stored_ids, _skipped_ids(attrs), ids)
    run.already_complete = [image for image, done in zip(stored_ids, complete) if done]
    return [image for image, done in zip(stored_ids, complete) if not done]


def _check_factory(model_factory: ModelFactory) -> str:
    """A key naming the factory on workers (sha256 of its pickle); warns if it carries weights."""
    import cloudpickle

    if not callable(model_factory):
        raise ScorecamError(
            f"model_factory must be a callable with no arguments that builds the model "
            f"(e.g. functools.partial(load_model, 'resnet50')), not {type(model_factory).__name__}."
        )
    try:
        pickled = cloudpickle.dumps(model_factory)
    except Exception as error:  # noqa: BLE001 - pickling raises many types
        raise ScorecamError(
            f"model_factory cannot be pickled to send it to the workers ({type(error).__name__}: {error}); "
            "use a module-level function or functools.partial(load_model, NAME)."
        ) from None
    if len(pickled) > _FACTORY_WARN_BYTES:
        warnings.warn(
            f"model_factory pickles to {len(pickled) / 2**20:.1f} MiB: it carries its weights to every "
            "worker; make it build the model instead (e.g. functools.partial(load_model, NAME)).",
            stacklevel=3,
        )
    return hashlib.sha256(pickled).hexdigest()[:16]


def _requested_layers(layers: str | Sequence[str] | None) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    requested = [str(layer) for layer in layers]
    if not requested:
        raise ScorecamError("no layer given; pass a layer name, a list of names, or None for the default layer.")
    return requested


def _collect_sources(images: Any) -> tuple[list[Any], list[str]]:
    """(sources, unique ids): a folder's image files, or the given list (paths made absolute)."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        sources: list[Any] = [str(path.absolute()) for path in find_images(images)]
        if not sources:
            raise ImageLoadError(f"no image files in {images} (looked for .jpg, .jpeg, .png, .bmp, .gif, .tif, .webp).")
    elif isinstance(images, (str, os.PathLike)):
        if not str(images).startswith("sample:") and not Path(images).exists():
            raise ImageLoadError(f"no image folder or file at {images}.")
        sources = [images]
    elif isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        sources = [images]
    else:
        sources = list(images)
    if not sources:
        raise ImageLoadError("no images given.")
    sources = [_absolute(source) for source in sources]
    seen: dict[str, int] = {}
    ids = []
    for index, source in enumerate(sources):
        raw = image_id(source, index)
        seen[raw] = seen.get(raw, 0) + 1
        ids.append(raw if seen[raw] == 1 else f"{raw}#{seen[raw]}")
    return sources, ids


def _absolute(source: Any) -> Any:
    """Paths made absolute (workers may run elsewhere); other sources as they are."""
    if isinstance(source, Path) or (isinstance(source, str) and not source.startswith("sample:")):
        return str(Path(source).absolute())
    return source


@contextmanager
def _connect(client: Any, workers: int | None, timeout: float) -> Iterator[Client]:
    """The client to use: the given one, one connected to an address, or a local cluster's."""
    from distributed import Client, LocalCluster
    from distributed.deploy.cluster import Cluster

    if isinstance(client, Client):
        if workers is not None:
            raise ScorecamError("workers= only sizes the local cluster; your client's cluster has its own workers.")
        yield client
        return
    if isinstance(client, Cluster):
        with Client(client) as owned:
            yield owned
        return
    if client is None or client == "local":
        count = workers if workers is not None else _default_local_workers()
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ScorecamError(f"workers must be a positive integer, not {workers!r}.")
        try:
            cluster = LocalCluster(
                n_workers=count, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
            )
        except Exception as error:  # noqa: BLE001 - a failed start has many causes
            raise ScorecamError(f"could not start a local Dask cluster: {type(error).__name__}: {error}") from None
        with cluster, Client(cluster) as owned:
            yield owned
        return
    if not isinstance(client, str):
        raise ScorecamError(
            f"client must be a dask.distributed.Client, a scheduler address or None, not {type(client).__name__}."
        )
    if workers is not None:
        raise ScorecamError("workers= only sizes the local cluster; a running scheduler has its own workers.")
    try:
        connected = Client(client, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as error:
        raise ScorecamError(
            f"could not reach the Dask scheduler at {client!r} within {timeout:g} s ({error}); check the address "
            "(e.g. tcp://HOST:8786) and that `dask scheduler` runs there, or use 'local'."
        ) from None
    with connected:
        try:
            connected.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            warnings.warn(
                f"the Dask scheduler at {client!r} has no worker yet; the images wait until workers join.",
                stacklevel=4,
            )
        yield connected


def _default_local_workers() -> int:
    """One worker per CPU core, or one in all when a GPU does the work."""
    import torch

    if torch.cuda.is_available():
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _probe_images(client: Client, sources: list[Any], ids: list[str]) -> dict[str, str]:
    """image id -> why it cannot be read (checked on the workers, which will read them)."""
    reasons = client.gather(client.map(_probe_image, sources, pure=False))
    return {image: reason for image, reason in zip(ids, reasons) if reason is not None}


def _warn_skipped(skipped: dict[str, str], *, late: bool = False) -> None:
    if not skipped:
        return
    when = "became unreadable during the run and stay incomplete" if late else "could not be read and were skipped"
    listed = "; ".join(f"{image}: {reason}" for image, reason in skipped.items())
    warnings.warn(f"{len(skipped)} image(s) {when}: {listed}", stacklevel=3)


# ---- the store ---------------------------------------------------------------------------


def _existing_store_attrs(path: Path) -> dict[str, Any] | None:
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


def _check_settings(
    attrs: dict[str, Any],
    path: Path,
    convention: MaskConvention,
    precision: str,
    layers: list[str] | None,
) -> None:
    """Refuse to resume a store made with another convention, precision or layers."""
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
    stored_layers = json.loads(attrs["layers"])
    if layers is not None and sorted(set(layers)) != sorted(stored_layers):
        raise CacheError(
            f"the dataset store {path} holds the layers {', '.join(stored_layers)}, not {', '.join(layers)}; "
            "resume it with its layers, or use another store."
        )


def _check_model(attrs: dict[str, Any], path: Path, summary: dict[str, Any]) -> None:
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
    stored_layers = json.loads(attrs["layers"])
    if sorted(set(summary["layers"])) != sorted(stored_layers):
        raise CacheError(
            f"the dataset store {path} holds the layers {', '.join(stored_layers)}, but this run asks for "
            f"{', '.join(summary['layers'])}; resume it with its layers, or use another store."
        )


def _skipped_ids(attrs: dict[str, Any]) -> list[str]:
    return [entry["image"] for entry in json.loads(attrs.get("skipped_images", "[]"))]


def _check_image_set(path: Path, stored: list[str], skipped: list[str], ids: list[str]) -> None:
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


def _stored_images(path: Path) -> tuple[list[str], np.ndarray]:
    """(image ids, complete flags) of the store's rows."""
    import zarr

    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    ids = [str(image) for image in group["image"][:]]
    return ids, np.asarray(group["complete"][:], dtype=bool)


def _template(
    summary: dict[str, Any],
    ids: list[str],
    convention: MaskConvention,
    precision: str,
    skipped: list[dict[str, str]],
) -> xr.DataTree:
    """The store's layout as a lazy cache: every array's shape, no data (never computed)."""
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
            attrs={"layer": name},
        )
    return validate_cache(xr.DataTree.from_dict(nodes), check_values=False)


def _create_store(path: Path, template: xr.DataTree) -> None:
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


def _skip_record(image: str, reason: str, source_of: dict[str, Any]) -> dict[str, str]:
    source = source_of[image]
    return {"image": image, "source": source if isinstance(source, str) else image, "reason": reason}


def _gather(client: Client, futures: list[Any], pending: list[str], run: DatasetRun, progress: bool) -> dict[str, str]:
    """Collect the tasks' results as they finish; returns image id -> error for failed ones."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    image_of = {future.key: image for future, image in zip(futures, pending)}
    failures: dict[str, str] = {}
    try:
        with tqdm(total=len(futures), unit="image", desc="Score-CAM images", disable=not progress) as bar:
            for future in as_completed(futures):
                image = image_of[future.key]
                if future.status == "error":
                    error = future.exception()
                    failures[image] = f"{type(error).__name__}: {error}"
                elif future.status != "finished":
                    failures[image] = f"the task was {future.status}"
                else:
                    result = future.result()
                    if result["status"] == "computed":
                        run.computed.append(image)
                        run.forward_passes += int(result["forward_passes"])
                        run.devices.add(result["device"])
                    elif result["status"] == "already complete":
                        run.already_complete.append(image)
                    else:
                        run.skipped[image] = result["reason"]
                bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    order = {image: index for index, image in enumerate(pending)}
    run.computed.sort(key=order.__getitem__)
    return failures


def _finalize_store(
    path: Path,
    run: DatasetRun,
    late_skipped: dict[str, str],
    source_of: dict[str, Any],
    *,
    failed: int,
) -> None:
    """Update the root attributes: totals over complete images, devices, skipped images, runs."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    attrs = dict(group.attrs)
    complete = np.asarray(group["complete"][:], dtype=bool)
    passes = np.asarray(group["image_forward_passes"][:])
    seconds = np.asarray(group["image_seconds"][:])
    skipped = {entry["image"]: entry for entry in json.loads(attrs.get("skipped_images", "[]"))}
    for image, reason in late_skipped.items():
        skipped[image] = _skip_record(image, reason, source_of)
    for image in run.computed:
        skipped.pop(image, None)
    devices = {device for device in str(attrs.get("device", "")).split(",") if device}
    devices.update(run.devices)
    runs = json.loads(attrs.get("runs", "[]"))
    runs.append(
        {
            "computed": len(run.computed),
            "already_complete": len(run.already_complete),
            "failed": failed,
            "workers": run.workers,
            "forward_passes": run.forward_passes,
            "wall_seconds": round(run.seconds, 3),
        }
    )
    group.attrs.update(
        {
            "forward_passes": int(passes[complete].sum()),
            "seconds": float(seconds[complete].sum()),
            "device": ",".join(sorted(devices)),
            "skipped_images": json.dumps(list(skipped.values())),
            "runs": json.dumps(runs),
        }
    )


# ---- what runs on the workers ------------------------------------------------------------

# (factory key, device) -> (model, lock). The lock serialises tasks of one worker process on
# its model: hooks of two concurrent captures on one module would see each other's outputs.
_WORKER_MODELS: OrderedDict[tuple[str, str], tuple[LoadedModel, threading.Lock]] = OrderedDict()
_WORKER_MODELS_LOCK = threading.Lock()
_WORKER_MODELS_KEPT = 2


def _worker_model(factory: ModelFactory, key: str, device: str) -> tuple[LoadedModel, threading.Lock, str]:
    """This worker's model for ``factory`` on ``device``, built on first use and kept."""
    from torch import nn

    from scorecam_explorer.models import LoadedModel, from_module
    from scorecam_explorer.runtime import resolve_device

    resolved = resolve_device(device)
    with _WORKER_MODELS_LOCK:
        entry = _WORKER_MODELS.get((key, str(resolved)))
        if entry is None:
            built = factory()
            if isinstance(built, nn.Module):
                built = from_module(built)
            if not isinstance(built, LoadedModel):
                raise ScorecamError(
                    f"model_factory must return a LoadedModel or a torch.nn.Module, not {type(built).__name__}."
                )
            built.module.eval().to(resolved)
            entry = (built, threading.Lock())
            _WORKER_MODELS[(key, str(resolved))] = entry
            while len(_WORKER_MODELS) > _WORKER_MODELS_KEPT:
                _WORKER_MODELS.popitem(last=False)
        else:
            _WORKER_MODELS.move_to_end((key, str(resolved)))
    return entry[0], entry[1], str(resolved)


def _describe_model(
    factory: ModelFactory, key: str, layers: list[str] | None, device: str, with_shapes: bool
) -> dict[str, Any]:
    """What the client needs about the model: name, fingerprint, layers (shallow to deep).

    ``with_shapes`` adds the class names, preprocessing and layer shapes a new store needs
    (this probes the model with one forward pass); without it no forward pass is made.
    """
    from scorecam_explorer._version import __version__

    model, lock, _device = _worker_model(factory, key, device)
    with lock:
        names = [model.default_layer] if layers is None else list(layers)
        summary: dict[str, Any] = {"model_name": model.name, "weights_fingerprint": model.fingerprint()}
        if not with_shapes:  # resuming: the names are compared with the store's, checked when it was made
            summary["layers"] = names
            return summary
        checked = {model.check_layer(name) for name in names}
        infos = [info for info in model.layers(listed_only=False) if info.name in checked]
        summary.update(
            layers=[info.name for info in infos],
            layer_shapes=[(info.name, info.channels, info.height, info.width) for info in infos],
            class_names=list(model.class_names),
            input_size=int(model.preprocessing.input_size),
            preprocessing=model.preprocessing.describe(),
            package_version=__version__,
        )
    return summary


def _probe_image(source: Any) -> str | None:
    """None if the picture can be read, else why not."""
    from scorecam_explorer.images import load_image

    try:
        load_image(source)
    except ImageLoadError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - any failure to decode means "unreadable"
        return f"{type(error).__name__}: {error}"
    return None


def _compute_image(
    factory: ModelFactory,
    key: str,
    source: Any,
    image: str,
    row: int,
    store: str,
    layers: list[str],
    convention: MaskConvention,
    precision: str,
    batch_size: int | None,
    device: str,
) -> dict[str, Any]:
    """One task: compute image ``row``'s cache and write its row of the store, then mark it complete."""
    import zarr

    from scorecam_explorer.engine import compute_cache

    group = zarr.open_group(store, mode="r", zarr_format=3)
    if bool(group["complete"][row]):  # a retry after the row was finished, or a duplicate
        return {"status": "already complete"}
    expected = dict(group.attrs)
    model, lock, resolved = _worker_model(factory, key, device)
    with lock:
        fingerprint = model.fingerprint()
        if fingerprint != expected["weights_fingerprint"]:
            raise CacheError(
                f"model_factory built other weights on this worker (fingerprint {fingerprint}) than the store's "
                f"({expected['weights_fingerprint']}); a factory must build the same model every time "
                "(seed random weights, load a fixed file)."
            )
        try:
            cache = compute_cache(
                model,
                [source],
                layers,
                convention=convention,
                batch_size=batch_size,
                device=resolved,
                progress=False,
                precision=precision,
                image_ids=[image],
            )
        except ImageLoadError as error:
            return {"status": "skipped", "reason": str(error)}
    _check_fits(cache, expected, group, layers)
    _write_row(cache, store, row)
    return {
        "status": "computed",
        "forward_passes": int(cache.attrs["forward_passes"]),
        "seconds": float(cache.attrs["seconds"]),
        "device": str(cache.attrs["device"]),
    }


def _check_fits(cache: xr.DataTree, expected: dict[str, Any], group: Any, layers: list[str]) -> None:
    """Refuse to write a cache whose settings or shapes differ from the store's."""
    for name in ("model_name", "weights_fingerprint", "mask_convention", "dtype", "layers", "preprocessing"):
        if cache.attrs[name] != expected[name]:
            raise CacheError(
                f"the computed cache's {name} ({cache.attrs[name]}) differs from the store's ({expected[name]})."
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


def _write_row(cache: xr.DataTree, store: str, row: int) -> None:
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
    store; an interrupted one also has rows not yet computed, which hold NaN). Nothing but the
    ``complete`` flags is read until you compute something.
    """
    source = Path(store)
    if not source.is_dir():
        raise CacheError(f"no dataset store at {source}: the folder does not exist.")
    try:
        tree = xr.open_datatree(source, engine="zarr", consolidated=False, chunks={})
    except Exception as error:  # noqa: BLE001 - zarr/xarray raise many types for a bad store
        raise CacheError(f"{source} is not a readable cache: {type(error).__name__}: {error}") from None
    tree = validate_cache(with_plain_strings(tree), check_values=False)
    if complete_only and "complete" in tree.dataset.data_vars:
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
