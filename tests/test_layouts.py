"""Layer layouts: channels-last and token outputs read as channel maps, the same results as the
equivalent convolutional layer, and clear errors when an output does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_models import normal
from torch import nn

from scorecam_explorer import baselines
from scorecam_explorer.cache import layer_layout, load_cache, save_cache
from scorecam_explorer.capture import capture
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ScorecamError, UnknownLayerError
from scorecam_explorer.layouts import NCHW, NHWC, FunctionLayout, layout_from, maps_of
from scorecam_explorer.models import from_module
from scorecam_explorer.preprocessing import Preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
PREPROCESSING = Preprocessing(resize=SIZE, crop=SIZE)


class ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C), stored channels-last as a Swin stage's output is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).contiguous()


class ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToTokens(nn.Module):
    """(N, C, H, W) -> (N, H*W, C): a transformer's patch tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class TokenHead(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens.mean(dim=1))


def channels_last_cnn() -> nn.Module:
    """conv, ReLU, pool, conv, ReLU (``0.4``: 12 x 16 x 16 maps at 32 x 32 inputs), the same maps
    channels-last (``0.5``: (N, 16, 16, 12)) and back, conv, ReLU, pooled into 5 classes (the
    last conv and ReLU make the gradient at ``0.4`` vary over the map)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), ToChannelsLast(), ToChannelsFirst(),
            nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
        ),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    ).eval()


def token_cnn() -> nn.Module:
    """conv, ReLU, then the 16 x 16 map as 256 tokens of width 6 (child ``2``) and a head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(), ToTokens(), TokenHead(6, 4)).eval()


def tokens_to_maps(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, D) -> (N, D, h, w) with h = w = sqrt(T)."""
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def nhwc_to_maps(output: torch.Tensor) -> torch.Tensor:
    return output.permute(0, 3, 1, 2)


def wrap(module: nn.Module, **options) -> object:
    return from_module(module, name="net", preprocessing=PREPROCESSING, **options)


@pytest.fixture
def inputs() -> torch.Tensor:
    return normal(2, 3, SIZE, SIZE, seed=3)


def explain(model, inputs, layer):
    return compute_cache(model, inputs, layer, batch_size=8, progress=False, device="cpu")


@pytest.mark.parametrize("layout", ["nhwc", nhwc_to_maps], ids=["nhwc", "callable"])
def test_channels_last_layer_gives_the_cache_of_the_equivalent_nchw_layer(inputs, layout) -> None:
    model = channels_last_cnn()
    reference = explain(wrap(model), inputs, "0.4")
    cache = explain(wrap(model, layout={"0.5": layout}), inputs, "0.5")
    assert cache["0.5"]["activation"].shape == (2, 12, 16, 16)
    for variable in ("activation", "masked_logits", "constant"):
        np.testing.assert_array_equal(cache["0.5"][variable].values, reference["0.4"][variable].values)
    for variable in ("logits", "baseline_logits"):
        np.testing.assert_array_equal(cache[variable].values, reference[variable].values)
    # the maps are not symmetric in h and w: reading them transposed would differ
    assert not np.array_equal(reference["0.4"]["activation"].values, reference["0.4"]["activation"].values.swapaxes(2, 3))


def test_the_layout_is_recorded_in_the_layer_node_and_kept_on_disk(inputs, tmp_path) -> None:
    model = channels_last_cnn()
    cache = explain(wrap(model, layout={"0.5": "nhwc"}), inputs[:1], ["0.4", "0.5"])
    assert cache["0.5"].attrs["layout"] == "nhwc"
    assert "layout" not in cache["0.4"].attrs  # nchw: written as before, so old caches read the same
    assert layer_layout(cache, "0.4") == "nchw"
    loaded = load_cache(save_cache(cache, tmp_path / "c.zarr"))
    assert layer_layout(loaded, "0.5") == "nhwc" and layer_layout(loaded, "0.4") == "nchw"


def test_a_channels_last_output_is_read_as_nchw_unless_the_layout_is_named(inputs) -> None:
    # A 4-D (N, H, W, C) output has the rank of an (N, C, H, W) one: nothing can tell them apart,
    # so the default nchw reads it (16 "channels" of 16 x 12); the user must say layout="nhwc".
    model = channels_last_cnn()
    plain, named = wrap(model), wrap(model, layout={"0.5": "nhwc"})
    guessed = plain.layer("0.5")
    assert (guessed.channels, guessed.height, guessed.width) == (16, 16, 12)
    told = named.layer("0.5")
    assert (told.channels, told.height, told.width) == (12, 16, 16)
    assert named.layer("0.4") == plain.layer("0.4")  # other layers keep nchw
    assert capture(model, inputs, ["0.5"]).activations["0.5"].shape == (2, 16, 16, 12)


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp"])
def test_gradcam_through_the_nhwc_layout_equals_gradcam_at_the_nchw_layer(inputs, method) -> None:
    model = channels_last_cnn()
    compute = getattr(baselines, method)
    reference = compute(wrap(model), inputs, "0.4")
    through_layout = compute(wrap(model, layout={"0.5": "nhwc"}), inputs, "0.5")
    # The same A and dy/dA to the bit (below); the maps agree up to float32 rounding only, as the
    # reference's gradient is stored channels-last (it flowed back through the permutes) and its
    # channel sums run in another order.
    np.testing.assert_allclose(through_layout.values, reference.values, rtol=0, atol=1e-6)
    assert float(reference.values.std()) > 0.1
    activations, gradients, _, _ = baselines.layer_gradients(wrap(model, layout={"0.5": "nhwc"}), inputs, "0.5", None)
    expected_a, expected_g, _, _ = baselines.layer_gradients(wrap(model), inputs, "0.4", None)
    assert activations.shape == gradients.shape == (2, 12, 16, 16)
    torch.testing.assert_close(gradients, expected_g, rtol=0, atol=0)
    torch.testing.assert_close(activations, expected_a, rtol=0, atol=0)
    assert not torch.equal(expected_g, expected_g.transpose(2, 3))  # reading it transposed would differ


def test_a_token_layer_is_listed_only_with_a_layout(inputs) -> None:
    module = token_cnn()
    plain = wrap(module)
    assert plain.layer_names() == ["0", "1"] and plain.default_layer == "1"
    with pytest.raises(UnknownLayerError, match=r"'2' .*outputs shape \(1, 256, 6\), not a 4-D.*layout="):
        plain.check_layer("2")
    with pytest.raises(UnknownLayerError, match=r"layer '2' outputs shape \(2, 256, 6\).*layout="):
        capture(module, inputs, ["2"])

    told = wrap(module, layout={"2": tokens_to_maps})
    assert told.layer_names() == ["0", "1", "2"] and told.default_layer == "2"
    info = told.layer("2")
    assert (info.channels, info.height, info.width) == (6, 16, 16)
    # the token maps are the ReLU's maps, so Score-CAM's cache of them is the same
    cache, reference = explain(told, inputs, "2"), explain(plain, inputs, "1")
    np.testing.assert_array_equal(cache["2"]["masked_logits"].values, reference["1"]["masked_logits"].values)
    assert cache["2"].attrs["layout"] == "callable:tokens_to_maps"


def test_one_layout_for_every_layer_applies_where_it_fits() -> None:
    told = wrap(token_cnn(), layout=tokens_to_maps)  # the 4-D layers do not fit it
    assert told.layer_names() == ["2"]
    assert told.layout_for("0") is told.layout_for("2") and told.layout_for("0").name == "callable:tokens_to_maps"
    assert wrap(token_cnn(), layout=None).layout_for("2") is NCHW


def test_a_layout_function_with_the_wrong_result_names_the_layer(inputs) -> None:
    module = token_cnn()

    def keeps_tokens(tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def merges_images(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(1, tokens.shape[2], 16, -1)

    def fails(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(3, 5)

    bad = {"keeps_tokens": keeps_tokens, "merges_images": merges_images, "fails": fails}
    for name, function in bad.items():
        with pytest.raises(UnknownLayerError, match=rf"layer '2' .*'callable:{name}'.*layout="):
            capture(module, inputs, ["2"], {"2": FunctionLayout(function)})
    with pytest.raises(UnknownLayerError, match=r"turns into shape \(2, 256, 6\), not \(N, C, h, w\) maps"):
        capture(module, inputs, ["2"], {"2": layout_from(keeps_tokens)})
    with pytest.raises(UnknownLayerError, match=r"turns into shape \(1, 6, 16, 32\), not \(N, C, h, w\) maps with N = 2"):
        capture(module, inputs, ["2"], {"2": layout_from(merges_images)})
    with pytest.raises(UnknownLayerError, match=r"'2' of net cannot be targeted.*RuntimeError"):
        wrap(module, layout={"2": fails}).check_layer("2")
    with pytest.raises(UnknownLayerError, match=r"layer '2' outputs shape \(2, 256, 6\), which layout 'callable:keeps"):
        baselines.layer_gradients(wrap(module, layout={"2": keeps_tokens}), inputs, "2", None)


def test_nhwc_refuses_an_output_of_another_rank() -> None:
    with pytest.raises(UnknownLayerError, match=r"'head' outputs shape \(2, 7\), not a 4-D \(N, H, W, C\) tensor"):
        maps_of(NHWC, torch.zeros(2, 7), "head")
    maps = maps_of(NHWC, torch.arange(24.0).reshape(1, 2, 3, 4), "x")
    assert maps.shape == (1, 4, 2, 3) and maps.is_contiguous() and float(maps[0, 1, 1, 2]) == 21  # O[0, 1, 2, 1]


@pytest.mark.parametrize("spec", [3, None, ["nhwc"], nn.Module, "nwhc", "token"])
def test_a_bad_layout_spec_is_a_clear_error(spec) -> None:
    with pytest.raises(ScorecamError, match="layout"):
        layout_from(spec)


def test_layout_specs_are_checked_by_from_module() -> None:
    with pytest.raises(ScorecamError, match=r"Did you mean: nhwc"):
        wrap(channels_last_cnn(), layout="NWHC")
    with pytest.raises(UnknownLayerError, match=r"no layer '0\.9'"):
        wrap(channels_last_cnn(), layout={"0.9": "nhwc"})
    with pytest.raises(ScorecamError, match="got int"):
        wrap(channels_last_cnn(), layout={"0.5": 4})
    assert layout_from(" NHWC ") is NHWC and layout_from(NCHW) is NCHW
    assert wrap(channels_last_cnn(), layout={"0.5": "nhwc"}).layouts == {"0.5": NHWC}
