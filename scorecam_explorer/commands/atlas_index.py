"""``scorecam-explorer atlas-index``: save a dataset store's channel-atlas tables beside it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "atlas-index",
        help="index a dataset store for the channel atlas (one scan per layer; later questions read only what they show)",
        description=(
            "Scan the complete images of a dataset store once per layer and save the channel atlas' tables "
            "(each channel's weight for each image's class, activation peaks, constant flags, mean weight per "
            "class) beside it, in STORE.zarr.atlas-index/. The atlas and the app use an index only while it "
            "matches the store's complete images; an index already fresh is kept, a stale or damaged one rebuilt."
        ),
    )
    parser.add_argument("store", metavar="STORE.zarr", help="a dataset store (compute-dataset --out)")
    parser.add_argument(
        "--layer",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="layers to index: several names after one --layer, or --layer repeated (default: every layer of the store)",
    )
    parser.add_argument(
        "--preset",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="weighting presets to index (default: paper); one scan serves every preset of a layer",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild indexes that are fresh too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scorecam_explorer.atlas_index import plan_atlas_index, run_plan

    plan = plan_atlas_index(args.store, args.layer, args.preset or ["paper"], rebuild=args.rebuild)
    print(plan.describe(), flush=True)
    folders = run_plan(plan, progress=not args.no_progress)
    built = sum(len(presets) for presets in plan.work.values())
    print(f"{built} index(es) written, {len(folders) - built} fresh already, in {folders[0].parent.parent}")
    return 0
