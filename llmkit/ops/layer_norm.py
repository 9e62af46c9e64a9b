"""LayerNorm, RMSNorm and fused residual-add + LayerNorm.

Ops (``torch.library`` custom ops, each with a fake implementation and autograd):

* ``llmkit::layer_norm(input, normalized_shape, weight, bias, eps) -> (out, mean, rstd)``
* ``llmkit::rms_norm(input, normalized_shape, weight, eps) -> (out, rstd)``
* ``llmkit::add_layer_norm(input, residual, normalized_shape, weight, bias, eps)
  -> (out, residual_out, mean, rstd)``

and their ``*_backward`` ops. Shapes: ``input`` is ``(*, *normalized_shape)``; the
statistics ``mean`` and ``rstd`` have the leading shape ``(*)`` and are float32 for
float16 / bfloat16 / float32 inputs (float64 for float64 inputs). ``weight`` and
``bias`` have ``normalized_shape`` and the input's dtype (or float32 with half
inputs). Outputs have the input's dtype and a contiguous layout.

``add_layer_norm`` computes ``residual_out = input + residual`` (added in float32,
rounded to the input dtype) and ``out = layer_norm(residual_out)``: one read of
each input, two writes, for pre-norm residual streams. Its backward returns one
gradient that is both ``d input`` and ``d residual``.

Dispatch points: ``layer_norm.forward/backward``, ``rms_norm.forward/backward``,
``add_layer_norm.forward/backward``, with the call classes below; the implementations live
in ``llmkit/backends/<backend>/layer_norm.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._op import Op

__all__ = ["layer_norm", "rms_norm", "add_layer_norm"]


class LayerNormCall(NamedTuple):
    input: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    bias: Tensor | None
    eps: float


class LayerNormBackwardCall(NamedTuple):
    grad_out: Tensor
    input: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor
    rstd: Tensor
    output_mask: Sequence[bool]


class RmsNormCall(NamedTuple):
    input: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    eps: float


class RmsNormBackwardCall(NamedTuple):
    grad_out: Tensor
    input: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    rstd: Tensor
    output_mask: Sequence[bool]


class AddLayerNormCall(NamedTuple):
    input: Tensor
    residual: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    bias: Tensor | None
    eps: float


class AddLayerNormBackwardCall(NamedTuple):
    grad_out: Tensor
    grad_residual_out: Tensor
    residual_out: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor
    rstd: Tensor
    output_mask: Sequence[bool]


layer_norm_forward = DispatchPoint("layer_norm", "forward", LayerNormCall)
layer_norm_backward = DispatchPoint("layer_norm", "backward", LayerNormBackwardCall)
rms_norm_forward = DispatchPoint("rms_norm", "forward", RmsNormCall)
rms_norm_backward = DispatchPoint("rms_norm", "backward", RmsNormBackwardCall)
add_layer_norm_forward = DispatchPoint("add_layer_norm", "forward", AddLayerNormCall)
add_layer_norm_backward = DispatchPoint("add_layer_norm", "backward", AddLayerNormBackwardCall)

stats_dtype = V.stats_dtype


def lead_shape(x: Tensor, ns: Sequence[int]) -> list[int]:
    """The leading shape of ``x`` (its shape without the normalized dims): the statistics' shape."""
    return list(x.shape[: x.dim() - len(ns)])


def empty_param_grad(p: Tensor | None, like: Tensor) -> Tensor:
    """The gradient slot of an optional parameter: custom ops cannot return None, an empty
    tensor stands for "no gradient"."""
    return like.new_empty((0,)) if p is None else torch.empty_like(p)


# --------------------------------------------------------------------------------------
# validation (shared by every backend: it runs before dispatch)
# --------------------------------------------------------------------------------------


def _check_norm(
    op: str,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> list[int]:
    V.check_tensor(op, "input", input)
    V.check_floating(op, "input", input)
    ns, _, _ = V.normalized_rows(op, input, normalized_shape)
    V.check_affine(op, "weight", weight, ns, input)
    V.check_affine(op, "bias", bias, ns, input)
    V.check_same_device(op, input=input, weight=weight, bias=bias)
    V.check_eps(op, eps)
    return ns


def _check_ln_backward(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask) -> list[int]:
    return V.check_norm_backward(
        "layer_norm_backward", "input", input, normalized_shape, {"grad_out": grad_out},
        {"weight": weight, "bias": bias}, {"mean": mean, "rstd": rstd}, output_mask,
    )


def _check_rms_backward(grad_out, input, normalized_shape, weight, rstd, output_mask) -> list[int]:
    return V.check_norm_backward(
        "rms_norm_backward", "input", input, normalized_shape, {"grad_out": grad_out},
        {"weight": weight}, {"rstd": rstd}, output_mask,
    )


def _check_aln_backward(grad_out, grad_residual_out, residual_out, normalized_shape, weight, bias, mean, rstd,
                        output_mask) -> list[int]:
    return V.check_norm_backward(
        "add_layer_norm_backward", "residual_out", residual_out, normalized_shape,
        {"grad_out": grad_out, "grad_residual_out": grad_residual_out},
        {"weight": weight, "bias": bias}, {"mean": mean, "rstd": rstd}, output_mask,
    )


def _check_residual(op: str, input: Tensor, residual: Tensor) -> None:
    V.check_tensor(op, "residual", residual)
    if residual.shape != input.shape:
        raise ValueError(
            f"{op}: residual has shape {list(residual.shape)}; it must equal input's shape "
            f"{list(input.shape)}"
        )
    if residual.dtype != input.dtype:
        raise TypeError(
            f"{op}: residual has dtype {V.dtype_name(residual.dtype)}; it must equal input's "
            f"dtype {V.dtype_name(input.dtype)}"
        )
    V.check_same_device(op, input=input, residual=residual)


def check_layer_norm(c: LayerNormCall) -> None:
    _check_norm("layer_norm", c.input, c.normalized_shape, c.weight, c.bias, c.eps)


def check_rms_norm(c: RmsNormCall) -> None:
    _check_norm("rms_norm", c.input, c.normalized_shape, c.weight, None, c.eps)


def check_add_layer_norm(c: AddLayerNormCall) -> None:
    _check_norm("add_layer_norm", c.input, c.normalized_shape, c.weight, c.bias, c.eps)
    _check_residual("add_layer_norm", c.input, c.residual)


# --------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------


def _stats(x: Tensor, ns: Sequence[int]) -> Tensor:
    return x.new_empty(lead_shape(x, ns), dtype=stats_dtype(x.dtype))


LAYER_NORM = Op(
    "layer_norm", LayerNormCall, tuple[Tensor, Tensor, Tensor], layer_norm_forward, check_layer_norm,
    lambda c: (c.input.new_empty(c.input.shape), _stats(c.input, c.normalized_shape),
               _stats(c.input, c.normalized_shape)),
)
LAYER_NORM_BACKWARD = Op(
    "layer_norm_backward", LayerNormBackwardCall, tuple[Tensor, Tensor, Tensor], layer_norm_backward,
    lambda c: _check_ln_backward(*c),
    lambda c: (c.input.new_empty(c.input.shape), empty_param_grad(c.weight, c.input),
               empty_param_grad(c.bias, c.input)),
)
RMS_NORM = Op(
    "rms_norm", RmsNormCall, tuple[Tensor, Tensor], rms_norm_forward, check_rms_norm,
    lambda c: (c.input.new_empty(c.input.shape), _stats(c.input, c.normalized_shape)),
)
RMS_NORM_BACKWARD = Op(
    "rms_norm_backward", RmsNormBackwardCall, tuple[Tensor, Tensor], rms_norm_backward,
    lambda c: _check_rms_backward(*c),
    lambda c: (c.input.new_empty(c.input.shape), empty_param_grad(c.weight, c.input)),
)
ADD_LAYER_NORM = Op(
    "add_layer_norm", AddLayerNormCall, tuple[Tensor, Tensor, Tensor, Tensor], add_layer_norm_forward,
    check_add_layer_norm,
    lambda c: (c.input.new_empty(c.input.shape), c.input.new_empty(c.input.shape),
               _stats(c.input, c.normalized_shape), _stats(c.input, c.normalized_shape)),
)
ADD_LAYER_NORM_BACKWARD = Op(
    "add_layer_norm_backward", AddLayerNormBackwardCall, tuple[Tensor, Tensor, Tensor], add_layer_norm_backward,
    lambda c: _check_aln_backward(*c),
    lambda c: (c.residual_out.new_empty(c.residual_out.shape), empty_param_grad(c.weight, c.residual_out),
               empty_param_grad(c.bias, c.residual_out)),
)


def _ln_setup_context(ctx, c: LayerNormCall, output) -> None:
    _, mean, rstd = output
    ctx.normalized_shape = list(c.normalized_shape)
    ctx.save_for_backward(c.input, c.weight, c.bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = torch.ops.llmkit.layer_norm_backward(
        grad_out, input, ctx.normalized_shape, weight, bias, mean, rstd,
        [need[0], need[2], need[3]],
    )
    return (
        dx if need[0] else None,
        None,
        dw if need[2] and weight is not None else None,
        db if need[3] and bias is not None else None,
        None,
    )


LAYER_NORM.register_autograd(_ln_backward, _ln_setup_context)


def _rms_setup_context(ctx, c: RmsNormCall, output) -> None:
    _, rstd = output
    ctx.normalized_shape = list(c.normalized_shape)
    ctx.save_for_backward(c.input, c.weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_backward(ctx, grad_out, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw = torch.ops.llmkit.rms_norm_backward(
        grad_out, input, ctx.normalized_shape, weight, rstd, [need[0], need[2]]
    )
    return dx if need[0] else None, None, dw if need[2] and weight is not None else None, None


RMS_NORM.register_autograd(_rms_backward, _rms_setup_context)


def _aln_setup_context(ctx, c: AddLayerNormCall, output) -> None:
    _, residual_out, mean, rstd = output
    ctx.normalized_shape = list(c.normalized_shape)
    ctx.save_for_backward(residual_out, c.weight, c.bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _aln_backward(ctx, grad_out, grad_residual_out, _gm, _gr):
    residual_out, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_residual_out is None:
        grad_residual_out = torch.zeros_like(residual_out)
    if grad_out is None:
        grad_out = torch.zeros_like(residual_out)
    dsum, dw, db = torch.ops.llmkit.add_layer_norm_backward(
        grad_out, grad_residual_out, residual_out, ctx.normalized_shape, weight, bias,
        mean, rstd, [need[0] or need[1], need[3], need[4]],
    )
    return (
        dsum if need[0] else None,
        dsum if need[1] else None,
        None,
        dw if need[3] and weight is not None else None,
        db if need[4] and bias is not None else None,
        None,
    )


ADD_LAYER_NORM.register_autograd(_aln_backward, _aln_setup_context)


# --------------------------------------------------------------------------------------
# functional API (mirrors torch.nn.functional)
# --------------------------------------------------------------------------------------


def _shape_list(op: str, normalized_shape: int | Sequence[int]) -> list[int]:
    """``normalized_shape`` as a list of ints; anything else gets a clear error here, before
    the custom op's schema would refuse it in its own words."""
    if isinstance(normalized_shape, int) and type(normalized_shape) is int:
        return [normalized_shape]
    if isinstance(normalized_shape, (list, tuple, torch.Size)) and all(type(n) is int for n in normalized_shape):
        return list(normalized_shape)
    return V.shape_list(op, "normalized_shape", normalized_shape)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims, like ``F.layer_norm``.

    Args:
        input: ``(*, *normalized_shape)``, float16 / bfloat16 / float32 / float64; any
            strides.
        normalized_shape: trailing dimensions to normalize over.
        weight, bias: optional, shape ``normalized_shape``, the input's dtype or float32.
        eps: added to the variance.

    Returns:
        ``(*, *normalized_shape)`` in the input's dtype. Statistics are computed in
        float32 (float64 for float64 input). Differentiable in input, weight, bias.
    """
    ns = _shape_list("layer_norm", normalized_shape)
    if type(eps) is not float:
        eps = V.check_number("layer_norm", "eps", eps)
    return LAYER_NORM(LayerNormCall(input, ns, weight, bias, eps))[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Root-mean-square normalization, like ``F.rms_norm``.

    ``out = input * rsqrt(mean(input**2) + eps) * weight`` over the trailing
    ``normalized_shape`` dims; ``eps=None`` means ``torch.finfo(input.dtype).eps``.
    Shapes and dtypes as :func:`layer_norm`.
    """
    if eps is None:
        V.check_tensor("rms_norm", "input", input)
        eps = torch.finfo(input.dtype).eps if input.dtype.is_floating_point else 0.0
    ns = _shape_list("rms_norm", normalized_shape)
    if type(eps) is not float:
        eps = V.check_number("rms_norm", "eps", eps)
    return RMS_NORM(RmsNormCall(input, ns, weight, eps))[0]


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Fused residual add + LayerNorm for pre-norm residual streams.

    Args:
        input, residual: same shape ``(*, *normalized_shape)`` and dtype.
        normalized_shape, weight, bias, eps: as :func:`layer_norm`.

    Returns:
        ``(out, residual_out)`` where ``residual_out = input + residual`` (added in
        float32 and rounded to the input dtype) and ``out = layer_norm(residual_out)``.
        One read of each input and one write of each output when fused.
    """
    ns = _shape_list("add_layer_norm", normalized_shape)
    if type(eps) is not float:
        eps = V.check_number("add_layer_norm", "eps", eps)
    out, residual_out, _, _ = ADD_LAYER_NORM(AddLayerNormCall(input, residual, ns, weight, bias, eps))
    return out, residual_out
