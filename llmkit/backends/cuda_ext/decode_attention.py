"""Decode attention on the cuda_ext backend: the CUDA attention kernel with the op's
cache-length mask (float16 / bfloat16, head dims up to 128, contiguous caches)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ...ops.decode_attention import DecodeAttentionCall, contiguous_cache, decode_attention_forward, decode_mask
from ._common import BACKEND, HALF_DTYPES, ext_ops
from .attention import grid_reasons, head_dim_reasons


def _reasons(c: DecodeAttentionCall) -> Iterator[str]:
    if c.block_table is not None:
        yield "a paged KV cache (block_table) is not implemented by the CUDA attention kernel"
        return
    yield from head_dim_reasons(c.query, c.value_cache)
    yield from grid_reasons(c.query.shape[2], "query length")


@decode_attention_forward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_reasons)
def decode_attention_forward_cuda_ext(c: DecodeAttentionCall) -> tuple[Tensor, Tensor]:
    """Decode attention as the attention kernel with the cache-length mask.

    The kernel multiplies a masked value row by a zero probability, so NaN / inf in cache
    slots past a sequence's length (a cache made with ``torch.empty``) would reach its output:
    the value rows it hands over hold zeros there (a masked key's score is never read).
    ``cache_batch_idx`` picks the cache rows first (a copy).
    """
    keys, values = contiguous_cache(c)
    s_max = keys.shape[2]
    mask = decode_mask(c.cache_seqlens, c.query.shape[2], s_max, c.is_causal)
    seen = torch.arange(s_max, device=values.device) < c.cache_seqlens[:, None]
    values = values.masked_fill(~seen[:, None, :, None], 0.0)
    out, lse = ext_ops().attention_fwd(c.query, keys, values, mask, 0.0, False, c.scale, 0, 0)
    return out, lse.to(torch.float32)
