"""Int8 on the cuda_ext backend: per-row quantization (CPU and CUDA), and on CUDA the
tensor-core int8 GEMM with the scale / bias epilogue fused and W8A8 linear (per-token
quantization + that GEMM with the activation fused)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from ...ops.int8_matmul import (
    Int8LinearCall,
    Int8MatmulCall,
    QuantizeInt8Call,
    int8_linear_forward,
    int8_matmul_forward,
    quantize_forward,
)
from ._common import BACKEND, CPU_DEFAULT, FLOAT_DTYPES, ext_ops, rows

_ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2}
GEMM_BLOCK_M = 64
"""Rows of ``a`` per block of the CUDA int8 GEMM (csrc/cuda/int8_matmul.cu ``kBM``): row blocks
sit on grid axis y, at most 65,535 of them."""
GRID_Y_MAX = 65_535


def grid_reasons(rows: int) -> Iterator[str]:
    """Why the CUDA GEMM cannot launch for ``rows`` rows of ``a`` (grid y holds the row blocks)."""
    blocks = -(-rows // GEMM_BLOCK_M)
    if blocks > GRID_Y_MAX:
        yield f"{rows} rows need {blocks} row blocks on grid axis y, more than CUDA's {GRID_Y_MAX}"


@quantize_forward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["quantize_int8.forward"])
def quantize_int8_cuda_ext(c: QuantizeInt8Call) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization along ``dim``, bit-exact to the reference."""
    xt = c.x.movedim(c.dim, -1)
    q2, scale = ext_ops().quantize_rows(rows(xt, xt.shape[-1]))
    q = q2.reshape(xt.shape).movedim(-1, c.dim).contiguous()
    return q, scale.reshape(xt.shape[:-1])


def _rows_of(t: Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


@int8_matmul_forward.register(BACKEND, devices=("cuda",), why_not=lambda c: grid_reasons(_rows_of(c.a)))
def int8_matmul_cuda_ext(c: Int8MatmulCall) -> Tensor:
    """Tensor-core int8 GEMM, int32 accumulation, scale/bias epilogue fused."""
    lead = list(c.a.shape[:-1])
    out = ext_ops().int8_gemm(
        rows(c.a, c.a.shape[-1]),
        c.b,
        False,
        None if c.a_scale is None else c.a_scale.reshape(-1),
        None if c.b_scale is None else c.b_scale.reshape(-1),
        c.bias,
        0,
        c.out_dtype,
    )
    return out.reshape(lead + [c.b.shape[1]])


def _int8_linear_why_not(c: Int8LinearCall) -> Iterator[str]:
    if c.mode != "w8a8":
        yield f"implements mode='w8a8' only, got mode={c.mode!r}"
    yield from grid_reasons(_rows_of(c.input))


@int8_linear_forward.register(BACKEND, devices=("cuda",), why_not=_int8_linear_why_not)
def int8_linear_cuda_ext(c: Int8LinearCall) -> Tensor:
    """W8A8: per-token quantization, int8 GEMM with the (N, K) weight, epilogue + activation."""
    q, s = ext_ops().quantize_rows(rows(c.input, c.input.shape[-1]))
    out = ext_ops().int8_gemm(q, c.weight, True, s, c.weight_scale, c.bias, _ACTIVATIONS[c.activation], c.input.dtype)
    return out.reshape(list(c.input.shape[:-1]) + [c.weight.shape[0]])
