"""GeGLU and SwiGLU on the cuda_ext backend: the extension's C++ CPU kernels (no CUDA kernels:
on GPUs the Triton kernels run, then the reference).

``gate`` and ``up`` go to the kernels as 2-D row views with their own row strides (the two
halves of one projection are read in place); contiguous inputs as one flat row.
"""

from __future__ import annotations

from torch import Tensor

from ...ops.glu import (
    GegluBackwardCall,
    GegluCall,
    SwigluBackwardCall,
    SwigluCall,
    geglu_backward,
    geglu_forward,
    swiglu_backward,
    swiglu_forward,
)
from ._common import BACKEND, CPU_DEFAULT, FLOAT_DTYPES, ext_ops, rows, shaped

SILU, GELU_ERF, GELU_TANH = 0, 1, 2
"""The kernels' activation codes (``kGlu*`` in csrc/cpu/cpu_kernels.h)."""


def _views(*ts: Tensor) -> list[Tensor]:
    """The tensors as 2-D rows: one flat row when all are contiguous, else ``(rows, N)``."""
    if all(t.is_contiguous() for t in ts):
        return [shaped(t, (1, t.numel())) for t in ts]
    n = ts[0].shape[-1]
    return [rows(t, n) for t in ts]


def _forward(c: GegluCall | SwigluCall, act: int) -> Tensor:
    g, u = _views(c.gate, c.up)
    return shaped(ext_ops().glu_fwd(g, u, act), c.gate.shape)


def _backward(c: GegluBackwardCall | SwigluBackwardCall, act: int) -> tuple[Tensor, Tensor]:
    dy, g, u = _views(c.grad_out, c.gate, c.up)
    dg, du = ext_ops().glu_bwd(dy, g, u, act)
    return shaped(dg, c.gate.shape), shaped(du, c.gate.shape)


def _gelu_act(approximate: str) -> int:
    return GELU_TANH if approximate == "tanh" else GELU_ERF


@geglu_forward.register(BACKEND, devices=("cpu",), dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["geglu.forward"])
def geglu_forward_cuda_ext(c: GegluCall) -> Tensor:
    """gelu(gate) * up in one pass, float32 math, one rounding."""
    return _forward(c, _gelu_act(c.approximate))


@geglu_backward.register(BACKEND, devices=("cpu",), dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["geglu.backward"])
def geglu_backward_cuda_ext(c: GegluBackwardCall) -> tuple[Tensor, Tensor]:
    """(d gate, d up) in one pass, the GELU recomputed."""
    return _backward(c, _gelu_act(c.approximate))


@swiglu_forward.register(BACKEND, devices=("cpu",), dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["swiglu.forward"])
def swiglu_forward_cuda_ext(c: SwigluCall) -> Tensor:
    """silu(gate) * up in one pass, float32 math, one rounding."""
    return _forward(c, SILU)


@swiglu_backward.register(BACKEND, devices=("cpu",), dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["swiglu.backward"])
def swiglu_backward_cuda_ext(c: SwigluBackwardCall) -> tuple[Tensor, Tensor]:
    """(d gate, d up) in one pass, the SiLU recomputed."""
    return _backward(c, SILU)
