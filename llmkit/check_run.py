"""Running ``llmkit check``: the plan (cases x backends x devices), each case judged against
float64 and PyTorch's baseline, the table, the JSON record and the CLI. The cases themselves are
defined in :mod:`llmkit.check` (and the ``check_*`` modules it gathers)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .check import EXIT_FAILED, EXIT_NOTHING, EXIT_OK, EXIT_SKIPPED, Case, Outputs, Row, _names, all_cases
from .dispatch import BACKEND_NAMES, BACKENDS, OPS, triton_interpreting, use_backend
from .errors import BackendError, UsageError
from .testing import compare, sqnr_db


def _fmt_dtype(dt: torch.dtype) -> str:
    return _names(dt)


def _judge(
    case: Case, name: str, out: Tensor, r: Tensor, baseline: Outputs | None
) -> tuple[float, float, float, str, str]:
    """(max abs err, rel err, tolerance, status, note) of one output."""
    if case.exact:
        if out.shape != r.shape or out.dtype != r.dtype:
            return (
                math.inf,
                math.nan,
                0.0,
                "FAIL",
                (f"got {_names(out.dtype)} {list(out.shape)}, expected {_names(r.dtype)} {list(r.shape)}"),
            )
        exact = torch.equal(out.cpu(), r.cpu())
        diff = 0.0 if exact else float((out.cpu().double() - r.cpu().double()).abs().nan_to_num(math.inf).max())
        return diff, 0.0 if exact else math.nan, 0.0, "PASS" if exact else "FAIL", "" if exact else "must be bit-exact"
    if case.min_sqnr_db is not None:
        if out.shape != r.shape:
            return math.inf, math.nan, math.nan, "FAIL", f"shape {list(out.shape)}, expected {list(r.shape)}"
        db = sqnr_db(out, r)
        err = float((out.double() - r.cpu().double().to(out.device)).abs().max()) if out.numel() else 0.0
        ok = db >= case.min_sqnr_db and bool(torch.isfinite(out).all()) and out.dtype == case.dtype
        return err, math.nan, math.nan, "PASS" if ok else "FAIL", f"SQNR {db:.1f} dB (needs >= {case.min_sqnr_db:.0f})"
    assert baseline is not None
    c = compare(name, out, r, baseline[name])
    return c.max_abs_err, c.max_rel_err, c.tolerance, "PASS" if c.passed else "FAIL", ""


def run_case(case: Case, backend: str, device: torch.device) -> list[Row]:
    """Run one case on one backend and device; one row per output."""
    t0 = time.perf_counter()
    base: dict[str, Any] = dict(
        op=case.op, backend=backend, device=device.type, dtype=_fmt_dtype(case.dtype), shape=case.label
    )

    def one(status: str, note: str, output: str = "-") -> list[Row]:
        return [
            Row(
                **base,
                output=output,
                max_abs_err=math.nan,
                rel_err=math.nan,
                tolerance=math.nan,
                status=status,
                note=note,
                seconds=time.perf_counter() - t0,
            )
        ]

    try:
        data = case.make(device)
    except Exception as exc:  # pragma: no cover - input construction is ours
        return one("FAIL", f"making inputs failed: {exc!r}")
    try:
        with use_backend(backend):
            got = case.run(data)
    except BackendError as exc:
        reasons = "; ".join("; ".join(r) for r in exc.reasons.values()) or str(exc)
        return one("SKIP", reasons)
    except Exception as exc:
        return one("FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    try:
        ref = case.ref(data)
        baseline = case.base(data) if case.base is not None else None
    except Exception as exc:  # the yardstick itself: report, do not hide
        return one("FAIL", f"reference/baseline failed: {type(exc).__name__}: {exc}".splitlines()[0][:300])
    rows = []
    for name, out in got.items():
        try:
            err, rel, tol, status, note = _judge(case, name, out, ref[name], baseline)
        except Exception as exc:
            err, rel, tol, status, note = math.nan, math.nan, math.nan, "FAIL", f"{type(exc).__name__}: {exc}"
        rows.append(Row(**base, output=name, max_abs_err=err, rel_err=rel, tolerance=tol, status=status, note=note))
    missing = set(ref) - set(got)
    for name in sorted(missing):
        rows.append(
            Row(
                **base,
                output=name,
                max_abs_err=math.nan,
                rel_err=math.nan,
                tolerance=math.nan,
                status="FAIL",
                note="output missing",
            )
        )
    for r in rows:
        r.seconds = (time.perf_counter() - t0) / len(rows)
    return rows


def targets(backends: list[str] | None, device: str | None = None) -> list[tuple[str, torch.device]]:
    """(backend, device) pairs to check on this machine (only ``device``'s when given)."""
    names = backends or list(BACKEND_NAMES)
    out = []
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    if device is not None:
        devices = [d for d in devices if d.type == device]
    for name in names:
        for dev in devices:
            if BACKENDS[name].unavailable_reason(dev.type) is None:
                out.append((name, dev))
    return out


def _interpreted(backend: str, device: torch.device) -> bool:
    return backend == "triton" and device.type == "cpu" and triton_interpreting()


@dataclasses.dataclass
class Plan:
    """What a check run will do, and what it leaves out (and why)."""

    work: list[tuple[Case, str, torch.device]]
    notes: list[str]
    interrupted: str | None = None
    """Set by :func:`run_check` when Ctrl-C (or a timeout's SIGINT) stopped the run early."""


def plan_check(
    ops: list[str] | None = None,
    backends: list[str] | None = None,
    quick: bool = False,
    dtypes: list[str] | None = None,
    device: str | None = None,
) -> Plan:
    """Every (case, backend, device) to run, and notes on what is left out."""
    cases = [
        c
        for c in all_cases()
        if (ops is None or c.op in ops) and (c.quick or not quick) and (dtypes is None or _fmt_dtype(c.dtype) in dtypes)
    ]
    work: list[tuple[Case, str, torch.device]] = []
    notes: list[str] = []
    for backend, dev in targets(backends, device):
        missing: set[str] = set()
        too_big = half_left = 0
        for c in cases:
            stages = OPS.get(c.op, {})
            if not any(backend in p.impls for p in stages.values()):
                missing.add(c.op)  # this backend has no implementation of the op at all
                continue
            if _interpreted(backend, dev):
                if not c.interp:
                    too_big += 1
                    continue
                if quick and c.dtype == torch.float16:
                    half_left += 1
                    continue
            work.append((c, backend, dev))
        if missing:
            notes.append(f"{backend} ({dev.type}) has no implementation of: {', '.join(sorted(missing))}")
        if too_big:
            notes.append(
                f"{backend} ({dev.type}, interpreter): {too_big} large cases left out "
                "(too slow to interpret; they run on a GPU and on the other backends)"
            )
        if half_left:
            notes.append(
                f"{backend} ({dev.type}, interpreter, --quick): {half_left} float16 cases left out "
                "(bfloat16 and float32 run; the full check runs float16 too)"
            )
    return Plan(work, notes)


def run_check(
    ops: list[str] | None = None,
    backends: list[str] | None = None,
    quick: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    dtypes: list[str] | None = None,
    plan: Plan | None = None,
) -> list[Row]:
    """Run the checker and return every row.

    Ctrl-C (KeyboardInterrupt, e.g. a time limit's SIGINT) ends the run early: the rows of
    the cases that finished are returned and ``plan.interrupted`` says how far it got.
    """
    plan = plan or plan_check(ops, backends, quick, dtypes)
    work = plan.work
    rows: list[Row] = []
    for i, (c, backend, dev) in enumerate(work):
        if progress:
            progress(i, len(work), f"{c.op} {backend} {dev.type} {_fmt_dtype(c.dtype)} {c.label}")
        try:
            rows.extend(run_case(c, backend, dev))
        except KeyboardInterrupt:
            plan.interrupted = f"interrupted after {i} of {len(work)} cases"
            plan.notes.append(plan.interrupted)
            break
    if progress:
        progress(len(work), len(work), "done")
    return rows


def counts(rows: list[Row]) -> dict[str, int]:
    """How many rows passed, failed and were skipped."""
    return {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}


def format_rows(rows: list[Row]) -> str:
    """The table ``llmkit check`` prints."""
    head = (
        f"{'op':16} {'backend':9} {'dev':4} {'dtype':8} {'shape':32} {'output':13} "
        f"{'max abs err':>11} {'rel err':>9} {'tolerance':>9}  result"
    )
    lines = [head, "-" * len(head)]

    def num(x: float) -> str:
        return "-" if x != x else f"{x:.2e}"

    for r in rows:
        lines.append(
            f"{r.op:16} {r.backend:9} {r.device:4} {r.dtype:8} {r.shape[:32]:32} {r.output[:13]:13} "
            f"{num(r.max_abs_err):>11} {num(r.rel_err):>9} {num(r.tolerance):>9}  {r.status}"
            + (f"  ({r.note})" if r.note else "")
        )
    c = counts(rows)
    lines.append("")
    lines.append(f"{c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped")
    return "\n".join(lines)


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``llmkit check``."""
    p.add_argument(
        "--op", action="append", dest="ops", metavar="OP", help="check only this op (repeatable); default: all"
    )
    p.add_argument(
        "--backend",
        action="append",
        dest="backends",
        metavar="NAME",
        help=f"check only this backend (repeatable): {', '.join(BACKEND_NAMES)}",
    )
    p.add_argument(
        "--dtype",
        action="append",
        dest="dtypes",
        metavar="DTYPE",
        help="check only this dtype (repeatable): float32, float16, bfloat16, float64, int8",
    )
    p.add_argument("--quick", action="store_true", help="only the small shapes")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), help="check only on this device (default: every device here, CUDA first)"
    )
    p.add_argument("--json", metavar="FILE", help="also write every row as JSON to FILE")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also compile every Triton kernel for sm_80 and sm_90 and report resources",
    )


def _environment() -> dict[str, Any]:
    from ._version import __version__
    from .bench.env import git_commit

    return {
        "llmkit": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton_interpret": triton_interpreting(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["llmkit", *sys.argv[1:]]) if sys.argv[1:2] == ["check"] else None,
    }


def _finite(x: Any) -> Any:
    """JSON has no NaN or inf: write them as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _check_writable(path: str) -> None:
    """Raise :class:`UsageError` unless ``path`` can be opened for writing (leaves no new file)."""
    existed = Path(path).exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"--json {path}: cannot write the file: {exc.strerror or exc}") from None
    if not existed:
        Path(path).unlink(missing_ok=True)


def run_check_cli(args: argparse.Namespace) -> int:
    """``llmkit check``: print the table, optionally write JSON; exit code as the module says."""
    from .bench.progress import progress_callback
    from .dispatch import check_backend_name

    known_ops = sorted({c.op for c in all_cases()})
    known_dtypes = sorted({_fmt_dtype(c.dtype) for c in all_cases()})
    skipped: list[str] = []
    ops = None
    if args.ops:
        ops = []
        for op in args.ops:
            if op in known_ops:
                ops.append(op)
            else:
                skipped.append(f"unknown op {op!r}; ops are {', '.join(known_ops)}")
    dtypes = None
    if getattr(args, "dtypes", None):
        dtypes = [d for d in args.dtypes if d in known_dtypes]
        skipped += [
            f"unknown dtype {d!r}; dtypes are {', '.join(known_dtypes)}" for d in args.dtypes if d not in known_dtypes
        ]
    for b in args.backends or []:
        check_backend_name(b, "--backend")
    if args.json:
        _check_writable(args.json)  # before minutes of checks, not after
    for s in skipped:
        print(f"llmkit check: {s}: skipped", file=sys.stderr)
    t0 = time.perf_counter()
    device = getattr(args, "device", None)
    if device == "cuda" and not torch.cuda.is_available():
        skipped.append("--device cuda: no CUDA GPU is available")
    pairs = targets(args.backends, device)
    here = {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    for name in args.backends or BACKEND_NAMES:
        if not any(n == name for n, _ in pairs):
            devs = (device,) if device else ("cuda", "cpu")
            reasons = {
                d: BACKENDS[name].unavailable_reason(d) if d in here else "no CUDA GPU is available" for d in devs
            }
            why = "; ".join(f"{d}: {r}" for d, r in reasons.items() if r)
            print(f"backend {name}: not checked ({why})")
            if args.backends:
                skipped.append(f"backend {name} is not available here ({why})")
    plan = plan_check(ops, args.backends, args.quick, dtypes, device)
    for n in plan.notes:
        print(f"note: {n}")
    rows = [] if ops == [] or dtypes == [] else run_check(plan=plan, progress=progress_callback())
    if plan.interrupted:
        skipped.append(plan.interrupted)
    print(format_rows(rows))
    failed = any(r.status == "FAIL" for r in rows)
    compile_problems: list[str] = []
    if args.compile:
        from .compile_report import format_table, problems, run_report

        reports = run_report()
        print()
        print(format_table(reports))
        compile_problems = problems(reports)
        for p in compile_problems:
            print("PROBLEM:", p)
    elapsed = time.perf_counter() - t0
    if failed or compile_problems:
        code = EXIT_FAILED
    elif not rows:
        code = EXIT_NOTHING
    elif skipped:
        code = EXIT_SKIPPED
    else:
        code = EXIT_OK
    if args.json:
        doc = {
            "environment": _environment(),
            "rows": [dataclasses.asdict(r) for r in rows],
            "counts": counts(rows),
            "notes": plan.notes,
            "skipped": skipped,
            "compile_problems": compile_problems,
            "elapsed_s": round(elapsed, 2),
            "exit_code": code,
        }
        try:
            with open(args.json, "w") as f:
                json.dump(_finite(doc), f, indent=1, default=str, allow_nan=False)
        except OSError as exc:
            raise UsageError(f"--json {args.json}: cannot write the file: {exc.strerror or exc}") from None
    for s in skipped:
        print(f"skipped: {s}")
    print(f"\nchecked in {elapsed:.1f} s")
    if not rows:
        print("nothing was checked", file=sys.stderr)
    return code
