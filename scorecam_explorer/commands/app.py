"""``scorecam-explorer app``: the explorer as a web app (Voila, on 127.0.0.1 unless --host says otherwise)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scorecam_explorer.conventions import MASK_CONVENTIONS
from scorecam_explorer.serving.options import DEFAULT_CULL_AFTER, DEFAULT_MAX_SESSIONS, DEFAULT_POOL, LOCALHOST, ServeOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="serve the explorer as a web app",
        description=(
            "Serve the Score-CAM explorer as a web app with Voila (on 127.0.0.1 unless --host is given). The server "
            "starts at once and the page shows what the command is doing; the first run computes the cache (one "
            "forward pass per channel of each layer) and keeps it in the cache directory "
            "($SCORECAM_EXPLORER_CACHE_DIR, else $XDG_CACHE_HOME/scorecam_explorer or ~/.cache/scorecam_explorer); "
            "later runs reuse it after checking that it matches. Several pages (a class) can use one app: see "
            "--max-sessions, --cull-after and --pool."
        ),
    )
    parser.add_argument("--model", default=None, help="model name (default: the embedded efficientnet_lite0; see `scorecam-explorer models`)")
    parser.add_argument(
        "--weights",
        default=None,
        help="DEFAULT (pretrained), a torchvision weights name, a local .pth state dict, or 'none' for random weights",
    )
    pictures = parser.add_mutually_exclusive_group()
    pictures.add_argument("--image", default=None, help="an image file or sample:NAME (default: sample:chelsea)")
    pictures.add_argument(
        "--images",
        default=None,
        metavar="DIR|samples",
        help="a folder of pictures (its image files, sorted by name) or 'samples' (the bundled photos): one cache "
        "of them all, with a Picture chooser (default layer: the model's default layer only, one forward pass per "
        "channel and picture)",
    )
    pictures.add_argument(
        "--dataset",
        default=None,
        metavar="STORE.zarr",
        help="serve a dataset store (made by compute-dataset) as it is, opened lazily: only its complete images, "
        "each read when shown; no model is loaded. Its atlas index (see `atlas-index`) is built first where it is "
        "not fresh, the one time every image is read",
    )
    parser.add_argument(
        "--no-atlas-index",
        action="store_true",
        help="with --dataset: serve at once without building the atlas index (the Atlas panel then reads the images "
        "when asked)",
    )
    parser.add_argument(
        "--layer", nargs="+", default=None, metavar="NAME",
        help="layers to cache (default: a few blocks and the default layer; with --images the default layer only)",
    )
    parser.add_argument(
        "--convention", default=None, choices=list(MASK_CONVENTIONS), help="mask convention of the cache (default: paper)"
    )
    parser.add_argument("--cache", default=None, metavar="CACHE.zarr", help="cache to use or create (default: in the cache directory)")
    parser.add_argument(
        "--host",
        default=LOCALHOST,
        help=f"address to listen on (default: {LOCALHOST}, this machine only); e.g. 0.0.0.0 for a classroom network "
        "(the command prints what that exposes)",
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: 8866, or a free one if it is taken)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser (for servers)")
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=DEFAULT_MAX_SESSIONS,
        metavar="N",
        help=f"pages served at once; a further visitor gets a 'the class is full' page (default: {DEFAULT_MAX_SESSIONS}; 0: no limit)",
    )
    parser.add_argument(
        "--cull-after",
        type=float,
        default=DEFAULT_CULL_AFTER,
        metavar="SECONDS",
        help=f"free the kernel of a closed or reloaded page after this many idle seconds (default: {DEFAULT_CULL_AFTER:g}; 0: never)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=DEFAULT_POOL,
        metavar="N",
        help=f"kernels started in advance so that a new page shows the explorer at once (default: {DEFAULT_POOL}; "
        "about 200 MB each; 0: start one per page)",
    )
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="compute the cache afresh for --model, --weights, --image and --layer (defaults: the embedded model, "
        "sample:chelsea) even if one exists, and replace what is at --cache once the new one is complete",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scorecam_explorer import webapp
    from scorecam_explorer.errors import ScorecamError
    from scorecam_explorer.serving.options import ServeOptions

    if args.dataset is not None:
        given = [flag for flag, value in (("--model", args.model), ("--weights", args.weights), ("--layer", args.layer),
                                          ("--convention", args.convention), ("--cache", args.cache)) if value is not None]
        given += ["--recompute"] if args.recompute else []
        if given:
            raise ScorecamError(
                f"--dataset serves a dataset store as it is; {', '.join(given)} cannot be used with it "
                "(compute-dataset chose the model, layers and convention)."
            )
    if args.no_atlas_index and args.dataset is None:
        raise ScorecamError("--no-atlas-index applies to --dataset only (a cache in memory needs no atlas index).")
    if args.images is not None:
        webapp.picture_set(args.images)  # a missing or empty folder fails before the server starts
    if args.dataset is not None:
        webapp.check_dataset_store(args.dataset)  # so does a path that is not a dataset store
    webapp.require_voila()  # say how to install the app before computing anything
    host = args.host
    port = args.port
    if port is None:
        try:
            webapp.check_port(webapp.DEFAULT_PORT, host)
            port = webapp.DEFAULT_PORT
        except webapp.PortInUseError:
            port = webapp.free_port(host)
    else:
        webapp.check_port(port, host)
    try:
        options = ServeOptions(host=host, port=port, max_sessions=args.max_sessions, cull_after=args.cull_after, pool=args.pool)
    except ValueError as error:
        raise ScorecamError(str(error)) from None
    weights = None if str(args.weights).lower() == "none" else args.weights
    explicit_model = args.model is not None or args.weights is not None
    model_name = args.model
    if model_name is None and args.weights is not None:  # weights of the default model: a cache is checked against them
        from scorecam_explorer.default_model import NAME

        model_name = NAME
    if args.dataset is not None:
        return _serve_dataset(args, options)
    images = args.images
    if images is not None and images != webapp.SAMPLES:
        images = str(Path(images).expanduser().resolve())  # the same folder from anywhere
    key = webapp.recent_key(
        model=model_name, weights=args.weights, image=args.image, layers=args.layer, convention=args.convention, cache=args.cache,
        **({"images": images} if images is not None else {}),  # keys of single-picture runs stay as they were
    )
    with webapp.app_server(options, open_browser=not args.no_browser) as server:
        if not args.recompute:
            candidate = args.cache if args.cache is not None else webapp.recall_cache(key)
            server.expect(candidate and Path(candidate), model_name=model_name, weights="DEFAULT" if args.weights is None else weights)
        try:
            prepared = webapp.prepare_cache(
                model_name=model_name,
                weights="DEFAULT" if args.weights is None else weights,
                image=args.image,
                images=images,
                layers=args.layer,
                cache_path=args.cache,
                convention=args.convention,
                recompute=args.recompute,
                report=server.report,
            )
        except ScorecamError as error:
            server.fail(str(error))
            raise
        verb = {
            "computed": f"computed in {prepared.seconds:.0f} s and saved",
            "extended": f"extended in {prepared.seconds:.0f} s and saved",
            "reused": f"reused (weights, convention and {'pictures' if images else 'picture'} match)",
            "opened": "opened as it is",
        }[prepared.status]
        print(f"cache: {prepared.path} ({verb}); layers: {', '.join(prepared.layers)}")
        webapp.remember_cache(key, prepared.path)
        server.ready(
            prepared,
            model_name=prepared.model_name if explicit_model or prepared.status != "opened" else None,
            weights="DEFAULT" if args.weights is None else weights,
        )
        return server.wait()


def _serve_dataset(args: argparse.Namespace, options: ServeOptions) -> int:
    """Serve the dataset store ``args.dataset`` lazily (checked first; no model)."""
    from scorecam_explorer import webapp
    from scorecam_explorer.errors import ScorecamError

    store = Path(args.dataset).expanduser()
    with webapp.app_server(options, open_browser=not args.no_browser) as server:
        server.expect(store, model_name=None, weights="none")
        try:
            prepared = webapp.prepare_dataset(store, report=server.report, atlas_index=not args.no_atlas_index)
        except ScorecamError as error:
            server.fail(str(error))
            raise
        print(f"serving {prepared.path.resolve()} lazily; layers: {', '.join(prepared.layers)}")
        server.ready(prepared, model_name=None, weights="none")
        return server.wait()
