"""evaluate(): methods x metrics over a folder, the table, the JSON, bad input; the CLI command."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from scorecam_explorer.baselines import gradcam, model_inputs
from scorecam_explorer.cli import main
from scorecam_explorer.errors import ImageLoadError
from scorecam_explorer.evaluation import (
    UnknownMethodError,
    check_methods,
    collect_images,
    evaluate,
    write_json_atomically,
)
from scorecam_explorer.metrics import BoxError, average_drop_increase, deletion, insertion
from scorecam_explorer.models import from_module


def test_error_classes_live_in_errors_and_stay_importable_from_their_old_modules():
    from scorecam_explorer import errors
    from scorecam_explorer.metrics import localisation

    assert UnknownMethodError is errors.UnknownMethodError and issubclass(UnknownMethodError, errors.ScorecamError)
    assert BoxError is errors.BoxError is localisation.BoxError and issubclass(BoxError, ValueError)


@pytest.fixture
def picture_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


@pytest.fixture
def tiny_model(tiny_cnn):
    return from_module(tiny_cnn, input_size=32)


def test_check_methods():
    assert check_methods("scorecam, gradcam++,Grad-CAM") == ["scorecam", "gradcam++", "gradcam"]
    assert check_methods(["gradcam", "gradcam"]) == ["gradcam"]
    with pytest.raises(UnknownMethodError, match="Did you mean: gradcam"):
        check_methods("gradcamm")
    with pytest.raises(UnknownMethodError, match="no method"):
        check_methods(" , ")


def test_collect_images_bad_input(tmp_path, picture_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="no image files"):
        collect_images(tmp_path / "empty")
    with pytest.raises(ImageLoadError, match="not found"):
        collect_images(tmp_path / "missing")
    (picture_folder / "broken.png").write_text("not an image")
    (picture_folder / "zz.png").write_bytes(b"\x89PNG\r\n")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\).*broken.png.*zz.png"):
        images = collect_images(picture_folder)
    assert images.ids == ["a.png", "b.jpg", "c.png"]
    assert len(images.skipped) == 2
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "x.jpg").write_text("nope")
    with pytest.warns(UserWarning), pytest.raises(ImageLoadError, match="none of the images"):
        collect_images(only_broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first two files are readable: no warning
        assert collect_images(picture_folder, max_images=2).ids == ["a.png", "b.jpg"]


def test_evaluate_matches_the_metric_functions(tiny_model, picture_folder):
    boxes = {"a.png": [0, 0, 16, 16], "c.png": [[0, 0, 8, 8], [16, 16, 32, 32]], "gone.png": [0, 0, 4, 4]}
    with pytest.warns(UserWarning, match="gone.png"):
        result = evaluate(
            tiny_model, picture_folder, methods="gradcam,scorecam", boxes=boxes, step_fraction=0.1, batch_size=8
        )
    assert result.methods == ["gradcam", "scorecam"]
    assert list(result.per_image.coords["image"].values) == ["a.png", "b.jpg", "c.png"]
    # the per-image values are those of the metric functions on the same maps
    batch = model_inputs(tiny_model, collect_images(picture_folder).pictures)
    maps = gradcam(tiny_model, batch.tensor, result.protocol["layer"])
    row = result.per_image.sel({"method": "gradcam"})
    confidence = average_drop_increase(tiny_model, batch.tensor, maps)
    np.testing.assert_allclose(row["drop"].values, confidence["drop"].values, atol=1e-9)
    np.testing.assert_allclose(row["deletion_auc"].values, deletion(tiny_model, batch.tensor, maps, step_fraction=0.1)["auc"].values)
    np.testing.assert_allclose(
        row["insertion_auc"].values, insertion(tiny_model, batch.tensor, maps, step_fraction=0.1)["auc"].values
    )
    assert math.isnan(row["energy_pointing"].values[1])  # b.jpg has no box
    summary = result.summary()
    assert summary["gradcam"]["average_drop"] == pytest.approx(confidence.attrs["average_drop"])
    assert summary["gradcam"]["energy_pointing"] == pytest.approx(np.nanmean(row["energy_pointing"].values))
    assert result.fidelity is not None and result.fidelity.sizes["image"] == 3
    table = result.table()
    assert "Grad-CAM" in table and "Score-CAM" in table and "3 image(s)" in table
    assert "Energy pointing" in table and "left out" not in table
    assert result.cost["scorecam"]["forward_passes"]["deletion"] == 3 * (11 + 1) + 3  # 102 px steps: 11 steps, 12 points, plus f(X)


def test_without_boxes_the_pointing_game_is_left_out_and_json_is_strict(tiny_model, picture_folder, tmp_path):
    result = evaluate(tiny_model, picture_folder, methods=["gradcam++"], step_fraction=0.25, topk=False)
    assert "left out" in result.table() and "Energy pointing" not in result.table().splitlines()[1]
    path = result.save_json(tmp_path / "out.json")
    data = json.loads(path.read_text())  # allow_nan=False when written: NaN became null
    assert data["summary"]["gradcam++"]["energy_pointing"] is None
    assert data["per_image"]["gradcam++"]["a.png"]["energy_pointing"] is None
    assert len(data["per_image"]["gradcam++"]["a.png"]["deletion_curve"]) == 5
    protocol = data["protocol"]
    for key in ("model", "layer", "preprocessing", "keep_fraction", "step_fraction", "blur_kernel", "blur_sigma",
                "deletion_substrate", "insertion_substrate", "weights_fingerprint"):
        assert key in protocol
    assert data["targets"]["a.png"]["index"] == int(result.per_image.coords["target"].values[0])
    assert not list(tmp_path.glob(".out.json.*"))  # no temporary file left


def test_bad_boxes_are_clear_errors(tiny_model, picture_folder):
    with pytest.raises(BoxError, match="outside"):
        evaluate(tiny_model, picture_folder, methods="gradcam", boxes={"a.png": [0, 0, 40, 20]}, step_fraction=0.5)
    with pytest.raises(BoxError, match="none of the boxes"):
        evaluate(tiny_model, picture_folder, methods="gradcam", boxes={"nothing.png": [0, 0, 4, 4]})


def test_write_json_atomically_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomically({"a": 1}, path)
    with pytest.raises(ValueError):
        write_json_atomically({"a": float("nan")}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_sanity_in_evaluate(tiny_model, picture_folder):
    result = evaluate(
        tiny_model, picture_folder, methods="gradcam", sanity=True, step_fraction=0.5, max_images=2, topk=False
    )
    sanity = result.sanity["gradcam"]
    assert list(sanity.coords["randomised"].values) == ["none", "classifier", "features"]
    assert "Sanity check (Grad-CAM" in result.table()
    assert result.to_json()["sanity"]["gradcam"]["randomised"][1] == "classifier"


@pytest.mark.parametrize(
    "family", [{"family": "is-cam", "samples": 2}, {"family": "ss-cam", "samples": 2, "std": 1.0, "seed": 3}]
)
def test_evaluate_a_family_member(tiny_model, picture_folder, family):
    """Score-CAM's maps and top-k fidelity come from the family member's cache: the maps are
    those composed from compute_cache with the same family, and the protocol names it."""
    from scorecam_explorer.cache import cache_sampler
    from scorecam_explorer.compose import scorecam
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.metrics import topk_fidelity

    result = evaluate(
        tiny_model, picture_folder, methods="scorecam", preset="torchcam", step_fraction=0.5, keep_maps=True, **family
    )
    batch = model_inputs(tiny_model, collect_images(picture_folder).pictures)
    layer = result.protocol["layer"]
    cache = compute_cache(tiny_model, batch.tensor, layer, convention="torchcam", progress=False, **family)
    targets = [int(t) for t in result.per_image.coords["target"].values]
    np.testing.assert_allclose(result.maps["scorecam"].values, scorecam(cache, layer, targets, preset="torchcam").values, atol=1e-6)
    expected = topk_fidelity(cache, layer, targets, preset="torchcam")
    np.testing.assert_allclose(result.fidelity.values, expected.values, atol=1e-6)
    assert result.protocol["mask_sampler"] == cache_sampler(cache)
    assert result.protocol["family"].startswith(family["family"].upper())
    assert result.protocol["family"] in result.table()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"preset": "official", "family": "ss-cam", "samples": 2}, r"'official' preset .*\(SS-CAM, 2 samples"),
        ({"family": "is-cam", "sanity": True}, "the sanity check runs Score-CAM itself"),
        ({"family": "is-cam", "std": 1.0}, "IS-CAM adds no noise"),
        ({"family": "ss-cam", "samples": 0}, "samples must be an integer >= 1"),
        ({"family": "ss-cam", "std": -1.0}, "must be a number > 0"),
        ({"samples": 2}, "go with family="),
    ],
)
def test_family_settings_that_do_not_apply_fail_before_any_forward_pass(tiny_model, picture_folder, settings, message):
    from scorecam_explorer.errors import ScorecamError

    calls = []
    tiny_model.module.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ScorecamError, match=message):
        evaluate(tiny_model, picture_folder, methods="scorecam,gradcam", **settings)
    assert not calls


def test_the_allocator_is_tuned_only_where_score_cam_runs(tiny_model, picture_folder, monkeypatch):
    """mallopt is process-wide and cannot be undone: Grad-CAM and the metrics never call it;
    Score-CAM does through compute_cache, unless tune_allocator=False."""
    from scorecam_explorer import device

    calls: list[int] = []
    monkeypatch.setattr(device, "tune_allocator", lambda: calls.append(1) or True)
    evaluate(tiny_model, picture_folder, methods="gradcam,gradcam++", step_fraction=0.5, sanity=True, max_images=1)
    assert calls == []
    evaluate(tiny_model, picture_folder, methods="scorecam", step_fraction=0.5, max_images=1, tune_allocator=False)
    assert calls == []
    evaluate(tiny_model, picture_folder, methods="scorecam", step_fraction=0.5, max_images=1, topk=False)
    assert calls


def test_map_costs_are_the_model_calls_made(tiny_model, picture_folder, monkeypatch):
    """Score-CAM's map cost is what its cache recorded; Grad-CAM's, its forward calls."""
    from scorecam_explorer import engine

    recorded: list[int] = []
    compute_cache = engine.compute_cache

    def recording(*args, **kwargs):
        cache = compute_cache(*args, **kwargs)
        recorded.append(int(cache.attrs["forward_passes"]))
        return cache

    monkeypatch.setattr(engine, "compute_cache", recording)
    result = evaluate(
        tiny_model, picture_folder, methods="scorecam,gradcam", step_fraction=0.5, topk=False, batch_size=2
    )
    assert len(recorded) == 1
    assert result.cost["scorecam"]["forward_passes"]["maps"] == recorded[0]
    assert result.cost["gradcam"]["forward_passes"]["maps"] == 2  # 3 images in batches of 2


# ---- the command -------------------------------------------------------------------------


def test_cli_evaluate_on_a_torchvision_model(picture_folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    status = main([
        "evaluate", "--model", "resnet18", "--weights", "none", "--images", str(picture_folder),
        "--methods", "gradcam,gradcam++", "--max-images", "2", "--step-fraction", "0.5", "--out", str(out), "--quiet",
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Grad-CAM++" in captured.out and "2 image(s)" in captured.out and "left out" in captured.out
    data = json.loads(out.read_text())
    assert data["protocol"]["model"] == "resnet18" and data["protocol"]["layer"] == "layer4"
    assert data["images"] == ["a.png", "b.jpg"]
    assert set(data["per_image"]) == {"gradcam", "gradcam++"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--methods", "scorecam,gradcamm"], "unknown method 'gradcamm'"),
        (["--images", "EMPTY"], "no image files"),
        (["--images", "MISSING"], "image folder not found"),
        (["--boxes", "BOXES"], "outside"),
        (["--out", "NOWHERE/r.json"], "does not exist"),
    ],
)
def test_cli_bad_input(picture_folder, tmp_path, capsys, arguments, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": [0, 0, 500, 10]}))
    replacements = {
        "EMPTY": str(tmp_path / "empty"),
        "MISSING": str(tmp_path / "missing"),
        "BOXES": str(tmp_path / "boxes.json"),
        "NOWHERE/r.json": str(tmp_path / "nowhere" / "r.json"),
    }
    arguments = [replacements.get(a, a) for a in arguments]
    base = {"--images": str(picture_folder), "--out": str(tmp_path / "r.json")}
    for flag, value in zip(arguments[::2], arguments[1::2]):
        base[flag] = value
    argv = ["evaluate", "--model", "resnet18", "--weights", "none", "--methods", "gradcam", "--quiet",
            "--step-fraction", "0.5"]
    for flag, value in base.items():
        argv += [flag, value]
    status = main(argv)
    assert status == 2
    assert message in capsys.readouterr().err


def test_boxes_match_sample_file_names_and_ids():
    from scorecam_explorer.evaluation import boxes_for

    images = collect_images("samples")
    chosen = boxes_for(images, {"coffee.jpg": [30, 0, 194, 118], "sample:rocket": [102, 62, 124, 224]})
    assert chosen == {"sample:coffee": [30, 0, 194, 118], "sample:rocket": [102, 62, 124, 224]}


def test_default_model_on_a_sample(default_model):
    result = evaluate(
        default_model,
        ["sample:chelsea"],
        methods="gradcam",
        boxes={"chelsea.jpg": [0, 0, 224, 224]},
        step_fraction=0.25,
    )
    row = result.per_image.sel({"method": "gradcam"})
    assert result.protocol["layer"] == "head" and result.protocol["model"] == "efficientnet_lite0"
    assert row["energy_pointing"].values[0] == pytest.approx(1.0)  # the box is the whole input
    assert str(result.per_image.coords["target_name"].values[0]) in ("tiger cat", "Egyptian cat", "tabby")
    assert 0.0 <= row["drop"].values[0] <= 100.0
    curve = row["deletion_curve"].values[0]
    assert curve[0] == pytest.approx(row["probability"].values[0], abs=1e-5)


# ---- settings are checked before the work ------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"space": "pixel"}, "unknown space"),
        ({"step_fraction": 0.0}, "step_fraction"),
        ({"blur_kernel": 4}, "blur kernel"),
        ({"blur_sigma": 0.0}, "blur sigma"),
        ({"sanity": True, "sanity_depth": 0}, "sanity_depth must be an integer of at least 1"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"methods": "scorecam", "preset": "papr"}, "unknown preset"),
        ({"methods": "scorecam", "convention": "nope"}, "unknown mask convention"),
        ({"methods": "gradcamm"}, "unknown method"),
        ({"target": "no such class"}, "no class named"),
        ({"target": 10}, "out of range"),
        ({"target": [1, 2]}, "one per image"),
    ],
)
def test_bad_settings_fail_before_any_forward_pass(tiny_model, picture_folder, settings, message):
    from scorecam_explorer.errors import ScorecamError

    calls = []
    tiny_model.module.register_forward_pre_hook(lambda *args: calls.append(1))
    arguments = {"methods": "scorecam,gradcam", **settings}
    with pytest.raises(ScorecamError, match=message):
        evaluate(tiny_model, picture_folder, **arguments)
    assert not calls


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sanity", "--sanity-depth", "0"], "sanity_depth must be an integer of at least 1"),
        (["--keep-fraction", "0"], "keep_fraction"),
        (["--step-fraction", "0"], "step_fraction"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--methods", "scorecam", "--preset", "papr"], "unknown preset"),
        (["--methods", "scorecam", "--preset", "official", "--family", "is-cam"], "'official' preset"),
        (["--family", "is-cam", "--std", "1"], "IS-CAM adds no noise"),
        (["--family", "ss-cam", "--sanity"], "the sanity check runs Score-CAM itself"),
    ],
)
def test_cli_bad_settings_fail_before_the_model_loads(picture_folder, tmp_path, capsys, monkeypatch, arguments, message):
    import scorecam_explorer.commands.evaluate as command

    loaded = []
    monkeypatch.setattr(command, "model_from_arguments", lambda args: loaded.append(args))
    argv = ["evaluate", "--images", str(picture_folder), "--out", str(tmp_path / "r.json"), "--quiet", *arguments]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not loaded


def test_write_json_atomically_gives_the_usual_mode_and_syncs(tmp_path, monkeypatch):
    import os
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda *args: (events.append("replace"), real_replace(*args))[1])
    previous = os.umask(0o027)
    try:
        new = write_json_atomically({"a": 1}, tmp_path / "new.json")
        assert stat.S_IMODE(new.stat().st_mode) == 0o640  # 0o666 & ~umask, not mkstemp's 0o600
        os.umask(0o022)
        assert stat.S_IMODE(write_json_atomically({"a": 1}, tmp_path / "other.json").stat().st_mode) == 0o644
        new.chmod(0o664)
        write_json_atomically({"a": 2}, new)  # a replaced file keeps its mode
        assert stat.S_IMODE(new.stat().st_mode) == 0o664
        assert json.loads(new.read_text()) == {"a": 2}
    finally:
        os.umask(previous)
    assert events == ["fsync", "replace"] * 3
