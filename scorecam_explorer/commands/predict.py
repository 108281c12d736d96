"""``scorecam-explorer predict``: the top-5 classes of a model for a picture."""

from __future__ import annotations

import argparse

from scorecam_explorer.commands._common import add_model_arguments, model_from_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="print the top-5 classes for a picture")
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="an image file or sample:NAME (e.g. sample:chelsea)")
    parser.add_argument("--top", type=int, default=5, help="how many classes (default 5)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scorecam_explorer.images import load_image
    from scorecam_explorer.prediction import predict

    image = load_image(args.image)  # fails early, with the path, before the model loads
    model = model_from_arguments(args)
    print(f"{model.name} on {args.image}:")
    for rank, prediction in enumerate(predict(model, image, top=args.top), start=1):
        print(f"{rank}. {prediction.name:<30} {prediction.probability:7.2%}  (class {prediction.index})")
    return 0
