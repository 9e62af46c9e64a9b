"""Decode attention on the reference backend: masked attention over the cache through the
reference attention (:func:`..attention.attention_forward_reference`); a paged cache or
``cache_batch_idx`` is gathered into contiguous rows first."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...ops.attention import AttentionCall, compute_dtype
from ...ops.decode_attention import (
    DecodeAttentionCall,
    capacity,
    contiguous_cache,
    decode_attention_forward,
    decode_mask,
    min_max,
)
from .attention import attention_forward_reference


def _masked_math(query: Tensor, kc: Tensor, vc: Tensor, visible: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention in float32 (float64 for float64) where a score no row may take is
    replaced by -inf (never added to): a NaN or inf key that a row does not see never enters
    that row. ``visible`` is boolean, broadcastable to (B, Hq, T, S). IEEE arithmetic as the
    float64 formulas have it (a row whose visible scores are all -inf weighs its values by 0),
    except that a row with no visible key is zeros with lse +inf (the op's convention)."""
    cdt = compute_dtype(query.dtype)
    groups = query.shape[1] // kc.shape[1]
    k = kc.to(cdt).repeat_interleave(groups, dim=1)
    v = vc.to(cdt).repeat_interleave(groups, dim=1)
    s = torch.matmul(query.to(cdt), k.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    # normalized by the sum, not through exp(s - lse): lse's rounding at large scores
    # (4e8 + log 2 is 4e8 in float32) would scale every probability
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    empty = total == 0
    out = torch.matmul(torch.where(empty, 0.0, e / torch.where(empty, 1.0, total)), v)
    no_key = ~visible.expand(s.shape).any(-1, keepdim=True)
    out = out.masked_fill(no_key, 0.0)
    lse = (m + torch.log(total)).masked_fill(no_key, float("inf")).squeeze(-1)
    return out.to(query.dtype), lse.to(torch.float32)


def _attend(query: Tensor, kc: Tensor, vc: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = attention_forward_reference(AttentionCall(query, kc, vc, mask, 0.0, False, scale, True, 0, 0))
    return out, lse.to(torch.float32)


def _trusted(out: Tensor, lse: Tensor, cache_seqlens: Tensor, is_causal: bool) -> bool:
    """The fused call's result may stand: it is finite, and no row that sees a key bears ATen's
    mark of a row it could not compute (scores all NaN, or +inf among them: its CPU kernel gives
    zeros with lse 0 or +inf, where the math gives NaN). A genuine such row (e.g. scale 0 over
    one zero value) only costs the recompute."""
    if not _finite(out):
        return False
    t = lse.shape[-1]
    lens = cache_seqlens.to(torch.int64)[:, None]
    has_key = lens - t + torch.arange(t, device=lens.device) + 1 > 0 if is_causal else (lens > 0).expand(-1, t)
    marked = (torch.isposinf(lse) | ((lse == 0) & (out == 0).all(-1))) & has_key[:, None, :]
    return not bool(marked.any())


@decode_attention_forward.register("reference")
def decode_attention_forward_reference(c: DecodeAttentionCall) -> tuple[Tensor, Tensor]:
    """Decode attention as masked attention over the cache.

    When every sequence has the same length ``L`` (read from CPU lengths), only the first
    ``L`` cache positions are read, and a single new token (or ``is_causal=False``)
    needs no mask at all; otherwise the cache up to the longest length is read under a
    per-sequence mask. Cache slots past a sequence's length are not part of its problem:
    whatever they hold (a cache made with ``torch.empty``: NaN, inf) never reaches its output.
    ATen's kernels add a mask to the scores and multiply hidden values by a zero probability
    (NaN stays NaN), and give zeros for a row whose scores are all NaN, so a result that is not
    finite or bears that mark (:func:`_trusted`) is computed again with such slots zeroed and
    the scores masked by replacement (:func:`_masked_math`); clean caches cost two cheap checks.
    """
    query, cache_seqlens, scale, is_causal = c.query, c.cache_seqlens, c.scale, c.is_causal
    t = query.shape[2]
    s_max = capacity(c.key_cache, c.block_table)
    if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
        lo, hi = min_max(cache_seqlens)
        if lo == hi and 0 < lo <= s_max:
            kc, vc = contiguous_cache(c, lo)
            mask = decode_mask(cache_seqlens, t, lo, is_causal) if is_causal and t > 1 else None
            out, lse = _attend(query, kc, vc, mask, scale)
            if _trusted(out, lse, cache_seqlens, is_causal):
                return out, lse
            visible = torch.ones((), dtype=torch.bool) if mask is None else mask
            return _masked_math(query, kc, vc, visible, scale)
        s_max = min(s_max, max(hi, 1))  # slots past every length are not read at all
    kc, vc = contiguous_cache(c, s_max)
    mask = decode_mask(cache_seqlens, t, s_max, is_causal)
    out, lse = _attend(query, kc, vc, mask, scale)
    if _trusted(out, lse, cache_seqlens, is_causal):
        return out, lse
    seen = (torch.arange(s_max, device=kc.device) < cache_seqlens[:, None])[:, None, :, None]  # (B, 1, S, 1)
    kc, vc = kc.masked_fill(~seen, 0.0), vc.masked_fill(~seen, 0.0)
    return _masked_math(query, kc, vc, mask, scale)


def _finite(t: Tensor) -> bool:
    """Every element of ``t`` is finite: one float32 sum read back (NaN / inf survive it; a
    sum that overflows only costs the careful recompute, which gives the same finite result)."""
    return t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32)))
