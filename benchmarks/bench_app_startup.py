"""Launch-to-first-drawn-map of ``scorecam-explorer app``, measured in Debian's Chromium.

    .venv/bin/python benchmarks/bench_app_startup.py            # warm cache, 3 launches
    .venv/bin/python benchmarks/bench_app_startup.py --cold     # an empty cache directory: computes the cache

Each launch starts the command with ``--no-browser``; a Chromium already running opens the
page as soon as the server answers (what ``webbrowser.open`` does for a user). It prints,
from the launch: when the server answered, when the page first showed something, every
status line the page showed, and when the first map was drawn. Loopback only; at most
``--timeout`` seconds per launch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _app_driver import CHROMIUM, LAUNCH_ARGS, cpu_name, load_average, local_only, page_state, running_app


def one_launch(browser, cache_dir: Path, extra: list[str], timeout: float, log_path: Path) -> dict:
    env = dict(os.environ, SCORECAM_EXPLORER_CACHE_DIR=str(cache_dir))
    with running_app(extra, env, log_path) as app:
        up = app.wait_until_up(timeout)
        page = browser.new_page()
        page.route("**/*", local_only)
        page.goto(app.url, wait_until="commit", timeout=timeout * 1000)
        shown = None
        messages: list[tuple[float, str]] = []
        deadline = time.monotonic() + timeout
        while True:
            state = page_state(page)
            now = time.monotonic() - app.started
            if state["text"] and shown is None:
                shown = now
            line = state["message"].splitlines()[0].split(" (")[0] if state["message"] else ""
            if line and (not messages or messages[-1][1] != line):  # each new step once (not every channel count)
                messages.append((now, line))
            if state["map"]:
                drawn = now
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no map within {timeout:.0f} s; the page shows: {state['text']!r}")
            page.wait_for_timeout(50)
        page.close()
        return {"up": up, "shown": shown or drawn, "map": drawn, "messages": messages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="start from an empty cache directory (computes the cache)")
    parser.add_argument("--runs", type=int, default=3, help="launches to time (default 3; --cold: 1)")
    parser.add_argument("--cache-dir", default=None, help="cache directory for warm runs (default: a temporary one, filled first)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds allowed per launch")
    parser.add_argument("--log", default="test-artifacts/bench_app_startup.log", help="the app's log of the last launch")
    parser.add_argument("app_args", nargs="*", help="more arguments for `scorecam-explorer app` (after --)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    print(f"CPU: {cpu_name()}; Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-app-") as scratch, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(scratch) / "cache"
        results = []
        runs = 1 if args.cold else args.runs
        if not args.cold and not args.cache_dir:
            print("filling the cache (not timed) ...")
            one_launch(browser, cache_dir, args.app_args, args.timeout, Path(args.log))
        for run in range(runs):
            if args.cold:
                cache_dir = Path(scratch) / f"cold-{run}"
            result = one_launch(browser, cache_dir, args.app_args, args.timeout, Path(args.log))
            results.append(result)
            steps = "; ".join(f"{t:.1f} s {text}" for t, text in result["messages"])
            print(
                f"{'cold' if args.cold else 'warm'} launch {run + 1}: server answered {result['up']:.1f} s, page showed "
                f"text {result['shown']:.1f} s, first map {result['map']:.1f} s (load average {load_average()})  [{steps}]"
            )
        browser.close()
    maps = [r["map"] for r in results]
    print(f"first map: median {statistics.median(maps):.1f} s, max {max(maps):.1f} s over {len(maps)} launch(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
