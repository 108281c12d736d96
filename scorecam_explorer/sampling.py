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
- SS-CAM (Wang et al. 2020; torchcam 0.5.0 ``SSCAM``, :class:`SSCamSampler`):
  M_k^(s) = X∘(H_k + δ_k^(s)), with δ_k^(s) Gaussian noise N(0, σ²) drawn per pixel (one map
  per channel and sample, shared by the colour channels, not clipped); torchcam uses S = 35,
  σ = 2. The noise is drawn from torch's global CPU generator in torchcam's order, so that
  the same ``torch.manual_seed`` before both calls gives the same noise (see
  :class:`SSCamSampler`).
- IS-CAM (Naidu et al. 2020; torchcam 0.5.0 ``ISCAM``, :class:`ISCamSampler`):
  M_k^(s) = c_s (X∘H_k) with the cumulative coefficient c_s = sum_{j=1}^{s+1} j/S;
  torchcam uses S = 10.

What the cache keeps is the mean of f, not of some function of f. torchcam's ``SSCAM`` and
``ISCAM`` average the raw outputs Y^(c)(M_k^(s)) - Y^(c)(X_b) over samples and then take the
softmax over channels, which is a function of the mean of f (up to float32 rounding: they
sum differences, here the outputs are summed and the baseline is subtracted afterwards). A
variant that averages softmax probabilities per sample (as Score-CAM's official code reads
softmax scores of each masked pass) is not: mean_s softmax(f(M^(s))) differs from
softmax(mean_s f(M^(s))). Such a preset would need a second reduced quantity in the cache
(the mean over samples of softmax(f)); this module does not provide it, and the ``official``
preset, which reads the class probability of each masked pass, refuses a cache with more than
one sample per channel.

A channel is *constant* when its mask is all zero (see :mod:`scorecam_explorer.conventions`).
For Score-CAM (and for IS-CAM, whose samples scale the zero mask) every masked input of such
a channel is the baseline X * 0, whose output is computed once per image, so the channel
need not be forwarded: :attr:`MaskSampler.constant_is_free` says so. Once noise is added
(SS-CAM) a constant channel's inputs differ from the baseline and are forwarded like any
other.

Random samplers draw from the ``torch.Generator`` they are given, unless they say otherwise
(SS-CAM draws from torch's global generator, as torchcam does). The engine makes one per
layer from :attr:`MaskSampler.seed` on the compute device, and asks for the samples of a
batch in sample order. Draws taken from one generator in batch
order depend on how the channels were batched (the batch size, and a batch retried smaller
after running out of memory draws again); the batch's ``images`` and ``channels`` are given
too, so that a sampler may derive its draws from them instead (noise that does not depend on
the batching).

This module imports torch only where masked inputs are built, so a cache's recorded sampler
can be read without torch.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import math
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
    family: str = ""
    """The method's family name as ``compute_cache(family=...)`` spells it (``""``: the name)."""
    title: str = ""
    """The method as people write it (``"SS-CAM"``), for labels (``""``: the name)."""

    def start_call(self) -> None:
        """Called by the engine once per ``compute_cache`` call, before its first layer.
        Nothing by default; SS-CAM picks the generator its noise comes from here."""

    def start_layer(self, *, n_images: int, n_channels: int, size: tuple[int, int]) -> None:
        """Called by the engine before the masked inputs of a layer's N images x C channels
        (inputs of ``size`` (H, W)) are asked for. Nothing by default; SS-CAM prepares its
        noise streams here."""

    def noise_record(self) -> dict[str, Any] | None:
        """What the last layer's random draws came from, as JSON values, recorded in that
        layer's ``noise`` attribute (so that a cache says how to reproduce its draw); None
        for a sampler whose draws are fixed by :meth:`describe` (deterministic ones, and
        those drawing from the generator the engine seeds with :attr:`seed`)."""
        return None

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

    def label(self) -> str:
        """The sampler in words, e.g. ``"SS-CAM, 35 samples, σ = 2"`` (see :func:`family_label`)."""
        return family_label(self.describe())

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
    family = "score-cam"
    title = "Score-CAM"
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


class SSCamSampler(MaskSampler):
    r"""SS-CAM (Wang et al. 2020, "SS-CAM: Smoothed Score-CAM"), as torchcam 0.5.0's ``SSCAM``.

    For s = 0, ..., S - 1:  M_k^(s) = X∘(H_k + δ_k^(s)),  δ_k^(s) ~ N(0, σ²) per pixel,

    the noise at input resolution, one (H, W) map per image, channel and sample, shared by
    the colour channels and not clipped (the noisy mask leaves [0, 1]). The cache keeps the
    mean over samples of f(M_k^(s)); torchcam's weights softmax_k((1/S) sum_s (f^c(M_k^(s)) -
    f^c(X))) are a function of it, for every class c.

    The noise is torchcam's, draw for draw: torchcam draws, per layer, one tensor (N, C, H, W)
    per sample from torch's global CPU generator (``Normal(0, σ).sample``), sample after
    sample, before moving it to the compute device. This sampler reads the same numbers from
    the same stream although the engine forwards channel by channel: when a layer starts it
    walks the global generator through the S x N x C x H x W draws (one pass of random
    numbers, no model call, flat memory), keeping a copy of the generator at the start of
    each sample, and then draws each batch's noise from the copy of each sample, in torchcam's
    order (images, then channels). So the same ``torch.manual_seed`` before ``compute_cache``
    and before torchcam's ``SSCAM`` gives the same noise, whatever either's batch size (torchcam's
    noise does not depend on its batch size either), and the global generator ends where
    torchcam leaves it. Layers are computed in model order, torchcam's in the order given:
    with several layers, the same noise needs the same order.

    ``seed``: None (the default) draws from torch's global generator, as torchcam does; the
    state it had when each layer's noise started is recorded in that layer's ``noise``
    attribute (:meth:`noise_record`: the state itself, base64, and its sha256), so that
    ``torch.set_rng_state`` with it reproduces that layer's draw. An integer draws instead
    from a private generator ``torch.Generator().manual_seed(seed)``, made afresh for each
    ``compute_cache`` call (``start_call``) and read layer after layer in model order: the
    noise of ``torch.manual_seed(seed)`` before torchcam's ``SSCAM`` over the same layers, and
    the global generator is left alone. The seed is one of the sampler's parameters (in the
    cache's ``mask_sampler``); each layer's ``noise`` attribute names the layers drawn before it
    from the same generator.

    Every channel is forwarded S times: a constant channel's mask is zero but its noise is
    not, so it is not free (``constant_is_free`` is False).
    """

    name = "ss-cam"
    family = "ss-cam"
    title = "SS-CAM"
    constant_is_free = False

    def __init__(self, samples: int = 35, std: float = 2.0, seed: int | None = None) -> None:
        self.samples = samples
        self.std = std
        self.seed = seed  # type: ignore[assignment]  # None: torch's global generator
        self._noise: _TorchcamNoise | None = None
        self._channels = 0
        self._size = (0, 0)
        self._source: torch.Generator | None = None
        self._layers_drawn = 0
        self._record: dict[str, Any] | None = None

    def parameters(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"std": float(self.std)} if _is_number(self.std) else {"std": self.std}
        if self.seed is not None:
            fields["seed"] = self.seed
        return fields

    def check(self) -> MaskSampler:
        if not _is_number(self.std) or not math.isfinite(float(self.std)) or float(self.std) <= 0:
            raise ScorecamError(f"SS-CAM: std (the noise's standard deviation) must be a number > 0, not {self.std!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ScorecamError(f"SS-CAM: seed must be None (torch's global generator) or an integer >= 0, not {self.seed!r}.")
        seed, self.seed = self.seed, 0  # the base class checks the engine's generator seed
        try:
            return super().check()
        finally:
            self.seed = seed

    def generator(self, device: torch.device) -> torch.Generator:
        """Unused (the noise comes from :meth:`start_call`'s generator); one seeded with 0."""
        import torch

        return torch.Generator(device=device).manual_seed(0)

    def start_call(self) -> None:
        import torch

        self._source = torch.default_generator if self.seed is None else torch.Generator().manual_seed(int(self.seed))
        self._layers_drawn = 0

    def start_layer(self, *, n_images: int, n_channels: int, size: tuple[int, int]) -> None:
        if self._source is None:  # a layer scored without compute_cache: a call of its own
            self.start_call()
        source = self._source
        assert source is not None
        if self.seed is None:
            state = source.get_state()
            raw = bytes(state.numpy().tobytes())
            self._record = {
                "generator": "global",
                "state": base64.b64encode(raw).decode("ascii"),
                "state_sha256": hashlib.sha256(raw).hexdigest(),
            }
        else:
            self._record = {"generator": "seeded", "seed": int(self.seed), "layers_before": self._layers_drawn}
        self._channels = int(n_channels)
        self._size = (int(size[0]), int(size[1]))
        self._noise = _TorchcamNoise(
            int(self.samples), float(self.std), int(n_images) * int(n_channels), size, source=source
        )
        self._layers_drawn += 1

    def noise_record(self) -> dict[str, Any] | None:
        """The last layer's noise source: ``{"generator": "global", "state": base64, "state_sha256":
        hex}`` (torch's global CPU generator's state when the layer's noise started: restore it with
        ``torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))``)
        or ``{"generator": "seeded", "seed": s, "layers_before": k}`` (a fresh
        ``torch.Generator().manual_seed(s)`` read through k layers' noise first)."""
        return dict(self._record) if self._record is not None else None

    def masked_inputs(
        self,
        inputs: torch.Tensor,
        masks: torch.Tensor,
        *,
        generator: torch.Generator,
        images: torch.Tensor,
        channels: torch.Tensor,
    ) -> Iterator[torch.Tensor]:
        noise = self._noise
        if noise is None or tuple(masks.shape[-2:]) != self._size:
            raise ScorecamError("SS-CAM: start_layer must be called before the masked inputs of a layer are asked for.")
        rows = images.long() * self._channels + channels.long()
        first = int(rows[0])
        if not bool((rows == _arange_from(rows, first)).all()):
            raise ScorecamError(
                "SS-CAM draws its noise in torchcam's order and needs the channels of a layer in order, "
                "every channel of every image (is a constant channel skipped?)."
            )
        noise.begin(first, len(rows))
        for sample in range(int(self.samples)):
            delta = noise.draw(sample, len(rows)).view(len(rows), *masks.shape[-2:]).to(masks.device)
            yield inputs * (masks + delta)[:, None]


class ISCamSampler(MaskSampler):
    r"""IS-CAM (Naidu et al. 2020, "IS-CAM: Integrated Score-CAM"), as torchcam 0.5.0's ``ISCAM``.

    For s = 0, ..., S - 1:  M_k^(s) = c_s (X∘H_k),  c_s = sum_{j=1}^{s+1} j / S

    (the coefficient accumulated in Python floats in that order, the product X∘H_k computed
    first, as torchcam does; c_{S-1} = (S + 1) / 2). The cache keeps the mean over samples of
    f(M_k^(s)); torchcam's weights softmax_k((1/S) sum_s (f^c(M_k^(s)) - f^c(X))) are a
    function of it. Deterministic. A constant channel's masked inputs are c_s (X * 0), the
    baseline X * 0 bit for bit (c_s > 0 keeps the sign of zero), so it is free.
    """

    name = "is-cam"
    family = "is-cam"
    title = "IS-CAM"
    constant_is_free = True

    def __init__(self, samples: int = 10) -> None:
        self.samples = samples

    def masked_inputs(
        self,
        inputs: torch.Tensor,
        masks: torch.Tensor,
        *,
        generator: torch.Generator,
        images: torch.Tensor,
        channels: torch.Tensor,
    ) -> Iterator[torch.Tensor]:
        product = inputs * masks[:, None]
        coefficient = 0.0
        for sample in range(int(self.samples)):
            coefficient += (sample + 1) / self.samples
            yield coefficient * product


def _arange_from(rows: torch.Tensor, first: int) -> torch.Tensor:
    import torch

    return torch.arange(first, first + len(rows), dtype=rows.dtype)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _TorchcamNoise:
    """SS-CAM's noise as torchcam 0.5.0 draws it from torch's global CPU generator (or from
    ``source``, a CPU generator, read the same way): per sample
    s, one tensor of ``rows`` x H x W values ``torch.normal(0, σ)`` (rows = images x channels,
    image-major), sample after sample. Read here a batch of rows at a time, in row order, for
    every sample.

    No generator can jump ahead, so the constructor walks the global generator through all
    S x rows x H x W draws, copying its state at the start of each sample (S generators of
    5 kB each); the global generator ends where torchcam leaves it. Then each sample's rows
    are drawn from its copy.

    Drawing a long run of normals in pieces gives the same numbers as one draw when every
    piece starts at a multiple of 16 values from the start of the run and holds at least 16
    (PyTorch's CPU kernel draws one 32-bit uniform per value and pairs them in blocks of 16;
    a run whose length is not a multiple of 16 draws 16 more for its last 16 values, which
    the last piece then does too). Pieces here are cut that way and values drawn past a batch
    are carried to the next.

    A batch retried (the engine shrinks a batch that ran out of memory and forwards it again)
    starts where the last one started: the generators are put back to where they were then.
    """

    _PIECE = 1 << 22  # values per draw while walking the stream (16 MB)

    def __init__(
        self, samples: int, std: float, rows: int, size: tuple[int, int], source: torch.Generator | None = None
    ) -> None:
        import torch

        self.loc = torch.tensor(0.0)  # torch.distributions.Normal(0, σ): float32 scalars
        self.scale = torch.tensor(float(std))
        self.pixels = int(size[0]) * int(size[1])
        self.total = int(rows) * self.pixels
        source = source if source is not None else torch.default_generator
        self.generators = []
        for _ in range(samples):
            copy = torch.Generator()
            copy.set_state(source.get_state())
            self.generators.append(copy)
            drawn = 0
            while drawn < self.total:
                drawn += self._piece(source, drawn, min(self._PIECE, self.total - drawn)).numel()
        self.drawn = [0] * samples
        self.carry = [torch.empty(0) for _ in range(samples)]
        self.next_row = 0
        self.checkpoint: tuple[int, list[torch.Tensor], list[int], list[torch.Tensor]] | None = None

    def _piece(self, generator: torch.Generator, drawn: int, wanted: int) -> torch.Tensor:
        """At least ``wanted`` values of a sample's run from ``drawn`` on, cut as the class says."""
        import torch

        length = -(-wanted // 16) * 16
        if self.total - (drawn + length) < 16:
            length = self.total - drawn
        return torch.normal(self.loc.expand(length), self.scale.expand(length), generator=generator)

    def begin(self, first_row: int, count: int) -> None:
        """A batch of ``count`` rows from ``first_row`` on is about to be drawn for every sample."""
        if self.checkpoint is not None and first_row == self.checkpoint[0]:
            _, states, drawn, carry = self.checkpoint
            for generator, state in zip(self.generators, states):
                generator.set_state(state)
            self.drawn, self.carry = list(drawn), list(carry)
        elif first_row != self.next_row:
            raise ScorecamError(
                f"SS-CAM's noise is read in torchcam's order: expected row {self.next_row} (image x channels "
                f"+ channel) next, got {first_row}."
            )
        self.checkpoint = (
            first_row,
            [generator.get_state() for generator in self.generators],
            list(self.drawn),
            list(self.carry),
        )
        self.next_row = first_row + count

    def draw(self, sample: int, count: int) -> torch.Tensor:
        """The next ``count`` rows of sample ``sample``'s noise, flat (count x H x W values)."""
        import torch

        need = count * self.pixels
        carry = self.carry[sample]
        if need > carry.numel():
            fresh = self._piece(self.generators[sample], self.drawn[sample], need - carry.numel())
            self.drawn[sample] += fresh.numel()
            carry = torch.cat([carry, fresh]) if carry.numel() else fresh
        self.carry[sample] = carry[need:]
        return carry[:need]


MASK_SAMPLERS: dict[str, type[MaskSampler]] = {
    "scorecam": ScoreCamSampler,
    "ss-cam": SSCamSampler,
    "is-cam": ISCamSampler,
}
"""The built-in samplers, by recorded name; each is built from its recorded parameters."""

SAMPLER_ALIASES: dict[str, str] = {"score-cam": "scorecam", "sscam": "ss-cam", "iscam": "is-cam"}
"""Other spellings of the built-in samplers' names."""

FAMILIES: dict[str, str] = {"score-cam": "scorecam", "ss-cam": "ss-cam", "is-cam": "is-cam"}
"""``compute_cache(family=...)``: the family's name -> its sampler's recorded name."""


def _builtin_name(name: str) -> str | None:
    key = name.strip().lower()
    key = SAMPLER_ALIASES.get(key, key)
    return key if key in MASK_SAMPLERS else None


def family_sampler(
    family: str, *, samples: int | None = None, std: float | None = None, seed: int | None = None
) -> MaskSampler:
    """The sampler of a Score-CAM family member, ``compute_cache(family=..., samples=..., std=...)``.

    ``family`` is ``"score-cam"``, ``"ss-cam"`` or ``"is-cam"`` (also ``"scorecam"``,
    ``"sscam"``, ``"iscam"``). None for ``samples`` / ``std`` means torchcam's defaults
    (SS-CAM 35 samples, σ = 2; IS-CAM 10 samples). Score-CAM has one sample and no noise;
    IS-CAM has no noise: a ScorecamError says so when ``std`` or ``seed`` (or ``samples`` other
    than 1 for Score-CAM) is given. ``seed``: SS-CAM's noise seed (None: torch's global
    generator; see :class:`SSCamSampler`).
    """
    if not isinstance(family, str) or _builtin_name(family) is None:
        raise ScorecamError(
            f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}."
            f"{did_you_mean(str(family), FAMILIES) if isinstance(family, str) else ''}"
        )
    name = _builtin_name(family)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ScorecamError(f"samples must be an integer >= 1, not {samples!r}.")
    if std is not None and name != "ss-cam":
        title = MASK_SAMPLERS[name].title or name
        raise ScorecamError(f"std is the noise of SS-CAM; {title} adds no noise, so std cannot be given with it.")
    if seed is not None and name != "ss-cam":
        title = MASK_SAMPLERS[name].title or name
        raise ScorecamError(f"seed is SS-CAM's noise seed; {title} adds no noise, so seed cannot be given with it.")
    if name == "scorecam":
        if samples not in (None, 1):
            raise ScorecamError(
                f"Score-CAM forwards one masked input per channel; samples={samples} needs family='ss-cam' or 'is-cam'."
            )
        return ScoreCamSampler().check()
    options: dict[str, Any] = {}
    if samples is not None:
        options["samples"] = samples
    if std is not None:
        options["std"] = std
    if seed is not None:
        options["seed"] = seed
    return MASK_SAMPLERS[name](**options).check()


def resolve_sampler(
    sampler: str | MaskSampler | None,
    *,
    family: str | None = None,
    samples: int | None = None,
    std: float | None = None,
    seed: int | None = None,
) -> MaskSampler:
    """``compute_cache``'s sampler: from ``sampler=``, or from ``family=`` (with ``samples``,
    ``std`` and ``seed``), not both (see :func:`family_sampler` and :func:`get_sampler`)."""
    if family is None:
        if samples is not None or std is not None or seed is not None:
            raise ScorecamError(
                "samples=, std= and seed= go with family= (e.g. family='ss-cam', samples=35, std=2.0); "
                "a MaskSampler passed as sampler= carries its own."
            )
        return get_sampler(sampler)
    if sampler is not None:
        raise ScorecamError("give either family= (with samples= and std=) or sampler=, not both.")
    return family_sampler(family, samples=samples, std=std, seed=seed)


def family_label(fields: Mapping[str, Any]) -> str:
    """A recorded sampler in words: ``"Score-CAM"``, ``"SS-CAM, 35 samples, σ = 2"`` (``", seed
    0"`` added when it has one), ``"IS-CAM, 10 samples"``; another sampler by its name and samples. No torch needed."""
    name = str(fields.get("name", DEFAULT_SAMPLER))
    builtin = _builtin_name(name)
    title = (MASK_SAMPLERS[builtin].title if builtin else "") or name
    samples = int(fields.get("samples", 1))
    if builtin == "scorecam" and samples == 1:
        return "Score-CAM"
    parts = [title, f"{samples} sample{'s' if samples != 1 else ''}"]
    if "std" in fields:
        parts.append(f"σ = {float(fields['std']):g}")
    if fields.get("seed") is not None:
        parts.append(f"seed {fields['seed']}")
    return ", ".join(parts)


def family_name(fields: Mapping[str, Any]) -> str:
    """The family of a recorded sampler (``"score-cam"``, ``"ss-cam"``, ``"is-cam"``; another
    sampler's own name)."""
    name = str(fields.get("name", DEFAULT_SAMPLER))
    builtin = _builtin_name(name)
    return (MASK_SAMPLERS[builtin].family or builtin) if builtin else name


def seeded_noise_records(fields: Mapping[str, Any], layers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ``noise`` attribute each layer of a ``compute_cache`` call over ``layers`` (model
    order) gets from the seeded sampler ``fields`` describe (an SS-CAM with a ``seed``),
    known before the call: ``{"generator": "seeded", "seed": s, "after": [the layers before]}``.
    ``{}`` for a sampler that records no noise or draws from the global generator."""
    if _builtin_name(str(fields.get("name", ""))) != "ss-cam" or fields.get("seed") is None:
        return {}
    return {
        str(layer): {"generator": "seeded", "seed": int(fields["seed"]), "after": [str(name) for name in layers[:index]]}
        for index, layer in enumerate(layers)
    }


def cost_text(sampler: MaskSampler, channels: int) -> str:
    """What a computation will forward, said before it starts: ``channels`` is images x
    channels of every layer. ``"SS-CAM, 35 samples, σ = 2: 44,800 masked inputs"``; "at most"
    when constant channels are free (they are known only once the masks are built)."""
    count = int(sampler.samples) * int(channels)
    bound = "at most " if sampler.constant_is_free else ""
    return f"{sampler.label()}: {bound}{count:,} masked inputs"


def get_sampler(sampler: str | MaskSampler | None) -> MaskSampler:
    """A checked :class:`MaskSampler` from None (Score-CAM), a built-in's name, or a sampler."""
    if sampler is None:
        return ScoreCamSampler()
    if isinstance(sampler, MaskSampler):
        return sampler.check()
    if isinstance(sampler, str):
        builtin = _builtin_name(sampler)
        if builtin is not None:
            return MASK_SAMPLERS[builtin]().check()
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
    if "samples" in inspect.signature(MASK_SAMPLERS[name]).parameters:
        parameters["samples"] = fields.get("samples")
    try:
        sampler = MASK_SAMPLERS[name](**parameters)
    except TypeError as error:
        raise ScorecamError(f"the recorded mask sampler {dict(fields)} cannot be rebuilt: {error}.") from None
    sampler = sampler.check()
    if sampler.describe() != dict(fields):
        raise ScorecamError(f"the recorded mask sampler {dict(fields)} differs from the built-in {sampler.describe()}.")
    return sampler
