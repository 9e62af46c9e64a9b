"""GeGLU and SwiGLU on the reference backend: ATen, float32 math for 16-bit inputs.

float32 / float64 inputs are computed in their own dtype (the activation's result is
rounded once before the product, as ``F.silu(gate) * up`` does); float16 / bfloat16 inputs
are converted to float32 and the product rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from ._common import compute_dtype
from .gelu import gelu_grad


def _wide(c_gate: Tensor, c_up: Tensor) -> tuple[Tensor, Tensor]:
    cdt = compute_dtype(c_gate.dtype)
    return c_gate.to(cdt), c_up.to(cdt)


@geglu_forward.register("reference")
def geglu_forward_reference(c: GegluCall) -> Tensor:
    """gelu(gate) * up: ATen's GELU, then the product, in float32 for half inputs."""
    g, u = _wide(c.gate, c.up)
    act = F.gelu(g, approximate=c.approximate)
    return act.mul_(u).to(c.gate.dtype).contiguous()


@geglu_backward.register("reference")
def geglu_backward_reference(c: GegluBackwardCall) -> tuple[Tensor, Tensor]:
    """d gate = grad_out * up * gelu'(gate), d up = grad_out * gelu(gate); the GELU recomputed."""
    g, u = _wide(c.gate, c.up)
    dy = c.grad_out.to(g.dtype)
    dgate = gelu_grad(dy * u, g, c.approximate)
    dup = F.gelu(g, approximate=c.approximate).mul_(dy)
    return dgate.to(c.gate.dtype).contiguous(), dup.to(c.gate.dtype).contiguous()


@swiglu_forward.register("reference")
def swiglu_forward_reference(c: SwigluCall) -> Tensor:
    """silu(gate) * up: ATen's SiLU, then the product, in float32 for half inputs."""
    g, u = _wide(c.gate, c.up)
    return F.silu(g).mul_(u).to(c.gate.dtype).contiguous()


@swiglu_backward.register("reference")
def swiglu_backward_reference(c: SwigluBackwardCall) -> tuple[Tensor, Tensor]:
    """With s = sigmoid(gate): d gate = grad_out * up * s * (1 + gate * (1 - s)) (ATen's
    ``silu_backward``), d up = grad_out * silu(gate); the SiLU recomputed."""
    g, u = _wide(c.gate, c.up)
    dy = c.grad_out.to(g.dtype)
    dup = F.silu(g).mul_(dy)
    dgate = torch.ops.aten.silu_backward(dy * u, g)
    return dgate.to(c.gate.dtype).contiguous(), dup.to(c.gate.dtype).contiguous()
