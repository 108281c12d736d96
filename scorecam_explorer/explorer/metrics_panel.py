"""Panel 6, metrics: deletion and insertion of the map shown, on demand.

The map evaluated is the one the map panel shows: the current picture, layer, class and
preset, with the channels switched off left out and only the top k kept
(:meth:`ExplorerState.current_map`, at input resolution). Its deletion and insertion
curves (:func:`scorecam_explorer.metrics.deletion_insertion`, the RISE protocol) and its
Average Drop / Increase in Confidence (:func:`scorecam_explorer.metrics.average_drop_increase`,
two more passes) need the model, so they are computed only when the button is pressed, with
the cost stated on it. Results are remembered per map; a map not computed yet shows the
last computed curves greyed out, titled with the map they belong to.

No torch is imported until the button is pressed.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from typing import Any

import ipywidgets as widgets
import numpy as np
import xarray as xr

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer.model_link import ModelLink
from scorecam_explorer.explorer.panel import LiveFigure, Panel, message_html
from scorecam_explorer.explorer.state import ExplorerState, Selection
from scorecam_explorer.figures.curves import causal_curves_spec

STEP_FRACTION = 0.01
"""Pixels changed per step, as a fraction of the picture: the RISE protocol's 1 %
(``metrics.causal.DEFAULT_STEP_FRACTION``; repeated here so that the panel imports no torch)."""

NO_MODEL = (
    "No model is attached: deletion and insertion run the model on the picture with pixels "
    "removed or added. Attach one with Explorer.from_model(model, picture, layers=...) or "
    "Explorer(cache, model=model)."
)

def intro_html(cost: dict[str, int]) -> str:
    """What the button will compute and how to read it: shown instead of empty plots."""
    paragraphs = (
        f"Pressing the button runs the model {sum(cost.values())} times on this picture to test the map shown.",
        "Deletion removes the pixels the map ranks highest first, 1 % of them at a time, and follows the "
        "class probability; insertion starts from a blurred picture and puts those pixels back. A faithful "
        "map makes the deletion curve fall fast (small area under it) and the insertion curve rise fast "
        "(large area).",
        "Average drop compares the class probability on the map's most salient half of the picture with "
        "that on the whole picture (lower is better).",
    )
    body = "".join(f"<p style='margin:0 0 6px 0'>{html.escape(text)}</p>" for text in paragraphs)
    return f"<div style='font-size:13px;color:#444;max-width:640px;line-height:1.45;margin:4px 0 0 4px'>{body}</div>"


MapKey = tuple[int, str, int, str, "int | None", frozenset[int]]


def map_key(selection: Selection) -> MapKey:
    """What the current map depends on: picture, layer, class, preset, top k, channels off."""
    s = selection
    return (s.image, s.layer, s.target, s.preset, s.top_k, s.switched_off)


def forward_pass_cost(height: int, width: int, step_fraction: float = STEP_FRACTION) -> dict[str, int]:
    """Forward passes one picture costs, per metric.

    With P = H W pixels and s = max(1, round(step_fraction P)) pixels a step, a curve has
    T + 1 points, T = ceil(P / s), and its metric one more pass for the class (f(X));
    Average Drop / Increase forwards X and the explanation map X∘M.
    """
    n_pixels = int(height) * int(width)
    if not 0.0 < step_fraction <= 1.0:
        raise ScorecamError(f"the step fraction must be in (0, 1], got {step_fraction}.")
    step = max(1, int(round(step_fraction * n_pixels)))
    curve = math.ceil(n_pixels / step) + 1 + 1
    return {"deletion": curve, "insertion": curve, "average_drop": 2}


@dataclasses.dataclass(frozen=True)
class MapMetrics:
    """The metrics of one map: the selection it was made for and the three results."""

    selection: Selection
    deletion: xr.Dataset
    insertion: xr.Dataset
    confidence: xr.Dataset

    @property
    def forward_passes(self) -> int:
        return sum(int(result.attrs["forward_passes"]) for result in (self.deletion, self.insertion, self.confidence))


def compute_map_metrics(
    model: Any, inputs: Any, saliency: xr.DataArray, selection: Selection, step_fraction: float = STEP_FRACTION
) -> MapMetrics:
    """Deletion, insertion and Average Drop / Increase of ``saliency`` (y, x), the map of
    ``selection``, for its class; ``inputs`` is the picture's model input (1, 3, H, W)."""
    from scorecam_explorer.metrics import average_drop_increase, deletion_insertion

    target = selection.target
    deletion, insertion = deletion_insertion(model, inputs, saliency, target, step_fraction=step_fraction)
    confidence = average_drop_increase(model, inputs, saliency, target)
    return MapMetrics(selection, deletion, insertion, confidence)


def _protocol(result: xr.Dataset) -> dict[str, Any]:
    return json.loads(result.attrs.get("protocol", "{}"))


def summary_rows(metrics: MapMetrics) -> list[tuple[str, str]]:
    """(label, value) lines beside the curves: the scores, then the protocol and its cost."""
    deletion, insertion, confidence = metrics.deletion, metrics.insertion, metrics.confidence
    removal, adding, keeping = _protocol(deletion), _protocol(insertion), _protocol(confidence)
    increase = float(confidence["increase"].values[0]) > 0
    return [
        ("Deletion AUC", f"{float(deletion['auc'].values[0]):.4f} (lower is better)"),
        ("Insertion AUC", f"{float(insertion['auc'].values[0]):.4f} (higher is better)"),
        ("Average drop", f"{float(confidence.attrs['average_drop']):.2f} % (lower is better)"),
        ("Increase in confidence", "yes" if increase else "no"),
        ("p(class), whole picture", f"{float(confidence['probability'].values[0]):.4f}"),
        (
            "Step",
            f"{removal.get('step_fraction', 0):.0%} of the pixels ({removal.get('step_pixels')} px), "
            f"{removal.get('steps')} steps",
        ),
        ("Order", str(removal.get("order", ""))),
        ("Deletion substrate", str(removal.get("substrate", ""))),
        ("Insertion start", str(adding.get("substrate", ""))),
        (
            "Average drop input",
            f"top {keeping.get('keep_fraction', 0):.0%} of the map × input ({keeping.get('space', '')} space)",
        ),
        (
            "Forward passes",
            f"{metrics.forward_passes} (deletion {deletion.attrs['forward_passes']}, insertion "
            f"{insertion.attrs['forward_passes']}, average drop {confidence.attrs['forward_passes']})",
        ),
    ]


def _table(rows: list[tuple[str, str]], stale: bool) -> str:
    colour = "#9e9e9e" if stale else "#262626"
    cells = "".join(
        f"<tr><td style='padding:1px 8px 1px 0;color:#666;vertical-align:top;white-space:nowrap'>{html.escape(label)}</td>"
        f"<td style='padding:1px 0'>{html.escape(value)}</td></tr>"
        for label, value in rows
    )
    return f"<table style='font-size:12px;color:{colour};border-collapse:collapse'>{cells}</table>"


class MetricsPanel(Panel):
    """A button that computes deletion / insertion of the current map, the curves, the numbers."""

    fields = frozenset({"image", "layer", "target", "preset", "top_k", "switched_off"})

    def __init__(self, state: ExplorerState, model: ModelLink) -> None:
        super().__init__(state)
        self.model = model
        self.results: dict[MapKey, MapMetrics] = {}
        self.last: MapMetrics | None = None  # the most recently computed result
        self.button = widgets.Button(icon="play", layout=widgets.Layout(width="auto"))
        self.button.on_click(lambda _button: self.compute())
        self.status = widgets.HTML()
        self.numbers = widgets.HTML(layout=widgets.Layout(width="340px", margin="40px 0 0 8px"))
        self.figure = LiveFigure(self._spec(None, stale=False))
        self.body = widgets.HBox([self.figure.widget, self.numbers], layout=widgets.Layout(flex_flow="row wrap"))
        self.intro = widgets.HTML()
        self._widget = widgets.VBox([widgets.HBox([self.button, self.status]), self.message, self.intro, self.body])
        self.refresh()

    @property
    def widget(self) -> widgets.Widget:
        return self._widget

    # ---- what is shown ------------------------------------------------------------------

    def cost(self) -> dict[str, int]:
        """Forward passes the button costs, per metric (the cache's input size)."""
        size = self.state.cache["input"].sizes
        return forward_pass_cost(size["h"], size["w"])

    def describe(self, selection: Selection) -> str:
        """'chelsea · blocks.15 · “tabby” · paper · top 5 of 1280 channels, 2 switched off'."""
        s = selection
        total = self.state.channel_count(s.layer)
        channels = "all channels" if s.top_k is None else f"top {s.top_k} of {total} channels"
        if s.switched_off:
            channels += f", {len(s.switched_off)} switched off"
        return (
            f"{self.state.image_ids[s.image]} · {s.layer} · “{self.state.class_names[s.target]}” · "
            f"{s.preset} · {channels}"
        )

    def _spec(self, metrics: MapMetrics | None, *, stale: bool) -> dict:
        shown = self.state.selection if metrics is None else metrics.selection
        if metrics is None:
            title, subtitle = "Deletion and insertion of the map shown", f"{self.describe(shown)} · not computed yet"
        elif stale:
            title, subtitle = "Deletion and insertion of ANOTHER map (grey)", f"computed for {self.describe(shown)}"
        else:
            title, subtitle = "Deletion and insertion of the map shown", self.describe(shown)
        return causal_curves_spec(
            None if metrics is None else metrics.deletion,
            None if metrics is None else metrics.insertion,
            stale=stale,
            title=title,
            subtitle=subtitle,
            class_name=self.state.class_names[shown.target],
        )

    def _refresh(self, changed: frozenset[str]) -> None:
        if not self.model.available:
            self.button.layout.display = "none"
            self.body.layout.display = "none"
            self.intro.layout.display = "none"
            self.status.value = message_html(self.model.failure or NO_MODEL, "note")
            self.numbers.value = ""
            return
        cost = self.cost()
        self.button.description = f"Compute deletion / insertion ({sum(cost.values())} forward passes)"
        self.button.tooltip = (
            f"deletion {cost['deletion']}, insertion {cost['insertion']} and average drop "
            f"{cost['average_drop']} forward passes of the model"
        )
        current = self.results.get(map_key(self.state.selection))
        computed = current is not None or self.last is not None
        # Before anything is computed, words say what the button does instead of empty plots.
        self.intro.value = "" if computed else intro_html(cost)
        self.intro.layout.display = "none" if computed else None
        self.body.layout.display = None if computed else "none"
        if current is not None:
            self._show(current, stale=False)
            self.status.value = message_html("Computed for the map shown (remembered).", "note")
        elif self.last is not None:
            self._show(self.last, stale=True)
            self.status.value = message_html(
                "Not computed for the map shown: the grey curves and numbers belong to another map "
                f"({self.describe(self.last.selection)}).",
                "error",
            )
        else:
            self.figure.show(self._spec(None, stale=False))  # kept current, hidden until a result exists
            self.numbers.value = ""
            self.status.value = message_html("Not computed yet for the map shown.", "note")

    def _show(self, metrics: MapMetrics, *, stale: bool) -> None:
        self.figure.show(self._spec(metrics, stale=stale))
        self.numbers.value = _table(summary_rows(metrics), stale)

    # ---- computing ----------------------------------------------------------------------

    def compute(self) -> MapMetrics | None:
        """Compute (or recall) the metrics of the map shown; errors are shown in the panel."""
        selection = self.state.selection
        key = map_key(selection)
        if key in self.results:
            self.refresh()
            return self.results[key]
        self.message.value = ""
        self.button.disabled = True
        self.status.value = message_html(f"Computing {sum(self.cost().values())} forward passes…", "note")
        try:
            metrics = self._compute(selection)
        except Exception as error:  # noqa: BLE001 - a model's failure must not escape into the notebook
            self.status.value = message_html("Not computed.", "note")
            text = str(error) if isinstance(error, ScorecamError) else f"{type(error).__name__}: {error}"
            self.show_error(f"Deletion / insertion failed: {text}")
            if not self.model.available:  # the model itself is unusable (e.g. other weights)
                self.button.layout.display = "none"
            return None
        finally:
            self.button.disabled = False
        self.results[key] = metrics
        self.last = metrics
        self.refresh()
        return metrics

    def _compute(self, selection: Selection) -> MapMetrics:
        loaded = self.model.get()  # first: without a model, say so without importing torch
        import torch

        cache = self.state.cache
        inputs = torch.from_numpy(
            np.ascontiguousarray(cache["input"].isel(image=[selection.image]).transpose("image", "c", "h", "w").values)
        )
        return compute_map_metrics(loaded, inputs, self.state.current_map(selection), selection)
