"""Triton FlashAttention-style attention: tiled forward and race-free backward.

Kernels (in brackets what their one grid axis enumerates, fastest first; one axis because
``B x H`` may pass the 65,535 limit of axes y and z):

* ``_attn_fwd_kernel`` [query blocks, Hq, B]: one program owns ``BLOCK_M`` query rows
  of one head and streams the keys/values in blocks of ``BLOCK_N``, with an online
  softmax in float32 in base 2 (the softmax scale is folded into ``log2(e) * scale``),
  so no ``(Sq, Sk)`` tensor exists anywhere. It writes ``out`` and the natural-log
  log-sum-exp ``lse``. Fused: scale, causal mask, boolean / additive mask (a mask that
  is the same for every query row, e.g. a ``(B, 1, 1, Sk)`` key-padding mask, is read
  as one vector per key block), GQA (query head ``h`` reads K/V head ``h // G``),
  Philox dropout, head-dim padding (80, 96, 160, ... padded to a power of two with
  masked loads), and any ``Sq``/``Sk``: key blocks that need no element mask run in a
  mask-free loop; only the last block and the causal-diagonal blocks are masked.
* ``_attn_bwd_stats_kernel`` [query blocks, Hq, B]: recomputes each row's softmax statistics
  and ``delta = rowsum(dO * O) = sum_j P_ij dP_ij`` in float32 for the two gradient
  kernels. The rounded output does not enter the gradients (with ``|O| >> |dO|`` its
  rounding would dominate dS), nor does the float32 rounding of ``lse`` (~1e-5 relative at
  scores ~200; see the kernel).
* ``_attn_bwd_dq_kernel`` [query blocks, Hq, B]: ``dQ``.
* ``_attn_bwd_dkdv_kernel`` [key blocks, Hkv, B]: ``dK`` and ``dV`` for one block of keys
  of one K/V head, looping over every query head of its group and every query block.

Each output element is written by exactly one program and summed in a fixed order,
so the backward has no atomics and is deterministic. Causal blocks that are fully
masked are skipped in all four kernels.

Conventions (shared with the reference backend in ``llmkit/backends/reference/attention.py``):
top-left causal alignment (query ``i`` sees keys ``j <= i``); rows with no visible key
give zeros and ``lse = +inf`` and zero gradients; keys hidden from every query row (past
``Sq`` under ``is_causal``, or by the mask: the launcher's :func:`keys_seen`) are read as zero,
so they never reach an output or gradient whatever they hold; dropout keeps element
``(b, h, i, j)`` when ``tl.rand(seed, offset + ((b*Hq + h)*Sq + i)*Sk + j) > p``, kept
probabilities scaled by ``1 / (1 - p)`` (see ``llmkit/ops/_philox.py``).

Layouts: ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, Dv)`` with any
strides; a ``(B, S, H, D)`` tensor transposed to ``(B, H, S, D)`` is read in place.
The kernels are compiled for rows that start 16-byte aligned (``STRIDE_ALIGN``: the
strides are provably multiples of 16 bytes, so tiles move as 16-byte vectors through
cp.async pipelines); the launchers copy the rare inputs that are not (odd head dims or
offsets, a non-unit last stride) into padded buffers. ``out`` / ``dq`` / ``dk`` /
``dv`` are returned contiguous; ``lse`` is float32 ``(B, Hq, Sq)``, the backward's row
statistics float32 ``(3, B, Hq, Sq)``.

Modules: this one (the forward kernel and launcher, the compile specs of every attention
kernel, and the names other kernel modules import), ``attention_backward.py`` (the backward
kernels and launcher), ``_attention_common.py`` (device and host helpers) and
``_attention_configs.py`` (launch configurations from fixed tables per architecture, padded
head dim and whether a mask or dropout is fused, :func:`forward_config`,
:func:`backward_config`; no autotuning search; every table entry compiles without register
spills for sm_80 and sm_90, ``python -m llmkit.compile_report``).
"""


from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from . import _attention_common as _c
from ._attention_common import (  # noqa: F401  (also imported from here by decode_attention and tests)
    LN2,
    MASK_BOOL,
    MASK_FLOAT,
    MASK_NONE,
    MaskArgs,
    ScoreArgs,
    _alibi_slope,
    _align_strides,
    _aligned_ptr,
    _cast,
    _common_constexprs,
    _dot_precision,
    _dropout_args,
    _dropout_keep,
    _key_range,
    _keys_bound,
    _load_keys,
    _load_tile,
    _mask_scores,
    _mma,
    _online_softmax,
    _part_bounds,
    _program_ids,
    _rng_base,
    _scores,
    _seen_keys,
    _seq_rows,
    _store_tile,
    _varlen_seq,
    padded_head_dim,
    rows_aligned,
    stride_align,
)
from ._attention_configs import (  # noqa: F401  (also imported from here by decode_attention and tests)
    BackwardConfig,
    TileConfig,
    device_arch,
    forward_config,
)
from ._compile import CompileSpec
from ._launch import launch
from .attention_backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_stats_kernel, attention_backward

# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, mask_base, seen_base, offs_m, offs_d, offs_dv,
                 stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, kv_lo, kv_hi, qk_scale,
                 diag_off, upper, lower, cap2, slope2, dropout_p, seed, rng_base, lo, hi,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
                 UPPER: tl.constexpr, LOWER: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """Online-softmax accumulation over key blocks [lo, hi) (BOUNDARY: masked blocks)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    start = tl.cast(lo, tl.int64)
    k_ptrs = _aligned_ptr(k_base, start * stride_kn, STRIDE_ALIGN) + offs_n0[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = _aligned_ptr(v_base, start * stride_vn, STRIDE_ALIGN) + offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs, offs_n, k_len, offs_d, HEAD_D, BLOCK_D, BOUNDARY)
        s, _ = _scores(_mma(q, tl.trans(k), None, DOT_PRECISION), qk_scale, cap2, SOFTCAP)
        s = _mask_scores(s, offs_m[:, None], offs_n[None, :], q_len, k_len, mask_base, stride_mm, stride_mn,
                         diag_off, upper, lower, slope2, BOUNDARY, BOUNDARY, UPPER, LOWER, HAS_ALIBI,
                         MASK_KIND, MASK_ROW_BCAST)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_keys(v_ptrs, _seen_keys(seen_base, offs_n, kv_lo, kv_hi, MASK_KIND != 0, LOWER), offs_dv, HEAD_DV,
                       BLOCK_DV, BOUNDARY or MASK_KIND != 0)
        acc = acc * alpha[:, None]
        acc = _mma(_cast(p, v.dtype, DOT_PRECISION), v, acc, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, seen_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh,
    num_heads, q_len, k_len, group_size,
    diag_off, upper, lower, cap2, slope_ptr, stride_slb, stride_slh,
    qk_scale, dropout_p, inv_keep, seed, rng_offset, total_q,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
):
    """out[b, h, rows] and lse[b, h, rows] for one block of BLOCK_M query rows.

    With ``VARLEN`` (packed sequences): ``b`` is a sequence of ``cu_q`` / ``cu_k``, ``q_len`` /
    ``k_len`` the longest lengths (the grid's), the batch strides 0, ``lse`` ``(Hq, total_q)``;
    programs past their sequence's end return at once."""
    m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid_m, h, b = _program_ids(m_blocks, num_heads)
    if UPPER:  # the longest rows first: better balance of the last wave
        pid_m = m_blocks - 1 - pid_m
    q_start, k_start, seq_q, seq_k, diag_off = _varlen_seq(cu_q_ptr, cu_k_ptr, b, q_len, k_len, diag_off, VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= seq_q:
            return
    stride_qb, stride_qh, stride_qm = _align_strides(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align_strides(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align_strides(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_ob, stride_oh, stride_om = _align_strides(stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group_size).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = _aligned_ptr(q_ptr, _seq_rows(b64 * stride_qb + h64 * stride_qh + m0.to(tl.int64) * stride_qm,
                                           q_start, stride_qm, VARLEN), STRIDE_ALIGN)
    q_ptrs = q_rows + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, seq_q, offs_d, HEAD_D, BLOCK_D, True)
    k_base = _aligned_ptr(k_ptr, _seq_rows(b64 * stride_kb + kvh64 * stride_kh, k_start, stride_kn, VARLEN),
                          STRIDE_ALIGN)
    v_base = _aligned_ptr(v_ptr, _seq_rows(b64 * stride_vb + kvh64 * stride_vh, k_start, stride_vn, VARLEN),
                          STRIDE_ALIGN)
    mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
    seen_base = seen_ptr + b64 * stride_sb + h64 * stride_sh
    rng_base = _rng_base(rng_offset, b64, h64, num_heads, q_len, k_len, seq_q, seq_k, VARLEN)
    kv_lo, kv_hi = _keys_bound(seq_k, seq_q, diag_off, upper, lower, UPPER, LOWER)
    slope2 = _alibi_slope(slope_ptr, b64, h64, stride_slb, stride_slh, HAS_ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m0, seq_k, diag_off, upper, lower, BLOCK_M, BLOCK_N, UPPER, LOWER)
    for part in tl.static_range(3):  # masked left edge (a window's), mask-free middle, masked right edge
        start, stop = _part_bounds(part, lo, full_lo, full_hi, hi)
        if part != 0 or LOWER:
            acc, l_i, m_i = _fwd_kv_loop(
                acc, l_i, m_i, q, k_base, v_base, mask_base, seen_base, offs_m, offs_d, offs_dv,
                stride_kn, stride_vn, stride_mm, stride_mn, seq_q, seq_k, kv_lo, kv_hi, qk_scale,
                diag_off, upper, lower, cap2, slope2, dropout_p, seed, rng_base, start, stop,
                HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, part != 1, UPPER, LOWER, SOFTCAP, HAS_ALIBI, MASK_KIND,
                MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    scale_rows = 1.0 / l_safe
    if HAS_DROPOUT:
        scale_rows = scale_rows * inv_keep
    out = acc * scale_rows[:, None]
    lse = tl.where(dead, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    if VARLEN:  # (Hq, total_q)
        lse_ptrs = lse_ptr + h64 * total_q + q_start + offs_m
    else:
        lse_ptrs = lse_ptr + (b64 * num_heads + h64) * q_len + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seq_q)
    o_rows = _aligned_ptr(out_ptr, _seq_rows(b64 * stride_ob + h64 * stride_oh + m0.to(tl.int64) * stride_om,
                                             q_start, stride_om, VARLEN), STRIDE_ALIGN)
    o_ptrs = o_rows + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_dv[None, :]
    _store_tile(o_ptrs, _cast(out, out_ptr.dtype.element_ty, DOT_PRECISION), offs_m, seq_q, offs_dv, HEAD_DV,
                BLOCK_DV)


# --------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------


def attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: int,
    offset: int,
    config: TileConfig | None = None,
    out_order: list[int] | None = None,
    *,
    bottom_right: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward.

    Args:
        query ``(B, Hq, Sq, D)``, key ``(B, Hkv, Sk, D)``, value ``(B, Hkv, Sk, Dv)``:
            float16 / bfloat16, or float32 with ``D, Dv <= 128``; any strides (rows that are not 16-byte aligned,
            e.g. a non-unit last stride or an odd head dim, are copied first),
            ``Hq`` a multiple of ``Hkv``, ``D, Dv <= 256``. Validated by the caller.
        attn_mask: None, bool (True = attend) or float (added), broadcastable to
            ``(B, Hq, Sq, Sk)``.
        config: tile sizes; default from :func:`forward_config`.
        out_order: the order of ``out``'s dims in memory, outermost first (e.g.
            ``[0, 2, 1, 3]`` for a (B, S, H, D) layout); default contiguous. The kernel
            writes that layout directly when its rows are 16-byte aligned.
        bottom_right, window, softcap, alibi_slopes: causal / window alignment, sliding
            window ``(left, right)`` (-1 unbounded), logit softcapping (0: none) and ALiBi
            slopes ``(Hq,)`` or ``(B, Hq)``; see :class:`ScoreArgs`.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in the query's dtype (laid out per ``out_order``, or
        contiguous when that layout's rows would not be aligned) and ``lse (B, Hq, Sq)``
        float32 (natural log; ``+inf`` on rows with no visible key, whose ``out`` is 0).
    """
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[3]
    out = _c._empty((b, hq, sq, dv), query.dtype, query.device)
    lse = _c._empty((b, hq, sq), torch.float32, query.device)
    if lse.numel() == 0:
        return out, lse
    if sk == 0:
        return out.zero_(), lse.fill_(float("inf"))
    q, k, v = (_c._aligned_rows(t) for t in (query, key, value))
    o = _c._empty_in_order((b, hq, sq, dv), out_order or [0, 1, 2, 3], query.dtype, query.device)
    if not rows_aligned(o):
        o = _c._padded_empty((b, hq, sq, dv), query.dtype, query.device)
    band = ScoreArgs.of(sq, sk, is_causal, bottom_right, window, softcap, alibi_slopes)
    mask = MaskArgs.of(attn_mask, (b, hq, sq, sk), q, band)
    p, inv_keep = _dropout_args(dropout_p)
    cfg = config or forward_config(d, dv, query.dtype, device_arch(query.device),
                                   masked=mask.kind != MASK_NONE or band.heavy(),
                                   dropout=p > 0.0)
    launch(
        _attn_fwd_kernel, (triton.cdiv(sq, cfg.block_m) * hq * b,),
        q, k, v, o, lse, mask.tensor, mask.seen, q, q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *mask.strides, *mask.seen_strides(),
        hq, sq, sk, hq // hkv, *band.kernel_args(q),
        band.qk_scale(scale), p, inv_keep, int(seed), int(offset), 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        **_common_constexprs(d, dv, band, mask, p > 0.0, q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (o if rows_aligned(o) else o.contiguous()), lse


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SPEC_SEED = 0x2545F4914F6CDD1D
"""A dropout seed as the op draws them (below 2**62: an i64 kernel argument); 0 without dropout."""


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``meta`` tensor: shapes, strides and a (16-byte aligned) address, no memory."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention_call(backward: bool, dtype: torch.dtype, d: int, causal: bool, mask_kind: int, row_bcast: bool,
                    dropout: bool, b: int = 2, hq: int = 16, hkv: int = 16, sq: int = 1024,
                    sk: int = 1024, options: dict | None = None) -> Callable[[], object]:
    """The launcher call of one compile spec: contiguous (B, H, S, D) meta tensors; ``options``:
    the launchers' keyword options (``alibi=True`` for (Hq,) float32 slopes)."""
    def call():
        q, k, v = meta(b, hq, sq, d, dtype=dtype), meta(b, hkv, sk, d, dtype=dtype), meta(b, hkv, sk, d, dtype=dtype)
        opts = dict(options or {})
        if opts.pop("alibi", False):
            opts["alibi_slopes"] = meta(hq, dtype=torch.float32)
        mask = None
        if mask_kind == MASK_BOOL:
            mask = meta(b, 1, sq, sk, dtype=torch.bool)
        elif mask_kind == MASK_FLOAT:
            mask = meta(b, 1, 1 if row_bcast else sq, sk, dtype=torch.float32)
        p, seed = (0.1, SPEC_SEED) if dropout else (0.0, 0)
        if not backward:
            return attention_forward(q, k, v, mask, p, causal, d ** -0.5, seed, 0, **opts)
        do = meta(b, hq, sq, d, dtype=dtype)
        return attention_backward(do, q, k, v, mask, p, causal, d ** -0.5, seed, 0, **opts)
    return call


_LLM_CASES: dict[str, tuple[torch.dtype, int, dict, dict]] = {
    # name: dtype, head dim, launcher options, shape (all causal)
    "window": (torch.bfloat16, 128, dict(window=(255, -1)), {}),
    "window_ragged_gqa": (torch.bfloat16, 128, dict(window=(255, -1)), dict(hq=32, hkv=8, sq=1000, sk=1000)),
    "bottom_right_window": (torch.bfloat16, 64, dict(bottom_right=True, window=(255, -1)), dict(sq=512)),
    "softcap_window": (torch.bfloat16, 256, dict(softcap=50.0, window=(255, -1)), {}),  # Gemma 2 sliding layers
    "softcap": (torch.bfloat16, 256, dict(softcap=50.0), {}),  # Gemma 2 global layers
    "alibi": (torch.bfloat16, 128, dict(alibi=True), {}),
    "everything": (torch.float32, 64, dict(bottom_right=True, window=(100, -1), softcap=30.0, alibi=True),
                   dict(sq=600, sk=1000)),
}


def compile_specs() -> list[CompileSpec]:
    """Forward, backward row statistics, dQ and dK/dV kernels as launched for (2, 16, 1024, D)
    inputs: every entry of the tile tables (architecture x padded head dim x plain / "heavy")
    at least once.

    bfloat16 for every padded head-dim class (64, 128 and the padded 80 / 96 / 160 / 256),
    causal and not; float16 at D = 128; the bool-mask, float key-padding-vector and dropout
    variants (which take the tables' smaller "heavy" tiles); float32 (exact fp32 products on
    FMA units) at D = 64 and 128, plain and heavy. The causal, masked and float32 cases are
    also compiled as "ragged_gqa": 1000 tokens (no length divisible by 16) with 32 query
    heads on 8 K/V heads, which Triton specializes less (a real launch of such a shape
    compiles its own kernel, usually with more registers). The options of today's LLMs
    (sliding window, bottom-right alignment, softcap, ALiBi; ``_LLM_CASES``) are compiled
    as ``llm_*``, forward and backward.
    """
    specs: list[CompileSpec] = []
    ragged = dict(hq=32, hkv=8, sq=1000, sk=1000)
    plain = [(torch.bfloat16, d, c, MASK_NONE, False, False)
             for d in (64, 128, 80, 96, 160, 256) for c in (False, True)]
    plain.append((torch.float16, 128, False, MASK_NONE, False, False))
    both = [  # also compiled as "ragged_gqa"
        (torch.bfloat16, 64, True, MASK_NONE, False, False),
        (torch.bfloat16, 128, True, MASK_NONE, False, False),
        (torch.bfloat16, 256, True, MASK_NONE, False, False),
        (torch.bfloat16, 128, True, MASK_BOOL, False, False),
        (torch.bfloat16, 256, True, MASK_BOOL, False, False),
        (torch.bfloat16, 64, False, MASK_FLOAT, True, False),
        (torch.bfloat16, 128, True, MASK_NONE, False, True),
        (torch.float32, 64, False, MASK_NONE, False, False),
        (torch.float32, 64, True, MASK_BOOL, False, False),
        (torch.float32, 128, True, MASK_NONE, False, False),
        (torch.float32, 128, True, MASK_BOOL, False, False),
    ]
    cases: list[tuple[Any, ...]] = [c + ({},) for c in plain if c not in both]
    cases += [c + ({},) for c in both] + [c + (ragged,) for c in both]
    bwd_dims = (64, 128, 80, 256)
    for dtype, d, causal, mask_kind, row_bcast, dropout, shape in cases:
        ty = _TRITON_DTYPE[dtype]
        tag = f"{ty}_d{d}{'_causal' if causal else ''}" + ("", "_boolmask", "_floatmask")[mask_kind] \
            + ("_keyvec" if row_bcast else "") + ("_dropout" if dropout else "") + ("_ragged_gqa" if shape else "")
        variant = (dtype, d, causal, mask_kind, row_bcast, dropout)
        specs.append(CompileSpec(f"fwd_{tag}", _attn_fwd_kernel, _attention_call(False, *variant, **shape),
                                 matrix=dtype != torch.float32))
        if dtype == torch.float16 or (dtype == torch.bfloat16 and mask_kind == MASK_NONE and not dropout
                                      and d not in bwd_dims):
            continue  # backward: one float16 case is enough; not every padded class
        bwd = _attention_call(True, *variant, **shape)
        specs.append(CompileSpec(f"bwd_stats_{tag}", _attn_bwd_stats_kernel, bwd, matrix=dtype != torch.float32))
        specs.append(CompileSpec(f"bwd_dq_{tag}", _attn_bwd_dq_kernel, bwd, matrix=dtype != torch.float32))
        specs.append(CompileSpec(f"bwd_dkdv_{tag}", _attn_bwd_dkdv_kernel, bwd, matrix=dtype != torch.float32))
    for name, (dtype, d, options, shape) in _LLM_CASES.items():  # the options of today's LLMs
        tag = f"llm_{name}_{_TRITON_DTYPE[dtype]}_d{d}"
        fwd = _attention_call(False, dtype, d, True, MASK_NONE, False, False, options=options, **shape)
        bwd = _attention_call(True, dtype, d, True, MASK_NONE, False, False, options=options, **shape)
        for kind, kernel, call in (("fwd", _attn_fwd_kernel, fwd), ("bwd_stats", _attn_bwd_stats_kernel, bwd),
                                   ("bwd_dq", _attn_bwd_dq_kernel, bwd), ("bwd_dkdv", _attn_bwd_dkdv_kernel, bwd)):
            specs.append(CompileSpec(f"{kind}_{tag}", kernel, call, matrix=dtype != torch.float32))
    return specs
