"""Energy-based pointing game (Wang et al., Score-CAM, CVPR-W 2020, Sec. 5.2, Table 2).

For a saliency map L >= 0 and the object's bounding box B (in input pixels), the score is
the share of the map's energy inside the box:

    Proportion = sum_{(x, y) in B} L(x, y) / sum_{(x, y)} L(x, y)          (higher is better)

A box is ``[x0, y0, x1, y1]`` in the coordinates of the model input (after resize and crop);
pixel (x, y) covers [x, x + 1) x [y, y + 1) and counts as inside when its centre
(x + 0.5, y + 0.5) lies in the box, so integer boxes behave like slices
``L[y0:y1, x0:x1]``. Several boxes of one image (several objects of the class) count as their
union. No forward pass is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import xarray as xr

from scorecam_explorer.errors import BoxError, NonFiniteError, ScorecamError
from scorecam_explorer.metrics._common import protocol_attrs

Box = Sequence[float]
BoxesLike = Union[Mapping[str, Union[Box, Sequence[Box]]], Sequence[Union[Box, Sequence[Box]]]]


def box_mask(box: Box, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of the pixels whose centres lie in ``box`` = [x0, y0, x1, y1].

    Raises BoxError for a box that is not four finite numbers, is empty, or reaches outside
    the image (0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height).
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise BoxError(f"a box must be four numbers [x0, y0, x1, y1], got {box!r}") from None
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise BoxError(f"box {list(box)} holds NaN or inf")
    if not (x0 < x1 and y0 < y1):
        raise BoxError(f"box {list(box)} is empty: it needs x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise BoxError(
            f"box {list(box)} lies outside the {width}x{height} input: boxes are [x0, y0, x1, y1] in "
            f"input pixels (after resize and centre crop), within 0..{width} and 0..{height}"
        )
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    mask = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    if not mask.any():
        raise BoxError(f"box {list(box)} contains no pixel centre of the {width}x{height} input")
    return mask


def as_box_list(boxes: Any) -> list[Box]:
    """One box or a list of boxes -> list of boxes."""
    items = list(boxes)
    if items and all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
        return [items]
    if not items:
        raise BoxError("an image was given an empty list of boxes")
    return items


def energy_pointing_game(maps: xr.DataArray | np.ndarray, boxes: BoxesLike) -> xr.DataArray:
    """Share of each map's energy inside its box(es), along ``image`` (see the module doc).

    ``maps``: (image, y, x) DataArray or an (N, H, W) / (H, W) array, values >= 0.
    ``boxes``: a mapping image id (compared as a string) -> box or list of boxes (images
    without a box are left out), or a sequence with one box (or list of boxes) per image.

    Returns a DataArray of proportions in [0, 1] along ``image`` (the images that have a box),
    with attributes ``mean`` and ``protocol``. An all-zero map has no energy: its proportion
    is NaN, listed in the attribute ``zero_maps`` and left out of ``mean``.
    """
    if isinstance(maps, xr.DataArray):
        values = np.asarray(maps.transpose("image", "y", "x").values, dtype=np.float64)
        image_ids = [str(v) for v in maps.coords["image"].values] if "image" in maps.coords else None
    else:
        values = np.asarray(maps, dtype=np.float64)
        if values.ndim == 2:
            values = values[None]
        image_ids = None
    if values.ndim != 3:
        raise ScorecamError(f"maps must have dims (image, y, x); got shape {values.shape}")
    if not np.isfinite(values).all():
        raise NonFiniteError("the saliency maps hold NaN or inf values")
    if (values < 0).any():
        raise ScorecamError("the energy pointing game needs non-negative maps (energy); got negative values")
    image_ids = image_ids or [f"image-{i}" for i in range(values.shape[0])]
    if isinstance(boxes, Mapping):
        by_id = {str(key): value for key, value in boxes.items()}  # image ids are strings
        if len(by_id) != len(boxes):
            raise BoxError(f"boxes given twice for one image: keys {', '.join(map(repr, boxes))} name the same ids")
        unknown = [key for key in by_id if key not in image_ids]
        if unknown:
            raise BoxError(f"boxes given for unknown images: {', '.join(unknown)} (images: {', '.join(image_ids)})")
        chosen = [(index, by_id[name]) for index, name in enumerate(image_ids) if name in by_id]
    else:
        box_list = list(boxes)
        if len(box_list) != values.shape[0]:
            raise BoxError(f"{len(box_list)} boxes for {values.shape[0]} images: give one (or a list) per image")
        chosen = list(enumerate(box_list))
    if not chosen:
        raise BoxError("no image has a bounding box")
    height, width = values.shape[1:]
    proportions, zero_maps = [], []
    for index, image_boxes in chosen:
        inside = np.zeros((height, width), dtype=bool)
        for box in as_box_list(image_boxes):
            inside |= box_mask(box, height, width)
        total = values[index].sum()
        if total > 0:
            proportions.append(float(values[index][inside].sum() / total))
        else:
            proportions.append(float("nan"))
            zero_maps.append(image_ids[index])
    result = np.asarray(proportions)
    defined = result[np.isfinite(result)]
    protocol = {
        "metric": "energy_pointing_game",
        "source": "Wang et al. 2020 (Score-CAM) Sec. 5.2, Table 2",
        "boxes": "[x0, y0, x1, y1] in input pixels; pixel inside when its centre is; union of an image's boxes",
    }
    return xr.DataArray(
        result,
        dims=("image",),
        coords={"image": [image_ids[i] for i, _ in chosen]},
        name="energy_proportion",
        attrs={
            "mean": float(defined.mean()) if defined.size else float("nan"),
            "zero_maps": ", ".join(zero_maps),
            "forward_passes": 0,
            **protocol_attrs(protocol),
        },
    )
