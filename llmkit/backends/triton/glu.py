"""GeGLU and SwiGLU on the triton backend (``kernels/glu.py``, imported on first use)."""

from __future__ import annotations

from torch import Tensor

from ...ops import _validate as V
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
from ._common import INT32_MAX, TRITON_DTYPES


def _reasons(gate: Tensor, up: Tensor, grad_out: Tensor | None = None) -> list[str]:
    """Why the Triton kernels cannot take these arguments."""
    out = []
    for name, t in (("gate", gate), ("up", up), ("grad_out", grad_out)):
        if t is None:
            continue
        if t.dtype not in TRITON_DTYPES:
            out.append(f"{name} has dtype {V.dtype_name(t.dtype)}; the kernels take float16, bfloat16, float32")
        elif t.dtype != gate.dtype:
            out.append(f"{name} has dtype {V.dtype_name(t.dtype)}, gate {V.dtype_name(gate.dtype)}")
        if t.shape != gate.shape:
            out.append(f"{name} has shape {list(t.shape)}, gate {list(gate.shape)}")
    if len({t.device for t in (gate, up, grad_out) if t is not None}) > 1:
        out.append("tensors on different devices")
    n = gate.shape[-1] if gate.dim() else 1
    if n > INT32_MAX or (n and gate.numel() // n > INT32_MAX):
        out.append(f"shape {list(gate.shape)} exceeds the kernels' int32 row indexing")
    return out


def _act(activation: str, approximate: str = "none") -> int:
    from ...kernels import glu as K

    return K.act_code(activation, approximate)


@geglu_forward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.gate, c.up))
def geglu_forward_triton(c: GegluCall) -> Tensor:
    """gelu(gate) * up in one kernel (float32 math, one rounding)."""
    from ...kernels import glu as K

    return K.glu_forward(c.gate, c.up, _act("gelu", c.approximate))


@geglu_backward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.gate, c.up, c.grad_out))
def geglu_backward_triton(c: GegluBackwardCall) -> tuple[Tensor, Tensor]:
    """(d gate, d up) in one kernel, the GELU recomputed."""
    from ...kernels import glu as K

    return K.glu_backward(c.grad_out, c.gate, c.up, _act("gelu", c.approximate))


@swiglu_forward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.gate, c.up))
def swiglu_forward_triton(c: SwigluCall) -> Tensor:
    """silu(gate) * up in one kernel (float32 math, one rounding)."""
    from ...kernels import glu as K

    return K.glu_forward(c.gate, c.up, K.SILU)


@swiglu_backward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.gate, c.up, c.grad_out))
def swiglu_backward_triton(c: SwigluBackwardCall) -> tuple[Tensor, Tensor]:
    """(d gate, d up) in one kernel, the SiLU recomputed."""
    from ...kernels import glu as K

    return K.glu_backward(c.grad_out, c.gate, c.up, K.SILU)
