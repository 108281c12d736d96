r"""Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1).

The weight of channel k is the global average of the gradient of the class score y^c
(the logit) over the channel's u x v positions:

.. math::

    w_k^c = \frac{1}{uv} \sum_{i,j} \frac{\partial y^c}{\partial A_{k,ij}}

and the map is :math:`L^c = \mathrm{ReLU}(\sum_k w_k^c A_k)`.
"""

from __future__ import annotations

from typing import Any

from scorecam_explorer.methods.gradient import gradient_method
from scorecam_explorer.methods.registry import register


def gradcam_weights(activations: Any, gradients: Any) -> Any:
    """Grad-CAM channel weights w_k = mean_ij g_k,ij; (N, C, u, v) -> (N, C)."""
    return gradients.mean(dim=(2, 3))


METHOD = register(
    gradient_method(
        "gradcam",
        "Grad-CAM",
        gradcam_weights,
        aliases=("grad-cam", "grad_cam"),
        description="Grad-CAM: channels weighted by the spatial mean of the class score's gradient.",
    ),
    replace=True,
)
