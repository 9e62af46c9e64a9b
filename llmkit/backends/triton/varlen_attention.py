"""Packed variable-length attention on the triton backend: the attention kernels compiled with
``VARLEN`` (``kernels/attention_varlen.py``), one launch per kernel for every sequence."""

from __future__ import annotations

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


@varlen_attention_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_why_not)
def varlen_attention_backward_triton(c: VarlenAttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """Row statistics, dQ, dK/dV over every sequence at once (``out`` and ``lse`` not read)."""
    return _kernels().varlen_attention_backward(
        c.grad_out, c.query, c.key, c.value, *_sequences_and_options(c), **_options(c)
    )
