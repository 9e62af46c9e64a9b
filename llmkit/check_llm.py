"""``llmkit check`` cases of the norms and gated activations of today's LLMs: ``swiglu`` and
``geglu``; ``rms_norm`` with Gemma's offset and Llama's casting order; ``add_rms_norm`` and
``add_layer_norm`` with a float32 residual stream and input dropout.

Built like the cases of :mod:`llmkit.check` (its :class:`~llmkit.check.Case`, layouts and
helpers): fresh random inputs, the op forward and backward on the backend in force, PyTorch's
unfused code in the same dtype as the baseline, the float64 formulas of
:mod:`llmkit.reference64` as the yardstick.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from . import ops as L
from . import reference64 as R
from .check import NORM_SHAPES, WITH_F64, Case, _f64, _grads, _label, _leaf, laid_out
from .ops._philox import row_dropout_keep_mask

# (shape, layout, quick, interp); "halves": gate and up are the two halves of one (*, 2N) tensor
GLU_SHAPES = [
    ((1,), "contig", True, True),
    ((7, 1023), "contig", True, True),
    ((7, 1023), "halves", True, True),
    ((0, 33), "contig", True, True),
    ((33, 7), "transposed", True, True),
    ((4, 5, 96), "permuted", False, True),
    ((3, 5, 1500), "contig", False, False),
    ((2, 65537), "contig", False, False),
]

GLU_ACTIVATIONS = (("swiglu", None), ("geglu", "none"), ("geglu", "tanh"))


def _pair(shape: tuple[int, ...], layout: str, dtype: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, ...]:
    if layout == "halves":
        h = (torch.randn((*shape[:-1], 2 * shape[-1]), device=dev) * 3).to(dtype)
        return h[..., : shape[-1]], h[..., shape[-1] :]
    gate = laid_out((torch.randn(shape, device=dev) * 3).to(dtype), layout)
    return gate, laid_out(torch.randn(shape, device=dev).to(dtype), layout)


def glu_cases() -> Iterable[Case]:
    """swiglu and geglu (exact and tanh) over the sweep, every dtype."""
    for dtype in WITH_F64:
        for shape, layout, quick, interp in GLU_SHAPES:
            if dtype == torch.float64 and quick:
                continue  # float64 (reference-only on most backends): the non-quick sweep
            for op, approx in GLU_ACTIVATIONS:

                def make(dev, shape=shape, dtype=dtype, layout=layout):
                    gate, up = _pair(shape, layout, dtype, dev)
                    return {"gate": gate, "up": up, "gy": torch.randn(shape, device=dev)}

                def fns(op=op, approx=approx):
                    if op == "swiglu":
                        return L.swiglu, R.swiglu, lambda g, u: F.silu(g) * u
                    return (
                        lambda g, u: L.geglu(g, u, approx),
                        lambda g, u: R.geglu(g, u, approx),
                        lambda g, u: F.gelu(g, approximate=approx) * u,
                    )

                def run(d, fns=fns):
                    g, u = _leaf(d["gate"]), _leaf(d["up"])
                    y = fns()[0](g, u)
                    return {"out": y} | _grads(y, d["gy"], {"gate": g, "up": u})

                def ref(d, fns=fns):
                    g, u = _f64(_leaf(d["gate"])), _f64(_leaf(d["up"]))
                    y = fns()[1](g, u)
                    return {"out": y} | _grads(y, d["gy"], {"gate": g, "up": u})

                def base(d, fns=fns):
                    g, u = _leaf(d["gate"]), _leaf(d["up"])
                    y = fns()[2](g, u)
                    return {"out": y} | _grads(y, d["gy"], {"gate": g, "up": u})

                label = _label(shape, layout) + (f" {approx}" if approx else "")
                yield Case(op, label, dtype, make, run, ref, base, quick=quick, interp=interp)


# (label, offset, cast_before_weight, residual_in_fp32, dropout_p): the RMSNorm conventions of
# Llama / T5 (x_hat rounded first) and Gemma (offset 1), a float32 residual stream, dropout
LLM_NORM_VARIANTS = [
    ("", 0.0, False, False, 0.0),
    (" llama-order", 0.0, True, False, 0.0),
    (" gemma offset=1", 1.0, False, False, 0.0),
    (" fp32-residual", 0.0, True, True, 0.0),
    (" dropout=0.2", 1.0, False, False, 0.2),
]
LLM_NORM_SHAPES = [s for s in NORM_SHAPES if s[0] != (1023, 64)]
_SEED = 20240917


def _norm_data(dev, shape, dtype, layout, n, rdt):
    return {
        "x": laid_out((torch.randn(shape, device=dev) * 2 + 1).to(dtype), layout),
        "r": laid_out(torch.randn(shape, device=dev).to(rdt), layout),
        "w": (torch.rand(n, device=dev) - 0.5).to(dtype),
        "b": torch.randn(n, device=dev).to(dtype),
        "gy": torch.randn(shape, device=dev),
        "gs": torch.randn(shape, device=dev),
        "n": n,
    }


def llm_norm_cases() -> Iterable[Case]:
    """rms_norm with the LLM options; add_rms_norm and add_layer_norm with a float32 residual
    stream and input dropout (the custom op with a fixed seed, the float64 formula with the same
    keep mask)."""
    for dtype in WITH_F64:
        half = dtype in (torch.float16, torch.bfloat16)
        for shape, layout, quick, interp in LLM_NORM_SHAPES:
            if dtype == torch.float64 and quick:
                continue
            n = shape[-1]
            for tag, offset, cast, fp32_res, p in LLM_NORM_VARIANTS:
                rdt = torch.float32 if fp32_res and half else dtype
                cast_to = dtype if cast else None

                def make(dev, shape=shape, dtype=dtype, layout=layout, n=n, rdt=rdt):
                    return _norm_data(dev, shape, dtype, layout, n, rdt)

                def keep(d, p=p):
                    return row_dropout_keep_mask(_SEED, d["x"].shape, p, d["x"].device) if p else None

                kw = dict(quick=quick and tag in ("", " fp32-residual"), interp=interp)
                label = _label(shape, layout) + tag
                if tag and not fp32_res and not p:  # (the plain rms_norm sweep is llmkit.check's)

                    def run_rms(d, offset=offset, cast=cast):
                        x, w = _leaf(d["x"]), _leaf(d["w"])
                        y = L.rms_norm(x, [d["n"]], w, 1e-6, offset=offset, cast_before_weight=cast)
                        return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w})

                    def ref_rms(d, offset=offset, cast_to=cast_to):
                        x, w = _f64(_leaf(d["x"])), _f64(_leaf(d["w"]))
                        y = R.rms_norm(x, [d["n"]], w, 1e-6, offset, cast_to)
                        return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w})

                    def base_rms(d, offset=offset, cast=cast):
                        x, w = _leaf(d["x"]), _leaf(d["w"])
                        y = _model_rms(x, w, offset, cast)
                        return {"out": y} | _grads(y, d["gy"], {"input": x, "weight": w})

                    yield Case("rms_norm", label, dtype, make, run_rms, ref_rms, base_rms, **kw)

                def run_arn(d, offset=offset, cast=cast, fp32_res=fp32_res, p=p):
                    x, r, w = _leaf(d["x"]), _leaf(d["r"]), _leaf(d["w"])
                    y, s, _ = torch.ops.llmkit.add_rms_norm(x, r, [d["n"]], w, 1e-6, offset, cast, fp32_res, p, _SEED)
                    return {"out": y, "residual_out": s} | _add_grads(y, s, d, {"input": x, "residual": r, "weight": w})

                def ref_arn(d, offset=offset, cast_to=cast_to, rdt=rdt, p=p, keep=keep):
                    x, r, w = (_f64(_leaf(d[k])) for k in ("x", "r", "w"))
                    y, s = R.add_rms_norm(x, r, [d["n"]], w, 1e-6, offset, cast_to, rdt, keep(d), p)
                    return {"out": y, "residual_out": s} | _add_grads(y, s, d, {"input": x, "residual": r, "weight": w})

                def base_arn(d, offset=offset, cast=cast, rdt=rdt, keep=keep, p=p):
                    x, r, w = _leaf(d["x"]), _leaf(d["r"]), _leaf(d["w"])
                    s = _model_add(x, r, rdt, keep(d), p)
                    y = _model_rms(s, w, offset, cast).to(x.dtype)
                    return {"out": y, "residual_out": s} | _add_grads(y, s, d, {"input": x, "residual": r, "weight": w})

                yield Case("add_rms_norm", label, dtype, make, run_arn, ref_arn, base_arn, **kw)
                if not (fp32_res or p):
                    continue

                def run_aln(d, fp32_res=fp32_res, p=p):
                    x, r, w, b = (_leaf(d[k]) for k in ("x", "r", "w", "b"))
                    y, s, _, _ = torch.ops.llmkit.add_layer_norm(x, r, [d["n"]], w, b, 1e-5, fp32_res, p, _SEED)
                    return {"out": y, "residual_out": s} | _add_grads(
                        y, s, d, {"input": x, "residual": r, "weight": w, "bias": b}
                    )

                def ref_aln(d, rdt=rdt, p=p, keep=keep):
                    x, r, w, b = (_f64(_leaf(d[k])) for k in ("x", "r", "w", "b"))
                    y, s = R.add_layer_norm(x, r, [d["n"]], w, b, 1e-5, rdt, keep(d), p)
                    return {"out": y, "residual_out": s} | _add_grads(
                        y, s, d, {"input": x, "residual": r, "weight": w, "bias": b}
                    )

                def base_aln(d, rdt=rdt, keep=keep, p=p):
                    x, r, w, b = (_leaf(d[k]) for k in ("x", "r", "w", "b"))
                    s = _model_add(x, r, rdt, keep(d), p)
                    y = F.layer_norm(s, [d["n"]], w.to(s.dtype), b.to(s.dtype), 1e-5).to(x.dtype)
                    return {"out": y, "residual_out": s} | _add_grads(
                        y, s, d, {"input": x, "residual": r, "weight": w, "bias": b}
                    )

                yield Case("add_layer_norm", label, dtype, make, run_aln, ref_aln, base_aln, **kw)


def _model_rms(x: torch.Tensor, w: torch.Tensor, offset: float, cast: bool) -> torch.Tensor:
    """RMSNorm as the models write it, in x's dtype: Llama's ``(offset + w) * x_hat.to(dtype)``
    (cast) or Gemma's ``(x_hat * (offset + w.float())).to(dtype)``."""
    h = x.float() if x.dtype != torch.float64 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    if cast:
        return (w + offset) * h.to(x.dtype)
    return (h * (offset + w.to(h.dtype))).to(x.dtype)


def _model_add(x: torch.Tensor, r: torch.Tensor, rdt: torch.dtype, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """``dropout(x) + r`` as unfused code does it, the sum in ``rdt``."""
    if keep is not None:
        x = (x.float() * keep * (1.0 / (1.0 - p))).to(x.dtype)
    return x.to(rdt) + r.to(rdt)


def _add_grads(y: torch.Tensor, s: torch.Tensor, d: dict, named: dict) -> dict:
    """Gradients of (out, residual_out) with random output gradients into every named leaf."""
    leaves = {k: v for k, v in named.items() if v is not None and v.requires_grad}
    gs = torch.autograd.grad(
        [y, s], list(leaves.values()), [d["gy"].to(y.dtype), d["gs"].to(s.dtype)], allow_unused=True
    )
    return {
        f"grad_{k}": (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), gs, strict=True)
    }
