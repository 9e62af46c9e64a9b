"""Packed variable-length attention on the cuda_ext backend: declined (the CUDA attention
kernels take dense (B, H, S, D) batches only); the triton and reference backends run it."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from ...ops.varlen_attention import (
    VarlenAttentionBackwardCall,
    VarlenAttentionCall,
    varlen_attention_backward,
    varlen_attention_forward,
)
from ._common import BACKEND, HALF_DTYPES

WHY_NOT = (
    "the CUDA attention kernels take dense (B, H, S, D) batches, not packed sequences "
    "(cu_seqlens); the triton and reference backends run varlen_attention"
)


def _declined(_c: VarlenAttentionCall | VarlenAttentionBackwardCall) -> Iterator[str]:
    yield WHY_NOT


@varlen_attention_forward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_declined)
def varlen_attention_forward_cuda_ext(c: VarlenAttentionCall) -> tuple[Tensor, Tensor]:
    """Never selected (``why_not`` always declines)."""
    raise NotImplementedError(WHY_NOT)


@varlen_attention_backward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_declined)
def varlen_attention_backward_cuda_ext(c: VarlenAttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor]:
    """Never selected (``why_not`` always declines)."""
    raise NotImplementedError(WHY_NOT)
