"""Decode attention on the reference backend: masked attention over the cache through the
reference attention (:func:`..attention.attention_forward_reference`)."""

from __future__ import annotations

from torch import Tensor

from ...ops.attention import AttentionCall
from ...ops.decode_attention import DecodeAttentionCall, _min_max, decode_attention_forward, decode_mask
from .attention import attention_forward_reference


@decode_attention_forward.register("reference")
def decode_attention_forward_reference(c: DecodeAttentionCall) -> Tensor:
    """Decode attention as masked attention over the cache.

    When every sequence has the same length ``L`` (read from CPU lengths), only the first
    ``L`` cache positions are read, and a single new token (or ``is_causal=False``)
    needs no mask at all; otherwise the whole cache is read under a per-sequence mask.
    """
    query, key_cache, value_cache, cache_seqlens, scale, is_causal = c
    t = query.shape[2]
    if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
        lo, hi = _min_max(cache_seqlens)
        if lo == hi and 0 < lo <= key_cache.shape[2]:
            kc, vc = key_cache[:, :, :lo], value_cache[:, :, :lo]
            mask = decode_mask(cache_seqlens, t, lo, is_causal) if is_causal and t > 1 else None
            out, _ = attention_forward_reference(AttentionCall(query, kc, vc, mask, 0.0, False, scale, True, 0, 0))
            return out
    mask = decode_mask(cache_seqlens, t, key_cache.shape[2], is_causal)
    out, _ = attention_forward_reference(
        AttentionCall(query, key_cache, value_cache, mask, 0.0, False, scale, True, 0, 0)
    )
    return out
