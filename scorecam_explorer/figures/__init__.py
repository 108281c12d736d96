"""Plotly figure builders for Score-CAM maps and channels: DataArrays in, figures out.

No widgets here. Every figure has two builders: ``*_spec`` returns it as plain dicts
(``{"data": [...], "layout": {...}}``), cheap enough to rebuild on every interaction and to
compare with what is shown; ``*_figure`` returns a ``go.Figure`` for ``fig.show()``, static
HTML or a ``FigureWidget``. Maps are drawn as PNG pictures (see :mod:`.encoding`).
"""

from scorecam_explorer.figures.channels import (
    CUSTOMDATA,
    SORT_KEYS,
    channel_bar_figure,
    channel_bar_spec,
    channel_detail_figure,
    channel_detail_spec,
    channel_order,
    gallery_figure,
    gallery_spec,
)
from scorecam_explorer.figures.curves import causal_curves_figure, causal_curves_spec
from scorecam_explorer.figures.encoding import colorize, decode_image_uri, image_uri
from scorecam_explorer.figures.fidelity import fidelity_figure, fidelity_spec
from scorecam_explorer.figures.map import compare_figure, compare_spec, default_map_title, map_figure, map_spec

__all__ = [
    "CUSTOMDATA",
    "SORT_KEYS",
    "causal_curves_figure",
    "causal_curves_spec",
    "channel_bar_figure",
    "channel_bar_spec",
    "channel_detail_figure",
    "channel_detail_spec",
    "channel_order",
    "colorize",
    "compare_figure",
    "compare_spec",
    "decode_image_uri",
    "default_map_title",
    "fidelity_figure",
    "fidelity_spec",
    "gallery_figure",
    "gallery_spec",
    "image_uri",
    "map_figure",
    "map_spec",
]
