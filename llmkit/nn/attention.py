"""``MultiheadAttention``: a drop-in subclass of ``torch.nn.MultiheadAttention``.

Same constructor, parameters (``in_proj_weight`` / ``q_proj_weight`` ..., ``in_proj_bias``,
``out_proj``, ``bias_k``, ``bias_v``), ``state_dict`` keys and initialization as
``torch.nn.MultiheadAttention``. ``forward`` projects the inputs with one GEMM per
distinct input (one for self-attention), runs :func:`llmkit.ops.scaled_dot_product_attention`
on strided ``(B, H, L, D)`` views (no copies), and projects the output.

Masks follow torch.nn conventions, which are the opposite of SDPA's for booleans:
``key_padding_mask`` ``(B, S)`` and ``attn_mask`` ``(L, S)`` / ``(B*num_heads, L, S)`` mark
positions to *ignore* with True, or are added to the scores when float. They are
merged into one mask broadcast over ``(B, H, L, S)`` without being expanded.

Calls the fused path does not cover run ``torch.nn.MultiheadAttention.forward`` itself
(the reference path), and the first such call of each kind logs why:
``need_weights=True`` (the weights have to be materialized), ``add_bias_kv``,
``add_zero_attn`` and NestedTensor inputs.

One deliberate difference: a query whose keys are all masked gives zeros, where
torch.nn gives NaN.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .. import ops
from ._fused import dense

__all__ = ["MultiheadAttention"]

logger = logging.getLogger("llmkit")
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        logger.warning(
            "llmkit.nn.MultiheadAttention: %s; this call takes the reference path "
            "(torch.nn.MultiheadAttention.forward)",
            reason,
        )


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(
            f"MultiheadAttention: {name} has dtype {mask.dtype}; it must be torch.bool "
            "(True = ignore) or a floating-point dtype (added to the scores)"
        )


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    tgt_len: int,
    src_len: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """One SDPA mask (True = attend, or additive) from torch.nn's two masks.

    ``attn_mask``: ``(L, S)`` or ``(B*H, L, S)``, bool (True = ignore) or float.
    ``key_padding_mask``: ``(B, S)``, bool (True = padding) or float. Returns None, a
    bool mask or an additive mask in ``dtype``, broadcastable to ``(B, H, L, S)``.
    """
    am = None
    if attn_mask is not None:
        _check_mask_dtype("attn_mask", attn_mask)
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise RuntimeError(
                    f"MultiheadAttention: the 2D attn_mask has shape {list(attn_mask.shape)}, "
                    f"but should be [{tgt_len}, {src_len}] (target length, source length)"
                )
            am = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (batch * heads, tgt_len, src_len):
                raise RuntimeError(
                    f"MultiheadAttention: the 3D attn_mask has shape {list(attn_mask.shape)}, "
                    f"but should be [{batch * heads}, {tgt_len}, {src_len}] "
                    "(batch * num_heads, target length, source length)"
                )
            am = attn_mask.view(batch, heads, tgt_len, src_len)
        else:
            raise RuntimeError(f"MultiheadAttention: attn_mask must be 2D or 3D, got {attn_mask.dim()}D")
    kpm = None
    if key_padding_mask is not None:
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (batch, src_len):
            raise RuntimeError(
                f"MultiheadAttention: key_padding_mask has shape {list(key_padding_mask.shape)}, "
                f"but should be [{batch}, {src_len}] (batch, source length)"
            )
        kpm = key_padding_mask.view(batch, 1, 1, src_len)
    if am is None and kpm is None:
        return None
    masks = [m for m in (am, kpm) if m is not None]
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        for m in masks[1:]:
            allowed = allowed & ~m
        return allowed
    out = _as_additive(masks[0], dtype)
    for m in masks[1:]:
        out = out + _as_additive(m, dtype)
    return out


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on llmkit's fused attention.

    Args: exactly those of ``torch.nn.MultiheadAttention`` (``embed_dim``, ``num_heads``,
    ``dropout=0.0``, ``bias=True``, ``add_bias_kv=False``, ``add_zero_attn=False``,
    ``kdim=None``, ``vdim=None``, ``batch_first=False``, ``device``, ``dtype``).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` has torch.nn's
    signature and semantics, returns ``(attn_output, attn_weights or None)``.
    Shapes: ``query (L, E)`` unbatched, ``(L, B, E)``, or ``(B, L, E)`` with
    ``batch_first``; ``key`` / ``value`` likewise with ``S`` and ``kdim`` / ``vdim``.
    Note torch.nn's default ``need_weights=True`` returns the weights and therefore
    takes the reference path; pass ``need_weights=False`` for the fused one.
    ``is_causal=True`` is a hint that ``attn_mask`` is causal (torch.nn requires the
    mask too) and, without a ``key_padding_mask``, runs the causal kernel directly.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        reason = self._why_reference(query, key, value, need_weights)
        if reason:
            _say_once(reason)
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _why_reference(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool) -> str:
        if need_weights:
            return "need_weights=True asks for the attention weights"
        if self.bias_k is not None or self.bias_v is not None:
            return "add_bias_kv=True is not fused"
        if self.add_zero_attn:
            return "add_zero_attn=True is not fused"
        if query.is_nested or key.is_nested or value.is_nested:
            return "NestedTensor inputs are not fused"
        return ""

    def _fused_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        if query.dim() not in (2, 3):
            raise ValueError(
                f"MultiheadAttention: query must be 2D (L, E) or 3D (batched), got shape {list(query.shape)}"
            )
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"MultiheadAttention: {name} has {t.dim()} dims but query has {query.dim()}; "
                    "query, key and value must all be batched (3D) or all unbatched (2D)"
                )
        self_attention = query is key and key is value
        kv_same = key is value
        if not batched:
            # (L, E) -> (L, 1, E): the sequence-first layout with a batch of one.
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            seq_first = True
        else:
            seq_first = not self.batch_first
        if seq_first:
            tgt_len, batch, embed = query.shape
            src_len = key.shape[0]
        else:
            batch, tgt_len, embed = query.shape
            src_len = key.shape[1]
        if embed != self.embed_dim:
            raise ValueError(
                f"MultiheadAttention: query has embedding size {embed}; it must be embed_dim ({self.embed_dim})"
            )
        kb = key.shape[1] if seq_first else key.shape[0]
        ks = key.shape[0] if seq_first else key.shape[1]
        vb = value.shape[1] if seq_first else value.shape[0]
        vs = value.shape[0] if seq_first else value.shape[1]
        if kb != batch or vb != batch or ks != vs:
            raise ValueError(
                f"MultiheadAttention: key {list(key.shape)} and value {list(value.shape)} must "
                f"have query's batch size {batch} and the same sequence length"
            )
        heads = self.num_heads
        head_dim = self.head_dim

        q, k, v = self._project(query, key, value, self_attention, kv_same)

        def split_heads(t: Tensor, length: int) -> Tensor:
            if seq_first:  # (S, B, E) -> (B, H, S, D)
                return t.view(length, batch, heads, head_dim).permute(1, 2, 0, 3)
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        qh, kh, vh = split_heads(q, tgt_len), split_heads(k, src_len), split_heads(v, src_len)

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "MultiheadAttention: need attn_mask if specifying the is_causal hint (as "
                "torch.nn does); torch.nn.Transformer.generate_square_subsequent_mask makes one"
            )
        if is_causal and key_padding_mask is None:
            mask = None  # the hint stands for the mask: the causal kernel needs no mask
        else:
            is_causal = False
            mask = merge_masks(attn_mask, key_padding_mask, batch, heads, tgt_len, src_len, qh.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out = ops.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )  # (B, H, L, D)
        if seq_first:
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, batch, embed)
        else:
            out = out.transpose(1, 2).reshape(batch, tgt_len, embed)
        out = dense(out, self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(1)

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, kv_same: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections: one GEMM for self-attention, one for a shared key/value."""
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if not self._qkv_same_embed_dim:
            return (
                dense(query, self.q_proj_weight, bq),
                dense(key, self.k_proj_weight, bk),
                dense(value, self.v_proj_weight, bv),
            )
        w = self.in_proj_weight
        if self_attention:
            q, k, v = dense(query, w, b).split(e, dim=-1)
            return q, k, v
        q = dense(query, w[:e], bq)
        if kv_same:
            k, v = dense(key, w[e:], None if b is None else b[e:]).split(e, dim=-1)
            return q, k, v
        return q, dense(key, w[e : 2 * e], bk), dense(value, w[2 * e :], bv)
