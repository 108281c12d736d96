"""Explanation methods: a registry with one record per method, and one module per method.

``scorecam`` (:mod:`.scorecam`), ``gradcam`` (:mod:`.gradcam`) and ``gradcam++``
(:mod:`.gradcam_pp`) are registered on import; each module holds its rule with the maths
and registers itself. Evaluation, the sanity check, the explorer's Compare panel, the
command line and the package's exports read the registry, so adding a method is one module
(and its test) that calls :func:`register`. Importing this package does not import torch.
"""

from __future__ import annotations

from scorecam_explorer.methods.gradient import WeightRule, gradient_compute, gradient_method
from scorecam_explorer.methods.registry import (
    NEEDS,
    ComputeView,
    LabelView,
    Method,
    get_method,
    method_keys,
    methods,
    register,
    registered,
    unregister,
)

# The built-in methods register themselves, in this order.
from scorecam_explorer.methods import scorecam as _scorecam  # noqa: E402,F401  isort:skip
from scorecam_explorer.methods import gradcam as _gradcam  # noqa: E402,F401  isort:skip
from scorecam_explorer.methods import gradcam_pp as _gradcam_pp  # noqa: E402,F401  isort:skip

__all__ = [
    "NEEDS",
    "ComputeView",
    "LabelView",
    "Method",
    "WeightRule",
    "get_method",
    "gradient_compute",
    "gradient_method",
    "method_keys",
    "methods",
    "register",
    "registered",
    "unregister",
]
