"""Plotly figure widgets that load plotly.js once per page, not once per figure.

Plotly's ``FigureWidget`` is an anywidget whose front-end module is the whole plotly.js
widget bundle (about 5 MB). Every figure ships and evaluates its own copy, and anywidget
gives a model two seconds to load its module: when several figures load at once (the
explorer has six) the later ones miss that deadline and then drop every message sent to
them, so they never update. Here the bundle travels once, in a hidden
:class:`PlotlyBundle` widget that imports it in the background, and each
:class:`FigureWidget` carries a few lines that wait for it: every model is ready at once,
and figures draw as soon as plotly.js is there.

A figure drawn late must not miss the updates sent before it was drawn: until its view
reports back, :class:`~scorecam_explorer.explorer.panel.LiveFigure` also refreshes the state
the view is drawn from (see :func:`sync_full_state`).

Clicks and "drawn" reports come back as custom widget messages, not through Plotly's own
``_js2py_*`` state updates. ipywidgets sends a model's state updates one at a time, each after
the kernel has answered the one before; an answer lost when the page's kernel connection is
re-established (Voila does this once while the page opens) holds back every later update of
that model for good, so Plotly's ``on_click`` callbacks never ran in the app. Custom
messages are not held back.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from functools import lru_cache
from pathlib import Path
from typing import Any

import anywidget
import plotly.graph_objects as go
import traitlets
from comm.base_comm import BaseComm

# A promise on the page, shared by every figure, resolved with plotly's widget factory.
_SLOT_JS = """
const KEY = Symbol.for("scorecam_explorer.plotly_widget");
function slot() {
  let entry = globalThis[KEY];
  if (!entry) {
    let resolve, reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    entry = globalThis[KEY] = { promise, resolve, reject, loading: false };
  }
  return entry;
}
"""

_LOADER_ESM = (
    _SLOT_JS
    + """
export default {
  initialize({ model }) {
    const entry = slot();
    if (entry.loading) return;
    entry.loading = true;
    const url = URL.createObjectURL(new Blob([model.get("_bundle")], { type: "text/javascript" }));
    import(/* webpackIgnore: true */ /* @vite-ignore */ url).then(
      (module) => { URL.revokeObjectURL(url); entry.resolve(module.default); },
      (error) => { entry.loading = false; console.error("[scorecam_explorer] plotly.js failed to load", error); },
    );
  },
  render({ el }) { el.style.display = "none"; },
};
"""
)

_FIGURE_ESM = (
    _SLOT_JS
    + """
export default () => {
  let plotly = null;
  function ready(model) {
    plotly ??= slot().promise.then((factory) => {
      const widget = factory();
      widget.initialize({ model });
      return widget;
    });
    return plotly;
  }
  return {
    initialize({ model }) { ready(model); },
    async render({ model, el }) {
      const widget = await ready(model);
      // Plotly's view registers its own listeners, then announces itself with this event;
      // ours go on the same graph div after it.
      const onRendered = (event) => {
        if (event.detail?.element !== el) return;
        document.removeEventListener("plotlywidget-after-render", onRendered);
        el.on("plotly_click", (data) => {
          const points = (data?.points ?? []).map((p) => ({ trace: p.curveNumber, point: p.pointNumber }));
          if (points.length) model.send({ event: "click", points });
        });
        model.send({ event: "rendered" });
      };
      document.addEventListener("plotlywidget-after-render", onRendered);
      const remove = widget.render({ model, el });
      return () => {
        document.removeEventListener("plotlywidget-after-render", onRendered);
        if (typeof remove === "function") remove();
      };
    },
  };
};
"""
)


@lru_cache(maxsize=1)
def _bundle_text() -> str:
    """The plotly.js widget bundle that ``plotly.graph_objects.FigureWidget`` ships."""
    esm = go.FigureWidget._esm
    return Path(esm).read_text(encoding="utf-8") if isinstance(esm, Path) else str(esm)


class PlotlyBundle(anywidget.AnyWidget):
    """An invisible widget that brings plotly.js to the page once; show it before figures."""

    _esm = _LOADER_ESM
    _bundle = traitlets.Unicode().tag(sync=True)

    def __init__(self) -> None:
        super().__init__(_bundle=_bundle_text())


PointClick = Callable[[int, int], None]
"""Called with (trace index, point index) of a clicked point."""


class FigureWidget(go.FigureWidget):
    """Plotly's FigureWidget, drawn with the plotly.js of a :class:`PlotlyBundle` on the page.

    :meth:`on_point_click` and :meth:`on_rendered` take the place of Plotly's ``on_click`` and
    layout-delta reports (see the module's docstring for why).
    """

    _esm = _FIGURE_ESM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._point_click_callbacks: list[PointClick] = []
        self._rendered_callbacks: list[Callable[[], None]] = []
        self.on_msg(self._on_front_end_message)

    def on_point_click(self, callback: PointClick) -> None:
        """Call ``callback(trace, point)`` for the first point of every click in the browser."""
        self._point_click_callbacks.append(callback)

    def on_rendered(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time a view of the figure has been drawn in the browser."""
        self._rendered_callbacks.append(callback)

    def _on_front_end_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict):
            return
        if content.get("event") == "rendered":
            for callback in list(self._rendered_callbacks):
                callback()
        elif content.get("event") == "click":
            points = content.get("points") or []
            first = points[0] if isinstance(points, list) and points else None
            if not isinstance(first, dict):
                return
            trace, point = first.get("trace"), first.get("point")
            if isinstance(trace, int) and isinstance(point, int):
                for callback in list(self._point_click_callbacks):
                    callback(trace, point)


def has_front_end(widget: FigureWidget) -> bool:
    """Whether a kernel connects the widget to a front end (not so in tests and benchmarks)."""
    comm = getattr(widget, "comm", None)
    return isinstance(comm, BaseComm) and type(comm).__name__ != "DummyComm"


def sync_full_state(widget: FigureWidget) -> None:
    """Send the whole figure as the state a view is drawn from (as Plotly does on display)."""
    widget._widget_layout = deepcopy(widget._layout_obj._props)
    widget._widget_data = deepcopy(widget._data)
