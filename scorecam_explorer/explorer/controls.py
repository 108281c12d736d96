"""The controls above the panels: picture, target class, preset, and the layer scrubber.

The class picker lists the model's ten most probable classes with their probabilities; the
search box accepts any class name (the browser filters the list as you type). The layer
scrubber slides over the cached layers, shallow to deep. With a model attached, a layer that
is not cached can be computed here, with a progress bar.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable
from typing import TypeVar

import ipywidgets as widgets

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer.model_link import ModelLink, error_text
from scorecam_explorer.explorer.panel import Panel, message_html
from scorecam_explorer.explorer.state import ExplorerState

T = TypeVar("T")

PRESET_HELP = {
    "paper": "Wang et al. 2020: softmax over channels of the logit increase over the baseline",
    "official": "the authors' code: class probability as the weight, constant channels skipped",
    "pytorch-grad-cam": "grad-cam 1.5.7: softmax over channels of the masked logit",
    "torchcam": "torchcam 0.5.0: softmax over channels of the logit change",
}


def class_labels(names: list[str]) -> list[str]:
    """One searchable label per class: its name, with the index where names repeat."""
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [name if seen[name] == 1 else f"{name} (class {index})" for index, name in enumerate(names)]


def flat_channels_text(flat: int, zero: int) -> str:
    """What the cache's constant channels mean, in words: a flat activation gives an empty
    mask, whose masked input is the baseline, so it costs no forward pass of its own."""
    if flat == 0:
        return "every channel varies over this photo: one forward pass each"
    many = flat != 1
    channels, verb, cost = f"{flat} channel{'s' if many else ''}", "are" if many else "is", "cost" if many else "costs"
    if zero == flat:
        return f"{channels} {verb} zero on this photo and {cost} no forward pass"
    of_them = f"{zero} of them zero" if many else "not zero"
    return f"{channels} {verb} flat (one value everywhere, {of_them}) on this photo and {cost} no forward pass"


def layer_caption(state: ExplorerState, layer: str, image: int) -> str:
    """'1280 channels of 7×7 · 839 channels are zero on this photo and cost no forward pass ·
    layer 3 of 3 cached, shallow to deep' (HTML)."""
    node = state.cache[layer]
    constant, zero = state.flat_channels(layer, image)
    parts = (
        f"{node.sizes['channel']} channels of {node.sizes['fy']}×{node.sizes['fx']}",
        flat_channels_text(constant, zero),
        f"layer {state.layers.index(layer) + 1} of {len(state.layers)} cached, shallow to deep",
    )
    return f"<span style='font-size:12px;color:#444'>{' · '.join(html.escape(part) for part in parts)}</span>"


class Controls(Panel):
    """Picture, class, preset and layer pickers, and computing layers that are missing."""

    fields = frozenset({"image", "target", "layer", "preset"})

    def __init__(self, state: ExplorerState, model: ModelLink) -> None:
        super().__init__(state)
        self.model = model
        def row() -> widgets.Layout:  # one Layout per row: hiding one row must not hide the others
            return widgets.Layout(width="auto", flex_flow="row wrap")

        self.image = widgets.Dropdown(description="Picture", options=self._image_options(), layout=widgets.Layout(width="260px"))
        self.image.layout.display = "none" if len(state.image_ids) < 2 else None
        self.target = widgets.Dropdown(description="Class", layout=widgets.Layout(width="330px"))
        self._labels = class_labels(state.class_names)
        self._label_index = {label.lower(): index for index, label in enumerate(self._labels)}
        self.search = widgets.Combobox(
            placeholder="type any class name…",
            options=tuple(self._labels),
            ensure_option=False,
            continuous_update=False,
            description="Search",
            layout=widgets.Layout(width="300px"),
        )
        self.preset = widgets.Dropdown(
            description="Preset",
            options=[(name, name) for name in state.presets],
            layout=widgets.Layout(width="240px"),
            tooltip="how scores become channel weights",
        )
        self.layer = widgets.SelectionSlider(
            description="Layer",
            options=state.layers,
            continuous_update=True,
            readout=True,
            layout=widgets.Layout(width="560px", max_width="100%"),
        )
        self.layer_info = widgets.HTML()
        self.preset_info = widgets.HTML()
        self.new_layer = widgets.Dropdown(description="Add layer", options=[], layout=widgets.Layout(width="300px"))
        self.compute = widgets.Button(description="Compute layer", icon="play", tooltip="run the masked forward passes of this layer")
        self.load_model = widgets.Button(
            description="Add a layer from the model…", icon="plus", layout=widgets.Layout(width="240px"),
            tooltip="load the model and list its layers that are not cached",
        )
        self.progress = widgets.Output(layout=widgets.Layout(width="100%"))
        self.compute_row = widgets.HBox([self.load_model, self.new_layer, self.compute], layout=row())
        self.new_layer.layout.display = "none"
        self.compute.layout.display = "none"
        if not model.available:
            self.compute_row.layout.display = "none"

        self.image.observe(lambda change: self.apply(image=change["new"]), names="value")
        self.target.observe(self._on_target, names="value")
        self.search.observe(self._on_search, names="value")
        self.preset.observe(lambda change: self.apply(preset=change["new"]), names="value")
        self.layer.observe(lambda change: self.apply(layer=change["new"]), names="value")
        self.load_model.on_click(lambda _button: self.list_model_layers())
        self.compute.on_click(lambda _button: self.compute_layer(self.new_layer.value))

        self._widget = widgets.VBox(
            [
                widgets.HBox([self.image, self.target, self.search], layout=row()),
                widgets.HBox([self.preset, self.preset_info], layout=row()),
                widgets.HBox([self.layer, self.layer_info], layout=row()),
                self.compute_row,
                self.progress,
                self.message,
            ]
        )
        self.refresh()
        if state.notice:
            self.message.value = message_html(state.notice)

    @property
    def widget(self) -> widgets.Widget:
        return self._widget

    def _image_options(self) -> list[tuple[str, int]]:
        return [(image_id, index) for index, image_id in enumerate(self.state.image_ids)]

    def _target_options(self) -> list[tuple[str, int]]:
        selection = self.state.selection
        top = self.state.predictions(selection.image)
        options = [
            (f"{self._labels[int(index)]} · {probability:.1%}", int(index))
            for index, probability in zip(top["class"].values, top.values)
        ]
        if selection.target not in {value for _, value in options}:
            probability = self.state.probability(selection.target)
            options.append((f"{self._labels[selection.target]} · {probability:.2%}", selection.target))
        return options

    def apply(self, **changes: object) -> bool:
        """As :meth:`Panel.apply`; a refused change also puts the widgets back to what the
        state shows (the layer slider does not stay on a layer that was refused)."""
        if self._syncing:
            return False
        if super().apply(**changes):
            return True
        with contextlib.suppress(ScorecamError):  # the refusal is already shown
            self._refresh(frozenset())
        return False

    def _refresh(self, changed: frozenset[str]) -> None:
        selection = self.state.selection
        with self.syncing():
            if "cache" in changed:
                self.layer.options = self.state.layers
                self.image.options = self._image_options()
                self.preset.options = [(name, name) for name in self.state.presets]
            self.image.value = selection.image
            if changed & {"cache", "image", "target"}:
                self.target.options = self._target_options()
            self.target.value = selection.target
            self.preset.value = selection.preset
            self.layer.value = selection.layer
        self.layer_info.value = layer_caption(self.state, selection.layer, selection.image)
        self.preset_info.value = f"<span style='font-size:12px;color:#444'>{PRESET_HELP.get(selection.preset, '')}</span>"

    def _on_target(self, change: dict) -> None:
        if change["new"] is not None:
            self.apply(target=int(change["new"]))

    def _on_search(self, change: dict) -> None:
        text = str(change["new"]).strip()
        if not text or self._syncing:
            return
        index = self._label_index.get(text.lower())
        # Any other text goes to the state as a class name: an unknown one is reported with the
        # closest names and stays in the box to be corrected.
        if self.apply(target=text if index is None else index):
            with self.syncing():
                self.search.value = ""  # so that searching the same name again is a change

    # ---- layers that are not cached -----------------------------------------------------

    def _in_progress(self, work: Callable[[], T]) -> T:
        """``work()`` with what it prints (the progress bar) in the progress area.

        Its exception is raised here, outside the area: in a kernel, an Output widget shows an
        exception raised inside it as a traceback and swallows it.
        """
        failure: BaseException | None = None
        with self.progress:
            try:
                return work()
            except BaseException as error:  # noqa: BLE001 - raised again below, outside the widget
                failure = error
        raise failure

    def list_model_layers(self) -> None:
        """Load the model (if needed) and offer its layers that are not cached."""
        try:
            layers = self._in_progress(lambda: self.model.uncached_layers(self.state.cache))
        except Exception as error:  # noqa: BLE001 - a model's failure must not escape into the notebook
            self.show_error(f"The model cannot be used: {error_text(error)}")
            self.compute_row.layout.display = "none"
            return
        self.new_layer.options = layers
        self.load_model.layout.display = "none"
        self.new_layer.layout.display = None
        self.compute.layout.display = None
        if not layers:
            self.message.value = message_html("Every layer of the model is cached already.", "note")

    def compute_layer(self, layer: str | None) -> None:
        """Run the masked passes of ``layer`` (progress bar in the panel), add it, select it."""
        if not layer:
            self.show_error("Choose a layer to compute first.")
            return
        from scorecam_explorer.explorer.model_link import compute_layers

        self.compute.disabled = True
        self.message.value = message_html(f"Computing {layer}: one forward pass per channel…", "note")
        try:
            cache = self._in_progress(
                lambda: compute_layers(self.state.cache, self.model.get(), [layer], progress=True)
            )
        except Exception as error:  # noqa: BLE001 - never left on "Computing …"; nothing escapes
            self.progress.clear_output()
            self.show_error(f"Could not compute {layer}: {error_text(error)}")
            if not self.model.available:  # the model itself is unusable
                self.compute_row.layout.display = "none"
            return
        finally:
            self.compute.disabled = False
        self.progress.clear_output()
        self.new_layer.options = [name for name in self.new_layer.options if name != layer]
        self.state.replace_cache(cache, layer=layer)
        self.message.value = message_html(f"Added {layer}; it is now on the layer scrubber.", "note")
