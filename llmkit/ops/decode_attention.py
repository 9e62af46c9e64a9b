"""KV-cache decode attention: what defines the op.

Op (inference only): ``llmkit::decode_attention(query, key_cache, value_cache, cache_seqlens,
scale, is_causal) -> out``: ``query (B, Hq, T, D)``, the ``T`` newest tokens of each sequence;
caches ``(B, Hkv, S_max, D[v])`` (``Hq`` a multiple of ``Hkv``); ``cache_seqlens (B,)`` the valid
length of each sequence, the new tokens included. Dispatch point ``decode_attention.forward``;
the implementations live in ``llmkit/backends/<backend>/decode_attention.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._op import Op
from .attention import check_qkv

__all__ = ["decode_attention"]


class DecodeAttentionCall(NamedTuple):
    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    cache_seqlens: Tensor
    scale: float
    is_causal: bool


decode_attention_forward = DispatchPoint("decode_attention", "forward", DecodeAttentionCall)


# --------------------------------------------------------------------------------------
# validation, and the op's mask
# --------------------------------------------------------------------------------------


def check_decode_args(
    op: str,
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float,
    values: bool = True,
) -> None:
    """query (B, Hq, T, D) with T new tokens; caches (B, Hkv, S_max, D[v]); lengths (B,)
    int32 / int64, all on one device. ``values``: also read CPU lengths to check their
    range (not for fake tensors, whose values do not exist)."""
    check_qkv(op, query, key_cache, value_cache, enable_gqa=True)
    V.check_tensor(op, "cache_seqlens", cache_seqlens)
    V.check_dtype(op, "cache_seqlens", cache_seqlens, (torch.int32, torch.int64))
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != query.shape[0]:
        raise ValueError(
            f"{op}: cache_seqlens has shape {list(cache_seqlens.shape)}; it must be "
            f"[{query.shape[0]}], one length per sequence"
        )
    V.check_same_device(op, query=query, cache_seqlens=cache_seqlens)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    if values:
        check_seqlens_range(op, cache_seqlens, key_cache.shape[2])


def check_seqlens_range(op: str, cache_seqlens: Tensor, s_max: int) -> None:
    """CPU ``cache_seqlens`` must lie in ``[0, s_max]`` (GPU lengths are not read back)."""
    if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
        lo, hi = _min_max(cache_seqlens)
        if lo < 0 or hi > s_max:
            raise ValueError(
                f"{op}: cache_seqlens must lie in [0, {s_max}] (the cache length), "
                f"got values from {lo} to {hi}"
            )


def _min_max(t: Tensor) -> tuple[int, int]:
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


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


# --------------------------------------------------------------------------------------
# custom op
# --------------------------------------------------------------------------------------

_OP = "decode_attention"

DECODE_ATTENTION = Op(
    "decode_attention", DecodeAttentionCall, Tensor, decode_attention_forward,
    # every check but the lengths' values: the fake also runs for real tensors when one of them
    # is on the meta device (the dispatcher then picks it), and the fast path caches this part
    lambda c: check_decode_args(_OP, c.query, c.key_cache, c.value_cache, c.cache_seqlens, c.scale, values=False),
    lambda c: c.query.new_empty((*c.query.shape[:3], c.value_cache.shape[-1])),
    check_values=lambda c: check_seqlens_range(_OP, c.cache_seqlens, c.key_cache.shape[2]),
)


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


def decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float | None = None,
    is_causal: bool = True,
) -> Tensor:
    """Attention of 1..16 new tokens per sequence against a KV cache of ragged lengths.

    Args:
        query: ``(B, Hq, T, D)``: the ``T`` newest tokens of each sequence.
        key_cache, value_cache: ``(B, Hkv, S_max, D)`` / ``(B, Hkv, S_max, Dv)``; the new
            tokens' keys and values are already written at positions ``L_b - T .. L_b - 1``.
            ``Hq`` must be a multiple of ``Hkv`` (GQA / MQA).
        cache_seqlens: int32 or int64 ``(B,)``: valid length ``L_b`` of each sequence,
            the new tokens included.
        scale: defaults to ``1 / sqrt(D)``.
        is_causal: new token ``t`` sees keys ``j < L_b - T + t + 1``; False: all ``j < L_b``.

    Returns:
        ``(B, Hq, T, Dv)`` in the query's dtype; rows with no visible key are zeros.
        Inference only: with grad mode on, a ``query`` / cache that requires grad is refused
        at the call (use ``torch.no_grad()`` / ``torch.inference_mode()``).
    """
    op = "decode_attention"
    if scale is None:
        V.check_tensor(op, "query", query)
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.dim() and query.shape[-1] > 0 else 1.0
    elif type(scale) is not float:
        scale = V.check_number(op, "scale", scale)
    V.check_no_grad(op, query=query, key_cache=key_cache, value_cache=value_cache)
    return DECODE_ATTENTION(DecodeAttentionCall(query, key_cache, value_cache, cache_seqlens, scale, bool(is_causal)))
