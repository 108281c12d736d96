"""Where the masked forward passes run: the device, the precision and the process's allocator.

None of these choices changes what is computed beyond rounding. The device is the one named,
or for ``"auto"`` CUDA, then Apple MPS, then the CPU. :data:`PRECISIONS` are the precisions the
engine computes in: ``"float32"``, the default, and ``"bfloat16"`` (autocast for the masked and
baseline passes), opt-in and recorded in the cache as its ``dtype`` attribute. Masked passes
feed channels-last inputs on CPU and CUDA (faster convolutions; float32 rounding only,
relative differences around 1e-6).

bfloat16 is faster only where the hardware computes in it: an x86 CPU with AVX512-BF16 or AMX,
a CUDA GPU of compute capability 8.0 or newer (Ampere and later), MPS on macOS 14 or newer.
Elsewhere torch emulates it, many times slower than float32 (about 35x measured on an AVX2
CPU). :func:`bfloat16_support` says what a device has, and :func:`check_native_precision`,
which the engine calls before any forward pass, refuses ``"bfloat16"`` where it is not
native (a :class:`~scorecam_explorer.errors.ScorecamError` naming what was found). There is
no override: on such a machine a bfloat16 cache would be slower and less exact.

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
import functools
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BFloat16Support:
    """Whether a device computes in bfloat16 natively, and what was found on it."""

    device: str
    """The device's name (``"cpu"``, ``"cuda:0"``, ``"mps"``)."""
    native: bool
    """True where bfloat16 passes run on hardware made for them (faster than float32)."""
    hardware: str
    """The CPU's model name or the GPU's name (``"AMD EPYC 7B13"``, ``"NVIDIA A100-SXM4-40GB"``)."""
    found: str
    """What decided it, in words (``"CPU capability AVX2: no AVX512-BF16, no AMX"``)."""

    def describe(self) -> str:
        """``"HARDWARE (FOUND)"``: one phrase for a message or a benchmark's header."""
        return f"{self.hardware} ({self.found})"


_X86 = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capability() -> str:
    """torch's CPU capability (``"AVX2"``, ``"AVX512"``, ``"DEFAULT"``...; ``"unknown"`` if torch cannot say)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # an older torch
        return "unknown"


# oneDNN's ISA names that include bfloat16 arithmetic (ONEDNN_MAX_CPU_ISA caps the kernels it
# may use; "ALL" and "DEFAULT" leave them uncapped).
_ONEDNN_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL", "DEFAULT",
})


def _isa_cap() -> str | None:
    """Why the process may not use the CPU's bfloat16 instructions although it has them, or
    None: torch's kernels dispatched below AVX-512 (``ATEN_CPU_CAPABILITY``), or oneDNN's
    capped below AVX512-BF16 (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``). Either makes
    bfloat16 emulated: measured on an AVX512-BF16 CPU capped to AVX2, a ResNet-18 batch took
    762 ms per image in bfloat16 against 34 ms in float32."""
    capability = cpu_capability().upper()
    if capability != "UNKNOWN" and "AVX512" not in capability and "AMX" not in capability:
        return f"torch's kernels are capped at {capability} (ATEN_CPU_CAPABILITY)"
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(variable, "").strip().upper()
        if value and value not in _ONEDNN_BF16_ISAS:
            return f"oneDNN is capped at {value} ({variable})"
    return None


@functools.lru_cache(maxsize=1)
def _cpu_bfloat16_support() -> BFloat16Support:
    """The CPU probe, made once per process (the hardware does not change)."""
    import torch

    machine = platform.machine().lower()
    capability = f"CPU capability {cpu_capability()}"
    if machine in _X86:
        probes = {
            "AVX512-BF16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
            "AMX": getattr(torch.cpu, "_is_amx_tile_supported", None),
        }
        if any(probe is None for probe in probes.values()):
            found = f"{capability}: torch {torch.__version__} cannot tell whether AVX512-BF16 or AMX is present"
            return BFloat16Support("cpu", False, cpu_model_name(), found)
        present = {name: bool(probe()) for name, probe in probes.items()}
        found = f"{capability}: " + ", ".join(("" if has else "no ") + name for name, has in present.items())
        capped = _isa_cap()
        if any(present.values()) and capped:
            return BFloat16Support("cpu", False, cpu_model_name(), f"{found}, but {capped}")
        return BFloat16Support("cpu", any(present.values()), cpu_model_name(), found)
    found = (
        f"{machine or 'unknown'} CPU, {capability}: torch exposes no check of native bfloat16 on this "
        "architecture, so it is treated as not native"
    )
    return BFloat16Support("cpu", False, cpu_model_name(), found)


def bfloat16_support(device: str | torch.device = "auto") -> BFloat16Support:
    """Whether ``device`` computes in bfloat16 natively; no forward pass, no allocation.

    - x86 CPU: AVX512-BF16 or AMX (torch's ``torch.cpu._is_avx512_bf16_supported`` and
      ``_is_amx_tile_supported``). Other CPUs (arm64...): torch exposes no such check, so
      they count as not native. Probed once per process.
    - CUDA: compute capability 8.0 or newer (bfloat16 tensor cores; older cards emulate it);
      ROCm: what ``torch.cuda.is_bf16_supported`` says without emulation.
    - MPS: macOS 14 or newer (``torch.backends.mps.is_macos_or_newer``).

    The one place the decision is made: tests replace this function to run bfloat16
    anywhere or to see it refused.
    """
    import torch

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        name = torch.cuda.get_device_name(resolved)
        if getattr(torch.version, "hip", None):
            try:
                native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # an older torch
                native = bool(torch.cuda.is_bf16_supported())
            found = "ROCm: " + ("bfloat16 supported" if native else "no native bfloat16")
            return BFloat16Support(str(resolved), native, name, found)
        major, minor = torch.cuda.get_device_capability(resolved)
        native = (major, minor) >= (8, 0)
        found = f"compute capability {major}.{minor}: " + (
            "bfloat16 tensor cores" if native else "no native bfloat16 (it needs 8.0, Ampere or newer)"
        )
        return BFloat16Support(str(resolved), native, name, found)
    if resolved.type == "mps":
        check = getattr(torch.backends.mps, "is_macos_or_newer", None)
        native = bool(check is not None and check(14, 0))
        found = "MPS on macOS 14 or newer: bfloat16 supported" if native else "MPS before macOS 14: no bfloat16"
        return BFloat16Support("mps", native, "Apple GPU", found)
    return _cpu_bfloat16_support()


def check_native_precision(precision: str, device: str | torch.device = "auto") -> str:
    """``precision`` if ``device`` computes in it natively; for ``"bfloat16"`` where it does
    not (see :func:`bfloat16_support`), a ScorecamError that says what was found and that
    float32 is faster there. Made before any forward pass, it takes no measurable time."""
    precision = check_precision(precision)
    if precision != "bfloat16":
        return precision
    support = bfloat16_support(device)
    if not support.native:
        raise ScorecamError(
            f"precision 'bfloat16' refused on {support.device}: {support.describe()} has no native bfloat16, "
            "so bfloat16 passes would run many times slower than float32 (about 35x on an AVX2 CPU) and be "
            "less exact; use float32, which is faster here. bfloat16 needs an x86 CPU with "
            "AVX512-BF16 or AMX, or a GPU with bfloat16 (CUDA compute capability 8.0 or newer)."
        )
    return precision


def machine_description(device: str | torch.device = "auto") -> list[str]:
    """Lines naming the machine a timing comes from: the CPU's model and torch's capability,
    whether bfloat16 is native, and the GPU's name when ``device`` is one (benchmark headers)."""
    import torch

    resolved = resolve_device(device)
    cpu = _cpu_bfloat16_support()
    lines = [
        f"CPU: {cpu_model_name()}, torch CPU capability {cpu_capability()}, {usable_cpus()} usable core(s), "
        f"torch {torch.__version__}",
        f"native bfloat16 on the CPU: {'yes' if cpu.native else 'no'} ({cpu.found})",
    ]
    if resolved.type != "cpu":
        gpu = bfloat16_support(resolved)
        lines.append(f"GPU: {gpu.hardware} ({gpu.device}); native bfloat16: {'yes' if gpu.native else 'no'} ({gpu.found})")
    return lines


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
