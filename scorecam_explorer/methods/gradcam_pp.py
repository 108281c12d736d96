r"""Grad-CAM++ (Chattopadhyay et al., WACV 2018, eq. 19).

With the exponential-score closed form used by pytorch-grad-cam (second and third
derivatives written as powers of the first, g = d y^c / d A):

.. math::

    \alpha_{k,ij} = \frac{g_{k,ij}^2}{2 g_{k,ij}^2 + \sum_{a,b} A_{k,ab}\, g_{k,ij}^3 + \epsilon},
    \qquad \alpha_{k,ij} = 0 \text{ where } g_{k,ij} = 0,

.. math::

    w_k^c = \sum_{i,j} \alpha_{k,ij}\, \mathrm{ReLU}(g_{k,ij}),

with :math:`\epsilon = 10^{-6}` (pytorch-grad-cam's), and :math:`L^c = \mathrm{ReLU}(\sum_k w_k^c A_k)`.
"""

from __future__ import annotations

from typing import Any

from scorecam_explorer.methods.gradient import gradient_method
from scorecam_explorer.methods.registry import register

EPS = 1e-6  # pytorch-grad-cam's epsilon in the alpha denominator


def gradcam_pp_weights(activations: Any, gradients: Any) -> Any:
    """Grad-CAM++ channel weights w_k = sum_ij alpha_k,ij ReLU(g_k,ij); (N, C, u, v) -> (N, C).

    alpha_k,ij = g^2 / (2 g^2 + (sum_ab A_k,ab) g^3 + eps), set to 0 where g = 0 (eq. 19).
    """
    squared = gradients.pow(2)
    cubed = squared * gradients
    activation_sums = activations.sum(dim=(2, 3), keepdim=True)
    alpha = squared / (2 * squared + activation_sums * cubed + EPS)
    alpha = alpha.masked_fill(gradients == 0, 0.0)
    return (alpha * gradients.clamp(min=0)).sum(dim=(2, 3))


METHOD = register(
    gradient_method(
        "gradcam++",
        "Grad-CAM++",
        gradcam_pp_weights,
        aliases=("gradcam_pp", "grad-cam++", "gradcampp", "gradcam-pp"),
        description="Grad-CAM++: channels weighted by alpha-weighted positive gradients.",
    ),
    replace=True,
)
