"""The look shared by every figure: fonts, colours, margins and sizes for a notebook column."""

from __future__ import annotations

from typing import Any

COLUMN_WIDTH = 860
"""Width in pixels of a full-width figure: a notebook column, and on a wide page the
explorer's Channels column (beside the 450 px Map and Recompose column, both fit a
1400 px wide window)."""
HALF_WIDTH = 440
"""Width in pixels of a figure that shares a row with another."""

FONT = {"family": "Inter, Segoe UI, Helvetica, Arial, sans-serif", "size": 12, "color": "#262626"}

# Bar colours of the channel chart.
KEPT = "#1f77b4"  # in the current map
NOT_KEPT = "#aec7e8"  # beyond the top k
SWITCHED_OFF = "#c7c7c7"  # switched off by the user
SELECTED = "#ff7f0e"  # the channel being inspected
ACCENT = "#ff7f0e"


LEFT = 10
"""Left margin in pixels; titles start there."""


def base_layout(
    width: int,
    height: int,
    title: str,
    subtitle: str | None = None,
    *,
    top: int = 64,
    right: int = 70,
    left: int = LEFT,
    bottom: int = 10,
    grid: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Layout defaults: white template, fixed size (so hidden containers size correctly),
    a title line 8 px from the top and a smaller grey subtitle under it (ending 44 px from
    the top; ``top``, the top margin, leaves room for both and for cell titles).

    The subtitle is annotation 0 (empty and hidden when there is none), so a panel updating
    it changes one field; a ``grid`` (:func:`grid`) adds its axes and cell titles after it.
    Titles are placed in pixels rather than with Plotly's ``title.subtitle``, which the
    widget's plotly.js draws above the title.
    """
    # The subtitle ends 44 px below the top of the figure, whatever the plot's height: in
    # paper coordinates a point p px from the top is at y = 1 + (top - p) / plot height.
    subtitle_note = {
        "text": subtitle or "",
        "visible": bool(subtitle),
        "xref": "paper",
        "yref": "paper",
        "x": (LEFT - left) / max(1, width - left - right),  # under the title, whatever the margin
        "y": 1.0 + (top - 44) / max(1, height - top - bottom),
        "xanchor": "left",
        "yanchor": "bottom",
        "showarrow": False,
        "align": "left",
        "font": {"size": 11, "color": "#6b6b6b"},
    }
    layout: dict[str, Any] = dict(grid or {})
    layout.update(
        {
            "template": "plotly_white",
            "width": width,
            "height": height,
            "autosize": False,
            "font": FONT,
            "title": {
                "text": title,
                "x": LEFT / width,
                "xanchor": "left",
                "xref": "container",
                "y": 1.0 - 8.0 / height,
                "yanchor": "top",
                "yref": "container",
                "font": {"size": 14},
            },
            "margin": {"l": left, "r": right, "t": top, "b": bottom},
            "showlegend": False,
            "hoverlabel": {"font": {"size": 12}},
            "annotations": [subtitle_note, *(grid or {}).get("annotations", [])],
        }
    )
    return layout


def picture_axes(count: int = 1) -> dict[str, Any]:
    """Axes for pictures: no ticks or grid, square pixels, y pointing down."""
    axes: dict[str, Any] = {}
    for index in range(1, count + 1):
        suffix = "" if index == 1 else str(index)
        axes[f"xaxis{suffix}"] = {"visible": False, "constrain": "domain"}
        axes[f"yaxis{suffix}"] = {
            "visible": False,
            "scaleanchor": f"x{suffix}",
            "constrain": "domain",
            "autorange": "reversed",
        }
    return axes


def grid(
    rows: int,
    cols: int,
    *,
    titles: list[str] | None = None,
    horizontal_spacing: float = 0.06,
    vertical_spacing: float = 0.1,
    title_size: int = 12,
) -> dict[str, Any]:
    """Layout entries for a rows x cols grid of picture axes, with a title above each cell.

    Cell (r, c) (0-based, row 0 at the top) uses axes number ``r * cols + c + 1``. Built as
    plain dicts (no ``make_subplots``), so a panel can rebuild it cheaply on every change.
    """
    width = (1.0 - horizontal_spacing * (cols - 1)) / cols
    height = (1.0 - vertical_spacing * (rows - 1)) / rows
    layout: dict[str, Any] = {}
    annotations = []
    for index in range(rows * cols):
        row, col = divmod(index, cols)
        suffix = "" if index == 0 else str(index + 1)
        # Rounded and clipped: float error must not push a domain outside [0, 1].
        x0 = round(col * (width + horizontal_spacing), 6)
        y1 = round(1.0 - row * (height + vertical_spacing), 6)
        x_domain = [max(0.0, x0), min(1.0, round(x0 + width, 6))]
        y_domain = [max(0.0, round(y1 - height, 6)), min(1.0, y1)]
        layout[f"xaxis{suffix}"] = {"visible": False, "domain": x_domain, "anchor": f"y{suffix}", "constrain": "domain"}
        layout[f"yaxis{suffix}"] = {
            "visible": False,
            "domain": y_domain,
            "anchor": f"x{suffix}",
            "scaleanchor": f"x{suffix}",
            "constrain": "domain",
            "autorange": "reversed",
        }
        if titles is not None and index < len(titles):
            annotations.append(
                {
                    "text": titles[index],
                    "x": x0 + width / 2,
                    "y": y1,
                    "xref": "paper",
                    "yref": "paper",
                    "xanchor": "center",
                    "yanchor": "bottom",
                    "showarrow": False,
                    "font": {"size": title_size},
                }
            )
    layout["annotations"] = annotations
    return layout


def cell_domain(layout: dict[str, Any], index: int) -> list[float]:
    """The x domain of grid cell ``index`` (0-based) of a :func:`grid` layout."""
    return layout["xaxis" if index == 0 else f"xaxis{index + 1}"]["domain"]
