"""GELU and fused bias + GELU.

Ops (``torch.library`` custom ops with fake implementations and autograd):

* ``llmkit::gelu(input, approximate) -> out``: ``approximate`` is ``"none"`` (exact,
  erf) or ``"tanh"``, as in ``torch.nn.functional.gelu``.
* ``llmkit::bias_gelu(input, bias, approximate) -> out``: ``gelu(input + bias)`` with
  ``bias`` of shape ``(N,)`` broadcast over the last dimension of ``input (*, N)``;
  the add happens in float32, so the sum is never rounded before the GELU.
* ``llmkit::gelu_backward``, ``llmkit::bias_gelu_backward`` (the latter returns
  ``(d input, d bias)``; ``d bias`` is ``d input`` summed over the leading dims).

float16 / bfloat16 inputs are computed in float32 and rounded once. Dispatch
points ``gelu.forward/backward`` and ``bias_gelu.forward/backward``; this module
registers the ``reference`` backend and the ``triton`` backend, whose kernels
(``kernels/gelu.py``) are imported on first use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _fastpath as FP
from . import _validate as V

__all__ = ["gelu", "bias_gelu"]

gelu_forward = DispatchPoint("gelu", "forward")
gelu_backward = DispatchPoint("gelu", "backward")
bias_gelu_forward = DispatchPoint("bias_gelu", "forward")
bias_gelu_backward = DispatchPoint("bias_gelu", "backward")


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _check_gelu_backward(grad_out: Tensor, input: Tensor, approximate: str) -> None:
    _check_gelu("gelu_backward", input, approximate)
    V.check_grad("gelu_backward", "grad_out", grad_out, input, "input")


def _check_bias_gelu_backward(grad_out: Tensor, input: Tensor, bias: Tensor, approximate: str) -> None:
    _check_gelu("bias_gelu_backward", input, approximate)
    _check_bias("bias_gelu_backward", input, bias)
    V.check_grad("bias_gelu_backward", "grad_out", grad_out, input, "input")


# --------------------------------------------------------------------------------------
# reference backend
# --------------------------------------------------------------------------------------


@gelu_forward.register("reference")
def gelu_forward_reference(input: Tensor, approximate: str) -> Tensor:
    """GELU through ATen, which computes float16 / bfloat16 inputs in float32 and rounds once."""
    return F.gelu(input, approximate=approximate).contiguous()


@gelu_backward.register("reference")
def gelu_backward_reference(grad_out: Tensor, input: Tensor, approximate: str) -> Tensor:
    """d GELU / d input times grad_out, in float32 for half inputs."""
    cdt = _cdt(input.dtype)
    dx = torch.ops.aten.gelu_backward(grad_out.to(cdt), input.to(cdt), approximate=approximate)
    return dx.to(input.dtype).contiguous()


@bias_gelu_forward.register("reference")
def bias_gelu_forward_reference(input: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """gelu(input + bias) with the add in float32 (float64 for float64)."""
    cdt = _cdt(input.dtype)
    pre = torch.add(input.to(cdt), bias.to(cdt))
    return F.gelu(pre, approximate=approximate).to(input.dtype).contiguous()


@bias_gelu_backward.register("reference")
def bias_gelu_backward_reference(
    grad_out: Tensor, input: Tensor, bias: Tensor, approximate: str
) -> tuple[Tensor, Tensor]:
    """(d input, d bias) of gelu(input + bias); d bias sums d input over leading dims."""
    cdt = _cdt(input.dtype)
    pre = torch.add(input.to(cdt), bias.to(cdt))
    dpre = torch.ops.aten.gelu_backward(grad_out.to(cdt), pre, approximate=approximate)
    # sum over the leading dims (reshape(-1, N) is ambiguous when N == 0)
    dbias = (dpre.flatten(0, -2) if dpre.dim() > 1 else dpre.unsqueeze(0)).sum(0)
    return dpre.to(input.dtype).contiguous(), dbias.to(bias.dtype)


# --------------------------------------------------------------------------------------
# triton backend (kernels/gelu.py, imported on first use)
# --------------------------------------------------------------------------------------

TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the Triton kernels take (float64 goes to the reference backend)."""


def _triton_reasons(input: Tensor, bias: Tensor | None = None, grad_out: Tensor | None = None) -> list[str]:
    """Why the Triton kernels cannot take these arguments (backward ops are not validated)."""
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
    if n > 2**31 - 1 or (n and input.numel() // n > 2**31 - 1):
        out.append(f"shape {list(input.shape)} exceeds the kernels' int32 row indexing")
    return out


@gelu_forward.register(
    "triton", dtypes=TRITON_DTYPES, why_not=lambda input, approximate: _triton_reasons(input)
)
def gelu_forward_triton(input: Tensor, approximate: str) -> Tensor:
    """GELU through the Triton kernel (float32 math, one rounding)."""
    from ..kernels import gelu as K

    return K.gelu_forward(input, None, approximate == "tanh")


@gelu_backward.register(
    "triton", dtypes=TRITON_DTYPES,
    why_not=lambda grad_out, input, approximate: _triton_reasons(input, grad_out=grad_out),
)
def gelu_backward_triton(grad_out: Tensor, input: Tensor, approximate: str) -> Tensor:
    """grad_out * gelu'(input) through the Triton kernel."""
    from ..kernels import gelu as K

    dx, _ = K.gelu_backward(grad_out, input, None, approximate == "tanh")
    return dx


@bias_gelu_forward.register(
    "triton", dtypes=TRITON_DTYPES, why_not=lambda input, bias, approximate: _triton_reasons(input, bias)
)
def bias_gelu_forward_triton(input: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """gelu(input + bias) in one kernel; the float32 sum never reaches memory."""
    from ..kernels import gelu as K

    return K.gelu_forward(input, bias, approximate == "tanh")


@bias_gelu_backward.register(
    "triton", dtypes=TRITON_DTYPES,
    why_not=lambda grad_out, input, bias, approximate: _triton_reasons(input, bias, grad_out),
)
def bias_gelu_backward_triton(
    grad_out: Tensor, input: Tensor, bias: Tensor, approximate: str
) -> tuple[Tensor, Tensor]:
    """(d input, d bias): d bias from per-program partial column sums and a second pass."""
    from ..kernels import gelu as K

    dx, dbias = K.gelu_backward(grad_out, input, bias, approximate == "tanh")
    return dx, dbias


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("llmkit::gelu", mutates_args=())
def _gelu_op(input: Tensor, approximate: str) -> Tensor:
    _check_gelu("gelu", input, approximate)
    return gelu_forward(input, approximate)


@_gelu_op.register_fake
def _(input, approximate):
    _check_gelu("gelu", input, approximate)
    return input.new_empty(input.shape)


@torch.library.custom_op("llmkit::gelu_backward", mutates_args=())
def _gelu_backward_op(grad_out: Tensor, input: Tensor, approximate: str) -> Tensor:
    _check_gelu_backward(grad_out, input, approximate)
    return gelu_backward(grad_out, input, approximate)


@_gelu_backward_op.register_fake
def _(grad_out, input, approximate):
    _check_gelu_backward(grad_out, input, approximate)
    return input.new_empty(input.shape)


def _gelu_setup(ctx, inputs, output):
    input, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(input)


def _gelu_bwd(ctx, grad_out):
    (input,) = ctx.saved_tensors
    return torch.ops.llmkit.gelu_backward(grad_out, input, ctx.approximate), None


torch.library.register_autograd("llmkit::gelu", _gelu_bwd, setup_context=_gelu_setup)


@torch.library.custom_op("llmkit::bias_gelu", mutates_args=())
def _bias_gelu_op(input: Tensor, bias: Tensor, approximate: str) -> Tensor:
    _check_gelu("bias_gelu", input, approximate)
    _check_bias("bias_gelu", input, bias)
    return bias_gelu_forward(input, bias, approximate)


@_bias_gelu_op.register_fake
def _(input, bias, approximate):
    _check_gelu("bias_gelu", input, approximate)
    _check_bias("bias_gelu", input, bias)
    return input.new_empty(input.shape)


@torch.library.custom_op("llmkit::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(
    grad_out: Tensor, input: Tensor, bias: Tensor, approximate: str
) -> tuple[Tensor, Tensor]:
    _check_bias_gelu_backward(grad_out, input, bias, approximate)
    return bias_gelu_backward(grad_out, input, bias, approximate)


@_bias_gelu_backward_op.register_fake
def _(grad_out, input, bias, approximate):
    _check_bias_gelu_backward(grad_out, input, bias, approximate)
    return input.new_empty(input.shape), bias.new_empty(bias.shape)


def _bias_gelu_setup(ctx, inputs, output):
    input, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(input, bias)


def _bias_gelu_bwd(ctx, grad_out):
    input, bias = ctx.saved_tensors
    dx, dbias = torch.ops.llmkit.bias_gelu_backward(grad_out, input, bias, ctx.approximate)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dbias if need[1] else None), None


torch.library.register_autograd("llmkit::bias_gelu", _bias_gelu_bwd, setup_context=_bias_gelu_setup)


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------

_VALIDATED = FP.ValidatedSignatures()
"""Argument signatures that passed validation on the eager fast path (see ``_fastpath``)."""


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """GELU, like ``F.gelu``: exact (``approximate="none"``, erf) or ``"tanh"``.

    ``input``: any shape and strides, float16 / bfloat16 / float32 / float64. Output
    has the input's shape and dtype. Differentiable.
    """
    if FP.eager_ok(input) and type(approximate) is str:
        key = ("gelu", input.dtype, approximate)  # validation reads only these
        _VALIDATED.check(key, lambda: _check_gelu("gelu", input, approximate))
        return gelu_forward(input, approximate)
    return torch.ops.llmkit.gelu(input, approximate)


def bias_gelu(input: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """Fused ``gelu(input + bias)``.

    ``input``: ``(*, N)``; ``bias``: ``(N,)`` in the input's dtype (or float32 with a half
    input). The add is done in float32 and the sum is never written to memory.
    Differentiable in both; ``d bias`` is reduced over the leading dims.
    """
    if FP.eager_ok(input, bias) and type(approximate) is str:
        key = ("bias_gelu", input.shape, input.dtype, bias.shape, bias.dtype, approximate)
        _VALIDATED.check(key, lambda: (_check_gelu("bias_gelu", input, approximate),
                                       _check_bias("bias_gelu", input, bias)))
        return bias_gelu_forward(input, bias, approximate)
    return torch.ops.llmkit.bias_gelu(input, bias, approximate)
