"""The cache: schema, Zarr round trip, atomic saves, damaged stores, reuse checks, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from scorecam_explorer import cache as cache_module
from scorecam_explorer.cache import (
    CHANNEL_BLOCK,
    SCHEMA,
    check_cache_matches,
    load_cache,
    save_cache,
    validate_cache,
)
from scorecam_explorer.compose import scorecam
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError
from scorecam_explorer.models import from_module


@pytest.fixture(scope="module")
def computed():
    """A small real cache: a tiny CNN, two images, two layers (one with 300 channels)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 300, 3, stride=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(300, 6, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 5),
    ).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = from_module(model, name="wide", class_names=list("abcde"))
        tree = compute_cache(loaded, torch.randn(2, 3, 16, 16), ["1", "3"], progress=False, image_ids=["a.png", "b.png"])
    finally:
        torch.set_num_threads(threads)
    return loaded, tree


def test_round_trip_is_identical(computed, tmp_path):
    _, tree = computed
    path = save_cache(tree, tmp_path / "c.zarr")
    loaded = load_cache(path)
    xr.testing.assert_identical(loaded, tree)
    assert loaded.attrs["schema"] == SCHEMA
    assert loaded["image"].values.dtype.kind == "U" and loaded["class_name"].values.dtype.kind == "U"
    lazy = load_cache(path, lazy=True)
    masked = lazy["1"]["masked_logits"]
    assert masked.chunks is not None and masked.chunks[:2] == ((1, 1), (CHANNEL_BLOCK, 300 - CHANNEL_BLOCK))  # dask, as stored
    np.testing.assert_array_equal(masked.values, tree["1"]["masked_logits"].values)
    np.testing.assert_allclose(scorecam(lazy, "1", 2).values, scorecam(tree, "1", 2).values)


def test_composing_one_image_of_a_lazy_store_reads_only_that_image(computed, tmp_path):
    """The other image's layer chunks are made unreadable on disk: a call for image 0 that
    read them (images x channels x classes masked outputs) would fail."""
    from scorecam_explorer.compose import channel_contributions, channel_weights, top_channels_by_variance

    _, tree = computed
    path = save_cache(tree, tmp_path / "c.zarr")
    damaged = [chunk for layer in ("1", "3") for chunk in (path / layer).glob("*/c/1/**/*") if chunk.is_file()]
    assert damaged
    for chunk in damaged:
        chunk.write_bytes(b"unreadable")
    lazy = load_cache(path, lazy=True)
    for layer in ("1", "3"):
        np.testing.assert_array_equal(
            scorecam(lazy, layer, 2, image=0).values, scorecam(tree, layer, 2, image=0).values
        )
        np.testing.assert_array_equal(
            channel_weights(lazy, layer, None, image="a.png").values, channel_weights(tree, layer, None, image=0).values
        )
        xr.testing.assert_identical(
            channel_contributions(lazy, layer, 1, image=0, preset="torchcam"),
            channel_contributions(tree, layer, 1, image=0, preset="torchcam"),
        )
        xr.testing.assert_identical(
            top_channels_by_variance(lazy, layer, 3, image=0), top_channels_by_variance(tree, layer, 3, image=0)
        )
    with pytest.raises(Exception):  # noqa: B017 - the damage is real: reading image 1 fails
        scorecam(lazy, "1", 2, image=1)


def test_store_is_chunked_per_image_and_channel_block_and_compressed(computed, tmp_path):
    _, tree = computed
    path = save_cache(tree, tmp_path / "c.zarr")
    opened = xr.open_datatree(path, engine="zarr", consolidated=False)
    encoding = opened["1"]["masked_logits"].encoding
    assert encoding["chunks"] == (1, CHANNEL_BLOCK, 5)
    assert opened["1"]["activation"].encoding["chunks"][:2] == (1, CHANNEL_BLOCK)
    assert opened["picture"].encoding["chunks"] == (1, 16, 16, 3)
    assert "Zstd" in type(encoding["compressors"][0]).__name__
    assert len(list((path / "1" / "masked_logits").rglob("*"))) > 4  # several chunk files


def test_saving_refuses_to_overwrite_unless_asked_and_never_replaces_a_non_cache(computed, tmp_path):
    _, tree = computed
    path = save_cache(tree, tmp_path / "c.zarr")
    with pytest.raises(CacheError, match="already exists"):
        save_cache(tree, path)
    save_cache(tree, path, overwrite=True)
    load_cache(path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a scorecam_explorer cache; refusing"):
        save_cache(tree, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(CacheError, match="does not exist"):
        save_cache(tree, tmp_path / "no" / "such" / "c.zarr")


def _fail_midway(monkeypatch):
    """Make DataTree.to_zarr write part of the store and then fail."""
    original = xr.DataTree.to_zarr

    def partial_write(self, store, *args, **kwargs):
        original(self, store, *args, **kwargs)
        shutil.rmtree(Path(store) / "logits")  # as if interrupted before the last pieces
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(xr.DataTree, "to_zarr", partial_write)


def test_a_failed_save_leaves_nothing_that_loads(computed, tmp_path, monkeypatch):
    _, tree = computed
    target = tmp_path / "c.zarr"
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_cache(tree, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the partial directory is cleaned up
    with pytest.raises(CacheError, match="does not exist"):
        load_cache(target)


def test_a_failed_overwrite_keeps_the_old_cache(computed, tmp_path, monkeypatch):
    _, tree = computed
    target = save_cache(tree, tmp_path / "c.zarr")
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_cache(tree, target, overwrite=True)
    monkeypatch.undo()
    xr.testing.assert_identical(load_cache(target), tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]


def test_a_killed_save_leaves_only_a_hidden_partial_directory(computed, tmp_path):
    """A process killed mid-save never renames: the target path does not exist."""
    _, tree = computed
    target = tmp_path / "c.zarr"
    script = textwrap.dedent(
        f"""
        import os, xarray as xr
        from scorecam_explorer.cache import save_cache
        tree = xr.open_datatree({str(tmp_path / "src.zarr")!r}, engine="zarr", consolidated=False).load()
        from scorecam_explorer import cache
        original = xr.DataTree.to_zarr
        def die(self, store, *a, **k):
            original(self, store, *a, **k)
            os._exit(9)
        xr.DataTree.to_zarr = die
        save_cache(cache.with_plain_strings(tree), {str(target)!r})
        """
    )
    save_cache(tree, tmp_path / "src.zarr")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "src.zarr"]
    assert leftovers and all(name.startswith(".c.zarr.partial-") for name in leftovers)


def test_loading_damaged_or_foreign_stores_fails_clearly(computed, tmp_path):
    _, tree = computed
    with pytest.raises(CacheError, match="does not exist"):
        load_cache(tmp_path / "missing.zarr")
    a_file = tmp_path / "file.zarr"
    a_file.write_text("hello")
    with pytest.raises(CacheError, match="is not a cache"):
        load_cache(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CacheError, match="not a readable cache"):
        load_cache(empty)
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("a", np.arange(3))}).to_zarr(foreign, consolidated=False)
    with pytest.raises(CacheError, match="schema"):
        load_cache(foreign)

    good = save_cache(tree, tmp_path / "good.zarr")

    missing_variable = tmp_path / "missing_variable.zarr"
    shutil.copytree(good, missing_variable)
    shutil.rmtree(missing_variable / "3" / "masked_logits")
    with pytest.raises(CacheError, match="'masked_logits'"):
        load_cache(missing_variable)

    wrong_schema = tmp_path / "wrong_schema.zarr"
    shutil.copytree(good, wrong_schema)
    metadata = json.loads((wrong_schema / "zarr.json").read_text())
    metadata["attributes"]["schema"] = "scorecam_explorer.cache/99"
    (wrong_schema / "zarr.json").write_text(json.dumps(metadata))
    with pytest.raises(CacheError, match="another version"):
        load_cache(wrong_schema)

    missing_chunk = tmp_path / "missing_chunk.zarr"
    shutil.copytree(good, missing_chunk)
    chunk = next(p for p in (missing_chunk / "1" / "masked_logits").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    with pytest.raises(CacheError, match="damaged: /1/masked_logits differ"):
        load_cache(missing_chunk)

    missing_layer = tmp_path / "missing_layer.zarr"
    shutil.copytree(good, missing_layer)
    shutil.rmtree(missing_layer / "3")
    with pytest.raises(CacheError, match="layer '3'"):
        load_cache(missing_layer)


@pytest.mark.parametrize("variable", ["picture", "input", "3/constant", "1/activation"])
def test_a_store_with_a_missing_chunk_is_refused_whatever_the_variable(computed, tmp_path, variable):
    """Zarr reads a missing chunk back as the fill value (0, False or NaN): the checksums
    recorded at save time catch what the NaN check cannot."""
    _, tree = computed
    good = save_cache(tree, tmp_path / "good.zarr")
    assert "checksums" not in tree.attrs  # saving leaves the cache itself alone
    chunks = [p for p in (good / variable).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks, f"no stored chunk for {variable}"
    chunks[0].unlink()
    with pytest.raises(CacheError, match=f"damaged: /{variable} differ.*Compute the cache again"):
        load_cache(good)
    lazy = load_cache(good, lazy=True)  # reads no data: opens, without the checksums attribute
    assert "checksums" not in lazy.attrs


def test_validate_rejects_wrong_dims_and_types(computed):
    _, tree = computed
    with pytest.raises(CacheError, match="DataTree"):
        validate_cache(tree.dataset)
    broken = tree.copy()
    broken.attrs = {k: v for k, v in tree.attrs.items() if k != "weights_fingerprint"}
    with pytest.raises(CacheError, match="weights_fingerprint"):
        validate_cache(broken)
    renamed = tree.copy()
    renamed.dataset = tree.dataset.rename_vars({"logits": "scores"})
    with pytest.raises(CacheError, match="'logits'"):
        validate_cache(renamed)


def test_check_cache_matches(computed):
    loaded, tree = computed
    assert check_cache_matches(tree, model=loaded, convention="paper", layers=["1", "3"], images="a.png") is tree
    check_cache_matches(tree, model=loaded.module)  # a plain module: its weights fingerprint
    check_cache_matches(tree, model=torch.nn.Sequential(*loaded.module))  # another object, same weights
    changed = from_module(torch.nn.Sequential(*[m for m in loaded.module]), name="wide", class_names=list("abcde"))
    with torch.no_grad():
        changed.module[2].bias += 1
    try:
        with pytest.raises(CacheError, match="other weights"):
            check_cache_matches(tree, model=changed)
    finally:
        with torch.no_grad():
            changed.module[2].bias -= 1
    renamed = from_module(loaded.module, name="resnet18", class_names=list("abcde"))
    with pytest.raises(CacheError, match="model 'wide', not 'resnet18'"):
        check_cache_matches(tree, model=renamed)
    with pytest.raises(CacheError, match="'paper' convention.*recompute it with convention='torchcam'"):
        check_cache_matches(tree, convention="torchcam")
    check_cache_matches(tree, convention="official")  # the authors' code builds the same masks as the paper
    with pytest.raises(CacheError, match="no layer 'layer4'; it holds 1, 3"):
        check_cache_matches(tree, layers="layer4")
    with pytest.raises(CacheError, match="no image 'c.png'"):
        check_cache_matches(tree, images=["a.png", "c.png"])


def test_loading_and_recomposing_needs_no_torch(computed, tmp_path):
    _, tree = computed
    path = save_cache(tree, tmp_path / "c.zarr")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        from scorecam_explorer.cache import load_cache, check_cache_matches
        cache = load_cache({str(path)!r})
        check_cache_matches(cache, convention="paper", layers="1", images="b.png")
        from scorecam_explorer.compose import scorecam
        heatmap = scorecam(cache, "1", "c")
        assert heatmap.shape == (2, 16, 16), heatmap.shape
        loaded = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "torch"]
        assert not loaded, loaded
        print("ok", float(heatmap.max()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_cache_module_does_not_import_torch_at_module_level():
    source = Path(cache_module.__file__).read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "torch" in line]
