"""The explorer's Atlas panel without a browser: set widgets and send the clicks the browser
sends, then check what the figures show against rankings computed here from compose's
per-image weights (numpy), independently of ``scorecam_explorer.atlas``."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from _float32 import assert_close_up_to_rounding
from _tiny_models import tiny_model

from scorecam_explorer import atlas
from scorecam_explorer.cache import save_cache
from scorecam_explorer.compose import channel_weights, scorecam
from scorecam_explorer.dataset_store import open_dataset
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.explorer import Explorer, analysis
from scorecam_explorer.explorer.atlas_panel import pending_text
from scorecam_explorer.figures import decode_image_uri, style
from scorecam_explorer.figures.atlas import block_mean, profile_classes, shrink_factor, thumbnail
from scorecam_explorer.figures.encoding import colorize

LAYERS = ["features.1", "features.4"]
IMAGES = 11  # more than the grid's nine


def pictures(count: int) -> list[np.ndarray]:
    """Seeded 32 x 32 pictures of different colours and stripes (the tiny model then ranks
    more than one class first)."""
    result = []
    rows, cols = np.mgrid[0:32, 0:32]
    for index in range(count):
        rng = np.random.default_rng(index)
        base = np.array([(index * 97) % 256, (index * 53 + 80) % 256, (index * 31 + 160) % 256], dtype=np.float64)
        stripes = 60 * np.sin((cols * (index + 1) + rows * (3 - index % 3)) / 5.0)[..., None]
        result.append(np.clip(base + stripes + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
    return result


@pytest.fixture(scope="module")
def cache() -> xr.DataTree:
    return compute_cache(tiny_model(seed=2), pictures(IMAGES), LAYERS, progress=False, batch_size=16)


@pytest.fixture
def explorer(cache) -> Explorer:
    return Explorer(cache)


# ---- the rankings, computed here ---------------------------------------------------------


def own_classes(cache: xr.DataTree) -> np.ndarray:
    return cache["logits"].values.argmax(axis=-1)


def own_weights(cache: xr.DataTree, layer: str, channel: int, preset: str = "paper") -> np.ndarray:
    """w_ik for each image's own top class: compose.channel_weights, one image at a time."""
    return np.array(
        [
            channel_weights(cache, layer, int(target), preset=preset, image=image).values[channel]
            for image, target in enumerate(own_classes(cache))
        ]
    )


def descending(values: np.ndarray) -> np.ndarray:
    """Indices by decreasing value, ties to the lower index (lexsort, not the package's kernel)."""
    return np.lexsort((np.arange(len(values)), -np.asarray(values)))


def mean_weights(cache: xr.DataTree, layer: str, target: int, preset: str = "paper") -> np.ndarray:
    """(1/N) sum_i w_ikc for every channel k."""
    return np.mean(
        [channel_weights(cache, layer, target, preset=preset, image=i).values for i in range(cache.sizes["image"])], axis=0
    )


# ---- what the panel shows ----------------------------------------------------------------


def grid_images(explorer: Explorer) -> list[np.ndarray]:
    """The photos of the grid's thumbnails, in rank order, decoded from the figure."""
    return [decode_image_uri(trace.source) for trace in explorer.atlas.grid.widget.data if trace.name == "photo"]


def grid_masks(explorer: Explorer) -> list[np.ndarray]:
    return [decode_image_uri(trace.source) for trace in explorer.atlas.grid.widget.data if trace.name == "mask"]


def shown_order(explorer: Explorer, cache: xr.DataTree) -> list[int]:
    """Which cached picture each thumbnail shows (matched pixel for pixel)."""
    photos = cache["picture"].values
    order = []
    for shown in grid_images(explorer):
        matches = [i for i in range(len(photos)) if np.array_equal(photos[i], shown)]
        assert len(matches) == 1, "a thumbnail is not exactly one of the cached pictures"
        order.append(matches[0])
    return order


def click(figure, trace: int, point: int = 0) -> None:
    """What the browser sends when a point of ``figure`` is clicked."""
    figure.widget._handle_custom_msg({"event": "click", "points": [{"trace": trace, "point": point}]}, [])


def contains(parent, child) -> bool:
    if parent is child:
        return True
    return any(contains(c, child) for c in getattr(parent, "children", ()))


# ---- tests -----------------------------------------------------------------------------------


def test_the_set_is_varied_enough_to_test(cache) -> None:
    assert len(set(own_classes(cache).tolist())) >= 2, "every picture has the same top class: the tests would miss bugs"


def test_hidden_for_one_picture_shown_for_several(cache) -> None:
    single = Explorer(cache.isel(image=[0]))
    assert not single.atlas.active
    assert single.atlas.widget.layout.display == "none"
    assert single.atlas.grid is None  # nothing read or drawn
    assert not contains(single.widget, single.atlas.widget)

    several = Explorer(cache)
    assert several.atlas.active
    assert contains(several.widget, several.atlas.widget)
    assert several.atlas.widget.layout.display != "none"


def test_grid_follows_the_selected_channel_in_rank_order(explorer, cache) -> None:
    layer = explorer.state.selection.layer
    for channel in (3, 11):
        explorer.channels.channel.value = channel  # typed in the channel chart's box
        expected = descending(own_weights(cache, layer, channel))[:9]
        assert shown_order(explorer, cache) == expected.tolist()
        examples = atlas.channel_examples(cache, layer, channel, k=9)
        assert examples["image_index"].values.tolist() == expected.tolist()
        # each mask: the channel's mask on that picture, coloured as the map panel colours maps
        for mask, image in zip(grid_masks(explorer), expected):
            h = analysis.channel_mask(cache, layer, channel, int(image)).values
            assert np.array_equal(mask, colorize(h, "jet"))
        assert explorer.atlas.grid.widget.layout.title.text.startswith(f"Channel {channel} of {layer}")


def test_a_click_in_the_channel_chart_updates_the_grid(explorer, cache) -> None:
    s = explorer.state.selection
    order = explorer.channels._order
    explorer.channels.bars.widget._handle_custom_msg({"event": "click", "points": [{"trace": 0, "point": 5}]}, [])
    channel = int(order[5])
    assert explorer.state.selection.channel == channel
    assert shown_order(explorer, cache) == descending(own_weights(cache, s.layer, channel))[:9].tolist()


def test_by_activation_ranks_by_the_activation_peak(explorer, cache) -> None:
    s = explorer.state.selection
    explorer.atlas.by.value = "activation"
    peaks = cache[s.layer]["activation"].isel(channel=s.channel).values.max(axis=(-2, -1))
    assert shown_order(explorer, cache) == descending(peaks)[:9].tolist()
    titles = [a.text for a in explorer.atlas.grid.widget.layout.annotations][1:]  # after the subtitle
    assert all("peak A = " in text for text in titles)


def test_a_thumbnail_click_opens_that_picture(explorer, cache) -> None:
    order = shown_order(explorer, cache)
    before = explorer.state.selection
    # a thumbnail of another picture whose own class differs from the class shown, and from
    # that of the first thumbnail: opening it must change the picture and the class
    classes = own_classes(cache)
    candidates = [
        r for r, image in enumerate(order)
        if image != before.image and classes[image] != before.target and classes[image] != classes[order[0]]
    ]
    assert candidates, "no thumbnail of another class: the test would not see a wrong class"
    rank = candidates[0]
    image = order[rank]
    channel = explorer.state.selection.channel
    click(explorer.atlas.grid, 3 * rank + 2, 17)  # a point of that thumbnail's hit lattice
    s = explorer.state.selection
    assert s.image == image
    assert s.target == own_classes(cache)[image]  # the class its weight was computed for
    assert s.channel == channel  # the atlas stays on the channel
    assert explorer.controls.image.value == image
    assert np.array_equal(decode_image_uri(explorer.map.figure.widget.data[0].source), cache["picture"].values[image])
    expected = scorecam(cache, s.layer, s.target, image=image)
    assert np.array_equal(decode_image_uri(explorer.map.figure.widget.data[1].source), colorize(expected.values, "jet"))
    # the thumbnail of the picture shown is marked
    marked = [a.text for a in explorer.atlas.grid.widget.layout.annotations if "▶" in (a.text or "")]
    assert len(marked) == 1 and str(cache["image"].values[image]) in marked[0]


def test_class_channels_are_the_highest_mean_weights_and_a_click_selects_one(explorer, cache) -> None:
    s = explorer.state.selection
    means = mean_weights(cache, s.layer, s.target)
    expected = descending(means)[:10]
    bars = explorer.atlas.class_channels.widget.data[0]
    assert [int(c) for c in bars.customdata] == expected.tolist()
    assert_close_up_to_rounding(np.asarray(bars.y), means[expected])
    click(explorer.atlas.class_channels, 0, 4)
    assert explorer.state.selection.channel == int(expected[4])
    assert explorer.channels.channel.value == int(expected[4])  # the channel chart follows
    assert explorer.atlas.channel.value == int(expected[4])
    colours = explorer.atlas.class_channels.widget.data[0].marker.color
    assert [i for i, colour in enumerate(colours) if colour == style.SELECTED] == [4]


def test_profile_shows_the_classes_with_the_highest_mean_weight(explorer, cache) -> None:
    s = explorer.state.selection
    n_classes = cache.sizes["class"]
    means = np.array([mean_weights(cache, s.layer, c)[s.channel] for c in range(n_classes)])
    expected = descending(means)[:15]
    bars = explorer.atlas.profile.widget.data[0]
    assert list(bars.customdata) == [str(cache["class_name"].values[c]) for c in expected]
    assert_close_up_to_rounding(np.asarray(bars.x), means[expected])
    profile = atlas.channel_profile(cache, s.layer, s.channel)
    assert profile_classes(profile).tolist() == expected.tolist()
    assert f"mean over {IMAGES} pictures" in explorer.atlas.profile.widget.layout.annotations[0].text


def test_the_class_and_preset_redraw_the_charts(explorer, cache) -> None:
    s = explorer.state.selection
    other = next(c for c in range(cache.sizes["class"]) if c != s.target)
    explorer.state.update(target=other, preset="torchcam")
    expected = descending(mean_weights(cache, s.layer, other, preset="torchcam"))[:10]
    assert [int(c) for c in explorer.atlas.class_channels.widget.data[0].customdata] == expected.tolist()
    channel = explorer.state.selection.channel
    assert shown_order(explorer, cache) == descending(own_weights(cache, s.layer, channel, "torchcam"))[:9].tolist()


def test_going_back_reads_nothing_again(explorer, monkeypatch) -> None:
    first = explorer.state.selection.channel
    explorer.state.update(channel=(first + 1) % 16)
    calls = []
    for name in ("channel_examples", "channel_profile", "class_channels"):
        original = getattr(atlas, name)
        monkeypatch.setattr(atlas, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    explorer.state.update(channel=first)
    explorer.state.update(channel=(first + 1) % 16)
    assert calls == []


def test_a_lazily_opened_store_waits_for_the_button_before_reading_every_picture(cache, tmp_path, monkeypatch) -> None:
    """Opening the explorer on a store without an atlas index reads no picture's masked
    outputs for the atlas; the button reads them all once, with progress, and draws it."""
    path = save_cache(cache, tmp_path / "set.zarr")
    lazy = open_dataset(path)
    assert lazy["features.4"]["masked_logits"].chunks is not None  # dask-backed
    scans = []
    original = atlas._Source._scan
    monkeypatch.setattr(atlas._Source, "_scan", lambda self, *a, **k: scans.append(1) or original(self, *a, **k))
    explorer = Explorer(lazy)
    panel = explorer.atlas
    assert scans == [] and panel.deferred.layout.display is None and panel.figures.layout.display == "none"
    assert "atlas-index" in panel.read_text.value and f"{IMAGES} pictures" in panel.read_text.value
    progress = []
    monkeypatch.setattr(panel, "_show_reading", lambda done, total: progress.append((done, total)))
    panel.read_pictures()
    assert scans == [1] and progress[-1] == (IMAGES, IMAGES)
    assert panel.deferred.layout.display == "none" and panel.figures.layout.display is None
    layer, channel = explorer.state.selection.layer, explorer.state.selection.channel
    assert shown_order(explorer, cache) == descending(own_weights(cache, layer, channel))[:9].tolist()
    explorer.state.update(channel=(channel + 1) % 16)  # remembered: no second scan
    assert scans == [1]


def test_a_store_with_a_fresh_atlas_index_shows_the_atlas_at_once(cache, tmp_path, monkeypatch) -> None:
    from scorecam_explorer.atlas_index import build_atlas_index

    path = save_cache(cache, tmp_path / "set.zarr")
    build_atlas_index(path, progress=False)
    monkeypatch.setattr(atlas._Source, "_scan", lambda *a, **k: pytest.fail("scanned despite a fresh index"))
    explorer = Explorer(open_dataset(path))
    assert explorer.atlas.deferred.layout.display == "none"
    layer, channel = explorer.state.selection.layer, explorer.state.selection.channel
    assert shown_order(explorer, cache) == descending(own_weights(cache, layer, channel))[:9].tolist()


def test_pending_pictures_are_named(explorer, monkeypatch) -> None:
    examples = explorer.state.atlas_examples()
    monkeypatch.setattr(explorer.state, "atlas_examples", lambda *a, **k: examples.assign_attrs(pending=3))
    explorer.atlas.by.value = "activation"
    assert pending_text(3) in explorer.atlas.note.value
    assert pending_text(0) == ""


def test_thumbnails_shrink_by_an_integer_factor() -> None:
    assert shrink_factor(32) == 1 and shrink_factor(224) == 2 and shrink_factor(448) == 4
    rng = np.random.default_rng(0)
    values = rng.random((6, 6))
    expected = values.reshape(3, 2, 3, 2).mean(axis=(1, 3))
    assert np.allclose(block_mean(values, 2), expected)
    picture = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    mask = rng.random((224, 224)).astype(np.float32)
    photo, coloured = thumbnail(picture, mask, colormap="jet")
    assert photo.shape == coloured.shape == (112, 112, 3)
    assert np.array_equal(photo[0, 0], np.rint(picture[:2, :2].astype(np.float64).mean(axis=(0, 1))).astype(np.uint8))
