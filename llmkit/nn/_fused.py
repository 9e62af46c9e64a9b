"""Helpers that run a block's pieces through llmkit's fused ops.

The Transformer layers, the models and the HuggingFace swaps all build on four
patterns: ``norm(x)``, ``norm(x + residual)`` that also returns the sum (the residual
stream of a pre-norm block; LayerNorm or RMSNorm), ``activation(linear(x))`` with the bias
added inside the activation, and the gated MLP ``down(act(gate(x)) * up(x))`` of LLMs with
the activation and product fused (SwiGLU / GeGLU). Each helper takes the *modules* that hold
the parameters and falls back to calling them as they are when the fusion does not apply (an
unknown norm or activation, a subclass with its own ``forward``, forward hooks attached,
mismatched dtypes), so the result always equals the unfused computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import _fastpath as FP
from ..ops.gelu import gelu_forward as _gelu_point
from ..ops.layer_norm import add_layer_norm_forward as _add_ln_point
from ..ops.layer_norm import layer_norm_forward as _layer_norm_point
from ..ops.linear import LinearCall, linear_forward
from .activation import GELU
from .normalization import LayerNorm, RMSNorm

__all__ = [
    "norm",
    "add_norm",
    "add_norm_into",
    "dense",
    "linear",
    "linear_act",
    "gelu_after",
    "gelu_approximate",
    "glu_flavor",
    "glu",
    "gated_mlp",
    "rms_args",
]

_LAYER_NORMS = (nn.LayerNorm, LayerNorm)
_RMS_NORMS = (nn.RMSNorm, RMSNorm)
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# Exactly these classes (a subclass may have its own forward) and no hooks: the module
# computes what the op computes. TypeGuards, so the attributes read next are typed.
def _fusable_layer_norm(module: object) -> TypeGuard[nn.LayerNorm | LayerNorm]:
    return type(module) in _LAYER_NORMS and not _hooked(cast(nn.Module, module))


def _fusable_rms_norm(module: object) -> TypeGuard[nn.RMSNorm | RMSNorm]:
    return type(module) in _RMS_NORMS and not _hooked(cast(nn.Module, module))


def _fusable_linear(module: object) -> TypeGuard[nn.Linear]:
    return type(module) in _LINEARS and not _hooked(cast(nn.Module, module))


def _fusable_gelu(module: object) -> TypeGuard[nn.GELU | GELU]:
    return type(module) in (nn.GELU, GELU) and not _hooked(cast(nn.Module, module))


def norm(x: Tensor, module: Callable[[Tensor], Tensor]) -> Tensor:
    """``module(x)``; a ``LayerNorm`` / ``RMSNorm`` runs as the llmkit op."""
    if _fusable_layer_norm(module):
        return ops.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if _fusable_rms_norm(module):
        return ops.rms_norm(
            x,
            module.normalized_shape,
            module.weight,
            module.eps,
            offset=getattr(module, "offset", 0.0),
            cast_before_weight=getattr(module, "cast_before_weight", False),
        )
    return module(x)


RmsArgs = tuple[list[int], Tensor | None, float | None, float, bool]
"""(normalized_shape, weight, eps, offset, cast_before_weight) of an RMSNorm module."""


def rms_args(module: object, dtype: torch.dtype) -> RmsArgs | None:
    """The :func:`llmkit.ops.rms_norm` arguments that compute ``module`` on inputs of ``dtype``
    (a ``torch.nn.RMSNorm`` / ``llmkit.nn.RMSNorm``, or a module with an ``llmkit_rms_args``
    method, as the swapped HuggingFace norms have), or None when it is no such norm or the op
    cannot reproduce it for that dtype."""
    if _fusable_rms_norm(module):
        w = module.weight
        half_with_f32 = dtype in (torch.float16, torch.bfloat16) and w is not None and w.dtype == torch.float32
        if w is not None and w.dtype != dtype and not half_with_f32:
            return None
        return (
            list(module.normalized_shape),
            w,
            module.eps,
            getattr(module, "offset", 0.0),
            getattr(module, "cast_before_weight", False),
        )
    if isinstance(module, nn.Module) and _hooked(module):
        return None
    own = getattr(module, "llmkit_rms_args", None)
    return own(dtype) if callable(own) else None


def add_norm(x: Tensor, residual: Tensor, module: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(module(x + residual), x + residual)``, one fused kernel for a ``LayerNorm`` or an
    RMSNorm (:func:`rms_args`).

    ``x`` and ``residual`` have the same shape ``(*, d)``; the sum is taken in float32
    and rounded to their dtype (as ``x + residual`` is for float32 tensors).
    """
    same = x.dtype == residual.dtype and x.shape == residual.shape and x.dtype.is_floating_point
    if same and _fusable_layer_norm(module):
        return ops.add_layer_norm(x, residual, module.normalized_shape, module.weight, module.bias, module.eps)
    rms = rms_args(module, x.dtype) if same else None
    if rms is not None:
        ns, weight, eps, offset, cast_first = rms
        return ops.add_rms_norm(x, residual, ns, weight, eps, offset=offset, cast_before_weight=cast_first)
    total = x + residual
    return norm(total, module), total


_IN_PLACE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _own_temporary_ok(t: Tensor, point) -> bool:
    """May ``t``, a temporary the caller owns, be overwritten with ``point``'s reference result?

    Only outside autograd / compile / export on plain CPU tensors of a floating dtype the
    ops take, and when dispatch would run the reference implementation anyway: the in-place
    ATen kernel then computes exactly what the op computes (for float16 / bfloat16 both are
    ATen's float32 computation rounded once), into ``t``'s memory instead of a fresh
    allocation (on the CPU a fresh multi-megabyte buffer costs page faults comparable to the
    computation).
    """
    return t.dtype in _IN_PLACE_DTYPES and t.is_contiguous() and FP.eager_ok(t) and FP.selects_reference(point)


def gelu_after(t: Tensor, approximate: str) -> Tensor:
    """``ops.gelu(t, approximate)`` where ``t`` is a temporary the caller owns and drops.

    Computed in place into ``t`` when :func:`_own_temporary_ok` allows (the same values,
    bit for bit, as the reference backend's ``F.gelu``); otherwise the op.
    """
    if _own_temporary_ok(t, _gelu_point):
        return torch.ops.aten.gelu_(t, approximate=approximate)
    return ops.gelu(t, approximate)


def add_norm_into(x: Tensor, residual: Tensor, module: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`add_norm` where ``x`` is a temporary the caller owns: the sum may be written
    into ``x`` (when :func:`_own_temporary_ok` allows; the reference's float32 add, then its
    LayerNorm: the same values as ``add_layer_norm``)."""
    if (
        _fusable_layer_norm(module)
        and x.dtype == residual.dtype
        and x.shape == residual.shape
        and _own_temporary_ok(x, _add_ln_point)
        and FP.eager_ok(residual, optional=(module.weight, module.bias))
        and (module.weight is None or module.weight.dtype == x.dtype)
        and (module.bias is None or module.bias.dtype == x.dtype)
    ):
        total = x.add_(residual)
        out, _, _ = _layer_norm_point.call_backend(
            "reference", total, list(module.normalized_shape), module.weight, module.bias, module.eps
        )
        return out, total
    return add_norm(x, residual, module)


def gelu_approximate(activation: object) -> str | None:
    """``"none"`` / ``"tanh"`` when ``activation`` is a GELU llmkit can fuse, else None."""
    if activation is F.gelu:
        return "none"
    if _fusable_gelu(activation):
        return activation.approximate
    if isinstance(activation, functools.partial) and activation.func is F.gelu and not activation.args:
        approx = activation.keywords.get("approximate", "none")
        if set(activation.keywords) <= {"approximate"} and approx in ("none", "tanh"):
            return approx
    return None


GluFlavor = tuple[str, str | None]
"""``("swiglu", None)`` or ``("geglu", approximate)``: which gated activation op computes
``act(gate) * up``."""


def glu_flavor(activation: object) -> GluFlavor | None:
    """The gated op for ``act(gate) * up`` with this activation: a SiLU (``F.silu``,
    ``torch.nn.SiLU``) -> SwiGLU, a GELU llmkit fuses (:func:`gelu_approximate`) -> GeGLU;
    None for anything else."""
    if activation is F.silu or (
        isinstance(activation, nn.SiLU) and type(activation) is nn.SiLU and not _hooked(activation)
    ):
        return "swiglu", None
    approx = gelu_approximate(activation)
    return ("geglu", approx) if approx is not None else None


def glu(gate: Tensor, up: Tensor, flavor: GluFlavor) -> Tensor:
    """``act(gate) * up`` through :func:`llmkit.ops.swiglu` / :func:`llmkit.ops.geglu`."""
    kind, approx = flavor
    return ops.swiglu(gate, up) if kind == "swiglu" else ops.geglu(gate, up, approx or "none")


def gated_mlp(
    x: Tensor,
    gate_proj: nn.Module,
    up_proj: nn.Module,
    down_proj: nn.Module,
    activation: Callable[[Tensor], Tensor] | None,
    flavor: GluFlavor | None = None,
) -> Tensor:
    """``down_proj(activation(gate_proj(x)) * up_proj(x))``: the gated feed-forward of LLMs.

    ``x``: ``(*, hidden)``; returns ``(*, hidden_out)``. The activation and product run as one
    op (``flavor``, or what :func:`glu_flavor` finds for ``activation``); the linears go through
    :func:`linear` (the ``linear`` dispatch point's CPU GEMM choice). Anything else runs as written.
    """
    flavor = flavor if flavor is not None else glu_flavor(activation)
    gate, up = linear(x, gate_proj), linear(x, up_proj)
    if flavor is None:
        assert activation is not None
        return linear(activation(gate) * up, down_proj)
    return linear(glu(gate, up, flavor), down_proj)


def dense(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: str | None = None) -> Tensor:
    """``x @ weight^T + bias``, then ``gelu(., approximate=gelu)`` when ``gelu`` is given.

    ``x``: ``(*, in)``, ``weight``: ``(out, in)`` (any strides), ``bias``: ``(out,)`` or
    None; returns a fresh ``(*, out)`` tensor. Runs the ``linear`` dispatch point
    (:mod:`llmkit.ops.linear`): one oneDNN GEMM with the bias and GELU in its epilogue on
    float32 CPU inference (without a GELU, MKL's GEMM on an Intel CPU), the GEMM adding the
    bias on other CPU calls, ``bias_gelu`` on a GPU.
    """
    return linear_forward(LinearCall(x, weight, bias, gelu))


def linear(x: Tensor, module: Callable[[Tensor], Tensor]) -> Tensor:
    """``module(x)``; an exact ``nn.Linear`` without hooks runs as :func:`dense`."""
    if _fusable_linear(module):
        return dense(x, module.weight, module.bias)
    return module(x)


def linear_act(x: Tensor, linear: nn.Module, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """``activation(linear(x))``; for a GELU the bias add is fused into the activation.

    ``x``: ``(*, in_features)``; returns ``(*, out_features)``. With a GELU and an exact
    ``nn.Linear`` this is :func:`dense` with the GELU: on a GPU ``bias_gelu(x @ W^T, b)``
    (the pre-activation never rounded or written before the GELU), on the CPU the GEMM's
    own bias add (and on float32 inference one oneDNN GEMM with the GELU in its epilogue).
    """
    approx = gelu_approximate(activation)
    if approx is None or not _fusable_linear(linear):
        return activation(linear(x))
    return dense(x, linear.weight, linear.bias, approx)


def is_causal_hint_mask(mask: Tensor | None, is_causal: bool | None, size: int | None) -> bool:
    """``torch.nn.Transformer``'s rule: the hint if given, else whether ``mask`` is causal.

    With ``is_causal=None`` and a mask, compares the mask with the square causal mask
    of ``size`` (float ``-inf`` above the diagonal or boolean True above it), as
    ``torch.nn.modules.transformer._detect_is_causal_mask`` does.
    """
    if is_causal is not None:
        return bool(is_causal)
    if mask is None:
        return False
    sz = size if size is not None else mask.size(-2)
    if mask.dim() != 2 or tuple(mask.shape) != (sz, sz):
        return False
    upper = torch.ones(sz, sz, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    causal = torch.zeros(sz, sz, dtype=mask.dtype, device=mask.device).masked_fill(upper, float("-inf"))
    return bool(torch.equal(mask, causal))
