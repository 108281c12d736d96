"""What every panel shares: listening to the state, showing errors in place, and showing a
new figure in a FigureWidget with one message."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator
from typing import Any

import ipywidgets as widgets
import numpy as np
from plotly.basedatatypes import Undefined

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer.plotly_loader import FigureWidget, has_front_end, sync_full_state
from scorecam_explorer.explorer.state import ExplorerState

Spec = dict[str, Any]
_MISSING = object()


def _same(old: Any, new: Any) -> bool:
    """Whether two spec values are equal (arrays compared element by element)."""
    if isinstance(old, np.ndarray) or isinstance(new, np.ndarray):
        return (
            isinstance(old, np.ndarray)
            and isinstance(new, np.ndarray)
            and old.shape == new.shape
            and old.dtype == new.dtype
            and bool(np.array_equal(old, new))
        )
    try:
        return bool(old == new)
    except ValueError:  # containers holding arrays
        return False


def _dict_lists(old: Any, new: Any) -> bool:
    return (
        isinstance(old, list)
        and isinstance(new, list)
        and len(old) == len(new)
        and all(isinstance(item, dict) for item in old)
        and all(isinstance(item, dict) for item in new)
    )


def spec_changes(old: Spec, new: Spec, prefix: str = "") -> dict[str, Any]:
    """The leaves of ``new`` that differ from ``old``, as dotted paths ("marker.color")."""
    changes: dict[str, Any] = {}
    for key, value in new.items():
        path = f"{prefix}{key}"
        previous = old.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(previous, dict) and "bdata" not in value:  # typed arrays are leaves
            changes.update(spec_changes(previous, value, path + "."))
        elif _dict_lists(previous, value):
            # annotations, shapes: send the changed fields of each item, not the whole list again
            for index, (old_item, new_item) in enumerate(zip(previous, value)):
                changes.update(spec_changes(old_item, new_item, f"{path}[{index}]."))
        elif previous is _MISSING or not _same(previous, value):
            changes[path] = value
    return changes


class LiveFigure:
    """A FigureWidget and the spec it shows; :meth:`show` sends only what changed.

    Specs are the plain-dict figures of :mod:`scorecam_explorer.figures`; the first one is
    validated by Plotly when the widget is built. Every :meth:`show` is one
    ``plotly_update`` (what ``batch_update`` sends when it closes), so the browser gets one
    update message per change, none when nothing changed. Building ``go.Figure`` objects,
    or assigning properties one by one through Plotly's validators, on every interaction
    would cost more than everything else together; comparing dicts costs almost nothing.
    """

    def __init__(self, spec: Spec) -> None:
        self.widget = FigureWidget(spec)
        self.spec = spec
        # True once the browser has drawn the figure (its view reports back).
        self.drawn = False
        self.widget.on_rendered(self._on_rendered)

    def _on_rendered(self) -> None:
        self.drawn = True

    def show(self, spec: Spec) -> None:
        """Make the widget show ``spec``."""
        old_traces, new_traces = self.spec["data"], spec["data"]
        if len(old_traces) != len(new_traces) or any(a.get("type") != b.get("type") for a, b in zip(old_traces, new_traces)):
            # Another number of traces (a layer with fewer channels than gallery tiles): redraw all.
            with self.widget.batch_update():
                self.widget.data = ()
                self.widget.add_traces(new_traces)
                self.widget.layout = spec["layout"]
            self.spec = spec
            if not self.drawn and has_front_end(self.widget):
                sync_full_state(self.widget)
            return
        trace_changes = [spec_changes(a, b) for a, b in zip(old_traces, new_traces)]
        layout_changes = spec_changes(self.spec["layout"], spec["layout"])
        self.spec = spec
        if not layout_changes and not any(trace_changes):
            return
        # One value per trace for every changed path; Undefined leaves a trace as it is.
        restyle: dict[str, list[Any]] = {}
        for index, changes in enumerate(trace_changes):
            for path, value in changes.items():
                restyle.setdefault(path, [Undefined] * len(new_traces))[index] = value
        self.widget.plotly_update(
            restyle_data=restyle, relayout_data=layout_changes, trace_indexes=list(range(len(new_traces)))
        )
        if not self.drawn and has_front_end(self.widget):
            # A view drawn later starts from this state, so it misses none of the updates.
            sync_full_state(self.widget)


def scrolling(figure: widgets.Widget) -> widgets.Box:
    """A full-width figure in a box that scrolls sideways when the column is narrower than
    the figure (JupyterLab with its side bar open), instead of cutting it off."""
    return widgets.Box([figure], layout=widgets.Layout(width="100%", overflow="auto hidden"))


def message_html(text: str, kind: str = "error") -> str:
    """A short coloured note for a panel (``kind``: error, note)."""
    colour = {"error": "#b00020", "note": "#555"}.get(kind, "#555")
    icon = "⚠ " if kind == "error" else ""
    return f"<div style='color:{colour};font-size:12px;margin:2px 0'>{icon}{html.escape(text)}</div>"


class Panel:
    """A part of the explorer: widgets, a state it listens to, and an in-place message area.

    Subclasses set :attr:`fields` (the selection fields that make them redraw), build
    their widgets in ``__init__`` and implement :meth:`_refresh`. A ScorecamError raised
    while refreshing is shown in the panel, never raised into the notebook.
    """

    fields: frozenset[str] = frozenset()

    def __init__(self, state: ExplorerState) -> None:
        self.state = state
        self.message = widgets.HTML(value="")
        self._syncing = False
        state.observe(self._on_state)

    @property
    def widget(self) -> widgets.Widget:
        raise NotImplementedError

    def _on_state(self, changed: frozenset[str]) -> None:
        if changed & (self.fields | {"cache"}):
            self.refresh(changed)

    def refresh(self, changed: frozenset[str] = frozenset({"cache"})) -> None:
        """Redraw for ``changed`` fields; errors become a message in the panel."""
        try:
            self._refresh(changed)
        except ScorecamError as error:
            self.show_error(str(error))
        else:
            if self.message.value:
                self.message.value = ""

    def _refresh(self, changed: frozenset[str]) -> None:
        raise NotImplementedError

    def show_error(self, text: str) -> None:
        self.message.value = message_html(text)

    def show_note(self, text: str) -> None:
        self.message.value = message_html(text, "note") if text else ""

    def apply(self, **changes: object) -> bool:
        """Change the state from a widget; a bad value is shown here. Returns success."""
        if self._syncing:
            return False
        self.message.value = ""
        try:
            self.state.update(**changes)
        except ScorecamError as error:
            self.show_error(str(error))
            return False
        return True

    @contextlib.contextmanager
    def syncing(self) -> Iterator[None]:
        """Set widget values from the state without feeding them back into it."""
        previous, self._syncing = self._syncing, True
        try:
            yield
        finally:
            self._syncing = previous
