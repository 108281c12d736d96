"""Metrics on small hand-computed cases and against independent implementations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats
from scipy.ndimage import gaussian_filter
from torch import nn
from _tiny_models import normal

from scorecam_explorer.baselines import gradcam, gradcam_pp
from scorecam_explorer.errors import NonFiniteError, ScorecamError, UnknownLayerError
from scorecam_explorer.metrics import (
    BoxError,
    average_drop_increase,
    cascade_groups,
    deletion,
    deletion_insertion,
    energy_pointing_game,
    insertion,
    sanity_check,
    topk_fidelity,
)
from scorecam_explorer.metrics._common import pearson, rank_data, spearman
from scorecam_explorer.metrics.causal import curve_area, rise_blur, rise_blur_kernel, saliency_ranks, step_size
from scorecam_explorer.metrics.confidence import drop_and_increase, keep_top_fraction


class MeanColourNet(nn.Module):
    """logits = W . (per-channel mean of X) + b: probabilities computable by hand."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [-1.0, 1.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x).flatten(1))


def hand_probability(x: np.ndarray, cls: int) -> float:
    """softmax(W mean(x) + b)_cls for one (3, H, W) array."""
    weight = np.array([[2.0, -1.0, 0.5], [-1.0, 1.0, 0.0]])
    logits = weight @ x.reshape(3, -1).mean(axis=1) + np.array([0.1, -0.2])
    exp = np.exp(logits - logits.max())
    return float(exp[cls] / exp.sum())


# ---- average drop / increase -------------------------------------------------------------


def test_keep_top_fraction_by_hand():
    saliency = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])
    np.testing.assert_allclose(keep_top_fraction(saliency, 0.5).numpy(), [[[0.0, 0.4], [0.3, 0.0]]])
    np.testing.assert_allclose(keep_top_fraction(saliency, 1.0).numpy(), saliency.numpy())
    ties = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])  # ties: earlier pixels first, exactly k kept
    np.testing.assert_allclose(keep_top_fraction(ties, 0.25).numpy(), [[[0.5, 0.0], [0.0, 0.0]]])
    with pytest.raises(ScorecamError, match="keep_fraction"):
        keep_top_fraction(saliency, 0.0)


def test_drop_and_increase_by_hand():
    drop, increase = drop_and_increase(np.array([0.5, 0.2]), np.array([0.25, 0.3]))
    np.testing.assert_allclose(drop, [50.0, 0.0])
    np.testing.assert_allclose(increase, [0.0, 100.0])


def test_average_drop_increase_against_a_hand_computation():
    model = MeanColourNet().eval()
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    maps = rng.uniform(size=(3, 4, 4)).astype(np.float32)
    targets = [0, 1, 0]
    result = average_drop_increase(model, torch.from_numpy(inputs), maps, targets)
    drops, increases = [], []
    for i, cls in enumerate(targets):
        threshold = np.sort(maps[i].ravel())[::-1][7]  # 8 of 16 pixels kept
        kept = np.where(maps[i] >= threshold, maps[i], 0.0)
        y = hand_probability(inputs[i], cls)
        o = hand_probability(inputs[i] * kept, cls)
        drops.append(100 * max(0.0, y - o) / y)
        increases.append(100.0 if o > y else 0.0)
        assert result["probability"].values[i] == pytest.approx(y, rel=1e-5)
        assert result["explanation_probability"].values[i] == pytest.approx(o, rel=1e-5)
    np.testing.assert_allclose(result["drop"].values, drops, rtol=1e-4, atol=1e-4)
    assert result.attrs["average_drop"] == pytest.approx(np.mean(drops), rel=1e-4, abs=1e-4)
    assert result.attrs["average_increase"] == pytest.approx(np.mean(increases))
    assert result.attrs["forward_passes"] == 6
    assert json.loads(result.attrs["protocol"])["keep_fraction"] == 0.5


def test_average_drop_in_pixel_space_by_hand():
    from scorecam_explorer.models import from_module
    from scorecam_explorer.preprocessing import Preprocessing

    preprocessing = Preprocessing(resize=4, crop=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    model = from_module(MeanColourNet().eval(), preprocessing=preprocessing, input_size=4)
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    maps = rng.uniform(size=(1, 4, 4)).astype(np.float32)
    result = average_drop_increase(model, torch.from_numpy(inputs), maps, 1, keep_fraction=1.0, space="pixels")
    mean = np.array(preprocessing.mean)[:, None, None]
    std = np.array(preprocessing.std)[:, None, None]
    explained = ((inputs[0] * std + mean) * maps[0] - mean) / std
    assert result["explanation_probability"].values[0] == pytest.approx(hand_probability(explained, 1), rel=1e-5)
    with pytest.raises(ScorecamError, match="LoadedModel"):
        average_drop_increase(MeanColourNet(), torch.from_numpy(inputs), maps, 1, space="pixels")


def test_average_drop_matches_pytorch_grad_cam_confidence_change(tiny_cnn):
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    inputs = torch.randn(4, 3, 32, 32)
    maps = gradcam(tiny_cnn, inputs, "features.3")
    targets = [int(t) for t in maps.coords["target"].values]
    result = average_drop_increase(tiny_cnn, inputs, maps, keep_fraction=1.0)
    change = CamMultImageConfidenceChange()(
        inputs, maps.values, [ClassifierOutputSoftmaxTarget(t) for t in targets], tiny_cnn
    ).ravel()
    y = result["probability"].values
    # probabilities from other batches than pytorch-grad-cam's: float32 rounding of reordered sums
    np.testing.assert_allclose(result["explanation_probability"].values - y, change, atol=1e-5)
    np.testing.assert_allclose(result["drop"].values, 100 * np.maximum(0, -change) / y, atol=1e-3)


def test_map_shape_mismatch_and_nan_are_clear_errors(tiny_cnn):
    inputs = normal(2, 3, 32, 32, seed=0)
    with pytest.raises(ScorecamError, match="do not match"):
        average_drop_increase(tiny_cnn, inputs, np.zeros((2, 8, 8)))
    bad = np.zeros((2, 32, 32))
    bad[0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        deletion(tiny_cnn, inputs, bad)


# ---- deletion / insertion ----------------------------------------------------------------


def test_blur_kernel_is_rises_gkern():
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1.0
    np.testing.assert_allclose(rise_blur_kernel(11, 5), gaussian_filter(impulse, 5), atol=1e-12)
    assert rise_blur_kernel(11, 5).sum() == pytest.approx(1.0)
    # RISE blurs with conv2d(x, kern (3, 3, k, k) diagonal, padding=k // 2)
    kernel = torch.zeros(3, 3, 11, 11)
    for c in range(3):
        kernel[c, c] = torch.from_numpy(gaussian_filter(impulse, 5)).float()
    x = normal(2, 3, 20, 24, seed=1)
    np.testing.assert_allclose(
        rise_blur(x).numpy(), torch.nn.functional.conv2d(x, kernel, padding=5).numpy(), atol=1e-5
    )
    with pytest.raises(ScorecamError, match="odd"):
        rise_blur_kernel(10, 5)


def test_curve_area_by_hand_and_equal_to_rises_auc_when_the_step_divides():
    assert curve_area(np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    scores = np.random.default_rng(0).uniform(size=11)
    rise_auc = (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.size - 1)
    assert curve_area(np.linspace(0, 1, 11), scores) == pytest.approx(rise_auc)
    # a last, shorter step gets its real width
    assert curve_area(np.array([0.0, 0.6, 1.0]), np.array([1.0, 1.0, 0.0])) == pytest.approx(0.6 + 0.2)


def test_saliency_ranks_and_step_size():
    ranks = saliency_ranks(torch.tensor([[[0.2, 0.9], [0.2, 0.5]]]))
    assert ranks.tolist() == [[2, 0, 3, 1]]  # 0.9 first, then 0.5, ties row-major
    assert step_size(50176, 0.01) == 502
    assert step_size(10, 0.01) == 1


def rise_reference(model: nn.Module, image: torch.Tensor, saliency: np.ndarray, cls: int, step: int, mode: str):
    """RISE's CausalMetric.single_run loop (softmax model, in-place pixel copy), in numpy."""
    hw = saliency.size
    n_steps = (hw + step - 1) // step
    if mode == "del":
        start, finish = image.clone().numpy(), np.zeros_like(image.numpy())
    else:
        start, finish = rise_blur(image[None])[0].numpy(), image.clone().numpy()
    order = np.argsort(-saliency.reshape(-1), kind="stable")
    scores = []
    for i in range(n_steps + 1):
        with torch.no_grad():
            probabilities = torch.softmax(model(torch.from_numpy(start)[None]), 1)
        scores.append(float(probabilities[0, cls]))
        coords = order[step * i : step * (i + 1)]
        start.reshape(3, hw)[:, coords] = finish.reshape(3, hw)[:, coords]
    scores = np.array(scores)
    return scores, (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.size - 1)


@pytest.mark.parametrize("mode", ["del", "ins"])
def test_deletion_insertion_match_rises_loop(tiny_cnn, mode):
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 32, 32)
    maps = gradcam_pp(tiny_cnn, inputs, "features.0")
    maps.values[:] += np.random.default_rng(0).uniform(0, 1e-3, maps.shape)  # no ties
    step_fraction = 64 / 1024  # 64 pixels per step: divides the 1024 pixels
    metric = deletion if mode == "del" else insertion
    result = metric(tiny_cnn, inputs, maps, step_fraction=step_fraction, batch_size=7)
    assert result.sizes["step"] == 17
    assert result.attrs["forward_passes"] == 2 * 17 + 2
    for i in range(2):
        cls = int(maps.coords["target"].values[i])
        curve, auc = rise_reference(tiny_cnn, inputs[i], maps.values[i], cls, 64, mode)
        # batches of 7 against RISE's one input at a time: probabilities equal up to float32 rounding
        np.testing.assert_allclose(result["curve"].values[i], curve, atol=1e-5)
        assert result["auc"].values[i] == pytest.approx(auc, abs=1e-5)
    protocol = json.loads(result.attrs["protocol"])
    assert protocol["step_pixels"] == 64
    if mode == "ins":
        assert protocol["blur_kernel"] == 11 and protocol["blur_sigma"] == 5.0
        assert "blur" in protocol["substrate"]
    else:
        assert "zeros" in protocol["substrate"]


def test_deletion_curve_ends_on_the_substrate(tiny_cnn):
    inputs = normal(1, 3, 32, 32, seed=2)
    maps = np.random.default_rng(1).uniform(size=(1, 32, 32))
    deleted, inserted = deletion_insertion(tiny_cnn, inputs, maps, 3, step_fraction=0.3)
    zero_probability = torch.softmax(tiny_cnn(torch.zeros(1, 3, 32, 32)), 1)[0, 3].item()
    full_probability = torch.softmax(tiny_cnn(inputs), 1)[0, 3].item()
    # the curves' batches of steps against single forwards: equal up to float32 rounding
    assert deleted["curve"].values[0, 0] == pytest.approx(full_probability, abs=1e-5)
    assert deleted["curve"].values[0, -1] == pytest.approx(zero_probability, abs=1e-5)
    assert inserted["curve"].values[0, -1] == pytest.approx(full_probability, abs=1e-5)
    np.testing.assert_allclose(deleted["fraction"].values, [0, 307 / 1024, 614 / 1024, 921 / 1024, 1.0])


# ---- energy pointing game ----------------------------------------------------------------


def test_energy_pointing_game_by_hand():
    saliency = np.array([[[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 10.0]]])  # total 20
    maps = xr.DataArray(saliency, dims=("image", "y", "x"), coords={"image": ["a"]})
    assert energy_pointing_game(maps, {"a": [0, 0, 2, 2]}).values[0] == pytest.approx(10 / 20)
    assert energy_pointing_game(maps, {"a": [[0, 0, 2, 2], [2, 2, 3, 3]]}).values[0] == pytest.approx(20 / 20)
    assert energy_pointing_game(saliency, [[1, 0, 3, 1]]).values[0] == pytest.approx(2 / 20)
    # fractional box: pixel centres decide (centre of column 1 is 1.5)
    assert energy_pointing_game(saliency, [[0.0, 0.0, 1.4, 3.0]]).values[0] == pytest.approx(4 / 20)


def test_energy_pointing_game_errors():
    saliency = np.ones((1, 4, 4))
    with pytest.raises(BoxError, match="outside"):
        energy_pointing_game(saliency, [[0, 0, 5, 4]])
    with pytest.raises(BoxError, match="outside"):
        energy_pointing_game(saliency, [[-1, 0, 2, 2]])
    with pytest.raises(BoxError, match="empty"):
        energy_pointing_game(saliency, [[2, 2, 2, 3]])
    with pytest.raises(BoxError, match="four numbers"):
        energy_pointing_game(saliency, [[0, 0, 2]])
    with pytest.raises(BoxError, match="unknown images"):
        energy_pointing_game(xr.DataArray(saliency, dims=("image", "y", "x"), coords={"image": ["a"]}), {"b": [0, 0, 1, 1]})
    zero = energy_pointing_game(np.zeros((2, 4, 4)) + np.array([0, 1])[:, None, None], [[0, 0, 2, 2]] * 2)
    assert math.isnan(zero.values[0]) and zero.values[1] == pytest.approx(0.25)
    assert zero.attrs["zero_maps"] == "image-0" and zero.attrs["mean"] == pytest.approx(0.25)


# ---- correlations ------------------------------------------------------------------------


def test_rank_correlations_match_scipy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(size=200)
    np.testing.assert_allclose(rank_data(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic)
    assert math.isnan(spearman(np.zeros(5), b[:5]))


# ---- sanity check ------------------------------------------------------------------------


def test_cascade_groups(tiny_cnn):
    assert cascade_groups(tiny_cnn) == ["classifier", "features.3", "features.0"]
    assert cascade_groups(tiny_cnn, depth=1) == ["classifier", "features"]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_sanity_check_gradient_methods_leave_the_model_alone(tiny_cnn, method):
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 32, 32)
    result = sanity_check(tiny_cnn, inputs, "features.3", method=method, seed=1)
    assert list(result.coords["randomised"].values) == ["none", "classifier", "features.3", "features.0"]
    np.testing.assert_allclose(result["spearman"].sel(step=0).values, 1.0)
    # randomising the head alone changes the gradients: the map changes
    assert (result["spearman"].sel(step=1).values < 0.999).all()
    for key, value in tiny_cnn.state_dict().items():
        torch.testing.assert_close(value, before[key])
    # reproducible: the same seed gives the same numbers, the caller's RNG is untouched
    state = torch.random.get_rng_state()
    again = sanity_check(tiny_cnn, inputs, "features.3", method=method, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_allclose(again["spearman"].values, result["spearman"].values)
    # model calls: both images fit one batch; the targets' pass, then one call per step
    assert result.attrs["forward_passes"] == 1 + 4


def test_sanity_check_against_a_manual_cascade(tiny_cnn):
    import copy

    from scorecam_explorer.metrics.sanity import randomise_group

    inputs = normal(1, 3, 32, 32, seed=3)
    result = sanity_check(tiny_cnn, inputs, "features.3", 2, method="gradcam", groups=["classifier", "features.3"], seed=5)
    original = gradcam(tiny_cnn, inputs, "features.3", 2).values[0]
    manual = copy.deepcopy(tiny_cnn)
    randomise_group(manual, "classifier", 6)
    step1 = gradcam(manual, inputs, "features.3", 2).values[0]
    assert result["spearman"].values[0, 1] == pytest.approx(stats.spearmanr(original.ravel(), step1.ravel()).statistic)


def test_sanity_check_bad_arguments(tiny_cnn):
    inputs = normal(1, 3, 32, 32, seed=4)
    with pytest.raises(ScorecamError, match="unknown method"):
        sanity_check(tiny_cnn, inputs, method="gradcamm")
    with pytest.raises(ScorecamError, match="no module"):
        sanity_check(tiny_cnn, inputs, groups=["clasifier"])
    with pytest.raises(UnknownLayerError):
        sanity_check(tiny_cnn, inputs, "nope")


# ---- top-k fidelity and Score-CAM sanity (from caches) -----------------------------------


@pytest.fixture(scope="module")
def tiny_cache():
    from conftest import TinyCNN

    from scorecam_explorer.engine import compute_cache

    torch.manual_seed(0)
    model = TinyCNN().eval()
    inputs = torch.randn(2, 3, 32, 32)
    return model, inputs, compute_cache(model, inputs, "features.3", progress=False, device="cpu", batch_size=16)


def test_topk_fidelity_against_a_hand_computation(tiny_cache):
    _, _, cache = tiny_cache
    result = topk_fidelity(cache, "features.3", target=[1, 4], ks=[1, 3, 16], resolution="feature")
    assert result.dims == ("image", "k") and list(result.coords["k"].values) == [1, 3, 16]
    activation = cache["features.3"].ds["activation"].values.astype(np.float64)
    masked = cache["features.3"].ds["masked_logits"].values.astype(np.float64)
    baseline = cache.ds["baseline_logits"].values.astype(np.float64)
    for i, cls in enumerate([1, 4]):
        scores = masked[i, :, cls] - baseline[i, cls]  # the paper: CIC_k = f(X*H_k) - f(X_b)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        order = np.argsort(-weights, kind="stable")

        def hand_map(kept):
            summed = np.maximum(np.tensordot(weights[kept], activation[i, kept], axes=1), 0)
            return (summed - summed.min()) / (summed.max() - summed.min())

        full = hand_map(order)
        for column, k in enumerate([1, 3, 16]):
            expected = stats.pearsonr(hand_map(order[:k]).ravel(), full.ravel()).statistic
            # float32 maps (BLAS sums, ordered by CPU) against float64 by hand: r to ~1e-6
            assert result.values[i, column] == pytest.approx(expected, abs=1e-5)
    assert result.values[:, -1] == pytest.approx([1.0, 1.0])
    assert json.loads(result.attrs["mean_by_k"])["16"] == pytest.approx(1.0)
    with pytest.raises(ScorecamError, match="every k"):
        topk_fidelity(cache, "features.3", ks=[0])
    with pytest.raises(UnknownLayerError, match="features.3"):
        topk_fidelity(cache, "features.33")


def test_topk_fidelity_default_ks(tiny_cache):
    _, _, cache = tiny_cache
    result = topk_fidelity(cache)  # the cache's only layer, top-1 classes
    assert list(result.coords["k"].values) == [1, 2, 4, 8, 16]
    assert np.all(np.diff(result.values, axis=1)[:, -1] >= 0)  # the last step reaches r = 1


def topk_fidelity_map_by_map(cache, layer, target, ks, preset, resolution):
    """Top-k fidelity as it was computed before the kernel: each top-k map composed, then r."""
    from scorecam_explorer.compose import scorecam, top_channels_by_weight

    full = scorecam(cache, layer, target, preset=preset, resolution=resolution)
    targets = [int(t) for t in full.coords["target"].values]
    values = np.empty((full.sizes["image"], len(ks)))
    for column, k in enumerate(ks):
        kept = top_channels_by_weight(cache, layer, targets, int(k), preset=preset)
        partial = scorecam(cache, layer, targets, preset=preset, channels=kept, resolution=resolution)
        for row in range(full.sizes["image"]):
            values[row, column] = pearson(partial.values[row], full.values[row])
    return values


@pytest.mark.parametrize("preset", ["paper", "official", "pytorch-grad-cam", "torchcam"])
@pytest.mark.parametrize("resolution", ["input", "feature"])
@pytest.mark.parametrize("convention", ["paper", "pytorch-grad-cam"])  # align_corners False, True
def test_topk_fidelity_is_unchanged_by_the_shared_kernel(preset, resolution, convention):
    """The kernel's r equals the map-by-map r (float32 maps) to rounding, NaN where it was NaN:
    every preset, both resolutions, both align_corners of the cache's convention, given
    classes, each image's top-1 class, and a top-1 map that ReLU empties."""
    from _tiny_models import TinyCNN

    from scorecam_explorer.engine import compute_cache

    torch.manual_seed(1)
    model = TinyCNN().eval()
    inputs = torch.randn(3, 3, 37, 29)
    cache = compute_cache(model, inputs, "features.3", convention=convention, progress=False, device="cpu")
    node = cache["features.3"].to_dataset(inherit=False)
    assert node.sizes["fy"] < 37  # the maps are upsampled to the input
    for target in (None, [1, 4, 7]):
        ks = [1, 2, 3, 5, 8, 16]
        new = topk_fidelity(cache, "features.3", target, ks, preset=preset, resolution=resolution)
        old = topk_fidelity_map_by_map(cache, "features.3", target, ks, preset, resolution)
        np.testing.assert_allclose(new.values, old, rtol=0, atol=1e-6)  # NaN where NaN
    # the heaviest channel of image 0 made negative everywhere: its top-1 map is all zero
    from scorecam_explorer.compose import channel_weights

    heaviest = int(np.argmax(channel_weights(cache, "features.3", 2, preset=preset, image=0).values))
    activation = node["activation"].values.copy()
    activation[0, heaviest] = -1.0 - np.abs(activation[0, heaviest])
    tree = cache.copy()
    tree["features.3"] = node.assign(activation=(node["activation"].dims, activation))
    new = topk_fidelity(tree, "features.3", 2, [1, 2, 16], preset=preset, resolution=resolution)
    old = topk_fidelity_map_by_map(tree, "features.3", 2, [1, 2, 16], preset, resolution)
    np.testing.assert_allclose(new.values, old, rtol=0, atol=1e-6)


def test_sanity_check_scorecam_against_a_manual_cascade(tiny_cache):
    import copy

    from scorecam_explorer.compose import scorecam
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.metrics.sanity import randomise_group

    model, inputs, cache = tiny_cache
    result = sanity_check(model, inputs, "features.3", [1, 4], method="scorecam", groups=["features.3"], seed=2)
    manual = copy.deepcopy(model)
    randomise_group(manual, "features.3", 3)
    randomised = compute_cache(manual, inputs, "features.3", progress=False, device="cpu")
    before = scorecam(cache, "features.3", [1, 4]).values
    after = scorecam(randomised, "features.3", [1, 4]).values
    for i in range(2):
        expected = stats.spearmanr(before[i].ravel(), after[i].ravel()).statistic
        assert result["spearman"].values[i, 1] == pytest.approx(expected, abs=1e-6)


def test_sanity_check_scorecam_uses_the_presets_mask_convention(tiny_cache):
    """With a preset whose masks are not the paper's, the sanity check's maps come from a
    cache computed with that preset's masks, as evaluation's do (not the default masks)."""
    import copy

    from scorecam_explorer.compose import scorecam
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.metrics.sanity import randomise_group

    model, inputs, _ = tiny_cache
    preset = "pytorch-grad-cam"
    result = sanity_check(
        model, inputs, "features.3", [1, 4], method="scorecam", preset=preset, groups=["features.3"], seed=2
    )

    def maps(network, convention):
        cache = compute_cache(network, inputs, "features.3", convention=convention, progress=False, device="cpu")
        return scorecam(cache, "features.3", [1, 4], preset=preset).values

    manual = copy.deepcopy(model)
    randomise_group(manual, "features.3", 3)
    for convention, agrees in (("pytorch-grad-cam", True), ("paper", False)):
        before, after = maps(model, convention), maps(manual, convention)
        expected = [stats.spearmanr(before[i].ravel(), after[i].ravel()).statistic for i in range(2)]
        close = np.allclose(result["spearman"].values[:, 1], expected, atol=1e-6)
        assert close == agrees, convention


class TopLevelCalls:
    """Counts every top-level module call in the process (any model, any copy of it),
    with torch's global hooks: a call made while no other module is running. Independent
    of how the code under test counts, and invisible to it (no hook on the model itself,
    so faster copies are still made, checked and used)."""

    def __init__(self) -> None:
        self.calls = 0
        self._depth = 0

    def __enter__(self) -> TopLevelCalls:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [
            register_module_forward_pre_hook(self._enter),
            register_module_forward_hook(self._leave, always_call=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _enter(self, module, args) -> None:
        self.calls += self._depth == 0
        self._depth += 1

    def _leave(self, module, args, output) -> None:
        self._depth -= 1


@pytest.mark.parametrize(
    ("method", "model_kind", "layer", "batch_size"),
    [("scorecam", "batchnorm", "3", 5), ("scorecam", "tiny", "features.3", 16), ("gradcam", "tiny", "features.3", 1)],
)
def test_sanity_check_counts_every_model_call(method, model_kind, layer, batch_size):
    """forward_passes equals the model calls that really happened: the targets' pass, the
    engine's probe and copy checks (a BatchNorm model gets folded copies, checked once per
    randomised copy), unmasked, baseline and masked batches."""
    from _tiny_models import batchnorm_cnn

    from conftest import TinyCNN

    torch.manual_seed(0)
    model = batchnorm_cnn() if model_kind == "batchnorm" else TinyCNN().eval()
    inputs = normal(3, 3, 16, 16, seed=8)
    with TopLevelCalls() as counted:
        result = sanity_check(
            model, inputs, layer, 0, method=method, groups=[cascade_groups(model)[0]], batch_size=batch_size
        )
    assert counted.calls > 0
    assert result.attrs["forward_passes"] == counted.calls


# ---- argument checks, before any forward pass ---------------------------------------------


def count_forward_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


BAD_METRIC_ARGUMENTS = [
    (average_drop_increase, {"batch_size": 0}, "batch_size must be a positive integer"),
    (average_drop_increase, {"batch_size": -1}, "batch_size must be a positive integer"),
    (average_drop_increase, {"keep_fraction": 0.0}, "keep_fraction"),
    (average_drop_increase, {"space": "pixel"}, "unknown space"),
    (deletion, {"batch_size": 0}, "batch_size must be a positive integer"),
    (deletion, {"step_fraction": 0.0}, "step_fraction"),
    (insertion, {"batch_size": 2.0}, "batch_size must be a positive integer"),
    (insertion, {"blur_kernel": 4}, "blur kernel"),
    (insertion, {"blur_sigma": 0.0}, "blur sigma"),
    (deletion_insertion, {"batch_size": 0}, "batch_size must be a positive integer"),
]


@pytest.mark.parametrize(("metric", "arguments", "message"), BAD_METRIC_ARGUMENTS)
def test_bad_metric_arguments_fail_before_any_forward_pass(tiny_cnn, metric, arguments, message):
    calls = count_forward_calls(tiny_cnn)
    inputs = normal(2, 3, 32, 32, seed=5)
    with pytest.raises(ScorecamError, match=message):
        metric(tiny_cnn, inputs, np.full((2, 32, 32), 0.5, dtype=np.float32), 1, **arguments)
    assert not calls


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"depth": 0}, "depth must be an integer of at least 1"),
        ({"method": "scorecam", "preset": "papr"}, "unknown preset"),
    ],
)
def test_bad_sanity_arguments_fail_before_any_forward_pass(tiny_cnn, arguments, message):
    calls = count_forward_calls(tiny_cnn)
    with pytest.raises(ScorecamError, match=message):
        sanity_check(tiny_cnn, normal(1, 3, 32, 32, seed=6), "features.3", **arguments)
    assert not calls


def test_energy_pointing_game_takes_integer_image_keys():
    saliency = np.zeros((2, 4, 4))
    saliency[0, :2, :2] = 1.0
    saliency[1] = 1.0
    maps = xr.DataArray(saliency, dims=("image", "y", "x"), coords={"image": [0, 1]})
    by_int = energy_pointing_game(maps, {0: [0, 0, 2, 2], 1: [0, 0, 2, 2]})
    by_str = energy_pointing_game(maps, {"0": [0, 0, 2, 2], "1": [0, 0, 2, 2]})
    np.testing.assert_allclose(by_int.values, [1.0, 0.25])
    np.testing.assert_array_equal(by_int.values, by_str.values)
    assert list(by_int.coords["image"].values) == ["0", "1"]
    with pytest.raises(BoxError, match="twice"):
        energy_pointing_game(maps, {0: [0, 0, 2, 2], "0": [0, 0, 1, 1]})
    with pytest.raises(BoxError, match="unknown images: 2"):
        energy_pointing_game(maps, {2: [0, 0, 2, 2]})


# ---- the caller's random state -----------------------------------------------------------


def test_randomise_group_leaves_every_random_generator_alone(tiny_cnn, monkeypatch):
    from scorecam_explorer.metrics.sanity import cuda_devices_of, randomise_group

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(("one", seed)))
    assert cuda_devices_of(tiny_cnn) == []
    state = torch.random.get_rng_state()
    first = randomise_group(tiny_cnn, "classifier", seed=7)
    weights = tiny_cnn.classifier.weight.detach().clone()
    assert torch.equal(state, torch.random.get_rng_state())
    assert seeded == []  # a model on the CPU reseeds no GPU (torch.manual_seed would reseed them all)
    assert randomise_group(tiny_cnn, "classifier", seed=7) == first
    torch.testing.assert_close(tiny_cnn.classifier.weight, weights)  # the seed decides the draw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_randomise_group_on_a_gpu_restores_its_generator(tiny_cnn):
    from scorecam_explorer.metrics.sanity import cuda_devices_of, randomise_group

    model = tiny_cnn.cuda()
    assert cuda_devices_of(model) == [torch.cuda.current_device()]
    cpu_state, gpu_state = torch.random.get_rng_state(), torch.cuda.get_rng_state()
    randomise_group(model, "features.0", seed=3)
    weights = model.features[0].weight.detach().clone()
    assert torch.equal(cpu_state, torch.random.get_rng_state())
    assert torch.equal(gpu_state, torch.cuda.get_rng_state())
    randomise_group(model, "features.0", seed=3)
    torch.testing.assert_close(model.features[0].weight, weights)
    inputs = normal(2, 3, 32, 32, seed=7)
    on_gpu = sanity_check(model, inputs, "features.3", 1, method="gradcam", seed=2)
    on_cpu = sanity_check(model.cpu(), inputs, "features.3", 1, method="gradcam", seed=2)
    assert torch.equal(gpu_state, torch.cuda.get_rng_state())
    assert on_gpu.sizes == on_cpu.sizes
