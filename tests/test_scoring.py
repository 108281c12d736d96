"""Masks and masked scoring, checked against the masks pytorch-grad-cam and torchcam build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from _tiny_models import batchnorm_cnn, normal
from _float32 import assert_close_up_to_rounding

from scorecam_explorer.capture import capture
from scorecam_explorer.conventions import MASK_CONVENTIONS, MaskConvention, get_convention
from scorecam_explorer.errors import NonFiniteError, ScorecamError
from scorecam_explorer.planner import Plan, Planner, forget_plans, remembered_threads
from scorecam_explorer.scoring import baseline_logits, score_layer


def with_dead_channels(model: nn.Module, conv: nn.Conv2d, dead: list[int]) -> nn.Module:
    """Make channels ``dead`` of ``conv`` negative everywhere, so a following ReLU zeroes them."""
    with torch.no_grad():
        conv.bias[dead] = -1e4
    return model


@pytest.fixture
def tiny_with_dead(tiny_cnn):
    return with_dead_channels(tiny_cnn, tiny_cnn.features[3], [2, 5, 11])



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(2, 3, 32, 32)


class InputRecorder:
    """Records (clones of) every input the model is called with."""

    def __init__(self, model: nn.Module):
        self.calls: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(lambda _m, args: self.calls.append(args[0].detach().clone()))

    def remove(self) -> None:
        self.handle.remove()


def our_masked_inputs(convention: str, inputs: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """X_i * H_ik for every image and channel, (N * C, 3, H, W), as scoring builds them."""
    masks = get_convention(convention).masks(activation, tuple(inputs.shape[-2:]))
    return torch.cat([inputs[i] * masks[i][:, None] for i in range(inputs.shape[0])])


def pytorch_grad_cam_masked_inputs(model, layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    recorder = InputRecorder(model)
    try:
        cam = ScoreCAM(model, target_layers=[layer])
        cam(inputs, targets=[ClassifierOutputTarget(1)] * inputs.shape[0])
    finally:
        recorder.remove()
    return torch.cat(recorder.calls[1:])  # the first call is the unmasked forward


def torchcam_masked_inputs(model, layer_name: str, inputs: torch.Tensor) -> torch.Tensor:
    from torchcam.methods import ScoreCAM

    with ScoreCAM(model, target_layer=layer_name, batch_size=7, input_shape=tuple(inputs.shape[1:])) as extractor:
        with torch.no_grad():
            model(inputs)
        recorder = InputRecorder(model)
        try:
            extractor(class_idx=[1] * inputs.shape[0])
        finally:
            recorder.remove()
    return torch.cat(recorder.calls[1:])  # the first call re-scores the unmasked input


@pytest.mark.parametrize("n_images", [1, 2])
def test_pytorch_grad_cam_convention_reproduces_its_masks_exactly(tiny_with_dead, inputs, n_images):
    x = inputs[:n_images]
    activation = capture(tiny_with_dead, x, ["features.4"]).activations["features.4"]
    theirs = pytorch_grad_cam_masked_inputs(tiny_with_dead, tiny_with_dead.features[4], x)
    ours = our_masked_inputs("pytorch-grad-cam", x, activation)
    assert theirs.shape == ours.shape == (n_images * 16, 3, 32, 32)
    assert torch.equal(ours, theirs)
    # the dead channels' masked inputs are exactly the baseline X * 0
    for i in range(n_images):
        for k in (2, 5, 11):
            assert torch.equal(theirs[i * 16 + k], x[i] * 0)


def forwarded_masked_inputs(model, x, layer, convention) -> torch.Tensor:
    """The masked inputs ``score_layer`` actually forwards (every channel, in order)."""
    activation = capture(model, x, [layer]).activations[layer]
    baseline = baseline_logits(model, x)
    recorder = InputRecorder(model)
    try:
        score_layer(
            model, x, activation, get_convention(convention), baseline=baseline,
            planner=Planner(key=("record", layer), candidates=[Plan(8), Plan(16), Plan(32)]), skip_constant=False,
        )
    finally:
        recorder.remove()
    return torch.cat(recorder.calls)


@pytest.mark.parametrize("convention", ["pytorch-grad-cam", "torchcam"])
def test_forwarded_inputs_equal_the_libraries_on_a_resnet(convention):
    """128 channels of 4x4 upsampled to 32x32: PyTorch's vectorised CPU kernel (H + W <= 128),
    whose rounding depends on how channels are grouped, over two blocks of 64 channels."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    if convention == "pytorch-grad-cam":
        theirs = pytorch_grad_cam_masked_inputs(model, model.layer2, x)
    else:
        theirs = torchcam_masked_inputs(model, "layer2", x)
    ours = forwarded_masked_inputs(model, x, "layer2", convention)
    assert ours.shape == theirs.shape == (128, 3, 32, 32)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("n_images", [1, 2])
def test_torchcam_convention_reproduces_its_masks_exactly(tiny_with_dead, inputs, n_images):
    x = inputs[:n_images]
    activation = capture(tiny_with_dead, x, ["features.4"]).activations["features.4"]
    theirs = torchcam_masked_inputs(tiny_with_dead, "features.4", x)
    ours = our_masked_inputs("torchcam", x, activation)
    assert theirs.shape == ours.shape
    assert torch.equal(ours, theirs)


def test_torchcam_and_pytorch_grad_cam_masks_differ(tiny_with_dead, inputs):
    """The conventions are not interchangeable: each test above checks something."""
    activation = capture(tiny_with_dead, inputs, ["features.4"]).activations["features.4"]
    a = get_convention("torchcam").masks(activation, (32, 32))
    b = get_convention("pytorch-grad-cam").masks(activation, (32, 32))
    assert not torch.equal(a, b)


def official_masks(activation: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor | None]:
    """The authors' loop (haofanwang/Score-CAM ``cam/scorecam.py``) for one image: a mask per
    channel, None where they skip a constant channel."""
    masks: list[torch.Tensor | None] = []
    for i in range(activation.shape[1]):
        saliency_map = torch.unsqueeze(activation[:, i, :, :], 1)
        saliency_map = F.interpolate(saliency_map, size=size, mode="bilinear", align_corners=False)
        if saliency_map.max() == saliency_map.min():
            masks.append(None)
            continue
        masks.append((saliency_map - saliency_map.min()) / (saliency_map.max() - saliency_map.min()))
    return masks


@pytest.mark.parametrize("name", ["official", "paper"])
def test_official_and_paper_conventions_match_the_authors_loop(tiny_with_dead, inputs, name):
    x = inputs[:1]
    activation = capture(tiny_with_dead, x, ["features.4"]).activations["features.4"]
    convention = get_convention(name)
    ours = convention.masks(activation, (32, 32))[0]
    constant = convention.constant_channels(activation, (32, 32))[0]
    for k, theirs in enumerate(official_masks(activation, (32, 32))):
        if theirs is None:
            assert bool(constant[k]) and not bool(ours[k].any())
        else:
            assert not bool(constant[k])
            assert torch.equal(ours[k], theirs[0, 0])
    assert all(bool(constant[k]) for k in (2, 5, 11))


def test_masks_lie_in_unit_interval():
    torch.manual_seed(0)
    activation = torch.randn(2, 5, 7, 7)
    for convention in MASK_CONVENTIONS.values():
        masks = convention.masks(activation, (40, 40))
        assert masks.shape == (2, 5, 40, 40)
        assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
        if convention.normalize == "after_upsample":  # min-max at input resolution: spans [0, 1]
            assert torch.allclose(masks.flatten(2).amax(2), torch.ones(2, 5), atol=1e-6)
            assert torch.equal(masks.flatten(2).amin(2), torch.zeros(2, 5))


def test_a_constant_map_is_flagged_and_gets_a_zero_mask_not_nan():
    """Channel 0 is 3.25 everywhere, channel 1 is not. A channel is constant where it is
    normalised: the feature map itself (normalised before upsampling), or its bilinear
    upsampling, where rounding may make a constant map vary by an ulp (align_corners=True,
    as in pytorch-grad-cam: no constant channel then, and a mask of amplified rounding)."""
    activation = torch.full((1, 2, 5, 5), 3.25)
    activation[0, 1, 0, 0] = 4.0
    flagged = set()
    for convention in MASK_CONVENTIONS.values():
        masks = convention.masks(activation, (20, 20))
        assert torch.isfinite(masks).all()
        constant = convention.constant_channels(activation, (20, 20))[0]
        normalised = activation
        if convention.normalize == "after_upsample":
            normalised = F.interpolate(activation, (20, 20), mode="bilinear", align_corners=convention.align_corners)
        expected = normalised.flatten(2).amax(2)[0] == normalised.flatten(2).amin(2)[0]
        assert constant.tolist() == expected.tolist(), convention.name
        for k in range(2):  # a flagged channel's mask is all zero, any other's is not
            assert bool(masks[0, k].any()) != bool(constant[k]), (convention.name, k)
        if constant[0]:
            flagged.add(convention.name)
    assert flagged >= {"paper", "official", "torchcam"}


def test_convention_json_round_trip_and_unknown_name():
    for convention in MASK_CONVENTIONS.values():
        assert MaskConvention.from_json(convention.to_json()) == convention
    with pytest.raises(ScorecamError, match="unknown mask convention 'torchcamm'.*Did you mean: torchcam"):
        get_convention("torchcamm")


def run_score_layer(model, x, layer, convention="paper", batch_size=4, **kwargs):
    activation = capture(model, x, [layer]).activations[layer]
    baseline = baseline_logits(model, x)
    planner = Planner(key=("test", batch_size), candidates=[Plan(batch_size)])
    scores = score_layer(
        model, x, activation, get_convention(convention), baseline=baseline, planner=planner, layer=layer, **kwargs
    )
    return scores, activation, baseline


def test_masked_logits_are_the_outputs_on_the_masked_inputs(tiny_with_dead, inputs):
    scores, activation, _ = run_score_layer(tiny_with_dead, inputs, "features.4", convention="pytorch-grad-cam")
    with torch.no_grad():
        expected = tiny_with_dead(our_masked_inputs("pytorch-grad-cam", inputs, activation)).reshape(2, 16, 10)
    assert_close_up_to_rounding(scores.masked_logits, expected)  # other batches than one pass of all 32
    assert scores.constant[:, [2, 5, 11]].all()
    assert scores.forwarded == int((~scores.constant).sum()) < 32


def test_skipping_constant_channels_is_identical_to_forwarding_them(tiny_with_dead, inputs):
    x = inputs[:1]
    skipped, _, baseline = run_score_layer(tiny_with_dead, x, "features.4", batch_size=1)
    forwarded, _, _ = run_score_layer(tiny_with_dead, x, "features.4", batch_size=1, skip_constant=False)
    assert forwarded.forwarded == 16
    assert skipped.forwarded == 16 - int(skipped.constant.sum()) <= 13
    assert torch.equal(skipped.constant, forwarded.constant)
    # bit for bit: the constant channels' masked inputs are X * 0, the baseline input
    assert torch.equal(skipped.masked_logits, forwarded.masked_logits)
    for k in (2, 5, 11):
        assert torch.equal(forwarded.masked_logits[0, k], baseline[0])


def test_masks_and_batches_stay_small_whatever_the_channel_count(monkeypatch):
    """Peak memory: masks exist for one block of channels, masked inputs for one batch."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 300, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(300, 4)
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    blocks: list[int] = []
    original = MaskConvention.mask_blocks

    def recording_blocks(self, activation, size, block=64):
        for first, masks, constant in original(self, activation, size, block):
            blocks.append(len(masks))
            yield first, masks, constant

    monkeypatch.setattr(MaskConvention, "mask_blocks", recording_blocks)
    recorder = InputRecorder(model)
    try:
        scores, _, _ = run_score_layer(model, x, "1", batch_size=4)
    finally:
        recorder.remove()
    assert max(blocks) == 64 and sum(blocks) == 300
    masked_batches = [call.shape[0] for call in recorder.calls[2:]]  # after capture and baseline
    assert max(masked_batches) == 4
    assert sum(masked_batches) == scores.forwarded == int((~scores.constant).sum())


def test_out_of_memory_halves_the_batch_and_gives_the_same_result(tiny_with_dead, inputs):
    reference, _, _ = run_score_layer(tiny_with_dead, inputs, "features.4", batch_size=8)
    calls = {"n": 0}

    def fail_once_on_big_batches(_module, args):
        if args[0].shape[0] > 4 and calls["n"] == 0:
            calls["n"] += 1
            raise torch.OutOfMemoryError("simulated")

    handle = tiny_with_dead.register_forward_pre_hook(fail_once_on_big_batches)
    try:
        activation = capture(tiny_with_dead, inputs, ["features.4"]).activations["features.4"]
        planner = Planner(key=("oom",), candidates=[Plan(8)])
        scores = score_layer(
            tiny_with_dead, inputs, activation, get_convention("paper"),
            baseline=baseline_logits(tiny_with_dead, inputs), planner=planner,
        )
    finally:
        handle.remove()
    assert planner.chosen == Plan(4)
    assert_close_up_to_rounding(scores.masked_logits, reference.masked_logits)  # batches of 4, not 8


def test_non_finite_masked_output_names_the_layer(tiny_cnn, inputs):
    def poison(_module, args, output):
        return output * float("nan") if args[0].abs().sum() < 1e9 and args[0].shape[0] < 4 else output

    activation = capture(tiny_cnn, inputs, ["features.4"]).activations["features.4"]
    baseline = baseline_logits(tiny_cnn, inputs)
    handle = tiny_cnn.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError, match="masked by layer 'features.4'"):
            score_layer(
                tiny_cnn, inputs, activation, get_convention("paper"), baseline=baseline,
                planner=Planner(key=("nan",), candidates=[Plan(3)]), layer="features.4",
            )
    finally:
        handle.remove()


def test_bfloat16_scores_are_close_to_float32(tiny_with_dead, inputs, native_bfloat16):
    fp32, _, _ = run_score_layer(tiny_with_dead, inputs, "features.4")
    bf16, _, _ = run_score_layer(tiny_with_dead, inputs, "features.4", precision="bfloat16")
    assert not torch.equal(fp32.masked_logits, bf16.masked_logits)
    torch.testing.assert_close(bf16.masked_logits, fp32.masked_logits, rtol=0.05, atol=0.05)


def test_channels_last_changes_no_more_than_rounding(tiny_with_dead, inputs):
    plain, _, _ = run_score_layer(tiny_with_dead, inputs, "features.4")
    last, _, _ = run_score_layer(tiny_with_dead, inputs, "features.4", channels_last=True)
    assert_close_up_to_rounding(last.masked_logits, plain.masked_logits)


def drive(planner: Planner, per_image_seconds) -> list[Plan]:
    """Feed a planner synthetic timings until it chooses; returns the plans it tried."""
    tried = []
    while planner.chosen is None and len(tried) < 50:
        plan = planner.next_plan()
        if planner.chosen is not None:
            break
        tried.append(plan)
        planner.record(plan, per_image_seconds(plan) * plan.batch_size, plan.batch_size)
    return tried


def test_planner_picks_threads_then_batch_size_and_prunes_slow_plans():
    forget_plans()
    candidates = [Plan(size, threads) for threads in (2, 1) for size in (16, 8, 32)]
    costs = {Plan(16, 2): 0.030, Plan(16, 1): 0.010, Plan(8, 1): 0.012, Plan(32, 1): 0.009,
             Plan(8, 2): 0.031, Plan(32, 2): 0.029}
    planner = Planner(key=("synthetic",), candidates=candidates, threads_key=("model",))
    tried = drive(planner, costs.__getitem__)
    assert planner.chosen == Plan(32, 1)
    assert remembered_threads(("model",)) == 1
    # the slow two-thread plan is timed once only; no two-thread plan of another size is tried
    assert tried.count(Plan(16, 2)) == 1
    assert {plan for plan in tried if plan.threads == 2} == {Plan(16, 2)}
    assert tried.count(Plan(16, 1)) == planner.samples == tried.count(Plan(32, 1)) == 3
    # remembered: a new planner with the same key measures nothing
    assert Planner(key=("synthetic",), candidates=candidates).next_plan() == Plan(32, 1)
    forget_plans()
    assert remembered_threads(("model",)) is None


def test_planner_ignores_short_batches_and_single_candidates():
    planner = Planner(key=("short",), candidates=[Plan(16, 1), Plan(16, 2)])
    for _ in range(10):
        plan = planner.next_plan()
        planner.record(plan, 0.1, plan.batch_size - 1)  # every batch short: nothing learnt
    assert planner.chosen is None
    assert Planner(key=("single",), candidates=[Plan(5)]).chosen == Plan(5)


def test_allocator_tuning_is_idempotent_on_glibc():
    import platform

    from scorecam_explorer.device import allocator_tuned, tune_allocator

    first = tune_allocator()
    assert tune_allocator() == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first and allocator_tuned()


def test_device_names():
    from scorecam_explorer.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ScorecamError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_planner_switches_when_the_chosen_plan_slows_down():
    forget_plans()
    candidates = [Plan(16, 2), Plan(16, 1)]
    costs = {Plan(16, 2): 0.010, Plan(16, 1): 0.016}
    planner = Planner(key=("busy",), candidates=candidates, threads_key=("busy model",))
    drive(planner, costs.__getitem__)
    assert planner.chosen == Plan(16, 2)
    for _ in range(2):  # the machine gets busy: two threads now cost 0.05 s per image
        planner.record(Plan(16, 2), 0.05 * 16, 16)
    assert planner.chosen == Plan(16, 2)  # two slow batches are not enough
    planner.record(Plan(16, 2), 0.05 * 16, 16)
    assert planner.chosen == Plan(16, 1)
    assert remembered_threads(("busy model",)) == 1
    # a later planner for the same key still knows the alternatives and keeps watching
    later = Planner(key=("busy",), candidates=candidates)
    for _ in range(3):
        later.record(Plan(16, 1), 0.2 * 16, 16)
    assert later.chosen == Plan(16, 2)
    forget_plans()


def test_a_channels_last_folded_copy_stores_its_convolutions_channels_last_and_computes_the_same():
    from scorecam_explorer.rewriting import folded_batchnorm

    model = batchnorm_cnn()  # non-trivial BatchNorm statistics, so folding changes the weights
    folded = folded_batchnorm(model, ("fingerprint", "cpu"), channels_last=True)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Conv2d))  # the model is untouched
    x = normal(4, 3, 12, 12, seed=0)
    with torch.no_grad():
        assert_close_up_to_rounding(folded(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_adapt_threads_false_never_touches_the_thread_count(tiny_cnn, inputs, monkeypatch):
    from scorecam_explorer.engine import compute_cache

    forget_plans()
    torch.set_num_threads(2)
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    fixed = compute_cache(tiny_cnn, inputs, "features.3", progress=False, adapt_threads=False)
    assert calls == [] and torch.get_num_threads() == 2
    adapted = compute_cache(tiny_cnn, inputs, "features.3", progress=False)
    assert 1 in calls and torch.get_num_threads() == 2  # one thread was tried, then restored
    # the measured plans may differ in batch size: rounding only
    assert_close_up_to_rounding(fixed["features.3"]["masked_logits"].values, adapted["features.3"]["masked_logits"].values)
    forget_plans()


def test_a_fixed_batch_size_gives_bit_identical_runs_whatever_the_thread_count(tiny_cnn, inputs):
    """docs/performance.md: the batch plan changes float32 rounding only, and a fixed
    ``batch_size`` makes repeat runs bit-identical (the thread count changes no bit)."""
    from scorecam_explorer.engine import compute_cache

    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append(compute_cache(tiny_cnn, inputs, "features.3", progress=False, batch_size=5, adapt_threads=False))
    finally:
        torch.set_num_threads(threads)
    first, second = (run["features.3"]["masked_logits"].values for run in runs)
    assert (first == second).all()
