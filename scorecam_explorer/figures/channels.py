"""Channel figures: the weight of every channel, one channel up close, a gallery of the top ones.

Each figure has a ``*_spec`` builder (plain dicts) and a ``*_figure`` wrapper (``go.Figure``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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
    symmetric_ticks,
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


MIN_BAR_PIXELS = 5
"""The narrowest a bar is drawn when the chart opens, in pixels: wide enough to aim at."""
BAR_MARGINS = {"top": 64, "right": 20, "left": 60, "bottom": 40}


def visible_bar_count(n_channels: int, width: int) -> int:
    """How many bars the chart shows when it opens: all of them when each gets at least
    :data:`MIN_BAR_PIXELS`, else as many of the heaviest as fit at that width."""
    plot_width = max(width - BAR_MARGINS["left"] - BAR_MARGINS["right"], MIN_BAR_PIXELS)
    return max(1, min(n_channels, plot_width // MIN_BAR_PIXELS))


def bar_window(n_channels: int, visible: int, focus: int | None = None) -> list[float]:
    """The x range (in ranks 1..n) that shows ``visible`` bars: the first ones, or, when the
    bar of rank ``focus`` is beyond them, a window centred on it."""
    start = 1
    if focus is not None and focus > visible:
        start = min(max(1, focus - visible // 2), n_channels - visible + 1)
    return [start - 0.5, start + visible - 0.5]


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
    window: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A bar per channel, its height the weight w_k, bars ordered by ``sort_by``.

    ``contributions`` is :func:`scorecam_explorer.compose.channel_contributions` for one
    image. Bar i (x = i + 1, the channel's rank) is channel
    ``channel_order(contributions, sort_by)[i]``; its customdata row is :data:`CUSTOMDATA`
    (a typed-array spec: :func:`~.encoding.decode_typed_array`); its colour
    (:func:`bar_status`, :data:`STATUS_LEGEND`) is blue in the map, light blue beyond the top
    k (``kept`` False), grey switched off, orange the inspected channel (grey with an orange
    outline when it is switched off). NaN or inf in these numbers is refused (ScorecamError),
    as in every map.

    A layer with more channels than fit at :data:`MIN_BAR_PIXELS` a bar (Lite0's ``head``:
    1280) opens on the heaviest ones (:func:`visible_bar_count`), or on a window around the
    inspected channel when it ranks beyond them (``window``, an x range in ranks, overrides
    this); a range slider under the chart draws every channel in miniature and is dragged or
    stretched to reach the rest, and the axis title says which ranks are shown. Hover and
    click take the bar under the pointer's x anywhere in the plot, so short bars are as easy
    to hit as tall ones.
    """
    order = channel_order(contributions, sort_by)
    columns = np.stack([np.asarray(contributions[name].values, dtype=np.float64) for name in CUSTOMDATA], axis=1)
    _check_finite(columns)
    weight = columns[:, 3]
    n_channels = len(weight)
    status = bar_status(n_channels, selected=selected, switched_off=switched_off, kept=kept)
    bars = {
        "type": "bar",
        "x": np.arange(1, n_channels + 1, dtype=np.int32),
        "y": weight[order],
        "customdata": typed_array(columns[order]),
        "hovertemplate": HOVER,
        "marker": bar_marker(status[order]),
        "name": "channels",
    }
    name = str(contributions.coords["target_name"].values) if "target_name" in contributions.coords else "the target"
    heading = title or f"Channel weights for “{name}” · {contributions.attrs.get('layer', '')}"
    visible = visible_bar_count(n_channels, width)
    xaxis: dict[str, Any] = {"showgrid": False, "zeroline": False}
    axis_title = f"channels ranked by {SORT_KEYS[sort_by]}"
    if window is None and visible < n_channels:
        focus = None
        if selected is not None and 0 <= selected < n_channels:
            focus = int(np.flatnonzero(order == selected)[0]) + 1
        window = bar_window(n_channels, visible, focus)
    if window is not None and window[1] - window[0] < n_channels:
        first, last = max(1, int(np.ceil(window[0]))), min(n_channels, int(np.floor(window[1])))
        xaxis.update(
            range=[float(window[0]), float(window[1])],
            rangeslider={"visible": True, "thickness": 0.14, "range": [0.5, n_channels + 0.5]},
        )
        axis_title += f": ranks {first}-{last} of {n_channels} shown; drag or stretch the strip below to see the others"
        height += 60
    else:
        xaxis["range"] = [0.5, n_channels + 0.5]
    xaxis["title"] = {"text": axis_title}
    layout = style.base_layout(width, height, heading, subtitle, **BAR_MARGINS)
    layout.update(
        bargap=0.0,
        xaxis=xaxis,
        yaxis={"title": {"text": "weight w_k"}, "zeroline": True},
        clickmode="event",
        # the whole column of a bar answers hover and click, so a bar of weight ~0 (the
        # tail: constant channels) is as easy to hit as a tall one
        hovermode="x",
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
    """One channel: its raw activation A_k, its mask H_k, and the masked input X∘H_k.

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
    labels = [f"channel {int(c)}" + (f" · {share_text(s)}" if np.isfinite(s) else "") for c, s in zip(channels, shares)]
    layout = style.grid(rows, columns, titles=labels, horizontal_spacing=0.03, vertical_spacing=0.14, title_size=11)
    extent = float(np.abs(tiles).max()) or 1.0
    traces = [
        picture_trace(colorize(tile, DIVERGING, -extent, extent), f"channel {int(channels[index])}", axis=index + 1, smooth=False)
        for index, tile in enumerate(tiles)
    ]
    traces.append(
        colorbar_trace(
            DIVERGING, -extent, extent, title="w_k·A_k", x=1.01, length=0.85, y=0.45,
            ticks=symmetric_ticks(extent), title_side="top",
        )
    )
    note = negative_share_note(channels, shares)
    bottom = 48 if note else 10  # two lines of note under the tiles
    heading = title or "Top channels' contributions w_k·A_k"
    layout = style.base_layout(
        width, height or 90 + rows * 200 + bottom - 10, heading, subtitle, top=80, right=70, bottom=bottom, grid=layout
    )
    if note:
        layout["annotations"].append(
            {
                "text": note, "xref": "paper", "yref": "paper", "x": 0.0, "y": 0.0, "yshift": -8,
                "xanchor": "left", "yanchor": "top", "showarrow": False, "align": "left",
                "font": {"size": 11, "color": "#6b6b6b"},
            }
        )
    return {"data": traces, "layout": layout}


def share_text(share: float) -> str:
    """A share of the map as a percentage with a true minus sign: '5.3%', '−2.7%'."""
    return f"{share:.1%}".replace("-", "−")


def negative_share_note(channels: np.ndarray, shares: np.ndarray) -> str:
    """What a negative share means, naming the channels shown with one ('' when none)."""
    negative = [(int(c), float(s)) for c, s in zip(channels, shares) if np.isfinite(s) and s < 0]
    if not negative:
        return ""
    named = ", ".join(f"channel {c}: {share_text(s)}" for c, s in negative[:3]) + (", …" if len(negative) > 3 else "")
    return (
        f"A negative share ({named}):<br>the channel's w_k·A_k is negative where the map is positive, "
        "so it takes away from the map."
    )


def gallery_figure(contributions: xr.DataArray, **options: Any) -> go.Figure:
    """:func:`gallery_spec` as a ``go.Figure``."""
    return go.Figure(gallery_spec(contributions, **options))
