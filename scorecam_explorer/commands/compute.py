"""``scorecam-explorer compute``: run the Score-CAM forward passes once and save the cache."""

from __future__ import annotations

import argparse

from scorecam_explorer.commands._common import (
    add_convention_argument,
    add_family_arguments,
    add_model_arguments,
    model_from_arguments,
    positive_int,
)
from scorecam_explorer.device import PRECISIONS  # importing it needs no torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compute",
        help="run the masked forward passes for pictures and layers, save the cache (Zarr)",
        description=(
            "Forward every picture masked by every channel of the chosen layers once and save the "
            "model's full outputs in a cache; maps for any class or preset are then recomposed "
            "from it without the model (scorecam-explorer map, the explorer)."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="PATH|sample:NAME",
        help="a picture (repeat for several)",
    )
    parser.add_argument(
        "--layer",
        action="extend",
        nargs="+",
        metavar="NAME",
        help=(
            "layers to explain: several names after one --layer, or --layer repeated; a name given twice is "
            "computed once, and the cache lists layers shallow to deep (default: the model's default layer; "
            "see `scorecam-explorer layers`)"
        ),
    )
    add_convention_argument(parser)
    add_family_arguments(
        parser,
        family_default="score-cam",
        seed_help="SS-CAM's noise seed, recorded in the cache (default: torch's global generator, whose state is recorded)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="masked inputs per forward pass, fixed (default: the fastest size, measured)",
    )
    parser.add_argument(
        "--device", default="auto", metavar="NAME", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=list(PRECISIONS),
        help="bfloat16: faster masked passes on a CPU with AVX512-BF16 or AMX or a GPU with bfloat16, slightly "
        "different scores; refused where the device has no native bfloat16 (default: float32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-allocator-tuning",
        action="store_true",
        help="leave glibc's malloc settings alone (slower on CPU; results are the same)",
    )
    parser.add_argument(
        "--no-adapt-threads",
        action="store_true",
        help="on a CPU, keep torch's thread count instead of also trying one thread for the masked passes",
    )
    parser.add_argument(
        "--no-fold-batchnorm",
        action="store_true",
        help="run the masked passes on the model itself, not on a copy with BatchNorm folded into the "
        "convolutions (slower; the same up to float32 rounding)",
    )
    parser.add_argument(
        "--no-fuse",
        action="store_true",
        help="on a CPU in float32, do not fuse each convolution with the ReLU or residual addition after it "
        "(slower; the same values)",
    )
    parser.add_argument("--out", required=True, metavar="CACHE.zarr", help="where to save the cache")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    parser.set_defaults(func=run)


def family_options(args: argparse.Namespace) -> dict[str, object]:
    """``compute_cache``'s family arguments, only where the command line set them (a plain
    Score-CAM call stays the default call)."""
    if args.family == "score-cam" and args.samples is None and args.std is None and args.seed is None:
        return {}
    options: dict[str, object] = {"family": args.family}
    if args.samples is not None:
        options["samples"] = args.samples
    if args.std is not None:
        options["std"] = args.std
    if args.seed is not None:
        options["seed"] = args.seed
    return options


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scorecam_explorer.cache import cache_layers, cache_sampler, save_cache
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.errors import CacheError
    from scorecam_explorer.images import load_image
    from scorecam_explorer.sampling import sampler_from_fields

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # fail before the costly part
        raise CacheError(f"{out} already exists; pass --overwrite to replace it.")
    for source in args.image:
        load_image(source)  # a bad path fails now, before the model loads
    if args.precision != "float32":  # refused now where bfloat16 is not native, before the model loads
        from scorecam_explorer.device import check_native_precision

        check_native_precision(args.precision, args.device)
    model = model_from_arguments(args)
    cache = compute_cache(
        model,
        list(args.image),
        args.layer,
        convention=args.convention,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        precision=args.precision,
        tune_allocator=not args.no_allocator_tuning,
        adapt_threads=not args.no_adapt_threads,
        fold_batchnorm=not args.no_fold_batchnorm,
        fuse_pointwise=not args.no_fuse,
        **family_options(args),
    )
    saved = save_cache(cache, out, overwrite=args.overwrite)

    attrs = cache.attrs
    sampler = sampler_from_fields(cache_sampler(cache))
    print(f"model {attrs['model_name']} ({attrs['weights_fingerprint']}), {cache.sizes['image']} image(s), "
          f"convention {args.convention}, {sampler.label()}, {attrs['dtype']} on {attrs['device']}")
    masked_inputs = constant_inputs = 0
    for layer in cache_layers(cache):
        node = cache[layer]
        channels = node.sizes["channel"]
        constant = node["constant"].values.sum(axis=1)
        constant_text = ", ".join(str(int(count)) for count in constant)
        print(f"  {layer}: {channels} channels, constant per image: {constant_text}")
        masked_inputs += channels * len(constant)
        constant_inputs += int(constant.sum())
    print(summary(
        masked_inputs, constant_inputs, int(attrs["forward_passes"]), float(attrs["seconds"]), str(saved),
        samples=int(sampler.samples), constant_is_free=bool(sampler.constant_is_free),
    ))
    return 0


def summary(
    masked_inputs: int,
    constant_inputs: int,
    forward_passes: int,
    seconds: float,
    saved: str,
    *,
    samples: int = 1,
    constant_is_free: bool = True,
) -> str:
    """The closing lines of ``compute``: why the forward passes are fewer than the channels.

    ``masked_inputs`` counts channels x images. With Score-CAM a constant channel's
    normalised mask is all zero, so its masked input is the baseline, forwarded once per
    image for all of them; the other masked inputs go through the model in batches, so a
    forward pass (one model call) holds many of them. SS-CAM and IS-CAM forward ``samples``
    inputs per channel, and SS-CAM's constant channels too (``constant_is_free`` False:
    their noise is not zero).
    """
    skipped = constant_inputs if constant_is_free else 0
    forwarded = (masked_inputs - skipped) * samples
    if constant_is_free:
        constant_text = (
            f"{constant_inputs} of constant channels (an all-zero mask: the one baseline pass per image stands "
            "for them), "
        )
    else:
        constant_text = f"{constant_inputs} of constant channels, forwarded too (their noisy masks are not zero), "
    per_channel = f" ({samples} per channel)" if samples > 1 else ""
    return (
        f"{masked_inputs} masked inputs (channels x images): {constant_text}"
        f"{forwarded} forwarded in batches{per_channel}\n"
        f"{forward_passes} forward passes (model calls: the batches, plus the unmasked and baseline passes "
        f"and checks) in {seconds:.1f} s; saved to {saved}"
    )
