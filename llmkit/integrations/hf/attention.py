"""The ``"llmkit"`` attention function for transformers' ``AttentionInterface``.

:func:`attention_function` has the signature of transformers' attention functions and runs
:func:`llmkit.ops.scaled_dot_product_attention` on the module's query / key / value
(grouped-query attention without repeating key/value heads, causal masks, padding masks,
T5's relative-position bias, sliding windows, Gemma 2's logit softcapping); :mod:`.registration`
registers it under :data:`NAME`.

Packed sequences (padding-free batches, transformers' flash-attention path): a batch of one row
whose ``position_ids`` restart per sequence (with no mask, the per-sequence causal mask
transformers builds for it, or the plain causal mask it builds when a cache hides the
packing), or that comes with ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``max_length_q`` /
``max_length_k``) as ``DataCollatorWithFlattening`` gives them, runs through
:func:`llmkit.ops.varlen_attention`: each sequence attends to itself only, as flash-attention
does, with no ``(S, S)`` mask read by the kernel.

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
from ..._compat import tensor_version

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


class _ReadCache:
    """What was read back from the last few tensors (a forward's layers share one mask or
    position ids: read once per forward, not per layer), keyed by the tensor's identity, its
    in-place version and an extra key. Tensors without a version counter (inference tensors)
    are never cached: their contents are read on every call."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[weakref.ref, int, Any, Any]] = []

    def get(self, t: Tensor, key: Any) -> tuple[bool, Any]:
        version = tensor_version(t)
        if version is not None:
            for ref, v, k, value in self.entries:
                if ref() is t and v == version and k == key:
                    return True, value
        return False, None

    def put(self, t: Tensor, key: Any, value: Any) -> None:
        version = tensor_version(t)
        if version is not None:
            self.entries.insert(0, (weakref.ref(t), version, key, value))
            del self.entries[self.size :]


_BAND_CACHE = _ReadCache()
"""The window fit of the last masks checked."""


def _window_fit(mask: Tensor, sliding_window: int) -> str:
    """How a boolean (B | 1, 1 | H, Sq, Sk) mask relates to the bottom-right causal band of a
    sliding window (query ``i`` sees keys ``d - sliding_window < j <= d``, ``d = i + Sk - Sq``,
    transformers' ``sliding_window_causal_mask_function``): ``"exact"`` (it is the band),
    ``"inside"`` (the band and padding) or ``"no"``. Cached per mask (the layers share one)."""
    found, fit = _BAND_CACHE.get(mask, sliding_window)
    if found:
        return fit
    sq, sk = mask.shape[-2], mask.shape[-1]
    diag = torch.arange(sq, device=mask.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=mask.device)[None, :]
    band = (j <= diag) & (j > diag - sliding_window)
    if bool((mask & ~band).any()):
        fit = "no"
    else:
        fit = "exact" if bool((mask == band).all()) else "inside"
    _BAND_CACHE.put(mask, sliding_window, fit)
    return fit


_PACK_CACHE = _ReadCache()
"""The packing of the last position ids read."""


def _packing(position_ids: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """``(cu_seqlens int32 (B + 1,), sequence index per token, longest length)`` of a ``(1, S)``
    ``position_ids`` holding several sequences (a new one wherever the position does not grow by
    1, as transformers' ``find_packed_sequence_indices`` reads it); None for one sequence.
    Cached per tensor: the value is read back once per forward, not per layer."""
    found, packing = _PACK_CACHE.get(position_ids, None)
    if found:
        return packing
    pos = position_ids.reshape(-1)
    starts = torch.diff(pos, prepend=pos[:1]) != 1  # True at 0 and where a sequence starts
    packing = None
    if bool(starts[1:].any()):
        first = starts.nonzero().view(-1)
        total = torch.tensor([pos.numel()], device=pos.device)
        cu = torch.cat((first, total)).to(torch.int32)
        packing = (cu, starts.cumsum(0) - 1, int(cu.diff().max()))
    _PACK_CACHE.put(position_ids, None, packing)
    return packing


_PACKED_MASK_CACHE = _ReadCache()


def _mask_is_packed_causal(mask: Tensor, seq: Tensor, sliding_window: int | None) -> bool:
    """Whether a boolean ``(1, 1, S, S)`` mask is the causal mask of the packed sequences
    ``seq`` (each token's sequence index), or the plain causal mask (transformers builds that one
    when a cache hides the packing from it), with the layer's sliding window: nothing but what
    the per-sequence causal band hides (no padding). Cached per mask."""
    key = -1 if sliding_window is None else int(sliding_window)
    found, ok = _PACKED_MASK_CACHE.get(mask, key)
    if found:
        return ok
    n = seq.numel()
    ok = mask.dim() == 4 and tuple(mask.shape) in ((1, 1, n, n),)
    if ok:
        i = torch.arange(n, device=mask.device)[:, None]
        j = torch.arange(n, device=mask.device)[None, :]
        band = j <= i
        if sliding_window is not None:
            band = band & (j > i - int(sliding_window))
        m = mask[0, 0]
        ok = bool((m == (band & (seq[:, None] == seq[None, :]))).all()) or bool((m == band).all())
    _PACKED_MASK_CACHE.put(mask, key, ok)
    return ok


def _varlen_call(
    query: Tensor, key: Tensor, attention_mask: Tensor | None, is_causal: bool, kwargs: dict
) -> tuple[Tensor, Tensor, int, int] | None:
    """``(cu_seqlens_q, cu_seqlens_k, max_q, max_k)`` when the call is a padding-free packed batch
    (transformers' flash-attention path): ``cu_seq_lens_q`` / ``cu_seq_lens_k`` /
    ``max_length_q`` / ``max_length_k`` given, or ``position_ids`` of one row restarting per
    sequence with no mask beyond the per-sequence causal band. None otherwise."""
    if query.shape[0] != 1 or torch.compiler.is_compiling():
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and attention_mask is None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int(cu_q.diff().max())
        max_k = int(max_k) if max_k is not None else int(cu_k.diff().max())
        return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k
    position_ids = kwargs.get("position_ids")
    n = query.shape[2]
    if position_ids is None or position_ids.numel() != n or key.shape[2] != n or n < 2 or not is_causal:
        return None
    packing = _packing(position_ids)
    if packing is None:
        return None
    cu, seq, longest = packing
    if attention_mask is not None and (
        attention_mask.dtype != torch.bool
        or not _mask_is_packed_causal(attention_mask, seq, kwargs.get("sliding_window"))
    ):
        return None
    return cu, cu, longest, longest


def _varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    packed: tuple[Tensor, Tensor, int, int],
    is_causal: bool,
    dropout: float,
    scaling: float | None,
    groups: int,
    kwargs: dict,
) -> Tensor:
    """A packed (1, H, total, D) call through ``ops.varlen_attention``: ``(1, total, Hq, Dv)``."""
    cu_q, cu_k, max_q, max_k = packed
    sliding_window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    out = ops.varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_q,
        cu_k,
        max_q,
        max_k,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        causal_alignment="bottom_right",
        window_size=(int(sliding_window) - 1, 0) if sliding_window is not None else (-1, -1),
        softcap=float(softcap) if softcap is not None else 0.0,
        enable_gqa=groups > 1,
    )
    return out.unsqueeze(0)


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
    packed = _varlen_call(query, key, attention_mask, bool(is_causal), kwargs) if position_bias is None else None
    if packed is not None:  # padding-free packed sequences (transformers' flash-attention path)
        return _varlen_attention(query, key, value, packed, bool(is_causal), dropout, scaling, groups, kwargs), None
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
