"""The command line skeleton: help, models, layers, predict, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scorecam_explorer.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scorecam_explorer.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_the_subcommands(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for command in ("models", "layers", "predict"):
        assert command in output


def test_models_lists_default_first(capsys) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("efficientnet_lite0") and "default" in lines[0]
    assert "resnet50" in lines and "vgg16" in lines


def test_layers_marks_the_default(capsys) -> None:
    assert main(["layers", "--model", "resnet18", "--weights", "none"]) == 0
    output = capsys.readouterr().out
    assert "* layer4" in output and "512" in output and "7x7" in output


def no_weights_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of reading or downloading weights fail loudly."""
    import torch
    import torchvision.models._api

    from scorecam_explorer import default_model

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read or downloaded")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(default_model, "weights_file", refuse)


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_lite0"])
def test_layers_needs_no_weights(model: str, capsys, monkeypatch) -> None:
    from scorecam_explorer.models import load_model

    expected = load_model(model, weights=None).layers()  # random weights: the same layers
    no_weights_anywhere(monkeypatch)
    assert main(["layers", "--model", model]) == 0  # --weights DEFAULT, and yet nothing fetched
    output = capsys.readouterr().out
    assert output.startswith(f"{model}: {len(expected)} targetable layers")
    for layer in expected:
        assert f" {layer.name} " in output and f"{layer.height}x{layer.width}" in output


def test_layers_with_a_weights_name_uses_its_architecture_without_fetching_it(capsys, monkeypatch) -> None:
    no_weights_anywhere(monkeypatch)
    # these weights set the ViT's image size to 384: the architecture and the sizes follow them
    assert main(["layers", "--model", "vit_b_16", "--weights", "IMAGENET1K_SWAG_E2E_V1"]) == 0
    output = capsys.readouterr().out
    assert "at input 384x384" in output and "24x24" in output
    # the token layers are listed, the default the last block's first LayerNorm
    assert "* encoder.layers.encoder_layer_11.ln_1 " in output and "  encoder.layers.encoder_layer_11 " in output


@pytest.mark.parametrize("command", ["predict", "compute"])
def test_predict_and_compute_still_load_the_pretrained_weights(command: str, capsys, monkeypatch, tmp_path) -> None:
    no_weights_anywhere(monkeypatch)
    argv = [command, "--image", "sample:chelsea"]
    if command == "compute":
        argv += ["--out", str(tmp_path / "c.zarr")]
    # a torchvision model: the failed fetch becomes one error line
    assert main([*argv, "--model", "resnet18"]) == 2
    assert "weights were read or downloaded" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="weights were read or downloaded"):  # the embedded model
        main(argv)


def test_predict_on_a_user_file_with_random_weights(capsys, tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.new("L", (50, 80), 128).save(path)
    assert main(["predict", "--model", "resnet18", "--weights", "none", "--image", str(path), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[1].startswith("1. ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["predict", "--image", "missing.jpg"], "image file not found: missing.jpg"),
        (["predict", "--model", "resnet5", "--image", "sample:chelsea"], "unknown model 'resnet5'"),
        (["predict", "--image", "sample:kitten"], "no sample photo named 'kitten'"),
    ],
)
def test_bad_input_gives_one_clear_line(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


@pytest.mark.slow
def test_predict_the_cat_offline() -> None:
    result = run_cli("predict", "--image", "sample:chelsea")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[1]
    assert any(cat in first for cat in ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"))


@pytest.mark.slow
def test_default_model_predicts_the_bundled_photos(default_model) -> None:
    from scorecam_explorer.prediction import predict

    assert 281 <= predict(default_model, "sample:chelsea")[0].index <= 285
    assert predict(default_model, "sample:coffee")[0].index in (967, 968)


def test_the_command_line_starts_without_torch() -> None:
    """`map` and the help read caches only: the CLI must start where torch is not installed."""
    from scorecam_explorer.commands._common import DEFAULT_MODEL
    from scorecam_explorer.models import DEFAULT_MODEL as MODELS_DEFAULT

    assert DEFAULT_MODEL == MODELS_DEFAULT
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "from scorecam_explorer.cli import main\n"
        "try:\n    main(['map', '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--preset" in result.stdout


def test_compute_command_offers_the_engines_precisions() -> None:
    from scorecam_explorer.commands.compute import PRECISIONS as OFFERED
    from scorecam_explorer.device import PRECISIONS

    assert OFFERED == PRECISIONS
