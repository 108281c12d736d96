r"""The channel atlas's figures: one channel across the pictures of a set.

* :func:`atlas_grid_spec`: the pictures where the channel weighs (or fires) most, each with
  the channel's mask H_k over it, captioned with the picture's id, the value and the class.
* :func:`class_profile_spec`: the channel's mean weight per class over the N pictures,
  (1/N) sum_i w_ikc, for the classes where it is highest.
* :func:`class_channels_spec`: for one class, the channels with the highest mean weight.

Inputs are the Datasets of :mod:`scorecam_explorer.atlas` (``channel_examples``,
``channel_profile``, ``class_channels``); every builder returns plain dicts, as the other
figures do, and has a ``*_figure`` twin returning a ``go.Figure``.
"""

from __future__ import annotations

import html
from collections.abc import Hashable, MutableMapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.figures import style
from scorecam_explorer.figures.encoding import colorize, picture_trace, values_in
from scorecam_explorer.kernels import rank_order

Spec = dict[str, Any]

COLUMNS = 3
"""Thumbnails per row of the grid."""
TILE = 132
"""A thumbnail's side in pixels."""
THUMBNAIL_PIXELS = 112
"""Pictures larger than twice this are shrunk by an integer factor (block mean) to about
this size before they are sent: a thumbnail is drawn at :data:`TILE` pixels."""
CAPTION = 34
"""Pixels above each thumbnail for its two-line caption."""
GAP = 8
"""Pixels between two thumbnails of a row."""
HIT_POINTS = 8
"""Invisible points per side of a thumbnail that answer hover and click (every place on the
thumbnail lies within a few pixels of one)."""
PROFILE_CLASSES = 15
"""Classes shown in the profile chart."""
CHART_WIDTH = (style.COLUMN_WIDTH - 12) // 2
"""Width of the profile and class-channels charts (two side by side in a full-width column)."""


def shrink_factor(size: int, target: int = THUMBNAIL_PIXELS) -> int:
    """The integer factor a picture of ``size`` pixels is shrunk by: size // target, at least 1."""
    return max(1, int(size) // int(target))


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks of the first two axes (a trailing partial block is
    dropped); ``values`` itself for factor 1."""
    if factor <= 1:
        return values
    height, width = (values.shape[0] // factor) * factor, (values.shape[1] // factor) * factor
    blocks = values[:height, :width].reshape(height // factor, factor, width // factor, factor, *values.shape[2:])
    return blocks.mean(axis=(1, 3))


def thumbnail(picture: xr.DataArray | np.ndarray, mask: xr.DataArray | np.ndarray, *, colormap: str) -> tuple[np.ndarray, np.ndarray]:
    """The picture (uint8 y, x, rgb) and the coloured mask (uint8 y, x, rgb), both shrunk by
    :func:`shrink_factor`; the mask's colour is entry round(255 v) of the colour map's table
    for the block mean v of H_k."""
    pixels = values_in(picture, ("y", "x", "rgb"))
    values = values_in(mask, ("y", "x")).astype(np.float64)
    if pixels.shape[:2] != values.shape:
        raise ScorecamError(f"the mask is {values.shape} but the picture is {pixels.shape[:2]}.")
    factor = shrink_factor(max(values.shape))
    small = np.rint(block_mean(pixels.astype(np.float64), factor)).astype(np.uint8) if factor > 1 else pixels
    return small, colorize(block_mean(values, factor), colormap)


def value_text(value: float, by: str) -> str:
    """'w = 0.0312' (a weight) or 'peak A = 4.1' (an activation), with a true minus sign."""
    text = f"{value:.3g}".replace("-", "−")
    return f"w = {text}" if by == "weight" else f"peak A = {text}"


CAPTION_LENGTH = 18
"""Characters of a picture's id or class name a thumbnail's caption shows (longer ones are cut)."""


def short(text: str, length: int = 22) -> str:
    """``text`` cut to ``length`` characters (an ellipsis says so)."""
    return text if len(text) <= length else text[: length - 1] + "…"


def grid_geometry(count: int, columns: int = COLUMNS) -> dict[str, Any]:
    """Pixel sizes of a grid of ``count`` thumbnails: width, height, margins and spacings."""
    rows = max(1, -(-count // columns))
    left = right = 6
    top, bottom = 64 + CAPTION, 6
    plot_width = columns * TILE + (columns - 1) * GAP
    plot_height = rows * TILE + (rows - 1) * (CAPTION + GAP)
    return {
        "rows": rows,
        "width": left + plot_width + right,
        "height": top + plot_height + bottom,
        "margins": {"left": left, "right": right, "top": top, "bottom": bottom},
        "horizontal_spacing": GAP / plot_width,
        "vertical_spacing": (CAPTION + GAP) / plot_height if rows > 1 else 0.0,
    }


def hit_trace(shape: tuple[int, int], text: str, axis: int) -> dict[str, Any]:
    """Invisible markers on a HIT_POINTS x HIT_POINTS lattice over a thumbnail: hovering
    shows ``text``, clicking anywhere on the thumbnail reports this trace."""
    height, width = shape
    fractions = (np.arange(HIT_POINTS) + 0.5) / HIT_POINTS
    xs, ys = np.meshgrid(fractions * width - 0.5, fractions * height - 0.5)
    suffix = "" if axis == 1 else str(axis)
    return {
        "type": "scatter",
        "x": np.round(xs.ravel(), 3).tolist(),
        "y": np.round(ys.ravel(), 3).tolist(),
        "mode": "markers",
        "marker": {"size": 10, "color": "rgba(0,0,0,0)"},
        # The text itself, not %{text}: a single text for every point is not found by the
        # hover template (plotly.js warns and shows "-").
        "hovertemplate": text + "<extra></extra>",
        "name": "thumbnail",
        "showlegend": False,
        "xaxis": f"x{suffix}",
        "yaxis": f"y{suffix}",
    }


def atlas_grid_spec(
    examples: xr.Dataset,
    pictures: list[Any],
    *,
    colormap: str = "jet",
    opacity: float = 0.5,
    current_image: int | None = None,
    title: str | None = None,
    subtitle: str | None = None,
    columns: int = COLUMNS,
    thumbnails: MutableMapping[Hashable, tuple[dict[str, Any], dict[str, Any], tuple[int, int]]] | None = None,
    keys: Sequence[Hashable] | None = None,
) -> Spec:
    """The channel's top pictures in rank order, :data:`COLUMNS` to a row, each with the
    channel's mask over it.

    ``thumbnails`` (with ``keys``, one per rank, naming what picture and mask rank r shows):
    the picture and mask traces (PNG-encoded thumbnails) already made, reused by key and colour
    map, and filled in for the others (the caller keeps it while the keys mean the same pictures and masks).

    ``examples`` is ``atlas.channel_examples(...)`` (dim rank: image, image_index, value,
    target_name, mask (rank, y, x)); ``pictures[r]`` is the picture (uint8 y, x, rgb) of rank
    r. Caption of rank r: its image id (bold when it is ``current_image``, the picture the
    explorer shows) and class, then its value (:func:`value_text`). Traces, three per rank r:
    3r the picture, 3r + 1 the coloured mask (``opacity``), 3r + 2 the invisible hit lattice
    (:func:`hit_trace`): a click there reports trace 3r + 2.
    """
    count = int(examples.sizes.get("rank", 0))
    if count == 0:
        raise ScorecamError("the atlas has no picture to show: the set holds no complete image.")
    if len(pictures) != count:
        raise ScorecamError(f"{len(pictures)} pictures for {count} ranks.")
    by = str(examples.attrs.get("by", "weight"))
    geometry = grid_geometry(count, columns)
    captions = []
    for rank in range(count):
        image_id = html.escape(short(str(examples["image"].values[rank]), CAPTION_LENGTH))
        if current_image is not None and int(examples["image_index"].values[rank]) == int(current_image):
            image_id = f"<b>▶ {image_id}</b>"
        name = html.escape(short(str(examples["target_name"].values[rank]), CAPTION_LENGTH))
        captions.append(f"{image_id}<br>{value_text(float(examples['value'].values[rank]), by)} · {name}")
    layout = style.grid(
        geometry["rows"], columns, titles=captions, horizontal_spacing=geometry["horizontal_spacing"],
        vertical_spacing=geometry["vertical_spacing"], title_size=11,
    )
    masks = examples["mask"].transpose("rank", "y", "x")
    traces: list[dict[str, Any]] = []
    for rank in range(count):
        axis = rank + 1
        key = None if thumbnails is None or keys is None else (keys[rank], colormap)
        if key is not None and key in thumbnails:
            photo_trace, mask_trace, size = thumbnails[key]
        else:
            photo, coloured = thumbnail(pictures[rank], masks.values[rank], colormap=colormap)
            photo_trace, mask_trace, size = picture_trace(photo, "photo"), picture_trace(coloured, "mask"), photo.shape[:2]
            if key is not None:
                thumbnails[key] = (photo_trace, mask_trace, size)
        on_axes = {"xaxis": f"x{'' if axis == 1 else axis}", "yaxis": f"y{'' if axis == 1 else axis}"}
        hover = (
            f"{html.escape(str(examples['image'].values[rank]))}<br>"
            f"{html.escape(str(examples['target_name'].values[rank]))}<br>"
            f"{value_text(float(examples['value'].values[rank]), by)}<br>click to open this picture"
        )
        traces.append({**photo_trace, **on_axes})
        traces.append({**mask_trace, **on_axes, "opacity": float(opacity)})
        traces.append(hit_trace(size, hover, axis))
        suffix = "" if axis == 1 else str(axis)
        height, width = size
        layout[f"xaxis{suffix}"] = {**layout[f"xaxis{suffix}"], "range": [-0.5, width - 0.5], "autorange": False}
        layout[f"yaxis{suffix}"] = {**layout[f"yaxis{suffix}"], "range": [height - 0.5, -0.5], "autorange": False}
    margins = geometry["margins"]
    heading = title or f"Channel {examples.attrs.get('channel', '?')}: its top pictures"
    layout = style.base_layout(
        geometry["width"], geometry["height"], heading, subtitle, top=margins["top"], right=margins["right"],
        left=margins["left"], bottom=margins["bottom"], grid=layout,
    )
    layout["hovermode"] = "closest"
    layout["clickmode"] = "event"
    return {"data": traces, "layout": layout}


def atlas_grid_figure(examples: xr.Dataset, pictures: list[Any], **options: Any) -> go.Figure:
    """:func:`atlas_grid_spec` as a ``go.Figure``."""
    return go.Figure(atlas_grid_spec(examples, pictures, **options))


def profile_classes(profile: xr.Dataset, count: int = PROFILE_CLASSES) -> np.ndarray:
    """The class indices of the ``count`` highest mean weights, highest first (ties: lower index)."""
    means = np.asarray(profile["weight_mean"].values, dtype=np.float64)
    return rank_order(means)[: min(int(count), means.size)]


def class_profile_spec(
    profile: xr.Dataset,
    *,
    current_class: int | None = None,
    count: int = PROFILE_CLASSES,
    title: str | None = None,
    subtitle: str | None = None,
    width: int = CHART_WIDTH,
) -> Spec:
    """The channel's mean weight per class, (1/N) sum_i w_ikc, for the ``count`` classes where
    it is highest, highest at the top; ``current_class`` drawn orange.

    ``profile`` is ``atlas.channel_profile(...)`` (dim class: weight_mean, coordinate
    class_name). One horizontal bar trace; bar j is class ``profile_classes(profile)[j]``.
    """
    chosen = profile_classes(profile, count)
    if chosen.size == 0:
        raise ScorecamError("the profile holds no class.")
    means = np.asarray(profile["weight_mean"].values, dtype=np.float64)[chosen]
    names = [str(profile["class_name"].values[c]) for c in chosen]
    labels = [short(name, 24) for name in names]
    colours = [style.SELECTED if current_class is not None and int(c) == int(current_class) else style.KEPT for c in chosen]
    bars = {
        "type": "bar",
        "orientation": "h",
        "x": means,
        "y": list(range(len(chosen))),
        "customdata": names,
        "hovertemplate": "%{customdata}<br>mean weight %{x:.4g}<extra></extra>",
        "marker": {"color": colours},
        "name": "classes",
    }
    height = 100 + 20 * len(chosen)
    heading = title or f"Channel {profile.attrs.get('channel', '?')}: mean weight per class"
    layout = style.base_layout(width, height, heading, subtitle, top=64, right=16, left=170, bottom=36)
    layout.update(
        xaxis={"title": {"text": "mean weight over the pictures"}, "zeroline": True},
        yaxis={"tickmode": "array", "tickvals": list(range(len(chosen))), "ticktext": labels, "autorange": "reversed"},
        bargap=0.25,
        hovermode="closest",
    )
    return {"data": [bars], "layout": layout}


def class_profile_figure(profile: xr.Dataset, **options: Any) -> go.Figure:
    """:func:`class_profile_spec` as a ``go.Figure``."""
    return go.Figure(class_profile_spec(profile, **options))


def class_channels_spec(
    table: xr.Dataset,
    *,
    selected: int | None = None,
    title: str | None = None,
    subtitle: str | None = None,
    width: int = CHART_WIDTH,
    height: int = 300,
) -> Spec:
    """The channels with the highest mean weight for one class, in rank order; the
    ``selected`` channel orange. ``table`` is ``atlas.class_channels(...)`` (dim rank:
    channel, weight_mean). Bar r (x = r) is channel ``table.channel[r]``; a click on it
    reports point r.
    """
    channels = np.asarray(table["channel"].values, dtype=np.int64)
    if channels.size == 0:
        raise ScorecamError("no channel to show.")
    means = np.asarray(table["weight_mean"].values, dtype=np.float64)
    colours = [style.SELECTED if selected is not None and int(c) == int(selected) else style.KEPT for c in channels]
    bars = {
        "type": "bar",
        "x": list(range(channels.size)),
        "y": means,
        "customdata": channels.astype(np.int32).tolist(),
        "hovertemplate": "channel %{customdata}<br>mean weight %{y:.4g}<br>click to select it<extra></extra>",
        "marker": {"color": colours},
        "name": "channels",
    }
    layout = style.base_layout(width, height, title or "Channels that matter for this class", subtitle,
                               top=64, right=16, left=60, bottom=40)
    layout.update(
        xaxis={"tickmode": "array", "tickvals": list(range(channels.size)), "ticktext": [str(int(c)) for c in channels],
               "title": {"text": "channel"}},
        yaxis={"title": {"text": "mean weight"}, "zeroline": True},
        bargap=0.2,
        clickmode="event",
        hovermode="x",
    )
    return {"data": [bars], "layout": layout}


def class_channels_figure(table: xr.Dataset, **options: Any) -> go.Figure:
    """:func:`class_channels_spec` as a ``go.Figure``."""
    return go.Figure(class_channels_spec(table, **options))
