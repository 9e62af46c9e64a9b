"""GELU and bias + GELU on the reference backend: ATen, float32 math for 16-bit inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from ._common import compute_dtype


def gelu_grad(grad_out: Tensor, z: Tensor, approximate: str) -> Tensor:
    """``grad_out * gelu'(z)`` through ATen; for the tanh form, past |z| = 10 the derivative is
    0 or 1 to within 1e-33 and ATen's ``z**3`` overflows float32 (NaN from |z| ~ 1e13): the
    tails are taken as such (``+ 0 * z``: NaN at z = +-inf, as float64's formula)."""
    dz = torch.ops.aten.gelu_backward(grad_out, z, approximate=approximate)
    if approximate != "tanh":
        return dz
    tail = grad_out * ((z > 0).to(z.dtype) + 0.0 * z)
    return torch.where(z.abs() > 10.0, tail, dz)


@gelu_forward.register("reference")
def gelu_forward_reference(c: GeluCall) -> Tensor:
    """GELU through ATen, which computes float16 / bfloat16 inputs in float32 and rounds once."""
    return F.gelu(c.input, approximate=c.approximate).contiguous()


@gelu_backward.register("reference")
def gelu_backward_reference(c: GeluBackwardCall) -> Tensor:
    """d GELU / d input times grad_out, in float32 for half inputs."""
    cdt = compute_dtype(c.input.dtype)
    dx = gelu_grad(c.grad_out.to(cdt), c.input.to(cdt), c.approximate)
    return dx.to(c.input.dtype).contiguous()


@bias_gelu_forward.register("reference")
def bias_gelu_forward_reference(c: BiasGeluCall) -> Tensor:
    """gelu(input + bias) with the add in float32 (float64 for float64)."""
    cdt = compute_dtype(c.input.dtype)
    pre = torch.add(c.input.to(cdt), c.bias.to(cdt))
    return F.gelu(pre, approximate=c.approximate).to(c.input.dtype).contiguous()


@bias_gelu_backward.register("reference")
def bias_gelu_backward_reference(c: BiasGeluBackwardCall) -> tuple[Tensor, Tensor]:
    """(d input, d bias) of gelu(input + bias); d bias sums d input over leading dims."""
    cdt = compute_dtype(c.input.dtype)
    pre = torch.add(c.input.to(cdt), c.bias.to(cdt))
    dpre = gelu_grad(c.grad_out.to(cdt), pre, c.approximate)
    # sum over the leading dims (reshape(-1, N) is ambiguous when N == 0)
    dbias = (dpre.flatten(0, -2) if dpre.dim() > 1 else dpre.unsqueeze(0)).sum(0)
    return dpre.to(c.input.dtype).contiguous(), dbias.to(c.bias.dtype)
