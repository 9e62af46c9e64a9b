"""Attention on the reference backend: float32 math (float64 for float64), ATen's fused CPU
kernel where it applies (no dropout, equal head dims, a non-empty problem)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._compat import HAS_CPU_FLASH_ATTENTION, cpu_flash_attention, cpu_flash_attention_backward
from ...ops._philox import dropout_keep_mask
from ...ops.attention import AttentionBackwardCall, AttentionCall, attention_backward, attention_forward, compute_dtype


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def allowed_keys(
    attn_mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """Boolean (..., Sq, Sk) of keys a query may see (mask and causal), None if all."""
    allowed = None
    if attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    if is_causal:
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
        allowed = tri if allowed is None else allowed & tri
    return allowed


def _dead_rows(
    attn_mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """Boolean broadcastable to (B, Hq, Sq): rows with no key to attend; None if none can be.

    A top-left causal mask alone never empties a row (key 0 is always visible).
    """
    if k_len == 0:
        return torch.ones(q_len, dtype=torch.bool, device=device)
    if attn_mask is None:
        return None
    allowed = allowed_keys(attn_mask, is_causal, q_len, k_len, device)
    assert allowed is not None  # a mask was given
    return ~allowed.any(-1)


def _additive_mask(attn_mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, dtype, device) -> Tensor | None:
    if attn_mask is None and not is_causal:
        return None
    if attn_mask is None:
        m = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    elif attn_mask.dtype == torch.bool:
        m = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill_(~attn_mask, float("-inf"))
    else:
        m = attn_mask.to(dtype)
    if is_causal:
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
        m = m.masked_fill(~tri, float("-inf"))
    return m


def _scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float) -> Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    m = _additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], s.dtype, s.device)
    if m is not None:
        s = s + m
    return s


def _use_cpu_flash(query: Tensor, value: Tensor, dropout_p: float) -> bool:
    return (
        HAS_CPU_FLASH_ATTENTION
        and query.device.type == "cpu"
        and dropout_p == 0.0
        and query.shape[-1] == value.shape[-1]
        and query.shape[-1] > 0
        and query.shape[-2] > 0
        and value.shape[-2] > 0
    )


def _rows_contiguous(t: Tensor) -> Tensor:
    """ATen's CPU flash kernels read q / k / v / out as if their last stride were 1 (the public
    F.scaled_dot_product_attention makes them so before calling): give them such tensors."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _cpu_flash_mask(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # ATen's CPU kernel misreads a float32 mask next to float64 inputs (errors of order 1,
    # torch 2.13): the mask goes in float64 then. Half inputs take a float32 mask exactly.
    mask_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=mask_dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask.to(mask_dtype) if dtype == torch.float64 else attn_mask


@attention_forward.register("reference")
def attention_forward_reference(c: AttentionCall) -> tuple[Tensor, Tensor]:
    """Attention in float32 (float64 for float64); ATen's fused CPU kernel where it applies."""
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, offset = c
    b, hq, sq, _ = query.shape
    sk = key.shape[2]
    groups = hq // key.shape[1] if key.shape[1] else 1
    cdt = compute_dtype(query.dtype)
    dead = _dead_rows(attn_mask, is_causal, sq, sk, query.device)
    if _use_cpu_flash(query, value, dropout_p):
        k = _rows_contiguous(_expand_kv(key, groups))
        v = _rows_contiguous(_expand_kv(value, groups))
        out, lse = cpu_flash_attention(
            _rows_contiguous(query), k, v, is_causal, _cpu_flash_mask(attn_mask, query.dtype), scale
        )
        # ATen's CPU kernel turns a query row holding NaN or inf into zeros (its running
        # max skips NaN); the math gives NaN there, so put it back: NaN stays in its row.
        # One float32 sum of the whole query tells whether any exists (a cheap read).
        if not math.isfinite(float(query.sum(dtype=torch.float32))):  # 2 ATen calls, not 5
            bad_rows = ~torch.isfinite(query).all(-1)
            out = out.masked_fill(bad_rows[..., None], float("nan"))
            lse = lse.masked_fill(bad_rows, float("nan"))
        lse = lse.to(cdt)
    else:
        q = query.to(cdt)
        k = _expand_kv(key.to(cdt), groups)
        v = _expand_kv(value.to(cdt), groups)
        s = _scores(q, k, attn_mask, is_causal, scale)
        lse = torch.logsumexp(s, dim=-1)
        lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse)
        p = torch.exp(s - lse_safe[..., None])
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, offset, b, hq, sq, sk, dropout_p, query.device)
            p = p * keep.to(cdt) * (1.0 / (1.0 - dropout_p))
        out = torch.matmul(p, v).to(query.dtype)
    if dead is not None and bool(dead.any()):
        dead_full = dead.expand(b, hq, sq)
        out = out.masked_fill(dead_full[..., None], 0.0)
        lse = lse.masked_fill(dead_full, float("inf"))
    return out, lse.contiguous()


def _reduce_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dims that were broadcast from ``shape``."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t


@attention_backward.register("reference")
def attention_backward_reference(c: AttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (and d mask for a float mask) recomputing the probabilities from lse."""
    grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale = c[:10]
    seed, offset, mask_grad = c.seed, c.offset, c.mask_grad
    b, hq, sq, _ = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    groups = hq // hkv if hkv else 1
    cdt = compute_dtype(query.dtype)
    if _use_cpu_flash(query, value, dropout_p) and not mask_grad and sk > 0:
        k = _rows_contiguous(_expand_kv(key, groups))
        v = _rows_contiguous(_expand_kv(value, groups))
        dq, dk, dv = cpu_flash_attention_backward(
            grad_out.contiguous(), _rows_contiguous(query), k, v, _rows_contiguous(out),
            lse.to(torch.float32) if cdt == torch.float32 else lse,
            is_causal, _cpu_flash_mask(attn_mask, query.dtype), scale,
        )
        dmask = query.new_empty((0,))
    else:
        q = query.to(cdt)
        k = _expand_kv(key.to(cdt), groups)
        v = _expand_kv(value.to(cdt), groups)
        do = grad_out.to(cdt)
        s = _scores(q, k, attn_mask, is_causal, scale)
        p = torch.exp(s - lse.to(cdt)[..., None])  # lse = +inf on dead rows gives p = 0
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, offset, b, hq, sq, sk, dropout_p, query.device)
            z = keep.to(cdt) * (1.0 / (1.0 - dropout_p))
            pd = p * z
        else:
            z = None
            pd = p
        dv = torch.matmul(pd.transpose(-1, -2), do)
        dp = torch.matmul(do, v.transpose(-1, -2))
        if z is not None:
            dp = dp * z
        delta = (do * out.to(cdt)).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq = torch.matmul(ds, k) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q) * scale
        if mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
            dmask = _reduce_to_shape(ds, attn_mask.shape).to(attn_mask.dtype)
        else:
            dmask = query.new_empty((0,))
    if groups > 1:
        dk = dk.reshape(b, hkv, groups, sk, -1).sum(2)
        dv = dv.reshape(b, hkv, groups, sk, -1).sum(2)
    return (
        dq.to(query.dtype).contiguous(),
        dk.to(key.dtype).contiguous(),
        dv.to(value.dtype).contiguous(),
        dmask.contiguous(),
    )
