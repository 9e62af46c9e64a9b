"""LayerNorm, RMSNorm and add + LayerNorm / RMSNorm on the cuda_ext backend: one kernel per row
block (CUDA), vectorized C++ kernels on the CPU (preferred to the reference per dtype and size,
:data:`~._common.CPU_DEFAULT`); float32 statistics.

RMSNorm's ``offset`` goes to the kernels inside the float32 scale they take (``offset +
weight``, formed here). Not taken (the next backend runs): ``cast_before_weight`` with a
float16 / bfloat16 input (the kernels round once, after the weight), ``residual_in_fp32``
with a half input, and input dropout."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ...ops.layer_norm import (
    AddLayerNormBackwardCall,
    AddLayerNormCall,
    AddRmsNormBackwardCall,
    AddRmsNormCall,
    LayerNormBackwardCall,
    LayerNormCall,
    RmsNormBackwardCall,
    RmsNormCall,
    add_layer_norm_backward,
    add_layer_norm_forward,
    add_rms_norm_backward,
    add_rms_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    residual_dtype,
    rms_norm_backward,
    rms_norm_forward,
)
from ._common import BACKEND, CPU_DEFAULT, FLOAT_DTYPES, HALF_DTYPES, ext_ops, shaped


def _why_not(input: Tensor, normalized_shape: Sequence[int]) -> Iterator[str]:
    if math.prod(normalized_shape) == 0:
        yield "rows of length 0 are left to the reference path"


def _rms_why_not(
    input: Tensor, normalized_shape: Sequence[int], out_dtype: torch.dtype, cast_before_weight: bool
) -> Iterator[str]:
    yield from _why_not(input, normalized_shape)
    if cast_before_weight and out_dtype in HALF_DTYPES:
        yield "cast_before_weight with a float16 / bfloat16 output: the kernels round once, after the weight"


def _add_why_not(input: Tensor, residual: Tensor, residual_out_dtype: torch.dtype, dropout_p: float) -> Iterator[str]:
    if residual.dtype != input.dtype or residual_out_dtype != input.dtype:
        yield "a float32 residual stream with a half input (residual_in_fp32)"
    if dropout_p > 0.0:
        yield "input dropout"


def _rms_scale(weight: Tensor | None, offset: float) -> Tensor | None:
    """The float32 scale the kernels multiply by: ``offset + weight`` (the weight as it is
    without an offset; the binding converts it)."""
    if weight is None or offset == 0.0:
        return _flat(weight)
    return _flat(weight.float() + offset)


def _norm_rows(input: Tensor, normalized_shape: Sequence[int]) -> tuple[Tensor, torch.Size]:
    n = math.prod(normalized_shape)
    lead = input.shape[: input.dim() - len(normalized_shape)]
    return shaped(input, (math.prod(lead), n)), lead


def _flat(p: Tensor | None) -> Tensor | None:
    if p is None or p.dim() == 1:
        return p
    return p.reshape(-1)


def _param_grad(g: Tensor, p: Tensor | None, need: bool, like: Tensor) -> Tensor:
    """The gradient of an optional parameter in the op's convention."""
    if p is None:
        return like.new_empty((0,))
    if not need:
        return torch.empty_like(p)
    return g.reshape(p.shape).to(p.dtype)


def _ln_backward(grad_out, grad_residual_out, x, normalized_shape, weight, bias, mean, rstd, output_mask):
    """(dx [+ grad_residual_out], d weight, d bias) of LayerNorm in the op's conventions."""
    x2, _ = _norm_rows(x, normalized_shape)
    dy2, _ = _norm_rows(grad_out, normalized_shape)
    dr2 = None if grad_residual_out is None else _norm_rows(grad_residual_out, normalized_shape)[0]
    need_w = bool(output_mask[1]) and weight is not None
    need_b = bool(output_mask[2]) and bias is not None
    dx, dw, db = ext_ops().norm_bwd(dy2, x2, _flat(weight), _flat(mean), _flat(rstd), dr2, need_w, need_b, False)
    return shaped(dx, x.shape), _param_grad(dw, weight, need_w, x), _param_grad(db, bias, need_b, x)


@layer_norm_forward.register(
    BACKEND,
    dtypes=FLOAT_DTYPES,
    why_not=lambda c: _why_not(c.input, c.normalized_shape),
    cpu_default=CPU_DEFAULT["layer_norm.forward"],
)
def layer_norm_forward_cuda_ext(c: LayerNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward: one kernel per row block, float32 statistics."""
    x2, lead = _norm_rows(c.input, c.normalized_shape)
    out, _, mean, rstd = ext_ops().norm_fwd(x2, None, _flat(c.weight), _flat(c.bias), c.eps, False)
    return shaped(out, c.input.shape), shaped(mean, lead), shaped(rstd, lead)


@layer_norm_backward.register(
    BACKEND,
    dtypes=FLOAT_DTYPES,
    why_not=lambda c: _why_not(c.input, c.normalized_shape),
    cpu_default=CPU_DEFAULT["layer_norm.backward"],
)
def layer_norm_backward_cuda_ext(c: LayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward from the saved statistics; d weight / d bias reduced in float32."""
    return _ln_backward(c.grad_out, None, c.input, c.normalized_shape, c.weight, c.bias, c.mean, c.rstd, c.output_mask)


@rms_norm_forward.register(
    BACKEND,
    dtypes=FLOAT_DTYPES,
    cpu_default=CPU_DEFAULT["rms_norm.forward"],
    why_not=lambda c: _rms_why_not(c.input, c.normalized_shape, c.input.dtype, c.cast_before_weight),
)
def rms_norm_forward_cuda_ext(c: RmsNormCall) -> tuple[Tensor, Tensor]:
    """RMSNorm forward, float32 rstd; the scale offset + weight in float32."""
    x2, lead = _norm_rows(c.input, c.normalized_shape)
    out, _, _, rstd = ext_ops().norm_fwd(x2, None, _rms_scale(c.weight, c.offset), None, c.eps, True)
    return shaped(out, c.input.shape), shaped(rstd, lead)


def _rms_backward(
    grad_out: Tensor,
    x: Tensor,
    normalized_shape,
    weight,
    rstd,
    offset,
    output_mask,
    grad_residual_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dx [+ grad_residual_out], d weight) of RMSNorm in the op's conventions."""
    x2, _ = _norm_rows(x, normalized_shape)
    dy2, _ = _norm_rows(grad_out, normalized_shape)
    dr2 = None if grad_residual_out is None else _norm_rows(grad_residual_out, normalized_shape)[0]
    need_w = bool(output_mask[1]) and weight is not None
    dx, dw, _ = ext_ops().norm_bwd(dy2, x2, _rms_scale(weight, offset), None, _flat(rstd), dr2, need_w, False, True)
    return shaped(dx, x.shape), _param_grad(dw, weight, need_w, x)


@rms_norm_backward.register(
    BACKEND,
    dtypes=FLOAT_DTYPES,
    cpu_default=CPU_DEFAULT["rms_norm.backward"],
    why_not=lambda c: _rms_why_not(c.input, c.normalized_shape, c.grad_out.dtype, c.cast_before_weight),
)
def rms_norm_backward_cuda_ext(c: RmsNormBackwardCall) -> tuple[Tensor, Tensor]:
    """RMSNorm backward from the saved rstd."""
    return _rms_backward(c.grad_out, c.input, c.normalized_shape, c.weight, c.rstd, c.offset, c.output_mask)


def _aln_why_not(c: AddLayerNormCall) -> Iterator[str]:
    yield from _why_not(c.input, c.normalized_shape)
    yield from _add_why_not(c.input, c.residual, residual_dtype(c.input.dtype, c.residual_in_fp32), c.dropout_p)


@add_layer_norm_forward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_aln_why_not, cpu_default=CPU_DEFAULT["add_layer_norm.forward"]
)
def add_layer_norm_forward_cuda_ext(c: AddLayerNormCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused residual add (float32, rounded to the dtype) + LayerNorm of the rounded sum."""
    x2, lead = _norm_rows(c.input, c.normalized_shape)
    r2, _ = _norm_rows(c.residual, c.normalized_shape)
    out, res_out, mean, rstd = ext_ops().norm_fwd(x2, r2, _flat(c.weight), _flat(c.bias), c.eps, False)
    return shaped(out, c.input.shape), shaped(res_out, c.input.shape), shaped(mean, lead), shaped(rstd, lead)


def _add_backward_why_not(c: AddLayerNormBackwardCall | AddRmsNormBackwardCall) -> Iterator[str]:
    yield from _why_not(c.residual_out, c.normalized_shape)
    if c.grad_out.dtype != c.residual_out.dtype:
        yield "a float32 residual stream with a half output (residual_in_fp32)"
    if c.dropout_p > 0.0:
        yield "input dropout"


@add_layer_norm_backward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_add_backward_why_not, cpu_default=CPU_DEFAULT["add_layer_norm.backward"]
)
def add_layer_norm_backward_cuda_ext(c: AddLayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One gradient for input and residual: LayerNorm's dx + grad_residual_out (float32 add)."""
    dsum, dw, db = _ln_backward(
        c.grad_out,
        c.grad_residual_out,
        c.residual_out,
        c.normalized_shape,
        c.weight,
        c.bias,
        c.mean,
        c.rstd,
        c.output_mask,
    )
    return dsum, dsum.new_empty((0,)), dw, db


def _arn_why_not(c: AddRmsNormCall) -> Iterator[str]:
    yield from _rms_why_not(c.input, c.normalized_shape, c.input.dtype, c.cast_before_weight)
    yield from _add_why_not(c.input, c.residual, residual_dtype(c.input.dtype, c.residual_in_fp32), c.dropout_p)


@add_rms_norm_forward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_arn_why_not, cpu_default=CPU_DEFAULT["add_rms_norm.forward"]
)
def add_rms_norm_forward_cuda_ext(c: AddRmsNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """Fused residual add (float32, rounded to the dtype) + RMSNorm of the rounded sum."""
    x2, lead = _norm_rows(c.input, c.normalized_shape)
    r2, _ = _norm_rows(c.residual, c.normalized_shape)
    out, res_out, _, rstd = ext_ops().norm_fwd(x2, r2, _rms_scale(c.weight, c.offset), None, c.eps, True)
    return shaped(out, c.input.shape), shaped(res_out, c.input.shape), shaped(rstd, lead)


def _arn_backward_why_not(c: AddRmsNormBackwardCall) -> Iterator[str]:
    yield from _add_backward_why_not(c)
    yield from _rms_why_not(c.residual_out, c.normalized_shape, c.grad_out.dtype, c.cast_before_weight)


@add_rms_norm_backward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_arn_backward_why_not, cpu_default=CPU_DEFAULT["add_rms_norm.backward"]
)
def add_rms_norm_backward_cuda_ext(c: AddRmsNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """One gradient for input and residual: RMSNorm's dx + grad_residual_out (float32 add)."""
    dsum, dw = _rms_backward(
        c.grad_out, c.residual_out, c.normalized_shape, c.weight, c.rstd, c.offset, c.output_mask, c.grad_residual_out
    )
    return dsum, dsum.new_empty((0,)), dw
