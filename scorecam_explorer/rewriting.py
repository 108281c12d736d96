"""Faster copies of a model for the masked passes: BatchNorm folded, padding merged, fused.

:func:`folded_batchnorm` traces the model with ``torch.fx`` and folds every eval-mode
BatchNorm2d into the convolution before it: BN(conv(x)) = conv'(x) with
W' = W * g / sqrt(v + eps) and b' = (b - m) * g / sqrt(v + eps) + beta, one pass over each
activation less. A "same padding" convolution that pads in a separate module (the
EfficientNet ports) becomes one ``nn.Conv2d``: padding (a, a + 1) becomes a + 1 on both sides
with a zero row / column in front of the kernel, checked on a probe input. A ReLU / ReLU6
right after a convolution runs in place. :func:`fused_copy` then fuses convolutions with the
pointwise operation after them (:mod:`scorecam_explorer.fusion`).

Rules: only modules of exactly these types are rewritten (a subclass may have its own
forward), never a convolution called at several places; float32 results differ by
rounding only (relative 1e-6). Copies are built once and remembered for the model under
:func:`copy_key` (weights fingerprint, :func:`structure_digest`, device) with weak
references: they go with the model, or with :func:`release_copies`. They are never vouched
for: the engine checks the copy it uses against the model on every call, and
:func:`reject_folded` / :func:`reject_fused` remember a copy that did not reproduce it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import weakref
from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from scorecam_explorer.errors import ScorecamError

if TYPE_CHECKING:
    from scorecam_explorer.models import LoadedModel


def structure_digest(module: nn.Module) -> str:
    """blake2b (hex) of ``repr(module)``: its submodules, their types and settings (kernel
    sizes, BatchNorm eps, activations). With the weights fingerprint it decides when a
    remembered faster copy is worth reusing: swapping a module or changing such a setting
    leaves the weights alone but builds a new copy. What ``repr`` does not show (a flag the
    forward reads, such as torchvision Inception3's ``transform_input``, or a replaced
    ``forward``) is caught by the check that every call makes (see :func:`folded_batchnorm`).
    """
    return hashlib.blake2b(repr(module).encode(), digest_size=16).hexdigest()


def copy_key(module: nn.Module, fingerprint: str, device: torch.device | str) -> tuple[str, str, str]:
    """The key under which :func:`folded_batchnorm` remembers ``module``'s faster copy:
    (weights fingerprint, :func:`structure_digest`, device)."""
    return (fingerprint, structure_digest(module), str(device))


def has_hooks(module: nn.Module) -> bool:
    """Whether any submodule carries forward hooks or pre-hooks (someone observes the model)."""
    return any(sub._forward_hooks or sub._forward_pre_hooks for sub in module.modules())


# model -> (key, its folded copy or None for "none under this key"); weak keys: an entry, and
# with it the copy, goes when the model goes (see release_copies).
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module | None]] = weakref.WeakKeyDictionary()


def folded_batchnorm(
    module: nn.Module, key: tuple, *, channels_last: bool = False, rebuild: bool = False
) -> nn.Module | None:
    """A copy of ``module`` with every BatchNorm2d folded into the convolution before it.

    In eval mode BN(conv(x)) = conv'(x) with W' = W * g / sqrt(v + eps) and
    b' = (b - m) * g / sqrt(v + eps) + beta, so the copy computes the same function with
    one pass over each activation less. Likewise a "same padding" convolution that pads in
    a separate module (the EfficientNet ports) becomes one ``nn.Conv2d`` (see
    :func:`_as_plain_conv`), and a ReLU / ReLU6 right after a convolution runs in place.
    Only modules of exactly these types are rewritten (a subclass may have its own forward:
    a weight-standardised convolution, a BatchNorm with an activation inside), and never a
    convolution called at several places. Float32 results differ by rounding only
    (relative 1e-6).

    The copy is traced once and remembered for the model under ``key``
    (:func:`copy_key`: weights fingerprint, structure, device); ``rebuild`` traces a new
    one from the model as it is now. A remembered copy is not trusted: it computes the
    function the model had when it was traced, and a flag that its forward reads may
    have changed since, unseen by the key. Callers check the copy against the model's own
    output on every call, and rebuild it when they differ (see
    :func:`scorecam_explorer.engine.compute_cache`).

    Returns None when the model has no BatchNorm2d after a convolution, cannot be traced by
    ``torch.fx``, or its copy was rejected for this key (:func:`reject_folded`).
    ``channels_last`` stores the copy's convolution weights channels-last, as the inputs
    will be (otherwise every convolution reorders its weights on every call; same values).
    """
    remembered = _FOLDED.get(module)
    if remembered is not None and remembered[0] == key and not rebuild:
        return remembered[1]
    _drop_folded(module)  # the old copy goes before a new one is built (peak memory)
    folded = None
    if any(type(sub) is nn.BatchNorm2d for sub in module.modules()):
        try:
            folded = _fold(module)
        except Exception:  # noqa: BLE001 - any model fx cannot trace simply runs unfolded
            folded = None
    if folded is not None and channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    _FOLDED[module] = (key, folded)
    return folded


def remembers_copy(module: nn.Module, key: tuple) -> bool:
    """Whether a copy (or that there is none) is remembered for ``module`` under ``key``,
    i.e. whether :func:`folded_batchnorm` would return it without building anything."""
    remembered = _FOLDED.get(module)
    return remembered is not None and remembered[0] == key


def reject_folded(module: nn.Module, key: tuple) -> None:
    """Remember that ``module``'s copy, freshly built, did not reproduce it: no copy for
    this key (new weights or a new structure build one again)."""
    _drop_folded(module)
    _FOLDED[module] = (key, None)


_FUSED: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = weakref.WeakKeyDictionary()


def fused_copy(folded: nn.Module) -> nn.Module | None:
    """The folded copy with its convolutions fused with the ReLU / ReLU6 / residual addition
    after them (:func:`scorecam_explorer.fusion.fuse_pointwise`; CPU float32 only), made
    once per folded copy; None when nothing fuses, the operators are missing, or the fused
    copy was rejected (:func:`reject_fused`). Checked by callers as the folded copy is."""
    if folded in _FUSED:
        return _FUSED[folded]
    from scorecam_explorer.fusion import fuse_pointwise

    fused = None
    if isinstance(folded, fx.GraphModule):
        try:
            fused = fuse_pointwise(folded)
        except Exception:  # noqa: BLE001 - a graph the rewrite does not understand simply runs unfused
            fused = None
    _FUSED[folded] = fused
    return fused


def reject_fused(folded: nn.Module) -> None:
    """Remember that the fused copy of ``folded`` did not reproduce the model while
    ``folded`` did: never use it (a new folded copy gets a new fused one)."""
    _FUSED[folded] = None


def _drop_folded(module: nn.Module) -> bool:
    """Forget ``module``'s remembered copies (folded and fused); whether there were any."""
    remembered = _FOLDED.pop(module, None)
    if remembered is None:
        return False
    if remembered[1] is not None:
        _FUSED.pop(remembered[1], None)
    return remembered[1] is not None


def release_copies(model: nn.Module | LoadedModel | None = None) -> int:
    """Release the faster copies (BatchNorm-folded, fused) remembered for ``model``, a
    ``torch.nn.Module`` or a :class:`~scorecam_explorer.models.LoadedModel`, or for every
    model when None; returns how many folded copies were released.

    A copy holds its own weights, on the device it was computed on (a GPU too), for as
    long as its model lives: it goes with the model (weak references), or here, on
    request. The next ``compute_cache`` of the model builds a new one. ``torch.fx`` graph
    modules sit in a reference cycle, so a garbage collection runs when anything was
    released, to free the memory now.
    """
    from scorecam_explorer.models import LoadedModel

    if isinstance(model, LoadedModel):
        model = model.module
    if model is not None and not isinstance(model, nn.Module):
        raise ScorecamError(f"release_copies takes a torch.nn.Module, a LoadedModel or None, not {type(model).__name__}.")
    modules = list(_FOLDED.keys()) if model is None else [model]
    released = sum(_drop_folded(module) for module in modules)
    if released:
        gc.collect()
    return released


class _ConvLeafTracer(fx.Tracer):
    """Keeps every Conv2d and BatchNorm2d (also subclasses with their own forward) as one
    call in the graph; the rewrites below then touch exact types only."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, qualified_name)


def _static_padding(conv: nn.Conv2d) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) zero padding of a "same padding" convolution that pads in
    a ``static_padding`` child (the EfficientNet ports' ``Conv2dStaticSamePadding``), else None."""
    padding = getattr(conv, "static_padding", None)
    if type(conv) is nn.Conv2d or padding is None or conv.padding_mode != "zeros" or tuple(conv.padding) != (0, 0):
        return None
    if type(padding) is nn.ZeroPad2d:
        left, right, top, bottom = (int(value) for value in padding.padding)
        return left, right, top, bottom
    if type(padding).__name__ == "Identity" and not list(padding.parameters()):
        return 0, 0, 0, 0
    return None


def _as_plain_conv(conv: nn.Conv2d) -> nn.Conv2d | None:
    """An ``nn.Conv2d`` doing ``conv`` (with its separate zero padding) in one call, or None.

    A symmetric padding p becomes the convolution's own padding p. A padding one larger
    after than before (a, a + 1), what "same" padding gives a stride-2 convolution, becomes
    padding a + 1 on both sides with the kernel grown by one zero row (column) in front:
    the window then starts one pixel earlier, on a zero weight, and covers the same pixels,
    and the output has the same size. The copy of the padded input is saved; the zero
    weights add exact zeros.

    ``conv`` is a subclass with its own forward, which need not be "pad, then convolve"
    (it may standardise its weights, say): the plain convolution replaces it only if it
    gives ``conv``'s output on a probe input (:func:`_same_on_probe`).
    """
    pads = _static_padding(conv)
    if pads is None:
        return None
    left, right, top, bottom = pads
    grow, padding = [], []
    for before, after, dilation in ((top, bottom, conv.dilation[0]), (left, right, conv.dilation[1])):
        if before == after:
            grow.append(0)
            padding.append(before)
        elif after == before + 1 and dilation == 1:
            grow.append(1)
            padding.append(after)
        else:
            return None
    kernel = (conv.kernel_size[0] + grow[0], conv.kernel_size[1] + grow[1])
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, kernel, stride=tuple(conv.stride), padding=tuple(padding),
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        plain.weight.copy_(torch.nn.functional.pad(conv.weight, (grow[1], 0, grow[0], 0)))
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    plain.eval()
    return plain if _same_on_probe(conv, plain) else None


def _same_on_probe(original: nn.Module, plain: nn.Conv2d) -> bool:
    """Whether ``plain`` gives ``original``'s output, up to float32 rounding, on a seeded
    random input of two images (any forward that does something else, such as weight
    standardisation, differs by far more than rounding there)."""
    size = max(plain.dilation[i] * (plain.kernel_size[i] - 1) + 1 for i in range(2)) + 2 * max(plain.stride) + 3
    probe = torch.randn(2, plain.in_channels, size, size + 1, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=plain.weight.device, dtype=plain.weight.dtype)
    try:
        with torch.no_grad():
            expected, actual = original(probe), plain(probe)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        return False
    scale = float(expected.abs().max()) or 1.0
    return float((actual - expected).abs().max()) <= 1e-5 * scale


def _fold(module: nn.Module) -> nn.Module | None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    copy_ = copy.deepcopy(module).eval()
    for name, sub in list(copy_.named_modules()):
        if isinstance(sub, nn.Conv2d) and type(sub) is not nn.Conv2d and (plain := _as_plain_conv(sub)) is not None:
            parent, _, child = name.rpartition(".")
            setattr(copy_.get_submodule(parent) if parent else copy_, child, plain)
    graph = _ConvLeafTracer().trace(copy_)
    traced = fx.GraphModule(copy_, graph)
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    folded = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue  # a subclass (an activation inside, say) is not a plain BatchNorm
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv, norm = modules[source.target], modules[node.target]
        if type(conv) is not nn.Conv2d or not norm.track_running_stats or calls[source.target] > 1:
            continue  # a subclass may have its own forward; a convolution called at several places stays as it is
        parent, _, name = source.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, fuse_conv_bn_eval(conv, norm))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
        folded += 1
    if not folded:
        return None
    _clamp_in_place(traced)
    traced.graph.lint()
    traced.recompile()
    return traced.eval()


def _clamp_in_place(traced: fx.GraphModule) -> None:
    """Run ReLU / ReLU6 in place where their input is a convolution's fresh output that
    nothing else reads (same values, one pass over memory less)."""
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if type(module) not in (nn.ReLU, nn.ReLU6) or module.inplace:
            continue  # exact types: a subclass may have its own forward
        source = node.args[0]
        producer = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if type(producer) is not nn.Conv2d or len(source.users) != 1:
            continue
        node.op = "call_function"
        if isinstance(module, nn.ReLU6):
            node.target, node.args = torch.nn.functional.hardtanh_, (source, 0.0, 6.0)
        else:
            node.target, node.args = torch.relu_, (source,)
