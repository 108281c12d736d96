"""Panel 4, the recomposer: the map from the k heaviest channels, channels switched off and
on, and the fidelity curve (Pearson r of the top-k map with the full map against k).

This is what Faster Score-CAM trades away: it scores only a few channels; the curve shows
how much of the map those few already make.
"""

from __future__ import annotations

import math

import ipywidgets as widgets

from scorecam_explorer.explorer.analysis import describe_r
from scorecam_explorer.explorer.panel import LiveFigure, Panel
from scorecam_explorer.explorer.state import ExplorerState, Selection
from scorecam_explorer.figures import fidelity_spec


def parse_channels(text: str) -> frozenset[int]:
    """Channel ids from text such as ``"3, 17 40"``; ValueError names the bad part."""
    ids = set()
    for part in text.replace(",", " ").split():
        if not part.lstrip("-").isdigit():
            raise ValueError(f"{part!r} is not a channel number")
        ids.add(int(part))
    return frozenset(ids)


def log_slider_max(total: int) -> float:
    """The slider's upper end, log10 of the channel count (a tiny range for one channel)."""
    return max(math.log10(max(1, total)), 0.01)


def log_slider_step(total: int) -> float:
    """The slider's step in log10(k): fine enough that the browser, which snaps the handle to
    whole steps and sends the snapped value back, never moves it by half a channel (a k
    typed in the box comes back as that k), and dividing the range exactly (the last step
    lands on the channel count)."""
    top = log_slider_max(total)
    finest = math.log10(1.0 + 0.4 / max(1, total))  # neighbouring steps differ by < 0.4 channel
    return top / math.ceil(top / finest)


def slider_k(value: float, total: int) -> int:
    """The integer k a position of the logarithmic slider stands for, within 1..total."""
    return min(max(1, int(round(float(value)))), max(1, total))


def summary_html(kept: int, switched_on: int, switched_off: int, r: float) -> str:
    """Two short lines: which channels make the map, and its r with the full map."""
    off = f" ({switched_off} off)" if switched_off else ""
    return (
        "<div style='font-size:13px;line-height:1.45;margin:2px 0 0 4px'>"
        f"Map: top <b>{kept}</b> of {switched_on} channels on{off}<br>"
        f"Pearson r with the full map: <b>{describe_r(r)}</b></div>"
    )


class RecomposerPanel(Panel):
    """Top-k slider, switched-off channels (typed or clicked in the channel chart), reset, curve."""

    fields = frozenset({"image", "layer", "target", "preset", "top_k", "switched_off"})

    def __init__(self, state: ExplorerState) -> None:
        super().__init__(state)
        selection = state.selection
        total = state.channel_count()
        # Logarithmic, as the fidelity curve's axis: k = 1, 2, 3 ... each get a stretch of the
        # track. The box beside it takes any k exactly; the two always show the same k.
        self.top_k = widgets.FloatLogSlider(
            description="Top k", base=10, min=0.0, max=log_slider_max(total), step=log_slider_step(total), value=total,
            readout_format=".0f", continuous_update=True, layout=widgets.Layout(width="330px"),
            tooltip="the k heaviest channels make the map (logarithmic, like the curve's axis)",
        )
        self.top_k_box = widgets.BoundedIntText(
            min=1, max=total, value=total, layout=widgets.Layout(width="90px"), tooltip="type any k from 1 to the channel count",
        )
        self.switched_off = widgets.Text(
            description="Off", placeholder="channel numbers, e.g. 12, 40", continuous_update=False,
            layout=widgets.Layout(width="330px"),
        )
        self.reset = widgets.Button(description="Reset", icon="undo", tooltip="switch every channel back on, keep all",
                                    layout=widgets.Layout(width="90px"))
        self.summary = widgets.HTML()
        self.figure = LiveFigure(self._spec(selection))
        self.top_k.observe(self._on_slider, names="value")
        self.top_k_box.observe(lambda change: self.set_top_k(int(change["new"])), names="value")
        self.switched_off.observe(self._on_text, names="value")
        self.reset.on_click(lambda _button: self.apply(top_k=None, switched_off=frozenset()))
        self._widget = widgets.VBox(
            [
                widgets.HBox([self.top_k, self.top_k_box]),
                widgets.HBox([self.switched_off, self.reset]),
                self.summary,
                self.figure.widget,
                self.message,
            ],
            layout=widgets.Layout(width="450px"),
        )
        self._sync(selection)

    @property
    def widget(self) -> widgets.Widget:
        return self._widget

    def _spec(self, selection: Selection) -> dict:
        curve = self.state.fidelity(selection)
        kept = int(self.state.kept(selection).sum())
        return fidelity_spec(
            curve,
            current_k=kept,
            current_r=self.state.current_fidelity(selection),
            subtitle=f"{selection.layer} · {self.state.class_names[selection.target]} · {selection.preset}",
        )

    def _sync(self, selection: Selection) -> None:
        total = self.state.channel_count(selection.layer)
        switched_on = total - len(selection.switched_off)
        kept = int(self.state.kept(selection).sum())
        k = total if selection.top_k is None else selection.top_k
        with self.syncing():
            self.top_k.max = log_slider_max(total)
            self.top_k.step = log_slider_step(total)
            # A slider that already stands for k is left alone: sending a value back while it
            # is dragged would pull the handle back to where the mouse was a moment ago.
            if slider_k(self.top_k.value, total) != k:
                self.top_k.value = float(k)
            self.top_k_box.max = total
            self.top_k_box.value = k
            self.switched_off.value = ", ".join(map(str, sorted(selection.switched_off)))
        r = self.state.current_fidelity(selection)
        self.summary.value = summary_html(kept, switched_on, len(selection.switched_off), r)

    def set_top_k(self, k: int) -> bool:
        """Keep the ``k`` heaviest channels (from the slider or the box); both then show k."""
        if self._syncing:
            return False
        if self.apply(top_k=int(k)):
            return True
        self._sync(self.state.selection)  # refused: both widgets go back to the state's k
        return False

    def _on_slider(self, change: dict) -> None:
        """A slider position stands for the nearest integer k (its readout shows that k)."""
        if not self._syncing:
            self.set_top_k(slider_k(change["new"], self.state.channel_count(self.state.selection.layer)))

    def _on_text(self, change: dict) -> None:
        if self._syncing:
            return
        try:
            channels = parse_channels(str(change["new"]))
        except ValueError as error:
            self.show_error(f"{error}; type channel numbers separated by commas.")
            self._show_switched_off()
            return
        if not self.apply(switched_off=channels):
            self._show_switched_off()  # the error stays; the box shows what the map uses

    def _show_switched_off(self) -> None:
        """Put the state's channels switched off back in the box, after text it refused."""
        with self.syncing():
            self.switched_off.value = ", ".join(map(str, sorted(self.state.selection.switched_off)))

    def _refresh(self, changed: frozenset[str]) -> None:
        selection = self.state.selection
        self._sync(selection)
        self.figure.show(self._spec(selection))
