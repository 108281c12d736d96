"""Figure builders: what they draw is exactly the arrays they are given, checked by decoding it."""

from __future__ import annotations

import io

import numpy as np
import plotly.graph_objects as go
import pytest
import xarray as xr
from PIL import Image

from scorecam_explorer.colormaps import apply_colormap, colormap_table
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.figures import (
    CUSTOMDATA,
    channel_bar_figure,
    channel_bar_spec,
    channel_detail_spec,
    channel_order,
    compare_figure,
    compare_spec,
    decode_image_uri,
    fidelity_figure,
    fidelity_spec,
    gallery_figure,
    gallery_spec,
    image_uri,
    map_figure,
    map_spec,
)
from scorecam_explorer.figures import style
from scorecam_explorer.figures.channels import (
    BEYOND_TOP_K,
    IN_MAP,
    OFF,
    SELECTED_OFF,
    STATUS_LEGEND,
    bar_status,
    bar_window,
    visible_bar_count,
)
from scorecam_explorer.figures.encoding import (
    DIVERGING,
    colorize,
    decode_typed_array,
    lookup_table,
    png_bytes,
    typed_array,
)
from scorecam_explorer.figures.fidelity import log_ticks
from scorecam_explorer.figures.map import hover_grid

RNG = np.random.default_rng(7)


def picture(size: int = 16) -> xr.DataArray:
    return xr.DataArray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8), dims=("y", "x", "rgb"))


def saliency(size: int = 16) -> xr.DataArray:
    values = RNG.random((size, size)).astype(np.float32)
    return xr.DataArray(
        values, dims=("y", "x"), coords={"target_name": "tabby"}, attrs={"layer": "head", "preset": "paper"}
    )


def contributions(n_channels: int = 12) -> xr.Dataset:
    dims = ("channel",)
    return xr.Dataset(
        {
            "score": (dims, RNG.normal(size=n_channels)),
            "probability": (dims, RNG.random(n_channels)),
            "weight": (dims, RNG.random(n_channels)),
            "share": (dims, RNG.dirichlet(np.ones(n_channels))),
            "variance": (dims, RNG.random(n_channels)),
            "constant": (dims, np.zeros(n_channels, dtype=bool)),
        },
        coords={"channel": np.arange(n_channels), "target_name": "tabby"},
        attrs={"layer": "head"},
    )


# ---- encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (224, 224, 3)])
def test_png_round_trips_exactly_through_an_independent_decoder(shape: tuple[int, int, int]) -> None:
    pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(png_bytes(pixels))) as decoded:  # PIL decodes our hand-written PNG
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), pixels)
    assert np.array_equal(decode_image_uri(image_uri(pixels)), pixels)


def test_image_uri_refuses_what_is_not_rgb_bytes() -> None:
    with pytest.raises(ScorecamError, match="uint8 RGB"):
        image_uri(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ScorecamError, match="uint8 RGB"):
        image_uri(np.zeros((4, 4, 3), dtype=np.float32))


def test_colorize_is_the_colour_map_lookup_and_refuses_nan() -> None:
    values = RNG.random((9, 9))
    assert np.array_equal(colorize(values, "viridis"), apply_colormap(values, "viridis"))
    # a value range is mapped onto the table: low -> entry 0, high -> entry 255
    assert np.array_equal(colorize(np.array([2.0, 6.0]), "jet", 2.0, 6.0), colormap_table("jet")[[0, 255]])
    with pytest.raises(ScorecamError, match="NaN"):
        colorize(np.array([[0.5, np.nan]]), "jet")


def test_diverging_scale_is_white_at_zero_blue_below_red_above() -> None:
    colours = colorize(np.array([-1.0, 0.0, 1.0]), DIVERGING, -1.0, 1.0).astype(int)
    blue, white, red = colours
    assert blue[2] > blue[0] and red[0] > red[2]
    assert np.all(white >= 240) and np.ptp(white) <= 8
    assert lookup_table(DIVERGING).shape == (256, 3)


def test_typed_arrays_round_trip_with_plotly_dtype_codes() -> None:
    for values in (RNG.random((5, 3)), RNG.random(4).astype(np.float32), np.arange(6, dtype=np.int32).reshape(2, 3)):
        spec = typed_array(values)
        assert set(spec) == {"dtype", "bdata", "shape"}
        assert np.array_equal(decode_typed_array(spec), values)
    assert typed_array(RNG.random((5, 3)))["dtype"] == "f8"
    assert typed_array(RNG.random((5, 3)))["shape"] == "5, 3"


# ---- the map ------------------------------------------------------------------------------


def test_map_spec_draws_the_photo_and_exactly_the_coloured_map() -> None:
    photo, values = picture(), saliency()
    spec = map_spec(photo, values, opacity=0.3, colormap="turbo")
    photo_trace, map_trace, bar, _hover = spec["data"]
    assert np.array_equal(decode_image_uri(photo_trace["source"]), photo.values)
    assert np.array_equal(decode_image_uri(map_trace["source"]), apply_colormap(values.values, "turbo"))
    assert map_trace["opacity"] == 0.3
    assert bar["marker"]["cmin"] == 0.0 and bar["marker"]["cmax"] == 1.0 and bar["marker"]["showscale"]
    # the title names class, layer and preset, from the map's coordinates
    assert spec["layout"]["title"]["text"] == "Score-CAM for “tabby” · head · paper"
    assert spec["layout"]["width"] <= style.COLUMN_WIDTH


@pytest.mark.parametrize("size", [16, 224, 225])
def test_map_hover_layer_holds_the_map_values_at_its_grid(size: int) -> None:
    photo, values = picture(size), saliency(size)
    hover = map_spec(photo, values)["data"][3]
    assert hover["type"] == "heatmap" and "%{z" in hover["hovertemplate"]
    rows, cols = hover["y"], hover["x"]
    z = decode_typed_array(hover["z"])
    assert z.shape == (len(rows), len(cols)) and max(z.shape) <= 56
    assert np.array_equal(z, values.values[np.ix_(rows, cols)])  # exactly the map, where sampled
    # one cell per step x step block of pixels, centred on its middle pixel
    step = 1 if size <= 56 else int(np.ceil(size / 56))
    assert np.array_equal(rows, np.arange(step // 2, size, step)) and np.array_equal(rows, cols)
    assert (hover_grid((size, size))[0] == rows).all()
    assert all(color.endswith(",0)") for _, color in hover["colorscale"])  # draws nothing


def test_map_figure_is_a_valid_plotly_figure() -> None:
    figure = map_figure(picture(), saliency(), subtitle="p = 38%")
    assert isinstance(figure, go.Figure)
    assert [trace.type for trace in figure.data] == ["image", "image", "scatter", "heatmap"]
    assert figure.layout.annotations[0].text == "p = 38%" and figure.layout.annotations[0].visible


def test_map_spec_refuses_nan_and_a_map_of_another_size() -> None:
    bad = saliency()
    bad[0, 0] = np.nan
    with pytest.raises(ScorecamError, match="NaN"):
        map_spec(picture(), bad)
    with pytest.raises(ScorecamError, match="input resolution"):
        map_spec(picture(16), saliency(8))
    with pytest.raises(ScorecamError, match="opacity"):
        map_spec(picture(), saliency(), opacity=1.5)


def test_compare_spec_draws_both_maps_and_their_difference() -> None:
    photo, first, second = picture(), saliency(), saliency()
    spec = compare_spec(photo, first, second, first_label="paper", second_label="official", correlation=0.25)
    sources = [decode_image_uri(trace["source"]) for trace in spec["data"] if trace["type"] == "image"]
    assert np.array_equal(sources[1], apply_colormap(first.values, "jet"))
    assert np.array_equal(sources[3], apply_colormap(second.values, "jet"))
    difference = first.values.astype(np.float64) - second.values.astype(np.float64)
    assert np.array_equal(sources[4], colorize(difference, DIVERGING, -1.0, 1.0))
    titles = [annotation["text"] for annotation in spec["layout"]["annotations"][1:]]
    assert titles == ["A: paper", "B: official", "A − B"]
    assert "0.250" in spec["layout"]["title"]["text"]
    assert isinstance(compare_figure(photo, first, second, first_label="a", second_label="b"), go.Figure)


# ---- channels -----------------------------------------------------------------------------


@pytest.mark.parametrize("sort_by, variable", [("weight", "weight"), ("contribution", "share"), ("variance", "variance")])
def test_channel_bars_are_sorted_and_carry_every_channels_numbers(sort_by: str, variable: str) -> None:
    data = contributions()
    spec = channel_bar_spec(data, sort_by=sort_by)
    bars = spec["data"][0]
    expected_order = np.argsort(-data[variable].values, kind="stable")
    assert np.array_equal(channel_order(data, sort_by), expected_order)
    assert np.array_equal(bars["y"], data["weight"].values[expected_order])
    rows = decode_typed_array(bars["customdata"])
    for column, name in enumerate(CUSTOMDATA):
        assert np.allclose(rows[:, column], data[name].values[expected_order]), name
    for needle in ("channel", "score", "probability", "weight", "share of the map"):
        assert needle in bars["hovertemplate"]


def test_channel_bar_colours_show_selected_off_and_beyond_top_k() -> None:
    data = contributions(6)
    kept = np.array([True, True, False, False, True, True])
    spec = channel_bar_spec(data, sort_by="weight", selected=4, switched_off={5}, kept=kept)
    order = channel_order(data, "weight").tolist()
    marker = spec["data"][0]["marker"]
    fill = dict(zip(order, marker["color"]))
    assert fill == {
        0: style.KEPT, 1: style.KEPT, 2: style.NOT_KEPT, 3: style.NOT_KEPT, 4: style.SELECTED, 5: style.SWITCHED_OFF
    }
    assert marker["line"]["width"] == [0.0] * 6  # no outline unless inspected and switched off
    # every colour is a CSS colour string: plotly.js warns about numbers and typed arrays as colours
    assert all(isinstance(colour, str) for colour in [*marker["color"], *marker["line"]["color"]])
    assert isinstance(channel_bar_figure(data), go.Figure)


def test_an_inspected_channel_switched_off_is_grey_with_an_orange_outline() -> None:
    status = bar_status(4, selected=2, switched_off={2, 3}, kept=np.array([True, False, True, True]))
    assert status.tolist() == [IN_MAP, BEYOND_TOP_K, SELECTED_OFF, OFF]
    data = contributions(4)
    spec = channel_bar_spec(data, sort_by="weight", selected=2, switched_off={2, 3}, kept=np.array([True, False, True, True]))
    marker = spec["data"][0]["marker"]
    position = channel_order(data, "weight").tolist().index(2)
    assert marker["color"][position] == style.SWITCHED_OFF
    assert marker["line"]["color"][position] == style.SELECTED and marker["line"]["width"][position] > 0
    # the legend names each encoding once, the outlined one included
    assert (style.SWITCHED_OFF, style.SELECTED, "inspected, switched off") in STATUS_LEGEND
    assert len({(fill, outline) for fill, outline, _ in STATUS_LEGEND}) == len(STATUS_LEGEND)
    assert isinstance(go.Figure(spec), go.Figure)  # Plotly accepts per-bar outline colours and widths


def bar_pixels(spec: dict) -> float:
    """Width in pixels of one bar slot as the chart opens (plot width / ranks in the x range)."""
    layout = spec["layout"]
    plot_width = layout["width"] - layout["margin"]["l"] - layout["margin"]["r"]
    low, high = layout["xaxis"]["range"]
    return plot_width / (high - low)


def test_a_1280_channel_chart_opens_on_bars_wide_enough_to_click() -> None:
    data = contributions(1280)
    spec = channel_bar_spec(data, sort_by="weight")
    layout, bars = spec["layout"], spec["data"][0]
    assert len(bars["x"]) == 1280 and list(bars["x"][:3]) == [1, 2, 3]  # every channel, x = its rank
    assert bar_pixels(spec) >= 4.0
    low, high = layout["xaxis"]["range"]
    assert low < 1 and high > 100  # the 100th heaviest is on screen
    assert layout["xaxis"]["rangeslider"]["visible"]  # the rest: a strip with every bar, to drag
    shown = int(np.floor(high))
    assert f"ranks 1-{shown} of 1280 shown" in layout["xaxis"]["title"]["text"]
    assert go.Figure(spec).layout.xaxis.rangeslider.visible  # Plotly accepts it


def test_the_chart_opens_on_the_inspected_channel_when_it_ranks_beyond_the_first_bars() -> None:
    data = contributions(1280)
    order = channel_order(data, "weight")
    deep = int(order[900])  # rank 901
    low, high = channel_bar_spec(data, selected=deep)["layout"]["xaxis"]["range"]
    assert low < 901 < high and bar_pixels(channel_bar_spec(data, selected=deep)) >= 4.0
    assert channel_bar_spec(data, selected=int(order[5]))["layout"]["xaxis"]["range"][0] == 0.5
    last = int(order[-1])
    low, high = channel_bar_spec(data, selected=last)["layout"]["xaxis"]["range"]
    assert high == 1280.5  # the window stops at the last bar
    assert channel_bar_spec(data, selected=deep, window=[10.5, 60.5])["layout"]["xaxis"]["range"] == [10.5, 60.5]


def test_a_small_layer_shows_every_bar_without_a_strip() -> None:
    spec = channel_bar_spec(contributions(80))
    assert "rangeslider" not in spec["layout"]["xaxis"]
    assert spec["layout"]["xaxis"]["range"] == [0.5, 80.5] and bar_pixels(spec) >= 4.0


def test_visible_bars_and_windows() -> None:
    assert visible_bar_count(80, 860) == 80
    assert visible_bar_count(1280, 860) == (860 - 80) // 5
    assert bar_window(1280, 100) == [0.5, 100.5]
    assert bar_window(1280, 100, focus=50) == [0.5, 100.5]
    assert bar_window(1280, 100, focus=500) == [449.5, 549.5]
    assert bar_window(1280, 100, focus=1280) == [1180.5, 1280.5]


def test_channel_bars_refuse_nan_in_their_hover_data() -> None:
    data = contributions(6)
    data["variance"].values[4] = np.nan
    data["share"].values[1] = np.inf
    with pytest.raises(ScorecamError, match=r"NaN or inf in the share and variance of channel\(s\) 1, 4"):
        channel_bar_spec(data)


def test_channel_detail_draws_activation_mask_and_masked_input() -> None:
    activation = xr.DataArray(RNG.random((7, 7)), dims=("fy", "fx"))
    mask = xr.DataArray(RNG.random((16, 16)), dims=("y", "x"))
    masked = picture()
    spec = channel_detail_spec(activation, mask, masked, channel=3)
    tiles = [decode_image_uri(trace["source"]) for trace in spec["data"][:3]]
    low, high = activation.values.min(), activation.values.max()
    assert np.array_equal(tiles[0], colorize(activation.values, "viridis", low, high))
    assert spec["data"][0]["zsmooth"] is False and spec["data"][2]["zsmooth"] == "fast"  # feature map: sharp squares
    assert np.array_equal(tiles[1], apply_colormap(mask.values, "gray"))
    assert np.array_equal(tiles[2], masked.values)
    assert spec["data"][3]["marker"]["cmin"] == pytest.approx(low)
    assert "A_3" in spec["layout"]["annotations"][1]["text"]  # annotation 0 is the subtitle


def test_gallery_uses_one_symmetric_scale_for_all_tiles() -> None:
    tiles = xr.DataArray(
        RNG.normal(size=(5, 4, 4)),
        dims=("rank", "fy", "fx"),
        coords={"channel": ("rank", [9, 2, 7, 1, 0]), "share": ("rank", [0.4, 0.2, 0.1, 0.05, 0.01])},
    )
    spec = gallery_spec(tiles, columns=4)
    extent = np.abs(tiles.values).max()
    pictures = [trace for trace in spec["data"] if trace["type"] == "image"]
    assert len(pictures) == 5
    assert np.array_equal(decode_image_uri(pictures[2]["source"]), colorize(tiles.values[2], DIVERGING, -extent, extent))
    bar = spec["data"][-1]["marker"]
    assert bar["cmin"] == pytest.approx(-extent) and bar["cmax"] == pytest.approx(extent)
    assert [a["text"] for a in spec["layout"]["annotations"]][1:3] == ["channel 9 · 40.0%", "channel 2 · 20.0%"]
    assert isinstance(gallery_figure(tiles), go.Figure)


def test_fidelity_spec_plots_the_curve_and_marks_the_current_k() -> None:
    curve = xr.DataArray(
        np.linspace(0.2, 1.0, 10), dims=("k",), coords={"k": np.arange(1, 11), "channel": ("k", np.arange(10)[::-1])}
    )
    spec = fidelity_spec(curve, current_k=4, current_r=0.55)
    line, marker = spec["data"]
    assert np.array_equal(line["x"], np.arange(1, 11)) and np.allclose(line["y"], curve.values)
    assert np.array_equal(line["customdata"], curve["channel"].values)
    assert marker["x"] == [4] and marker["y"] == [0.55]
    assert spec["layout"]["shapes"][0]["x0"] == 4
    assert spec["layout"]["xaxis"]["type"] == "log"
    assert spec["layout"]["xaxis"]["tickvals"] == [1, 10] and spec["layout"]["xaxis"]["ticktext"] == ["1", "10"]
    assert isinstance(fidelity_figure(curve, current_k=4, current_r=0.55), go.Figure)


@pytest.mark.parametrize("count", [1, 2, 9, 10, 14, 15, 40, 99, 100, 999, 1000, 1280, 2048])
def test_fidelity_ticks_are_powers_of_ten_and_the_channel_count(count: int) -> None:
    ticks = log_ticks(count)
    assert ticks[-1] == count and ticks == sorted(set(ticks))
    decades = [tick for tick in ticks[:-1]]
    assert all(np.log10(tick).is_integer() for tick in decades)
    # every power of ten up to count / 1.5 is there; none closer to count (labels would overlap)
    assert decades == [10**p for p in range(0, 5) if 10**p * 1.5 <= count]


def test_grid_cells_fit_the_figure_and_do_not_overlap() -> None:
    layout = style.grid(2, 4, titles=[str(i) for i in range(8)], horizontal_spacing=0.03, vertical_spacing=0.14)
    xs = [layout["xaxis" if i == 0 else f"xaxis{i + 1}"]["domain"] for i in range(8)]
    ys = [layout["yaxis" if i == 0 else f"yaxis{i + 1}"]["domain"] for i in range(8)]
    for x0, x1 in xs + ys:
        assert 0.0 <= x0 < x1 <= 1.0
    assert xs[0][1] < xs[1][0] and ys[4][1] < ys[0][0]
    assert len(layout["annotations"]) == 8
    combined = style.base_layout(900, 400, "title", "note", grid=layout)
    assert combined["annotations"][0]["text"] == "note" and len(combined["annotations"]) == 9
    assert combined["xaxis8"] == layout["xaxis8"]


# ---- colour bars, notes and axes that read cleanly ------------------------------------------


@pytest.mark.parametrize("extent", [0.16, 0.1, 0.05, 0.0123, 1.0, 3.7, 250.0, 4e-4])
def test_symmetric_ticks_share_one_format_and_stay_inside_the_scale(extent: float) -> None:
    from scorecam_explorer.figures.encoding import symmetric_ticks

    values, labels = symmetric_ticks(extent)
    assert values == sorted(values) and 0.0 in values and len(values) >= 5
    assert all(abs(value) <= extent * (1 + 1e-9) for value in values)
    assert values == [-value for value in reversed(values)]  # symmetric about zero
    decimals = {len(label.split(".")[1]) if "." in label else 0 for label in labels}
    assert len(decimals) == 1, labels  # "0.050" beside "0.10" and "0.0" no more
    assert all(float(label.replace("−", "-")) == pytest.approx(value) for label, value in zip(labels, values))
    assert not any(label.startswith("-") for label in labels)  # a true minus sign, as Plotly writes


def test_gallery_colour_bar_has_one_tick_format_and_its_title_above() -> None:
    tiles = xr.DataArray(RNG.normal(size=(4, 4, 4)) * 0.07, dims=("rank", "fy", "fx"),
                         coords={"channel": ("rank", [3, 1, 2, 0]), "share": ("rank", [0.4, 0.3, 0.2, 0.1])})
    colorbar = gallery_spec(tiles)["data"][-1]["marker"]["colorbar"]
    assert colorbar["tickmode"] == "array" and colorbar["title"]["side"] == "top"
    assert len({len(label.split(".")[-1]) for label in colorbar["ticktext"]}) == 1


def test_gallery_explains_a_negative_share_where_it_shows_one() -> None:
    def gallery(shares: list[float]) -> dict:
        tiles = xr.DataArray(RNG.normal(size=(4, 4, 4)), dims=("rank", "fy", "fx"),
                             coords={"channel": ("rank", [5, 8, 13, 21]), "share": ("rank", shares)})
        return gallery_spec(tiles)

    texts = [a["text"] for a in gallery([0.5, 0.3, 0.2, 0.1])["layout"]["annotations"]]
    assert not any("negative" in text for text in texts)
    spec = gallery([0.5, -0.027, 0.2, -0.01])
    texts = [a["text"] for a in spec["layout"]["annotations"]]
    assert "channel 8 · −2.7%" in texts
    note = texts[-1]
    assert "channel 8: −2.7%" in note and "channel 21: −1.0%" in note
    assert "negative where the map is positive, so it takes away from the map" in note
    assert spec["layout"]["margin"]["b"] > gallery([0.5, 0.3, 0.2, 0.1])["layout"]["margin"]["b"]  # room for it


def test_compare_colour_bar_titles_sit_above_the_bars() -> None:
    spec = compare_spec(picture(), saliency(), saliency(), first_label="a", second_label="b")
    bars = [trace["marker"]["colorbar"] for trace in spec["data"] if trace["type"] == "scatter"]
    assert [bar["title"]["text"] for bar in bars] == ["map", "A − B"]
    assert all(bar["title"]["side"] == "top" for bar in bars)  # not on the edge of the A − B picture


def test_compare_says_r_is_undefined_for_a_constant_map() -> None:
    spec = compare_spec(picture(), saliency(), saliency(), first_label="a", second_label="b", correlation=float("nan"))
    assert spec["layout"]["title"]["text"].startswith("Compare · Pearson r(A, B) undefined (a constant map)")
    assert "nan" not in spec["layout"]["title"]["text"]
