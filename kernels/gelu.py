"""Triton GELU and fused bias + GELU, forward and backward.

Elementwise over a tensor seen as ``M`` rows of ``N`` elements (``N`` = the last dim;
a contiguous input without bias is seen as one row of ``numel`` elements). Rows may be
strided as in :func:`llmkit.kernels._common.row_layout`; outputs are contiguous.
Math is float32 whatever the input dtype, rounded once on store:

* exact: ``gelu(z) = 0.5 z (1 + erf(z / sqrt 2))``,
  ``gelu'(z) = 0.5 (1 + erf(z / sqrt 2)) + z exp(-z^2 / 2) / sqrt(2 pi)``;
* tanh: ``gelu(z) = 0.5 z (1 + tanh(u)) = z * sigmoid(2u)``, ``u = sqrt(2/pi) (z + 0.044715 z^3)``,
  written with ``e = exp(-2u)`` as ``z / (1 + e)`` so no ``1 + tanh`` cancels;
  ``gelu'(z) = s + 2 z s (1 - s) u'`` with ``s = 1 / (1 + e)`` and ``1 - s = e s``.

With a bias, ``z = x + bias[col]`` is formed in float32 and never stored. The bias
gradient is reduced without atomics: each program sums ``dz`` of its group of rows for
one column tile into its own row of a ``(groups, N)`` float32 buffer, and
:func:`~llmkit.kernels._common.sum_partials` adds those rows in a fixed order.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import device_guard, flat_or_rows, num_warps_for, program_slots, round_to, sum_partials
from ._common import empty as _empty  # the allocation tests poison
from ._compile import CompileSpec
from ._launch import launch

TILE_ELEMENTS = 1024
"""Elements per program (8 per thread at 4 warps): few registers, many programs per SM."""


@dataclasses.dataclass(frozen=True)
class GeluConfig:
    """Launch configuration: tiles of ``block_m x block_n``, rows grouped for dbias."""

    block_m: int
    block_n: int
    num_warps: int
    groups: int
    rows_per_group: int


def gelu_config(m: int, n: int, slots: int, bias_grad: bool = False) -> GeluConfig:
    """Tiles of ``TILE_ELEMENTS`` values; with ``bias_grad`` about 4 programs per SM, each
    looping over a group of rows."""
    block_n = min(triton.next_power_of_2(n), TILE_ELEMENTS)
    block_m = max(1, min(triton.next_power_of_2(m), TILE_ELEMENTS // block_n))
    row_blocks = triton.cdiv(m, block_m)
    groups = row_blocks
    if bias_grad:
        groups = min(row_blocks, max(1, triton.cdiv(4 * slots, triton.cdiv(n, block_n))))
    rows_per_group = triton.cdiv(row_blocks, groups) * block_m
    groups = triton.cdiv(m, rows_per_group)
    return GeluConfig(block_m, block_n, num_warps_for(block_m * block_n), groups, rows_per_group)


# Kernels keep their helpers inline: see the note in kernels/_common.py.


@triton.jit
def _gelu_fwd_kernel(
    x_ptr, b_ptr, out_ptr,
    M, N, inner_rows, x_stride_outer, x_stride_inner, col_blocks,
    APPROX_TANH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = gelu(x [+ bias]) on one ``BLOCK_M x BLOCK_N`` tile."""
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x_row = (rows // inner_rows).to(tl.int64) * x_stride_outer + (rows % inner_rows).to(tl.int64) * x_stride_inner
    z = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if APPROX_TANH:
        u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)  # 2u
        # z * sigmoid(2u); below 2u = -80 (z < ~-9.3) it is under 1e-33 and, from z ~ -1e12 on
        # (z^3 overflows), z / (1 + exp(80)) would not be: 0 there (0 * z: z = -inf gives NaN, as
        # float64's formula)
        y = tl.where(u2 < -80.0, 0.0 * z, z / (1.0 + tl.exp(tl.minimum(-u2, 80.0))))
    else:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_offs, round_to(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    dy_ptr, x_ptr, b_ptr, dx_ptr, db_part_ptr,
    M, N, inner_rows, dy_stride_outer, dy_stride_inner, x_stride_outer, x_stride_inner,
    rows_per_group, col_blocks,
    APPROX_TANH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx = dy * gelu'(x [+ bias]) for one group of rows in one column tile; with a bias,
    the group's column sums of dx (float32, before rounding) go to row ``group`` of the partials."""
    pid = tl.program_id(0)
    group = pid // col_blocks
    cols = (pid % col_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_begin = group * rows_per_group
    row_end = tl.minimum(row_begin + rows_per_group, M)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        outer = (rows // inner_rows).to(tl.int64)
        inner = (rows % inner_rows).to(tl.int64)
        dy_row = outer * dy_stride_outer + inner * dy_stride_inner
        x_row = outer * x_stride_outer + inner * x_stride_inner
        dy = tl.load(dy_ptr + dy_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z = z + bias[None, :]
        if APPROX_TANH:
            u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)
            e = tl.exp(tl.minimum(-u2, 80.0))
            s = 1.0 / (1.0 + e)
            du2 = 1.5957691216057308 * (1.0 + 0.134145 * z * z)  # d(2u)/dz
            grad = s + z * (e * s) * s * du2
            # the tails: below 2u = -80 the derivative is under 1e-33 (z * du2 could overflow
            # against e * s * s = 0 in between); above 2u = 80 it is 1 (e = 0 against z^3 = inf)
            # (times 0 * z: at z = +-inf the derivative stays NaN, as float64's)
            grad = tl.where(u2 < -80.0, 0.0, tl.where(u2 > 80.0, 1.0, grad)) + 0.0 * z
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            grad = cdf + z * (0.3989422804014327 * tl.exp(-0.5 * z * z))
        dz = dy * grad
        out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(dx_ptr + out_offs, round_to(dz, dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += tl.where(mask, dz, 0.0)
    if HAS_BIAS:
        tl.store(db_part_ptr + group.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def gelu_forward(x: Tensor, bias: Tensor | None, approximate_tanh: bool) -> Tensor:
    """``gelu(x + bias)`` (``bias`` optional, shape ``(N,)`` for ``x (*, N)``); contiguous, x's dtype.

    ``x``: any shape and strides, float16 / bfloat16 / float32; ``bias``: the input's dtype
    or float32. The sum is formed in float32 and never written to memory.
    """
    out = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return out
    (xs,), m, n, inner_rows, ((so, si),) = flat_or_rows([x], flat_ok=bias is None)
    slots = program_slots(x.device)
    cfg = gelu_config(m, n, slots)
    col_blocks = triton.cdiv(n, cfg.block_n)
    b = bias.contiguous() if bias is not None else None
    with device_guard(x):
        launch(
            _gelu_fwd_kernel, (triton.cdiv(m, cfg.block_m) * col_blocks,),
            xs, b, out, m, n, inner_rows, so, si, col_blocks,
            APPROX_TANH=approximate_tanh, HAS_BIAS=b is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
    return out


def gelu_backward(
    grad_out: Tensor, x: Tensor, bias: Tensor | None, approximate_tanh: bool
) -> tuple[Tensor, Tensor | None]:
    """``(d x, d bias)`` of ``gelu(x + bias)``; ``d bias`` (None without a bias) sums ``d x``
    over the leading dims in float32 before it is rounded to the bias dtype.

    ``grad_out`` and ``x``: same shape, any strides; ``d x`` is contiguous in x's dtype.
    """
    dx = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        dbias = torch.zeros_like(bias, memory_format=torch.contiguous_format) if bias is not None else None
        return dx, dbias
    (dys, xs), m, n, inner_rows, ((dy_so, dy_si), (x_so, x_si)) = flat_or_rows([grad_out, x], flat_ok=bias is None)
    slots = program_slots(x.device)
    cfg = gelu_config(m, n, slots, bias_grad=bias is not None)
    col_blocks = triton.cdiv(n, cfg.block_n)
    b = bias.contiguous() if bias is not None else None
    parts = _empty((cfg.groups, n), torch.float32, x.device) if b is not None else None
    with device_guard(x):
        launch(
            _gelu_bwd_kernel, (cfg.groups * col_blocks,),
            dys, xs, b, dx, parts, m, n, inner_rows, dy_so, dy_si, x_so, x_si,
            cfg.rows_per_group, col_blocks,
            APPROX_TANH=approximate_tanh, HAS_BIAS=b is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
        dbias = sum_partials(parts, bias.dtype) if bias is not None and parts is not None else None
    return dx, dbias


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------


def _gelu_call(backward: bool, m: int, n: int, dtype: torch.dtype, has_bias: bool, tanh: bool):
    def call():
        x = torch.empty(m, n, dtype=dtype, device="meta")
        bias = torch.empty(n, dtype=dtype, device="meta") if has_bias else None
        if backward:
            return gelu_backward(torch.empty_like(x), x, bias, tanh)
        return gelu_forward(x, bias, tanh)
    return call


def compile_specs() -> list[CompileSpec]:
    """Both kernels as launched on an A100 / H100: a flat contiguous tensor, rows of 4096 with
    a bias (and its gradient), and short rows."""
    specs: list[CompileSpec] = []
    shapes = [("flat", 4096, 4096, False), ("bias_n4096", 8192, 4096, True), ("bias_n64", 8192, 64, True)]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for name, m, n, has_bias in shapes:
        for tanh in (False, True):
            for dt in (("bf16", "fp32") if name == "bias_n4096" else ("bf16",)):
                tag = f"{name}_{'tanh' if tanh else 'erf'}_{dt}"
                for backward, kernel in ((False, _gelu_fwd_kernel), (True, _gelu_bwd_kernel)):
                    specs.append(CompileSpec(f"gelu_{'bwd' if backward else 'fwd'}_{tag}", kernel,
                                             _gelu_call(backward, m, n, dtypes[dt], has_bias, tanh)))
    return specs
