"""Mask samplers: which masked inputs are forwarded for one channel, and how their outputs
are reduced to the row the cache keeps.

Score-CAM forwards one masked input per channel. Its family forwards several: for image X
(C_in, H, W) and channel k's mask H_k (H, W) in [0, 1] (built by a
:class:`~scorecam_explorer.conventions.MaskConvention`), a sampler defines S masked inputs

    M_k^(s) = g_s(X, H_k),        s = 0, ..., S - 1

and the cache keeps, per channel, the mean of the model's full output (all K classes) over
them:

    masked_logits[k, :] = (1/S) * sum_s f(M_k^(s))

(summed in float32 in sample order, then divided by S; for S = 1 the row is f(M_k^(0))
itself). Members of the family:

- Score-CAM (built in, :class:`ScoreCamSampler`): S = 1, M_k = X∘H_k.
- SS-CAM (Wang et al. 2020; torchcam 0.5.0 ``SSCAM``): M_k^(s) = X∘(H_k + δ_s), with δ_s
  Gaussian noise N(0, σ²) drawn per pixel (one map per channel, shared by the colour
  channels); torchcam uses S = 35, σ = 2.
- IS-CAM (Naidu et al. 2020; torchcam 0.5.0 ``ISCAM``): M_k^(s) = c_s (X∘H_k) with the
  cumulative coefficient c_s = sum_{j=1}^{s+1} j/S; torchcam uses S = 10.

Only the built-in Score-CAM sampler exists here; the others fit the same interface.

What the cache keeps is the mean of f, not of some function of f. torchcam's ``SSCAM`` and
``ISCAM`` average the raw outputs Y^(c)(M_k^(s)) - Y^(c)(X_b) over samples and then take the
softmax over channels, which is a function of the mean of f (up to float32 rounding: they
sum differences, here the outputs are summed and the baseline is subtracted afterwards). A
variant that averages softmax probabilities per sample (as Score-CAM's official code reads
softmax scores of each masked pass) is not: mean_s softmax(f(M^(s))) differs from
softmax(mean_s f(M^(s))). Such a preset would need a second reduced quantity in the cache
(the mean over samples of softmax(f)); this module does not provide it.

A channel is *constant* when its mask is all zero (see :mod:`scorecam_explorer.conventions`).
For Score-CAM (and for IS-CAM, whose samples scale the zero mask) every masked input of such
a channel is the baseline X * 0, whose output is computed once per image, so the channel
need not be forwarded: :attr:`MaskSampler.constant_is_free` says so. Once noise is added
(SS-CAM) a constant channel's inputs differ from the baseline and are forwarded like any
other.

Random samplers draw from the ``torch.Generator`` they are given (never from torch's global
one). The engine makes one per layer from :attr:`MaskSampler.seed` on the compute device, and
asks for the samples of a batch in sample order. Draws taken from one generator in batch
order depend on how the channels were batched (the batch size, and a batch retried smaller
after running out of memory draws again); the batch's ``images`` and ``channels`` are given
too, so that a sampler may derive its draws from them instead (noise that does not depend on
the batching).

This module imports torch only where masked inputs are built, so a cache's recorded sampler
can be read without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scorecam_explorer.errors import ScorecamError, did_you_mean

if TYPE_CHECKING:
    import torch

DEFAULT_SAMPLER = "scorecam"
"""The name of the sampler a cache without a ``mask_sampler`` attribute was computed with."""


class MaskSampler:
    """How the masked inputs of a block of channels are sampled (see the module docstring).

    Subclasses set :attr:`name` and :attr:`samples` and implement :meth:`masked_inputs`;
    a sampler whose masked inputs of a constant channel are not all the baseline X * 0
    sets :attr:`constant_is_free` to False; one with parameters returns them from
    :meth:`parameters` (they are recorded in the cache).

    Attributes:
        name: the sampler's name as recorded in a cache.
        samples: S, the masked inputs forwarded per channel (>= 1).
        constant_is_free: whether every masked input of a constant channel (all-zero mask)
            is the baseline X * 0, so that its row is the baseline's and it is not forwarded.
        seed: the seed of the generator the engine gives :meth:`masked_inputs` (one per
            layer, on the compute device); unused by deterministic samplers.
    """

    name: str = ""
    samples: int = 1
    constant_is_free: bool = True
    seed: int = 0

    def masked_inputs(
        self,
        inputs: torch.Tensor,
        masks: torch.Tensor,
        *,
        generator: torch.Generator,
        images: torch.Tensor,
        channels: torch.Tensor,
    ) -> Iterator[torch.Tensor]:
        """The masked inputs of a batch of b channels, one sample at a time.

        Args:
            inputs: X, float32: (C_in, H, W) when every channel of the batch belongs to one
                image, else (b, C_in, H, W), one image per channel; it broadcasts against
                ``masks[:, None]``.
            masks: H, float32 (b, H, W) in [0, 1] (the mask convention's), on X's device.
            generator: the generator every random draw must come from.
            images: the image index of each channel, int64 (b,), on the CPU.
            channels: the layer channel index of each, int64 (b,), on the CPU.

        Yields:
            S tensors (b, C_in, H, W): M^(s) for s = 0, ..., S - 1, in order; conceptually the
            (S, b, C_in, H, W) sample dimension, yielded one sample at a time so that peak
            memory does not grow with S. Each is forwarded before the next is asked for.
            (Any iterable of S such tensors will do, a stacked (S, b, C_in, H, W) tensor too.)
        """
        raise NotImplementedError

    def reduce(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The row the cache keeps per channel: the mean of the S outputs f(M^(s)), float32
        (b, K), summed in sample order then divided by S (for S = 1 the output itself)."""
        if len(outputs) == 1:
            return outputs[0]
        total = outputs[0].float().clone()
        for output in outputs[1:]:
            total += output.float()
        return total / len(outputs)

    def parameters(self) -> dict[str, Any]:
        """The sampler's parameters beyond name and samples (JSON values), recorded in the cache."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The fields recorded in a cache's ``mask_sampler`` attribute."""
        return {"name": self.name, "samples": int(self.samples), **self.parameters()}

    def to_json(self) -> str:
        """:meth:`describe` as the JSON string stored in the ``mask_sampler`` attribute."""
        return json.dumps(self.describe(), sort_keys=True)

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator on ``device`` seeded with :attr:`seed` (the engine makes one per layer)."""
        import torch

        return torch.Generator(device=device).manual_seed(int(self.seed))

    def check(self) -> MaskSampler:
        """The sampler itself, or a ScorecamError saying what is wrong with it."""
        if not isinstance(self.name, str) or not self.name:
            raise ScorecamError(f"mask sampler {type(self).__name__}: its name must be a non-empty string.")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ScorecamError(f"mask sampler {self.name!r}: samples must be an integer >= 1, not {self.samples!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ScorecamError(f"mask sampler {self.name!r}: seed must be an integer, not {self.seed!r}.")
        try:
            self.to_json()
        except (TypeError, ValueError) as error:
            raise ScorecamError(f"mask sampler {self.name!r}: its parameters are not JSON values ({error}).") from None
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json()})"


class ScoreCamSampler(MaskSampler):
    """Score-CAM: one masked input per channel, M_k = X∘H_k (S = 1); a constant channel's
    input is the baseline X * 0, so it is free."""

    name = "scorecam"
    samples = 1
    constant_is_free = True

    def masked_inputs(
        self,
        inputs: torch.Tensor,
        masks: torch.Tensor,
        *,
        generator: torch.Generator,
        images: torch.Tensor,
        channels: torch.Tensor,
    ) -> Iterator[torch.Tensor]:
        yield inputs * masks[:, None]


MASK_SAMPLERS: dict[str, type[MaskSampler]] = {"scorecam": ScoreCamSampler}
"""The built-in samplers, by recorded name; each is built from its recorded parameters."""


def get_sampler(sampler: str | MaskSampler | None) -> MaskSampler:
    """A checked :class:`MaskSampler` from None (Score-CAM), a built-in's name, or a sampler."""
    if sampler is None:
        return ScoreCamSampler()
    if isinstance(sampler, MaskSampler):
        return sampler.check()
    if isinstance(sampler, str):
        if sampler in MASK_SAMPLERS:
            return MASK_SAMPLERS[sampler]().check()
        raise ScorecamError(
            f"unknown mask sampler {sampler!r}; choose one of {', '.join(MASK_SAMPLERS)}, or pass a MaskSampler."
            f"{did_you_mean(sampler, MASK_SAMPLERS)}"
        )
    raise ScorecamError(
        f"sampler must be None, a sampler name ({', '.join(MASK_SAMPLERS)}) or a MaskSampler, "
        f"not {type(sampler).__name__}."
    )


def sampler_fields(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler recorded in a cache's root attributes (name, samples, parameters); Score-CAM's
    when there is no ``mask_sampler`` attribute (caches made before samplers existed).

    Raises ScorecamError when the attribute is not a JSON object with a name and samples >= 1.
    """
    text = attrs.get("mask_sampler")
    if text is None:
        return ScoreCamSampler().describe()
    try:
        fields = json.loads(text) if isinstance(text, str) else dict(text)
    except (ValueError, TypeError) as error:
        raise ScorecamError(f"the mask_sampler attribute is not JSON: {error}.") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("name"), str) or not fields["name"]:
        raise ScorecamError(f"the mask_sampler attribute names no sampler: {text!r}.")
    samples = fields.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ScorecamError(f"the mask_sampler attribute's samples must be an integer >= 1: {text!r}.")
    return fields


def sampler_from_fields(fields: Mapping[str, Any]) -> MaskSampler:
    """The built-in sampler that :func:`sampler_fields` describes, built again (to compute more
    layers the same way); a ScorecamError for a sampler that is not built in."""
    name = str(fields.get("name"))
    if name not in MASK_SAMPLERS:
        raise ScorecamError(
            f"the cache was computed with the mask sampler {name!r}, which is not built in "
            f"({', '.join(MASK_SAMPLERS)}); pass that sampler to compute_cache yourself."
        )
    parameters = {key: value for key, value in fields.items() if key not in ("name", "samples")}
    try:
        sampler = MASK_SAMPLERS[name](**parameters)
    except TypeError as error:
        raise ScorecamError(f"the recorded mask sampler {dict(fields)} cannot be rebuilt: {error}.") from None
    sampler = sampler.check()
    if sampler.describe() != dict(fields):
        raise ScorecamError(f"the recorded mask sampler {dict(fields)} differs from the built-in {sampler.describe()}.")
    return sampler
