r"""The array kernels every torch-free part of the package shares (numpy only).

One home for the small pieces of maths that composing a map (:mod:`scorecam_explorer.compose`),
statistics across a dataset (:mod:`scorecam_explorer.dataset_analysis`), the explorer
(:mod:`scorecam_explorer.explorer.analysis`) and the metrics all need, so that each rule is
written, tested and changed once:

* normalisation: :func:`min_max` (float64) and :func:`min_max_float32` (the engine's rounding),
* class and channel probabilities: :func:`softmax`, :func:`log_normalizer`,
* the weights pipeline: :func:`target_scores` and :func:`preset_weights` (scores of the
  target class -> a preset's channel weights),
* channel rankings: :func:`rank_order`, :func:`top_k_mask`, :func:`ranks`,
* the mask the engine forwarded: :func:`engine_mask` (float32 bilinear upsampling as
  PyTorch's CPU kernel rounds it, then min-max),
* comparing maps: :func:`pearson` and :func:`cumulative_fidelity` (Pearson r of the map of
  the k heaviest channels against the full map, for every k at once).

Nothing here reads a cache or builds an xarray object: callers pass numpy arrays and get
numpy arrays back. No torch is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from scorecam_explorer.errors import NonFiniteError, ScorecamError
from scorecam_explorer.resize import interpolation_matrix

if TYPE_CHECKING:
    from scorecam_explorer.presets import Preset, TargetScores

__all__ = [
    "cumulative_fidelity",
    "engine_mask",
    "log_normalizer",
    "min_max",
    "min_max_float32",
    "pearson",
    "preset_weights",
    "rank_order",
    "ranks",
    "softmax",
    "target_scores",
    "top_k_mask",
]


# ---- normalisation -----------------------------------------------------------------------


def min_max(maps: np.ndarray, eps: float) -> np.ndarray:
    r"""N(M) = (M - min M) / (max M - min M + eps) per map over the last two axes.

    A constant map (max M = min M) gives exactly 0 everywhere, never NaN, whatever eps is:
    a map that ReLU removed entirely stays zero. Computed in the dtype of ``maps``
    (float64 for the maps :mod:`scorecam_explorer.compose` returns).
    """
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    safe = np.where(span > 0, span + eps, 1.0)
    return np.where(span > 0, (maps - low) / safe, 0.0)


def min_max_float32(maps: np.ndarray, eps: float) -> np.ndarray:
    r"""(M - min M) / (max M - min M + eps) over the last two axes, in float32 as the engine
    computes it.

    With eps > 0 the division is carried out as written (a constant map gives 0 / eps = 0);
    with eps = 0 a constant map is exactly 0 rather than 0/0.
    """
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    shifted = maps - low
    if eps > 0:
        return (shifted / (span + np.float32(eps))).astype(np.float32)
    safe = np.where(span > 0, span, np.float32(1.0))
    return np.where(span > 0, shifted / safe, np.float32(0.0)).astype(np.float32)


# ---- probabilities -----------------------------------------------------------------------


def softmax(scores: np.ndarray) -> np.ndarray:
    r"""softmax(s)_k = exp(s_k - max s) / sum_j exp(s_j - max s) along the last axis.

    Shifting by max s changes nothing mathematically and keeps exp from overflowing.
    """
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    r"""logsumexp_j f^j = m + log sum_j exp(f^j - m), m = max_j f^j, over the last axis (float64).

    The softmax denominator in log space: p^c = exp(f^c - logsumexp_j f^j).
    """
    values = logits.astype(np.float64)
    peak = values.max(axis=-1, keepdims=True)
    return (peak + np.log(np.exp(values - peak).sum(-1, keepdims=True)))[..., 0]


# ---- the weights pipeline ----------------------------------------------------------------


def target_scores(
    masked_logits: np.ndarray,
    logits: np.ndarray,
    baseline_logits: np.ndarray,
    constant: np.ndarray,
    targets: np.ndarray,
    *,
    rows: np.ndarray | None = None,
    normalizer: Callable[[], np.ndarray] | None = None,
) -> TargetScores:
    r"""The outputs one target class c_i per image needs, as a preset reads them.

    masked_logit_ik = f^{c_i}(X_i∘H_k), logit_i = f^{c_i}(X_i), baseline_logit_i = f^{c_i}(X_b).

    Args:
        masked_logits: (m, channel, class); image i is its row ``rows[i]``.
        logits, baseline_logits: (n, class), one row per selected image.
        constant: (m, channel) bool, indexed by ``rows`` like ``masked_logits``.
        targets: (n,) the class of each selected image.
        rows: the selected images' rows in ``masked_logits`` (default: all, in order).
        normalizer: returns logsumexp_j f^j(X_i∘H_k) (n, channel) when a preset needs
            probabilities; default :func:`log_normalizer` of the selected rows.
    """
    from scorecam_explorer.presets import TargetScores

    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(masked_logits.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    images = np.arange(len(targets))
    masked_logit = masked_logits[rows, :, targets]  # (image, channel): f^c(X∘H_k)
    return TargetScores(
        masked_logit=masked_logit.astype(np.float64),
        logit=logits[images, targets].astype(np.float64),
        baseline_logit=baseline_logits[images, targets].astype(np.float64),
        constant=np.asarray(constant[rows], dtype=bool),
        log_normalizer=normalizer if normalizer is not None else (lambda: log_normalizer(masked_logits[rows])),
    )


def preset_weights(
    preset: Preset,
    scores: TargetScores,
    *,
    layer: str,
    reason: str = "the cache holds NaN or inf in its masked outputs",
) -> np.ndarray:
    r"""w_k = the preset's weights of ``scores`` (softmax_k of its score, or the score itself;
    0 for constant channels where the preset skips them), checked finite.

    Raises NonFiniteError naming ``layer`` and ``reason`` when a weight is NaN or inf.
    """
    weights = preset.weights(scores)
    if not np.isfinite(weights).all():
        raise NonFiniteError(f"the {preset.name!r} weights of layer {layer!r} are not finite: {reason}.")
    return weights


# ---- channel rankings --------------------------------------------------------------------


def rank_order(values: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    r"""Channel ids by decreasing value along the last axis (ties: lower id first).

    Inactive channels (``active`` False) come after every active one. The order is the
    stable argsort of -v (or +inf where inactive).
    """
    keys = -values if active is None else np.where(active, -values, np.inf)
    return np.argsort(keys, axis=-1, kind="stable")


def top_k_mask(values: np.ndarray, k: int, active: np.ndarray | None = None) -> np.ndarray:
    r"""1[k-th channel is among the k largest values of its row], among the ``active`` ones.

    Ties go to the lower channel id; an inactive channel is never kept.
    """
    order = rank_order(values, active)[..., :k]
    kept = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(kept, order, True, axis=-1)
    return kept if active is None else kept & active


def ranks(values: np.ndarray) -> np.ndarray:
    r"""Each channel's place among its row's values, 0 = largest (ties: lower id first).

    The inverse permutation of :func:`rank_order`: ranks[order[j]] = j.
    """
    order = rank_order(values)
    places = np.empty_like(order)
    np.put_along_axis(places, order, np.broadcast_to(np.arange(values.shape[-1]), order.shape).copy(), axis=-1)
    return places


# ---- the engine's masks, in float32 ------------------------------------------------------

# PyTorch's CPU kernel interpolates a small output (height + width <= 128) with the four 2-D
# weights at once, a larger one along the width, then the height (see bilinear_float32).
_TWO_D_WEIGHTS_MAX_PIXELS = 128


def source_positions(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, ...]:
    r"""Lower and upper source index and their float32 weights for each output position.

    PyTorch's bilinear rule, in float32: s_i = scale (i + 1/2) - 1/2 clamped at 0
    (align_corners=False, scale = in / out) or s_i = scale i (True, scale = (in-1)/(out-1));
    lower = min(floor(s_i), in - 1), upper = lower + 1 but not past the edge,
    lambda1 = clip(s_i - lower, 0, 1), lambda0 = 1 - lambda1. Equal sizes copy.
    """
    out = np.arange(out_size)
    if in_size == out_size:
        return out, out, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    if align_corners:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0.0)
        source = (scale * out.astype(np.float32)).astype(np.float32)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
        # one rounding, as the fused multiply-add of the compiled kernel
        centred = np.float64(scale) * (out + 0.5) - 0.5
        source = np.maximum(centred.astype(np.float32), np.float32(0.0))
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.where(lower < in_size - 1, lower + 1, lower)
    lambda1 = np.clip(source - lower.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    return lower, upper, (np.float32(1.0) - lambda1).astype(np.float32), lambda1


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to float32 (the product of two float32 is exact in float64)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def bilinear_float32(maps: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    r"""Bilinear upsampling of float32 maps (..., h, w) to ``size``, as the engine's
    ``torch.nn.functional.interpolate`` computes it for one map per batch entry on a CPU.

    With x_ab = M[y_a, x_b] and weights v_a (rows), u_b (columns) from
    :func:`source_positions`: small outputs (H + W <= 128) accumulate
    x01 w01 + x00 w00 + x10 w10 + x11 w11 with w_ab = v_a u_b (fused steps); larger ones
    interpolate each row, t_a = x_a0 u_0 + x_a1 u_1, then t_0 v_0 + t_1 v_1. The same maths
    as :func:`scorecam_explorer.resize.resize_bilinear`, rounded as the engine rounds
    (equal bit for bit where PyTorch's kernel uses fused multiply-adds; else within 1e-6).
    """
    height, width = size
    y0, y1, v0, v1 = source_positions(maps.shape[-2], height, align_corners)
    x0, x1, u0, u1 = source_positions(maps.shape[-1], width, align_corners)
    top, bottom = maps[..., y0, :], maps[..., y1, :]
    if height + width <= _TWO_D_WEIGHTS_MAX_PIXELS:
        w00, w01 = (v0[:, None] * u0[None]).astype(np.float32), (v0[:, None] * u1[None]).astype(np.float32)
        w10, w11 = (v1[:, None] * u0[None]).astype(np.float32), (v1[:, None] * u1[None]).astype(np.float32)
        total = (top[..., x1] * w01).astype(np.float32)
        total = _fma(top[..., x0], w00, total)
        total = _fma(bottom[..., x0], w10, total)
        return _fma(bottom[..., x1], w11, total)
    upper_row = _fma(top[..., x0], u0, (top[..., x1] * u1).astype(np.float32))
    lower_row = _fma(bottom[..., x0], u0, (bottom[..., x1] * u1).astype(np.float32))
    return _fma(upper_row, v0[:, None], (lower_row * v1[:, None]).astype(np.float32))


def engine_mask(values: np.ndarray, size: tuple[int, int], convention: dict[str, Any], constant: bool) -> np.ndarray:
    r"""The mask H (float32, ``size``) the engine forwarded for one activation map A (h, w).

        after_upsample:   H = (U - min U) / (max U - min U + eps),  U = Up(A)
        before_upsample:  H = Up((A - min A) / (max A - min A + eps))  (no Up when sizes agree)

    in float32 with the engine's rounding (:func:`bilinear_float32`); H = 0 when the
    channel was ``constant`` (flagged in the cache: its score is the baseline's).
    ``convention``: the cache's mask convention (``align_corners``, ``eps``, ``normalize``).
    """
    if constant:
        return np.zeros(size, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32)
    align = bool(convention.get("align_corners", False))
    eps = float(convention.get("eps", 0.0))
    if convention.get("normalize", "after_upsample") == "before_upsample":
        normalised = min_max_float32(values, eps)
        return normalised if normalised.shape == tuple(size) else bilinear_float32(normalised, size, align)
    return min_max_float32(bilinear_float32(values, size, align), eps)


# ---- comparing maps ----------------------------------------------------------------------


def pearson(first: Any, second: Any) -> float:
    r"""Pearson's r of two maps over their pixels; NaN when either map is constant.

        r = sum (a - mean a)(b - mean b) / sqrt(sum (a - mean a)^2  sum (b - mean b)^2)

    in float64. A constant map (e.g. all zero after ReLU) has no variance: r is 0/0,
    undefined, and is returned as NaN, never as a number it is not. ``first`` and
    ``second``: arrays (or DataArrays) with the same number of pixels.
    """
    a = np.asarray(getattr(first, "values", first), dtype=np.float64).ravel()
    b = np.asarray(getattr(second, "values", second), dtype=np.float64).ravel()
    if a.size != b.size:
        raise ScorecamError(f"cannot correlate maps of {a.size} and {b.size} pixels: resize one first.")
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


# Presets that apply ReLU after upsampling need every top-k map at input resolution: that is
# done this many pixels at once (see cumulative_fidelity).
_UPSAMPLE_BLOCK_PIXELS = 2_000_000


def _correlations_after_upsampling(
    relu_maps: np.ndarray, full_map: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    r"""r(Up(R_k), M) for feature maps R_k (k, fy, fx), without upsampling any of them.

    Up(R) = Ry R Rx^T is linear, so with n = H W input pixels
        sum Up(R)         = <Ry^T 1 1^T Rx, R>
        sum Up(R)^2       = <Gy R Gx, R>,   Gy = Ry^T Ry, Gx = Rx^T Rx
        sum Up(R) * M     = <Ry^T M Rx, R>
    and r follows from these sums. Maps R_k that are constant get r = NaN (see :func:`pearson`).
    """
    n = full_map.size
    count, height, width = relu_maps.shape
    column_sums = np.outer(rows.sum(axis=0), cols.sum(axis=0)).ravel()
    flat = relu_maps.reshape(count, height * width)
    sums = flat @ column_sums
    # Gy R_k Gx for every k as two plain matrix products (no stacked small products).
    right = (relu_maps.reshape(count * height, width) @ (cols.T @ cols)).reshape(count, height, width)
    both = np.tensordot(rows.T @ rows, right, axes=(1, 1)).transpose(1, 0, 2).reshape(count, height * width)
    squares = np.einsum("kp,kp->k", both, flat)
    cross = flat @ (rows.T @ full_map @ cols).ravel()
    full_centred = full_map - full_map.mean()
    full_variance = (full_centred**2).sum()
    variance = squares - sums**2 / n
    covariance = cross - sums * full_map.mean()
    # A map that is constant in theory can leave rounding noise in `variance`.
    constant = np.ptp(flat, axis=1) == 0
    valid = (~constant) & (variance > 0) & (full_variance > 0)
    safe = np.where(valid, variance * full_variance, 1.0)
    return np.where(valid, covariance / np.sqrt(safe), np.nan)


def cumulative_fidelity(
    weights: np.ndarray,
    maps: np.ndarray,
    full: np.ndarray,
    order: np.ndarray,
    ks: np.ndarray | None,
    *,
    relu_at: str = "feature",
    align_corners: bool = False,
) -> np.ndarray:
    r"""Top-k fidelity r_k = r(Up(R_k), M) for every k (``ks`` None) or the given k.

    With the channels in ``order`` (heaviest first), R_k = ReLU(sum_{j <= k} w_(j) A_(j))
    at feature resolution and M the full map (y, x); r is Pearson's r, invariant to the
    min-max normalisations, so the top-k map need not be normalised. ``relu_at="input"``
    takes ReLU after upsampling instead: r(ReLU(Up(S_k)), M).

    * ``ks`` None (and ReLU at feature resolution): every k = 1..len(order), in float64
      from the cumulative sums without upsampling any map (:func:`_correlations_after_upsampling`).
    * ``ks`` given: those k (1-based), each map upsampled in float32 with float64 sums
      (r to about 1e-6).

    An all-zero or constant top-k map has r = NaN, as in :func:`pearson`.
    """
    cumulative = np.cumsum(weights[order, None, None] * maps[order].astype(np.float64), axis=0)  # (k, fy, fx)
    full = np.asarray(full, dtype=np.float64)
    height, width = full.shape
    rows = interpolation_matrix(maps.shape[-2], height, align_corners=align_corners)
    cols = interpolation_matrix(maps.shape[-1], width, align_corners=align_corners)
    if ks is None:
        return _correlations_after_upsampling(np.maximum(cumulative, 0.0), full, rows, cols)
    values = np.empty(len(ks))
    block = max(1, _UPSAMPLE_BLOCK_PIXELS // (height * width))
    # float32 maps with float64 sums: r to about 1e-6, at half the memory traffic.
    rows32, cols32 = rows.astype(np.float32), cols.astype(np.float32)
    full_centred = (full - full.mean()).ravel().astype(np.float32)
    full_norm = np.sqrt(np.einsum("p,p->", full_centred, full_centred, dtype=np.float64))
    for start in range(0, len(ks), block):
        chunk = cumulative[ks[start : start + block] - 1].astype(np.float32)
        if relu_at == "feature":
            upsampled = rows32 @ np.maximum(chunk, 0.0) @ cols32.T
        else:
            upsampled = np.maximum(rows32 @ chunk @ cols32.T, 0.0)
        flat = upsampled.reshape(len(chunk), -1)
        flat -= flat.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
        norms = np.sqrt(np.einsum("kp,kp->k", flat, flat, dtype=np.float64)) * full_norm
        cross = np.einsum("kp,p->k", flat, full_centred, dtype=np.float64)
        constant = np.ptp(chunk.reshape(len(chunk), -1), axis=1) == 0
        valid = (norms > 0) & ~constant
        values[start : start + block] = np.where(valid, cross / np.where(valid, norms, 1.0), np.nan)
    return values
