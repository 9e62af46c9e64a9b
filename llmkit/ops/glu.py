"""Gated linear units of today's LLM feed-forward blocks: GeGLU and SwiGLU.

Ops (``torch.library`` custom ops with fake implementations and autograd):

* ``llmkit::geglu(gate, up, approximate) -> out``: ``gelu(gate) * up``, ``approximate``
  ``"none"`` (exact, erf) or ``"tanh"`` as in ``torch.nn.functional.gelu`` (T5 v1.1 /
  Flan-T5 and Gemma use the tanh form);
* ``llmkit::swiglu(gate, up) -> out``: ``silu(gate) * up`` (Llama, Mistral, Qwen2);
* ``llmkit::geglu_backward(grad_out, gate, up, approximate) -> (d gate, d up)`` and
  ``llmkit::swiglu_backward(grad_out, gate, up) -> (d gate, d up)``.

``gate`` and ``up`` have one shape (any), one floating dtype and one device; any strides
(e.g. the two halves of one ``(*, 2N)`` projection). The output has their shape and
dtype, contiguous. float16 / bfloat16 are computed in float32 and rounded once: the
activation is never rounded before the product. The backward recomputes the activation
from the saved ``gate`` and ``up`` instead of storing it.

Dispatch points ``geglu.forward/backward`` and ``swiglu.forward/backward``, with the call
classes below; the implementations live in ``llmkit/backends/<backend>/glu.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._op import Op

__all__ = ["geglu", "swiglu"]


class GegluCall(NamedTuple):
    gate: Tensor
    up: Tensor
    approximate: str


class GegluBackwardCall(NamedTuple):
    grad_out: Tensor
    gate: Tensor
    up: Tensor
    approximate: str


class SwigluCall(NamedTuple):
    gate: Tensor
    up: Tensor


class SwigluBackwardCall(NamedTuple):
    grad_out: Tensor
    gate: Tensor
    up: Tensor


geglu_forward = DispatchPoint("geglu", "forward", GegluCall)
geglu_backward = DispatchPoint("geglu", "backward", GegluBackwardCall)
swiglu_forward = DispatchPoint("swiglu", "forward", SwigluCall)
swiglu_backward = DispatchPoint("swiglu", "backward", SwigluBackwardCall)


# --------------------------------------------------------------------------------------
# validation (shared by every backend: it runs before dispatch)
# --------------------------------------------------------------------------------------


def _check_pair(op: str, gate: Tensor, up: Tensor) -> None:
    V.check_tensor(op, "gate", gate)
    V.check_floating(op, "gate", gate)
    V.check_tensor(op, "up", up)
    if up.shape != gate.shape:
        raise ValueError(f"{op}: up has shape {list(up.shape)}; it must equal gate's shape {list(gate.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(
            f"{op}: up has dtype {V.dtype_name(up.dtype)}; it must equal gate's dtype {V.dtype_name(gate.dtype)}"
        )
    V.check_same_device(op, gate=gate, up=up)


def check_geglu(c: GegluCall) -> None:
    _check_pair("geglu", c.gate, c.up)
    V.check_approximate("geglu", c.approximate)


def check_geglu_backward(c: GegluBackwardCall) -> None:
    _check_pair("geglu_backward", c.gate, c.up)
    V.check_approximate("geglu_backward", c.approximate)
    V.check_grad("geglu_backward", "grad_out", c.grad_out, c.gate, "gate")


def check_swiglu(c: SwigluCall) -> None:
    _check_pair("swiglu", c.gate, c.up)


def check_swiglu_backward(c: SwigluBackwardCall) -> None:
    _check_pair("swiglu_backward", c.gate, c.up)
    V.check_grad("swiglu_backward", "grad_out", c.grad_out, c.gate, "gate")


# --------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------


def _like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


GEGLU = Op("geglu", GegluCall, Tensor, geglu_forward, check_geglu, lambda c: _like(c.gate))
GEGLU_BACKWARD = Op(
    "geglu_backward",
    GegluBackwardCall,
    tuple[Tensor, Tensor],
    geglu_backward,
    check_geglu_backward,
    lambda c: (_like(c.gate), _like(c.gate)),
)
SWIGLU = Op("swiglu", SwigluCall, Tensor, swiglu_forward, check_swiglu, lambda c: _like(c.gate))
SWIGLU_BACKWARD = Op(
    "swiglu_backward",
    SwigluBackwardCall,
    tuple[Tensor, Tensor],
    swiglu_backward,
    check_swiglu_backward,
    lambda c: (_like(c.gate), _like(c.gate)),
)


def _geglu_setup(ctx, c: GegluCall, output) -> None:
    ctx.approximate = c.approximate
    ctx.save_for_backward(c.gate, c.up)


def _geglu_bwd(ctx, grad_out):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.llmkit.geglu_backward(grad_out, gate, up, ctx.approximate)
    need = ctx.needs_input_grad
    return (dgate if need[0] else None), (dup if need[1] else None), None


GEGLU.register_autograd(_geglu_bwd, _geglu_setup)


def _swiglu_setup(ctx, c: SwigluCall, output) -> None:
    ctx.save_for_backward(c.gate, c.up)


def _swiglu_bwd(ctx, grad_out):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.llmkit.swiglu_backward(grad_out, gate, up)
    need = ctx.needs_input_grad
    return (dgate if need[0] else None), (dup if need[1] else None)


SWIGLU.register_autograd(_swiglu_bwd, _swiglu_setup)


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """Fused ``gelu(gate, approximate) * up`` (GeGLU).

    ``gate``, ``up``: the same shape (any strides), dtype (float16 / bfloat16 / float32 /
    float64) and device. Returns their shape and dtype, contiguous; the GELU is computed in
    float32 (float64 for float64) and never rounded before the product. Differentiable in
    both; the backward recomputes the GELU.
    """
    return GEGLU(GegluCall(gate, up, approximate))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fused ``silu(gate) * up`` (SwiGLU), ``silu(g) = g * sigmoid(g)``.

    Shapes, dtypes and precision as :func:`geglu`. Differentiable in both; the backward
    recomputes the SiLU.
    """
    return SWIGLU(SwigluCall(gate, up))
