"""Triton LayerNorm, RMSNorm and fused (dropout +) residual-add + norm: the forward kernels,
the launch heuristics of forward and backward (the backward is ``layer_norm_backward.py``).

Every tensor is seen as ``M`` rows of ``N = prod(normalized_shape)`` elements. Inputs
may be strided: the normalized (trailing) dims must be packed with a unit last
stride, and the leading dims are addressed as ``outer * stride_outer + inner *
stride_inner`` with ``inner = row % inner_rows`` (see :func:`~._common.row_layout`), so a
slice, a ``(S, B, H)`` transpose of a ``(B, S, H)`` tensor and similar views are read
in place. Anything else is copied once, explicitly, in ``row_layout``. Outputs
are contiguous. Math is float32; statistics are float32 of shape ``(M,)``.

Kernels (one launch configuration per shape, from :func:`forward_config`, no autotuning):

* ``_norm_fwd_kernel``: ``BLOCK_M`` whole rows per program held in registers
  (``N <= BLOCK_N``). LayerNorm centres on a pivot (the row's first element) before
  summing, so rows with a large mean (1e4) keep their variance.
* ``_norm_fwd_looped_kernel``: rows longer than the register block (no limit on
  ``N``): one program per row, pass 1 keeps a per-lane Welford mean/M2 of the
  pivot-shifted chunk values (merged with Chan's formula at the end), pass 2 normalizes.

Rows whose squares would leave float32's range (|x| above ~1.8e19, or denormal rows with
``eps = 0``) are scaled by a power of two before squaring (:func:`_pow2_scale`): exact, so
ordinary rows give the same bits, and such rows give float64's answer rounded.

Options: RMSNorm's scale is ``offset + weight`` (float32); ``CAST_BEFORE_WEIGHT`` rounds
``x_hat`` to the output dtype before the weight multiply (Llama's order). With ``HAS_RES``
the forward also reads a residual, writes ``residual_out = dropout(x) + residual`` (float32
add, rounded to ``residual_out``'s dtype: the input's, or float32 with ``residual_in_fp32``)
and normalizes that rounded value; ``DROPOUT`` keeps ``x[i, j]`` when ``tl.rand(seed, i * N +
j) > p`` and scales it by ``1 / (1 - p)`` (the Philox stream of ``llmkit/ops/_philox.py``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    CPU_PROGRAM_SLOTS,
    ROW_ELEMENTS,
    device_guard,
    num_warps_for,
    program_slots,
    round_to,
    row_layout,
)
from ._common import empty as _empty  # the allocation tests poison
from ._compile import CompileSpec
from ._launch import launch

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
# kernels
#
# Row starts are int64: ``(row // inner_rows) * stride_outer + (row % inner_rows) *
# stride_inner``, where ``inner_rows == 1`` (the common case) is specialized away by Triton.
# --------------------------------------------------------------------------------------


@triton.jit
def _pow2_scale(amax, eps):
    """(s, 1 / s): a power of two per row that brings its largest magnitude ``amax`` to
    [1, 4), so squares neither overflow (|x| above ~1.8e19) nor underflow (denormals), capped
    where ``eps * s * s`` would pass 2. Power-of-two scaling is exact: results are those of
    unscaled float32 wherever that neither overflows nor underflows."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent; 255 for inf / NaN
    k = 127 - tl.minimum(tl.maximum(e, 1), 253)
    e_eps = ((tl.zeros_like(amax) + eps).to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.minimum(k, tl.where(eps > 0.0, (127 - e_eps) >> 1, 126))
    return ((k + 127) << 23).to(tl.float32, bitcast=True), ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_rstd(var_s, s, eps):
    """(rstd of the scaled row, rstd) from the scaled row's variance (RMSNorm: mean square).

    ``var_s = 0`` is a constant row (RMSNorm: zeros), whose centred values are exactly 0: any
    finite scaled rstd gives the output 0, and its rstd is ``1 / sqrt(eps)`` (with ``eps =
    0`` both are inf: 0 / 0, NaN out, as in float64). Every other row has ``var_s`` far above
    the rounding of ``eps * s^2`` (a denormal for huge rows), so ``rsqrt(var_s + eps * s^2)
    * s`` is its rstd."""
    flat = var_s == 0.0
    rstd_s = tl.math.rsqrt(tl.where(flat, tl.where(eps > 0.0, 1.0, 0.0), var_s + eps * s * s))
    return rstd_s, tl.where(flat, tl.math.rsqrt(eps + tl.zeros_like(var_s)), rstd_s * s)


@triton.jit(do_not_specialize=["seed"])
def _norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, mean_ptr, rstd_ptr,
    M, N, inner_rows,
    x_stride_outer, x_stride_inner, res_stride_outer, res_stride_inner,
    eps, offset, dropout_p, dropout_scale, seed,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, DROPOUT: tl.constexpr,
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
    res_ty: tl.constexpr = res_out_ptr.dtype.element_ty
    v = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if not IS_RMS:
        pivot = tl.load(x_ptr + x_row, mask=row_ok, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = tl.rand(seed, out_row[:, None] + cols[None, :]) > dropout_p
        v = tl.where(keep, v * dropout_scale, 0.0)
        if not IS_RMS:
            pivot = tl.where(tl.rand(seed, out_row) > dropout_p, pivot * dropout_scale, 0.0)
    if HAS_RES:
        r_row = outer * res_stride_outer + inner * res_stride_inner
        r = tl.load(res_ptr + r_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = round_to(v + r, res_ty)  # residual_out, rounded once; the norm sees the rounded value
        tl.store(res_out_ptr + out_row[:, None] + cols[None, :], s, mask=mask)
        v = s.to(tl.float32)
        if not IS_RMS:
            pivot = pivot + tl.load(res_ptr + r_row, mask=row_ok, other=0.0).to(tl.float32)
            pivot = round_to(pivot, res_ty).to(tl.float32)
    # scale each row by a power of two before squaring (see _pow2_scale)
    scale, inv_scale = _pow2_scale(tl.max(tl.abs(v), axis=1), eps)
    v = v * scale[:, None]
    if IS_RMS:
        rstd_s, rstd = _scaled_rstd(tl.sum(v * v, axis=1) / N, scale, eps)
        y = v * rstd_s[:, None]
    else:
        # centre on the row's first element first, so a large mean does not cancel
        pivot = pivot * scale
        d = tl.where(mask, v - pivot[:, None], 0.0)
        shift = tl.sum(d, axis=1) / N
        y = tl.where(mask, d - shift[:, None], 0.0)
        rstd_s, rstd = _scaled_rstd(tl.sum(y * y, axis=1) / N, scale, eps)
        tl.store(mean_ptr + rows, (pivot + shift) * inv_scale, mask=row_ok)
        y = y * rstd_s[:, None]
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if IS_RMS:
            w = w + offset
        if CAST_BEFORE_WEIGHT:
            y = round_to(y, out_ty).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_row[:, None] + cols[None, :], round_to(y, out_ty), mask=mask)


@triton.jit
def _looped_stats(x_ptr, res_ptr, res_out_ptr, x_row, r_row, out_row, cols, N, pivot, scale,
                  dropout_p, dropout_scale, seed,
                  IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, WRITE_RES: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Pass 1 of the looped forward over the row's values times ``scale``: per lane, the
    Welford mean and M2 of ``value - pivot`` (RMSNorm: the sum of squares), and the
    largest magnitude. With ``HAS_RES`` the values are ``residual_out`` (written when
    ``WRITE_RES``, read back otherwise)."""
    acc_mean = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)  # RMSNorm: sum of squares
    acc_max = tl.zeros([BLOCK_N], dtype=tl.float32)
    res_ty: tl.constexpr = res_out_ptr.dtype.element_ty
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        if HAS_RES and WRITE_RES:
            v = tl.load(x_ptr + x_row + c, mask=ok, other=0.0).to(tl.float32)
            if DROPOUT:
                v = tl.where(tl.rand(seed, out_row + c) > dropout_p, v * dropout_scale, 0.0)
            r = round_to(v + tl.load(res_ptr + r_row + c, mask=ok, other=0.0).to(tl.float32), res_ty)
            tl.store(res_out_ptr + out_row + c, r, mask=ok)
            v = r.to(tl.float32)
        elif HAS_RES:
            v = tl.load(res_out_ptr + out_row + c, mask=ok, other=0.0).to(tl.float32)
        else:
            v = tl.load(x_ptr + x_row + c, mask=ok, other=0.0).to(tl.float32)
        acc_max = tl.maximum(acc_max, tl.abs(v))
        v = v * scale
        if IS_RMS:
            acc_m2 += v * v
        else:
            d = v - pivot
            delta = d - acc_mean
            inv_count = 1.0 / (start // BLOCK_N + 1)
            acc_mean = tl.where(ok, acc_mean + delta * inv_count, acc_mean)
            acc_m2 = tl.where(ok, acc_m2 + delta * (d - acc_mean), acc_m2)
    return acc_mean, acc_m2, tl.max(acc_max, axis=0)


@triton.jit(do_not_specialize=["seed"])
def _norm_fwd_looped_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, mean_ptr, rstd_ptr,
    M, N, inner_rows,
    x_stride_outer, x_stride_inner, res_stride_outer, res_stride_inner,
    eps, offset, dropout_p, dropout_scale, seed,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Normalize one row of any length in chunks of ``BLOCK_N``.

    Pass 1 reads the row once (and writes ``residual_out``): lane ``j`` keeps a Welford
    mean and M2 of the pivot-shifted values ``x[j], x[j + BLOCK_N], ...``; the lanes
    are merged with Chan's formula. A row whose largest magnitude is outside [2^-40, 2^40]
    (squares could overflow or, with a tiny eps, underflow) repeats pass 1 on its values
    scaled by a power of two (:func:`_pow2_scale`); other rows never do. Pass 2 re-reads the
    row (``residual_out`` when fused) and writes the output.
    """
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    outer = (row // inner_rows).to(tl.int64)
    inner = (row % inner_rows).to(tl.int64)
    x_row = outer * x_stride_outer + inner * x_stride_inner
    r_row = outer * res_stride_outer + inner * res_stride_inner
    out_row = row.to(tl.int64) * N
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    res_ty: tl.constexpr = res_out_ptr.dtype.element_ty
    pivot = 0.0
    if not IS_RMS:
        pivot = tl.load(x_ptr + x_row).to(tl.float32)
        if DROPOUT:
            pivot = tl.where(tl.rand(seed, out_row) > dropout_p, pivot * dropout_scale, 0.0)
        if HAS_RES:
            pivot = round_to(pivot + tl.load(res_ptr + r_row).to(tl.float32), res_ty).to(tl.float32)
    acc_mean, acc_m2, amax = _looped_stats(x_ptr, res_ptr, res_out_ptr, x_row, r_row, out_row, cols, N, pivot, 1.0,
                                           dropout_p, dropout_scale, seed, IS_RMS, HAS_RES, DROPOUT, True, BLOCK_N)
    s, inv_s = _pow2_scale(amax, eps)
    redo = (s < 9.094947017729282e-13) | (s > 1099511627776.0)  # outside [2^-40, 2^40]
    s = tl.where(redo, s, 1.0)
    inv_s = tl.where(redo, inv_s, 1.0)
    pivot = pivot * s
    if redo:  # rare: pass 1 again, on the scaled values
        acc_mean, acc_m2, amax = _looped_stats(x_ptr, res_ptr, res_out_ptr, x_row, r_row, out_row, cols, N, pivot, s,
                                               dropout_p, dropout_scale, seed, IS_RMS, HAS_RES, DROPOUT, False,
                                               BLOCK_N)
    if IS_RMS:
        rstd_s, rstd = _scaled_rstd(tl.sum(acc_m2, axis=0) / N, s, eps)
        shift = 0.0
    else:
        lane_count = ((N - cols + BLOCK_N - 1) // BLOCK_N).to(tl.float32)
        shift = tl.sum(lane_count * acc_mean, axis=0) / N
        dm = acc_mean - shift
        var = tl.sum(acc_m2 + lane_count * dm * dm, axis=0) / N
        rstd_s, rstd = _scaled_rstd(var, s, eps)
        tl.store(mean_ptr + row, (pivot + shift) * inv_s)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        if HAS_RES:
            v = tl.load(res_out_ptr + out_row + c, mask=ok, other=0.0).to(tl.float32)
        else:
            v = tl.load(x_ptr + x_row + c, mask=ok, other=0.0).to(tl.float32)
        y = ((v * s - pivot) - shift) * rstd_s
        if HAS_WEIGHT:
            w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
            if IS_RMS:
                w = w + offset
            if CAST_BEFORE_WEIGHT:
                y = round_to(y, out_ty).to(tl.float32)
            y = y * w
        if HAS_BIAS:
            y = y + tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_row + c, round_to(y, out_ty), mask=ok)


# --------------------------------------------------------------------------------------
# launcher
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
    *,
    offset: float = 0.0,
    cast_before_weight: bool = False,
    residual_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """LayerNorm / RMSNorm forward, with the (dropout +) residual add fused when ``residual``
    is given.

    Args:
        x: ``(*, *normalized_shape)`` float16 / bfloat16 / float32, ``normalized_ndim``
            trailing dims normalized; any strides.
        residual: None or the same shape as ``x``, x's dtype or float32.
        weight, bias: None or ``normalized_shape`` (x's dtype or float32). ``rms`` ignores bias.
        config: launch configuration; default :func:`forward_config` of the shape.
        offset: RMSNorm's scale is ``offset + weight`` (float32).
        cast_before_weight: round ``x_hat`` to x's dtype before the weight multiply.
        residual_dtype: dtype of ``residual_out`` (default x's; float32 for ``residual_in_fp32``).
        dropout_p, seed: input dropout before the residual add (needs ``residual``).

    Returns:
        ``(out, residual_out, mean, rstd)``: ``out`` contiguous in x's dtype,
        ``residual_out`` (None without a residual) contiguous in ``residual_dtype``; ``mean``
        (None for RMSNorm) and ``rstd`` float32 of the leading shape.
    """
    lead = list(x.shape[: x.dim() - normalized_ndim])
    layout = row_layout([x] if residual is None else [x, residual], normalized_ndim)
    m, n = layout.m, layout.n
    dev = x.device
    out = _empty(x.shape, x.dtype, dev)
    res_out = None if residual is None else _empty(x.shape, residual_dtype or x.dtype, dev)
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
    dropout = residual is not None and dropout_p > 0.0
    args = (xs, rs, w, b, out, res_out if res_out is not None else out,
            mean if mean is not None else rstd, rstd,
            m, n, layout.inner_rows, x_so, x_si, r_so, r_si, float(eps), float(offset) if rms else 0.0,
            float(dropout_p) if dropout else 0.0, 1.0 / (1.0 - dropout_p) if dropout else 1.0, int(seed))
    flags = dict(IS_RMS=rms, HAS_RES=residual is not None, HAS_WEIGHT=w is not None, HAS_BIAS=b is not None,
                 CAST_BEFORE_WEIGHT=bool(cast_before_weight) and w is not None and x.dtype != torch.float32,
                 DROPOUT=dropout)
    with device_guard(x):
        if cfg.looped:
            launch(_norm_fwd_looped_kernel, (m,), *args, **flags, BLOCK_N=cfg.block_n,
                   num_warps=cfg.num_warps)
        else:
            launch(_norm_fwd_kernel, (triton.cdiv(m, cfg.block_m),), *args, **flags, BLOCK_M=cfg.block_m,
                   BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
    return out, res_out, mean, rstd


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPEC_SEED = 0x2545F4914F6CDD1D >> 2
"""A dropout seed as the op draws them (below 2**62: an i64 kernel argument)."""


def meta(*shape: int, dtype: torch.dtype) -> Tensor:
    """A tensor on the meta device: shapes and strides for recording a launch, no memory."""
    return torch.empty(shape, dtype=dtype, device="meta")


def meta_rows(m: int, n: int, dtype: torch.dtype, two_strides: bool) -> Tensor:
    """``m`` rows of ``n``: contiguous, or a (S, B, n) transpose of a (B, S, n) tensor (B = 8),
    whose rows take two strides (``inner_rows`` a runtime argument)."""
    if two_strides:
        return meta(8, m // 8, n, dtype=dtype).transpose(0, 1)
    return meta(m, n, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class SpecOptions:
    """The options of one compile-report case (the launch specializations they select)."""

    offset: float = 0.0
    cast: bool = False
    fp32_residual: bool = False
    dropout: bool = False

    def tag(self) -> str:
        return "".join([("_offset" if self.offset else ""), ("_cast" if self.cast else ""),
                        ("_fp32res" if self.fp32_residual else ""), ("_dropout" if self.dropout else "")])


PLAIN = SpecOptions()
"""No LLM option: LayerNorm / RMSNorm as torch has them."""


def _fwd_spec(name: str, m: int, n: int, dt: str, rms: bool, res: bool, two_strides: bool = False,
              opts: SpecOptions = PLAIN) -> CompileSpec:
    dtype = DTYPES[dt]

    def call():
        x = meta_rows(m, n, dtype, two_strides)
        rdt = torch.float32 if opts.fp32_residual else dtype
        residual = meta(*x.shape, dtype=rdt) if res else None
        bias = None if rms else meta(n, dtype=dtype)
        return norm_forward(x, residual, 1, meta(n, dtype=dtype), bias, 1e-5, rms, offset=opts.offset,
                            cast_before_weight=opts.cast, residual_dtype=rdt,
                            dropout_p=0.1 if opts.dropout else 0.0, seed=SPEC_SEED if opts.dropout else 0)

    looped = n > MAX_FUSED_FWD_BYTES // dtype.itemsize
    kernel = _norm_fwd_looped_kernel if looped else _norm_fwd_kernel
    tag = "_two_strides" if two_strides else ""
    return CompileSpec(f"{name}_fwd{'_looped' if looped else ''}_{dt}_n{n}{tag}{opts.tag()}", kernel, call)


def compile_specs() -> list[CompileSpec]:
    """Both forward kernels as launched for 4096 rows (256 of the longest) on an A100 / H100:
    short rows several per program, 1024 up to the largest register block (16384 bf16 / 8192
    fp32), the looped path just past it and at 262144, rows taking two strides (a transposed
    (S, B, N) view), rows of 1000 (no length divisible by 16: Triton's specializations cannot
    vectorize), and the LLM options: RMSNorm's offset with Llama's casting, the residual
    stream in float32, input dropout."""
    table = [  # (name, n, dtype, rms, residual); 4096 rows, 256 of 262144
        ("ln", 128, "bf16", False, False), ("ln", 1024, "bf16", False, False),
        ("ln", 4096, "bf16", False, False), ("ln", 16384, "bf16", False, False),
        ("ln", 8192, "fp32", False, False), ("rms", 4096, "bf16", True, False),
        ("rms", 8192, "fp32", True, False), ("add_ln", 4096, "fp16", False, True),
        ("add_ln", 8192, "fp32", False, True), ("ln", 262144, "bf16", False, False),
        ("rms", 262144, "bf16", True, False), ("add_ln", 16384, "fp32", False, True),
    ]
    specs = [_fwd_spec(name, 256 if n > 65536 else 4096, n, dt, rms, res) for name, n, dt, rms, res in table]
    specs += [_fwd_spec("ln", 4096, 4096, "bf16", False, False, two_strides=True),
              _fwd_spec("ln", 4000, 1000, "bf16", False, False)]
    llm = SpecOptions(offset=1.0, cast=True)
    stream = SpecOptions(offset=1.0, cast=True, fp32_residual=True, dropout=True)
    specs += [_fwd_spec("rms", 4096, 4096, "bf16", True, False, opts=llm),
              _fwd_spec("add_rms", 4096, 4096, "bf16", True, True, opts=llm),
              _fwd_spec("add_rms", 4096, 4096, "bf16", True, True, opts=stream),
              _fwd_spec("add_rms", 256, 65536, "bf16", True, True, opts=stream),
              _fwd_spec("add_ln", 4096, 4096, "bf16", False, True, opts=SpecOptions(fp32_residual=True, dropout=True))]
    return specs
