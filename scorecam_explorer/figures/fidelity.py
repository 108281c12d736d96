"""The fidelity curve: how close the map of the k heaviest channels is to the full map."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from scorecam_explorer.figures import style


def log_ticks(count: int) -> list[int]:
    """Ticks for a log axis over 1..``count``: the powers of ten, and ``count`` itself.

    A power of ten closer to ``count`` than a factor 1.5 is left out, so that the two labels
    do not overlap (1280 channels: 1, 10, 100, 1280).
    """
    if count < 1:
        return []
    decades = [10**power for power in range(len(str(int(count))))]
    return [tick for tick in decades if tick * 1.5 <= count] + [int(count)]


def fidelity_spec(
    curve: xr.DataArray,
    *,
    current_k: int,
    current_r: float,
    title: str | None = None,
    subtitle: str | None = None,
    width: int = style.HALF_WIDTH,
    height: int = 330,
) -> dict[str, Any]:
    """Pearson r of the top-k map with the full map against k (log axis, ticks at the powers of
    ten and at the last k), current k marked.

    ``curve`` is :func:`scorecam_explorer.explorer.analysis.fidelity_curve` (dims k, with
    the coordinate ``channel``: the channel added at each k). Traces: 0 the curve, 1 the
    current k (also marked by a dotted vertical line).
    """
    ks = np.asarray(curve["k"].values, dtype=np.int32)
    values = np.asarray(curve.values, dtype=np.float64)
    added = np.asarray(curve["channel"].values, dtype=np.int32)
    line = {
        "type": "scatter",
        "x": ks,
        "y": values,
        "customdata": added,
        "mode": "lines",
        "line": {"color": style.KEPT, "width": 2},
        "hovertemplate": "k = %{x}<br>r = %{y:.3f}<br>added channel %{customdata}<extra></extra>",
        "name": "top-k",
    }
    marker = {
        "type": "scatter",
        "x": [int(current_k)],
        "y": [float(current_r)],
        "mode": "markers",
        "marker": {"color": style.ACCENT, "size": 11, "line": {"color": "white", "width": 1.5}},
        "hovertemplate": "current k = %{x}<br>r = %{y:.3f}<extra></extra>",
        "name": "current k",
    }
    low = min(0.0, float(values.min()) if values.size else 0.0, float(current_r)) - 0.05
    count = int(ks.max()) if ks.size else 1
    top = float(np.log10(max(2, count))) + 0.02
    ticks = log_ticks(count)
    layout = style.base_layout(width, height, title or "Fidelity of the top-k map", subtitle, top=64, right=20, left=60, bottom=45)
    layout.update(
        xaxis={
            "type": "log",
            "title": {"text": "k, heaviest channels kept"},
            "range": [0.0, top],
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": [str(tick) for tick in ticks],
        },
        yaxis={"title": {"text": "Pearson r with the full map"}, "range": [low, 1.05]},
        shapes=[
            {
                "type": "line",
                "x0": int(current_k),
                "x1": int(current_k),
                "yref": "paper",
                "y0": 0,
                "y1": 1,
                "line": {"color": style.ACCENT, "width": 1, "dash": "dot"},
            }
        ],
        hovermode="closest",
    )
    return {"data": [line, marker], "layout": layout}


def fidelity_figure(curve: xr.DataArray, **options: Any) -> go.Figure:
    """:func:`fidelity_spec` as a ``go.Figure``."""
    return go.Figure(fidelity_spec(curve, **options))
