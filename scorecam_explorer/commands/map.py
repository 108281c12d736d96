"""``scorecam-explorer map``: a Score-CAM map from a saved cache, as a PNG or a .npy file.

No model and no forward pass: the map is recomposed from the cache (torch is not needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from scorecam_explorer.colormaps import COLORMAPS, DEFAULT_COLORMAP
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.presets import PRESETS

OUTPUT_SUFFIXES = (".png", ".npy")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "map",
        help="write a Score-CAM map from a saved cache (PNG over the photo, or .npy)",
        description=(
            "Recompose a Score-CAM map from a cache (no model, no forward pass). "
            "A .png output shows the map over the photo with a colour scale; "
            "a .npy output holds the float32 map (image, y, x), or (y, x) with --image."
        ),
    )
    parser.add_argument("cache", help="a cache folder written by save_cache (e.g. CACHE.zarr)")
    parser.add_argument("--layer", help="a cached layer (default: the deepest cached layer)")
    parser.add_argument(
        "--target",
        help="class index or class name, case-insensitive (default: each image's top-1 class)",
    )
    parser.add_argument("--preset", default="paper", help=f"weighting preset: {', '.join(PRESETS)} (default: paper)")
    parser.add_argument(
        "--top-k", type=int, metavar="K", help="keep only the K channels of largest weight (1 to the layer's channels)"
    )
    parser.add_argument(
        "--image", help="image id or index in the cache (needed for a PNG when the cache holds several)"
    )
    parser.add_argument(
        "--resolution",
        default="input",
        choices=("input", "feature"),
        help="the map at input resolution (default) or at the layer's feature resolution",
    )
    parser.add_argument(
        "--colormap",
        default=DEFAULT_COLORMAP,
        help=f"PNG colours: {', '.join(COLORMAPS)} (default: {DEFAULT_COLORMAP})",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="PNG: weight of the map over the photo (default 0.5)")
    parser.add_argument("--out", required=True, help="output file, FILE.png or FILE.npy")
    parser.set_defaults(func=run)


def _target(text: str | None) -> int | str | None:
    """A class index when ``text`` is all digits, else a class name."""
    if text is None:
        return None
    stripped = text.strip()
    return int(stripped) if stripped.isdigit() else stripped


def _image(text: str | None, image_ids: list[str]) -> int | str | None:
    """An image id when ``text`` names one, else an index when it is all digits."""
    if text is None or text in image_ids:
        return text
    return int(text) if text.strip().isdigit() else text


def picture_of(cache, image: int | str):
    """The uint8 (y, x, rgb) picture of one image: the root variable with those dims."""
    root = cache.dataset
    for variable in root.data_vars.values():
        if variable.dims == ("image", "y", "x", "rgb"):
            selected = variable.isel(image=image) if isinstance(image, int) else variable.sel(image=image)
            return np.asarray(selected.values, dtype=np.uint8)
    raise ScorecamError("this cache holds no picture (a variable with dims image, y, x, rgb) to draw on; write .npy.")


def run(args: argparse.Namespace) -> int:
    from scorecam_explorer.cache import load_cache
    from scorecam_explorer.compose import cached_layers, check_top_k, scorecam
    from scorecam_explorer.overlay import save_overlay, write_atomically
    from scorecam_explorer.presets import get_preset

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ScorecamError(f"--out must end in .png or .npy, not {out.name!r}.")
    if not out.parent.is_dir():
        raise ScorecamError(f"cannot write {out}: the folder {out.parent} does not exist.")
    preset = get_preset(args.preset)  # an unknown name fails before the cache is read
    if args.colormap not in COLORMAPS:
        raise ScorecamError(f"unknown colour map {args.colormap!r}; choose one of {', '.join(COLORMAPS)}.")

    cache = load_cache(args.cache)
    layer = args.layer or cached_layers(cache)[-1]
    if args.top_k is not None and layer in cached_layers(cache):  # an unknown layer is refused by scorecam
        check_top_k(args.top_k, cache[layer].sizes["channel"], layer, "--top-k")
    image_ids = [str(i) for i in cache["image"].values]
    image = _image(args.image, image_ids)
    if suffix == ".png" and image is None:
        if len(image_ids) > 1:
            raise ScorecamError(
                f"the cache holds {len(image_ids)} images ({', '.join(image_ids)}); pick one with --image "
                "(or write .npy for all)."
            )
        image = 0
    saliency = scorecam(
        cache,
        layer,
        _target(args.target),
        preset=preset,
        image=image,
        top_k=args.top_k,
        resolution=args.resolution,
    )
    targets = np.atleast_1d(saliency["target"].values)
    names = np.atleast_1d(saliency["target_name"].values)
    described = ", ".join(sorted({f"{name} ({index})" for index, name in zip(targets, names, strict=True)}))
    if suffix == ".png":
        title = f"{described} | {layer} | {preset.name}" + (f" | top {args.top_k}" if args.top_k else "")
        save_overlay(
            out,
            picture_of(cache, image),
            saliency.values,
            colormap=args.colormap,
            alpha=args.alpha,
            title=title,
        )
    else:
        values = np.ascontiguousarray(saliency.values, dtype=np.float32)
        write_atomically(out, lambda file: np.save(file, values))
    print(f"wrote {out}: layer {layer}, class {described}, preset {preset.name}")
    return 0
