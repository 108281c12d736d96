"""Panel 1, the map: the Score-CAM map over the photo, with opacity and colour scale."""

from __future__ import annotations

import dataclasses

import ipywidgets as widgets

from scorecam_explorer.colormaps import COLORMAPS
from scorecam_explorer.conventions import MASK_CONVENTIONS, MaskConvention
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer.panel import LiveFigure, Panel, message_html
from scorecam_explorer.explorer.state import ExplorerState, Selection
from scorecam_explorer.figures import map_spec
from scorecam_explorer.figures.map import default_map_title
from scorecam_explorer.presets import PRESETS


def map_subtitle(state: ExplorerState, selection: Selection) -> str:
    """'p = 38.2% · top 37 of 1280 channels · 3 switched off'."""
    probability = state.probability(selection.target, selection.image)
    total = state.channel_count(selection.layer)
    used = int(state.kept(selection).sum())
    parts = [f"p = {probability:.1%}", "all channels" if used == total else f"{used} of {total} channels"]
    if selection.switched_off:
        parts.append(f"{len(selection.switched_off)} switched off")
    return " · ".join(parts)


class MapPanel(Panel):
    """The current map (the channels switched on, top k) over the photo."""

    fields = frozenset({"image", "layer", "target", "preset", "top_k", "switched_off", "colormap", "opacity"})

    def __init__(self, state: ExplorerState) -> None:
        super().__init__(state)
        selection = state.selection
        self.figure = LiveFigure(self._spec(selection))
        self.opacity = widgets.FloatSlider(
            description="Opacity", min=0.0, max=1.0, step=0.05, value=selection.opacity, readout_format=".2f",
            continuous_update=True, layout=widgets.Layout(width="250px"),
        )
        self.colormap = widgets.Dropdown(
            description="Colours", options=list(COLORMAPS), value=selection.colormap, layout=widgets.Layout(width="170px")
        )
        self.note = widgets.HTML()
        self.opacity.observe(lambda change: self.apply(opacity=float(change["new"])), names="value")
        self.colormap.observe(lambda change: self.apply(colormap=change["new"]), names="value")
        self._widget = widgets.VBox(
            [self.figure.widget, widgets.HBox([self.opacity, self.colormap]), self.note, self.message],
            layout=widgets.Layout(width="450px"),
        )
        self._update_note(selection)

    @property
    def widget(self) -> widgets.Widget:
        return self._widget

    def _spec(self, selection: Selection) -> dict:
        saliency = self.state.current_map(selection)
        return map_spec(
            self.state.picture(selection),
            saliency,
            opacity=selection.opacity,
            colormap=selection.colormap,
            title=default_map_title(saliency),
            subtitle=map_subtitle(self.state, selection),
        )

    def _refresh(self, changed: frozenset[str]) -> None:
        selection = self.state.selection
        with self.syncing():
            self.opacity.value = selection.opacity
            self.colormap.value = selection.colormap
        # The browser blends photo and map: moving the opacity slider sends one number.
        self.figure.show(self._spec(selection))
        self._update_note(selection)

    def _update_note(self, selection: Selection) -> None:
        """Say so when the preset's library would have built other masks than the cache's."""
        preset = PRESETS[selection.preset]
        try:
            recorded = MaskConvention.from_json(str(self.state.cache.attrs.get("mask_convention", "")))
        except ScorecamError:
            self.note.value = ""
            return
        wanted = MASK_CONVENTIONS.get(preset.mask_convention)
        same = wanted is not None and dataclasses.replace(wanted, name=recorded.name) == recorded
        self.note.value = "" if same else message_html(
            f"This cache's masks follow the {recorded.name!r} convention; the {selection.preset!r} preset "
            f"reproduces its library exactly on a cache computed with convention={preset.mask_convention!r}.",
            "note",
        )
