"""Counting the pages a Voila server is serving, to turn visitors away above a limit.

A *session* is a kernel handed to a page (a pre-started one from the pool, or one started
for the request) while the page is connected to it, or, until it first connects, for
``grace`` seconds after it was handed out (the page is still loading its scripts); plus page
requests still being answered. A closed page stops counting once its connection closes; its kernel is freed
later by the culler.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Ticket:
    """One page request being answered; ``claimed`` once it got its kernel."""

    claimed: bool = False


_current: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar("scorecam_page_request", default=None)


@dataclass
class SessionRegistry:
    """Sessions of one server. ``max_sessions`` 0 means no limit."""

    kernel_manager: Any
    max_sessions: int = 0
    grace: float = 60.0
    clock: Callable[[], float] = time.monotonic
    claims: dict[str, float] = field(default_factory=dict)
    _open: dict[int, _Ticket] = field(default_factory=dict)
    _connected_once: set[str] = field(default_factory=set)

    def watch(self) -> None:
        """Record which kernels the page requests get (wraps the kernel manager's two ways of
        handing out a kernel: from the pool, or started for the request)."""
        manager = self.kernel_manager
        registry = self
        if hasattr(manager, "get_rendered_notebook"):
            pooled = manager.get_rendered_notebook

            async def get_rendered_notebook(*args: Any, **kwargs: Any) -> Any:
                result = await pooled(*args, **kwargs)
                registry.claim(result[2])
                return result

            manager.get_rendered_notebook = get_rendered_notebook
        started = manager.start_kernel

        async def start_kernel(*args: Any, **kwargs: Any) -> str:
            kernel_id = await started(*args, **kwargs)
            if _current.get() is not None:  # started for a page request, not for the pool
                registry.claim(kernel_id)
            return kernel_id

        manager.start_kernel = start_kernel

    def claim(self, kernel_id: str) -> None:
        """``kernel_id`` now serves the page of the current request."""
        self.claims[kernel_id] = self.clock()
        ticket = _current.get()
        if ticket is not None:
            ticket.claimed = True

    def begin_request(self) -> int:
        """Count a page request from now until :meth:`end_request`."""
        ticket = _Ticket()
        _current.set(ticket)
        self._open[id(ticket)] = ticket
        return id(ticket)

    def end_request(self, token: int) -> None:
        self._open.pop(token, None)

    def active(self) -> int:
        """Sessions now: connected or recently handed-out kernels, plus unanswered requests."""
        alive = set(self.kernel_manager.list_kernel_ids())
        for kernel_id in [kid for kid in self.claims if kid not in alive]:
            del self.claims[kernel_id]
            self._connected_once.discard(kernel_id)
        connections = getattr(self.kernel_manager, "_kernel_connections", {})
        now = self.clock()
        count = 0
        for kernel_id, since in self.claims.items():
            if connections.get(kernel_id, 0) > 0:
                self._connected_once.add(kernel_id)
                count += 1
            elif kernel_id not in self._connected_once and now - since < self.grace:
                count += 1  # still loading
        return count + sum(1 for ticket in self._open.values() if not ticket.claimed)

    def loading(self, kernel_id: str) -> bool:
        """True while ``kernel_id`` was handed to a page that has not connected yet, within
        ``grace`` seconds: such a kernel is never culled (its page is still loading)."""
        since = self.claims.get(kernel_id)
        if since is None or kernel_id in self._connected_once:
            return False
        if getattr(self.kernel_manager, "_kernel_connections", {}).get(kernel_id, 0) > 0:
            self._connected_once.add(kernel_id)
            return False
        return self.clock() - since < self.grace

    def protect_loading_pages(self) -> None:
        """Make the kernel manager's culler skip kernels of pages still loading (a page can take
        longer than the cull timeout to connect on a busy machine)."""
        manager = self.kernel_manager
        original = manager.cull_kernel_if_idle
        registry = self

        async def cull_kernel_if_idle(kernel_id: str) -> Any:
            if registry.loading(kernel_id):
                return None
            result = original(kernel_id)
            return await result if hasattr(result, "__await__") else result

        manager.cull_kernel_if_idle = cull_kernel_if_idle

    def full(self) -> bool:
        """True when a new page would exceed ``max_sessions``."""
        return self.max_sessions > 0 and self.active() >= self.max_sessions


FULL_PAGE_RETRY_SECONDS = 30


def full_page(max_sessions: int, retry_seconds: int = FULL_PAGE_RETRY_SECONDS) -> str:
    """The page a visitor gets when every place is taken (it reloads itself)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>The class is full - Score-CAM explorer</title>
<meta http-equiv="refresh" content="{int(retry_seconds)}">
<style>body{{font-family:sans-serif;margin:4em auto;max-width:40em;line-height:1.5;color:#222}}
h1{{font-size:1.5em}}</style></head>
<body><h1 id="class-full">The class is full</h1>
<p>All {int(max_sessions)} places of this Score-CAM explorer are taken.
A place frees up when someone closes their page.</p>
<p>This page tries again every {int(retry_seconds)} seconds; you can also reload it.
If you are the teacher, start the app with a larger <code>--max-sessions</code>.</p>
</body></html>
"""
