"""Exceptions raised by scorecam_explorer.

Every error a user can cause derives from :class:`ScorecamError`; the command line prints its
message as one line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ScorecamError(Exception):
    """Base class of every error a user can cause (bad name, bad file, bad cache...)."""


class UnknownModelError(ScorecamError, KeyError):
    """A model name that is neither the default model nor a torchvision classifier."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownLayerError(ScorecamError, KeyError):
    """A layer name that the model does not have, or that cannot be targeted."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownClassError(ScorecamError, KeyError):
    """A target class index out of range or a class name that does not exist."""

    def __str__(self) -> str:
        return str(self.args[0])


class ImageLoadError(ScorecamError, OSError):
    """An image path that is missing or is not a readable image."""


class WeightsUnavailableError(ScorecamError, RuntimeError):
    """Pretrained weights could not be fetched (offline machine) or read."""


class CacheError(ScorecamError, ValueError):
    """A cache that is damaged, foreign, or made with another model or convention."""


class NonFiniteError(ScorecamError, FloatingPointError):
    """NaN or inf in a layer's activation or in the model's output."""


class UnknownMethodError(ScorecamError, KeyError):
    """A saliency method name that no method in the registry (:mod:`scorecam_explorer.methods`) has as key or alias."""

    def __str__(self) -> str:
        return str(self.args[0])


class BoxError(ScorecamError, ValueError):
    """A bounding box that is malformed, empty, or not inside the image."""


def closest_names(name: str, candidates: Iterable[str], limit: int = 5) -> list[str]:
    """The candidates that look most like ``name`` (case-insensitive), best first."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=limit, cutoff=0.5)
    substring = [c for c in candidates if name.lower() in c.lower() and c not in matches]
    return [lowered[m] for m in matches] + substring[: max(0, limit - len(matches))]


def did_you_mean(name: str, candidates: Iterable[str], limit: int = 5) -> str:
    """A ' Did you mean: a, b?' suffix for error messages, or '' when nothing is close."""
    close = closest_names(name, candidates, limit)
    return f" Did you mean: {', '.join(close)}?" if close else ""
