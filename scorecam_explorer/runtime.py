"""Where and how the masked forward passes run: device, allocator, precision, batch plan,
and a BatchNorm-folded copy of the model.

None of these choices changes what is computed. The allocator setting never changes a bit;
batch size, thread count, the channels-last layout and BatchNorm folding change float32
rounding only (relative differences around 1e-6); ``precision="bfloat16"`` is opt-in and
recorded in the cache.

Allocator: with glibc's default malloc, the large activation buffers of a batched forward
pass are returned to the operating system after every batch and fetched back as page faults.
:func:`tune_allocator` raises glibc's mmap and trim thresholds in-process (``mallopt``), so
freed buffers are reused instead. It never changes a result.

Batch size and threads: on a CPU a bigger batch is not always faster (EfficientNet-Lite0's
depthwise convolutions were slower at 64 than at 16 on a 2-core machine), and on a busy
machine one thread can beat several. So :class:`Planner` measures: the first masked batches
of a run use each candidate plan in turn (they are real work, not thrown away), then the
fastest per-image plan is used for the rest and remembered for the process, keyed by model,
layer, input shape, device and precision. The candidates read torch's thread count before
a remembered one is applied, so one thread winning once does not make it the only choice.

Faster copies: :func:`folded_batchnorm` and :func:`fused_copy` build them once and remember
them for the model (weak references: they go with it, or with :func:`release_copies`), but
never vouch for them: the engine checks the copy it uses against the model on every call.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import hashlib
import os
import platform
import statistics
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import fx, nn

from scorecam_explorer.errors import ScorecamError

if TYPE_CHECKING:
    from scorecam_explorer.models import LoadedModel

PRECISIONS = ("float32", "bfloat16")

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
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def uses_channels_last(device: torch.device) -> bool:
    """Whether masked passes feed channels-last inputs (faster convolutions on CPU and CUDA)."""
    return device.type in ("cpu", "cuda")


class Plan(NamedTuple):
    """How masked batches run: images per forward pass and CPU threads (None: as set)."""

    batch_size: int
    threads: int | None = None


def candidate_plans(device: torch.device, batch_size: int | None = None, *, adapt_threads: bool = True) -> list[Plan]:
    """Plans to try, the most likely best first.

    On a CPU: batch sizes 16, 32, 8 (or the user's), each with torch's thread count and,
    when ``adapt_threads``, with one thread: on a busy machine, OpenMP threads that wait for
    a core made Lite0 forwards several times slower than a single thread. With
    ``adapt_threads=False`` torch's thread count is left as it is.
    """
    if batch_size is not None and int(batch_size) < 1:
        raise ScorecamError(f"batch size must be a positive integer, not {batch_size}.")
    if device.type == "cpu":
        sizes = [int(batch_size)] if batch_size is not None else [16, 32, 8]
        if not adapt_threads:
            return [Plan(size) for size in sizes]
        threads = torch.get_num_threads()
        return [Plan(size, count) for count in ([threads, 1] if threads > 1 else [1]) for size in sizes]
    sizes = [int(batch_size)] if batch_size is not None else ([64, 128, 32, 256] if device.type == "cuda" else [32, 64, 16])
    return [Plan(size) for size in sizes]


_CHOSEN_PLANS: dict[tuple, Plan] = {}
_PLAN_TIMES: dict[tuple, dict[Plan, list[float]]] = {}
_CHOSEN_THREADS: dict[tuple, int] = {}


@dataclass
class Planner:
    """Chooses the plan of masked passes by timing real batches (see the module doc).

    With one candidate there is nothing to measure. Otherwise, first the thread count is
    chosen at the first candidate's batch size, then the batch size at that thread count;
    each plan is timed on ``samples`` real batches (the median time per image counts; with
    fewer batches the fastest, as a first batch of a new shape pays one-off costs), and a
    plan already more than ``prune`` times slower than the best so far is not timed again. The winner is remembered for
    the process under ``key`` (and its thread count under ``threads_key``, see
    :func:`remembered_threads`). The chosen plan keeps being watched: when its last three
    batches are ``prune`` times slower than another plan measured before (the machine got
    busier, say), that plan takes over.
    """

    key: tuple
    candidates: Sequence[Plan]
    threads_key: tuple | None = None
    samples: int = 3
    prune: float = 1.5
    _times: dict[Plan, list[float]] = field(default_factory=dict)
    _queue: list[Plan] = field(default_factory=list)
    _recent: list[float] = field(default_factory=list)
    _stage: str = "threads"

    def __post_init__(self) -> None:
        self.candidates = list(self.candidates)
        if not self.candidates:
            raise ScorecamError("no batch plan to choose from.")
        if len(self.candidates) == 1:
            _CHOSEN_PLANS[self.key] = self.candidates[0]
        elif self.key in _CHOSEN_PLANS:
            self._times = _PLAN_TIMES.setdefault(self.key, {})
        else:
            self._queue = self._stage_plans()

    @property
    def chosen(self) -> Plan | None:
        """The plan in use once measuring is over (None while still measuring)."""
        return _CHOSEN_PLANS.get(self.key)

    def next_plan(self) -> Plan:
        """The plan of the next batch."""
        if self.chosen is not None:
            return self.chosen
        while not self._queue:
            self._advance()
            if self.chosen is not None:
                return self.chosen
        return self._queue[0]

    def record(self, plan: Plan, seconds: float, images: int) -> None:
        """Report how long a batch of ``images`` masked inputs run with ``plan`` took."""
        if images != plan.batch_size:  # a short last batch says little about its size
            if self._queue and self._queue[0] == plan:
                self._queue.pop(0)
            return
        per_image = seconds / images
        if self.chosen is not None:
            self._watch(plan, per_image)
            return
        if not self._queue or self._queue[0] != plan:
            return
        self._queue.pop(0)
        self._times.setdefault(plan, []).append(per_image)
        best = min(_typical(values) for values in self._times.values())
        # a plan already much slower than the best is not timed again
        self._queue = [
            queued for queued in self._queue if queued not in self._times or _typical(self._times[queued]) <= self.prune * best
        ]

    def _watch(self, plan: Plan, per_image: float) -> None:
        """Switch to another measured plan when the chosen one has become much slower."""
        if plan != self.chosen:
            return
        self._recent = [*self._recent[-2:], per_image]
        others = {other: _typical(times) for other, times in self._times.items() if other != plan and times}
        if len(self._recent) < 3 or not others:
            return
        recent = sorted(self._recent)[1]
        fallback = min(others, key=others.__getitem__)
        if recent > self.prune * others[fallback]:
            self._times[plan] = [recent]  # what it costs now, not what it cost before
            self._choose(fallback)
            self._recent = []

    def _choose(self, plan: Plan) -> None:
        _CHOSEN_PLANS[self.key] = plan
        _PLAN_TIMES[self.key] = self._times
        if self.threads_key is not None and plan.threads is not None:
            _CHOSEN_THREADS[self.threads_key] = plan.threads

    def _stage_plans(self) -> list[Plan]:
        if self._stage == "threads":
            size = self.candidates[0].batch_size
            plans = [plan for plan in self.candidates if plan.batch_size == size]
        else:
            threads = self._best().threads
            plans = [plan for plan in self.candidates if plan.threads == threads and plan not in self._times]
        return [plan for _ in range(self.samples) for plan in plans]

    def _best(self) -> Plan:
        return min(self._times, key=lambda plan: _typical(self._times[plan]))

    def _advance(self) -> None:
        """Start the next stage, or choose when the last one is done."""
        if not self._times:  # nothing measurable yet (short batches): measure again
            self._stage = "threads"
            self._queue = self._stage_plans()
            return
        if self._stage == "threads":
            self._stage = "sizes"
            self._queue = self._stage_plans()
            if self._queue:
                return
        self._choose(self._best())

    def shrink_after_out_of_memory(self, plan: Plan) -> Plan:
        """Halve the batch size after the device ran out of memory; returns the new plan."""
        if plan.batch_size == 1:
            raise ScorecamError("the device ran out of memory even at batch size 1; use a smaller model or the CPU.")
        smaller = plan._replace(batch_size=max(1, plan.batch_size // 2))
        _CHOSEN_PLANS[self.key] = smaller
        self._queue = []
        return smaller


def _typical(per_image: list[float]) -> float:
    """A plan's typical seconds per image: the median of three or more batches, else the
    fastest (a plan's first batch of a new shape pays one-off costs)."""
    return statistics.median(per_image) if len(per_image) >= 3 else min(per_image)


def remembered_threads(threads_key: tuple) -> int | None:
    """The thread count a previous :class:`Planner` chose for this model, device and precision."""
    return _CHOSEN_THREADS.get(threads_key)


def forget_plans() -> None:
    """Drop the remembered plans (e.g. after the machine's load changed)."""
    _CHOSEN_PLANS.clear()
    _PLAN_TIMES.clear()
    _CHOSEN_THREADS.clear()


@contextmanager
def threads_restored() -> Iterator[None]:
    """Restore torch's CPU thread count on exit (plans may change it)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def apply_plan(plan: Plan) -> None:
    """Set the thread count a plan asks for."""
    if plan.threads is not None and torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)


def structure_digest(module: nn.Module) -> str:
    """blake2b (hex) of ``repr(module)``: its submodules, their types and settings (kernel
    sizes, BatchNorm eps, activations). With the weights fingerprint it decides when a
    remembered faster copy is worth reusing: swapping a module or changing such a setting
    leaves the weights alone but builds a new copy. What ``repr`` does not show (a flag the
    forward reads, such as torchvision Inception3's ``transform_input``, or a replaced
    ``forward``) is caught by the check that every call makes (see :func:`folded_batchnorm`).
    """
    return hashlib.blake2b(repr(module).encode(), digest_size=16).hexdigest()


def copy_key(module: nn.Module, fingerprint: str, device: torch.device | str) -> tuple[str, str, str]:
    """The key under which :func:`folded_batchnorm` remembers ``module``'s faster copy:
    (weights fingerprint, :func:`structure_digest`, device)."""
    return (fingerprint, structure_digest(module), str(device))


def has_hooks(module: nn.Module) -> bool:
    """Whether any submodule carries forward hooks or pre-hooks (someone observes the model)."""
    return any(sub._forward_hooks or sub._forward_pre_hooks for sub in module.modules())


# model -> (key, its folded copy or None for "none under this key"); weak keys: an entry, and
# with it the copy, goes when the model goes (see release_copies).
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module | None]] = weakref.WeakKeyDictionary()


def folded_batchnorm(
    module: nn.Module, key: tuple, *, channels_last: bool = False, rebuild: bool = False
) -> nn.Module | None:
    """A copy of ``module`` with every BatchNorm2d folded into the convolution before it.

    In eval mode BN(conv(x)) = conv'(x) with W' = W * g / sqrt(v + eps) and
    b' = (b - m) * g / sqrt(v + eps) + beta, so the copy computes the same function with
    one pass over each activation less. Likewise a "same padding" convolution that pads in
    a separate module (the EfficientNet ports) becomes one ``nn.Conv2d`` (see
    :func:`_as_plain_conv`), and a ReLU / ReLU6 right after a convolution runs in place.
    Only modules of exactly these types are rewritten (a subclass may have its own forward:
    a weight-standardised convolution, a BatchNorm with an activation inside), and never a
    convolution called at several places. Float32 results differ by rounding only
    (relative 1e-6).

    The copy is traced once and remembered for the model under ``key``
    (:func:`copy_key`: weights fingerprint, structure, device); ``rebuild`` traces a new
    one from the model as it is now. A remembered copy is not trusted: it computes the
    function the model had when it was traced, and a flag that its forward reads may
    have changed since, unseen by the key. Callers check the copy against the model's own
    output on every call, and rebuild it when they differ (see
    :func:`scorecam_explorer.engine.compute_cache`).

    Returns None when the model has no BatchNorm2d after a convolution, cannot be traced by
    ``torch.fx``, or its copy was rejected for this key (:func:`reject_folded`).
    ``channels_last`` stores the copy's convolution weights channels-last, as the inputs
    will be (otherwise every convolution reorders its weights on every call; same values).
    """
    remembered = _FOLDED.get(module)
    if remembered is not None and remembered[0] == key and not rebuild:
        return remembered[1]
    _drop_folded(module)  # the old copy goes before a new one is built (peak memory)
    folded = None
    if any(type(sub) is nn.BatchNorm2d for sub in module.modules()):
        try:
            folded = _fold(module)
        except Exception:  # noqa: BLE001 - any model fx cannot trace simply runs unfolded
            folded = None
    if folded is not None and channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    _FOLDED[module] = (key, folded)
    return folded


def remembers_copy(module: nn.Module, key: tuple) -> bool:
    """Whether a copy (or that there is none) is remembered for ``module`` under ``key``,
    i.e. whether :func:`folded_batchnorm` would return it without building anything."""
    remembered = _FOLDED.get(module)
    return remembered is not None and remembered[0] == key


def reject_folded(module: nn.Module, key: tuple) -> None:
    """Remember that ``module``'s copy, freshly built, did not reproduce it: no copy for
    this key (new weights or a new structure build one again)."""
    _drop_folded(module)
    _FOLDED[module] = (key, None)


_FUSED: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = weakref.WeakKeyDictionary()


def fused_copy(folded: nn.Module) -> nn.Module | None:
    """The folded copy with its convolutions fused with the ReLU / ReLU6 / residual addition
    after them (:func:`scorecam_explorer.fusion.fuse_pointwise`; CPU float32 only), made
    once per folded copy; None when nothing fuses, the operators are missing, or the fused
    copy was rejected (:func:`reject_fused`). Checked by callers as the folded copy is."""
    if folded in _FUSED:
        return _FUSED[folded]
    from scorecam_explorer.fusion import fuse_pointwise

    fused = None
    if isinstance(folded, fx.GraphModule):
        try:
            fused = fuse_pointwise(folded)
        except Exception:  # noqa: BLE001 - a graph the rewrite does not understand simply runs unfused
            fused = None
    _FUSED[folded] = fused
    return fused


def reject_fused(folded: nn.Module) -> None:
    """Remember that the fused copy of ``folded`` did not reproduce the model while
    ``folded`` did: never use it (a new folded copy gets a new fused one)."""
    _FUSED[folded] = None


def _drop_folded(module: nn.Module) -> bool:
    """Forget ``module``'s remembered copies (folded and fused); whether there were any."""
    remembered = _FOLDED.pop(module, None)
    if remembered is None:
        return False
    if remembered[1] is not None:
        _FUSED.pop(remembered[1], None)
    return remembered[1] is not None


def release_copies(model: nn.Module | LoadedModel | None = None) -> int:
    """Release the faster copies (BatchNorm-folded, fused) remembered for ``model``, a
    ``torch.nn.Module`` or a :class:`~scorecam_explorer.models.LoadedModel`, or for every
    model when None; returns how many folded copies were released.

    A copy holds its own weights, on the device it was computed on (a GPU too), for as
    long as its model lives: it goes with the model (weak references), or here, on
    request. The next ``compute_cache`` of the model builds a new one. ``torch.fx`` graph
    modules sit in a reference cycle, so a garbage collection runs when anything was
    released, to free the memory now.
    """
    from scorecam_explorer.models import LoadedModel

    if isinstance(model, LoadedModel):
        model = model.module
    if model is not None and not isinstance(model, nn.Module):
        raise ScorecamError(f"release_copies takes a torch.nn.Module, a LoadedModel or None, not {type(model).__name__}.")
    modules = list(_FOLDED.keys()) if model is None else [model]
    released = sum(_drop_folded(module) for module in modules)
    if released:
        gc.collect()
    return released


class _ConvLeafTracer(fx.Tracer):
    """Keeps every Conv2d and BatchNorm2d (also subclasses with their own forward) as one
    call in the graph; the rewrites below then touch exact types only."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, qualified_name)


def _static_padding(conv: nn.Conv2d) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) zero padding of a "same padding" convolution that pads in
    a ``static_padding`` child (the EfficientNet ports' ``Conv2dStaticSamePadding``), else None."""
    padding = getattr(conv, "static_padding", None)
    if type(conv) is nn.Conv2d or padding is None or conv.padding_mode != "zeros" or tuple(conv.padding) != (0, 0):
        return None
    if type(padding) is nn.ZeroPad2d:
        left, right, top, bottom = (int(value) for value in padding.padding)
        return left, right, top, bottom
    if type(padding).__name__ == "Identity" and not list(padding.parameters()):
        return 0, 0, 0, 0
    return None


def _as_plain_conv(conv: nn.Conv2d) -> nn.Conv2d | None:
    """An ``nn.Conv2d`` doing ``conv`` (with its separate zero padding) in one call, or None.

    A symmetric padding p becomes the convolution's own padding p. A padding one larger
    after than before (a, a + 1), what "same" padding gives a stride-2 convolution, becomes
    padding a + 1 on both sides with the kernel grown by one zero row (column) in front:
    the window then starts one pixel earlier, on a zero weight, and covers the same pixels,
    and the output has the same size. The copy of the padded input is saved; the zero
    weights add exact zeros.

    ``conv`` is a subclass with its own forward, which need not be "pad, then convolve"
    (it may standardise its weights, say): the plain convolution replaces it only if it
    gives ``conv``'s output on a probe input (:func:`_same_on_probe`).
    """
    pads = _static_padding(conv)
    if pads is None:
        return None
    left, right, top, bottom = pads
    grow, padding = [], []
    for before, after, dilation in ((top, bottom, conv.dilation[0]), (left, right, conv.dilation[1])):
        if before == after:
            grow.append(0)
            padding.append(before)
        elif after == before + 1 and dilation == 1:
            grow.append(1)
            padding.append(after)
        else:
            return None
    kernel = (conv.kernel_size[0] + grow[0], conv.kernel_size[1] + grow[1])
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, kernel, stride=tuple(conv.stride), padding=tuple(padding),
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        plain.weight.copy_(torch.nn.functional.pad(conv.weight, (grow[1], 0, grow[0], 0)))
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    plain.eval()
    return plain if _same_on_probe(conv, plain) else None


def _same_on_probe(original: nn.Module, plain: nn.Conv2d) -> bool:
    """Whether ``plain`` gives ``original``'s output, up to float32 rounding, on a seeded
    random input of two images (any forward that does something else, such as weight
    standardisation, differs by far more than rounding there)."""
    size = max(plain.dilation[i] * (plain.kernel_size[i] - 1) + 1 for i in range(2)) + 2 * max(plain.stride) + 3
    probe = torch.randn(2, plain.in_channels, size, size + 1, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=plain.weight.device, dtype=plain.weight.dtype)
    try:
        with torch.no_grad():
            expected, actual = original(probe), plain(probe)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        return False
    scale = float(expected.abs().max()) or 1.0
    return float((actual - expected).abs().max()) <= 1e-5 * scale


def _fold(module: nn.Module) -> nn.Module | None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    copy_ = copy.deepcopy(module).eval()
    for name, sub in list(copy_.named_modules()):
        if isinstance(sub, nn.Conv2d) and type(sub) is not nn.Conv2d and (plain := _as_plain_conv(sub)) is not None:
            parent, _, child = name.rpartition(".")
            setattr(copy_.get_submodule(parent) if parent else copy_, child, plain)
    graph = _ConvLeafTracer().trace(copy_)
    traced = fx.GraphModule(copy_, graph)
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    folded = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue  # a subclass (an activation inside, say) is not a plain BatchNorm
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv, norm = modules[source.target], modules[node.target]
        if type(conv) is not nn.Conv2d or not norm.track_running_stats or calls[source.target] > 1:
            continue  # a subclass may have its own forward; a convolution called at several places stays as it is
        parent, _, name = source.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, fuse_conv_bn_eval(conv, norm))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
        folded += 1
    if not folded:
        return None
    _clamp_in_place(traced)
    traced.graph.lint()
    traced.recompile()
    return traced.eval()


def _clamp_in_place(traced: fx.GraphModule) -> None:
    """Run ReLU / ReLU6 in place where their input is a convolution's fresh output that
    nothing else reads (same values, one pass over memory less)."""
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if type(module) not in (nn.ReLU, nn.ReLU6) or module.inplace:
            continue  # exact types: a subclass may have its own forward
        source = node.args[0]
        producer = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if type(producer) is not nn.Conv2d or len(source.users) != 1:
            continue
        node.op = "call_function"
        if isinstance(module, nn.ReLU6):
            node.target, node.args = torch.nn.functional.hardtanh_, (source, 0.0, 6.0)
        else:
            node.target, node.args = torch.relu_, (source,)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` so that timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """Wall-clock seconds since creation (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
