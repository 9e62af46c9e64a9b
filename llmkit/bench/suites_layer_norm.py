"""Norm suites: layer_norm, rms_norm, add_layer_norm, add_rms_norm.

Each case is ``x (M, N)`` in the benchmark dtype with fresh random data, forward or
backward. Implementations: PyTorch eager (the unfused sequence: ``x + residual`` then
``F.layer_norm``), its ``torch.compile``,
llmkit's op on each backend, and Liger-Kernel's modules / functions on CUDA when installed.
Judged in GB/s against the measured copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as L
from . import formulas
from .suite import Case, Context, Impl, OpCall, Suite, elem_size, optional_module, register, standard_impls

LN_EPS = 1e-5
RMS_EPS = 1e-6


def _liger_impls(ctx: Context, call: OpCall, kind: str, n: int, w: torch.Tensor, b: torch.Tensor | None) -> list[Impl]:
    """Liger-Kernel's LayerNorm / RMSNorm module (CUDA only, when installed)."""
    if ctx.device.type != "cuda":
        return []
    liger = optional_module("liger_kernel.transformers")
    if liger is None:
        return []
    try:
        if kind == "layer_norm":
            mod = liger.LigerLayerNorm(n, eps=LN_EPS)
            mod.bias.data.copy_(b)
        else:
            mod = liger.LigerRMSNorm(n, eps=RMS_EPS)
        mod.weight.data.copy_(w)
        mod = mod.to(device=ctx.device, dtype=w.dtype)
    except Exception as exc:  # a peer whose API moved: say so, do not stop
        return [Impl.skipped("liger-kernel", f"could not set up liger_kernel's module: {exc!r}")]
    for p in mod.parameters():
        p.requires_grad_(False)
    return [call.impl("liger-kernel", lambda x, *_: mod(x))]


def rows(ctx: Context, point: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    m, n = point["M"], point["N"]
    dev = ctx.device
    return {
        "x": (torch.randn(m, n, device=dev) * 2 + 1).to(dtype),
        "r": torch.randn(m, n, device=dev).to(dtype),
        "w": (torch.rand(n, device=dev) + 0.5).to(dtype),
        "b": torch.randn(n, device=dev).to(dtype),
        "dy": torch.randn(m, n, device=dev).to(dtype),
        "ds": torch.randn(m, n, device=dev).to(dtype),
    }


def _norm_builder(kind: str) -> Callable[[Context, dict[str, Any], str, torch.dtype], Case]:
    def build(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
        m, n = point["M"], point["N"]
        d = rows(ctx, point, dtype)
        bwd = pass_ == "bwd"
        x, r, w, b = d["x"], d["r"], d["w"], d["b"]
        if kind == "layer_norm":
            call = OpCall([x, w, b], pass_, wrt=(0, 1, 2), grads=[d["dy"]])
            impls = standard_impls(
                ctx,
                kind,
                call,
                lambda x, w, b: F.layer_norm(x, (n,), w, b, LN_EPS),
                lambda x, w, b: L.layer_norm(x, [n], w, b, LN_EPS),
            ) + _liger_impls(ctx, call, kind, n, w, b)
            work = formulas.layer_norm(m, n, elem_size(dtype), bwd)
        elif kind == "rms_norm":
            call = OpCall([x, w], pass_, wrt=(0, 1), grads=[d["dy"]])
            impls = standard_impls(
                ctx,
                kind,
                call,
                lambda x, w: F.rms_norm(x, (n,), w, RMS_EPS),
                lambda x, w: L.rms_norm(x, [n], w, RMS_EPS),
            ) + _liger_impls(ctx, call, kind, n, w, None)
            work = formulas.rms_norm(m, n, elem_size(dtype), bwd)
        elif kind == "add_rms_norm":  # the unfused eager sequence is add, then rms_norm

            def eager_rms(x, r, w):
                s = x + r
                return F.rms_norm(s, (n,), w, RMS_EPS), s

            call = OpCall([x, r, w], pass_, wrt=(0, 1, 2), grads=[d["dy"], d["ds"]])
            impls = standard_impls(ctx, kind, call, eager_rms, lambda x, r, w: L.add_rms_norm(x, r, [n], w, RMS_EPS))
            work = formulas.add_rms_norm(m, n, elem_size(dtype), bwd)
        else:  # add_layer_norm: the unfused eager sequence is add, then layer_norm

            def eager(x, r, w, b):
                s = x + r
                return F.layer_norm(s, (n,), w, b, LN_EPS), s

            call = OpCall([x, r, w, b], pass_, wrt=(0, 1, 2, 3), grads=[d["dy"], d["ds"]])
            impls = standard_impls(ctx, kind, call, eager, lambda x, r, w, b: L.add_layer_norm(x, r, [n], w, b, LN_EPS))
            work = formulas.add_layer_norm(m, n, elem_size(dtype), bwd)
        return Case(kind, pass_, point, dtype, work, "memory", impls)

    return build


for _kind, _desc in (
    ("layer_norm", "LayerNorm over the last dim of x (M, N)"),
    ("rms_norm", "RMSNorm over the last dim of x (M, N)"),
    ("add_layer_norm", "fused residual add + LayerNorm vs eager add then F.layer_norm"),
    ("add_rms_norm", "fused residual add + RMSNorm vs eager add then F.rms_norm"),
):
    register(Suite(_kind, "op", ("fwd", "bwd"), _norm_builder(_kind), _desc))
