"""Transformer layers: torchvision's ViT (tokens (N, T, D)) and Swin (channels-last (N, H, W, C))
read as channel maps on their grid, against pytorch-grad-cam with the usual reshape_transform.

Small random-weight configurations, seeded. Agreement as for the CNN presets: Pearson r >= 0.999
and max |difference| <= 1e-3 after min-max, at input resolution; every compared map is checked to
vary, so that no comparison passes on flat maps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from _tiny_models import normal
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

from scorecam_explorer import baselines
from scorecam_explorer.compose import scorecam
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ScorecamError, UnknownLayerError
from scorecam_explorer.layouts import NCHW, NHWC, TokenLayout, layout_from, maps_of
from scorecam_explorer.models import from_module, load_architecture, model_family

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = 8


def spread(model: nn.Module, seed: int = 1) -> nn.Module:
    """Redraw every Linear layer at unit fan-in scale and the token embeddings at unit scale:
    torchvision initialises a ViT's head at zero and a Swin's Linear layers at std 0.02, which
    gives flat maps; these weights give maps that vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.weight.shape[1] ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        for name, parameter in model.named_parameters():
            if name in ("class_token", "encoder.pos_embedding"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def vit(image_size: int = 32) -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=PATCH, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    return spread(model)


class AnySizeViT(torchvision.models.VisionTransformer):
    """A torchvision ViT for one non-square input size (its position embedding sized for it)."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__(image_size=height, patch_size=PATCH, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
        tokens = 1 + (height // PATCH) * (width // PATCH)
        self.encoder.pos_embedding = nn.Parameter(torch.zeros(1, tokens, self.hidden_dim))

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        patches = self.conv_proj(x).reshape(n, self.hidden_dim, (height // PATCH) * (width // PATCH))
        return patches.permute(0, 2, 1)


def swin(version: int = 1) -> torchvision.models.SwinTransformer:
    torch.manual_seed(0)
    v2 = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if version == 2 else {}
    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=10, **v2
    )
    return spread(model)


def vit_reshape(tensor: torch.Tensor, height: int = 4, width: int = 4) -> torch.Tensor:
    """pytorch-grad-cam's ViT example: drop the class token, tokens on the grid, channels first."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(tensor: torch.Tensor) -> torch.Tensor:
    """torchvision's Swin outputs (N, H, W, C) already: channels first."""
    return tensor.permute(0, 3, 1, 2)


VIT_LAYER = "encoder.layers.encoder_layer_1.ln_1"  # the default: the last block's first LayerNorm
CASES = {
    "vit": (vit, VIT_LAYER, vit_reshape),
    "vit-block": (vit, "encoder.layers.encoder_layer_0", vit_reshape),
    "swin": (lambda: swin(1), "features.3", swin_reshape),
    "swin-norm": (lambda: swin(1), "norm", swin_reshape),
    "swin-default": (lambda: swin(1), "features.3.0.norm1", swin_reshape),
    "swin-v2": (lambda: swin(2), "features.3", swin_reshape),
}


def min_max(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def assert_agrees(ours: np.ndarray, theirs: np.ndarray) -> None:
    ours, theirs = min_max(ours), min_max(theirs)
    assert ours.shape == theirs.shape
    assert ours.std() > 0.05 and theirs.std() > 0.05, "a flat map: the comparison would say nothing"
    r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    difference = np.abs(ours - theirs).max()
    assert r >= 0.999 and difference <= 1e-3, f"Pearson r = {r:.6f}, max |difference| = {difference:.2e}"


def inputs_for(size: tuple[int, int] = (32, 32), count: int = 2) -> torch.Tensor:
    return normal(count, 3, *size, seed=3)


@pytest.mark.parametrize("case", list(CASES))
def test_the_pytorch_grad_cam_preset_agrees_with_its_score_cam(case) -> None:
    build, layer, reshape = CASES[case]
    module = build()
    inputs = inputs_for()
    cache = compute_cache(module, inputs, layer, convention="pytorch-grad-cam", batch_size=16, progress=False, device="cpu")
    top = int(cache["logits"].values[0].argmax())
    low = int(cache["logits"].values[0].argmin())
    with ScoreCAM(model=module, target_layers=[module.get_submodule(layer)], reshape_transform=reshape) as cam:
        cam.batch_size = 16
        for cls in (top, low):
            theirs = cam(input_tensor=inputs[:1], targets=[ClassifierOutputTarget(cls)])[0]
            ours = scorecam(cache, layer, cls, preset="pytorch-grad-cam", image=0)
            assert_agrees(ours.values, theirs)


@pytest.mark.parametrize(("ours", "theirs"), [(baselines.gradcam, GradCAM), (baselines.gradcam_pp, GradCAMPlusPlus)], ids=["gradcam", "gradcam++"])
@pytest.mark.parametrize("case", ["vit", "swin", "swin-default", "swin-v2"])
def test_the_gradient_baselines_agree_with_pytorch_grad_cam(case, ours, theirs) -> None:
    build, layer, reshape = CASES[case]
    module = build()
    inputs = inputs_for()
    result = ours(module, inputs, layer)  # each image's top-1 class; a plain module: its layout from its type
    targets = [int(target) for target in result.coords["target"].values]
    with theirs(module, [module.get_submodule(layer)], reshape_transform=reshape) as cam:
        expected = cam(inputs.clone(), [ClassifierOutputTarget(t) for t in targets])
    assert result.shape == (2, 32, 32)
    for index in range(2):
        assert_agrees(result.values[index], expected[index])


def test_vit_tokens_are_channels_on_the_patch_grid() -> None:
    module = vit()
    inputs = inputs_for()
    cache = compute_cache(module, inputs, VIT_LAYER, batch_size=16, progress=False, device="cpu")
    assert cache[VIT_LAYER]["activation"].shape == (2, 16, 4, 4)
    assert cache[VIT_LAYER].attrs["layout"] == "tokens"
    tokens = []
    handle = module.get_submodule(VIT_LAYER).register_forward_hook(lambda _m, _i, output: tokens.append(output))
    with torch.no_grad():
        module(inputs)
    handle.remove()
    expected = tokens[0][:, 1:, :].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)  # the class token dropped
    np.testing.assert_array_equal(cache[VIT_LAYER]["activation"].values, expected.numpy())


def test_a_non_square_input_gives_a_non_square_grid() -> None:
    torch.manual_seed(0)
    module = spread(AnySizeViT(32, 48))
    inputs = inputs_for((32, 48))
    layer = "encoder.layers.encoder_layer_0.ln_1"
    cache = compute_cache(module, inputs, None, batch_size=16, progress=False, device="cpu")  # its default layer
    assert cache[layer]["activation"].shape == (2, 16, 4, 6)
    recorded = []
    handle = module.get_submodule(layer).register_forward_hook(lambda _m, _i, output: recorded.append(output))
    with torch.no_grad():
        module(inputs)
    handle.remove()
    # A[n, d, i, j] = O[n, 1 + i * 6 + j, d]: rows of 6 tokens
    np.testing.assert_array_equal(cache[layer]["activation"].values[1, 5, 2, 3], recorded[0][1, 1 + 2 * 6 + 3, 5].numpy())
    gradients = baselines.gradcam(module, inputs, layer, 0)
    assert gradients.shape == (2, 32, 48) and float(gradients.values.std()) > 0.05


def test_a_vit_for_64_pixel_inputs_is_probed_at_the_size_it_is_given() -> None:
    module = vit(64)
    inputs = inputs_for((64, 64), count=1)
    cache = compute_cache(module, inputs, None, batch_size=64, progress=False, device="cpu")
    assert VIT_LAYER in cache.children and cache[VIT_LAYER]["activation"].shape == (1, 16, 8, 8)
    loaded = from_module(module)  # the size it is built for, not 224
    assert loaded.preprocessing.input_size == 64 and loaded.layer(VIT_LAYER).height == 8


class WrappedViT(nn.Module):
    """A torchvision ViT inside a module of one's own: not recognised by type, but its
    built-for size is found inside it."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.vit = vit(image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


@pytest.mark.parametrize("build", [lambda: vit(32), lambda: WrappedViT(32)], ids=["vit", "wrapped-vit"])
def test_the_explorer_given_a_plain_vit_probes_at_its_input_size(build) -> None:
    """Explorer.from_model and Explorer(cache, model=module) with a ViT built for 32 x 32: no
    probe at 224 ("Wrong image height!"), layers listed and added at the cache's size."""
    from scorecam_explorer.explorer import Explorer
    from scorecam_explorer.explorer.model_link import compute_layers

    module = build()
    inputs = inputs_for((32, 32), count=1)
    layers = None if isinstance(module, torchvision.models.VisionTransformer) else "vit.conv_proj"
    explorer = Explorer.from_model(module, inputs, layers, progress=False, batch_size=64)
    prefix = "" if layers is None else "vit."
    for link in (explorer.model, Explorer(explorer.cache, model=module).model):
        probed = link.get().at_input((32, 32))
        assert probed.layer(f"{prefix}conv_proj").height == 4  # 32 / patch 8, not 224 / 8
        if layers is None:  # recognised by type: its token layers are listed
            infos = link.layers_for(explorer.cache)
            assert infos and all(info.height == info.width == 4 for info in infos)
            assert f"{prefix}conv_proj" in link.uncached_layers(explorer.cache)
    added = compute_layers(explorer.cache, explorer.model.get(), [f"{prefix}conv_proj"], progress=False)
    assert added[f"{prefix}conv_proj"]["activation"].shape == (1, 16, 4, 4)


def test_the_explorer_given_a_cnn_with_a_non_square_input_lists_layers_at_that_size() -> None:
    from scorecam_explorer.explorer import Explorer
    from scorecam_explorer.explorer.model_link import compute_layers

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()  # fmt: skip
    inputs = normal(1, 3, 24, 40, seed=5)
    explorer = Explorer.from_model(module, inputs, "3", progress=False, batch_size=64)
    assert explorer.cache["3"]["activation"].shape == (1, 6, 12, 20)
    sizes = {info.name: (info.height, info.width) for info in explorer.model.layers_for(explorer.cache)}
    assert sizes == {"0": (24, 40), "1": (24, 40), "2": (12, 20), "3": (12, 20), "4": (1, 1)}  # not 224 x 224
    assert explorer.model.uncached_layers(explorer.cache) == ["0", "1", "2", "4"]
    added = compute_layers(explorer.cache, explorer.model.get(), ["1"], progress=False)
    assert added["1"]["activation"].shape == (1, 4, 24, 40)
    # the same layer computed directly on the module
    direct = compute_cache(module, inputs, "1", progress=False, batch_size=64)
    np.testing.assert_array_equal(added["1"]["masked_logits"].values, direct["1"]["masked_logits"].values)


def test_vit_layers_are_listed_with_their_token_layout() -> None:
    loaded = from_module(vit(), name="vit")
    names = loaded.layer_names()
    for name in ("encoder", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", VIT_LAYER):
        assert name in names
    assert loaded.default_layer == VIT_LAYER
    block = loaded.layer("encoder.layers.encoder_layer_1")
    assert (block.channels, block.height, block.width) == (16, 4, 4)
    assert loaded.layer("conv_proj").channels == 16 and loaded.layout_for("conv_proj") is NCHW
    assert loaded.layout_for(VIT_LAYER) == TokenLayout(prefix=1, patch=(PATCH, PATCH))


def test_swin_stages_are_read_channels_last() -> None:
    module = swin()
    loaded = from_module(module, input_size=32)
    assert loaded.default_layer == "features.3.0.norm1"  # the last block's first LayerNorm
    stage = loaded.layer("features.3")
    assert (stage.channels, stage.height, stage.width) == (32, 4, 4)  # read as NCHW it would be 4 x (4 x 32)
    assert loaded.layout_for("features.3") is NHWC and loaded.layout_for("features.0.0") is NCHW
    assert loaded.layout_for("permute") is NCHW  # the model's own permute back to (N, C, H, W)
    inputs = inputs_for()
    # ``norm`` (N, H, W, C) read as nhwc gives the maps of ``permute``, its (N, C, H, W) copy:
    # read as nchw it would not
    cache = compute_cache(module, inputs, ["norm", "permute"], batch_size=16, progress=False, device="cpu")
    for variable in ("activation", "constant"):
        np.testing.assert_array_equal(cache["norm"][variable].values, cache["permute"][variable].values)
    # the same maps; ``permute``'s are a channels-last view, upsampled by another kernel
    np.testing.assert_allclose(cache["norm"]["masked_logits"].values, cache["permute"]["masked_logits"].values, rtol=0, atol=1e-5)
    assert cache["norm"].attrs["layout"] == "nhwc"
    activation = cache["norm"]["activation"].values
    assert not np.allclose(activation, activation.swapaxes(2, 3))


@pytest.mark.parametrize(
    ("name", "default", "layout"),
    [
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", TokenLayout(prefix=1, patch=(16, 16))),
        ("swin_t", "features.7.1.norm1", NHWC),
        ("swin_v2_t", "features.7.1.norm1", NHWC),
    ],
)
def test_torchvision_transformers_by_name(name, default, layout) -> None:
    loaded = load_architecture(name)
    assert loaded.default_layer == default
    assert loaded.layout_for(default) == layout
    assert model_family(loaded.module) is not None


class PatchTokens(nn.Module):
    """A plain token model: patch embedding (stride 4), a class and a register token, a block,
    and a head on the patch tokens' mean."""

    def __init__(self, prefix: int = 2, patch_size: int | None = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        if patch_size is not None:
            self.patch_size = patch_size
        self.embed = nn.Conv2d(3, 8, 4, stride=4) if patch_size is not None else nn.Conv2d(3, 8, 4, stride=2)
        self.prefix_tokens = nn.Parameter(torch.randn(1, prefix, 8))
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix_tokens.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.block(tokens)
        return self.head(tokens[:, self.prefix_tokens.shape[1] :].mean(dim=1))


def patch_maps(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 2:, :].reshape(tokens.shape[0], 4, 6, tokens.shape[2]).permute(0, 3, 1, 2)


def test_a_plain_token_model_with_layout_tokens_or_reshape() -> None:
    inputs = inputs_for((16, 24))
    named = from_module(PatchTokens(), input_size=(16, 24), layout={"block": "tokens"})
    assert named.layout_for("block") == TokenLayout(prefix=None, patch=(4, 4))  # the 2 prefix tokens counted as T - h*w
    by_function = from_module(PatchTokens(), input_size=(16, 24), reshape={"block": patch_maps})
    info = named.layer("block")
    assert (info.channels, info.height, info.width) == (8, 4, 6)
    first = compute_cache(named, inputs, "block", batch_size=16, progress=False, device="cpu")
    second = compute_cache(by_function, inputs, "block", batch_size=16, progress=False, device="cpu")
    np.testing.assert_array_equal(first["block"]["masked_logits"].values, second["block"]["masked_logits"].values)
    assert second["block"].attrs["layout"] == "callable:patch_maps"
    with pytest.raises(ScorecamError, match="layout= or reshape="):
        from_module(PatchTokens(), input_size=16, layout="tokens", reshape=patch_maps)


def test_a_3d_output_with_no_layout_names_reshape() -> None:
    inputs = inputs_for((16, 16))
    with pytest.raises(UnknownLayerError, match=r"'block' .*outputs shape \(1, 18, 8\).*tokens.*reshape=.*\"tokens\""):
        compute_cache(PatchTokens(), inputs, "block", progress=False, device="cpu")
    with pytest.raises(UnknownLayerError, match=r"'block' .*reshape="):
        from_module(PatchTokens(), input_size=16).check_layer("block")
    # "tokens" with no patch size to read: a clear error, never a guessed grid
    loaded = from_module(PatchTokens(patch_size=None), input_size=16, layout={"block": "tokens"})
    with pytest.raises(UnknownLayerError, match=r"does not know their patch grid.*reshape=fn"):
        loaded.check_layer("block")


def test_the_token_layout_by_hand() -> None:
    output = torch.arange(2 * 25 * 3, dtype=torch.float32).reshape(2, 25, 3)  # 1 + 4 x 6 tokens of width 3
    maps = maps_of(TokenLayout(prefix=1, patch=8), output, "x", input_size=(32, 48))
    assert maps.shape == (2, 3, 4, 6) and maps.is_contiguous()
    assert float(maps[1, 2, 3, 1]) == float(output[1, 1 + 3 * 6 + 1, 2])
    assert maps_of(TokenLayout(grid=(6, 4)), output, "x").shape == (2, 3, 6, 4)  # a fixed grid, prefix T - 24
    with pytest.raises(UnknownLayerError, match=r"25 tokens .*not 1 prefix \+ 4 x 4 patch tokens"):
        maps_of(TokenLayout(prefix=1, patch=8), output, "x", input_size=(32, 32))
    with pytest.raises(UnknownLayerError, match=r"not a 3-D \(N, T, D\)"):
        maps_of(TokenLayout(prefix=1, patch=8), torch.zeros(1, 3, 4, 4), "x", input_size=(32, 32))
    assert layout_from("tokens") == TokenLayout() and layout_from(" Tokens ").name == "tokens"
    with pytest.raises(ScorecamError, match="patch size"):
        TokenLayout(patch=0)


@pytest.mark.parametrize("build", [vit, lambda: swin(2)], ids=["vit", "swin-v2"])
def test_evaluation_the_sanity_check_and_the_explorer_work_on_transformers(build) -> None:
    from scorecam_explorer.evaluation import evaluate
    from scorecam_explorer.explorer import Explorer

    loaded = from_module(build(), name="tiny transformer", input_size=32)
    result = evaluate(loaded, ["sample:chelsea", "sample:coffee"], step_fraction=0.25, sanity=True, batch_size=32)
    assert "Score-CAM" in result.table() and "Grad-CAM" in result.table()
    assert result.protocol["layer"] == loaded.default_layer
    summary = result.summary()
    assert all(summary[method]["deletion"] is not None and np.isfinite(summary[method]["deletion"]) for method in summary)
    cache = compute_cache(loaded, "sample:chelsea", None, batch_size=32, progress=False, device="cpu")
    explorer = Explorer(cache, model=loaded)
    assert explorer is not None


def test_the_methods_keep_a_layout_given_with_reshape() -> None:
    from scorecam_explorer.methods import get_method

    loaded = from_module(PatchTokens(), input_size=16, reshape={"block": "tokens"}, default_layer="block")
    inputs = inputs_for((16, 16))
    for key in ("scorecam", "gradcam", "gradcam++"):
        maps = get_method(key).compute(loaded, inputs, None, None, batch_size=8)
        assert maps.shape == (2, 16, 16) and maps.attrs["layer"] == "block"


def test_the_sanity_check_keeps_a_layout_given_with_reshape() -> None:
    from scorecam_explorer.metrics import sanity_check

    loaded = from_module(PatchTokens(), input_size=16, reshape={"block": "tokens"}, default_layer="block")
    for method in ("scorecam", "gradcam"):
        result = sanity_check(loaded, inputs_for((16, 16)), method=method, batch_size=8)
        assert result.attrs["layer"] == "block" and result.attrs["forward_passes"] > 0


def test_the_explorer_given_a_module_that_runs_only_at_its_input_size() -> None:
    """A flattening head fixes the input size: probing at 224 x 224 would fail."""
    from scorecam_explorer.explorer import Explorer

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 20, 3),
    ).eval()  # fmt: skip
    inputs = normal(1, 3, 24, 40, seed=6)
    explorer = Explorer.from_model(module, inputs, "1", progress=False, batch_size=64)
    assert explorer.cache["1"]["activation"].shape == (1, 4, 12, 20)
    direct = compute_cache(module, inputs, "1", progress=False, batch_size=64)
    np.testing.assert_array_equal(explorer.cache["1"]["masked_logits"].values, direct["1"]["masked_logits"].values)
