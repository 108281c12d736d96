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
* ``"tokens"`` (:class:`TokenLayout`): a transformer's tokens (N, T, D), p prefix tokens
  (class, distillation, register tokens) then the h*w patch tokens row by row, read as D
  channels on the patch grid, A[n, d, i, j] = O[n, p + i*w + j, d] (the prefix tokens are
  dropped). The grid is never guessed from T (T - p = 24 could be 4 x 6 or 6 x 4): it is the
  input's size over the patch size, h = H_in // patch_h and w = W_in // patch_w, so a
  non-square input gives a non-square grid. p is the model's (torchvision's ViT: 1, its class
  token) or, when not known, T - h*w.
* a function ``fn(O) -> A`` (like pytorch-grad-cam's ``reshape_transform``), checked on every
  output it is given: it must return one (N, C, h, w) tensor with O's N.

A layout may depend on the input: :meth:`LayerLayout.at_input` gives the layout for an input
of H_in x W_in (the token grid); capture, the layer probe and the gradient baselines pass the
input size to :func:`maps_of`. :func:`layout_from` turns a name, a function or a
:class:`LayerLayout` into a layout; :func:`maps_of` applies one and says clearly, naming the
layer, what did not fit. Which models get which layouts by default (torchvision's ViT and
Swin) is decided in :mod:`scorecam_explorer.models`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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

    def at_input(self, height: int, width: int) -> LayerLayout:
        """This layout for a model input of ``height`` x ``width`` pixels (itself, unless the
        maps' grid depends on the input, as a token layout's does)."""
        return self


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


@dataclass(frozen=True)
class ChannelsFirst(LayerLayout):
    """``"nchw"``: A = O for an (N, C, H, W) output (the default)."""

    name: ClassVar[str] = "nchw"
    expects: ClassVar[str] = "a 4-D (N, C, H, W) tensor"

    def problem(self, output: torch.Tensor) -> str | None:
        if output.ndim == 4:
            return None
        if output.ndim == 3:
            return f"outputs shape {_shape(output)}, not {self.expects}: tokens (N, T, D) or another 3-D layout"
        return f"outputs shape {_shape(output)}, not {self.expects}"

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


def _pair(value: object, what: str) -> tuple[int, int] | None:
    """``value`` (None, an int n or a pair) as None or a pair of positive ints."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ScorecamError(f"a token layout's {what} must be a positive int or a pair (rows, columns); got {value!r}.")
    return (int(pair[0]), int(pair[1]))


@dataclass(frozen=True)
class TokenLayout(LayerLayout):
    """``"tokens"``: A[n, d, i, j] = O[n, p + i*w + j, d] for an (N, T, D) output of p prefix
    tokens followed by the h x w patch tokens, row by row (see the module docstring).

    ``prefix``: p, the class/distillation/register tokens before the patch tokens (None: T - h*w,
    the tokens the grid leaves). ``patch``: the patch size in pixels, an int or (rows, columns):
    :meth:`at_input` then sets the grid to (H_in // rows, W_in // columns) for each input.
    ``grid``: a fixed grid (h, w), for a model that takes one input size only. A layout that
    knows neither (the bare name ``"tokens"``, when the model says no patch size) refuses
    every output with a message saying what to pass.
    """

    prefix: int | None = None
    patch: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    name: ClassVar[str] = "tokens"
    expects: ClassVar[str] = "a 3-D (N, T, D) tensor of tokens"

    def __post_init__(self) -> None:
        prefix = self.prefix
        if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
            raise ScorecamError(f"a token layout's prefix must be a count of tokens (0 or more); got {self.prefix!r}.")
        object.__setattr__(self, "patch", _pair(self.patch, "patch size"))
        object.__setattr__(self, "grid", _pair(self.grid, "grid"))

    def at_input(self, height: int, width: int) -> LayerLayout:
        if self.patch is None:
            return self
        return replace(self, grid=(int(height) // self.patch[0], int(width) // self.patch[1]))

    def _prefix(self, tokens: int) -> int:
        assert self.grid is not None
        return tokens - self.grid[0] * self.grid[1] if self.prefix is None else self.prefix

    def problem(self, output: torch.Tensor) -> str | None:
        if output.ndim != 3:
            return f"outputs shape {_shape(output)}, not {self.expects} (layout 'tokens')"
        if self.grid is None:
            return (
                f"outputs tokens of shape {_shape(output)}, but layout 'tokens' does not know their patch grid "
                "(the model has no patch_size to read it from): pass layout=TokenLayout(patch=...) or "
                "TokenLayout(grid=(h, w)), or reshape=fn"
            )
        (rows, columns), tokens = self.grid, int(output.shape[1])
        prefix = self._prefix(tokens)
        if prefix < 0 or prefix + rows * columns != tokens:
            counted = f"{self.prefix} prefix + " if self.prefix is not None else ""
            return (
                f"outputs {tokens} tokens (shape {_shape(output)}), not {counted}{rows} x {columns} patch tokens "
                f"for this input's {rows} x {columns} patch grid (layout 'tokens')"
            )
        return None

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        problem = self.problem(output)
        if problem is not None:
            raise ScorecamError(f"the layer {problem}.")
        assert self.grid is not None
        (rows, columns), tokens = self.grid, int(output.shape[1])
        prefix = self._prefix(tokens)
        patches = output[:, prefix : prefix + rows * columns, :]
        return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], rows, columns)


NCHW = ChannelsFirst()
NHWC = ChannelsLast()
TOKENS = TokenLayout()
BUILT_IN: dict[str, LayerLayout] = {NCHW.name: NCHW, NHWC.name: NHWC, TOKENS.name: TOKENS}
"""The layouts :func:`layout_from` knows by name. ``"tokens"`` knows no patch size:
``from_module`` fills it in from the model (a ``patch_size`` attribute, a patch-embedding
convolution), else it refuses outputs with a message saying what to pass."""

LayoutSpec = Union[str, LayerLayout, Callable[[torch.Tensor], torch.Tensor]]
"""What ``layout=`` (or ``reshape=``) accepts for one layer: a name (``"nchw"``, ``"nhwc"``,
``"tokens"``), a function ``fn(output) -> (N, C, h, w)`` or a :class:`LayerLayout`."""

_WHAT_TO_PASS = (
    '"nchw" (the default), "nhwc" (a channels-last (N, H, W, C) output), "tokens" (a transformer\'s '
    "(N, T, D) tokens on the patch grid), a function fn(output) -> (N, C, h, w) maps as "
    "pytorch-grad-cam's reshape_transform, or a scorecam_explorer.layouts.LayerLayout"
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
    """The layout a LoadedModel gives ``layer`` (its ``layout_for``); for a bare module, the
    layout its family gives it (torchvision's ViT and Swin, :func:`scorecam_explorer.models.model_family`),
    else nchw."""
    layout_for = getattr(model, "layout_for", None)
    if callable(layout_for):
        return layout_for(layer)
    if isinstance(model, torch.nn.Module):
        from scorecam_explorer.models import model_family  # models imports this module

        family = model_family(model)
        if family is not None:
            return family.layouts.get(layer, NCHW)
    return NCHW


def maps_or_problem(
    layout: LayerLayout, output: object, batch: int | None = None, input_size: tuple[int, int] | None = None
) -> torch.Tensor | str:
    """A = ``layout.to_maps(output)``, or why the output does not fit (a phrase after "the layer").

    ``input_size``: the model input's (H_in, W_in), for a layout whose grid depends on it
    (:meth:`LayerLayout.at_input`). A must be one (N, C, h, w) tensor whose N is ``batch``
    (when given) and O's first size. A that is not O itself is returned contiguous, in the
    memory order a convolution's output has.
    """
    if input_size is not None:
        layout = layout.at_input(int(input_size[0]), int(input_size[1]))
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
    """What to do when an output does not fit ``layout``: name the ``reshape=`` / ``layout=`` option."""
    if isinstance(layout, ChannelsFirst):
        return (
            "Score-CAM needs channel maps, as a convolutional layer outputs; for another layout pass "
            f"reshape=fn or layout= to from_module: {_WHAT_TO_PASS}"
        )
    return f"check the layout (reshape= or layout=) given for this layer in from_module ({_WHAT_TO_PASS})"


def maps_of(
    layout: LayerLayout,
    output: object,
    layer: str,
    batch: int | None = None,
    input_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The maps A (N, C, h, w) of ``layer``'s output (:func:`maps_or_problem`), for a model
    input of ``input_size`` (H_in, W_in) when given.

    Raises UnknownLayerError naming the layer, what it output and the ``reshape=`` / ``layout=`` option.
    """
    maps = maps_or_problem(layout, output, batch, input_size)
    if isinstance(maps, str):
        raise UnknownLayerError(f"layer {layer!r} {maps}; {hint(layout)}.")
    return maps
