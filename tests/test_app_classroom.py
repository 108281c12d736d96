"""A class on one app, in a real Chromium: a page over the session limit gets "the class is
full", and the kernel of a closed page is culled (short limits, so that the test is quick)."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _tiny_models import tiny_model, write_images
from browser_support import ARTIFACTS, PageWatch, chromium_browser, figures_titled, free_port, running_server, wait_until

from scorecam_explorer.cache import save_cache
from scorecam_explorer.engine import compute_cache

CULL_AFTER = 3  # seconds


def explorer_command() -> list[str]:
    script = Path(sys.executable).with_name("scorecam-explorer")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "scorecam_explorer.cli"]


def kernel_processes(root: int) -> list[int]:
    """The app's kernel processes below ``root`` (kernels run in their own sessions: follow parents)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            if b"scorecam_explorer.serving.kernel" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


@pytest.mark.slow
@pytest.mark.browser
def test_a_full_class_gets_a_clear_page_and_closed_pages_are_culled(tmp_path: Path) -> None:
    picture = write_images(tmp_path / "pictures", 1)[0]
    cache = save_cache(compute_cache(tiny_model(), str(picture), ["features.4"], progress=False), tmp_path / "c.zarr")
    port = free_port()
    command = [
        *explorer_command(), "app", "--no-browser", "--port", str(port), "--cache", str(cache),
        "--max-sessions", "1", "--pool", "0", "--cull-after", str(CULL_AFTER),
    ]
    env = dict(os.environ, SCORECAM_EXPLORER_CACHE_DIR=str(tmp_path / "home"))
    with running_server(
        command, port=port, ready_path="/voila/static/voila.js", log_path=ARTIFACTS / "classroom.log", env=env
    ) as server, chromium_browser() as browser:
        wait_until(lambda: "cache: " in server.log_tail(), timeout=120, what="the command to get its cache ready")
        student = browser.new_page()
        watch = PageWatch()
        watch.attach(student)
        student.goto(server.url("/"), timeout=180_000)
        wait_until(lambda: figures_titled(student, "Score-CAM for"), timeout=180, page=student, what="the first student's map")
        assert len(kernel_processes(server.process.pid)) == 1

        # A second visitor: the class (of one) is full, over HTTP and in the browser.
        status, body = fetch(server.url("/"))
        assert status == 503 and "The class is full" in body, (status, body[:300])
        latecomer = browser.new_page()
        response = latecomer.goto(server.url("/"), timeout=60_000)
        assert response is not None and response.status == 503
        assert latecomer.locator("#class-full").inner_text() == "The class is full"
        latecomer.close()
        assert len(kernel_processes(server.process.pid)) == 1  # the full page started no kernel

        # The student leaves: the place frees up at once and the kernel is culled soon after.
        student.close()
        started = time.monotonic()
        wait_until(lambda: not kernel_processes(server.process.pid), timeout=CULL_AFTER + 60, what="the closed page's kernel to be culled")
        culled_after = time.monotonic() - started
        assert culled_after < CULL_AFTER + 30, culled_after
        status, body = fetch(server.url("/"))
        assert status == 200 and "The class is full" not in body
        watch.assert_clean("the student's page")
