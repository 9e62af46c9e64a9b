"""LayerNorm, RMSNorm and add + LayerNorm / RMSNorm on the reference backend: ATen in float32
(float64 for float64 input); saved statistics float32 with the input's leading shape; the
input dropout of the add variants from the Philox mask of ``llmkit/ops/_philox.py``.

What this adds to plain ATen calls:

* Rows whose float32 statistics break are recomputed in float64 (which holds the square of
  every float32 value) and rounded once: squares that overflow (|x| above ~1.8e19: rstd 0,
  output 0 or NaN), denormal rows with ``eps = 0`` (squares flush to 0: 0 / 0), and
  LayerNorm rows with ``|mean| * rstd`` above :data:`ILL_CONDITIONED`, where ATen's ``x * a +
  c`` form cancels (a constant row of 1e20 gave ~1e14 instead of the bias). Detected from the
  statistics ATen returns: two or three small reductions per call.
* LayerNorm backward through ``xhat`` when some rstd leaves [1e-9, 4096] (ATen's kernel forms
  ``rstd**3``, which leaves float32's range or amplifies the cancellation of its row sums) or
  a row's ``|mean| * rstd`` passes :data:`ILL_CONDITIONED` (its ``a dy + b x + c`` cancels).
  Ordinary LayerNorms (eps 1e-5: rstd <= 316) keep ATen's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._compat import fused_rms_norm
from ...ops._philox import row_dropout_keep_mask
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
    dropout_scale,
    empty_param_grad,
    layer_norm_backward,
    layer_norm_forward,
    lead_shape,
    residual_dtype,
    rms_norm_backward,
    rms_norm_forward,
    stats_dtype,
)
from ._common import compute_dtype

_HALF = (torch.float16, torch.bfloat16)


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


ILL_CONDITIONED = 4096.0
"""LayerNorm rows with ``|mean| * rstd`` above this are redone in float64 (forward) or
differentiated through ``xhat`` (backward): ATen's kernels write the output as ``x * (rstd w)
+ (b - mean rstd w)`` and dx as ``a dy + b x + c``, whose terms cancel to ~``|mean| * rstd *
2^-24`` relative. Ordinary activations have a ratio of a few units."""


def _ratio(mean: Tensor, rstd: Tensor) -> float:
    """max over rows of |mean| * rstd (NaN: nan)."""
    return float(torch.linalg.vector_norm(mean.float() * rstd.float(), math.inf))


def _stats_broke(rstd: Tensor, eps: float, mean: Tensor | None = None) -> bool:
    """True when some float32 row statistic broke: the squares of a row overflowed (|x| above
    ~1.8e19: rstd 0), or, with eps = 0, underflowed (denormal rows: rstd inf), or NaN; or,
    for LayerNorm, a row is ill-conditioned for ATen's formulas (:data:`ILL_CONDITIONED`).
    rstd <= 1 / sqrt(eps) when eps > 0, so one reduction tells."""
    if eps > 0:
        ok = float(rstd.min()) > 0.0  # NaN compares False
    else:
        lo, hi = torch.aminmax(rstd)
        ok = float(lo) > 0.0 and float(hi) < math.inf
    return not (ok and (mean is None or _ratio(mean, rstd) <= ILL_CONDITIONED))


def _broken_rows(rstd: Tensor, mean: Tensor | None) -> Tensor:
    """Indices (into the flattened statistics) of the rows :func:`_stats_broke` found."""
    flat_rstd = rstd.reshape(-1)
    bad = ~((flat_rstd > 0) & (flat_rstd < math.inf))
    if mean is not None:
        bad |= ~((mean.reshape(-1).float() * flat_rstd.float()).abs() <= ILL_CONDITIONED)
    return bad.nonzero().squeeze(1)


def _needs_float64(input: Tensor, eps: float, rstd: Tensor, mean: Tensor | None = None) -> bool:
    return input.dtype != torch.float64 and input.numel() > 0 and _stats_broke(rstd, eps, mean)


@layer_norm_forward.register("reference")
def layer_norm_forward_reference(c: LayerNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward in float32 (float64 for float64 input) through ATen; rows whose
    float32 statistics break (huge or, with eps = 0, denormal values; ill-conditioned rows)
    redone in float64."""
    out, mean, rstd = _layer_norm_aten(c)
    if _needs_float64(c.input, c.eps, rstd, mean):
        rows = _broken_rows(rstd, mean)
        n = out.numel() // max(rstd.numel(), 1)
        x = c.input.reshape(-1, *c.normalized_shape)[rows].double()
        o, m, r = torch.native_layer_norm(
            x, list(c.normalized_shape), _as(c.weight, torch.float64), _as(c.bias, torch.float64), c.eps
        )
        out, mean, rstd = out.contiguous(), mean.contiguous(), rstd.contiguous()
        out.view(-1, n)[rows] = o.reshape(-1, n).to(out.dtype)
        mean.view(-1)[rows] = m.reshape(-1).to(mean.dtype)
        rstd.view(-1)[rows] = r.reshape(-1).to(rstd.dtype)
    return out, mean, rstd


def _layer_norm_aten(c: LayerNormCall) -> tuple[Tensor, Tensor, Tensor]:
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


def _aten_backward_ok(mean: Tensor, rstd: Tensor) -> bool:
    """ATen's float32 LayerNorm backward is accurate for these statistics: every rstd in
    [1e-9, 4096] (its ``rstd**3`` stays in range and amplifies the rounding of the row sums it
    subtracts by at most 2^36 against their 2^-24) and ``|mean| * rstd`` at most
    :data:`ILL_CONDITIONED`. NaN statistics: not (the xhat form keeps NaN in its row)."""
    lo, hi = torch.aminmax(rstd.float())
    return float(lo) >= 1e-9 and float(hi) <= 4096.0 and _ratio(mean, rstd) <= ILL_CONDITIONED


def _layer_norm_backward_xhat(
    grad_out: Tensor, input: Tensor, k: int, weight, mean: Tensor, rstd: Tensor, mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward in float32 through ``xhat``: ``dx = rstd * (g - mean(g) - xhat *
    mean(g * xhat))`` with ``g = grad_out * weight``; ``dweight = sum(grad_out * xhat)``,
    ``dbias = sum(grad_out)`` over the leading dims (float32, unrounded; empty where not asked)."""
    dims = tuple(range(input.dim() - k, input.dim()))
    lead = tuple(range(input.dim() - k))
    stat_shape = list(mean.shape) + [1] * k
    r = rstd.to(torch.float32).reshape(stat_shape)
    x_hat = (input.to(torch.float32) - mean.to(torch.float32).reshape(stat_shape)) * r
    dy = grad_out.to(torch.float32)
    g = dy * weight.to(torch.float32) if weight is not None else dy
    dx = dw = db = dy.new_empty((0,))
    if mask[0]:
        dx = r * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
    if mask[1]:
        dw = (dy * x_hat).sum(lead) if lead else dy * x_hat
    if mask[2]:
        db = dy.sum(lead) if lead else dy
    return dx, dw, db


def _layer_norm_backward(
    grad_out: Tensor, input: Tensor, normalized_shape, weight, bias, mean, rstd, mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """ATen's LayerNorm backward in the compute dtype: (dx unrounded, dweight, dbias); an output
    not asked for in ``mask`` is undefined (None). Statistics ATen's formulas cannot take
    (:func:`_aten_backward_ok`) go through ``xhat`` instead."""
    cdt = compute_dtype(input.dtype)
    if cdt == torch.float32 and input.numel() and not _aten_backward_ok(mean, rstd):
        return _layer_norm_backward_xhat(grad_out, input, len(normalized_shape), weight, mean, rstd, mask)
    stat_shape = list(mean.shape) + [1] * len(normalized_shape)
    return torch.ops.aten.native_layer_norm_backward(
        grad_out.to(cdt),
        input.to(cdt),
        list(normalized_shape),
        mean.to(cdt).reshape(stat_shape),
        rstd.to(cdt).reshape(stat_shape),
        _as(weight, cdt),
        _as(bias, cdt),
        mask,
    )


@layer_norm_backward.register("reference")
def layer_norm_backward_reference(c: LayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward from the saved statistics, in float32 (float64 for float64)."""
    grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask = c
    mask = [
        bool(output_mask[0]),
        bool(output_mask[1]) and weight is not None,
        bool(output_mask[2]) and bias is not None,
    ]
    dx, dw, db = _layer_norm_backward(grad_out, input, normalized_shape, weight, bias, mean, rstd, mask)
    dx = dx.to(input.dtype).contiguous() if mask[0] else torch.zeros_like(input, memory_format=torch.contiguous_format)
    dw = dw.to(weight.dtype) if mask[1] and weight is not None else empty_param_grad(weight, input)
    db = db.to(bias.dtype) if mask[2] and bias is not None else empty_param_grad(bias, input)
    return dx, dw, db


def _rms_scale(weight: Tensor | None, offset: float, cdt: torch.dtype) -> Tensor | None:
    """``offset + weight`` in the compute dtype (None without a weight)."""
    if weight is None:
        return None
    w = weight.to(cdt)
    return w + offset if offset != 0.0 else w


def _rms_forward(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None,
    eps: float,
    offset: float,
    cast_before_weight: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(out in ``out_dtype``, rstd) of RMSNorm; ``x_hat`` rounded to ``out_dtype`` before the
    weight multiply when ``cast_before_weight`` (and ``out_dtype`` is narrower than the math)."""
    cdt = compute_dtype(input.dtype)
    lead = lead_shape(input, normalized_shape)
    scale = _rms_scale(weight, offset, cdt)
    rounds_first = cast_before_weight and scale is not None and out_dtype != cdt
    out, rstd = fused_rms_norm(input.to(cdt), list(normalized_shape), None if rounds_first else scale, eps)
    if rounds_first:
        assert scale is not None
        out = out.to(out_dtype).to(cdt).mul_(scale)
    out = out.to(out_dtype).contiguous()
    rstd = rstd.reshape(lead).to(stats_dtype(out_dtype)).contiguous()
    if _needs_float64(input, eps, rstd):  # redo the broken rows in float64, rounded once
        rows = _broken_rows(rstd, None)
        n = out.numel() // max(rstd.numel(), 1)
        x = input.reshape(-1, *normalized_shape)[rows].double()
        o, r = _rms_forward(x, normalized_shape, weight, eps, offset, cast_before_weight, out_dtype)
        out.view(-1, n)[rows] = o.reshape(-1, n)
        rstd.view(-1)[rows] = r.reshape(-1).to(rstd.dtype)
    return out, rstd


@rms_norm_forward.register("reference")
def rms_norm_forward_reference(c: RmsNormCall) -> tuple[Tensor, Tensor]:
    """RMSNorm forward in float32 (float64 for float64 input) through ATen's fused op; the scale
    ``offset + weight`` in float32, ``x_hat`` rounded before it with ``cast_before_weight``."""
    return _rms_forward(c.input, c.normalized_shape, c.weight, c.eps, c.offset, c.cast_before_weight, c.input.dtype)


def _rms_backward(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape,
    weight: Tensor | None,
    rstd: Tensor,
    offset: float,
    cast_before_weight: bool,
    want_dx: bool,
    want_dw: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx unrounded in the compute dtype, dweight in the weight's dtype), None where not asked.

    With x_hat = x * rstd and g = grad_out * (offset + weight):
    dx = rstd * (g - x_hat * mean(g * x_hat)), dweight = sum over rows of grad_out * x_hat
    (x_hat as rounded to grad_out's dtype with ``cast_before_weight``)."""
    cdt = compute_dtype(input.dtype)
    k = len(normalized_shape)
    dims = tuple(range(input.dim() - k, input.dim()))
    x_hat = input.to(cdt) * rstd.to(cdt).reshape(list(rstd.shape) + [1] * k)
    dy = grad_out.to(cdt)
    dx = dw = None
    if want_dx:
        scale = _rms_scale(weight, offset, cdt)
        g = dy * scale if scale is not None else dy
        r = rstd.to(cdt).reshape(list(rstd.shape) + [1] * k)
        dx = r * (g - x_hat * (g * x_hat).mean(dims, keepdim=True))
    if want_dw and weight is not None:
        if cast_before_weight and grad_out.dtype != cdt:
            x_hat = x_hat.to(grad_out.dtype).to(cdt)
        lead = tuple(range(input.dim() - k))
        dw = ((dy * x_hat).sum(lead) if lead else dy * x_hat).to(weight.dtype)
    return dx, dw


@rms_norm_backward.register("reference")
def rms_norm_backward_reference(c: RmsNormBackwardCall) -> tuple[Tensor, Tensor]:
    """RMSNorm backward from the saved rstd, in float32 (float64 for float64)."""
    dx, dw = _rms_backward(
        c.grad_out,
        c.input,
        c.normalized_shape,
        c.weight,
        c.rstd,
        c.offset,
        c.cast_before_weight,
        bool(c.output_mask[0]),
        bool(c.output_mask[1]),
    )
    dx = (
        dx.to(c.input.dtype).contiguous()
        if dx is not None
        else torch.zeros_like(c.input, memory_format=torch.contiguous_format)
    )
    return dx, dw if dw is not None else empty_param_grad(c.weight, c.input)


def _residual_sum(input: Tensor, residual: Tensor, residual_in_fp32: bool, dropout_p: float, seed: int) -> Tensor:
    """``residual_out = dropout(input) + residual``, added in the compute dtype and rounded to
    :func:`~llmkit.ops.layer_norm.residual_dtype`."""
    rdt = residual_dtype(input.dtype, residual_in_fp32)
    if dropout_p == 0.0 and residual.dtype == input.dtype == rdt:
        return torch.add(input, residual)  # ATen adds 16-bit tensors in float32 and rounds once
    cdt = compute_dtype(input.dtype)
    x = input.to(cdt)
    if dropout_p > 0.0:
        keep = row_dropout_keep_mask(seed, input.shape, dropout_p, input.device)
        x = torch.where(keep, x * torch.tensor(dropout_scale(dropout_p), dtype=cdt), torch.zeros((), dtype=cdt))
    return (x + residual.to(cdt)).to(rdt)


def _input_grad(dsum: Tensor, residual_out: Tensor, dropout_p: float, seed: int) -> Tensor:
    """``d input`` of the dropout (an empty tensor without dropout: it is ``d residual_out``),
    from the unrounded ``dsum``, in ``residual_out``'s dtype."""
    if dropout_p == 0.0:
        return residual_out.new_empty((0,))
    keep = row_dropout_keep_mask(seed, residual_out.shape, dropout_p, residual_out.device)
    scale = torch.tensor(dropout_scale(dropout_p), dtype=dsum.dtype)
    return torch.where(keep, dsum * scale, torch.zeros((), dtype=dsum.dtype)).to(residual_out.dtype).contiguous()


@add_layer_norm_forward.register("reference")
def add_layer_norm_forward_reference(c: AddLayerNormCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """residual_out = dropout(input) + residual (float32 add, rounded to residual_out's dtype);
    out = LayerNorm(residual_out) in the input's dtype."""
    residual_out = _residual_sum(c.input, c.residual, c.residual_in_fp32, c.dropout_p, c.seed)
    out, mean, rstd = layer_norm_forward_reference(
        LayerNormCall(residual_out, c.normalized_shape, c.weight, c.bias, c.eps)
    )
    return out.to(c.input.dtype), residual_out.contiguous(), mean, rstd


@add_layer_norm_backward.register("reference")
def add_layer_norm_backward_reference(c: AddLayerNormBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d residual_out = LayerNorm's dx + grad_residual_out, d input of the dropout or empty,
    d weight, d bias); the sum in float32, rounded once."""
    r = c.residual_out
    mask = [True, bool(c.output_mask[1]) and c.weight is not None, bool(c.output_mask[2]) and c.bias is not None]
    dx, dw, db = _layer_norm_backward(c.grad_out, r, c.normalized_shape, c.weight, c.bias, c.mean, c.rstd, mask)
    dsum = dx + c.grad_residual_out.to(dx.dtype)
    dw = dw.to(c.weight.dtype) if mask[1] and c.weight is not None else empty_param_grad(c.weight, c.grad_out)
    db = db.to(c.bias.dtype) if mask[2] and c.bias is not None else empty_param_grad(c.bias, c.grad_out)
    return dsum.to(r.dtype).contiguous(), _input_grad(dsum, r, c.dropout_p, c.seed), dw, db


@add_rms_norm_forward.register("reference")
def add_rms_norm_forward_reference(c: AddRmsNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """residual_out = dropout(input) + residual (float32 add, rounded to residual_out's dtype);
    out = RMSNorm(residual_out) in the input's dtype, with rms_norm's offset and casting."""
    residual_out = _residual_sum(c.input, c.residual, c.residual_in_fp32, c.dropout_p, c.seed)
    out, rstd = _rms_forward(
        residual_out, c.normalized_shape, c.weight, c.eps, c.offset, c.cast_before_weight, c.input.dtype
    )
    return out, residual_out.contiguous(), rstd.to(stats_dtype(c.input.dtype))


@add_rms_norm_backward.register("reference")
def add_rms_norm_backward_reference(c: AddRmsNormBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """(d residual_out = RMSNorm's dx + grad_residual_out, d input of the dropout or empty,
    d weight); the sum in float32, rounded once."""
    r = c.residual_out
    dx, dw = _rms_backward(
        c.grad_out,
        r,
        c.normalized_shape,
        c.weight,
        c.rstd,
        c.offset,
        c.cast_before_weight,
        True,
        bool(c.output_mask[1]),
    )
    assert dx is not None
    dsum = dx + c.grad_residual_out.to(dx.dtype)
    dw = dw if dw is not None else empty_param_grad(c.weight, c.grad_out)
    return dsum.to(r.dtype).contiguous(), _input_grad(dsum, r, c.dropout_p, c.seed), dw
