"""``scorecam-explorer evaluate``: Score-CAM and the gradient baselines under the paper's metrics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorecam_explorer.commands._common import add_family_arguments, add_model_arguments, model_from_arguments
from scorecam_explorer.methods import methods as registered_methods


def register(subparsers: argparse._SubParsersAction) -> None:
    known = registered_methods()  # the registry, as it is when the parser is built
    parser = subparsers.add_parser(
        "evaluate",
        help=f"compare {', '.join(m.label for m in known)} with Average Drop/Increase, Deletion/Insertion "
        "and the energy pointing game",
        description="Compute each method's map of every image's top-1 class and score it with the metrics of "
        "Wang et al. 2020 (Score-CAM). Prints a table and writes every per-image value and the protocol as JSON.",
    )
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, help="a folder of pictures, or 'samples' for the bundled photos")
    parser.add_argument("--layer", default=None, help="layer to explain (default: the model's default layer)")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, from: {', '.join(m.key for m in known)} (default: all of them)",
    )
    parser.add_argument("--max-images", type=int, default=None, help="evaluate at most N images (first by name)")
    parser.add_argument("--out", required=True, help="JSON file for the results (written atomically)")
    parser.add_argument(
        "--boxes",
        default=None,
        help="JSON {image file name: [x0, y0, x1, y1]} in input pixels (after resize and crop) for the "
        "energy pointing game; without it that metric is left out",
    )
    parser.add_argument("--preset", default="paper", help="Score-CAM weighting preset (default: paper)")
    add_family_arguments(parser, family_default=None, seed_help="SS-CAM's noise seed (default: torch's global generator)")
    parser.add_argument(
        "--keep-fraction", type=float, default=0.5, help="share of the map's top pixels kept for Average Drop (0.5)"
    )
    parser.add_argument(
        "--space",
        choices=("input", "pixels"),
        default="input",
        help="multiply the map with the normalised input (default) or with the [0, 1] pixels",
    )
    parser.add_argument(
        "--step-fraction", type=float, default=0.01, help="share of the pixels changed per deletion/insertion step"
    )
    parser.add_argument("--no-topk", action="store_true", help="skip Score-CAM's top-k channel fidelity")
    parser.add_argument(
        "--sanity", action="store_true", help="also run the cascading randomisation sanity check (slow for Score-CAM)"
    )
    parser.add_argument(
        "--sanity-depth", type=int, default=1, help="name parts per randomised group (1: top-level blocks)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass of the metrics")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scorecam_explorer.errors import ScorecamError
    from scorecam_explorer.evaluation import check_settings, collect_images, evaluate, load_boxes

    # cheap checks first, before the model loads
    family = {"family": args.family, "samples": args.samples, "std": args.std, "seed": args.seed}
    if args.family is None and all(value is None for value in family.values()):
        family = {}
    methods = check_settings(
        methods=args.methods,
        keep_fraction=args.keep_fraction,
        space=args.space,
        step_fraction=args.step_fraction,
        preset=args.preset,
        sanity_depth=args.sanity_depth,
        batch_size=args.batch_size,
        sanity=args.sanity,
        **family,
    )
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ScorecamError(f"cannot write {out}: folder {out.parent} does not exist")
    boxes = load_boxes(args.boxes) if args.boxes else None
    images = collect_images(args.images, args.max_images)  # fails early on an empty or missing folder

    model = model_from_arguments(args)
    log = None if args.quiet else (lambda line: print(f"[evaluate] {line}", file=sys.stderr, flush=True))
    result = evaluate(
        model,
        images,
        layer=args.layer,
        methods=methods,
        boxes=boxes,
        keep_fraction=args.keep_fraction,
        space=args.space,
        step_fraction=args.step_fraction,
        preset=args.preset,
        topk=not args.no_topk,
        sanity=args.sanity,
        sanity_depth=args.sanity_depth,
        batch_size=args.batch_size,
        log=log,
        **family,
    )
    print(result.table())
    result.save_json(out)
    print(f"\nwrote {out}")
    return 0
