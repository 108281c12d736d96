"""The explorer without a browser: set widget values, check what the figures show against
compose (and numpy) for that state; plus the analysis helpers it draws from."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import xarray as xr
from _tiny_models import tiny_model, write_images

from scorecam_explorer import baselines
from scorecam_explorer.cache import save_cache
from scorecam_explorer.colormaps import apply_colormap
from scorecam_explorer.compose import channel_contributions, channel_weights, scorecam
from scorecam_explorer.conventions import MASK_CONVENTIONS
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer import Explorer
from scorecam_explorer.explorer import analysis, panel
from scorecam_explorer.explorer.model_link import ModelLink, merge_layers
from scorecam_explorer.explorer.plotly_loader import FigureWidget, PlotlyBundle, _bundle_text
from scorecam_explorer.explorer.recomposer_panel import parse_channels
from scorecam_explorer.explorer.state import ExplorerState, kept_channels
from scorecam_explorer.figures import decode_image_uri, style
from scorecam_explorer.figures.encoding import DIVERGING, colorize, decode_typed_array
from scorecam_explorer.presets import PRESETS

LAYERS = ["features.1", "features.4"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return [str(path) for path in write_images(tmp_path_factory.mktemp("pictures"), 2)]


@pytest.fixture(scope="module")
def cache(model, images) -> xr.DataTree:
    return compute_cache(model, images, LAYERS, progress=False, batch_size=8)


@pytest.fixture
def explorer(cache) -> Explorer:
    return Explorer(cache)


def shown_map(explorer: Explorer) -> np.ndarray:
    """The coloured map the map panel's FigureWidget shows (trace 1), decoded."""
    return decode_image_uri(explorer.map.figure.widget.data[1].source)


def coloured(saliency: xr.DataArray, colormap: str = "jet") -> np.ndarray:
    return apply_colormap(saliency.values, colormap)


class MessageLog:
    """Counts the plot updates each FigureWidget sends (one per batch_update)."""

    def __init__(self, figures: dict) -> None:
        self.updates = {name: 0 for name in figures}
        for name, live in figures.items():
            live.widget.comm.send = self._recorder(name)

    def _recorder(self, name: str):
        def send(data=None, buffers=None, **_kwargs):
            state = (data or {}).get("state", {})
            if state.get("_py2js_update") or state.get("_py2js_restyle") or state.get("_py2js_relayout"):
                self.updates[name] += 1

        return send

    def reset(self) -> None:
        self.updates = dict.fromkeys(self.updates, 0)


def figures_of(explorer: Explorer) -> dict:
    return {
        "map": explorer.map.figure,
        "fidelity": explorer.recomposer.figure,
        "bars": explorer.channels.bars,
        "detail": explorer.channels.detail,
        "gallery": explorer.channels.gallery,
        "compare": explorer.compare.figure,
        "metrics": explorer.metrics.figure,
    }


def click_bar(explorer: Explorer, position: int) -> None:
    """What the browser sends when a bar is clicked (a custom message of the figure's view)."""
    explorer.channels.bars.widget._handle_custom_msg({"event": "click", "points": [{"trace": 0, "point": position}]}, [])


# ---- the map follows the controls -----------------------------------------------------------


def test_the_map_shows_compose_for_the_initial_state(explorer, cache) -> None:
    s = explorer.state.selection
    assert s.layer == LAYERS[-1]  # the deepest cached layer
    assert s.target == int(np.argmax(cache["logits"].isel(image=0).values))  # the top-1 class
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, s.layer, s.target, image=0)))
    assert np.array_equal(decode_image_uri(explorer.map.figure.widget.data[0].source), cache["picture"].isel(image=0).values)


def test_layer_scrubber_class_picker_and_preset_redraw_the_map(explorer, cache) -> None:
    explorer.controls.layer.value = "features.1"
    explorer.controls.target.value = 3
    explorer.controls.preset.value = "official"
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, "features.1", 3, preset="official", image=0)))
    title = explorer.map.figure.widget.layout.title.text
    assert "class 3" in title and "features.1" in title and "official" in title


def test_class_search_takes_any_name_and_reports_unknown_ones_in_place(explorer, cache) -> None:
    explorer.controls.search.value = "class 8"
    assert explorer.state.selection.target == 8
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, LAYERS[-1], 8, image=0)))
    assert any(value == 8 for _, value in explorer.controls.target.options)  # added to the picker
    explorer.controls.search.value = "zebra"
    assert explorer.state.selection.target == 8  # unchanged
    assert "no class named" in explorer.controls.message.value and "zebra" in explorer.controls.message.value


def test_searching_the_same_class_again_selects_it_again(explorer) -> None:
    explorer.controls.search.value = "class 7"
    assert explorer.state.selection.target == 7
    assert explorer.controls.search.value == ""  # cleared, so the same name is a change next time
    explorer.controls.target.value = 3
    explorer.controls.search.value = "class 7"
    assert explorer.state.selection.target == 7
    explorer.controls.search.value = "zebra"  # refused: stays in the box to be corrected
    assert explorer.controls.search.value == "zebra" and explorer.state.selection.target == 7


def test_class_picker_lists_the_top_ten_with_probabilities(explorer, cache) -> None:
    logits = cache["logits"].isel(image=0).values.astype(np.float64)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    options = explorer.controls.target.options
    assert [value for _, value in options][:10] == list(np.argsort(-probabilities, kind="stable")[:10])
    best = int(np.argmax(probabilities))
    assert options[0][0] == f"class {best} · {probabilities[best]:.1%}"


def test_picture_picker_switches_image(explorer, cache) -> None:
    assert explorer.controls.image.layout.display != "none"  # two pictures: the picker shows
    explorer.controls.image.value = 1
    s = explorer.state.selection
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, s.layer, s.target, image=1)))
    assert np.array_equal(decode_image_uri(explorer.map.figure.widget.data[0].source), cache["picture"].isel(image=1).values)


def test_map_hover_layer_holds_the_shown_maps_values(explorer, cache) -> None:
    """The invisible heatmap over the map: its values are compose's map at its grid pixels."""
    explorer.recomposer.top_k.value = 2
    explorer.recomposer.switched_off.value = "1"
    s = explorer.state.selection
    n = explorer.state.channel_count()
    on = np.ones(n, dtype=bool)
    on[1] = False
    expected = scorecam(cache, s.layer, s.target, image=0, top_k=2, channels=on).values
    hover = explorer.map.figure.widget.data[3]
    assert hover.type == "heatmap" and hover.name == "map value"
    rows, cols = np.asarray(hover.y), np.asarray(hover.x)
    assert rows.min() >= 0 and rows.max() < expected.shape[0] and cols.max() < expected.shape[1]
    z = decode_typed_array(hover.z)
    assert z.shape == (rows.size, cols.size)
    assert np.array_equal(z, expected[np.ix_(rows, cols)].astype(np.float32))
    assert "%{z" in hover.hovertemplate and "%{x}" in hover.hovertemplate


def test_opacity_and_colour_scale(explorer, cache) -> None:
    log = MessageLog(figures_of(explorer))
    explorer.map.opacity.value = 0.8
    assert explorer.map.figure.widget.data[1].opacity == 0.8
    assert log.updates["map"] == 1 and sum(log.updates.values()) == 2  # the map and the compare maps
    explorer.map.colormap.value = "viridis"
    s = explorer.state.selection
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, s.layer, s.target, image=0), "viridis"))


# ---- recomposer -------------------------------------------------------------------------


def test_top_k_slider_recomposes_and_marks_the_fidelity_curve(explorer, cache) -> None:
    s = explorer.state.selection
    explorer.recomposer.top_k.value = 3
    top = scorecam(cache, s.layer, s.target, image=0, top_k=3)
    full = scorecam(cache, s.layer, s.target, image=0)
    assert np.array_equal(shown_map(explorer), coloured(top))
    marker = explorer.recomposer.figure.widget.data[1]
    assert marker.x == (3,)
    assert marker.y[0] == pytest.approx(np.corrcoef(top.values.ravel(), full.values.ravel())[0, 1], abs=1e-9)
    assert "top <b>3</b> of" in explorer.recomposer.summary.value
    assert f"<b>{marker.y[0]:.3f}</b>" in explorer.recomposer.summary.value


def test_switching_channels_off_by_text_click_and_reset(explorer, cache) -> None:
    s = explorer.state.selection
    n = explorer.state.channel_count()
    explorer.recomposer.switched_off.value = "2, 5"
    on = np.ones(n, dtype=bool)
    on[[2, 5]] = False
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, s.layer, s.target, image=0, channels=on)))
    # click a bar in "switch off / on" mode
    explorer.channels.click_mode.value = "toggle"
    order = explorer.state.order()
    click_bar(explorer, 0)
    on[order[0]] = False
    assert explorer.state.selection.switched_off == frozenset({2, 5, int(order[0])})
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, s.layer, s.target, image=0, channels=on)))
    assert explorer.recomposer.switched_off.value == ", ".join(map(str, sorted({2, 5, int(order[0])})))
    explorer.recomposer.reset.click()
    assert explorer.state.selection.switched_off == frozenset()
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, s.layer, s.target, image=0)))


def test_a_click_message_that_is_not_a_bar_changes_nothing(explorer) -> None:
    before = explorer.state.selection
    bars = explorer.channels.bars.widget
    for content in (
        {"event": "click", "points": []},
        {"event": "click", "points": [{"trace": 1, "point": 0}]},  # not the bars' trace
        {"event": "click", "points": [{"trace": 0, "point": 10_000}]},  # no such bar
        {"event": "click", "points": [{"trace": 0, "point": "2"}]},
        {"event": "hover"},
        "click",
    ):
        bars._handle_custom_msg(content, [])
    assert explorer.state.selection == before


def test_the_chart_window_follows_a_typed_channel_but_not_a_click(explorer, monkeypatch) -> None:
    from scorecam_explorer.explorer import channels_panel

    monkeypatch.setattr(channels_panel, "visible_bar_count", lambda n_channels, width: 3)  # 3 bars fit
    channels = explorer.channels
    explorer.controls.target.value = 4  # a new ordering: the window starts again
    order = explorer.state.order()
    window = lambda: list(channels.bars.widget.layout.xaxis.range)  # noqa: E731
    channels.channel.value = int(order[0])
    assert window() == [0.5, 3.5]
    channels.channel.value = int(order[7])  # rank 8, beyond the window: it moves there
    low, high = window()
    assert low < 8 < high and high - low == 3
    click_bar(explorer, int(low + 0.5) - 1)  # a bar inside the window: it stays
    assert window() == [low, high]
    channels.click_mode.value = "inspect"
    click_bar(explorer, 0)  # rank 1, clicked after the user dragged the strip there: no jump
    assert explorer.state.selection.channel == int(order[0]) and window() == [low, high]


def test_bad_channel_text_is_reported_in_place(explorer) -> None:
    explorer.recomposer.switched_off.value = "3, x"
    assert "not a channel number" in explorer.recomposer.message.value
    explorer.recomposer.switched_off.value = "999"
    assert "do not exist" in explorer.recomposer.message.value
    assert explorer.state.selection.switched_off == frozenset()
    assert parse_channels("1, 2 3") == {1, 2, 3}


def test_refused_channel_text_is_replaced_by_the_channels_switched_off(explorer) -> None:
    box, n = explorer.recomposer.switched_off, explorer.state.channel_count()
    box.value = "2"
    for refused, reason in [("3, 99", "do not exist"), (", ".join(map(str, range(n))), "every channel"), ("3, x", "not a channel number")]:
        box.value = refused
        assert explorer.state.selection.switched_off == frozenset({2})
        assert box.value == "2", refused  # the box shows what the map uses
        assert reason in explorer.recomposer.message.value  # and the message says why
    box.value = "3, 99"  # the same refused text again is reported again
    assert "do not exist" in explorer.recomposer.message.value and box.value == "2"


def test_fidelity_curve_shown_is_pearson_r_of_compose_maps(explorer, cache) -> None:
    s = explorer.state.selection
    line = explorer.recomposer.figure.widget.data[0]
    full = scorecam(cache, s.layer, s.target, image=0).values.ravel()
    for k, r in zip(line.x, line.y):
        top = scorecam(cache, s.layer, s.target, image=0, top_k=int(k)).values.ravel()
        expected = np.corrcoef(top, full)[0, 1] if top.std() > 0 else np.nan
        assert r == pytest.approx(expected, abs=1e-7, nan_ok=True), k


# ---- channel inspector ----------------------------------------------------------------------


def test_bars_show_compose_weights_in_the_chosen_order(explorer, cache) -> None:
    s = explorer.state.selection
    data = channel_contributions(cache, s.layer, s.target, image=0)
    for key, variable in (("variance", "variance"), ("contribution", "share"), ("weight", "weight")):
        explorer.channels.sort_by.value = key
        order = np.argsort(-data[variable].values, kind="stable")
        bars = explorer.channels.bars.widget.data[0]
        assert np.allclose(bars.y, data["weight"].values[order])
        rows = decode_typed_array(bars.customdata)
        assert np.array_equal(rows[:, 0], order) and np.allclose(rows[:, 2], data["probability"].values[order])


def test_clicking_a_bar_inspects_that_channel(explorer, cache) -> None:
    s = explorer.state.selection
    order = explorer.state.order()
    click_bar(explorer, 2)
    channel = int(order[2])
    assert explorer.state.selection.channel == channel
    assert explorer.channels.channel.value == channel
    tiles = [decode_image_uri(trace.source) for trace in explorer.channels.detail.widget.data[:3]]
    activation = cache[s.layer]["activation"].isel(image=0, channel=channel).values.astype(np.float64)
    low, high = activation.min(), activation.max()
    high = high if high > low else low + 1.0
    assert np.array_equal(tiles[0], colorize(activation, "viridis", low, high))
    mask = analysis.channel_mask(cache, s.layer, channel)
    assert np.array_equal(tiles[1], apply_colormap(mask.values, "gray"))
    assert np.array_equal(tiles[2], analysis.masked_picture(cache, mask).values)
    weight = channel_weights(cache, s.layer, s.target, image=0).values[channel]
    assert f"{weight:.4g}" in explorer.channels.scores.value


def test_channel_box_and_toggle_button(explorer, cache) -> None:
    explorer.channels.channel.value = 4
    assert explorer.state.selection.channel == 4
    explorer.channels.toggle.click()
    assert 4 in explorer.state.selection.switched_off
    assert "on" in explorer.channels.toggle.description
    marker = explorer.channels.bars.widget.data[0].marker
    order = explorer.state.order().tolist()
    fill, outline = dict(zip(order, marker.color)), dict(zip(order, marker.line.color))
    width = dict(zip(order, marker.line.width))
    # inspected and switched off: grey like every switched-off bar, with the inspected orange outline
    assert fill[4] == style.SWITCHED_OFF and outline[4] == style.SELECTED and width[4] > 0
    assert all(w == 0 for channel, w in width.items() if channel != 4)
    explorer.channels.toggle.click()
    assert 4 not in explorer.state.selection.switched_off
    marker = explorer.channels.bars.widget.data[0].marker
    fill, width = dict(zip(order, marker.color)), dict(zip(order, marker.line.width))
    assert fill[4] == style.SELECTED and width[4] == 0
    assert "inspected, switched off" in explorer.channels.legend.value


def test_bar_colours_reach_the_browser_as_css_colour_strings(explorer) -> None:
    """plotly.js warns 'Invalid color specifier' for every bar given numbers or a typed array."""
    explorer.channels.channel.value = 3
    explorer.recomposer.switched_off.value = "2, 5"
    explorer.recomposer.top_k.value = 3
    for marker in (explorer.channels.bars.spec["data"][0]["marker"], explorer.channels.bars.widget.data[0].marker):
        colours = [*marker["color"], *marker["line"]["color"]]
        assert len(colours) == 2 * explorer.state.channel_count()
        assert all(isinstance(colour, str) and re.fullmatch(r"#[0-9a-f]{6}", colour) for colour in colours)
    kept = explorer.state.kept()
    fill = dict(zip(explorer.state.order().tolist(), explorer.channels.bars.spec["data"][0]["marker"]["color"]))
    for channel, colour in fill.items():
        expected = (
            style.SWITCHED_OFF if channel in (2, 5) else style.SELECTED if channel == 3
            else style.KEPT if kept[channel] else style.NOT_KEPT
        )
        assert colour == expected, channel


def test_gallery_shows_the_first_channels_contributions(explorer, cache) -> None:
    s = explorer.state.selection
    data = channel_contributions(cache, s.layer, s.target, image=0)
    order = np.argsort(-data["weight"].values, kind="stable")[:8]
    tiles = data["contribution"].values[order]
    extent = np.abs(tiles).max()
    shown = [trace for trace in explorer.channels.gallery.widget.data if trace.type == "image"]
    assert len(shown) == 8
    assert np.array_equal(decode_image_uri(shown[0].source), colorize(tiles[0], DIVERGING, -extent, extent))
    assert explorer.channels.gallery.widget.layout.annotations[1].text.startswith(f"channel {order[0]}")


# ---- compare --------------------------------------------------------------------------------


def compare_sources(explorer: Explorer) -> list[np.ndarray]:
    return [decode_image_uri(t.source) for t in explorer.compare.figure.widget.data if t.type == "image"]


def test_compare_two_presets_layers_and_classes(explorer, cache) -> None:
    s = explorer.state.selection
    explorer.compare.mode.value = "presets"
    explorer.compare.first.value, explorer.compare.second.value = "torchcam", "official"
    first = scorecam(cache, s.layer, s.target, preset="torchcam", image=0)
    second = scorecam(cache, s.layer, s.target, preset="official", image=0)
    sources = compare_sources(explorer)
    assert np.array_equal(sources[1], coloured(first)) and np.array_equal(sources[3], coloured(second))
    difference = first.values.astype(np.float64) - second.values.astype(np.float64)
    assert np.array_equal(sources[4], colorize(difference, DIVERGING, -1.0, 1.0))
    assert f"{np.corrcoef(first.values.ravel(), second.values.ravel())[0, 1]:.3f}" in explorer.compare.figure.widget.layout.title.text

    explorer.compare.mode.value = "layers"
    explorer.compare.first.value, explorer.compare.second.value = "features.1", "features.4"
    assert np.array_equal(compare_sources(explorer)[1], coloured(scorecam(cache, "features.1", s.target, image=0)))

    explorer.compare.mode.value = "classes"
    second_class = explorer.compare.second.value
    assert np.array_equal(compare_sources(explorer)[3], coloured(scorecam(cache, s.layer, second_class, image=0)))
    assert "methods" not in [value for _, value in explorer.compare.mode.options]  # no model attached


def test_compare_offers_grad_cam_when_a_model_is_attached(cache, model) -> None:
    explorer = Explorer(cache, model=model)
    explorer.compare.mode.value = "methods"
    explorer.compare.second.value = "gradcam++"
    s = explorer.state.selection
    inputs = torch.from_numpy(cache["input"].isel(image=[0]).values)
    expected = baselines.gradcam_pp(model, inputs, s.layer, s.target).isel(image=0)
    assert np.array_equal(compare_sources(explorer)[3], coloured(expected))
    assert "Grad-CAM++" in explorer.compare.figure.widget.layout.annotations[2].text


# ---- one message per figure, errors in place, no torch ---------------------------------------


def test_each_change_sends_at_most_one_update_per_figure(explorer) -> None:
    log = MessageLog(figures_of(explorer))
    changes = [
        lambda: setattr(explorer.controls.target, "value", 5),
        lambda: setattr(explorer.controls.preset, "value", "torchcam"),
        lambda: setattr(explorer.controls.layer, "value", "features.1"),
        lambda: setattr(explorer.recomposer.top_k, "value", 2),
        lambda: setattr(explorer.channels.sort_by, "value", "variance"),
        lambda: setattr(explorer.channels.channel, "value", 1),
    ]
    for change in changes:
        log.reset()
        change()
        assert max(log.updates.values()) == 1, log.updates
        assert log.updates["map"] + log.updates["bars"] >= 1


def test_unknown_layer_or_class_opens_on_the_default_and_says_so(cache) -> None:
    explorer = Explorer(cache, layer="features.9", target="zebra")
    assert explorer.state.selection.layer == LAYERS[-1]
    message = explorer.controls.message.value
    assert "features.9" in message and "features.1" in message and "zebra" in message
    # asking the panel for a layer the cache lacks shows the reason, nothing raises
    assert not explorer.controls.apply(layer="features.0")
    assert "not in this cache" in explorer.controls.message.value


def test_a_layer_with_nan_outputs_does_not_stop_the_explorer_opening(cache) -> None:
    broken = cache.copy(deep=True)
    broken["features.1"]["masked_logits"].values[0, 2, :] = np.nan
    explorer = Explorer(broken, layer="features.4")
    assert explorer.state.selection.layer == "features.4"
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, "features.4", explorer.state.selection.target, image=0)))
    explorer.controls.layer.value = "features.1"  # refused, with the reason, in place
    assert explorer.state.selection.layer == "features.4"
    assert "not finite" in explorer.controls.message.value
    assert explorer.controls.layer.value == "features.4"  # the slider shows the layer still shown


def test_a_layer_with_nan_activation_is_refused_by_the_channel_chart(cache) -> None:
    broken = cache.copy(deep=True)
    broken["features.1"]["activation"].values[0, 2, 1, 1] = np.nan
    explorer = Explorer(broken, layer="features.4")
    before = decode_typed_array(explorer.channels.bars.widget.data[0].customdata)
    explorer.controls.layer.value = "features.1"
    assert "channel chart" in explorer.channels.message.value and "NaN" in explorer.channels.message.value
    shown = decode_typed_array(explorer.channels.bars.widget.data[0].customdata)
    assert np.isfinite(shown).all() and np.array_equal(shown, before)  # no NaN reaches the hover data


def test_state_checks_values_and_tells_listeners_once(cache) -> None:
    state = ExplorerState(cache)
    seen = []
    state.observe(seen.append)
    state.update(top_k=2, sort_by="variance")
    assert seen == [frozenset({"top_k", "sort_by"})]
    state.update(top_k=10**6)  # every channel: the same as no top k
    assert state.selection.top_k is None
    state.update(layer="features.1")
    assert state.selection.switched_off == frozenset() and state.selection.top_k is None
    for bad in ({"preset": "nope"}, {"opacity": 2.0}, {"channel": 99}, {"switched_off": range(8)}, {"color": 1}):
        with pytest.raises(ScorecamError):
            state.update(**bad)


def test_no_torch_when_exploring_a_saved_cache(cache, tmp_path) -> None:
    path = save_cache(cache, tmp_path / "tiny.zarr")
    code = textwrap.dedent(
        f"""
        import sys
        from scorecam_explorer import Explorer
        explorer = Explorer.from_cache_file({str(path)!r})
        explorer.controls.layer.value = "features.1"
        explorer.controls.target.value = 2
        explorer.recomposer.top_k.value = 3
        explorer.channels.channel.value = 1
        explorer.compare.mode.value = "layers"
        print("torch" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_explorer_displays_as_a_widget(explorer) -> None:
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "layer 'features.4'" in repr(explorer)


# ---- with the model: computing a layer that is not cached -----------------------------------


def test_a_missing_layer_is_computed_from_the_panel(model, images, cache) -> None:
    small = compute_cache(model, images, ["features.4"], progress=False, batch_size=8)
    explorer = Explorer(small, model=model)
    assert explorer.controls.compute_row.layout.display != "none"
    explorer.controls.load_model.click()
    assert "features.1" in explorer.controls.new_layer.options
    explorer.controls.new_layer.value = "features.1"
    explorer.controls.compute.click()
    assert explorer.state.layers == ["features.1", "features.4"]
    assert explorer.state.selection.layer == "features.1"
    assert np.allclose(explorer.cache["features.1"]["masked_logits"].values, cache["features.1"]["masked_logits"].values, atol=1e-5)
    s = explorer.state.selection
    assert np.array_equal(shown_map(explorer), coloured(scorecam(explorer.cache, "features.1", s.target, image=0)))
    assert "features.1" in explorer.controls.layer.options


def test_a_model_with_other_weights_is_refused_in_place(cache) -> None:
    explorer = Explorer(cache, model=lambda: tiny_model(seed=1))
    explorer.controls.load_model.click()
    assert "not the ones the cache was made with" in explorer.controls.message.value
    assert explorer.controls.compute_row.layout.display == "none"


def missing_weights():
    raise FileNotFoundError("weights.pth missing")


def bad_pickle():
    raise pickle.UnpicklingError("invalid load key, 'x'.")


@pytest.mark.parametrize("loader, name", [(missing_weights, "FileNotFoundError"), (bad_pickle, "UnpicklingError")])
def test_a_model_that_fails_to_load_is_reported_in_place(cache, loader, name) -> None:
    explorer = Explorer(cache, model=loader)
    explorer.controls.load_model.click()
    message = explorer.controls.message.value
    assert "The model cannot be used" in message and name in message
    assert explorer.controls.compute_row.layout.display == "none"
    assert name in explorer.model.failure and not explorer.model.available
    explorer.compare.mode.value = "methods"  # nothing raised into the notebook
    assert name in explorer.compare.message.value
    explorer.controls.compute_layer("features.1")
    assert "Could not compute features.1" in explorer.controls.message.value and name in explorer.controls.message.value
    assert not explorer.controls.compute.disabled


def test_a_model_failure_is_reported_in_place_inside_a_kernel_too(cache, monkeypatch) -> None:
    """In a kernel, an Output widget shows an exception raised inside it as a traceback and
    swallows it: the panel must catch it first."""
    tracebacks = []

    class Shell:
        def showtraceback(self, exc_tuple, tb_offset=0):
            tracebacks.append(exc_tuple[0])

    monkeypatch.setattr("ipywidgets.widgets.widget_output.get_ipython", lambda: Shell())
    explorer = Explorer(cache, model=missing_weights)
    explorer.controls.load_model.click()
    assert "FileNotFoundError: weights.pth missing" in explorer.controls.message.value
    explorer.controls.compute_layer("features.1")
    assert "Could not compute features.1" in explorer.controls.message.value
    assert tracebacks == []


def test_compare_methods_with_a_model_that_fails_to_load_says_why(cache) -> None:
    explorer = Explorer(cache, model=missing_weights)
    explorer.compare.mode.value = "methods"
    assert "FileNotFoundError: weights.pth missing" in explorer.compare.message.value
    explorer.controls.layer.value = "features.1"  # following the selection raises nothing either
    assert "FileNotFoundError" in explorer.compare.message.value


def test_an_error_while_computing_a_layer_is_reported_and_not_left_computing(images) -> None:
    broken = tiny_model(seed=0)
    small = compute_cache(broken, images, ["features.4"], progress=False, batch_size=8)

    def fail(_module, _args):
        raise RuntimeError("out of memory (test)")

    broken.module.register_forward_pre_hook(fail)
    explorer = Explorer(small, model=broken)
    explorer.controls.compute_layer("features.1")
    assert "Could not compute features.1: RuntimeError: out of memory (test)" in explorer.controls.message.value
    assert "Computing" not in explorer.controls.message.value and not explorer.controls.compute.disabled
    assert explorer.state.layers == ["features.4"]


def test_keyboard_interrupt_while_loading_the_model_is_not_swallowed() -> None:
    def interrupted():
        raise KeyboardInterrupt

    link = ModelLink(interrupted, None)
    with pytest.raises(KeyboardInterrupt):
        link.get()
    assert link.failure is None and link.available


def test_from_model_computes_the_cache(model, images) -> None:
    explorer = Explorer.from_model(model, images[0], layers=["features.4"], progress=False, batch_size=8)
    assert explorer.state.layers == ["features.4"]
    assert explorer.model.available and explorer.model.get() is model


def test_merge_layers_keeps_model_order_and_refuses_other_weights(model, images, cache) -> None:
    first = compute_cache(model, images, ["features.4"], progress=False, batch_size=8)
    second = compute_cache(model, images, ["features.1"], progress=False, batch_size=8)
    merged = merge_layers(first, second, order=model.layer_names(listed_only=False))
    assert json.loads(merged.attrs["layers"]) == ["features.1", "features.4"]
    assert merged.attrs["forward_passes"] == first.attrs["forward_passes"] + second.attrs["forward_passes"]
    other = compute_cache(tiny_model(seed=2), images, ["features.1"], progress=False, batch_size=8)
    with pytest.raises(ScorecamError, match="weights_fingerprint"):
        merge_layers(first, other)


def test_a_layer_added_to_a_bfloat16_cache_is_computed_in_bfloat16(model, images, native_bfloat16) -> None:
    """The new layer's scores come from bfloat16 passes, as the cache's attributes say."""
    from scorecam_explorer.explorer.model_link import compute_layers

    half = compute_cache(model, images[:1], ["features.4"], progress=False, batch_size=8, precision="bfloat16")
    added = compute_layers(half, model, ["features.1"], progress=False)
    expected = compute_cache(model, images[:1], ["features.1"], progress=False, batch_size=8, precision="bfloat16")
    full = compute_cache(model, images[:1], ["features.1"], progress=False, batch_size=8)
    scores = added["features.1"]["masked_logits"].values
    to_bfloat16 = np.abs(scores - expected["features.1"]["masked_logits"].values).max()
    to_float32 = np.abs(scores - full["features.1"]["masked_logits"].values).max()
    assert added.attrs["dtype"] == "bfloat16"
    # another batch size may round the bfloat16 passes a little differently, but the scores
    # must be those of bfloat16 passes, not of float32 ones
    assert to_float32 > 0 and to_bfloat16 <= 0.1 * to_float32
    with pytest.raises(ScorecamError, match="dtype"):
        merge_layers(half, full)


# ---- analysis helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("convention", list(MASK_CONVENTIONS))
def test_channel_mask_matches_the_engines_torch_masks(model, images, convention) -> None:
    cache = compute_cache(model, images[:1], ["features.4"], convention=convention, progress=False, batch_size=8)
    activation = torch.from_numpy(cache["features.4"]["activation"].values)
    expected = MASK_CONVENTIONS[convention].masks(activation, (32, 32))[0].numpy()
    for channel in range(activation.shape[1]):
        mask = analysis.channel_mask(cache, "features.4", channel)
        assert mask.dims == ("y", "x") and mask.dtype == np.float32
        # float32, rounded as the engine rounds: a few ulps of [0, 1] apart at most
        np.testing.assert_allclose(mask.values, expected[channel], rtol=0, atol=1e-6, err_msg=str(channel))


@pytest.mark.parametrize("convention", list(MASK_CONVENTIONS))
@pytest.mark.parametrize(("feature", "size"), [((7, 7), (224, 224)), ((5, 9), (40, 48)), ((7, 7), (65, 64))])
def test_engine_mask_rounds_as_the_engine(convention, feature, size) -> None:
    """Large and small outputs (PyTorch interpolates them differently), odd ratios, every convention."""
    chosen = MASK_CONVENTIONS[convention]
    maps = torch.randn(1, 16, *feature, generator=torch.Generator().manual_seed(3))
    expected = chosen.masks(maps, size)[0].numpy()
    described = json.loads(chosen.to_json())
    for channel in range(16):
        mask = analysis.engine_mask(maps[0, channel].numpy(), size, described, constant=False)
        assert mask.dtype == np.float32
        np.testing.assert_allclose(mask, expected[channel], rtol=0, atol=1e-6, err_msg=f"{convention} {channel}")


def with_channel(cache: xr.DataTree, layer: str, channel: int, values: np.ndarray, constant: bool) -> xr.DataTree:
    """A copy of ``cache`` whose image 0, ``channel`` has these activation values and flag."""
    activation = cache[layer]["activation"].values.copy()
    flags = cache[layer]["constant"].values.copy()
    activation[0, channel], flags[0, channel] = values, constant
    tree = cache.copy()
    tree[layer] = tree[layer].to_dataset(inherit=False).assign(
        activation=(("image", "channel", "fy", "fx"), activation), constant=(("image", "channel"), flags)
    )
    return tree


# A constant activation whose float32 upsampling (32 / 16 = 2x) is not exactly constant on a
# CPU: the engine stretches that rounding to a [0, 1] mask (as the published libraries do).
NEAR_CONSTANT = np.full((16, 16), np.float32(3.1848085), dtype=np.float32)


def test_a_channel_the_cache_flags_constant_shows_an_all_zero_mask(cache) -> None:
    """The flag says what was scored (e.g. on a GPU, whose rounding left the map constant):
    its score is the baseline's, its mask all zero, whatever this machine's rounding makes."""
    tree = with_channel(cache, "features.4", 2, NEAR_CONSTANT, constant=True)
    mask = analysis.channel_mask(tree, "features.4", 2)
    assert mask.dtype == np.float32 and not mask.values.any() and mask.attrs["constant"] == 1


def test_a_near_constant_channel_shows_the_mask_the_engine_forwarded(cache) -> None:
    """Not flagged: the engine forwarded its float32 rounding noise stretched to [0, 1]; the
    explorer shows that mask, not a float64 rebuild's exact constant (all zero)."""
    probe = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(5))
    torch_rounding = MASK_CONVENTIONS["paper"].masks(probe[None], (32, 32))[0].numpy()
    replica = [analysis.engine_mask(m.numpy(), (32, 32), {"align_corners": False}, False) for m in probe]
    if not np.array_equal(np.stack(replica), torch_rounding):
        pytest.skip("torch's bilinear kernel on this CPU rounds without fused multiply-adds: no bit-exact replica")
    blocks = MASK_CONVENTIONS["paper"].mask_blocks(torch.from_numpy(NEAR_CONSTANT)[None], (32, 32))
    _, forwarded, flags = next(blocks)
    assert forwarded[0].numpy().max() == 1.0 and not bool(flags[0])  # what the engine did
    tree = with_channel(cache, "features.4", 2, NEAR_CONSTANT, constant=False)
    mask = analysis.channel_mask(tree, "features.4", 2)
    np.testing.assert_array_equal(mask.values, forwarded[0].numpy())


def test_masked_picture_shows_mean_colour_where_masked(cache) -> None:
    ones = xr.DataArray(np.ones((32, 32)), dims=("y", "x"))
    zeros = xr.DataArray(np.zeros((32, 32)), dims=("y", "x"))
    unmasked = analysis.masked_picture(cache, ones).values.astype(int)
    assert np.abs(unmasked - cache["picture"].isel(image=0).values.astype(int)).max() <= 1
    described = json.loads(cache.attrs["preprocessing"])
    mean_colour = np.round(np.asarray(described["mean"]) * 255)
    assert np.array_equal(analysis.masked_picture(cache, zeros).values[0, 0], mean_colour)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_fidelity_curve_equals_pearson_of_compose_maps_for_every_preset(cache, preset) -> None:
    layer, target = "features.4", 4
    off = {1, 6}
    curve = analysis.fidelity_curve(cache, layer, target, preset=preset, image=1, switched_off=off)
    on = np.ones(cache[layer].sizes["channel"], dtype=bool)
    on[list(off)] = False
    full = scorecam(cache, layer, target, preset=preset, image=1).values.ravel()
    assert curve.sizes["k"] == on.sum() and curve.attrs["complete"] == 1
    # ReLU after upsampling: float32 maps (r to about 1e-6); otherwise exact sums
    tolerance = 1e-6 if PRESETS[preset].relu_at == "input" else 1e-7
    for k in curve["k"].values:
        top = scorecam(cache, layer, target, preset=preset, image=1, channels=on, top_k=int(k)).values.ravel()
        expected = np.corrcoef(top, full)[0, 1] if top.std() > 0 else np.nan
        assert curve.sel(k=k).item() == pytest.approx(expected, abs=tolerance, nan_ok=True), (preset, k)
    weights = channel_weights(cache, layer, target, preset=preset, image=1).values
    kept = kept_channels(weights, off, 3)
    assert set(curve["channel"].values[:3]) == set(np.flatnonzero(kept))


@pytest.mark.parametrize("preset", ["paper", "torchcam"])
def test_fidelity_curve_agrees_with_topk_fidelity_on_all_zero_maps(cache, preset) -> None:
    """The heaviest channel made negative: its top-1 map is all zero after ReLU, and r is
    undefined for the explorer exactly as for the metric (NaN, not 0)."""
    from scorecam_explorer.metrics import topk_fidelity

    layer, target = "features.4", 4
    heaviest = int(np.argmax(channel_weights(cache, layer, target, preset=preset, image=0).values))
    activation = cache[layer]["activation"].values.copy()
    activation[0, heaviest] = -1.0 - activation[0, heaviest]
    tree = cache.copy()
    tree[layer] = tree[layer].to_dataset(inherit=False).assign(
        activation=(("image", "channel", "fy", "fx"), activation)
    )
    curve = analysis.fidelity_curve(tree, layer, target, preset=preset, image=0)
    metric = topk_fidelity(tree, layer, [target, target], ks=list(curve["k"].values), preset=preset)
    assert np.isnan(curve.sel(k=1).item()) and np.isnan(metric.isel(image=0, k=0).item())
    np.testing.assert_allclose(curve.values, metric.isel(image=0).values, rtol=0, atol=1e-6)  # NaN where NaN


def test_sampled_fidelity_curve_is_exact_where_sampled(cache) -> None:
    curve = analysis.fidelity_curve(cache, "features.4", 0, preset="official", image=0, max_points=5)
    assert curve.attrs["complete"] == 0 and curve["k"].values[-1] == 16
    full = scorecam(cache, "features.4", 0, preset="official", image=0).values.ravel()
    for k in curve["k"].values:
        top = scorecam(cache, "features.4", 0, preset="official", image=0, top_k=int(k)).values.ravel()
        expected = np.corrcoef(top, full)[0, 1] if top.std() > 0 else np.nan
        assert curve.sel(k=k).item() == pytest.approx(expected, abs=1e-6, nan_ok=True)


def test_pearson_of_a_constant_map_is_undefined_as_in_the_metrics() -> None:
    from scorecam_explorer.metrics._common import pearson as metrics_pearson

    other = np.random.default_rng(0).random((4, 4))
    assert np.isnan(analysis.pearson(np.zeros((4, 4)), other))
    assert np.isnan(metrics_pearson(np.zeros((4, 4)), other))
    assert analysis.describe_r(analysis.pearson(np.zeros((4, 4)), other)) == "undefined (constant map)"
    assert analysis.describe_r(0.87349) == "0.873"
    a = np.random.default_rng(1).random((5, 5))
    assert analysis.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    with pytest.raises(ScorecamError, match="resize"):
        analysis.pearson(np.zeros((2, 2)), np.zeros((3, 3)))


def test_top_predictions_are_softmax_of_the_logits(cache) -> None:
    top = analysis.top_predictions(cache, image=1, count=3)
    logits = cache["logits"].isel(image=1).values.astype(np.float64)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert list(top["class"].values) == list(np.argsort(-probabilities)[:3])
    assert np.allclose(top.values, np.sort(probabilities)[::-1][:3])


# ---- plotly.js once per page --------------------------------------------------------------


def test_figures_share_one_plotly_bundle(explorer) -> None:
    assert isinstance(explorer.widget.children[0], PlotlyBundle)
    assert explorer.plotly._bundle == _bundle_text() and len(explorer.plotly._bundle) > 1_000_000
    for live in figures_of(explorer).values():
        assert isinstance(live.widget, FigureWidget) and isinstance(live.widget, go.FigureWidget)
        assert len(live.widget._esm) < 5_000  # a loader, not a copy of plotly.js per figure


def test_a_figure_not_yet_drawn_gets_its_whole_state(explorer, monkeypatch) -> None:
    monkeypatch.setattr(panel, "has_front_end", lambda widget: True)
    live = explorer.map.figure
    explorer.controls.target.value = 6
    assert "class 6" in live.widget._widget_layout["title"]["text"]  # the state a late view is drawn from
    assert live.widget._widget_data[1]["source"] == live.widget.data[1].source
    live.widget._handle_custom_msg({"event": "rendered"}, [])  # the browser drew it
    assert live.drawn
    explorer.controls.target.value = 7
    assert "class 6" in live.widget._widget_layout["title"]["text"]  # deltas only from now on
    assert "class 7" in live.widget.layout.title.text


# ---- layout and wording -----------------------------------------------------------------------


def test_map_and_channels_are_two_columns_that_wrap(explorer) -> None:
    from scorecam_explorer.explorer import app

    columns = explorer.columns
    assert columns.layout.flex_flow == "row wrap"
    maps, channels = columns.children
    assert maps.layout.flex_flow == "row wrap"  # Map and Recompose: side by side or stacked
    assert [section.children[1] for section in maps.children] == [explorer.map.widget, explorer.recomposer.widget]
    assert channels.children[1] is explorer.channels.widget
    # Wide enough for both columns; a column as narrow as a notebook holds Map and Recompose side by side.
    assert app.WIDE_WIDTH >= app.PANEL_WIDTH + style.COLUMN_WIDTH + 2 * app.GAP
    assert explorer.widget.layout.max_width == f"{app.WIDE_WIDTH}px"
    assert maps.layout.max_width == f"{app.NARROW_WIDTH}px" and app.NARROW_WIDTH >= 2 * app.PANEL_WIDTH
    # The figures fit their column.
    assert explorer.map.figure.spec["layout"]["width"] <= app.PANEL_WIDTH
    assert explorer.recomposer.figure.spec["layout"]["width"] <= app.PANEL_WIDTH
    for figure in (explorer.channels.bars, explorer.channels.detail, explorer.channels.gallery, explorer.compare.figure):
        assert figure.spec["layout"]["width"] <= style.COLUMN_WIDTH


def test_the_title_says_where_the_masks_come_from(explorer) -> None:
    title = explorer.widget.children[1].value
    assert "masks built with the “paper” convention when the cache was computed" in title
    assert "masks: " not in title


def test_the_layer_caption_says_what_flat_channels_cost(explorer, cache) -> None:
    explorer.controls.layer.value = "features.4"
    caption = explorer.controls.layer_info.value
    node = cache["features.4"]
    zero = int((node["constant"].isel(image=0) & (abs(node["activation"].isel(image=0)).max(dim=("fy", "fx")) == 0)).sum())
    assert zero == 1  # the tiny model's features.4 has one all-zero channel on the first picture
    assert "1 channel is zero on this photo and costs no forward pass" in caption
    assert "16 channels of 16×16" in caption and "layer 2 of 2 cached, shallow to deep" in caption
    assert " constant" not in caption and "of 2 cached<" not in caption
    explorer.controls.layer.value = "features.1"
    caption = explorer.controls.layer_info.value
    assert "every channel varies over this photo: one forward pass each" in caption
    assert "layer 1 of 2 cached" in caption


@pytest.mark.parametrize(
    "flat, zero, text",
    [
        (839, 839, "839 channels are zero on this photo and cost no forward pass"),
        (1, 1, "1 channel is zero on this photo and costs no forward pass"),
        (5, 3, "5 channels are flat (one value everywhere, 3 of them zero) on this photo and cost no forward pass"),
        (1, 0, "1 channel is flat (one value everywhere, not zero) on this photo and costs no forward pass"),
        (0, 0, "every channel varies over this photo: one forward pass each"),
    ],
)
def test_flat_channels_in_words(flat: int, zero: int, text: str) -> None:
    from scorecam_explorer.explorer.controls import flat_channels_text

    assert flat_channels_text(flat, zero) == text


def test_top_k_box_and_logarithmic_slider_set_the_same_k(explorer, cache) -> None:
    recomposer, s = explorer.recomposer, explorer.state.selection
    slider, box = recomposer.top_k, recomposer.top_k_box
    total = explorer.state.channel_count()
    assert slider.description == "Top k" and slider.base == 10 and slider.min == 0.0
    assert slider.max == pytest.approx(np.log10(total)) and box.max == total
    assert slider.readout_format == ".0f" and round(slider.value) == total == box.value

    box.value = 2  # the box: the state, the slider and the map follow
    assert explorer.state.selection.top_k == 2 and slider.value == pytest.approx(2.0)
    assert np.array_equal(shown_map(explorer), coloured(scorecam(cache, s.layer, s.target, image=0, top_k=2)))
    slider.value = 10 ** 0.5  # the slider: a position stands for the nearest whole k (3.16 -> 3)
    assert explorer.state.selection.top_k == 3 and box.value == 3
    assert "top <b>3</b> of" in recomposer.summary.value
    slider.value = 10 ** slider.max  # the far end: every channel
    assert explorer.state.selection.top_k is None and box.value == total
    box.value = 4
    recomposer.reset.click()
    assert box.value == total and round(slider.value) == total

    explorer.controls.layer.value = "features.1"  # another channel count: both ranges follow
    channels = explorer.state.channel_count("features.1")
    assert box.max == channels and slider.max == pytest.approx(np.log10(channels))
    assert box.value == channels and round(slider.value) == channels


@pytest.mark.parametrize("total", [1, 2, 16, 40, 320, 1280])
def test_the_browser_snapping_the_slider_to_its_steps_keeps_every_k(total: int) -> None:
    """The browser puts the handle on whole steps from the lower end and sends that value back:
    every k typed in the box must come back as k, and the last step is the channel count."""
    from scorecam_explorer.explorer.recomposer_panel import log_slider_max, log_slider_step, slider_k

    top, step = log_slider_max(total), log_slider_step(total)
    assert top / step == pytest.approx(round(top / step), abs=1e-6)
    for k in range(1, total + 1):
        snapped = step * round(np.log10(k) / step)
        assert slider_k(10**snapped, total) == k
    assert slider_k(10 ** (step * round(top / step)), total) == total


def test_a_negative_share_is_explained_in_the_scores_table() -> None:
    from scorecam_explorer.explorer.channels_panel import share_note

    assert "takes away from the map" in share_note(-0.027)
    assert share_note(0.05) == "its part of the map after ReLU"


def test_the_masked_input_is_written_one_way_in_the_package() -> None:
    """X∘H_k (the paper's notation) and f^c(X∘H_k) for its score, nowhere X * H_k or X*H_k."""
    import pathlib

    import scorecam_explorer

    root = pathlib.Path(scorecam_explorer.__file__).parent
    mixed = re.compile(r"X(_i)?\s?\*\s?(H|M\b)|X o M")
    found = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if mixed.search(line)
    ]
    assert found == []
    assert all("X∘H_k" in preset.score_name for preset in PRESETS.values())


def test_the_recompose_summary_says_r_is_undefined_for_a_constant_map() -> None:
    from scorecam_explorer.explorer.recomposer_panel import summary_html

    assert "undefined (constant map)" in summary_html(3, 10, 0, float("nan"))
    assert "<b>0.875</b>" in summary_html(3, 10, 0, 0.875)


def test_the_title_names_a_few_pictures_not_a_thousand() -> None:
    from scorecam_explorer.explorer.app import pictures_text

    assert pictures_text(["cat", "coffee"]) == "cat, coffee"
    assert pictures_text([f"p{i}" for i in range(1000)]) == "1000 pictures (p0, p1, p2, ...)"
