"""The shared array kernels against independent computations (written out another way)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import special, stats

from scorecam_explorer import kernels
from scorecam_explorer.errors import NonFiniteError, ScorecamError
from scorecam_explorer.presets import PRESETS
from scorecam_explorer.resize import resize_bilinear

RNG = np.random.default_rng(7)


# ---- min-max -----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 1e-7])
def test_min_max_matches_the_formula_map_by_map(eps: float) -> None:
    maps = RNG.normal(size=(3, 2, 5, 4))
    result = kernels.min_max(maps, eps)
    for index in np.ndindex(maps.shape[:2]):
        one = maps[index]
        expected = (one - one.min()) / (np.ptp(one) + eps)
        np.testing.assert_allclose(result[index], expected, rtol=1e-12, atol=0)
    assert result.min() == 0.0 and np.all(result <= 1.0)


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_min_max_of_a_constant_map_is_zero_not_nan(eps: float) -> None:
    maps = np.stack([np.zeros((4, 4)), np.full((4, 4), 3.5), RNG.normal(size=(4, 4))])
    result = kernels.min_max(maps, eps)
    assert np.all(result[:2] == 0.0)
    assert np.isfinite(result).all()


@pytest.mark.parametrize("eps", [0.0, 1e-7])
def test_min_max_float32_stays_float32_and_close_to_float64(eps: float) -> None:
    maps = RNG.normal(size=(2, 6, 7)).astype(np.float32)
    result = kernels.min_max_float32(maps, eps)
    assert result.dtype == np.float32
    low = maps.astype(np.float64).min(axis=(-2, -1), keepdims=True)
    span = maps.astype(np.float64).max(axis=(-2, -1), keepdims=True) - low
    np.testing.assert_allclose(result, (maps - low) / (span + eps), atol=1e-6)
    constant = kernels.min_max_float32(np.full((1, 3, 3), 2.0, np.float32), eps)
    assert constant.dtype == np.float32 and np.all(constant == 0.0)


# ---- probabilities -----------------------------------------------------------------------


def test_softmax_and_log_normalizer_match_scipy() -> None:
    scores = RNG.normal(scale=5.0, size=(3, 4, 10))
    np.testing.assert_allclose(kernels.softmax(scores), special.softmax(scores, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(kernels.log_normalizer(scores), special.logsumexp(scores, axis=-1), rtol=1e-12)


def test_softmax_and_log_normalizer_do_not_overflow() -> None:
    scores = np.array([[1000.0, 1001.0, 999.0]])
    probabilities = kernels.softmax(scores)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(), 1.0)
    np.testing.assert_allclose(kernels.log_normalizer(scores.astype(np.float32)), [1001.0 + np.log1p(np.exp(-1) + np.exp(-2))])


# ---- the weights pipeline ----------------------------------------------------------------


def _outputs(n_images: int = 2, n_channels: int = 5, n_classes: int = 4) -> tuple[np.ndarray, ...]:
    masked = RNG.normal(size=(n_images, n_channels, n_classes)).astype(np.float32)
    logits = RNG.normal(size=(n_images, n_classes)).astype(np.float32)
    baseline = RNG.normal(size=(n_images, n_classes)).astype(np.float32)
    constant = np.zeros((n_images, n_channels), dtype=bool)
    constant[0, 1] = True
    return masked, logits, baseline, constant


def test_target_scores_pick_each_image_s_target_class() -> None:
    masked, logits, baseline, constant = _outputs()
    targets = np.array([3, 0])
    scores = kernels.target_scores(masked, logits, baseline, constant, targets)
    for i, c in enumerate(targets):
        np.testing.assert_array_equal(scores.masked_logit[i], masked[i, :, c].astype(np.float64))
        assert scores.logit[i] == np.float64(logits[i, c])
        assert scores.baseline_logit[i] == np.float64(baseline[i, c])
        expected = np.exp(masked[i, :, c].astype(np.float64)) / np.exp(masked[i].astype(np.float64)).sum(-1)
        np.testing.assert_allclose(scores.masked_probability[i], expected, rtol=1e-10)
    np.testing.assert_array_equal(scores.constant, constant)


def test_target_scores_with_rows_select_from_a_larger_array() -> None:
    masked, logits, baseline, constant = _outputs(n_images=3)
    rows = np.array([2, 0])
    scores = kernels.target_scores(masked, logits[rows], baseline[rows], constant, np.array([1, 1]), rows=rows)
    np.testing.assert_array_equal(scores.masked_logit, masked[rows, :, 1].astype(np.float64))
    np.testing.assert_array_equal(scores.constant, constant[rows])


def test_preset_weights_follow_each_preset_s_formula() -> None:
    masked, logits, baseline, constant = _outputs()
    targets = np.array([1, 2])
    scores = kernels.target_scores(masked, logits, baseline, constant, targets)
    for i, c in enumerate(targets):
        increase = masked[i, :, c].astype(np.float64) - float(baseline[i, c])
        paper = kernels.preset_weights(PRESETS["paper"], scores, layer="x")[i]
        np.testing.assert_allclose(paper, np.exp(increase) / np.exp(increase).sum(), rtol=1e-12)
        official = kernels.preset_weights(PRESETS["official"], scores, layer="x")[i]
        probability = special.softmax(masked[i].astype(np.float64), axis=-1)[:, c]
        np.testing.assert_allclose(official, np.where(constant[i], 0.0, probability), rtol=1e-10)


def test_preset_weights_refuse_nan() -> None:
    masked, logits, baseline, constant = _outputs()
    masked[1, 2, :] = np.nan
    scores = kernels.target_scores(masked, logits, baseline, constant, np.array([0, 0]))
    with pytest.raises(NonFiniteError, match="weights of layer 'layer4' are not finite: the store"):
        kernels.preset_weights(PRESETS["paper"], scores, layer="layer4", reason="the store holds NaN")


# ---- rankings ----------------------------------------------------------------------------


def _sorted_ids(values: list[float], active: list[bool] | None = None) -> list[int]:
    ids = range(len(values))
    on = [i for i in ids if active is None or active[i]]
    off = [i for i in ids if active is not None and not active[i]]
    return sorted(on, key=lambda i: (-values[i], i)) + off


def test_rank_order_top_k_and_ranks_with_ties() -> None:
    values = np.array([[0.2, 0.5, 0.5, 0.1, 0.5], [3.0, -1.0, 3.0, 0.0, 2.0]])
    active = np.array([[True, False, True, True, True], [True, True, True, True, True]])
    for row in range(2):
        expected = _sorted_ids(list(values[row]))
        assert list(kernels.rank_order(values)[row]) == expected
        assert list(kernels.ranks(values)[row]) == [expected.index(k) for k in range(values.shape[1])]
        masked_order = _sorted_ids(list(values[row]), list(active[row]))
        assert list(kernels.rank_order(values, active)[row]) == masked_order
        for k in range(1, 6):
            kept = kernels.top_k_mask(values, k, active)[row]
            assert set(np.flatnonzero(kept)) == {i for i in masked_order[:k] if active[row, i]}
            assert set(np.flatnonzero(kernels.top_k_mask(values, k)[row])) == set(expected[:k])


# ---- the engine's masks ------------------------------------------------------------------


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("normalize", ["after_upsample", "before_upsample"])
def test_engine_mask_is_min_max_of_the_bilinear_upsampling(align: bool, normalize: str) -> None:
    values = RNG.normal(size=(7, 7)).astype(np.float32)
    convention = {"align_corners": align, "normalize": normalize, "eps": 0.0}
    mask = kernels.engine_mask(values, (50, 60), convention, constant=False)
    assert mask.dtype == np.float32 and mask.shape == (50, 60)
    wide = values.astype(np.float64)
    if normalize == "after_upsample":
        up = resize_bilinear(wide, (50, 60), align_corners=align)
        expected = (up - up.min()) / np.ptp(up)
    else:
        expected = resize_bilinear((wide - wide.min()) / np.ptp(wide), (50, 60), align_corners=align)
    np.testing.assert_allclose(mask, expected, atol=2e-6)


def test_engine_mask_of_a_constant_channel_is_zero() -> None:
    values = RNG.normal(size=(4, 4)).astype(np.float32)
    assert np.all(kernels.engine_mask(values, (9, 9), {}, constant=True) == 0.0)
    # Normalised before upsampling, a constant map is 0 and stays 0. (After upsampling, the
    # float32 rounding of a constant map is not constant: that is why the cache flags them.)
    convention = {"eps": 1e-7, "normalize": "before_upsample"}
    flat = kernels.engine_mask(np.full((4, 4), 1.5, np.float32), (9, 9), convention, constant=False)
    assert np.all(flat == 0.0)


def test_engine_mask_matches_torch_bit_for_bit_where_it_uses_fused_steps() -> None:
    torch = pytest.importorskip("torch")
    values = RNG.normal(size=(7, 7)).astype(np.float32)
    for size in [(32, 32), (224, 224)]:
        upsampled = torch.nn.functional.interpolate(
            torch.from_numpy(values)[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(kernels.bilinear_float32(values, size, False), upsampled, atol=1e-6, rtol=0)


# ---- Pearson and top-k fidelity ----------------------------------------------------------


def test_pearson_matches_numpy_and_scipy() -> None:
    a, b = RNG.normal(size=(6, 5)), RNG.normal(size=30)
    assert kernels.pearson(a, b) == pytest.approx(np.corrcoef(a.ravel(), b)[0, 1], abs=1e-12)
    assert kernels.pearson(a, b) == pytest.approx(stats.pearsonr(a.ravel(), b).statistic, abs=1e-12)


def test_pearson_of_a_constant_map_is_nan_and_sizes_must_agree() -> None:
    assert np.isnan(kernels.pearson(np.zeros((3, 3)), RNG.normal(size=(3, 3))))
    assert np.isnan(kernels.pearson(RNG.normal(size=9), np.full(9, 2.0)))
    with pytest.raises(ScorecamError, match="9 and 8 pixels"):
        kernels.pearson(np.ones(9), np.ones(8))


def _fidelity_by_hand(weights, maps, full, order, relu_at, align):  # type: ignore[no-untyped-def]
    """r(top-k map, full map) for k = 1..len(order), each top-k map built and upsampled."""
    values = []
    for k in range(1, len(order) + 1):
        summed = sum(weights[j] * maps[j].astype(np.float64) for j in order[:k])
        if relu_at == "feature":
            top = resize_bilinear(np.maximum(summed, 0.0), full.shape, align_corners=align)
        else:
            top = np.maximum(resize_bilinear(summed, full.shape, align_corners=align), 0.0)
        values.append(kernels.pearson(top, full) if np.ptp(top) > 1e-12 else np.nan)
    return np.array(values)


@pytest.mark.parametrize("align", [False, True])
def test_cumulative_fidelity_every_k_matches_maps_built_one_by_one(align: bool) -> None:
    weights = np.abs(RNG.normal(size=6))
    maps = RNG.normal(size=(6, 5, 5)).astype(np.float32)
    full = RNG.random((20, 20))
    order = kernels.rank_order(weights)
    expected = _fidelity_by_hand(weights, maps, full, order, "feature", align)
    result = kernels.cumulative_fidelity(weights, maps, full, order, None, align_corners=align)
    np.testing.assert_allclose(result, expected, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("relu_at", ["feature", "input"])
def test_cumulative_fidelity_at_given_k(relu_at: str) -> None:
    weights = RNG.normal(size=5)
    maps = RNG.normal(size=(5, 4, 6)).astype(np.float32)
    full = RNG.random((16, 24))
    order = kernels.rank_order(weights)
    ks = np.array([1, 3, 5])
    expected = _fidelity_by_hand(weights, maps, full, order, relu_at, False)[ks - 1]
    result = kernels.cumulative_fidelity(weights, maps, full, order, ks, relu_at=relu_at)
    np.testing.assert_allclose(result, expected, atol=1e-5, equal_nan=True)


def test_cumulative_fidelity_of_an_all_zero_top_k_map_is_nan() -> None:
    weights = np.array([-1.0, 2.0])  # the heaviest channel alone is all negative: nothing after ReLU
    maps = np.ones((2, 3, 3), dtype=np.float32)
    maps[0, 0, 0] = 4.0
    order = np.array([0, 1])
    full = RNG.random((6, 6))
    every_k = kernels.cumulative_fidelity(weights, maps, full, order, None)
    assert np.isnan(every_k[0]) and np.isfinite(every_k[1])
    sampled = kernels.cumulative_fidelity(weights, maps, full, order, np.array([1, 2]), relu_at="input")
    assert np.isnan(sampled[0]) and np.isfinite(sampled[1])


def test_kernels_import_no_torch() -> None:
    code = "import sys; import scorecam_explorer.kernels; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
