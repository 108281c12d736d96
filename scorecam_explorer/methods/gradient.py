"""Gradient methods from their weight rule alone.

A gradient method maps a layer's activations A and the gradients g = d y^c / d A of the
class score (both (N, C, u, v)) to channel weights w (N, C); the shared pipeline of
:mod:`scorecam_explorer.baselines` (hooks, one backward pass, ReLU(sum_k w_k A_k), bilinear
upsampling, min-max) does the rest. :func:`gradient_method` turns a weight rule into a
:class:`~scorecam_explorer.methods.registry.Method`; torch is imported only when a map is
computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from scorecam_explorer.methods.registry import Method

WeightRule = Callable[[Any, Any], Any]
"""(activations (N, C, u, v), gradients (N, C, u, v)) -> channel weights (N, C), torch tensors."""

DEFAULT_BATCH_SIZE = 16


def gradient_compute(key: str, weights: WeightRule) -> Callable[..., Any]:
    """The ``compute`` function of the gradient method ``key`` with the weight rule ``weights``."""

    def compute(
        model: Any, inputs: Any, layer: str | None = None, target: Any = None, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> Any:
        from scorecam_explorer.baselines import gradient_cam

        return gradient_cam(key, weights, model, inputs, layer, target, batch_size)

    compute.__name__ = compute.__qualname__ = key.replace("+", "p").replace("-", "_")
    rule = weights.__doc__ or weights.__name__
    compute.__doc__ = f"Maps of method {key!r} (dims image, y, x; in [0, 1]); weights: {rule}"
    return compute


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def gradient_method(
    key: str, label: str, weights: WeightRule, *, aliases: Sequence[str] = (), description: str = ""
) -> Method:
    """A Method that needs gradients and weighs channels with ``weights`` (not yet registered)."""
    return Method(
        key=key,
        label=label,
        compute=gradient_compute(key, weights),
        needs=frozenset({"gradients"}),
        aliases=tuple(aliases),
        description=description or _first_line(weights.__doc__),
    )
