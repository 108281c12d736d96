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
    assert f"{cache.attrs['forward_passes']} forward passes (model calls: the batches" in captured.out
    # why fewer forward passes than channels: constant channels share the baseline pass, the rest are batched
    assert (
        f"32 masked inputs (channels x images): {constant.sum()} of constant channels (an all-zero mask: "
        f"the one baseline pass per image stands for them), {32 - constant.sum()} forwarded in batches"
    ) in captured.out
    assert str(out) in captured.out
    assert captured.err == ""  # --no-progress: no bar


def test_bfloat16(tmp_path, capsys, native_bfloat16):
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


class _Recorded(Exception):
    """Raised by the stand-in for compute_cache once it has recorded its arguments."""


@pytest.fixture
def recorded(monkeypatch):
    """Replace the model loading and compute_cache with recorders; returns what compute_cache got."""
    from scorecam_explorer import engine
    from scorecam_explorer.commands import compute

    calls: dict = {}

    def record(model, images, layers, **options):
        calls.update(model=model, images=images, layers=layers, options=options)
        raise _Recorded

    monkeypatch.setattr(compute, "model_from_arguments", lambda args: "the model")
    monkeypatch.setattr(engine, "compute_cache", record)
    return calls


def _run_recorded(tmp_path, *arguments: str) -> None:
    with pytest.raises(_Recorded):
        main(["compute", "--image", "sample:chelsea", *arguments, "--out", str(tmp_path / "c.zarr")])


@pytest.mark.parametrize(
    ("arguments", "layers"),
    [
        (["--layer", "blocks.11", "blocks.15"], ["blocks.11", "blocks.15"]),
        (["--layer", "blocks.11", "--layer", "blocks.15"], ["blocks.11", "blocks.15"]),
        (["--layer", "head", "blocks.5", "--layer", "blocks.11"], ["head", "blocks.5", "blocks.11"]),
    ],
)
def test_layers_after_one_flag_or_repeated(tmp_path, recorded, arguments, layers):
    _run_recorded(tmp_path, *arguments)
    assert recorded["layers"] == layers


def test_layer_without_a_name_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["compute", "--image", "sample:chelsea", "--layer", "--out", str(tmp_path / "c.zarr")])
    assert caught.value.code == 2
    assert "--layer" in capsys.readouterr().err


def test_both_layer_forms_compute_each_layer_once(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    status = main(
        ["compute", *MODEL, "--image", "sample:chelsea", "--layer", "features.1", "features.0",
         "--layer", "features.0", "--batch-size", "16", "--no-progress", "--out", str(out)]
    )
    assert status == 0, capsys.readouterr().err
    assert json.loads(load_cache(out).attrs["layers"]) == ["features.0", "features.1"]  # shallow to deep


def test_defaults_reach_compute_cache(tmp_path, recorded):
    _run_recorded(tmp_path)
    assert recorded["model"] == "the model"
    assert recorded["images"] == ["sample:chelsea"]
    assert recorded["layers"] is None
    assert recorded["options"] == {
        "convention": "paper",
        "batch_size": None,
        "device": "auto",
        "progress": True,
        "precision": "float32",
        "tune_allocator": True,
        "adapt_threads": True,
        "fold_batchnorm": True,
        "fuse_pointwise": True,
    }


@pytest.mark.parametrize(
    ("arguments", "option", "value"),
    [
        (["--batch-size", "24"], "batch_size", 24),
        (["--device", "cpu"], "device", "cpu"),
        (["--precision", "bfloat16"], "precision", "bfloat16"),
        (["--no-progress"], "progress", False),
        (["--no-allocator-tuning"], "tune_allocator", False),
        (["--no-adapt-threads"], "adapt_threads", False),
        (["--no-fold-batchnorm"], "fold_batchnorm", False),
        (["--no-fuse"], "fuse_pointwise", False),
        (["--family", "ss-cam"], "family", "ss-cam"),
        (["--family", "is-cam", "--samples", "4"], "samples", 4),
        (["--family", "ss-cam", "--std", "0.5"], "std", 0.5),
        (["--family", "ss-cam", "--seed", "7"], "seed", 7),
    ],
)
def test_each_flag_reaches_compute_cache(tmp_path, recorded, arguments, option, value, native_bfloat16):
    _run_recorded(tmp_path, *arguments)
    assert recorded["options"][option] == value


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: expected a positive whole number, got 0"),
        (["--batch-size", "-8"], "argument --batch-size: expected a positive whole number, got -8"),
        (["--batch-size", "many"], "argument --batch-size: expected a positive whole number, got 'many'"),
        (["--precision", "float16"], "argument --precision: invalid choice: 'float16'"),
    ],
)
def test_bad_values_are_argparse_errors(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as caught:
        main(["compute", "--image", "sample:chelsea", *arguments, "--out", str(tmp_path / "c.zarr")])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_compute_dataset_takes_layers_after_one_flag_or_repeated(tmp_path):
    from scorecam_explorer.cli import build_parser

    args = build_parser().parse_args(
        ["compute-dataset", "--images", str(tmp_path), "--layer", "a", "b", "--layer", "c", "--out", str(tmp_path / "s.zarr")]
    )
    assert args.layer == ["a", "b", "c"]


def test_summary_of_a_family_counts_its_samples():
    from scorecam_explorer.commands.compute import summary

    noisy = summary(100, 30, 40, 1.0, "c.zarr", samples=35, constant_is_free=False)
    assert "30 of constant channels, forwarded too" in noisy and "3500 forwarded in batches (35 per channel)" in noisy
    scaled = summary(100, 30, 40, 1.0, "c.zarr", samples=10, constant_is_free=True)
    assert "700 forwarded in batches (10 per channel)" in scaled


def test_compute_an_is_cam_cache_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "is.zarr"
    status = main(
        ["compute", *MODEL, "--image", "sample:chelsea", "--layer", "features.1", "--family", "is-cam",
         "--samples", "3", "--batch-size", "16", "--no-progress", "--out", str(out)]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    cache = load_cache(out)
    assert json.loads(cache.attrs["mask_sampler"])["name"] == "is-cam"
    assert json.loads(cache.attrs["mask_sampler"])["samples"] == 3
    assert "IS-CAM" in printed.out and "(3 per channel)" in printed.out


def test_an_ss_cam_seed_is_recorded_and_drives_the_noise(tmp_path, capsys):
    """The command's cache equals compute_cache(seed=11) on the same weights, whatever the
    global generator's state: the noise comes from the seed alone."""
    import torch

    from scorecam_explorer import compute_cache, load_model

    out = tmp_path / "seeded.zarr"
    torch.manual_seed(0)  # the random weights the command builds
    status = main(
        ["compute", *MODEL, "--image", "sample:chelsea", "--layer", "features.1", "--family", "ss-cam",
         "--samples", "2", "--seed", "11", "--batch-size", "16", "--no-progress", "--out", str(out)]
    )
    assert status == 0, capsys.readouterr().err
    cache = load_cache(out)
    assert json.loads(cache.attrs["mask_sampler"])["seed"] == 11
    torch.manual_seed(0)
    model = load_model("mobilenet_v3_small", weights=None)
    torch.manual_seed(12345)  # another global state: it must not matter
    expected = compute_cache(model, "sample:chelsea", "features.1", family="ss-cam", samples=2, seed=11, batch_size=16, progress=False)
    np.testing.assert_array_equal(cache["features.1"]["masked_logits"].values, expected["features.1"]["masked_logits"].values)


def test_seed_without_ss_cam_is_refused(tmp_path, capsys):
    status = main(
        ["compute", *MODEL, "--image", "sample:chelsea", "--family", "is-cam", "--seed", "1", "--no-progress",
         "--out", str(tmp_path / "c.zarr")]
    )
    assert status == 2
    assert "seed" in capsys.readouterr().err


def test_std_without_ss_cam_is_refused(tmp_path, capsys):
    status = main(
        ["compute", *MODEL, "--image", "sample:chelsea", "--family", "is-cam", "--std", "1", "--no-progress",
         "--out", str(tmp_path / "c.zarr")]
    )
    assert status == 2
    assert "std" in capsys.readouterr().err


def test_summary_says_why_there_are_fewer_forward_passes_than_channels():
    from scorecam_explorer.commands.compute import summary

    text = summary(1280, 1213, 67, 2.5, "head.zarr")
    assert text.splitlines() == [
        "1280 masked inputs (channels x images): 1213 of constant channels (an all-zero mask: the one baseline "
        "pass per image stands for them), 67 forwarded in batches",
        "67 forward passes (model calls: the batches, plus the unmasked and baseline passes and checks) in 2.5 s; "
        "saved to head.zarr",
    ]


@pytest.mark.parametrize("flag, expected", [([], False), (["--tune-allocator"], True)])
def test_compute_dataset_leaves_the_workers_allocator_alone_unless_asked(tmp_path, monkeypatch, flag, expected):
    from scorecam_explorer import distributed
    from _tiny_models import write_images

    write_images(tmp_path / "pictures", 1)
    seen = {}

    def fake_compute_dataset(*_args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop before any cluster starts

    monkeypatch.setattr(distributed, "compute_dataset", fake_compute_dataset)
    with pytest.raises(SystemExit):
        main(["compute-dataset", "--images", str(tmp_path / "pictures"), "--layer", "head", "--out",
              str(tmp_path / "s.zarr"), *flag])
    assert seen["tune_allocator"] is expected
