"""A saved cache is explored where torch cannot be imported.

The child process sets ``sys.modules["torch"] = None`` (so any ``import torch`` raises)
before importing the package, loads a cache written by ``save_cache``, recomposes maps with
every preset, asks the channel atlas its three questions and writes a PNG with the ``map`` command's code; the parent checks the maps
against the same calls made here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from scorecam_explorer import compose
from scorecam_explorer.cache import LayerArrays, build_cache, load_cache, save_cache
from scorecam_explorer.conventions import MASK_CONVENTIONS
from scorecam_explorer.presets import PRESETS

CHILD = textwrap.dedent(
    """
    import sys
    for blocked in ("torch", "torchvision"):
        sys.modules[blocked] = None  # `import torch` now raises ImportError

    import argparse
    import numpy as np
    import scorecam_explorer
    from scorecam_explorer.cache import load_cache
    from scorecam_explorer.commands import map as map_command

    cache_path, results_path, png_path = sys.argv[1:4]
    cache = load_cache(cache_path)
    results = {}
    for preset in scorecam_explorer.PRESETS:
        for resolution in ("input", "feature"):
            results[f"{preset}-{resolution}"] = scorecam_explorer.scorecam(
                cache, "block", "Espresso", preset=preset, resolution=resolution
            ).values
        results[f"{preset}-share"] = scorecam_explorer.channel_contributions(cache, "block", 1, preset=preset)[
            "share"
        ].values
    top = scorecam_explorer.top_channels_by_variance(cache, "block", 3)
    results["faster"] = scorecam_explorer.scorecam(cache, "block", 0, channels=top, top_k=2).values
    results["atlas-examples"] = scorecam_explorer.channel_examples(cache, "block", 2, k=2)["mask"].values
    results["atlas-profile"] = scorecam_explorer.channel_profile(cache, "block", 2)["weight_mean"].values
    results["atlas-channels"] = scorecam_explorer.class_channels(cache, "block", "cup", k=3)["channel"].values
    np.savez(results_path, **results)

    parser = argparse.ArgumentParser()
    map_command.register(parser.add_subparsers())
    args = parser.parse_args(["map", cache_path, "--image", "img1", "--preset", "official", "--out", png_path])
    assert args.func(args) == 0
    assert sys.modules["torch"] is None and sys.modules["torchvision"] is None
    print("explored without torch")
    """
)


@pytest.fixture
def saved_cache(tmp_path):
    rng = np.random.default_rng(8)
    n_images, n_channels, n_classes = 2, 6, 5
    layer = LayerArrays(
        activation=rng.normal(size=(n_images, n_channels, 4, 4)).astype(np.float32),
        masked_logits=rng.normal(size=(n_images, n_channels, n_classes)).astype(np.float32),
        constant=np.zeros((n_images, n_channels), dtype=bool),
    )
    cache = build_cache(
        pictures=rng.integers(0, 256, (n_images, 16, 16, 3), dtype=np.uint8),
        inputs=rng.normal(size=(n_images, 3, 16, 16)).astype(np.float32),
        logits=rng.normal(size=(n_images, n_classes)).astype(np.float32),
        baseline_logits=rng.normal(size=(n_images, n_classes)).astype(np.float32),
        image_ids=["img0", "img1"],
        class_names=["tabby", "espresso", "moped", "rocket", "cup"],
        layers={"block": layer},
        model_name="hand-built",
        weights_fingerprint="0" * 16,
        preprocessing=None,
        convention=MASK_CONVENTIONS["paper"],
        dtype="float32",
        device="cpu",
        forward_passes=0,
        seconds=0.0,
    )
    return save_cache(cache, tmp_path / "cache.zarr")


def test_compose_runs_without_torch(saved_cache, tmp_path):
    results_path, png_path = tmp_path / "results.npz", tmp_path / "map.png"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(saved_cache), str(results_path), str(png_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    assert "explored without torch" in child.stdout
    assert png_path.stat().st_size > 0

    cache = load_cache(saved_cache)
    results = np.load(results_path)
    for preset in PRESETS:
        for resolution in ("input", "feature"):
            expected = compose.scorecam(cache, "block", 1, preset=preset, resolution=resolution)
            np.testing.assert_array_equal(results[f"{preset}-{resolution}"], expected.values)
        shares = compose.channel_contributions(cache, "block", 1, preset=preset)["share"]
        np.testing.assert_array_equal(results[f"{preset}-share"], shares.values)
    top = compose.top_channels_by_variance(cache, "block", 3)
    np.testing.assert_array_equal(results["faster"], compose.scorecam(cache, "block", 0, channels=top, top_k=2).values)
    from scorecam_explorer import atlas

    np.testing.assert_array_equal(results["atlas-examples"], atlas.channel_examples(cache, "block", 2, k=2)["mask"].values)
    np.testing.assert_array_equal(results["atlas-profile"], atlas.channel_profile(cache, "block", 2)["weight_mean"].values)
    np.testing.assert_array_equal(results["atlas-channels"], atlas.class_channels(cache, "block", "cup", k=3)["channel"].values)
