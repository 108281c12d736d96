"""Bilinear resizing in plain numpy, written as matrix products.

Bilinear interpolation is separable and linear: resizing a map ``M`` (h, w) to (H, W) is

    Up(M) = R_y @ M @ R_x^T

with interpolation matrices R_y (H, h) and R_x (W, w). Row ``i`` of R holds the two weights
(1 - lambda, lambda) at the source positions floor(s_i) and floor(s_i) + 1, where the source
coordinate of output pixel ``i`` is

    align_corners=False:  s_i = max(0, (i + 0.5) * in / out - 0.5)      (torch, OpenCV, PIL)
    align_corners=True:   s_i = i * (in - 1) / (out - 1)                 (out > 1; else 0)

and the upper neighbour is clamped to the last source pixel. These are the formulas of
``torch.nn.functional.interpolate(mode="bilinear")`` (without antialiasing) and of OpenCV's
``INTER_LINEAR``; the tests compare against both.

Because Up is linear, sum_k w_k Up(A_k) = Up(sum_k w_k A_k): a weighted combination of maps
can be formed at feature resolution and upsampled once. Its adjoint is just as cheap,
<P, Up(A)> = <R_y^T P R_x, A>, which lets sums over an upsampled map's pixels be computed at
feature resolution.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _interpolation_matrix_cached(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        source = rows * scale
    else:
        source = np.maximum((rows + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    fraction = source - lower
    # np.add.at so that lower == upper (at the clamped edge) sums to one weight of 1.
    np.add.at(matrix, (rows, lower), 1.0 - fraction)
    np.add.at(matrix, (rows, upper), fraction)
    matrix.setflags(write=False)
    return matrix


def interpolation_matrix(in_size: int, out_size: int, *, align_corners: bool = False) -> np.ndarray:
    """The (out_size, in_size) matrix of 1-D linear interpolation (rows sum to 1).

    Read-only and cached: the same sizes give the same array object.
    """
    if int(in_size) < 1 or int(out_size) < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}.")
    return _interpolation_matrix_cached(int(in_size), int(out_size), bool(align_corners))


def resize_bilinear(maps: np.ndarray, size: tuple[int, int], *, align_corners: bool = False) -> np.ndarray:
    """Resize the last two axes of ``maps`` to ``size`` = (H, W) by bilinear interpolation.

    Any leading axes are kept. The result is float32 for float32 (or integer) input and
    float64 for float64 input; the arithmetic runs in float64.
    """
    maps = np.asarray(maps)
    if maps.ndim < 2:
        raise ValueError(f"need at least 2 axes to resize, got shape {maps.shape}.")
    height, width = (int(s) for s in size)
    rows = interpolation_matrix(maps.shape[-2], height, align_corners=align_corners)
    cols = interpolation_matrix(maps.shape[-1], width, align_corners=align_corners)
    out_dtype = np.float64 if maps.dtype == np.float64 else np.float32
    resized = rows @ maps.astype(np.float64, copy=False) @ cols.T
    return resized.astype(out_dtype, copy=False)


def resize_adjoint(pixels: np.ndarray, size: tuple[int, int], *, align_corners: bool = False) -> np.ndarray:
    """The adjoint of :func:`resize_bilinear`: maps (..., H, W) back to (..., h, w).

    For any map A of shape (h, w), sum(P * resize_bilinear(A, (H, W))) equals
    sum(resize_adjoint(P, (h, w)) * A). Used to sum an upsampled map over a region of the
    input without upsampling every channel.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    in_height, in_width = (int(s) for s in size)
    rows = interpolation_matrix(in_height, pixels.shape[-2], align_corners=align_corners)
    cols = interpolation_matrix(in_width, pixels.shape[-1], align_corners=align_corners)
    return rows.T @ pixels @ cols
