"""compose, presets and resize on small hand-built caches, against hand computations."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import xarray as xr

from scorecam_explorer import compose
from scorecam_explorer.cache import LayerArrays, build_cache
from scorecam_explorer.compose import (
    PRESETS,
    channel_contributions,
    channel_weights,
    scorecam,
    top_channels_by_variance,
    top_channels_by_weight,
)
from scorecam_explorer.conventions import MASK_CONVENTIONS
from scorecam_explorer.errors import (
    CacheError,
    NonFiniteError,
    ScorecamError,
    UnknownClassError,
    UnknownLayerError,
)
from scorecam_explorer.resize import interpolation_matrix, resize_adjoint, resize_bilinear


def make_cache(
    layers: dict[str, tuple[np.ndarray, np.ndarray]],
    logits: np.ndarray,
    baseline_logits: np.ndarray,
    *,
    constant: dict[str, np.ndarray] | None = None,
    class_names: list[str] | None = None,
    image_ids: list[str] | None = None,
    input_size: tuple[int, int] = (8, 8),
    convention: str = "paper",
) -> xr.DataTree:
    """A cache (docs/cache.md) from arrays: ``layers`` maps name -> (activation, masked_logits).

    A channel is constant where its activation is (unless ``constant`` says otherwise).
    """
    n_images, n_classes = logits.shape
    height, width = input_size
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (activation, masked_logits) in layers.items():
        flat = activation.reshape(*activation.shape[:2], -1)
        is_constant = (flat.max(-1) == flat.min(-1)) if constant is None else constant[name]
        arrays[name] = LayerArrays(
            activation=activation.astype(np.float32),
            masked_logits=masked_logits.astype(np.float32),
            constant=np.asarray(is_constant, dtype=bool),
        )
    return build_cache(
        pictures=rng.integers(0, 256, (n_images, height, width, 3), dtype=np.uint8),
        inputs=rng.normal(size=(n_images, 3, height, width)).astype(np.float32),
        logits=logits.astype(np.float32),
        baseline_logits=baseline_logits.astype(np.float32),
        image_ids=image_ids or [f"img{i}" for i in range(n_images)],
        class_names=class_names or [f"class {c}" for c in range(n_classes)],
        layers=arrays,
        model_name="hand-built",
        weights_fingerprint="0" * 16,
        preprocessing=None,
        convention=MASK_CONVENTIONS[convention],
        dtype="float32",
        device="cpu",
        forward_passes=0,
        seconds=0.0,
    )


def random_cache(
    n_images: int = 2,
    n_channels: int = 5,
    n_classes: int = 4,
    feature: tuple[int, int] = (3, 3),
    input_size: tuple[int, int] = (8, 8),
    seed: int = 1,
    **kwargs,
) -> xr.DataTree:
    rng = np.random.default_rng(seed)
    activation = rng.normal(size=(n_images, n_channels, *feature))
    masked = rng.normal(size=(n_images, n_channels, n_classes)) * 2
    logits = rng.normal(size=(n_images, n_classes))
    baseline = rng.normal(size=(n_images, n_classes))
    return make_cache({"block": (activation, masked)}, logits, baseline, input_size=input_size, **kwargs)


def arrays_of(cache: xr.DataTree, layer: str = "block"):
    node = cache[layer]
    return (
        node["activation"].values.astype(np.float64),
        node["masked_logits"].values.astype(np.float64),
        cache["logits"].values.astype(np.float64),
        cache["baseline_logits"].values.astype(np.float64),
        node["constant"].values,
    )


# ---- independent transcriptions (loops, math.exp, torch interpolation) ----------------------


def paper_by_hand(activation, masked, baseline, image, cls):
    """Algorithm 1 of Wang et al. 2020 at feature resolution, with loops."""
    n_channels = activation.shape[1]
    cic = [masked[image, k, cls] - baseline[image, cls] for k in range(n_channels)]
    total = sum(math.exp(s) for s in cic)
    alpha = [math.exp(s) / total for s in cic]
    height, width = activation.shape[2:]
    saliency = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            value = sum(alpha[k] * activation[image, k, y, x] for k in range(n_channels))
            saliency[y, x] = max(value, 0.0)
    return saliency, np.array(alpha)


def min_max(values):
    low, high = values.min(), values.max()
    return np.zeros_like(values) if high == low else (values - low) / (high - low)


def torch_upsample(maps: np.ndarray, size, align_corners: bool) -> np.ndarray:
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64))
    while tensor.ndim < 4:
        tensor = tensor[None]
    out = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=align_corners)
    return out.numpy().reshape(*maps.shape[:-2], *size)


# ---- resize ------------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape,size", [((7, 7), (224, 224)), ((2, 3), (64, 50)), ((13, 5), (4, 9)), ((1, 1), (5, 5))])
def test_resize_matches_torch(shape, size, align_corners):
    maps = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    expected = torch_upsample(maps.astype(np.float64), size, align_corners)
    result = resize_bilinear(maps, size, align_corners=align_corners)
    assert result.dtype == np.float32 and result.shape == (2, *size)
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_resize_matches_opencv_inter_linear():
    cv2 = pytest.importorskip("cv2")
    maps = np.random.default_rng(1).normal(size=(7, 9)).astype(np.float32)
    expected = cv2.resize(maps, (50, 40), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resize_bilinear(maps, (40, 50)), expected, atol=1e-5)


def test_resize_adjoint_is_the_transpose():
    rng = np.random.default_rng(2)
    small, big = rng.normal(size=(4, 6)), rng.normal(size=(17, 23))
    for align in (False, True):
        lhs = np.sum(big * resize_bilinear(small, big.shape, align_corners=align))
        rhs = np.sum(resize_adjoint(big, small.shape, align_corners=align) * small)
        assert lhs == pytest.approx(rhs, rel=1e-12)
    assert np.allclose(interpolation_matrix(5, 11).sum(axis=1), 1.0)


# ---- the presets against hand computations -------------------------------------------------


def test_paper_preset_is_algorithm_1():
    cache = random_cache()
    activation, masked, _, baseline, _ = arrays_of(cache)
    for image in range(2):
        for cls in range(4):
            saliency, alpha = paper_by_hand(activation, masked, baseline, image, cls)
            feature = scorecam(cache, "block", cls, resolution="feature", image=image)
            assert feature.dims == ("fy", "fx")
            np.testing.assert_allclose(feature.values, min_max(saliency), atol=1e-6)
            weights = channel_weights(cache, "block", cls, image=image)
            np.testing.assert_allclose(weights.values, alpha, rtol=1e-6)
            full = scorecam(cache, "block", cls, image=image)
            # the paper preset upsamples as the masks were (the paper convention: align_corners=False)
            expected = min_max(torch_upsample(saliency, (8, 8), align_corners=False))
            np.testing.assert_allclose(full.values, expected, atol=1e-6)


def test_softmax_presets_share_weights_because_softmax_is_shift_invariant():
    cache = random_cache()
    paper = channel_weights(cache, "block", 2, preset="paper")
    for name in ("pytorch-grad-cam", "torchcam"):
        np.testing.assert_allclose(channel_weights(cache, "block", 2, preset=name), paper, rtol=1e-9)
    # ...while the scores they report differ by the per-image shift
    _, masked, logits, baseline, _ = arrays_of(cache)
    scores = {
        name: channel_contributions(cache, "block", 2, preset=name)["score"].values
        for name in ("paper", "pytorch-grad-cam", "torchcam")
    }
    np.testing.assert_allclose(scores["pytorch-grad-cam"], masked[:, :, 2], rtol=1e-6)
    np.testing.assert_allclose(scores["paper"], masked[:, :, 2] - baseline[:, None, 2], rtol=1e-6)
    np.testing.assert_allclose(scores["torchcam"], masked[:, :, 2] - logits[:, None, 2], rtol=1e-6)


def test_official_preset_by_hand_with_a_constant_channel():
    base = random_cache(n_channels=4)
    activation, masked, logits, baseline, _ = arrays_of(base)
    activation[0, 1] = 0.7  # a constant channel: the official code skips it
    cache = make_cache({"block": (activation, masked)}, logits, baseline, convention="official")
    assert cache["block"]["constant"].values.tolist() == [[False, True, False, False], [False] * 4]
    cls = 3
    for image in range(2):
        total = np.zeros((8, 8))
        for k in range(4):
            if activation[image, k].max() == activation[image, k].min():
                continue  # (tested at feature resolution: in floats, Up(constant) may wobble)
            upsampled = torch_upsample(activation[image, k], (8, 8), align_corners=False)
            probability = np.exp(masked[image, k, cls]) / np.exp(masked[image, k]).sum()
            total += probability * upsampled
        expected = min_max(np.maximum(total, 0))
        result = scorecam(cache, "block", cls, preset="official", image=image)
        np.testing.assert_allclose(result.values, expected, atol=1e-6)
    weights = channel_weights(cache, "block", cls, preset="official")
    assert weights.values[0, 1] == 0.0 and weights.values[1, 1] > 0.0


def test_pytorch_grad_cam_preset_follows_scale_cam_image():
    cv2 = pytest.importorskip("cv2")
    cache = random_cache(n_channels=6, convention="pytorch-grad-cam", input_size=(20, 12))
    activation, masked, *_ = arrays_of(cache)
    cls = 1
    for image in range(2):
        scores = masked[image, :, cls]
        weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        cam = np.maximum((weights[:, None, None] * activation[image]).sum(0), 0)
        cam = (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())
        cam = cv2.resize(np.float32(cam), (12, 20))
        cam = (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())
        result = scorecam(cache, "block", cls, preset="pytorch-grad-cam", image=image)
        assert result.shape == (20, 12)
        np.testing.assert_allclose(result.values, cam, atol=1e-5)


# ---- targets, images, channels -----------------------------------------------------------------


@pytest.fixture(scope="module")
def named_cache() -> xr.DataTree:
    names = ["tabby", "tiger cat", "Egyptian cat", "crane", "crane", "espresso"]
    return random_cache(n_classes=6, class_names=names, image_ids=["sample:chelsea", "sample:coffee"])


def test_target_by_name_is_case_insensitive(named_cache):
    by_index = scorecam(named_cache, "block", 1)
    by_name = scorecam(named_cache, "block", "Tiger Cat")
    np.testing.assert_array_equal(by_index.values, by_name.values)
    assert list(by_name["target"].values) == [1, 1]
    assert list(by_name["target_name"].values) == ["tiger cat", "tiger cat"]


def test_unknown_targets_raise_with_closest_names(named_cache):
    with pytest.raises(UnknownClassError, match="tiger cat") as error:
        scorecam(named_cache, "block", "tigr cat")
    assert "Did you mean" in str(error.value)
    with pytest.raises(UnknownClassError, match="out of range.*6 classes"):
        scorecam(named_cache, "block", 6)
    with pytest.raises(UnknownClassError, match="out of range"):
        scorecam(named_cache, "block", -1)
    with pytest.raises(UnknownClassError, match="ambiguous.*3, 4"):
        scorecam(named_cache, "block", "crane")
    with pytest.raises(UnknownClassError, match="one per image"):
        scorecam(named_cache, "block", [1, 2, 3])


def test_unknown_class_name_with_no_close_match_lists_some_names(named_cache):
    with pytest.raises(UnknownClassError) as error:
        scorecam(named_cache, "block", "dog")
    message = str(error.value)
    assert "no class named 'dog' among this model's 6 classes" in message
    assert "Did you mean" not in message
    assert "tabby, tiger cat, Egyptian cat, crane, crane, espresso" in message
    many = random_cache(n_classes=20)
    with pytest.raises(UnknownClassError) as error:
        channel_contributions(many, "block", "dog")
    message = str(error.value)
    assert "The first 8 are: class 0, class 1," in message and "class 7, ..." in message
    assert "class 8" not in message
    assert "cache['class_name'].values lists all 20" in message and "0..19" in message


def test_one_target_per_image_and_top1_default(named_cache):
    per_image = scorecam(named_cache, "block", ["espresso", 2])
    assert list(per_image["target"].values) == [5, 2]
    np.testing.assert_array_equal(per_image.values[0], scorecam(named_cache, "block", 5, image=0).values)
    np.testing.assert_array_equal(per_image.values[1], scorecam(named_cache, "block", 2, image=1).values)
    top1 = scorecam(named_cache, "block", None)
    assert list(top1["target"].values) == list(named_cache["logits"].values.argmax(axis=1))


def test_image_selection_by_index_and_id(named_cache):
    by_id = scorecam(named_cache, "block", 0, image="sample:coffee")
    by_index = scorecam(named_cache, "block", 0, image=1)
    assert by_id.dims == ("y", "x") and str(by_id["image"].values) == "sample:coffee"
    np.testing.assert_array_equal(by_id.values, by_index.values)
    with pytest.raises(CacheError, match="sample:chelsea"):
        scorecam(named_cache, "block", 0, image="sample:chelsee")
    with pytest.raises(CacheError, match="out of range"):
        scorecam(named_cache, "block", 0, image=2)


def test_output_dims_dtype_and_range(named_cache):
    for name in PRESETS:
        full = scorecam(named_cache, "block", 0, preset=name)
        feature = scorecam(named_cache, "block", 0, preset=name, resolution="feature")
        assert full.dims == ("image", "y", "x") and full.shape == (2, 8, 8)
        assert feature.dims == ("image", "fy", "fx") and feature.shape == (2, 3, 3)
        for result in (full, feature):
            assert result.dtype == np.float32
            assert float(result.min()) >= 0.0 and float(result.max()) <= 1.0
            assert np.allclose(result.max(dim=result.dims[1:]), 1.0)
        assert full.attrs["preset"] == name and full.attrs["layer"] == "block"
    with pytest.raises(ScorecamError, match="resolution"):
        scorecam(named_cache, "block", 0, resolution="pixels")
    with pytest.raises(ScorecamError, match="unknown preset.*pytorch-grad-cam"):
        scorecam(named_cache, "block", 0, preset="pytorch_grad_cam")


def test_unknown_layer_suggests_cached_layers(named_cache):
    with pytest.raises(UnknownLayerError, match="Did you mean: block"):
        scorecam(named_cache, "blocks", 0)
    assert compose.cached_layers(named_cache) == ["block"]


def test_channel_subset_equals_a_cache_without_the_other_channels():
    cache = random_cache(n_channels=8, seed=4)
    keep = [0, 3, 4, 6]
    activation, masked, logits, baseline, _ = arrays_of(cache)
    smaller = make_cache({"block": (activation[:, keep], masked[:, keep])}, logits, baseline)
    for name in PRESETS:
        subset = scorecam(cache, "block", 1, preset=name, channels=keep)
        expected = scorecam(smaller, "block", 1, preset=name)
        np.testing.assert_allclose(subset.values, expected.values, atol=1e-6)
        mask = np.zeros(8, dtype=bool)
        mask[keep] = True
        np.testing.assert_array_equal(scorecam(cache, "block", 1, preset=name, channels=mask).values, subset.values)
    weights = channel_weights(cache, "block", 1, channels=keep)
    assert (weights.values[:, [1, 2, 5, 7]] == 0).all() and (weights.values[:, keep] > 0).all()
    assert list(scorecam(cache, "block", 1, channels=keep)["channels_used"].values) == [4, 4]


@pytest.mark.parametrize("function", [scorecam, channel_weights, channel_contributions])
def test_bad_channel_subsets_are_refused(function):
    cache = random_cache(n_channels=8)
    with pytest.raises(ScorecamError, match=r"0\.\.7"):
        function(cache, "block", 0, channels=[1, 8])
    with pytest.raises(ScorecamError, match="8 entries"):
        function(cache, "block", 0, channels=np.ones(5, dtype=bool))
    with pytest.raises(ScorecamError, match="one row per image"):
        function(cache, "block", 0, channels=np.ones((3, 8), dtype=bool))
    with pytest.raises(ScorecamError, match="integers"):
        function(cache, "block", 0, channels=[0.5, 1.5])
    with pytest.raises(ScorecamError, match="top_k"):
        function(cache, "block", 0, top_k=0)
    with pytest.raises(ScorecamError, match="top_k must be a positive integer"):
        function(cache, "block", 0, top_k=2.5)


@pytest.mark.parametrize("function", [scorecam, channel_weights, channel_contributions])
def test_top_k_must_lie_within_the_layers_channels(function):
    cache = random_cache(n_channels=8)
    for top_k in (0, 9, 99999):
        message = rf"layer block has 8 channels; top_k must be between 1 and 8, not {top_k}\."
        with pytest.raises(ScorecamError, match=message):
            function(cache, "block", 0, top_k=top_k)
    # the bound is the layer's channels, not the subset's: all of a subset is top_k = its size or more
    subset = function(cache, "block", 0, channels=[1, 2])
    xr.testing.assert_equal(function(cache, "block", 0, channels=[1, 2], top_k=8), subset)
    xr.testing.assert_equal(function(cache, "block", 0, top_k=8), function(cache, "block", 0))


def test_top_k_keeps_the_largest_weights_per_image():
    cache = random_cache(n_channels=10, seed=7)
    for name in PRESETS:
        weights = channel_weights(cache, "block", 2, preset=name).values
        top = top_channels_by_weight(cache, "block", 2, 3, preset=name)
        assert top.dims == ("image", "rank")
        for image in range(2):
            assert list(top.values[image]) == list(np.argsort(-weights[image], kind="stable")[:3])
            np.testing.assert_allclose(top["weight"].values[image], np.sort(weights[image])[::-1][:3])
        by_top_k = scorecam(cache, "block", 2, preset=name, top_k=3)
        by_channels = scorecam(cache, "block", 2, preset=name, channels=top)
        np.testing.assert_array_equal(by_top_k.values, by_channels.values)
        kept = channel_weights(cache, "block", 2, preset=name, top_k=3).values
        assert ((kept > 0).sum(axis=1) == 3).all()
    one = top_channels_by_weight(cache, "block", 2, 4, image=1)
    assert one.dims == ("rank",) and one.shape == (4,)


def test_top_channels_by_variance_is_faster_scorecam_max_n():
    cache = random_cache(n_channels=9, feature=(4, 5), seed=3)
    activation = cache["block"]["activation"].values.astype(np.float64)
    top = top_channels_by_variance(cache, "block", 4)
    for image in range(2):
        # tf-keras-vis ranks by the spatial standard deviation: the same order
        std = [np.sqrt(np.mean((a - a.mean()) ** 2)) for a in activation[image]]
        assert list(top.values[image]) == list(np.argsort(std)[::-1][:4])
    np.testing.assert_allclose(top["variance"].values[0], np.sort(activation[0].var(axis=(1, 2)))[::-1][:4])
    faster = scorecam(cache, "block", 0, channels=top)
    for image in range(2):
        alone = scorecam(cache, "block", 0, channels=top.values[image], image=image)
        np.testing.assert_array_equal(faster.values[image], alone.values)
    assert top_channels_by_variance(cache, "block", 50).shape == (2, 9)
    with pytest.raises(ScorecamError, match="positive"):
        top_channels_by_variance(cache, "block", 0)


# ---- all-zero maps, NaN, contributions --------------------------------------------------------


def test_map_that_relu_removes_stays_zero_not_nan():
    rng = np.random.default_rng(5)
    activation = -np.abs(rng.normal(size=(1, 4, 3, 3))) - 0.1  # every weighted sum is negative
    cache = make_cache({"block": (activation, rng.normal(size=(1, 4, 3)))}, rng.normal(size=(1, 3)), np.zeros((1, 3)))
    for name in PRESETS:
        for resolution in ("input", "feature"):
            result = scorecam(cache, "block", 0, preset=name, resolution=resolution)
            assert np.isfinite(result.values).all() and (result.values == 0).all()
        shares = channel_contributions(cache, "block", 0, preset=name)["share"]
        assert (shares.values == 0).all()
    # no channel at all gives an all-zero map too
    assert (scorecam(cache, "block", 0, channels=[]).values == 0).all()


def test_non_finite_outputs_raise():
    # (load_cache refuses such a cache; one built in memory and damaged afterwards is refused here)
    cache = random_cache()
    cache["block"]["masked_logits"].values[0, 2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="not finite"):
        scorecam(cache, "block", 1)
    cache = random_cache()
    cache["block"]["activation"].values[1, 0, 0, 0] = np.inf
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        scorecam(cache, "block", 0, image=1)


def test_not_a_cache_is_refused():
    with pytest.raises(CacheError, match="DataTree"):
        scorecam(xr.Dataset(), "block", 0)
    with pytest.raises(CacheError, match="logits"):
        scorecam(xr.DataTree(xr.Dataset({"a": ("x", [1])})), "block", 0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_channel_contributions_decompose_the_map(name):
    cache = random_cache(n_channels=6, seed=11)
    result = channel_contributions(cache, "block", 1, preset=name)
    activation, masked, *_ = arrays_of(cache)
    weights = channel_weights(cache, "block", 1, preset=name).values
    np.testing.assert_allclose(result["weight"].values, weights)
    np.testing.assert_allclose(result["contribution"].values, weights[:, :, None, None] * activation, rtol=1e-6)
    probability = np.exp(masked[:, :, 1]) / np.exp(masked).sum(axis=-1)
    np.testing.assert_allclose(result["probability"].values, probability, rtol=1e-6)
    np.testing.assert_allclose(result["variance"].values, activation.var(axis=(2, 3)), rtol=1e-6)
    shares = result["share"].values
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    summed = result["contribution"].values.sum(axis=1)
    if PRESETS[name].relu_at == "feature":
        # the share is the channel's part of the positive region's total
        region = summed > 0
        for image in range(2):
            for k in range(6):
                part = result["contribution"].values[image, k][region[image]].sum()
                assert shares[image, k] == pytest.approx(part / summed[image][region[image]].sum())
    else:
        # ReLU at input resolution: shares computed by upsampling every channel explicitly
        for image in range(2):
            upsampled = torch_upsample(result["contribution"].values[image], (8, 8), align_corners=False)
            region = upsampled.sum(axis=0) > 0
            parts = np.array([u[region].sum() for u in upsampled])
            np.testing.assert_allclose(shares[image], parts / parts.sum(), atol=1e-9)
    one = channel_contributions(cache, "block", 1, preset=name, image="img1")
    assert one["contribution"].dims == ("channel", "fy", "fx")
    np.testing.assert_allclose(one["share"].values, shares[1])


def map_from_contributions(contributions: xr.Dataset, preset_name: str, resolution: str, size) -> np.ndarray:
    """N(ReLU(S)) from S = sum_k contribution_k, with ReLU, Up and N placed as the preset says."""
    preset = PRESETS[preset_name]
    eps = preset.normalize_eps
    align = bool(preset.align_corners)  # None: the cache's convention, here paper (False)

    def normalise(maps):
        low = maps.min(axis=(-2, -1), keepdims=True)
        span = maps.max(axis=(-2, -1), keepdims=True) - low
        return np.where(span > 0, (maps - low) / np.where(span > 0, span + eps, 1.0), 0.0)

    summed = contributions["contribution"].values.sum(axis=-3)
    if resolution == "feature":
        return normalise(np.maximum(summed, 0.0))
    if preset.relu_at == "feature":
        return normalise(resize_bilinear(normalise(np.maximum(summed, 0.0)), size, align_corners=align))
    return normalise(np.maximum(resize_bilinear(summed, size, align_corners=align), 0.0))


@pytest.mark.parametrize("name", list(PRESETS))
def test_channel_contributions_of_a_subset_recompose_scorecam(name):
    cache = random_cache(n_channels=9, feature=(4, 3), input_size=(10, 7), seed=13)
    mask = np.zeros(9, dtype=bool)
    mask[[1, 2, 6, 8]] = True
    per_image = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])
    subsets = {
        "all": {},
        "ids": {"channels": [0, 3, 4, 7]},
        "mask": {"channels": mask},
        "per image": {"channels": per_image},
        "top_k": {"top_k": 3},
        "ids and top_k": {"channels": [0, 2, 3, 5, 8], "top_k": 2},
        "max_n by variance": {"channels": top_channels_by_variance(cache, "block", 4)},
        "top_k = the layer's channels": {"top_k": 9},
        "none": {"channels": []},
    }
    full = channel_contributions(cache, "block", 2, preset=name)
    for label, selection in subsets.items():
        result = channel_contributions(cache, "block", 2, preset=name, **selection)
        selected = result["selected"].values
        assert result["contribution"].shape == (2, 9, 4, 3), label
        used = scorecam(cache, "block", 2, preset=name, **selection)["channels_used"].values
        np.testing.assert_array_equal(selected.sum(axis=1), used, err_msg=label)
        weights = channel_weights(cache, "block", 2, preset=name, **selection).values
        np.testing.assert_array_equal(result["weight"].values, weights, err_msg=label)
        np.testing.assert_array_equal(result["weight"].values, np.where(selected, full["weight"].values, 0.0))
        assert (result["contribution"].values[~selected] == 0).all(), label
        assert (result["share"].values[~selected] == 0).all(), label
        totals = result["share"].values.sum(axis=1)
        assert np.allclose(totals, 1.0) or (label == "none" and (totals == 0).all()), label
        for variable in ("score", "probability", "variance", "constant"):  # independent of the subset
            np.testing.assert_array_equal(result[variable].values, full[variable].values, err_msg=label)
        assert result.attrs["top_k"] == selection.get("top_k", -1)
        for resolution in ("input", "feature"):
            expected = scorecam(cache, "block", 2, preset=name, resolution=resolution, **selection)
            recomposed = map_from_contributions(result, name, resolution, (10, 7))
            np.testing.assert_allclose(recomposed, expected.values, atol=1e-6, err_msg=f"{label} {resolution}")
    # the subsets named explicitly
    ids = channel_contributions(cache, "block", 2, preset=name, channels=[0, 3, 4, 7])["selected"].values
    assert ids[:, [0, 3, 4, 7]].all() and ids.sum() == 8
    top = channel_contributions(cache, "block", 2, preset=name, top_k=3)
    expected_top = top_channels_by_weight(cache, "block", 2, 3, preset=name).values
    for image in range(2):
        assert sorted(np.flatnonzero(top["selected"].values[image])) == sorted(expected_top[image])
    # one image, its own subset
    one = channel_contributions(cache, "block", 2, preset=name, channels=[5, 6, 7, 8], top_k=2, image="img1")
    assert one["contribution"].dims == ("channel", "fy", "fx") and int(one["selected"].sum()) == 2
    alone = scorecam(cache, "block", 2, preset=name, channels=[5, 6, 7, 8], top_k=2, image="img1")
    np.testing.assert_allclose(map_from_contributions(one, name, "input", (10, 7)), alone.values, atol=1e-6)


def test_composing_from_a_cache_runs_no_forward_pass(one_thread):
    torch = pytest.importorskip("torch")
    import _tiny_models

    from scorecam_explorer.engine import compute_cache

    torch.manual_seed(0)
    model = _tiny_models.TinyCNN().eval()
    inputs = torch.randn(2, 3, 32, 32)
    cache = compute_cache(model, inputs, ["features.2", "features.4"], progress=False)
    calls = []
    handles = [
        module.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
        for module in model.modules()
    ]
    selections = ({}, {"channels": [0, 2, 5]}, {"top_k": 4}, {"channels": [1, 3, 4, 6], "top_k": 2})
    try:
        with torch.no_grad():  # the hooks and the counter see a forward pass...
            model(inputs)
        assert "TinyCNN" in calls and "Conv2d" in calls
        calls.clear()
        forward_calls = _tiny_models.forward_calls()
        # ...and composing makes none
        for layer in ("features.2", "features.4"):
            for name in PRESETS:
                for target in (None, 3, "class 7", [1, "class 9"]):
                    for selection in selections:
                        scorecam(cache, layer, target, preset=name, **selection)
                        scorecam(cache, layer, target, preset=name, resolution="feature", image=1, **selection)
                        channel_weights(cache, layer, target, preset=name, **selection)
                        channel_contributions(cache, layer, target, preset=name, **selection)
            top_channels_by_weight(cache, layer, 3, 4)
            channels = top_channels_by_variance(cache, layer, 4)
            scorecam(cache, layer, 3, channels=channels)
            channel_contributions(cache, layer, 3, channels=channels)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    assert _tiny_models.forward_calls() == forward_calls
    assert all(not module._forward_pre_hooks and not module._forward_hooks for module in model.modules())


# ---- speed: recomposing is array work, far under a frame ------------------------------------


def test_recompose_1280_channels_is_fast():
    rng = np.random.default_rng(0)
    activation = np.maximum(rng.normal(size=(1, 1280, 7, 7)), 0).astype(np.float32)
    masked = rng.normal(size=(1, 1280, 1000)).astype(np.float32)
    cache = make_cache(
        {"head": (activation, masked)}, rng.normal(size=(1, 1000)), rng.normal(size=(1, 1000)), input_size=(224, 224)
    )
    for name in PRESETS:  # first use reads the arrays and the softmax normalisers once
        scorecam(cache, "head", 0, preset=name)
    keep = rng.permutation(1280)[:300]
    timings = []
    for trial in range(10):
        start = time.perf_counter()
        scorecam(cache, "head", trial + 1, preset=list(PRESETS)[trial % len(PRESETS)], channels=keep, image=0)
        timings.append(time.perf_counter() - start)
    assert np.median(timings) < 0.020, f"median {np.median(timings) * 1e3:.1f} ms"


def test_arrays_read_from_a_cache_are_released_with_it():
    import gc

    cache = random_cache()
    scorecam(cache, "block", 0)
    key = id(cache)
    assert key in compose._ARRAYS
    del cache
    gc.collect()
    assert key not in compose._ARRAYS
