"""Mask conventions: how a channel's activation becomes the mask that multiplies the input.

Score-CAM masks the (normalised) input X with each channel's activation map A_k, brought to
the input resolution and min-max normalised to [0, 1]:

    after upsampling  (paper, official, pytorch-grad-cam):
        U_k = Up(A_k),        H_k = (U_k - min U_k) / (max U_k - min U_k + eps)
    before upsampling (torchcam):
        S_k = (A_k - min A_k) / (max(A_k - min A_k) + eps),   H_k = Up(S_k)

where Up is bilinear interpolation to the input size (``align_corners`` as the
implementation uses it) and min/max run over the spatial positions of one channel of one
image. The masked input is X∘H_k.

A channel is *constant* when max == min at the resolution where it is normalised. Its mask
is then all zero (we define it so also when eps == 0, where the formula would be 0/0; the
authors' code skips such channels), so its masked input is the baseline X * 0.

Published implementations differ in these choices; each named convention reproduces one of
them exactly (same operations in the same order, so the same float32 masks):

- ``paper``: Wang et al. 2020, H_k = s(Up(A_k)); bilinear, align_corners=False, no eps.
- ``official``: the authors' released code (haofanwang/Score-CAM): same masks as ``paper``.
- ``pytorch-grad-cam``: grad-cam 1.5.7 ``ScoreCAM`` (``nn.UpsamplingBilinear2d``, i.e.
  align_corners=True, normalised after upsampling, eps = 1e-8).
- ``torchcam``: torchcam 0.5.0 ``ScoreCAM`` (normalised at feature resolution with
  eps = 1e-8, then bilinear upsampling with align_corners=False).

This module imports torch only inside the functions that build masks, so a cache's
recorded convention can be read without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

from scorecam_explorer.errors import ScorecamError, did_you_mean

if TYPE_CHECKING:
    import torch

Normalize = Literal["after_upsample", "before_upsample"]

# Channels whose masks are built at once (about 13 MB of masks at 224x224).
MASK_BLOCK = 64


@dataclass(frozen=True)
class MaskConvention:
    """One way of turning activation maps into input masks (see the module docstring).

    Attributes:
        name: the convention's name as recorded in a cache.
        align_corners: passed to bilinear interpolation.
        normalize: ``"after_upsample"`` or ``"before_upsample"`` (where min-max happens).
        eps: added to the denominator (max - min) of the min-max normalisation.
        upsample: interpolation mode; only ``"bilinear"`` is used by the published methods.
        upsample_together: interpolate a block of channels as one (1, C, h, w) tensor
            (pytorch-grad-cam) rather than each map alone. Same maths; on a CPU, PyTorch
            rounds the two differently for small outputs (H + W <= 128), so it matters for
            bit-exact reproduction only.
    """

    name: str
    align_corners: bool
    normalize: Normalize
    eps: float
    upsample: str = "bilinear"
    upsample_together: bool = False

    def __post_init__(self) -> None:
        if self.normalize not in ("after_upsample", "before_upsample"):
            raise ScorecamError(
                f"mask convention {self.name!r}: normalize must be 'after_upsample' or "
                f"'before_upsample', not {self.normalize!r}."
            )
        if self.upsample != "bilinear":
            raise ScorecamError(
                f"mask convention {self.name!r}: only bilinear upsampling is supported, "
                f"not {self.upsample!r}."
            )
        if not self.eps >= 0.0:
            raise ScorecamError(f"mask convention {self.name!r}: eps must be >= 0, not {self.eps}.")

    def same_masks(self, other: MaskConvention) -> bool:
        """Whether ``other`` builds the same masks (every field but the name agrees)."""
        return replace(self, name="") == replace(other, name="")

    def to_json(self) -> str:
        """The convention as the JSON string stored in a cache's ``mask_convention`` attr."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MaskConvention:
        """Read a convention back from :meth:`to_json`'s output."""
        try:
            fields = json.loads(text)
            return cls(
                name=str(fields["name"]),
                align_corners=bool(fields["align_corners"]),
                normalize=fields["normalize"],
                eps=float(fields.get("eps", 0.0)),
                upsample=str(fields.get("upsample", "bilinear")),
                upsample_together=bool(fields.get("upsample_together", False)),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ScorecamError(f"not a mask convention: {text!r} ({error}).") from error

    # ---- mask construction (torch) -------------------------------------------------------

    def mask_blocks(
        self, activation: torch.Tensor, size: tuple[int, int], block: int = MASK_BLOCK
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """The masks of one image's channels, ``block`` channels at a time.

        ``activation`` is (C, h, w), ``size`` the input's (H, W). Yields
        ``(first_channel, masks (b, H, W) float32, constant (b,) bool)`` for consecutive
        blocks, so memory stays bounded whatever C is. Constant channels get all-zero masks.

        Blocks start at multiples of ``block`` (a multiple of every CPU vector width), which
        keeps the float32 results identical to interpolating all C maps at once: PyTorch's
        CPU bilinear kernel vectorises across channels when H + W <= 128, and its rounding
        then depends on a channel's position within groups of 8 or 16.
        """
        activation = activation.float()
        n_channels = activation.shape[0]
        for start in range(0, n_channels, block):
            maps = activation[start : start + block]
            if self.normalize == "after_upsample":
                masks, constant = self._min_max(self._upsample(maps, size))
            else:
                normalised, constant = self._min_max(maps)
                masks = self._upsample(normalised, size)
            yield start, masks, constant

    def masks(self, activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """All masks H_k in [0, 1] for activation maps (N, C, h, w): (N, C, H, W) float32.

        This holds N * C full-resolution maps; the scoring loop uses :meth:`mask_blocks`.
        """
        import torch

        return torch.stack(
            [torch.cat([masks for _, masks, _ in self.mask_blocks(image, size)]) for image in activation]
        )

    def constant_channels(self, activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Which channels are constant where they are normalised: bool (N, C).

        For conventions that normalise after upsampling this has to upsample: a map that is
        constant at feature resolution need not be exactly constant, in float32, after
        interpolation, and vice versa.
        """
        import torch

        return torch.stack(
            [torch.cat([constant for _, _, constant in self.mask_blocks(image, size)]) for image in activation]
        )

    def _upsample(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear interpolation of maps (b, h, w) to (b, H, W), laid out as the library does."""
        import torch.nn.functional as F

        if tuple(maps.shape[-2:]) == tuple(size) and self.normalize == "before_upsample":
            return maps  # torchcam skips interpolation when the sizes already agree
        if self.upsample_together:  # one (1, b, h, w) tensor, as pytorch-grad-cam does
            return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=self.align_corners)[0]
        # one map per batch entry, (b, 1, h, w), as torchcam and the authors' loop do
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=self.align_corners)[:, 0]

    def _min_max(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((maps - min) / (max - min + eps) per map, constant flags); 0 where max == min."""
        import torch

        flat = maps.flatten(1)
        low = flat.amin(dim=1)
        high = flat.amax(dim=1)
        span = (high - low)[:, None, None]
        constant = high == low
        shifted = maps - low[:, None, None]
        if self.eps > 0:
            # Both libraries divide by (range + eps); a constant map gives 0 / eps = 0.
            return shifted / (span + self.eps), constant
        safe = torch.where(span > 0, span, torch.ones_like(span))
        return torch.where(span > 0, shifted / safe, torch.zeros_like(shifted)), constant


MASK_CONVENTIONS: dict[str, MaskConvention] = {
    "paper": MaskConvention("paper", align_corners=False, normalize="after_upsample", eps=0.0),
    "official": MaskConvention("official", align_corners=False, normalize="after_upsample", eps=0.0),
    "pytorch-grad-cam": MaskConvention(
        "pytorch-grad-cam", align_corners=True, normalize="after_upsample", eps=1e-8, upsample_together=True
    ),
    "torchcam": MaskConvention("torchcam", align_corners=False, normalize="before_upsample", eps=1e-8),
}
"""The named mask conventions, keyed by name (``paper`` is the default)."""

DEFAULT_CONVENTION = "paper"


def get_convention(convention: str | MaskConvention) -> MaskConvention:
    """A :class:`MaskConvention` from its name (or the convention itself)."""
    if isinstance(convention, MaskConvention):
        return convention
    try:
        return MASK_CONVENTIONS[convention]
    except (KeyError, TypeError):
        raise ScorecamError(
            f"unknown mask convention {convention!r}; choose one of "
            f"{', '.join(MASK_CONVENTIONS)}.{did_you_mean(str(convention), MASK_CONVENTIONS)}"
        ) from None
