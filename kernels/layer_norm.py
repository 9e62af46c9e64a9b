"""Triton LayerNorm, RMSNorm and fused residual-add + LayerNorm, forward and backward.

Every tensor is seen as ``M`` rows of ``N = prod(normalized_shape)`` elements. Inputs
may be strided: the normalized (trailing) dims must be packed with a unit last
stride, and the leading dims are addressed as ``outer * stride_outer + inner *
stride_inner`` with ``inner = row % inner_rows`` (see :func:`row_layout`), so a
slice, a ``(S, B, H)`` transpose of a ``(B, S, H)`` tensor and similar views are read
in place. Anything else is copied once, explicitly, in :func:`row_layout`. Outputs
are contiguous. Math is float32; statistics are float32 of shape ``(M,)``.

Kernels (one launch configuration per shape, from :func:`forward_config` /
:func:`backward_config`, no autotuning):

* ``_norm_fwd_kernel``: ``BLOCK_M`` whole rows per program held in registers
  (``N <= BLOCK_N``). LayerNorm centres on a pivot (the row's first element) before
  summing, so rows with a large mean (1e4) keep their variance.
* ``_norm_fwd_looped_kernel``: rows longer than the register block (no limit on
  ``N``): one program per row, pass 1 keeps a per-lane Welford mean/M2 of the
  pivot-shifted chunk values (merged with Chan's formula at the end), pass 2 normalizes.
* ``_norm_bwd_kernel``: ``dx``, and per-program partial sums of ``dweight`` /
  ``dbias`` over a contiguous group of rows (no atomics). Single-block rows compute
  the row sums ``mean(g * xhat)`` and ``mean(g)`` in registers; long rows get them
  from ``_norm_bwd_row_sums_kernel`` and are tiled over columns too.
* ``_sum_partials_kernel``: the second pass, summing the partial rows in a fixed
  order: the same inputs give the same bits.

With ``HAS_RES`` the forward also reads a residual, writes ``residual_out = x +
residual`` (float32 add, rounded to the input dtype) and normalizes that rounded
value; with ``HAS_DRES`` the backward adds ``grad_residual_out`` to ``dx`` before its
single rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRETING
from ._compile import CompileSpec
from ._launch import device_target, launch

# --------------------------------------------------------------------------------------
# launch heuristics
# --------------------------------------------------------------------------------------

MAX_FUSED_FWD_BYTES = 32768
"""Longest row (in bytes of the input) the forward keeps in registers: 16384 bf16 / fp16
or 8192 fp32 values over 32 warps fit in 64 registers per thread without spilling."""
MAX_FUSED_BWD_BYTES = 16384
"""Same for the backward (x, dy, weight and two accumulators live): 8192 / 4096 values."""
LOOP_BLOCK_N = 4096
"""Chunk length of the looped forward and of the backward row sums."""
TILE_BLOCK_N = 4096
"""Column tile (one row segment per step) of the backward for rows too long for registers."""
ROW_ELEMENTS = 4096
"""Elements a program handles per step when several short rows share one program."""
CPU_PROGRAM_SLOTS = 2
"""Stand-in for the SM count when the kernels run in the interpreter: few programs (the
interpreter runs them one after the other), still several row groups and rows per program."""


def program_slots(device: torch.device) -> int:
    """Number of SMs launches on ``device`` plan for (see
    :func:`~llmkit.kernels._launch.device_target`); the interpreter gets a small fixed stand-in."""
    target = device_target(device)
    return target.sms if target is not None else CPU_PROGRAM_SLOTS


def num_warps_for(elements: int) -> int:
    """Warps for a program that touches ``elements`` values per step: about 8 per thread
    (one 128-bit load of 16-bit values), so few registers per thread and many warps per SM."""
    return max(1, min(32, triton.next_power_of_2(max(elements, 1)) // 256))


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def rows_per_program(m: int, block_n: int, slots: int) -> int:
    """Rows per program for short rows: about ``ROW_ELEMENTS`` values, >= 4 programs per SM."""
    by_size = max(1, ROW_ELEMENTS // block_n)
    by_occupancy = _pow2_floor(max(1, m // (4 * slots)))
    return max(1, min(by_size, by_occupancy))


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Launch configuration of a norm kernel for one shape."""

    looped: bool
    """Forward: rows do not fit one register block and take the two-pass loop.
    Backward: rows are tiled over columns, row sums come from a first kernel."""
    block_m: int
    block_n: int
    num_warps: int
    groups: int = 1
    """Backward: programs along the rows, each owning one row of the partial sums."""
    rows_per_group: int = 0


def forward_config(
    m: int, n: int, elem_bytes: int, slots: int = CPU_PROGRAM_SLOTS, max_fused_n: int | None = None,
    loop_block_n: int = LOOP_BLOCK_N,
) -> NormConfig:
    """Forward launch configuration for ``m`` rows of ``n`` elements of ``elem_bytes`` each."""
    if n > (max_fused_n or MAX_FUSED_FWD_BYTES // elem_bytes):
        return NormConfig(True, 1, loop_block_n, num_warps_for(loop_block_n))
    block_n = triton.next_power_of_2(n)
    block_m = rows_per_program(m, block_n, slots)
    return NormConfig(False, block_m, block_n, num_warps_for(block_m * block_n))


def backward_config(
    m: int, n: int, elem_bytes: int, slots: int = CPU_PROGRAM_SLOTS, max_fused_n: int | None = None,
    tile_block_n: int = TILE_BLOCK_N,
) -> NormConfig:
    """Backward launch configuration: row groups sized so about 2-4 programs run per SM."""
    if n > (max_fused_n or MAX_FUSED_BWD_BYTES // elem_bytes):
        looped, block_n = True, min(tile_block_n, triton.next_power_of_2(n))
        block_m = max(1, ROW_ELEMENTS // block_n)
        col_blocks = triton.cdiv(n, block_n)
        target = max(1, triton.cdiv(4 * slots, col_blocks))
    else:
        looped, block_n = False, triton.next_power_of_2(n)
        block_m = rows_per_program(m, block_n, slots)
        target = 2 * slots
    row_blocks = max(1, triton.cdiv(m, block_m))
    groups = min(row_blocks, target)
    rows_per_group = triton.cdiv(row_blocks, groups) * block_m
    groups = max(1, triton.cdiv(m, rows_per_group))
    return NormConfig(looped, block_m, block_n, num_warps_for(block_m * block_n), groups, rows_per_group)


# --------------------------------------------------------------------------------------
# row layouts (strided rows without a copy)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RowLayout:
    """How the kernels address the rows of several same-shape tensors.

    Row ``r`` of tensor ``i`` starts at element
    ``(r // inner_rows) * strides[i][0] + (r % inner_rows) * strides[i][1]`` of
    ``tensors[i]``; its ``n`` elements follow with unit stride.
    """

    tensors: list[Tensor]
    inner_rows: int
    strides: list[tuple[int, int]]
    m: int
    n: int


def _tail_packed(t: Tensor, k: int) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[t.dim() - k:]), reversed(t.stride()[t.dim() - k:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _lead_breaks(t: Tensor, dims: Sequence[int]) -> set[int]:
    return {
        j for j in range(len(dims) - 1)
        if t.stride(dims[j]) != t.stride(dims[j + 1]) * t.shape[dims[j + 1]]
    }


def row_layout(tensors: Sequence[Tensor], k: int) -> RowLayout:
    """Rows of ``tensors`` (same shape ``(*lead, *tail)``, ``len(tail) == k``) without copies.

    A tensor is copied (``.contiguous()``) only when its ``k`` trailing dims are not
    packed with unit stride, or when the leading dims of all tensors together cannot be
    described by two strides per tensor.
    """
    shape = tensors[0].shape
    lead = list(shape[: len(shape) - k])
    n = math.prod(shape[len(shape) - k:])
    m = math.prod(lead)
    ts = [t if _tail_packed(t, k) else t.contiguous() for t in tensors]
    dims = [d for d, s in enumerate(lead) if s != 1]
    breaks = [_lead_breaks(t, dims) for t in ts]
    union = set().union(*breaks)
    if len(union) > 1:
        ts = [t.contiguous() if b else t for t, b in zip(ts, breaks)]
        union = set()
    if not dims:
        return RowLayout(ts, 1, [(n, 0)] * len(ts), m, n)
    if not union:
        return RowLayout(ts, 1, [(t.stride(dims[-1]), 0) for t in ts], m, n)
    (j,) = union
    inner_rows = math.prod(lead[d] for d in dims[j + 1:])
    return RowLayout(ts, inner_rows, [(t.stride(dims[j]), t.stride(dims[-1])) for t in ts], m, n)


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every kernel output and scratch buffer (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current for the launch (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# kernels
#
# Small helpers are written inline rather than as nested @triton.jit functions: the
# Triton interpreter re-patches triton.language on every nested call, which costs as
# much as several block operations in the CPU tests. Row starts are int64:
# ``(row // inner_rows) * stride_outer + (row % inner_rows) * stride_inner``, where
# ``inner_rows == 1`` (the common case) is specialized away by Triton.
# --------------------------------------------------------------------------------------

BF16_ROUND_BY_BITS = tl.constexpr(INTERPRETING)
"""True under TRITON_INTERPRET: Triton 3.x's interpreter converts float32 -> bfloat16 by
truncation, where the GPU rounds to nearest even; the interpreted kernels then round the
bits themselves so CPU results match the GPU's. Compiled kernels use the native cvt.rn."""


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``dtype``."""
    if BF16_ROUND_BY_BITS and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        x = tl.where(x != x, x, (bits & 0xFFFF0000).to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def _norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, mean_ptr, rstd_ptr,
    M, N, inner_rows,
    x_stride_outer, x_stride_inner, res_stride_outer, res_stride_inner,
    eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalize ``BLOCK_M`` whole rows (``N <= BLOCK_N``) held in registers."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    outer = (rows // inner_rows).to(tl.int64)
    inner = (rows % inner_rows).to(tl.int64)
    x_row = outer * x_stride_outer + inner * x_stride_inner
    out_row = rows.to(tl.int64) * N
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    v = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r_row = outer * res_stride_outer + inner * res_stride_inner
        r = tl.load(res_ptr + r_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _round_to(v + r, out_ty)  # residual_out, rounded once; the norm sees the rounded value
        tl.store(res_out_ptr + out_row[:, None] + cols[None, :], s, mask=mask)
        v = s.to(tl.float32)
    if IS_RMS:
        rstd = tl.math.rsqrt(tl.sum(v * v, axis=1) / N + eps)
        y = v * rstd[:, None]
    else:
        # centre on the row's first element first, so a large mean does not cancel
        pivot = tl.load(x_ptr + x_row, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_RES:
            pivot = pivot + tl.load(res_ptr + r_row, mask=row_ok, other=0.0).to(tl.float32)
            pivot = _round_to(pivot, out_ty).to(tl.float32)
        d = tl.where(mask, v - pivot[:, None], 0.0)
        shift = tl.sum(d, axis=1) / N
        y = tl.where(mask, d - shift[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(y * y, axis=1) / N + eps)
        tl.store(mean_ptr + rows, pivot + shift, mask=row_ok)
        y = y * rstd[:, None]
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_row[:, None] + cols[None, :], _round_to(y, out_ty), mask=mask)


@triton.jit
def _norm_fwd_looped_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, mean_ptr, rstd_ptr,
    M, N, inner_rows,
    x_stride_outer, x_stride_inner, res_stride_outer, res_stride_inner,
    eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Normalize one row of any length in chunks of ``BLOCK_N``.

    Pass 1 reads the row once (and writes ``residual_out``): lane ``j`` keeps a Welford
    mean and M2 of the pivot-shifted values ``x[j], x[j + BLOCK_N], ...``; the lanes
    are merged with Chan's formula. Pass 2 re-reads the row (``residual_out`` when
    fused) and writes the output.
    """
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    outer = (row // inner_rows).to(tl.int64)
    inner = (row % inner_rows).to(tl.int64)
    x_row = outer * x_stride_outer + inner * x_stride_inner
    r_row = outer * res_stride_outer + inner * res_stride_inner
    out_row = row.to(tl.int64) * N
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    pivot = 0.0
    if not IS_RMS:
        pivot = tl.load(x_ptr + x_row).to(tl.float32)
        if HAS_RES:
            pivot = _round_to(pivot + tl.load(res_ptr + r_row).to(tl.float32), out_ty).to(tl.float32)
    acc_mean = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)  # RMSNorm: sum of squares
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        v = tl.load(x_ptr + x_row + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            s = _round_to(v + tl.load(res_ptr + r_row + c, mask=ok, other=0.0).to(tl.float32), out_ty)
            tl.store(res_out_ptr + out_row + c, s, mask=ok)
            v = s.to(tl.float32)
        if IS_RMS:
            acc_m2 += v * v
        else:
            d = v - pivot
            delta = d - acc_mean
            inv_count = 1.0 / (start // BLOCK_N + 1)
            acc_mean = tl.where(ok, acc_mean + delta * inv_count, acc_mean)
            acc_m2 = tl.where(ok, acc_m2 + delta * (d - acc_mean), acc_m2)
    if IS_RMS:
        rstd = tl.math.rsqrt(tl.sum(acc_m2, axis=0) / N + eps)
        shift = 0.0
    else:
        lane_count = ((N - cols + BLOCK_N - 1) // BLOCK_N).to(tl.float32)
        shift = tl.sum(lane_count * acc_mean, axis=0) / N
        dm = acc_mean - shift
        var = tl.sum(acc_m2 + lane_count * dm * dm, axis=0) / N
        rstd = tl.math.rsqrt(var + eps)
        tl.store(mean_ptr + row, pivot + shift)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        if HAS_RES:
            v = tl.load(res_out_ptr + out_row + c, mask=ok, other=0.0).to(tl.float32)
        else:
            v = tl.load(x_ptr + x_row + c, mask=ok, other=0.0).to(tl.float32)
        y = ((v - pivot) - shift) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_row + c, _round_to(y, out_ty), mask=ok)


@triton.jit
def _norm_bwd_row_sums_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, row_sums_ptr,
    N, inner_rows,
    dy_stride_outer, dy_stride_inner, x_stride_outer, x_stride_inner,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per long row: ``mean(g * xhat)`` and ``mean(g)`` with ``g = dy * weight``."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    outer = (row // inner_rows).to(tl.int64)
    inner = (row % inner_rows).to(tl.int64)
    dy_row = outer * dy_stride_outer + inner * dy_stride_inner
    x_row = outer * x_stride_outer + inner * x_stride_inner
    rstd = tl.load(rstd_ptr + row)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(mean_ptr + row)
    acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        g = tl.load(dy_ptr + dy_row + c, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + x_row + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
        acc_gx += g * ((x - mean) * rstd)
        acc_g += g
    sums = row_sums_ptr + 2 * row.to(tl.int64)
    tl.store(sums, tl.sum(acc_gx, axis=0) / N)
    tl.store(sums + 1, tl.sum(acc_g, axis=0) / N)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, row_sums_ptr, dres_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    M, N, inner_rows,
    dy_stride_outer, dy_stride_inner, x_stride_outer, x_stride_inner, dres_stride_outer, dres_stride_inner,
    rows_per_group, col_blocks,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DRES: tl.constexpr, STORE_DX: tl.constexpr,
    DW: tl.constexpr, DB: tl.constexpr, ROW_SUMS_GIVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx of one group of rows in one column tile, and the group's partial dweight/dbias.

    ``dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) [+ grad_residual]`` with ``g = dy *
    weight`` and ``xhat = (x - mean) * rstd`` (RMSNorm: no mean, no ``mean(g)`` term).
    ``sum dy * xhat`` and ``sum dy`` over the group's rows go to row ``group`` of the
    partial buffers. Whole rows (one column tile) compute the row means in registers;
    tiled rows read them from ``row_sums_ptr``.
    """
    pid = tl.program_id(0)
    group = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_begin = group * rows_per_group
    row_end = tl.minimum(row_begin + rows_per_group, M)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        outer = (rows // inner_rows).to(tl.int64)
        inner = (rows % inner_rows).to(tl.int64)
        dy_row = outer * dy_stride_outer + inner * dy_stride_inner
        x_row = outer * x_stride_outer + inner * x_stride_inner
        dy = tl.load(dy_ptr + dy_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = (x - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        if STORE_DX:
            if ROW_SUMS_GIVEN:
                sums = row_sums_ptr + 2 * rows.to(tl.int64)
                mean_gx = tl.load(sums, mask=row_ok, other=0.0)
                mean_g = tl.load(sums + 1, mask=row_ok, other=0.0)
            else:
                mean_gx = tl.sum(g * xhat, axis=1) / N
                mean_g = tl.sum(g, axis=1) / N
            dx = g - xhat * mean_gx[:, None]
            if not IS_RMS:
                dx = dx - mean_g[:, None]
            dx = dx * rstd[:, None]
            if HAS_DRES:
                dres_row = outer * dres_stride_outer + inner * dres_stride_inner
                dx += tl.load(dres_ptr + dres_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            tl.store(dx_ptr + out_offs, _round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        if DW:
            acc_dw += dy * xhat
        if DB:
            acc_db += dy
    part = group.to(tl.int64) * N + cols
    if DW:
        tl.store(dw_part_ptr + part, tl.sum(acc_dw, axis=0), mask=col_ok)
    if DB:
        tl.store(db_part_ptr + part, tl.sum(acc_db, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[j] = sum over g of part[g, j], always in the same order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask = (gs < G)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + gs.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, _round_to(tl.sum(acc, axis=0), out_ptr.dtype.element_ty), mask=col_ok)


def sum_partials_config(g: int, n: int, slots: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_N, num_warps) for summing ``g`` partial rows of ``n``: ~1 program per SM."""
    block_n = max(128, min(ROW_ELEMENTS, triton.next_power_of_2(triton.cdiv(n, slots))))
    block_g = max(1, min(triton.next_power_of_2(g), ROW_ELEMENTS // block_n))
    return block_g, block_n, num_warps_for(block_g * block_n)


def sum_partials(partials: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum a ``(G, N)`` float32 tensor of partial sums over ``G`` into a new ``(N,)`` tensor."""
    g, n = partials.shape
    out = _empty((n,), dtype, partials.device)
    block_g, block_n, warps = sum_partials_config(g, n, program_slots(partials.device))
    launch(
        _sum_partials_kernel, (triton.cdiv(n, block_n),),
        partials, out, g, n, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=warps
    )
    return out


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def norm_forward(
    x: Tensor,
    residual: Tensor | None,
    normalized_ndim: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
    config: NormConfig | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """LayerNorm / RMSNorm forward, with the residual add fused when ``residual`` is given.

    Args:
        x: ``(*, *normalized_shape)`` float16 / bfloat16 / float32, ``normalized_ndim``
            trailing dims normalized; any strides.
        residual: None or the same shape and dtype as ``x``.
        weight, bias: None or ``normalized_shape`` (x's dtype or float32). ``rms`` ignores bias.
        config: launch configuration; default :func:`forward_config` of the shape.

    Returns:
        ``(out, residual_out, mean, rstd)``: ``out`` and ``residual_out`` (None without a
        residual) contiguous in x's dtype; ``mean`` (None for RMSNorm) and ``rstd``
        float32 of the leading shape.
    """
    lead = list(x.shape[: x.dim() - normalized_ndim])
    layout = row_layout([x] if residual is None else [x, residual], normalized_ndim)
    m, n = layout.m, layout.n
    dev = x.device
    out = _empty(x.shape, x.dtype, dev)
    res_out = None if residual is None else _empty(x.shape, x.dtype, dev)
    mean = None if rms else _empty(lead, torch.float32, dev)
    rstd = _empty(lead, torch.float32, dev)
    if m == 0:
        return out, res_out, mean, rstd
    if n == 0:  # an empty row: mean 0 and rstd NaN, as the reference backend gives
        if mean is not None:
            mean.zero_()
        rstd.fill_(float("nan"))
        return out, res_out, mean, rstd
    cfg = config or forward_config(m, n, x.element_size(), program_slots(dev))
    xs = layout.tensors[0]
    rs = layout.tensors[1] if residual is not None else xs
    (x_so, x_si) = layout.strides[0]
    (r_so, r_si) = layout.strides[-1]
    w = weight.reshape(-1) if weight is not None else None
    b = bias.reshape(-1) if bias is not None and not rms else None
    args = (xs, rs, w, b, out, res_out if res_out is not None else out,
            mean if mean is not None else rstd, rstd,
            m, n, layout.inner_rows, x_so, x_si, r_so, r_si, float(eps))
    flags = dict(IS_RMS=rms, HAS_RES=residual is not None, HAS_WEIGHT=w is not None, HAS_BIAS=b is not None)
    with device_guard(x):
        if cfg.looped:
            launch(_norm_fwd_looped_kernel, (m,), *args, **flags, BLOCK_N=cfg.block_n,
                   num_warps=cfg.num_warps)
        else:
            launch(_norm_fwd_kernel, (triton.cdiv(m, cfg.block_m),), *args, **flags, BLOCK_M=cfg.block_m,
                   BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
    return out, res_out, mean, rstd


def norm_backward(
    grad_out: Tensor,
    x: Tensor,
    normalized_ndim: int,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    output_mask: Sequence[bool],
    grad_residual: Tensor | None = None,
    rms: bool = False,
    config: NormConfig | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """LayerNorm / RMSNorm backward from the saved statistics.

    Args:
        grad_out, x: ``(*, *normalized_shape)``, any strides; ``x`` is the normalized
            input (``residual_out`` for add_layer_norm).
        weight, bias: None or ``normalized_shape`` (bias is ignored for RMSNorm).
        mean (None for RMSNorm), rstd: float32 statistics of the leading shape.
        output_mask: ``[dx, dweight, dbias]`` wanted.
        grad_residual: added to ``dx`` in float32 before its one rounding (add_layer_norm);
            ``dx`` is then always computed.
        config: launch configuration; default :func:`backward_config` of the shape.

    Returns:
        ``(dx, dweight, dbias)``: ``dx`` contiguous in x's dtype (zeros when not wanted);
        ``dweight`` / ``dbias`` summed over the rows in the parameter's shape and dtype,
        None when not wanted or the parameter is absent.
    """
    want_dx = bool(output_mask[0]) or grad_residual is not None
    want_dw = bool(output_mask[1]) and weight is not None
    want_db = len(output_mask) > 2 and bool(output_mask[2]) and bias is not None and not rms
    tensors = [grad_out, x] + ([grad_residual] if grad_residual is not None else [])
    layout = row_layout(tensors, normalized_ndim)
    m, n = layout.m, layout.n
    dev = x.device
    dx = _empty(x.shape, x.dtype, dev) if want_dx else torch.zeros(x.shape, dtype=x.dtype, device=dev)
    if m == 0 or n == 0:  # nothing to normalize: the sums over no rows are zero
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if want_dw else None
        db = torch.zeros_like(bias, memory_format=torch.contiguous_format) if want_db else None
        return dx, dw, db
    if not (want_dx or want_dw or want_db):
        return dx, None, None
    cfg = config or backward_config(m, n, x.element_size(), program_slots(dev))
    # one scratch allocation: partial dweight rows, partial dbias rows, row sums
    n_parts = int(want_dw) + int(want_db)
    part_len = cfg.groups * n
    scratch = _empty((n_parts * part_len + (2 * m if cfg.looped else 0),), torch.float32, dev)
    dw_part = scratch[:part_len].view(cfg.groups, n) if want_dw else scratch
    db_part = scratch[(n_parts - 1) * part_len: n_parts * part_len].view(cfg.groups, n) if want_db else scratch
    row_sums = scratch[n_parts * part_len:] if cfg.looped else scratch
    dys, xs = layout.tensors[0], layout.tensors[1]
    dres = layout.tensors[2] if grad_residual is not None else dys
    (dy_so, dy_si), (x_so, x_si) = layout.strides[0], layout.strides[1]
    (dr_so, dr_si) = layout.strides[-1]
    w = weight.reshape(-1) if weight is not None else None
    rstd_arg = rstd.reshape(-1)
    mean_arg = mean.reshape(-1) if mean is not None else rstd_arg
    with device_guard(x):
        if cfg.looped and want_dx:
            launch(
                _norm_bwd_row_sums_kernel, (m,), dys, xs, w, mean_arg, rstd_arg, row_sums, n, layout.inner_rows,
                dy_so, dy_si, x_so, x_si, IS_RMS=rms, HAS_WEIGHT=w is not None,
                BLOCK_N=LOOP_BLOCK_N, num_warps=num_warps_for(LOOP_BLOCK_N),
            )
        col_blocks = triton.cdiv(n, cfg.block_n)
        launch(
            _norm_bwd_kernel, (cfg.groups * col_blocks,),
            dys, xs, w, mean_arg, rstd_arg, row_sums, dres, dx, dw_part, db_part,
            m, n, layout.inner_rows, dy_so, dy_si, x_so, x_si, dr_so, dr_si,
            cfg.rows_per_group, col_blocks,
            IS_RMS=rms, HAS_WEIGHT=w is not None, HAS_DRES=grad_residual is not None, STORE_DX=want_dx,
            DW=want_dw, DB=want_db, ROW_SUMS_GIVEN=cfg.looped,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
        dw = sum_partials(dw_part, weight.dtype).view(weight.shape) if want_dw else None
        db = sum_partials(db_part, bias.dtype).view(bias.shape) if want_db else None
    return dx, dw, db


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _meta(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _rows(m: int, n: int, dtype: torch.dtype, two_strides: bool) -> Tensor:
    """``m`` rows of ``n``: contiguous, or a (S, B, n) transpose of a (B, S, n) tensor (B = 8),
    whose rows take two strides (``inner_rows`` a runtime argument)."""
    if two_strides:
        return _meta(8, m // 8, n, dtype=dtype).transpose(0, 1)
    return _meta(m, n, dtype=dtype)


def _fwd_spec(name: str, m: int, n: int, dt: str, rms: bool, res: bool, two_strides: bool = False) -> CompileSpec:
    dtype = _DTYPES[dt]

    def call():
        x = _rows(m, n, dtype, two_strides)
        residual = _meta(*x.shape, dtype=dtype) if res else None
        bias = None if rms else _meta(n, dtype=dtype)
        return norm_forward(x, residual, 1, _meta(n, dtype=dtype), bias, 1e-5, rms)

    looped = n > MAX_FUSED_FWD_BYTES // dtype.itemsize
    kernel = _norm_fwd_looped_kernel if looped else _norm_fwd_kernel
    tag = "_two_strides" if two_strides else ""
    return CompileSpec(f"{name}_fwd{'_looped' if looped else ''}_{dt}_n{n}{tag}", kernel, call)


def _bwd_call(m: int, n: int, dt: str, rms: bool, dres: bool, two_strides: bool = False) -> Callable[[], object]:
    dtype = _DTYPES[dt]

    def call():
        x = _rows(m, n, dtype, two_strides)
        dy = _meta(*x.shape, dtype=dtype)
        stats = _meta(*x.shape[:-1], dtype=torch.float32)
        bias = None if rms else _meta(n, dtype=dtype)
        return norm_backward(dy, x, 1, _meta(n, dtype=dtype), bias, None if rms else stats, stats,
                             [True, True, not rms], _meta(*x.shape, dtype=dtype) if dres else None, rms)
    return call


def _bwd_spec(name: str, m: int, n: int, dt: str, rms: bool, dres: bool, two_strides: bool = False) -> CompileSpec:
    kind = "tiled" if n > MAX_FUSED_BWD_BYTES // _DTYPES[dt].itemsize else "fused"
    return CompileSpec(
        f"{name}_bwd_{kind}_{dt}_n{n}" + ("_dres" if dres else "") + ("_two_strides" if two_strides else ""),
        _norm_bwd_kernel, _bwd_call(m, n, dt, rms, dres, two_strides),
    )


def compile_specs() -> list[CompileSpec]:
    """Every kernel of this module as launched for 4096 rows (fewer for the longest) on an
    A100 / H100: short rows several per program, 1024 up to the largest register block
    (forward 16384 bf16 / 8192 fp32, backward 8192 / 4096), the looped / tiled paths just past
    it and at 262144, rows taking two strides (a transposed (S, B, N) view), rows of 1000 (no
    length divisible by 16: Triton's specializations cannot vectorize), and the sums of partial
    rows."""
    table = [  # (kind, name, n, dtype, rms, residual / grad_residual); 4096 rows, 256 of 262144
        ("fwd", "ln", 128, "bf16", False, False), ("fwd", "ln", 1024, "bf16", False, False),
        ("fwd", "ln", 4096, "bf16", False, False), ("fwd", "ln", 16384, "bf16", False, False),
        ("fwd", "ln", 8192, "fp32", False, False), ("fwd", "rms", 4096, "bf16", True, False),
        ("fwd", "rms", 8192, "fp32", True, False), ("fwd", "add_ln", 4096, "fp16", False, True),
        ("fwd", "add_ln", 8192, "fp32", False, True), ("fwd", "ln", 262144, "bf16", False, False),
        ("fwd", "rms", 262144, "bf16", True, False), ("fwd", "add_ln", 16384, "fp32", False, True),
        ("bwd", "ln", 128, "bf16", False, False), ("bwd", "ln", 1024, "bf16", False, False),
        ("bwd", "ln", 8192, "bf16", False, False), ("bwd", "ln", 4096, "fp32", False, True),
        ("bwd", "rms", 8192, "bf16", True, False), ("bwd", "ln", 16384, "bf16", False, True),
        ("bwd", "rms", 8192, "fp32", True, False),
    ]
    specs = [(_fwd_spec if kind == "fwd" else _bwd_spec)(name, 256 if n > 65536 else 4096, n, dt, rms, flag)
             for kind, name, n, dt, rms, flag in table]
    specs += [_fwd_spec("ln", 4096, 4096, "bf16", False, False, two_strides=True),
              _bwd_spec("ln", 4096, 4096, "bf16", False, False, two_strides=True),
              _fwd_spec("ln", 4000, 1000, "bf16", False, False), _bwd_spec("ln", 4000, 1000, "bf16", False, False)]
    for rms in (False, True):
        specs.append(CompileSpec(f"{'rms' if rms else 'ln'}_bwd_row_sums_bf16_n16384", _norm_bwd_row_sums_kernel,
                                 _bwd_call(4096, 16384, "bf16", rms, False)))
    for g, n, dt in ((264, 1024, "fp32"), (264, 8192, "bf16"), (8, 262144, "bf16")):
        specs.append(CompileSpec(
            f"sum_partials_{dt}_g{g}_n{n}", _sum_partials_kernel,
            lambda g=g, n=n, dt=dt: sum_partials(_meta(g, n, dtype=torch.float32), _DTYPES[dt]),
        ))
    return specs
