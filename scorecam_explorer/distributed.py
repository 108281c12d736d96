"""Score-CAM caches of whole image sets, computed on a Dask cluster into one Zarr store.

:func:`compute_dataset` runs :func:`~scorecam_explorer.engine.compute_cache` for every image
of a set on Dask workers and writes the results into one *dataset store*: a Zarr store with
the schema of a cache (``docs/cache.md``) whose ``image`` dimension holds every image. Per
image i and layer, exactly what a single-image cache holds:

    picture[i], input[i] = X_i, logits[i] = f(X_i), baseline_logits[i] = f(X_i * 0),
    activation[i, k] = A_k(X_i), masked_logits[i, k] = f(X_i∘H_ik), constant[i, k].

The store itself (its schema, creation, resumption checks, row writes, opening and
selecting an image) is :mod:`scorecam_explorer.dataset_store`; this module runs the
computation on Dask and re-exports the store's public names (``open_dataset``,
``select_image``, ``DATASET_STORE``).

How it stays correct when workers fail or a run is interrupted (``docs/distributed.md``):

* The client creates the store once, atomically, with every array's shape and one Zarr
  chunk per image along ``image``; workers only ever write whole chunks of *their* image
  (``region=``), so no two writers share a chunk, and Zarr writes each chunk file
  atomically.
* Each image's row ends with ``complete[i] = True``, written after all of its data. A task
  that dies half-way leaves ``complete[i] = False``; its retry, or a later run, rewrites the
  whole row. Rows are indexed by image, so an image can never be stored twice.
* A rerun computes only the rows not complete, after checking that the model (name and
  weights fingerprint), mask convention, mask sampler (the Score-CAM family member and its
  samples, noise and seed), precision, layers and image set match the store.

Per image the store also records ``image_forward_passes`` and ``image_seconds`` (the model
calls and worker seconds of its computation), so :func:`select_image` gives back a cache
identical to the one ``compute_cache`` would have made for that image alone.

The model is never shipped to a worker: each worker calls ``model_factory`` once and keeps
the model (per factory and device) for every later task. Importing this module imports
neither torch nor dask: the functions that run on workers import what they need.
"""

from __future__ import annotations

import hashlib
import os
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

from scorecam_explorer.cache import recorded_layers
from scorecam_explorer.conventions import DEFAULT_CONVENTION, MaskConvention, get_convention
from scorecam_explorer.dataset_store import (
    DATASET_ATTRS,
    DATASET_STORE,
    DATASET_VARIABLES,
    check_fits,
    check_settings,
    create_store,
    existing_store_attrs,
    finalize_store,
    open_dataset,
    resume_rows,
    select_image,
    skip_record,
    store_template,
    stored_images,
    write_row,
)
from scorecam_explorer.device import PRECISIONS
from scorecam_explorer.errors import CacheError, ImageLoadError, ScorecamError
from scorecam_explorer.images import find_images, image_id

if TYPE_CHECKING:
    from distributed import Client

    from scorecam_explorer.models import LoadedModel

__all__ = [
    "DATASET_ATTRS",
    "DATASET_STORE",
    "DATASET_VARIABLES",
    "PRECISIONS",
    "DatasetRun",
    "compute_dataset",
    "open_dataset",
    "select_image",
]

# The store's schema, creation, row writes and reading live in scorecam_explorer.dataset_store;
# DATASET_STORE, DATASET_VARIABLES, DATASET_ATTRS, open_dataset and select_image are re-exported,
# as is PRECISIONS (scorecam_explorer.device).
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
    tune_allocator: bool = False,
    family: str | None = None,
    samples: int | None = None,
    std: float | None = None,
    seed: int | None = None,
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
        precision: ``"float32"`` or ``"bfloat16"``. bfloat16 is refused, before any image
            is scheduled, where ``device`` has no native bfloat16 (see
            :func:`scorecam_explorer.device.check_native_precision`): with a local cluster
            on this machine, by the client before the cluster starts (its workers run on
            this hardware); with a running scheduler, on the first worker asked, before any
            image task (the workers of one cluster are taken to be one machine class; each
            worker's ``compute_cache`` would refuse it anyway).
        device: the device each worker computes on (``"auto"``: its GPU if it has one).
        workers: worker processes of the local cluster (default: one per CPU core, or one
            if a GPU is present). Only with ``client=None``.
        retries: how often a failed task is retried (a worker that dies is also retried,
            by the scheduler, up to its ``allowed-failures``).
        connect_timeout: seconds to wait for a scheduler address to answer.
        progress: show a progress bar over finished images.
        tune_allocator: let each worker raise glibc's mmap and trim thresholds
            (:func:`scorecam_explorer.device.tune_allocator`). Off by default: a Dask
            nanny sets ``MALLOC_TRIM_THRESHOLD_`` so that a worker's freed memory goes back
            to the operating system, and Dask's memory manager (spilling, pausing,
            restarting a worker) relies on it; a tuned worker would keep its peak memory
            for good. Turn it on only for workers with memory to spare (faster batches on
            a CPU, identical numbers).
        family: the Score-CAM family member, as for ``compute_cache``: ``"score-cam"`` (the
            default, also None), ``"ss-cam"`` or ``"is-cam"``; recorded in the store as a
            cache records it (``mask_sampler``, ``family``).
        samples: S, the masked inputs per channel (None: 35 for SS-CAM, 10 for IS-CAM).
        std: SS-CAM's noise standard deviation (None: 2.0); only for SS-CAM.
        seed: SS-CAM's noise seed; only for SS-CAM. A store always draws from a seed (None:
            0), each image from a fresh ``torch.Generator().manual_seed(seed)``, so that every
            image of the store equals ``compute_cache(..., family="ss-cam", seed=seed)`` on that
            image alone, whichever worker computed it (the workers' global generators are
            neither read nor changed). The seed is recorded in ``mask_sampler``.

    Returns:
        A :class:`DatasetRun`; ``run.open()`` gives the store as a lazy cache.

    Raises:
        CacheError: the store exists but is not a dataset store, or was made with another
            model, convention, precision, layers, family (its samples, std, seed) or image set
            (the message says which).
        ScorecamError: an unknown family, samples < 1, std <= 0, a negative seed, or std /
            seed with a family that has no noise (before any cluster starts); bfloat16 on a device without native bfloat16 (see ``precision``),
            the scheduler cannot be reached within ``connect_timeout``, or some
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
    if not isinstance(tune_allocator, bool):
        raise ScorecamError(f"tune_allocator must be True or False, not {tune_allocator!r}.")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ScorecamError(f"retries must be a non-negative integer, not {retries!r}.")
    sampler = dataset_sampler(family, samples, std, seed)
    requested_layers = _requested_layers(layers)
    sources, ids = _collect_sources(images)
    target = Path(store).absolute()
    existing = existing_store_attrs(target)
    if existing is not None:
        check_settings(existing, target, mask_convention, precision, requested_layers, sampler)
    if client is None or client == "local":  # the local cluster's workers run on this machine
        from scorecam_explorer.device import check_native_precision

        check_native_precision(precision, device)

    with _connect(client, workers, connect_timeout) as dask_client:
        run = DatasetRun(store=target, workers=len(dask_client.nthreads()))
        summary = dask_client.submit(
            _describe_model,
            model_factory,
            factory_key,
            requested_layers,
            device,
            existing is None,
            precision,
            pure=False,
        ).result()
        if existing is None:
            pending = _start_store(dask_client, target, summary, sources, ids, mask_convention, precision, run, sampler)
        else:
            run.already_complete, pending = resume_rows(target, existing, summary, ids)
        stored_ids, _complete = stored_images(target)
        row_of = {image: row for row, image in enumerate(stored_ids)}
        source_of = dict(zip(ids, sources))
        store_layers = recorded_layers(existing_store_attrs(target))  # type: ignore[arg-type]
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
                tune_allocator,
                sampler,
                key=f"scorecam-image-{row_of[image]}-{uuid.uuid4().hex[:8]}",
                retries=retries,
                pure=False,
            )
            for image in pending
        ]
        failures = _gather(dask_client, futures, pending, run, progress)
        late_skipped = {image: run.skipped[image] for image in pending if image in run.skipped}
        run.seconds = time.perf_counter() - watch
        finalize_store(
            target,
            _run_record(run, failed=len(failures)),
            run.computed,
            run.devices,
            {image: skip_record(image, reason, source_of) for image, reason in late_skipped.items()},
        )
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
    sampler: dict[str, Any] | None = None,
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
    skipped = [skip_record(image, reason, source_of) for image, reason in unreadable.items()]
    create_store(path, store_template(summary, readable, convention, precision, skipped, sampler))
    return readable


def dataset_sampler(
    family: str | None, samples: int | None, std: float | None, seed: int | None
) -> dict[str, Any]:
    """The fields of the mask sampler a dataset store is computed with (checked here, before
    any cluster starts): ``compute_cache``'s ``family``, ``samples``, ``std`` and ``seed``,
    SS-CAM's seed 0 when none is given (a store's noise is always drawn from a seed)."""
    from scorecam_explorer.sampling import SSCamSampler, resolve_sampler

    sampler = resolve_sampler(None, family=family, samples=samples, std=std, seed=seed)
    if isinstance(sampler, SSCamSampler) and sampler.seed is None:
        sampler.seed = 0
    return sampler.check().describe()


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


def _run_record(run: DatasetRun, *, failed: int) -> dict[str, Any]:
    """What the store's ``runs`` attribute records of one run."""
    return {
        "computed": len(run.computed),
        "already_complete": len(run.already_complete),
        "failed": failed,
        "workers": run.workers,
        "forward_passes": run.forward_passes,
        "wall_seconds": round(run.seconds, 3),
    }


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
    from scorecam_explorer.device import resolve_device

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
    factory: ModelFactory,
    key: str,
    layers: list[str] | None,
    device: str,
    with_shapes: bool,
    precision: str = "float32",
) -> dict[str, Any]:
    """What the client needs about the model: name, fingerprint, layers (shallow to deep).

    ``with_shapes`` adds the class names, preprocessing and layer shapes a new store needs
    (this probes the model with one forward pass); without it no forward pass is made.
    ``precision`` is checked first against this worker's device (a ScorecamError where
    bfloat16 is not native, before the model is built).
    """
    from scorecam_explorer._version import __version__
    from scorecam_explorer.device import check_native_precision

    check_native_precision(precision, device)

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
            layer_layouts={info.name: model.layout_for(info.name).name for info in infos},
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
    tune_allocator: bool = False,
    sampler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One task: compute image ``row``'s cache and write its row of the store, then mark it complete.

    ``tune_allocator`` is passed to ``compute_cache``: off unless asked (see
    :func:`compute_dataset`), so a worker's freed memory goes back as its nanny expects.
    ``sampler``: the mask sampler's fields (None: Score-CAM's), rebuilt for this task.
    """
    import zarr

    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.sampling import sampler_from_fields

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
                tune_allocator=tune_allocator,
                sampler=sampler_from_fields(sampler) if sampler is not None else None,
            )
        except ImageLoadError as error:
            return {"status": "skipped", "reason": str(error)}
    check_fits(cache, expected, group, layers)
    write_row(cache, store, row)
    return {
        "status": "computed",
        "forward_passes": int(cache.attrs["forward_passes"]),
        "seconds": float(cache.attrs["seconds"]),
        "device": str(cache.attrs["device"]),
    }


