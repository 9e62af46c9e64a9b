"""Scaled dot-product attention: what defines the op.

Ops (the op family ``attention``; decode attention is in :mod:`.decode_attention`):

* ``llmkit::scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
  is_causal, scale, enable_gqa, seed, offset) -> (out, lse)`` with autograd, and
  ``llmkit::scaled_dot_product_attention_backward`` -> ``(dq, dk, dv, dmask)``.

Shapes: ``query (B, Hq, Sq, D)``, ``key (B, Hkv, Sk, D)``, ``value (B, Hkv, Sk, Dv)``,
any strides (a ``(B, S, H, D)`` tensor viewed as ``(B, H, S, D)`` is taken as it is);
``Hq == Hkv``, or with ``enable_gqa`` a multiple of it (query head ``h`` reads
key/value head ``h // (Hq // Hkv)``). ``out`` is ``(B, Hq, Sq, Dv)`` in the input
dtype, laid out in memory like ``query`` (see :func:`out_layout`): a ``(B, S, H, D)``
query viewed as ``(B, H, S, D)`` gives an output whose ``transpose(1, 2).reshape(B, S,
H * Dv)`` costs no copy, as with ATen's fused kernels. Backends may return any layout;
the op copies into this one only when needed (:func:`as_query_layout`), so kernels
should write it directly.
``lse`` is the natural-log log-sum-exp of each row's scaled, masked scores,
``(B, Hq, Sq)`` float32 (float64 for float64 inputs).

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``:
``is_causal`` is aligned top-left (query ``i`` sees keys ``j <= i``); a boolean
``attn_mask`` marks keys to attend (True) and a float one is added to the scores;
either broadcasts to ``(B, Hq, Sq, Sk)`` (1 to 4 dims); ``is_causal`` and ``attn_mask``
may be given together (both apply). Deliberate differences: a query row whose keys are all
masked gives an output of zeros and zero gradients, where SDPA gives NaN; its ``lse`` is
``+inf``. A key that no query row may see (masked for every row, past ``Sq`` under
``is_causal``) never reaches an output or gradient, whatever it holds (SDPA multiplies it
by a zero probability: NaN stays NaN); its ``dk`` / ``dv`` are 0. No backward takes
``delta = rowsum(dO * O)`` from the rounded output.

Dropout is a pure function of ``(seed, offset)``: see :mod:`llmkit.ops._philox`.
The functional wrapper draws ``seed`` from torch's default generator, so results
are reproducible under ``torch.manual_seed``.

Dispatch points ``attention.forward`` / ``attention.backward`` (the backend override key is
``attention``), with the call classes below; the implementations live in
``llmkit/backends/<backend>/attention.py``: ``reference`` (ATen's fused CPU kernel where it
applies and meets the tolerance rule, else float32 / float64 math), ``triton``
(``kernels/attention.py``, ``kernels/attention_backward.py``: tiled forward, backward row
statistics, dQ pass then dK/dV pass, no ``(Sq, Sk)`` tensor; float16 / bfloat16 on tensor
cores, float32 with exact fp32 products) and ``cuda_ext`` (CUDA, float16 / bfloat16).
Forward on one backend and backward on another agree: each recomputes the probabilities
(from ``lse`` or from the scores' own row statistics) and the same Philox keep mask.

Known limit shared by both backends: a row whose every visible score is an additive
mask value near ``finfo.min`` (e.g. a fully padded query row of a HuggingFace-style
mask) gets the uniform average in the forward, as SDPA does, but its gradient is not
meaningful: ``lse`` in float32 cannot hold ``-3.4e38 + log(n)``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from .._compat import causal_bias_variant
from ..dispatch import DispatchPoint
from . import _validate as V
from ._attention_checks import (
    check_alignment_window,
    check_llm_options,
    check_sdpa_args,
    check_sdpa_backward_args,
    compute_dtype,
)
from ._op import Op

__all__ = ["scaled_dot_product_attention"]


class AttentionCall(NamedTuple):
    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float
    enable_gqa: bool
    seed: int
    offset: int
    # the options of today's LLMs (defaults: SDPA's behaviour); see scaled_dot_product_attention
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0
    alibi_slopes: Tensor | None = None


class AttentionBackwardCall(NamedTuple):
    grad_out: Tensor
    query: Tensor
    key: Tensor
    value: Tensor
    out: Tensor
    lse: Tensor
    attn_mask: Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float
    enable_gqa: bool
    seed: int
    offset: int
    mask_grad: bool
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0
    alibi_slopes: Tensor | None = None


attention_forward = DispatchPoint("attention", "forward", AttentionCall)
attention_backward = DispatchPoint("attention", "backward", AttentionBackwardCall)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def out_layout(query: Tensor) -> list[int]:
    """The dimension order (outermost first) of the output's memory: the query's.

    Dims are sorted by the query's strides, larger first, ties (size-1 dims) broken by
    dimension index, so a contiguous query gives (B, H, S, D) and a (B, S, H, D) tensor
    viewed as (B, H, S, D) gives (B, S, H, D).
    """
    strides = query.stride()
    return sorted(range(4), key=lambda d: (-strides[d], d))


def _layout_strides(shape: tuple[int, ...], order: list[int]) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` whose dims lie in memory in ``order``
    (outermost first): what ``torch.empty_permuted(shape, order)`` gives."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def empty_like_query(b: int, h: int, s: int, d: int, query: Tensor) -> Tensor:
    """An uninitialized (B, H, S, D) output laid out in memory like ``query``."""
    return torch.empty_permuted((b, h, s, d), out_layout(query), dtype=query.dtype, device=query.device)


def as_query_layout(out: Tensor, query: Tensor) -> Tensor:
    """``out`` laid out like ``query`` (exact strides, as the fake op says), copied only if needed
    (the strides are compared without allocating)."""
    if out.stride() == _layout_strides(tuple(out.shape), out_layout(query)):
        return out
    b, h, s, d = out.shape
    return empty_like_query(b, h, s, d, query).copy_(out)


# --------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------

_OP = "scaled_dot_product_attention"
_BWD = "scaled_dot_product_attention_backward"


def check_attention(c: AttentionCall) -> None:
    check_sdpa_args(_OP, c.query, c.key, c.value, c.attn_mask, c.dropout_p, c.scale, c.enable_gqa)
    check_llm_options(_OP, c.query, c.window_left, c.window_right, c.softcap, c.alibi_slopes)


def check_attention_backward(c: AttentionBackwardCall) -> None:
    check_sdpa_backward_args(
        _BWD, c.grad_out, c.query, c.key, c.value, c.out, c.lse, c.attn_mask, c.dropout_p, c.scale, c.enable_gqa
    )
    check_llm_options(_BWD, c.query, c.window_left, c.window_right, c.softcap, c.alibi_slopes)


def uses_llm_options(c: AttentionCall | AttentionBackwardCall) -> list[str]:
    """The options of ``c`` beyond SDPA's (for backends that decline them)."""
    used = []
    if c.window_left >= 0 or c.window_right >= 0:
        used.append("window_size")
    if c.bottom_right:
        used.append('causal_alignment="bottom_right"')
    if c.softcap > 0.0:
        used.append("softcap")
    if c.alibi_slopes is not None:
        used.append("alibi_slopes")
    return used


def _fake(c: AttentionCall) -> tuple[Tensor, Tensor]:
    b, hq, sq, _ = c.query.shape
    return (
        empty_like_query(b, hq, sq, c.value.shape[-1], c.query),
        c.query.new_empty((b, hq, sq), dtype=compute_dtype(c.query.dtype)),
    )


def _fake_backward(c: AttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if c.mask_grad and c.attn_mask is not None and c.attn_mask.dtype != torch.bool:
        dmask = c.attn_mask.new_empty(c.attn_mask.shape)
    else:
        dmask = c.query.new_empty((0,))
    return c.query.new_empty(c.query.shape), c.key.new_empty(c.key.shape), c.value.new_empty(c.value.shape), dmask


def _in_query_layout(c: AttentionCall, result: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    out, lse = result
    return as_query_layout(out, c.query), lse


ATTENTION = Op(
    "scaled_dot_product_attention",
    AttentionCall,
    tuple[Tensor, Tensor],
    attention_forward,
    check_attention,
    _fake,
    finish=_in_query_layout,
)
ATTENTION_BACKWARD = Op(
    "scaled_dot_product_attention_backward",
    AttentionBackwardCall,
    tuple[Tensor, Tensor, Tensor, Tensor],
    attention_backward,
    check_attention_backward,
    _fake_backward,
)


def _setup(ctx, c: AttentionCall, output) -> None:
    out, lse = output
    ctx.args = (c.dropout_p, c.is_causal, c.scale, c.enable_gqa, c.seed, c.offset)
    ctx.options = (c.window_left, c.window_right, c.bottom_right, c.softcap)
    ctx.save_for_backward(c.query, c.key, c.value, out, lse, c.attn_mask, c.alibi_slopes)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, attn_mask, alibi_slopes = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa, seed, offset = ctx.args
    need = ctx.needs_input_grad
    mask_grad = bool(need[3] and attn_mask is not None and attn_mask.dtype != torch.bool)
    dq, dk, dv, dmask = torch.ops.llmkit.scaled_dot_product_attention_backward(
        grad_out,
        query,
        key,
        value,
        out,
        lse,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        seed,
        offset,
        mask_grad,
        *ctx.options,
        alibi_slopes,
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        dmask if mask_grad else None,
        *(None,) * (len(AttentionCall._fields) - 4),
    )


ATTENTION.register_autograd(_backward, _setup)


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def scalar_options(
    op: str, head_dim: int, scale: float | None, dropout_p: float, softcap: float
) -> tuple[float, float, float, int]:
    """``(scale, dropout_p, softcap, seed)`` as the call classes take them: the default scale
    ``1 / sqrt(D)``, numbers as floats, a seed drawn from torch's generator when dropping out."""
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    elif type(scale) is not float:
        scale = V.check_number(op, "scale", scale)
    if type(dropout_p) is not float:
        dropout_p = V.check_number(op, "dropout_p", dropout_p)
    if type(softcap) is not float:
        softcap = V.check_number(op, "softcap", softcap)
    return scale, dropout_p, softcap, _draw_seed() if dropout_p > 0.0 else 0


def _causal_bias(
    op: str, attn_mask, is_causal: bool, causal_alignment: str, query: Tensor, key: Tensor
) -> tuple[bool, str]:
    """torch's ``causal_upper_left`` / ``causal_lower_right`` object as ``(is_causal, alignment)``."""
    variant, sq, sk = causal_bias_variant(attn_mask)  # type: ignore[misc]
    if is_causal:
        raise ValueError(
            f"{op}: attn_mask is torch's CausalBias ({variant} causal) and is_causal=True; give one of them"
        )
    if causal_alignment != "top_left" and causal_alignment != variant:
        raise ValueError(
            f"{op}: attn_mask is torch's {variant} CausalBias but causal_alignment="
            f"{causal_alignment!r}; they must agree"
        )
    if (sq, sk) != (query.shape[-2], key.shape[-2]):
        raise ValueError(
            f"{op}: attn_mask is a CausalBias for (Sq, Sk) = ({sq}, {sk}) but query and key "
            f"have ({query.shape[-2]}, {key.shape[-2]})"
        )
    return True, variant


@overload
def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    return_lse: Literal[False] = False,
) -> Tensor: ...


@overload
def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused attention with the signature of ``F.scaled_dot_product_attention``, and the
    options of today's LLMs after it (keyword-only).

    Args:
        query: ``(B, Hq, Sq, D)`` or ``(Hq, Sq, D)``; float16 / bfloat16 / float32 / float64.
        key: ``(B, Hkv, Sk, D)``; value: ``(B, Hkv, Sk, Dv)``; same dtype as query.
        attn_mask: bool (True = attend) or float (added), broadcastable to
            ``(B, Hq, Sq, Sk)``; a ``(B, 1, 1, Sk)`` key-padding mask is read as a vector.
            torch's ``causal_upper_left(Sq, Sk)`` / ``causal_lower_right(Sq, Sk)`` objects
            (``torch.nn.attention.bias``) mean ``is_causal`` with that alignment.
        dropout_p: dropout on the attention probabilities (Philox, seeded from torch's
            default generator).
        is_causal: causal mask, combinable with ``attn_mask``.
        scale: defaults to ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv``.
        causal_alignment: where query ``i``'s diagonal lies when ``Sq != Sk``: ``"top_left"``
            (SDPA's: key ``i``) or ``"bottom_right"`` (flash-attention's: key ``i + Sk - Sq``,
            chunked prefill against a KV cache). It places the causal mask, the window and
            ALiBi's distances.
        window_size: ``(left, right)`` sliding window (flash-attention's convention): query
            ``i`` sees keys from ``diagonal - left`` to ``diagonal + right``; -1 unbounded.
            Key blocks outside the window are skipped.
        softcap: logit softcapping (Gemma 2): the scaled scores ``s`` become ``softcap *
            tanh(s / softcap)`` before ALiBi, the mask and the softmax; 0 = none.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)``: ``slope * |diagonal - j|`` is subtracted
            from the score of key ``j`` (computed in the kernel; no gradient).
        return_lse: also return the natural-log log-sum-exp of each row's final scores,
            ``(B, Hq, Sq)`` float32 (float64 for float64 inputs; ``+inf`` on rows with no
            visible key), to merge partial attentions; it carries no gradient.

    Returns:
        ``(B, Hq, Sq, Dv)`` in the query's dtype (and ``lse`` with ``return_lse``). Rows
        with no visible key are zeros (SDPA gives NaN there). Softmax statistics are kept
        in float32.
    """
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(op, name, t)
    check_alignment_window(op, causal_alignment, window_size)
    if causal_bias_variant(attn_mask) is not None:
        is_causal, causal_alignment = _causal_bias(op, attn_mask, bool(is_causal), causal_alignment, query, key)
        attn_mask = None
    unbatched = query.dim() == 3
    if unbatched:
        if key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                f"{op}: an unbatched (3-D) query needs 3-D key and value, got shapes "
                f"{list(key.shape)} and {list(value.shape)}"
            )
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            raise ValueError(
                f"{op}: an unbatched query takes alibi_slopes of shape (Hq,), got {list(alibi_slopes.shape)}"
            )
    scale, dropout_p, softcap, seed = scalar_options(op, query.shape[-1], scale, dropout_p, softcap)
    left, right = window_size
    out, lse = ATTENTION(
        AttentionCall(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            bool(is_causal),
            scale,
            bool(enable_gqa),
            seed,
            0,
            left,
            right,
            causal_alignment == "bottom_right",
            softcap,
            alibi_slopes,
        )
    )
    if unbatched:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out
