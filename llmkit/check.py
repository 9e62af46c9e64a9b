"""``llmkit check``: every op x every backend available here x dtypes x shapes.

Each case draws fresh random inputs, runs the op on one backend (forward, and
backward with a random output gradient where the op is differentiable), runs
PyTorch's own implementation in the same dtype (the baseline), and computes the
same quantities in float64 from the independent formulas of
:mod:`llmkit.reference64`. An output passes by the rule of :mod:`llmkit.testing`
(error <= 2 x the baseline's error + a floor); int8 outputs must be bit-exact;
int8 linears are judged by SQNR.

On a machine without a GPU the reference backend runs on CPU tensors, and Triton
kernels run through the interpreter (``TRITON_INTERPRET=1``, which the CLI sets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops as L
from . import reference64 as R
from .dispatch import BACKEND_NAMES, OPS, use_backend
from .errors import BackendError
from .testing import compare, sqnr_db

Outputs = dict[str, Tensor]


@dataclasses.dataclass
class Case:
    """One op at one shape and dtype: how to make inputs and compute the three results."""

    op: str
    label: str
    dtype: torch.dtype
    make: Callable[[torch.device], dict[str, Any]]
    run: Callable[[dict[str, Any]], Outputs]
    """The llmkit op (forward and backward) under the backend in force."""
    ref: Callable[[dict[str, Any]], Outputs]
    """float64 through llmkit.reference64."""
    base: Callable[[dict[str, Any]], Outputs] | None
    """PyTorch's implementation in the case's dtype (None: judged by `exact` or `sqnr`)."""
    exact: bool = False
    min_sqnr_db: float | None = None
    quick: bool = True


@dataclasses.dataclass
class Row:
    """One line of the table: one output of one case on one backend."""

    op: str
    backend: str
    device: str
    dtype: str
    shape: str
    output: str
    max_abs_err: float
    rel_err: float
    tolerance: float
    status: str  # PASS, FAIL, SKIP
    note: str = ""


# --------------------------------------------------------------------------------------
# helpers to build cases
# --------------------------------------------------------------------------------------


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def _grads(out: Tensor, grad: Tensor, named: dict[str, Tensor | None]) -> Outputs:
    """Backpropagate ``grad`` through ``out`` into every named leaf that requires grad."""
    leaves = {k: v for k, v in named.items() if v is not None and v.requires_grad}
    gs = torch.autograd.grad(out, list(leaves.values()), grad.to(out.dtype), allow_unused=True)
    return {f"grad_{k}": (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), gs)}


def _names(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _norm_cases() -> Iterable[Case]:
    shapes = [((1, 1), True), ((7, 33), True), ((3, 7, 1500), True), ((2, 4097), False), ((2, 65537), False)]
    for dtype in HALF_AND_FLOAT:
        for shape, quick in shapes:
            n = shape[-1]

            def make(dev, shape=shape, dtype=dtype, n=n):
                # mean far from zero: LayerNorm must stay stable
                x = (torch.randn(shape, device=dev) * 2 + 3).to(dtype)
                return {
                    "x": x,
                    "w": (torch.rand(n, device=dev) + 0.5).to(dtype),
                    "b": torch.randn(n, device=dev).to(dtype),
                    "r": torch.randn(shape, device=dev).to(dtype),
                    "gy": torch.randn(shape, device=dev),
                    "n": n,
                }

            def run_ln(d):
                x, w, b = _leaf(d["x"]), _leaf(d["w"]), _leaf(d["b"])
                y = L.layer_norm(x, [d["n"]], w, b, 1e-5)
                return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w, "bias": b})

            def ref_ln(d):
                x, w, b = _f64(_leaf(d["x"])), _f64(_leaf(d["w"])), _f64(_leaf(d["b"]))
                y = R.layer_norm(x, [d["n"]], w, b, 1e-5)
                return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w, "bias": b})

            def base_ln(d):
                x, w, b = _leaf(d["x"]), _leaf(d["w"]), _leaf(d["b"])
                y = F.layer_norm(x, [d["n"]], w, b, 1e-5)
                return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w, "bias": b})

            yield Case("layer_norm", "x".join(map(str, shape)), dtype, make, run_ln, ref_ln, base_ln, quick=quick)

            def run_rms(d):
                x, w = _leaf(d["x"]), _leaf(d["w"])
                y = L.rms_norm(x, [d["n"]], w, 1e-6)
                return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w})

            def ref_rms(d):
                x, w = _f64(_leaf(d["x"])), _f64(_leaf(d["w"]))
                y = R.rms_norm(x, [d["n"]], w, 1e-6)
                return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w})

            def base_rms(d):
                x, w = _leaf(d["x"]), _leaf(d["w"])
                y = F.rms_norm(x, [d["n"]], w, 1e-6)
                return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w})

            yield Case("rms_norm", "x".join(map(str, shape)), dtype, make, run_rms, ref_rms, base_rms, quick=quick)

            def run_aln(d):
                x, r, w, b = _leaf(d["x"]), _leaf(d["r"]), _leaf(d["w"]), _leaf(d["b"])
                y, s = L.add_layer_norm(x, r, [d["n"]], w, b, 1e-5)
                return {"out": y, "residual_out": s} | _grads(y, d["gy"], {"input": x, "weight": w, "bias": b})

            def ref_aln(d, dtype=dtype):
                x, r, w, b = (_f64(_leaf(d[k])) for k in ("x", "r", "w", "b"))
                y, s = R.add_layer_norm(x, r, [d["n"]], w, b, 1e-5, round_to=dtype)
                return {"out": y, "residual_out": s} | _grads(y, d["gy"], {"input": x, "weight": w, "bias": b})

            def base_aln(d):
                x, r, w, b = _leaf(d["x"]), _leaf(d["r"]), _leaf(d["w"]), _leaf(d["b"])
                s = x + r
                y = F.layer_norm(s, [d["n"]], w, b, 1e-5)
                return {"out": y, "residual_out": s} | _grads(y, d["gy"], {"input": x, "weight": w, "bias": b})

            yield Case("add_layer_norm", "x".join(map(str, shape)), dtype, make, run_aln, ref_aln, base_aln, quick=quick)


def _gelu_cases() -> Iterable[Case]:
    for dtype in HALF_AND_FLOAT:
        for shape, quick in (((1,), True), ((7, 1023), True), ((3, 5, 1500), False)):
            for approx in ("none", "tanh"):
                n = shape[-1]

                def make(dev, shape=shape, dtype=dtype, n=n):
                    return {
                        "x": (torch.randn(shape, device=dev) * 3).to(dtype),
                        "b": torch.randn(n, device=dev).to(dtype),
                        "gy": torch.randn(shape, device=dev),
                    }

                def run_g(d, a=approx):
                    x = _leaf(d["x"])
                    y = L.gelu(x, a)
                    return {"out": y} | _grads(y, d["gy"], {"input": x})

                def ref_g(d, a=approx):
                    x = _f64(_leaf(d["x"]))
                    y = R.gelu(x, a)
                    return {"out": y} | _grads(y, d["gy"], {"input": x})

                def base_g(d, a=approx):
                    x = _leaf(d["x"])
                    y = F.gelu(x, approximate=a)
                    return {"out": y} | _grads(y, d["gy"], {"input": x})

                label = f"{'x'.join(map(str, shape))} {approx}"
                yield Case("gelu", label, dtype, make, run_g, ref_g, base_g, quick=quick)

                def run_bg(d, a=approx):
                    x, b = _leaf(d["x"]), _leaf(d["b"])
                    y = L.bias_gelu(x, b, a)
                    return {"out": y} | _grads(y, d["gy"], {"input": x, "bias": b})

                def ref_bg(d, a=approx):
                    x, b = _f64(_leaf(d["x"])), _f64(_leaf(d["b"]))
                    y = R.bias_gelu(x, b, a)
                    return {"out": y} | _grads(y, d["gy"], {"input": x, "bias": b})

                def base_bg(d, a=approx):
                    x, b = _leaf(d["x"]), _leaf(d["b"])
                    y = F.gelu(x + b, approximate=a)
                    return {"out": y} | _grads(y, d["gy"], {"input": x, "bias": b})

                yield Case("bias_gelu", label, dtype, make, run_bg, ref_bg, base_bg, quick=quick)


def _attention_cases() -> Iterable[Case]:
    configs = [
        # B, Hq, Hkv, Sq, Sk, D, causal, mask kind, quick
        (1, 2, 2, 1, 1, 32, False, None, True),
        (2, 2, 2, 17, 17, 64, True, None, True),
        (1, 4, 2, 37, 65, 64, False, "bool", True),
        (2, 2, 1, 33, 20, 80, True, "float", False),
        (1, 2, 2, 129, 129, 128, True, "padding", False),
    ]
    for dtype in HALF_AND_FLOAT:
        for b, hq, hkv, sq, sk, dh, causal, mask_kind, quick in configs:

            def make(dev, b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, dh=dh, mask_kind=mask_kind, dtype=dtype):
                d = {
                    "q": torch.randn(b, hq, sq, dh, device=dev).to(dtype),
                    # (B, S, H, D) storage viewed as (B, H, S, D): strided inputs
                    "k": torch.randn(b, sk, hkv, dh, device=dev).to(dtype).transpose(1, 2),
                    "v": torch.randn(b, hkv, sk, dh, device=dev).to(dtype),
                    "gy": torch.randn(b, hq, sq, dh, device=dev),
                    "mask": None,
                }
                if mask_kind == "bool":
                    m = torch.rand(b, 1, sq, sk, device=dev) > 0.3
                    m[..., 0] = True  # every row sees a key: the SDPA baseline is NaN-free
                    d["mask"] = m
                elif mask_kind == "float":
                    d["mask"] = torch.randn(1, hq, sq, sk, device=dev).to(dtype)
                elif mask_kind == "padding":
                    lens = torch.randint(1, sk + 1, (b,), device=dev)
                    d["mask"] = (torch.arange(sk, device=dev)[None, :] < lens[:, None])[:, None, None, :]
                return d

            gqa = hq != hkv

            def run_a(d, causal=causal, gqa=gqa):
                q, k, v = _leaf(d["q"]), _leaf(d["k"]), _leaf(d["v"])
                y = L.scaled_dot_product_attention(q, k, v, d["mask"], is_causal=causal, enable_gqa=gqa)
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            def ref_a(d, causal=causal):
                q, k, v = (_f64(_leaf(d[n])) for n in ("q", "k", "v"))
                y = R.attention(q, k, v, d["mask"], is_causal=causal)
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            def base_a(d, causal=causal, gqa=gqa):
                q, k, v = _leaf(d["q"]), _leaf(d["k"]), _leaf(d["v"])
                mask = d["mask"]
                if causal and mask is not None:  # SDPA takes one or the other: fold causal in
                    tri = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
                    mask = (mask & tri) if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
                    causal = False
                y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            label = f"B{b} H{hq}/{hkv} S{sq}x{sk} D{dh}{' causal' if causal else ''}{' ' + mask_kind if mask_kind else ''}"
            yield Case("attention", label, dtype, make, run_a, ref_a, base_a, quick=quick)

    for dtype in HALF_AND_FLOAT:
        for b, hq, hkv, t, smax, dh in ((3, 4, 2, 1, 40, 64), (2, 2, 1, 3, 33, 32)):

            def make_d(dev, b=b, hq=hq, hkv=hkv, t=t, smax=smax, dh=dh, dtype=dtype):
                return {
                    "q": torch.randn(b, hq, t, dh, device=dev).to(dtype),
                    "k": torch.randn(b, hkv, smax, dh, device=dev).to(dtype),
                    "v": torch.randn(b, hkv, smax, dh, device=dev).to(dtype),
                    "lens": torch.randint(t, smax + 1, (b,), device=dev, dtype=torch.int32),
                }

            def run_d(d):
                return {"out": L.decode_attention(d["q"], d["k"], d["v"], d["lens"])}

            def ref_d(d):
                return {"out": R.decode_attention(*(d[n].to(torch.float64) for n in ("q", "k", "v")), d["lens"], None, True)}

            def base_d(d):
                from .ops.attention import decode_mask

                q = d["q"]
                m = decode_mask(d["lens"], q.shape[2], d["k"].shape[2], True)
                return {"out": F.scaled_dot_product_attention(q, d["k"], d["v"], m, enable_gqa=True)}

            yield Case("decode_attention", f"B{b} H{hq}/{hkv} T{t} S{smax} D{dh}", dtype, make_d, run_d, ref_d, base_d)


def _int8_cases() -> Iterable[Case]:
    for dtype in HALF_AND_FLOAT:
        for shape in ((1, 1), (7, 33), (33, 1023)):

            def make_q(dev, shape=shape, dtype=dtype):
                x = torch.randn(shape, device=dev).to(dtype)
                x[0] = 0  # an all-zero row: scale 0, no NaN
                return {"x": x}

            def run_q(d):
                q, s = L.quantize_int8(d["x"])
                return {"q": q, "scale": s}

            def ref_q(d):
                q, s = R.quantize_int8(d["x"])
                return {"q": q, "scale": s}

            yield Case("quantize_int8", "x".join(map(str, shape)), dtype, make_q, run_q, ref_q, None, exact=True)

    for m, k, n in ((1, 7, 3), (17, 33, 65), (64, 128, 96)):

        def make_mm(dev, m=m, k=k, n=n):
            return {
                "a": torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8),
                "b": torch.randint(-127, 128, (k, n), device=dev, dtype=torch.int8),
            }

        yield Case(
            "int8_matmul", f"{m}x{k}x{n}", torch.int8, make_mm,
            lambda d: {"out": L.int8_matmul(d["a"], d["b"])},
            lambda d: {"out": R.int8_matmul(d["a"], d["b"]).to(torch.int32)},
            None, exact=True,
        )

    for dtype in HALF_AND_FLOAT:
        for mode, min_db in (("w8a8", 25.0), ("w8a16", 30.0)):
            for m, k, n in ((1, 64, 48), (33, 256, 130)):

                def make_lin(dev, m=m, k=k, n=n, dtype=dtype):
                    w = torch.randn(n, k, device=dev)
                    wq, ws = R.quantize_int8(w)
                    return {"x": torch.randn(m, k, device=dev).to(dtype), "w": wq, "ws": ws,
                            "bias": torch.randn(n, device=dev).to(dtype), "wf": w}

                def run_lin(d, mode=mode):
                    return {"out": L.int8_linear(d["x"], d["w"], d["ws"], d["bias"], mode=mode)}

                def ref_lin(d):
                    y = d["x"].to(torch.float64) @ d["wf"].to(torch.float64).t() + d["bias"].to(torch.float64)
                    return {"out": y}

                yield Case("int8_linear", f"{mode} {m}x{k}x{n}", dtype, make_lin, run_lin, ref_lin, None,
                           min_sqnr_db=min_db)


def all_cases() -> list[Case]:
    """Every check case of every op."""
    return [*_norm_cases(), *_gelu_cases(), *_attention_cases(), *_int8_cases()]


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------


def _fmt_dtype(dt: torch.dtype) -> str:
    return _names(dt)


def run_case(case: Case, backend: str, device: torch.device) -> list[Row]:
    """Run one case on one backend and device; one row per output."""
    base = dict(op=case.op, backend=backend, device=device.type, dtype=_fmt_dtype(case.dtype), shape=case.label)
    try:
        data = case.make(device)
    except Exception as exc:  # pragma: no cover - input construction is ours
        return [Row(**base, output="-", max_abs_err=math.nan, rel_err=math.nan, tolerance=math.nan,
                    status="FAIL", note=f"making inputs failed: {exc!r}")]
    try:
        with use_backend(backend):
            got = case.run(data)
    except BackendError as exc:
        reasons = "; ".join("; ".join(r) for r in exc.reasons.values()) or str(exc)
        return [Row(**base, output="-", max_abs_err=math.nan, rel_err=math.nan, tolerance=math.nan,
                    status="SKIP", note=reasons)]
    except Exception as exc:
        return [Row(**base, output="-", max_abs_err=math.nan, rel_err=math.nan, tolerance=math.nan,
                    status="FAIL", note=f"{type(exc).__name__}: {exc}")]
    ref = case.ref(data)
    baseline = case.base(data) if case.base is not None else None
    rows = []
    for name, out in got.items():
        r = ref[name]
        if case.exact:
            exact = out.dtype == r.dtype and out.shape == r.shape and torch.equal(out.cpu(), r.cpu())
            diff = 0.0 if exact else float((out.cpu().double() - r.cpu().double()).abs().max()) if out.shape == r.shape else math.inf
            rows.append(Row(**base, output=name, max_abs_err=diff, rel_err=0.0 if exact else math.nan,
                            tolerance=0.0, status="PASS" if exact else "FAIL",
                            note="" if exact else "must be bit-exact"))
        elif case.min_sqnr_db is not None:
            db = sqnr_db(out, r)
            err = float((out.double() - r.cpu().double().to(out.device)).abs().max())
            ok = db >= case.min_sqnr_db and bool(torch.isfinite(out).all())
            rows.append(Row(**base, output=name, max_abs_err=err, rel_err=math.nan, tolerance=math.nan,
                            status="PASS" if ok else "FAIL", note=f"SQNR {db:.1f} dB (needs >= {case.min_sqnr_db:.0f})"))
        else:
            c = compare(name, out, r, baseline[name])
            rows.append(Row(**base, output=name, max_abs_err=c.max_abs_err, rel_err=c.max_rel_err,
                            tolerance=c.tolerance, status="PASS" if c.passed else "FAIL"))
    return rows


def targets(backends: list[str] | None) -> list[tuple[str, torch.device]]:
    """(backend, device) pairs to check on this machine."""
    from .dispatch import BACKENDS

    names = backends or list(BACKEND_NAMES)
    out = []
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    for name in names:
        for dev in devices:
            if BACKENDS[name].unavailable_reason(dev.type) is None:
                out.append((name, dev))
    return out


def run_check(
    ops: list[str] | None = None,
    backends: list[str] | None = None,
    quick: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Row]:
    """Run the checker and return every row."""
    cases = [c for c in all_cases() if (ops is None or c.op in ops) and (c.quick or not quick)]
    work = []
    for backend, dev in targets(backends):
        for c in cases:
            stages = OPS.get(c.op, {})
            if not any(backend in p.impls for p in stages.values()):
                continue  # this backend has no implementation of the op at all
            work.append((c, backend, dev))
    rows: list[Row] = []
    for i, (c, backend, dev) in enumerate(work):
        if progress:
            progress(i, len(work), f"{c.op} {backend} {dev.type} {_fmt_dtype(c.dtype)} {c.label}")
        rows.extend(run_case(c, backend, dev))
    if progress:
        progress(len(work), len(work), "done")
    return rows


def format_rows(rows: list[Row]) -> str:
    """The table ``llmkit check`` prints."""
    head = (f"{'op':16} {'backend':9} {'dev':4} {'dtype':8} {'shape':30} {'output':13} "
            f"{'max abs err':>11} {'rel err':>9} {'tolerance':>9}  result")
    lines = [head, "-" * len(head)]

    def num(x: float) -> str:
        return "-" if x != x else f"{x:.2e}"

    for r in rows:
        lines.append(
            f"{r.op:16} {r.backend:9} {r.device:4} {r.dtype:8} {r.shape[:30]:30} {r.output[:13]:13} "
            f"{num(r.max_abs_err):>11} {num(r.rel_err):>9} {num(r.tolerance):>9}  {r.status}"
            + (f"  ({r.note})" if r.note else "")
        )
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines.append("")
    lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return "\n".join(lines)


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``llmkit check``."""
    p.add_argument("--op", action="append", dest="ops", metavar="OP",
                   help="check only this op (repeatable); default: all")
    p.add_argument("--backend", action="append", dest="backends", metavar="NAME",
                   help=f"check only this backend (repeatable): {', '.join(BACKEND_NAMES)}")
    p.add_argument("--quick", action="store_true", help="only the small shapes")
    p.add_argument("--json", metavar="FILE", help="also write every row as JSON to FILE")
    p.add_argument("--compile", action="store_true",
                   help="also compile every Triton kernel for sm_80 and sm_90 and report resources")


def _progress(i: int, n: int, what: str) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {what[:60]:60}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_check_cli(args: argparse.Namespace) -> int:
    """``llmkit check``: print the table, optionally write JSON; 1 on any failure."""
    from .dispatch import BACKENDS, check_backend_name

    known_ops = sorted({c.op for c in all_cases()})
    for op in args.ops or []:
        if op not in known_ops:
            print(f"llmkit check: unknown op {op!r}; ops are {', '.join(known_ops)}", file=sys.stderr)
            return 2
    for b in args.backends or []:
        check_backend_name(b)
    t0 = time.perf_counter()
    pairs = targets(args.backends)
    for name in args.backends or BACKEND_NAMES:
        if not any(n == name for n, _ in pairs):
            reasons = {d: BACKENDS[name].unavailable_reason(d) for d in ("cuda", "cpu")}
            why = "; ".join(f"{d}: {r}" for d, r in reasons.items() if r)
            print(f"backend {name}: not checked ({why})")
    rows = run_check(args.ops, args.backends, args.quick, _progress)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [dataclasses.asdict(r) for r in rows], "compile_problems": compile_problems},
                      f, indent=1, default=str)
    print(f"\nchecked in {time.perf_counter() - t0:.1f} s")
    if not rows:
        print("nothing was checked", file=sys.stderr)
        return 1
    return 1 if failed or compile_problems else 0
