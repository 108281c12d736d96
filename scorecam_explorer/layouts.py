"""Layer layouts: how a layer's output O becomes the channel maps A (N, C, h, w).

Score-CAM, Grad-CAM and the cache work on channel maps A: image n, channel k, feature row i,
feature column j. A layer's *layout* says how its output O is read as such maps, with
``to_maps(O) -> A``. A layout only reorders and selects O's entries (permute, reshape,
slice): every map value A[n, k, i, j] is one output value. So ``to_maps`` is differentiable,
and the gradient of a score y with respect to the maps is the gradient with respect to O read
through the same layout: dy/dA = to_maps(dy/dO). Grad-CAM and Grad-CAM++ take both through it.

Built in:

* ``"nchw"`` (the default): A = O, a convolutional layer's (N, C, H, W) output.
* ``"nhwc"``: A[n, k, i, j] = O[n, i, j, k], i.e. ``O.permute(0, 3, 1, 2)``, for channels-last
  layers (N, H, W, C) such as torchvision's Swin stages. Never guessed: a 4-D output has the
  same rank either way, so it is read as NCHW unless the layout is named.
* a function ``fn(O) -> A`` (like pytorch-grad-cam's ``reshape_transform``), checked on every
  output it is given: it must return one (N, C, h, w) tensor with O's N.

:func:`layout_from` turns a name, a function or a :class:`LayerLayout` into a layout;
:func:`maps_of` applies one and says clearly, naming the layer, what did not fit.

Token layouts (vision transformers, O of shape (N, T, D)) plug in here as another
:class:`LayerLayout`: drop the class/register tokens and put the remaining h*w patch tokens
on their grid, A[n, d, i, j] = O[n, p + i*w + j, d] for p prefix tokens, accepted by
:func:`layout_from` under its name. Capture, the layer listing and the gradient baselines
already read every layer through :func:`maps_of`, so nothing else changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch

from scorecam_explorer.errors import ScorecamError, UnknownLayerError, did_you_mean


class LayerLayout(ABC):
    """How a layer's output becomes channel maps (N, C, h, w); see the module docstring.

    Subclasses set ``name`` (recorded in the cache's layer node) and ``expects`` (the output
    they accept, for error messages), and implement :meth:`to_maps`; :meth:`problem` may
    refuse an output before ``to_maps`` sees it.
    """

    name: str
    expects: str

    @abstractmethod
    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        """The maps A (N, C, h, w) of the output O, by permuting, reshaping or slicing O only."""

    def problem(self, output: torch.Tensor) -> str | None:
        """Why ``output`` does not fit this layout (a phrase after "the layer"), or None."""
        return None


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


@dataclass(frozen=True)
class ChannelsFirst(LayerLayout):
    """``"nchw"``: A = O for an (N, C, H, W) output (the default)."""

    name: ClassVar[str] = "nchw"
    expects: ClassVar[str] = "a 4-D (N, C, H, W) tensor"

    def problem(self, output: torch.Tensor) -> str | None:
        return None if output.ndim == 4 else f"outputs shape {_shape(output)}, not {self.expects}"

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        return output


@dataclass(frozen=True)
class ChannelsLast(LayerLayout):
    """``"nhwc"``: A[n, k, i, j] = O[n, i, j, k] for an (N, H, W, C) output."""

    name: ClassVar[str] = "nhwc"
    expects: ClassVar[str] = "a 4-D (N, H, W, C) tensor"

    def problem(self, output: torch.Tensor) -> str | None:
        return None if output.ndim == 4 else f"outputs shape {_shape(output)}, not {self.expects} (layout 'nhwc')"

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        return output.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class FunctionLayout(LayerLayout):
    """A user function ``fn(O) -> A`` (N, C, h, w), like pytorch-grad-cam's ``reshape_transform``.

    ``fn`` should only permute, reshape or slice O, so that gradients read through it are the
    gradients of the maps. Its name is ``callable:<the function's name>``.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str = field(default="", compare=False)
    expects: ClassVar[str] = "what the layout function accepts"

    def __post_init__(self) -> None:
        if not self.name:
            label = getattr(self.fn, "__name__", None) or type(self.fn).__name__
            object.__setattr__(self, "name", f"callable:{label}")

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        return self.fn(output)


NCHW = ChannelsFirst()
NHWC = ChannelsLast()
BUILT_IN: dict[str, LayerLayout] = {NCHW.name: NCHW, NHWC.name: NHWC}
"""The layouts :func:`layout_from` knows by name."""

LayoutSpec = Union[str, LayerLayout, Callable[[torch.Tensor], torch.Tensor]]
"""What ``layout=`` accepts for one layer: a name (``"nchw"``, ``"nhwc"``), a function
``fn(output) -> (N, C, h, w)`` or a :class:`LayerLayout`."""

_WHAT_TO_PASS = (
    '"nchw" (the default), "nhwc" (a channels-last (N, H, W, C) output), a function '
    "fn(output) -> (N, C, h, w) maps, or a scorecam_explorer.layouts.LayerLayout"
)


def layout_from(spec: Any) -> LayerLayout:
    """The layout ``spec`` names: a LayerLayout as is, a built-in name (any case), or a function.

    Raises ScorecamError for anything else (an unknown name with the closest names).
    """
    if isinstance(spec, LayerLayout):
        return spec
    if isinstance(spec, str):
        layout = BUILT_IN.get(spec.strip().lower())
        if layout is None:
            raise ScorecamError(f"unknown layer layout {spec!r}.{did_you_mean(spec, BUILT_IN)} Pass {_WHAT_TO_PASS}.")
        return layout
    if callable(spec) and not isinstance(spec, type):
        return FunctionLayout(spec)
    raise ScorecamError(f"a layer layout must be {_WHAT_TO_PASS}; got {type(spec).__name__} {spec!r}.")


def layout_of(model: object, layer: str) -> LayerLayout:
    """The layout a LoadedModel gives ``layer`` (its ``layout_for``); nchw for a bare module."""
    layout_for = getattr(model, "layout_for", None)
    return layout_for(layer) if callable(layout_for) else NCHW


def maps_or_problem(layout: LayerLayout, output: object, batch: int | None = None) -> torch.Tensor | str:
    """A = ``layout.to_maps(output)``, or why the output does not fit (a phrase after "the layer").

    A must be one (N, C, h, w) tensor whose N is ``batch`` (when given) and O's first size. A
    that is not O itself is returned contiguous, in the memory order a convolution's output has.
    """
    if not isinstance(output, torch.Tensor):
        return f"returns a {type(output).__name__}, not {layout.expects}"
    problem = layout.problem(output)
    if problem is not None:
        return problem
    shape, label = _shape(output), repr(layout.name)
    try:
        maps = layout.to_maps(output)
    except Exception as error:  # noqa: BLE001 - a user function may fail in any way
        return f"outputs shape {shape}, which layout {label} could not turn into maps ({type(error).__name__}: {error})"
    n_images = batch if batch is not None else (int(output.shape[0]) if output.ndim else None)
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or int(maps.shape[0]) != n_images:
        got = f"shape {_shape(maps)}" if isinstance(maps, torch.Tensor) else f"a {type(maps).__name__}"
        if isinstance(layout, ChannelsFirst):
            return f"outputs shape {shape}, not {layout.expects} for a batch of {n_images} image(s)"
        return f"outputs shape {shape}, which layout {label} turns into {got}, not (N, C, h, w) maps with N = {n_images}"
    return maps if maps is output else maps.contiguous()


def hint(layout: LayerLayout) -> str:
    """What to do when an output does not fit ``layout``: name the ``layout=`` option."""
    if isinstance(layout, ChannelsFirst):
        return (
            "Score-CAM needs channel maps, as a convolutional layer outputs; for another layout pass "
            f"layout= to from_module: {_WHAT_TO_PASS}"
        )
    return f"check the layout= given for this layer in from_module ({_WHAT_TO_PASS})"


def maps_of(layout: LayerLayout, output: object, layer: str, batch: int | None = None) -> torch.Tensor:
    """The maps A (N, C, h, w) of ``layer``'s output (:func:`maps_or_problem`).

    Raises UnknownLayerError naming the layer, what it output and the ``layout=`` option.
    """
    maps = maps_or_problem(layout, output, batch)
    if isinstance(maps, str):
        raise UnknownLayerError(f"layer {layer!r} {maps}; {hint(layout)}.")
    return maps
