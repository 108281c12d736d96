"""Per-channel statistics across images: lazy, and equal to compose's per-image weights.

The store here is an ordinary saved multi-image cache (no cluster needed: the analysis reads
any cache); the references are :mod:`scorecam_explorer.compose` on the in-memory cache and
plain numpy over its weights.
"""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback

from _tiny_models import tiny_model, write_images
from scorecam_explorer import compose
from scorecam_explorer.cache import save_cache
from scorecam_explorer.dataset_analysis import (
    STATISTICS,
    channel_statistics,
    dataset_channel_maps,
    dataset_channel_weights,
    dataset_top_channels,
)
from scorecam_explorer.distributed import open_dataset
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError, NonFiniteError, ScorecamError, UnknownClassError, UnknownLayerError

LAYER = "features"
N_IMAGES = 5


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> xr.DataTree:
    folder = tmp_path_factory.mktemp("pictures")
    paths = write_images(folder, N_IMAGES)
    return compute_cache(tiny_model(), [str(p) for p in paths], ["features.2", LAYER], batch_size=8, progress=False)


@pytest.fixture(scope="module")
def store(cache, tmp_path_factory):
    return save_cache(cache, tmp_path_factory.mktemp("store") / "cache.zarr")


class CountTasks(Callback):
    """Counts the dask tasks executed while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def _posttask(self, *_args) -> None:
        self.count += 1


@pytest.mark.parametrize("preset", ["paper", "official", "pytorch-grad-cam", "torchcam"])
@pytest.mark.parametrize("target", [3, "Class 7", None])
def test_weights_equal_compose_for_every_preset_and_target(store, cache, preset, target) -> None:
    weights = dataset_channel_weights(store, LAYER, target, preset=preset)
    assert isinstance(weights.data, dask.array.Array)
    reference = compose.channel_weights(cache, LAYER, target, preset=preset)
    np.testing.assert_array_equal(weights.values, reference.values)
    np.testing.assert_array_equal(weights["target"].values, reference["target"].values)
    assert weights["image"].values.tolist() == reference["image"].values.tolist()


def test_statistics_are_lazy_until_computed(store) -> None:
    tree = open_dataset(store)
    with CountTasks() as counter:
        statistics = channel_statistics(tree, LAYER, 3, top_k=4)
        maps = dataset_channel_maps(tree, LAYER, 5, 3)
    assert counter.count == 0
    assert all(isinstance(statistics[name].data, dask.array.Array) for name in STATISTICS)
    assert all(isinstance(maps[name].data, dask.array.Array) for name in maps.data_vars)
    with CountTasks() as counter:
        statistics.compute()
    assert counter.count > 0


def test_statistics_match_numpy_over_compose_weights(store, cache) -> None:
    top_k = 4
    statistics = channel_statistics(store, LAYER, "class 2", preset="paper", top_k=top_k).compute()
    weights = compose.channel_weights(cache, LAYER, "class 2", preset="paper").values
    np.testing.assert_allclose(statistics["weight_mean"].values, weights.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(statistics["weight_std"].values, weights.std(axis=0), rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(statistics["weight_min"].values, weights.min(axis=0))
    np.testing.assert_array_equal(statistics["weight_max"].values, weights.max(axis=0))
    top = compose.top_channels_by_weight(cache, LAYER, "class 2", top_k, preset="paper").values  # (image, rank)
    counts = np.zeros(weights.shape[1])
    for row in top:
        counts[row] += 1
    np.testing.assert_array_equal(statistics["top_k_frequency"].values, counts / N_IMAGES)
    assert statistics["top_k_frequency"].sum() == pytest.approx(top_k)
    constant = cache[LAYER]["constant"].values
    np.testing.assert_array_equal(statistics["constant_frequency"].values, constant.mean(axis=0))
    assert statistics.attrs == {
        "layer": LAYER, "preset": "paper", "target": "2 (class 2)", "top_k": top_k, "images": N_IMAGES,
    }  # fmt: skip


def test_top_channels_rank_by_a_statistic_with_ties_to_the_lower_id() -> None:
    statistics = xr.Dataset(
        {name: ("channel", np.zeros(5)) for name in STATISTICS}, coords={"channel": np.arange(5)}
    )
    statistics["top_k_frequency"] = ("channel", np.array([0.2, 0.8, 0.2, 1.0, 0.8]))
    top = dataset_top_channels(statistics, 4, by="top_k_frequency")
    assert top.values.tolist() == [3, 1, 4, 0]
    assert top["top_k_frequency"].values.tolist() == [1.0, 0.8, 0.8, 0.2]
    assert dataset_top_channels(statistics, 99).sizes["rank"] == 5


def test_channel_maps_match_compose_contributions(store, cache) -> None:
    channel = 6
    maps = dataset_channel_maps(store, LAYER, channel, None, preset="pytorch-grad-cam").compute()
    reference = compose.channel_contributions(cache, LAYER, None, preset="pytorch-grad-cam")
    np.testing.assert_array_equal(maps["activation"].values, cache[LAYER]["activation"].values[:, channel])
    np.testing.assert_array_equal(maps["weight"].values, reference["weight"].values[:, channel])
    np.testing.assert_allclose(maps["contribution"].values, reference["contribution"].values[:, channel], rtol=1e-12)
    weights = reference["weight"].values
    expected_rank = [(np.argsort(-row, kind="stable") == channel).nonzero()[0][0] for row in weights]
    assert maps["weight_rank"].values.tolist() == expected_rank
    np.testing.assert_array_equal(maps["constant"].values, cache[LAYER]["constant"].values[:, channel])


def test_incomplete_rows_are_left_out_and_nan_rows_are_refused(cache) -> None:
    tree = cache.copy()
    root = tree.to_dataset(inherit=False)
    tree.dataset = root.assign(complete=("image", np.array([True, False, True, True, False])))
    damaged = tree[LAYER].to_dataset(inherit=False)
    masked = damaged["masked_logits"].values.copy()
    masked[1] = np.nan  # an unfinished row
    tree[LAYER].dataset = damaged.assign(masked_logits=(damaged["masked_logits"].dims, masked))
    statistics = channel_statistics(tree, LAYER, 0).compute()
    kept = compose.channel_weights(cache, LAYER, 0).values[[0, 2, 3]]
    np.testing.assert_allclose(statistics["weight_mean"].values, kept.mean(axis=0), rtol=1e-12)
    assert statistics.attrs["images"] == 3

    tree.dataset = tree.to_dataset(inherit=False).assign(complete=("image", np.ones(N_IMAGES, dtype=bool)))
    with pytest.raises(NonFiniteError, match="not finite"):
        channel_statistics(tree, LAYER, 0).compute()


def test_bad_arguments_get_clear_errors(store, tmp_path) -> None:
    with pytest.raises(UnknownLayerError, match="Did you mean: features"):
        dataset_channel_weights(store, "featurez", 0)
    with pytest.raises(UnknownClassError, match="Did you mean: class 1"):
        dataset_channel_weights(store, LAYER, "class 1x")
    with pytest.raises(UnknownClassError, match="out of range"):
        dataset_channel_weights(store, LAYER, 10)
    with pytest.raises(ScorecamError, match="top_k"):
        channel_statistics(store, LAYER, 0, top_k=0)
    with pytest.raises(ScorecamError, match="cannot rank channels by 'mean'"):
        dataset_top_channels(channel_statistics(store, LAYER, 0), 3, by="mean")
    with pytest.raises(ScorecamError, match="channel must be an integer in 0..15"):
        dataset_channel_maps(store, LAYER, 16, 0)
    with pytest.raises(CacheError, match="no dataset store"):
        channel_statistics(tmp_path / "missing.zarr", LAYER, 0)
