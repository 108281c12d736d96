"""Where the masked forward passes run: the device, the precision and the process's allocator.

None of these choices changes what is computed beyond rounding. The device is the one named,
or for ``"auto"`` CUDA, then Apple MPS, then the CPU. :data:`PRECISIONS` are the precisions the
engine computes in: ``"float32"``, the default, and ``"bfloat16"`` (autocast for the masked and
baseline passes), opt-in and recorded in the cache as its ``dtype`` attribute. Masked passes
feed channels-last inputs on CPU and CUDA (faster convolutions; float32 rounding only,
relative differences around 1e-6).

Allocator: with glibc's default malloc, the large activation buffers of a batched forward
pass are returned to the operating system after every batch and fetched back as page faults.
:func:`tune_allocator` raises glibc's mmap and trim thresholds in-process (``mallopt``), so
freed buffers are reused instead. It never changes a result.

torch is imported only inside the functions that need it, so that :data:`PRECISIONS` can be
read where torch is not loaded (the command line, the cache, a Dask client).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from scorecam_explorer.errors import ScorecamError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("float32", "bfloat16")
"""The precisions the engine computes in (the cache's ``dtype`` attribute); float32 is the default."""

# glibc mallopt parameters (malloc.h) and the values that keep freed buffers in the process.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
ALLOCATOR_SETTINGS: dict[str, tuple[int, int]] = {
    "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 2**30),
    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2**31 - 1),
    "M_TOP_PAD": (_M_TOP_PAD, 2**28),
}
_allocator_tuned = False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, then Apple MPS, then CPU; otherwise the device named."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ScorecamError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ScorecamError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ScorecamError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present.")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ScorecamError(f"device {device!r} requested but MPS is not available; use 'cpu' or 'auto'.")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ScorecamError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'mps'.")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a clear error."""
    if precision not in PRECISIONS:
        raise ScorecamError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    return precision


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc only): True if the settings are in effect.

    Sets M_MMAP_THRESHOLD = 2**30, M_TRIM_THRESHOLD = 2**31 - 1 and M_TOP_PAD = 2**28 via
    ``mallopt``. It is a process-wide setting, applied once; the process's resident memory
    then stays near its peak instead of shrinking between batches. Elsewhere (macOS,
    Windows, musl) it does nothing and returns False.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _allocator_tuned = all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS.values())
    return _allocator_tuned


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` has taken effect in this process."""
    return _allocator_tuned


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast for ``precision="bfloat16"``, nothing for float32."""
    if precision == "bfloat16":
        import torch


        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def uses_channels_last(device: torch.device) -> bool:
    """Whether masked passes feed channels-last inputs (faster convolutions on CPU and CUDA)."""
    return device.type in ("cpu", "cuda")
