"""GELU and bias + GELU on the cuda_ext backend: the extension's vectorized kernels (CPU and CUDA)."""

from __future__ import annotations

from torch import Tensor

from ...ops.gelu import (
    BiasGeluBackwardCall,
    BiasGeluCall,
    GeluBackwardCall,
    GeluCall,
    bias_gelu_backward,
    bias_gelu_forward,
    gelu_backward,
    gelu_forward,
)
from ._common import BACKEND, CPU_DEFAULT, FLOAT_DTYPES, ext_ops, rows, shaped


def _flat_rows(x: Tensor) -> Tensor:
    return shaped(x, (1, x.numel()))


@gelu_forward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["gelu.forward"])
def gelu_forward_cuda_ext(c: GeluCall) -> Tensor:
    """Elementwise GELU in float32, 16-byte vectorized."""
    out = ext_ops().bias_gelu_fwd(_flat_rows(c.input), None, c.approximate == "tanh")
    return shaped(out, c.input.shape)


@gelu_backward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["gelu.backward"])
def gelu_backward_cuda_ext(c: GeluBackwardCall) -> Tensor:
    """grad_out * GELU'(input)."""
    dx, _ = ext_ops().bias_gelu_bwd(_flat_rows(c.grad_out), _flat_rows(c.input), None, False, c.approximate == "tanh")
    return shaped(dx, c.input.shape)


@bias_gelu_forward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["bias_gelu.forward"])
def bias_gelu_forward_cuda_ext(c: BiasGeluCall) -> Tensor:
    """gelu(input + bias): the add in float32, never written."""
    n = c.input.shape[-1]
    out = ext_ops().bias_gelu_fwd(rows(c.input, n), c.bias, c.approximate == "tanh")
    return shaped(out, c.input.shape)


@bias_gelu_backward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["bias_gelu.backward"])
def bias_gelu_backward_cuda_ext(c: BiasGeluBackwardCall) -> tuple[Tensor, Tensor]:
    """(d input, d bias); d bias sums the float32 d input over rows, in a fixed order."""
    n = c.input.shape[-1]
    dx, db = ext_ops().bias_gelu_bwd(rows(c.grad_out, n), rows(c.input, n), c.bias, True, c.approximate == "tanh")
    return shaped(dx, c.input.shape), db.to(c.bias.dtype)
