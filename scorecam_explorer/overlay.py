"""A saliency map over its photo, as an image with a colour scale (PIL and numpy only).

The blend is per pixel ``(1 - alpha) * photo + alpha * colour(map)``; the colour scale on
the right shows what 0 and 1 mean. Files are written atomically: to a hidden temporary file
in the same folder, then renamed into place, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scorecam_explorer.colormaps import DEFAULT_COLORMAP, apply_colormap
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.files import write_atomically
from scorecam_explorer.resize import resize_bilinear


def _photo_array(photo: np.ndarray | Image.Image) -> np.ndarray:
    array = np.asarray(photo.convert("RGB") if isinstance(photo, Image.Image) else photo)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ScorecamError(f"the photo must be an RGB image (height, width, 3), got shape {array.shape}.")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return array


def _saliency_array(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    values = np.asarray(saliency, dtype=np.float64)
    if values.ndim != 2:
        raise ScorecamError(f"a saliency map is 2-D (height, width); got shape {values.shape}: select one image.")
    if not np.isfinite(values).all():
        raise ScorecamError("the saliency map holds NaN or inf; nothing to draw.")
    if values.shape != size:
        values = resize_bilinear(values, size, align_corners=False)
    return values


def blend(
    photo: np.ndarray | Image.Image,
    saliency: np.ndarray,
    *,
    colormap: str = DEFAULT_COLORMAP,
    alpha: float = 0.5,
) -> np.ndarray:
    """(1 - alpha) * photo + alpha * colormap(saliency): uint8 (height, width, 3).

    ``saliency`` holds values in [0, 1] (e.g. a :func:`~scorecam_explorer.compose.scorecam`
    map for one image); a map of another size is resized bilinearly to the photo's.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ScorecamError(f"alpha must lie in [0, 1], not {alpha}.")
    pixels = _photo_array(photo)
    values = _saliency_array(saliency, pixels.shape[:2])
    colours = apply_colormap(values, colormap).astype(np.float64)
    mixed = (1.0 - alpha) * pixels.astype(np.float64) + alpha * colours
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def overlay_image(
    photo: np.ndarray | Image.Image,
    saliency: np.ndarray,
    *,
    colormap: str = DEFAULT_COLORMAP,
    alpha: float = 0.5,
    title: str | None = None,
    min_height: int = 256,
) -> Image.Image:
    """The blended map with a colour scale (0 at the bottom, 1 at the top) and a title line.

    Pictures smaller than ``min_height`` are enlarged by an integer factor (nearest
    neighbour, so pixels stay visible as pixels).
    """
    picture = Image.fromarray(blend(photo, saliency, colormap=colormap, alpha=alpha))
    factor = max(1, -(-min_height // picture.height))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    font = ImageFont.load_default()
    margin, bar_width, label_width = 8, 16, 32
    title_height = 20 if title else 0
    canvas = Image.new(
        "RGB",
        (picture.width + 3 * margin + bar_width + label_width, picture.height + 2 * margin + title_height),
        "white",
    )
    canvas.paste(picture, (margin, margin + title_height))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin, margin), title, fill="black", font=font)
    # The colour scale: value 1 at the top row, 0 at the bottom row.
    bar_top, bar_left = margin + title_height, picture.width + 2 * margin
    levels = np.linspace(1.0, 0.0, picture.height)[:, None].repeat(bar_width, axis=1)
    canvas.paste(Image.fromarray(apply_colormap(levels, colormap)), (bar_left, bar_top))
    draw.rectangle((bar_left - 1, bar_top - 1, bar_left + bar_width, bar_top + picture.height), outline="black")
    for value in (1.0, 0.5, 0.0):
        row = bar_top + round((1.0 - value) * (picture.height - 1))
        draw.line((bar_left + bar_width, row, bar_left + bar_width + 3, row), fill="black")
        draw.text((bar_left + bar_width + 5, row - 5), f"{value:g}", fill="black", font=font)
    return canvas


def save_overlay(
    path: str | os.PathLike[str],
    photo: np.ndarray | Image.Image,
    saliency: np.ndarray,
    **options,
) -> Path:
    """Write :func:`overlay_image` as a PNG at ``path`` atomically; returns the path.

    ``options`` are those of :func:`overlay_image` (colormap, alpha, title, min_height).
    """
    picture = overlay_image(photo, saliency, **options)
    return write_atomically(path, lambda file: picture.save(file, format="PNG"))
