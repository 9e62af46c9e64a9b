"""Triton attention backward: row statistics, then dQ, then dK/dV (see ``kernels/attention.py``
for the kernels' roles, conventions and layouts). Each output element has one writer and is
summed in a fixed order: no atomics, deterministic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _attention_common as _c
from ._attention_common import (
    MASK_NONE,
    MaskArgs,
    ScoreArgs,
    _alibi_slope,
    _align_strides,
    _aligned_ptr,
    _cast,
    _common_constexprs,
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
    _query_range,
    _rng_base,
    _scores,
    _seen_keys,
    _seq_rows,
    _store_tile,
    _varlen_seq,
)
from ._attention_configs import (
    BackwardConfig,
    backward_config,
    device_arch,
    stats_config,
)
from ._launch import launch

# --------------------------------------------------------------------------------------
# backward: row statistics and dQ
# --------------------------------------------------------------------------------------


@triton.jit
def _stats_kv_loop(m_i, l_i, d_acc, q, do, k_base, v_base, mask_base, seen_base, offs_m, offs_d, offs_dv,
                   stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, kv_lo, kv_hi, qk_scale,
                   diag_off, upper, lower, cap2, slope2, dropout_p, inv_keep, seed, rng_base, lo, hi,
                   HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
                   UPPER: tl.constexpr, LOWER: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """Online row max ``m``, row sum ``l`` and ``sum_j exp2(s - m) dP`` over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    start = tl.cast(lo, tl.int64)
    k_ptrs = _aligned_ptr(k_base, start * stride_kn, STRIDE_ALIGN) + offs_n0[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = _aligned_ptr(v_base, start * stride_vn, STRIDE_ALIGN) + offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs, offs_n, k_len, offs_d, HEAD_D, BLOCK_D, BOUNDARY)
        v = _load_keys(v_ptrs, _seen_keys(seen_base, offs_n, kv_lo, kv_hi, MASK_KIND != 0, LOWER), offs_dv, HEAD_DV,
                       BLOCK_DV, BOUNDARY or MASK_KIND != 0)
        s, t = _scores(_mma(q, tl.trans(k), None, DOT_PRECISION), qk_scale, cap2, SOFTCAP)
        s = _mask_scores(s, offs_m[:, None], offs_n[None, :], q_len, k_len, mask_base, stride_mm, stride_mn,
                         diag_off, upper, lower, slope2, BOUNDARY, BOUNDARY, UPPER, LOWER, HAS_ALIBI,
                         MASK_KIND, MASK_ROW_BCAST)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        dp = _mma(do, tl.trans(v), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        d_acc = d_acc * alpha + tl.sum(p * dp, 1)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return m_i, l_i, d_acc


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _attn_bwd_stats_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, mask_ptr, seen_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh,
    num_heads, q_len, k_len, group_size,
    diag_off, upper, lower, cap2, slope_ptr, stride_slb, stride_slh,
    qk_scale, dropout_p, inv_keep, seed, rng_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
):
    """The row statistics of BLOCK_M query rows for the dQ and dK/dV kernels, in planes 0, 1,
    2 of ``stats``: ``delta`` and the base-2 shift in two parts, the row maximum ``m`` and
    ``log2(l)``.

    ``delta = sum_j P_ij dP_ij`` is ``rowsum(dO * O)`` from the normalized float32
    probabilities, not from the rounded output (whose rounding dominates dS when ``|O| >>
    |dO|``). The gradient kernels recompute ``P = exp2((s - m) - log2(l))`` for float32
    inputs; 16-bit inputs use ``exp2(s - c)`` with ``c = m + log2(l)`` rounded to float32
    (one register vector less): every ``P`` of a row is then ``(1 + e)`` times the exact
    one, ``|e| <= |c| * 2^-24`` (~1e-5 at scores ~200, below 16-bit resolution), so ``dS``
    has a relative error only (``delta`` from the rounded shift, or from an output
    normalized otherwise, would add an absolute ``e P delta``, large where ``|O| >> |dO|``).
    """
    m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid_m, h, b = _program_ids(m_blocks, num_heads)
    if UPPER:
        pid_m = m_blocks - 1 - pid_m
    q_start, k_start, seq_q, seq_k, diag_off = _varlen_seq(cu_q_ptr, cu_k_ptr, b, q_len, k_len, diag_off, VARLEN)
    if VARLEN:  # packed sequences: q_len / k_len are the longest lengths
        if pid_m * BLOCK_M >= seq_q:
            return
    stride_qb, stride_qh, stride_qm = _align_strides(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align_strides(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align_strides(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _align_strides(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group_size).to(tl.int64)
    m0 = pid_m * BLOCK_M
    m064 = m0.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = _aligned_ptr(q_ptr, _seq_rows(b64 * stride_qb + h64 * stride_qh + m064 * stride_qm, q_start,
                                           stride_qm, VARLEN), STRIDE_ALIGN)
    q = _load_tile(q_rows + rows[:, None] * stride_qm + offs_d[None, :], offs_m, seq_q, offs_d,
                   HEAD_D, BLOCK_D, True)
    do_rows = _aligned_ptr(do_ptr, _seq_rows(b64 * stride_dob + h64 * stride_doh + m064 * stride_dom, q_start,
                                             stride_dom, VARLEN), STRIDE_ALIGN)
    do = _load_tile(do_rows + rows[:, None] * stride_dom + offs_dv[None, :], offs_m, seq_q, offs_dv,
                    HEAD_DV, BLOCK_DV, True)
    k_base = _aligned_ptr(k_ptr, _seq_rows(b64 * stride_kb + kvh64 * stride_kh, k_start, stride_kn, VARLEN),
                          STRIDE_ALIGN)
    v_base = _aligned_ptr(v_ptr, _seq_rows(b64 * stride_vb + kvh64 * stride_vh, k_start, stride_vn, VARLEN),
                          STRIDE_ALIGN)
    mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
    seen_base = seen_ptr + b64 * stride_sb + h64 * stride_sh
    rng_base = _rng_base(rng_offset, b64, h64, num_heads, q_len, k_len, seq_q, seq_k, VARLEN)
    kv_lo, kv_hi = _keys_bound(seq_k, seq_q, diag_off, upper, lower, UPPER, LOWER)
    slope2 = _alibi_slope(slope_ptr, b64, h64, stride_slb, stride_slh, HAS_ALIBI)
    lo, full_lo, full_hi, hi = _key_range(m0, seq_k, diag_off, upper, lower, BLOCK_M, BLOCK_N, UPPER, LOWER)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    d_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for part in tl.static_range(3):  # masked left edge (a window's), mask-free middle, masked right edge
        start, stop = _part_bounds(part, lo, full_lo, full_hi, hi)
        if part != 0 or LOWER:
            m_i, l_i, d_acc = _stats_kv_loop(
                m_i, l_i, d_acc, q, do, k_base, v_base, mask_base, seen_base, offs_m, offs_d, offs_dv,
                stride_kn, stride_vn, stride_mm, stride_mn, seq_q, seq_k, kv_lo, kv_hi, qk_scale,
                diag_off, upper, lower, cap2, slope2, dropout_p, inv_keep, seed, rng_base, start, stop,
                HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, part != 1, UPPER, LOWER, SOFTCAP, HAS_ALIBI, MASK_KIND,
                MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)
    # rows with no visible key (l = 0): c = +inf, so P' = 0 and their dQ and dK/dV share are 0
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    plane = (tl.num_programs(0) // m_blocks).to(tl.int64) * q_len  # B * Hq rows of Sq
    row_ptrs = stats_ptr + (b64 * num_heads + h64) * q_len + offs_m
    row_ok = offs_m < seq_q
    tl.store(row_ptrs, d_acc / l_safe, mask=row_ok)
    tl.store(row_ptrs + plane, tl.where(dead, float("inf"), m_i), mask=row_ok)
    tl.store(row_ptrs + 2 * plane, tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _probs(s, c_hi, c_lo, TWO_PART: tl.constexpr):
    """exp2(s - c_hi - c_lo) over [rows, keys] (``c_hi``, ``c_lo``: [rows]); without
    ``TWO_PART`` the caller passed ``c_hi = c_hi + c_lo`` (rounded) and ``c_lo`` is unused."""
    if TWO_PART:
        p = tl.math.exp2((s - c_hi[:, None]) - c_lo[:, None])
    else:
        p = tl.math.exp2(s - c_hi[:, None])
    return p


@triton.jit
def _dq_kv_loop(dq, q, do, c_hi, c_lo, delta, k_base, v_base, mask_base, seen_base, offs_m, offs_d, offs_dv,
                stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, kv_lo, kv_hi, qk_scale,
                diag_off, upper, lower, cap2, slope2, dropout_p, inv_keep, seed, rng_base, lo, hi,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
                UPPER: tl.constexpr, LOWER: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """dq += dS K over key blocks [lo, hi), P from the row statistics (:func:`_probs`)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    start = tl.cast(lo, tl.int64)
    k_ptrs = _aligned_ptr(k_base, start * stride_kn, STRIDE_ALIGN) + offs_n0[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = _aligned_ptr(v_base, start * stride_vn, STRIDE_ALIGN) + offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        seen = _seen_keys(seen_base, offs_n, kv_lo, kv_hi, MASK_KIND != 0, LOWER)
        k = _load_keys(k_ptrs, seen, offs_d, HEAD_D, BLOCK_D, BOUNDARY or MASK_KIND != 0)
        v = _load_keys(v_ptrs, seen, offs_dv, HEAD_DV, BLOCK_DV, BOUNDARY or MASK_KIND != 0)
        s, t = _scores(_mma(q, tl.trans(k), None, DOT_PRECISION), qk_scale, cap2, SOFTCAP)
        s = _mask_scores(s, offs_m[:, None], offs_n[None, :], q_len, k_len, mask_base, stride_mm, stride_mn,
                         diag_off, upper, lower, slope2, BOUNDARY, BOUNDARY, UPPER, LOWER, HAS_ALIBI,
                         MASK_KIND, MASK_ROW_BCAST)
        p = _probs(s, c_hi, c_lo, DOT_PRECISION == "ieee")
        dp = _mma(do, tl.trans(v), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # through c * tanh(x / c): times 1 - tanh^2
            ds = ds * (1.0 - t * t)
        dq = _mma(_cast(ds, k.dtype, DOT_PRECISION), k, dq, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, dq_ptr, mask_ptr, seen_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh,
    num_heads, q_len, k_len, group_size,
    diag_off, upper, lower, cap2, slope_ptr, stride_slb, stride_slh,
    scale, qk_scale, dropout_p, inv_keep, seed, rng_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
):
    """dQ for one block of BLOCK_M query rows, from the row statistics of the stats kernel."""
    m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid_m, h, b = _program_ids(m_blocks, num_heads)
    if UPPER:
        pid_m = m_blocks - 1 - pid_m
    q_start, k_start, seq_q, seq_k, diag_off = _varlen_seq(cu_q_ptr, cu_k_ptr, b, q_len, k_len, diag_off, VARLEN)
    if VARLEN:  # packed sequences: q_len / k_len are the longest lengths
        if pid_m * BLOCK_M >= seq_q:
            return
    stride_qb, stride_qh, stride_qm = _align_strides(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align_strides(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align_strides(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _align_strides(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    stride_dqb, stride_dqh, stride_dqm = _align_strides(stride_dqb, stride_dqh, stride_dqm, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group_size).to(tl.int64)
    m0 = pid_m * BLOCK_M
    m064 = m0.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = _aligned_ptr(q_ptr, _seq_rows(b64 * stride_qb + h64 * stride_qh + m064 * stride_qm, q_start,
                                           stride_qm, VARLEN), STRIDE_ALIGN)
    q = _load_tile(q_rows + rows[:, None] * stride_qm + offs_d[None, :], offs_m, seq_q, offs_d,
                   HEAD_D, BLOCK_D, True)
    do_rows = _aligned_ptr(do_ptr, _seq_rows(b64 * stride_dob + h64 * stride_doh + m064 * stride_dom, q_start,
                                             stride_dom, VARLEN), STRIDE_ALIGN)
    do = _load_tile(do_rows + rows[:, None] * stride_dom + offs_dv[None, :], offs_m, seq_q, offs_dv,
                    HEAD_DV, BLOCK_DV, True)
    row_ptrs = stats_ptr + (b64 * num_heads + h64) * q_len + offs_m
    plane = (tl.num_programs(0) // m_blocks).to(tl.int64) * q_len  # B * Hq rows of Sq
    row_ok = offs_m < seq_q
    delta = tl.load(row_ptrs, mask=row_ok, other=0.0)
    c_hi = tl.load(row_ptrs + plane, mask=row_ok, other=float("inf"))
    c_lo = tl.load(row_ptrs + 2 * plane, mask=row_ok, other=0.0)
    if DOT_PRECISION != "ieee":  # 16-bit inputs: one rounded shift (see the stats kernel)
        c_hi = c_hi + c_lo

    k_base = _aligned_ptr(k_ptr, _seq_rows(b64 * stride_kb + kvh64 * stride_kh, k_start, stride_kn, VARLEN),
                          STRIDE_ALIGN)
    v_base = _aligned_ptr(v_ptr, _seq_rows(b64 * stride_vb + kvh64 * stride_vh, k_start, stride_vn, VARLEN),
                          STRIDE_ALIGN)
    mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
    seen_base = seen_ptr + b64 * stride_sb + h64 * stride_sh
    rng_base = _rng_base(rng_offset, b64, h64, num_heads, q_len, k_len, seq_q, seq_k, VARLEN)
    kv_lo, kv_hi = _keys_bound(seq_k, seq_q, diag_off, upper, lower, UPPER, LOWER)
    slope2 = _alibi_slope(slope_ptr, b64, h64, stride_slb, stride_slh, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m0, seq_k, diag_off, upper, lower, BLOCK_M, BLOCK_N, UPPER, LOWER)
    for part in tl.static_range(3):  # masked left edge (a window's), mask-free middle, masked right edge
        start, stop = _part_bounds(part, lo, full_lo, full_hi, hi)
        if part != 0 or LOWER:
            dq = _dq_kv_loop(dq, q, do, c_hi, c_lo, delta, k_base, v_base, mask_base, seen_base, offs_m, offs_d,
                             offs_dv, stride_kn, stride_vn, stride_mm, stride_mn, seq_q, seq_k, kv_lo, kv_hi,
                             qk_scale, diag_off, upper, lower, cap2, slope2, dropout_p, inv_keep, seed, rng_base,
                             start, stop, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, part != 1, UPPER, LOWER,
                             SOFTCAP, HAS_ALIBI, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)
    dq_rows = _aligned_ptr(dq_ptr, _seq_rows(b64 * stride_dqb + h64 * stride_dqh + m064 * stride_dqm, q_start,
                                             stride_dqm, VARLEN), STRIDE_ALIGN)
    dq_ptrs = dq_rows + rows[:, None] * stride_dqm + offs_d[None, :]
    _store_tile(dq_ptrs, _cast(dq * scale, dq_ptr.dtype.element_ty, DOT_PRECISION), offs_m, seq_q, offs_d, HEAD_D,
                BLOCK_D)


# --------------------------------------------------------------------------------------
# backward: dK, dV
# --------------------------------------------------------------------------------------


@triton.jit
def _dkdv_q_loop(dk, dv, k, v, q_base, do_base, stats_base, stats_plane, mask_base,
                 offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
                 q_len, k_len, qk_scale, diag_off, upper, lower, cap2, slope2,
                 dropout_p, inv_keep, seed, rng_base, lo, hi,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
                 SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 CHECK_ROWS: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q over query blocks [lo, hi), in the [key, query] layout.

    P from the row statistics of the stats kernel (:func:`_probs`). Keys past Sk are not
    masked here: their rows of dk / dv are never stored and the products reduce over
    queries only, so they cannot reach a stored element.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    start = tl.cast(lo, tl.int64)
    q_ptrs = _aligned_ptr(q_base, start * stride_qm, STRIDE_ALIGN) + offs_m0[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = _aligned_ptr(do_base, start * stride_dom, STRIDE_ALIGN) + offs_m0[:, None] * stride_dom \
        + offs_dv[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(q_ptrs, offs_m, q_len, offs_d, HEAD_D, BLOCK_D, CHECK_ROWS)
        do = _load_tile(do_ptrs, offs_m, q_len, offs_dv, HEAD_DV, BLOCK_DV, CHECK_ROWS)
        if CHECK_ROWS:  # rows past Sq: P = 0 (the row maximum read as +inf)
            row_ok = offs_m < q_len
            delta = tl.load(stats_base + offs_m, mask=row_ok, other=0.0)
            c_hi = tl.load(stats_base + stats_plane + offs_m, mask=row_ok, other=float("inf"))
            c_lo = tl.load(stats_base + 2 * stats_plane + offs_m, mask=row_ok, other=0.0)
        else:
            delta = tl.load(stats_base + offs_m)
            c_hi = tl.load(stats_base + stats_plane + offs_m)
            c_lo = tl.load(stats_base + 2 * stats_plane + offs_m)
        if DOT_PRECISION != "ieee":
            c_hi = c_hi + c_lo
        s_t, t_t = _scores(_mma(k, tl.trans(q), None, DOT_PRECISION), qk_scale, cap2, SOFTCAP)
        s_t = _mask_scores(s_t, offs_m[None, :], offs_n[:, None], q_len, k_len, mask_base, stride_mm, stride_mn,
                           diag_off, upper, lower, slope2, False, UPPER or LOWER, UPPER, LOWER, HAS_ALIBI,
                           MASK_KIND, MASK_ROW_BCAST)
        if DOT_PRECISION == "ieee":
            p_t = tl.math.exp2((s_t - c_hi[None, :]) - c_lo[None, :])
        else:
            p_t = tl.math.exp2(s_t - c_hi[None, :])
        dp_t = _mma(v, tl.trans(do), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[None, :], offs_n[:, None], k_len, dropout_p)
            pd_t = tl.where(keep, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
        else:
            pd_t = p_t
        dv = _mma(_cast(pd_t, do.dtype, DOT_PRECISION), do, dv, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = _mma(_cast(ds_t, q.dtype, DOT_PRECISION), q, dk, DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, dk_ptr, dv_ptr, mask_ptr, seen_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh,
    num_heads, q_len, k_len, group_size,
    diag_off, upper, lower, cap2, slope_ptr, stride_slb, stride_slh,
    scale, qk_scale, dropout_p, inv_keep, seed, rng_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one K/V head, summed over the heads of its query group."""
    pid_n, kvh, b = _program_ids(tl.cdiv(k_len, BLOCK_N), num_heads // group_size)
    q_start, k_start, seq_q, seq_k, diag_off = _varlen_seq(cu_q_ptr, cu_k_ptr, b, q_len, k_len, diag_off, VARLEN)
    if VARLEN:  # packed sequences: q_len / k_len are the longest lengths
        if pid_n * BLOCK_N >= seq_k:
            return
    stride_qb, stride_qh, stride_qm = _align_strides(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align_strides(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align_strides(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _align_strides(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    stride_dkb, stride_dkh, stride_dkn = _align_strides(stride_dkb, stride_dkh, stride_dkn, STRIDE_ALIGN)
    stride_dvb, stride_dvh, stride_dvn = _align_strides(stride_dvb, stride_dvh, stride_dvn, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    n0 = pid_n * BLOCK_N
    n064 = n0.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    offs_n = n0 + cols
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # keys no query row of the group sees read as zero: their dK / dV are 0 whatever they hold
    kv_lo, kv_hi = _keys_bound(seq_k, seq_q, diag_off, upper, lower, UPPER, LOWER)
    seen_base = seen_ptr + b64 * stride_sb + kvh64 * stride_sh
    k_rows = _aligned_ptr(k_ptr, _seq_rows(b64 * stride_kb + kvh64 * stride_kh + n064 * stride_kn, k_start,
                                           stride_kn, VARLEN), STRIDE_ALIGN)
    seen = _seen_keys(seen_base, offs_n, kv_lo, kv_hi, MASK_KIND != 0, LOWER)
    k = _load_keys(k_rows + cols[:, None] * stride_kn + offs_d[None, :], seen, offs_d, HEAD_D, BLOCK_D, True)
    v_rows = _aligned_ptr(v_ptr, _seq_rows(b64 * stride_vb + kvh64 * stride_vh + n064 * stride_vn, k_start,
                                           stride_vn, VARLEN), STRIDE_ALIGN)
    v = _load_keys(v_rows + cols[:, None] * stride_vn + offs_dv[None, :], seen, offs_dv, HEAD_DV, BLOCK_DV, True)

    # only the query rows whose band reaches these keys (causal: none before n0 - diag_off);
    # one loop with the band and row masks applied throughout (three separately pipelined
    # loops cost more registers than the masks cost time)
    m_lo, m_hi = _query_range(n0, seq_q, diag_off, upper, lower, BLOCK_M, BLOCK_N, UPPER, LOWER)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    stats_plane = (tl.num_programs(0) // tl.cdiv(k_len, BLOCK_N) * group_size).to(tl.int64) * q_len  # B * Hq rows
    for g in range(0, group_size):
        h64 = kvh64 * group_size + g
        row_stats = (b64 * num_heads + h64) * q_len
        slope2 = _alibi_slope(slope_ptr, b64, h64, stride_slb, stride_slh, HAS_ALIBI)
        if VARLEN:
            rng_base = _rng_base(rng_offset, b64, h64, num_heads, q_len, k_len, seq_q, seq_k, VARLEN)
        else:
            rng_base = rng_offset + row_stats * k_len
        if VARLEN:  # read again for each head rather than held in a register through the loops
            q_start = tl.load(cu_q_ptr + b, volatile=True)
        dk, dv = _dkdv_q_loop(
            dk, dv, k, v,
            _aligned_ptr(q_ptr, _seq_rows(b64 * stride_qb + h64 * stride_qh, q_start, stride_qm, VARLEN), STRIDE_ALIGN),
            _aligned_ptr(do_ptr, _seq_rows(b64 * stride_dob + h64 * stride_doh, q_start, stride_dom, VARLEN),
                         STRIDE_ALIGN),
            stats_ptr + row_stats, stats_plane, mask_ptr + b64 * stride_mb + h64 * stride_mh,
            offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
            seq_q, seq_k, qk_scale, diag_off, upper, lower, cap2, slope2,
            dropout_p, inv_keep, seed, rng_base, m_lo, m_hi,
            HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_M, UPPER, LOWER, SOFTCAP, HAS_ALIBI, True, MASK_KIND,
            MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)

    if VARLEN:  # read again rather than held in a register through the loop
        k_start = tl.load(cu_k_ptr + b, volatile=True)
    dk_rows = _aligned_ptr(dk_ptr, _seq_rows(b64 * stride_dkb + kvh64 * stride_dkh + n064 * stride_dkn, k_start,
                                             stride_dkn, VARLEN), STRIDE_ALIGN)
    dk_ptrs = dk_rows + cols[:, None] * stride_dkn + offs_d[None, :]
    _store_tile(dk_ptrs, _cast(dk * scale, dk_ptr.dtype.element_ty, DOT_PRECISION), offs_n, seq_k, offs_d, HEAD_D,
                BLOCK_D)
    dv_rows = _aligned_ptr(dv_ptr, _seq_rows(b64 * stride_dvb + kvh64 * stride_dvh + n064 * stride_dvn, k_start,
                                             stride_dvn, VARLEN), STRIDE_ALIGN)
    dv_ptrs = dv_rows + cols[:, None] * stride_dvn + offs_dv[None, :]
    _store_tile(dv_ptrs, _cast(dv, dv_ptr.dtype.element_ty, DOT_PRECISION), offs_n, seq_k, offs_dv, HEAD_DV,
                BLOCK_DV)


# --------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------


def attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: int,
    offset: int,
    config: BackwardConfig | None = None,
    *,
    bottom_right: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward: ``dq, dk, dv`` (contiguous, in the inputs' dtype).

    The keyword options are the forward's (:func:`~llmkit.kernels.attention.attention_forward`).
    ``grad_out`` is ``(B, Hq, Sq, Dv)`` with any strides. The forward's ``out`` and ``lse``
    are not read: a first kernel recomputes each row's maximum, sum and ``delta =
    rowsum(dO * O) = sum_j P_ij dP_ij`` in float32 (the rounded output and the float32
    ``lse`` would carry their rounding into every dS) for the dQ and dK/dV kernels.
    The mask is not differentiated (a float mask that needs a gradient goes to the
    reference backend). Three launches: the row statistics, dQ, dK/dV.
    """
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[3]
    if b * hq * sq == 0 or sk == 0:  # nothing attends: every gradient is zero
        zq, zk, zv = (_c._empty(tuple(t.shape), t.dtype, t.device).zero_() for t in (query, key, value))
        return zq, zk, zv
    dq, dk, dvv = (_c._padded_empty(tuple(t.shape), t.dtype, t.device) for t in (query, key, value))
    q, k, v, do = (_c._aligned_rows(t) for t in (query, key, value, grad_out))
    stats = _c._empty((3, b, hq, sq), torch.float32, query.device)  # delta, row max m, log2(row sum)
    band = ScoreArgs.of(sq, sk, is_causal, bottom_right, window, softcap, alibi_slopes)
    mask = MaskArgs.of(attn_mask, (b, hq, sq, sk), q, band)
    p, inv_keep = _dropout_args(dropout_p)
    cfg = config or backward_config(d, dv, query.dtype, device_arch(query.device),
                                    masked=mask.kind != MASK_NONE or band.heavy(),
                                    dropout=p > 0.0)
    consts = _common_constexprs(d, dv, band, mask, p > 0.0, q)
    shape = (hq, sq, sk, hq // hkv, *band.kernel_args(q))
    scalars = (*shape, scale, band.qk_scale(scale), p, inv_keep, int(seed), int(offset))
    n_qblocks = triton.cdiv(sq, cfg.dq.block_m)
    st = stats_config(cfg.dq, d, dv, query.dtype, device_arch(query.device))
    launch(
        _attn_bwd_stats_kernel, (n_qblocks * hq * b,),
        q, k, v, do, stats, mask.tensor, mask.seen, q, q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *mask.strides, *mask.seen_strides(), *shape, *scalars[len(shape) + 1:],
        BLOCK_M=st.block_m, BLOCK_N=st.block_n, **consts,
        num_warps=st.num_warps, num_stages=st.num_stages,
    )
    launch(
        _attn_bwd_dq_kernel, (n_qblocks * hq * b,),
        q, k, v, do, stats, dq, mask.tensor, mask.seen, q, q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3], *mask.strides, *mask.seen_strides(), *scalars,
        BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, **consts,
        num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages,
    )
    kv_mask = mask.seen_per_kv_head(hq // hkv)
    launch(
        _attn_bwd_dkdv_kernel, (triton.cdiv(sk, cfg.dkdv.block_n) * hkv * b,),
        q, k, v, do, stats, dk, dvv, kv_mask.tensor, kv_mask.seen, q, q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], *dvv.stride()[:3], *kv_mask.strides, *kv_mask.seen_strides(), *scalars,
        BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, **consts,
        num_warps=cfg.dkdv.num_warps, num_stages=cfg.dkdv.num_stages,
    )
    return dq.contiguous(), dk.contiguous(), dvv.contiguous()
