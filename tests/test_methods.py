"""The methods' registry: records, names and aliases, and a method added by one module alone.

``absgrad`` below is a whole gradient method, defined here with its own weight rule and
registered only for the test: evaluate(), the sanity check, the explorer's Compare panel,
the command line and the package's exports must all offer it without another file changing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import scorecam_explorer
from scorecam_explorer import baselines
from scorecam_explorer.cli import build_parser, main
from scorecam_explorer.errors import ScorecamError, UnknownMethodError
from scorecam_explorer.evaluation import check_methods, evaluate
from scorecam_explorer.methods import (
    Method,
    get_method,
    gradient_method,
    method_keys,
    methods,
    register,
    registered,
    unregister,
)
from scorecam_explorer.metrics.sanity import sanity_check
from scorecam_explorer.models import from_module


def absgrad_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """w_k = (1 / uv) sum_ij |d y^c / d A_k,ij|: the mean absolute gradient."""
    return gradients.abs().mean(dim=(2, 3))


def absgrad_method() -> Method:
    return gradient_method("absgrad", "AbsGrad", absgrad_weights, aliases=("abs-grad",))


@pytest.fixture
def absgrad():
    with registered(absgrad_method()) as method:
        yield method
    assert "absgrad" not in method_keys()


@pytest.fixture
def tiny_model(tiny_cnn):
    return from_module(tiny_cnn, input_size=32)


@pytest.fixture
def picture_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return folder


# ---- the records ---------------------------------------------------------------------------


def test_built_in_methods_and_what_they_need():
    assert method_keys() == ("scorecam", "gradcam", "gradcam++")
    assert method_keys("gradients") == ("gradcam", "gradcam++")
    assert [m.key for m in methods("masked_passes")] == ["scorecam"]
    assert get_method("gradcam++").label == "Grad-CAM++"
    for name in ("gradcam_pp", "Grad-CAM++", " GRADCAMPP ", "gradcam++"):
        assert get_method(name).key == "gradcam++"
    assert get_method("Score-CAM").key == "scorecam" and get_method("grad-cam").key == "gradcam"


def test_unknown_names_list_the_keys_and_the_closest():
    with pytest.raises(UnknownMethodError, match=r"choose from scorecam, gradcam, gradcam\+\+.*Did you mean: gradcam"):
        get_method("gradcamm")
    with pytest.raises(ScorecamError, match="unknown need"):
        methods("magic")


def test_records_are_checked_and_names_are_unique():
    with pytest.raises(ScorecamError, match="lower-case"):
        Method(key="AbsGrad", label="x", compute=absgrad_weights)
    with pytest.raises(ScorecamError, match="unknown"):
        Method(key="x", label="x", compute=absgrad_weights, needs=frozenset({"magic"}))
    with pytest.raises(ScorecamError, match="already used by method 'gradcam\\+\\+'"):
        register(gradient_method("other", "Other", absgrad_weights, aliases=("gradcam_pp",)))
    assert "other" not in method_keys()
    register(absgrad_method())
    try:
        assert get_method("ABS-GRAD").key == "absgrad"
    finally:
        assert unregister("abs-grad").key == "absgrad"
    assert "absgrad" not in method_keys()


def test_weight_rules_live_with_their_methods_and_baselines_keep_their_names(tiny_cnn):
    from scorecam_explorer.methods.gradcam import gradcam_weights
    from scorecam_explorer.methods.gradcam_pp import gradcam_pp_weights

    assert baselines.gradcam_weights is gradcam_weights and baselines.gradcam_pp_weights is gradcam_pp_weights
    assert list(baselines.GRADIENT_METHODS) == ["gradcam", "gradcam++"]
    inputs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for key, function in (("gradcam", baselines.gradcam), ("gradcam++", baselines.gradcam_pp)):
        from_registry = baselines.GRADIENT_METHODS[key](tiny_cnn, inputs, "features.3", 1)
        assert np.array_equal(from_registry.values, function(tiny_cnn, inputs, "features.3", 1).values)
        assert from_registry.attrs["method"] == key
    assert scorecam_explorer.gradcam is baselines.gradcam
    assert scorecam_explorer.get_method("gradcam_pp").key == "gradcam++"


def test_the_registry_imports_without_torch():
    child = textwrap.dedent(
        """
        import sys
        for blocked in ("torch", "torchvision"):
            sys.modules[blocked] = None
        from scorecam_explorer.methods import method_keys, get_method
        import argparse
        from scorecam_explorer.commands import evaluate as command
        from scorecam_explorer.evaluation import check_methods
        assert method_keys() == ("scorecam", "gradcam", "gradcam++")
        assert check_methods("Grad-CAM++,scorecam") == ["gradcam++", "scorecam"]
        parser = argparse.ArgumentParser()
        command.register(parser.add_subparsers())
        assert sys.modules["torch"] is None
        print("registry without torch")
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "registry without torch" in done.stdout


# ---- one new method, everywhere ------------------------------------------------------------


def test_a_registered_method_is_evaluated_and_sanity_checked(absgrad, tiny_model, tiny_cnn, picture_folder):
    assert check_methods("gradcam, AbsGrad") == ["gradcam", "absgrad"]
    result = evaluate(
        tiny_model, picture_folder, methods="gradcam,absgrad", step_fraction=0.5, topk=False, sanity=True,
        max_images=1, keep_maps=True,
    )
    assert result.methods == ["gradcam", "absgrad"] and set(result.sanity) == {"gradcam", "absgrad"}
    assert "AbsGrad" in result.table() and result.cost["absgrad"]["forward_passes"]["maps"] == 1
    inputs = baselines.model_inputs(tiny_model, [str(picture_folder / "a.png")]).tensor
    layer = result.protocol["layer"]
    expected = baselines.gradient_cam("absgrad", absgrad_weights, tiny_model, inputs, layer, None)
    assert np.array_equal(result.maps["absgrad"].values, expected.values)

    checked = sanity_check(tiny_cnn, inputs, "features.3", method="abs-grad", seed=1)
    assert checked.attrs["method"] == "absgrad" and checked["spearman"].values[0, 0] == pytest.approx(1.0)


def test_a_registered_method_is_in_the_command_line_and_the_exports(absgrad, tiny_model, picture_folder, tmp_path,
                                                                    capsys, monkeypatch):
    import scorecam_explorer.commands.evaluate as command

    evaluate_parser = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    assert "absgrad" in evaluate_parser.format_help()
    monkeypatch.setattr(command, "model_from_arguments", lambda args: tiny_model)
    out = tmp_path / "r.json"
    argv = ["evaluate", "--images", str(picture_folder), "--methods", "absgrad", "--max-images", "1",
            "--step-fraction", "0.5", "--no-topk", "--quiet", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert list(json.loads(out.read_text())["per_image"]) == ["absgrad"]
    assert scorecam_explorer.absgrad is absgrad.compute


def test_without_the_method_every_reader_refuses_it(tiny_model, picture_folder, tmp_path, capsys):
    with registered(absgrad_method()):
        pass
    with pytest.raises(UnknownMethodError, match="unknown method 'absgrad'"):
        check_methods("absgrad")
    with pytest.raises(ScorecamError, match="unknown method 'absgrad'"):
        sanity_check(tiny_model, torch.zeros(1, 3, 32, 32), "features.3", method="absgrad")
    argv = ["evaluate", "--images", str(picture_folder), "--methods", "absgrad", "--quiet",
            "--out", str(tmp_path / "r.json")]
    assert main(argv) == 2 and "unknown method 'absgrad'" in capsys.readouterr().err
    with pytest.raises(AttributeError):
        scorecam_explorer.absgrad  # noqa: B018


def test_a_registered_method_is_offered_by_compare(absgrad, tiny_model, picture_folder):
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.explorer import Explorer
    from scorecam_explorer.explorer.model_link import BASELINE_METHODS, gradient_map

    cache = compute_cache(tiny_model, [str(picture_folder / "a.png")], ["features.3"], progress=False, batch_size=8)
    assert dict(BASELINE_METHODS) == {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "absgrad": "AbsGrad"}
    explorer = Explorer(cache, model=tiny_model)
    explorer.compare.mode.value = "methods"
    assert ("AbsGrad", "absgrad") in explorer.compare.second.options
    explorer.compare.second.value = "absgrad"
    assert any("AbsGrad" in a.text for a in explorer.compare.figure.widget.layout.annotations)
    s = explorer.state.selection
    by_alias = gradient_map("gradcam_pp", tiny_model, cache, s.layer, s.target)
    assert by_alias.attrs["method"] == "Grad-CAM++"
    assert np.array_equal(by_alias.values, gradient_map("gradcam++", tiny_model, cache, s.layer, s.target).values)


def test_the_scorecam_record_computes_maps_from_a_model(tiny_model):
    from scorecam_explorer.compose import scorecam
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.presets import get_preset

    inputs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    maps = get_method("Score-CAM").compute(tiny_model, inputs, "features.3", [1, 2], batch_size=8)
    cache = compute_cache(
        tiny_model, inputs, "features.3", convention=get_preset("paper").mask_convention, progress=False, device="cpu"
    )
    expected = scorecam(cache, "features.3", [1, 2], preset="paper")
    assert maps.dims == ("image", "y", "x") and maps.attrs["method"] == "scorecam"
    assert np.allclose(maps.values, expected.values, atol=1e-6) and maps.attrs["forward_passes"] > 0
