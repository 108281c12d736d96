"""The Score-CAM map over its photo, and two maps compared side by side.

Each figure has a ``*_spec`` builder returning the figure as plain dicts (cheap to rebuild
and compare on every interaction) and a ``*_figure`` wrapper returning a ``go.Figure``.
"""

from __future__ import annotations

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

Spec = dict[str, Any]


def picture_pixels(picture: xr.DataArray | np.ndarray) -> np.ndarray:
    """uint8 (y, x, rgb) pixels of a picture DataArray."""
    values = values_in(picture, ("y", "x", "rgb"))
    if values.dtype != np.uint8 or values.ndim != 3:
        raise ScorecamError(f"a picture is uint8 (y, x, rgb), got {values.dtype} {values.shape}.")
    return values


def map_values(saliency: xr.DataArray | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The (y, x) values of a map at the picture's size (ScorecamError otherwise)."""
    values = values_in(saliency, ("y", "x"))
    if values.shape != tuple(shape):
        raise ScorecamError(
            f"the map is {'x'.join(map(str, values.shape))} but the picture is {shape[0]}x{shape[1]}: "
            "compose the map at input resolution."
        )
    return values


def default_map_title(saliency: xr.DataArray) -> str:
    """'Score-CAM for “<class>” · <layer> · <preset>' from the map's coordinates and attrs."""
    name = str(saliency.coords["target_name"].values) if "target_name" in saliency.coords else "the target"
    return f"Score-CAM for “{name}” · {saliency.attrs.get('layer', '?')} · {saliency.attrs.get('preset', '?')}"


def overlay_traces(
    picture: xr.DataArray, saliency: xr.DataArray, *, opacity: float, colormap: str, axis: int = 1
) -> list[dict[str, Any]]:
    """The photo and the coloured map above it; the browser blends them with ``opacity``.

    Map pixel colour: entry round(255 v) of the colour map's table for map value v.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ScorecamError(f"opacity must lie in [0, 1], not {opacity}.")
    pixels = picture_pixels(picture)
    values = map_values(saliency, pixels.shape[:2])
    return [
        picture_trace(pixels, "photo", axis=axis),
        picture_trace(colorize(values, colormap), "map", opacity=opacity, axis=axis),
    ]


HOVER_CELLS = 56
"""The hover layer samples a map on a grid of at most this many cells a side."""

_TRANSPARENT = ((0.0, "rgba(0,0,0,0)"), (1.0, "rgba(0,0,0,0)"))


def hover_grid(shape: tuple[int, int], cells: int = HOVER_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """The pixel rows and columns the hover layer samples: the centre pixel of each
    step x step block, step = ceil(max(height, width) / cells) (every pixel for small maps)."""
    step = max(1, -(-max(shape) // cells))
    return np.arange(step // 2, shape[0], step), np.arange(step // 2, shape[1], step)


def hover_trace(values: np.ndarray, *, name: str = "map value", axis: int = 1) -> dict[str, Any]:
    """An invisible heatmap over a picture that shows the map's value where the mouse is.

    The map itself is drawn as a PNG, which plotly.js cannot read values from; this layer
    holds ``values[rows][:, cols]`` for the pixels of :func:`hover_grid` (float32, one typed
    array: at most 56 x 56 numbers), each cell centred on its pixel, and draws nothing.
    """
    rows, cols = hover_grid(values.shape)
    suffix = "" if axis == 1 else str(axis)
    return {
        "type": "heatmap",
        "x": cols.astype(np.int32),
        "y": rows.astype(np.int32),
        "z": typed_array(np.asarray(values, dtype=np.float32)[np.ix_(rows, cols)]),
        "zsmooth": False,
        "colorscale": _TRANSPARENT,
        "showscale": False,
        "name": name,
        "hovertemplate": "x %{x}, y %{y}<br>map %{z:.3f}<extra></extra>",
        "xaxis": f"x{suffix}",
        "yaxis": f"y{suffix}",
    }


def map_spec(
    picture: xr.DataArray,
    saliency: xr.DataArray,
    *,
    opacity: float = 0.5,
    colormap: str = "jet",
    title: str | None = None,
    subtitle: str | None = None,
    width: int = style.HALF_WIDTH,
    height: int = 470,
) -> Spec:
    """The map (values in [0, 1], dims y, x) coloured over the photo (uint8 y, x, rgb).

    Traces: 0 the photo, 1 the coloured map (its opacity is ``opacity``), 2 the colour bar,
    3 the invisible hover layer (:func:`hover_trace`: the map's value under the mouse).
    """
    traces = overlay_traces(picture, saliency, opacity=opacity, colormap=colormap)
    traces.append(colorbar_trace(colormap, 0.0, 1.0, title="Score-CAM"))
    values = map_values(saliency, picture_pixels(picture).shape[:2])
    traces.append(hover_trace(values))
    heading = title if title is not None else default_map_title(saliency)
    layout = {**style.base_layout(width, height, heading, subtitle, top=70), **style.picture_axes()}
    # The picture's own extent: the hover layer's outer cells must not widen the axes.
    height_px, width_px = values.shape
    layout["xaxis"] = {**layout["xaxis"], "range": [-0.5, width_px - 0.5], "autorange": False}
    layout["yaxis"] = {**layout["yaxis"], "range": [height_px - 0.5, -0.5], "autorange": False}
    layout["hovermode"] = "closest"
    return {"data": traces, "layout": layout}


def map_figure(picture: xr.DataArray, saliency: xr.DataArray, **options: Any) -> go.Figure:
    """:func:`map_spec` as a ``go.Figure``."""
    return go.Figure(map_spec(picture, saliency, **options))


def compare_spec(
    picture: xr.DataArray,
    first: xr.DataArray,
    second: xr.DataArray,
    *,
    first_label: str,
    second_label: str,
    opacity: float = 0.5,
    colormap: str = "jet",
    correlation: float | None = None,
    width: int = style.COLUMN_WIDTH,
    height: int = 360,
) -> Spec:
    """Two maps over the photo and their difference A - B (red: A higher, blue: B higher).

    Traces: 0-1 photo and map A, 2-3 photo and map B, 4 the difference on [-1, 1], 5-6 the
    colour bars of the maps and of the difference.
    """
    pixels = picture_pixels(picture)
    a = map_values(first, pixels.shape[:2]).astype(np.float64)
    b = map_values(second, pixels.shape[:2]).astype(np.float64)
    layout = style.grid(1, 3, titles=[f"A: {first_label}", f"B: {second_label}", "A − B"], horizontal_spacing=0.09)
    traces = overlay_traces(picture, a, opacity=opacity, colormap=colormap, axis=1)
    traces += overlay_traces(picture, b, opacity=opacity, colormap=colormap, axis=2)
    traces.append(picture_trace(colorize(a - b, DIVERGING, -1.0, 1.0), "difference", axis=3))
    # Titles above the bars: beside the bar, "map" would sit on the edge of the A − B picture.
    traces.append(
        colorbar_trace(colormap, 0.0, 1.0, title="map", x=style.cell_domain(layout, 1)[1] + 0.005, length=0.8, y=0.45,
                       title_side="top")
    )
    traces.append(colorbar_trace(DIVERGING, -1.0, 1.0, title="A − B", x=1.0, length=0.8, y=0.45, title_side="top"))
    if correlation is None:
        heading = "Compare"
    elif np.isfinite(correlation):
        heading = f"Compare · Pearson r(A, B) = {correlation:.3f}"
    else:  # r of a constant map is undefined
        heading = "Compare · Pearson r(A, B) undefined (a constant map)"
    layout = style.base_layout(width, height, heading, top=70, right=60, grid=layout)
    return {"data": traces, "layout": layout}


def compare_figure(picture: xr.DataArray, first: xr.DataArray, second: xr.DataArray, **options: Any) -> go.Figure:
    """:func:`compare_spec` as a ``go.Figure``."""
    return go.Figure(compare_spec(picture, first, second, **options))
