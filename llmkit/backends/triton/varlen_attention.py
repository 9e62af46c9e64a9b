"""Packed variable-length attention on the triton backend: the attention kernels compiled with
``VARLEN`` (``kernels/attention_varlen.py``), one launch per kernel for every sequence."""

from __future__ import annotations

from torch import Tensor

from ...ops.varlen_attention import (
    VarlenAttentionBackwardCall,
    VarlenAttentionCall,
    launcher_options,
    varlen_attention_backward,
    varlen_attention_forward,
)
from ._common import TRITON_DTYPES
from .attention import _reasons


def _kernels():
    from ...kernels import attention_varlen as K

    return K


def _why_not(c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> list[str]:
    return _reasons(c.query, c.value)


@varlen_attention_forward.register("triton", dtypes=TRITON_DTYPES, why_not=_why_not)
def varlen_attention_forward_triton(c: VarlenAttentionCall) -> tuple[Tensor, Tensor]:
    """The fused forward over every sequence at once; ``lse`` ``(Hq, total_q)``."""
    return _kernels().varlen_attention_forward(
        c.query,
        c.key,
        c.value,
        c.cu_seqlens_q,
        c.cu_seqlens_k,
        c.max_seqlen_q,
        c.max_seqlen_k,
        c.dropout_p,
        c.is_causal,
        c.scale,
        c.seed,
        c.offset,
        **launcher_options(c),
    )


@varlen_attention_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_why_not)
def varlen_attention_backward_triton(c: VarlenAttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """Row statistics, dQ, dK/dV over every sequence at once (``out`` and ``lse`` not read)."""
    return _kernels().varlen_attention_backward(
        c.grad_out,
        c.query,
        c.key,
        c.value,
        c.cu_seqlens_q,
        c.cu_seqlens_k,
        c.max_seqlen_q,
        c.max_seqlen_k,
        c.dropout_p,
        c.is_causal,
        c.scale,
        c.seed,
        c.offset,
        **launcher_options(c),
    )
