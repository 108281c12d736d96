"""``scorecam-explorer compute``: computes, saves, summarises; user errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scorecam_explorer.cache import load_cache
from scorecam_explorer.cli import main

# A small torchvision model with random weights and a 16-channel early layer: fast everywhere.
MODEL = ["--model", "mobilenet_v3_small", "--weights", "none"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compute_saves_a_cache_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cache.zarr"
    status = main(
        ["compute", *MODEL, "--image", "sample:chelsea", "--image", "sample:coffee", "--layer", "features.0",
         "--convention", "torchcam", "--batch-size", "8", "--no-progress", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    cache = load_cache(out)
    assert list(cache["image"].values) == ["sample:chelsea", "sample:coffee"]
    assert json.loads(cache.attrs["layers"]) == ["features.0"]
    assert json.loads(cache.attrs["mask_convention"])["name"] == "torchcam"
    assert cache.attrs["model_name"] == "mobilenet_v3_small"
    constant = cache["features.0"]["constant"].values.sum(axis=1)
    assert "features.0: 16 channels" in captured.out
    assert f"constant per image: {constant[0]}, {constant[1]}" in captured.out
    assert f"{cache.attrs['forward_passes']} forward passes" in captured.out
    assert str(out) in captured.out
    assert captured.err == ""  # --no-progress: no bar


def test_bfloat16(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    status = main(
        ["compute", *MODEL, "--image", "sample:rocket", "--layer", "features.0", "--precision", "bfloat16",
         "--no-progress", "--out", str(out)]
    )
    assert status == 0, capsys.readouterr().err
    cache = load_cache(out)
    assert cache.attrs["dtype"] == "bfloat16"
    assert np.isfinite(cache["features.0"]["masked_logits"].values).all()


def test_layer_omitted_means_the_models_default(tmp_path, capsys, monkeypatch):
    from scorecam_explorer import engine
    from scorecam_explorer.errors import ScorecamError

    def record(model, images, layers, **options):
        raise ScorecamError(f"called with layers={layers!r} on {model.default_layer}")

    monkeypatch.setattr(engine, "compute_cache", record)
    status = main(["compute", *MODEL, "--image", "sample:chelsea", "--out", str(tmp_path / "c.zarr")])
    assert status == 2
    assert "called with layers=None on " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--image", "missing.jpg"], "image file not found"),
        (["--image", "sample:chelsea", "--layer", "featurs.0"], "featurs.0"),
        (["--image", "sample:chelsea", "--layer", "features.0", "--device", "tpu"], "device"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, arguments, message):
    status = main(["compute", *MODEL, *arguments, "--no-progress", "--out", str(tmp_path / "c.zarr")])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "c.zarr").exists()


def test_existing_output_is_refused_before_computing(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    out.mkdir()
    status = main(["compute", *MODEL, "--image", "sample:chelsea", "--layer", "features.0", "--out", str(out)])
    assert status == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unknown_convention_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["compute", "--image", "sample:chelsea", "--convention", "gradcam", "--out", str(tmp_path / "c.zarr")])
    assert caught.value.code == 2
    assert "invalid choice: 'gradcam'" in capsys.readouterr().err
