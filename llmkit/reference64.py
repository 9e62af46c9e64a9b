"""Independent float64 formulas for every op: the yardstick of tests and ``llmkit check``.

These are written from the mathematical definitions with elementary torch ops in
float64 and share no code with the backends in :mod:`llmkit.ops` (which call ATen's
fused kernels). Gradients come from ``torch.autograd`` through these formulas, so
they are independent of every backward implementation too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64


def _d(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(F64)


def layer_norm(
    x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing dims (two-pass; the mean
    refined once, so that a constant row centres to exactly 0 in float64 too)."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    n = math.prod(normalized_shape)
    mean = x.sum(dims, keepdim=True) / n
    mean = mean + (x - mean).sum(dims, keepdim=True) / n
    xc = x - mean
    var = (xc * xc).sum(dims, keepdim=True) / n
    y = xc / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _rounded(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` rounded to ``dtype`` in value, straight-through for gradients (None: unchanged);
    an infinity stays itself (not ``inf + (inf - inf)``, NaN)."""
    if dtype is None or dtype == F64:
        return t
    r = t.detach().to(dtype).to(F64)
    return t + torch.where(r == t.detach(), 0.0, r - t.detach())


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    eps: float,
    offset: float = 0.0,
    cast_before_weight_to: torch.dtype | None = None,
) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight); with ``cast_before_weight_to`` the
    normalized value is rounded to that dtype before the multiply (Llama's order)."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    n = math.prod(normalized_shape)
    ms = (x * x).sum(dims, keepdim=True) / n
    y = _rounded(x / torch.sqrt(ms + eps), cast_before_weight_to)
    return y if weight is None else y * (weight + offset)


def _dropped(x: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    """Kept values scaled by 1 / (1 - p), dropped ones 0 (also where x is inf or NaN)."""
    return x if keep is None else torch.where(keep, x / (1.0 - dropout_p), torch.zeros((), dtype=x.dtype))


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    round_to: torch.dtype | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(layer_norm(s), s) with s = dropout(x) + residual, rounded to ``round_to`` as the op
    specifies; ``keep``: the dropout's boolean keep mask (kept values scaled by 1 / (1 - p))."""
    s = _rounded(_dropped(x, keep, dropout_p) + residual, round_to)
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    eps: float,
    offset: float = 0.0,
    cast_before_weight_to: torch.dtype | None = None,
    round_to: torch.dtype | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(s), s) with s = dropout(x) + residual rounded to ``round_to``, as
    :func:`add_layer_norm`, and :func:`rms_norm`'s offset and casting."""
    s = _rounded(_dropped(x, keep, dropout_p) + residual, round_to)
    return rms_norm(s, normalized_shape, weight, eps, offset, cast_before_weight_to), s


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """0.5 x (1 + erf(x / sqrt 2)), or the tanh form."""
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x + bias)."""
    return gelu(x + bias, approximate)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x), sigmoid(x) = 1 / (1 + exp(-x)) (torch.sigmoid: finite gradients where
    exp(-x) overflows)."""
    return x * torch.sigmoid(x)


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """gelu(gate) * up."""
    return gelu(gate, approximate) * up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up."""
    return silu(gate) * up


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, rows with no visible key -> 0.

    A key that no query row (of its batch and head) may see is not part of the problem:
    whatever it holds (NaN, inf) never reaches the result or a gradient. A key that some
    rows see enters every row's sum ``p v`` (a hidden one with probability 0, so NaN or
    inf in its value makes NaN there too).

    ``keep``: optional boolean dropout keep-mask (B, Hq, Sq, Sk) applied to the
    probabilities with 1 / (1 - dropout_p) scaling.
    """
    return attention_llm(q, k, v, attn_mask, is_causal, scale, keep=keep, dropout_p=dropout_p)[0]


def attention_llm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    bottom_right: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of attention with the options of today's LLMs, in float64.

    Query ``i``'s diagonal is key ``d_i = i + (Sk - Sq if bottom_right else 0)``. Key ``j``
    is visible when ``j <= d_i`` (``is_causal``), ``d_i - left <= j <= d_i + right``
    (``window``, -1 unbounded) and the mask allows it. Scores: ``s = scale * q.k``, then
    ``softcap * tanh(s / softcap)``, minus ``slope[b, h] * |d_i - j|`` (ALiBi slopes (Hq,)
    or (B, Hq)), plus a float mask. Rows with no visible key give 0 and ``lse = +inf``;
    keys no row sees never reach a result (see :func:`attention`). GQA when Hq > Hkv.
    """
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=-3)
        v = v.repeat_interleave(hq // hkv, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    sq, sk = q.shape[-2], k.shape[-2]
    diag = torch.arange(sq, device=q.device)[:, None] + (sk - sq if bottom_right else 0)
    j = torch.arange(sk, device=q.device)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible & (j <= diag)
    if window[1] >= 0:
        visible = visible & (j <= diag + window[1])
    if window[0] >= 0:
        visible = visible & (j >= diag - window[0])
    if attn_mask is not None:
        visible = visible & (attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf"))
    shape = torch.broadcast_shapes(q.shape[:-1] + (sk,), k.shape[:-2] + (sq, sk), visible.shape)
    visible = visible.expand(shape)
    seen = visible.any(-2)[..., None]
    k = torch.where(seen, k, torch.zeros_like(k))
    v = torch.where(seen, v, torch.zeros_like(v))
    s = torch.einsum("...id,...jd->...ij", q, k) * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(F64)[..., None, None] * (diag - j).abs().to(F64)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.to(F64)
    s = s.masked_fill(~visible, float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max.detach())
    denom = e.sum(-1, keepdim=True)
    # only a row with no visible key (denom exactly 0) is zeros; NaN (a NaN score) stays NaN
    dead = denom == 0
    p = torch.where(dead, torch.zeros_like(e), e / torch.where(dead, torch.ones_like(denom), denom))
    lse = torch.where(
        dead,
        torch.full_like(denom, float("inf")),
        row_max + torch.log(torch.where(dead, torch.ones_like(denom), denom)),
    ).squeeze(-1)
    if keep is not None:
        p = p * keep.to(F64) / (1.0 - dropout_p)
    return torch.einsum("...ij,...jd->...id", p, v), lse


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float | None, is_causal: bool
) -> Tensor:
    """Each sequence b attends to its first L_b cached keys; new token t to j < L_b - T + t + 1."""
    b, hq, t, _ = q.shape
    outs = []
    for i in range(b):
        length = int(cache_seqlens[i])
        kk = k_cache[i : i + 1, :, :length]
        vv = v_cache[i : i + 1, :, :length]
        mask = None
        if is_causal:
            tt = torch.arange(t, device=q.device)[:, None]
            jj = torch.arange(length, device=q.device)[None, :]
            mask = jj < length - t + tt + 1
        if length == 0:  # no key at all: zeros (the softmax has nothing to normalize)
            outs.append(q.new_zeros((1, hq, t, v_cache.shape[-1])))
            continue
        outs.append(attention(q[i : i + 1], kk, vv, mask, False, scale))
    if not outs:  # empty batch
        return q.new_empty((0, hq, t, v_cache.shape[-1]))
    return torch.cat(outs, 0)


def quantize_int8(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Per-row absmax: scale = absmax/127, q = round_half_even(x * 127/absmax) (float32 math)."""
    x32 = x.to(torch.float32)
    absmax = x32.abs().amax(dim, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.round(x32 * (torch.tensor(127.0) / safe))
    q = torch.where(absmax > 0, q, torch.zeros_like(q)).clamp(-127, 127).to(torch.int8)
    return q, (absmax / 127.0).squeeze(dim)


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer product of int8 a (*, K) and b (K, N), in int64."""
    return torch.einsum("...k,kn->...n", a.to(torch.int64), b.to(torch.int64))


def int8_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, mode: str, activation: str
) -> Tensor:
    """The float64 result an int8 linear approximates: x @ (weight * scale)^T + bias, activation."""
    w = weight.to(F64) * weight_scale.to(F64)[:, None]
    y = x.to(F64) @ w.t()
    if bias is not None:
        y = y + bias.to(F64)
    if activation == "gelu":
        y = gelu(y)
    elif activation == "gelu_tanh":
        y = gelu(y, "tanh")
    return y
