"""``scorecam-explorer layers``: the layers of a model that Score-CAM can target.

The layers depend on the architecture only, so no weights are loaded or downloaded.
"""

from __future__ import annotations

import argparse

from scorecam_explorer.commands._common import add_model_arguments, architecture_from_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "layers",
        help="list a model's targetable layers, the default marked",
        description="List the layers Score-CAM can target, with their channels and sizes. They depend on the "
        "architecture only: no weights are read or downloaded, so this works offline for every model.",
    )
    add_model_arguments(
        parser,
        weights_help="never loaded: the layers are the same for any weights. A torchvision weights name such as "
        "IMAGENET1K_V1 picks the input size (and any architecture setting) of those weights (default: DEFAULT)",
    )
    parser.add_argument("--all", action="store_true", help="also list the internals of blocks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the targetable layers of the model's architecture (no weights loaded)."""
    model = architecture_from_arguments(args)
    layers = model.layers(listed_only=not args.all)
    default = model.default_layer
    width = max(len(layer.name) for layer in layers)
    height, width = model.input_hw  # the size the layers were probed at
    print(f"{model.name}: {len(layers)} targetable layers at input {height}x{width} (* = default target)")
    print(f"  {'layer':<{width}}  channels  size")
    for layer in layers:
        mark = "*" if layer.name == default else " "
        print(f"{mark} {layer.name:<{width}}  {layer.channels:>8}  {layer.height}x{layer.width}")
    return 0
