"""The explorer in a real browser: Debian's Chromium driven by Playwright.

1. ``scorecam-explorer app`` (Voila) over a small precomputed cache: move the layer
   scrubber, drag the top-k slider, click a channel bar; after each, the map the page draws
   (the PNG in the Plotly graph div's data) must have changed and must equal, pixel for
   pixel, ``compose.scorecam`` for the state the page shows, coloured with the same table.
2. ``notebooks/01_quickstart.ipynb`` in JupyterLab (a copy: Lab autosaves): Run All, no
   error output, and the first explorer's map follows its top-k slider.
3. A notebook that opens the explorer on the saved cache of 1., in Jupyter Notebook 7: Run
   All, the map is the library's, a bar per channel, and the map follows the top-k slider.

The page may talk to 127.0.0.1 only; page errors, console errors and plotly.js warnings
(such as "Invalid color specifier") fail the test (the one harmless exception: the CDN
stylesheet Voila's template asks for, which we block).
Screenshots of every state go to ``test-artifacts/browser/``; see ``docs/browser-tests.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
import xarray as xr

from browser_support import (
    ARTIFACTS,
    REPO_ROOT,
    PageWatch,
    Server,
    chromium_browser,
    decode_png_uri,
    decode_typed_array,
    drag_slider,
    figures,
    figures_titled,
    free_port,
    require_chromium,
    running_server,
    save_compact_png,
    screenshot,
    screenshot_on_failure,
    slider,
    slider_readout,
    trace_named,
    wait_until,
)

pytestmark = pytest.mark.browser

CACHE_LAYERS = ["blocks.3", "blocks.5"]  # 40 and 80 channels: seconds to compute, wide bars to click
PICTURE = "sample:chelsea"
COLORMAP = "jet"  # the explorer's default colour map
PRESET = "paper"  # and its default preset
VIEWPORT = {"width": 1000, "height": 3000}  # Voila's page scrolls inside, so show it all at once
PAGE_TIMEOUT = 180.0  # first render: kernel start, cache load, six figures (seconds)
UPDATE_TIMEOUT = 60.0  # one interaction reaching the plot


# ---- the browser is there -----------------------------------------------------------------


def test_chromium_is_installed() -> None:
    """Fails (never skips) when Debian's Chromium is missing, saying how to install it."""
    require_chromium()


def test_missing_chromium_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import browser_support

    monkeypatch.setattr(browser_support, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match=r"bash scripts/install-browser\.sh"):
        browser_support.require_chromium()


# ---- the expected map -------------------------------------------------------------------


def colour_table() -> np.ndarray:
    """The explorer's colour table (256 RGB entries) for map values 0..1."""
    from scorecam_explorer.colormaps import colormap_table

    return colormap_table(COLORMAP)


def assert_pixels_show_map(pixels: np.ndarray, expected: xr.DataArray, what: str) -> None:
    """The drawn map must be the expected map through the colour table, pixel for pixel.

    Value v is drawn as table entry round(255 v); one entry either way is allowed, for a
    value within float32 rounding of a half-step.
    """
    values = np.asarray(expected.values, dtype=np.float64)
    assert np.isfinite(values).all(), f"{what}: the library's map holds NaN or inf"
    assert pixels.shape == (*values.shape, 3), f"{what}: the page draws {pixels.shape}, the map is {values.shape}"
    table = colour_table()
    index = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.intp)
    exact = (pixels == table[index]).all(axis=-1)
    close = exact.copy()
    for step in (-1, 1):
        close |= (pixels == table[np.clip(index + step, 0, 255)]).all(axis=-1)
    assert close.all(), (
        f"{what}: {int((~close).sum())} of {close.size} pixels of the page's map are not the library's map "
        f"(first at row, column {tuple(int(v) for v in np.argwhere(~close)[0])})"
    )
    assert exact.mean() > 0.99, f"{what}: only {exact.mean():.1%} of the pixels match exactly"


def map_figure(page: Any, index: int = 0) -> dict[str, Any]:
    found = figures_titled(page, "Score-CAM for")
    assert len(found) > index, f"no map figure #{index} in the page (figures: {[f['title'] for f in figures(page)]})"
    return found[index]


def map_source(page: Any, index: int = 0) -> str:
    return trace_named(map_figure(page, index), "map")["source"]


def wait_for_new_map(page: Any, previous: str, what: str, watch: PageWatch, index: int = 0) -> dict[str, Any]:
    """Wait until the map's picture differs from ``previous``; returns the map figure."""

    def changed() -> dict[str, Any] | None:
        figure = map_figure(page, index)
        return figure if trace_named(figure, "map")["source"] != previous else None

    try:
        return wait_until(changed, timeout=UPDATE_TIMEOUT, page=page, what=f"the map to change after {what}")
    except AssertionError as error:
        raise AssertionError(f"{error}; page problems so far: {watch.problems()}") from None


# ---- the channel chart ------------------------------------------------------------------

MIN_BAR_PIXELS = 4  # a bar a person can aim at with a mouse


def channel_chart(page: Any, index: int = 0) -> Any:
    """The ``index``-th explorer's channel-weights chart (its Plotly graph div)."""
    return page.locator(".js-plotly-plot").filter(has=page.locator(".gtitle", has_text="Channel weights")).nth(index)


def inspected_channel(page: Any, index: int = 0) -> str:
    """What the ``index``-th explorer's Channel box says (the channel in the inspector)."""
    box = page.locator(".widget-text").filter(has=page.locator(".widget-label", has_text=re.compile(r"^Channel$")))
    return box.nth(index).locator("input").input_value().strip()


def inspector_titles(page: Any) -> list[str]:
    """Titles of the channel inspectors' detail figures ("Channel K of LAYER")."""
    return [f["title"] for f in figures(page) if re.fullmatch(r"Channel \d+ of .+", f["title"])]


def click_bar_of_rank(page: Any, rank: int, index: int = 0) -> None:
    """Click, with the mouse, the bar of the ``rank``-th heaviest channel (1 = heaviest) of the
    ``index``-th explorer's channel chart; the bar must be drawn at least MIN_BAR_PIXELS wide."""
    bar = channel_chart(page, index).locator(".barlayer .point").nth(rank - 1)
    bar.scroll_into_view_if_needed()
    box = bar.bounding_box()
    assert box, f"the bar of rank {rank} is not drawn"
    assert box["width"] >= MIN_BAR_PIXELS, f"the bar of rank {rank} is {box['width']:.1f} px wide: too narrow to aim at"
    plot = channel_chart(page, index).locator(".draglayer .nsewdrag").first.bounding_box()
    assert plot, "the channel chart's plot area is not drawn"
    centre = box["x"] + box["width"] / 2
    assert plot["x"] <= centre <= plot["x"] + plot["width"], f"the bar of rank {rank} is outside the chart's window"
    # Anywhere in the bar's column: the tail's bars (weight ~0) have no height to aim at.
    page.mouse.click(box["x"] + box["width"] / 2, plot["y"] + plot["height"] * 0.6)


def click_inspects(page: Any, rank: int, channel: int, layer: str, what: str, index: int = 0) -> None:
    """Click the bar of ``rank``; the inspector must then show ``channel`` of ``layer``."""
    click_bar_of_rank(page, rank, index)
    wait_until(lambda: inspected_channel(page, index) == str(channel), timeout=UPDATE_TIMEOUT, page=page,
               what=f"{what}: the Channel box to show channel {channel} after clicking the bar of rank {rank} "
               f"(it shows {inspected_channel(page, index)})")
    wait_until(lambda: f"Channel {channel} of {layer}" in inspector_titles(page), timeout=UPDATE_TIMEOUT, page=page,
               what=f"{what}: the inspector to draw channel {channel} of {layer} (it draws {inspector_titles(page)})")


def bar_order(cache: xr.DataTree, layer: str, target: int) -> np.ndarray:
    """Channel ids by rank, as the chart sorts them by default (weight w_k, paper preset)."""
    from scorecam_explorer.compose import channel_contributions
    from scorecam_explorer.figures import channel_order

    return channel_order(channel_contributions(cache, layer, target, preset=PRESET, image=0), "weight")


# ---- Voila: the app ---------------------------------------------------------------------


@dataclass
class AppUnderTest:
    server: Server
    cache: xr.DataTree
    target: int


@pytest.fixture(scope="module")
def app_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cache of the default model on the cat photo, computed once for this module."""
    from scorecam_explorer import compute_cache, load_model, save_cache

    require_chromium()  # fail before spending time on the cache
    cache = compute_cache(load_model(), PICTURE, CACHE_LAYERS, progress=False)
    return Path(save_cache(cache, tmp_path_factory.mktemp("cache") / "chelsea.zarr"))


def explorer_command() -> list[str]:
    script = Path(sys.executable).with_name("scorecam-explorer")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "scorecam_explorer.cli"]


@pytest.fixture(scope="module")
def app(app_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppUnderTest]:
    """``scorecam-explorer app --no-browser --port P --cache CACHE``, stopped afterwards."""
    from scorecam_explorer import load_cache

    port = free_port()
    env = dict(os.environ, SCORECAM_EXPLORER_CACHE_DIR=str(tmp_path_factory.mktemp("cache-dir")))
    command = [*explorer_command(), "app", "--no-browser", "--port", str(port), "--cache", str(app_cache)]
    with running_server(
        command, port=port, ready_path="/voila/static/voila.js", log_path=ARTIFACTS / "voila.log", env=env
    ) as server:
        cache = load_cache(app_cache)
        target = int(np.argmax(cache["logits"].values[0]))  # the explorer opens on the top-1 class
        yield AppUnderTest(server, cache, target)


def expected_map(app: AppUnderTest, layer: str, **options: Any) -> xr.DataArray:
    from scorecam_explorer.compose import scorecam

    return scorecam(app.cache, layer, app.target, preset=PRESET, image=0, **options)


def check_map(page: Any, app: AppUnderTest, what: str, layer: str, **options: Any) -> dict[str, Any]:
    """The page's map figure shows ``layer`` and the library's map for ``options``."""
    figure = map_figure(page)
    assert f"· {layer} ·" in figure["title"], f"{what}: the map's title {figure['title']!r} does not name {layer}"
    class_name = str(app.cache["class_name"].values[app.target])
    assert f"“{class_name}”" in figure["title"], f"{what}: the title {figure['title']!r} does not name {class_name!r}"
    pixels = decode_png_uri(trace_named(figure, "map")["source"])
    assert_pixels_show_map(pixels, expected_map(app, layer, **options), what)
    return figure


def check_figures_follow(page: Any, layer: str, channels: int, what: str, watch: PageWatch) -> dict[str, Any]:
    """Every panel shows ``layer``: the channel chart (one bar per channel), the channel
    inspector, the fidelity curve and Compare. Returns the channel chart."""
    drawn = figures(page)

    def titled(prefix: str) -> list[dict[str, Any]]:
        return [figure for figure in drawn if figure["title"].startswith(prefix)]

    bars, detail = titled("Channel weights"), titled("Channel ")
    curve, compare = titled("Fidelity of the top-k map"), titled("Compare")
    assert len(bars) == len(curve) == len(compare) == 1, f"{what}: figures in the page: {[f['title'] for f in drawn]}"
    stale = []
    if not bars[0]["title"].endswith(f"· {layer}") or len(bars[0]["traces"][0]["x"]) != channels:
        stale.append(f"channel chart ({bars[0]['title']!r}, {len(bars[0]['traces'][0]['x'])} bars)")
    if not any(figure["title"].endswith(f"of {layer}") for figure in detail):
        stale.append(f"channel inspector ({[f['title'] for f in detail if not f['title'].startswith('Channel weights')]})")
    if f"{layer} ·" not in curve[0]["text"]:
        stale.append("fidelity curve")
    if f"· {layer}" not in compare[0]["text"]:
        stale.append("compare")
    assert not stale, (
        f"{what}: the map shows {layer}, but these figures in the page still show another state: "
        f"{'; '.join(stale)}. Their widgets do not receive updates in the browser. Page problems: {watch.problems()}"
    )
    return bars[0]


def wait_for_page(page: Any, watch: PageWatch) -> None:
    """Wait until the explorer and its figures are drawn."""

    def drawn() -> bool:
        titles = [figure["title"] for figure in figures(page)]
        return any(t.startswith("Score-CAM for") for t in titles) and any(t.startswith("Compare") for t in titles)

    try:
        wait_until(drawn, timeout=PAGE_TIMEOUT, page=page, what="the explorer's figures to render", interval=0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}; page problems: {watch.problems()}") from None
    slider(page, "Layer").wait_for(state="visible", timeout=PAGE_TIMEOUT * 1000)


@pytest.mark.slow
def test_explorer_app_in_chromium(app: AppUnderTest) -> None:
    watch = PageWatch()
    with chromium_browser() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        watch.attach(page)
        with screenshot_on_failure(page, "voila-failure"):
            page.goto(app.server.url("/"), timeout=PAGE_TIMEOUT * 1000)
            wait_for_page(page, watch)
            deep, shallow = CACHE_LAYERS[-1], CACHE_LAYERS[0]

            # Opens on the deepest cached layer, the top-1 class, every channel.
            assert slider_readout(slider(page, "Layer")) == deep
            check_map(page, app, "the first view", deep)
            screenshot(page, "voila-01-opened")
            opacity = slider(page, "Opacity").bounding_box()  # the last row of the map panel
            assert opacity, "the opacity slider is not visible"
            save_compact_png(ARTIFACTS / "voila-01-opened.png", ARTIFACTS / "explorer.png",
                             crop_height=int(opacity["y"] + opacity["height"] + 24))

            # 1. The layer scrubber, moved one step with the keyboard: the shallower layer.
            previous = map_source(page)
            layer_slider = slider(page, "Layer")
            for _attempt in range(3):  # a key pressed before the slider is wired up is lost; press again
                layer_slider.locator(".noUi-handle").focus()
                page.keyboard.press("ArrowLeft")
                try:
                    wait_until(lambda: slider_readout(layer_slider) == shallow, timeout=5, page=page, what="the layer readout")
                    break
                except AssertionError:
                    continue
            assert slider_readout(layer_slider) == shallow, "the layer scrubber did not move"
            wait_for_new_map(page, previous, "moving the layer scrubber", watch)
            check_map(page, app, "after the layer scrubber", shallow)
            n_channels = int(app.cache[shallow].sizes["channel"])
            screenshot(page, "voila-02-layer")
            check_figures_follow(page, shallow, n_channels, "after the layer scrubber", watch)

            # 2. The top-k slider, dragged with the mouse to about a quarter of its track.
            previous = map_source(page)
            top_k_slider = slider(page, "Top k")
            drag_slider(page, top_k_slider, 0.25)
            top_k = int(wait_until(lambda: (text := slider_readout(top_k_slider)) != str(n_channels) and text,
                                   timeout=10, page=page, what="the top-k readout to move"))
            assert 1 <= top_k < n_channels
            wait_for_new_map(page, previous, "dragging the top-k slider", watch)
            wait_until(lambda: f"{top_k} of {n_channels} channels" in map_figure(page)["text"], timeout=UPDATE_TIMEOUT,
                       page=page, what=f"the map's subtitle to say {top_k} of {n_channels} channels")
            check_map(page, app, f"after top k = {top_k}", shallow, top_k=top_k)
            screenshot(page, "voila-03-top-k")

            # 3. A click on the heaviest channel's bar, in "switch it off / on" mode.
            page.get_by_role("button", name="switch it off / on").click()
            chart = check_figures_follow(page, shallow, n_channels, "before clicking a bar", watch)
            bar_channels = decode_typed_array(chart["traces"][0]["customdata"])[:, 0].astype(int)  # channel of each bar
            clicked = int(bar_channels[0])
            previous = map_source(page)
            bar = page.locator(".js-plotly-plot").filter(
                has=page.locator(".gtitle", has_text="Channel weights")
            ).locator(".barlayer .point").first
            bar.scroll_into_view_if_needed()
            box = bar.bounding_box()
            assert box, "the first bar is not visible"
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.75)
            off_field = page.locator(".widget-text").filter(has=page.locator(".widget-label", has_text="Off")).locator("input")
            wait_until(lambda: off_field.input_value().strip() != "", timeout=UPDATE_TIMEOUT,
                       page=page, what="the clicked channel to be switched off")
            assert off_field.input_value().strip() == str(clicked), (
                f"the bar drawn first is channel {clicked}, but the explorer switched off {off_field.input_value()!r}"
            )
            wait_for_new_map(page, previous, f"switching off channel {clicked}", watch)
            keep = np.ones(n_channels, dtype=bool)
            keep[clicked] = False
            wait_until(lambda: "1 switched off" in map_figure(page)["text"], timeout=UPDATE_TIMEOUT,
                       page=page, what="the map's subtitle to say 1 switched off")
            check_map(page, app, f"after switching off channel {clicked}", shallow, channels=keep, top_k=top_k)
            screenshot(page, "voila-04-channel-off")

            watch.assert_clean("the explorer app")


# ---- Voila: the default app, as `make app` opens it ---------------------------------------

NEWCOMER_VIEWPORT = {"width": 1400, "height": 1000}


@pytest.mark.slow
def test_default_app_click_inspects_the_channel(tmp_path: Path) -> None:
    """What a newcomer does: `scorecam-explorer app` with nothing but a fresh cache folder (the
    default model, photo and layers; the cache is computed), the page at 1400x1000, the
    chart's default mode. Clicking the bar of the 100th heaviest channel of `head` (1280
    channels) inspects that channel; a channel typed in the box moves the chart to its bar,
    which is clicked too; in "switch it off / on" mode a click switches the channel off."""
    from scorecam_explorer import load_cache

    require_chromium()
    cache_dir = tmp_path / "cache-dir"
    port = free_port()
    env = dict(os.environ, SCORECAM_EXPLORER_CACHE_DIR=str(cache_dir))
    command = [*explorer_command(), "app", "--no-browser", "--port", str(port)]
    watch = PageWatch()
    with running_server(
        command, port=port, ready_path="/voila/static/voila.js", log_path=ARTIFACTS / "voila-default.log", env=env,
        timeout=PAGE_TIMEOUT,
    ) as server, chromium_browser() as browser:
        page = browser.new_page(viewport=NEWCOMER_VIEWPORT)
        watch.attach(page)
        with screenshot_on_failure(page, "default-app-failure"):
            page.goto(server.url("/"), timeout=PAGE_TIMEOUT * 1000)
            wait_for_page(page, watch)
            caches = sorted(path for path in cache_dir.glob("*.zarr") if not path.name.startswith("."))
            assert len(caches) == 1, f"the app's cache folder holds {caches}"
            cache = load_cache(caches[0])
            layer = "head"
            assert slider_readout(slider(page, "Layer")) == layer, "the app does not open on head"
            assert page.get_by_role("button", name="inspect it").get_attribute("class").count("mod-active"), (
                "the chart's click mode is not 'inspect it' by default"
            )
            target = int(np.argmax(cache["logits"].values[0]))
            order = bar_order(cache, layer, target)
            assert len(order) == 1280
            chart = figures_titled(page, "Channel weights")[0]
            assert np.array_equal(decode_typed_array(chart["traces"][0]["customdata"])[:, 0].astype(int), order)
            screenshot(page, "default-01-opened")

            # The 100th heaviest channel: drawn wide enough, and a click inspects it.
            click_inspects(page, 100, int(order[99]), layer, "the default app")
            screenshot(page, "default-02-rank-100")

            # A channel far down the tail, typed in the box: the chart moves to its bar; click it.
            tail_rank = 1000
            box = page.locator(".widget-text").filter(has=page.locator(".widget-label", has_text=re.compile(r"^Channel$")))
            field = box.first.locator("input")
            field.fill(str(int(order[tail_rank - 1])))
            field.press("Enter")
            wait_until(lambda: f"Channel {int(order[tail_rank - 1])} of {layer}" in inspector_titles(page),
                       timeout=UPDATE_TIMEOUT, page=page, what="the inspector to follow the typed channel")
            neighbour = tail_rank + 2
            click_inspects(page, neighbour, int(order[neighbour - 1]), layer, "the default app's tail")
            screenshot(page, "default-03-tail")

            # Back to the heaviest (typed), then "switch it off / on": a click on the 7th switches it off.
            field.fill(str(int(order[0])))
            field.press("Enter")
            wait_until(lambda: f"Channel {int(order[0])} of {layer}" in inspector_titles(page),
                       timeout=UPDATE_TIMEOUT, page=page, what="the inspector to follow the typed channel")
            page.get_by_role("button", name="switch it off / on").click()
            click_bar_of_rank(page, 7)
            off_field = page.locator(".widget-text").filter(has=page.locator(".widget-label", has_text="Off")).locator("input")
            wait_until(lambda: off_field.input_value().strip() == str(int(order[6])), timeout=UPDATE_TIMEOUT,
                       page=page, what=f"channel {int(order[6])} to be switched off (Off says {off_field.input_value()!r})")
            wait_until(lambda: "1 switched off" in map_figure(page)["text"], timeout=UPDATE_TIMEOUT,
                       page=page, what="the map's subtitle to say 1 switched off")
            screenshot(page, "default-04-switched-off")
            watch.assert_clean("the default app")


# ---- Voila: the atlas of a cache of several pictures --------------------------------------

ATLAS_LAYER = "blocks.3"  # 40 channels: seconds to compute for every bundled photo
ATLAS_VIEWPORT = {"width": 1400, "height": 3000}  # the wide page: the grid beside the charts


def atlas_grid(page: Any) -> dict[str, Any] | None:
    """The atlas's grid of thumbnails (its Plotly figure), if drawn."""
    found = [figure for figure in figures(page) if re.match(r"Channel \d+ of .+: its top", figure["title"])]
    return found[0] if found else None


def grid_photos(figure: dict[str, Any]) -> list[str]:
    return [trace["source"] for trace in figure["traces"] if trace["name"] == "photo"]


def picture_shown(page: Any) -> str:
    """The text of the Picture dropdown's selected option."""
    select = page.locator(".widget-dropdown").filter(has=page.locator(".widget-label", has_text="Picture")).locator("select")
    return select.evaluate("(node) => node.options[node.selectedIndex].text").strip()


@pytest.mark.slow
def test_atlas_click_channel_then_thumbnail(tmp_path: Path) -> None:
    """``scorecam-explorer app --images samples`` (every bundled photo, at one cheap layer so
    that it computes in seconds), at 1400 px: a click on a bar of the channel chart redraws the
    atlas's thumbnails for that channel, in the order of its weight on each photo (compose's
    weights, ranked here); a click on a thumbnail of another photo switches the Picture
    dropdown and the map to that photo."""
    from scorecam_explorer import load_cache
    from scorecam_explorer.compose import channel_weights, scorecam
    from scorecam_explorer.figures.atlas import CAPTION_LENGTH, short
    from scorecam_explorer.images import sample_names

    require_chromium()
    port = free_port()
    cache_dir = tmp_path / "cache-dir"
    env = dict(os.environ, SCORECAM_EXPLORER_CACHE_DIR=str(cache_dir))
    command = [*explorer_command(), "app", "--no-browser", "--port", str(port), "--images", "samples",
               "--layer", ATLAS_LAYER]
    watch = PageWatch()
    with running_server(
        command, port=port, ready_path="/voila/static/voila.js", log_path=ARTIFACTS / "voila-atlas.log", env=env
    ) as server, chromium_browser() as browser:
        page = browser.new_page(viewport=ATLAS_VIEWPORT)
        watch.attach(page)
        with screenshot_on_failure(page, "atlas-failure"):
            page.goto(server.url("/"), timeout=PAGE_TIMEOUT * 1000)
            wait_for_page(page, watch)
            first = wait_until(lambda: atlas_grid(page), timeout=PAGE_TIMEOUT, page=page, what="the atlas's thumbnails")
            (path,) = [found for found in cache_dir.rglob("*.zarr") if (found / "zarr.json").is_file()]
            cache = load_cache(path)  # the cache the command computed and serves
            ids = [str(name) for name in cache["image"].values]
            own = cache["logits"].values.argmax(axis=-1)
            assert len(ids) == len(sample_names()) > 9
            assert len(grid_photos(first)) == 9, f"the atlas shows {len(grid_photos(first))} thumbnails, not 9"
            screenshot(page, "atlas-01-opened")

            # 1. A click on the bar of the 5th heaviest channel (on the first photo): the atlas follows.
            order = bar_order(cache, ATLAS_LAYER, int(own[0]))
            channel = int(order[4])
            click_inspects(page, 5, channel, ATLAS_LAYER, "the atlas app")
            grid = wait_until(
                lambda: (g := atlas_grid(page)) and g["title"].startswith(f"Channel {channel} of {ATLAS_LAYER}") and g,
                timeout=UPDATE_TIMEOUT, page=page, what=f"the atlas to show channel {channel}",
            )
            weights = [channel_weights(cache, ATLAS_LAYER, int(own[i]), image=i).values[channel] for i in range(len(ids))]
            ranked = [ids[i] for i in np.lexsort((np.arange(len(ids)), -np.asarray(weights)))]
            captions = grid["text"]
            ranked = ranked[:9]  # the grid's nine
            positions = [captions.find(short(name, CAPTION_LENGTH)) for name in ranked]
            assert all(p >= 0 for p in positions) and positions == sorted(positions), (
                f"the thumbnails' captions ({captions!r}) are not in the order of the channel's weight: {ranked}"
            )
            screenshot(page, "atlas-02-channel")

            # 2. A click on the thumbnail of a photo that is not shown: the explorer opens it.
            rank = next(r for r, name in enumerate(ranked) if name != picture_shown(page))
            target_image = ids.index(ranked[rank])
            previous = map_source(page)
            subplot = "xy" if rank == 0 else f"x{rank + 1}y{rank + 1}"
            tile = page.locator(".js-plotly-plot").filter(
                has=page.locator(".gtitle", has_text=f"Channel {channel} of {ATLAS_LAYER}: its top")
            ).locator(f".draglayer .{subplot} .nsewdrag").first
            tile.scroll_into_view_if_needed()
            box = tile.bounding_box()
            assert box, f"the thumbnail of rank {rank + 1} is not drawn"
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            wait_until(lambda: picture_shown(page) == ranked[rank], timeout=UPDATE_TIMEOUT, page=page,
                       what=f"the Picture dropdown to show {ranked[rank]} (it shows {picture_shown(page)})")
            figure = wait_for_new_map(page, previous, f"clicking the thumbnail of {ranked[rank]}", watch)
            class_name = str(cache["class_name"].values[own[target_image]])
            wait_until(lambda: f"“{class_name}”" in map_figure(page)["title"], timeout=UPDATE_TIMEOUT, page=page,
                       what=f"the map's title to name {class_name!r}")
            figure = map_figure(page)
            assert np.array_equal(decode_png_uri(trace_named(figure, "photo")["source"]),
                                  cache["picture"].values[target_image]), "the map is not drawn over the clicked photo"
            expected = scorecam(cache, ATLAS_LAYER, int(own[target_image]), preset=PRESET, image=target_image)
            assert_pixels_show_map(decode_png_uri(trace_named(figure, "map")["source"]), expected,
                                   f"the map of {ranked[rank]}")
            screenshot(page, "atlas-03-thumbnail")
            watch.assert_clean("the atlas app")


# ---- JupyterLab: the quickstart notebook ---------------------------------------------------

QUICKSTART = REPO_ROOT / "notebooks" / "01_quickstart.ipynb"
LAB_VIEWPORT = {"width": 1600, "height": 2400}  # the explorer's two columns take about 1340 px; Lab's file browser takes 250
NOTEBOOK_TIMEOUT = 420.0  # Run All of the quickstart (it computes its caches) on a busy 2-core machine

LAB_SETTINGS = {
    # Draw every cell (no virtual scrolling), so that every output is in the page.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # No news or update checks (they would go to the internet).
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    # Save only when the test says so.
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def write_lab_environment(root: Path) -> dict[str, str]:
    """Fresh Jupyter directories (settings, workspaces, runtime) and a ``python3`` kernel
    running this interpreter; returns the environment for the server."""
    settings = root / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    kernel = root / "data" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(
        json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "Python 3", "language": "python"})
    )
    return dict(
        os.environ,
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"),
        JUPYTER_CONFIG_DIR=str(root / "config"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_PATH=str(root / "data"),
        SCORECAM_EXPLORER_CACHE_DIR=str(root / "scorecam-cache"),
    )


def lab_command(port: int, notebook_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=", "--allow-root",
        f"--ServerApp.root_dir={notebook_dir}", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]


def kernel_idle(page: Any) -> bool:
    """The notebook's kernel is connected and idle (status bar: 'Python 3 | Idle')."""
    return (
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0
        and any("Idle" in text for text in page.locator(".jp-StatusBar-Widget").all_inner_texts())
    )


def dialog_text(page: Any) -> str:
    """The text of an open JupyterLab dialog ('' when none)."""
    dialogs = page.locator(".jp-Dialog")
    return " ".join(dialogs.all_inner_texts()).strip() if dialogs.count() else ""


def cell_prompts(page: Any) -> list[str]:
    return [text.strip() for text in page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_inner_texts()]


def run_all_cells(page: Any, front_end: str) -> None:
    """Run All from the Run menu (JupyterLab and Notebook 7 share it), until a cell starts.

    The front end activates its plugins for a while after the page shows; a Run All chosen
    before the notebook's kernel is connected does nothing, or asks for a kernel (a user picks
    the notebook's own, Python 3, with Select). Choose it again until a cell starts (never
    after one has). Any other dialog is a failure: say what it says.
    """

    def started() -> bool:
        text = dialog_text(page)
        if text.startswith("Select Kernel") and all(p == "[ ]:" for p in cell_prompts(page)):
            page.locator(".jp-Dialog").get_by_role("button", name="Select").click()
            return False
        return bool(text) or any(p != "[ ]:" for p in cell_prompts(page))

    for _attempt in range(4):
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        try:
            wait_until(started, timeout=20, page=page, what="a cell to start")
            break
        except AssertionError:
            continue
    assert not dialog_text(page), f"{front_end} shows a dialog: {dialog_text(page)!r}"
    assert any(p != "[ ]:" for p in cell_prompts(page)), f"Run All did not start the notebook in {front_end}"


@pytest.mark.slow
def test_quickstart_in_jupyterlab(tmp_path: Path) -> None:
    require_chromium()
    notebook_dir = tmp_path / "notebooks"
    notebook_dir.mkdir()
    copy = notebook_dir / QUICKSTART.name
    shutil.copyfile(QUICKSTART, copy)
    n_code_cells = sum(cell.cell_type == "code" for cell in nbformat.read(copy, as_version=4).cells)
    port = free_port()
    env = write_lab_environment(tmp_path)
    watch = PageWatch()
    with running_server(
        lab_command(port, notebook_dir), port=port, ready_path="/api", log_path=ARTIFACTS / "jupyterlab.log",
        env=env, cwd=notebook_dir,
    ) as server, chromium_browser() as browser:
        page = browser.new_page(viewport=LAB_VIEWPORT)
        watch.attach(page)
        with screenshot_on_failure(page, "lab-failure"):
            page.goto(server.url(f"/lab/tree/{copy.name}"), timeout=PAGE_TIMEOUT * 1000)
            page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=PAGE_TIMEOUT * 1000)
            wait_until(lambda: kernel_idle(page), timeout=PAGE_TIMEOUT, page=page, what="the kernel to start")

            run_all_cells(page, "JupyterLab")

            def finished() -> bool:
                assert not dialog_text(page), f"JupyterLab shows a dialog while running: {dialog_text(page)!r}"
                prompts = cell_prompts(page)
                return len(prompts) == n_code_cells and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)

            try:
                wait_until(finished, timeout=NOTEBOOK_TIMEOUT, page=page, what="Run All to finish", interval=1.0)
            except AssertionError as error:
                raise AssertionError(f"{error}; prompts: {cell_prompts(page)}; page problems: {watch.problems()}") from None

            # Save (File > Save Notebook) and read the executed notebook back: every cell ran, none failed.
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^File$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Save Notebook$")).click()

            def saved() -> nbformat.NotebookNode | None:
                notebook = nbformat.read(copy, as_version=4)
                ran = all(c.execution_count is not None for c in notebook.cells if c.cell_type == "code")
                return notebook if ran else None

            executed = wait_until(saved, timeout=PAGE_TIMEOUT, page=page, what="the executed notebook to be saved")
            errors = [
                f"{output.get('ename')}: {output.get('evalue')}"
                for cell in executed.cells if cell.cell_type == "code"
                for output in cell.outputs if output.output_type == "error"
            ]
            assert not errors, f"cells failed in JupyterLab: {errors}"

            # The explorer rendered: the page's first figure is the first explorer's map (default
            # model, deepest cached layer 'head'), drawn with its title and picture.
            def first_map() -> dict[str, Any] | None:
                drawn = figures(page)
                return drawn[0] if drawn and drawn[0]["title"].startswith("Score-CAM for") else None

            try:
                first = wait_until(first_map, timeout=UPDATE_TIMEOUT, page=page, what="the first explorer's map to be drawn")
            except AssertionError as error:
                raise AssertionError(
                    f"{error}; figures in the page: {[(f['title'], len(f['traces'])) for f in figures(page)]}; "
                    f"page problems: {watch.problems()}"
                ) from None
            assert "· head ·" in first["title"], f"the first explorer opens on {first['title']!r}, not on head"
            top_k_slider = slider(page, "Top k", 0)
            total = int(slider_readout(top_k_slider))
            assert total == 1280, f"the first explorer's top-k slider reads {total}; head has 1280 channels"
            screenshot(page, "lab-01-executed")

            # ... and responds: drag its top-k slider, the map changes and says how many channels it keeps.
            previous = map_source(page)
            drag_slider(page, top_k_slider, 0.1)
            top_k = int(wait_until(lambda: (text := slider_readout(top_k_slider)) != str(total) and text,
                                   timeout=10, page=page, what="the top-k readout to move"))
            wait_for_new_map(page, previous, "dragging the top-k slider in JupyterLab", watch)
            wait_until(lambda: f"{top_k} of {total} channels" in map_figure(page)["text"], timeout=UPDATE_TIMEOUT,
                       page=page, what=f"the map's subtitle to say {top_k} of {total} channels")
            screenshot(page, "lab-02-top-k")

            # ... and a click on a bar (the 100th heaviest of head's 1280) inspects that channel.
            chart = figures_titled(page, "Channel weights")[0]
            ranked = decode_typed_array(chart["traces"][0]["customdata"])[:, 0].astype(int)
            click_inspects(page, 100, int(ranked[99]), "head", "JupyterLab")
            screenshot(page, "lab-03-clicked")
            watch.assert_clean("the quickstart notebook in JupyterLab")


# ---- Jupyter Notebook 7: an explorer over a saved cache ---------------------------------------

NOTEBOOK7_VIEWPORT = {"width": 1200, "height": 2400}
NOTEBOOK7_OWN_ERRORS = ("TypeError: Cannot read properties of undefined (reading 'schema')",)
"""Notebook 7.6.5's keyboard-shortcuts plugin raises this while it loads the settings, with a
notebook that holds only ``1 + 1`` too: Notebook's error, not the explorer's."""


def notebook7_command(port: int, notebook_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "notebook", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=", "--allow-root",
        f"--ServerApp.root_dir={notebook_dir}",
    ]


def explorer_notebook(path: Path, cache: Path) -> None:
    """A one-cell notebook that opens the explorer on ``cache`` (no model, no torch)."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [
        nbformat.v4.new_code_cell(f"from scorecam_explorer import Explorer\n\nExplorer.from_cache_file({str(cache)!r})")
    ]
    nbformat.write(notebook, path)


def kernels_idle(server: Server) -> bool:
    """The server runs a kernel and every kernel is idle (its REST API, as no status bar shows it)."""
    with urllib.request.urlopen(server.url("/api/kernels"), timeout=5) as response:
        kernels = json.loads(response.read())
    return bool(kernels) and all(kernel.get("execution_state") == "idle" for kernel in kernels)


@pytest.mark.slow
def test_explorer_in_notebook7(app_cache: Path, tmp_path: Path) -> None:
    """Notebook 7 (``jupyter notebook``, the /notebooks/ page): run a notebook that opens the
    explorer; the map is the library's, the channel chart has a bar per channel, and the
    top-k slider recomposes the map."""
    from scorecam_explorer import load_cache

    notebook_dir = tmp_path / "notebooks"
    notebook_dir.mkdir()
    path = notebook_dir / "explorer.ipynb"
    explorer_notebook(path, app_cache)
    cache = load_cache(app_cache)
    layer = CACHE_LAYERS[-1]
    n_channels = int(cache[layer].sizes["channel"])
    port = free_port()
    watch = PageWatch(harmless_page_errors=NOTEBOOK7_OWN_ERRORS)
    with running_server(
        notebook7_command(port, notebook_dir), port=port, ready_path="/api", log_path=ARTIFACTS / "notebook7.log",
        env=write_lab_environment(tmp_path), cwd=notebook_dir,
    ) as server, chromium_browser() as browser:
        expected = AppUnderTest(server, cache, int(np.argmax(cache["logits"].values[0])))  # opens on the top-1 class
        page = browser.new_page(viewport=NOTEBOOK7_VIEWPORT)
        watch.attach(page)
        with screenshot_on_failure(page, "notebook7-failure"):
            page.goto(server.url(f"/notebooks/{path.name}"), timeout=PAGE_TIMEOUT * 1000)
            page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=PAGE_TIMEOUT * 1000)
            wait_until(lambda: kernels_idle(server), timeout=PAGE_TIMEOUT, page=page, what="the kernel to start")

            run_all_cells(page, "Notebook 7")
            wait_until(lambda: all(re.fullmatch(r"\[\d+\]:", p) for p in cell_prompts(page)) and kernels_idle(server),
                       timeout=PAGE_TIMEOUT, page=page, what="the cell to finish", interval=1.0)
            # An exception is drawn as a stderr output holding its traceback.
            stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            tracebacks = [text for text in stderr.all_inner_texts() if "Traceback" in text or "Error" in text]
            assert not tracebacks, f"the cell failed in Notebook 7: {tracebacks}"

            # The explorer rendered: its map (the library's map for the deepest layer) and a bar per channel.
            try:
                wait_for_page(page, watch)
            except AssertionError as error:
                raise AssertionError(f"{error}; figures: {[f['title'] for f in figures(page)]}") from None
            check_map(page, expected, "the explorer in Notebook 7", layer)
            chart = check_figures_follow(page, layer, n_channels, "the explorer in Notebook 7", watch)
            assert len(decode_typed_array(chart["traces"][0]["customdata"])) == n_channels
            screenshot(page, "notebook7-01-executed")

            # ... and responds: drag the top-k slider, the map is recomposed from the top k.
            previous = map_source(page)
            top_k_slider = slider(page, "Top k")
            drag_slider(page, top_k_slider, 0.25)
            top_k = int(wait_until(lambda: (text := slider_readout(top_k_slider)) != str(n_channels) and text,
                                   timeout=10, page=page, what="the top-k readout to move"))
            wait_for_new_map(page, previous, "dragging the top-k slider in Notebook 7", watch)
            wait_until(lambda: f"{top_k} of {n_channels} channels" in map_figure(page)["text"], timeout=UPDATE_TIMEOUT,
                       page=page, what=f"the map's subtitle to say {top_k} of {n_channels} channels")
            check_map(page, expected, f"Notebook 7, after top k = {top_k}", layer, top_k=top_k)
            screenshot(page, "notebook7-02-top-k")

            # ... and a click on the 10th heaviest channel's bar inspects it.
            order = bar_order(cache, layer, expected.target)
            click_inspects(page, 10, int(order[9]), layer, "Notebook 7")
            screenshot(page, "notebook7-03-clicked")
            watch.assert_clean("the explorer in Notebook 7")
