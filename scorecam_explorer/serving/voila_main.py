"""The Voila server of ``scorecam-explorer app``: Voila with a session limit and quiet logs.

Run as ``python -m scorecam_explorer.serving.voila_main NOTEBOOK [Voila options]``. Beyond
Voila it adds:

- ``--AppVoila.max_sessions=N``: above N pages at once, a visitor gets a short "the class is
  full" page (HTTP 503, reloading itself) instead of a kernel (0: no limit);
  ``--AppVoila.session_grace=S``: how long a page still loading counts before it connects.
- Only kernels of the pool that are ready are handed out: pages arriving together do not
  queue behind the pool's refill (:func:`use_only_ready_pool_kernels`).
- The warning "Notebook ... is not trusted" is not logged: trust decides whether stored
  outputs of a notebook are shown, and the app's notebook stores none (Voila runs it and
  shows only what it outputs then).
"""

from __future__ import annotations

import logging
from typing import Any

from scorecam_explorer.serving.kernel import skip_slow_optional_imports

skip_slow_optional_imports()

from traitlets import Float, Integer  # noqa: E402
from voila.app import Voila  # noqa: E402
from voila.tornado.handler import TornadoVoilaHandler  # noqa: E402

from scorecam_explorer.serving.sessions import FULL_PAGE_RETRY_SECONDS, SessionRegistry, full_page  # noqa: E402


class _NotTrustedFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is not trusted" not in str(record.msg)


class LimitedVoilaHandler(TornadoVoilaHandler):
    """Voila's page handler, answering "the class is full" above the session limit."""

    def initialize(self, **kwargs: Any) -> None:
        self.sessions: SessionRegistry = kwargs.pop("sessions")
        super().initialize(**kwargs)

    async def get(self, path: str | None = None) -> None:
        if path:  # not the page itself (Voila redirects other paths to files)
            await super().get(path)
            return
        if self.sessions.full():
            self.log.warning("the class is full (%d sessions): a visitor got the 'class is full' page", self.sessions.max_sessions)
            self.set_status(503)
            self.set_header("Retry-After", str(FULL_PAGE_RETRY_SECONDS))
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.finish(full_page(self.sessions.max_sessions))
            return
        token = self.sessions.begin_request()
        try:
            await super().get(path)
        finally:
            self.sessions.end_request(token)


def _ready(task: Any) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def use_only_ready_pool_kernels(manager: Any) -> None:
    """Hand a page a pooled kernel only if one is ready; otherwise start one for it.

    Voila counts the pool's kernels still starting as available, so that page requests
    arriving together queue behind the pool's refill, one kernel at a time (10 pages opened
    at once took over a minute). Counting only the ready ones lets Voila start a kernel for
    each further page at once; a ready kernel is always the one handed out.
    """
    if not hasattr(manager, "_pools") or not hasattr(manager, "get_rendered_notebook"):
        return
    handed_out = manager.get_rendered_notebook

    def get_pool_size(notebook_name: str) -> int:
        return sum(1 for task in manager._pools.get(notebook_name, []) if _ready(task))

    async def get_rendered_notebook(notebook_name: str, *args: Any, **kwargs: Any) -> Any:
        pool = manager._pools.get(notebook_name, [])
        ready = [task for task in pool if _ready(task)]
        if ready:  # the ready one first: Voila takes the first
            pool.remove(ready[0])
            pool.insert(0, ready[0])
        return await handed_out(notebook_name, *args, **kwargs)

    manager.get_pool_size = get_pool_size
    manager.get_rendered_notebook = get_rendered_notebook


class AppVoila(Voila):
    """Voila serving one notebook to a limited number of pages at once."""

    max_sessions = Integer(0, config=True, help="Most pages served at once (0: no limit).")
    session_grace = Float(
        120.0, config=True, help="Seconds a page handed a kernel counts (and is not culled) before it connects."
    )

    def init_settings(self) -> dict[str, Any]:
        settings = super().init_settings()
        self.log.addFilter(_NotTrustedFilter())
        use_only_ready_pool_kernels(self.kernel_manager)
        self.sessions = SessionRegistry(self.kernel_manager, max_sessions=self.max_sessions, grace=self.session_grace)
        self.sessions.watch()
        self.sessions.protect_loading_pages()
        return settings

    def init_handlers(self) -> list:
        handlers = super().init_handlers()
        replaced = []
        for handler in handlers:
            if len(handler) == 3 and handler[1] is TornadoVoilaHandler:
                handler = (handler[0], LimitedVoilaHandler, {**handler[2], "sessions": self.sessions})
            replaced.append(handler)
        return replaced


main = AppVoila.launch_instance

if __name__ == "__main__":
    main()
