"""The ``scorecam-explorer`` command line.

Subcommands live in :mod:`scorecam_explorer.commands`, one module each. Errors a user can
cause (:class:`~scorecam_explorer.errors.ScorecamError`) are printed as one line on stderr and
the command exits with status 2; nothing prints a bare traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from scorecam_explorer import __version__
from scorecam_explorer.commands import COMMAND_MODULES
from scorecam_explorer.errors import ScorecamError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="scorecam-explorer",
        description="Explore Score-CAM explanations of convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(f"scorecam_explorer.commands.{module_name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ScorecamError as error:
        print(f"scorecam-explorer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scorecam-explorer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
