"""Mask samplers: the default is Score-CAM bit for bit, a sampler with several samples per
channel averages the model's outputs on its masked inputs, and the cache records the sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from torch.nn import functional as F
from _tiny_models import INPUT_SIZE, normal, tiny_model

from scorecam_explorer.cache import cache_sampler, check_cache_matches, load_cache, save_cache, validate_cache
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError, ScorecamError
from scorecam_explorer.explorer.model_link import compute_layers, merge_layers
from scorecam_explorer.sampling import MaskSampler, ScoreCamSampler, get_sampler, sampler_fields, sampler_from_fields

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "features.4"  # 16 channels at 16x16


class Halves(MaskSampler):
    """Two samples per channel: X∘H_k and X∘(0.5 H_k); constant channels forwarded too."""

    name = "halves"
    samples = 2
    constant_is_free = False

    def masked_inputs(self, inputs, masks, *, generator, images, channels):
        yield inputs * masks[:, None]
        yield inputs * (0.5 * masks)[:, None]

    def parameters(self):
        return {"factor": 0.5}


class FreeHalves(Halves):
    """The same samples; a constant channel's inputs are X * 0 either way, so it is free."""

    name = "free-halves"
    constant_is_free = True


class Noisy(MaskSampler):
    """Three samples X∘(H_k + δ), δ ~ N(0, 0.1²) drawn from the given generator."""

    name = "noisy"
    samples = 3
    constant_is_free = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def masked_inputs(self, inputs, masks, *, generator, images, channels):
        for _ in range(self.samples):
            noise = torch.randn(masks.shape, generator=generator, device=masks.device) * 0.1
            yield inputs * (masks + noise)[:, None]

    def parameters(self):
        return {"seed": self.seed, "std": 0.1}


class Miscounting(Halves):
    """Says two samples, gives one."""

    name = "miscounting"

    def masked_inputs(self, inputs, masks, *, generator, images, channels):
        yield inputs * masks[:, None]


@pytest.fixture
def model():
    """The tiny CNN (10 classes) with two channels of ``LAYER`` that a ReLU zeroes everywhere."""
    loaded = tiny_model(seed=3)
    with torch.no_grad():
        loaded.module.features[3].bias[[4, 9]] = -1e4
    loaded.layers()  # the one-off probe passes happen here, not in the counted calls
    return loaded


@pytest.fixture
def x() -> torch.Tensor:
    return normal(2, 3, INPUT_SIZE, INPUT_SIZE, seed=11)


def compute(model, x, **options):
    return compute_cache(model, x, LAYER, progress=False, **options)


def hand_masks(model, x) -> torch.Tensor:
    """H (N, C, H, W) as the paper convention documents it, independently of the engine:
    U = bilinear upsampling (align_corners=False) of each map, H = (U - min U) / (max U - min U),
    0 where max == min."""
    captured = {}
    handle = model.module.get_submodule(LAYER).register_forward_hook(lambda _m, _i, out: captured.setdefault("a", out))
    try:
        with torch.no_grad():
            model.module(x)
    finally:
        handle.remove()
    activation = captured["a"].float()
    n, c = activation.shape[:2]
    upsampled = F.interpolate(
        activation.reshape(n * c, 1, *activation.shape[2:]), size=x.shape[-2:], mode="bilinear", align_corners=False
    ).reshape(n, c, *x.shape[-2:])
    low = upsampled.amin(dim=(2, 3), keepdim=True)
    high = upsampled.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (upsampled - low) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)


def same_arrays(first: xr.DataTree, second: xr.DataTree) -> None:
    for name in ("logits", "baseline_logits", "input"):
        np.testing.assert_array_equal(first[name].values, second[name].values)
    for name in ("activation", "masked_logits", "constant"):
        np.testing.assert_array_equal(first[LAYER][name].values, second[LAYER][name].values)


# ---- (1) the default sampler is Score-CAM, bit for bit ---------------------------------------


def test_the_default_sampler_is_score_cam_bit_for_bit(model, x):
    default = compute(model, x)
    explicit = compute(model, x, sampler=ScoreCamSampler())
    named = compute(model, x, sampler="scorecam")
    same_arrays(default, explicit)
    same_arrays(default, named)
    for cache in (default, explicit, named):
        assert json.loads(cache.attrs["mask_sampler"]) == {"name": "scorecam", "samples": 1}
    assert default.attrs["forward_passes"] == explicit.attrs["forward_passes"] == named.attrs["forward_passes"]
    # and it is X∘H_k: one pass per non-constant channel, constant rows the baseline's
    constant = default[LAYER]["constant"].values
    assert constant[:, [4, 9]].all()
    masked = default[LAYER]["masked_logits"].values
    for image in range(2):
        baseline = default["baseline_logits"].values[image]
        for row in masked[image][constant[image]]:
            np.testing.assert_array_equal(row, baseline)


def test_score_cam_sampler_yields_the_product_once():
    inputs = normal(3, 4, 4, seed=1)
    masks = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2))
    images, channels = torch.zeros(2, dtype=torch.long), torch.arange(2)
    sampler = ScoreCamSampler()
    samples = list(sampler.masked_inputs(inputs, masks, generator=torch.Generator(), images=images, channels=channels))
    assert len(samples) == 1
    assert torch.equal(samples[0], inputs * masks[:, None])


# ---- (2) several samples per channel: the mean of the outputs on them ------------------------


@pytest.mark.parametrize("sampler", [Halves(), FreeHalves()], ids=["constant forwarded", "constant free"])
def test_two_samples_average_the_outputs_on_both_masked_inputs(model, x, sampler):
    calls = [0]
    handle = model.module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        cache = compute(model, x, sampler=sampler, batch_size=1, fold_batchnorm=False)
    finally:
        handle.remove()
    masks = hand_masks(model, x)
    n_images, n_channels = masks.shape[:2]
    expected = torch.empty(n_images, n_channels, 10)
    with torch.no_grad():
        for i in range(n_images):
            for k in range(n_channels):
                whole = model.module(x[i : i + 1] * masks[i, k])
                half = model.module(x[i : i + 1] * (0.5 * masks[i, k]))
                expected[i, k] = ((whole + half) / 2)[0]
        single = torch.stack([model.module(x[i] * masks[i][:, None]) for i in range(n_images)])
    masked = torch.from_numpy(cache[LAYER]["masked_logits"].values)
    torch.testing.assert_close(masked, expected, rtol=1e-6, atol=1e-6)
    constant = cache[LAYER]["constant"].values
    assert constant[:, [4, 9]].all() and int(constant.sum()) == 4
    # the average is not the first sample alone (the test could tell them apart)
    changed = ~torch.from_numpy(constant)
    assert (masked[changed] - single[changed]).abs().amax() > 1e-3
    # constant channels: both inputs are X * 0, so the row is the baseline's
    np.testing.assert_allclose(masked[0, 4].numpy(), cache["baseline_logits"].values[0], rtol=1e-6, atol=1e-6)
    # unmasked + baseline + 2 per forwarded channel (batch size 1)
    forwarded = n_images * n_channels if not sampler.constant_is_free else int((~constant).sum())
    assert cache.attrs["forward_passes"] == calls[0] == 1 + 1 + 2 * forwarded
    assert json.loads(cache.attrs["mask_sampler"]) == sampler.describe()


def test_samples_of_a_batch_follow_the_batching(model, x):
    """Batches of several channels (and of two images) give the same means as one at a time."""
    one = compute(model, x, sampler=Halves(), batch_size=1, fold_batchnorm=False)
    several = compute(model, x, sampler=Halves(), batch_size=5, fold_batchnorm=False)
    np.testing.assert_allclose(
        several[LAYER]["masked_logits"].values, one[LAYER]["masked_logits"].values, rtol=1e-5, atol=1e-5
    )
    assert several.attrs["forward_passes"] == 2 + 2 * -(-2 * 16 // 5)  # constants forwarded: 32 channels


def test_random_samplers_draw_from_the_seeded_generator(model, x):
    torch.manual_seed(123)  # the global generator is not what they draw from
    first = compute(model, x, sampler=Noisy(seed=1), batch_size=4)
    torch.manual_seed(456)
    again = compute(model, x, sampler=Noisy(seed=1), batch_size=4)
    other = compute(model, x, sampler=Noisy(seed=2), batch_size=4)
    same_arrays(first, again)
    assert not np.array_equal(first[LAYER]["masked_logits"].values, other[LAYER]["masked_logits"].values)
    # a constant channel is forwarded once noise is added: its row is no longer the baseline's
    row = first[LAYER]["masked_logits"].values[0, 4]
    assert np.abs(row - first["baseline_logits"].values[0]).max() > 1e-4
    assert json.loads(first.attrs["mask_sampler"]) == {"name": "noisy", "samples": 3, "seed": 1, "std": 0.1}


# ---- (3) recorded in the cache; caches of other samplers are not merged -----------------------


def test_the_sampler_is_recorded_and_read_back(model, x, tmp_path):
    cache = compute(model, x, sampler=Halves(), batch_size=8)
    assert cache_sampler(cache) == {"name": "halves", "samples": 2, "factor": 0.5}
    loaded = load_cache(save_cache(cache, tmp_path / "halves.zarr"))
    assert cache_sampler(loaded) == cache_sampler(cache)
    check_cache_matches(loaded, sampler=Halves())
    with pytest.raises(CacheError, match="sampled by"):
        check_cache_matches(loaded, sampler="scorecam")
    # a cache made before samplers existed reads as Score-CAM's
    old = compute(model, x, batch_size=8)
    del old.attrs["mask_sampler"]
    validate_cache(old)
    assert cache_sampler(old) == {"name": "scorecam", "samples": 1}
    check_cache_matches(old, sampler=None)
    check_cache_matches(old, sampler=ScoreCamSampler())
    # a malformed record is refused
    for bad in ("not json", json.dumps({"samples": 2}), json.dumps({"name": "x", "samples": 0})):
        old.attrs["mask_sampler"] = bad
        with pytest.raises(CacheError, match="mask_sampler"):
            validate_cache(old)


def test_caches_of_different_samplers_are_not_merged(model, x):
    first = compute_cache(model, x, "features.1", progress=False, batch_size=8)
    second = compute_cache(model, x, LAYER, progress=False, batch_size=8, sampler=Halves())
    with pytest.raises(CacheError, match="different mask samplers"):
        merge_layers(first, second)
    with pytest.raises(CacheError, match="different mask samplers"):
        merge_layers(second, first)
    # the same sampler merges, also with a cache that predates the attribute
    same = compute_cache(model, x, LAYER, progress=False, batch_size=8)
    del first.attrs["mask_sampler"]
    merged = merge_layers(first, same)
    assert json.loads(merged.attrs["layers"]) == ["features.1", LAYER]
    # more layers for a cache of a sampler that is not built in cannot be computed alike
    with pytest.raises(ScorecamError, match="not built in"):
        compute_layers(second, model, ["features.1"], progress=False)
    # for a Score-CAM cache they are computed with Score-CAM and merge
    grown = compute_layers(merged, model, ["features.0"], progress=False)
    assert cache_sampler(grown) == {"name": "scorecam", "samples": 1}


def test_sampler_fields_round_trip():
    fields = sampler_fields({"mask_sampler": ScoreCamSampler().to_json()})
    assert fields == {"name": "scorecam", "samples": 1}
    assert isinstance(sampler_from_fields(fields), ScoreCamSampler)
    assert sampler_fields({}) == fields
    with pytest.raises(ScorecamError, match="differs"):
        sampler_from_fields({"name": "scorecam", "samples": 3})


# ---- (4) a bad sampler argument ---------------------------------------------------------------


class NoName(Halves):
    name = ""


class ZeroSamples(Halves):
    samples = 0


class UnstorableParameters(Halves):
    def parameters(self):
        return {"model": object()}


@pytest.mark.parametrize(
    ("sampler", "message"),
    [
        ("scorecma", "unknown mask sampler 'scorecma'.*Did you mean: scorecam"),
        (3, "sampler must be None, a sampler name"),
        (ScoreCamSampler, "sampler must be None"),  # the class, not an instance
        (NoName(), "non-empty string"),
        (ZeroSamples(), "samples must be an integer >= 1"),
        (UnstorableParameters(), "not JSON values"),
    ],
)
def test_a_bad_sampler_is_refused(model, x, sampler, message):
    with pytest.raises(ScorecamError, match=message):
        get_sampler(sampler)
    with pytest.raises(ScorecamError, match=message):
        compute(model, x, sampler=sampler)


def test_a_sampler_that_gives_another_number_of_samples_is_refused(model, x):
    with pytest.raises(ScorecamError, match="gave 1 masked input.*samples 2"):
        compute(model, x, sampler=Miscounting(), batch_size=4)
