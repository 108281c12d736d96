"""Colour maps for saliency maps, as 256-entry RGB lookup tables (numpy only).

* ``jet``: matplotlib's piecewise-linear definition (the usual CAM colouring), exact.
* ``viridis`` and ``turbo``: matplotlib's maps, rebuilt from every fifth of their 256
  entries by linear interpolation (within 1/255 of matplotlib).
* ``gray``: black to white.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from scorecam_explorer.errors import ScorecamError, did_you_mean

# (position, value) knots per channel, from matplotlib's ``_jet_data``.
_JET_KNOTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}

# 52 evenly spaced colours (entries 0, 5, ..., 255 of the 256-entry map), hex RGB.
_SAMPLED = {
    "viridis": (
        "44015446085c471063481769481d6f482475472a7a46307e453781433d844142873f48893d4e8a3a538b38598c355e8d"
        "33638d31688e2e6d8e2c718e2a768e297b8e27808e25848e23898e218e8d20928c1f978b1e9c891fa18821a58524aa83"
        "28ae802eb37c35b7793dbc7446c06f50c46a5ac86465cb5e70cf577cd25089d54895d840a2da37b0dd2fbddf26cae11f"
        "d8e219e5e419f1e51dfde725"
    ),
    "turbo": (
        "30123b36215f3b2f803f3e9c424bb54559cb4666dd4773eb4680f6458cfd4099ff38a5fb2fb2f427bee91fc9dd1ad4d0"
        "18ddc21ae4b622ebaa2ff19b3ff68a52fa7a65fd6979fe598bff4b9cfe40a9fb39b7f735c3f134d0ea34dbe236e5d938"
        "eecf3af5c53afaba39fdae35fea130fe932afc8423f9751df46617ef5811e84b0ce14109d83706ce2d04c32503b71d02"
        "a916019b0f018b09027a0403"
    ),
}

COLORMAPS: tuple[str, ...] = ("jet", "viridis", "turbo", "gray")
"""The colour map names :func:`colormap_table` knows."""

DEFAULT_COLORMAP = "jet"


@cache
def _table(name: str) -> np.ndarray:
    positions = np.linspace(0.0, 1.0, 256)
    if name == "jet":
        channels = []
        for channel in ("red", "green", "blue"):
            knots = np.array(_JET_KNOTS[channel])
            channels.append(np.interp(positions, knots[:, 0], knots[:, 1]))
        rgb = np.stack(channels, axis=1) * 255.0
    elif name in _SAMPLED:
        samples = np.frombuffer(bytes.fromhex(_SAMPLED[name]), dtype=np.uint8).reshape(-1, 3)
        knots = np.linspace(0.0, 1.0, len(samples))
        rgb = np.stack([np.interp(positions, knots, samples[:, c].astype(float)) for c in range(3)], axis=1)
    else:  # gray
        rgb = np.repeat(positions[:, None] * 255.0, 3, axis=1)
    table = np.round(rgb).astype(np.uint8)
    table.setflags(write=False)
    return table


def colormap_table(name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """The (256, 3) uint8 lookup table of colour map ``name`` (read-only)."""
    if name not in COLORMAPS:
        raise ScorecamError(
            f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}.{did_you_mean(name, COLORMAPS)}"
        )
    return _table(name)


def apply_colormap(values: np.ndarray, name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """Colours (..., 3) uint8 for ``values`` in [0, 1] (clipped; NaN is refused).

    Value v takes table entry round(255 * v).
    """
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        raise ScorecamError("cannot colour a map that holds NaN.")
    indices = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.intp)
    return colormap_table(name)[indices]
