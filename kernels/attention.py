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
* ``_attn_bwd_dq_kernel`` [query blocks, Hq, B]: ``delta = rowsum(dO * O)`` (stored for
  the next kernel) and ``dQ``, recomputing the probabilities from ``lse``.
* ``_attn_bwd_dkdv_kernel`` [key blocks, Hkv, B]: ``dK`` and ``dV`` for one block of keys
  of one K/V head, looping over every query head of its group and every query block.

Each output element is written by exactly one program and summed in a fixed order,
so the backward has no atomics and is deterministic. Causal blocks that are fully
masked are skipped in all three kernels.

Conventions (shared with the reference backend in ``llmkit/ops/attention.py``):
top-left causal alignment (query ``i`` sees keys ``j <= i``); rows with no visible key
give zeros and ``lse = +inf`` and zero gradients; dropout keeps element
``(b, h, i, j)`` when ``tl.rand(seed, offset + ((b*Hq + h)*Sq + i)*Sk + j) > p``, kept
probabilities scaled by ``1 / (1 - p)`` (see ``llmkit/ops/_philox.py``).

Layouts: ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, Dv)`` with any
strides; a ``(B, S, H, D)`` tensor transposed to ``(B, H, S, D)`` is read in place.
The kernels are compiled for rows that start 16-byte aligned (``STRIDE_ALIGN``: the
strides are provably multiples of 16 bytes, so tiles move as 16-byte vectors through
cp.async pipelines); the launchers copy the rare inputs that are not (odd head dims or
offsets, a non-unit last stride) into padded buffers. ``out`` / ``dq`` / ``dk`` /
``dv`` are returned contiguous; ``lse`` and ``delta`` are float32 ``(B, Hq, Sq)``.

Launch configurations come from fixed tables per architecture, padded head dim and
whether a mask or dropout is fused (:func:`forward_config`, :func:`backward_config`);
there is no autotuning search. Every table entry compiles without register spills
for sm_80 and sm_90 (``python -m llmkit.compile_report``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import _common  # noqa: F401  (Triton interpreter fixes, applied on import)
from ._compile import CompileSpec
from ._launch import device_target, launch

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# A finite additive mask value below this is clamped before the change to base 2, so
# that x * log2(e) cannot overflow to -inf (finfo(float32).min is a common "masked"
# value and must stay a finite, visible score as in the reference).
MASK_FLOOR: tl.constexpr = tl.constexpr(-2.3e38)

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a [rows, cols] tile; rows >= n_rows and cols >= N_COLS read as zero."""
    if CHECK_ROWS:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    else:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Store a [rows, cols] tile, skipping rows >= n_rows and cols >= N_COLS."""
    if N_COLS == BLOCK_COLS:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))


@triton.jit
def _program_ids(n_blocks, n_heads):
    """(block, head, batch) of this program on a one-axis grid of ``n_blocks * n_heads * B``.

    Everything goes on grid axis x (up to 2**31 - 1 programs; y and z stop at 65535, which
    B x H passes). Blocks vary fastest, then heads, then the batch: the order in which a
    ``(blocks, heads, B)`` grid runs, so programs that share K / V run together.
    """
    pid = tl.program_id(0)
    block = pid % n_blocks
    bh = pid // n_blocks
    return block, bh % n_heads, bh // n_heads


@triton.jit
def _align_strides(stride_b, stride_h, stride_row, STRIDE_ALIGN: tl.constexpr):
    """With STRIDE_ALIGN > 1 the launcher checked that the strides are multiples of it;
    rounding them so (a no-op on such values) lets the compiler prove 16-byte aligned rows."""
    if STRIDE_ALIGN > 1:
        stride_b = (stride_b // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_h = (stride_h // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_row = (stride_row // STRIDE_ALIGN) * STRIDE_ALIGN
    return stride_b, stride_h, stride_row


@triton.jit
def _aligned_ptr(base, offset, STRIDE_ALIGN: tl.constexpr):
    """``base + offset``, declared 16-byte aligned when the launcher checked that it is.

    (The hint must sit on the addition: one on a function argument is dropped.)
    """
    ptr = base + offset
    if STRIDE_ALIGN > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    ``DOT_PRECISION``: "tf32" for 16-bit inputs (tensor cores; the option only affects
    float32 inputs), "ieee" for exact float32 products, and "upcast" under the Triton
    interpreter for bfloat16, whose ``tl.dot`` multiplies bfloat16 bit patterns as
    integers (triton-lang/triton#11584): the operands are widened to float32 first,
    which gives the same exact products the tensor cores form.
    """
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """float32 ``x`` to ``dtype``, rounded to nearest even (as ``.to`` does on the GPU).

    The Triton interpreter truncates float32 -> bfloat16 casts; in its bfloat16 mode
    ("upcast", see :func:`_mma`) the float32 bits are rounded first so the cast is exact.
    """
    if DOT_PRECISION == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mask_scores(s, q_idx, k_idx, q_len, k_len, mask_base, stride_mm, stride_mn,
                 CHECK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                 MASK_ROW_BCAST: tl.constexpr):
    """Apply the attention mask, the key bound and the causal mask to base-2 scores.

    ``q_idx`` / ``k_idx`` are 2-D broadcastable index tiles ([M, 1] and [1, N] for a
    [query, key] tile, or the transpose for a [key, query] tile). Hidden entries
    become -inf; an additive mask is added in base 2.
    """
    if MASK_KIND != 0:
        if MASK_ROW_BCAST:
            m_ptrs = mask_base + k_idx.to(tl.int64) * stride_mn
            m_ok = k_idx < k_len
        else:
            m_ptrs = mask_base + q_idx.to(tl.int64) * stride_mm + k_idx.to(tl.int64) * stride_mn
            m_ok = (q_idx < q_len) & (k_idx < k_len)
        if MASK_KIND == 1:
            visible = tl.load(m_ptrs, mask=m_ok, other=0)
            s = tl.where(visible != 0, s, float("-inf"))
        else:
            add = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
            add2 = tl.maximum(add, MASK_FLOOR) * LOG2E
            s = s + tl.where(add == float("-inf"), float("-inf"), add2)
    if CHECK_KEYS:
        s = tl.where(k_idx < k_len, s, float("-inf"))
    if CAUSAL:
        s = tl.where(k_idx <= q_idx, s, float("-inf"))
    return s


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One key block of the online softmax over base-2 scores ``s`` [rows, keys].

    Returns the unnormalised probabilities, the factor that rescales what was summed so
    far, and the new row maximum and sum. A row with nothing visible yet keeps
    m = -inf; 0 is subtracted instead, so exp2 gives 0 rather than NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _dropout_keep(seed, rng_base, q_idx, k_idx, k_len, dropout_p):
    """Philox keep mask of the tile: counter rng_base + i * Sk + j, kept when u > p."""
    counters = rng_base + q_idx.to(tl.int64) * k_len + k_idx
    return tl.rand(seed, counters) > dropout_p


@triton.jit
def _causal_key_range(m0, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Keys a query block [m0, m0 + BLOCK_M) needs: [0, full_end) mask-free, [full_end, hi) masked."""
    if IS_CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M)
        full_end = tl.minimum(((m0 + 1) // BLOCK_N) * BLOCK_N, (k_len // BLOCK_N) * BLOCK_N)
    else:
        hi = k_len
        full_end = (k_len // BLOCK_N) * BLOCK_N
    return full_end, hi


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_d, offs_dv,
                 stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale,
                 dropout_p, seed, rng_base, lo, hi,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """Online-softmax accumulation over key blocks [lo, hi) (BOUNDARY: masked blocks)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    start = tl.cast(lo, tl.int64)
    k_ptrs = _aligned_ptr(k_base, start * stride_kn, STRIDE_ALIGN) + offs_n0[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = _aligned_ptr(v_base, start * stride_vn, STRIDE_ALIGN) + offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs, offs_n, k_len, offs_d, HEAD_D, BLOCK_D, BOUNDARY)
        s = _mma(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        s = _mask_scores(s, offs_m[:, None], offs_n[None, :], q_len, k_len, mask_base, stride_mm,
                         stride_mn, BOUNDARY, BOUNDARY and IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_ptrs, offs_n, k_len, offs_dv, HEAD_DV, BLOCK_DV, BOUNDARY)
        acc = acc * alpha[:, None]
        acc = _mma(_cast(p, v.dtype, DOT_PRECISION), v, acc, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, q_len, k_len, group_size,
    qk_scale, dropout_p, inv_keep, seed, rng_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """out[b, h, rows] and lse[b, h, rows] for one block of BLOCK_M query rows."""
    m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid_m, h, b = _program_ids(m_blocks, num_heads)
    if IS_CAUSAL:  # the longest rows first: better balance of the last wave
        pid_m = m_blocks - 1 - pid_m
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

    q_rows = _aligned_ptr(q_ptr, b64 * stride_qb + h64 * stride_qh + m0.to(tl.int64) * stride_qm, STRIDE_ALIGN)
    q_ptrs = q_rows + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, q_len, offs_d, HEAD_D, BLOCK_D, True)
    k_base = _aligned_ptr(k_ptr, b64 * stride_kb + kvh64 * stride_kh, STRIDE_ALIGN)
    v_base = _aligned_ptr(v_ptr, b64 * stride_vb + kvh64 * stride_vh, STRIDE_ALIGN)
    mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
    rng_base = rng_offset + (b64 * num_heads + h64) * q_len * k_len

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    full_end, hi = _causal_key_range(m0, k_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_kv_loop(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_d, offs_dv,
        stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale,
        dropout_p, seed, rng_base, 0, full_end,
        HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, IS_CAUSAL, MASK_KIND,
        MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)
    acc, l_i, m_i = _fwd_kv_loop(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_d, offs_dv,
        stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale,
        dropout_p, seed, rng_base, full_end, hi,
        HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, IS_CAUSAL, MASK_KIND,
        MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    scale_rows = 1.0 / l_safe
    if HAS_DROPOUT:
        scale_rows = scale_rows * inv_keep
    out = acc * scale_rows[:, None]
    lse = tl.where(dead, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(lse_ptr + (b64 * num_heads + h64) * q_len + offs_m, lse, mask=offs_m < q_len)
    o_rows = _aligned_ptr(out_ptr, b64 * stride_ob + h64 * stride_oh + m0.to(tl.int64) * stride_om, STRIDE_ALIGN)
    o_ptrs = o_rows + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_dv[None, :]
    _store_tile(o_ptrs, _cast(out, out_ptr.dtype.element_ty, DOT_PRECISION), offs_m, q_len, offs_dv, HEAD_DV, BLOCK_DV)


# --------------------------------------------------------------------------------------
# backward: dQ (and delta)
# --------------------------------------------------------------------------------------


@triton.jit
def _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, offs_d, offs_dv,
                stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale,
                dropout_p, inv_keep, seed, rng_base, lo, hi,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
                IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """dq += dS K over key blocks [lo, hi), P recomputed from the saved lse (base 2)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    start = tl.cast(lo, tl.int64)
    k_ptrs = _aligned_ptr(k_base, start * stride_kn, STRIDE_ALIGN) + offs_n0[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = _aligned_ptr(v_base, start * stride_vn, STRIDE_ALIGN) + offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs, offs_n, k_len, offs_d, HEAD_D, BLOCK_D, BOUNDARY)
        v = _load_tile(v_ptrs, offs_n, k_len, offs_dv, HEAD_DV, BLOCK_DV, BOUNDARY)
        s = _mma(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        s = _mask_scores(s, offs_m[:, None], offs_n[None, :], q_len, k_len, mask_base, stride_mm,
                         stride_mn, BOUNDARY, BOUNDARY and IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _mma(do, tl.trans(v), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _mma(_cast(ds, k.dtype, DOT_PRECISION), k, dq, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, mask_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, q_len, k_len, group_size,
    scale, qk_scale, dropout_p, inv_keep, seed, rng_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """delta = rowsum(dO * O) and dQ for one block of BLOCK_M query rows."""
    m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid_m, h, b = _program_ids(m_blocks, num_heads)
    if IS_CAUSAL:
        pid_m = m_blocks - 1 - pid_m
    stride_qb, stride_qh, stride_qm = _align_strides(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align_strides(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align_strides(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_ob, stride_oh, stride_om = _align_strides(stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
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

    q_rows = _aligned_ptr(q_ptr, b64 * stride_qb + h64 * stride_qh + m064 * stride_qm, STRIDE_ALIGN)
    q = _load_tile(q_rows + rows[:, None] * stride_qm + offs_d[None, :], offs_m, q_len, offs_d,
                   HEAD_D, BLOCK_D, True)
    do_rows = _aligned_ptr(do_ptr, b64 * stride_dob + h64 * stride_doh + m064 * stride_dom, STRIDE_ALIGN)
    do = _load_tile(do_rows + rows[:, None] * stride_dom + offs_dv[None, :], offs_m, q_len, offs_dv,
                    HEAD_DV, BLOCK_DV, True)
    o_rows = _aligned_ptr(out_ptr, b64 * stride_ob + h64 * stride_oh + m064 * stride_om, STRIDE_ALIGN)
    o = _load_tile(o_rows + rows[:, None] * stride_om + offs_dv[None, :], offs_m, q_len, offs_dv,
                   HEAD_DV, BLOCK_DV, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_stats = (b64 * num_heads + h64) * q_len
    tl.store(delta_ptr + row_stats + offs_m, delta, mask=offs_m < q_len)
    lse = tl.load(lse_ptr + row_stats + offs_m, mask=offs_m < q_len, other=float("inf"))
    lse2 = lse * LOG2E

    k_base = _aligned_ptr(k_ptr, b64 * stride_kb + kvh64 * stride_kh, STRIDE_ALIGN)
    v_base = _aligned_ptr(v_ptr, b64 * stride_vb + kvh64 * stride_vh, STRIDE_ALIGN)
    mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
    rng_base = rng_offset + (b64 * num_heads + h64) * q_len * k_len
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _causal_key_range(m0, k_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, offs_d, offs_dv,
                     stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale,
                     dropout_p, inv_keep, seed, rng_base, 0, full_end,
                     HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, IS_CAUSAL, MASK_KIND,
                     MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)
    dq = _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, offs_d, offs_dv,
                     stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale,
                     dropout_p, inv_keep, seed, rng_base, full_end, hi,
                     HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, IS_CAUSAL, MASK_KIND,
                     MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)
    dq_rows = _aligned_ptr(dq_ptr, b64 * stride_dqb + h64 * stride_dqh + m064 * stride_dqm, STRIDE_ALIGN)
    dq_ptrs = dq_rows + rows[:, None] * stride_dqm + offs_d[None, :]
    _store_tile(dq_ptrs, _cast(dq * scale, dq_ptr.dtype.element_ty, DOT_PRECISION), offs_m, q_len, offs_d, HEAD_D,
                BLOCK_D)


# --------------------------------------------------------------------------------------
# backward: dK, dV
# --------------------------------------------------------------------------------------


@triton.jit
def _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
                 offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
                 q_len, k_len, qk_scale, dropout_p, inv_keep, seed, rng_base, lo, hi,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_TILE: tl.constexpr,
                 CHECK_ROWS: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q over query blocks [lo, hi), in the [key, query] layout.

    Keys past Sk are not masked here: their rows of dk / dv are never stored and the
    products reduce over queries only, so they cannot reach a stored element.
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
        if CHECK_ROWS:
            lse = tl.load(lse_base + offs_m, mask=offs_m < q_len, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = _mma(k, tl.trans(q), None, DOT_PRECISION) * qk_scale
        s_t = _mask_scores(s_t, offs_m[None, :], offs_n[:, None], q_len, k_len, mask_base,
                           stride_mm, stride_mn, False, CAUSAL_TILE, MASK_KIND, MASK_ROW_BCAST)
        p_t = tl.math.exp2(s_t - (lse * LOG2E)[None, :])
        dp_t = _mma(v, tl.trans(do), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[None, :], offs_n[:, None], k_len, dropout_p)
            pd_t = tl.where(keep, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
        else:
            pd_t = p_t
        dv = _mma(_cast(pd_t, do.dtype, DOT_PRECISION), do, dv, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(_cast(ds_t, q.dtype, DOT_PRECISION), q, dk, DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, q_len, k_len, group_size,
    scale, qk_scale, dropout_p, inv_keep, seed, rng_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one K/V head, summed over the heads of its query group."""
    pid_n, kvh, b = _program_ids(tl.cdiv(k_len, BLOCK_N), num_heads // group_size)
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

    k_rows = _aligned_ptr(k_ptr, b64 * stride_kb + kvh64 * stride_kh + n064 * stride_kn, STRIDE_ALIGN)
    k = _load_tile(k_rows + cols[:, None] * stride_kn + offs_d[None, :], offs_n, k_len, offs_d,
                   HEAD_D, BLOCK_D, True)
    v_rows = _aligned_ptr(v_ptr, b64 * stride_vb + kvh64 * stride_vh + n064 * stride_vn, STRIDE_ALIGN)
    v = _load_tile(v_rows + cols[:, None] * stride_vn + offs_dv[None, :], offs_n, k_len, offs_dv,
                   HEAD_DV, BLOCK_DV, True)

    # causal: query rows before n0 see none of these keys; one loop with the causal and
    # row masks applied throughout (three separately pipelined loops cost more registers
    # than the masks cost time)
    if IS_CAUSAL:
        m_lo = (n0 // BLOCK_M) * BLOCK_M
    else:
        m_lo = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, group_size):
        h64 = kvh64 * group_size + g
        row_stats = (b64 * num_heads + h64) * q_len
        dk, dv = _dkdv_q_loop(
            dk, dv, k, v, _aligned_ptr(q_ptr, b64 * stride_qb + h64 * stride_qh, STRIDE_ALIGN),
            _aligned_ptr(do_ptr, b64 * stride_dob + h64 * stride_doh, STRIDE_ALIGN),
            lse_ptr + row_stats, delta_ptr + row_stats, mask_ptr + b64 * stride_mb + h64 * stride_mh,
            offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
            q_len, k_len, qk_scale, dropout_p, inv_keep, seed, rng_offset + row_stats * k_len, m_lo, q_len,
            HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_M, IS_CAUSAL, True, MASK_KIND,
            MASK_ROW_BCAST, HAS_DROPOUT, DOT_PRECISION, STRIDE_ALIGN)

    dk_rows = _aligned_ptr(dk_ptr, b64 * stride_dkb + kvh64 * stride_dkh + n064 * stride_dkn, STRIDE_ALIGN)
    dk_ptrs = dk_rows + cols[:, None] * stride_dkn + offs_d[None, :]
    _store_tile(dk_ptrs, _cast(dk * scale, dk_ptr.dtype.element_ty, DOT_PRECISION), offs_n, k_len, offs_d, HEAD_D,
                BLOCK_D)
    dv_rows = _aligned_ptr(dv_ptr, b64 * stride_dvb + kvh64 * stride_dvh + n064 * stride_dvn, STRIDE_ALIGN)
    dv_ptrs = dv_rows + cols[:, None] * stride_dvn + offs_dv[None, :]
    _store_tile(dv_ptrs, _cast(dv, dv_ptr.dtype.element_ty, DOT_PRECISION), offs_n, k_len, offs_dv, HEAD_DV,
                BLOCK_DV)


# --------------------------------------------------------------------------------------
# launch configurations (fixed tables, no search)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel.

    ``block_m`` counts query rows and ``block_n`` keys: for the forward and dQ kernels
    a program owns ``block_m`` rows and steps through keys by ``block_n``; for the
    dK/dV kernel a program owns ``block_n`` keys and steps through rows by ``block_m``.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Configurations of the two backward kernels."""

    dq: TileConfig
    dkdv: TileConfig


def padded_head_dim(d: int) -> int:
    """The power-of-two tile width a head dim is padded to (at least 16, the MMA depth)."""
    return max(16, triton.next_power_of_2(d))


T = TileConfig


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Tiles of one (architecture, padded head dim): plain, and for masked / dropout calls
    (their extra index and mask tiles need registers)."""

    fwd: TileConfig
    fwd_heavy: TileConfig
    bwd: BackwardConfig
    bwd_heavy: BackwardConfig


# 16-bit inputs (rows are always 16-byte aligned, see _aligned_rows), by architecture
# (80: A100 class, 90: H100 class) and padded head dim. Chosen so that every kernel compiles with
# no register spills on Triton 3.6 and 3.9, for lengths divisible by 16 and not, with and
# without GQA (python -m llmkit.compile_report) while keeping tiles large: 128-row query
# tiles on 8 warps (two wgmma warpgroups on sm_90) where they fit. These are starting
# points until measured on the GPUs (bench/).
_TABLE_16BIT: dict[int, dict[int, _Entry]] = {
    90: {
        64: _Entry(T(128, 128, 8, 3), T(128, 64, 8, 3),
                   BackwardConfig(T(128, 64, 8, 3), T(32, 128, 8, 3)),
                   BackwardConfig(T(128, 32, 8, 3), T(32, 128, 8, 3))),
        128: _Entry(T(128, 128, 8, 2), T(64, 32, 8, 3),
                    BackwardConfig(T(128, 64, 8, 2), T(32, 128, 8, 2)),
                    BackwardConfig(T(128, 32, 8, 3), T(16, 64, 8, 3))),
        256: _Entry(T(64, 32, 8, 2), T(64, 16, 8, 2),
                    BackwardConfig(T(64, 16, 8, 2), T(32, 32, 8, 2)),
                    BackwardConfig(T(32, 16, 8, 2), T(16, 32, 8, 2))),
    },
    80: {
        64: _Entry(T(128, 64, 8, 3), T(64, 64, 8, 3),
                   BackwardConfig(T(128, 64, 8, 2), T(16, 128, 8, 2)),
                   BackwardConfig(T(64, 32, 8, 3), T(16, 64, 4, 3))),
        128: _Entry(T(128, 32, 8, 3), T(64, 32, 8, 3),
                    BackwardConfig(T(64, 64, 8, 2), T(32, 64, 8, 2)),
                    BackwardConfig(T(64, 32, 8, 3), T(16, 64, 8, 2))),
        256: _Entry(T(64, 32, 8, 2), T(32, 16, 8, 2),
                    BackwardConfig(T(64, 32, 8, 2), T(32, 32, 8, 2)),
                    BackwardConfig(T(32, 32, 8, 2), T(16, 32, 8, 2))),
    },
}
# float32 inputs (head dims up to 128): exact fp32 products (input_precision="ieee", FMA,
# no tensor cores), small single-stage tiles; the software pipeline's buffers for fp32
# operand tiles do not fit in registers.
_TABLE_FP32: dict[int, _Entry] = {
    64: _Entry(T(16, 32, 4, 1), T(16, 16, 4, 1),
               BackwardConfig(T(32, 16, 4, 1), T(16, 32, 4, 1)),
               BackwardConfig(T(32, 16, 4, 1), T(16, 16, 2, 1))),
    128: _Entry(T(16, 16, 8, 1), T(16, 16, 8, 1),
                BackwardConfig(T(16, 16, 8, 1), T(16, 16, 4, 1)),
                BackwardConfig(T(16, 16, 8, 1), T(16, 16, 8, 1))),
}
FP32_MAX_HEAD_DIM = 128
# The Triton interpreter (CPU tensors): small tiles so that tests cover many blocks.
INTERPRETER_FWD = TileConfig(16, 16, 4, 1)
INTERPRETER_BWD = BackwardConfig(TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1))


def device_arch(device: torch.device) -> int | None:
    """Compute capability as an int (80, 86, 90, ...) that launches on ``device`` plan for;
    None for the interpreter (see :func:`~llmkit.kernels._launch.device_target`)."""
    target = device_target(device)
    return target.arch if target is not None else None


def _smem_limit(arch: int) -> int:
    """Shared memory per block (bytes) an architecture allows with opt-in."""
    return {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024}.get(arch, 99 * 1024)


def _fit_smem(cfg: TileConfig, resident_rows: int, streamed_rows: int, row_bytes: int, limit: int) -> TileConfig:
    """Drop pipeline stages until a rough shared-memory estimate fits (architectures with
    less shared memory than the table's, e.g. sm_86 / sm_89 / sm_120)."""
    stages = cfg.num_stages
    while stages > 1 and (resident_rows + stages * streamed_rows) * row_bytes > limit:
        stages -= 1
    return dataclasses.replace(cfg, num_stages=stages)


def _entry(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int) -> _Entry:
    bd = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v), 64)
    if dtype == torch.float32:
        if bd > FP32_MAX_HEAD_DIM:
            raise ValueError(f"float32 attention kernels take head dims up to {FP32_MAX_HEAD_DIM}, got {bd}")
        return _TABLE_FP32[bd]
    return _TABLE_16BIT[90 if arch >= 90 else 80][bd]


def forward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int | None, *,
                   masked: bool = False, dropout: bool = False) -> TileConfig:
    """Forward tiles for a head dim, dtype, architecture (None: the interpreter) and whether
    the call has a mask or dropout. A table lookup."""
    if arch is None:
        return INTERPRETER_FWD
    e = _entry(head_dim, head_dim_v, dtype, arch)
    cfg = e.fwd_heavy if masked or dropout else e.fwd
    if arch not in (80, 87, 90):
        row_bytes = 2 * padded_head_dim(max(head_dim, head_dim_v)) * dtype.itemsize
        cfg = _fit_smem(cfg, cfg.block_m // 2, cfg.block_n, row_bytes, _smem_limit(arch))
    return cfg


def backward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int | None, *,
                    masked: bool = False, dropout: bool = False) -> BackwardConfig:
    """Backward tiles (dQ kernel, dK/dV kernel); see :func:`forward_config`."""
    if arch is None:
        return INTERPRETER_BWD
    e = _entry(head_dim, head_dim_v, dtype, arch)
    cfg = e.bwd_heavy if masked or dropout else e.bwd
    if arch not in (80, 87, 90):
        row_bytes = 2 * padded_head_dim(max(head_dim, head_dim_v)) * dtype.itemsize
        limit = _smem_limit(arch)
        cfg = BackwardConfig(_fit_smem(cfg.dq, cfg.dq.block_m, cfg.dq.block_n, row_bytes, limit),
                             _fit_smem(cfg.dkdv, cfg.dkdv.block_n, cfg.dkdv.block_m, row_bytes, limit))
    return cfg


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """The ``DOT_PRECISION`` of :func:`_mma` for inputs of ``dtype`` on ``device``."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and device.type == "cpu":  # the interpreter
        return "upcast"
    return "tf32"


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers hand to a kernel (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def rows_aligned(t: torch.Tensor) -> bool:
    """Every row starts 16-byte aligned: aligned data pointer, unit last stride, and the
    other strides (of dims longer than 1) multiples of 16 bytes."""
    elems = 16 // t.element_size()
    return (
        t.data_ptr() % 16 == 0
        and (t.stride(-1) == 1 or t.shape[-1] <= 1)
        and all(size <= 1 or st % elems == 0 for size, st in zip(t.shape[:-1], t.stride()[:-1]))
    )


def stride_align(*tensors: torch.Tensor) -> int:
    """``STRIDE_ALIGN`` for the kernels: elements per 16 bytes when every row of every tensor
    is 16-byte aligned (:func:`rows_aligned`), else 1. With it the kernels load rows as
    16-byte vectors and pipeline them with cp.async."""
    if all(rows_aligned(t) for t in tensors):
        return 16 // tensors[0].element_size()
    return 1


def _padded_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new tensor of ``shape`` whose rows start 16-byte aligned: the first ``shape[-1]``
    columns of one whose last dim is rounded up to 16 bytes (itself when no padding)."""
    elems = 16 // dtype.itemsize
    width = -(-shape[-1] // elems) * elems
    return _empty((*shape[:-1], width), dtype, device)[..., : shape[-1]]


def _empty_in_order(shape: tuple[int, ...], order: list[int], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """A new tensor of ``shape`` whose memory holds its dims in ``order`` (outermost first)."""
    buf = _empty(tuple(shape[d] for d in order), dtype, device)
    return buf.permute([order.index(d) for d in range(len(order))])


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are 16-byte aligned, else a copy whose rows are.

    The attention kernels keep whole K/V (or Q/dO) tiles in flight, and with unaligned
    rows every element needs its own 64-bit address, which does not fit in registers at
    useful tile sizes; an O(S * D) copy in that rare case (odd head dims, odd offsets,
    a non-unit last stride) is cheap next to the O(S^2 * D) attention.
    """
    return t if rows_aligned(t) else _padded_empty(tuple(t.shape), t.dtype, t.device).copy_(t)


@dataclasses.dataclass
class MaskArgs:
    """The attention mask as the kernels read it: a pointer, a kind and 4 strides.

    The mask is broadcast (without a copy) to (B, Hq, Sq, Sk); broadcast dims get
    stride 0. ``row_bcast``: every query row reads the same mask row (e.g. a
    (B, 1, 1, Sk) key-padding mask), loaded as one vector per key block.
    """

    tensor: torch.Tensor
    kind: int
    row_bcast: bool
    strides: tuple[int, int, int, int]

    @staticmethod
    def of(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int], dummy: torch.Tensor) -> "MaskArgs":
        if attn_mask is None:
            return MaskArgs(dummy, MASK_NONE, False, (0, 0, 0, 0))
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(shape)
        kind = MASK_FLOAT
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)
            kind = MASK_BOOL
        strides = tuple(int(s) for s in m.stride())
        return MaskArgs(m, kind, strides[2] == 0 or shape[2] == 1, strides)  # type: ignore[arg-type]


def _common_constexprs(d: int, dv: int, is_causal: bool, mask: MaskArgs, has_dropout: bool,
                       q: torch.Tensor) -> dict:
    return dict(STRIDE_ALIGN=16 // q.element_size(),  # the launchers give the kernels aligned rows
        HEAD_D=d, HEAD_DV=dv, BLOCK_D=padded_head_dim(d), BLOCK_DV=padded_head_dim(dv),
        IS_CAUSAL=bool(is_causal), MASK_KIND=mask.kind, MASK_ROW_BCAST=mask.row_bcast,
        HAS_DROPOUT=has_dropout, DOT_PRECISION=_dot_precision(q.dtype, q.device),
    )


def _dropout_args(dropout_p: float) -> tuple[float, float]:
    return float(dropout_p), (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)


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

    Returns:
        ``out (B, Hq, Sq, Dv)`` in the query's dtype (laid out per ``out_order``, or
        contiguous when that layout's rows would not be aligned) and ``lse (B, Hq, Sq)``
        float32 (natural log; ``+inf`` on rows with no visible key, whose ``out`` is 0).
    """
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[3]
    out = _empty((b, hq, sq, dv), query.dtype, query.device)
    lse = _empty((b, hq, sq), torch.float32, query.device)
    if lse.numel() == 0:
        return out, lse
    if sk == 0:
        return out.zero_(), lse.fill_(float("inf"))
    q, k, v = (_aligned_rows(t) for t in (query, key, value))
    o = _empty_in_order((b, hq, sq, dv), out_order or [0, 1, 2, 3], query.dtype, query.device)
    if not rows_aligned(o):
        o = _padded_empty((b, hq, sq, dv), query.dtype, query.device)
    mask = MaskArgs.of(attn_mask, (b, hq, sq, sk), q)
    p, inv_keep = _dropout_args(dropout_p)
    cfg = config or forward_config(d, dv, query.dtype, device_arch(query.device),
                                   masked=mask.kind != MASK_NONE, dropout=p > 0.0)
    launch(
        _attn_fwd_kernel, (triton.cdiv(sq, cfg.block_m) * hq * b,),
        q, k, v, o, lse, mask.tensor,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *mask.strides,
        hq, sq, sk, hq // hkv,
        scale * 1.4426950408889634, p, inv_keep, int(seed), int(offset),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        **_common_constexprs(d, dv, is_causal, mask, p > 0.0, q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (o if rows_aligned(o) else o.contiguous()), lse


def attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: int,
    offset: int,
    config: BackwardConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward: ``dq, dk, dv`` (contiguous, in the inputs' dtype).

    ``out`` and ``lse`` are the forward's outputs (from any backend: the probabilities
    are recomputed from ``lse``); ``grad_out`` is ``(B, Hq, Sq, Dv)`` with any strides.
    The mask is not differentiated (a float mask that needs a gradient goes to the
    reference backend). Two launches: dQ (which also writes ``delta = rowsum(dO * O)``),
    then dK/dV.
    """
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[3]
    if b * hq * sq == 0 or sk == 0:  # nothing attends: every gradient is zero
        return tuple(_empty(tuple(t.shape), t.dtype, t.device).zero_() for t in (query, key, value))
    dq, dk, dvv = (_padded_empty(tuple(t.shape), t.dtype, t.device) for t in (query, key, value))
    q, k, v, o, do = (_aligned_rows(t) for t in (query, key, value, out, grad_out))
    lse = lse.to(torch.float32).contiguous()
    delta = _empty(tuple(lse.shape), torch.float32, lse.device)
    mask = MaskArgs.of(attn_mask, (b, hq, sq, sk), q)
    p, inv_keep = _dropout_args(dropout_p)
    cfg = config or backward_config(d, dv, query.dtype, device_arch(query.device),
                                    masked=mask.kind != MASK_NONE, dropout=p > 0.0)
    consts = _common_constexprs(d, dv, is_causal, mask, p > 0.0, q)
    scalars = (hq, sq, sk, hq // hkv, scale, scale * 1.4426950408889634, p, inv_keep, int(seed), int(offset))
    launch(
        _attn_bwd_dq_kernel, (triton.cdiv(sq, cfg.dq.block_m) * hq * b,),
        q, k, v, o, do, lse, delta, dq, mask.tensor,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3], *mask.strides, *scalars,
        BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, **consts,
        num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages,
    )
    launch(
        _attn_bwd_dkdv_kernel, (triton.cdiv(sk, cfg.dkdv.block_n) * hkv * b,),
        q, k, v, do, lse, delta, dk, dvv, mask.tensor,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], *dvv.stride()[:3], *mask.strides, *scalars,
        BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, **consts,
        num_warps=cfg.dkdv.num_warps, num_stages=cfg.dkdv.num_stages,
    )
    return dq.contiguous(), dk.contiguous(), dvv.contiguous()


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
                    sk: int = 1024) -> Callable[[], object]:
    """The launcher call of one compile spec: contiguous (B, H, S, D) meta tensors."""
    def call():
        q, k, v = meta(b, hq, sq, d, dtype=dtype), meta(b, hkv, sk, d, dtype=dtype), meta(b, hkv, sk, d, dtype=dtype)
        mask = None
        if mask_kind == MASK_BOOL:
            mask = meta(b, 1, sq, sk, dtype=torch.bool)
        elif mask_kind == MASK_FLOAT:
            mask = meta(b, 1, 1 if row_bcast else sq, sk, dtype=torch.float32)
        p, seed = (0.1, SPEC_SEED) if dropout else (0.0, 0)
        if not backward:
            return attention_forward(q, k, v, mask, p, causal, d ** -0.5, seed, 0)
        o, do, lse = meta(b, hq, sq, d, dtype=dtype), meta(b, hq, sq, d, dtype=dtype), meta(b, hq, sq, dtype=torch.float32)
        return attention_backward(do, q, k, v, o, lse, mask, p, causal, d ** -0.5, seed, 0)
    return call


def compile_specs() -> list[CompileSpec]:
    """Forward, dQ and dK/dV kernels as launched for (2, 16, 1024, D) inputs: every entry of
    the tile tables (architecture x padded head dim x plain / "heavy") at least once.

    bfloat16 for every padded head-dim class (64, 128 and the padded 80 / 96 / 160 / 256),
    causal and not; float16 at D = 128; the bool-mask, float key-padding-vector and dropout
    variants (which take the tables' smaller "heavy" tiles); float32 (exact fp32 products on
    FMA units) at D = 64 and 128, plain and heavy. The causal, masked and float32 cases are
    also compiled as "ragged_gqa": 1000 tokens (no length divisible by 16) with 32 query
    heads on 8 K/V heads, which Triton specializes less (a real launch of such a shape
    compiles its own kernel, usually with more registers).
    """
    specs: list[CompileSpec] = []
    ragged = dict(hq=32, hkv=8, sq=1000, sk=1000)
    plain = [(torch.bfloat16, d, c, MASK_NONE, False, False) for d in (64, 128, 80, 96, 160, 256) for c in (False, True)]
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
    cases = [c + ({},) for c in plain if c not in both] + [c + ({},) for c in both] + [c + (ragged,) for c in both]
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
        specs.append(CompileSpec(f"bwd_dq_{tag}", _attn_bwd_dq_kernel, bwd, matrix=dtype != torch.float32))
        specs.append(CompileSpec(f"bwd_dkdv_{tag}", _attn_bwd_dkdv_kernel, bwd, matrix=dtype != torch.float32))
    return specs
