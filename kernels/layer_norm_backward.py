"""Triton LayerNorm, RMSNorm and fused (dropout +) residual-add + norm: the backward kernels.

Rows as in :mod:`.layer_norm` (strided rows read in place, outputs contiguous, float32
math); launch configurations from :func:`.layer_norm.backward_config`, no autotuning.

* ``_norm_bwd_kernel``: ``dx``, and per-program partial sums of ``dweight`` /
  ``dbias`` over a contiguous group of rows (no atomics). Single-block rows compute
  the row sums ``mean(g * xhat)`` and ``mean(g)`` in registers; long rows get them
  from ``_norm_bwd_row_sums_kernel`` and are tiled over columns too.
* :func:`~._common.sum_partials`: the second pass, summing the partial rows in a fixed
  order: the same inputs give the same bits.

RMSNorm's ``g = dy * (offset + weight)``; with ``CAST_XHAT`` (``cast_before_weight``) the
weight gradient sums ``dy`` times ``x_hat`` rounded to ``dy``'s dtype, as the forward
multiplied it. With ``HAS_DRES`` the backward adds ``grad_residual_out`` to ``dx`` before its
single rounding; with ``DROPOUT`` it also writes ``d input = dsum * keep / (1 - p)``,
regenerating the forward's keep mask from the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import layer_norm as _ln  # the configurations, looked up at call time (tests replace them)
from ._common import device_guard, num_warps_for, program_slots, round_to, row_layout, sum_partials, sum_partials_kernel
from ._common import empty as _empty  # the allocation tests poison
from ._compile import CompileSpec
from ._launch import launch
from .layer_norm import (
    DTYPES,
    LOOP_BLOCK_N,
    MAX_FUSED_BWD_BYTES,
    PLAIN,
    SPEC_SEED,
    NormConfig,
    SpecOptions,
    meta,
    meta_rows,
)


@triton.jit
def _norm_bwd_row_sums_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, row_sums_ptr,
    N, inner_rows,
    dy_stride_outer, dy_stride_inner, x_stride_outer, x_stride_inner, offset,
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
            w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
            if IS_RMS:
                w = w + offset
            g = g * w
        acc_gx += g * tl.where(ok, (x - mean) * rstd, 0.0)  # padding lanes: (0 - mean) * rstd may be inf
        acc_g += g
    sums = row_sums_ptr + 2 * row.to(tl.int64)
    tl.store(sums, tl.sum(acc_gx, axis=0) / N)
    tl.store(sums + 1, tl.sum(acc_g, axis=0) / N)


@triton.jit(do_not_specialize=["seed"])
def _norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, row_sums_ptr, dres_ptr, dx_ptr, din_ptr, dw_part_ptr, db_part_ptr,
    M, N, inner_rows,
    dy_stride_outer, dy_stride_inner, x_stride_outer, x_stride_inner, dres_stride_outer, dres_stride_inner,
    rows_per_group, col_blocks, offset, dropout_p, dropout_scale, seed,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DRES: tl.constexpr, STORE_DX: tl.constexpr,
    DW: tl.constexpr, DB: tl.constexpr, ROW_SUMS_GIVEN: tl.constexpr, CAST_XHAT: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        if IS_RMS:
            w = w + offset
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
            # padding lanes read x = 0: (0 - mean) * rstd may overflow for a huge mean, and 0 * inf is NaN
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
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
            tl.store(dx_ptr + out_offs, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
            if DROPOUT:
                keep = tl.rand(seed, out_offs) > dropout_p
                tl.store(din_ptr + out_offs, round_to(tl.where(keep, dx * dropout_scale, 0.0),
                                                      din_ptr.dtype.element_ty), mask=mask)
        if DW:
            if CAST_XHAT:
                acc_dw += dy * round_to(xhat, dy_ptr.dtype.element_ty).to(tl.float32)
            else:
                acc_dw += dy * xhat
        if DB:
            acc_db += dy
    part = group.to(tl.int64) * N + cols
    if DW:
        tl.store(dw_part_ptr + part, tl.sum(acc_dw, axis=0), mask=col_ok)
    if DB:
        tl.store(db_part_ptr + part, tl.sum(acc_db, axis=0), mask=col_ok)


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
    *,
    offset: float = 0.0,
    cast_before_weight: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """LayerNorm / RMSNorm backward from the saved statistics.

    Args:
        grad_out, x: ``(*, *normalized_shape)``, any strides; ``x`` is the normalized
            input (``residual_out`` for the add variants); ``grad_out`` in the output's dtype
            (which differs from x's with ``residual_in_fp32``).
        weight, bias: None or ``normalized_shape`` (bias is ignored for RMSNorm).
        mean (None for RMSNorm), rstd: float32 statistics of the leading shape.
        output_mask: ``[dx, dweight, dbias]`` wanted.
        grad_residual: added to ``dx`` in float32 before its one rounding (the add variants);
            ``dx`` is then always computed.
        config: launch configuration; default :func:`.layer_norm.backward_config` of the shape.
        offset, cast_before_weight: RMSNorm's options, as in the forward.
        dropout_p, seed: the forward's input dropout (with ``grad_residual``): ``d input``
            is ``dsum`` where the input was kept, times ``1 / (1 - p)``.

    Returns:
        ``(dx, dweight, dbias, d_input)``: ``dx`` contiguous in x's dtype (zeros when not
        wanted); ``dweight`` / ``dbias`` summed over the rows in the parameter's shape and
        dtype, None when not wanted or the parameter is absent; ``d_input`` (x's dtype) with
        dropout, else None.
    """
    want_dx = bool(output_mask[0]) or grad_residual is not None
    want_dw = bool(output_mask[1]) and weight is not None
    want_db = len(output_mask) > 2 and bool(output_mask[2]) and bias is not None and not rms
    dropout = grad_residual is not None and dropout_p > 0.0
    tensors = [grad_out, x] + ([grad_residual] if grad_residual is not None else [])
    layout = row_layout(tensors, normalized_ndim)
    m, n = layout.m, layout.n
    dev = x.device
    dx = _empty(x.shape, x.dtype, dev) if want_dx else torch.zeros(x.shape, dtype=x.dtype, device=dev)
    d_in = _empty(x.shape, x.dtype, dev) if dropout else None
    if m == 0 or n == 0:  # nothing to normalize: the sums over no rows are zero
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if weight is not None and want_dw else None
        db = torch.zeros_like(bias, memory_format=torch.contiguous_format) if bias is not None and want_db else None
        return dx, dw, db, d_in
    if not (want_dx or want_dw or want_db):
        return dx, None, None, d_in
    cfg = config or _ln.backward_config(m, n, x.element_size(), program_slots(dev))
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
    off = float(offset) if rms else 0.0
    with device_guard(x):
        if cfg.looped and want_dx:
            launch(
                _norm_bwd_row_sums_kernel, (m,), dys, xs, w, mean_arg, rstd_arg, row_sums, n, layout.inner_rows,
                dy_so, dy_si, x_so, x_si, off, IS_RMS=rms, HAS_WEIGHT=w is not None,
                BLOCK_N=LOOP_BLOCK_N, num_warps=num_warps_for(LOOP_BLOCK_N),
            )
        col_blocks = triton.cdiv(n, cfg.block_n)
        launch(
            _norm_bwd_kernel, (cfg.groups * col_blocks,),
            dys, xs, w, mean_arg, rstd_arg, row_sums, dres, dx, d_in if d_in is not None else dx, dw_part, db_part,
            m, n, layout.inner_rows, dy_so, dy_si, x_so, x_si, dr_so, dr_si,
            cfg.rows_per_group, col_blocks, off, float(dropout_p) if dropout else 0.0,
            1.0 / (1.0 - dropout_p) if dropout else 1.0, int(seed),
            IS_RMS=rms, HAS_WEIGHT=w is not None, HAS_DRES=grad_residual is not None, STORE_DX=want_dx,
            DW=want_dw, DB=want_db, ROW_SUMS_GIVEN=cfg.looped,
            CAST_XHAT=rms and bool(cast_before_weight) and grad_out.dtype != torch.float32, DROPOUT=dropout,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
        dw = sum_partials(dw_part, weight.dtype).view(weight.shape) if weight is not None and want_dw else None
        db = sum_partials(db_part, bias.dtype).view(bias.shape) if bias is not None and want_db else None
    return dx, dw, db, d_in


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------


def _bwd_call(m: int, n: int, dt: str, rms: bool, dres: bool, two_strides: bool = False,
              opts: SpecOptions = PLAIN) -> Callable[[], object]:
    dtype = DTYPES[dt]

    def call():
        xdt = torch.float32 if opts.fp32_residual else dtype
        x = meta_rows(m, n, xdt, two_strides)
        dy = meta(*x.shape, dtype=dtype)
        stats = meta(*x.shape[:-1], dtype=torch.float32)
        bias = None if rms else meta(n, dtype=dtype)
        return norm_backward(dy, x, 1, meta(n, dtype=dtype), bias, None if rms else stats, stats,
                             [True, True, not rms], meta(*x.shape, dtype=xdt) if dres else None, rms,
                             offset=opts.offset, cast_before_weight=opts.cast, dropout_p=0.1 if opts.dropout else 0.0,
                             seed=SPEC_SEED if opts.dropout else 0)
    return call


def _bwd_spec(name: str, m: int, n: int, dt: str, rms: bool, dres: bool, two_strides: bool = False,
              opts: SpecOptions = PLAIN) -> CompileSpec:
    xdt = torch.float32 if opts.fp32_residual else DTYPES[dt]
    kind = "tiled" if n > MAX_FUSED_BWD_BYTES // xdt.itemsize else "fused"
    return CompileSpec(
        f"{name}_bwd_{kind}_{dt}_n{n}" + ("_dres" if dres else "") + ("_two_strides" if two_strides else "")
        + opts.tag(), _norm_bwd_kernel, _bwd_call(m, n, dt, rms, dres, two_strides, opts),
    )


def compile_specs() -> list[CompileSpec]:
    """Every backward kernel as launched for 4096 rows on an A100 / H100: short rows several
    per program, 1024 up to the largest register block (8192 bf16 / 4096 fp32), the tiled path
    just past it, rows taking two strides, rows of 1000, the LLM options (RMSNorm's offset with
    Llama's casting, the residual stream in float32 with input dropout), the row sums of long
    rows and the sums of partial rows."""
    table = [  # (name, n, dtype, rms, grad_residual)
        ("ln", 128, "bf16", False, False), ("ln", 1024, "bf16", False, False),
        ("ln", 8192, "bf16", False, False), ("ln", 4096, "fp32", False, True),
        ("rms", 8192, "bf16", True, False), ("ln", 16384, "bf16", False, True),
        ("rms", 8192, "fp32", True, False),
    ]
    specs = [_bwd_spec(name, 4096, n, dt, rms, dres) for name, n, dt, rms, dres in table]
    specs += [_bwd_spec("ln", 4096, 4096, "bf16", False, False, two_strides=True),
              _bwd_spec("ln", 4000, 1000, "bf16", False, False)]
    llm = SpecOptions(offset=1.0, cast=True)
    stream = SpecOptions(offset=1.0, cast=True, fp32_residual=True, dropout=True)
    specs += [_bwd_spec("rms", 4096, 4096, "bf16", True, False, opts=llm),
              _bwd_spec("add_rms", 4096, 4096, "bf16", True, True, opts=stream),
              _bwd_spec("add_rms", 4096, 16384, "bf16", True, True, opts=stream),
              _bwd_spec("add_ln", 4096, 4096, "bf16", False, True, opts=SpecOptions(fp32_residual=True, dropout=True))]
    for rms in (False, True):
        specs.append(CompileSpec(f"{'rms' if rms else 'ln'}_bwd_row_sums_bf16_n16384", _norm_bwd_row_sums_kernel,
                                 _bwd_call(4096, 16384, "bf16", rms, False)))
    specs.append(CompileSpec("rms_bwd_row_sums_bf16_n16384_offset", _norm_bwd_row_sums_kernel,
                             _bwd_call(4096, 16384, "bf16", True, True, opts=llm)))
    for g, n, dt in ((264, 1024, "fp32"), (264, 8192, "bf16"), (8, 262144, "bf16")):
        specs.append(CompileSpec(f"sum_partials_{dt}_g{g}_n{n}", sum_partials_kernel, _sum_call(g, n, DTYPES[dt])))
    return specs


def _sum_call(g: int, n: int, dtype: torch.dtype) -> Callable[[], object]:
    return lambda: sum_partials(meta(g, n, dtype=torch.float32), dtype)
