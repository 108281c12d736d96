"""Model inputs: a preprocessed tensor, or pictures and their preprocessing, as one batch.

Every entry point that runs a model (``compute_cache``, Grad-CAM, the metrics, the
evaluation) accepts either

* a preprocessed tensor X of shape (N, 3, H, W) or (3, H, W), taken as it is, or
* one picture or a list of pictures (paths, ``"sample:NAME"``, PIL images, uint8 arrays),
  each turned into X_i = (crop(resize(p_i)) / 255 - mean) / std by the model's
  :class:`~scorecam_explorer.preprocessing.Preprocessing`,

and gets back an :class:`InputBatch`: X as float32 on the CPU, one unique id per image, and
the pictures as the user sees them (uint8 (N, H, W, 3)) when the inputs were pictures.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from scorecam_explorer.capture import check_finite
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.images import image_id, load_image
from scorecam_explorer.kernels import min_max
from scorecam_explorer.preprocessing import Preprocessing

ImageInput = Union[str, Path, Image.Image, np.ndarray]
Inputs = Union[torch.Tensor, ImageInput, Sequence[ImageInput]]


@dataclass(frozen=True)
class InputBatch:
    """Model inputs X with one id per image.

    Attributes:
        tensor: X, float32 (N, 3, H, W), contiguous, on the CPU.
        image_ids: one unique id per image.
        pictures: for picture inputs, the cropped pictures the model sees before
            normalisation, uint8 (N, H, W, 3); None for a tensor input.
    """

    tensor: torch.Tensor
    image_ids: list[str]
    pictures: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def viewable(self, preprocessing: Preprocessing | None) -> np.ndarray:
        """The pictures as the user sees them, uint8 (N, H, W, 3).

        The cropped pictures for picture inputs; for a tensor, X denormalised with
        ``preprocessing`` (p = clip(round(255 (X std + mean)))), or stretched to 0..255 per
        image when the normalisation is unknown (``preprocessing`` None).
        """
        if self.pictures is not None:
            return self.pictures
        if preprocessing is not None:
            return preprocessing.denormalise(self.tensor.numpy())
        return min_max_pictures(self.tensor.numpy())


def prepare_inputs(
    inputs: Inputs,
    preprocessing: Preprocessing | None,
    image_ids: Sequence[str] | None = None,
    *,
    allow_repeated_ids: bool = True,
) -> InputBatch:
    """Turn a preprocessed tensor or pictures into one :class:`InputBatch`.

    Args:
        inputs: a tensor (N, 3, H, W) or (3, H, W) that is already preprocessed (floating
            point), or one picture or a list of pictures.
        preprocessing: how pictures become inputs; None when it is unknown (then only a
            tensor can be given).
        image_ids: names of the images (default: file names, ``sample:NAME``, ``image-I``).
            Repeated names get ``#2``, ``#3``... suffixes.
        allow_repeated_ids: when False, repeated names in ``image_ids`` are an error
            instead of being suffixed.

    Raises:
        ScorecamError: a tensor of the wrong shape or dtype, no pictures, pictures without
            a preprocessing, or ids that do not fit the images.
        NonFiniteError: a tensor holding NaN or inf.
        ImageLoadError: a picture that cannot be read.
    """
    if isinstance(inputs, torch.Tensor):
        tensor = tensor_batch(inputs)
        pictures = None
        default_ids = [f"image-{index}" for index in range(tensor.shape[0])]
    else:
        sources = picture_sources(inputs)
        if preprocessing is None:
            raise ScorecamError(
                "pictures need the model's preprocessing: pass a LoadedModel "
                "(scorecam_explorer.from_module(module, preprocessing=...)) or a preprocessed tensor."
            )
        pictures = np.stack([preprocessing.crop_image(load_image(source)) for source in sources])
        tensor = torch.from_numpy(preprocessing.normalise(pictures).copy())
        default_ids = [image_id(source, index) for index, source in enumerate(sources)]
    given = [str(name) for name in image_ids] if image_ids is not None else None
    if given is not None and len(given) != tensor.shape[0]:
        raise ScorecamError(f"{len(given)} image ids given for {tensor.shape[0]} images.")
    repeated = sorted(name for name, count in Counter(given or []).items() if count > 1)
    if repeated and not allow_repeated_ids:
        raise ScorecamError(f"image ids must be unique; repeated: {', '.join(repeated)}.")
    return InputBatch(tensor, unique_ids(given if given is not None else default_ids), pictures)


def tensor_batch(inputs: torch.Tensor) -> torch.Tensor:
    """A preprocessed tensor (N, 3, H, W) or (3, H, W) as float32 (N, 3, H, W) on the CPU, checked."""
    if not inputs.is_floating_point():
        raise ScorecamError(
            f"an input tensor must be floating point (preprocessed and normalised), got {inputs.dtype}; "
            "pass pictures instead to have the model's preprocessing applied."
        )
    tensor = inputs.detach().to("cpu", torch.float32)
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[1] != 3 or tensor.shape[0] == 0:
        raise ScorecamError(
            f"an input tensor must be a preprocessed (N, 3, H, W) or (3, H, W) batch with N >= 1, "
            f"got shape {tuple(inputs.shape)}."
        )
    check_finite(tensor, "the input tensor")  # after the cast: float64 values beyond float32 become inf
    return tensor.contiguous()


def picture_sources(inputs: object) -> list[ImageInput]:
    """One picture, or an iterable of pictures, as a non-empty list of pictures."""
    if is_single_picture(inputs):
        return [inputs]  # type: ignore[list-item]
    if not isinstance(inputs, Iterable):
        raise ScorecamError(
            f"inputs must be a preprocessed tensor, a picture (path, 'sample:NAME', PIL image, array) "
            f"or a list of pictures, not {type(inputs).__name__}."
        )
    sources = list(inputs)
    if not sources:
        raise ScorecamError("no images given.")
    return sources


def is_single_picture(inputs: object) -> bool:
    """Whether ``inputs`` is one picture rather than a list of them."""
    return isinstance(inputs, (str, os.PathLike, Image.Image, np.ndarray))


def unique_ids(ids: Iterable[object]) -> list[str]:
    """The ids as strings, repeats made unique by suffixing ``#2``, ``#3``..."""
    seen: dict[str, int] = {}
    unique = []
    for raw in map(str, ids):
        seen[raw] = seen.get(raw, 0) + 1
        unique.append(raw if seen[raw] == 1 else f"{raw}#{seen[raw]}")
    return unique


def min_max_pictures(batch: np.ndarray) -> np.ndarray:
    """A viewable uint8 (N, H, W, 3) picture of inputs (N, 3, H, W) whose normalisation is unknown.

    Each image is stretched to 0..255: p = round(255 (X - min X) / (max X - min X)), the
    min-max normalisation of :func:`scorecam_explorer.kernels.min_max` (eps 0) over all of
    the image's values; a constant image becomes 0.
    """
    scaled = min_max(batch.reshape(batch.shape[0], 1, -1), 0.0).reshape(batch.shape)
    return np.round(np.moveaxis(scaled, 1, -1) * 255).astype(np.uint8)
