"""LayerNorm, RMSNorm and add + LayerNorm / RMSNorm on the triton backend
(``kernels/layer_norm.py`` and ``kernels/layer_norm_backward.py``, imported on first use):
float16 / bfloat16 / float32; strided rows read in place; every option of the ops (RMSNorm's
offset and casting order, the residual stream in float32, the input dropout's Philox mask);
backward parameter gradients reduced through per-program partial sums (no atomics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ...ops import _validate as V
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
    empty_param_grad,
    layer_norm_backward,
    layer_norm_forward,
    lead_shape,
    residual_dtype,
    rms_norm_backward,
    rms_norm_forward,
)
from ._common import INT32_MAX, TRITON_DTYPES


def _kernels():
    from ...kernels import layer_norm as K

    return K


def _backward_kernels():
    from ...kernels import layer_norm_backward as K

    return K


def _shape_reasons(input: Tensor, normalized_shape: Sequence[int]) -> list[str]:
    n = math.prod(normalized_shape)
    m = input.numel() // n if n else 0
    out = []
    if n > INT32_MAX:
        out.append(f"rows of {n} elements exceed the kernels' int32 row length")
    if m > INT32_MAX:
        out.append(f"{m} rows exceed the kernels' int32 row count")
    return out


def _backward_reasons(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    params: dict[str, Tensor | None],
    stats: dict[str, Tensor | None],
    extra: dict[str, Tensor] | None = None,
) -> list[str]:
    """Why the Triton backward cannot take these backward-op arguments."""
    out = []
    if input.dtype not in TRITON_DTYPES:
        out.append(f"takes float16, bfloat16, float32 inputs, got {V.dtype_name(input.dtype)}")
    grads: dict[str, Tensor] = {"grad_out": grad_out, **(extra or {})}
    for name, t in grads.items():
        if t.shape != input.shape:
            out.append(f"{name} has shape {list(t.shape)}, the input {list(input.shape)}")
        if t.dtype not in TRITON_DTYPES:
            out.append(f"{name} has dtype {V.dtype_name(t.dtype)}")
    lead = lead_shape(input, normalized_shape)
    for name, s in stats.items():
        if s is not None and (s.dtype != torch.float32 or list(s.shape) != lead):
            out.append(f"{name} must be float32 of shape {lead}, got {V.dtype_name(s.dtype)} {list(s.shape)}")
    for name, p in params.items():
        if p is not None and list(p.shape) != list(normalized_shape):
            out.append(f"{name} has shape {list(p.shape)}, normalized_shape is {list(normalized_shape)}")
    tensors = [grad_out, input, *params.values(), *stats.values(), *(extra or {}).values()]
    if len({t.device for t in tensors if t is not None}) > 1:
        out.append("tensors on different devices")
    return out + _shape_reasons(input, normalized_shape)


def _grad_or_empty(grad: Tensor | None, param: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else empty_param_grad(param, like)


@layer_norm_forward.register(
    "triton", dtypes=TRITON_DTYPES, why_not=lambda c: _shape_reasons(c.input, c.normalized_shape)
)
def layer_norm_forward_triton(c: LayerNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward through the Triton kernels (rows read in place where strided)."""
    out, _, mean, rstd = _kernels().norm_forward(
        c.input, None, len(c.normalized_shape), c.weight, c.bias, c.eps, rms=False
    )
    return out, mean, rstd


@layer_norm_backward.register(
    "triton",
    dtypes=TRITON_DTYPES,
    why_not=lambda c: _backward_reasons(
        c.grad_out, c.input, c.normalized_shape, {"weight": c.weight, "bias": c.bias}, {"mean": c.mean, "rstd": c.rstd}
    ),
)
def layer_norm_backward_triton(c: LayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward: dx, and dweight/dbias reduced through per-program partial sums."""
    dx, dw, db, _ = _backward_kernels().norm_backward(
        c.grad_out, c.input, len(c.normalized_shape), c.weight, c.bias, c.mean, c.rstd, c.output_mask
    )
    return dx, _grad_or_empty(dw, c.weight, c.input), _grad_or_empty(db, c.bias, c.input)


@rms_norm_forward.register(
    "triton", dtypes=TRITON_DTYPES, why_not=lambda c: _shape_reasons(c.input, c.normalized_shape)
)
def rms_norm_forward_triton(c: RmsNormCall) -> tuple[Tensor, Tensor]:
    """RMSNorm forward through the Triton kernels: the scale ``offset + weight`` in float32,
    ``x_hat`` rounded before it with ``cast_before_weight``."""
    out, _, _, rstd = _kernels().norm_forward(
        c.input,
        None,
        len(c.normalized_shape),
        c.weight,
        None,
        c.eps,
        rms=True,
        offset=c.offset,
        cast_before_weight=c.cast_before_weight,
    )
    return out, rstd


@rms_norm_backward.register(
    "triton",
    dtypes=TRITON_DTYPES,
    why_not=lambda c: _backward_reasons(
        c.grad_out, c.input, c.normalized_shape, {"weight": c.weight}, {"rstd": c.rstd}
    ),
)
def rms_norm_backward_triton(c: RmsNormBackwardCall) -> tuple[Tensor, Tensor]:
    """RMSNorm backward: dx and dweight (partial sums, no atomics)."""
    dx, dw, _, _ = _backward_kernels().norm_backward(
        c.grad_out,
        c.input,
        len(c.normalized_shape),
        c.weight,
        None,
        None,
        c.rstd,
        list(c.output_mask),
        rms=True,
        offset=c.offset,
        cast_before_weight=c.cast_before_weight,
    )
    return dx, _grad_or_empty(dw, c.weight, c.input)


def _d_input(d_input: Tensor | None, like: Tensor) -> Tensor:
    """The backward op's ``d input`` slot: the dropout's gradient, or empty without dropout."""
    return d_input if d_input is not None else like.new_empty((0,))


@add_layer_norm_forward.register(
    "triton", dtypes=TRITON_DTYPES, why_not=lambda c: _shape_reasons(c.input, c.normalized_shape)
)
def add_layer_norm_forward_triton(c: AddLayerNormCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One kernel: reads input and residual once, writes residual_out and the normed output."""
    out, residual_out, mean, rstd = _kernels().norm_forward(
        c.input,
        c.residual,
        len(c.normalized_shape),
        c.weight,
        c.bias,
        c.eps,
        rms=False,
        residual_dtype=residual_dtype(c.input.dtype, c.residual_in_fp32),
        dropout_p=c.dropout_p,
        seed=c.seed,
    )
    return out, residual_out, mean, rstd


@add_layer_norm_backward.register(
    "triton",
    dtypes=TRITON_DTYPES,
    why_not=lambda c: _backward_reasons(
        c.grad_out,
        c.residual_out,
        c.normalized_shape,
        {"weight": c.weight, "bias": c.bias},
        {"mean": c.mean, "rstd": c.rstd},
        {"grad_residual_out": c.grad_residual_out},
    ),
)
def add_layer_norm_backward_triton(c: AddLayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """d(residual) = LayerNorm's dx + grad_residual_out, summed in float32, rounded once; with
    dropout, d(input) from the same sum and the regenerated keep mask."""
    dsum, dw, db, d_in = _backward_kernels().norm_backward(
        c.grad_out,
        c.residual_out,
        len(c.normalized_shape),
        c.weight,
        c.bias,
        c.mean,
        c.rstd,
        [True, c.output_mask[1], c.output_mask[2]],
        grad_residual=c.grad_residual_out,
        dropout_p=c.dropout_p,
        seed=c.seed,
    )
    r = c.residual_out
    return dsum, _d_input(d_in, r), _grad_or_empty(dw, c.weight, c.grad_out), _grad_or_empty(db, c.bias, c.grad_out)


@add_rms_norm_forward.register(
    "triton", dtypes=TRITON_DTYPES, why_not=lambda c: _shape_reasons(c.input, c.normalized_shape)
)
def add_rms_norm_forward_triton(c: AddRmsNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """One kernel: (dropout +) residual add, then RMSNorm with its offset and casting."""
    out, residual_out, _, rstd = _kernels().norm_forward(
        c.input,
        c.residual,
        len(c.normalized_shape),
        c.weight,
        None,
        c.eps,
        rms=True,
        offset=c.offset,
        cast_before_weight=c.cast_before_weight,
        residual_dtype=residual_dtype(c.input.dtype, c.residual_in_fp32),
        dropout_p=c.dropout_p,
        seed=c.seed,
    )
    return out, residual_out, rstd


@add_rms_norm_backward.register(
    "triton",
    dtypes=TRITON_DTYPES,
    why_not=lambda c: _backward_reasons(
        c.grad_out,
        c.residual_out,
        c.normalized_shape,
        {"weight": c.weight},
        {"rstd": c.rstd},
        {"grad_residual_out": c.grad_residual_out},
    ),
)
def add_rms_norm_backward_triton(c: AddRmsNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """d(residual) = RMSNorm's dx + grad_residual_out (float32 sum, rounded once); with
    dropout, d(input) from the same sum and the regenerated keep mask."""
    dsum, dw, _, d_in = _backward_kernels().norm_backward(
        c.grad_out,
        c.residual_out,
        len(c.normalized_shape),
        c.weight,
        None,
        None,
        c.rstd,
        [True, c.output_mask[1]],
        grad_residual=c.grad_residual_out,
        rms=True,
        offset=c.offset,
        cast_before_weight=c.cast_before_weight,
        dropout_p=c.dropout_p,
        seed=c.seed,
    )
    return dsum, _d_input(d_in, c.residual_out), _grad_or_empty(dw, c.weight, c.grad_out)
