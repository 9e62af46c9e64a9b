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
``add_layer_norm.forward/backward``; this module registers the ``reference``
backend and the ``triton`` backend (float16 / bfloat16 / float32), whose kernels
(``kernels/layer_norm.py``) are imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._compat import fused_rms_norm
from ..dispatch import DispatchPoint
from . import _fastpath as FP
from . import _validate as V

__all__ = ["layer_norm", "rms_norm", "add_layer_norm"]

layer_norm_forward = DispatchPoint("layer_norm", "forward")
layer_norm_backward = DispatchPoint("layer_norm", "backward")
rms_norm_forward = DispatchPoint("rms_norm", "forward")
rms_norm_backward = DispatchPoint("rms_norm", "backward")
add_layer_norm_forward = DispatchPoint("add_layer_norm", "forward")
add_layer_norm_backward = DispatchPoint("add_layer_norm", "backward")


stats_dtype = V.stats_dtype


_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _lead(x: Tensor, ns: Sequence[int]) -> list[int]:
    return list(x.shape[: x.dim() - len(ns)])


def _empty_param_grad(p: Tensor | None, like: Tensor) -> Tensor:
    # custom ops cannot return None; an empty tensor stands for "no gradient".
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


# --------------------------------------------------------------------------------------
# reference backend
# --------------------------------------------------------------------------------------


@layer_norm_forward.register("reference")
def layer_norm_forward_reference(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward in float32 (float64 for float64 input) through ATen.

    float16 / bfloat16 CPU input with a weight or bias goes to ATen's mixed-precision CPU
    kernel as it is (parameters in float32): it reads the 16-bit values, computes and keeps the
    statistics in float32 and rounds the output once, as the converting path does (outputs
    agree to a last-place rounding), without the two full-size conversions (3x faster).
    """
    cdt = _compute_dtype(input.dtype)
    lead = _lead(input, normalized_shape)
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
def layer_norm_backward_reference(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward from the saved statistics, in float32 (float64 for float64)."""
    cdt = _compute_dtype(input.dtype)
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
    dw = dw.to(weight.dtype) if mask[1] else _empty_param_grad(weight, input)
    db = db.to(bias.dtype) if mask[2] else _empty_param_grad(bias, input)
    return dx, dw, db


@rms_norm_forward.register("reference")
def rms_norm_forward_reference(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """RMSNorm forward in float32 (float64 for float64 input) through ATen's fused op."""
    cdt = _compute_dtype(input.dtype)
    lead = _lead(input, normalized_shape)
    out, rstd = fused_rms_norm(input.to(cdt), list(normalized_shape), _as(weight, cdt), eps)
    return out.to(input.dtype).contiguous(), rstd.reshape(lead).to(stats_dtype(input.dtype)).contiguous()


@rms_norm_backward.register("reference")
def rms_norm_backward_reference(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    """RMSNorm backward from the saved rstd, in float32 (float64 for float64).

    With x_hat = x * rstd and g = grad_out * weight:
    dx = rstd * (g - x_hat * mean(g * x_hat)), dweight = sum over rows of grad_out * x_hat.
    """
    cdt = _compute_dtype(input.dtype)
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
        dw = _empty_param_grad(weight, input)
    return dx, dw


@add_layer_norm_forward.register("reference")
def add_layer_norm_forward_reference(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """residual_out = input + residual (float32 add, rounded); out = LayerNorm(residual_out)."""
    # ATen adds 16-bit tensors in float32 and rounds once: the float32 add, rounded
    residual_out = torch.add(input, residual)
    out, mean, rstd = layer_norm_forward_reference(residual_out, normalized_shape, weight, bias, eps)
    return out, residual_out.contiguous(), mean, rstd


@add_layer_norm_backward.register("reference")
def add_layer_norm_backward_reference(
    grad_out: Tensor,
    grad_residual_out: Tensor,
    residual_out: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of (out, residual_out) w.r.t. input (= w.r.t. residual), weight, bias."""
    dx, dw, db = layer_norm_backward_reference(
        grad_out, residual_out, normalized_shape, weight, bias, mean, rstd,
        [True, output_mask[1], output_mask[2]],
    )
    cdt = _compute_dtype(residual_out.dtype)
    if residual_out.dtype == cdt:
        dsum = dx + grad_residual_out
    else:
        dsum = (dx.to(cdt) + grad_residual_out.to(cdt)).to(residual_out.dtype)
    return dsum.contiguous(), dw, db


# --------------------------------------------------------------------------------------
# triton backend (kernels/layer_norm.py, imported on first use)
# --------------------------------------------------------------------------------------

TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the Triton kernels take (float64 goes to the reference backend)."""

_INT32_MAX = 2**31 - 1


def _triton_shape_reasons(input: Tensor, normalized_shape: Sequence[int]) -> list[str]:
    n = math.prod(normalized_shape)
    m = input.numel() // n if n else 0
    out = []
    if n > _INT32_MAX:
        out.append(f"rows of {n} elements exceed the kernels' int32 row length")
    if m > _INT32_MAX:
        out.append(f"{m} rows exceed the kernels' int32 row count")
    return out


def _triton_backward_reasons(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    params: dict[str, Tensor | None],
    stats: dict[str, Tensor | None],
    extra: dict[str, Tensor] | None = None,
) -> list[str]:
    """Why the Triton backward cannot take these (unvalidated) backward-op arguments."""
    out = []
    if input.dtype not in TRITON_DTYPES:
        out.append(f"takes float16, bfloat16, float32 inputs, got {V.dtype_name(input.dtype)}")
    for name, t in {"grad_out": grad_out, **(extra or {})}.items():
        if t.shape != input.shape:
            out.append(f"{name} has shape {list(t.shape)}, the input {list(input.shape)}")
        if t.dtype not in TRITON_DTYPES:
            out.append(f"{name} has dtype {V.dtype_name(t.dtype)}")
    lead = _lead(input, normalized_shape)
    for name, t in stats.items():
        if t is not None and (t.dtype != torch.float32 or list(t.shape) != lead):
            out.append(f"{name} must be float32 of shape {lead}, got {V.dtype_name(t.dtype)} {list(t.shape)}")
    for name, t in params.items():
        if t is not None and list(t.shape) != list(normalized_shape):
            out.append(f"{name} has shape {list(t.shape)}, normalized_shape is {list(normalized_shape)}")
    tensors = [grad_out, input, *params.values(), *stats.values(), *(extra or {}).values()]
    if len({t.device for t in tensors if t is not None}) > 1:
        out.append("tensors on different devices")
    return out + _triton_shape_reasons(input, normalized_shape)


def _grad_or_empty(grad: Tensor | None, param: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else _empty_param_grad(param, like)


def _ln_fwd_why_not(input, normalized_shape, weight, bias, eps):
    return _triton_shape_reasons(input, normalized_shape)


@layer_norm_forward.register("triton", dtypes=TRITON_DTYPES, why_not=_ln_fwd_why_not)
def layer_norm_forward_triton(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward through the Triton kernels (rows read in place where strided)."""
    from ..kernels import layer_norm as K

    out, _, mean, rstd = K.norm_forward(input, None, len(normalized_shape), weight, bias, eps, rms=False)
    return out, mean, rstd


def _ln_bwd_why_not(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask):
    return _triton_backward_reasons(
        grad_out, input, normalized_shape, {"weight": weight, "bias": bias}, {"mean": mean, "rstd": rstd}
    )


@layer_norm_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_ln_bwd_why_not)
def layer_norm_backward_triton(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward: dx, and dweight/dbias reduced through per-program partial sums."""
    from ..kernels import layer_norm as K

    dx, dw, db = K.norm_backward(grad_out, input, len(normalized_shape), weight, bias, mean, rstd, output_mask)
    return dx, _grad_or_empty(dw, weight, input), _grad_or_empty(db, bias, input)


def _rms_fwd_why_not(input, normalized_shape, weight, eps):
    return _triton_shape_reasons(input, normalized_shape)


@rms_norm_forward.register("triton", dtypes=TRITON_DTYPES, why_not=_rms_fwd_why_not)
def rms_norm_forward_triton(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """RMSNorm forward through the Triton kernels."""
    from ..kernels import layer_norm as K

    out, _, _, rstd = K.norm_forward(input, None, len(normalized_shape), weight, None, eps, rms=True)
    return out, rstd


def _rms_bwd_why_not(grad_out, input, normalized_shape, weight, rstd, output_mask):
    return _triton_backward_reasons(grad_out, input, normalized_shape, {"weight": weight}, {"rstd": rstd})


@rms_norm_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_rms_bwd_why_not)
def rms_norm_backward_triton(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    """RMSNorm backward: dx and dweight (partial sums, no atomics)."""
    from ..kernels import layer_norm as K

    dx, dw, _ = K.norm_backward(
        grad_out, input, len(normalized_shape), weight, None, None, rstd, list(output_mask), rms=True
    )
    return dx, _grad_or_empty(dw, weight, input)


def _aln_fwd_why_not(input, residual, normalized_shape, weight, bias, eps):
    return _triton_shape_reasons(input, normalized_shape)


@add_layer_norm_forward.register("triton", dtypes=TRITON_DTYPES, why_not=_aln_fwd_why_not)
def add_layer_norm_forward_triton(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One kernel: reads input and residual once, writes residual_out and the normed output."""
    from ..kernels import layer_norm as K

    out, residual_out, mean, rstd = K.norm_forward(
        input, residual, len(normalized_shape), weight, bias, eps, rms=False
    )
    return out, residual_out, mean, rstd


def _aln_bwd_why_not(grad_out, grad_residual_out, residual_out, normalized_shape, weight, bias, mean, rstd,
                     output_mask):
    return _triton_backward_reasons(
        grad_out, residual_out, normalized_shape, {"weight": weight, "bias": bias},
        {"mean": mean, "rstd": rstd}, {"grad_residual_out": grad_residual_out},
    )


@add_layer_norm_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_aln_bwd_why_not)
def add_layer_norm_backward_triton(
    grad_out: Tensor,
    grad_residual_out: Tensor,
    residual_out: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """d(input) = d(residual) = LayerNorm's dx + grad_residual_out, summed in float32, rounded once."""
    from ..kernels import layer_norm as K

    dsum, dw, db = K.norm_backward(
        grad_out, residual_out, len(normalized_shape), weight, bias, mean, rstd,
        [True, output_mask[1], output_mask[2]], grad_residual=grad_residual_out,
    )
    return dsum, _grad_or_empty(dw, weight, residual_out), _grad_or_empty(db, bias, residual_out)


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("llmkit::layer_norm", mutates_args=())
def _layer_norm_op(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    ns = _check_norm("layer_norm", input, normalized_shape, weight, bias, eps)
    return layer_norm_forward(input, ns, weight, bias, eps)


@_layer_norm_op.register_fake
def _(input, normalized_shape, weight, bias, eps):
    ns = _check_norm("layer_norm", input, normalized_shape, weight, bias, eps)
    lead = _lead(input, ns)
    sdt = stats_dtype(input.dtype)
    return (
        input.new_empty(input.shape),
        input.new_empty(lead, dtype=sdt),
        input.new_empty(lead, dtype=sdt),
    )


@torch.library.custom_op("llmkit::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    ns = _check_ln_backward(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask)
    return layer_norm_backward(grad_out, input, ns, weight, bias, mean, rstd, list(output_mask))


@_layer_norm_backward_op.register_fake
def _(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask):
    _check_ln_backward(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask)
    return (
        input.new_empty(input.shape),
        _empty_param_grad(weight, input),
        _empty_param_grad(bias, input),
    )


def _ln_setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.normalized_shape = list(normalized_shape)
    ctx.save_for_backward(input, weight, bias, mean, rstd)
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


torch.library.register_autograd("llmkit::layer_norm", _ln_backward, setup_context=_ln_setup_context)


@torch.library.custom_op("llmkit::rms_norm", mutates_args=())
def _rms_norm_op(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    ns = _check_norm("rms_norm", input, normalized_shape, weight, None, eps)
    return rms_norm_forward(input, ns, weight, eps)


@_rms_norm_op.register_fake
def _(input, normalized_shape, weight, eps):
    ns = _check_norm("rms_norm", input, normalized_shape, weight, None, eps)
    return input.new_empty(input.shape), input.new_empty(_lead(input, ns), dtype=stats_dtype(input.dtype))


@torch.library.custom_op("llmkit::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    ns = _check_rms_backward(grad_out, input, normalized_shape, weight, rstd, output_mask)
    return rms_norm_backward(grad_out, input, ns, weight, rstd, list(output_mask))


@_rms_norm_backward_op.register_fake
def _(grad_out, input, normalized_shape, weight, rstd, output_mask):
    _check_rms_backward(grad_out, input, normalized_shape, weight, rstd, output_mask)
    return input.new_empty(input.shape), _empty_param_grad(weight, input)


def _rms_setup_context(ctx, inputs, output):
    input, normalized_shape, weight, eps = inputs
    _, rstd = output
    ctx.normalized_shape = list(normalized_shape)
    ctx.save_for_backward(input, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_backward(ctx, grad_out, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw = torch.ops.llmkit.rms_norm_backward(
        grad_out, input, ctx.normalized_shape, weight, rstd, [need[0], need[2]]
    )
    return dx if need[0] else None, None, dw if need[2] and weight is not None else None, None


torch.library.register_autograd("llmkit::rms_norm", _rms_backward, setup_context=_rms_setup_context)


@torch.library.custom_op("llmkit::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ns = _check_norm("add_layer_norm", input, normalized_shape, weight, bias, eps)
    _check_residual("add_layer_norm", input, residual)
    return add_layer_norm_forward(input, residual, ns, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(input, residual, normalized_shape, weight, bias, eps):
    ns = _check_norm("add_layer_norm", input, normalized_shape, weight, bias, eps)
    _check_residual("add_layer_norm", input, residual)
    lead = _lead(input, ns)
    sdt = stats_dtype(input.dtype)
    return (
        input.new_empty(input.shape),
        input.new_empty(input.shape),
        input.new_empty(lead, dtype=sdt),
        input.new_empty(lead, dtype=sdt),
    )


@torch.library.custom_op("llmkit::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(
    grad_out: Tensor,
    grad_residual_out: Tensor,
    residual_out: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    ns = _check_aln_backward(grad_out, grad_residual_out, residual_out, normalized_shape, weight, bias, mean, rstd,
                             output_mask)
    return add_layer_norm_backward(
        grad_out, grad_residual_out, residual_out, ns, weight, bias, mean, rstd, list(output_mask),
    )


@_add_layer_norm_backward_op.register_fake
def _(grad_out, grad_residual_out, residual_out, normalized_shape, weight, bias, mean, rstd, output_mask):
    _check_aln_backward(grad_out, grad_residual_out, residual_out, normalized_shape, weight, bias, mean, rstd,
                        output_mask)
    return (
        residual_out.new_empty(residual_out.shape),
        _empty_param_grad(weight, residual_out),
        _empty_param_grad(bias, residual_out),
    )


def _aln_setup_context(ctx, inputs, output):
    input, residual, normalized_shape, weight, bias, eps = inputs
    _, residual_out, mean, rstd = output
    ctx.normalized_shape = list(normalized_shape)
    ctx.save_for_backward(residual_out, weight, bias, mean, rstd)
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


torch.library.register_autograd(
    "llmkit::add_layer_norm", _aln_backward, setup_context=_aln_setup_context
)


# --------------------------------------------------------------------------------------
# functional API (mirrors torch.nn.functional)
# --------------------------------------------------------------------------------------


_VALIDATED = FP.ValidatedSignatures()
"""Argument signatures that passed validation on the eager fast path (see ``_fastpath``)."""


def _eager_key(
    op: str,
    input: Tensor,
    ns: list,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: object,
    residual: Tensor | None = None,
) -> tuple:
    """The validation signature of a norm call (``ns`` a list of ints, ``eps`` a float: the
    functionals make them so first)."""
    return (op, input.shape, input.dtype, tuple(ns), FP.signature(weight), FP.signature(bias),
            FP.signature(residual), eps)


def _shape_list(op: str, normalized_shape: int | Sequence[int]) -> list[int]:
    """``normalized_shape`` as a list of ints; anything else gets a clear error here, before
    the custom op's schema would refuse it in its own words."""
    if type(normalized_shape) is int:
        return [normalized_shape]
    if type(normalized_shape) in (list, tuple, torch.Size) and all(type(n) is int for n in normalized_shape):
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
    if FP.eager_ok(input, optional=(weight, bias)):
        key = _eager_key("layer_norm", input, ns, weight, bias, eps)
        _VALIDATED.check(key, lambda: _check_norm("layer_norm", input, ns, weight, bias, eps))
        return layer_norm_forward(input, ns, weight, bias, eps)[0]
    out, _, _ = torch.ops.llmkit.layer_norm(input, ns, weight, bias, eps)
    return out


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
    if FP.eager_ok(input, optional=(weight,)):
        key = _eager_key("rms_norm", input, ns, weight, None, eps)
        _VALIDATED.check(key, lambda: _check_norm("rms_norm", input, ns, weight, None, eps))
        return rms_norm_forward(input, ns, weight, eps)[0]
    out, _ = torch.ops.llmkit.rms_norm(input, ns, weight, eps)
    return out


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
    if FP.eager_ok(input, residual, optional=(weight, bias)):
        key = _eager_key("add_layer_norm", input, ns, weight, bias, eps, residual)
        _VALIDATED.check(key, lambda: (_check_norm("add_layer_norm", input, ns, weight, bias, eps),
                                       _check_residual("add_layer_norm", input, residual)))
        out, residual_out, _, _ = add_layer_norm_forward(input, residual, ns, weight, bias, eps)
        return out, residual_out
    out, residual_out, _, _ = torch.ops.llmkit.add_layer_norm(input, residual, ns, weight, bias, eps)
    return out, residual_out
