"""Channel figures: the weight of every channel, one channel up close, a gallery of the top ones.

Each figure has a ``*_spec`` builder (plain dicts) and a ``*_figure`` wrapper (``go.Figure``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.figures import style
from scorecam_explorer.figures.encoding import (
    DIVERGING,
    colorbar_trace,
    colorize,
    picture_trace,
    typed_array,
    values_in,
)

SORT_KEYS: dict[str, str] = {
    "weight": "weight w_k",
    "contribution": "share of the map",
    "variance": "activation variance",
}
"""How the channel chart can be sorted: key -> what it means (for labels)."""

_SORT_VARIABLE = {"weight": "weight", "contribution": "share", "variance": "variance"}

CUSTOMDATA = ("channel", "score", "probability", "weight", "share", "variance")
"""The columns of each bar's ``customdata`` row."""

HOVER = (
    "<b>channel %{customdata[0]}</b><br>"
    "score: %{customdata[1]:.4g}<br>"
    "probability: %{customdata[2]:.2%}<br>"
    "weight: %{customdata[3]:.4g}<br>"
    "share of the map: %{customdata[4]:.1%}<br>"
    "activation variance: %{customdata[5]:.3g}"
    "<extra></extra>"
)


def channel_order(contributions: xr.Dataset, sort_by: str) -> np.ndarray:
    """Channel ids in the chart's order: descending ``sort_by`` (ties: lower channel id)."""
    if sort_by not in SORT_KEYS:
        raise ScorecamError(f"sort_by must be one of {', '.join(SORT_KEYS)}, not {sort_by!r}.")
    values = np.asarray(contributions[_SORT_VARIABLE[sort_by]].values, dtype=np.float64)
    return np.argsort(-values, kind="stable")


IN_MAP, BEYOND_TOP_K, OFF, SELECTED, SELECTED_OFF = 0, 1, 2, 3, 4
"""Status codes of a bar (:func:`bar_status`)."""

STATUS_FILL = (style.KEPT, style.NOT_KEPT, style.SWITCHED_OFF, style.SELECTED, style.SWITCHED_OFF)
"""Fill colour of each status code: a switched-off channel is grey even when inspected."""
STATUS_OUTLINE = (None, None, None, None, style.SELECTED)
"""Outline colour of each status code (None: no outline): the inspected channel, when it is
switched off, keeps an orange outline around its grey bar."""
OUTLINE_WIDTH = 2.0

STATUS_LEGEND = (
    (style.KEPT, None, "in the map"),
    (style.NOT_KEPT, None, "beyond the top k"),
    (style.SWITCHED_OFF, None, "switched off"),
    (style.SELECTED, None, "inspected"),
    (style.SWITCHED_OFF, style.SELECTED, "inspected, switched off"),
)
"""(fill, outline, meaning) of each bar colour, for a legend beside the chart."""


def bar_status(
    n_channels: int, *, selected: int | None, switched_off: Collection[int], kept: np.ndarray | None
) -> np.ndarray:
    """One status code per channel id: in the map, beyond the top k, switched off, inspected,
    or inspected and switched off."""
    status = np.full(n_channels, IN_MAP, dtype=np.int8)
    if kept is not None:
        status[~np.asarray(kept, dtype=bool)] = BEYOND_TOP_K
    status[np.fromiter(switched_off, dtype=np.int64, count=len(switched_off))] = OFF
    if selected is not None and 0 <= selected < n_channels:
        status[selected] = SELECTED_OFF if status[selected] == OFF else SELECTED
    return status


def bar_marker(status: np.ndarray) -> dict[str, Any]:
    """The bars' ``marker``: fill and outline colours as lists of CSS colour strings.

    Plain strings, one per bar: plotly.js takes them as they are, whereas numbers through a
    colour scale (or a typed array) make it warn "Invalid color specifier" for every bar.
    """
    outlines = tuple(outline or fill for fill, outline in zip(STATUS_FILL, STATUS_OUTLINE))
    widths = tuple(0.0 if outline is None else OUTLINE_WIDTH for outline in STATUS_OUTLINE)
    return {
        "color": np.array(STATUS_FILL, dtype=object)[status].tolist(),
        "line": {
            "color": np.array(outlines, dtype=object)[status].tolist(),
            "width": np.array(widths)[status].tolist(),
        },
    }


def _check_finite(columns: np.ndarray) -> None:
    """Refuse bar data (a row per channel, the :data:`CUSTOMDATA` columns) holding NaN or inf,
    naming the columns and channels (ScorecamError)."""
    bad = ~np.isfinite(columns)
    if not bad.any():
        return
    names = [name for name, column in zip(CUSTOMDATA, bad.T) if column.any()]
    channels = columns[bad.any(axis=1), 0]
    shown = ", ".join(str(int(k)) for k in channels[:5]) + (", …" if len(channels) > 5 else "")
    raise ScorecamError(
        f"cannot draw the channel chart: NaN or inf in the {' and '.join(names)} of channel(s) {shown}."
    )


def channel_bar_spec(
    contributions: xr.Dataset,
    *,
    sort_by: str = "weight",
    selected: int | None = None,
    switched_off: Collection[int] = (),
    kept: np.ndarray | None = None,
    title: str | None = None,
    subtitle: str | None = None,
    width: int = style.COLUMN_WIDTH,
    height: int = 320,
) -> dict[str, Any]:
    """A bar per channel, its height the weight w_k, bars ordered by ``sort_by``.

    ``contributions`` is :func:`scorecam_explorer.compose.channel_contributions` for one
    image. Bar i is channel ``channel_order(contributions, sort_by)[i]``; its customdata row
    is :data:`CUSTOMDATA` (a typed-array spec: :func:`~.encoding.decode_typed_array`); its
    colour (:func:`bar_status`, :data:`STATUS_LEGEND`) is blue in the map, light blue beyond
    the top k (``kept`` False), grey switched off, orange the inspected channel (grey with an
    orange outline when it is switched off). NaN or inf in these numbers is refused
    (ScorecamError), as in every map.
    """
    order = channel_order(contributions, sort_by)
    columns = np.stack([np.asarray(contributions[name].values, dtype=np.float64) for name in CUSTOMDATA], axis=1)
    _check_finite(columns)
    weight = columns[:, 3]
    status = bar_status(len(weight), selected=selected, switched_off=switched_off, kept=kept)
    bars = {
        "type": "bar",
        "x": np.arange(len(order), dtype=np.int32),
        "y": weight[order],
        "customdata": typed_array(columns[order]),
        "hovertemplate": HOVER,
        "marker": bar_marker(status[order]),
        "name": "channels",
    }
    name = str(contributions.coords["target_name"].values) if "target_name" in contributions.coords else "the target"
    heading = title or f"Channel weights for “{name}” · {contributions.attrs.get('layer', '')}"
    layout = style.base_layout(width, height, heading, subtitle, top=64, right=20, left=60, bottom=40)
    layout.update(
        bargap=0.0,
        xaxis={"title": {"text": f"channels, sorted by {SORT_KEYS[sort_by]}"}, "showgrid": False, "zeroline": False},
        yaxis={"title": {"text": "weight w_k"}, "zeroline": True},
        clickmode="event",
        hovermode="closest",
    )
    return {"data": [bars], "layout": layout}


def channel_bar_figure(contributions: xr.Dataset, **options: Any) -> go.Figure:
    """:func:`channel_bar_spec` as a ``go.Figure``."""
    return go.Figure(channel_bar_spec(contributions, **options))


def value_range(values: np.ndarray) -> tuple[float, float]:
    """(min, max), widened to (v, v + 1) for a constant map so a colour scale exists."""
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low, low + 1.0)


def channel_detail_spec(
    activation: xr.DataArray,
    mask: xr.DataArray,
    masked: xr.DataArray,
    *,
    channel: int,
    title: str | None = None,
    subtitle: str | None = None,
    width: int = style.COLUMN_WIDTH,
    height: int = 330,
) -> dict[str, Any]:
    """One channel: its raw activation A_k, its mask H_k, and the masked input X * H_k.

    ``activation`` (fy, fx) is coloured from its own min to max (viridis, colour bar),
    ``mask`` (y, x) in [0, 1] in grey, ``masked`` (y, x, rgb) is a picture.
    Traces: 0 activation, 1 mask, 2 masked input, 3-4 the colour bars.
    """
    values = values_in(activation, ("fy", "fx")).astype(np.float64)
    low, high = value_range(values)
    layout = style.grid(
        1,
        3,
        titles=[
            f"activation A_{channel} ({values.shape[0]}×{values.shape[1]})",
            f"mask H_{channel} (upsampled, min-max)",
            f"masked input X∘H_{channel}",
        ],
        horizontal_spacing=0.08,
    )
    mask_values = values_in(mask, ("y", "x")).astype(np.float64)
    traces = [
        picture_trace(colorize(values, "viridis", low, high), "activation", axis=1, smooth=False),
        picture_trace(colorize(mask_values, "gray"), "mask", axis=2),
        picture_trace(values_in(masked, ("y", "x", "rgb")), "masked input", axis=3),
        colorbar_trace("viridis", low, high, title="A_k", x=style.cell_domain(layout, 0)[1] + 0.005, length=0.8, tickformat=".3g"),
        colorbar_trace("gray", 0.0, 1.0, title="H_k", x=style.cell_domain(layout, 1)[1] + 0.005, length=0.8),
    ]
    layout = style.base_layout(width, height, title or f"Channel {channel}", subtitle, top=84, right=20, grid=layout)
    return {"data": traces, "layout": layout}


def channel_detail_figure(activation: xr.DataArray, mask: xr.DataArray, masked: xr.DataArray, **options: Any) -> go.Figure:
    """:func:`channel_detail_spec` as a ``go.Figure``."""
    return go.Figure(channel_detail_spec(activation, mask, masked, **options))


def gallery_spec(
    contributions: xr.DataArray,
    *,
    columns: int = 4,
    title: str | None = None,
    subtitle: str | None = None,
    width: int = style.COLUMN_WIDTH,
    height: int | None = None,
) -> dict[str, Any]:
    """The contributions w_k A_k of a few channels on one shared blue-white-red scale.

    ``contributions`` has dims (rank, fy, fx) and coordinates ``channel`` and ``share``
    along ``rank``. The scale is symmetric, [-m, m] with m the largest |w_k A_k| shown, so
    white is zero in every tile. Traces: one picture per tile, then the colour bar.
    """
    tiles = values_in(contributions, ("rank", "fy", "fx")).astype(np.float64)
    count = tiles.shape[0]
    if count == 0:
        raise ScorecamError("the gallery needs at least one channel.")
    rows = -(-count // columns)
    channels = contributions.coords["channel"].values
    shares = contributions.coords["share"].values if "share" in contributions.coords else np.full(count, np.nan)
    labels = [f"channel {int(c)}" + (f" · {s:.1%}" if np.isfinite(s) else "") for c, s in zip(channels, shares)]
    layout = style.grid(rows, columns, titles=labels, horizontal_spacing=0.03, vertical_spacing=0.14, title_size=11)
    extent = float(np.abs(tiles).max()) or 1.0
    traces = [
        picture_trace(colorize(tile, DIVERGING, -extent, extent), f"channel {int(channels[index])}", axis=index + 1, smooth=False)
        for index, tile in enumerate(tiles)
    ]
    traces.append(colorbar_trace(DIVERGING, -extent, extent, title="w_k·A_k", x=1.01, length=0.9, tickformat=".2g"))
    heading = title or "Top channels' contributions w_k·A_k"
    layout = style.base_layout(width, height or 90 + rows * 200, heading, subtitle, top=80, right=70, grid=layout)
    return {"data": traces, "layout": layout}


def gallery_figure(contributions: xr.DataArray, **options: Any) -> go.Figure:
    """:func:`gallery_spec` as a ``go.Figure``."""
    return go.Figure(gallery_spec(contributions, **options))
