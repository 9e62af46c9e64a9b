"""Measuring one implementation: CPU (torch.utils.benchmark) and CUDA (triton do_bench).

CPU: the implementations of one case are timed *interleaved*: round after round, each
implementation runs one block of calls (``torch.utils.benchmark.Timer.timeit`` with the
run's torch threads; calls of 50 ms or more one at a time), the order rotating every round,
so that load from other processes on a shared machine falls on all of them alike and the
ratios between them stay honest.
Each round gives one per-call time; a :class:`Sample` keeps them all with their median
and spread.

CUDA: ``triton.testing.do_bench`` (the L2 cache is flushed before every call), median of
every timed call; where one call takes under :data:`LAUNCH_BOUND_S` the launch overhead
would dominate, so the case is measured again inside a CUDA graph
(``do_bench_cudagraph``, L2 not flushed) and that figure is reported. Peak memory: the
growth of ``torch.cuda.max_memory_allocated`` over one call.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:  # Unix: minor page faults per timed call
    import resource as _resource
except ImportError:  # pragma: no cover - Windows
    _resource = None  # type: ignore[assignment]  # the module or None, checked before each use

LAUNCH_BOUND_S = 50e-6
"""Below this median (CUDA), a case is re-measured with CUDA graphs."""


@dataclasses.dataclass
class Sample:
    """The timings of one implementation on one case, in seconds per call."""

    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    max_s: float
    times_s: list[float]
    """Every measured per-call time (one per CPU round, one per CUDA timed call)."""
    calls_per_time: int
    """How many calls each entry of ``times_s`` averages."""
    method: str
    page_faults_per_call: float | None = None
    """CPU: minor page faults of the process per timed call (None where not measured). Many
    mean the call spends its time faulting in freshly allocated output pages, which depends on
    the allocator's state of the process as much as on the implementation."""

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else math.nan


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def make_sample(
    times_s: Sequence[float], calls_per_time: int, method: str, page_faults_per_call: float | None = None
) -> Sample:
    """Summarize per-call times into a :class:`Sample`."""
    t = [float(x) for x in times_s]
    return Sample(
        median_s=quantile(t, 0.5),
        q25_s=quantile(t, 0.25),
        q75_s=quantile(t, 0.75),
        min_s=min(t),
        max_s=max(t),
        times_s=t,
        calls_per_time=calls_per_time,
        method=method,
        page_faults_per_call=page_faults_per_call,
    )


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` is missing)."""
    if _resource is None:
        return None
    return _resource.getrusage(_resource.RUSAGE_SELF).ru_minflt


# --------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CpuBudget:
    """How long to time each implementation of a case on the CPU."""

    seconds_per_impl: float
    """Target total timed time per implementation."""
    threads: int = 0
    """torch threads while timing (0: torch.get_num_threads())."""
    min_rounds: int = 3
    max_rounds: int = 15

    @property
    def num_threads(self) -> int:
        return self.threads or torch.get_num_threads()


def _timer(fn: Callable[[], Any], threads: int):
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)


SLOW_CALL_S = 0.05
"""CPU calls at least this slow are timed one call per round with ``time.perf_counter``:
``Timer.timeit`` adds two warm-up calls to every block, which for a call of seconds
(a whole model) would triple the run for nothing."""


def measure_cpu_interleaved(fns: dict[str, Callable[[], Any]], budget: CpuBudget) -> dict[str, Sample]:
    """Time every function of one case, interleaved round by round (see module doc).

    Each function must already have run once (warm-up, and checked by the caller).
    """
    if not fns:
        return {}
    saved = torch.get_num_threads()
    torch.set_num_threads(budget.num_threads)  # the direct calls run with the Timer's thread count
    try:
        return _interleaved(fns, budget)
    finally:
        torch.set_num_threads(saved)


def _interleaved(fns: dict[str, Callable[[], Any]], budget: CpuBudget) -> dict[str, Sample]:
    names = list(fns)
    timers = {n: _timer(fns[n], budget.num_threads) for n in names}
    single: dict[str, float] = {}
    for n in names:  # size the blocks: the faster of two calls (one, when a call takes seconds)
        for _ in range(2):
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            single[n] = min(single.get(n, dt), max(dt, 1e-7))
            if dt > 1.0:
                break
    slowest = max(single.values())
    rounds = int(min(budget.max_rounds, max(budget.min_rounds, budget.seconds_per_impl // slowest)))
    number = {n: max(1, int(round(budget.seconds_per_impl / rounds / single[n]))) for n in names}
    direct = {n: single[n] >= SLOW_CALL_S for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, int] = {n: 0 for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            f0 = _minor_faults()
            if direct[n]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
            else:
                times[n].append(timers[n].timeit(number[n]).median)
            if f0 is not None:
                faults[n] += _minor_faults() - f0  # type: ignore[operator]
    out = {}
    for n in names:
        how = "time.perf_counter, 1 call per round" if direct[n] else "torch.utils.benchmark.Timer"
        method = f"{how}, {budget.num_threads} threads, {rounds} interleaved rounds"
        calls = rounds * (1 if direct[n] else number[n])
        per_call = faults[n] / calls if _resource is not None else None
        out[n] = make_sample(times[n], 1 if direct[n] else number[n], method, per_call)
    return out


# --------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CudaBudget:
    """do_bench parameters (milliseconds)."""

    warmup_ms: int = 25
    rep_ms: int = 100
    graph_rep_ms: int = 50


def measure_cuda(fn: Callable[[], Any], budget: CudaBudget, graph: bool | None = None) -> tuple[Sample, str]:
    """Median time of ``fn`` on the GPU; returns the sample and a note ('' if none).

    ``graph``: True always measures inside a CUDA graph as well, None does so when the
    plain median is under :data:`LAUNCH_BOUND_S`, False never.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    ms = do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, return_mode="all")
    sample = make_sample([t * 1e-3 for t in ms], 1, "triton.testing.do_bench, L2 flushed, median")
    note = ""
    if graph or (graph is None and sample.median_s < LAUNCH_BOUND_S):
        try:
            gms = do_bench_cudagraph(fn, rep=budget.graph_rep_ms, return_mode="all")
        except Exception as exc:  # capture can fail (host sync, CPU work in fn)
            note = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); launch overhead included"
            torch.cuda.synchronize()
        else:
            plain = sample.median_s
            sample = make_sample([t * 1e-3 for t in gms], 1, "triton.testing.do_bench_cudagraph, median")
            note = f"launch-bound: CUDA graph ({plain * 1e6:.1f} us without)"
    return sample, note


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """Bytes allocated beyond what was allocated before, at the peak of one call of ``fn``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)
