"""Convolutions fused with the pointwise operation that follows them (CPU, float32).

On a CPU, a convolution followed by ReLU, ReLU6 or a residual addition (then ReLU) makes
one more pass over the activation per operation. oneDNN, torch's CPU convolution library,
applies those operations while it writes the convolution's output ("post-ops"):

    y = act(conv(x, W) + b)            unary:  act = relu | hardtanh(0, 6) | none
    y = act(conv(x, W) + b + other)    binary: a residual addition, then act = relu | none

with the same values (the post-op runs on each output element as the separate operation
would). :func:`fuse_pointwise` rewrites a ``torch.fx`` graph (the BatchNorm-folded copy of
:mod:`scorecam_explorer.rewriting`) so that every plain ``nn.Conv2d`` runs this way. It uses
torch's ``mkldnn._convolution_pointwise`` operators (the ones ``torch.compile`` emits for
CPUs); where they are missing, or a model's graph has nothing to fuse, it returns None.
Callers check the fused copy against the model's own output before using it.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

UNARY_CALLS = {torch.relu: "relu", torch.relu_: "relu", F.relu: "relu"}
"""Functions equal to a oneDNN unary post-op, with its name (hardtanh is checked apart)."""


def pointwise_fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution operators."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "_convolution_pointwise")
            and hasattr(ops._convolution_pointwise, "binary")
        )
    except (AttributeError, RuntimeError):
        return False


class FusedConv2d(nn.Module):
    """``act(conv2d(x) [+ other])`` in one oneDNN call; ``act`` is ``relu``, ``hardtanh``
    (with ``scalars`` = (min, max)) or ``none``; ``other`` is given for a residual addition."""

    def __init__(self, conv: nn.Conv2d, activation: str = "none", scalars: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(memory_format=torch.channels_last), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.padding = [int(p) for p in conv.padding]
        self.stride = [int(s) for s in conv.stride]
        self.dilation = [int(d) for d in conv.dilation]
        self.groups = int(conv.groups)
        self.activation = activation
        self.scalars = [float(s) for s in scalars]

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.activation, self.scalars, "",
            )
        if other.shape != self._output_shape(x) or other.dtype != x.dtype:  # a broadcast addition: unfused
            return self._activate(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups) + other)
        activation = None if self.activation == "none" else self.activation
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", 1.0, activation, self.scalars, None,
        )

    def _output_shape(self, x: torch.Tensor) -> torch.Size:
        """(N, C_out, H', W') with H' = floor((H + 2p - d (k - 1) - 1) / s) + 1."""
        sizes = [
            (int(x.shape[2 + i]) + 2 * self.padding[i] - self.dilation[i] * (int(self.weight.shape[2 + i]) - 1) - 1)
            // self.stride[i]
            + 1
            for i in range(2)
        ]
        return torch.Size([int(x.shape[0]), int(self.weight.shape[0]), *sizes])

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(y)
        if self.activation == "hardtanh":
            return F.hardtanh(y, *self.scalars)
        return y

    def extra_repr(self) -> str:
        return f"activation={self.activation}, scalars={self.scalars}, groups={self.groups}"


def _fusable(module: nn.Module | None) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    )


def _activation_of(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, tuple[float, ...]] | None:
    """The oneDNN post-op equal to ``node``, when ``node`` applies it to ``source``; else None."""
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        if type(module) is nn.ReLU:
            return "relu", ()
        if type(module) is nn.ReLU6:
            return "hardtanh", (0.0, 6.0)
        return None
    if node.op != "call_function" or set(node.kwargs) - {"inplace"}:
        return None
    if node.target in UNARY_CALLS and len(node.args) == 1:
        return UNARY_CALLS[node.target], ()
    if node.target in (F.hardtanh, F.hardtanh_, torch._C._nn.hardtanh_) and len(node.args) == 3:
        low, high = node.args[1], node.args[2]
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            return "hardtanh", (float(low), float(high))
    if node.target is F.relu6 and len(node.args) == 1:
        return "hardtanh", (0.0, 6.0)
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _residual_other(add: fx.Node, conv: fx.Node) -> fx.Node | None:
    """For ``add = conv + other`` (or ``other + conv``) of two tensors: ``other``.

    ``other += conv`` is left alone: it writes into ``other``, which the graph may read
    again (or an alias of it), and the fused call writes a new tensor instead.
    ``conv += other`` writes into the convolution's own fresh output, which nothing else
    reads (the caller checks), so it fuses like ``conv + other``."""
    if add.op != "call_function" or add.target not in (operator.add, torch.add, operator.iadd) or add.kwargs:
        return None
    if len(add.args) != 2 or not all(isinstance(arg, fx.Node) for arg in add.args):
        return None
    first, second = add.args
    if first is conv and second is not conv:
        return second
    if second is conv and first is not conv and add.target is not operator.iadd:
        return first
    return None


def _unused_name(module: nn.Module, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``...: a name no attribute of ``module`` has yet
    (``add_submodule`` would replace a module of that name: ``a.b`` and ``a_b`` both give
    ``fused_a_b``, and the model may have a ``fused_x`` of its own)."""
    name, number = base, 1
    while hasattr(module, name):
        number += 1
        name = f"{base}_{number}"
    return name


def fuse_pointwise(graph_module: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of ``graph_module`` whose plain convolutions run fused with the ReLU / ReLU6 /
    residual addition that follows them (see the module docstring); None when this torch
    build lacks the fused operators or no convolution qualifies.

    Only exact ``nn.Conv2d`` modules called at one place in the graph are fused: each call
    site gets its own fused module, and a convolution called at two places may be followed
    by different operations at each (as BatchNorm folding, it is left as it is)."""
    if not pointwise_fusion_available():
        return None
    fused = copy.deepcopy(graph_module)
    modules = dict(fused.named_modules())
    graph = fused.graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _fusable(modules.get(node.target)) or len(node.args) != 1 or node.kwargs:
            continue
        if calls[node.target] > 1:  # a convolution called at several places stays as it is
            continue
        conv = modules[node.target]
        follower = _only_user(node)
        other = _residual_other(follower, node) if follower is not None else None
        absorbed = []
        if other is not None:  # conv + other, then maybe an activation
            absorbed.append(follower)
            after = _only_user(follower)
            activation = _activation_of(after, follower, modules) if after is not None else None
            if activation is not None and activation[0] == "relu":
                absorbed.append(after)
            else:
                activation = ("none", ())
        else:
            activation = _activation_of(follower, node, modules) if follower is not None else None
            if activation is not None:
                absorbed.append(follower)
            else:
                activation = ("none", ())
        name = _unused_name(fused, f"fused_{node.target.replace('.', '_')}")
        fused.add_submodule(name, FusedConv2d(conv, *activation))
        with graph.inserting_after(absorbed[-1] if absorbed else node):
            replacement = graph.call_module(name, (node.args[0],) if other is None else (node.args[0], other))
        (absorbed[-1] if absorbed else node).replace_all_uses_with(replacement)
        for dead in reversed([node, *absorbed]):
            graph.erase_node(dead)
        count += 1
    if not count:
        return None
    fused.delete_all_unused_submodules()
    graph.lint()
    fused.recompile()
    return fused.eval()
