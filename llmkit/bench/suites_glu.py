"""Gated-activation suites: swiglu (``silu(gate) * up``) and geglu (``gelu_tanh(gate) * up``).

Each case is ``gate, up (M, N)`` in the benchmark dtype with fresh random data, forward or
backward. Implementations: PyTorch eager (``F.silu(gate) * up``), its ``torch.compile``,
llmkit's op on each backend, and Liger-Kernel's fused functions on CUDA when installed.
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


def _liger_glu(ctx: Context, call: OpCall, kind: str) -> list[Impl]:
    """Liger-Kernel's fused SiLU / GELU(tanh) times up (CUDA only, when installed)."""
    if ctx.device.type != "cuda":
        return []
    mod = optional_module(f"liger_kernel.ops.{kind}")
    if mod is None:
        return []
    fn = getattr(mod, "LigerSiLUMulFunction" if kind == "swiglu" else "LigerGELUMulFunction", None)
    if fn is None:
        return [Impl.skipped("liger-kernel", f"liger_kernel.ops.{kind} has no fused function this run knows")]
    return [call.impl("liger-kernel", lambda g, u: fn.apply(g, u))]


def _glu_builder(kind: str) -> Callable[[Context, dict[str, Any], str, torch.dtype], Case]:
    """SwiGLU, or GeGLU in its tanh form (Gemma's, T5 v1.1's, Liger-Kernel's)."""

    def build(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
        m, n = point["M"], point["N"]
        dev = ctx.device
        gate = (torch.randn(m, n, device=dev) * 2).to(dtype)
        up = torch.randn(m, n, device=dev).to(dtype)
        call = OpCall([gate, up], pass_, wrt=(0, 1), grads=[torch.randn(m, n, device=dev).to(dtype)])
        if kind == "swiglu":
            eager, fused, act = (lambda g, u: F.silu(g) * u), (lambda g, u: L.swiglu(g, u)), "silu"
        else:
            eager = lambda g, u: F.gelu(g, approximate="tanh") * u  # noqa: E731
            fused, act = (lambda g, u: L.geglu(g, u, "tanh")), "gelu"
        impls = standard_impls(ctx, kind, call, eager, fused) + _liger_glu(ctx, call, kind)
        work = formulas.glu(m * n, elem_size(dtype), act, pass_ == "bwd")
        return Case(kind, pass_, point, dtype, work, "memory", impls)

    return build


register(
    Suite("swiglu", "op", ("fwd", "bwd"), _glu_builder("swiglu"), "fused silu(gate) * up vs eager F.silu then mul")
)
register(
    Suite("geglu", "op", ("fwd", "bwd"), _glu_builder("geglu"), "fused gelu_tanh(gate) * up vs eager F.gelu then mul")
)
