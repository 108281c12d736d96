"""The Atlas panel: the selected channel across every picture of a multi-image cache.

Three figures follow the selected layer, channel, preset and class:

* the channel's top pictures (:func:`~scorecam_explorer.atlas.channel_examples`, nine, by
  its weight for each picture's own top class or by its activation peak), each with the
  channel's mask over it; a click on one opens that picture in the whole explorer;
* its mean weight per class over the pictures (:func:`~scorecam_explorer.atlas.channel_profile`);
* for the current class, the channels with the highest mean weight
  (:func:`~scorecam_explorer.atlas.class_channels`); a click on one selects it.

Shown only when the cache holds more than one picture. Every array comes through the
state's memo, so moving back and forth reads nothing twice, and each view reads only what it
shows (the atlas functions work lazily on a dataset store).
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import xarray as xr

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer.panel import LiveFigure, Panel, scrolling
from scorecam_explorer.explorer.state import ATLAS_CHANNELS, ATLAS_EXAMPLES, ExplorerState, Selection
from scorecam_explorer.figures import style
from scorecam_explorer.figures.atlas import (
    CHART_WIDTH,
    atlas_grid_spec,
    class_channels_spec,
    class_profile_spec,
    grid_geometry,
)

RANKINGS = {"weight": "by weight", "activation": "by activation"}
"""How the grid ranks the pictures."""
GAP = 12
"""Pixels between the grid and the charts, and between the two charts."""


def intro_html(layer: str, channel: int, images: int) -> str:
    """What the atlas shows, in words a student can read."""
    text = (
        f"Channel {channel} of {layer} across the {images} pictures of this set. "
        "Its <b>weight</b> on a picture is the bar height in the channel chart: how much the "
        "model's score for the class rises, compared with the other channels, when it sees the picture "
        "only through this channel's mask (coloured over each thumbnail; red where the channel fires most). "
        "<b>By weight</b> ranks the pictures by that weight for each picture's own top class; "
        "<b>by activation</b> by the highest value of the channel's feature map on the picture. "
        "Click a thumbnail to open that picture. "
        f"The <b>mean over {images} pictures</b> is the weight averaged over every picture of the set, "
        "class by class: a class that leans on this channel has a long bar."
    )
    return f"<div style='font-size:12px;color:#444;line-height:1.5;max-width:{style.COLUMN_WIDTH}px'>{text}</div>"


def pending_text(pending: int) -> str:
    """'' or a note that pictures still being computed are left out."""
    if not pending:
        return ""
    return f"{pending} picture(s) of the set are still being computed and are left out until they are complete."


def read_text(layer: str, images: int, done: int | None = None) -> str:
    """Why the atlas waits for the button (a dataset store without a fresh atlas index), or
    how far reading has come."""
    if done is not None:
        return f"<div style='font-size:12px;color:#444'>Reading picture {done} of {images} ...</div>"
    return (
        "<div style='font-size:12px;color:#444;line-height:1.5'>"
        f"The atlas of {html.escape(layer)} needs each picture's masked outputs once: {images} pictures read from "
        "the dataset store (on a large store, a minute or more). "
        "<code>scorecam-explorer atlas-index STORE</code> saves them beside the store, and the atlas then opens at once.</div>"
    )


def example_class(examples: xr.Dataset, rank: int) -> int:
    """The class the value of example ``rank`` was computed for (its picture's own top class)."""
    return int(examples["target_class"].values[rank])


class AtlasPanel(Panel):
    """The selected channel across the pictures: top pictures, mean weight per class, and the
    channels that matter for the current class."""

    fields = frozenset({"image", "layer", "channel", "preset", "target", "colormap", "opacity"})

    def __init__(self, state: ExplorerState, *, examples: int = ATLAS_EXAMPLES, channels: int = ATLAS_CHANNELS) -> None:
        super().__init__(state)
        self.examples_count = int(examples)
        self.channels_count = int(channels)
        self.active = state.image_count > 1
        self._examples = None
        self._channels = None
        self._shown_layer: tuple[str, str] | None = None
        self._thumbnails: dict = {}
        self._thumbnails_of: tuple[int, str, int] | None = None
        self.by = widgets.ToggleButtons(
            description="Rank pictures",
            options=[(label, key) for key, label in RANKINGS.items()],
            value="weight",
            style={"button_width": "110px", "description_width": "initial"},
        )
        self.channel = widgets.BoundedIntText(
            description="Channel", min=0, max=max(0, state.channel_count() - 1), value=state.selection.channel,
            layout=widgets.Layout(width="170px"),
        )
        self.intro = widgets.HTML()
        self.note = widgets.HTML()
        self.grid: LiveFigure | None = None
        self.profile: LiveFigure | None = None
        self.class_channels: LiveFigure | None = None
        if not self.active:
            # One picture: nothing to compare across; nothing is read or drawn.
            self._widget = widgets.VBox([], layout=widgets.Layout(display="none"))
            return
        selection = state.selection
        self.grid = LiveFigure(self._empty_spec())
        self.profile = LiveFigure(self._empty_spec())
        self.class_channels = LiveFigure(self._empty_spec())
        self.grid.widget.on_point_click(self._on_thumbnail_click)
        self.class_channels.widget.on_point_click(self._on_channel_click)
        self.by.observe(lambda _change: self.refresh(frozenset({"by"})), names="value")
        self.channel.observe(lambda change: self.apply(channel=int(change["new"])), names="value")
        self.read_button = widgets.Button(
            description="Read the pictures", icon="table", tooltip="read every picture of the set once for this layer",
            layout=widgets.Layout(width="190px"),
        )
        self.read_button.on_click(lambda _button: self.read_pictures())
        self.read_text = widgets.HTML()
        self.deferred = widgets.VBox([self.read_text, self.read_button], layout=widgets.Layout(display="none"))
        width = grid_geometry(examples)["width"]
        charts = widgets.HBox(
            [scrolling(self.profile.widget), scrolling(self.class_channels.widget)],
            layout=widgets.Layout(flex_flow="row wrap", grid_gap=f"0 {GAP}px", width=f"{style.COLUMN_WIDTH}px",
                                  max_width="100%"),
        )
        for box in charts.children:
            box.layout.width = f"{CHART_WIDTH}px"
            box.layout.max_width = "100%"
        self.figures = widgets.HBox(
            [
                widgets.Box([self.grid.widget], layout=widgets.Layout(width=f"{width}px", max_width="100%",
                                                                     overflow="auto hidden")),
                charts,
            ],
            layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start", grid_gap=f"0 {GAP}px", width="100%"),
        )
        self._widget = widgets.VBox(
            [
                self.intro,
                widgets.HBox([self.by, self.channel], layout=widgets.Layout(flex_flow="row wrap")),
                self.message,
                self.note,
                self.deferred,
                self.figures,
            ]
        )
        self.refresh()

    @property
    def widget(self) -> widgets.Widget:
        return self._widget

    @staticmethod
    def _empty_spec() -> dict:
        return {"data": [], "layout": style.base_layout(CHART_WIDTH, 120, "")}

    # ---- figures ------------------------------------------------------------------------

    def _grid_spec(self, selection: Selection) -> dict:
        examples = self.state.atlas_examples(self.by.value, self.examples_count, selection)
        pictures = self.state.pictures_of(examples["image_index"].values)
        used = int(examples.attrs.get("images", self.state.image_count))
        ranking = "weight for its own class" if self.by.value == "weight" else "activation peak"
        self._examples = examples
        if self._thumbnails_of != (id(self.state.cache), selection.layer, selection.channel):
            # a thumbnail is named by its picture's index: valid for one cache, layer and channel
            self._thumbnails_of = (id(self.state.cache), selection.layer, selection.channel)
            self._thumbnails.clear()
        return atlas_grid_spec(
            examples,
            pictures,
            thumbnails=self._thumbnails,
            keys=[int(index) for index in examples["image_index"].values],
            colormap=selection.colormap,
            opacity=selection.opacity,
            current_image=selection.image,
            title=f"Channel {selection.channel} of {selection.layer}: its top {examples.sizes['rank']} pictures",
            subtitle=f"of {used}, by {ranking} · click one to open it",
        )

    def _profile_spec(self, selection: Selection) -> dict:
        profile = self.state.atlas_profile(selection)
        used = int(profile.attrs.get("images", self.state.image_count))
        constant = float(profile["constant_frequency"].values) if "constant_frequency" in profile else float("nan")
        own = float(profile["own_weight_mean"].values) if "own_weight_mean" in profile else float("nan")
        parts = [f"mean over {used} pictures"]
        if own == own:
            parts.append(f"{own:.3g} for their own class".replace("-", "−"))
        if constant == constant:
            parts.append(f"flat on {constant:.0%} of them")
        return class_profile_spec(
            profile,
            current_class=selection.target,
            title=f"Channel {selection.channel}: mean weight per class",
            subtitle=" · ".join(parts),
        )

    def _class_channels_spec(self, selection: Selection) -> dict:
        table = self.state.atlas_class_channels(self.channels_count, selection)
        self._channels = table
        name = self.state.class_names[selection.target]
        used = int(table.attrs.get("images", self.state.image_count))
        return class_channels_spec(
            table,
            selected=selection.channel,
            title=f"Channels that matter for “{name[:28]}”",
            subtitle=f"highest mean weight over {used} pictures · click one to select it",
        )

    # ---- reacting -----------------------------------------------------------------------

    def _on_state(self, changed: frozenset[str]) -> None:
        if self.active:
            super()._on_state(changed)

    def _refresh(self, changed: frozenset[str]) -> None:
        if not self.active:
            return
        selection = self.state.selection
        with self.syncing():
            self.channel.max = self.state.channel_count(selection.layer) - 1
            self.channel.value = selection.channel
        self.intro.value = intro_html(selection.layer, selection.channel, self.state.image_count)
        if self.grid is None or self.profile is None or self.class_channels is None:
            return
        ready = self.state.atlas_ready(selection)
        self.deferred.layout.display = None if not ready else "none"
        self.figures.layout.display = None if ready else "none"
        if not ready:
            # A dataset store without a fresh atlas index: reading every picture is the
            # user's choice, never a side effect of opening the explorer.
            self.read_text.value = read_text(selection.layer, self.state.image_count)
            self._examples = self._channels = None
            self._shown_layer = None
            self.note.value = ""
            return
        everything = bool(changed & {"cache", "layer", "preset"}) or self._shown_layer != (selection.layer, selection.preset)
        self._shown_layer = (selection.layer, selection.preset)
        if everything or changed & {"channel", "by", "image", "colormap", "opacity"}:
            self.grid.show(self._grid_spec(selection))
        if everything or changed & {"channel", "target"}:
            self.profile.show(self._profile_spec(selection))
        if everything or changed & {"channel", "target"}:
            self.class_channels.show(self._class_channels_spec(selection))
        pending = int(self._examples.attrs.get("pending", 0)) if self._examples is not None else 0
        self.note.value = (
            f"<div style='color:#555;font-size:12px;margin:2px 0'>{html.escape(pending_text(pending))}</div>"
            if pending else ""
        )

    def read_pictures(self) -> None:
        """Read every picture once for the atlas of the selected layer (the button), showing
        progress, then draw it."""
        self.read_button.disabled = True
        try:
            self.state.prepare_atlas(on_image=self._show_reading)
        except ScorecamError as error:
            self.show_error(str(error))
        finally:
            self.read_button.disabled = False
        self.refresh(frozenset({"layer"}))

    def _show_reading(self, done: int, total: int) -> None:
        if done == total or done % max(1, total // 50) == 0:
            self.read_text.value = read_text(self.state.selection.layer, total, done=done)

    def _on_thumbnail_click(self, trace: int, _point: int) -> None:
        """A click on thumbnail r (traces 3r..3r+2) opens its picture, with the class its
        value was computed for; the channel stays selected."""
        if self._examples is None:
            return
        rank = trace // 3
        if not 0 <= rank < self._examples.sizes["rank"]:
            return
        self.apply(image=int(self._examples["image_index"].values[rank]), target=example_class(self._examples, rank))

    def _on_channel_click(self, trace: int, point: int) -> None:
        """A click on bar r of the class's channels selects that channel."""
        if self._channels is None or trace != 0 or not 0 <= point < self._channels.sizes["rank"]:
            return
        self.apply(channel=int(self._channels["channel"].values[point]))
