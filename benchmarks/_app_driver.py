"""Shared by the app benchmarks: start ``scorecam-explorer app``, drive Debian's Chromium
(Playwright; every request outside 127.0.0.1 is blocked), read what the page shows.

Nothing here downloads anything; the browser is ``/usr/bin/chromium`` (``scripts/install-browser.sh``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM = "/usr/bin/chromium"
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
HOST = "127.0.0.1"

# What the page shows: the app's status message, the "class is full" title, whether the map is drawn.
PAGE_STATE_JS = """
() => {
  const message = document.querySelector('.scorecam-app-message');
  const full = document.querySelector('#class-full');
  const maps = [...document.querySelectorAll('.js-plotly-plot')].filter((div) => {
    const title = div.querySelector('text.gtitle');
    return title && title.textContent.startsWith('Score-CAM for') && (div.data || []).some((t) => t.name === 'map' && t.source);
  });
  const text = document.body ? document.body.innerText.trim() : '';
  return {message: message ? message.innerText.trim() : '', full: !!full, map: maps.length > 0, text: text.slice(0, 200)};
}
"""


def cpu_name() -> str:
    """The CPU's model name and torch's CPU capability (as every benchmark names them), and the
    number of cores this process may use."""
    from scorecam_explorer.device import cpu_capability, cpu_model_name

    return f"{cpu_model_name()} (torch CPU capability {cpu_capability()}), {len(os.sched_getaffinity(0))} cores"


def load_average() -> str:
    """The 1-minute load average now (other work on the machine skews every timing)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def explorer_command() -> list[str]:
    script = Path(sys.executable).with_name("scorecam-explorer")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "scorecam_explorer.cli"]


@dataclass
class App:
    process: subprocess.Popen
    port: int
    started: float
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}voila/static/voila.js", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_until_up(self, timeout: float = 120.0) -> float:
        """Seconds from launch until the server answers."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited ({self.process.returncode}):\n{self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not answer within {timeout:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - self.started


@contextmanager
def running_app(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[App]:
    """``scorecam-explorer app --no-browser --port P ARGS`` in its own process group."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [*explorer_command(), "app", "--no-browser", "--port", str(port), *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    app = App(process, port, started, log_path)
    try:
        yield app
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def local_only(route: Any) -> None:
    """Let requests to 127.0.0.1 through; block everything else."""
    parsed = urlparse(route.request.url)
    if parsed.scheme in ("data", "blob") or parsed.hostname in (HOST, "localhost"):
        route.continue_()
    else:
        route.abort()


def page_state(page: Any) -> dict[str, Any]:
    try:
        return page.evaluate(PAGE_STATE_JS)
    except Exception:  # noqa: BLE001 - the page is navigating
        return {"message": "", "full": False, "map": False, "text": ""}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
