"""GELU and fused bias + GELU: what defines the ops.

Ops (``torch.library`` custom ops with fake implementations and autograd):

* ``llmkit::gelu(input, approximate) -> out``: ``approximate`` is ``"none"`` (exact,
  erf) or ``"tanh"``, as in ``torch.nn.functional.gelu``.
* ``llmkit::bias_gelu(input, bias, approximate) -> out``: ``gelu(input + bias)`` with
  ``bias`` of shape ``(N,)`` broadcast over the last dimension of ``input (*, N)``;
  the add happens in float32, so the sum is never rounded before the GELU.
* ``llmkit::gelu_backward``, ``llmkit::bias_gelu_backward`` (the latter returns
  ``(d input, d bias)``; ``d bias`` is ``d input`` summed over the leading dims).

float16 / bfloat16 inputs are computed in float32 and rounded once. Dispatch points
``gelu.forward/backward`` and ``bias_gelu.forward/backward``, with the call classes
below; the implementations live in ``llmkit/backends/<backend>/gelu.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._op import Op

__all__ = ["gelu", "bias_gelu"]


class GeluCall(NamedTuple):
    input: Tensor
    approximate: str


class GeluBackwardCall(NamedTuple):
    grad_out: Tensor
    input: Tensor
    approximate: str


class BiasGeluCall(NamedTuple):
    input: Tensor
    bias: Tensor
    approximate: str


class BiasGeluBackwardCall(NamedTuple):
    grad_out: Tensor
    input: Tensor
    bias: Tensor
    approximate: str


gelu_forward = DispatchPoint("gelu", "forward", GeluCall)
gelu_backward = DispatchPoint("gelu", "backward", GeluBackwardCall)
bias_gelu_forward = DispatchPoint("bias_gelu", "forward", BiasGeluCall)
bias_gelu_backward = DispatchPoint("bias_gelu", "backward", BiasGeluBackwardCall)


# --------------------------------------------------------------------------------------
# validation (shared by every backend: it runs before dispatch)
# --------------------------------------------------------------------------------------


def _check_gelu(op: str, input: Tensor, approximate: str) -> None:
    V.check_tensor(op, "input", input)
    V.check_floating(op, "input", input)
    V.check_approximate(op, approximate)


def _check_bias(op: str, input: Tensor, bias: Tensor) -> None:
    V.check_tensor(op, "bias", bias)
    if input.dim() == 0:
        raise ValueError(f"{op}: input must have at least 1 dimension, got a 0-d tensor")
    if bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
        raise ValueError(
            f"{op}: bias has shape {list(bias.shape)}; it must be [{input.shape[-1]}], the size "
            f"of input's last dimension (input shape {list(input.shape)})"
        )
    allowed = (input.dtype, torch.float32) if input.dtype in V.HALF_DTYPES else (input.dtype,)
    if bias.dtype not in allowed:
        raise TypeError(
            f"{op}: bias has dtype {V.dtype_name(bias.dtype)}; with a {V.dtype_name(input.dtype)} "
            f"input it must be {' or '.join(V.dtype_name(d) for d in allowed)}"
        )
    V.check_same_device(op, input=input, bias=bias)


def check_gelu(c: GeluCall) -> None:
    _check_gelu("gelu", c.input, c.approximate)


def check_gelu_backward(c: GeluBackwardCall) -> None:
    _check_gelu("gelu_backward", c.input, c.approximate)
    V.check_grad("gelu_backward", "grad_out", c.grad_out, c.input, "input")


def check_bias_gelu(c: BiasGeluCall) -> None:
    _check_gelu("bias_gelu", c.input, c.approximate)
    _check_bias("bias_gelu", c.input, c.bias)


def check_bias_gelu_backward(c: BiasGeluBackwardCall) -> None:
    _check_gelu("bias_gelu_backward", c.input, c.approximate)
    _check_bias("bias_gelu_backward", c.input, c.bias)
    V.check_grad("bias_gelu_backward", "grad_out", c.grad_out, c.input, "input")


# --------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------

GELU = Op("gelu", GeluCall, Tensor, gelu_forward, check_gelu, lambda c: c.input.new_empty(c.input.shape))
GELU_BACKWARD = Op(
    "gelu_backward",
    GeluBackwardCall,
    Tensor,
    gelu_backward,
    check_gelu_backward,
    lambda c: c.input.new_empty(c.input.shape),
)
BIAS_GELU = Op(
    "bias_gelu", BiasGeluCall, Tensor, bias_gelu_forward, check_bias_gelu, lambda c: c.input.new_empty(c.input.shape)
)
BIAS_GELU_BACKWARD = Op(
    "bias_gelu_backward",
    BiasGeluBackwardCall,
    tuple[Tensor, Tensor],
    bias_gelu_backward,
    check_bias_gelu_backward,
    lambda c: (c.input.new_empty(c.input.shape), c.bias.new_empty(c.bias.shape)),
)


def _gelu_setup(ctx, c: GeluCall, output) -> None:
    ctx.approximate = c.approximate
    ctx.save_for_backward(c.input)


def _gelu_bwd(ctx, grad_out):
    (input,) = ctx.saved_tensors
    return torch.ops.llmkit.gelu_backward(grad_out, input, ctx.approximate), None


GELU.register_autograd(_gelu_bwd, _gelu_setup)


def _bias_gelu_setup(ctx, c: BiasGeluCall, output) -> None:
    ctx.approximate = c.approximate
    ctx.save_for_backward(c.input, c.bias)


def _bias_gelu_bwd(ctx, grad_out):
    input, bias = ctx.saved_tensors
    dx, dbias = torch.ops.llmkit.bias_gelu_backward(grad_out, input, bias, ctx.approximate)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dbias if need[1] else None), None


BIAS_GELU.register_autograd(_bias_gelu_bwd, _bias_gelu_setup)


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """GELU, like ``F.gelu``: exact (``approximate="none"``, erf) or ``"tanh"``.

    ``input``: any shape and strides, float16 / bfloat16 / float32 / float64. Output
    has the input's shape and dtype. Differentiable.
    """
    return GELU(GeluCall(input, approximate))


def bias_gelu(input: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """Fused ``gelu(input + bias)``.

    ``input``: ``(*, N)``; ``bias``: ``(N,)`` in the input's dtype (or float32 with a half
    input). The add is done in float32 and the sum is never written to memory.
    Differentiable in both; ``d bias`` is reduced over the leading dims.
    """
    return BIAS_GELU(BiasGeluCall(input, bias, approximate))
