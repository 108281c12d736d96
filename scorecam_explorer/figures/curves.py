"""Deletion and insertion curves (Petsiuk et al. 2018), side by side.

The curves are those of :func:`scorecam_explorer.metrics.deletion` and
:func:`~scorecam_explorer.metrics.insertion`: the class probability p_t against the fraction
x_t of pixels removed (deletion) or inserted (insertion), in decreasing-saliency order. The
area under each curve (the AUC the metric reports) is shaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.figures import style

Spec = dict[str, Any]

DELETION_COLOUR = "#d62728"
INSERTION_COLOUR = "#2ca02c"
STALE_COLOUR = "#9e9e9e"
_FILL_ALPHA = 0.15

X_RANGE = (-0.03, 1.03)
"""The fraction axis, padded at both ends: its "0%" label then stays clear of the
probability axis's "0" at the corner."""
Y_RANGE = (-0.04, 1.04)
"""The probability axis: fixed, so that shaded areas compare across maps; padded as :data:`X_RANGE`."""

_CELLS = {
    "deletion": {"x_title": "fraction of pixels removed", "verb": "removed", "better": "lower is better"},
    "insertion": {"x_title": "fraction of pixels inserted", "verb": "inserted", "better": "higher is better"},
}


def _fill(colour: str) -> str:
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{_FILL_ALPHA})"


def curve_points(result: xr.Dataset | None, image: int = 0) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(x_t, p_t, AUC) of one picture of a deletion or insertion result; empty when None."""
    if result is None:
        return np.zeros(0), np.zeros(0), None
    for name in ("curve", "auc", "fraction"):
        if name not in result.variables:
            raise ScorecamError(f"a deletion / insertion result has a {name!r} variable; this one has none.")
    curve = result["curve"].isel(image=image) if "image" in result["curve"].dims else result["curve"]
    auc = result["auc"].isel(image=image) if "image" in result["auc"].dims else result["auc"]
    fractions = np.asarray(result["fraction"].values, dtype=np.float64)
    return fractions, np.asarray(curve.values, dtype=np.float64), float(auc)


def _cell_title(metric: str, auc: float | None) -> str:
    cell = _CELLS[metric]
    name = metric.capitalize()
    if auc is None:
        return f"{name} · not computed"
    return f"{name} · AUC {auc:.3f} ({cell['better']})"


def _curve_trace(metric: str, x: np.ndarray, y: np.ndarray, *, stale: bool, axis: int) -> dict[str, Any]:
    colour = STALE_COLOUR if stale else (DELETION_COLOUR if metric == "deletion" else INSERTION_COLOUR)
    suffix = "" if axis == 1 else str(axis)
    return {
        "type": "scatter",
        "x": x,
        "y": y,
        "mode": "lines",
        "line": {"color": colour, "width": 2, "dash": "dot" if stale else "solid"},
        "fill": "tozeroy",
        "fillcolor": _fill(colour),
        "xaxis": f"x{suffix}",
        "yaxis": f"y{suffix}",
        "hovertemplate": f"{_CELLS[metric]['verb']} %{{x:.1%}}<br>p = %{{y:.3f}}<extra></extra>",
        "name": metric,
    }


def causal_curves_spec(
    deletion: xr.Dataset | None,
    insertion: xr.Dataset | None,
    *,
    image: int = 0,
    stale: bool = False,
    title: str | None = None,
    subtitle: str | None = None,
    class_name: str | None = None,
    width: int = 560,
    height: int = 300,
) -> Spec:
    """Deletion (left) and insertion (right) curves of one picture, their AUCs in the cell titles.

    ``deletion`` and ``insertion`` are the Datasets of :func:`scorecam_explorer.metrics.deletion`
    and :func:`~scorecam_explorer.metrics.insertion` (``curve`` (image, step) with the
    coordinate ``fraction``, ``auc`` (image)); ``image`` picks the picture. None draws an
    empty cell ("not computed"). ``stale`` draws the curves grey and dotted: they belong to
    another map than the one the title names. Traces: 0 deletion, 1 insertion (always two,
    so that a panel updates them in place). The y axis is the probability, fixed to [0, 1]
    (with a little padding, :data:`Y_RANGE`) so that shaded areas compare across maps.
    """
    cells = []
    for index, (metric, result) in enumerate((("deletion", deletion), ("insertion", insertion)), start=1):
        x, y, auc = curve_points(result, image)
        cells.append((metric, _curve_trace(metric, x, y, stale=stale, axis=index), _cell_title(metric, auc)))
    layout = style.base_layout(
        width,
        height,
        title or "Deletion and insertion",
        subtitle,
        top=80,
        right=16,
        left=52,
        bottom=48,
        grid=style.grid(1, 2, titles=[cell_title for _, _, cell_title in cells], horizontal_spacing=0.14),
    )
    probability = f"p({class_name})" if class_name else "class probability"
    for index, (metric, _, _) in enumerate(cells, start=1):
        suffix = "" if index == 1 else str(index)
        domain_x = layout[f"xaxis{suffix}"]["domain"]
        domain_y = layout[f"yaxis{suffix}"]["domain"]
        layout[f"xaxis{suffix}"] = {
            "domain": domain_x,
            "anchor": f"y{suffix}",
            "range": list(X_RANGE),
            "tickformat": ".0%",
            "title": {"text": _CELLS[metric]["x_title"]},
        }
        layout[f"yaxis{suffix}"] = {
            "domain": domain_y,
            "anchor": f"x{suffix}",
            "range": list(Y_RANGE),
            "zeroline": False,
            "title": {"text": probability if index == 1 else ""},
        }
    layout["hovermode"] = "closest"
    return {"data": [trace for _, trace, _ in cells], "layout": layout}


def causal_curves_figure(deletion: xr.Dataset, insertion: xr.Dataset, **options: Any) -> go.Figure:
    """:func:`causal_curves_spec` as a ``go.Figure``."""
    return go.Figure(causal_curves_spec(deletion, insertion, **options))
