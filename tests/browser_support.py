"""Helpers for the browser tests: servers in their own process group, Debian's Chromium
driven by Playwright with every outside request blocked, reading Plotly figures out of the
page, waiting, and screenshots.

Nothing here downloads anything: Chromium is Debian's (``scripts/install-browser.sh``) and
the page may talk to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
"""Screenshots and server logs of the browser tests (git-ignored)."""

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "bash scripts/install-browser.sh"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
HOST = "127.0.0.1"

T = TypeVar("T")


# ---- the browser --------------------------------------------------------------------------


def require_chromium() -> Path:
    """Debian's Chromium, or fail (never skip) saying how to install it."""
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"the browser tests need Debian's Chromium at {CHROMIUM}, which is missing: run `{INSTALL_HINT}` "
            "(never `playwright install`)."
        )
    if importlib.util.find_spec("playwright") is None:
        pytest.fail('the browser tests need Playwright\'s Python package: pip install -e ".[test]"')
    return CHROMIUM


@contextmanager
def chromium_browser() -> Iterator[Any]:
    """A headless Chromium (Debian's), closed afterwards."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=LAUNCH_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


KNOWN_OUTSIDE_REQUESTS = ("https://cdn.jsdelivr.net/npm/@fortawesome/fontawesome-free@",)
"""Outside requests a page may attempt (they are blocked): Voila's template links this icon
font's stylesheets; offline, icons fall back to the bundled ones."""


def _known_outside(url: str) -> bool:
    return url.startswith(KNOWN_OUTSIDE_REQUESTS)


PLOTLY_WARNING = "WARN: "
"""How plotly.js starts a warning it logs (with ``console.trace``), such as "Invalid color
specifier": a figure given values plotly.js does not accept."""


@dataclass
class PageWatch:
    """Everything a page did wrong: uncaught errors, console errors, plotly.js warnings,
    outside requests.

    Every request that is not to 127.0.0.1 or localhost is blocked. The only ones allowed to
    be attempted are :data:`KNOWN_OUTSIDE_REQUESTS` (Voila's template asks a CDN for an icon
    font), and the console error of their failed load is the only harmless one.
    """

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[tuple[str, str]] = field(default_factory=list)
    plotly_warnings: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    harmless_page_errors: tuple[str, ...] = ()
    """Page errors of the notebook application itself, known to occur with any notebook."""

    def attach(self, page: Any) -> None:
        """Block outside requests and record errors of ``page``."""
        page.route("**/*", self._route)
        page.on("pageerror", lambda error: self.page_errors.append(f"{error.name}: {error.message}"))
        page.on("console", self._on_console)

    def _route(self, route: Any) -> None:
        url = route.request.url
        parsed = urlparse(url)
        if parsed.scheme in ("data", "blob") or parsed.hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def _on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append((message.text, str(message.location.get("url", ""))))
        elif message.text.startswith(PLOTLY_WARNING):
            self.plotly_warnings.append(message.text[len(PLOTLY_WARNING) :])

    def problems(self) -> list[str]:
        """The errors that are not known to be harmless, one line each."""
        found = [f"page error: {text}" for text in self.page_errors if text not in self.harmless_page_errors]
        found += [f"request outside 127.0.0.1 (blocked): {url}" for url in self.blocked if not _known_outside(url)]
        for text, url in self.console_errors:
            if text.startswith("Failed to load resource") and url in self.blocked and _known_outside(url):
                continue
            found.append(f"console error: {text} ({url})" if url else f"console error: {text}")
        for text in dict.fromkeys(self.plotly_warnings):  # once each, however often it was logged
            count = self.plotly_warnings.count(text)
            found.append(f"plotly.js warning: {text}" + (f" ({count} times)" if count > 1 else ""))
        return found

    def assert_clean(self, where: str) -> None:
        problems = self.problems()
        assert not problems, f"{where}: the page reported {len(problems)} error(s):\n" + "\n".join(problems)


# ---- servers ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A server process (its own process group) listening on 127.0.0.1:``port``."""

    process: subprocess.Popen
    port: int
    log_path: Path

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}{path}"

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_server(server: Server) -> None:
    """Stop the server and everything it started (its process group): TERM, then KILL."""
    process = server.process
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        group = None
    if group is not None:
        with _ignore_missing():
            os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    if group is not None:
        with _ignore_missing():
            os.killpg(group, signal.SIGKILL)  # kernels and anything else left in the group
    if process.poll() is None:
        process.wait(timeout=10)


@contextmanager
def _ignore_missing() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def running_server(
    command: Sequence[str],
    *,
    port: int,
    ready_path: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 180.0,
) -> Iterator[Server]:
    """Start ``command`` in a new process group, wait until ``ready_path`` answers 200, yield,
    and always stop the whole group afterwards.

    A static file makes a good ``ready_path``: Voila starts a kernel for ``/``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    server = Server(process, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(server.url(ready_path)):
            if process.poll() is not None:
                raise AssertionError(
                    f"the server exited with status {process.returncode} before answering:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer {ready_path} within {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        stop_server(server)


# ---- waiting ------------------------------------------------------------------------------


def wait_until(check: Callable[[], T], *, timeout: float, what: str, page: Any = None, interval: float = 0.25) -> T:
    """Call ``check`` until it returns something truthy; fail saying ``what`` did not happen.

    Give the ``page`` whenever one is open: Playwright's sync API serves the page's routed
    requests (every request goes through :meth:`PageWatch._route`) and its events only
    while Python is inside a Playwright call, so the pause between checks must be one
    (``page.wait_for_timeout``); a plain sleep would hold every request of the page.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        if page is not None:
            page.wait_for_timeout(interval * 1000)
        else:
            time.sleep(interval)


# ---- Plotly figures in the page -----------------------------------------------------------

# Every Plotly graph div in the page, in document order: the title and every text drawn
# around the plot (subtitle, notes, colour-bar titles: SVG text, as the user sees it), and
# the traces (the data plotly.js draws, as it holds it on the div).
_FIGURES_JS = """
() => [...document.querySelectorAll('.js-plotly-plot')].map((div) => {
  const drawn = (selector) => {
    const node = div.querySelector(selector);
    return node ? node.textContent : '';
  };
  return {
    title: drawn('text.gtitle'),
    text: [...div.querySelectorAll('.infolayer text')].map((node) => node.textContent).join(' | '),
    traces: (div.data || []).map((trace) => ({
      type: trace.type,
      name: trace.name === undefined ? null : trace.name,
      source: trace.source === undefined ? null : trace.source,
      x: Array.isArray(trace.x) || ArrayBuffer.isView(trace.x) ? Array.from(trace.x) : null,
      customdata: trace.customdata && trace.customdata.bdata
        ? {dtype: trace.customdata.dtype, bdata: trace.customdata.bdata, shape: String(trace.customdata.shape)}
        : null,
    })),
  };
})
"""


def figures(page: Any) -> list[dict[str, Any]]:
    """Every Plotly figure in the page, in document order (see ``_FIGURES_JS``)."""
    return page.evaluate(_FIGURES_JS)


def figures_titled(page: Any, prefix: str) -> list[dict[str, Any]]:
    """The figures whose title starts with ``prefix``, in document order."""
    return [figure for figure in figures(page) if figure["title"].startswith(prefix)]


def trace_named(figure: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [trace for trace in figure["traces"] if trace["name"] == name]
    assert len(matches) == 1, f"figure {figure['title']!r} has {len(matches)} traces named {name!r}"
    return matches[0]


def decode_png_uri(uri: str) -> np.ndarray:
    """uint8 (height, width, 3) pixels of a ``data:image/png;base64,...`` URI (decoded by PIL)."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), f"expected a PNG data URI, got {uri[:40]!r}"
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))) as picture:
        return np.asarray(picture.convert("RGB"))


def decode_typed_array(spec: dict[str, str]) -> np.ndarray:
    """The array of a plotly.js typed-array spec ``{dtype, bdata, shape}`` (little-endian)."""
    dtypes = {"f8": "<f8", "f4": "<f4", "i4": "<i4", "i2": "<i2", "i1": "i1", "u1": "u1"}
    shape = tuple(int(size) for size in spec["shape"].split(","))
    return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=dtypes[spec["dtype"]]).reshape(shape)


# ---- widgets ------------------------------------------------------------------------------


def slider(page: Any, label: str, index: int = 0) -> Any:
    """The ``index``-th ipywidgets slider whose description is ``label``."""
    return page.locator(".widget-slider").filter(has=page.locator(".widget-label", has_text=label)).nth(index)


def slider_readout(slider_locator: Any) -> str:
    return slider_locator.locator(".widget-readout").inner_text().strip()


def drag_slider(page: Any, slider_locator: Any, fraction: float) -> None:
    """Drag the slider's handle with the mouse to ``fraction`` (0..1) of its track."""
    handle = slider_locator.locator(".noUi-handle")
    handle.scroll_into_view_if_needed()
    start = handle.bounding_box()
    track = slider_locator.locator(".noUi-target").bounding_box()
    assert start and track, "the slider is not visible"
    y = start["y"] + start["height"] / 2
    page.mouse.move(start["x"] + start["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], y, steps=10)
    page.mouse.up()


# ---- screenshots --------------------------------------------------------------------------


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as ``test-artifacts/browser/<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@contextmanager
def screenshot_on_failure(page: Any, name: str) -> Iterator[None]:
    """Save a screenshot ``<name>.png`` if the block raises (then re-raise); one left by an
    earlier run is removed first."""
    (ARTIFACTS / f"{name}.png").unlink(missing_ok=True)
    try:
        yield
    except BaseException:
        try:
            screenshot(page, name)
        except Exception:  # the page may be gone; the original error matters more
            pass
        raise


def save_compact_png(source: Path, target: Path, *, crop_height: int | None = None, max_bytes: int = 400_000) -> Path:
    """A copy of a screenshot for documentation: optionally only its top ``crop_height``
    pixels, lossless if that fits in ``max_bytes``, else in a 256-colour palette. Written
    atomically."""
    with Image.open(source) as opened:
        picture = opened.convert("RGB")
    if crop_height is not None:
        picture = picture.crop((0, 0, picture.width, min(crop_height, picture.height)))
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    picture.save(temporary, format="PNG", optimize=True)
    if temporary.stat().st_size > max_bytes:
        palette = picture.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
        palette.save(temporary, format="PNG", optimize=True)
    os.replace(temporary, target)
    return target
