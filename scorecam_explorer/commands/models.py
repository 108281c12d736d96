"""``scorecam-explorer models``: the models that can be loaded by name, the default first."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the models, the default first")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scorecam_explorer.models import DEFAULT_MODEL, available_models

    for name in available_models():
        note = "  (default: embedded, pretrained on ImageNet, works offline)" if name == DEFAULT_MODEL else ""
        print(f"{name}{note}")
    return 0
