"""Subcommands of the ``scorecam-explorer`` command line, one module each.

Each module defines ``register(subparsers)``, which adds its parser and sets ``func`` to a
function taking the parsed arguments and returning the exit status.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "models",
    "layers",
    "predict",
    "map",
    "compute",
    "compute_dataset",
    "atlas_index",
    "evaluate",
    "app",
)
