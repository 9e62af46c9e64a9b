"""The ``"llmkit"`` attention function for transformers' ``AttentionInterface``.

:func:`attention_function` has the signature of transformers' attention functions and runs
:func:`llmkit.ops.scaled_dot_product_attention` on the module's query / key / value
(grouped-query attention without repeating key/value heads, causal masks, padding masks,
T5's relative-position bias); :mod:`.registration` registers it under :data:`NAME`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ... import ops

__all__ = ["NAME", "attention_function"]

NAME = "llmkit"
"""The ``attn_implementation`` name llmkit registers."""

logger = logging.getLogger("llmkit")
_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        logger.warning(msg)


def _position_bias_mask(
    position_bias: Tensor, attention_mask: Tensor | None, is_causal: bool, query: Tensor, key: Tensor
) -> Tensor:
    """One additive mask from a relative-position bias and the attention mask (T5 style)."""
    min_value = torch.finfo(key.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = torch.arange(q_len, device=key.device)[:, None] >= torch.arange(kv_len, device=key.device)[None, :]
        return torch.where(causal.view(1, 1, q_len, kv_len), position_bias, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_value)
    return position_bias + attention_mask


def attention_function(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function on llmkit's fused attention.

    Args:
        module: the calling attention module (``is_causal``, ``num_key_value_groups``,
            ``layer_idx`` are read from it as transformers' ``sdpa`` does).
        query: ``(B, Hq, Sq, D)``; key / value: ``(B, Hkv, Sk, D)`` (grouped-query
            attention runs without repeating the key/value heads).
        attention_mask: None, boolean ``(B, 1, Sq, Sk)`` (True = attend, from the mask
            function registered with it) or additive float.
        dropout: attention dropout probability (training).
        scaling: softmax scale; None means ``1 / sqrt(D)`` (T5 passes 1.0).
        is_causal: None reads ``module.is_causal``; causal masking is used only for
            ``Sq > 1`` without an explicit mask, as transformers' ``sdpa`` does.
        position_bias: T5's relative-position bias ``(1 | B, H, Sq, Sk)``, added to the
            scores (combined with the mask into one additive mask; differentiable).

    Returns:
        ``(out, None)``, ``out`` of shape ``(B, Sq, Hq, D)``; no attention weights.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "llmkit attention does not support softcap; use attn_implementation='eager' for this model"
        )
    if kwargs.get("output_attentions", False):
        _say_once(
            "llmkit attention does not return attention weights (output_attentions=True); "
            "use attn_implementation='eager' to get them"
        )
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        # prefill into an empty static cache: the extra key slots are unused (as in sdpa)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    mask = attention_mask
    if position_bias is not None:
        mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if mask is not None and mask.dtype != torch.bool and mask.dtype not in (query.dtype, torch.float32):
        mask = mask.to(query.dtype)
    out = ops.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
        scale=scaling, enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None
