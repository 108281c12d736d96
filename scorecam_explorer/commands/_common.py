"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the models import torch; commands that read a cache must start without it
    from scorecam_explorer.models import LoadedModel

# Kept equal to scorecam_explorer.models.DEFAULT_MODEL (a test checks it).
DEFAULT_MODEL = "efficientnet_lite0"


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


WEIGHTS_HELP = "DEFAULT (pretrained), a torchvision weights name, a local .pth state dict, or 'none' for random weights"


def add_model_arguments(parser: argparse.ArgumentParser, weights_help: str = WEIGHTS_HELP) -> None:
    """``--model NAME`` and ``--weights DEFAULT|PATH|none``."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL}; see `scorecam-explorer models`)"
    )
    parser.add_argument("--weights", default="DEFAULT", help=weights_help)


def add_convention_argument(parser: argparse.ArgumentParser) -> None:
    """``--convention NAME``: how activations become masks (default: the engine's)."""
    from scorecam_explorer.conventions import DEFAULT_CONVENTION, MASK_CONVENTIONS

    parser.add_argument(
        "--convention",
        default=DEFAULT_CONVENTION,
        choices=list(MASK_CONVENTIONS),
        help=f"how activations become masks (default: {DEFAULT_CONVENTION})",
    )


def model_from_arguments(args: argparse.Namespace) -> LoadedModel:
    """Load the model the arguments name."""
    from scorecam_explorer.models import load_model

    weights = None if str(args.weights).lower() == "none" else args.weights
    return load_model(args.model, weights=weights)


def architecture_from_arguments(args: argparse.Namespace) -> LoadedModel:
    """The architecture of the model the arguments name, with random weights: no weights are
    read or downloaded (a torchvision weights name only picks the input size)."""
    from scorecam_explorer.models import load_architecture

    weights = None if str(args.weights).lower() == "none" else args.weights
    return load_architecture(args.model, weights=weights)


FAMILIES = ("score-cam", "ss-cam", "is-cam")


def add_family_arguments(parser: argparse.ArgumentParser, *, family_default: str | None, seed_help: str) -> None:
    """``--family``, ``--samples``, ``--std`` and ``--seed``: which Score-CAM family member
    to compute (``compute_cache``'s arguments of the same names)."""
    parser.add_argument(
        "--family",
        default=family_default,
        choices=list(FAMILIES),
        help="Score-CAM (one masked input per channel), SS-CAM (noisy masks) or IS-CAM (scaled masks); "
        "SS-CAM and IS-CAM forward --samples inputs per channel (default: score-cam)",
    )
    parser.add_argument(
        "--samples",
        type=positive_int,
        metavar="S",
        help="masked inputs per channel for ss-cam / is-cam (default: torchcam's, 35 for ss-cam, 10 for is-cam)",
    )
    parser.add_argument("--std", type=float, metavar="SIGMA", help="SS-CAM's noise standard deviation (default: 2.0)")
    parser.add_argument("--seed", type=int, metavar="N", help=seed_help)
