"""Argument checks of the attention ops (scaled_dot_product_attention, its backward and
varlen_attention): shapes, dtypes, devices, masks and the LLM options, each error naming the
argument, what it got and what it needs, before any kernel launches."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._compat import causal_bias_variant
from . import _validate as V


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``lse`` and of the statistics: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(op: str, query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> None:
    """q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv): same dtype and device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(op, name, t)
        V.check_floating(op, name, t)
        V.check_ndim(op, name, t, (4,))
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {V.dtype_name(t.dtype)} but query has "
                f"{V.dtype_name(query.dtype)}; they must match"
            )
    V.check_same_device(op, query=query, key=key, value=value)
    b = query.shape[0]
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(f"{op}: batch sizes disagree: query {b}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"{op}: key has {key.shape[1]} heads but value has {value.shape[1]}; they must match")
    check_heads(op, query.shape[1], key.shape[1], enable_gqa)
    if key.shape[2] != value.shape[2]:
        raise ValueError(
            f"{op}: key has sequence length {key.shape[2]} but value has {value.shape[2]}; they must match"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{op}: head dims disagree: query has {query.shape[-1]}, key has {key.shape[-1]}")


def check_heads(op: str, hq: int, hkv: int, enable_gqa: bool) -> None:
    """Hq == Hkv, or with ``enable_gqa`` a multiple of it."""
    if enable_gqa:
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(
                f"{op}: with enable_gqa the number of query heads ({hq}) must be a multiple "
                f"of the number of key/value heads ({hkv})"
            )
    elif hq != hkv:
        raise ValueError(
            f"{op}: query has {hq} heads but key/value have {hkv}; pass enable_gqa=True for grouped-query attention"
        )


def check_mask(op: str, attn_mask: Tensor | None, query: Tensor, key: Tensor) -> None:
    """A boolean or float mask broadcastable to (B, Hq, Sq, Sk)."""
    if attn_mask is None:
        return
    if causal_bias_variant(attn_mask) is not None:
        # a tensor subclass without real storage: kernels would read garbage
        raise TypeError(
            f"{op}: attn_mask is a torch.nn.attention.bias.CausalBias (causal_upper_left / "
            "causal_lower_right), which llmkit does not take; pass is_causal=True for the "
            "upper-left alignment, or a boolean mask (True = attend) such as "
            "torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq) for the lower-right one"
        )
    V.check_tensor(op, "attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        allowed = sorted({"bool", V.dtype_name(query.dtype), "float32"})
        raise TypeError(
            f"{op}: attn_mask has dtype {V.dtype_name(attn_mask.dtype)}; it must be "
            f"{' or '.join(allowed)} (bool: True = attend; float: added to the scores)"
        )
    target = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    ok = attn_mask.dim() <= 4 and all(  # a mask may have fewer dims: zip stops at its first
        m == 1 or m == t for m, t in zip(reversed(attn_mask.shape), reversed(target), strict=False)
    )
    if not ok:
        raise ValueError(
            f"{op}: attn_mask has shape {list(attn_mask.shape)}, which does not broadcast to "
            f"(B, Hq, Sq, Sk) = {list(target)}"
        )
    V.check_same_device(op, query=query, attn_mask=attn_mask)


def check_sdpa_args(
    op: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    scale: float,
    enable_gqa: bool,
) -> None:
    """Every check of scaled_dot_product_attention's inputs."""
    check_qkv(op, query, key, value, enable_gqa)
    check_mask(op, attn_mask, query, key)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")


def check_llm_options(
    op: str,
    query: Tensor,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    batch_heads: tuple[int, int] | None = None,
) -> None:
    """Sliding window sizes (ints >= -1), softcap (a finite number >= 0; 0 = none) and ALiBi
    slopes (a float tensor (Hq,) or (B, Hq) on the query's device, without gradient);
    ``batch_heads``: (B, Hq), by default the query's first two dims."""
    for name, w in (("window_size[0] (left)", window_left), ("window_size[1] (right)", window_right)):
        if type(w) is not int or w < -1:
            raise ValueError(f"{op}: {name} must be an int >= -1 (-1: unbounded), got {w!r}")
    if type(softcap) is not float or not math.isfinite(softcap) or softcap < 0.0:
        raise ValueError(f"{op}: softcap must be a finite number >= 0 (0: no softcapping), got {softcap!r}")
    if alibi_slopes is None:
        return
    V.check_tensor(op, "alibi_slopes", alibi_slopes)
    V.check_floating(op, "alibi_slopes", alibi_slopes)
    b, hq = batch_heads or (query.shape[0], query.shape[1])
    if tuple(alibi_slopes.shape) not in ((hq,), (b, hq)):
        raise ValueError(
            f"{op}: alibi_slopes has shape {list(alibi_slopes.shape)}; it must be (Hq,) = [{hq}] or "
            f"(B, Hq) = [{b}, {hq}]"
        )
    V.check_same_device(op, query=query, alibi_slopes=alibi_slopes)
    if alibi_slopes.requires_grad:
        raise ValueError(
            f"{op}: alibi_slopes requires grad, but llmkit computes no gradient for them; pass alibi_slopes.detach()"
        )


def check_sdpa_backward_args(
    op: str,
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    scale: float,
    enable_gqa: bool,
) -> None:
    """The forward's checks, then ``grad_out`` and ``out`` ``(B, Hq, Sq, Dv)`` in the query's
    dtype and ``lse`` ``(B, Hq, Sq)`` in float32 (float64 for float64), on the query's device."""
    check_sdpa_args(op, query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    b, hq, sq, _ = query.shape
    out_shape = [b, hq, sq, value.shape[-1]]
    for name, t in (("grad_out", grad_out), ("out", out)):
        V.check_saved(op, name, t, out_shape, query.dtype, "(B, Hq, Sq, Dv) in the query's dtype")
    V.check_saved(op, "lse", lse, [b, hq, sq], compute_dtype(query.dtype), "(B, Hq, Sq), the forward's log-sum-exp")
    V.check_same_device(op, query=query, grad_out=grad_out, out=out, lse=lse)


# --------------------------------------------------------------------------------------
# the output's memory layout
# --------------------------------------------------------------------------------------


_ALIGNMENTS = ("top_left", "bottom_right")


def check_alignment_window(op: str, causal_alignment: str, window_size: object) -> None:
    """The functions' ``causal_alignment`` and the shape of ``window_size`` (its values: check_llm_options)."""
    if causal_alignment not in _ALIGNMENTS:
        raise ValueError(f"{op}: causal_alignment must be one of {_ALIGNMENTS}, got {causal_alignment!r}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"{op}: window_size must be a pair (left, right) of ints >= -1, got {window_size!r}")
