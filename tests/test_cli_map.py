"""``scorecam-explorer map``, the PNG overlay and the colour maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from scorecam_explorer import cli
from scorecam_explorer.cache import load_cache, save_cache
from scorecam_explorer.colormaps import COLORMAPS, apply_colormap, colormap_table
from scorecam_explorer.compose import scorecam
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.models import from_module
from scorecam_explorer.overlay import blend, save_overlay, write_atomically

CLASS_NAMES = ["tabby", "tiger cat", "espresso", "moped", "rocket", "crane", "dog", "cup", "tripod", "sky"]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    """A saved cache of a small CNN: two pictures, two layers, 10 named classes."""
    torch.manual_seed(3)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    ).eval()
    loaded = from_module(module, name="small-cnn", input_size=32, class_names=CLASS_NAMES)
    cache = compute_cache(loaded, ["sample:chelsea", "sample:coffee"], ["1", "4"], progress=False, batch_size=16)
    return save_cache(cache, tmp_path_factory.mktemp("caches") / "small.zarr")


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def test_npy_holds_the_composed_map(cache_path, tmp_path):
    out = tmp_path / "map.npy"
    argv = ["map", cache_path, "--layer", "1", "--target", "Tiger Cat", "--preset", "torchcam", "--out", out]
    assert run_cli(*argv) == 0
    expected = scorecam(load_cache(cache_path), "1", "tiger cat", preset="torchcam")
    saved = np.load(out)
    assert saved.dtype == np.float32 and saved.shape == (2, 32, 32)
    np.testing.assert_array_equal(saved, expected.values)


def test_defaults_are_the_deepest_layer_and_the_top1_class(cache_path, tmp_path, capsys):
    out = tmp_path / "default.npy"
    assert run_cli("map", cache_path, "--image", "sample:coffee", "--out", out) == 0
    cache = load_cache(cache_path)
    expected = scorecam(cache, "4", None, image="sample:coffee")
    np.testing.assert_array_equal(np.load(out), expected.values)
    top1 = int(cache["logits"].values[1].argmax())
    assert f"layer 4, class {CLASS_NAMES[top1]} ({top1})" in capsys.readouterr().out


def test_top_k_index_target_image_index_and_feature_resolution(cache_path, tmp_path):
    out = tmp_path / "top.npy"
    argv = ["map", cache_path, "--target", "2", "--top-k", "3", "--image", "1", "--resolution", "feature", "--out", out]
    assert run_cli(*argv) == 0
    expected = scorecam(load_cache(cache_path), "4", 2, top_k=3, image=1, resolution="feature")
    assert expected.shape == (16, 16)
    np.testing.assert_array_equal(np.load(out), expected.values)


def test_png_is_the_overlay_with_a_colour_scale(cache_path, tmp_path):
    out = tmp_path / "map.png"
    assert run_cli("map", cache_path, "--image", "sample:chelsea", "--preset", "official", "--out", out) == 0
    cache = load_cache(cache_path)
    with Image.open(out) as png:
        assert png.format == "PNG"
        written = np.asarray(png.convert("RGB"))
    assert written.shape[0] >= 256 and written.shape[1] > written.shape[0]  # enlarged, with a scale
    # the blended picture (8 px margin, 20 px title row, enlarged 8x to 256 px) is where it should be
    picture = blend(cache["picture"].values[0], scorecam(cache, "4", None, preset="official", image=0).values)
    np.testing.assert_array_equal(written[28 : 28 + 256 : 8, 8 : 8 + 256 : 8], picture)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_png_needs_an_image_when_the_cache_holds_several(cache_path, tmp_path, capsys):
    assert run_cli("map", cache_path, "--out", tmp_path / "x.png") == 2
    error = capsys.readouterr().err
    assert "holds 2 images" in error and "--image" in error and error.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target", "tigr cat"], "Did you mean: tiger cat"),
        (["--target", "10"], "out of range"),
        (["--layer", "5"], "not in this cache"),
        (["--preset", "pytorch_grad_cam"], "Did you mean: pytorch-grad-cam"),
        (["--image", "sample:rocket"], "sample:chelsea"),
        (["--top-k", "0"], "layer 4 has 12 channels; --top-k must be between 1 and 12, not 0."),
        (["--top-k", "99999"], "layer 4 has 12 channels; --top-k must be between 1 and 12, not 99999."),
        (["--layer", "1", "--top-k", "9"], "layer 1 has 8 channels; --top-k must be between 1 and 8, not 9."),
        (["--layer", "7", "--top-k", "9"], "not in this cache"),
    ],
)
def test_bad_arguments_give_one_line(cache_path, tmp_path, capsys, argv, message):
    out = tmp_path / "bad.npy"
    assert run_cli("map", cache_path, *argv, "--out", out) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("scorecam-explorer: error:") and error.count("\n") == 1
    assert not out.exists()


def test_bad_outputs_and_caches_are_refused(cache_path, tmp_path, capsys):
    assert run_cli("map", cache_path, "--out", tmp_path / "map.jpg") == 2
    assert ".png or .npy" in capsys.readouterr().err
    assert run_cli("map", cache_path, "--out", tmp_path / "missing" / "map.npy") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli("map", tmp_path / "nothing.zarr", "--out", tmp_path / "map.npy") == 2
    assert "no cache" in capsys.readouterr().err


# ---- overlay and colour maps -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["jet", "viridis", "turbo", "gray"])
def test_colormaps_match_matplotlib(name):
    matplotlib = pytest.importorskip("matplotlib")
    reference = np.round(matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255)
    table = colormap_table(name).astype(float)
    assert table.shape == (256, 3)
    assert np.abs(table - reference).max() <= 1.0


def test_apply_colormap_and_blend_by_hand():
    values = np.array([[0.0, 0.5], [1.0, 2.0]])
    colours = apply_colormap(values, "gray")
    assert colours[:, :, 0].tolist() == [[0, 128], [255, 255]]  # clipped to [0, 1]
    photo = np.full((2, 2, 3), 100, dtype=np.uint8)
    mixed = blend(photo, values, colormap="gray", alpha=0.25)
    assert mixed[:, :, 1].tolist() == [[75, 107], [139, 139]]  # 0.75 * 100 + 0.25 * colour
    with pytest.raises(ScorecamError, match="NaN"):
        apply_colormap(np.array([np.nan]))
    with pytest.raises(ScorecamError, match="unknown colour map.*viridis"):
        colormap_table("virdis")
    with pytest.raises(ScorecamError, match="2-D"):
        blend(photo, np.zeros((2, 2, 2)))
    assert set(COLORMAPS) == {"jet", "viridis", "turbo", "gray"}


def test_blend_resizes_a_feature_resolution_map():
    photo = np.zeros((8, 8, 3), dtype=np.uint8)
    small = np.array([[0.0, 1.0], [1.0, 0.0]])
    mixed = blend(photo, small, colormap="gray", alpha=1.0)
    assert mixed.shape == (8, 8, 3)
    assert mixed[0, 0, 0] == 0 and mixed[0, 7, 0] == 255


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "map.png"
    save_overlay(target, np.zeros((4, 4, 3), dtype=np.uint8), np.eye(4))
    before = target.read_bytes()

    def broken(file):
        file.write(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, broken)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]
