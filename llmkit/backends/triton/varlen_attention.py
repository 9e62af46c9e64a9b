"""Packed variable-length attention on the triton backend: the attention kernels compiled with
``VARLEN`` (``kernels/attention_varlen.py``), one launch per kernel for every sequence."""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops.varlen_attention import (
    VarlenAttentionBackwardCall,
    VarlenAttentionCall,
    varlen_attention_backward,
    varlen_attention_forward,
)
from ._common import TRITON_DTYPES
from .attention import _options, _reasons


def _kernels():
    from ...kernels import attention_varlen as K

    return K


def _why_not(c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> list[str]:
    return _reasons(c.query, c.value)


def _sequences_and_options(c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> tuple:
    """The launchers' arguments after the tensors: cu_seqlens, longest lengths, dropout, causal,
    scale, seed and offset (the keyword options: :func:`_options`)."""
    return (
        c.cu_seqlens_q,
        c.cu_seqlens_k,
        c.max_seqlen_q,
        c.max_seqlen_k,
        c.dropout_p,
        c.is_causal,
        c.scale,
        c.seed,
        c.offset,
    )


@varlen_attention_forward.register("triton", dtypes=TRITON_DTYPES, why_not=_why_not)
def varlen_attention_forward_triton(c: VarlenAttentionCall) -> tuple[Tensor, Tensor]:
    """The fused forward over every sequence at once; ``lse`` ``(Hq, total_q)``."""
    return _kernels().varlen_attention_forward(c.query, c.key, c.value, *_sequences_and_options(c), **_options(c))


def packed_column_shift(t: Tensor, cu_seqlens: Tensor) -> Tensor:
    """:func:`~llmkit.ops._attention_shift.column_shift` per sequence of a packed ``(total, H, D)``
    tensor, broadcast back to its tokens: sequence ``b``'s ``(h, d)`` column shifts by its mean
    (rounded to ``t``'s dtype) where every entry lies within a quarter of it (the differences
    are then exact), else 0. Segment sums / extremes by ``scatter_reduce``: no host sync."""
    total = t.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    x = t.reshape(total, -1).to(wide)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=t.device), lengths, output_size=total)
    idx = seq[:, None].expand_as(x)
    shape = (lengths.numel(), x.shape[1])
    mean = x.new_zeros(shape).scatter_reduce(0, idx, x, "sum") / lengths.clamp(min=1)[:, None]
    hi = x.new_full(shape, float("-inf")).scatter_reduce(0, idx, x, "amax")
    lo = x.new_full(shape, float("inf")).scatter_reduce(0, idx, x, "amin")
    c = mean.to(t.dtype)
    cw = c.to(wide)
    ok = torch.isfinite(c) & (torch.maximum(hi - cw, cw - lo) <= 0.25 * cw.abs())  # NaN or empty: False
    c = torch.where(ok, c, torch.zeros_like(c))
    return t - c.index_select(0, seq).view_as(t)


@varlen_attention_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_why_not)
def varlen_attention_backward_triton(c: VarlenAttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """Row statistics, dQ, dK/dV over every sequence at once (``out`` and ``lse`` not read).
    Keys / values whose columns share a large common part within a sequence are shifted by it
    first, exactly and only where the gradients are invariant (keys without softcap, values
    without dropout), as the dense backward does (``llmkit/ops/_attention_shift.py``)."""
    key = packed_column_shift(c.key, c.cu_seqlens_k) if c.softcap == 0.0 else c.key
    value = packed_column_shift(c.value, c.cu_seqlens_k) if c.dropout_p == 0.0 else c.value
    return _kernels().varlen_attention_backward(
        c.grad_out, c.query, key, value, *_sequences_and_options(c), **_options(c)
    )
