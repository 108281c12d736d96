"""The app's status file: what the command is doing, read by every page's kernel.

The command writes it (atomically: a reader sees the old or the new content, never half of
one); a page polls it and shows it until the state is ``ready``, then opens the cache it
names. No widgets, no torch: both sides import this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV_APP_STATUS = "SCORECAM_EXPLORER_APP_STATUS"
"""Path of the status file a page's kernel polls (set by the command)."""

STATES = ("starting", "loading", "computing", "ready", "failed")


@dataclass(frozen=True)
class AppStatus:
    """One report of the command.

    ``state``: ``starting``, ``loading`` (model, picture, cache check), ``computing`` (layer
    ``step`` of ``steps``), ``ready`` (``cache`` names the cache to open, ``model`` and
    ``weights`` the model a page may load on request) or ``failed`` (``message`` says why).
    ``candidate``: before ``ready``, the cache the command expects to serve (the one it
    served last time for the same options, or the one given by path); a page may open it in
    advance, and shows it only if ``ready`` names that same cache, unchanged. ``snapshot``:
    with ``ready``, the cache as the command loaded and checked it, pickled in the command's
    private folder: pages read it in a tenth of a second instead of opening the Zarr store
    (and keep working if the cache is deleted while the app runs). ``done`` and ``total``:
    while computing, masked inputs accounted for so far, of all layers.
    """

    state: str
    message: str = ""
    step: int = 0
    steps: int = 0
    cache: str = ""
    model: str = ""
    weights: str = "DEFAULT"
    layers: list[str] = field(default_factory=list)
    candidate: str = ""
    snapshot: str = ""
    done: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown app state {self.state!r}; expected one of {', '.join(STATES)}")

    @property
    def fraction(self) -> float:
        """How far the work is, 0..1: channels ``done`` of ``total`` when known, else layers
        ``step`` of ``steps`` (0 when unknown)."""
        if self.total > 0:
            return min(1.0, self.done / self.total)
        return min(1.0, self.step / self.steps) if self.steps > 0 else 0.0

    def describe(self) -> str:
        """One line for a person: what is happening now."""
        if self.state == "computing" and self.steps:
            return f"Computing layer {self.step + 1} of {self.steps}" + (f": {self.message}" if self.message else "")
        return self.message or {
            "starting": "Starting the explorer",
            "loading": "Loading",
            "computing": "Computing",
            "ready": "Opening the explorer",
            "failed": "The explorer could not start",
        }[self.state]


def write_status(path: Path, status: AppStatus) -> None:
    """Replace the status file at ``path`` with ``status`` in one step."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(asdict(status), stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_status(path: Path) -> AppStatus | None:
    """The status at ``path``, or None while there is none (or it cannot be read)."""
    try:
        data = json.loads(Path(path).read_text())
        return AppStatus(**data)
    except (OSError, ValueError, TypeError):
        return None
