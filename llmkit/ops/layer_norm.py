"""LayerNorm, RMSNorm and fused residual-add + LayerNorm / RMSNorm.

Ops (``torch.library`` custom ops, each with a fake implementation and autograd):

* ``llmkit::layer_norm(input, normalized_shape, weight, bias, eps) -> (out, mean, rstd)``
* ``llmkit::rms_norm(input, normalized_shape, weight, eps, offset, cast_before_weight)
  -> (out, rstd)``
* ``llmkit::add_layer_norm(input, residual, normalized_shape, weight, bias, eps,
  residual_in_fp32, dropout_p, seed) -> (out, residual_out, mean, rstd)``
* ``llmkit::add_rms_norm(input, residual, normalized_shape, weight, eps, offset,
  cast_before_weight, residual_in_fp32, dropout_p, seed) -> (out, residual_out, rstd)``

and their ``*_backward`` ops. Shapes: ``input`` is ``(*, *normalized_shape)``; the
statistics ``mean`` and ``rstd`` have the leading shape ``(*)`` and are float32 for
float16 / bfloat16 / float32 inputs (float64 for float64 inputs). ``weight`` and
``bias`` have ``normalized_shape`` and the input's dtype (or float32 with half
inputs). Outputs have the input's dtype and a contiguous layout.

RMSNorm's scale is ``offset + weight`` (Gemma's ``1 + w`` is ``offset=1.0``), added in
float32. The normalized value ``x_hat = x * rstd`` is computed in float32; it is rounded to
the input dtype once, after the multiply by the scale (``cast_before_weight=False``, the
default, Gemma's order), or rounded to the input dtype before the multiply, whose product is
rounded again (``cast_before_weight=True``: Llama's and T5's order, ``weight *
x_hat.to(input_dtype)``). The two agree for float32 / float64 input.

``add_*_norm`` computes ``residual_out = dropout(input) + residual`` (added in float32)
and normalizes it: one read of each input, two writes, for pre-norm residual streams.
``residual_out`` is rounded to the input dtype, and the rounded value normalized; with
``residual_in_fp32`` and a float16 / bfloat16 input the residual stream stays float32
(``residual`` float32 or the input dtype, ``residual_out`` float32, normalized unrounded).
Dropout (``dropout_p > 0``) keeps input element ``(i, j)`` of row ``i`` (rows in the order
of the leading dims) when ``uniform(seed, i * N + j) > dropout_p`` (Triton's Philox, see
:mod:`._philox`) and scales it by ``1 / (1 - dropout_p)`` (in float32): a pure function of
``seed``, so a backward regenerates the mask instead of storing it. Their backward returns
``d residual_out`` (the gradient of the sum, in ``residual_out``'s dtype; it is ``d residual``
and, without dropout, ``d input``) and, with dropout, ``d input`` (else an empty tensor).

Dispatch points: ``layer_norm.forward/backward``, ``rms_norm.forward/backward``,
``add_layer_norm.forward/backward``, ``add_rms_norm.forward/backward``, with the call classes
below; the implementations live in ``llmkit/backends/<backend>/layer_norm.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._norm_checks import (
    _check_aln_backward,
    _check_arn_backward,
    _check_ln_backward,
    _check_rms_backward,
    check_add_layer_norm,
    check_add_rms_norm,
    check_layer_norm,
    check_rms_norm,
)
from ._op import Op
from ._philox import draw_seed

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


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
    offset: float = 0.0
    cast_before_weight: bool = False


class RmsNormBackwardCall(NamedTuple):
    grad_out: Tensor
    input: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    rstd: Tensor
    output_mask: Sequence[bool]
    offset: float = 0.0
    cast_before_weight: bool = False


class AddLayerNormCall(NamedTuple):
    input: Tensor
    residual: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    residual_in_fp32: bool = False
    dropout_p: float = 0.0
    seed: int = 0


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
    dropout_p: float = 0.0
    seed: int = 0


class AddRmsNormCall(NamedTuple):
    input: Tensor
    residual: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    eps: float
    offset: float = 0.0
    cast_before_weight: bool = False
    residual_in_fp32: bool = False
    dropout_p: float = 0.0
    seed: int = 0


class AddRmsNormBackwardCall(NamedTuple):
    grad_out: Tensor
    grad_residual_out: Tensor
    residual_out: Tensor
    normalized_shape: Sequence[int]
    weight: Tensor | None
    rstd: Tensor
    output_mask: Sequence[bool]
    offset: float = 0.0
    cast_before_weight: bool = False
    dropout_p: float = 0.0
    seed: int = 0


layer_norm_forward = DispatchPoint("layer_norm", "forward", LayerNormCall)
layer_norm_backward = DispatchPoint("layer_norm", "backward", LayerNormBackwardCall)
rms_norm_forward = DispatchPoint("rms_norm", "forward", RmsNormCall)
rms_norm_backward = DispatchPoint("rms_norm", "backward", RmsNormBackwardCall)
add_layer_norm_forward = DispatchPoint("add_layer_norm", "forward", AddLayerNormCall)
add_layer_norm_backward = DispatchPoint("add_layer_norm", "backward", AddLayerNormBackwardCall)
add_rms_norm_forward = DispatchPoint("add_rms_norm", "forward", AddRmsNormCall)
add_rms_norm_backward = DispatchPoint("add_rms_norm", "backward", AddRmsNormBackwardCall)

stats_dtype = V.stats_dtype


def lead_shape(x: Tensor, ns: Sequence[int]) -> list[int]:
    """The leading shape of ``x`` (its shape without the normalized dims): the statistics' shape."""
    return list(x.shape[: x.dim() - len(ns)])


def empty_param_grad(p: Tensor | None, like: Tensor) -> Tensor:
    """The gradient slot of an optional parameter: custom ops cannot return None, an empty
    tensor stands for "no gradient"."""
    return like.new_empty((0,)) if p is None else torch.empty_like(p)


def residual_dtype(input_dtype: torch.dtype, residual_in_fp32: bool) -> torch.dtype:
    """The dtype of ``add_*_norm``'s ``residual_out``: float32 for a half input with
    ``residual_in_fp32``, else the input's dtype."""
    return torch.float32 if residual_in_fp32 and input_dtype in V.HALF_DTYPES else input_dtype


def dropout_scale(dropout_p: float) -> float:
    """The factor kept inputs are multiplied by (``1 / (1 - p)``); kernels take it in float32."""
    return 1.0 / (1.0 - dropout_p)


# --------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------


def _stats(x: Tensor, ns: Sequence[int]) -> Tensor:
    return x.new_empty(lead_shape(x, ns), dtype=stats_dtype(x.dtype))


LAYER_NORM = Op(
    "layer_norm",
    LayerNormCall,
    tuple[Tensor, Tensor, Tensor],
    layer_norm_forward,
    check_layer_norm,
    lambda c: (
        c.input.new_empty(c.input.shape),
        _stats(c.input, c.normalized_shape),
        _stats(c.input, c.normalized_shape),
    ),
)
LAYER_NORM_BACKWARD = Op(
    "layer_norm_backward",
    LayerNormBackwardCall,
    tuple[Tensor, Tensor, Tensor],
    layer_norm_backward,
    lambda c: _check_ln_backward(*c),
    lambda c: (
        c.input.new_empty(c.input.shape),
        empty_param_grad(c.weight, c.input),
        empty_param_grad(c.bias, c.input),
    ),
)
RMS_NORM = Op(
    "rms_norm",
    RmsNormCall,
    tuple[Tensor, Tensor],
    rms_norm_forward,
    check_rms_norm,
    lambda c: (c.input.new_empty(c.input.shape), _stats(c.input, c.normalized_shape)),
)
RMS_NORM_BACKWARD = Op(
    "rms_norm_backward",
    RmsNormBackwardCall,
    tuple[Tensor, Tensor],
    rms_norm_backward,
    _check_rms_backward,
    lambda c: (c.input.new_empty(c.input.shape), empty_param_grad(c.weight, c.input)),
)


def _add_fake(c: AddLayerNormCall | AddRmsNormCall, n_stats: int) -> tuple[Tensor, ...]:
    x, ns = c.input, c.normalized_shape
    res = x.new_empty(x.shape, dtype=residual_dtype(x.dtype, c.residual_in_fp32))
    return (x.new_empty(x.shape), res, *(_stats(x, ns) for _ in range(n_stats)))


def _add_backward_fake(
    c: AddLayerNormBackwardCall | AddRmsNormBackwardCall, params: tuple[Tensor | None, ...]
) -> tuple[Tensor, ...]:
    r = c.residual_out
    d_input = r.new_empty(r.shape) if c.dropout_p > 0.0 else r.new_empty((0,))
    return (r.new_empty(r.shape), d_input, *(empty_param_grad(p, c.grad_out) for p in params))


ADD_LAYER_NORM = Op(
    "add_layer_norm",
    AddLayerNormCall,
    tuple[Tensor, Tensor, Tensor, Tensor],
    add_layer_norm_forward,
    check_add_layer_norm,
    lambda c: _add_fake(c, 2),
)
ADD_LAYER_NORM_BACKWARD = Op(
    "add_layer_norm_backward",
    AddLayerNormBackwardCall,
    tuple[Tensor, Tensor, Tensor, Tensor],
    add_layer_norm_backward,
    _check_aln_backward,
    lambda c: _add_backward_fake(c, (c.weight, c.bias)),
)
ADD_RMS_NORM = Op(
    "add_rms_norm",
    AddRmsNormCall,
    tuple[Tensor, Tensor, Tensor],
    add_rms_norm_forward,
    check_add_rms_norm,
    lambda c: _add_fake(c, 1),
)
ADD_RMS_NORM_BACKWARD = Op(
    "add_rms_norm_backward",
    AddRmsNormBackwardCall,
    tuple[Tensor, Tensor, Tensor],
    add_rms_norm_backward,
    _check_arn_backward,
    lambda c: _add_backward_fake(c, (c.weight,)),
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
        grad_out, input, ctx.normalized_shape, weight, bias, mean, rstd, [need[0], need[2], need[3]]
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
    ctx.args = (list(c.normalized_shape), c.offset, c.cast_before_weight)
    ctx.save_for_backward(c.input, c.weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_backward(ctx, grad_out, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    ns, offset, cast_before_weight = ctx.args
    need = ctx.needs_input_grad
    dx, dw = torch.ops.llmkit.rms_norm_backward(
        grad_out, input, ns, weight, rstd, [need[0], need[2]], offset, cast_before_weight
    )
    return dx if need[0] else None, None, dw if need[2] and weight is not None else None, None, None, None


RMS_NORM.register_autograd(_rms_backward, _rms_setup_context)


def _add_setup_context(
    ctx, c: AddLayerNormCall | AddRmsNormCall, output, stats: tuple[Tensor, ...], params: tuple[Tensor | None, ...]
) -> None:
    residual_out = output[1]
    ctx.dtypes = (c.input.dtype, c.residual.dtype)
    ctx.dropout = (c.dropout_p, c.seed)
    ctx.save_for_backward(residual_out, *params, *stats)
    ctx.mark_non_differentiable(*stats)


def _add_input_grads(ctx, dsum: Tensor, d_input: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(d input, d residual) from the backward op's d residual_out and, with dropout, d input:
    each in its argument's dtype (they differ from residual_out's with ``residual_in_fp32``)."""
    input_dtype, residual_dtype_ = ctx.dtypes
    need = ctx.needs_input_grad
    d_in = d_input if ctx.dropout[0] > 0.0 else dsum
    return (d_in.to(input_dtype) if need[0] else None), (dsum.to(residual_dtype_) if need[1] else None)


def _zeros_if_none(g: Tensor | None, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return g if g is not None else torch.zeros_like(like, dtype=dtype)


def _aln_setup_context(ctx, c: AddLayerNormCall, output) -> None:
    ctx.normalized_shape = list(c.normalized_shape)
    _add_setup_context(ctx, c, output, output[2:], (c.weight, c.bias))


def _aln_backward(ctx, grad_out, grad_residual_out, _gm, _gr):
    residual_out, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_residual_out = _zeros_if_none(grad_residual_out, residual_out)
    grad_out = _zeros_if_none(grad_out, residual_out, ctx.dtypes[0])
    dsum, d_input, dw, db = torch.ops.llmkit.add_layer_norm_backward(
        grad_out,
        grad_residual_out,
        residual_out,
        ctx.normalized_shape,
        weight,
        bias,
        mean,
        rstd,
        [need[0] or need[1], need[3], need[4]],
        *ctx.dropout,
    )
    return (
        *_add_input_grads(ctx, dsum, d_input),
        None,
        dw if need[3] and weight is not None else None,
        db if need[4] and bias is not None else None,
        None,
        None,
        None,
        None,
    )


ADD_LAYER_NORM.register_autograd(_aln_backward, _aln_setup_context)


def _arn_setup_context(ctx, c: AddRmsNormCall, output) -> None:
    ctx.args = (list(c.normalized_shape), c.offset, c.cast_before_weight)
    _add_setup_context(ctx, c, output, output[2:], (c.weight,))


def _arn_backward(ctx, grad_out, grad_residual_out, _gr):
    residual_out, weight, rstd = ctx.saved_tensors
    ns, offset, cast_before_weight = ctx.args
    need = ctx.needs_input_grad
    grad_residual_out = _zeros_if_none(grad_residual_out, residual_out)
    grad_out = _zeros_if_none(grad_out, residual_out, ctx.dtypes[0])
    dsum, d_input, dw = torch.ops.llmkit.add_rms_norm_backward(
        grad_out,
        grad_residual_out,
        residual_out,
        ns,
        weight,
        rstd,
        [need[0] or need[1], need[3]],
        offset,
        cast_before_weight,
        *ctx.dropout,
    )
    return (
        *_add_input_grads(ctx, dsum, d_input),
        None,
        dw if need[3] and weight is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


ADD_RMS_NORM.register_autograd(_arn_backward, _arn_setup_context)


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


def _float(op: str, name: str, value: object) -> float:
    return value if type(value) is float else V.check_number(op, name, value)


def _rms_eps(op: str, input: Tensor, eps: float | None) -> float:
    """``eps=None`` means ``torch.finfo(input.dtype).eps``, as in ``F.rms_norm``."""
    if eps is None:
        V.check_tensor(op, "input", input)
        return torch.finfo(input.dtype).eps if input.dtype.is_floating_point else 0.0
    return _float(op, "eps", eps)


def _seed(dropout_p: float) -> int:
    return draw_seed() if dropout_p > 0.0 else 0


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
    return LAYER_NORM(LayerNormCall(input, ns, weight, bias, _float("layer_norm", "eps", eps)))[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = False,
) -> Tensor:
    """Root-mean-square normalization, like ``F.rms_norm``, with the conventions of LLMs.

    ``out = x_hat * (offset + weight)`` with ``x_hat = input * rsqrt(mean(input**2) + eps)``
    over the trailing ``normalized_shape`` dims; ``eps=None`` means
    ``torch.finfo(input.dtype).eps``. Shapes and dtypes as :func:`layer_norm`.

    Args:
        offset: added to the weight in float32: ``1.0`` is Gemma's ``(1 + w)`` (needs a weight).
        cast_before_weight: round ``x_hat`` to the input dtype before the multiply by the
            weight (Llama's and T5's ``weight * x_hat.to(dtype)``); the default rounds once,
            after it (Gemma's ``(x_hat * w).to(dtype)``). The same for float32 / float64.
    """
    eps = _rms_eps("rms_norm", input, eps)
    ns = _shape_list("rms_norm", normalized_shape)
    return RMS_NORM(RmsNormCall(input, ns, weight, eps, _float("rms_norm", "offset", offset), cast_before_weight))[0]


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual_in_fp32: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Fused (dropout +) residual add + LayerNorm for pre-norm residual streams.

    Args:
        input, residual: same shape ``(*, *normalized_shape)`` and dtype (``residual`` may be
            float32 with a half input and ``residual_in_fp32``).
        normalized_shape, weight, bias, eps: as :func:`layer_norm`.
        residual_in_fp32: keep the residual stream in float32 for a float16 / bfloat16 input.
        dropout_p: dropout on ``input`` before the add (Philox, seeded from torch's default
            generator: reproducible under ``torch.manual_seed``); pass 0 in eval.

    Returns:
        ``(out, residual_out)`` where ``residual_out = dropout(input) + residual`` (added in
        float32; rounded to the input dtype, or float32 with ``residual_in_fp32``) and
        ``out = layer_norm(residual_out)``. One read of each input and one write of each
        output when fused.
    """
    ns = _shape_list("add_layer_norm", normalized_shape)
    dropout_p = _float("add_layer_norm", "dropout_p", dropout_p)
    out, residual_out, _, _ = ADD_LAYER_NORM(
        AddLayerNormCall(
            input,
            residual,
            ns,
            weight,
            bias,
            _float("add_layer_norm", "eps", eps),
            residual_in_fp32,
            dropout_p,
            _seed(dropout_p),
        )
    )
    return out, residual_out


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = False,
    residual_in_fp32: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Fused (dropout +) residual add + RMSNorm: ``add_layer_norm`` for RMSNorm models.

    ``residual_out = dropout(input) + residual`` as :func:`add_layer_norm`, and
    ``out = rms_norm(residual_out, ..., offset=offset, cast_before_weight=cast_before_weight)``
    with ``x_hat`` rounded (``cast_before_weight``) and ``out`` returned in the input's dtype.
    Returns ``(out, residual_out)``; differentiable in input, residual and weight.
    """
    eps = _rms_eps("add_rms_norm", input, eps)
    ns = _shape_list("add_rms_norm", normalized_shape)
    dropout_p = _float("add_rms_norm", "dropout_p", dropout_p)
    out, residual_out, _ = ADD_RMS_NORM(
        AddRmsNormCall(
            input,
            residual,
            ns,
            weight,
            eps,
            _float("add_rms_norm", "offset", offset),
            cast_before_weight,
            residual_in_fp32,
            dropout_p,
            _seed(dropout_p),
        )
    )
    return out, residual_out
