"""LayerNorm, RMSNorm and add + LayerNorm on the reference backend: ATen in float32 (float64
for float64 input); saved statistics float32 with the input's leading shape."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._compat import fused_rms_norm
from ...ops.layer_norm import (
    AddLayerNormBackwardCall,
    AddLayerNormCall,
    LayerNormBackwardCall,
    LayerNormCall,
    RmsNormBackwardCall,
    RmsNormCall,
    add_layer_norm_backward,
    add_layer_norm_forward,
    empty_param_grad,
    layer_norm_backward,
    layer_norm_forward,
    lead_shape,
    rms_norm_backward,
    rms_norm_forward,
    stats_dtype,
)
from ._common import compute_dtype

_HALF = (torch.float16, torch.bfloat16)


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


@layer_norm_forward.register("reference")
def layer_norm_forward_reference(c: LayerNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward in float32 (float64 for float64 input) through ATen.

    float16 / bfloat16 CPU input with a weight or bias goes to ATen's mixed-precision CPU
    kernel as it is (parameters in float32): it reads the 16-bit values, computes and keeps the
    statistics in float32 and rounds the output once, as the converting path does (outputs
    agree to a last-place rounding), without the two full-size conversions (3x faster).
    """
    input, normalized_shape, weight, bias, eps = c
    cdt = compute_dtype(input.dtype)
    lead = lead_shape(input, normalized_shape)
    if input.dtype == cdt and all(p is None or p.dtype == cdt for p in (weight, bias)):
        # the common float32 case: no conversions, ATen's outputs are already contiguous
        out, mean, rstd = torch.native_layer_norm(input, normalized_shape, weight, bias, eps)
        return out, mean.view(lead), rstd.view(lead)
    if input.device.type == "cpu" and input.dtype in _HALF and (weight is not None or bias is not None):
        # (ATen keeps float32 statistics only when a float32 parameter is passed)
        out, mean, rstd = torch.native_layer_norm(input, list(normalized_shape), _as(weight, cdt), _as(bias, cdt), eps)
        return out.contiguous(), mean.reshape(lead), rstd.reshape(lead)
    out, mean, rstd = torch.native_layer_norm(
        input.to(cdt), list(normalized_shape), _as(weight, cdt), _as(bias, cdt), eps
    )
    sdt = stats_dtype(input.dtype)
    return (
        out.to(input.dtype).contiguous(),
        mean.reshape(lead).to(sdt).contiguous(),
        rstd.reshape(lead).to(sdt).contiguous(),
    )


@layer_norm_backward.register("reference")
def layer_norm_backward_reference(c: LayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward from the saved statistics, in float32 (float64 for float64)."""
    grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask = c
    cdt = compute_dtype(input.dtype)
    k = len(normalized_shape)
    stat_shape = list(mean.shape) + [1] * k
    mask = [bool(output_mask[0]), bool(output_mask[1]) and weight is not None,
            bool(output_mask[2]) and bias is not None]
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        grad_out.to(cdt),
        input.to(cdt),
        list(normalized_shape),
        mean.to(cdt).reshape(stat_shape),
        rstd.to(cdt).reshape(stat_shape),
        _as(weight, cdt),
        _as(bias, cdt),
        mask,
    )
    dx = dx.to(input.dtype).contiguous() if mask[0] else torch.zeros_like(input, memory_format=torch.contiguous_format)
    dw = dw.to(weight.dtype) if mask[1] and weight is not None else empty_param_grad(weight, input)
    db = db.to(bias.dtype) if mask[2] and bias is not None else empty_param_grad(bias, input)
    return dx, dw, db


@rms_norm_forward.register("reference")
def rms_norm_forward_reference(c: RmsNormCall) -> tuple[Tensor, Tensor]:
    """RMSNorm forward in float32 (float64 for float64 input) through ATen's fused op."""
    input, normalized_shape, weight, eps = c
    cdt = compute_dtype(input.dtype)
    lead = lead_shape(input, normalized_shape)
    out, rstd = fused_rms_norm(input.to(cdt), list(normalized_shape), _as(weight, cdt), eps)
    return out.to(input.dtype).contiguous(), rstd.reshape(lead).to(stats_dtype(input.dtype)).contiguous()


@rms_norm_backward.register("reference")
def rms_norm_backward_reference(c: RmsNormBackwardCall) -> tuple[Tensor, Tensor]:
    """RMSNorm backward from the saved rstd, in float32 (float64 for float64).

    With x_hat = x * rstd and g = grad_out * weight:
    dx = rstd * (g - x_hat * mean(g * x_hat)), dweight = sum over rows of grad_out * x_hat.
    """
    grad_out, input, normalized_shape, weight, rstd, output_mask = c
    cdt = compute_dtype(input.dtype)
    k = len(normalized_shape)
    dims = tuple(range(input.dim() - k, input.dim()))
    x = input.to(cdt)
    r = rstd.to(cdt).reshape(list(rstd.shape) + [1] * k)
    x_hat = x * r
    dy = grad_out.to(cdt)
    g = dy * weight.to(cdt) if weight is not None else dy
    if output_mask[0]:
        dx = (r * (g - x_hat * (g * x_hat).mean(dims, keepdim=True))).to(input.dtype).contiguous()
    else:
        dx = torch.zeros_like(input, memory_format=torch.contiguous_format)
    if output_mask[1] and weight is not None:
        lead = tuple(range(input.dim() - k))
        dw = (dy * x_hat).sum(lead).to(weight.dtype) if lead else (dy * x_hat).to(weight.dtype)
    else:
        dw = empty_param_grad(weight, input)
    return dx, dw


@add_layer_norm_forward.register("reference")
def add_layer_norm_forward_reference(c: AddLayerNormCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """residual_out = input + residual (float32 add, rounded); out = LayerNorm(residual_out)."""
    input, residual, normalized_shape, weight, bias, eps = c
    # ATen adds 16-bit tensors in float32 and rounds once: the float32 add, rounded
    residual_out = torch.add(input, residual)
    out, mean, rstd = layer_norm_forward_reference(LayerNormCall(residual_out, normalized_shape, weight, bias, eps))
    return out, residual_out.contiguous(), mean, rstd


@add_layer_norm_backward.register("reference")
def add_layer_norm_backward_reference(c: AddLayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of (out, residual_out) w.r.t. input (= w.r.t. residual), weight, bias."""
    grad_out, grad_residual_out, residual_out, normalized_shape, weight, bias, mean, rstd, output_mask = c
    dx, dw, db = layer_norm_backward_reference(LayerNormBackwardCall(
        grad_out, residual_out, normalized_shape, weight, bias, mean, rstd,
        [True, output_mask[1], output_mask[2]],
    ))
    cdt = compute_dtype(residual_out.dtype)
    if residual_out.dtype == cdt:
        dsum = dx + grad_residual_out
    else:
        dsum = (dx.to(cdt) + grad_residual_out.to(cdt)).to(residual_out.dtype)
    return dsum.contiguous(), dw, db
