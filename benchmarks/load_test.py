"""A class on one app: N headless Chromium pages open ``scorecam-explorer app`` at once.

    .venv/bin/python benchmarks/load_test.py --sessions 10
    .venv/bin/python benchmarks/load_test.py --sessions 30 --pool 4 --timeout 600

It starts the app (warm cache: a first launch fills a temporary cache directory unless
``--cache-dir`` names a filled one), waits until the command is ready, then opens N pages
(each in its own browser context, like N students) and prints:

- time to first map per page, from its navigation start (median, 95th percentile, max);
- interaction latency: ``--rounds`` times, every page moves its layer slider one step at the
  same moment; the time from the key press to the page's new map (95th percentile, median);
- memory per session: resident and proportional set size of each page's kernel
  (``/proc/PID/smaps_rollup``), and of the whole server (Voila and kernels) divided by N;
- an extra page over the limit (``--max-sessions`` = N) gets "the class is full";
- after the pages close, how many kernels are left over time (``--cull-after`` seconds).

Bounded: at most 40 pages, everything within ``--timeout`` seconds, loopback only (every
request outside 127.0.0.1 is blocked). Timings are taken in the pages (``performance.now``).
The browser runs on the same machine as the server here, so a timing includes rendering N
pages on the same cores; in a classroom each browser has its own computer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _app_driver import CHROMIUM, LAUNCH_ARGS, cpu_name, load_average, local_only, percentile, running_app

MAX_PAGES = 40

# Installed in every page before it loads: records when the first map is drawn, and when the
# map changes after window.__mark() (times in ms from the page's navigation start).
WATCHER_JS = """
(() => {
  const mapSource = () => {
    for (const div of document.querySelectorAll('.js-plotly-plot')) {
      const title = div.querySelector('text.gtitle');
      if (title && title.textContent.startsWith('Score-CAM for')) {
        const trace = (div.data || []).find((t) => t.name === 'map');
        if (trace && trace.source) return trace.source;
      }
    }
    return null;
  };
  window.__firstMap = null; window.__marked = null; window.__changed = null; window.__before = null;
  window.__mark = () => { window.__before = mapSource(); window.__marked = performance.now(); window.__changed = null; };
  setInterval(() => {
    const source = mapSource();
    if (source && window.__firstMap === null) window.__firstMap = performance.now();
    if (window.__marked !== null && window.__changed === null && source && source !== window.__before) {
      window.__changed = performance.now();
    }
  }, 20);
})();
"""


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it (kernels run in their own sessions: follow parents)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def kernel_memory(server_pid: int) -> dict[int, tuple[int, int]]:
    """RSS and PSS (bytes) of every process below the app's command whose command line names
    the app's kernel; and of all of them (command, Voila, kernels) under key 0."""
    per_pid: dict[int, tuple[int, int]] = {}
    total_rss = total_pss = 0
    for pid in _descendants(server_pid):
        entry = Path("/proc") / str(pid)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            values = {}
            for line in (entry / "smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError):
            continue
        total_rss += values.get("Rss", 0)
        total_pss += values.get("Pss", 0)
        if "scorecam_explorer.serving.kernel" in cmdline:
            per_pid[pid] = (values.get("Rss", 0), values.get("Pss", 0))
    per_pid[0] = (total_rss, total_pss)
    return per_pid


def wait_for_ready(log_path: Path, deadline: float) -> None:
    while "cache: " not in log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError("the app did not get its cache ready in time")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10, help=f"pages opened at once (1-{MAX_PAGES})")
    parser.add_argument("--rounds", type=int, default=5, help="interaction rounds (every page moves its slider)")
    parser.add_argument("--pool", type=int, default=1, help="the app's --pool")
    parser.add_argument("--cull-after", type=float, default=30.0, help="the app's --cull-after (seconds)")
    parser.add_argument("--watch-cull", type=float, default=90.0, help="seconds to watch kernels after the pages close (0: skip)")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between two pages' arrivals (0: all at once)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds for everything but the cull watch")
    parser.add_argument("--cache-dir", default=None, help="a filled cache directory (default: a temporary one, filled first)")
    parser.add_argument("--log", default="test-artifacts/load_test.log", help="the app's log")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= MAX_PAGES:
        parser.error(f"--sessions must be between 1 and {MAX_PAGES}")
    from playwright.sync_api import sync_playwright

    n = args.sessions
    print(f"CPU: {cpu_name()}; load average before: {load_average()}; {n} sessions, pool {args.pool}")
    log_path = Path(args.log)
    with tempfile.TemporaryDirectory(prefix="load-test-") as scratch:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(scratch) / "cache"
        env = dict(os.environ, SCORECAM_EXPLORER_CACHE_DIR=str(cache_dir))
        if not args.cache_dir:
            print("filling the cache (not timed) ...")
            with running_app([], env, log_path) as app:
                app.wait_until_up()
                wait_for_ready(log_path, time.monotonic() + args.timeout)
        app_args = ["--max-sessions", str(n), "--pool", str(args.pool), "--cull-after", f"{args.cull_after:g}"]
        with running_app(app_args, env, log_path) as app, sync_playwright() as playwright:
            deadline = time.monotonic() + args.timeout
            app.wait_until_up()
            wait_for_ready(log_path, deadline)
            time.sleep(3.0 if args.pool else 0.0)  # let the pool fill, as before a lesson
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
            pages = []
            for index in range(n):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.route("**/*", local_only)
                page.add_init_script(WATCHER_JS)
                page.goto(app.url, wait_until="commit", timeout=args.timeout * 1000)
                pages.append(page)
                if args.stagger:
                    pages[0].wait_for_timeout(args.stagger * 1000)
            first_maps: dict[int, float] = {}
            while len(first_maps) < n and time.monotonic() < deadline:
                for index, page in enumerate(pages):
                    if index not in first_maps:
                        value = page.evaluate("window.__firstMap")
                        if value is not None:
                            first_maps[index] = value / 1000
                pages[0].wait_for_timeout(200)
            waited = [first_maps.get(index) for index in range(n)]
            for index, value in enumerate(waited):
                if value is None:  # what did it show instead?
                    shot = log_path.with_name(f"load_test_page_{index + 1}.png")
                    pages[index].screenshot(path=str(shot))
                    text = pages[index].evaluate("document.body ? document.body.innerText.slice(0, 300) : ''")
                    print(f"page {index + 1} drew no map; it shows: {text!r} ({shot})")
            drawn = [value for value in waited if value is not None]
            memory = kernel_memory(app.process.pid)
            kernels = {pid: value for pid, value in memory.items() if pid}
            print(
                f"time to first map ({len(drawn)} of {n} pages drew one): median {statistics.median(drawn):.1f} s, "
                f"p95 {percentile(drawn, 95):.1f} s, max {max(drawn):.1f} s" if drawn else "no page drew a map"
            )
            if kernels:
                rss = [value[0] / 2**20 for value in kernels.values()]
                pss = [value[1] / 2**20 for value in kernels.values()]
                total_rss, total_pss = (value / 2**20 for value in memory[0])
                print(
                    f"memory: {len(kernels)} kernels, each RSS median {statistics.median(rss):.0f} MB, PSS median "
                    f"{statistics.median(pss):.0f} MB; whole server (Voila + kernels) PSS {total_pss:.0f} MB "
                    f"= {total_pss / n:.0f} MB per session (RSS sum {total_rss:.0f} MB; the command itself included)"
                )
            latencies = interaction_rounds(pages, [i for i in range(n) if waited[i] is not None], args.rounds)
            if latencies:
                print(
                    f"interaction latency ({len(latencies)} slider moves, all pages at once): median "
                    f"{statistics.median(latencies):.2f} s, p95 {percentile(latencies, 95):.2f} s, max {max(latencies):.2f} s"
                )
            extra = browser.new_context().new_page()
            extra.route("**/*", local_only)
            response = extra.goto(app.url, timeout=60_000)
            full = extra.locator("#class-full").count() > 0
            print(f"page {n + 1} over the limit: HTTP {response.status if response else '?'}, "
                  f"{'the class-is-full page' if full else 'NOT the class-is-full page'}")
            extra.context.close()
            for page in pages:
                page.context.close()
            browser.close()
            print(f"load average after: {load_average()}")
            if args.watch_cull > 0:
                watch_cull(app.process.pid, args.watch_cull)
    return 0


def interaction_rounds(pages: list[Any], ready: list[int], rounds: int) -> list[float]:
    """Every ready page presses ArrowLeft/ArrowRight on its layer slider at once; latencies (s)."""
    latencies: list[float] = []
    for round_index in range(rounds):
        key = "ArrowLeft" if round_index % 2 == 0 else "ArrowRight"
        pending = set()
        for index in ready:
            page = pages[index]
            handle = page.locator(".widget-slider").filter(has=page.locator(".widget-label", has_text="Layer")).first.locator(".noUi-handle")
            try:
                handle.focus(timeout=10_000)
                page.evaluate("window.__mark()")
                page.keyboard.press(key)
                pending.add(index)
            except Exception as error:  # noqa: BLE001 - count it, go on with the other pages
                print(f"round {round_index + 1}: page {index + 1} could not be driven ({type(error).__name__})")
        round_deadline = time.monotonic() + 60  # its own budget, whatever the pages' loading took
        while pending and time.monotonic() < round_deadline:
            for index in list(pending):
                result = pages[index].evaluate("window.__changed === null ? null : window.__changed - window.__marked")
                if result is not None:
                    latencies.append(result / 1000)
                    pending.discard(index)
            pages[0].wait_for_timeout(100)
        if pending:
            print(f"round {round_index + 1}: {len(pending)} page(s) did not update within 60 s")
    return latencies


def watch_cull(server_pid: int, seconds: float) -> None:
    """Print how many kernels are alive every 10 s after the pages closed."""
    started = time.monotonic()
    counts = []
    while time.monotonic() - started < seconds:
        counts.append((time.monotonic() - started, len([pid for pid in kernel_memory(server_pid) if pid])))
        if len(counts) > 1 and counts[-1][1] <= 1:
            break
        time.sleep(10)
    print("kernels alive after the pages closed: " + ", ".join(f"{t:.0f} s: {c}" for t, c in counts))


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured
    sys.exit(main())
