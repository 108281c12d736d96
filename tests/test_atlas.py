"""The channel atlas against an independent computation from the per-image weights.

References: :func:`scorecam_explorer.compose.channel_weights` for every image and class
(w_ikc), plain numpy rankings over them, and the masks rebuilt with torch's own bilinear
upsampling (the engine's masks), never the atlas' own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from _float32 import assert_close_up_to_rounding
from _tiny_models import tiny_model, write_images
from scorecam_explorer import atlas
from scorecam_explorer.atlas import atlas_tables, channel_examples, channel_profile, class_channels
from scorecam_explorer.cache import convention_fields, save_cache
from scorecam_explorer.compose import channel_weights
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError, ScorecamError, UnknownLayerError

LAYER = "features"
N_IMAGES = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> xr.DataTree:
    paths = write_images(tmp_path_factory.mktemp("pictures"), N_IMAGES)
    return compute_cache(tiny_model(), [str(p) for p in paths], ["features.2", LAYER], batch_size=8, progress=False)


@pytest.fixture(scope="module")
def store(cache, tmp_path_factory):
    return save_cache(cache, tmp_path_factory.mktemp("store") / "cache.zarr")


def all_weights(cache: xr.DataTree, preset: str) -> np.ndarray:
    """w_ikc, (image, channel, class), one compose call per image and class."""
    n_classes = cache.sizes["class"]
    return np.stack(
        [
            np.stack([channel_weights(cache, LAYER, c, preset=preset, image=i).values for c in range(n_classes)], axis=-1)
            for i in range(cache.sizes["image"])
        ]
    )


def descending(values: np.ndarray) -> np.ndarray:
    """Indices by decreasing value, ties to the lower index (lexsort: last key is primary)."""
    return np.lexsort((np.arange(len(values)), -values))


@pytest.mark.parametrize("preset", ["paper", "official", "pytorch-grad-cam", "torchcam"])
def test_tables_equal_the_per_image_weights(cache, preset) -> None:
    weights = all_weights(cache, preset)
    own = cache["logits"].values.argmax(axis=-1)
    tables = atlas_tables(cache, LAYER, preset=preset)
    np.testing.assert_allclose(tables["weight_mean"].values, weights.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tables["own_weight"].values, weights[np.arange(N_IMAGES), :, own], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(tables["own_target"].values, own)
    activation = cache[LAYER]["activation"].values
    np.testing.assert_array_equal(tables["activation_peak"].values, activation.max(axis=(-2, -1)))
    assert tables.attrs["images"] == N_IMAGES and tables.attrs["pending"] == 0


@pytest.mark.parametrize("preset", ["paper", "torchcam"])
def test_examples_rank_images_by_own_class_weight(cache, preset) -> None:
    weights = all_weights(cache, preset)
    own = cache["logits"].values.argmax(axis=-1)
    for channel in (0, 5, 11):
        expected_values = weights[np.arange(N_IMAGES), channel, own]
        expected = descending(expected_values)[:4]
        examples = channel_examples(cache, LAYER, channel, k=4, preset=preset)
        np.testing.assert_array_equal(examples["image_index"].values, expected)
        np.testing.assert_array_equal(examples["image"].values, cache["image"].values[expected])
        np.testing.assert_allclose(examples["value"].values, expected_values[expected], rtol=1e-12)
        np.testing.assert_array_equal(examples["target_class"].values, own[expected])
        assert examples.attrs["target"] == "top-1 class of each image"


def test_examples_for_a_named_class_and_by_activation(cache) -> None:
    weights = all_weights(cache, "paper")
    names = [str(n) for n in cache["class_name"].values]
    channel, target = 3, 2
    examples = channel_examples(cache, LAYER, channel, target=names[target], k=N_IMAGES)
    expected = descending(weights[:, channel, target])
    np.testing.assert_array_equal(examples["image_index"].values, expected)
    assert set(examples["target_name"].values) == {names[target]}
    peaks = cache[LAYER]["activation"].values[:, channel].max(axis=(-2, -1))
    by_activation = channel_examples(cache, LAYER, channel, by="activation", k=3)
    np.testing.assert_array_equal(by_activation["image_index"].values, descending(peaks.astype(np.float64))[:3])
    np.testing.assert_array_equal(by_activation["value"].values, peaks[by_activation["image_index"].values])


def test_example_masks_are_the_engine_masks(cache) -> None:
    """H_ik rebuilt with torch: bilinear upsampling of A_ik to the input, then min-max."""
    convention = convention_fields(cache)
    size = (cache.sizes["y"], cache.sizes["x"])
    for channel in (1, 7):
        examples = channel_examples(cache, LAYER, channel, k=N_IMAGES)
        for rank in range(N_IMAGES):
            image = int(examples["image_index"].values[rank])
            activation = torch.from_numpy(cache[LAYER]["activation"].values[image, channel][None, None].astype(np.float32))
            upsampled = F.interpolate(activation, size=size, mode="bilinear", align_corners=bool(convention["align_corners"]))[0, 0]
            span = upsampled.max() - upsampled.min()
            if bool(cache[LAYER]["constant"].values[image, channel]):
                expected = torch.zeros(size)
            else:
                expected = (upsampled - upsampled.min()) / (span + float(convention.get("eps", 0.0)))
            assert_close_up_to_rounding(examples["mask"].values[rank], expected)


def test_profile_and_class_channels(cache) -> None:
    weights = all_weights(cache, "paper")
    own = cache["logits"].values.argmax(axis=-1)
    constant = cache[LAYER]["constant"].values
    channel = 4
    profile = channel_profile(cache, LAYER, channel)
    np.testing.assert_allclose(profile["weight_mean"].values, weights[:, channel, :].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(float(profile["own_weight_mean"]), weights[np.arange(N_IMAGES), channel, own].mean(), rtol=1e-12)
    assert float(profile["constant_frequency"]) == pytest.approx(constant[:, channel].mean())
    assert list(profile["class_name"].values) == list(cache["class_name"].values)
    for target in (0, 3):
        ranked = class_channels(cache, LAYER, target, k=5)
        means = weights[:, :, target].mean(axis=0)
        np.testing.assert_array_equal(ranked["channel"].values, descending(means)[:5])
        np.testing.assert_allclose(ranked["weight_mean"].values, means[descending(means)[:5]], rtol=1e-12)


def test_a_saved_store_gives_the_same_answers_as_the_cache(cache, store) -> None:
    for function, arguments in (
        (channel_examples, (LAYER, 2)),
        (channel_profile, (LAYER, 2)),
        (class_channels, (LAYER, 1)),
    ):
        xr.testing.assert_identical(function(str(store), *arguments), function(cache, *arguments))


def test_only_complete_rows_of_a_store_are_used(cache) -> None:
    """A store being written: rows not complete hold NaN; they are left out and counted."""
    writing = cache.copy(deep=True)
    complete = np.array([True, False, True, True, False, True])
    writing.dataset = writing.dataset.assign(complete=("image", complete))
    masked = writing[LAYER]["masked_logits"].values.copy()
    masked[~complete] = np.nan
    writing[LAYER] = writing[LAYER].to_dataset(inherit=False).assign(masked_logits=writing[LAYER]["masked_logits"].copy(data=masked))
    done = cache.isel(image=np.flatnonzero(complete))
    examples = channel_examples(writing, LAYER, 0, k=N_IMAGES)
    assert examples.attrs["pending"] == 2 and examples.attrs["images"] == 4
    assert examples.sizes["rank"] == 4
    assert set(examples["image"].values) == set(done["image"].values)
    np.testing.assert_allclose(
        channel_profile(writing, LAYER, 0)["weight_mean"].values, channel_profile(done, LAYER, 0)["weight_mean"].values, rtol=1e-12
    )


def test_a_store_with_no_complete_row_is_refused(cache) -> None:
    empty = cache.copy(deep=True)
    empty.dataset = empty.dataset.assign(complete=("image", np.zeros(N_IMAGES, dtype=bool)))
    with pytest.raises(CacheError, match="no complete image yet .6 image.s. pending"):
        channel_profile(empty, LAYER, 0)


def test_remembered_tables_follow_a_replaced_array(cache) -> None:
    """The scan is remembered per data object, but a replaced array is a new key."""
    changed = cache.copy(deep=True)
    first = channel_profile(changed, LAYER, 0)["weight_mean"].values
    assert channel_profile(changed, LAYER, 0)["weight_mean"].values is not None
    logits = changed[LAYER]["masked_logits"]
    changed[LAYER] = changed[LAYER].to_dataset(inherit=False).assign(masked_logits=logits.copy(data=logits.values[:, :, ::-1].copy()))
    second = channel_profile(changed, LAYER, 0)["weight_mean"].values
    assert not np.allclose(first, second)
    np.testing.assert_allclose(second, all_weights(changed, "paper")[:, 0, :].mean(axis=0), rtol=1e-12)


def test_remembered_tables_are_dropped_with_their_cache(cache) -> None:
    copy = cache.copy(deep=True)
    atlas_tables(copy, LAYER)
    identity = id(copy)
    assert identity in atlas._remembered
    del copy
    import gc

    gc.collect()
    assert identity not in atlas._remembered


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: channel_examples(c, LAYER, 99), ScorecamError, r"channel 99 is out of range: layer 'features' has channels 0\.\.15"),
        (lambda c: channel_examples(c, LAYER, -1), ScorecamError, "out of range"),
        (lambda c: channel_profile(c, "features.9", 0), UnknownLayerError, "it holds: features.2, features"),
        (lambda c: channel_examples(c, LAYER, 0, by="size"), ScorecamError, "choose one of weight, activation"),
        (lambda c: channel_examples(c, LAYER, 0, k=0), ScorecamError, "k must be a positive integer"),
        (lambda c: class_channels(c, LAYER, None), ScorecamError, "needs a class"),
        (lambda c: class_channels(c, LAYER, "no such class"), ScorecamError, "no such class"),
        (lambda c: channel_profile(42, LAYER, 0), CacheError, "not int"),
    ],
)
def test_bad_input_is_refused_clearly(cache, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(cache)


def test_tables_ready_says_when_an_answer_would_read_every_image(cache, store) -> None:
    from scorecam_explorer.atlas import tables_ready
    from scorecam_explorer.dataset_store import open_dataset

    assert tables_ready(cache, LAYER)  # in memory: nothing to read from disk
    lazy = open_dataset(store)
    assert not tables_ready(lazy, LAYER) and not tables_ready(lazy, LAYER, preset="torchcam")
    atlas_tables(lazy, LAYER)
    assert tables_ready(lazy, LAYER)  # remembered for this tree
    assert not tables_ready(lazy, LAYER, preset="torchcam")  # another preset is another scan
