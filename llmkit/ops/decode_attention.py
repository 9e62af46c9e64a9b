"""KV-cache decode attention: what defines the op.

Op (inference only): ``llmkit::decode_attention(query, key_cache, value_cache, cache_seqlens,
scale, is_causal, block_table=None, cache_batch_idx=None) -> (out, lse)``: ``query (B, Hq, T,
D)``, the ``T`` newest tokens of each sequence; caches ``(B, Hkv, S_max, D[v])`` (rows
``cache_batch_idx[b]`` of a ``(B_cache, ...)`` cache with ``cache_batch_idx``) or paged
``(num_blocks, block_size, Hkv, D[v])`` with ``block_table (B, max_blocks)`` int32;
``cache_seqlens (B,)`` the valid length of each sequence, the new tokens included; ``out (B,
Hq, T, Dv)`` and ``lse (B, Hq, T)`` float32 natural-log log-sum-exp (``+inf`` on rows with
no visible key). Dispatch point ``decode_attention.forward``; the implementations live in
``llmkit/backends/<backend>/decode_attention.py``. Appending ``k_new`` / ``v_new`` is done by
:func:`decode_attention` before the op runs (:func:`append_kv`, plain indexed writes).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._decode_checks import (  # noqa: F401  (min_max: the backends' import)
    cache_heads,
    capacity,
    check_decode_args,
    check_decode_values,
    check_new_tokens,
    min_max,
)
from ._op import Op

__all__ = ["decode_attention"]


class DecodeAttentionCall(NamedTuple):
    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    cache_seqlens: Tensor
    scale: float
    is_causal: bool
    block_table: Tensor | None = None
    cache_batch_idx: Tensor | None = None


decode_attention_forward = DispatchPoint("decode_attention", "forward", DecodeAttentionCall)

_min_max = min_max  # the name older imports use


def decode_mask(cache_seqlens: Tensor, q_len: int, s_max: int, is_causal: bool) -> Tensor:
    """Boolean (B, 1, T, S_max): key j is visible to new token t of sequence b.

    The last ``T`` valid positions of sequence ``b`` hold the new tokens; with
    ``is_causal`` token ``t`` sees keys ``j < L_b - T + t + 1`` (bottom-right alignment
    against the cache), otherwise all ``j < L_b``.
    """
    lens = cache_seqlens.to(torch.int64).clamp(0, s_max)[:, None, None, None]
    j = torch.arange(s_max, device=cache_seqlens.device)[None, None, None, :]
    visible = j < lens
    if is_causal:
        t = torch.arange(q_len, device=cache_seqlens.device)[None, None, :, None]
        visible = visible & (j < lens - q_len + t + 1)
    return visible


def contiguous_cache(c: DecodeAttentionCall, n_positions: int | None = None) -> tuple[Tensor, Tensor]:
    """The caches of call ``c`` as ``(B, Hkv, S, D[v])`` tensors, row ``b`` sequence ``b``'s:
    rows ``cache_batch_idx`` picked, or the first ``n_positions`` (default: all) positions of a
    paged cache gathered in table order (table entries past a sequence's need are clamped into
    the cache: what they read lies past its length)."""
    if c.block_table is not None:
        n_blocks, bs = c.key_cache.shape[:2]
        cap = c.block_table.shape[1] * bs
        n = cap if n_positions is None else min(n_positions, cap)
        table = c.block_table[:, : -(-n // bs)].to(torch.int64).clamp(0, max(n_blocks - 1, 0))
        b, nb = table.shape
        k, v = (x[table].reshape(b, nb * bs, *x.shape[2:])[:, :n].transpose(1, 2) for x in (c.key_cache, c.value_cache))
        return k, v
    k, v = c.key_cache, c.value_cache
    if c.cache_batch_idx is not None:
        idx = c.cache_batch_idx.to(torch.int64)
        k, v = k.index_select(0, idx), v.index_select(0, idx)
    if n_positions is not None:
        k, v = k[:, :, :n_positions], v[:, :, :n_positions]
    return k, v


def append_kv(
    key_cache: Tensor,
    value_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    cache_batch_idx: Tensor | None,
) -> None:
    """Write ``k_new`` / ``v_new (B, Hkv, T_new, D[v])`` into the caches at positions
    ``cache_seqlens[b] .. + T_new - 1`` of each sequence (in place; contiguous or paged).
    Indexed writes, no host sync: GPU lengths are never read back."""
    b, _, t_new, _ = k_new.shape
    if b == 0 or t_new == 0:
        return
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(t_new, device=k_new.device)  # (B, T_new)
    if block_table is not None:
        bs = key_cache.shape[1]
        blk = block_table.to(torch.int64).gather(1, pos // bs)
        index: tuple[Tensor | slice, ...] = (blk, pos % bs)  # -> (B, T_new, Hkv, D) of a (N, bs, Hkv, D) cache
    else:
        rows = torch.arange(b, device=k_new.device) if cache_batch_idx is None else cache_batch_idx.to(torch.int64)
        index = (rows[:, None].expand(b, t_new), slice(None), pos)  # -> (B, T_new, Hkv, D) as well
    key_cache[index] = k_new.transpose(1, 2)
    value_cache[index] = v_new.transpose(1, 2)


# --------------------------------------------------------------------------------------
# custom op
# --------------------------------------------------------------------------------------

_OP = "decode_attention"


def _validate(c: DecodeAttentionCall) -> None:
    # every check but the tensors' values: the fake also runs for real tensors when one of them
    # is on the meta device (the dispatcher then picks it), and the fast path caches this part
    check_decode_args(
        _OP, c.query, c.key_cache, c.value_cache, c.cache_seqlens, c.scale, c.block_table, c.cache_batch_idx
    )


def _fake(c: DecodeAttentionCall) -> tuple[Tensor, Tensor]:
    out = c.query.new_empty((*c.query.shape[:3], c.value_cache.shape[-1]))
    return out, c.query.new_empty(c.query.shape[:3], dtype=torch.float32)


DECODE_ATTENTION = Op(
    "decode_attention",
    DecodeAttentionCall,
    tuple[Tensor, Tensor],
    decode_attention_forward,
    _validate,
    _fake,
    check_values=lambda c: check_decode_values(_OP, c.key_cache, c.cache_seqlens, c.block_table, c.cache_batch_idx),
)


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


@overload
def decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float | None = None,
    is_causal: bool = True,
    *,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    block_table: Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    return_lse: Literal[False] = False,
) -> Tensor: ...


@overload
def decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float | None = None,
    is_causal: bool = True,
    *,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    block_table: Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float | None = None,
    is_causal: bool = True,
    *,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    block_table: Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of 1..16 new tokens per sequence against a KV cache of ragged lengths.

    Args:
        query: ``(B, Hq, T, D)``: the ``T`` newest tokens of each sequence.
        key_cache, value_cache: contiguous ``(B, Hkv, S_max, D)`` / ``(B, Hkv, S_max, Dv)``
            (any strides), or with ``block_table`` paged ``(num_blocks, block_size, Hkv, D[v])``
            (any block size >= 1; 16..256 are the usual ones). ``Hq`` must be a multiple of
            ``Hkv`` (GQA / MQA).
        cache_seqlens: int32 or int64 ``(B,)``: valid length ``L_b`` of each sequence in the
            cache. Without ``k_new`` it includes the new tokens, whose keys and values are
            already written at positions ``L_b - T_new .. L_b - 1``; with ``k_new`` it is the
            length before the call (flash-attention's ``flash_attn_with_kvcache`` convention).
        scale: defaults to ``1 / sqrt(D)``.
        is_causal: new token ``t`` sees keys ``j < L - T + t + 1`` (bottom-right, ``L`` the
            length after any append); False: all ``j < L``.
        k_new, v_new: optional ``(B, Hkv, T_new, D)`` / ``(B, Hkv, T_new, Dv)``: written into
            the caches (in place) at positions ``L_b .. L_b + T_new - 1`` before attending, which
            then covers ``L_b + T_new`` positions.
        block_table: int32 ``(B, max_blocks)``: block ``j // block_size`` of sequence ``b`` is
            ``block_table[b, j // block_size]`` of the paged caches. Entries past what a sequence
            uses are never read (e.g. -1).
        cache_batch_idx: int32 / int64 ``(B,)``: the row of a contiguous ``(B_cache, ...)``
            cache that holds sequence ``b`` (default ``b``); not with ``block_table``.
        return_lse: also return the float32 natural-log log-sum-exp ``(B, Hq, T)`` of each
            row's scores (``+inf`` on rows with no visible key), to merge partial attentions.

    Returns:
        ``(B, Hq, T, Dv)`` in the query's dtype (and ``lse`` with ``return_lse``); rows with no
        visible key are zeros. Cache slots past a sequence's length never reach its output,
        whatever they hold. Inference only: with grad mode on, a tensor that requires grad is
        refused at the call (use ``torch.no_grad()`` / ``torch.inference_mode()``).

    Bad input raises before anything is written or launched; the values of lengths, table
    entries and batch indices are checked on CPU tensors (GPU ones are not read back).
    """
    op = "decode_attention"
    if scale is None:
        V.check_tensor(op, "query", query)
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.dim() and query.shape[-1] > 0 else 1.0
    elif type(scale) is not float:
        scale = V.check_number(op, "scale", scale)
    V.check_no_grad(op, query=query, key_cache=key_cache, value_cache=value_cache, k_new=k_new, v_new=v_new)
    c = DecodeAttentionCall(
        query, key_cache, value_cache, cache_seqlens, scale, bool(is_causal), block_table, cache_batch_idx
    )
    if k_new is not None or v_new is not None:
        _validate(c)
        t_new = check_new_tokens(op, query, key_cache, value_cache, k_new, v_new, block_table)
        check_decode_values(op, key_cache, cache_seqlens, block_table, cache_batch_idx, writes=t_new)
        assert k_new is not None and v_new is not None
        append_kv(key_cache, value_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx)
        c = c._replace(cache_seqlens=cache_seqlens + t_new)
    out, lse = DECODE_ATTENTION(c)
    return (out, lse) if return_lse else out
