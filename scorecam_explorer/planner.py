"""How the masked batches run: images per forward pass and CPU threads, chosen by timing.

Neither choice changes what is computed beyond rounding: batch size and thread count change
float32 rounding only (relative differences around 1e-6).

On a CPU a bigger batch is not always faster (EfficientNet-Lite0's depthwise convolutions
were slower at 64 than at 16 on a 2-core machine), and on a busy machine one thread can beat
several. So :class:`Planner` measures: the first masked batches of a run use each candidate
plan in turn (they are real work, not thrown away), then the fastest per-image plan is used
for the rest and remembered for the process, keyed by model, layer, input shape, device and
precision. A plan's typical cost is the median seconds per image of three or more batches,
else the fastest (a first batch of a new shape pays one-off costs); a plan more than
``prune`` times slower than the best so far is not timed again, and the chosen plan is
watched and replaced when it becomes ``prune`` times slower than another measured one. The
candidates read torch's thread count before a remembered one is applied, so one thread
winning once does not make it the only choice. :func:`forget_plans` drops what was remembered.

The timing helpers live here too: :func:`synchronize` waits for queued device work so that a
:class:`Stopwatch` measures real time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from scorecam_explorer.errors import ScorecamError


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
