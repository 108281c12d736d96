"""compute_dataset on a real Dask cluster: equal to single-process caches, resumable, fault tolerant.

One module-scoped LocalCluster (two worker processes) serves every cluster test; the tiny
models live in ``_tiny_models`` so that the workers can unpickle the factories. The test that
kills a worker runs last (the nanny restarts it, but it takes a while).
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import _tiny_models
from _tiny_models import forward_calls, sabotaged_model, tiny_model, tiny_swin, tiny_vit, write_images
from scorecam_explorer import compose
from scorecam_explorer.cache import LAYER_VARIABLES, ROOT_VARIABLES, cache_sampler, load_cache, save_cache
from scorecam_explorer.dataset_analysis import channel_statistics, dataset_channel_weights
from scorecam_explorer.cli import build_parser, main
from scorecam_explorer.conventions import get_convention
from scorecam_explorer.distributed import (
    DATASET_STORE,
    _compute_image,
    compute_dataset,
    open_dataset,
    select_image,
)
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError, ImageLoadError, ScorecamError
from scorecam_explorer.models import DEFAULT_MODEL

try:  # the test extra installs dask[distributed]: a missing one is a broken setup, not a skip
    import distributed
except ImportError as error:
    raise ImportError(f"{error}: the cluster tests need dask[distributed]; install the test extra.") from error

LAYERS = ["features.2", "features"]
BATCH = 8
N_IMAGES = 6


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster, distributed.Client(cluster) as dask_client:
        dask_client.wait_for_workers(2, timeout=120)
        yield dask_client


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, N_IMAGES)
    return folder


@pytest.fixture(scope="module")
def image_ids(image_folder) -> list[str]:
    return sorted(path.name for path in image_folder.iterdir())


@pytest.fixture(scope="module")
def references(image_folder, image_ids) -> dict[str, xr.DataTree]:
    """Each image's cache computed alone, in this process, with the same model and settings."""
    model = tiny_model()
    return {
        image: compute_cache(model, [str(image_folder / image)], LAYERS, batch_size=BATCH, progress=False)
        for image in image_ids
    }


@pytest.fixture(scope="module")
def computed_store(client, image_folder, tmp_path_factory) -> tuple[Path, object]:
    store = tmp_path_factory.mktemp("stores") / "dataset.zarr"
    run = compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    return store, run


def worker_forward_calls(client) -> int:
    return sum(client.run(forward_calls).values())


def assert_store_equals(store: Path, references: dict[str, xr.DataTree], image_ids: list[str]) -> None:
    """Every image of the store is complete, once, and equal to its single-process cache."""
    group = zarr.open_group(str(store), mode="r")
    assert [str(i) for i in group["image"][:]] == image_ids
    assert np.asarray(group["complete"][:]).all()
    cache = load_cache(store)
    for row, image in enumerate(image_ids):
        reference = references[image]
        for variable in ROOT_VARIABLES:
            np.testing.assert_array_equal(cache[variable].values[row], reference[variable].values[0], err_msg=variable)
        for layer in LAYERS:
            for variable in LAYER_VARIABLES:
                np.testing.assert_array_equal(
                    cache[layer][variable].values[row],
                    reference[layer][variable].values[0],
                    err_msg=f"{layer}/{variable}",
                )


# ---- on the cluster ----------------------------------------------------------------------


def test_store_equals_single_process_caches(computed_store, references, image_ids) -> None:
    store, run = computed_store
    assert run.computed == image_ids and run.skipped == {} and run.already_complete == []
    assert_store_equals(store, references, image_ids)
    attrs = load_cache(store).attrs
    assert attrs["dataset_store"] == DATASET_STORE
    assert attrs["forward_passes"] == run.forward_passes == sum(r.attrs["forward_passes"] for r in references.values())
    assert attrs["device"] == "cpu"
    assert json.loads(attrs["layers"]) == LAYERS


def test_workers_leave_the_allocator_to_their_nanny(client, computed_store) -> None:
    """A nanny sets MALLOC_TRIM_THRESHOLD_ so that freed memory goes back to the system;
    compute_dataset must not override it (mallopt) in the workers unless asked."""
    from scorecam_explorer import device

    _store, run = computed_store
    assert run.computed  # the workers did compute
    assert not any(client.run(device.allocator_tuned).values())


def test_select_image_gives_the_single_image_cache(computed_store, references, image_ids) -> None:
    store, _run = computed_store
    image = image_ids[3]
    one = select_image(store, image)
    reference = references[image]
    assert set(one.dataset.data_vars) == set(reference.dataset.data_vars)
    xr.testing.assert_identical(
        one.to_dataset(inherit=False).drop_attrs(), reference.to_dataset(inherit=False).drop_attrs()
    )
    for layer in LAYERS:
        xr.testing.assert_identical(one[layer].to_dataset(inherit=False), reference[layer].to_dataset(inherit=False))
    for name in ("model_name", "weights_fingerprint", "mask_convention", "layers", "forward_passes", "preprocessing"):
        assert one.attrs[name] == reference.attrs[name], name
    assert "dataset_store" not in one.attrs
    np.testing.assert_array_equal(
        compose.scorecam(one, "features", "class 4").values, compose.scorecam(reference, "features", "class 4").values
    )
    # by row index too, from an opened (lazy) store
    assert select_image(open_dataset(store), 3)["image"].values.tolist() == [image]


def test_a_rerun_of_a_complete_store_makes_no_forward_pass(client, computed_store, image_folder, image_ids) -> None:
    store, _run = computed_store
    before = worker_forward_calls(client)
    run = compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    assert run.computed == [] and sorted(run.already_complete) == image_ids and run.forward_passes == 0
    assert worker_forward_calls(client) == before
    assert len(json.loads(load_cache(store).attrs["runs"])) >= 2


def test_a_rerun_recomputes_only_incomplete_or_half_written_rows(
    client, computed_store, image_folder, image_ids, references, tmp_path
) -> None:
    store = tmp_path / "interrupted.zarr"
    shutil.copytree(computed_store[0], store)
    group = zarr.open_group(str(store), mode="r+")
    for row in (1, 4):  # as if the run had stopped while writing these rows
        group["complete"][row] = False
        group["features/activation"][row] = np.nan
        group["features.2/masked_logits"][row] = 123.0
    assert open_dataset(store)["image"].values.tolist() == [image_ids[i] for i in (0, 2, 3, 5)]
    with pytest.raises(CacheError, match="not computed yet"):
        select_image(store, image_ids[1])
    for lazy in (False, True):
        with pytest.raises(CacheError, match="dataset store with 4 of 6 images computed.*compute-dataset"):
            load_cache(store, lazy=lazy)

    before = worker_forward_calls(client)
    run = compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    assert run.computed == [image_ids[1], image_ids[4]]
    assert sorted(run.already_complete) == sorted(image_ids[i] for i in (0, 2, 3, 5))
    passes = sum(references[image_ids[i]].attrs["forward_passes"] for i in (1, 4))
    assert run.forward_passes == passes and worker_forward_calls(client) - before == passes
    assert_store_equals(store, references, image_ids)


def test_a_task_that_raises_once_is_retried(client, image_folder, image_ids, references, tmp_path) -> None:
    marker = tmp_path / "fail-once"
    marker.touch()
    factory = functools.partial(sabotaged_model, str(marker), "raise")
    store = tmp_path / "retried.zarr"
    run = compute_dataset(factory, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    assert not marker.exists() and len(list(tmp_path.glob("fail-once.claimed-*"))) == 1  # it did fail once
    assert run.computed == image_ids
    assert_store_equals(store, references, image_ids)


def test_images_that_fail_after_their_retries_are_reported_and_resumed(
    client, image_folder, image_ids, references, tmp_path
) -> None:
    marker = tmp_path / "fail-once"
    marker.touch()
    factory = functools.partial(sabotaged_model, str(marker), "raise")
    store = tmp_path / "failed.zarr"
    expected = r"1 of 6 image\(s\) failed after 0 retries: .*sabotaged forward pass.*rerun"
    with pytest.raises(ScorecamError, match=expected):
        compute_dataset(factory, image_folder, LAYERS, store, client=client, batch_size=BATCH, retries=0)
    complete = np.asarray(zarr.open_group(str(store), mode="r")["complete"][:])
    assert complete.sum() == N_IMAGES - 1
    run = compute_dataset(factory, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    assert run.computed == [image_ids[int(np.flatnonzero(~complete)[0])]]
    assert_store_equals(store, references, image_ids)


def test_resuming_with_other_settings_is_refused(client, computed_store, image_folder, tmp_path) -> None:
    store, _run = computed_store
    with pytest.raises(CacheError, match="other weights"):
        other = functools.partial(tiny_model, seed=1)
        compute_dataset(other, image_folder, LAYERS, store, client=client, progress=False)
    with pytest.raises(CacheError, match="'torchcam' mask convention|'paper' mask convention"):
        compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, convention="torchcam", progress=False)
    with pytest.raises(CacheError, match="bfloat16|float32"):
        compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, precision="bfloat16", progress=False)
    with pytest.raises(CacheError, match="layers"):
        compute_dataset(tiny_model, image_folder, ["features"], store, client=client, progress=False)
    fewer = sorted(image_folder.iterdir())[:3]
    with pytest.raises(CacheError, match="another image set"):
        compute_dataset(tiny_model, fewer, LAYERS, store, client=client, progress=False)


def test_unreadable_images_are_listed_and_skipped(client, tmp_path, references, image_folder) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(image_folder.iterdir())[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    (folder / "empty.jpg").write_bytes(b"")
    store = tmp_path / "mixed.zarr"
    with pytest.warns(UserWarning, match=r"2 image\(s\) could not be read.*broken\.png"):
        run = compute_dataset(tiny_model, folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    assert sorted(run.skipped) == ["broken.png", "empty.jpg"]
    cache = load_cache(store)
    assert cache["image"].values.tolist() == [path.name for path in good]
    skipped = json.loads(cache.attrs["skipped_images"])
    assert {entry["image"] for entry in skipped} == {"broken.png", "empty.jpg"}
    assert all(entry["reason"] and entry["source"].endswith(entry["image"]) for entry in skipped)
    np.testing.assert_array_equal(
        cache["features"]["masked_logits"].values[1], references[good[1].name]["features"]["masked_logits"].values[0]
    )


def test_the_cli_computes_a_folder_on_a_running_scheduler(client, tmp_path, capsys) -> None:
    folder = tmp_path / "pictures"
    write_images(folder, 2, size=48)
    store = tmp_path / "cli.zarr"
    argv = [
        "compute-dataset", "--model", "mobilenet_v3_small", "--weights", "none", "--images", str(folder),
        "--layer", "features.1", "--out", str(store), "--scheduler", client.scheduler.address,
        "--batch-size", "8",
    ]  # fmt: skip
    assert main(argv) == 0
    output, progress = capsys.readouterr()
    assert "2 image(s) computed, 0 already complete, 0 skipped" in output
    assert "Score-CAM images" in progress and "2/2" in progress
    cache = load_cache(store)
    assert cache.attrs["model_name"] == "mobilenet_v3_small" and json.loads(cache.attrs["layers"]) == ["features.1"]
    assert cache["features.1"]["masked_logits"].shape == (2, 16, 1000)
    assert cache["image"].values.tolist() == ["image-00.png", "image-01.png"]
    assert main(argv) == 0  # resumed: nothing left to do
    assert "0 image(s) computed, 2 already complete" in capsys.readouterr().out


# ---- the Score-CAM family and transformers through the store -----------------------------

FAMILIES = {
    "ss-cam": {"family": "ss-cam", "samples": 2, "std": 1.5, "seed": 7},
    "is-cam": {"family": "is-cam", "samples": 3},
}


@pytest.fixture(scope="module")
def family_stores(client, image_folder, image_ids, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """An SS-CAM and an IS-CAM store of the first two images."""
    paths = [image_folder / image for image in image_ids[:2]]
    stores = {}
    for name, options in FAMILIES.items():
        store = tmp_path_factory.mktemp("family") / f"{name}.zarr"
        run = compute_dataset(tiny_model, paths, LAYERS, store, client=client, batch_size=BATCH, progress=False, **options)
        stores[name] = (store, run)
    return stores


def assert_rows_equal_single_caches(
    store: Path, references: dict[str, xr.DataTree], layers: list[str], *, same_passes: bool = True
) -> None:
    """Each stored row equals the cache computed for its image alone, bit for bit, with the
    same sampler record (root) and noise records (layers); ``same_passes``: and the same
    model calls (not when one side's model had checked its faster copy before)."""
    cache = load_cache(store)
    for row, (image, reference) in enumerate(references.items()):
        assert str(cache["image"].values[row]) == image
        for variable in ROOT_VARIABLES:
            np.testing.assert_array_equal(cache[variable].values[row], reference[variable].values[0], err_msg=variable)
        for layer in layers:
            for variable in LAYER_VARIABLES:
                np.testing.assert_array_equal(
                    cache[layer][variable].values[row], reference[layer][variable].values[0], err_msg=f"{layer}/{variable}"
                )
            assert cache[layer].attrs.get("noise") == reference[layer].attrs.get("noise"), layer
        one = select_image(store, image)
        for name in ("mask_sampler", "family", "forward_passes")[: 3 if same_passes else 2]:
            assert one.attrs[name] == reference.attrs[name], name
        for layer in layers:
            assert one[layer].attrs == reference[layer].attrs, layer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_stores_equal_single_process_caches(family_stores, image_folder, image_ids, family) -> None:
    store, run = family_stores[family]
    assert run.computed == image_ids[:2]
    options = FAMILIES[family]
    model = tiny_model()
    references = {
        image: compute_cache(model, [str(image_folder / image)], LAYERS, batch_size=BATCH, progress=False, **options)
        for image in image_ids[:2]
    }
    assert_rows_equal_single_caches(store, references, LAYERS)
    attrs = load_cache(store).attrs
    expected = {key: value for key, value in options.items() if key != "family"}
    assert json.loads(attrs["mask_sampler"]) == {"name": family, **expected}
    assert attrs["family"] == family
    opened = open_dataset(store)
    assert cache_sampler(opened) == {"name": family, **expected}
    # SS-CAM's noise comes from the seed, the same records on every image (and none for IS-CAM)
    noise = [opened[layer].attrs.get("noise") for layer in LAYERS]
    if family == "ss-cam":
        assert [json.loads(record) for record in noise] == [
            {"generator": "seeded", "seed": 7, "after": []},
            {"generator": "seeded", "seed": 7, "after": ["features.2"]},
        ]
    else:
        assert noise == [None, None]


def test_a_family_store_is_analysed_with_the_presets_that_apply(family_stores) -> None:
    store, _run = family_stores["ss-cam"]
    weights = dataset_channel_weights(store, "features", 3, preset="torchcam").compute()
    for row in range(2):
        expected = compose.channel_weights(select_image(store, row), "features", 3, preset="torchcam").values[0]
        np.testing.assert_allclose(weights.values[row], expected, rtol=1e-6, atol=1e-9)
    assert channel_statistics(store, "features", 3, preset="paper").sizes["channel"] == 16
    with pytest.raises(ScorecamError, match="'official' preset .*\(SS-CAM, 2 samples"):
        dataset_channel_weights(store, "features", 3, preset="official")


def test_resuming_a_family_store_with_another_family_is_refused(
    client, family_stores, computed_store, image_folder, image_ids
) -> None:
    store, _run = family_stores["ss-cam"]
    paths = [image_folder / image for image in image_ids[:2]]
    others = [
        ({}, "computed with SS-CAM, 2 samples, σ = 1.5, seed 7 .* not Score-CAM .*family='ss-cam', samples=2, std=1.5, seed=7"),
        ({"family": "ss-cam", "samples": 3, "std": 1.5, "seed": 7}, "not SS-CAM, 3 samples"),
        ({"family": "ss-cam", "samples": 2, "std": 1.0, "seed": 7}, "σ = 1"),
        ({"family": "ss-cam", "samples": 2, "std": 1.5, "seed": 8}, "seed 8"),
        ({"family": "ss-cam", "samples": 2, "std": 1.5}, "seed 0"),  # a store's default seed is 0, not 7
        ({"family": "is-cam", "samples": 2}, "not IS-CAM, 2 samples"),
    ]
    before = worker_forward_calls(client)
    for options, message in others:
        with pytest.raises(CacheError, match=message):
            compute_dataset(tiny_model, paths, LAYERS, store, client=client, progress=False, **options)
    with pytest.raises(CacheError, match="computed with Score-CAM .* not SS-CAM"):  # and the other way round
        compute_dataset(tiny_model, image_folder, LAYERS, computed_store[0], client=client, progress=False,
                        **FAMILIES["ss-cam"])  # fmt: skip
    run = compute_dataset(tiny_model, paths, LAYERS, store, client=client, progress=False, **FAMILIES["ss-cam"])
    assert run.computed == [] and sorted(run.already_complete) == image_ids[:2]
    assert worker_forward_calls(client) == before


def test_an_ss_cam_store_without_a_seed_draws_from_seed_0(client, image_folder, image_ids, tmp_path) -> None:
    path = image_folder / image_ids[0]
    store = tmp_path / "seed0.zarr"
    options = {"family": "ss-cam", "samples": 2}
    torch.manual_seed(99)  # neither this process's nor the workers' global generator is read
    compute_dataset(tiny_model, [path], ["features"], store, client=client, batch_size=BATCH, progress=False, **options)
    assert cache_sampler(load_cache(store)) == {"name": "ss-cam", "samples": 2, "std": 2.0, "seed": 0}
    reference = compute_cache(tiny_model(), [str(path)], ["features"], batch_size=BATCH, progress=False, seed=0, **options)
    assert_rows_equal_single_caches(store, {image_ids[0]: reference}, ["features"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"family": "ss-cam", "samples": 0}, "samples must be an integer >= 1"),
        ({"family": "ss-cam", "std": -1.0}, "std .* must be a number > 0"),
        ({"family": "ss-cam", "seed": -2}, "seed must be None .* or an integer >= 0"),
        ({"family": "is-cam", "std": 1.0}, "IS-CAM adds no noise"),
        ({"family": "xs-cam"}, "unknown family"),
        ({"samples": 3}, "go with family="),
    ],
)
def test_bad_family_options_are_refused_before_any_cluster(image_folder, tmp_path, options, message) -> None:
    started = time.perf_counter()
    with pytest.raises(ScorecamError, match=message):  # an unreachable scheduler: never asked
        compute_dataset(tiny_model, image_folder, LAYERS, tmp_path / "s.zarr", client="tcp://127.0.0.1:9", **options)
    assert time.perf_counter() - started < 5 and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [(["--family", "ss-cam", "--std", "-1"], "must be a number > 0"), (["--family", "is-cam", "--seed", "3"], "IS-CAM")],
)
def test_the_cli_refuses_bad_family_options_before_any_cluster(image_folder, tmp_path, capsys, arguments, message) -> None:
    argv = ["compute-dataset", "--model", "resnet18", "--weights", "none", "--images", str(image_folder),
            "--out", str(tmp_path / "s.zarr"), "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1", *arguments]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Dask scheduler" not in error
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compute-dataset", "--images", "x", "--out", "y", "--samples", "0"])


def test_the_cli_computes_an_is_cam_store(client, tmp_path, capsys) -> None:
    folder = tmp_path / "pictures"
    write_images(folder, 1, size=48)
    store = tmp_path / "cli-is-cam.zarr"
    argv = [
        "compute-dataset", "--model", "mobilenet_v3_small", "--weights", "none", "--images", str(folder),
        "--layer", "features.1", "--out", str(store), "--scheduler", client.scheduler.address,
        "--batch-size", "8", "--family", "is-cam", "--samples", "2", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "1 image(s) computed" in capsys.readouterr().out
    cache = load_cache(store)
    assert cache_sampler(cache) == {"name": "is-cam", "samples": 2} and cache.attrs["family"] == "is-cam"
    assert main(argv[:-5] + ["--no-progress"]) == 2  # resumed as Score-CAM: refused
    assert "computed with IS-CAM, 2 samples" in capsys.readouterr().err


@pytest.mark.parametrize(
    "factory, family",
    [(tiny_vit, {}), (tiny_vit, FAMILIES["ss-cam"]), (tiny_swin, {}), (tiny_swin, FAMILIES["is-cam"])],
    ids=["vit", "vit-ss-cam", "swin", "swin-is-cam"],
)
def test_transformer_stores_equal_compute_cache(client, image_folder, image_ids, tmp_path, factory, family) -> None:
    """torchvision's ViT (tokens) and Swin (channels-last) through the store: each image's row
    equals compute_cache on that image, at the model's default layer, its layout recorded."""
    paths = [image_folder / image for image in image_ids[:2]]
    store = tmp_path / "transformer.zarr"
    run = compute_dataset(factory, paths, None, store, client=client, batch_size=BATCH, progress=False, **family)
    assert run.computed == image_ids[:2]
    model = factory()
    layer = model.default_layer
    references = {
        image: compute_cache(model, [str(image_folder / image)], None, batch_size=BATCH, progress=False, **family)
        for image in image_ids[:2]
    }
    assert_rows_equal_single_caches(store, references, [layer], same_passes=False)
    cache = load_cache(store)
    assert json.loads(cache.attrs["layers"]) == [layer]
    assert cache[layer].attrs.get("layout") == model.layout_for(layer).name != "nchw"
    assert cache[layer]["activation"].shape == (2, *references[image_ids[0]][layer]["activation"].shape[1:])


def test_a_worker_killed_mid_run_loses_no_image(client, image_folder, image_ids, references, tmp_path) -> None:
    marker = tmp_path / "die-once"
    marker.touch()
    factory = functools.partial(sabotaged_model, str(marker), "exit")
    store = tmp_path / "killed.zarr"
    started = time.perf_counter()
    run = compute_dataset(factory, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    assert len(list(tmp_path.glob("die-once.claimed-*"))) == 1  # a worker process did exit
    assert sorted(run.computed + run.already_complete) == image_ids
    assert_store_equals(store, references, image_ids)
    assert time.perf_counter() - started < 120
    client.wait_for_workers(2, timeout=120)  # the nanny restarts it


# ---- without a cluster -------------------------------------------------------------------


def test_an_unreachable_scheduler_fails_fast_and_clearly(image_folder, tmp_path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    expected = f"could not reach the Dask scheduler at 'tcp://127.0.0.1:{port}' within 2 s"
    with pytest.raises(ScorecamError, match=expected):
        compute_dataset(
            tiny_model, image_folder, LAYERS, tmp_path / "s.zarr", client=f"tcp://127.0.0.1:{port}", connect_timeout=2
        )
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "s.zarr").exists()


def test_the_cli_reports_an_unreachable_scheduler_in_one_line(image_folder, tmp_path, capsys) -> None:
    argv = ["compute-dataset", "--model", "resnet18", "--weights", "none", "--images", str(image_folder),
            "--out", str(tmp_path / "s.zarr"), "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1"]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("scorecam-explorer: error: could not reach the Dask scheduler") and "\n" not in error


def test_the_cli_defaults_to_the_default_model_and_layer(tmp_path) -> None:
    args = build_parser().parse_args(["compute-dataset", "--images", str(tmp_path), "--out", str(tmp_path / "s.zarr")])
    assert args.model == DEFAULT_MODEL and args.layer is None and args.scheduler == "local"
    assert args.convention == "paper" and args.batch_size is None


def test_bad_paths_and_factories_are_refused_before_any_work(image_folder, tmp_path, references, image_ids) -> None:
    with pytest.raises(ImageLoadError, match="no image folder or file"):
        compute_dataset(tiny_model, tmp_path / "missing", LAYERS, tmp_path / "a.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="no image files"):
        compute_dataset(tiny_model, tmp_path / "empty", LAYERS, tmp_path / "a.zarr")
    with pytest.raises(ScorecamError, match="callable"):
        compute_dataset(tiny_model(), image_folder, LAYERS, tmp_path / "a.zarr")
    (tmp_path / "not-a-store").mkdir()
    with pytest.raises(CacheError, match="not a scorecam_explorer dataset store"):
        compute_dataset(tiny_model, image_folder, LAYERS, tmp_path / "not-a-store")
    single = save_cache(references[image_ids[0]], tmp_path / "single.zarr")
    with pytest.raises(CacheError, match="single-image cache"):
        compute_dataset(tiny_model, image_folder, LAYERS, single)
    with pytest.raises(ScorecamError, match="precision"):
        compute_dataset(tiny_model, image_folder, LAYERS, tmp_path / "a.zarr", precision="float16")
    with pytest.raises(ScorecamError, match="tune_allocator"):
        compute_dataset(tiny_model, image_folder, LAYERS, tmp_path / "a.zarr", tune_allocator="yes")


def test_a_worker_whose_factory_builds_other_weights_refuses_to_write(computed_store, image_folder, image_ids) -> None:
    """Called in this process as a worker would: a factory must build the same weights everywhere."""
    store, _run = computed_store
    group = zarr.open_group(str(store), mode="r+")
    group["complete"][0] = False
    try:
        with pytest.raises(CacheError, match="same model every time"):
            _compute_image(
                functools.partial(tiny_model, seed=7), "other-key", str(image_folder / image_ids[0]), image_ids[0], 0,
                str(store), LAYERS, get_convention("paper"), "float32", BATCH, "cpu",
            )  # fmt: skip
    finally:
        group["complete"][0] = True


def test_tiny_models_count_their_forward_passes() -> None:
    model = tiny_model()
    before = _tiny_models.FORWARD_CALLS
    model.module(torch.zeros(2, 3, 32, 32))
    assert _tiny_models.FORWARD_CALLS == before + 1
