"""Packed variable-length attention on the reference backend: one call of the dense attention
reference (``reference/attention.py``) per sequence, on ``(1, H, S_b, D)`` views of the packed
tensors, with sequence ``b``'s dropout offset (``offset + b * Hq * max_seqlen_q *
max_seqlen_k``, see ``llmkit/ops/varlen_attention.py``). Independent of the Triton kernels."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ...ops.attention import AttentionBackwardCall, AttentionCall, compute_dtype
from ...ops.varlen_attention import (
    VarlenAttentionBackwardCall,
    VarlenAttentionCall,
    varlen_attention_backward,
    varlen_attention_forward,
)
from .attention import attention_backward_reference, attention_forward_reference


def _sequences(c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> Iterator[tuple[int, int, int, int, int, tuple]]:
    """``(q_start, q_end, k_start, k_end, dropout offset, options)`` of every sequence with a query
    and a key (the others are zeros, ``lse = +inf``); options: the dense call's window,
    alignment, softcap and slopes."""
    cq, ck = c.cu_seqlens_q.tolist(), c.cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:
            continue
        slopes = c.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b : b + 1]
        offset = c.offset + b * c.query.shape[1] * c.max_seqlen_q * c.max_seqlen_k
        yield (
            cq[b],
            cq[b + 1],
            ck[b],
            ck[b + 1],
            offset,
            (c.window_left, c.window_right, c.bottom_right, c.softcap, slopes),
        )


def _dense(t: Tensor, start: int, end: int) -> Tensor:
    """Rows [start, end) of a packed (total, H, D) tensor as a (1, H, S, D) view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


@varlen_attention_forward.register("reference")
def varlen_attention_forward_reference(c: VarlenAttentionCall) -> tuple[Tensor, Tensor]:
    """Each sequence by the dense reference (float32 math, float64 for float64)."""
    tq, hq, _ = c.query.shape
    out = c.query.new_zeros((tq, hq, c.value.shape[2]))
    lse = c.query.new_full((hq, tq), float("inf"), dtype=compute_dtype(c.query.dtype))
    for qs, qe, ks, ke, offset, options in _sequences(c):
        dense = AttentionCall(
            _dense(c.query, qs, qe),
            _dense(c.key, ks, ke),
            _dense(c.value, ks, ke),
            None,
            c.dropout_p,
            c.is_causal,
            c.scale,
            c.enable_gqa,
            c.seed,
            offset,
            *options,
        )
        o, l_ = attention_forward_reference(dense)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l_[0]
    return out, lse


@varlen_attention_backward.register("reference")
def varlen_attention_backward_reference(c: VarlenAttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """Each sequence by the dense reference backward; keys and rows of no sequence pair stay 0."""
    dq, dk, dv = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (c.query, c.key, c.value))
    for qs, qe, ks, ke, offset, options in _sequences(c):
        dense = AttentionBackwardCall(
            _dense(c.grad_out, qs, qe),
            _dense(c.query, qs, qe),
            _dense(c.key, ks, ke),
            _dense(c.value, ks, ke),
            _dense(c.out, qs, qe),
            c.lse[:, qs:qe].unsqueeze(0),
            None,
            c.dropout_p,
            c.is_causal,
            c.scale,
            c.enable_gqa,
            c.seed,
            offset,
            False,
            *options,
        )
        gq, gk, gv, _ = attention_backward_reference(dense)
        dq[qs:qe] = gq[0].transpose(0, 1)
        dk[ks:ke] = gk[0].transpose(0, 1)
        dv[ks:ke] = gv[0].transpose(0, 1)
    return dq, dk, dv
