"""Pictures and colour scales for Plotly figures (numpy, PIL and Plotly only).

Maps are drawn as pictures: a map is coloured through a 256-entry lookup table
(:mod:`scorecam_explorer.colormaps`) and sent to the browser as one PNG data URI. A
224 x 224 map is then one short string instead of 50 000 numbers in JSON, which keeps every
redraw cheap; the colour bar beside it is an empty scatter trace that only carries the scale.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import struct
import zlib
from collections import OrderedDict
from functools import lru_cache

from typing import Any

import numpy as np
import xarray as xr
from PIL import Image

from scorecam_explorer.colormaps import COLORMAPS, colormap_table
from scorecam_explorer.errors import ScorecamError

DIVERGING = "diverging"
"""Name of the blue-white-red colour map for signed values (differences, contributions)."""

# Blue (negative) - white (zero) - red (positive), the ColorBrewer RdBu end points.
_DIVERGING_KNOTS = np.array(
    [[5, 48, 97], [67, 147, 195], [247, 247, 247], [214, 96, 77], [103, 0, 31]], dtype=np.float64
)


@lru_cache(maxsize=None)
def _diverging_table() -> np.ndarray:
    positions = np.linspace(0.0, 1.0, 256)
    knots = np.linspace(0.0, 1.0, len(_DIVERGING_KNOTS))
    table = np.stack([np.interp(positions, knots, _DIVERGING_KNOTS[:, c]) for c in range(3)], axis=1)
    table = np.round(table).astype(np.uint8)
    table.setflags(write=False)
    return table


def lookup_table(name: str) -> np.ndarray:
    """The (256, 3) uint8 table of a colour map: one of ``COLORMAPS`` or ``"diverging"``."""
    return _diverging_table() if name == DIVERGING else colormap_table(name)


def colorize(values: np.ndarray, colormap: str, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Colours uint8 (..., 3) for ``values`` scaled so that ``low`` -> 0 and ``high`` -> 1.

    Entry round(255 v) of the table for the scaled value v clipped to [0, 1] (round half to
    even): for ``low=0, high=1`` exactly :func:`scorecam_explorer.colormaps.apply_colormap`.
    NaN and inf are refused (ScorecamError): a map is never drawn from undefined values.
    """
    table = lookup_table(colormap)
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ScorecamError("cannot draw a map that holds NaN or inf.")
    if high <= low:
        high = low + 1.0
    scaled = values - low if low != 0.0 else values.copy()
    if high - low != 1.0:
        scaled /= high - low
    scaled *= 255.0
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return table[np.rint(scaled, out=scaled).astype(np.uint8)]


_TYPED_ARRAY_CODES = {"float64": "f8", "float32": "f4", "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1"}


def typed_array(values: np.ndarray) -> dict[str, str]:
    """A plotly.js typed-array spec ``{"dtype", "bdata", "shape"}`` for a numeric array.

    A 2-D array (e.g. per-bar ``customdata`` rows) then travels as one base64 string
    instead of thousands of JSON numbers; plotly.js decodes it as rows.
    """
    values = np.ascontiguousarray(values)
    code = _TYPED_ARRAY_CODES.get(str(values.dtype))
    if code is None:
        values, code = values.astype(np.float64), "f8"
    return {
        "dtype": code,
        "bdata": base64.b64encode(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()).decode("ascii"),
        "shape": ", ".join(str(size) for size in values.shape),
    }


def decode_typed_array(spec: dict[str, str]) -> np.ndarray:
    """The array of a :func:`typed_array` spec."""
    dtype = {code: name for name, code in _TYPED_ARRAY_CODES.items()}[spec["dtype"]]
    shape = tuple(int(size) for size in str(spec["shape"]).split(","))
    return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def values_in(data: Any, dims: tuple[str, ...]) -> np.ndarray:
    """The values of a DataArray in the order ``dims`` (arrays pass through unchanged)."""
    if isinstance(data, xr.DataArray):
        return np.asarray(data.values if data.dims == dims else data.transpose(*dims).values)
    return np.asarray(data)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG file (8-bit RGB) for uint8 pixels (height, width, 3).

    Every row uses PNG's "Sub" filter (each byte minus the byte one pixel to its left, mod
    256) and zlib level 1: smooth colour maps then compress to a fifth of their size in about
    a millisecond, several times faster than a general-purpose encoder.
    """
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # filter type Sub
    filtered[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1))
        + _chunk(b"IEND", b"")
    )


# Recently encoded pictures by content digest: the photo and unchanged maps are encoded once.
_ENCODED: OrderedDict[bytes, str] = OrderedDict()
_ENCODED_LIMIT = 256


def image_uri(pixels: np.ndarray) -> str:
    """A PNG data URI (lossless) for uint8 pixels (height, width, 3).

    The last few dozen results are remembered by a digest of the pixels, so a picture that
    is drawn again (the photo under every map) costs a hash, not an encoding.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ScorecamError(f"expected uint8 RGB pixels (height, width, 3), got {pixels.dtype} {pixels.shape}.")
    digest = hashlib.blake2b(pixels.data, digest_size=16, person=str(pixels.shape).encode()[:16]).digest()
    cached = _ENCODED.get(digest)
    if cached is not None:
        _ENCODED.move_to_end(digest)
        return cached
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")
    _ENCODED[digest] = uri
    if len(_ENCODED) > _ENCODED_LIMIT:
        _ENCODED.popitem(last=False)
    return uri


def decode_image_uri(uri: str) -> np.ndarray:
    """The uint8 pixels (height, width, 3) of a PNG data URI made by :func:`image_uri`."""
    prefix = "data:image/png;base64,"
    if not uri.startswith(prefix):
        raise ScorecamError("not a PNG data URI.")
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))) as opened:
        return np.asarray(opened.convert("RGB"))


@lru_cache(maxsize=None)
def plotly_colorscale(name: str, stops: int = 11) -> tuple[tuple[float, str], ...]:
    """The colour map as a Plotly colour scale: ``stops`` evenly spaced entries of its table."""
    table = lookup_table(name)
    positions = np.linspace(0.0, 1.0, stops)
    return tuple(
        (float(p), "rgb({},{},{})".format(*table[int(round(p * 255))])) for p in positions
    )


def colorbar_trace(
    colormap: str,
    low: float,
    high: float,
    *,
    title: str,
    x: float = 1.02,
    y: float = 0.5,
    length: float = 0.9,
    xaxis: str = "x",
    yaxis: str = "y",
    tickformat: str | None = None,
    ticks: tuple[list[float], list[str]] | None = None,
    title_side: str = "right",
) -> dict[str, Any]:
    """An empty scatter trace (a plain dict) whose only visible part is a colour bar.

    ``ticks`` (values, labels) places the labels explicitly (e.g. :func:`symmetric_ticks`);
    ``title_side`` ``"top"`` puts the title above the bar, out of the way of the tick labels
    and of whatever lies to the bar's right.
    """
    colorbar: dict[str, Any] = {
        "title": {"text": title, "side": title_side},
        "x": x,
        "y": y,
        "len": length,
        "thickness": 12,
        "tickformat": tickformat,
        "outlinewidth": 0,
    }
    if ticks is not None:
        colorbar.update(tickmode="array", tickvals=list(ticks[0]), ticktext=list(ticks[1]))
    if title_side == "top":
        colorbar["ypad"] = 18  # room between the title and the top label, which overhangs the bar
    return {
        "type": "scatter",
        "x": [None],
        "y": [None],
        "mode": "markers",
        "xaxis": xaxis,
        "yaxis": yaxis,
        "showlegend": False,
        "hoverinfo": "skip",
        "marker": {
            "colorscale": plotly_colorscale(colormap),
            "cmin": float(low),
            "cmax": float(high),
            "color": [float(low)],
            "showscale": True,
            "colorbar": colorbar,
        },
    }


def symmetric_ticks(extent: float, per_side: int = 2) -> tuple[list[float], list[str]]:
    """Tick values and labels for a scale on [-extent, extent], all in one format.

    The step is the largest round number (1, 2, 2.5 or 5 times a power of ten) that gives at
    least ``per_side`` ticks on each side of zero; every label has the decimals the step needs
    ("−0.10", "−0.05", "0.00", "0.05", "0.10"), with a true minus sign as Plotly writes it.
    """
    extent = abs(float(extent))
    if not math.isfinite(extent) or extent == 0.0:
        return [0.0], ["0"]
    raw = extent / per_side
    power = 10.0 ** math.floor(math.log10(raw))
    step = max(m * power for m in (1.0, 2.0, 2.5, 5.0) if m * power <= raw * (1 + 1e-9))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if step / power == 2.5 else 0))
    count = int(math.floor(extent / step + 1e-9))
    values = [round(i * step, decimals + 2) for i in range(-count, count + 1)]
    labels = [f"{value:.{decimals}f}".replace("-", "−") for value in values]
    return values, [label if value != 0 else f"{0:.{decimals}f}" for value, label in zip(values, labels)]


def picture_trace(
    pixels: np.ndarray, name: str, *, opacity: float = 1.0, axis: int = 1, smooth: bool = True
) -> dict[str, Any]:
    """An image trace (a plain dict) showing uint8 ``pixels`` through a PNG data URI.

    The browser scales the picture to the axes: smoothly for photos and maps at input
    resolution (``smooth``), as sharp squares for feature maps (``smooth=False``), which are
    therefore sent at their own, small, size.
    """
    suffix = "" if axis == 1 else str(axis)
    return {
        "type": "image",
        "source": image_uri(pixels),
        "name": name,
        "opacity": float(opacity),
        "zsmooth": "fast" if smooth else False,
        "hoverinfo": "skip",
        "xaxis": f"x{suffix}",
        "yaxis": f"y{suffix}",
    }


__all__ = [
    "COLORMAPS",
    "DIVERGING",
    "colorbar_trace",
    "colorize",
    "decode_image_uri",
    "decode_typed_array",
    "image_uri",
    "lookup_table",
    "picture_trace",
    "plotly_colorscale",
    "symmetric_ticks",
    "typed_array",
]
