"""Int8 suites: ``quantize_int8``, ``int8_w8a8`` and ``int8_w8a16``.

A float ``nn.Linear``-shaped weight ``W (N, K)`` with bias, quantized per output channel
(absmax, int8) by llmkit's ``quantize_int8``; activations ``x (M, K)`` in the benchmark
dtype. The baseline (``eager``) is the float ``F.linear`` in that dtype: on the CPU that
is float32 ``nn.Linear``, the yardstick of the CPU targets. Implementations:

* ``int8_w8a8``: llmkit's ``int8_linear(mode="w8a8")`` per backend, ``llmkit.nn.Int8Linear``
  (``from_float``, mode w8a8), ``torch._int_mm`` with PyTorch-op quantization and a separate
  dequant (and its ``torch.compile``), and bitsandbytes' ``Linear8bitLt`` on CUDA when
  installed. Integer TOP/s against the measured ``torch._int_mm`` ceiling.
* ``int8_w8a16``: llmkit's ``int8_linear(mode="w8a16")`` per backend, ``Int8Linear``
  (mode w8a16), and a dequantize-then-``F.linear`` written in PyTorch (and its
  ``torch.compile``). Weight-bound at small M: GB/s against the copy bandwidth.

Outputs are checked against the float linear by SQNR (the int8 error is real; a wrong
kernel is far below the threshold).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as L
from .._compat import int_mm
from . import formulas
from .suite import Case, Context, Impl, OpCall, Suite, elem_size, llmkit_attr, optional_module, register, standard_impls

MIN_SQNR_DB = {"w8a8": 20.0, "w8a16": 25.0}


def quantize_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization written as plain PyTorch ops."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv).clamp_(-127, 127).to(torch.int8)
    return q, (amax / 127.0).squeeze(-1)


def _dequantized(qs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    q, s = qs
    return q.float() * s.float()[:, None]


def _build_quantize(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
    m, k = point["M"], point["K"]
    x = torch.randn(m, k, device=ctx.device).to(dtype)
    call = OpCall([x], pass_)
    impls = standard_impls(
        ctx, "quantize_int8", call, quantize_eager, lambda x: L.quantize_int8(x), check="sqnr", min_sqnr_db=30.0
    )
    for imp in impls:
        if imp.fn is not None:
            imp.output = (lambda f: lambda: _dequantized(f()))(imp.fn)
        if imp.name == "torch.compile":
            imp.check, imp.min_sqnr_db = "sqnr", 30.0
    return Case("quantize_int8", pass_, point, dtype, formulas.quantize_int8(m, k, elem_size(dtype)), "memory", impls)


def _int_mm_dequant(x: torch.Tensor, wq_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PyTorch ops only: quantize x per row, ``torch._int_mm``, then a separate dequant."""
    q, s = quantize_eager(x)
    acc = int_mm(q, wq_t)
    return (acc.float() * s[:, None] * w_scale[None, :] + bias.float()).to(x.dtype)


def _dequant_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PyTorch ops only: dequantize the int8 weight, then ``F.linear`` in x's dtype."""
    w = (wq.float() * w_scale[:, None]).to(x.dtype)
    return F.linear(x, w, bias)


def _module_impl(call: OpCall, mode: str, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> Impl:
    cls, why = llmkit_attr("nn.Int8Linear")
    name = f"Int8Linear[{mode}]"
    if cls is None:
        return Impl.skipped(name, why or "missing")

    def make() -> Any:
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            lin.bias.copy_(bias)
        mod = cls.from_float(lin, mode=mode).eval()
        x = call.inputs[0]
        return lambda: mod(x)

    return Impl(name, make=make, check="sqnr", min_sqnr_db=MIN_SQNR_DB[mode])


def _bnb_impls(ctx: Context, call: OpCall, weight: torch.Tensor, bias: torch.Tensor) -> list[Impl]:
    if ctx.device.type != "cuda":
        return []
    bnb = optional_module("bitsandbytes")
    if bnb is None:
        return []

    def make() -> Any:
        n, k = weight.shape
        mod = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=0.0)
        mod.weight = bnb.nn.Int8Params(
            weight.detach().cpu().to(torch.float16), requires_grad=False, has_fp16_weights=False
        )
        mod.bias = torch.nn.Parameter(bias.detach().cpu().to(torch.float16), requires_grad=False)
        mod = mod.to(ctx.device)
        x = call.inputs[0].to(torch.float16)
        return lambda: mod(x)

    return [Impl("bitsandbytes[LLM.int8]", make=make, check="sqnr", min_sqnr_db=MIN_SQNR_DB["w8a8"])]


def _int8_builder(mode: str):
    def build(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
        m, n, k = point["M"], point["N"], point["K"]
        dev = ctx.device
        x = torch.randn(m, k, device=dev).to(dtype)
        weight = torch.randn(n, k, device=dev) / k**0.5
        bias = (torch.randn(n, device=dev) * 0.1).to(dtype)
        wq, ws = L.quantize_int8(weight)
        call = OpCall([x], pass_)
        impls = standard_impls(
            ctx,
            "int8_linear",
            call,
            lambda x: F.linear(x, weight.to(dtype), bias),
            lambda x: L.int8_linear(x, wq, ws, bias, mode=mode),
            check="sqnr",
            min_sqnr_db=MIN_SQNR_DB[mode],
        )
        # the float baseline is not compiled here; the compiled baseline is the int8 one
        impls = [i for i in impls if i.name != "torch.compile"]
        kw: dict[str, Any] = {"check": "sqnr", "min_sqnr_db": MIN_SQNR_DB[mode]}
        if mode == "w8a8":
            wq_t = wq.t()

            def int_mm_dequant(x: torch.Tensor) -> torch.Tensor:
                return _int_mm_dequant(x, wq_t, ws, bias)

            impls.append(call.impl("torch._int_mm+dequant", int_mm_dequant, **kw))
            if ctx.compile:
                impls.append(call.impl("torch.compile(_int_mm+dequant)", torch.compile(int_mm_dequant), **kw))
            impls += _bnb_impls(ctx, call, weight, bias)
            work, bound = formulas.int8_linear_w8a8(m, n, k, elem_size(dtype)), "int8"
        else:

            def dequant_linear(x: torch.Tensor) -> torch.Tensor:
                return _dequant_linear(x, wq, ws, bias)

            impls.append(call.impl("dequant+F.linear", dequant_linear, **kw))
            if ctx.compile:
                impls.append(call.impl("torch.compile(dequant+F.linear)", torch.compile(dequant_linear), **kw))
            work, bound = formulas.int8_linear_w8a16(m, n, k, elem_size(dtype)), "memory"
        impls.append(_module_impl(call, mode, weight, bias, dtype))
        return Case(f"int8_{mode}", pass_, point, dtype, work, bound, impls, cuda_graph=None)

    return build


register(
    Suite(
        "int8_w8a8",
        "op",
        ("fwd",),
        _int8_builder("w8a8"),
        "int8 x int8 linear with per-token activation quantization vs float F.linear",
    )
)
register(
    Suite(
        "int8_w8a16",
        "op",
        ("fwd",),
        _int8_builder("w8a16"),
        "weight-only int8 linear (decode-sized M) vs float F.linear",
    )
)
register(Suite("quantize_int8", "op", ("fwd",), _build_quantize, "per-row absmax int8 quantization of x (M, K)"))
