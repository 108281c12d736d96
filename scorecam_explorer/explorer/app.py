"""The :class:`Explorer`: every panel over one cache, laid out for a notebook column or a wide page.

::

    from scorecam_explorer import Explorer, load_model
    Explorer.from_model(load_model(), "sample:chelsea", layers=["blocks.15", "head"])
    Explorer.from_cache_file("chelsea.zarr")          # no torch needed

Interacting reads only the cache (no forward pass, no torch). A model, when attached, is
used for three things only: computing a layer that is not cached, Grad-CAM / Grad-CAM++ in
Compare, and deletion / insertion of the map shown in Metrics (on a button press).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import xarray as xr

from scorecam_explorer.explorer.atlas_panel import AtlasPanel
from scorecam_explorer.explorer.channels_panel import ChannelsPanel
from scorecam_explorer.explorer.compare_panel import ComparePanel
from scorecam_explorer.explorer.controls import Controls
from scorecam_explorer.explorer.map_panel import MapPanel
from scorecam_explorer.explorer.metrics_panel import MetricsPanel
from scorecam_explorer.explorer.model_link import ModelLink, ModelSource
from scorecam_explorer.explorer.plotly_loader import PlotlyBundle
from scorecam_explorer.explorer.recomposer_panel import RecomposerPanel
from scorecam_explorer.explorer.state import ExplorerState
from scorecam_explorer.figures.style import COLUMN_WIDTH

PANEL_WIDTH = 450
"""Width in pixels of the Map and of the Recompose panel (a half-width figure and its controls)."""
GAP = 12
"""Pixels between two columns."""
NARROW_WIDTH = 2 * PANEL_WIDTH + GAP
"""One column, as in a notebook: Map and Recompose side by side, everything else under them."""
WIDE_WIDTH = PANEL_WIDTH + GAP + COLUMN_WIDTH + 4 + 8 + 8
"""The widest the explorer grows (padding and a little slack included): the Map and Recompose
column beside the Channels column."""
MAX_WIDTH = f"{WIDE_WIDTH}px"
"""The explorer fills its column up to this width. From about WIDE_WIDTH pixels on (a wide
page, Voila) the Channels panel sits beside the Map and Recompose column; in a narrower one
(a notebook) everything is one column: Map and Recompose side by side up to NARROW_WIDTH, then
stacked, and the full-width figures scroll sideways."""


def _heading(text: str, help_text: str = "") -> widgets.HTML:
    helper = f"<span style='font-weight:normal;color:#666;font-size:12px'> — {html.escape(help_text)}</span>" if help_text else ""
    return widgets.HTML(
        f"<div style='font-size:15px;font-weight:600;margin:14px 0 4px 0;border-bottom:1px solid #ddd;"
        f"padding-bottom:3px'>{html.escape(text)}{helper}</div>"
    )


def _section(title: str, help_text: str, body: widgets.Widget, width: int) -> widgets.VBox:
    """A heading over a panel, ``width`` pixels wide at most (less in a narrower column)."""
    return widgets.VBox(
        [_heading(title, help_text), body], layout=widgets.Layout(width=f"{width}px", max_width="100%", flex="0 1 auto")
    )


def _wrapping(**options: str) -> widgets.Layout:
    """A row whose items move to the next line when the column is too narrow for them, with
    :data:`GAP` pixels between two items on one line (none at the ends of a line)."""
    return widgets.Layout(flex_flow="row wrap", align_items="flex-start", grid_gap=f"0 {GAP}px", **options)


def pictures_text(image_ids: Sequence[str], shown: int = 3) -> str:
    """The cached pictures in a few words: their ids up to ``shown`` of them, else the first
    ``shown`` and how many more (a store of a thousand pictures must not fill the page)."""
    ids = list(image_ids)
    if len(ids) <= shown:
        return ", ".join(ids)
    return f"{len(ids)} pictures ({', '.join(ids[:shown])}, ...)"


def masks_text(convention: str) -> str:
    """The cache's mask convention in words: the preset below reweighs those masks, it does
    not rebuild them."""
    return f"masks built with the “{convention}” convention when the cache was computed"


class Explorer:
    """Score-CAM, channel by channel, live: map, layer scrubber, channel inspector,
    recomposer, compare and metrics panels over a cache, and, for a cache of several
    pictures, the atlas (a channel across the pictures).

    Args:
        cache: a cache from ``compute_cache`` or ``load_cache`` (``docs/cache.md``).
        model: optional; a LoadedModel, an ``nn.Module``, or a function returning a
            LoadedModel (loaded on first use). Enables computing layers that are not cached
            Grad-CAM / Grad-CAM++ in Compare, and the Metrics panel's deletion / insertion.
            Its weights must be the cache's.
        layer: the layer to show first (default: the deepest cached layer).
        target: class index or name to show first (default: the top-1 class).
        preset: ``paper``, ``official``, ``pytorch-grad-cam`` or ``torchcam``.
        image: index of the picture to show first.
        others: caches of the same pictures computed with other members of the Score-CAM
            family (``compute_cache(..., family="ss-cam")``): Compare then puts, say,
            Score-CAM and SS-CAM side by side.

    An unknown ``layer`` or ``target`` does not raise: the explorer opens on the default
    and says why. Display it by leaving it as the last expression of a cell.
    """

    def __init__(
        self,
        cache: xr.DataTree,
        *,
        model: ModelSource = None,
        layer: str | None = None,
        target: int | str | None = None,
        preset: str = "paper",
        image: int = 0,
        others: Sequence[xr.DataTree] = (),
    ) -> None:
        # First, so that plotly.js starts loading in the browser before any figure needs it.
        self.plotly = PlotlyBundle()
        self.state = ExplorerState(cache, layer=layer, target=target, preset=preset, image=image, others=others)
        self.model = ModelLink(model, cache.attrs.get("weights_fingerprint"))
        self.state.warm_up()
        self.controls = Controls(self.state, self.model)
        self.map = MapPanel(self.state)
        self.recomposer = RecomposerPanel(self.state)
        self.channels = ChannelsPanel(self.state)
        self.compare = ComparePanel(self.state, self.model)
        self.metrics = MetricsPanel(self.state, self.model)
        self.atlas = AtlasPanel(self.state)
        self.widget = self._layout()

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_cache_file(cls, path: str | os.PathLike[str], **options: Any) -> Explorer:
        """Open a cache saved with ``save_cache`` (no torch needed) and explore it."""
        from scorecam_explorer.cache import load_cache

        return cls(load_cache(path), **options)

    @classmethod
    def from_model(
        cls,
        model: Any,
        image: Any,
        layers: str | Sequence[str] | None = None,
        *,
        convention: str = "paper",
        progress: bool = True,
        batch_size: int | None = None,
        precision: str = "float32",
        **options: Any,
    ) -> Explorer:
        """Compute the cache for ``image`` (a path, ``"sample:NAME"``, PIL image or array, or
        a list of them) at ``layers`` (default: the model's default layer), with a progress
        bar, and explore it with the model attached.

        ``model``: a LoadedModel, an ``nn.Module``, or a model name for ``load_model``.
        ``options`` go to :class:`Explorer` (layer, target, preset, image).
        """
        from scorecam_explorer.engine import compute_cache
        from scorecam_explorer.models import as_loaded_model, load_model

        loaded = load_model(model) if isinstance(model, str) else as_loaded_model(model, image)
        cache = compute_cache(
            loaded, image, layers, convention=convention, progress=progress, batch_size=batch_size, precision=precision
        )
        return cls(cache, model=loaded, **options)

    # ---- layout -------------------------------------------------------------------------

    def _layout(self) -> widgets.VBox:
        """Title and controls, then two columns that wrap: Map and Recompose | Channels; then
        the Atlas (several pictures only); then Compare and Metrics. Wrapping is the browser's (CSS flex-wrap), so the same widgets
        fit a narrow notebook column and a wide page."""
        cache = self.state.cache
        title = widgets.HTML(
            "<div style='font-size:19px;font-weight:600'>Score-CAM explorer</div>"
            f"<div style='font-size:12px;color:#666;line-height:1.5'>{html.escape(str(cache.attrs.get('model_name', 'model')))} · "
            f"{html.escape(pictures_text(self.state.image_ids))} · "
            f"{html.escape(self.state.family)} · "
            f"{html.escape(masks_text(self._convention_name()))} · every map below is recomposed from the cache, "
            "with no forward pass</div>"
        )
        maps = widgets.HBox(
            [
                _section("Map", "the map over the photo", self.map.widget, PANEL_WIDTH),
                _section("Recompose", "keep the k heaviest channels", self.recomposer.widget, PANEL_WIDTH),
            ],
            # Grows from one panel's width: beside the Channels column on a wide page (the two
            # panels then stack), alone on its row in a notebook (side by side up to NARROW_WIDTH).
            layout=_wrapping(flex=f"1 1 {PANEL_WIDTH}px", max_width=f"{NARROW_WIDTH}px"),
        )
        self.columns = widgets.HBox(
            [maps, _section("Channels", "every channel's weight; click one to inspect it", self.channels.widget, COLUMN_WIDTH + 4)],
            layout=_wrapping(width="100%"),
        )
        rows: list[widgets.Widget] = [self.plotly, title, self.controls.widget, self.columns]
        if self.atlas.active:
            # Its grid sits under the Map column and its charts under the Channels column on a
            # wide page; in a notebook column they stack.
            rows.append(
                _section(
                    "Atlas",
                    f"the selected channel across the {self.state.image_count} pictures; click a thumbnail to open it",
                    self.atlas.widget,
                    WIDE_WIDTH,
                )
            )
        below = widgets.HBox(
            [
                _section("Compare", "two maps and their difference", self.compare.widget, COLUMN_WIDTH + 4),
                _section("Metrics", "deletion and insertion of the map shown; needs the model", self.metrics.widget,
                         NARROW_WIDTH),
            ],
            layout=_wrapping(width="100%"),
        )
        return widgets.VBox(
            [*rows, below],
            layout=widgets.Layout(width="100%", max_width=MAX_WIDTH, padding="4px"),
        )

    def _convention_name(self) -> str:
        import json

        try:
            return str(json.loads(self.state.cache.attrs.get("mask_convention", "{}")).get("name", "?"))
        except ValueError:
            return "?"

    # ---- use ----------------------------------------------------------------------------

    @property
    def cache(self) -> xr.DataTree:
        """The cache being explored (with any layers computed from the panel)."""
        return self.state.cache

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> os.PathLike[str]:
        """Save the cache (with any layers computed here) as a Zarr store, atomically."""
        from scorecam_explorer.cache import save_cache

        return save_cache(self.state.cache, path, overwrite=overwrite)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def __repr__(self) -> str:
        s = self.state.selection
        return (
            f"<Explorer {self.state.cache.attrs.get('model_name', '')}: layer {s.layer!r}, "
            f"class {self.state.class_names[s.target]!r}, preset {s.preset!r}>"
        )
