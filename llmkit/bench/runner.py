"""Running the suites: selection, set-up, output checks, timing, results, exit code.

For each selected suite, shape point, pass and dtype the runner builds the case, runs
every implementation once (the baseline first) and checks its output against the
baseline's, then times the ones that passed: interleaved rounds of
``torch.utils.benchmark`` on the CPU, ``triton.testing.do_bench`` on CUDA (with the
roofline measured first in the same run, and peak memory per implementation).

Anything that cannot run is recorded as *skipped* with its reason (an unknown suite or
shape-set name, a backend not available here, a CUDA-only suite on a CPU machine, an
llmkit module not built yet, an SDPA backend that does not take the case) and the run
goes on. Exit code: 0 all ran, 1 an implementation failed or gave a wrong answer,
3 something was skipped (and nothing failed), 2 nothing could run at all. An implementation
that declares it cannot take a case (a backend's dtype/device support, an SDPA backend's
constraints) is "n/a", listed with its reason, and does not change the exit code unless
its backend was asked for by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import BackendError
from ..testing import sqnr_db
from . import (  # noqa: F401  (importing registers them)
    suites_attention,
    suites_attention_llm,
    suites_gelu,
    suites_glu,
    suites_int8_matmul,
    suites_layer_norm,
    suites_models,
    suites_varlen_attention,
)
from .env import environment
from .roofline import Roofline, fraction, measure_roofline, roof_for
from .shapes import Shapes, group_key, load_shapes, point_label
from .suite import BASELINE, SUITES, Case, Context, Impl, available_backends
from .timing import CpuBudget, CudaBudget, Sample, cuda_peak_bytes, measure_cpu_interleaved, measure_cuda

SCHEMA_ID = "llmkit-bench/1"
CUDA_ONLY = ("roofline",)
"""Suites that exist only on CUDA (the roofline is also measured implicitly on CUDA)."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLOSE_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""'close' check: max |out - baseline| / max |baseline| allowed, per dtype."""
TRUTH_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""Absolute floor (relative to the largest magnitude, about one unit in the last place) added
to twice the baseline's own error when both are judged against float64."""

EXIT_OK, EXIT_FAILED, EXIT_NOTHING, EXIT_SKIPPED = 0, 1, 2, 3


@dataclasses.dataclass
class Options:
    """What ``llmkit bench`` was asked to do (None: the default)."""

    ops: list[str] | None = None
    shapes: str | None = None
    shapes_file: str | None = None
    dtypes: list[str] | None = None
    backends: list[str] | None = None
    passes: list[str] | None = None
    quick: bool = False
    compile: bool | None = None
    device: str | None = None
    seconds: float | None = None
    """CPU: timed seconds per implementation and case (default 0.4; 0.02 with --quick)."""
    threads: int | None = None
    """CPU: torch threads while timing (default: torch's; 1 with --quick)."""


@dataclasses.dataclass
class Result:
    """One implementation on one case (one row of every table)."""

    suite: str
    pass_: str
    dtype: str
    device: str
    shape: dict[str, Any]
    shape_label: str
    group: str
    x: float | None
    impl: str
    status: str
    """ok; error (failed or wrong output: exit 1); skipped (something that should run here did not:
    an llmkit part not built, out of memory, a backend asked for by name: exit 3); n/a (the
    implementation declares it does not take this case, e.g. a CUDA-only kernel on the CPU)."""
    reason: str = ""
    note: str = ""
    check: str = ""
    sample: Sample | None = None
    flops: float | None = None
    bytes: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    tokens_per_s: float | None = None
    x_name: str = ""
    """The shape key ``x`` is the value of (the suite's plotted size)."""
    bound: str | None = "?"
    """'memory', 'compute', 'int8' (the roofline that judges it), None for models, '?' unknown."""
    roofline: str | None = None
    fraction_of_roofline: float | None = None
    vs_eager: float | None = None
    peak_mem_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        s = d.pop("sample")
        d["median_s"] = s["median_s"] if s else None
        d["sample"] = s
        return d


@dataclasses.dataclass
class Skip:
    """Something asked for that did not run, and why."""

    what: str
    reason: str


@dataclasses.dataclass
class Report:
    """Everything one run produced."""

    env: dict[str, Any]
    options: dict[str, Any]
    shapes_file: str | None
    shapes_version: int | None
    shape_set: str | None
    roofline: Roofline | None
    notes: list[str]
    results: list[Result]
    skipped: list[Skip]
    elapsed_s: float = 0.0

    @property
    def exit_code(self) -> int:
        ran = [r for r in self.results if r.status == "ok"]
        if any(r.status == "error" for r in self.results):
            return EXIT_FAILED
        if not ran:
            return EXIT_NOTHING
        if self.skipped or any(r.status == "skipped" for r in self.results):
            return EXIT_SKIPPED
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        roof = None
        if self.roofline is not None:
            roof = dataclasses.asdict(self.roofline)
        return {
            "schema": SCHEMA_ID,
            "environment": self.env,
            "options": self.options,
            "shapes_file": self.shapes_file,
            "shapes_version": self.shapes_version,
            "shape_set": self.shape_set,
            "roofline": roof,
            "notes": self.notes,
            "results": [r.to_json() for r in self.results],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "exit_code": self.exit_code,
            "elapsed_s": round(self.elapsed_s, 3),
        }


# --------------------------------------------------------------------------------------
# checking outputs
# --------------------------------------------------------------------------------------


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (the absolute error when ``want`` is all zeros)."""
    if not want.numel():
        return 0.0
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    return err / scale if scale > 0 else err


class Truth:
    """The baseline's computation in float64, run at most once per case and only when asked."""

    def __init__(self, run: Callable[[], Any] | None):
        self._run = run
        self._got: list[torch.Tensor] | None = None
        self.error = "" if run is not None else "no float64 recomputation for this case"

    def tensors(self) -> list[torch.Tensor] | None:
        if self._got is None and self._run is not None:
            try:
                self._got = [t.detach().double().cpu() for t in _tensors(self._run())]
            except Exception as exc:  # a baseline that does not take float64: keep the plain check
                self.error = f"float64 recomputation failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            self._run = None
        return self._got


def compare_outputs(out: Any, ref: Any, impl: Impl, dtype: torch.dtype, truth: Truth | None = None) -> tuple[bool, str]:
    """Check an implementation's output against the baseline's; (passed, what was seen).

    'close': within the dtype's :data:`CLOSE_TOL` of the baseline (relative to its largest
    magnitude). Where it is not and ``truth`` can recompute the baseline in float64, the
    implementation still passes when its error against float64 is at most twice the
    baseline's own plus :data:`TRUTH_FLOOR` (the rule of :mod:`llmkit.testing`): in 16-bit dtypes the eager
    baseline, not the implementation, is often the less accurate one.
    """
    got, want = _tensors(out), _tensors(ref)
    if len(got) != len(want):
        return False, f"{len(got)} output tensors where the baseline has {len(want)}"
    worst, worst_rel = "", -1.0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return False, f"output {i} has shape {list(g.shape)}, the baseline {list(w.shape)}"
        gd, wd = g.detach().double().cpu(), w.detach().double().cpu()
        if not bool(torch.isfinite(gd).all()) and bool(torch.isfinite(wd).all()):
            return False, f"output {i} has NaN or inf where the baseline is finite"
        if impl.check == "sqnr":
            db = sqnr_db(gd, wd)
            if db < impl.min_sqnr_db:
                return False, f"SQNR {db:.1f} dB < {impl.min_sqnr_db:.0f} dB against the baseline"
            worst = f"SQNR {db:.1f} dB"
        elif impl.check == "cosine":
            cos = float(torch.nn.functional.cosine_similarity(gd.flatten(), wd.flatten(), dim=0))
            if not cos >= impl.min_cosine:
                return False, f"cosine {cos:.4f} < {impl.min_cosine} against the baseline"
            worst = f"cosine {cos:.4f}"
        else:
            rel = _rel_err(gd, wd)
            tol = CLOSE_TOL.get(dtype, 1e-3)
            seen = f"max rel err {rel:.1e}"
            if not rel <= tol:
                ok, seen = _against_truth(i, gd, wd, rel, tol, dtype, truth)
                if not ok:
                    return False, seen
            if rel >= worst_rel:
                worst_rel, worst = rel, seen
    return True, worst


def _against_truth(
    i: int, got: torch.Tensor, base: torch.Tensor, rel: float, tol: float, dtype: torch.dtype, truth: Truth | None
) -> tuple[bool, str]:
    """Output ``i`` missed the baseline by ``rel`` > ``tol``: judge both against float64."""
    missed = f"output {i} differs from the baseline: max rel err {rel:.2e} > {tol:.0e}"
    exact = truth.tensors() if truth is not None else None
    if exact is None or i >= len(exact) or exact[i].shape != got.shape:
        why = truth.error if truth is not None else "no float64 recomputation for this case"
        return False, f"{missed} ({why})" if why else missed
    e_got, e_base = _rel_err(got, exact[i]), _rel_err(base, exact[i])
    allowed = 2 * e_base + TRUTH_FLOOR.get(dtype, 0.0)
    against = f"against float64: {e_got:.2e}, the baseline's own {e_base:.2e}"
    if e_got <= allowed:
        return True, f"max rel err {rel:.1e} vs baseline, {against}"
    return False, f"{missed}; {against} (allowed {allowed:.2e})"


def _reason(exc: BaseException) -> tuple[str, str]:
    """(status, reason) for an exception raised while setting up or running an implementation."""
    if isinstance(exc, BackendError):
        reasons = "; ".join(f"{b}: {', '.join(r)}" for b, r in exc.reasons.items()) or str(exc)
        return "n/a", f"backend cannot take this case ({reasons})"
    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "skipped", "out of memory"
    if "No available kernel" in text or "not supported" in text.lower():
        return "n/a", text.splitlines()[0][:300]
    return "error", text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------


def run_case(
    case: Case, ctx: Context, roofline: Roofline | None, cpu: CpuBudget, cuda: CudaBudget, x_axis: str
) -> list[Result]:
    """Set up, check and time every implementation of ``case``."""
    dtype_name = str(case.dtype).replace("torch.", "")
    label = point_label(case.point)

    def result(impl: Impl, status: str, **kw: Any) -> Result:
        return Result(
            case.suite,
            case.pass_,
            dtype_name,
            ctx.device.type,
            dict(case.point),
            label,
            group_key(case.point, x_axis),
            case.point.get(x_axis),
            impl.name,
            status,
            note=impl.note,
            bound=case.bound,
            x_name=x_axis,
            **kw,
        )

    rows: dict[str, Result] = {}
    fns: dict[str, Callable[[], Any]] = {}
    baseline_out: Any = None
    baseline_ok = False
    truth = Truth(None)
    for impl in case.impls:
        if impl.skip:
            rows[impl.name] = result(impl, "skipped", reason=impl.skip)
            continue
        try:
            fn, out = impl.run_once()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            status, why = _reason(exc)
            if status == "n/a" and ctx.explicit_backends and impl.name.startswith("llmkit["):
                status = "skipped"  # the user asked for this backend by name: say it did not run
            rows[impl.name] = result(impl, status, reason=why)
            continue
        if impl.name == BASELINE:
            baseline_out, baseline_ok, check = out, True, "baseline"
            truth = Truth(impl.truth)
        elif baseline_ok:
            ok, check = compare_outputs(out, baseline_out, impl, case.dtype, truth)
            if not ok:
                rows[impl.name] = result(impl, "error", reason=f"wrong output: {check}")
                continue
        else:
            check = "not checked: the baseline did not run"
        rows[impl.name] = result(impl, "ok", check=check)
        fns[impl.name] = fn
        del out

    if ctx.device.type == "cuda":
        samples: dict[str, Sample] = {}
        for name, fn in fns.items():
            s, note = measure_cuda(fn, cuda, case.cuda_graph)
            samples[name] = s
            rows[name].note = "; ".join(n for n in (rows[name].note, note) if n)
            rows[name].peak_mem_bytes = cuda_peak_bytes(fn)
    else:
        samples = measure_cpu_interleaved(fns, cpu)

    base_t = samples[BASELINE].median_s if BASELINE in samples else None
    for name, s in samples.items():
        r = rows[name]
        r.sample = s
        t = s.median_s
        if case.work is not None:
            r.flops, r.bytes = case.work.flops, case.work.bytes
            r.tflops = case.work.tflops(t) if case.work.flops else None
            r.gbps = case.work.gbps(t) if case.work.bytes else None
        if case.tokens:
            r.tokens_per_s = case.tokens / t
        if case.bound is not None and roofline is not None:
            r.roofline = roof_for(case.bound, case.dtype)
            achieved = r.gbps if case.bound == "memory" else r.tflops
            r.fraction_of_roofline = fraction(achieved, case.bound, case.dtype, roofline)
        if base_t is not None:
            r.vs_eager = base_t / t
        fault_note = page_fault_note(s, case.work.bytes if case.work is not None else None)
        if fault_note:
            r.note = "; ".join(n for n in (r.note, fault_note) if n)
    return [rows[i.name] for i in case.impls]


PAGE_BYTES = 4096
FAULT_SHARE = 0.25
"""A CPU call whose page faults touch at least this share of the bytes it moves is flagged."""


def page_fault_note(sample: Sample, bytes_moved: float | None) -> str:
    """A note when a CPU call spends much of its work faulting in fresh pages ('' otherwise).

    Fresh outputs of many MB are page-faulted in on every call once the C library returns
    their memory to the system; how often it does depends on the process's allocation history,
    so such a case's time and its ratio to eager can change several-fold between runs.
    """
    faults = sample.page_faults_per_call
    if not faults or not bytes_moved:
        return ""
    share = faults * PAGE_BYTES / bytes_moved
    if share < FAULT_SHARE:
        return ""
    return (
        f"{faults:.0f} page faults per call ({share:.0%} of the bytes it moves): allocation-bound here, "
        "the time depends on the allocator's state"
    )


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
    """One (suite, point, pass, dtype) to build and run."""

    suite: str
    point: dict[str, Any]
    pass_: str
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.suite} {self.pass_} {str(self.dtype).replace('torch.', '')} {point_label(self.point)}"


def _device(opts: Options) -> torch.device:
    if opts.device:
        return torch.device(opts.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan(opts: Options, shapes: Shapes, device: torch.device) -> tuple[list[Unit], list[Skip], str]:
    """The units to run and the skips found while choosing them; also the shape-set name."""
    skips: list[Skip] = []
    set_name = opts.shapes or ("quick" if opts.quick else ("gpu" if device.type == "cuda" else "cpu"))
    if opts.ops:
        names = []
        for n in opts.ops:
            if n in CUDA_ONLY:
                if device.type != "cuda":
                    skips.append(Skip(n, "CUDA-only suite on a CPU machine: skipped"))
                continue  # on CUDA it is measured anyway
            if n not in SUITES:
                skips.append(Skip(n, f"unknown suite; suites are {', '.join(sorted(SUITES))}, roofline"))
                continue
            names.append(n)
    else:
        names = [n for n, s in SUITES.items() if device.type in s.devices]
    dtypes: list[torch.dtype] = []
    for d in opts.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32"]):
        if d not in DTYPES:
            skips.append(Skip(f"dtype {d}", f"unknown dtype; dtypes are {', '.join(DTYPES)}"))
        else:
            dtypes.append(DTYPES[d])
    units: list[Unit] = []
    for n in names:
        suite = SUITES[n]
        if device.type not in suite.devices:
            skips.append(Skip(n, f"suite runs on {'/'.join(suite.devices)} only, not on {device.type}"))
            continue
        try:
            points = shapes.points(n, set_name)
        except KeyError as exc:
            skips.append(Skip(n, str(exc.args[0])))
            continue
        passes = [p for p in suite.passes if not opts.passes or p in opts.passes]
        if not passes:
            skips.append(Skip(n, f"has no pass {', '.join(opts.passes or [])} (its passes: {', '.join(suite.passes)})"))
        for point in points:
            for p in passes:
                for dt in dtypes:
                    if dt not in suite.dtypes:
                        continue
                    units.append(Unit(n, point, p, dt))
    return units, skips, set_name


def run_bench(
    opts: Options, argv: list[str] | None = None, progress: Callable[[int, int, str], None] | None = None
) -> Report:
    """Run ``llmkit bench`` with ``opts`` and return the report (nothing is printed)."""
    t0 = time.perf_counter()
    device = _device(opts)
    env = environment(device, argv)
    shapes = load_shapes(opts.shapes_file)
    units, skips, set_name = plan(opts, shapes, device)
    backends, why = available_backends(device, opts.backends)
    notes: list[str] = []
    for b, reason in why.items():
        if opts.backends:
            skips.append(Skip(f"backend {b}", reason))
        else:
            notes.append(f"backend {b} not measured: {reason}")
    compile_on = (not opts.quick) if opts.compile is None else opts.compile
    if not compile_on:
        notes.append("torch.compile baselines not measured (" + ("--quick" if opts.quick else "--no-compile") + ")")
    env["peers_installed"] = {
        m: importlib.util.find_spec(m) is not None for m in ("flash_attn", "liger_kernel", "bitsandbytes")
    }
    ctx = Context(device, backends, compile_on, shapes, explicit_backends=bool(opts.backends))
    threads = opts.threads or (1 if opts.quick else torch.get_num_threads())
    cpu_budget = CpuBudget(opts.seconds if opts.seconds is not None else (0.02 if opts.quick else 0.4), threads)
    if device.type == "cpu":
        env["threads"] = threads
    cuda_budget = CudaBudget(5, 20, 10) if opts.quick else CudaBudget()

    roofline = None
    if device.type == "cuda":
        rp = shapes.points("roofline", "quick" if opts.quick else "gpu")[0]
        roofline = measure_roofline(rp["copy_bytes"], rp["matmul"], cuda_budget)
    else:
        notes.append("roofline: measured on CUDA only; CPU results are judged by their ratio to eager")

    results: list[Result] = []
    saved_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # set-up and output checks too, not only the timed calls
    try:
        _run_units(units, ctx, shapes, roofline, cpu_budget, cuda_budget, results, progress)
    except KeyboardInterrupt:
        # Ctrl-C, or a time limit's SIGINT: report (and write) what was measured
        done = len({(r.suite, r.pass_, r.dtype, r.shape_label) for r in results})
        skips.append(Skip("run", f"interrupted: {done} of {len(units)} cases have results"))
    finally:
        torch.set_num_threads(saved_threads)
    opt_json = dataclasses.asdict(opts) | {"compile": compile_on, "device": device.type, "backends": backends}
    return Report(
        env,
        opt_json,
        shapes.path,
        shapes.version,
        set_name,
        roofline,
        notes,
        results,
        skips,
        elapsed_s=time.perf_counter() - t0,
    )


def _run_units(
    units: list[Unit],
    ctx: Context,
    shapes: Shapes,
    roofline: Roofline | None,
    cpu_budget: CpuBudget,
    cuda_budget: CudaBudget,
    results: list[Result],
    progress: Callable[[int, int, str], None] | None,
) -> None:
    device = ctx.device
    total = len(units)
    for i, u in enumerate(units):
        if progress:
            progress(i, total, u.label)
        suite = SUITES[u.suite]
        if ctx.compile:
            # a fresh dynamo cache per case: the compiled baselines share code objects across
            # cases, and past dynamo's recompile limit they would silently run eager
            torch.compiler.reset()
        try:
            case = suite.build(ctx, u.point, u.pass_, u.dtype)
            results.extend(run_case(case, ctx, roofline, cpu_budget, cuda_budget, shapes.x_axis(u.suite)))
        except Exception as exc:
            status, reason = _reason(exc)
            results.append(
                Result(
                    u.suite,
                    u.pass_,
                    str(u.dtype).replace("torch.", ""),
                    device.type,
                    dict(u.point),
                    point_label(u.point),
                    group_key(u.point, shapes.x_axis(u.suite)),
                    u.point.get(shapes.x_axis(u.suite)),
                    "(set-up)",
                    status,
                    reason=f"building the case failed: {reason}",
                    x_name=shapes.x_axis(u.suite),
                )
            )
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if progress:
        progress(total, total, "done")


def summary_counts(report: Report) -> dict[str, int]:
    """How many results ran, were skipped, failed; plus skipped requests."""
    c = {"ok": 0, "skipped": 0, "error": 0, "n/a": 0}
    for r in report.results:
        c[r.status] = c.get(r.status, 0) + 1
    c["skipped_requests"] = len(report.skipped)
    return c
