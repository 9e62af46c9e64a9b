"""Packed variable-length attention (flash-attention's ``flash_attn_varlen_func``): what
defines the op.

Ops: ``llmkit::varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, dropout_p, is_causal, scale, enable_gqa, seed, offset, window_left,
window_right, bottom_right, softcap, alibi_slopes) -> (out, lse)`` with autograd, and
``llmkit::varlen_attention_backward`` -> ``(dq, dk, dv)``.

Shapes: ``query (total_q, Hq, D)``, ``key (total_k, Hkv, D)``, ``value (total_k, Hkv, Dv)``,
any strides; sequence ``b`` holds query rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` and
key rows ``cu_seqlens_k[b] : cu_seqlens_k[b + 1]`` (int32 ``(B + 1,)``, starting at 0,
non-decreasing, ending at the total; lengths may be 0). Each sequence is attended alone, with
every option of :func:`~llmkit.ops.scaled_dot_product_attention` applied within it (causal,
bottom-right alignment, sliding window and ALiBi's distances per sequence; ALiBi slopes
``(Hq,)`` or ``(B, Hq)``). ``out`` is ``(total_q, Hq, Dv)`` contiguous in the query's dtype;
``lse`` is ``(Hq, total_q)`` float32 (float64 for float64 inputs), flash-attention's varlen
layout, ``+inf`` on rows with no visible key (their output and gradients are zero).

Dropout: sequence ``b`` keeps exactly what ``scaled_dot_product_attention`` on that sequence
alone (as ``(1, Hq, Sq_b, D)``) keeps with the same seed and offset ``offset + b * Hq *
max_seqlen_q * max_seqlen_k``: the counters of different sequences never overlap.

Validation: shapes, dtypes, devices and options on every call (cached per signature on the
fast path); the *values* of ``cu_seqlens`` (start, order, total, the longest length against
``max_seqlen``) on every real call, before any launch. On a GPU that reads ``2 (B + 1)``
integers back (one host sync), skipped while a CUDA graph is being captured.

Dispatch points ``varlen_attention.forward`` / ``varlen_attention.backward``:
``reference`` (one dense attention reference call per sequence), ``triton`` (the attention
kernels compiled with ``VARLEN``: one launch for every sequence), ``cuda_ext`` (declines).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._attention_checks import check_alignment_window, check_heads, check_llm_options
from ._op import Op
from .attention import compute_dtype, scalar_options

__all__ = ["varlen_attention"]


class VarlenAttentionCall(NamedTuple):
    query: Tensor
    key: Tensor
    value: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    dropout_p: float
    is_causal: bool
    scale: float
    enable_gqa: bool
    seed: int
    offset: int
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0
    alibi_slopes: Tensor | None = None


class VarlenAttentionBackwardCall(NamedTuple):
    grad_out: Tensor
    query: Tensor
    key: Tensor
    value: Tensor
    out: Tensor
    lse: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    dropout_p: float
    is_causal: bool
    scale: float
    enable_gqa: bool
    seed: int
    offset: int
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0
    alibi_slopes: Tensor | None = None


varlen_attention_forward = DispatchPoint("varlen_attention", "forward", VarlenAttentionCall)
varlen_attention_backward = DispatchPoint("varlen_attention", "backward", VarlenAttentionBackwardCall)

_OP = "varlen_attention"
_BWD = "varlen_attention_backward"


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _check_packed(op: str, query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> None:
    """q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv): same dtype and device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(op, name, t)
        V.check_floating(op, name, t)
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D (total_tokens, heads, head_dim), got shape {list(t.shape)}")
        if t.dtype != query.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {V.dtype_name(t.dtype)} but query has {V.dtype_name(query.dtype)}; "
                "they must match"
            )
    V.check_same_device(op, query=query, key=key, value=value)
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"{op}: key has {key.shape[0]} tokens but value has {value.shape[0]}; they must match")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"{op}: key has {key.shape[1]} heads but value has {value.shape[1]}; they must match")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{op}: head dims disagree: query has {query.shape[2]}, key has {key.shape[2]}")
    check_heads(op, query.shape[1], key.shape[1], enable_gqa)


def _check_cu_seqlens(op: str, c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> None:
    for name, t in (("cu_seqlens_q", c.cu_seqlens_q), ("cu_seqlens_k", c.cu_seqlens_k)):
        V.check_tensor(op, name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be int32, got {V.dtype_name(t.dtype)}")
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{op}: {name} must be 1-D of length B + 1 >= 1, got shape {list(t.shape)}")
    if c.cu_seqlens_q.shape[0] != c.cu_seqlens_k.shape[0]:
        raise ValueError(
            f"{op}: cu_seqlens_q has {c.cu_seqlens_q.shape[0] - 1} sequences but cu_seqlens_k has "
            f"{c.cu_seqlens_k.shape[0] - 1}; they must match"
        )
    V.check_same_device(op, query=c.query, cu_seqlens_q=c.cu_seqlens_q, cu_seqlens_k=c.cu_seqlens_k)
    for name, m in (("max_seqlen_q", c.max_seqlen_q), ("max_seqlen_k", c.max_seqlen_k)):
        if type(m) is not int or m < 0:
            raise ValueError(f"{op}: {name} must be an int >= 0, got {m!r}")


def _check_options(op: str, c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> None:
    if not (0.0 <= c.dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {c.dropout_p!r}")
    if not math.isfinite(c.scale):
        raise ValueError(f"{op}: scale must be a finite number, got {c.scale!r}")
    b, hq = c.cu_seqlens_q.shape[0] - 1, c.query.shape[1]
    check_llm_options(op, c.query, c.window_left, c.window_right, c.softcap, c.alibi_slopes, (b, hq))


def check_varlen(c: VarlenAttentionCall) -> None:
    _check_packed(_OP, c.query, c.key, c.value, c.enable_gqa)
    _check_cu_seqlens(_OP, c)
    _check_options(_OP, c)


def check_varlen_backward(c: VarlenAttentionBackwardCall) -> None:
    _check_packed(_BWD, c.query, c.key, c.value, c.enable_gqa)
    _check_cu_seqlens(_BWD, c)
    _check_options(_BWD, c)
    out_shape = [c.query.shape[0], c.query.shape[1], c.value.shape[2]]
    for name, t in (("grad_out", c.grad_out), ("out", c.out)):
        V.check_saved(_BWD, name, t, out_shape, c.query.dtype, "(total_q, Hq, Dv) in the query's dtype")
    V.check_saved(
        _BWD,
        "lse",
        c.lse,
        [c.query.shape[1], c.query.shape[0]],
        compute_dtype(c.query.dtype),
        "(Hq, total_q), the forward's log-sum-exp",
    )
    V.check_same_device(_BWD, query=c.query, grad_out=c.grad_out, out=c.out, lse=c.lse)


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_cu_seqlens_values(op: str, c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> None:
    """cu_seqlens start at 0, never decrease, end at the number of tokens, and no sequence is
    longer than max_seqlen (read back from a GPU: one sync; skipped during graph capture)."""
    for side, cu, total, longest in (
        ("q", c.cu_seqlens_q, c.query.shape[0], c.max_seqlen_q),
        ("k", c.cu_seqlens_k, c.key.shape[0], c.max_seqlen_k),
    ):
        if _capturing(cu):
            continue
        vals = cu.to("cpu", torch.int64)
        name = f"cu_seqlens_{side}"
        if int(vals[0]) != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {int(vals[0])}")
        lens = vals[1:] - vals[:-1]
        if lens.numel() and int(lens.min()) < 0:
            i = int((lens < 0).nonzero()[0])
            raise ValueError(
                f"{op}: {name} must be non-decreasing, but {name}[{i + 1}] = {int(vals[i + 1])} < "
                f"{name}[{i}] = {int(vals[i])}"
            )
        if int(vals[-1]) != total:
            what = "query" if side == "q" else "key/value"
            raise ValueError(f"{op}: {name}[-1] = {int(vals[-1])} must equal the number of {what} tokens, {total}")
        if lens.numel() and int(lens.max()) > longest:
            i = int(lens.argmax())
            raise ValueError(
                f"{op}: sequence {i} has {int(lens.max())} {'query' if side == 'q' else 'key'} tokens, more than "
                f"max_seqlen_{side} = {longest}"
            )


def _values(c: VarlenAttentionCall) -> None:
    check_cu_seqlens_values(_OP, c)


def _values_backward(c: VarlenAttentionBackwardCall) -> None:
    check_cu_seqlens_values(_BWD, c)


# --------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------


def _fake(c: VarlenAttentionCall) -> tuple[Tensor, Tensor]:
    tq, hq, _ = c.query.shape
    return (
        c.query.new_empty((tq, hq, c.value.shape[2])),
        c.query.new_empty((hq, tq), dtype=compute_dtype(c.query.dtype)),
    )


def _fake_backward(c: VarlenAttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    return c.query.new_empty(c.query.shape), c.key.new_empty(c.key.shape), c.value.new_empty(c.value.shape)


def _contiguous(c: VarlenAttentionCall, result: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    out, lse = result
    return out.contiguous(), lse.contiguous()


VARLEN_ATTENTION = Op(
    _OP,
    VarlenAttentionCall,
    tuple[Tensor, Tensor],
    varlen_attention_forward,
    check_varlen,
    _fake,
    check_values=_values,
    finish=_contiguous,
)
VARLEN_ATTENTION_BACKWARD = Op(
    _BWD,
    VarlenAttentionBackwardCall,
    tuple[Tensor, Tensor, Tensor],
    varlen_attention_backward,
    check_varlen_backward,
    _fake_backward,
    check_values=_values_backward,
    finish=lambda c, r: tuple(t.contiguous() for t in r),
)


def _setup(ctx, c: VarlenAttentionCall, output) -> None:
    out, lse = output
    ctx.args = (
        c.max_seqlen_q,
        c.max_seqlen_k,
        c.dropout_p,
        c.is_causal,
        c.scale,
        c.enable_gqa,
        c.seed,
        c.offset,
        c.window_left,
        c.window_right,
        c.bottom_right,
        c.softcap,
    )
    ctx.save_for_backward(c.query, c.key, c.value, out, lse, c.cu_seqlens_q, c.cu_seqlens_k, c.alibi_slopes)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv = torch.ops.llmkit.varlen_attention_backward(
        grad_out.contiguous(), query, key, value, out, lse, cu_q, cu_k, *ctx.args, alibi_slopes
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        *(None,) * (len(VarlenAttentionCall._fields) - 3),
    )


VARLEN_ATTENTION.register_autograd(_backward, _setup)


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


@overload
def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    enable_gqa: bool = False,
    return_lse: Literal[False] = False,
) -> Tensor: ...


@overload
def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    enable_gqa: bool = False,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences of different lengths (``flash_attn_varlen_func``).

    Args:
        query: ``(total_q, Hq, D)``; key ``(total_k, Hkv, D)``; value ``(total_k, Hkv, Dv)``;
            float16 / bfloat16 / float32 / float64, any strides.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)``: sequence ``b`` is rows
            ``cu[b]:cu[b + 1]`` (starting at 0, non-decreasing, ending at the total).
        max_seqlen_q, max_seqlen_k: at least the longest query / key length (the kernels'
            grid; a larger value only launches programs that return at once).
        dropout_p, scale, is_causal, enable_gqa: as in
            :func:`~llmkit.ops.scaled_dot_product_attention`, per sequence.
        causal_alignment, window_size, softcap, alibi_slopes: as there, within each sequence
            (``"bottom_right"``: query ``i`` of a sequence sees up to key ``i + Sk_b - Sq_b``;
            slopes ``(Hq,)`` or ``(B, Hq)``).
        return_lse: also return ``lse`` ``(Hq, total_q)`` float32 (natural log, ``+inf`` on
            rows with no visible key), without gradient.

    Returns:
        ``(total_q, Hq, Dv)`` in the query's dtype, contiguous (and ``lse``). Sequence ``b``'s
        rows equal ``scaled_dot_product_attention`` on that sequence alone.
    """
    op = _OP
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(op, name, t)
    check_alignment_window(op, causal_alignment, window_size)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, Tensor) and m.numel() == 1 and not m.is_floating_point():
            m = int(m)  # flash-attention's callers sometimes pass a 0-d tensor
        if type(m) is not int:
            raise ValueError(f"{op}: {name} must be an int >= 0, got {m!r}")
        if name == "max_seqlen_q":
            max_seqlen_q = m
        else:
            max_seqlen_k = m
    scale, dropout_p, softcap, seed = scalar_options(op, query.shape[-1], scale, dropout_p, softcap)
    left, right = window_size
    out, lse = VARLEN_ATTENTION(
        VarlenAttentionCall(
            query,
            key,
            value,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p,
            bool(is_causal),
            scale,
            bool(enable_gqa),
            seed,
            0,
            left,
            right,
            causal_alignment == "bottom_right",
            softcap,
            alibi_slopes,
        )
    )
    return (out, lse) if return_lse else out
