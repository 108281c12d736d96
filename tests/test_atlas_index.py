"""The atlas index: the same answers as the scan, never used when stale or damaged, invisible to the store.

The store is made by ``compute_dataset`` on an in-process Dask cluster (threads, one worker)
with the tiny model; the reference answers are the atlas' scan of the same store loaded into
memory as a plain cache (the scan itself is checked against compose's per-image weights in
``test_atlas.py``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from _tiny_models import tiny_model, write_images
from scorecam_explorer import atlas_index
from scorecam_explorer.atlas import atlas_tables, channel_examples, channel_profile, class_channels
from scorecam_explorer.atlas_index import build_atlas_index, index_folder, index_status, plan_atlas_index
from scorecam_explorer.cache import load_cache, validate_cache
from scorecam_explorer.cli import main
from scorecam_explorer.dataset_store import open_dataset, opened_from, select_image
from scorecam_explorer.distributed import compute_dataset
from scorecam_explorer.errors import ScorecamError, UnknownLayerError
from scorecam_explorer.presets import PaperPreset

distributed = pytest.importorskip("distributed")

LAYERS = ["features.2", "features"]
LAYER = "features"
N_IMAGES = 6
BATCH = 8


@pytest.fixture(scope="module")
def client():
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, N_IMAGES)
    return folder


@pytest.fixture(scope="module")
def finished(client, image_folder, tmp_path_factory) -> Path:
    """A finished store, never changed by a test (copy it first)."""
    store = tmp_path_factory.mktemp("finished") / "set.zarr"
    compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    return store


@pytest.fixture(scope="module")
def cache(finished) -> xr.DataTree:
    """The reference data: the finished store read into memory, a plain cache (never indexed)."""
    return load_cache(finished)


@pytest.fixture
def store(finished, tmp_path) -> Path:
    copy = tmp_path / "set.zarr"
    shutil.copytree(finished, copy)
    return copy


def unfinish(store: Path, rows: list[int]) -> None:
    """Mark rows not complete, as an interrupted run leaves them (the resume recomputes them)."""
    flags = zarr.open_group(str(store), mode="r+", zarr_format=3)["complete"]
    for row in rows:
        flags[row] = False


def partly(cache: xr.DataTree, done: list[int]) -> xr.DataTree:
    """The in-memory reference with only rows ``done`` complete (the rest pending)."""
    flags = np.isin(np.arange(cache.sizes["image"]), done)
    partial = cache.copy()
    partial.dataset = partial.dataset.assign(complete=("image", flags))
    return partial


def questions(data, layer: str = LAYER, preset: str = "paper") -> dict[str, xr.Dataset]:
    return {
        "tables": atlas_tables(data, layer, preset=preset),
        "examples": channel_examples(data, layer, 3, k=4, preset=preset),
        "examples by activation": channel_examples(data, layer, 5, by="activation", k=6, preset=preset),
        "profile": channel_profile(data, layer, 2, preset=preset),
        "class channels": class_channels(data, layer, 1, k=5, preset=preset),
    }


def assert_same_answers(answers: dict[str, xr.Dataset], references: dict[str, xr.Dataset], source: str) -> None:
    for name, answer in answers.items():
        assert answer.attrs["source"] == source, name
        reference = references[name].copy()
        reference.attrs = {**reference.attrs, "source": source}
        xr.testing.assert_identical(answer, reference)


def test_the_index_answers_as_the_scan_for_a_path_and_an_opened_tree(store, cache) -> None:
    assert index_status(store, LAYER) == "missing"
    folders = build_atlas_index(store, presets=["paper", "torchcam"], progress=False)
    assert sorted(f.relative_to(index_folder(store)).as_posix() for f in folders) == sorted(
        f"{layer}/{preset}" for layer in LAYERS for preset in ("paper", "torchcam")
    )
    for layer in LAYERS:
        for preset in ("paper", "torchcam"):
            references = questions(cache, layer, preset)
            assert all(answer.attrs["source"] == "scan" for answer in references.values())
            assert_same_answers(questions(store, layer, preset), references, "index")
            assert_same_answers(questions(open_dataset(store), layer, preset), references, "index")
    # The stored arrays themselves: channel-major, equal to the scan's tables.
    stored = np.load(index_folder(store) / LAYER / "paper" / "own_weight.npy")
    np.testing.assert_array_equal(stored, atlas_tables(cache, LAYER)["own_weight"].values.T)
    assert index_status(open_dataset(store), LAYER, "torchcam") == "fresh"


def test_a_chosen_class_is_always_scanned(store, cache) -> None:
    build_atlas_index(store, layers=LAYER, progress=False)
    answer = channel_examples(store, LAYER, 4, target=2, k=3)
    assert answer.attrs["source"] == "scan"
    xr.testing.assert_identical(answer, channel_examples(cache, LAYER, 4, target=2, k=3))


def test_rows_completed_after_the_build_make_the_index_stale(client, store, cache, image_folder) -> None:
    unfinish(store, [1, 4])
    done = [0, 2, 3, 5]
    build_atlas_index(store, layers=LAYER, progress=False)
    opened_before = open_dataset(store)
    assert_same_answers(questions(store), questions(partly(cache, done)), "index")
    compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
    assert index_status(store, LAYER) == "stale"
    assert_same_answers(questions(store), questions(cache), "scan")
    assert_same_answers(questions(open_dataset(store)), questions(cache), "scan")
    # A tree opened before holds the four rows the index was built from (complete_only: no
    # pending rows): still answered by it.
    assert_same_answers(questions(opened_before), questions(cache.isel(image=done)), "index")
    build_atlas_index(store, layers=LAYER, progress=False)
    assert index_status(store, LAYER) == "fresh"
    assert_same_answers(questions(store), questions(cache), "index")


def test_other_complete_rows_without_a_new_run_record_are_seen(store, cache) -> None:
    """Freshness compares the complete images themselves, not only their number or the
    store's attributes: here as many rows are complete as when the index was built."""
    unfinish(store, [2])
    build_atlas_index(store, layers=LAYER, progress=False)
    flags = zarr.open_group(str(store), mode="r+", zarr_format=3)["complete"]
    flags[2], flags[4] = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stale is not damaged: no warning
        assert index_status(store, LAYER) == "stale"
        assert_same_answers(questions(store), questions(partly(cache, [0, 1, 2, 3, 5])), "scan")


def test_other_store_attributes_make_the_index_stale(store) -> None:
    build_atlas_index(store, layers=LAYER, progress=False)
    group = zarr.open_group(str(store), mode="r+", zarr_format=3)
    group.attrs["runs"] = json.dumps([*json.loads(group.attrs["runs"]), {"computed": 0}])
    assert index_status(store, LAYER) == "stale"
    assert channel_profile(store, LAYER, 0).attrs["source"] == "scan"


def test_another_preset_or_a_changed_tree_is_scanned(store, cache) -> None:
    build_atlas_index(store, layers=LAYER, progress=False)
    assert index_status(store, LAYER, "torchcam") == "missing"
    assert_same_answers(questions(store, preset="torchcam"), questions(cache, preset="torchcam"), "scan")

    class Unsoftened(PaperPreset):  # the paper's name, other weights
        channel_softmax = False

    mine = Unsoftened()
    assert index_status(store, LAYER, mine) == "missing" and index_status(store, LAYER, "paper") == "fresh"
    answer = class_channels(store, LAYER, 1, k=5, preset=mine)
    assert answer.attrs["source"] == "scan"
    xr.testing.assert_identical(answer, class_channels(cache, LAYER, 1, k=5, preset=mine))

    tree = open_dataset(store)
    assert opened_from(tree) == store.absolute()
    changed = cache[LAYER]["masked_logits"].values * np.float32(2.0)
    tree[LAYER] = tree[LAYER].to_dataset(inherit=False).assign(masked_logits=tree[LAYER]["masked_logits"].copy(data=changed))
    assert opened_from(tree) is None and index_status(tree, LAYER) == "missing"
    doubled = cache.copy(deep=True)
    doubled[LAYER] = doubled[LAYER].to_dataset(inherit=False).assign(masked_logits=doubled[LAYER]["masked_logits"] * np.float32(2.0))
    assert_same_answers(questions(tree), questions(doubled), "scan")
    assert opened_from(open_dataset(store).isel(image=[0, 1])) is None


@pytest.mark.parametrize("damage", ["truncated array", "garbage manifest", "no manifest", "wrong shape"])
def test_a_damaged_index_is_ignored_with_a_warning_and_rebuilt_by_the_cli(store, cache, damage, capsys) -> None:
    folder = build_atlas_index(store, layers=LAYER, progress=False)[0]
    if damage == "truncated array":
        path = folder / "own_weight.npy"
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage manifest":
        (folder / "manifest.json").write_text("{not json")
    elif damage == "no manifest":  # a folder copied in half, say
        (folder / "manifest.json").unlink()
    else:
        np.save(folder / "constant.npy", np.zeros((2, 2), dtype=bool))
    with pytest.warns(UserWarning, match="damaged"):
        answers = questions(store)
    assert_same_answers(answers, questions(cache), "scan")
    with pytest.warns(UserWarning, match="atlas-index"):
        assert index_status(store, LAYER) == "stale"
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["atlas-index", str(store), "--layer", LAYER, "--no-progress"]) == 0
    assert "1 index(es) written" in capsys.readouterr().out
    assert index_status(store, LAYER) == "fresh"
    assert_same_answers(questions(store), questions(cache), "index")


def test_a_half_written_index_is_never_read_and_a_failed_build_keeps_the_old_one(store, cache, monkeypatch) -> None:
    # A build killed before its rename leaves only a hidden partial folder: no index.
    partial = index_folder(store) / LAYER / ".paper.partial-0000"
    partial.mkdir(parents=True)
    np.save(partial / "own_weight.npy", np.zeros(3))
    assert index_status(store, LAYER) == "missing"
    assert channel_profile(store, LAYER, 1).attrs["source"] == "scan"
    folder = build_atlas_index(store, layers=LAYER, progress=False)[0]
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def failing_save(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atlas_index.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build_atlas_index(store, layers=LAYER, progress=False, rebuild=True)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert sorted(path.name for path in folder.parent.iterdir()) == [".paper.partial-0000", "paper"]
    assert_same_answers(questions(store), questions(cache), "index")


def test_progress_and_what_is_kept(store) -> None:
    calls: list[tuple[int, int]] = []
    plan = plan_atlas_index(store, presets=["paper", "official"])
    assert plan.images == N_IMAGES and plan.pending == 0 and plan.work == {layer: ["paper", "official"] for layer in LAYERS}
    build_atlas_index(store, presets=["paper", "official"], progress=False, on_progress=lambda *call: calls.append(call))
    total = N_IMAGES * len(LAYERS)  # one scan per layer serves both presets
    assert calls == [(done, total) for done in range(1, total + 1)]
    calls.clear()
    build_atlas_index(store, layers=LAYER, progress=False, on_progress=lambda *call: calls.append(call))
    assert calls == []  # fresh: kept
    build_atlas_index(store, layers=LAYER, progress=False, rebuild=True, on_progress=lambda *call: calls.append(call))
    assert calls[-1] == (N_IMAGES, N_IMAGES)


def test_the_cli(store, capsys) -> None:
    unfinish(store, [5])
    assert main(["atlas-index", str(store), "--layer", LAYER, "--preset", "paper", "torchcam", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{N_IMAGES - 1} complete image(s), 1 pending (not indexed)" in out
    assert f"{LAYER}: 16 channels x 10 classes; index paper, torchcam: one scan of 5 x 16 x 10 masked outputs" in out
    assert "2 index(es) written, 0 fresh already" in out
    assert main(["atlas-index", str(store), "--layer", LAYER]) == 0
    assert f"{LAYER}: fresh already" in capsys.readouterr().out
    assert index_status(store, LAYER, "torchcam") == "fresh" and index_status(store, "features.2") == "missing"
    assert main(["atlas-index", str(store), "--layer", "featurse"]) == 2
    assert "layer 'featurse' is not in this data; it holds: features.2, features. Did you mean" in capsys.readouterr().err
    assert main(["atlas-index", str(store), "--preset", "papr"]) == 2
    assert "unknown preset 'papr'" in capsys.readouterr().err
    assert main(["atlas-index", str(store.parent / "absent.zarr")]) == 2
    assert "no dataset store" in capsys.readouterr().err


def test_bad_arguments(store) -> None:
    with pytest.raises(UnknownLayerError, match="features.2"):
        index_status(store, "nope")
    with pytest.raises(ScorecamError, match="unknown preset"):
        index_status(store, LAYER, "nope")
    unfinish(store, list(range(N_IMAGES)))
    with pytest.raises(ScorecamError, match=f"no complete image yet \\({N_IMAGES} pending\\)"):
        build_atlas_index(store, progress=False)


def test_reading_validating_and_resuming_the_store_ignore_the_index(client, store, image_folder) -> None:
    unfinish(store, [3])
    expected_open = open_dataset(store).load()
    expected_row = select_image(store, 2)
    build_atlas_index(store, progress=False)
    assert index_folder(store).is_dir() and not any("atlas" in path.name for path in store.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # zarr warns of any folder in its tree it does not know
        xr.testing.assert_identical(open_dataset(store).load(), expected_open)
        xr.testing.assert_identical(select_image(store, 2), expected_row)
        run = compute_dataset(tiny_model, image_folder, LAYERS, store, client=client, batch_size=BATCH, progress=False)
        assert len(run.computed) == 1 and len(run.already_complete) == N_IMAGES - 1
        validate_cache(load_cache(store))
        assert load_cache(store).sizes["image"] == N_IMAGES
    assert [str(w.message) for w in caught if "atlas" in str(w.message) or "not recognized" in str(w.message)] == []
    assert index_status(store, LAYER) == "stale"


@pytest.mark.slow
def test_the_atlas_benchmark_runs_on_a_small_store() -> None:
    """benchmarks/bench_atlas.py on 12 images: it runs through (open, index, questions, the
    explorer's interactions, the scan) and finds the index's answers identical to the scan's.
    Its exit status also reflects the time targets, which a busy machine may miss: not checked."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_atlas.py"
    result = subprocess.run(
        [sys.executable, str(script), "--images", "12", "--scan-images", "6", "--repeat", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "CPU: " in result.stdout and "the Atlas from the index" in result.stdout
    assert "index answers identical to the scan's on these 6 images: yes" in result.stdout, result.stdout


def test_the_outputs_file_gives_open_dataset_the_same_logits_and_only_for_its_rows(store, cache, monkeypatch) -> None:
    """build_atlas_index saves the complete rows' unmasked and baseline outputs in one file;
    open_dataset reads them from it only while it was written for exactly those rows (else
    from the store, chunk by chunk): the values are the store's either way."""
    from scorecam_explorer import atlas_index as index_module
    from scorecam_explorer.dataset_store import open_dataset

    build_atlas_index(store, progress=False)
    assert (index_module.index_folder(store) / index_module.ROOT_OUTPUTS).is_file()
    used = []
    original = index_module.root_outputs
    monkeypatch.setattr(index_module, "root_outputs", lambda *a, **k: used.append(r := original(*a, **k)) or r)
    for name in ("logits", "baseline_logits"):
        np.testing.assert_array_equal(open_dataset(store)[name].values, cache[name].values)
    assert used and all(found is not None for found in used)  # answered by the file
    unfinish(store, [1])  # other complete rows: the file no longer applies
    used.clear()
    tree = open_dataset(store)
    assert used == [None]
    for name in ("logits", "baseline_logits"):
        np.testing.assert_array_equal(tree[name].values, np.delete(cache[name].values, 1, axis=0))
    whole = open_dataset(store, complete_only=False)  # every row: left lazy, the file not read
    assert whole["logits"].chunks is not None


def test_a_damaged_outputs_file_is_ignored_with_a_warning(store, cache) -> None:
    from scorecam_explorer import atlas_index as index_module
    from scorecam_explorer.dataset_store import open_dataset

    build_atlas_index(store, progress=False)
    (index_module.index_folder(store) / index_module.ROOT_OUTPUTS).write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="damaged"):
        tree = open_dataset(store)
    np.testing.assert_array_equal(tree["logits"].values, cache["logits"].values)
