"""Triton flash-decoding: attention of a few new tokens against a KV cache.

``query (B, Hq, T, D)`` holds the ``T`` (1..16) newest tokens of each sequence;
``key_cache (B, Hkv, S_max, D)`` / ``value_cache (B, Hkv, S_max, Dv)`` hold ``L_b``
valid positions per sequence (``cache_seqlens``, the new tokens included, at
positions ``L_b - T .. L_b - 1``). With ``is_causal`` token ``t`` sees keys
``j < L_b - T + t + 1`` (bottom-right alignment), else all ``j < L_b``.

Kernels:

* ``_decode_split_kernel`` [KV splits, Hkv x row blocks, B], all on grid axis x (fastest
  first; ``B x Hkv`` may pass the 65,535 limit of axes y and z): the cache length is cut
  into splits so that a small batch still fills the GPU (flash-decoding). One program
  reads one split of one K/V head once and serves every query head of its GQA group
  and every new token: its rows are the ``G * T`` (query head, token) pairs, so K/V are
  not re-read per query head. It writes a normalised partial output with its row maximum
  (base 2) and sum per split (float32, kept apart: their float32 log-sum-exp loses the sum
  at large scores), or, with a single split, the final output and lse.
* ``_decode_combine_kernel`` [B * Hq * T / 16]: merges the splits of 16 rows, each weighted by
  its sum times 2 ** (its maximum - the largest). Rows that see no key are zeros.

Split counts come from :func:`decode_config` (multiprocessor count, batch, heads and the
cache capacity, never the lengths, so there is no device-to-host sync).
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
from .attention import (
    _TRITON_DTYPE,
    _align_strides,
    _aligned_ptr,
    _cast,
    _dot_precision,
    _load_tile,
    _mma,
    _online_softmax,
    _program_ids,
    _store_tile,
    meta,
    padded_head_dim,
    stride_align,
)

MAX_ROWS_PER_PROGRAM = 64
MAX_SPLITS = 128
COMBINE_ROWS = 16


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, table_ptr, batch_idx_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_ot,
    stride_table, block_size,
    num_heads, q_len, group_size, row_blocks, split_size, num_splits, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
):
    """One split of the cache of one K/V head against BLOCK_M (query head, token) rows.

    Contiguous caches: ``stride_k*`` are (batch, head, position) strides, the batch row
    ``batch_idx[b]`` with HAS_BATCH_IDX. PAGED: (block, head, slot) strides of a
    ``(num_blocks, block_size, Hkv, D)`` cache; position ``j`` of sequence ``b`` lies in slot
    ``j % block_size`` of block ``table[b, j // block_size]``, looked up per key (any block size).
    """
    split, head_rows, b = _program_ids(num_splits, (num_heads // group_size) * row_blocks)
    kvh = head_rows // row_blocks
    row_block = head_rows % row_blocks
    stride_qb, stride_qh, stride_qt = _align_strides(stride_qb, stride_qh, stride_qt, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align_strides(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align_strides(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_ob, stride_oh, stride_ot = _align_strides(stride_ob, stride_oh, stride_ot, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    n_rows = group_size * q_len
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    head = kvh * group_size + rows // q_len  # query head of each row
    tok = rows % q_len  # new token of each row
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = _aligned_ptr(q_ptr, b64 * stride_qb, STRIDE_ALIGN) + head[:, None].to(tl.int64) * stride_qh \
        + tok[:, None] * stride_qt + offs_d[None, :]
    q = _load_tile(q_ptrs, rows, n_rows, offs_d, HEAD_D, BLOCK_D, True)

    length = tl.load(seqlens_ptr + b).to(tl.int32)
    if IS_CAUSAL:
        row_limit = length - q_len + tok + 1  # keys j < row_limit are visible
    else:
        row_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + length
    lo = split * split_size
    hi = tl.minimum(lo + split_size, length)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    if PAGED:
        k_head = _aligned_ptr(k_ptr, kvh64 * stride_kh, STRIDE_ALIGN) + offs_d[None, :]
        v_head = _aligned_ptr(v_ptr, kvh64 * stride_vh, STRIDE_ALIGN) + offs_dv[None, :]
        table_row = table_ptr + b64 * stride_table
    else:
        if HAS_BATCH_IDX:
            cache_b = tl.load(batch_idx_ptr + b).to(tl.int64)
        else:
            cache_b = b64
        start = tl.cast(lo, tl.int64)
        k_ptrs = _aligned_ptr(k_ptr, cache_b * stride_kb + kvh64 * stride_kh + start * stride_kn, STRIDE_ALIGN) \
            + offs_n0[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = _aligned_ptr(v_ptr, cache_b * stride_vb + kvh64 * stride_vh + start * stride_vn, STRIDE_ALIGN) \
            + offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if PAGED:
            # the block of each key (keys past hi read block 0, masked below), then its slot
            blk = tl.load(table_row + offs_n // block_size, mask=offs_n < hi, other=0).to(tl.int64)
            slot = (offs_n % block_size).to(tl.int64)
            k = _load_tile(k_head + (blk * stride_kb + slot * stride_kn)[:, None], offs_n, hi, offs_d, HEAD_D,
                           BLOCK_D, True)
            v = _load_tile(v_head + (blk * stride_vb + slot * stride_vn)[:, None], offs_n, hi, offs_dv, HEAD_DV,
                           BLOCK_DV, True)
        else:
            k = _load_tile(k_ptrs, offs_n, hi, offs_d, HEAD_D, BLOCK_D, True)
            v = _load_tile(v_ptrs, offs_n, hi, offs_dv, HEAD_DV, BLOCK_DV, True)
        s = _mma(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        s = tl.where((offs_n[None, :] < hi) & (offs_n[None, :] < row_limit[:, None]), s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None]
        acc = _mma(_cast(p, v.dtype, DOT_PRECISION), v, acc, DOT_PRECISION)
        if not PAGED:
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    # a row that sees no key at all is zeros (the op's convention), even where a value it does
    # not see, read for the other rows of the tile, holds NaN / inf (p = 0 times it)
    out = tl.where((row_limit > 0)[:, None], acc * (1.0 / l_safe)[:, None], 0.0)
    if SINGLE_SPLIT:
        o_ptrs = _aligned_ptr(out_ptr, b64 * stride_ob, STRIDE_ALIGN) + head[:, None].to(tl.int64) * stride_oh \
            + tok[:, None] * stride_ot + offs_dv[None, :]
        _store_tile(o_ptrs, _cast(out, out_ptr.dtype.element_ty, DOT_PRECISION), rows, n_rows, offs_dv, HEAD_DV,
                    BLOCK_DV)
        # natural-log lse, (B, Hq, T) float32; +inf on rows that see no key
        lse = tl.where(dead, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_ptr + (b64 * num_heads + head) * q_len + tok, lse, mask=rows < n_rows)
    else:
        # partials are (B, Hq, T, splits[, Dv]) float32, and per split the row maximum (base 2,
        # -inf when empty) and sum apart: m + log2(l) in float32 drops log2(l) once |m| passes
        # ~2**24 * log2(l) (scores of 4e8), and every split would weigh alike
        part_row = ((b64 * num_heads + head) * q_len + tok) * num_splits + split
        stats = part_lse_ptr + 2 * part_row
        tl.store(stats, tl.where(dead, float("-inf"), m_i), mask=rows < n_rows)
        tl.store(stats + 1, l_i, mask=rows < n_rows)
        po_ptrs = part_out_ptr + part_row[:, None] * HEAD_DV + offs_dv[None, :]
        _store_tile(po_ptrs, out, rows, n_rows, offs_dv, HEAD_DV, BLOCK_DV)


@triton.jit
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    stride_ob, stride_oh, stride_ot,
    n_rows, num_heads, q_len, num_splits,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[row] = sum_s w_s o_s / sum_s w_s, w_s = l_s 2^(m_s - max m), for BLOCK_R rows.

    Rows are ``(b * Hq + h) * T + t``; the splits are merged one by one with a running
    maximum, so any number of splits fits in registers.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for split in range(0, num_splits):
        part = rows64 * num_splits + split
        m_s = tl.load(part_lse_ptr + 2 * part, mask=rows < n_rows, other=float("-inf"))
        l_s = tl.load(part_lse_ptr + 2 * part + 1, mask=rows < n_rows, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        w = l_s * tl.math.exp2(m_s - m_use)  # an empty split (m = -inf, l = 0) weighs 0
        o = _load_tile(part_out_ptr + part[:, None] * HEAD_DV + offs_dv[None, :], rows, n_rows,
                       offs_dv, HEAD_DV, BLOCK_DV, True)
        acc = acc * alpha[:, None] + o * w[:, None]
        total = total * alpha + w
        m = m_new
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = acc * (1.0 / total_safe)[:, None]
    lse = tl.where(total == 0.0, float("inf"), (m + tl.math.log2(total_safe)) * 0.6931471805599453)
    tl.store(lse_ptr + rows64, lse, mask=rows < n_rows)  # (B, Hq, T) float32 is rows in order
    tok = rows64 % q_len
    bh = rows64 // q_len
    dst = out_ptr + (bh // num_heads) * stride_ob + (bh % num_heads) * stride_oh + tok * stride_ot
    _store_tile(dst[:, None] + offs_dv[None, :], _cast(out, out_ptr.dtype.element_ty, DOT_PRECISION), rows, n_rows,
                offs_dv, HEAD_DV, BLOCK_DV)


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Rows (query head, token) per program, keys per step, and the split of the cache."""

    block_m: int
    block_n: int
    num_splits: int
    split_size: int
    num_warps: int
    num_stages: int


def _rows_block(n_rows: int, padded_dim: int) -> int:
    """(query head, token) rows per program: all of a GQA group where they fit (16..64)."""
    cap = MAX_ROWS_PER_PROGRAM if padded_dim <= 128 else MAX_ROWS_PER_PROGRAM // 2
    return min(max(16, triton.next_power_of_2(n_rows)), cap)


def decode_config(
    batch: int, kv_heads: int, n_rows: int, s_max: int, head_dim: int, head_dim_v: int,
    dtype: torch.dtype, arch: int | None, num_sms: int, aligned: bool = True,
    block_n: int | None = None, num_splits: int | None = None, paged: bool = False,
) -> DecodeConfig:
    """Tiles and split count for a decode call.

    ``n_rows = G * T`` rows per K/V head. The cache length ``s_max`` is cut into about
    as many splits as it takes for ``batch * kv_heads * row_blocks * splits`` programs
    to cover every multiprocessor about four times, each split a whole number of key
    blocks. Caches whose rows are not 16-byte aligned (read element by element) get
    smaller key blocks. ``block_n`` / ``num_splits`` override the choice (tests).
    """
    bd = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    block_m = _rows_block(n_rows, bd)
    if block_n is None:
        if arch is None:
            block_n = 16
        elif not aligned:
            block_n = 16
        elif dtype == torch.float32:
            block_n = 32 if bd <= 128 else 16
        else:
            block_n = 64 if bd <= 128 else 32
    n_blocks = max(1, triton.cdiv(s_max, block_n))
    if num_splits is None:
        programs = batch * kv_heads * triton.cdiv(n_rows, block_m)
        num_splits = min(n_blocks, MAX_SPLITS, max(1, triton.cdiv(4 * num_sms, max(programs, 1))))
    num_splits = max(1, min(num_splits, n_blocks))
    split_size = triton.cdiv(n_blocks, num_splits) * block_n
    num_splits = triton.cdiv(max(s_max, 1), split_size)
    if arch is None:
        warps, stages = 4, 1
    else:
        # many packed rows x a wide head: 8 warps; float32 too (FMA products: on 4 warps
        # Triton 3.6 spills hundreds of bytes on sm_90)
        warps = 8 if block_m * bd >= 64 * 128 or dtype == torch.float32 else 4
        stages = 4 if arch >= 90 and bd <= 128 else 3 if bd <= 128 else 2
        if arch < 90 and block_m == 64 and bd == 64 and warps == 4:
            stages = 2  # sm_80, 64 rows x D 64 on 4 warps: 3 stages spilled 8 bytes (Triton 3.9)
        if paged and dtype == torch.float32:
            # gathered float32 rows are not staged through shared memory: a deeper pipeline
            # only holds more of them in registers (sm_90 spilled 8 bytes at 4 stages)
            stages = 2
    return DecodeConfig(block_m, block_n, num_splits, split_size, warps, stages)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher hands to a kernel (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


INTERPRETER_NUM_SMS = 4
"""Multiprocessors assumed under the interpreter (small, so that tests split the cache)."""


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    is_causal: bool,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding forward.

    Args:
        query ``(B, Hq, T, D)``; key_cache ``(B_cache, Hkv, S_max, D)`` / value_cache
            ``(B_cache, Hkv, S_max, Dv)``, or with ``block_table`` paged
            ``(num_blocks, block_size, Hkv, D[v])``: float16 / bfloat16 / float32 with the last
            dim contiguous (copied otherwise), ``Hq`` a multiple of ``Hkv``, ``D, Dv <= 256``.
        cache_seqlens: int32 / int64 ``(B,)`` valid lengths in ``[0, capacity]``; block_table
            int32 ``(B, max_blocks)`` whose used entries index the cache; cache_batch_idx
            ``(B,)`` rows of a contiguous cache (all validated by the caller).
        block_n, num_splits: override the configuration (tests).

    Returns:
        ``(B, Hq, T, Dv)`` contiguous, in the query's dtype (rows with no visible key are 0),
        and the natural-log ``lse (B, Hq, T)`` float32 (``+inf`` on such rows).
    """
    b, hq, t, d = query.shape
    is_paged = block_table is not None
    if is_paged:
        assert block_table is not None
        hkv, s_max, dv = key_cache.shape[2], block_table.shape[1] * key_cache.shape[1], value_cache.shape[3]
    else:
        hkv, s_max, dv = key_cache.shape[1], key_cache.shape[2], value_cache.shape[3]
    out = _empty((b, hq, t, dv), query.dtype, query.device)
    lse = _empty((b, hq, t), torch.float32, query.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    if s_max == 0:
        return out.zero_(), lse.fill_(float("inf"))
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous() for x in (query, key_cache, value_cache))
    group = hq // hkv
    n_rows = group * t
    target = device_target(query.device)
    arch, sms = (target.arch, target.sms) if target is not None else (None, INTERPRETER_NUM_SMS)
    align = stride_align(q, k, v, out)
    cfg = decode_config(b, hkv, n_rows, s_max, d, dv, query.dtype, arch, sms, align > 1, block_n, num_splits,
                        paged=is_paged)
    row_blocks = triton.cdiv(n_rows, cfg.block_m)
    single = cfg.num_splits == 1
    if single:
        part_out = part_lse = out  # unused
    else:
        part_out = _empty((b, hq, t, cfg.num_splits, dv), torch.float32, query.device)
        part_lse = _empty((b, hq, t, cfg.num_splits, 2), torch.float32, query.device)  # (max, sum)
    seqlens = cache_seqlens.contiguous()
    if is_paged:
        assert block_table is not None
        # (block, head, slot) strides of the paged caches
        k_strides = (k.stride(0), k.stride(2), k.stride(1))
        v_strides = (v.stride(0), v.stride(2), v.stride(1))
        table, table_stride, block_size = block_table, block_table.stride(0), key_cache.shape[1]
    else:
        k_strides, v_strides = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
        table, table_stride, block_size = seqlens, 0, 1  # unused
    batch_idx = seqlens if cache_batch_idx is None else cache_batch_idx.contiguous()
    launch(
        _decode_split_kernel, (cfg.num_splits * hkv * row_blocks * b,),
        q, k, v, seqlens, table, batch_idx, out, lse, part_out, part_lse,
        *q.stride()[:3], *k_strides, *v_strides, *out.stride()[:3], table_stride, block_size,
        hq, t, group, row_blocks, cfg.split_size, cfg.num_splits, scale * 1.4426950408889634,
        HEAD_D=d, HEAD_DV=dv, BLOCK_D=padded_head_dim(d), BLOCK_DV=padded_head_dim(dv),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=bool(is_causal), SINGLE_SPLIT=single,
        DOT_PRECISION=_dot_precision(query.dtype, query.device), STRIDE_ALIGN=align,
        PAGED=is_paged, HAS_BATCH_IDX=cache_batch_idx is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not single:
        n_out_rows = b * hq * t
        launch(
            _decode_combine_kernel, (triton.cdiv(n_out_rows, COMBINE_ROWS),),
            part_out, part_lse, out, lse, *out.stride()[:3], n_out_rows, hq, t, cfg.num_splits,
            HEAD_DV=dv, BLOCK_DV=padded_head_dim(dv), BLOCK_R=COMBINE_ROWS,
            DOT_PRECISION=_dot_precision(query.dtype, query.device),
            num_warps=4, num_stages=2,
        )
    return out, lse


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------


def _decode_call(dtype: torch.dtype, d: int, n_rows: int, aligned: bool, b: int = 4, hkv: int = 8,
                 s_max: int = 4096, block_size: int | None = None, batch_idx: bool = False) -> Callable[[], object]:
    """The launcher call of one compile spec: ``n_rows`` = G x T (query heads per K/V head x new
    tokens) on a (B, Hkv, S_max, D) cache; an unaligned cache is a view at an odd element offset.
    ``block_size``: a paged (num_blocks, block_size, Hkv, D) pool of ``B * S_max`` positions with
    a (B, S_max / block_size) table instead; ``batch_idx``: rows of a twice larger cache."""
    t = 1 if n_rows <= 16 else 4
    group = max(1, n_rows // t)

    def call():
        q = meta(b, hkv * group, t, d, dtype=dtype)
        seqlens = meta(b, dtype=torch.int32)
        if block_size is not None:
            per_seq = triton.cdiv(s_max, block_size)
            k, v = (meta(b * per_seq, block_size, hkv, d, dtype=dtype) for _ in range(2))
            table = meta(b, per_seq, dtype=torch.int32)
            return decode_attention(q, k, v, seqlens, d ** -0.5, True, block_table=table)
        rows = 2 * b if batch_idx else b
        if aligned:
            k, v = meta(rows, hkv, s_max, d, dtype=dtype), meta(rows, hkv, s_max, d, dtype=dtype)
        else:
            k, v = (meta(rows * hkv * s_max * d + 1, dtype=dtype)[1:].view(rows, hkv, s_max, d) for _ in range(2))
        idx = meta(b, dtype=torch.int32) if batch_idx else None
        return decode_attention(q, k, v, seqlens, d ** -0.5, True, cache_batch_idx=idx)
    return call


def compile_specs() -> list[CompileSpec]:
    """Split and combine kernels as launched for a batch of 4 with 8 K/V heads and a 4096-token
    cache: bfloat16, causal, head dims 64 / 128 / 256 with 16 rows per program (T = 1, no GQA)
    and 64 rows (GQA groups of 16 times 4 new tokens); a cache whose rows are not 16-byte
    aligned; float32 at D = 128; the combine kernel per value head dim; and a batch of 128,
    for which the heuristics pick a single split (the kernel then writes the output itself),
    without and with GQA (groups of 4). Paged caches (``block_table``) at D = 64 / 128 / 256 with
    16 and 64 rows, blocks of 16 (a block size divisible by 16, as Triton specializes it) and of
    12, float32 and the single split; a contiguous cache read through ``cache_batch_idx``.
    """
    specs = []
    cases = [(torch.bfloat16, d, rows, True, 4) for d in (64, 128, 256) for rows in (1, 64)]
    cases += [(torch.bfloat16, 128, 8, False, 4), (torch.float32, 128, 4, True, 4)]
    cases += [(torch.bfloat16, 128, 1, True, 128), (torch.bfloat16, 128, 4, True, 128)]
    for dtype, d, n_rows, aligned, batch in cases:
        ty = _TRITON_DTYPE[dtype]
        rows = _rows_block(n_rows, padded_head_dim(d))
        call = _decode_call(dtype, d, n_rows, aligned, b=batch)
        tag = ("" if aligned else "_unaligned") + ("" if batch == 4 else f"_gqa{n_rows}_b{batch}")
        specs.append(CompileSpec(f"split_{ty}_d{d}_rows{rows}{tag}", _decode_split_kernel, call,
                                 matrix=dtype != torch.float32))
        if dtype == torch.bfloat16 and n_rows == 1 and aligned and batch == 4:
            specs.append(CompileSpec(f"combine_bf16_dv{d}", _decode_combine_kernel, call))
    paged = [(torch.bfloat16, d, rows, 16, 4) for d in (64, 128, 256) for rows in (1, 64)]
    paged += [(torch.bfloat16, 128, 1, 12, 4), (torch.bfloat16, 128, 64, 12, 4), (torch.float32, 128, 4, 16, 4),
              (torch.bfloat16, 128, 4, 16, 128)]
    for dtype, d, n_rows, bs, batch in paged:
        ty = _TRITON_DTYPE[dtype]
        rows = _rows_block(n_rows, padded_head_dim(d))
        tag = "" if batch == 4 else f"_gqa{n_rows}_b{batch}"
        specs.append(CompileSpec(f"split_paged{bs}_{ty}_d{d}_rows{rows}{tag}", _decode_split_kernel,
                                 _decode_call(dtype, d, n_rows, True, b=batch, block_size=bs),
                                 matrix=dtype != torch.float32))
    specs.append(CompileSpec("split_batch_idx_bf16_d128_rows16", _decode_split_kernel,
                             _decode_call(torch.bfloat16, 128, 1, True, batch_idx=True)))
    return specs
