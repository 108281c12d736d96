"""Comparing float32 results that differ only by the rounding of reordered sums."""

from __future__ import annotations

import numpy as np
import torch

RTOL = 1e-4
"""Relative part of the bound (see :func:`assert_close_up_to_rounding`)."""
ATOL_OF_SCALE = 1e-5
"""Absolute part of the bound, as a share of the largest expected magnitude."""


def _array(values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def assert_close_up_to_rounding(actual: object, expected: object, *, err_msg: str = "") -> None:
    """``|actual - expected| <= 1e-4 |expected| + 1e-5 max|expected|``, element by element.

    For float32 computations that do the same arithmetic in another order: another batch
    size, memory layout or thread count, or a fused or folded copy of the model (oneDNN picks
    its kernels by shape and by CPU, so the order differs between machines too). Each reordered
    sum of n terms rounds differently, by about sqrt(n) 2**-24 of the magnitude of its terms,
    compounded over the layers: 1e-7 to 1e-5 of the scale. This bound is a few times that, and
    still far below any difference a bug would make. Arrays or tensors.
    """
    desired = _array(expected)
    scale = float(np.abs(desired).max()) if desired.size else 0.0
    np.testing.assert_allclose(_array(actual), desired, rtol=RTOL, atol=ATOL_OF_SCALE * scale, err_msg=err_msg)
