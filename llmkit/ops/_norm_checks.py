"""Input checks of the norm ops (``llmkit/ops/layer_norm.py``): the forward arguments, RMSNorm's
options, the residual of the add variants and their backward's gradients, dropout.

Each raises ``ValueError`` / ``TypeError`` naming the op, the argument, what it got and what
it needs, before any kernel runs (the ops call them from their validation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _validate as V

if TYPE_CHECKING:
    from .layer_norm import (
        AddLayerNormBackwardCall,
        AddLayerNormCall,
        AddRmsNormBackwardCall,
        AddRmsNormCall,
        LayerNormCall,
        RmsNormBackwardCall,
        RmsNormCall,
    )


def check_norm(
    op: str, input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> list[int]:
    V.check_tensor(op, "input", input)
    V.check_floating(op, "input", input)
    ns, _, _ = V.normalized_rows(op, input, normalized_shape)
    V.check_affine(op, "weight", weight, ns, input)
    V.check_affine(op, "bias", bias, ns, input)
    V.check_same_device(op, input=input, weight=weight, bias=bias)
    V.check_eps(op, eps)
    return ns


def check_rms_options(op: str, weight: Tensor | None, offset: float, cast_before_weight: bool) -> None:
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise ValueError(f"{op}: offset must be a finite number, got {offset!r}")
    if offset != 0.0 and weight is None:
        raise ValueError(f"{op}: offset {offset!r} scales the weight (offset + weight); it needs a weight, got None")
    if not isinstance(cast_before_weight, bool):
        raise TypeError(f"{op}: cast_before_weight must be a bool, got {cast_before_weight!r}")


def check_dropout(op: str, dropout_p: float, seed: int) -> None:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{op}: seed must be an int, got {seed!r}")


def check_add_backward(
    op: str,
    grad_out: Tensor,
    grad_residual_out: Tensor,
    residual_out: Tensor,
    normalized_shape: Sequence[int],
    params: dict[str, Tensor | None],
    stats: dict[str, Tensor],
    output_mask: Sequence[bool],
    dropout_p: float,
    seed: int,
) -> list[int]:
    """An ``add_*_norm`` backward: ``grad_residual_out`` like ``residual_out``; ``grad_out`` of its
    shape in the output's dtype (``residual_out``'s, or float16 / bfloat16 for a float32 residual
    stream); weight / bias and statistics as for a forward input of ``grad_out``'s dtype."""
    V.check_tensor(op, "residual_out", residual_out)
    V.check_floating(op, "residual_out", residual_out)
    ns, _, _ = V.normalized_rows(op, residual_out, normalized_shape, "residual_out")
    V.check_grad(op, "grad_residual_out", grad_residual_out, residual_out, "residual_out")
    V.check_tensor(op, "grad_out", grad_out)
    if grad_out.shape != residual_out.shape:
        raise ValueError(
            f"{op}: grad_out has shape {list(grad_out.shape)}; it must equal residual_out's shape "
            f"{list(residual_out.shape)}"
        )
    half_out = residual_out.dtype == torch.float32 and grad_out.dtype in V.HALF_DTYPES
    if grad_out.dtype != residual_out.dtype and not half_out:
        raise TypeError(
            f"{op}: grad_out has dtype {V.dtype_name(grad_out.dtype)}; it must be residual_out's dtype "
            f"{V.dtype_name(residual_out.dtype)} (or float16 / bfloat16 with a float32 residual_out)"
        )
    for name, p in params.items():
        V.check_affine(op, name, p, ns, grad_out)
    lead = list(residual_out.shape[: residual_out.dim() - len(ns)])
    for name, t in stats.items():
        V.check_saved(op, name, t, lead, V.stats_dtype(grad_out.dtype), "one per row of residual_out")
    V.check_same_device(
        op, residual_out=residual_out, grad_out=grad_out, grad_residual_out=grad_residual_out, **params, **stats
    )
    V.check_output_mask(op, output_mask, 1 + len(params))
    check_dropout(op, dropout_p, seed)
    return ns


def check_residual(op: str, input: Tensor, residual: Tensor, residual_in_fp32: bool = False) -> None:
    V.check_tensor(op, "residual", residual)
    if residual.shape != input.shape:
        raise ValueError(
            f"{op}: residual has shape {list(residual.shape)}; it must equal input's shape {list(input.shape)}"
        )
    if not isinstance(residual_in_fp32, bool):
        raise TypeError(f"{op}: residual_in_fp32 must be a bool, got {residual_in_fp32!r}")
    allowed = (input.dtype, torch.float32) if residual_in_fp32 and input.dtype in V.HALF_DTYPES else (input.dtype,)
    if residual.dtype not in allowed:
        need = " or ".join(V.dtype_name(d) for d in allowed)
        raise TypeError(
            f"{op}: residual has dtype {V.dtype_name(residual.dtype)}; with a {V.dtype_name(input.dtype)} input"
            f"{' and residual_in_fp32' if residual_in_fp32 else ''} it must be {need}"
        )
    V.check_same_device(op, input=input, residual=residual)


# the checks of each dispatch point's call (the forward ones also run on the fast path)


def _check_ln_backward(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask) -> list[int]:
    return V.check_norm_backward(
        "layer_norm_backward",
        "input",
        input,
        normalized_shape,
        {"grad_out": grad_out},
        {"weight": weight, "bias": bias},
        {"mean": mean, "rstd": rstd},
        output_mask,
    )


def _check_rms_backward(c: RmsNormBackwardCall) -> list[int]:
    ns = V.check_norm_backward(
        "rms_norm_backward",
        "input",
        c.input,
        c.normalized_shape,
        {"grad_out": c.grad_out},
        {"weight": c.weight},
        {"rstd": c.rstd},
        c.output_mask,
    )
    check_rms_options("rms_norm_backward", c.weight, c.offset, c.cast_before_weight)
    return ns


def check_layer_norm(c: LayerNormCall) -> None:
    check_norm("layer_norm", c.input, c.normalized_shape, c.weight, c.bias, c.eps)


def check_rms_norm(c: RmsNormCall) -> None:
    check_norm("rms_norm", c.input, c.normalized_shape, c.weight, None, c.eps)
    check_rms_options("rms_norm", c.weight, c.offset, c.cast_before_weight)


def check_add_layer_norm(c: AddLayerNormCall) -> None:
    check_norm("add_layer_norm", c.input, c.normalized_shape, c.weight, c.bias, c.eps)
    check_residual("add_layer_norm", c.input, c.residual, c.residual_in_fp32)
    check_dropout("add_layer_norm", c.dropout_p, c.seed)


def check_add_rms_norm(c: AddRmsNormCall) -> None:
    check_norm("add_rms_norm", c.input, c.normalized_shape, c.weight, None, c.eps)
    check_rms_options("add_rms_norm", c.weight, c.offset, c.cast_before_weight)
    check_residual("add_rms_norm", c.input, c.residual, c.residual_in_fp32)
    check_dropout("add_rms_norm", c.dropout_p, c.seed)


def _check_aln_backward(c: AddLayerNormBackwardCall) -> list[int]:
    return check_add_backward(
        "add_layer_norm_backward",
        c.grad_out,
        c.grad_residual_out,
        c.residual_out,
        c.normalized_shape,
        {"weight": c.weight, "bias": c.bias},
        {"mean": c.mean, "rstd": c.rstd},
        c.output_mask,
        c.dropout_p,
        c.seed,
    )


def _check_arn_backward(c: AddRmsNormBackwardCall) -> list[int]:
    ns = check_add_backward(
        "add_rms_norm_backward",
        c.grad_out,
        c.grad_residual_out,
        c.residual_out,
        c.normalized_shape,
        {"weight": c.weight},
        {"rstd": c.rstd},
        c.output_mask,
        c.dropout_p,
        c.seed,
    )
    check_rms_options("add_rms_norm_backward", c.weight, c.offset, c.cast_before_weight)
    return ns
