"""Machinery of the pytest-benchmark suites in bench/ (what they do: see conftest.py).

Environment: ``LLMKIT_BENCH_SET``, ``LLMKIT_BENCH_THREADS``, ``LLMKIT_BENCH_COMPILE``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from llmkit.bench.runner import compare_outputs
from llmkit.bench.shapes import load_shapes, point_label
from llmkit.bench.suite import BASELINE, SUITES, Case, Context, available_backends
from llmkit.errors import BackendError

SET_NAME = os.environ.get("LLMKIT_BENCH_SET", "cpu")
THREADS = int(os.environ.get("LLMKIT_BENCH_THREADS", "0") or 0)
COMPILE = os.environ.get("LLMKIT_BENCH_COMPILE", "0") == "1"
SLOW_CALL_S = 0.25
"""Calls slower than this are timed with a fixed 3 rounds (pedantic) instead of calibrated."""

if THREADS:
    torch.set_num_threads(THREADS)

SHAPES = load_shapes()
CPU = torch.device("cpu")
BACKENDS, _WHY_NOT = available_backends(CPU, None)
CONTEXT = Context(CPU, BACKENDS, COMPILE, SHAPES)

# The CPU performance targets, measured here (never asserted):
# (suite, pass, shape filter, implementation (a trailing '[' matches every backend), minimum speed vs eager,
#  where the target comes from)
TARGETS: list[tuple[str, str, dict[str, Any], str, float, str]] = [
    ("add_layer_norm", "fwd", {}, "llmkit[", 1.3, "CPU target: fused add+LayerNorm >= 1.3x unfused eager"),
    ("add_layer_norm", "bwd", {}, "llmkit[", 1.3, "CPU target: fused add+LayerNorm >= 1.3x unfused eager"),
    ("bias_gelu", "fwd", {}, "llmkit[", 1.3, "CPU target: fused bias+GELU >= 1.3x unfused eager"),
    ("bias_gelu", "bwd", {}, "llmkit[", 1.3, "CPU target: fused bias+GELU >= 1.3x unfused eager"),
    ("int8_w8a8", "fwd", {"M": 512, "K": 4096}, "Int8Linear[w8a8]", 3.0,
     "CPU target: W8A8 Int8Linear >= 3x fp32 nn.Linear"),
    ("int8_w8a16", "fwd", {}, "Int8Linear[w8a16]", 1.0, "CPU target: W8A16 at M=1..16 >= 1.0x fp32 nn.Linear"),
    ("bert", "prefill", {}, "hf+swap", 1.0, "CPU target: swapped BERT-base >= 1.0x unswapped"),
    ("gpt2_decode", "decode", {}, "llmkit.models.GPT", 1.0, "CPU target: llmkit GPT decode >= 1.0x HF GPT-2 tokens/s"),
    ("llama_prefill", "prefill", {}, "hf+swap", 1.3,
     "CPU target: swapped Llama-shaped model (hidden 2048, 4 layers, S=512) >= 1.3x HF eager, float32 prefill"),
]


@dataclasses.dataclass
class Timed:
    """One benchmarked implementation: its case and median seconds per call."""

    suite: str
    pass_: str
    point: dict[str, Any]
    impl: str
    median_s: float


RESULTS: list[Timed] = []
_CASE: dict[tuple[Any, ...], tuple[Case, dict[str, Any]]] = {}


def impl_names(suite: str) -> list[str]:
    """The implementation names a suite has here (built once on its smallest shape)."""
    s = SUITES[suite]
    point = SHAPES.points(suite, "quick")[0]
    case = s.build(CONTEXT, point, s.passes[0], torch.float32)
    return [i.name for i in case.impls]


def params(*suites: str) -> list[Any]:
    """pytest params (suite, point, pass, impl) of the suites in the chosen shape set."""
    out = []
    for suite in suites:
        s = SUITES[suite]
        names = impl_names(suite)
        for point in SHAPES.points(suite, SET_NAME):
            for p in s.passes:
                for impl in names:
                    label = point_label(point).replace(" ", "-")
                    out.append(pytest.param(suite, point, p, impl, id=f"{suite}-{p}-{label}-{impl}"))
    return out


def _case(suite: str, point: dict[str, Any], pass_: str) -> tuple[Case, dict[str, Any]]:
    key = (suite, tuple(sorted(point.items())), pass_)
    if key not in _CASE:
        _CASE.clear()  # one case alive at a time (models are large)
        if COMPILE:
            torch._dynamo.reset()  # past dynamo's recompile limit the compiled baselines would run eager
        case = SUITES[suite].build(CONTEXT, point, pass_, torch.float32)
        _CASE[key] = (case, {})
    return _CASE[key]


def _baseline_output(case: Case, memo: dict[str, Any]) -> Any:
    if "baseline" not in memo:
        base = next(i for i in case.impls if i.name == BASELINE)
        fn = base.make() if base.make else base.fn
        fn()
        memo["baseline"] = base.output() if base.output else fn()
    return memo["baseline"]


def run_benchmark(benchmark: Any, suite: str, point: dict[str, Any], pass_: str, impl_name: str) -> None:
    """Check one implementation's output against eager, then benchmark it."""
    case, memo = _case(suite, point, pass_)
    impl = next((i for i in case.impls if i.name == impl_name), None)
    if impl is None:
        pytest.skip(f"{impl_name} is not an implementation of this case here")
    if impl.skip:
        pytest.skip(impl.skip)
    ref = _baseline_output(case, memo)
    try:
        fn: Callable[[], Any] = impl.make() if impl.make else impl.fn
        t0 = time.perf_counter()
        first = fn()
        single = time.perf_counter() - t0
    except BackendError as exc:  # the backend declares it does not take this case
        pytest.skip("not applicable: " + "; ".join(f"{b}: {', '.join(r)}" for b, r in exc.reasons.items()))
    if impl.name != BASELINE:
        out = impl.output() if impl.output else first
        ok, what = compare_outputs(out, ref, impl, case.dtype)
        assert ok, f"{impl.name}: {what}"
    benchmark.group = f"{suite} {pass_} {point_label(point)}"
    benchmark.extra_info.update({"suite": suite, "pass": pass_, "impl": impl.name, **point})
    if single > SLOW_CALL_S:
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        RESULTS.append(Timed(suite, pass_, dict(point), impl.name, stats.stats.median))


def _ratios() -> list[tuple[Timed, float]]:
    eager = {(t.suite, t.pass_, tuple(sorted(t.point.items()))): t.median_s for t in RESULTS if t.impl == BASELINE}
    out = []
    for t in RESULTS:
        e = eager.get((t.suite, t.pass_, tuple(sorted(t.point.items()))))
        if e:
            out.append((t, e / t.median_s))
    return out


def terminal_summary(terminalreporter: Any) -> None:
    """Ratios against eager and the performance targets, after the benchmarks."""
    if not RESULTS:
        return
    tr = terminalreporter
    ratios = _ratios()
    tr.section("llmkit: speed relative to PyTorch eager, measured in this run (above 1 = faster)")
    tr.write_line(f"shape set {SET_NAME!r} of {SHAPES.path} v{SHAPES.version}, torch threads "
                  f"{torch.get_num_threads()}; on a shared machine these figures are noisy")
    for t, r in ratios:
        tr.write_line(f"  {t.suite:15} {t.pass_:7} {point_label(t.point):38} {t.impl:26} "
                      f"{t.median_s * 1e3:10.3f} ms  {r:6.2f}x")
    tr.section("llmkit: performance targets (measured, not asserted)")
    for suite, pass_, where, prefix, target, text in TARGETS:
        hits = [(t, r) for t, r in ratios if t.suite == suite and t.pass_ == pass_
                and (t.impl == prefix or (prefix.endswith("[") and t.impl.startswith(prefix)))
                and all(t.point.get(k) == v for k, v in where.items())]
        if not hits:
            tr.write_line(f"  not measured: {text} ({suite} {pass_} {prefix}* did not run)")
            continue
        for t, r in hits:
            verdict = "met" if r >= target else "missed"
            tr.write_line(f"  {verdict:6} {r:5.2f}x (target {target}x) {t.impl} {point_label(t.point)}: {text}")
