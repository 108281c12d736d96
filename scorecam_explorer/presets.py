r"""Weighting presets: how a cache's masked scores become Score-CAM channel weights.

Every published Score-CAM runs the same masked forward passes and then differs only in a few
choices. The pipeline that applies them is written once, in :mod:`scorecam_explorer.compose`;
a preset is a short class that says

* ``scores``: which number per channel k it reads from the model's output f on the masked
  input X∘H_k (a logit, a logit difference, or a class probability),
* ``channel_softmax``: whether the weights are a softmax of those scores over the channels,
* ``skip_constant``: whether channels with a constant activation get weight 0,
* ``relu_at``: where ReLU is applied, on the weighted sum at ``"feature"`` resolution or
  after upsampling it to the ``"input"`` resolution,
* ``normalize_eps``: the epsilon of the final min-max normalisation
  (M - min M) / (max M - min M + eps) (a map that is constant is returned as all zero),
* ``align_corners``: the bilinear upsampling used to bring the map to input resolution
  (``None``: the one the cache's masks were built with),
* ``mask_convention``: the mask convention (see :mod:`scorecam_explorer.conventions`) a cache
  must be computed with for the preset to reproduce its implementation exactly,
* ``one_sample_only``: whether it reads something of each masked pass that the mean over
  samples of a Score-CAM family cache does not keep (see below).

The Score-CAM family (:mod:`scorecam_explorer.sampling`). A cache computed with SS-CAM or
IS-CAM keeps, per channel, the mean over its S samples of the model's output,
f̄_k = (1/S) sum_s f(M_k^(s)), where a Score-CAM cache keeps f(X∘H_k). The presets read f̄_k
in its place:

* ``paper``: softmax_k(f̄^c_k - f^c(X_b)), the SS-CAM and IS-CAM papers' weights.
* ``torchcam``: softmax_k(f̄^c_k - f^c(X)), torchcam 0.5.0's ``SSCAM`` and ``ISCAM`` exactly
  (their mean of f^c(M_k^(s)) - f^c(X), up to float32 rounding: they sum the differences).
* ``pytorch-grad-cam``: softmax_k(f̄^c_k), the same weights as the two above (shift
  invariance); grad-cam has no SS-CAM or IS-CAM of its own, so this is its pipeline on the
  family's scores.
* ``official`` does not apply: it weighs channel k by the class probability of its masked
  input, and the family's version of that is the mean over samples of softmax(f(M_k^(s))),
  which the mean of f does not give (softmax(f̄) is not the mean of the softmaxes). It
  refuses a cache with more than one sample per channel.

Notation: A_k is channel k's activation map, f^c the logit of class c, p^c = softmax(f)^c
the class probability, X_b = X * 0 the baseline input, softmax_k a softmax over channels.

Softmax over channels is shift invariant, softmax_k(s_k + b) = softmax_k(s_k) for any b that
does not depend on k. So the paper's baseline term f^c(X_b), torchcam's f^c(X) and
pytorch-grad-cam's nothing at all give identical weights; they differ only in the score
they report. For the same reason, a weight computed over all channels and then restricted to
a subset equals the softmax over that subset up to one positive factor, which the final
min-max normalisation removes.

No preset imports torch: they run on plain numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any, ClassVar, Literal

import numpy as np

from scorecam_explorer.errors import ScorecamError, did_you_mean
from scorecam_explorer.kernels import softmax as softmax_over_channels

Resolution = Literal["feature", "input"]


class TargetScores:
    """The model outputs one target class needs, per image and channel (numpy, float64).

    Attributes:
        masked_logit: (image, channel) f^c(X∘H_k).
        logit: (image,) f^c(X), the unmasked output.
        baseline_logit: (image,) f^c(X_b), the output for the all-zero mask.
        constant: (image, channel) bool, channel k's activation was constant.
        masked_probability: (image, channel) p^c(X∘H_k) = exp(f^c - logsumexp_j f^j),
            computed on first use (it needs the log-normaliser of every masked output).
    """

    def __init__(
        self,
        masked_logit: np.ndarray,
        logit: np.ndarray,
        baseline_logit: np.ndarray,
        constant: np.ndarray,
        log_normalizer: Callable[[], np.ndarray],
    ) -> None:
        self.masked_logit = masked_logit
        self.logit = logit
        self.baseline_logit = baseline_logit
        self.constant = constant
        self._log_normalizer = log_normalizer

    @cached_property
    def masked_probability(self) -> np.ndarray:
        return np.exp(self.masked_logit - self._log_normalizer())


class Preset:
    """One Score-CAM weighting convention (see the module docstring for the fields)."""

    name: ClassVar[str]
    score_name: ClassVar[str]
    channel_softmax: ClassVar[bool] = True
    skip_constant: ClassVar[bool] = False
    relu_at: ClassVar[Resolution] = "feature"
    normalize_eps: ClassVar[float] = 0.0
    align_corners: ClassVar[bool | None] = False
    mask_convention: ClassVar[str]
    one_sample_only: ClassVar[bool] = False

    def scores(self, target: TargetScores) -> np.ndarray:
        """The score s_k per (image, channel) this preset turns into weights."""
        raise NotImplementedError

    def weights(self, target: TargetScores) -> np.ndarray:
        """The channel weights w_k per (image, channel), before any channel subset."""
        scores = self.scores(target)
        weights = softmax_over_channels(scores) if self.channel_softmax else scores.copy()
        if self.skip_constant:
            weights[target.constant] = 0.0
        return weights

    def __repr__(self) -> str:
        return f"<Score-CAM preset {self.name!r}>"


class PaperPreset(Preset):
    r"""Wang et al. 2020, Algorithm 1.

    CIC_k = f^c(X∘H_k) - f^c(X_b),   alpha_k = softmax_k(CIC)_k,
    L = ReLU(sum_k alpha_k A_k) at feature resolution, upsampled bilinearly as the masks were,
    then min-max normalised (no epsilon).
    """

    name = "paper"
    score_name = "logit increase over the baseline, f^c(X∘H_k) - f^c(X_b)"
    align_corners = None
    mask_convention = "paper"

    def scores(self, target: TargetScores) -> np.ndarray:
        return target.masked_logit - target.baseline_logit[:, None]


class OfficialPreset(Preset):
    r"""The authors' released code (haofanwang/Score-CAM, ``cam/scorecam.py``).

    w_k = p^c(X∘H_k) (class probability, no softmax over channels); channels whose
    upsampled activation is constant are skipped (w_k = 0). The raw upsampled maps are
    combined at input resolution, L = ReLU(sum_k w_k Up(A_k)) = ReLU(Up(sum_k w_k A_k)) (Up is
    linear; bilinear, align_corners=False), then min-max normalised without epsilon (the code
    returns None for a constant map; here it is all zero).
    """

    name = "official"
    score_name = "class probability of the masked input, p^c(X∘H_k)"
    channel_softmax = False
    skip_constant = True
    relu_at = "input"
    mask_convention = "official"
    one_sample_only = True  # p^c of each masked pass; a mean over samples of f cannot give it

    def scores(self, target: TargetScores) -> np.ndarray:
        return target.masked_probability


class PytorchGradCamPreset(Preset):
    r"""grad-cam 1.5.7 ``ScoreCAM`` (``score_cam.py`` + ``base_cam.py``).

    w_k = softmax_k(f^c(X∘H_k)); L = ReLU(sum_k w_k A_k) at feature resolution;
    ``scale_cam_image``: (L - min) / (max(L - min) + 1e-7), resized with OpenCV INTER_LINEAR
    (bilinear, align_corners=False), then min-max normalised again with eps 1e-7.
    """

    name = "pytorch-grad-cam"
    score_name = "logit of the masked input, f^c(X∘H_k)"
    normalize_eps = 1e-7
    mask_convention = "pytorch-grad-cam"

    def scores(self, target: TargetScores) -> np.ndarray:
        return target.masked_logit


class TorchcamPreset(Preset):
    r"""torchcam 0.5.0 ``ScoreCAM`` (``methods/activation.py`` + ``methods/core.py``).

    w_k = softmax_k(f^c(X∘H_k) - f^c(X)) (torchcam subtracts the unmasked output);
    L = ReLU(sum_k w_k A_k), min-max normalised at feature resolution with eps 1e-8, which is
    the map torchcam returns. At input resolution it is upsampled bilinearly
    (align_corners=False) and normalised again.
    """

    name = "torchcam"
    score_name = "logit change from the unmasked input, f^c(X∘H_k) - f^c(X)"
    normalize_eps = 1e-8
    mask_convention = "torchcam"

    def scores(self, target: TargetScores) -> np.ndarray:
        return target.masked_logit - target.logit[:, None]


PRESETS: dict[str, Preset] = {
    preset.name: preset for preset in (PaperPreset(), OfficialPreset(), PytorchGradCamPreset(), TorchcamPreset())
}
"""The named weighting presets, keyed by name."""


def check_preset_applies(preset: Preset, sampler: Mapping[str, Any]) -> Preset:
    """``preset``, or a ScorecamError when it does not apply to a cache computed with the mask
    sampler ``sampler`` (its recorded fields, :func:`scorecam_explorer.cache.cache_sampler`)."""
    samples = int(sampler.get("samples", 1))
    if preset.one_sample_only and samples > 1:
        from scorecam_explorer.sampling import family_label

        applicable = ", ".join(name for name, other in PRESETS.items() if not other.one_sample_only)
        raise ScorecamError(
            f"the {preset.name!r} preset weighs each channel by the class probability of its masked input; "
            f"this cache ({family_label(sampler)}) keeps the mean of the model's outputs over the samples, "
            f"from which the mean probability cannot be recovered. Use one of {applicable}."
        )
    return preset


def get_preset(preset: str | Preset) -> Preset:
    """A :class:`Preset` from its name (or the preset itself)."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ScorecamError(
        f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.{did_you_mean(str(preset), PRESETS)}"
    )
