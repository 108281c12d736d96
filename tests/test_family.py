"""The Score-CAM family from the cache: SS-CAM and IS-CAM against torchcam 0.5.0, their
cost, what the cache records, and which presets apply."""

from __future__ import annotations

import base64
import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from _tiny_models import INPUT_SIZE, forward_calls, normal, tiny_model

from scorecam_explorer.cache import cache_sampler, load_cache, save_cache
from scorecam_explorer.compose import channel_weights, scorecam
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.explorer.state import ExplorerState
from scorecam_explorer.sampling import (
    ISCamSampler,
    SSCamSampler,
    _TorchcamNoise,
    family_label,
    get_sampler,
    sampler_from_fields,
)

torchcam_methods = pytest.importorskip("torchcam.methods")

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "features.4"  # 16 channels at 16x16
DEAD = [4, 9]  # channels a ReLU zeroes everywhere: constant, all-zero masks
CLASSES = [2, 7]


@pytest.fixture
def model():
    """The tiny CNN (10 classes) with two dead channels in ``LAYER``."""
    loaded = tiny_model(seed=3)
    with torch.no_grad():
        loaded.module.features[3].bias[DEAD] = -1e4
    loaded.layers()  # the one-off probe passes happen here
    return loaded


@pytest.fixture
def x() -> torch.Tensor:
    return normal(2, 3, INPUT_SIZE, INPUT_SIZE, seed=11)


def torchcam_maps(extractor_type, module, x, classes, **options) -> list[np.ndarray]:
    """torchcam's maps (N, h, w) for each class, one hooked forward pass per class."""
    maps = []
    with extractor_type(module, target_layer=LAYER, input_shape=tuple(x.shape[1:]), **options) as extractor:
        for cls in classes:
            with torch.no_grad():
                module(x)
            maps.append(extractor(class_idx=cls)[0].numpy())
    return maps


def our_maps(cache, classes) -> list[np.ndarray]:
    n_images = cache.dataset.sizes["image"]
    return [
        np.stack(
            [scorecam(cache, LAYER, cls, preset="torchcam", image=i, resolution="feature").values for i in range(n_images)]
        )
        for cls in classes
    ]


def compute(model, x, **options):
    options.setdefault("progress", False)
    options.setdefault("convention", "torchcam")
    return compute_cache(model, x, options.pop("layers", LAYER), **options)


# ---- torchcam, map for map ---------------------------------------------------------------


def test_is_cam_is_torchcam_iscam(model, x):
    cache = compute(model, x, family="is-cam", batch_size=16)
    theirs = torchcam_maps(torchcam_methods.ISCAM, model.module, x, CLASSES, batch_size=16)
    for ours, reference in zip(our_maps(cache, CLASSES), theirs):
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    # the dead channels were not forwarded: their row is the baseline's, as torchcam's
    # c_s (X * 0) inputs give
    np.testing.assert_array_equal(
        cache[LAYER]["masked_logits"].values[:, DEAD], np.repeat(cache["baseline_logits"].values[:, None], len(DEAD), 1)
    )


@pytest.mark.parametrize("ours_batch, theirs_batch", [(16, 16), (5, 12)])
def test_ss_cam_is_torchcam_sscam_draw_for_draw(model, x, ours_batch, theirs_batch):
    """The same global seed before both calls: the same noise, whatever the batch sizes."""
    torch.manual_seed(1234)
    cache = compute(model, x, family="ss-cam", samples=6, std=2.0, batch_size=ours_batch)
    after_ours = torch.get_rng_state()
    torch.manual_seed(1234)
    theirs = torchcam_maps(torchcam_methods.SSCAM, model.module, x, CLASSES[:1], batch_size=theirs_batch, num_samples=6, std=2.0)
    after_theirs = torch.get_rng_state()
    ours = our_maps(cache, CLASSES[:1])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=1e-5)
    # both leave torch's global generator in the same place
    assert torch.equal(after_ours, after_theirs)


def test_ss_cam_with_another_seed_differs(model, x):
    torch.manual_seed(1234)
    first = compute(model, x, family="ss-cam", samples=3, batch_size=16)
    torch.manual_seed(4321)
    second = compute(model, x, family="ss-cam", samples=3, batch_size=16)
    torch.manual_seed(1234)
    again = compute(model, x, family="ss-cam", samples=3, batch_size=7)
    assert not np.array_equal(first[LAYER]["masked_logits"].values, second[LAYER]["masked_logits"].values)
    np.testing.assert_allclose(first[LAYER]["masked_logits"].values, again[LAYER]["masked_logits"].values, rtol=1e-5, atol=1e-5)


def test_ss_cam_torchcam_defaults(model, x):
    """SS-CAM's defaults are torchcam's (35 samples, σ = 2), compared on one class."""
    torch.manual_seed(7)
    cache = compute(model, x[:1], family="ss-cam", batch_size=16)
    torch.manual_seed(7)
    theirs = torchcam_maps(torchcam_methods.SSCAM, model.module, x[:1], CLASSES[1:], batch_size=32)
    np.testing.assert_allclose(our_maps(cache, CLASSES[1:])[0], theirs[0], rtol=0, atol=1e-5)
    assert cache_sampler(cache) == {"name": "ss-cam", "samples": 35, "std": 2.0}


def test_ss_cam_with_a_seed_is_torchcam_after_manual_seed_and_leaves_the_global_generator(model, x):
    """seed=s draws from a private generator seeded with s: torchcam's noise after
    torch.manual_seed(s), whatever the global generator holds, which is left alone."""
    torch.manual_seed(555)  # not what the seeded noise comes from
    before = torch.get_rng_state()
    cache = compute(model, x, family="ss-cam", samples=4, std=1.5, seed=31, batch_size=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(31)
    theirs = torchcam_maps(torchcam_methods.SSCAM, model.module, x, CLASSES[:1], batch_size=16, num_samples=4, std=1.5)
    np.testing.assert_allclose(our_maps(cache, CLASSES[:1])[0], theirs[0], rtol=0, atol=1e-5)
    assert cache_sampler(cache) == {"name": "ss-cam", "samples": 4, "std": 1.5, "seed": 31}
    assert json.loads(cache[LAYER].attrs["noise"]) == {"generator": "seeded", "seed": 31, "after": []}
    again = compute(model, x, family="ss-cam", samples=4, std=1.5, seed=31, batch_size=16)
    np.testing.assert_array_equal(again[LAYER]["masked_logits"].values, cache[LAYER]["masked_logits"].values)
    rebuilt = sampler_from_fields(cache_sampler(cache))
    assert isinstance(rebuilt, SSCamSampler) and rebuilt.seed == 31


def test_ss_cam_without_a_seed_records_the_global_state_that_reproduces_each_layer(model, x, tmp_path):
    torch.manual_seed(2024)
    start = torch.get_rng_state()
    cache = compute(model, x, family="ss-cam", samples=2, batch_size=16, layers=["features.2", LAYER])
    records = {layer: json.loads(cache[layer].attrs["noise"]) for layer in ("features.2", LAYER)}
    first = base64.b64decode(records["features.2"]["state"])
    assert first == bytes(start.numpy().tobytes())  # the state when the first layer's noise started
    assert records["features.2"]["state_sha256"] == hashlib.sha256(first).hexdigest()
    assert records[LAYER]["generator"] == "global" and records[LAYER]["state"] != records["features.2"]["state"]
    assert cache_sampler(cache) == {"name": "ss-cam", "samples": 2, "std": 2.0}  # no state in the sampler
    # restoring the recorded state reproduces the deeper layer computed alone, bit for bit
    saved = load_cache(save_cache(cache, tmp_path / "ss.zarr"))
    state = json.loads(saved[LAYER].attrs["noise"])["state"]
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))
    alone = compute(model, x, family="ss-cam", samples=2, batch_size=16)
    np.testing.assert_array_equal(alone[LAYER]["masked_logits"].values, cache[LAYER]["masked_logits"].values)
    # deterministic members record no noise
    assert "noise" not in compute(model, x, family="is-cam", samples=2, batch_size=16)[LAYER].attrs


@pytest.mark.parametrize("rows, size", [(3, (5, 7)), (1, (3, 3)), (4, (4, 4)), (7, (16, 16))])
def test_the_noise_read_in_pieces_is_one_draw_per_sample(rows, size):
    """Drawn batch by batch (with a batch retried) the noise is torchcam's, value for value."""
    samples, std = 3, 2.0
    torch.manual_seed(99)
    expected = [torch.distributions.Normal(0, std).sample((rows, *size)) for _ in range(samples)]
    end = torch.get_rng_state()
    torch.manual_seed(99)
    noise = _TorchcamNoise(samples, std, rows, size)
    assert torch.equal(torch.get_rng_state(), end)
    got = [[] for _ in range(samples)]
    first = 0
    for count in [2, 1, 5, 3, 100]:
        count = min(count, rows - first)
        if count <= 0:
            break
        if count > 1:  # a batch that "runs out of memory" after one sample, then retried smaller
            noise.begin(first, count)
            noise.draw(0, count)
            count -= 1
        noise.begin(first, count)
        for sample in range(samples):
            got[sample].append(noise.draw(sample, count))
        first += count
    for sample in range(samples):
        assert torch.equal(torch.cat(got[sample]).view(rows, *size), expected[sample])
    with pytest.raises(ScorecamError, match="torchcam's order"):
        noise.begin(rows + 3, 1)  # neither the next row nor a retry


# ---- the cache: another class is free, the cost, the record ------------------------------


def test_another_class_preset_or_channel_subset_needs_no_forward_pass(model, x):
    torch.manual_seed(0)
    cache = compute(model, x, family="ss-cam", samples=2, batch_size=16)
    before = forward_calls()
    for cls in range(10):
        scorecam(cache, LAYER, cls, preset="torchcam", image=1)
        scorecam(cache, LAYER, cls, preset="paper", image=0, channels=[0, 1, 2])
        channel_weights(cache, LAYER, cls, preset="pytorch-grad-cam")
    assert forward_calls() == before


def count_rows(module):
    """A forward pre-hook counting the inputs (rows) and calls the module is fed."""
    counts = {"rows": 0, "calls": 0}

    def hook(_module, args):
        counts["rows"] += int(args[0].shape[0])
        counts["calls"] += 1

    return counts, module.register_forward_pre_hook(hook)


@pytest.mark.parametrize(
    "family, samples, forwarded_channels",
    [("ss-cam", 3, 16), ("is-cam", 4, 16 - len(DEAD)), ("score-cam", None, 16 - len(DEAD))],
)
def test_pass_counts(model, x, family, samples, forwarded_channels, caplog):
    """S x channels masked inputs (constant channels too for SS-CAM), plus the unmasked and
    baseline passes; the count is announced before."""
    counts, handle = count_rows(model.module)
    try:
        with caplog.at_level(logging.INFO, logger="scorecam_explorer.engine"):
            cache = compute(model, x, family=family, samples=samples, batch_size=8, fold_batchnorm=False)
    finally:
        handle.remove()
    n_images, n_samples = x.shape[0], samples or 1
    assert counts["rows"] == n_images * (2 + n_samples * forwarded_channels)
    masked_calls = n_samples * -(-n_images * forwarded_channels // 8)
    assert counts["calls"] == 2 + masked_calls
    assert cache.attrs["forward_passes"] == counts["calls"]
    announced = [record.getMessage() for record in caplog.records if "masked inputs" in record.getMessage()]
    label = {"ss-cam": "SS-CAM, 3 samples, σ = 2", "is-cam": "IS-CAM, 4 samples", "score-cam": "Score-CAM"}[family]
    bound = "" if family == "ss-cam" else "at most "
    assert announced == [f"{label}: {bound}{n_samples * n_images * 16:,} masked inputs"]


def test_the_family_is_recorded_and_survives_save_and_load(model, x, tmp_path):
    torch.manual_seed(0)
    cache = compute(model, x, family="ss-cam", samples=3, std=1.5, batch_size=16)
    assert cache.attrs["family"] == "ss-cam"
    assert cache_sampler(cache) == {"name": "ss-cam", "samples": 3, "std": 1.5}
    loaded = load_cache(save_cache(cache, tmp_path / "cache.zarr"))
    assert loaded.attrs["family"] == "ss-cam"
    assert cache_sampler(loaded) == cache_sampler(cache)
    rebuilt = sampler_from_fields(cache_sampler(loaded))
    assert isinstance(rebuilt, SSCamSampler) and rebuilt.samples == 3 and rebuilt.std == 1.5
    is_cam = compute(model, x, family="iscam", batch_size=16)
    assert is_cam.attrs["family"] == "is-cam"
    assert cache_sampler(is_cam) == {"name": "is-cam", "samples": 10}
    assert compute(model, x, batch_size=16).attrs["family"] == "score-cam"


def test_names_and_labels():
    assert isinstance(get_sampler("sscam"), SSCamSampler)
    assert isinstance(get_sampler("IS-CAM"), ISCamSampler)
    assert family_label({"name": "scorecam", "samples": 1}) == "Score-CAM"
    assert family_label({"name": "ss-cam", "samples": 35, "std": 2.0}) == "SS-CAM, 35 samples, σ = 2"
    assert SSCamSampler().label() == "SS-CAM, 35 samples, σ = 2"
    assert ISCamSampler(samples=1).label() == "IS-CAM, 1 sample"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"family": "xs-cam"}, "unknown family 'xs-cam'"),
        ({"family": "ss-cam", "sampler": "scorecam"}, "not both"),
        ({"family": "is-cam", "std": 1.0}, "IS-CAM adds no noise"),
        ({"family": "score-cam", "std": 1.0}, "Score-CAM adds no noise"),
        ({"family": "is-cam", "seed": 1}, "seed is SS-CAM's noise seed; IS-CAM adds no noise"),
        ({"family": "ss-cam", "seed": -1}, "seed must be None .* or an integer >= 0"),
        ({"family": "ss-cam", "seed": 1.5}, "seed must be None .* or an integer >= 0"),
        ({"seed": 3}, "samples=, std= and seed= go with family="),
        ({"family": "ss-cam", "samples": 0}, "samples must be an integer >= 1"),
        ({"family": "ss-cam", "samples": 2.5}, "samples must be an integer >= 1"),
        ({"family": "ss-cam", "samples": True}, "samples must be an integer >= 1"),
        ({"family": "score-cam", "samples": 3}, "samples=3 needs family='ss-cam' or 'is-cam'"),
        ({"family": "ss-cam", "std": 0.0}, "std .* must be a number > 0"),
        ({"family": "ss-cam", "std": float("nan")}, "std .* must be a number > 0"),
        ({"samples": 3}, "samples=, std= and seed= go with family="),
        ({"std": 2.0}, "samples=, std= and seed= go with family="),
    ],
)
def test_bad_arguments_are_refused_before_any_pass(model, x, options, message):
    before = forward_calls()
    with pytest.raises(ScorecamError, match=message):
        compute(model, x, **options)
    assert forward_calls() == before


# ---- presets and the explorer -------------------------------------------------------------


def test_the_official_preset_refuses_several_samples(model, x):
    cache = compute(model, x, family="is-cam", samples=2, batch_size=16)
    with pytest.raises(ScorecamError, match="'official' preset .*IS-CAM, 2 samples"):
        scorecam(cache, LAYER, 1, preset="official")
    # the softmax presets read the mean of the outputs: the same weights (shift invariance)
    weights = {
        name: channel_weights(cache, LAYER, 1, preset=name).values for name in ("paper", "torchcam", "pytorch-grad-cam")
    }
    np.testing.assert_allclose(weights["paper"], weights["torchcam"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(weights["paper"], weights["pytorch-grad-cam"], rtol=1e-6, atol=1e-9)
    # one sample per channel: official applies
    one = compute(model, x, family="is-cam", samples=1, batch_size=16)
    scorecam(one, LAYER, 1, preset="official")


def test_the_explorer_names_the_family_and_offers_the_presets_that_apply(model, x):
    torch.manual_seed(0)
    state = ExplorerState(compute(model, x, family="ss-cam", samples=2, batch_size=16))
    assert state.family == "SS-CAM, 2 samples, σ = 2"
    assert state.presets == ["paper", "pytorch-grad-cam", "torchcam"]
    with pytest.raises(ScorecamError, match="official"):
        state.update(preset="official")
    plain = ExplorerState(compute(model, x, batch_size=16))
    assert plain.family == "Score-CAM"
    assert "official" in plain.presets


def test_compare_puts_score_cam_and_ss_cam_side_by_side(model, x):
    from scorecam_explorer.explorer.app import Explorer

    plain = compute(model, x, batch_size=16)
    torch.manual_seed(0)
    smooth = compute(model, x, family="ss-cam", samples=2, batch_size=16)
    explorer = Explorer(plain, others=[smooth], preset="torchcam")
    assert explorer.state.families == ["Score-CAM", "SS-CAM, 2 samples, σ = 2"]
    compare = explorer.compare
    assert "families" in [key for _, key in compare.mode.options]
    compare.mode.value = "families"
    assert (compare.first.value, compare.second.value) == ("Score-CAM", "SS-CAM, 2 samples, σ = 2")
    s = explorer.state.selection
    np.testing.assert_array_equal(
        compare.map_of("families", "SS-CAM, 2 samples, σ = 2")[0].values,
        scorecam(smooth, LAYER, s.target, preset="torchcam", image=s.image).values,
    )
    # without another family's cache the mode is not offered
    assert "families" not in [key for _, key in Explorer(plain).compare.mode.options]
    other_pictures = compute(model, x.flip(0), batch_size=16)
    with pytest.raises(ScorecamError, match="two caches of Score-CAM"):
        ExplorerState(plain, others=[other_pictures])
    changed = smooth.copy(deep=True)
    changed["input"] = changed["input"] * 2
    with pytest.raises(ScorecamError, match="other pictures"):
        ExplorerState(plain, others=[changed])
