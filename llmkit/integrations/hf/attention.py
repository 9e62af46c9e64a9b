"""The ``"llmkit"`` attention function for transformers' ``AttentionInterface``.

:func:`attention_function` has the signature of transformers' attention functions and runs
:func:`llmkit.ops.scaled_dot_product_attention` on the module's query / key / value
(grouped-query attention without repeating key/value heads, causal masks, padding masks,
T5's relative-position bias, sliding windows, Gemma 2's logit softcapping); :mod:`.registration`
registers it under :data:`NAME`.

Sliding windows: transformers hands the window to the attention function (``sliding_window``,
Mistral / Qwen2 / Gemma 2 and 3) together with its boolean mask, which holds the window too.
When that mask lies inside the bottom-right causal band of the window (it does unless a
static cache's empty slots break the alignment), the window goes to the kernel, which skips
the key blocks outside it; the mask is dropped when it is exactly that band (no padding),
else kept for the padding. The check reads each mask once (cached for the layers that share it).
"""

from __future__ import annotations

import logging
import weakref
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


_BAND_CACHE: list[tuple[weakref.ref, int, int, str]] = []
"""(mask, its version, window, fit) of the last masks checked (a forward's layers share one)."""


def _window_fit(mask: Tensor, sliding_window: int) -> str:
    """How a boolean (B | 1, 1 | H, Sq, Sk) mask relates to the bottom-right causal band of a
    sliding window (query ``i`` sees keys ``d - sliding_window < j <= d``, ``d = i + Sk - Sq``,
    transformers' ``sliding_window_causal_mask_function``): ``"exact"`` (it is the band),
    ``"inside"`` (the band and padding) or ``"no"``. Cached per mask (the layers share one)."""
    for ref, version, window, fit in _BAND_CACHE:
        if ref() is mask and version == mask._version and window == sliding_window:
            return fit
    sq, sk = mask.shape[-2], mask.shape[-1]
    diag = torch.arange(sq, device=mask.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=mask.device)[None, :]
    band = (j <= diag) & (j > diag - sliding_window)
    if bool((mask & ~band).any()):
        fit = "no"
    else:
        fit = "exact" if bool((mask == band).all()) else "inside"
    _BAND_CACHE.insert(0, (weakref.ref(mask), mask._version, sliding_window, fit))
    del _BAND_CACHE[4:]
    return fit


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
        kwargs: ``sliding_window`` (the layer's window, see the module docstring) and
            ``softcap`` (Gemma 2's ``attn_logit_softcapping``) are run by the kernel.

    Returns:
        ``(out, None)``, ``out`` of shape ``(B, Sq, Hq, D)``; no attention weights.
    """
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
    alignment, window = "top_left", (-1, -1)
    sliding_window = kwargs.get("sliding_window")
    if (
        sliding_window is not None
        and mask is not None
        and mask.dtype == torch.bool
        and position_bias is None
        and not torch.compiler.is_compiling()
    ):  # compiled graphs keep the mask (no data-dependent branch)
        fit = _window_fit(mask, int(sliding_window))
        if fit != "no":
            alignment, window, is_causal = "bottom_right", (int(sliding_window) - 1, 0), True
            mask = None if fit == "exact" else mask
    softcap = kwargs.get("softcap")
    out = ops.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=groups > 1,
        causal_alignment=alignment,
        window_size=window,
        softcap=float(softcap) if softcap is not None else 0.0,
    )
    return out.transpose(1, 2).contiguous(), None
