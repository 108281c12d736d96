"""``scorecam-explorer compute-dataset``: Score-CAM (or SS-CAM, IS-CAM) caches of a folder of
images on a Dask cluster."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from scorecam_explorer.commands._common import add_convention_argument, add_family_arguments, add_model_arguments
from scorecam_explorer.device import PRECISIONS

if TYPE_CHECKING:
    from scorecam_explorer.models import LoadedModel


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compute-dataset",
        help="compute the caches of a folder of images on Dask workers, into one Zarr store (resumable)",
        description=(
            "Split the images of a folder across Dask workers (a local cluster, or a running scheduler); "
            "each worker builds the model once and writes each image's cache into its row of one Zarr "
            "store. Run it again on the same store to finish an interrupted run: only the missing images "
            "are computed."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, metavar="DIR", help="a folder of pictures (jpg, png, ...)")
    parser.add_argument(
        "--layer",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="layers to explain: several names after one --layer, or --layer repeated (default: the model's default layer)",
    )
    parser.add_argument("--out", required=True, metavar="STORE.zarr", help="the dataset store (created or resumed)")
    parser.add_argument(
        "--scheduler",
        default="local",
        metavar="ADDRESS|local",
        help="a Dask scheduler address (tcp://HOST:8786) or 'local' for a cluster on this machine (default)",
    )
    parser.add_argument(
        "--workers", type=int, help="worker processes of the local cluster (default: one per core, or 1 with a GPU)"
    )
    add_convention_argument(parser)
    add_family_arguments(
        parser,
        family_default="score-cam",
        seed_help="SS-CAM's noise seed: every image's noise is drawn from a generator seeded with it (default: 0)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="masked inputs per forward pass (default: measured by each worker)"
    )
    parser.add_argument("--device", default="auto", help="device on each worker: auto (its GPU if any), cpu, cuda, ...")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=list(PRECISIONS),
        help="compute precision (default: float32); bfloat16 is refused where the workers' device has no native "
        "bfloat16 (AVX512-BF16 or AMX on a CPU, a GPU with bfloat16)",
    )
    parser.add_argument(
        "--tune-allocator",
        action="store_true",
        help="tune glibc's malloc in each worker for the masked passes (off by default: it would override the "
        "Dask nanny's memory trimming, see docs/process-effects.md)",
    )
    parser.add_argument("--retries", type=int, default=2, help="retries of a failed image (default: 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the scheduler (default: 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def random_weights_model(name: str, seed: int = 0) -> LoadedModel:
    """``load_model(name, weights=None)`` with the random generator seeded, so that every
    worker builds the same random weights (the store refuses mixed weights)."""
    import torch

    from scorecam_explorer.models import load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_model(name, weights=None)


def run(args: argparse.Namespace) -> int:
    import functools
    from pathlib import Path

    from scorecam_explorer.distributed import compute_dataset
    from scorecam_explorer.errors import ScorecamError, UnknownModelError, did_you_mean
    from scorecam_explorer.images import find_images
    from scorecam_explorer.models import available_models, load_model

    images = Path(args.images)
    find_images(images)  # a missing folder fails now, before a cluster starts
    names = available_models()
    if args.model not in names:  # checked here: the workers would only say it after starting
        raise UnknownModelError(
            f"unknown model {args.model!r}.{did_you_mean(args.model, names)} See `scorecam-explorer models`."
        )
    if args.workers is not None and args.scheduler != "local":
        raise ScorecamError("--workers sizes the local cluster only; a running scheduler has its own workers.")
    from scorecam_explorer.distributed import dataset_sampler

    family = dict(family=args.family, samples=args.samples, std=args.std, seed=args.seed)
    dataset_sampler(**family)  # a bad family option fails now, before a cluster starts
    weights = None if str(args.weights).lower() == "none" else args.weights
    if weights is None:
        factory = functools.partial(random_weights_model, args.model)
    else:
        if Path(weights).suffix:
            weights = str(Path(weights).absolute())  # the workers read the file
        factory = functools.partial(load_model, args.model, weights=weights)
    run_result = compute_dataset(
        factory,
        images,
        args.layer,
        args.out,
        client=None if args.scheduler == "local" else args.scheduler,
        convention=args.convention,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        workers=args.workers,
        retries=args.retries,
        connect_timeout=args.timeout,
        progress=not args.no_progress,
        tune_allocator=args.tune_allocator,
        **family,
    )
    print(
        f"{len(run_result.computed)} image(s) computed, {len(run_result.already_complete)} already complete, "
        f"{len(run_result.skipped)} skipped; {run_result.forward_passes} forward passes on "
        f"{run_result.workers} worker(s) ({', '.join(sorted(run_result.devices)) or 'no device used'}) "
        f"in {run_result.seconds:.1f} s"
    )
    for image, reason in run_result.skipped.items():
        print(f"  skipped {image}: {reason}")
    print(f"dataset store: {run_result.store}")
    return 0
