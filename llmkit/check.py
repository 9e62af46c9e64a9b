"""``llmkit check``: every op x every backend available here x dtypes x the shape sweep.

Each case draws fresh random inputs, runs the op on one backend (forward, and
backward with a random output gradient where the op is differentiable), runs
PyTorch's own implementation in the same dtype (the baseline), and computes the
same quantities in float64 from the independent formulas of
:mod:`llmkit.reference64`. An output passes by the rule of :mod:`llmkit.testing`
(error <= 2 x the baseline's error + a floor); int8 outputs must be bit-exact;
int8 linears are judged by SQNR against the float linear.

The sweep: sizes 1, 7, 33, 1023, 1500 and rows past every block
size (4097, 65537), strided and non-contiguous inputs (rows inside a wider buffer,
permuted and transposed views, ``(B, S, H, D)`` storage viewed as ``(B, H, S, D)``),
empty tensors, float32 / float16 / bfloat16 (and float64 where the op takes it).

On a machine without a GPU the reference backend runs on CPU tensors and Triton
kernels run through the interpreter (``TRITON_INTERPRET=1``, which the CLI sets); the
interpreter runs the cases marked ``interp`` (the largest shapes run on a GPU only, and
the table says how many were left out); with ``--quick`` it runs float32 and bfloat16.
Exit code: 0 all passed, 1 a failure, 2 nothing was checked, 3 something asked for was
skipped (unknown op, backend not available here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops as L
from . import reference64 as R

Outputs = dict[str, Tensor]

EXIT_OK, EXIT_FAILED, EXIT_NOTHING, EXIT_SKIPPED = 0, 1, 2, 3


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
    interp: bool = True
    """Small enough for the Triton interpreter (larger cases run on a GPU only)."""


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
    seconds: float = 0.0


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
    return {
        f"grad_{k}": (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), gs, strict=True)
    }


def _names(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def laid_out(t: Tensor, layout: str) -> Tensor:
    """A tensor equal to ``t`` in another memory layout.

    ``contig``: ``t``; ``rows``: each last-dim row inside a wider buffer (row stride > size);
    ``permuted``: leading two dims stored swapped; ``transposed``: a 2-d tensor stored
    as its transpose (last-dim stride != 1).
    """
    if layout == "contig":
        return t
    if layout == "rows":
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 9), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[..., 4 : 4 + t.shape[-1]]
        view.copy_(t)
        return view
    if layout == "permuted":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "transposed":
        return t.t().contiguous().t()
    raise ValueError(f"unknown layout {layout!r}")


def _label(shape: tuple[int, ...], layout: str) -> str:
    return "x".join(map(str, shape)) + ("" if layout == "contig" else f" {layout}")


HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
WITH_F64 = (*HALF_AND_FLOAT, torch.float64)

# (shape, layout, quick, interp): the row-wise sweep shared by norms
NORM_SHAPES = [
    ((1, 1), "contig", True, True),
    ((7, 33), "contig", True, True),
    ((7, 33), "rows", True, True),
    ((0, 33), "contig", True, True),
    ((3, 7, 1500), "contig", True, True),
    ((4, 5, 96), "permuted", False, True),
    ((1023, 64), "contig", False, False),
    ((2, 4097), "contig", False, True),
    ((2, 65537), "contig", False, False),
]


def _norm_cases() -> Iterable[Case]:
    for dtype in WITH_F64:
        for shape, layout, quick, interp in NORM_SHAPES:
            if dtype == torch.float64 and quick:
                continue  # float64 (reference-only on most backends): the non-quick sweep
            n = shape[-1]

            def make(dev, shape=shape, dtype=dtype, n=n, layout=layout):
                # mean far from zero: LayerNorm must stay stable
                return {
                    "x": laid_out((torch.randn(shape, device=dev) * 2 + 3).to(dtype), layout),
                    "w": (torch.rand(n, device=dev) + 0.5).to(dtype),
                    "b": torch.randn(n, device=dev).to(dtype),
                    "r": laid_out(torch.randn(shape, device=dev).to(dtype), layout),
                    "gy": torch.randn(shape, device=dev),
                    "n": n,
                }

            label = _label(shape, layout)
            kw = dict(quick=quick, interp=interp)

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

            yield Case("layer_norm", label, dtype, make, run_ln, ref_ln, base_ln, **kw)

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

            yield Case("rms_norm", label, dtype, make, run_rms, ref_rms, base_rms, **kw)

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

            yield Case("add_layer_norm", label, dtype, make, run_aln, ref_aln, base_aln, **kw)


GELU_SHAPES = [
    ((1,), "contig", True, True),
    ((7, 1023), "contig", True, True),
    ((0, 33), "contig", True, True),
    ((0,), "contig", False, True),
    ((33, 7), "transposed", True, True),
    ((3, 5, 1500), "contig", False, False),
    ((2, 65537), "contig", False, False),
]


def _gelu_cases() -> Iterable[Case]:
    for dtype in WITH_F64:
        for shape, layout, quick, interp in GELU_SHAPES:
            if dtype == torch.float64 and quick:
                continue
            for approx in ("none", "tanh"):
                n = shape[-1]

                def make(dev, shape=shape, dtype=dtype, n=n, layout=layout):
                    return {
                        "x": laid_out((torch.randn(shape, device=dev) * 3).to(dtype), layout),
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

                label = f"{_label(shape, layout)} {approx}"
                kw = dict(quick=quick, interp=interp)
                yield Case("gelu", label, dtype, make, run_g, ref_g, base_g, **kw)

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

                yield Case("bias_gelu", label, dtype, make, run_bg, ref_bg, base_bg, **kw)


# B, Hq, Hkv, Sq, Sk, D, Dv, causal, mask kind, quick, interp
ATTENTION_CONFIGS = [
    (1, 2, 2, 1, 1, 32, 32, False, None, True, True),
    (2, 2, 2, 17, 17, 64, 64, True, None, True, True),
    (1, 4, 2, 37, 65, 64, 64, False, "bool", True, True),
    (1, 2, 2, 0, 5, 32, 32, False, None, True, True),
    (0, 2, 2, 3, 4, 32, 32, True, None, True, True),
    (2, 2, 1, 33, 20, 80, 80, True, "float", False, True),
    (1, 2, 2, 129, 129, 128, 128, True, "padding", False, False),
    (1, 2, 2, 7, 23, 64, 32, False, None, False, True),
    (1, 2, 1, 70, 1025, 64, 64, False, "padding", False, False),
]


def _attention_cases() -> Iterable[Case]:
    for dtype in WITH_F64:
        for b, hq, hkv, sq, sk, dh, dv, causal, mask_kind, quick, interp in ATTENTION_CONFIGS:
            if dtype == torch.float64 and (quick or sk > 1024):
                continue

            def make(dev, b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, dh=dh, dv=dv, mask_kind=mask_kind, dtype=dtype):
                d = {
                    "q": torch.randn(b, hq, sq, dh, device=dev).to(dtype),
                    # (B, S, H, D) storage viewed as (B, H, S, D): strided inputs
                    "k": torch.randn(b, sk, hkv, dh, device=dev).to(dtype).transpose(1, 2),
                    "v": torch.randn(b, hkv, sk, dv, device=dev).to(dtype),
                    "gy": torch.randn(b, hq, sq, dv, device=dev),
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

            label = (
                f"B{b} H{hq}/{hkv} S{sq}x{sk} D{dh}{'' if dv == dh else f'/{dv}'}"
                f"{' causal' if causal else ''}{' ' + mask_kind if mask_kind else ''}"
            )
            yield Case("attention", label, dtype, make, run_a, ref_a, base_a, quick=quick, interp=interp)

    # B, Hq, Hkv, T, S_max, D, layout, quick, interp
    decode_configs = [
        (3, 4, 2, 1, 40, 64, "contig", True, True),
        (2, 2, 1, 3, 33, 32, "contig", True, True),
        (2, 4, 4, 1, 70, 64, "bshd", True, True),
        (0, 2, 2, 1, 8, 32, "contig", True, True),
        (4, 8, 2, 2, 1025, 128, "contig", False, False),
    ]
    for dtype in HALF_AND_FLOAT:
        for b, hq, hkv, t, smax, dh, layout, quick, interp in decode_configs:

            def make_d(dev, b=b, hq=hq, hkv=hkv, t=t, smax=smax, dh=dh, dtype=dtype, layout=layout):
                def cache() -> Tensor:
                    if layout == "bshd":  # (B, S, H, D) cache storage viewed as (B, H, S, D)
                        return torch.randn(b, smax, hkv, dh, device=dev).to(dtype).transpose(1, 2)
                    return torch.randn(b, hkv, smax, dh, device=dev).to(dtype)

                return {
                    "q": torch.randn(b, hq, t, dh, device=dev).to(dtype),
                    "k": cache(),
                    "v": cache(),
                    "lens": torch.randint(t, smax + 1, (b,), device=dev, dtype=torch.int32),
                }

            def run_d(d):
                return {"out": L.decode_attention(d["q"], d["k"], d["v"], d["lens"])}

            def ref_d(d):
                q, k, v = (d[n].to(torch.float64) for n in ("q", "k", "v"))
                if q.shape[0] == 0:  # reference64 loops over the batch; an empty one has nothing to loop
                    return {"out": q.new_empty(q.shape[:3] + v.shape[3:])}
                return {"out": R.decode_attention(q, k, v, d["lens"], None, True)}

            def base_d(d):
                from .ops.decode_attention import decode_mask

                q = d["q"]
                m = decode_mask(d["lens"], q.shape[2], d["k"].shape[2], True)
                return {"out": F.scaled_dot_product_attention(q, d["k"], d["v"], m, enable_gqa=True)}

            label = f"B{b} H{hq}/{hkv} T{t} S{smax} D{dh}{'' if layout == 'contig' else ' ' + layout}"
            yield Case("decode_attention", label, dtype, make_d, run_d, ref_d, base_d, quick=quick, interp=interp)


def _int8_cases() -> Iterable[Case]:
    quant_shapes = [
        ((1, 1), "contig", True, True),
        ((7, 33), "contig", True, True),
        ((33, 1023), "contig", True, True),
        ((0, 33), "contig", True, True),
        ((33, 7), "transposed", True, True),
        ((4, 5, 96), "permuted", False, True),
        ((2, 65537), "contig", False, False),
    ]
    for dtype in WITH_F64:
        for shape, layout, quick, interp in quant_shapes:
            if dtype == torch.float64 and quick:
                continue

            def make_q(dev, shape=shape, dtype=dtype, layout=layout):
                x = torch.randn(shape, device=dev).to(dtype)
                if x.shape[0]:
                    x[0] = 0  # an all-zero row: scale 0, no NaN
                return {"x": laid_out(x, layout)}

            def run_q(d):
                q, s = L.quantize_int8(d["x"])
                return {"q": q, "scale": s}

            def ref_q(d):
                q, s = R.quantize_int8(d["x"])
                return {"q": q, "scale": s}

            yield Case(
                "quantize_int8",
                _label(shape, layout),
                dtype,
                make_q,
                run_q,
                ref_q,
                None,
                exact=True,
                quick=quick,
                interp=interp,
            )

    # M, K, N, b layout, quick, interp
    for m, k, n, b_layout, quick, interp in (
        (1, 7, 3, "contig", True, True),
        (17, 33, 65, "contig", True, True),
        (64, 128, 96, "contig", True, True),
        (0, 16, 8, "contig", True, True),
        (33, 64, 40, "transposed", True, True),
        (130, 1023, 257, "contig", False, True),
    ):

        def make_mm(dev, m=m, k=k, n=n, b_layout=b_layout):
            return {
                "a": torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8),
                "b": laid_out(torch.randint(-127, 128, (k, n), device=dev, dtype=torch.int8), b_layout),
            }

        yield Case(
            "int8_matmul",
            _label((m, k, n), b_layout),
            torch.int8,
            make_mm,
            lambda d: {"out": L.int8_matmul(d["a"], d["b"])},
            lambda d: {"out": R.int8_matmul(d["a"], d["b"]).to(torch.int32)},
            None,
            exact=True,
            quick=quick,
            interp=interp,
        )

    # the scaled epilogue: acc * a_scale * b_scale + bias in float32, written as out_dtype
    for out_dtype in HALF_AND_FLOAT:
        for m, k, n, quick in ((5, 33, 17, True), (64, 256, 130, False)):

            def make_ep(dev, m=m, k=k, n=n):
                return {
                    "a": torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8),
                    "b": torch.randint(-127, 128, (k, n), device=dev, dtype=torch.int8),
                    "sa": torch.rand(m, device=dev) * 0.02 + 1e-3,
                    "sb": torch.rand(n, device=dev) * 0.02 + 1e-3,
                    "bias": torch.randn(n, device=dev),
                }

            def run_ep(d, od=out_dtype):
                return {"out": L.int8_matmul(d["a"], d["b"], d["sa"], d["sb"], d["bias"], od)}

            def ref_ep(d):
                acc = R.int8_matmul(d["a"], d["b"]).to(torch.float64)
                return {"out": acc * d["sa"].double()[:, None] * d["sb"].double()[None, :] + d["bias"].double()}

            def base_ep(d, od=out_dtype):
                acc = (d["a"].double() @ d["b"].double()).float()
                return {"out": (acc * d["sa"][:, None] * d["sb"][None, :] + d["bias"]).to(od)}

            yield Case(
                "int8_matmul",
                f"{m}x{k}x{n} scaled->{_names(out_dtype)}",
                out_dtype,
                make_ep,
                run_ep,
                ref_ep,
                base_ep,
                quick=quick,
            )

    for dtype in HALF_AND_FLOAT:
        for mode, min_db in (("w8a8", 25.0), ("w8a16", 30.0)):
            # lead shape, K, N, activation, input layout, quick
            for lead, k, n, act, layout, quick in (
                ((1,), 64, 48, "none", "contig", True),
                ((33,), 256, 130, "none", "contig", True),
                ((2, 5), 96, 40, "gelu", "contig", True),
                ((0,), 32, 16, "none", "contig", True),
                ((17,), 64, 24, "none", "transposed", False),
            ):

                def make_lin(dev, lead=lead, k=k, n=n, dtype=dtype, layout=layout):
                    w = torch.randn(n, k, device=dev)
                    wq, ws = R.quantize_int8(w)
                    return {
                        "x": laid_out(torch.randn(*lead, k, device=dev).to(dtype), layout),
                        "w": wq,
                        "ws": ws,
                        "bias": torch.randn(n, device=dev).to(dtype),
                        "wf": w,
                    }

                def run_lin(d, mode=mode, act=act):
                    return {"out": L.int8_linear(d["x"], d["w"], d["ws"], d["bias"], mode=mode, activation=act)}

                def ref_lin(d, act=act):
                    y = d["x"].to(torch.float64) @ d["wf"].to(torch.float64).t() + d["bias"].to(torch.float64)
                    return {"out": R.gelu(y) if act == "gelu" else y}

                label = f"{mode} {_label((*lead, k, n), layout)}{' gelu' if act != 'none' else ''}"
                yield Case(
                    "int8_linear", label, dtype, make_lin, run_lin, ref_lin, None, min_sqnr_db=min_db, quick=quick
                )


def all_cases() -> list[Case]:
    """Every check case of every op."""
    from . import check_decode, check_llm  # the cases of the LLM norms, gated activations, decode caches
    from .check_attention import attention_llm_cases  # attention's LLM options (imports this module)
    from .check_varlen import varlen_cases  # packed variable-length attention

    return [
        *_norm_cases(),
        *check_llm.llm_norm_cases(),
        *_gelu_cases(),
        *check_llm.glu_cases(),
        *_attention_cases(),
        *attention_llm_cases(),
        *varlen_cases(),
        *check_decode.decode_cache_cases(),
        *_int8_cases(),
    ]


# the running half lives in check_run.py (it imports the cases above)
from .check_run import (  # noqa: E402, F401  (the public API of llmkit.check)
    Plan,
    add_check_arguments,
    counts,
    format_rows,
    plan_check,
    run_case,
    run_check,
    run_check_cli,
    targets,
)
