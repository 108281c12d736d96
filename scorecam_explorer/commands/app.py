"""``scorecam-explorer app``: the explorer as a web app (Voila, on 127.0.0.1 unless --host says otherwise)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scorecam_explorer.conventions import MASK_CONVENTIONS
from scorecam_explorer.serving.options import DEFAULT_CULL_AFTER, DEFAULT_MAX_SESSIONS, DEFAULT_POOL, LOCALHOST


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
    parser.add_argument("--image", default=None, help="an image file or sample:NAME (default: sample:chelsea)")
    parser.add_argument("--layer", nargs="+", default=None, metavar="NAME", help="layers to cache (default: a few blocks and the default layer)")
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
    key = webapp.recent_key(
        model=model_name, weights=args.weights, image=args.image, layers=args.layer, convention=args.convention, cache=args.cache
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
            "reused": "reused (weights, convention and picture match)",
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
