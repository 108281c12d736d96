"""compute_cache end to end: inputs, layers, counts, exactness against pytorch-grad-cam and torchcam."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from _tiny_models import batchnorm_cnn, normal
from _float32 import assert_close_up_to_rounding

from scorecam_explorer import planner, rewriting
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ImageLoadError, NonFiniteError, ScorecamError, UnknownLayerError
from scorecam_explorer.models import from_module
from scorecam_explorer.preprocessing import Preprocessing
from scorecam_explorer.planner import Plan


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tiny_cnn):
    with torch.no_grad():  # two channels that a ReLU zeroes everywhere
        tiny_cnn.features[3].bias[[4, 9]] = -1e4
    return tiny_cnn


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(2, 3, 32, 32)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_cache_from_a_plain_module_and_a_tensor(tiny, x):
    cache = compute_cache(tiny, x, "features.4", progress=False, batch_size=5)
    assert cache.attrs["model_name"] == "TinyCNN"
    assert list(cache["class_name"].values[:2]) == ["class 0", "class 1"]
    assert list(cache["image"].values) == ["image-0", "image-1"]
    assert json.loads(cache.attrs["layers"]) == ["features.4"]
    assert json.loads(cache.attrs["preprocessing"]) is None  # a tensor for a plain module: unknown
    assert json.loads(cache.attrs["mask_convention"])["name"] == "paper"
    assert cache.attrs["dtype"] == "float32" and cache.attrs["device"] == "cpu"
    node = cache["features.4"]
    assert node["activation"].dims == ("image", "channel", "fy", "fx")
    assert node["activation"].shape == (2, 16, 16, 16)
    assert node["masked_logits"].shape == (2, 16, 10)
    assert node["constant"].values[:, [4, 9]].all()
    np.testing.assert_array_equal(cache["input"].values, x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(cache["logits"].values, tiny(x).numpy(), rtol=1e-6, atol=1e-6)
        # the baseline pass runs on the faster (fused) copy of the model: rounding differs
        assert_close_up_to_rounding(cache["baseline_logits"].values, tiny(x * 0).numpy())
    # a min-max view of the input: uint8 spanning 0..255 per image
    picture = cache["picture"].values
    assert picture.dtype == np.uint8 and picture.shape == (2, 32, 32, 3)
    assert picture.reshape(2, -1).min(axis=1).tolist() == [0, 0]
    assert picture.reshape(2, -1).max(axis=1).tolist() == [255, 255]
    # constant rows are the baseline's
    constant = node["constant"].values
    for i in range(2):
        np.testing.assert_array_equal(node["masked_logits"].values[i][constant[i]][0], cache["baseline_logits"].values[i])
    assert no_hooks(tiny)


def test_forward_passes_counts_every_model_call(tiny, x):
    loaded = from_module(tiny)
    loaded.layers()  # the one-off probe passes (class count, layer shapes) happen here
    calls = [0]
    handle = tiny.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        cache = compute_cache(loaded, x, ["features.1", "features.4"], progress=False, batch_size=3)
    finally:
        handle.remove()
    # unmasked + baseline + ceil(non-constant channels of all images / 3) per layer
    expected = 2
    for layer in ("features.1", "features.4"):
        expected += -(-int((~cache[layer]["constant"].values).sum()) // 3)
    assert cache.attrs["forward_passes"] == expected
    assert calls[0] == expected  # an independent counter agrees
    assert cache.attrs["seconds"] > 0


def test_masked_logits_match_pytorch_grad_cam_scores(tiny, x):
    """pytorch-grad-cam's ScoreCAM scores channel k by f(X * H_k)[c]: record its model outputs."""
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cache = compute_cache(tiny, x, "features.4", convention="pytorch-grad-cam", progress=False)
    outputs: list[torch.Tensor] = []
    handle = tiny.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
    try:
        ScoreCAM(tiny, target_layers=[tiny.features[4]])(x, targets=[ClassifierOutputTarget(3)] * 2)
    finally:
        handle.remove()
    theirs = torch.cat(outputs[1:]).reshape(2, 16, 10).numpy()
    assert_close_up_to_rounding(cache["features.4"]["masked_logits"].values, theirs)  # other batches, fused copy


def test_masked_logits_match_torchcam_scores(tiny, x):
    from torchcam.methods import ScoreCAM

    cache = compute_cache(tiny, x, "features.4", convention="torchcam", progress=False)
    outputs: list[torch.Tensor] = []
    with ScoreCAM(tiny, target_layer="features.4", batch_size=16, input_shape=(3, 32, 32)) as extractor:
        with torch.no_grad():
            tiny(x)
        handle = tiny.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
        try:
            extractor(class_idx=[3, 3])
        finally:
            handle.remove()
    theirs = torch.cat(outputs[1:]).reshape(2, 16, 10).numpy()
    assert_close_up_to_rounding(cache["features.4"]["masked_logits"].values, theirs)  # other batches, fused copy


def test_many_images_equal_one_at_a_time(tiny, x):
    both = compute_cache(tiny, x, "features.4", progress=False)
    second = compute_cache(tiny, x[1:], "features.4", progress=False)
    # other batches (the masked inputs of two images, or of one)
    assert_close_up_to_rounding(both["features.4"]["masked_logits"].values[1], second["features.4"]["masked_logits"].values[0])
    np.testing.assert_array_equal(both["features.4"]["constant"].values[1], second["features.4"]["constant"].values[0])


def test_layers_default_single_list_and_order(x):
    torch.manual_seed(0)
    loaded = from_module(torchvision.models.resnet18(weights=None), preprocessing=Preprocessing(resize=40, crop=32))
    small = x[:1]
    assert loaded.default_layer == "layer3"  # layer4 is 1x1 at this input size
    assert json.loads(compute_cache(loaded, small, progress=False).attrs["layers"]) == ["layer3"]
    cache = compute_cache(loaded, small, ["layer4", "layer3", "layer4"], progress=False)
    assert json.loads(cache.attrs["layers"]) == ["layer3", "layer4"]
    assert set(cache.children) == {"layer3", "layer4"}
    with pytest.raises(UnknownLayerError, match="layer5"):
        compute_cache(loaded, small, "layer5", progress=False)


def test_pictures_from_paths_pil_arrays_and_samples(tiny, tmp_path):
    loaded = from_module(tiny, preprocessing=Preprocessing(resize=36, crop=32))
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(array).save(path)
    cache = compute_cache(
        loaded, [str(path), Image.fromarray(array), array, "sample:chelsea", str(path)], "features.4", progress=False
    )
    assert list(cache["image"].values) == ["photo.png", "image-1", "image-2", "sample:chelsea", "photo.png#2"]
    pictures = cache["picture"].values
    np.testing.assert_array_equal(pictures[0], pictures[1])
    np.testing.assert_array_equal(pictures[0], loaded.preprocessing.crop_image(Image.fromarray(array)))
    np.testing.assert_allclose(cache["input"].values[0], loaded.preprocessing.normalise(pictures[0]), rtol=0, atol=0)
    assert json.loads(cache.attrs["preprocessing"])["crop"] == 32
    named = compute_cache(loaded, array, "features.4", progress=False, image_ids=["mine"])
    assert list(named["image"].values) == ["mine"]
    with pytest.raises(ImageLoadError):
        compute_cache(loaded, str(tmp_path / "missing.png"), "features.4", progress=False)


def test_tensor_input_with_known_preprocessing_is_denormalised(x):
    loaded = from_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    pixels = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    inputs = torch.from_numpy(loaded.preprocessing.normalise(pixels).copy())
    cache = compute_cache(loaded, inputs, "1", progress=False)
    np.testing.assert_array_equal(cache["picture"].values, pixels)


def test_given_image_ids_must_fit_the_images(tiny, x):
    with pytest.raises(ScorecamError, match="unique; repeated: a"):
        compute_cache(tiny, x, "features.4", progress=False, image_ids=["a", "a"])
    with pytest.raises(ScorecamError, match="1 image ids given for 2 images"):
        compute_cache(tiny, x, "features.4", progress=False, image_ids=["a"])
    with pytest.raises(ScorecamError, match="floating point"):
        compute_cache(tiny, (x * 100).to(torch.uint8), "features.4", progress=False)


def test_class_names_override_and_mismatch(tiny, x):
    names = [f"n{i}" for i in range(10)]
    cache = compute_cache(tiny, x[:1], "features.4", progress=False, class_names=names)
    assert list(cache["class_name"].values) == names
    with pytest.raises(ScorecamError, match="10 outputs but 3 class names"):
        compute_cache(tiny, x[:1], "features.4", progress=False, class_names=["a", "b", "c"])


def test_bad_arguments_are_clear_errors(tiny, x):
    with pytest.raises(ScorecamError, match="precision"):
        compute_cache(tiny, x, "features.4", progress=False, precision="float16")
    with pytest.raises(ScorecamError, match="convention"):
        compute_cache(tiny, x, "features.4", progress=False, convention="gradcam")
    with pytest.raises(ScorecamError, match=r"\(N, 3, H, W\)"):
        compute_cache(tiny, torch.zeros(2, 32, 32), "features.4", progress=False)
    with pytest.raises(ScorecamError, match="batch size"):
        compute_cache(tiny, x, "features.4", progress=False, batch_size=0)
    with pytest.raises(ScorecamError, match="model must be"):
        compute_cache("resnet18", x, "features.4", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ScorecamError, match="CUDA is not available"):
            compute_cache(tiny, x, "features.4", progress=False, device="cuda")
    with pytest.raises(NonFiniteError, match="input tensor"):
        compute_cache(tiny, x * float("nan"), "features.4", progress=False)


def test_hooks_removed_and_mode_restored_after_a_failure(tiny, x):
    loaded = from_module(tiny)
    loaded.layers()  # probe passes first, so that the counter below sees only compute_cache's
    tiny.train()
    calls = {"n": 0}

    def poison_masked_passes(_module, _inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 2 else output  # after capture and baseline

    handle = tiny.register_forward_hook(poison_masked_passes)
    try:
        with pytest.raises(NonFiniteError, match="'features.4'"):
            compute_cache(loaded, x, "features.4", progress=False)
    finally:
        handle.remove()
    assert no_hooks(tiny)
    assert all(module.training for module in tiny.modules())


def test_device_auto_is_cpu_here_and_recorded(tiny, x):
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert compute_cache(tiny, x[:1], "features.4", progress=False).attrs["device"] == expected


def test_bfloat16_is_recorded_and_close(tiny, x, native_bfloat16):
    fp32 = compute_cache(tiny, x, "features.4", progress=False)
    bf16 = compute_cache(tiny, x, "features.4", progress=False, precision="bfloat16")
    assert bf16.attrs["dtype"] == "bfloat16"
    np.testing.assert_array_equal(bf16["logits"].values, fp32["logits"].values)  # unmasked stays fp32
    np.testing.assert_allclose(
        bf16["features.4"]["masked_logits"].values, fp32["features.4"]["masked_logits"].values, rtol=0.05, atol=0.05
    )


def test_progress_bar_can_be_switched_off(tiny, x, capsys):
    compute_cache(tiny, x, "features.4", progress=False)
    assert capsys.readouterr().err == ""
    compute_cache(tiny, x, "features.4", progress=True)
    assert "Score-CAM" in capsys.readouterr().err


def test_on_progress_hears_every_masked_input(tiny, x, capsys):
    """(done, total): done rises with each call and ends at total, the masked inputs of every
    layer (images x channels); those the model forwarded plus the constant channels that the
    baseline pass stands for make up that total."""
    heard: list[tuple[int, int]] = []
    inputs: list[int] = []
    loaded = from_module(tiny)
    loaded.layers()  # probed now, so that the hook below sees the engine's passes only
    handle = tiny.register_forward_pre_hook(lambda _module, args: inputs.append(int(args[0].shape[0])))
    try:
        cache = compute_cache(
            loaded, x, ["features.1", "features.4"], progress=False, on_progress=lambda done, total: heard.append((done, total)),
            batch_size=5, fold_batchnorm=False, device="cpu",
        )
    finally:
        handle.remove()
    assert capsys.readouterr().err == ""  # no bar: on_progress does not need one
    total = sum(cache[name].sizes["image"] * cache[name].sizes["channel"] for name in ("features.1", "features.4"))
    done = [count for count, _ in heard]
    assert {t for _, t in heard} == {total}
    assert all(b > a for a, b in zip(done, done[1:])) and done[-1] == total
    constant = sum(int(cache[name]["constant"].values.sum()) for name in ("features.1", "features.4"))
    images = cache.sizes["image"]
    # the hook saw the unmasked and the baseline pass of every image, then the masked inputs
    assert sum(inputs) - 2 * images == total - constant
    assert len(inputs) == int(cache.attrs["forward_passes"])


def test_measured_plan_is_one_of_the_candidates_and_remembered(tiny):
    planner.forget_plans()
    torch.set_num_threads(2)  # so that a single-thread plan is among the candidates
    loaded = from_module(tiny)
    sizes: list[int] = []
    handle = tiny.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        compute_cache(loaded, normal(24, 3, 32, 32, seed=0), "features.4", progress=False)
    finally:
        handle.remove()
    candidates = planner.candidate_plans(torch.device("cpu"))
    assert len(candidates) == 6 and Plan(16, 1) in candidates and Plan(32, 2) in candidates
    chosen = list(planner._CHOSEN_PLANS.values())
    assert len(chosen) == 1 and chosen[0] in candidates
    assert torch.get_num_threads() == 2  # restored whatever plan won
    # later runs reuse the choice: every full batch has the chosen size
    sizes.clear()
    handle = tiny.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        compute_cache(loaded, normal(6, 3, 32, 32, seed=1), "features.4", progress=False)
    finally:
        handle.remove()
    assert max(sizes[2:]) == chosen[0].batch_size


def test_a_remembered_thread_count_does_not_narrow_the_plans_of_later_runs(tiny):
    """Once one thread won for a model, a run at another input size still tries torch's
    thread count as well as one thread: the candidates are read before the remembered
    count is set."""
    from scorecam_explorer.models import weights_fingerprint

    planner.forget_plans()
    torch.set_num_threads(2)
    threads_key = (weights_fingerprint(tiny), "cpu", "float32")
    earlier = planner.Planner(key=("an earlier layer",), candidates=[Plan(16, 2), Plan(16, 1)], threads_key=threads_key)
    while earlier.chosen is None:  # one thread is three times faster there
        plan = earlier.next_plan()
        earlier.record(plan, 0.01 * (3 if plan.threads == 2 else 1) * plan.batch_size, plan.batch_size)
    assert planner.remembered_threads(threads_key) == 1
    threads: list[int] = []
    handle = tiny.register_forward_pre_hook(lambda *_: threads.append(torch.get_num_threads()))
    try:
        compute_cache(tiny, normal(2, 3, 24, 24, seed=6), "features.4", progress=False, batch_size=2)
    finally:
        handle.remove()
    masked = threads[2:]  # after the unmasked and the baseline pass
    assert 2 in masked and 1 in masked  # both thread counts timed on real batches
    assert torch.get_num_threads() == 2
    planner.forget_plans()


class StandardisedConv(nn.Conv2d):
    """A convolution whose forward ignores its bias: folding a BatchNorm into it would be wrong."""

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, None, self.stride, self.padding)




def test_batchnorm_folding_gives_the_same_scores(x):
    model = batchnorm_cnn(nn.Conv2d)
    folded = compute_cache(model, x, "5", progress=False, fuse_pointwise=False)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    assert folded.attrs["forward_passes"] == plain.attrs["forward_passes"] + 1  # one check pass on the copy
    again = compute_cache(model, x, "5", progress=False, fuse_pointwise=False)
    assert again.attrs["forward_passes"] == plain.attrs["forward_passes"] + 1  # checked again on every call
    assert rewriting.folded_batchnorm(model, ("another key",)) is not None
    assert_close_up_to_rounding(folded["5"]["masked_logits"].values, plain["5"]["masked_logits"].values)
    np.testing.assert_array_equal(folded["5"]["constant"].values, plain["5"]["constant"].values)
    np.testing.assert_array_equal(folded["logits"].values, plain["logits"].values)  # capture never folds


@pytest.mark.parametrize("change", ["swap the activation", "batchnorm eps"])
def test_a_model_changed_without_new_weights_gets_a_new_faster_copy(x, change):
    """The remembered faster copy is keyed by the weights and the model's structure: a new
    function with the same state dict must not reuse the old copy."""
    model = batchnorm_cnn(nn.Conv2d)
    compute_cache(model, x, "5", progress=False)  # remembers a checked faster copy
    if change == "swap the activation":
        model[2] = nn.Identity()
    else:
        model[1].eps = 0.5
    again = compute_cache(model, x, "5", progress=False)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    assert_close_up_to_rounding(again["5"]["masked_logits"].values, plain["5"]["masked_logits"].values)
    assert_close_up_to_rounding(again["baseline_logits"].values, plain["baseline_logits"].values)


def test_a_convolution_subclass_with_its_own_forward_is_not_folded(x):
    model = batchnorm_cnn(StandardisedConv)  # StandardisedConv, BN, ReLU, then a plain Conv2d, BN
    copy_ = rewriting._fold(model)
    assert isinstance(copy_.get_submodule("0"), StandardisedConv) and isinstance(copy_.get_submodule("1"), nn.BatchNorm2d)
    called = {node.target for node in copy_.graph.nodes if node.op == "call_module"}
    assert "1" in called and "4" not in called  # only the plain pair is folded
    with torch.no_grad():
        assert_close_up_to_rounding(copy_(x), model(x))
    folded = compute_cache(model, x, "5", progress=False)
    plain = compute_cache(model, x, "5", progress=False, fold_batchnorm=False)
    assert_close_up_to_rounding(folded["5"]["masked_logits"].values, plain["5"]["masked_logits"].values)
    assert folded.attrs["forward_passes"] == plain.attrs["forward_passes"] + 1  # the fused copy passed its check


def test_a_copy_that_differs_on_its_first_call_is_not_used_nor_built_again_for_that_key(x, monkeypatch):
    model = batchnorm_cnn(nn.Conv2d)
    real_fold, built = rewriting._fold, []

    def wrong_fold(module):
        copy_ = real_fold(module)
        with torch.no_grad():
            copy_.get_submodule("0").bias.add_(0.5)  # not the model's function any more
        built.append(copy_)
        return copy_

    monkeypatch.setattr(rewriting, "_fold", wrong_fold)
    rewriting.release_copies(model)
    options = dict(progress=False, batch_size=5, adapt_threads=False)
    broken = compute_cache(model, x, "5", **options)
    plain = compute_cache(model, x, "5", fold_batchnorm=False, **options)
    np.testing.assert_array_equal(broken["5"]["masked_logits"].values, plain["5"]["masked_logits"].values)  # the model ran
    # the check passes that failed: the fused copy, then the folded one
    assert broken.attrs["forward_passes"] == plain.attrs["forward_passes"] + 2
    again = compute_cache(model, x, "5", **options)
    assert len(built) == 1 and again.attrs["forward_passes"] == plain.attrs["forward_passes"]  # no copy for this key
    model[1].eps = 1e-3  # another structure: a new copy is built (and checked)
    compute_cache(model, x, "5", **options)
    assert len(built) == 2


def test_folding_leaves_a_convolution_used_twice_alone(x):
    class SharedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.first, self.second = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.last, self.last_norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, inputs):
            features = torch.relu(self.second(self.conv(torch.relu(self.first(self.conv(inputs))))))
            return self.head(self.last_norm(self.last(features)).mean(dim=(2, 3)))

    model = SharedConv().eval()
    with torch.no_grad():
        model.first.running_mean.fill_(0.5)
        model.second.running_var.fill_(3.0)
    folded = rewriting._fold(model)
    assert isinstance(folded.last_norm, nn.BatchNorm2d) and isinstance(folded.first, nn.BatchNorm2d)
    assert "last_norm" not in folded.code and "first" in folded.code  # only the unshared pair folded
    with torch.no_grad():
        assert_close_up_to_rounding(folded(x), model(x))


class SamePaddingConv(nn.Conv2d):
    """A TensorFlow-style "same" convolution that pads in a child module (as EfficientNet ports do)."""

    def __init__(self, *args, pad: tuple[int, int, int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x):
        return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_folding_moves_same_padding_into_the_convolution_and_clamps_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(
        SamePaddingConv(3, 6, 3, pad=(1, 1, 1, 1), bias=False), nn.BatchNorm2d(6), nn.ReLU6(),
        SamePaddingConv(6, 6, 5, stride=2, groups=6, pad=(1, 2, 1, 2), bias=False), nn.BatchNorm2d(6), nn.ReLU6(),
        SamePaddingConv(6, 6, 3, stride=2, pad=(0, 1, 1, 1), bias=False), nn.BatchNorm2d(6), nn.ReLU6(),
        SamePaddingConv(6, 6, 3, stride=1, pad=(0, 2, 0, 2), bias=False), nn.BatchNorm2d(6), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()
    with torch.no_grad():
        for norm in (m for m in model if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    folded = rewriting._fold(model)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert type(convs[0]) is nn.Conv2d and convs[0].padding == (1, 1) and convs[0].kernel_size == (3, 3)  # symmetric
    # (a, a + 1): padding a + 1 both sides, the kernel grown by a zero row and column in front
    assert type(convs[1]) is nn.Conv2d and convs[1].padding == (2, 2) and convs[1].kernel_size == (6, 6)
    assert torch.all(convs[1].weight[:, :, 0, :] == 0) and torch.all(convs[1].weight[:, :, :, 0] == 0)
    assert type(convs[2]) is nn.Conv2d and convs[2].padding == (1, 1) and convs[2].kernel_size == (3, 4)  # columns only
    assert isinstance(convs[3], SamePaddingConv)  # (0, 2) has no such form: stays as it is
    assert "hardtanh_" in folded.code
    with torch.no_grad():
        for size in (16, 15, 9):
            x = torch.randn(2, 3, size, size)
            assert_close_up_to_rounding(folded(x), model(x))


ALLOCATOR_CHECK = """
import sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
from _tiny_models import TinyCNN, normal
from scorecam_explorer import device
from scorecam_explorer.engine import compute_cache

torch.manual_seed(0)
model, x = TinyCNN().eval(), normal(2, 3, 32, 32, seed=5)
options = dict(progress=False, batch_size=5, adapt_threads=False)
assert not device.allocator_tuned(), "tuned before the first call"
before = compute_cache(model, x, "features.4", tune_allocator=False, **options)
assert not device.allocator_tuned(), "tuned although tune_allocator=False"
after = compute_cache(model, x, "features.4", tune_allocator=True, **options)
if device.allocator_tuned() != sys.argv[2].startswith("glibc"):
    raise AssertionError(f"allocator tuned: {device.allocator_tuned()} on {sys.argv[2]}")
np.testing.assert_array_equal(before["features.4"]["masked_logits"].values, after["features.4"]["masked_logits"].values)
print("same")
"""


def test_allocator_tuning_changes_no_result():
    """In a fresh process, so that the run "before" really has glibc's default allocator (in
    this one an earlier test has tuned it already, and tuning cannot be undone)."""
    import platform
    import subprocess
    import sys
    from pathlib import Path

    libc = "glibc" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "other"
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_CHECK, str(Path(__file__).parent), libc], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr[-2000:]


def test_model_on_another_device_is_moved_back(tiny, x):
    parameter_device = next(tiny.parameters()).device
    compute_cache(tiny, x[:1], "features.4", progress=False, device="cpu")
    assert next(tiny.parameters()).device == parameter_device


@pytest.mark.slow
def test_default_model_head_matches_pytorch_grad_cam(default_model):
    """The embedded EfficientNet-Lite0, its 1280-channel head, a real photo. pytorch-grad-cam's
    own weight computation, run on a subset of the channels (its masks are per channel, so a
    subset is exact), agrees with the weights recomposed from our cache on that subset."""
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cache = compute_cache(default_model, "sample:chelsea", convention="pytorch-grad-cam", progress=False)
    node = cache["head"]
    constant = node["constant"].values[0]
    # every dead channel (all zeros on this photo) is flagged constant, and only channels
    # constant at feature resolution are; flagged ones were scored as the all-zero input
    flat = node["activation"].values[0].reshape(constant.size, -1)
    dead, flat_range = np.abs(flat).max(axis=1) == 0, np.ptp(flat, axis=1)
    assert dead.any() and (~constant).any()
    assert (constant >= dead).all() and (flat_range[constant] == 0).all()
    np.testing.assert_array_equal(node["masked_logits"].values[0, constant], np.broadcast_to(
        cache["baseline_logits"].values[0], (int(constant.sum()), cache["baseline_logits"].shape[1])))
    subset = np.concatenate([np.flatnonzero(constant)[:24], np.flatnonzero(~constant)[:40]])
    target = int(cache["logits"].values[0].argmax())
    scores = node["masked_logits"].values[0, subset, target]
    ours = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()

    cam = ScoreCAM(default_model.module, target_layers=[default_model.module.head])
    activation = node["activation"].values[:, subset]
    theirs = cam.get_cam_weights(
        torch.from_numpy(cache["input"].values), None, [ClassifierOutputTarget(target)], activation, None
    )[0]
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=1e-7)
    our_map = np.maximum((ours[:, None, None] * activation[0]).sum(0), 0)
    their_map = np.maximum((theirs[:, None, None] * activation[0]).sum(0), 0)
    assert np.corrcoef(our_map.ravel(), their_map.ravel())[0, 1] >= 0.9999


@pytest.mark.slow
def test_benchmark_quick_mode_runs(tmp_path):
    """The benchmark's --quick mode (about a minute) still runs and reports every section."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scorecam.py"
    report = tmp_path / "numbers.json"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(report)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for section in ("1. efficientnet_lite0", "2. resnet18", "3. Maps of 10 classes", "4. Recomposing", "5. Floor", "6. Peak"):
        assert section in result.stdout
    numbers = json.loads(report.read_text())
    assert numbers["lite0_r_pgc"] >= 0.999
    assert "native bfloat16 on the CPU: " in result.stdout[:3000]  # the machine, at the top
    if "native bfloat16 on the CPU: yes" in result.stdout:
        assert numbers["bf16_spearman"] >= 0.99
    else:  # no bfloat16 rows where it is not native (they would take minutes), and the reason why
        assert "bf16_spearman" not in numbers and "bfloat16 rows skipped" in result.stdout


@pytest.mark.slow
def test_vision_transformer_benchmark_quick_mode_runs():
    """benchmarks/bench_vit.py --quick (a small ViT, about half a minute) runs, names the machine,
    and our map agrees with pytorch-grad-cam's with its reshape_transform."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vit.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "native bfloat16 on the CPU: " in result.stdout
    agreement = re.search(r"map Pearson r vs pytorch-grad-cam \(>= 0.999\)\s+([0-9.]+)", result.stdout)
    assert agreement is not None and float(agreement.group(1)) >= 0.999, result.stdout


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_as_a_smoke_run(tmp_path):
    """benchmarks/bench_gpu.py (ResNet-50 layer4 against pytorch-grad-cam) runs anywhere with --device cpu."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    report = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--size", "64", "--repeats", "1", "--json", str(report)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(report.read_text())
    assert numbers["channels"] == 2048 and numbers["r_pgc"] >= 0.999


def test_a_plain_module_keeps_its_train_flags_and_its_probe_passes_are_counted(tiny_cnn, x):
    model = tiny_cnn.train()
    model.features[1].eval()  # a mixed state: every flag must come back as it was
    flags = [m.training for m in model.modules()]
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        cache = compute_cache(model, x, "features.4", progress=False)
    finally:
        handle.remove()
    assert [m.training for m in model.modules()] == flags
    assert cache.attrs["forward_passes"] == calls[0]  # the probe passes included
