"""Panel 5, compare: two maps side by side and their difference.

Compare two presets, two layers or two classes (full maps, every channel, for the current
picture and the other current choices), two members of the Score-CAM family (Score-CAM and
SS-CAM, say) when the explorer was given their caches, or, when a model is attached, Score-CAM against the
gradient methods of the registry (:mod:`scorecam_explorer.methods`: Grad-CAM, Grad-CAM++ and
any gradient method registered since), read each time the choices are set.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import xarray as xr

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer import analysis
from scorecam_explorer.explorer.model_link import BASELINE_METHODS, ModelLink, error_text, gradient_map
from scorecam_explorer.explorer.panel import LiveFigure, Panel, scrolling
from scorecam_explorer.explorer.state import ExplorerState
from scorecam_explorer.figures import compare_spec

MODES = {
    "presets": "two presets",
    "layers": "two layers",
    "classes": "two classes",
    "families": "two family members",
    "methods": "Score-CAM vs gradients",
}
"""What Compare can put side by side ("methods" only with a model; "families" only with the
caches of other Score-CAM family members, ``Explorer(cache, others=[...])``)."""

SCORECAM = "scorecam"


def method_label(key: str) -> str:
    """The label of a gradient method (:data:`BASELINE_METHODS`), or the key itself."""
    return BASELINE_METHODS.get(key, key)


class ComparePanel(Panel):
    """Mode, the two choices A and B, and the figure A | B | A − B."""

    fields = frozenset({"image", "layer", "target", "preset", "colormap", "opacity"})

    def __init__(self, state: ExplorerState, model: ModelLink) -> None:
        super().__init__(state)
        self.model = model
        self._gradient_maps: dict[tuple, xr.DataArray] = {}
        modes = [
            (label, key)
            for key, label in MODES.items()
            if (key != "methods" or model.available) and (key != "families" or len(state.families) > 1)
        ]
        # Wide enough for the longest label, "Score-CAM vs gradients", in a notebook's font.
        self.mode = widgets.ToggleButtons(description="Compare", options=modes, value="presets",
                                          style={"button_width": "185px"})
        self.first = widgets.Dropdown(description="A", layout=widgets.Layout(width="340px"))
        self.second = widgets.Dropdown(description="B", layout=widgets.Layout(width="340px"))
        self._set_choices("presets")
        self.figure = LiveFigure(self._spec())
        self.mode.observe(self._on_mode, names="value")
        self.first.observe(lambda _change: self._redraw(), names="value")
        self.second.observe(lambda _change: self._redraw(), names="value")
        self._widget = widgets.VBox(
            [
                self.mode,
                widgets.HBox([self.first, self.second], layout=widgets.Layout(flex_flow="row wrap")),
                self.message,
                scrolling(self.figure.widget),
            ]
        )

    @property
    def widget(self) -> widgets.Widget:
        return self._widget

    # ---- choices ------------------------------------------------------------------------

    def _options(self, mode: str) -> list[tuple[str, Any]]:
        state = self.state
        if mode == "presets":
            return [(name, name) for name in state.presets]
        if mode == "layers":
            return [(name, name) for name in state.layers]
        if mode == "families":
            return [(name, name) for name in state.families]
        if mode == "classes":
            top = state.predictions()
            options = [(f"{name} · {p:.1%}", int(index)) for name, index, p in zip(top["class_name"].values, top["class"].values, top.values)]
            target = state.selection.target
            if target not in {value for _, value in options}:
                options.insert(0, (f"{state.class_names[target]} · {state.probability(target):.2%}", target))
            return options
        return [(f"Score-CAM ({state.selection.preset})", SCORECAM), *((label, key) for key, label in BASELINE_METHODS.items())]

    def _defaults(self, mode: str, options: list[tuple[str, Any]]) -> tuple[Any, Any]:
        s = self.state.selection
        values = [value for _, value in options]
        current = {"presets": s.preset, "layers": s.layer, "classes": s.target, "families": self.state.family,
                   "methods": SCORECAM}[mode]
        others = [value for value in values if value != current]
        if mode == "layers" and current in values:
            index = values.index(current)
            others = [values[index - 1]] if index > 0 else others
        if mode == "presets":  # "official" weighs channels differently from the softmax presets
            others = [p for p in ("official", "paper") if p != current] + others
        return current, (others[0] if others else current)

    def _set_choices(self, mode: str, *, keep: bool = False) -> None:
        options = self._options(mode)
        first, second = self._defaults(mode, options)
        values = [value for _, value in options]
        if keep:
            first = self.first.value if self.first.value in values else first
            second = self.second.value if self.second.value in values else second
        with self.syncing():
            self.first.options = options
            self.second.options = options
            self.first.value = first
            self.second.value = second

    def _on_mode(self, change: dict) -> None:
        self._set_choices(change["new"])
        self._redraw()

    # ---- maps ---------------------------------------------------------------------------

    def map_of(self, mode: str, choice: Any) -> tuple[xr.DataArray, str]:
        """The map for one side and its label."""
        state = self.state
        s = state.selection
        if mode == "presets":
            return state.map_for(preset=choice), f"{choice} · {s.layer}"
        if mode == "layers":
            return state.map_for(layer=choice), f"{choice} · {s.preset}"
        if mode == "classes":
            return state.map_for(target=int(choice)), f"{state.class_names[int(choice)]}"
        if mode == "families":
            return state.family_map(str(choice)), f"{choice} · {s.preset} · {s.layer}"
        if choice == SCORECAM:
            return state.full_map(), f"Score-CAM ({s.preset}) · {s.layer}"
        key = (choice, s.layer, s.target, s.image, id(state.cache))
        if key not in self._gradient_maps:
            try:
                model = self.model.get()
                self._gradient_maps[key] = gradient_map(choice, model, state.cache, s.layer, s.target, s.image)
            except ScorecamError:
                raise
            except Exception as error:  # noqa: BLE001 - shown in the panel, never raised into the notebook
                raise ScorecamError(f"{method_label(choice)} failed: {error_text(error)}") from error
        return self._gradient_maps[key], f"{method_label(choice)} · {s.layer}"

    def _spec(self) -> dict:
        s = self.state.selection
        mode = self.mode.value
        first, first_label = self.map_of(mode, self.first.value)
        second, second_label = self.map_of(mode, self.second.value)
        return compare_spec(
            self.state.picture(),
            first,
            second,
            first_label=first_label,
            second_label=second_label,
            opacity=s.opacity,
            colormap=s.colormap,
            correlation=analysis.pearson(first, second),
        )

    def _redraw(self) -> None:
        if self._syncing:
            return
        self.message.value = ""
        try:
            self.figure.show(self._spec())
        except ScorecamError as error:
            self.show_error(str(error))

    def _refresh(self, changed: frozenset[str]) -> None:
        if changed & {"cache", "image", "layer", "target", "preset"}:
            self._set_choices(self.mode.value, keep=True)
        self.figure.show(self._spec())
