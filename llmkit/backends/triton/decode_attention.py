"""Decode attention on the triton backend (``kernels/decode_attention.py``): flash-decoding,
the cache split across programs (split counts from shapes only: no host sync), GQA heads packed."""

from __future__ import annotations

from torch import Tensor

from ...ops.decode_attention import DecodeAttentionCall, decode_attention_forward
from ._common import TRITON_DTYPES
from .attention import shape_reasons


@decode_attention_forward.register(
    "triton", dtypes=TRITON_DTYPES, why_not=lambda c: shape_reasons(c.query, c.value_cache)
)
def decode_attention_forward_triton(c: DecodeAttentionCall) -> tuple[Tensor, Tensor]:
    """Flash-decoding over the cache, combined in a second kernel."""
    from ...kernels import decode_attention as K

    return K.decode_attention(
        c.query, c.key_cache, c.value_cache, c.cache_seqlens, c.scale, c.is_causal, c.block_table, c.cache_batch_idx
    )
