"""What a page of the app shows: the command's progress until the cache is ready, then the
explorer; a clear message, never a traceback, when something goes wrong.

The app notebook calls :func:`app_page`. The page is one ``VBox`` whose children change:
a status line and a progress bar first (with, on a warm start, the explorer of the cache
served last time, shown while the command checks that it still matches), then the explorer. The cell returns at once (Voila,
and its pool of pre-started kernels, render it immediately); an asyncio task in the kernel
polls the status file and swaps the explorer in when the command says it is ready.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.serving.status import ENV_APP_STATUS, AppStatus, read_status

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
"""How often a waiting page reads the status file."""

_tasks: set[asyncio.Task] = set()  # keeps the polling tasks alive until they finish


def message_html(title: str, detail: str = "", *, kind: str = "info") -> str:
    """A short boxed message for the page (escaped)."""
    colour = {"info": "#1f6feb", "error": "#b42318"}[kind]
    body = f"<div style='margin-top:4px'>{html.escape(detail)}</div>" if detail else ""
    return (
        f"<div class='scorecam-app-message' style='border-left:4px solid {colour};padding:8px 12px;"
        f"font-family:sans-serif;max-width:60em'><b>{html.escape(title)}</b>{body}</div>"
    )


class AppPage:
    """The page's widget tree and the work of filling it."""

    def __init__(self) -> None:
        self.message = widgets.HTML(message_html("Starting the Score-CAM explorer ..."))
        self.bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="30em"))
        self.widget = widgets.VBox([self.message, self.bar])
        self.explorer: Any = None
        self._early: EarlyExplorer | None = None

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def show_status(self, status: AppStatus) -> None:
        """Show what the command is doing (state, step k of n)."""
        if self._previewing():
            detail = "This is the cache served last time; it is replaced if the check finds that it no longer matches."
        else:
            detail = "The map appears here as soon as the cache is ready; you can leave this page open."
        self.message.value = message_html(status.describe() + " ...", detail)
        self.bar.value = status.fraction
        self.bar.bar_style = ""

    def _previewing(self) -> bool:
        return self._early is not None and self._early.explorer is not None and self.explorer is None

    def preview(self) -> None:
        """Show the explorer opened in advance under the status line, until the command confirms
        it (or replaces it, or says why not)."""
        if self._previewing():
            self.widget.children = (self.message, self.bar, self._early.explorer.widget)

    def show_error(self, title: str, detail: str) -> None:
        """Replace everything with a message (the kernel log keeps the details)."""
        self.message.value = message_html(title, detail, kind="error")
        self.widget.children = (self.message,)

    def open(self, cache: str, model: str, weights: str) -> None:
        """Show the explorer of ``cache``; a clear message if that fails."""
        self.message.value = message_html("Opening the explorer ...")
        self.bar.value = 1.0
        try:
            self.explorer = build_explorer(cache, ModelSpec(model, weights))
        except Exception as error:  # noqa: BLE001
            self._refused(error)
            return
        self.widget.children = shown(self.explorer)

    async def open_async(self, cache: str, model: str, weights: str, snapshot: str = "") -> None:
        """Show the explorer of ``cache`` (the one opened in advance if it is the same,
        unchanged; else from the command's ``snapshot`` of it if there is one); a clear
        message if that fails."""
        self.message.value = message_html("Opening the explorer ...")
        self.bar.value = 1.0
        spec = ModelSpec(model, weights)
        try:
            explorer = self._early.take(cache, spec) if self._early is not None else None
            if explorer is None and snapshot:
                explorer = explorer_of_snapshot(Path(snapshot), spec)
            self.explorer = explorer or await build_explorer_async(cache, spec)
        except Exception as error:  # noqa: BLE001
            self._refused(error)
            return
        self.widget.children = shown(self.explorer)

    def _refused(self, error: Exception) -> None:
        """Say why the explorer cannot be shown (the kernel log keeps the traceback)."""
        if isinstance(error, ScorecamError):
            self.show_error(
                "The cache cannot be opened",
                f"{error} If the app is still running, the cache was removed or changed while it ran: "
                "stop `scorecam-explorer app` (Ctrl-C) and start it again to compute it afresh.",
            )
            return
        log.error("the explorer could not be built", exc_info=error)
        self.show_error("The explorer could not start", f"{type(error).__name__}: {error}")

    async def follow(self, status_path: Path, poll_seconds: float = POLL_SECONDS) -> None:
        """Poll the status file until the command is ready (then open) or failed.

        While the command is still checking, the cache it names as ``candidate`` (the one it
        served last time for the same options) is opened in advance and shown under the status
        line; the command's ``ready`` confirms it (same cache, unchanged) or replaces it, and
        ``failed`` replaces it with the reason.
        """
        last: AppStatus | None = None
        try:
            while True:
                status = read_status(status_path)
                if status is not None and status != last:
                    last = status
                    if status.state == "ready":
                        await self.open_async(status.cache, status.model, status.weights, status.snapshot)
                        return
                    if status.state == "failed":
                        self.show_error("The explorer could not start", status.message)
                        return
                    self.show_status(status)
                    if status.candidate and self._early is None:
                        self._early = await EarlyExplorer.build(status.candidate, ModelSpec(status.model, status.weights))
                        self.preview()
                        last = None  # that took a while: read the status again at once, and show it
                        continue
                await asyncio.sleep(poll_seconds)
        except Exception as error:  # noqa: BLE001
            log.exception("following the app's status failed")
            self.show_error("The explorer could not start", f"{type(error).__name__}: {error}")


class ModelSpec:
    """The model a page may load on request (to add a layer, run Grad-CAM); settable until then.

    ``name`` empty means the model named in the cache; ``weights`` ``"none"``: random weights.
    """

    def __init__(self, name: str = "", weights: str = "DEFAULT", cached: str = "") -> None:
        self.name, self.weights, self.cached = name, weights, cached

    @property
    def resolved(self) -> str:
        return self.name or self.cached

    def load(self) -> Any:
        from scorecam_explorer.models import load_model

        return load_model(self.resolved, weights=None if self.weights.lower() == "none" else self.weights)


def build_explorer(cache: str, spec: ModelSpec) -> Any:
    """The explorer of the cache (or dataset store, opened lazily) at ``cache``; the model
    (``spec``) is loaded only on request."""
    from scorecam_explorer.serving.app_cache import open_for_app

    return explorer_of(*open_for_app(Path(cache)), spec=spec)


async def build_explorer_async(cache: str, spec: ModelSpec) -> Any:
    """:func:`build_explorer`, reading the cache in a thread so that the page keeps updating."""
    from scorecam_explorer.serving.app_cache import open_for_app

    return explorer_of(*await asyncio.to_thread(open_for_app, Path(cache)), spec=spec)


def explorer_of_snapshot(path: Path, spec: ModelSpec) -> Any:
    """The explorer of the command's snapshot of the cache; None if it cannot be read."""
    import pickle

    try:
        with open(path, "rb") as stream:
            data = pickle.load(stream)  # written by this app's command, in its private folder
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None
    return explorer_of(data, spec=spec)


def explorer_of(data: Any, note: str = "", *, spec: ModelSpec) -> Any:
    """The explorer of a loaded cache, or of a lazily opened dataset store (widgets are made
    here, in the kernel's own thread); ``note`` is shown above it.

    A dataset store gets no model: adding a layer would read every image's input, and the
    panels need none (Grad-CAM in Compare and Metrics' deletion / insertion then say so).
    """
    from scorecam_explorer.explorer import Explorer

    spec.cached = str(data.attrs.get("model_name", ""))
    dataset = bool(data.attrs.get("dataset_store"))
    explorer = Explorer(data, model=spec.load if spec.resolved and not dataset else None)
    explorer.model_spec = spec
    explorer.app_note = note
    return explorer


def shown(explorer: Any) -> tuple[widgets.Widget, ...]:
    """The page's children for ``explorer``: its note (if any) above it."""
    note = getattr(explorer, "app_note", "")
    if not note:
        return (explorer.widget,)
    return (widgets.HTML(message_html(note[0].upper() + note[1:])), explorer.widget)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a cache is replaced or rewritten (its folder and root metadata)."""
    try:
        folder, root = path.stat(), (path / "zarr.json").stat()
    except OSError:
        return None
    return folder.st_ino, folder.st_mtime_ns, root.st_mtime_ns


class EarlyExplorer:
    """An explorer opened before the command said it was ready, and what it was opened for."""

    def __init__(self, path: Path, signature: tuple[int, int, int] | None, explorer: Any) -> None:
        self.path, self.signature, self.explorer = path, signature, explorer

    @classmethod
    async def build(cls, cache: str, spec: ModelSpec) -> EarlyExplorer:
        path = Path(cache).resolve()
        signature = _signature(path)
        try:
            explorer = await build_explorer_async(str(path), spec)
        except Exception:  # noqa: BLE001 - only a head start: the command decides what is served
            explorer = None
        return cls(path, signature, explorer)

    def take(self, cache: str, spec: ModelSpec) -> Any:
        """The explorer if it is of ``cache``, unchanged since, with the model of ``spec``
        available as it was; else None. It can be taken once."""
        explorer, self.explorer = self.explorer, None
        if explorer is None or Path(cache).resolve() != self.path or self.signature is None:
            return None
        if _signature(self.path) != self.signature:
            return None
        early: ModelSpec = explorer.model_spec
        if bool(early.resolved) != bool(spec.name or early.cached):
            return None
        early.name, early.weights = spec.name, spec.weights  # the model loads (if ever) as the command says
        return explorer


def app_page(environ: Mapping[str, str] | None = None) -> AppPage:
    """The page the app notebook shows.

    With ``SCORECAM_EXPLORER_APP_STATUS`` set (by the command), it follows the status file;
    with only ``SCORECAM_EXPLORER_APP_CACHE`` set, it opens that cache now.
    """
    from scorecam_explorer.webapp import ENV_APP_CACHE, ENV_APP_MODEL, ENV_APP_WEIGHTS

    env = os.environ if environ is None else environ
    page = AppPage()
    status_path = env.get(ENV_APP_STATUS)
    if status_path:
        page.show_status(read_status(Path(status_path)) or AppStatus("starting"))
        task = asyncio.get_event_loop().create_task(page.follow(Path(status_path)))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
    elif env.get(ENV_APP_CACHE):
        page.open(env[ENV_APP_CACHE], env.get(ENV_APP_MODEL, ""), env.get(ENV_APP_WEIGHTS, "DEFAULT"))
    else:
        page.show_error(
            "No cache to show", f"{ENV_APP_STATUS} and {ENV_APP_CACHE} are not set: start the app with `scorecam-explorer app`."
        )
    return page
