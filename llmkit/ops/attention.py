"""Scaled dot-product attention and KV-cache decode attention.

Ops:

* ``llmkit::scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
  is_causal, scale, enable_gqa, seed, offset) -> (out, lse)`` with autograd, and
  ``llmkit::scaled_dot_product_attention_backward`` -> ``(dq, dk, dv, dmask)``.
* ``llmkit::decode_attention(query, key_cache, value_cache, cache_seqlens, scale,
  is_causal) -> out`` (inference only).

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
either broadcasts to ``(B, Hq, Sq, Sk)``; ``is_causal`` and ``attn_mask`` may be given
together (both apply). One deliberate difference: a query row whose keys are all
masked gives an output of zeros and zero gradients, where SDPA gives NaN; its
``lse`` is ``+inf``.

Dropout is a pure function of ``(seed, offset)``: see :mod:`llmkit.ops._philox`.
The functional wrapper draws ``seed`` from torch's default generator, so results
are reproducible under ``torch.manual_seed``.

Backends: ``reference`` (this module; ATen's fused CPU kernel where it applies, else
float32 / float64 math) and ``triton`` (``llmkit/kernels/attention.py``: tiled forward,
dQ pass then dK/dV pass, no ``(Sq, Sk)`` tensor; ``llmkit/kernels/decode_attention.py``:
flash-decoding) for float16 / bfloat16 (tensor cores) and float32 (exact fp32 products,
no TF32; slower, without tensor cores). The triton backend refuses, with the reason:
head dims above 256 (above 128 for float32 attention), a batch or head count above
the grid limit 65535, and the gradient of a float ``attn_mask`` (the reference computes it). Forward on one backend and backward on the other agree: both
recompute the probabilities from ``lse`` and the same Philox keep mask.

Known limit shared by both backends: a row whose every visible score is an additive
mask value near ``finfo.min`` (e.g. a fully padded query row of a HuggingFace-style
mask) gets the uniform average in the forward, as SDPA does, but its gradient is not
meaningful: ``lse`` in float32 cannot hold ``-3.4e38 + log(n)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._compat import HAS_CPU_FLASH_ATTENTION, cpu_flash_attention, cpu_flash_attention_backward
from ..dispatch import DispatchPoint
from . import _fastpath as FP
from . import _validate as V
from ._philox import dropout_keep_mask

__all__ = ["scaled_dot_product_attention", "decode_attention"]

sdpa_forward = DispatchPoint("attention", "forward")
sdpa_backward = DispatchPoint("attention", "backward")
decode_forward = DispatchPoint("decode_attention", "forward")


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


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
        raise ValueError(
            f"{op}: batch sizes disagree: query {b}, key {key.shape[0]}, value {value.shape[0]}"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(
            f"{op}: key has {key.shape[1]} heads but value has {value.shape[1]}; they must match"
        )
    hq, hkv = query.shape[1], key.shape[1]
    if enable_gqa:
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(
                f"{op}: with enable_gqa the number of query heads ({hq}) must be a multiple "
                f"of the number of key/value heads ({hkv})"
            )
    elif hq != hkv:
        raise ValueError(
            f"{op}: query has {hq} heads but key/value have {hkv}; pass enable_gqa=True for "
            "grouped-query attention"
        )
    if key.shape[2] != value.shape[2]:
        raise ValueError(
            f"{op}: key has sequence length {key.shape[2]} but value has {value.shape[2]}; "
            "they must match"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"{op}: head dims disagree: query has {query.shape[-1]}, key has {key.shape[-1]}"
        )


def check_mask(op: str, attn_mask: Tensor | None, query: Tensor, key: Tensor) -> None:
    """A boolean or float mask broadcastable to (B, Hq, Sq, Sk)."""
    if attn_mask is None:
        return
    V.check_tensor(op, "attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        allowed = sorted({"bool", V.dtype_name(query.dtype), "float32"})
        raise TypeError(
            f"{op}: attn_mask has dtype {V.dtype_name(attn_mask.dtype)}; it must be "
            f"{' or '.join(allowed)} (bool: True = attend; float: added to the scores)"
        )
    target = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    ok = attn_mask.dim() <= 4 and all(
        m == 1 or m == t for m, t in zip(reversed(attn_mask.shape), reversed(target))
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
    V.check_saved(op, "lse", lse, [b, hq, sq], _cdt(query.dtype), "(B, Hq, Sq), the forward's log-sum-exp")
    V.check_same_device(op, query=query, grad_out=grad_out, out=out, lse=lse)


# --------------------------------------------------------------------------------------
# reference backend
# --------------------------------------------------------------------------------------


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


@sdpa_forward.register("reference")
def sdpa_forward_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Attention in float32 (float64 for float64); ATen's fused CPU kernel where it applies."""
    b, hq, sq, _ = query.shape
    sk = key.shape[2]
    groups = hq // key.shape[1] if key.shape[1] else 1
    cdt = _cdt(query.dtype)
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


@sdpa_backward.register("reference")
def sdpa_backward_reference(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (and d mask for a float mask) recomputing the probabilities from lse."""
    b, hq, sq, _ = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    groups = hq // hkv if hkv else 1
    cdt = _cdt(query.dtype)
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


# --------------------------------------------------------------------------------------
# triton backend (kernels/attention.py, kernels/decode_attention.py)
# --------------------------------------------------------------------------------------

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""16-bit inputs run on tensor cores; float32 inputs with exact fp32 products (no TF32,
so float32 keeps float32 accuracy), attention up to head dim 128."""
TRITON_MAX_HEAD_DIM = 256
_GRID_LIMIT = 65535  # CUDA grid y / z extent: heads and batch are grid axes


def _triton_shape_reasons(query: Tensor, key: Tensor, value: Tensor) -> list[str]:
    out = []
    for name, dim in (("query/key", query.shape[-1]), ("value", value.shape[-1])):
        if dim > TRITON_MAX_HEAD_DIM:
            out.append(
                f"{name} head dim {dim} exceeds {TRITON_MAX_HEAD_DIM}, the largest the Triton "
                "kernels tile"
            )
        elif dim == 0:
            out.append(f"{name} head dim is 0")
    if query.shape[0] > _GRID_LIMIT:
        out.append(f"batch size {query.shape[0]} exceeds the grid limit {_GRID_LIMIT}")
    if max(query.shape[1], key.shape[1]) > _GRID_LIMIT:
        out.append(f"{query.shape[1]} heads exceed the grid limit {_GRID_LIMIT}")
    return out


TRITON_FP32_MAX_HEAD_DIM = 128


def _sdpa_triton_reasons(query: Tensor, key: Tensor, value: Tensor) -> list[str]:
    reasons = _triton_shape_reasons(query, key, value)
    if query.dtype == torch.float32 and max(query.shape[-1], value.shape[-1]) > TRITON_FP32_MAX_HEAD_DIM:
        reasons.append(
            f"float32 attention with a head dim above {TRITON_FP32_MAX_HEAD_DIM} is left to the "
            "reference backend: exact fp32 products (no TF32) of such tiles do not fit the "
            "kernels' registers"
        )
    return reasons


def _sdpa_forward_triton_why_not(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 seed, offset):
    return _sdpa_triton_reasons(query, key, value)


def _sdpa_backward_triton_why_not(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal,
                                  scale, enable_gqa, seed, offset, mask_grad):
    reasons = _sdpa_triton_reasons(query, key, value)
    if mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
        reasons.append(
            "the gradient of a float attn_mask is not computed by the Triton backward (it would "
            "need the (Sq, Sk) score gradient); the reference backend computes it"
        )
    return reasons


@sdpa_forward.register("triton", dtypes=TRITON_DTYPES, why_not=_sdpa_forward_triton_why_not)
def sdpa_forward_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Fused tiled forward (online softmax), see ``llmkit.kernels.attention``; writes ``out``
    in the query's memory layout."""
    from ..kernels import attention as kernels

    return kernels.attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, offset,
                                     out_order=out_layout(query))


@sdpa_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_sdpa_backward_triton_why_not)
def sdpa_backward_triton(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dQ pass then dK/dV pass, probabilities recomputed from ``lse``; deterministic."""
    from ..kernels import attention as kernels

    dq, dk, dv = kernels.attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, seed, offset
    )
    return dq, dk, dv, query.new_empty((0,))


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("llmkit::scaled_dot_product_attention", mutates_args=())
def _sdpa_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor]:
    check_sdpa_args("scaled_dot_product_attention", query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    out, lse = sdpa_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, offset)
    return as_query_layout(out, query), lse


def out_layout(query: Tensor) -> list[int]:
    """The dimension order (outermost first) of the output's memory: the query's.

    Dims are sorted by the query's strides, larger first, ties (size-1 dims) broken by
    dimension index, so a contiguous query gives (B, H, S, D) and a (B, S, H, D) tensor
    viewed as (B, H, S, D) gives (B, S, H, D).
    """
    strides = query.stride()
    return sorted(range(4), key=lambda d: (-strides[d], d))


def empty_like_query(b: int, h: int, s: int, d: int, query: Tensor) -> Tensor:
    """An uninitialized (B, H, S, D) output laid out in memory like ``query``."""
    return torch.empty_permuted((b, h, s, d), out_layout(query), dtype=query.dtype, device=query.device)


def as_query_layout(out: Tensor, query: Tensor) -> Tensor:
    """``out`` laid out like ``query`` (exact strides, as the fake op says), copied only if needed."""
    want = empty_like_query(*out.shape, query=query)
    if want.stride() == out.stride():
        return out
    return want.copy_(out)


@_sdpa_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, offset):
    check_sdpa_args("scaled_dot_product_attention", query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    b, hq, sq, _ = query.shape
    return (
        empty_like_query(b, hq, sq, value.shape[-1], query),
        query.new_empty((b, hq, sq), dtype=_cdt(query.dtype)),
    )


_BWD = "scaled_dot_product_attention_backward"


@torch.library.custom_op("llmkit::scaled_dot_product_attention_backward", mutates_args=())
def _sdpa_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_sdpa_backward_args(_BWD, grad_out, query, key, value, out, lse, attn_mask, dropout_p, scale, enable_gqa)
    return sdpa_backward(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
        enable_gqa, seed, offset, mask_grad,
    )


@_sdpa_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, offset, mask_grad):
    check_sdpa_backward_args(_BWD, grad_out, query, key, value, out, lse, attn_mask, dropout_p, scale, enable_gqa)
    if mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = query.new_empty((0,))
    return (
        query.new_empty(query.shape),
        key.new_empty(key.shape),
        value.new_empty(value.shape),
        dmask,
    )


def _sdpa_setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, offset = inputs
    out, lse = output
    ctx.args = (dropout_p, is_causal, scale, enable_gqa, seed, offset)
    ctx.has_mask = attn_mask is not None
    ctx.save_for_backward(query, key, value, out, lse, attn_mask)
    ctx.mark_non_differentiable(lse)


def _sdpa_bwd(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, attn_mask = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa, seed, offset = ctx.args
    need = ctx.needs_input_grad
    mask_grad = bool(
        need[3] and attn_mask is not None and attn_mask.dtype != torch.bool
    )
    dq, dk, dv, dmask = torch.ops.llmkit.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
        enable_gqa, seed, offset, mask_grad,
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        dmask if mask_grad else None,
        None, None, None, None, None, None,
    )


torch.library.register_autograd(
    "llmkit::scaled_dot_product_attention", _sdpa_bwd, setup_context=_sdpa_setup
)


# -- decode --------------------------------------------------------------------------


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


@decode_forward.register("reference")
def decode_forward_reference(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float,
    is_causal: bool,
) -> Tensor:
    """Decode attention as masked attention over the cache.

    When every sequence has the same length ``L`` (read from CPU lengths), only the first
    ``L`` cache positions are read, and a single new token (or ``is_causal=False``)
    needs no mask at all; otherwise the whole cache is read under a per-sequence mask.
    """
    t = query.shape[2]
    if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
        lo, hi = _min_max(cache_seqlens)
        if lo == hi and 0 < lo <= key_cache.shape[2]:
            kc, vc = key_cache[:, :, :lo], value_cache[:, :, :lo]
            mask = decode_mask(cache_seqlens, t, lo, is_causal) if is_causal and t > 1 else None
            out, _ = sdpa_forward_reference(query, kc, vc, mask, 0.0, False, scale, True, 0, 0)
            return out
    mask = decode_mask(cache_seqlens, t, key_cache.shape[2], is_causal)
    out, _ = sdpa_forward_reference(
        query, key_cache, value_cache, mask, 0.0, False, scale, True, 0, 0
    )
    return out


def _decode_triton_why_not(query, key_cache, value_cache, cache_seqlens, scale, is_causal):
    return _triton_shape_reasons(query, key_cache, value_cache)


@decode_forward.register("triton", dtypes=TRITON_DTYPES, why_not=_decode_triton_why_not)
def decode_forward_triton(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float,
    is_causal: bool,
) -> Tensor:
    """Flash-decoding (cache split across programs, GQA heads packed), see ``llmkit.kernels.decode_attention``."""
    from ..kernels import decode_attention as kernels

    return kernels.decode_attention(query, key_cache, value_cache, cache_seqlens, scale, is_causal)


@torch.library.custom_op("llmkit::decode_attention", mutates_args=())
def _decode_op(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float,
    is_causal: bool,
) -> Tensor:
    check_decode_args("decode_attention", query, key_cache, value_cache, cache_seqlens, scale)
    return decode_forward(query, key_cache, value_cache, cache_seqlens, scale, is_causal)


@_decode_op.register_fake
def _(query, key_cache, value_cache, cache_seqlens, scale, is_causal):
    # every check but the lengths' values: this also runs for real tensors when one of
    # them is on the meta device (the dispatcher then picks this kernel)
    check_decode_args("decode_attention", query, key_cache, value_cache, cache_seqlens, scale, values=False)
    b, hq, t, _ = query.shape
    return query.new_empty((b, hq, t, value_cache.shape[-1]))


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


_VALIDATED = FP.ValidatedSignatures()
"""Argument signatures that passed validation on the eager fast path (see ``_fastpath``)."""


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Fused attention with the signature of ``F.scaled_dot_product_attention``.

    Args:
        query: ``(B, Hq, Sq, D)`` or ``(Hq, Sq, D)``; float16 / bfloat16 / float32 / float64.
        key: ``(B, Hkv, Sk, D)``; value: ``(B, Hkv, Sk, Dv)``; same dtype as query.
        attn_mask: bool (True = attend) or float (added), broadcastable to
            ``(B, Hq, Sq, Sk)``; a ``(B, 1, 1, Sk)`` key-padding mask is read as a vector.
        dropout_p: dropout on the attention probabilities (Philox, seeded from torch's
            default generator).
        is_causal: top-left aligned causal mask, combinable with ``attn_mask``.
        scale: defaults to ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv``.

    Returns:
        ``(B, Hq, Sq, Dv)`` in the query's dtype. Rows with no visible key are zeros
        (SDPA gives NaN there). Softmax statistics are kept in float32.
    """
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(op, name, t)
    unbatched = query.dim() == 3
    if unbatched:
        if key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                f"{op}: an unbatched (3-D) query needs 3-D key and value, got shapes "
                f"{list(key.shape)} and {list(value.shape)}"
            )
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    elif type(scale) is not float:
        scale = V.check_number(op, "scale", scale)
    if type(dropout_p) is not float:
        dropout_p = V.check_number(op, "dropout_p", dropout_p)
    seed = _draw_seed() if dropout_p > 0.0 else 0
    args = (dropout_p, bool(is_causal), scale, bool(enable_gqa), seed, 0)
    if FP.eager_ok(query, key, value, optional=(attn_mask,)):
        sig = (query.shape, query.dtype, key.shape, key.dtype, value.shape, value.dtype,
               FP.signature(attn_mask), args[0], args[2], args[3])
        _VALIDATED.check(sig, lambda: check_sdpa_args(op, query, key, value, attn_mask, args[0], args[2], args[3]))
        out, _ = sdpa_forward(query, key, value, attn_mask, *args)
        out = as_query_layout(out, query)
    else:
        out, _ = torch.ops.llmkit.scaled_dot_product_attention(query, key, value, attn_mask, *args)
    return out.squeeze(0) if unbatched else out


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
    is_causal = bool(is_causal)
    if FP.eager_ok(query, key_cache, value_cache, cache_seqlens):
        sig = (query.shape, query.dtype, key_cache.shape, key_cache.dtype, value_cache.shape,
               value_cache.dtype, cache_seqlens.shape, cache_seqlens.dtype, scale)
        if _VALIDATED.check(sig, lambda: check_decode_args(op, query, key_cache, value_cache, cache_seqlens, scale)):
            check_seqlens_range(op, cache_seqlens, key_cache.shape[2])  # the lengths' values: every call
        return decode_forward(query, key_cache, value_cache, cache_seqlens, scale, is_causal)
    V.check_no_grad(op, query=query, key_cache=key_cache, value_cache=value_cache)
    return torch.ops.llmkit.decode_attention(query, key_cache, value_cache, cache_seqlens, scale, is_causal)
