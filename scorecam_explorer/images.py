"""Loading pictures: files, arrays, PIL images and the bundled sample photographs.

Every loader returns an RGB PIL image: greyscale, palette and RGBA pictures are converted
(transparent areas are composited onto white), so any JPEG or PNG of any size works.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from scorecam_explorer.errors import ImageLoadError, did_you_mean

SAMPLE_PREFIX = "sample:"
_SAMPLE_SUFFIX = ".jpg"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

ImageSource = Union[str, Path, Image.Image, np.ndarray]


def sample_names() -> list[str]:
    """Names of the bundled sample photographs (see ``samples/ATTRIBUTION.md``)."""
    folder = resources.files("scorecam_explorer") / "samples"
    return sorted(p.name[: -len(_SAMPLE_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_SAMPLE_SUFFIX))


def sample_path(name: str) -> Path:
    """File of the bundled sample photograph ``name`` (e.g. ``"chelsea"``)."""
    names = sample_names()
    if name not in names:
        raise ImageLoadError(
            f"no sample photo named {name!r}; the samples are: {', '.join(names)}.{did_you_mean(name, names)}"
        )
    return Path(str(resources.files("scorecam_explorer") / "samples" / f"{name}{_SAMPLE_SUFFIX}"))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        span = array.max() - array.min()
        scaled = (array - array.min()) / span * 255 if span > 0 else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def array_to_image(array: np.ndarray) -> Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as an RGB PIL image.

    uint8 arrays are taken as they are; float arrays must hold values in [0, 1].
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(
            f"an image array must have shape (H, W), (H, W, 3) or (H, W, 4); got {array.shape}"
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageLoadError(f"an image array must be uint8 or float in [0, 1]; got dtype {array.dtype}")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageLoadError("a float image array must hold finite values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    return to_rgb(Image.fromarray(array))


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path, ``"sample:NAME"``, a PIL image or an array."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    if isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        source = sample_path(source[len(SAMPLE_PREFIX) :])
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageLoadError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"not a readable image: {path} ({error})") from None


def image_id(source: ImageSource, index: int = 0) -> str:
    """A short name for a picture: ``sample:NAME``, the file name, or ``image-INDEX``."""
    if isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        return source
    if isinstance(source, (str, Path)):
        return Path(source).name
    return f"image-{index}"


def find_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder`` (by suffix), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageLoadError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
