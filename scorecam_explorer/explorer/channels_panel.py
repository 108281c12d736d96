"""Panel 3, the channel inspector: every channel's weight for the current class, one channel
up close (activation, mask, masked input, scores), and a gallery of the top contributions."""

from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np

from scorecam_explorer.explorer.panel import LiveFigure, Panel, scrolling
from scorecam_explorer.explorer.state import ExplorerState, Selection
from scorecam_explorer.figures import SORT_KEYS, channel_bar_spec, channel_detail_spec, gallery_spec, style
from scorecam_explorer.figures.channels import STATUS_LEGEND, bar_window, visible_bar_count

CLICK_MODES = {"inspect": "inspect it", "toggle": "switch it off / on"}
"""What a click on a bar does."""


def legend_html() -> str:
    """The bar colours and what they mean, as a row of small swatches."""
    swatches = "".join(
        f"<span style='display:inline-block;margin-right:12px;white-space:nowrap'>"
        f"<span style='display:inline-block;width:10px;height:10px;background:{fill};vertical-align:-1px;"
        f"margin-right:4px;box-sizing:border-box;border:{'2px solid ' + outline if outline else 'none'}'></span>"
        f"{html.escape(meaning)}</span>"
        for fill, outline, meaning in STATUS_LEGEND
    )
    note = (
        "<span style='color:#666'>Hover a bar for its numbers. A share of the map below 0 is no error: "
        "that channel's w_k·A_k is negative where the map is positive, so it takes away from the map.</span>"
    )
    return f"<div style='font-size:12px;color:#444;margin:2px 0 0 4px;line-height:1.6'>{swatches}<br>{note}</div>"


def share_note(share: float) -> str:
    """What the inspected channel's share of the map means (a negative one explained)."""
    if share < 0:
        return "negative: its w_k·A_k is negative where the map is positive, so it takes away from the map"
    return "its part of the map after ReLU"


class ChannelsPanel(Panel):
    """Bar chart of the channels' weights, channel detail and scores, gallery of contributions."""

    fields = frozenset({"image", "layer", "target", "preset", "sort_by", "channel", "switched_off", "top_k"})

    def __init__(self, state: ExplorerState) -> None:
        super().__init__(state)
        selection = state.selection
        self.sort_by = widgets.ToggleButtons(
            description="Sort by",
            options=[(label, key) for key, label in SORT_KEYS.items()],
            value=selection.sort_by,
            style={"button_width": "150px"},
        )
        self.channel = widgets.BoundedIntText(
            description="Channel", min=0, max=state.channel_count() - 1, value=selection.channel,
            layout=widgets.Layout(width="170px"),
        )
        self.click_mode = widgets.ToggleButtons(
            description="Click a bar to",
            options=[(label, key) for key, label in CLICK_MODES.items()],
            value="inspect",
            style={"button_width": "130px", "description_width": "initial"},
        )
        self.toggle = widgets.Button(layout=widgets.Layout(width="190px"))
        self.scores = widgets.HTML()
        self.legend = widgets.HTML(legend_html())
        self._order = state.order(selection)
        # The bar chart's x range (ranks) when the layer has more bars than fit, and what it
        # was chosen for; a click keeps it (the user is looking there), a typed channel
        # beyond it moves it.
        self._window: list[float] | None = None
        self._window_for: tuple | None = None
        self._clicking = False
        self.bars = LiveFigure(self._bar_spec(selection))
        self.detail = LiveFigure(self._detail_spec(selection))
        self.gallery = LiveFigure(self._gallery_spec(selection))
        self.bars.widget.on_point_click(self._on_bar_click)
        self.sort_by.observe(lambda change: self.apply(sort_by=change["new"]), names="value")
        self.channel.observe(lambda change: self.apply(channel=int(change["new"])), names="value")
        self.toggle.on_click(lambda _button: self.toggle_channel(self.state.selection.channel))
        wrap = widgets.Layout(flex_flow="row wrap")
        self._widget = widgets.VBox(
            [
                widgets.HBox([self.sort_by], layout=wrap),
                widgets.HBox([self.click_mode, self.channel, self.toggle], layout=wrap),
                self.message,
                self.legend,
                scrolling(self.bars.widget),
                scrolling(self.detail.widget),
                self.scores,
                scrolling(self.gallery.widget),
            ]
        )
        self._sync(selection)

    @property
    def widget(self) -> widgets.Widget:
        return self._widget

    # ---- figures ------------------------------------------------------------------------

    def _bar_window(self, selection: Selection, n_channels: int) -> list[float] | None:
        """The chart's x range: the heaviest channels first, then wherever a typed channel
        number (not a click) takes it; None when every bar fits."""
        visible = visible_bar_count(n_channels, style.COLUMN_WIDTH)
        if visible >= n_channels:
            return None
        rank = int(np.flatnonzero(self._order == selection.channel)[0]) + 1
        ordering = (selection.image, selection.layer, selection.target, selection.preset, selection.sort_by)
        if self._window is None or self._window_for != ordering:
            self._window, self._window_for = bar_window(n_channels, visible, rank), ordering
        elif not self._clicking and not self._window[0] < rank < self._window[1]:
            self._window = bar_window(n_channels, visible, rank)
        return self._window

    def _bar_spec(self, selection: Selection) -> dict:
        contributions = self.state.contributions(selection)
        kept = self.state.kept(selection)
        total = kept.size
        subtitle = (
            f"{selection.preset} · score: {contributions.attrs.get('score_name', '')} · "
            f"{int(kept.sum())} of {total} channels in the map · click a bar, or type a channel number"
        )
        return channel_bar_spec(
            contributions,
            sort_by=selection.sort_by,
            selected=selection.channel,
            switched_off=selection.switched_off,
            kept=kept,
            subtitle=subtitle,
            window=self._bar_window(selection, total),
        )

    def _detail_spec(self, selection: Selection) -> dict:
        activation, mask, masked = self.state.channel_pictures(selection)
        return channel_detail_spec(
            activation, mask, masked, channel=selection.channel,
            title=f"Channel {selection.channel} of {selection.layer}",
            subtitle="what the model saw for this channel: its activation, the mask made from it, the masked input",
        )

    def _gallery_spec(self, selection: Selection) -> dict:
        tiles = self.state.gallery(selection)
        return gallery_spec(
            tiles,
            title=f"Top {tiles.sizes['rank']} channels by {SORT_KEYS[selection.sort_by]}: contributions w_k·A_k",
            subtitle="red adds to the map, blue takes away; the percentage is the channel's share of the map",
        )

    def scores_html(self, selection: Selection) -> str:
        """A small table of the inspected channel's numbers."""
        contributions = self.state.contributions(selection)
        k = selection.channel
        row = {name: float(contributions[name].values[k]) for name in ("score", "probability", "weight", "share", "variance")}
        constant = bool(contributions["constant"].values[k])
        rank = int(np.flatnonzero(self.state.order(selection) == k)[0]) + 1
        state = "switched off" if k in selection.switched_off else ("in the map" if self.state.kept(selection)[k] else "beyond the top k")
        cells = [
            ("score", f"{row['score']:.4g}", html.escape(str(contributions.attrs.get("score_name", "")))),
            ("probability", f"{row['probability']:.2%}", f"p(“{self.state.class_names[selection.target]}” | X∘H_{k})"),
            ("weight", f"{row['weight']:.4g}", f"w_{k}, rank {rank} by {SORT_KEYS[selection.sort_by]}"),
            ("share of the map", f"{row['share']:.2%}".replace("-", "−"), share_note(row["share"])),
            ("activation variance", f"{row['variance']:.4g}", "what Faster Score-CAM ranks by"),
            ("status", state + (" · flat on this photo: empty mask, no forward pass of its own" if constant else ""), ""),
        ]
        body = "".join(
            f"<tr><td style='padding:1px 10px 1px 0;color:#555'>{name}</td><td style='padding:1px 10px 1px 0'><b>{value}</b></td>"
            f"<td style='color:#888'>{note}</td></tr>"
            for name, value, note in cells
        )
        return f"<table style='font-size:12px;margin:0 0 6px 10px'>{body}</table>"

    # ---- reacting -----------------------------------------------------------------------

    def _sync(self, selection: Selection) -> None:
        with self.syncing():
            self.sort_by.value = selection.sort_by
            self.channel.max = self.state.channel_count(selection.layer) - 1
            self.channel.value = selection.channel
        switched_off = selection.channel in selection.switched_off
        self.toggle.description = f"Switch channel {selection.channel} {'on' if switched_off else 'off'}"
        self.toggle.icon = "eye" if switched_off else "eye-slash"
        self.scores.value = self.scores_html(selection)

    def _refresh(self, changed: frozenset[str]) -> None:
        selection = self.state.selection
        self._order = self.state.order(selection)
        self._sync(selection)
        self.bars.show(self._bar_spec(selection))
        if changed & {"cache", "image", "layer", "channel"}:
            self.detail.show(self._detail_spec(selection))
        if changed & {"cache", "image", "layer", "target", "preset", "sort_by"}:
            self.gallery.show(self._gallery_spec(selection))

    def toggle_channel(self, channel: int) -> None:
        """Switch ``channel`` off if it is on, on if it is off."""
        off = set(self.state.selection.switched_off)
        off.symmetric_difference_update({int(channel)})
        self.apply(switched_off=frozenset(off))

    def _on_bar_click(self, trace: int, point: int) -> None:
        """A click on bar ``point`` (the channel of that rank) inspects or toggles it."""
        if trace != 0 or not 0 <= point < len(self._order):
            return
        channel = int(self._order[point])
        self._clicking = True
        try:
            if self.click_mode.value == "toggle":
                self.toggle_channel(channel)
            else:
                self.apply(channel=channel)
        finally:
            self._clicking = False
