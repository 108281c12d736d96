"""Models built to trip the faster copies (BatchNorm folding, fused convolutions): every
speed-up on must give the masked logits of the model itself, on every call."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torchvision
from _float32 import assert_close_up_to_rounding
from _tiny_models import AWKWARD_MODELS, awkward_model, normal

import scorecam_explorer
from scorecam_explorer import rewriting
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.fusion import pointwise_fusion_available
from scorecam_explorer.models import from_module, weights_fingerprint

LAYERS = {
    "shared convolution": "stem",
    "subclasses": "norm_act",
    "hidden flag": "conv2",
    "reflect padding": "conv2",
    "affine-free batchnorm": "norm1",
    "outputs read twice": "conv2",
    "addition into an alias": "conv2",
}
"""The layer each awkward model is explained at (8 channels)."""

ALL_OFF = dict(fold_batchnorm=False, fuse_pointwise=False, tune_allocator=False, adapt_threads=False)
"""compute_cache with no speed-up: the masked passes run on the model itself."""

COPIES = 2 if pointwise_fusion_available() else 1
"""Faster copies the engine tries, fastest first: fused (where oneDNN has the operators), folded."""


def extra_passes(name: str) -> list[int]:
    """Check passes of three calls beyond the all-off run's passes (a check is one pass of
    the unmasked input through a copy)."""
    if name == "hidden flag":  # the flag flips: the remembered copies differ, the rebuilt one agrees
        return [1, COPIES + 1, COPIES + 1]
    if name == "addition into an alias":  # every copy differs, so none is kept for this model
        return [COPIES, 0, 0]
    return [1, 1, 1]  # the fastest copy agrees on every call


@pytest.mark.parametrize("name", [name for name in AWKWARD_MODELS if name != "addition into an alias"])
def test_the_folded_and_fused_copies_compute_the_model(name):
    """The rewrites themselves are right (not only caught by the engine's check): shared
    convolutions and subclasses are left as they are, the rest folded and fused."""
    model = awkward_model(name)
    x = normal(3, 3, 16, 16, seed=1)
    folded = rewriting.folded_batchnorm(model, ("test", name), channels_last=True, rebuild=True)
    assert folded is not None  # every one of these has a plain convolution-BatchNorm pair
    fused = rewriting.fused_copy(folded)
    with torch.inference_mode():
        expected = model(x)
        for copy_ in (folded, fused):
            if copy_ is not None:
                assert_close_up_to_rounding(copy_(x.contiguous(memory_format=torch.channels_last)), expected)
                assert_close_up_to_rounding(copy_(x), expected)
    rewriting.release_copies(model)


@pytest.mark.parametrize("name", list(AWKWARD_MODELS))
def test_every_speed_up_gives_the_masked_logits_of_the_model_on_every_call(name):
    model = awkward_model(name)
    layer = LAYERS[name]
    x = normal(2, 3, 16, 16, seed=2)
    for call, extra in enumerate(extra_passes(name)):
        if name == "hidden flag":
            model.transform_input = call != 1  # True, False, True: neither weights nor repr change
        fast = compute_cache(model, x, layer, progress=False, batch_size=16)
        plain = compute_cache(model, x, layer, progress=False, batch_size=16, **ALL_OFF)
        message = f"{name}, call {call}"
        assert_close_up_to_rounding(
            fast[layer]["masked_logits"].values, plain[layer]["masked_logits"].values, err_msg=message
        )
        assert_close_up_to_rounding(fast["baseline_logits"].values, plain["baseline_logits"].values, err_msg=message)
        assert fast.attrs["forward_passes"] == plain.attrs["forward_passes"] + extra, message


def test_googlenet_with_transform_input_switched_between_calls():
    """torchvision's GoogLeNet reads ``transform_input`` in its forward: the copy traced with
    one setting computes another function after the switch (logits several per cent off)."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        # (torchvision's own initialisation shrinks the signal to nothing at the output)
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    x = normal(1, 3, 64, 64, seed=3)
    for flag in (True, False, True):
        model.transform_input = flag
        fast = compute_cache(model, x, "conv1", progress=False, batch_size=16)
        plain = compute_cache(model, x, "conv1", progress=False, batch_size=16, **ALL_OFF)
        assert_close_up_to_rounding(
            fast["conv1"]["masked_logits"].values, plain["conv1"]["masked_logits"].values, err_msg=f"flag {flag}"
        )
    rewriting.release_copies(model)


def test_copies_are_released_on_request_and_with_their_model():
    model = awkward_model("affine-free batchnorm")
    x = normal(1, 3, 16, 16, seed=4)
    key = rewriting.copy_key(model, weights_fingerprint(model), "cpu")
    compute_cache(model, x, "norm1", progress=False)
    assert rewriting.remembers_copy(model, key)
    folded = rewriting.folded_batchnorm(model, key)  # the remembered copy, not a new one
    references = [weakref.ref(copy_) for copy_ in (folded, rewriting.fused_copy(folded)) if copy_ is not None]
    del folded
    assert scorecam_explorer.release_copies(from_module(model)) == 1  # a LoadedModel names its module
    gc.collect()
    assert all(reference() is None for reference in references)
    assert not rewriting.remembers_copy(model, key)
    assert scorecam_explorer.release_copies(model) == 0  # nothing left to release

    compute_cache(model, x, "norm1", progress=False)
    copy_reference, model_reference = weakref.ref(rewriting.folded_batchnorm(model, key)), weakref.ref(model)
    del model
    gc.collect()
    assert model_reference() is None and copy_reference() is None
    with pytest.raises(ScorecamError, match="release_copies takes"):
        scorecam_explorer.release_copies("resnet18")
