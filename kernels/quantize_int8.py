"""Triton kernel for per-row int8 quantization (the activations of W8A8 matmuls and
``llmkit.ops.quantize_int8``).

``_quantize_rows_kernel``: per-row symmetric absmax quantization of a float16 / bfloat16 /
float32 ``(R, C)`` view (any strides) to int8 plus a float32 scale per row. Rows of up to
``MAX_SINGLE_PASS_COLS`` columns are read once (held in registers between the absmax and the
rounding); longer rows take two passes. Bit-exact with the reference backend's quantization:
the scale is ``div_rn(absmax, 127)``, the multiplier ``div_rn(127, absmax)``, the rounding is
round-half-even of the float32 product, and FP fusion is off at launch so no product is
contracted into an FMA.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from . import _common  # noqa: F401  (Triton interpreter fixes, applied on import)
from ._buffers import out_buffer, rows_view
from ._compile import CompileSpec
from ._launch import launch

MAX_SINGLE_PASS_COLS = 16384
"""Rows up to this length are quantized with a single read of the activations."""


@triton.jit
def _round_half_even(y):
    """Round float32 ``y`` to the nearest integer, ties to even (exact for |y| < 2**23)."""
    r = tl.floor(y)
    frac = y - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & r_is_odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _quantize_block(x, inv):
    """int8 ``clamp(round_half_even(x * inv), -127, 127)``; NaN products give 0."""
    r = _round_half_even(x * inv)
    r = tl.where(r != r, 0.0, r)
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    return r.to(tl.int8)


@triton.jit
def _row_scales(absmax, nan_count):
    """(scale, multiplier) per row from the absmax of its non-NaN values.

    scale = absmax / 127 (NaN for rows holding a NaN); multiplier = 127 / absmax, or 0
    for rows whose absmax is 0, inf or NaN.
    """
    usable = (absmax > 0.0) & (absmax <= 3.4028234663852886e38) & (nan_count == 0)
    scale = tl.math.div_rn(absmax, 127.0)
    scale = tl.where(nan_count > 0, float("nan"), scale)
    inv = tl.math.div_rn(127.0, tl.where(usable, absmax, 1.0))
    inv = tl.where(usable, inv, 0.0)
    return scale, inv


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr,
    n_rows, n_cols,
    x_row_stride, x_col_stride, q_row_stride, q_col_stride,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """Quantize BLOCK_ROWS rows per program; writes q (int8) and one scale per row."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * x_row_stride
    q_rows = q_ptr + rows64[:, None] * q_row_stride
    cols = tl.arange(0, BLOCK_COLS)
    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :] * x_col_stride, mask=mask, other=0.0).to(tl.float32)
        is_nan = x != x
        absmax = tl.max(tl.where(is_nan, 0.0, tl.abs(x)), axis=1)
        nan_count = tl.sum(is_nan.to(tl.int32), axis=1)
        scale, inv = _row_scales(absmax, nan_count)
        q = _quantize_block(x, inv[:, None])
        tl.store(q_rows + cols[None, :] * q_col_stride, q, mask=mask)
    else:
        absmax = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        nan_count = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
        for start in range(0, n_cols, BLOCK_COLS):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            x = tl.load(x_rows + c[None, :] * x_col_stride, mask=mask, other=0.0).to(tl.float32)
            is_nan = x != x
            absmax = tl.maximum(absmax, tl.max(tl.where(is_nan, 0.0, tl.abs(x)), axis=1))
            nan_count += tl.sum(is_nan.to(tl.int32), axis=1)
        scale, inv = _row_scales(absmax, nan_count)
        for start in range(0, n_cols, BLOCK_COLS):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            x = tl.load(x_rows + c[None, :] * x_col_stride, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + c[None, :] * q_col_stride, _quantize_block(x, inv[:, None]), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Rows per program, columns per load and whether the row is read once."""

    BLOCK_ROWS: int
    BLOCK_COLS: int
    SINGLE_PASS: bool
    num_warps: int


def quantize_config(n_cols: int) -> QuantizeConfig:
    """Default launch configuration of ``_quantize_rows_kernel`` for rows of ``n_cols``."""
    if n_cols <= MAX_SINGLE_PASS_COLS:
        cols = max(16, triton.next_power_of_2(max(n_cols, 1)))
        rows = max(1, 2048 // cols)
        warps = max(1, min(16, cols * rows // 512))
        return QuantizeConfig(rows, cols, True, warps)
    return QuantizeConfig(1, 4096, False, 8)


def quantize_rows(
    x: torch.Tensor, dim: int, q: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization of ``x`` along ``dim`` (see the module docstring).

    Args:
        x: float16 / bfloat16 / float32, any shape and strides; ``dim`` non-negative.
        q, scale: optional contiguous output buffers (int8 ``x.shape``, float32 ``x.shape``
            without ``dim``); allocated when not given.

    Returns:
        ``q`` int8, contiguous, ``x``'s shape; ``scale`` float32, ``x``'s shape without ``dim``.
    """
    scale_shape = list(x.shape)
    n_cols = scale_shape.pop(dim)
    q = out_buffer(q, list(x.shape), torch.int8, x.device, "q")
    scale = out_buffer(scale, scale_shape, torch.float32, x.device, "scale")
    if x.numel() == 0:
        return q, scale.zero_()
    x2 = rows_view(x, dim)
    if x2 is None:
        x2 = x.movedim(dim, -1).reshape(-1, n_cols).contiguous()
    q2 = rows_view(q, dim)
    q_tmp = None
    if q2 is None:
        q_tmp = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        q2 = q_tmp
    cfg = quantize_config(n_cols)
    rows = x2.shape[0]
    launch(
        _quantize_rows_kernel, (triton.cdiv(rows, cfg.BLOCK_ROWS),),
        x2, q2, scale,
        rows, n_cols,
        x2.stride(0), x2.stride(1), q2.stride(0), q2.stride(1),
        BLOCK_ROWS=cfg.BLOCK_ROWS, BLOCK_COLS=cfg.BLOCK_COLS, SINGLE_PASS=cfg.SINGLE_PASS,
        num_warps=cfg.num_warps, enable_fp_fusion=False,
    )
    if q_tmp is not None:
        q.copy_(q_tmp.view(list(x.movedim(dim, -1).shape)).movedim(-1, dim))
    return q, scale


_DTYPE_OF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _quantize_spec(name: str, x_ty: str, n_cols: int, rows: int = 4096) -> CompileSpec:
    return CompileSpec(name, _quantize_rows_kernel,
                       lambda: quantize_rows(torch.empty(rows, n_cols, dtype=_DTYPE_OF[x_ty], device="meta"), 1))


@functools.cache
def compile_specs() -> list[CompileSpec]:
    """The quantization kernel as launched for short, long and two-pass rows."""
    return [
        _quantize_spec("quantize_rows[bf16,K=64]", "bf16", 64),
        _quantize_spec("quantize_rows[fp16,K=4096]", "fp16", 4096),
        _quantize_spec("quantize_rows[fp32,K=16384]", "fp32", 16384),
        _quantize_spec("quantize_rows[fp32,K>16384,two-pass]", "fp32", MAX_SINGLE_PASS_COLS + 1, rows=64),
    ]
