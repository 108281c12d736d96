"""Class targets: a class index or a class name, resolved against a model's class names.

The same rules wherever a target is given (maps, baselines, metrics, dataset analysis):

* an index must lie in 0..K-1 (a bool is not an index);
* a name matches ignoring case and surrounding spaces;
* a name that several classes share up to case is refused with the candidates (ImageNet's
  "Cardigan", the corgi, is class 264 and "cardigan" is class 474): pass the index instead;
* an unknown name is refused with the closest names or, when none is close, some valid ones.

No torch here: composing maps from a saved cache must not need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scorecam_explorer.errors import UnknownClassError, did_you_mean

SHOWN_NAMES = 8
"""How many class names an unknown-name error lists when no name is close."""


def names_table(class_names: Sequence[str]) -> dict[str, list[int]]:
    """Class indices by lower-cased, stripped name (a list: names can repeat up to case)."""
    table: dict[str, list[int]] = {}
    for index, name in enumerate(class_names):
        table.setdefault(str(name).strip().lower(), []).append(index)
    return table


def class_index(
    target: int | str | np.integer,
    class_names: Sequence[str] | None,
    *,
    count: int | None = None,
    table: Mapping[str, list[int]] | None = None,
) -> int:
    """The class index ``target`` names, by the rules of the module docstring.

    Args:
        target: a class index or a class name.
        class_names: the model's K class names, or None when it has none (then only indices
            are accepted, and ``count`` gives K).
        count: K when ``class_names`` is None.
        table: :func:`names_table` of ``class_names``, for callers that resolve many targets.

    Raises:
        UnknownClassError: an index out of range, an unknown or ambiguous name, another type.
    """
    total = len(class_names) if class_names is not None else int(count or 0)
    if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
        if not 0 <= int(target) < total:
            raise UnknownClassError(
                f"class index {int(target)} is out of range: this model has {total} classes (0..{total - 1})."
            )
        return int(target)
    if isinstance(target, str):
        if not class_names:
            raise UnknownClassError(
                f"class name {target!r} given, but the model has no class names: give the class index instead."
            )
        matches = (table if table is not None else names_table(class_names)).get(target.strip().lower(), [])
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UnknownClassError(
                f"class name {target!r} is ambiguous: classes {', '.join(map(str, matches))} share it; "
                "pass the class index instead."
            )
        names = [str(name) for name in class_names]
        raise UnknownClassError(
            f"no class named {target!r} among this model's {total} classes."
            f"{did_you_mean(target, names) or _some_names(names)}"
        )
    raise UnknownClassError(f"a target is a class index or a class name, not {type(target).__name__}.")


def _some_names(class_names: list[str]) -> str:
    """An error-message suffix naming some valid classes, for a name with no close match."""
    count = len(class_names)
    if count <= SHOWN_NAMES:
        return f" Its classes are: {', '.join(class_names)}."
    return (
        f" The first {SHOWN_NAMES} are: {', '.join(class_names[:SHOWN_NAMES])}, ...; "
        f"cache['class_name'].values lists all {count}, or pass a class index 0..{count - 1}."
    )
