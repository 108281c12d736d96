"""How a model wants its pictures: resize, centre crop, normalise.

For a PIL image ``p`` with pixel values in [0, 255] the model input is

    X = (crop(resize(p)) / 255 - mean) / std        (per colour channel, CHW layout)

where ``resize`` scales the shorter side to ``resize`` pixels (bilinear, antialiased) and
``crop`` takes the central ``crop`` x ``crop`` square, exactly as torchvision's
``ImageClassification`` transform does for PIL images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported only where a tensor is made
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-Lite EfficientNet-Lite models expect (p - 127) / 128, i.e. this mean and std on [0, 1].
TFLITE_MEAN = (127.0 / 255.0,) * 3
TFLITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop a square, normalise per channel."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def input_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.crop

    def crop_image(self, image: Image.Image) -> np.ndarray:
        """The picture as the model sees it before normalisation: uint8 array (crop, crop, 3)."""
        image = image.convert("RGB")
        width, height = image.size
        if width <= height:
            new_width, new_height = self.resize, int(self.resize * height / width)
        else:
            new_width, new_height = int(self.resize * width / height), self.resize
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        top = int(round((new_height - self.crop) / 2.0))
        left = int(round((new_width - self.crop) / 2.0))
        if top < 0 or left < 0:  # only when crop > resize: pad like torchvision does, with zeros
            canvas = Image.new("RGB", (max(new_width, self.crop), max(new_height, self.crop)))
            canvas.paste(image, (max(0, -left), max(0, -top)))
            image, top, left = canvas, max(0, top), max(0, left)
        return np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (..., H, W, 3) pixels -> float32 (..., 3, H, W) normalised input."""
        scaled = pixels.astype(np.float32) / 255.0
        normalised = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.moveaxis(normalised, -1, -3).astype(np.float32, copy=False)

    def denormalise(self, inputs: np.ndarray) -> np.ndarray:
        """float (..., 3, H, W) normalised input -> uint8 (..., H, W, 3) pixels (clipped)."""
        channels_last = np.moveaxis(np.asarray(inputs, np.float32), -3, -1)
        pixels = (channels_last * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)) * 255.0
        return np.clip(np.round(pixels), 0, 255).astype(np.uint8)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """The model input for one picture: float32 tensor (3, crop, crop)."""
        import torch

        return torch.from_numpy(self.normalise(self.crop_image(image)).copy())

    __call__ = to_tensor

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description, recorded in every cache."""
        description = asdict(self)
        description["mean"] = list(self.mean)
        description["std"] = list(self.std)
        description["interpolation"] = "bilinear"
        return description

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`describe`."""
        return cls(
            resize=int(description["resize"]),
            crop=int(description["crop"]),
            mean=tuple(float(v) for v in description["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in description["std"]),  # type: ignore[arg-type]
        )
