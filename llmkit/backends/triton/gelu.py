"""GELU and bias + GELU on the triton backend (``kernels/gelu.py``, imported on first use)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops import _validate as V
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
from ._common import INT32_MAX, TRITON_DTYPES


def _reasons(input: Tensor, bias: Tensor | None = None, grad_out: Tensor | None = None) -> list[str]:
    """Why the Triton kernels cannot take these arguments."""
    out = []
    if input.dtype not in TRITON_DTYPES:
        out.append(f"takes float16, bfloat16, float32 inputs, got {V.dtype_name(input.dtype)}")
    if grad_out is not None:
        if grad_out.shape != input.shape:
            out.append(f"grad_out has shape {list(grad_out.shape)}, the input {list(input.shape)}")
        if grad_out.dtype not in TRITON_DTYPES:
            out.append(f"grad_out has dtype {V.dtype_name(grad_out.dtype)}")
    if bias is not None:
        if input.dim() == 0 or list(bias.shape) != [input.shape[-1]]:
            out.append(f"bias has shape {list(bias.shape)} for an input of shape {list(input.shape)}")
        if bias.dtype not in (input.dtype, torch.float32):
            out.append(f"bias has dtype {V.dtype_name(bias.dtype)}")
    if len({t.device for t in (input, bias, grad_out) if t is not None}) > 1:
        out.append("tensors on different devices")
    n = input.shape[-1] if input.dim() else 1
    if n > INT32_MAX or (n and input.numel() // n > INT32_MAX):
        out.append(f"shape {list(input.shape)} exceeds the kernels' int32 row indexing")
    return out


@gelu_forward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.input))
def gelu_forward_triton(c: GeluCall) -> Tensor:
    """GELU through the Triton kernel (float32 math, one rounding)."""
    from ...kernels import gelu as K

    return K.gelu_forward(c.input, None, c.approximate == "tanh")


@gelu_backward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.input, grad_out=c.grad_out))
def gelu_backward_triton(c: GeluBackwardCall) -> Tensor:
    """grad_out * gelu'(input) through the Triton kernel."""
    from ...kernels import gelu as K

    dx, _ = K.gelu_backward(c.grad_out, c.input, None, c.approximate == "tanh")
    return dx


@bias_gelu_forward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.input, c.bias))
def bias_gelu_forward_triton(c: BiasGeluCall) -> Tensor:
    """gelu(input + bias) in one kernel; the float32 sum never reaches memory."""
    from ...kernels import gelu as K

    return K.gelu_forward(c.input, c.bias, c.approximate == "tanh")


@bias_gelu_backward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.input, c.bias, c.grad_out))
def bias_gelu_backward_triton(c: BiasGeluBackwardCall) -> tuple[Tensor, Tensor]:
    """(d input, d bias): d bias from per-program partial column sums and a second pass."""
    from ...kernels import gelu as K

    dx, dbias = K.gelu_backward(c.grad_out, c.input, c.bias, c.approximate == "tanh")
    assert dbias is not None  # (given a bias, the kernel returns its gradient)
    return dx, dbias
