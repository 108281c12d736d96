"""`scorecam-explorer app --images DIR|samples` and `app --dataset STORE.zarr`: the pictures a
set holds, its errors, computing / reusing its cache with progress per layer and picture, and
serving a dataset store lazily (only complete rows, only the chunks a panel shows)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from _tiny_models import tiny_model, write_images

from scorecam_explorer import cli, webapp
from scorecam_explorer.cache import load_cache, save_cache
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError, ImageLoadError, ScorecamError
from scorecam_explorer.images import sample_names
from scorecam_explorer.serving import page as app_page_module
from scorecam_explorer.serving.options import ServeOptions
from scorecam_explorer.serving.status import AppStatus, read_status, write_status

N_PICTURES = 3


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three pictures written in reverse name order, a text file and a sub-folder beside them."""
    pictures = tmp_path / "pictures"
    write_images(pictures, N_PICTURES)
    (pictures / "notes.txt").write_text("not a picture")
    (pictures / "nested").mkdir()
    write_images(pictures / "nested", 1)
    return pictures


def quiet(_message: str) -> None:
    pass


def prepare(**options):
    options.setdefault("model_name", "tiny")
    options.setdefault("progress", False)
    return webapp.prepare_cache(log=quiet, **options)


# ---- which pictures ----------------------------------------------------------------------


def test_a_folder_gives_its_image_files_sorted_and_samples_every_bundled_photo(folder) -> None:
    expected = sorted(path.name for path in folder.iterdir() if path.suffix == ".png")
    assert [Path(source).name for source in webapp.picture_set(folder)] == expected
    assert len(expected) == N_PICTURES  # not the text file, not the sub-folder's picture
    samples = webapp.picture_set("samples")
    assert samples == [f"sample:{name}" for name in sample_names()] and len(samples) >= 12


def test_a_missing_or_empty_folder_or_a_file_is_refused_with_its_name(tmp_path, folder) -> None:
    with pytest.raises(ImageLoadError, match=r"image folder not found: .*nowhere.*'samples'"):
        webapp.picture_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match=r"no image files in .*empty"):
        webapp.picture_set(tmp_path / "empty")
    picture = next(folder.glob("*.png"))
    with pytest.raises(ImageLoadError, match=rf"is a file; for one picture use --image .*{picture.name}"):
        webapp.picture_set(picture)


def test_an_unreadable_picture_is_named_before_the_model_loads(tiny_models, folder, tmp_path) -> None:
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match=r"not a readable image: .*broken\.jpg.*remove or replace that file"):
        prepare(images=folder, cache_path=tmp_path / "set.zarr")
    assert tiny_models == [] and not (tmp_path / "set.zarr").exists()


def test_one_picture_or_a_set_not_both(tiny_models, folder) -> None:
    with pytest.raises(ScorecamError, match="--image.*--images.*not both"):
        prepare(image="sample:chelsea", images=folder)
    with pytest.raises(SystemExit):
        cli.main(["app", "--image", "sample:chelsea", "--images", str(folder)])
    with pytest.raises(SystemExit):
        cli.main(["app", "--images", str(folder), "--dataset", str(folder)])


# ---- computing and reusing a set's cache -------------------------------------------------


def test_a_set_is_computed_at_the_default_layer_as_compute_cache_would(tiny_models, cache_home, folder) -> None:
    prepared = prepare(images=folder)
    assert prepared.status == "computed" and prepared.layers == [tiny_model().default_layer] == ["features"]
    assert prepared.path.parent == cache_home and "-pictures-3images-" in prepared.path.name
    cache = load_cache(prepared.path)
    paths = sorted(folder.glob("*.png"))
    assert list(cache["image"].values) == [path.name for path in paths]
    reference = compute_cache(tiny_model(), [str(path) for path in paths], ["features"], progress=False)
    np.testing.assert_allclose(
        cache["features"]["masked_logits"].values, reference["features"]["masked_logits"].values, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(cache["picture"].values, reference["picture"].values)


def test_a_set_is_reused_when_it_matches_and_never_for_other_pictures(tiny_models, cache_home, folder, tmp_path) -> None:
    first = prepare(images=folder)
    again = prepare(images=folder)
    assert again.status == "reused" and again.path == first.path
    extended = prepare(images=folder, layers=["features.1", "features"])
    assert extended.status == "extended" and extended.layers == ["features.1", "features"]
    # a picture changed: another default path, computed afresh; at the same path: refused
    changed = sorted(folder.glob("*.png"))[1]
    shutil.copy(sorted(folder.glob("*.png"))[0], changed)
    assert prepare(images=folder).path != first.path
    with pytest.raises(CacheError, match=rf"picture {changed.name} differs.*--recompute"):
        prepare(images=folder, cache_path=first.path)
    # a picture added: refused at that path
    shutil.copy(changed, folder / "zz-extra.png")
    with pytest.raises(CacheError, match="other pictures.*4 given.*--recompute"):
        prepare(images=folder, cache_path=first.path)


def test_samples_hold_every_bundled_photo(tiny_models, tmp_path) -> None:
    prepared = prepare(images="samples", cache_path=tmp_path / "samples.zarr")
    cache = load_cache(prepared.path)
    assert list(cache["image"].values) == [f"sample:{name}" for name in sample_names()]
    assert cache.sizes["image"] >= 12


def test_progress_says_layer_k_of_n_and_image_i_of_m(tiny_models, folder, tmp_path) -> None:
    statuses: list[AppStatus] = []
    lines: list[str] = []
    webapp.prepare_cache(
        model_name="tiny", images=folder, layers=["features.1", "features"], cache_path=tmp_path / "set.zarr",
        progress=False, log=lines.append, report=statuses.append,
    )
    computing = [status for status in statuses if status.state == "computing"]
    # (layer, picture) as said, in order; a batch of masked inputs may span pictures, so one may be skipped
    said = [(status.step, status.message.split(" (")[0]) for status in computing]
    layers = ["features.1", "features"]
    parsed = [(step, layers.index(text.split(",")[0]), int(text.split("image ")[1].split(" of")[0])) for step, text in said]
    assert all(step == layer for step, layer, _ in parsed) and {step for step, _, _ in parsed} == {0, 1}
    assert parsed == sorted(parsed) and all(f"of {N_PICTURES}" in text for _, text in said)
    assert said[0] == (0, f"features.1, image 1 of {N_PICTURES}") and said[-1] == (1, f"features, image {N_PICTURES} of {N_PICTURES}")
    assert computing[-1].done == computing[-1].total and computing[-1].fraction == 1.0
    channels = {info.name: info.channels for info in tiny_model().layers(listed_only=False)}
    passes = N_PICTURES * (channels["features.1"] + channels["features"])
    assert any(f"at most {passes:,} masked forward passes" in line for line in lines)  # said up front


def test_the_picture_of_each_count_is_found_as_counting_channel_by_channel() -> None:
    """The reporter's arithmetic against a plain enumeration: layer after layer, picture after
    picture, channel after channel."""
    sizes = {"a": 3, "b": 5}
    model = SimpleNamespace(layers=lambda listed_only=False: [SimpleNamespace(name=n, channels=c) for n, c in sizes.items()])
    m = 4
    walk = [(step, image) for step, layer in enumerate(sizes) for image in range(m) for _ in range(sizes[layer])]
    total = len(walk)
    for scale in (1, 3):  # the engine may count several masked inputs per channel (a family's samples)
        statuses: list[AppStatus] = []
        on_progress = webapp.progress_reporter(statuses.append, model, list(sizes), n_images=m)
        for done in range(total * scale):
            statuses.clear()
            on_progress(done, total * scale)
            if statuses:
                step, image = walk[done // scale]
                assert (statuses[-1].step, statuses[-1].message.split(" (")[0]) == (step, f"{list(sizes)[step]}, image {image + 1} of {m}")


# ---- the command ---------------------------------------------------------------------------


class FakeServer:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.statuses: list[AppStatus] = []
        self.expected: list[Path | None] = []
        self.prepared: list[webapp.PreparedCache] = []

    def expect(self, candidate, **kwargs) -> None:
        self.expected.append(candidate)

    def report(self, status) -> None:
        self.statuses.append(status)

    def ready(self, prepared, **kwargs) -> None:
        self.prepared.append(prepared)
        self.statuses.append(AppStatus("ready", cache=str(prepared.path), model=kwargs.get("model_name") or ""))

    def fail(self, message) -> None:
        self.statuses.append(AppStatus("failed", message))

    def wait(self) -> int:
        return 0


@pytest.fixture
def fake_server(monkeypatch) -> list[FakeServer]:
    made: list[FakeServer] = []

    def app_server(options, **kwargs):
        made.append(FakeServer(options))
        return contextlib.nullcontext(made[-1])

    monkeypatch.setattr(webapp, "app_server", app_server)
    return made


def app(*arguments: str) -> int:
    return cli.main(["app", "--no-browser", "--port", str(webapp.free_port()), *arguments])


def test_the_command_computes_a_set_then_recalls_and_reuses_it(tiny_models, cache_home, folder, fake_server, capsys) -> None:
    assert app("--images", str(folder), "--model", "tiny") == 0
    first = fake_server[0].prepared[0]
    assert first.status == "computed" and fake_server[0].expected == [None]
    assert "computing Score-CAM for 3 pictures at features" in capsys.readouterr().out
    assert app("--images", str(folder), "--model", "tiny") == 0
    assert fake_server[1].expected == [first.path.resolve()]  # recalled: pages may open it in advance
    assert fake_server[1].prepared[0].status == "reused"
    assert "reused (weights, convention and pictures match)" in capsys.readouterr().out
    # the single-picture key is another one
    assert webapp.recall_cache(webapp.recent_key(model="tiny", weights=None, image=None, layers=None, convention=None, cache=None)) is None


def test_the_command_refuses_an_empty_folder_before_starting_the_server(tmp_path, fake_server, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert app("--images", str(tmp_path / "empty")) == 2
    assert "no image files in" in capsys.readouterr().err and fake_server == []


# ---- a dataset store ---------------------------------------------------------------------

LAYERS = ["features.2", "features"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A finished dataset store of four pictures from compute_dataset (a local cluster)."""
    import distributed

    from scorecam_explorer.distributed import compute_dataset

    base = tmp_path_factory.mktemp("dataset")
    write_images(base / "pictures", 4)
    path = base / "store.zarr"
    with distributed.LocalCluster(
        processes=True, n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        compute_dataset(tiny_model, base / "pictures", LAYERS, path, client=client, batch_size=8, progress=False)
    return path


@pytest.fixture
def pending_store(store, tmp_path) -> Path:
    """A copy of ``store`` whose rows 1 and 3 are not complete yet (as while it is written)."""
    copy = tmp_path / "pending.zarr"
    shutil.copytree(store, copy)
    flags = zarr.open_array(str(copy / "complete"), mode="r+")
    flags[[1, 3]] = False
    return copy


def test_a_store_is_checked_and_counted_without_reading_its_arrays(store, pending_store) -> None:
    prepared = webapp.prepare_dataset(store, log=quiet, atlas_index=False)
    assert prepared.status == "dataset" and prepared.layers == LAYERS and prepared.tree is None
    assert "4 of 4 images complete" in prepared.notes[0] and "pending" not in prepared.notes[0]
    statuses: list[AppStatus] = []
    lines: list[str] = []
    pending = webapp.prepare_dataset(pending_store, log=lines.append, report=statuses.append, atlas_index=False)
    assert "2 of 4 images complete; 2 pending" in lines[0]
    assert any("2 pending" in status.message for status in statuses)


def test_bad_dataset_paths_are_refused_with_what_to_do(store, tmp_path, capsys, fake_server) -> None:
    with pytest.raises(CacheError, match="no dataset store at .*does not exist"):
        webapp.check_dataset_store(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CacheError, match="is not a dataset store"):
        webapp.check_dataset_store(tmp_path / "folder")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(CacheError, match="is a file, not a dataset store"):
        webapp.check_dataset_store(tmp_path / "file.zarr")
    single = save_cache(compute_cache(tiny_model(), "sample:chelsea", ["features"], progress=False), tmp_path / "one.zarr")
    with pytest.raises(CacheError, match="single cache, not a dataset store: serve it with --cache"):
        webapp.check_dataset_store(single)
    empty = tmp_path / "empty.zarr"
    shutil.copytree(store, empty)
    zarr.open_array(str(empty / "complete"), mode="r+")[:] = False
    with pytest.raises(CacheError, match=r"no complete image yet \(4 pending\)"):
        webapp.check_dataset_store(empty)
    assert app("--dataset", str(tmp_path / "missing.zarr")) == 2 and fake_server == []
    assert app("--dataset", str(store), "--layer", "features") == 2
    assert "--layer cannot be used with it" in capsys.readouterr().err


class ChunkReads:
    """Counts the chunk keys read from local Zarr stores (``layer/variable/c/i/...``)."""

    def __init__(self, monkeypatch) -> None:
        from zarr.storage import LocalStore

        self.keys: list[str] = []
        original = LocalStore.get

        async def get(store, key, *args, **kwargs):
            self.keys.append(key)
            return await original(store, key, *args, **kwargs)

        monkeypatch.setattr(LocalStore, "get", get)

    def take(self) -> Counter:
        chunks = Counter(key for key in self.keys if "/c/" in key)
        self.keys.clear()
        return chunks


def rows_read(chunks: Counter, variables: tuple[str, ...]) -> set[int]:
    """The image rows of ``variables`` whose chunks were read (one image per chunk)."""
    rows = set()
    for key in chunks:
        name, _, index = key.partition("/c/")
        if name in variables:
            rows.add(int(index.split("/")[0]))
    return rows


PER_IMAGE = tuple(f"{layer}/{name}" for layer in LAYERS for name in ("activation", "masked_logits", "constant")) + ("picture", "input")


def test_the_explorer_of_a_store_reads_only_the_picture_it_shows(pending_store, monkeypatch) -> None:
    import dask.array

    reads = ChunkReads(monkeypatch)
    tree, note = webapp.open_for_app(pending_store)
    assert "2 of 4 images complete; 2 pending" in note
    assert list(tree["image"].values) == [f"image-0{i}.png" for i in (0, 2)]  # the complete rows only
    for layer in LAYERS:
        for name in ("activation", "masked_logits", "constant"):
            assert isinstance(tree[layer][name].data, dask.array.Array)
    assert rows_read(reads.take(), PER_IMAGE) == set()  # opening reads no picture and no layer array

    explorer = app_page_module.explorer_of(tree, note, spec=app_page_module.ModelSpec("", "none"))
    assert not explorer.model.available  # a store has no model attached
    assert explorer.controls.image.layout.display != "none" and [o[0] for o in explorer.controls.image.options] == [
        "image-00.png", "image-02.png"
    ]
    assert rows_read(reads.take(), PER_IMAGE) == {0}  # store row 0: the picture shown (no atlas index: no scan)
    assert explorer.atlas.deferred.layout.display is None  # the Atlas waits for its button
    explorer.state.update(image=1)
    assert rows_read(reads.take(), PER_IMAGE) == {2}  # store row 2 is the second complete picture
    children = app_page_module.shown(explorer)
    assert len(children) == 2 and "2 pending" in children[0].value and children[1] is explorer.widget


def test_the_app_builds_the_atlas_index_so_pages_read_only_what_they_show(pending_store, monkeypatch) -> None:
    """prepare_dataset builds the atlas index (the one full read); a page then reads the
    masked outputs of the picture it shows only, and the Atlas's thumbnails' rows."""
    statuses: list[AppStatus] = []
    prepared = webapp.prepare_dataset(pending_store, log=quiet, report=statuses.append)
    assert any(status.state == "computing" and "Atlas index" in status.message for status in statuses)
    assert any("atlas index built" in note for note in prepared.notes)
    again = webapp.prepare_dataset(pending_store, log=quiet)  # fresh now: nothing rebuilt
    assert not any("atlas index" in note for note in again.notes)

    reads = ChunkReads(monkeypatch)
    tree, note = webapp.open_for_app(pending_store)
    explorer = app_page_module.explorer_of(tree, note, spec=app_page_module.ModelSpec("", "none"))
    assert explorer.atlas.deferred.layout.display == "none"  # drawn at once, from the index
    chunks = reads.take()
    masked = tuple(f"{layer}/masked_logits" for layer in LAYERS)
    assert rows_read(chunks, masked) == {0}  # the map of the picture shown, nothing for the atlas
    assert rows_read(chunks, PER_IMAGE) <= {0, 2}  # thumbnails: pictures and activations of complete rows


def test_no_atlas_index_needs_a_dataset(capsys) -> None:
    from scorecam_explorer.cli import main

    assert main(["app", "--no-atlas-index", "--no-browser"]) == 2
    assert "--no-atlas-index applies to --dataset only" in capsys.readouterr().err


def test_the_explorer_of_a_store_shows_what_the_store_holds(store) -> None:
    """The lazily opened store gives the maps a loaded copy of its rows gives."""
    from scorecam_explorer.compose import scorecam

    tree, note = webapp.open_for_app(store)
    assert note.endswith("4 of 4 images complete")
    loaded = load_cache(store)
    for image in range(4):
        np.testing.assert_allclose(
            scorecam(tree, "features", None, image=image).values, scorecam(loaded, "features", None, image=image).values,
            rtol=1e-6, atol=1e-7,
        )


def test_the_server_serves_a_store_without_a_snapshot_and_pages_open_it_lazily(store, tmp_path) -> None:
    server = webapp.AppServer(ServeOptions(), open_browser=False)
    try:
        server.ready(webapp.prepare_dataset(store, log=quiet), model_name=None, weights="none")
        status = read_status(server.status_path)
        assert status.state == "ready" and status.snapshot == "" and Path(status.cache) == store.resolve()
        assert not (Path(server.status_path).parent / "cache.pickle").exists()
    finally:
        server.stop()
    page = app_page_module.AppPage()
    path = tmp_path / "status.json"

    async def run() -> None:
        task = asyncio.ensure_future(page.follow(path, poll_seconds=0.01))
        write_status(path, AppStatus("loading", "Opening the dataset store", candidate=str(store)))
        await asyncio.sleep(0.05)
        write_status(path, status)
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert page.explorer is not None and page.explorer.state.image_ids == [f"image-0{i}.png" for i in range(4)]
    assert page.widget.children[-1] is page.explorer.widget and "4 of 4 images complete" in page.widget.children[0].value


def test_the_command_serves_a_store_with_no_model(store, fake_server, capsys) -> None:
    assert app("--dataset", str(store)) == 0
    server = fake_server[0]
    assert server.expected == [store] and server.prepared[0].status == "dataset"
    assert server.statuses[-1].state == "ready" and server.statuses[-1].model == ""
    out = capsys.readouterr().out
    assert "4 of 4 images complete" in out and "lazily" in out
