"""The registry of explanation methods: one :class:`Method` record per method.

Evaluation, the sanity check, the explorer's Compare panel, the command line and the
package's exports read this registry; none of them lists methods by name. A method is
registered by the module that defines it (``scorecam_explorer/methods/<name>.py``) with
:func:`register`. This module imports neither torch nor any method's dependencies.

Every method's ``compute`` has one signature::

    compute(model, inputs, layer=None, target=None, *, batch_size=16) -> xarray.DataArray

and returns maps in [0, 1] at input resolution with dims (image, y, x), coordinates
``target`` and ``target_name`` along ``image``, and attributes ``method`` and ``layer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from scorecam_explorer.errors import ScorecamError, UnknownMethodError, did_you_mean

NEEDS = frozenset({"masked_passes", "gradients", "samples"})
"""What a method may need: masked forward passes (Score-CAM's cache), gradients at the
layer (one backward pass), or several samples per channel (noise or scaled masks)."""


@dataclass(frozen=True)
class Method:
    """One explanation method.

    Attributes:
        key: the canonical name (lower case), used in results, JSON files and the CLI.
        label: the name shown to people (``"Grad-CAM++"``).
        aliases: other names accepted for it (matched case-insensitively).
        needs: a subset of :data:`NEEDS`.
        compute: the function that computes its maps (signature in the module doc).
        description: one line on what it does, with its rule.
    """

    key: str
    label: str
    compute: Callable[..., Any] = field(repr=False)
    needs: frozenset[str] = frozenset()
    aliases: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not self.key or self.key != self.key.strip().lower():
            raise ScorecamError(f"a method key must be a non-empty lower-case name, not {self.key!r}")
        if not callable(self.compute):
            raise ScorecamError(f"method {self.key!r}: compute must be callable")
        object.__setattr__(self, "needs", frozenset(self.needs))
        object.__setattr__(self, "aliases", tuple(a.strip().lower() for a in self.aliases))
        unknown = sorted(self.needs - NEEDS)
        if unknown:
            raise ScorecamError(
                f"method {self.key!r} needs unknown {', '.join(unknown)}; choose from {', '.join(sorted(NEEDS))}"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """The key and every alias."""
        return (self.key, *self.aliases)


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry and return it.

    Raises ScorecamError when its key or an alias is already taken by another method
    (``replace=True`` replaces a method of the same key).
    """
    taken = {name: other.key for other in _REGISTRY.values() for name in other.names}
    for name in method.names:
        owner = taken.get(name)
        if owner is not None and not (replace and owner == method.key):
            raise ScorecamError(f"method name {name!r} is already used by method {owner!r}")
    _REGISTRY[method.key] = method
    return method


def unregister(name: str) -> Method:
    """Remove the method called ``name`` (key or alias) and return its record."""
    return _REGISTRY.pop(get_method(name).key)


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """Register ``method`` for the duration of a ``with`` block (for tests and experiments)."""
    register(method)
    try:
        yield method
    finally:
        _REGISTRY.pop(method.key, None)


def get_method(name: str) -> Method:
    """The method called ``name``: its key or an alias, case and surrounding spaces ignored.

    Raises UnknownMethodError listing the known keys (and the closest names).
    """
    wanted = str(name).strip().lower()
    for method in _REGISTRY.values():
        if wanted in method.names:
            return method
    every = [n for method in _REGISTRY.values() for n in method.names]
    raise UnknownMethodError(
        f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}.{did_you_mean(str(name), every)}"
    )


def methods(needs: str | Iterable[str] | None = None) -> tuple[Method, ...]:
    """The registered methods in registration order; with ``needs``, those that need all of it."""
    if needs is None:
        return tuple(_REGISTRY.values())
    wanted = frozenset([needs] if isinstance(needs, str) else needs)
    unknown = sorted(wanted - NEEDS)
    if unknown:
        raise ScorecamError(f"unknown need {', '.join(unknown)}; choose from {', '.join(sorted(NEEDS))}")
    return tuple(method for method in _REGISTRY.values() if wanted <= method.needs)


def method_keys(needs: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The keys of :func:`methods`."""
    return tuple(method.key for method in methods(needs))


class LabelView(Mapping[str, str]):
    """A live, read-only ``key -> label`` view of the registry (optionally of one need)."""

    def __init__(self, needs: str | None = None) -> None:
        self._needs = needs

    def __getitem__(self, name: str) -> str:
        method = get_method(name)
        if self._needs is not None and self._needs not in method.needs:
            raise KeyError(name)
        return method.label

    def __iter__(self) -> Iterator[str]:
        return iter(method_keys(self._needs))

    def __len__(self) -> int:
        return len(methods(self._needs))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


class ComputeView(Mapping[str, Callable[..., Any]]):
    """A live, read-only ``key -> compute`` view of the methods with one need."""

    def __init__(self, needs: str) -> None:
        self._needs = needs

    def __getitem__(self, name: str) -> Callable[..., Any]:
        try:
            method = get_method(name)
        except UnknownMethodError:
            raise KeyError(name) from None
        if self._needs not in method.needs:
            raise KeyError(name)
        return method.compute

    def __iter__(self) -> Iterator[str]:
        return iter(method_keys(self._needs))

    def __len__(self) -> int:
        return len(methods(self._needs))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"
