"""``scorecam-explorer app``: the explorer as a web app (Voila on 127.0.0.1)."""

from __future__ import annotations

import argparse

from scorecam_explorer.conventions import MASK_CONVENTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="serve the explorer as a web app",
        description=(
            "Serve the Score-CAM explorer as a web app with Voila on 127.0.0.1. The first run computes the "
            "cache (one forward pass per channel of each layer, with a progress bar) and keeps it in the cache "
            "directory ($SCORECAM_EXPLORER_CACHE_DIR, else $XDG_CACHE_HOME/scorecam_explorer or "
            "~/.cache/scorecam_explorer); later runs reuse it after checking that it matches."
        ),
    )
    parser.add_argument("--model", default=None, help="model name (default: the embedded efficientnet_lite0; see `scorecam-explorer models`)")
    parser.add_argument(
        "--weights",
        default=None,
        help="DEFAULT (pretrained), a torchvision weights name, a local .pth state dict, or 'none' for random weights",
    )
    parser.add_argument("--image", default=None, help="an image file or sample:NAME (default: sample:chelsea)")
    parser.add_argument("--layer", nargs="+", default=None, metavar="NAME", help="layers to cache (default: a few blocks and the default layer)")
    parser.add_argument(
        "--convention", default=None, choices=list(MASK_CONVENTIONS), help="mask convention of the cache (default: paper)"
    )
    parser.add_argument("--cache", default=None, metavar="CACHE.zarr", help="cache to use or create (default: in the cache directory)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: 8866, or a free one if it is taken)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser (for servers)")
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="compute the cache afresh for --model, --weights, --image and --layer (defaults: the embedded model, "
        "sample:chelsea) even if one exists, and replace what is at --cache once the new one is complete",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scorecam_explorer import webapp

    webapp.require_voila()  # say how to install the app before computing anything
    port = args.port
    if port is None:
        try:
            webapp.check_port(webapp.DEFAULT_PORT)
            port = webapp.DEFAULT_PORT
        except webapp.PortInUseError:
            port = webapp.free_port()
    else:
        webapp.check_port(port)
    weights = None if str(args.weights).lower() == "none" else args.weights
    explicit_model = args.model is not None or args.weights is not None
    model_name = args.model
    if model_name is None and args.weights is not None:  # weights of the default model: a cache is checked against them
        from scorecam_explorer.default_model import NAME

        model_name = NAME
    prepared = webapp.prepare_cache(
        model_name=model_name,
        weights="DEFAULT" if args.weights is None else weights,
        image=args.image,
        layers=args.layer,
        cache_path=args.cache,
        convention=args.convention,
        recompute=args.recompute,
    )
    verb = {
        "computed": f"computed in {prepared.seconds:.0f} s and saved",
        "extended": f"extended in {prepared.seconds:.0f} s and saved",
        "reused": "reused (weights, convention and picture match)",
        "opened": "opened as it is",
    }[prepared.status]
    print(f"cache: {prepared.path} ({verb}); layers: {', '.join(prepared.layers)}")
    return webapp.serve(
        prepared.path,
        port=port,
        model_name=prepared.model_name if explicit_model or prepared.status != "opened" else None,
        weights="DEFAULT" if args.weights is None else weights,
        open_browser=not args.no_browser,
    )
