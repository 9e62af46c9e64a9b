"""Packed variable-length attention on the reference backend: one call of the dense attention
reference (``reference/attention.py``) per sequence, on ``(1, H, S_b, D)`` views of the packed
tensors, with sequence ``b``'s dropout offset (``offset + b * Hq * max_seqlen_q *
max_seqlen_k``, see ``llmkit/ops/varlen_attention.py``). Independent of the Triton kernels."""

from __future__ import annotations

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


def _spans(c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) of every sequence."""
    cq = c.cu_seqlens_q.tolist()
    ck = c.cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _dense(t: Tensor, start: int, end: int) -> Tensor:
    """Rows [start, end) of a packed (total, H, D) tensor as a (1, H, S, D) view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _seq_options(c: VarlenAttentionCall | VarlenAttentionBackwardCall, b: int) -> tuple:
    """Sequence b's dropout offset and the dense call's options (window, alignment, softcap, slopes)."""
    slopes = c.alibi_slopes
    if slopes is not None and slopes.dim() == 2:
        slopes = slopes[b : b + 1]
    offset = c.offset + b * c.query.shape[1] * c.max_seqlen_q * c.max_seqlen_k
    return offset, (c.window_left, c.window_right, c.bottom_right, c.softcap, slopes)


@varlen_attention_forward.register("reference")
def varlen_attention_forward_reference(c: VarlenAttentionCall) -> tuple[Tensor, Tensor]:
    """Each sequence by the dense reference (float32 math, float64 for float64)."""
    tq, hq, _ = c.query.shape
    out = c.query.new_zeros((tq, hq, c.value.shape[2]))
    lse = c.query.new_full((hq, tq), float("inf"), dtype=compute_dtype(c.query.dtype))
    for b, (qs, qe, ks, ke) in enumerate(_spans(c)):
        if qe == qs or ke == ks:  # no query, or no key: zeros and lse = +inf
            continue
        offset, options = _seq_options(c, b)
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
    for b, (qs, qe, ks, ke) in enumerate(_spans(c)):
        if qe == qs or ke == ks:
            continue
        offset, options = _seq_options(c, b)
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
