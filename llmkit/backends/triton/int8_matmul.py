"""Int8 quantization and GEMMs on the triton backend (``kernels/int8_matmul.py``, imported on
first use): the quantization kernel, the tensor-core int8 GEMM with the epilogue fused, the
W8A16 GEMM and its split-K GEMV."""

from __future__ import annotations

import math

from torch import Tensor

from ...ops.int8_matmul import (
    OUT_DTYPES,
    Int8LinearCall,
    Int8MatmulCall,
    QuantizeInt8Call,
    int8_linear_forward,
    int8_matmul_forward,
    quantize_forward,
)


def _kernels():
    from ...kernels import int8_matmul as kernels

    return kernels


def _rows2d(t: Tensor) -> Tensor:
    """``t (*, K)`` as ``(rows, K)``, a view where possible (also for K = 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


@quantize_forward.register("triton", dtypes=OUT_DTYPES)
def quantize_int8_triton(c: QuantizeInt8Call) -> tuple[Tensor, Tensor]:
    """Per-row quantization kernel, bit-exact to the reference."""
    return _kernels().quantize_rows(c.x, c.dim % c.x.dim())


@int8_matmul_forward.register("triton")
def int8_matmul_triton(c: Int8MatmulCall) -> Tensor:
    """Tensor-core int8 GEMM, exact int32 accumulation, scale/bias epilogue fused."""
    lead = list(c.a.shape[:-1])
    a_scale2 = None if c.a_scale is None else c.a_scale.reshape(-1)
    out = _kernels().int8_gemm(_rows2d(c.a), c.b, a_scale2, c.b_scale, c.bias, c.out_dtype)
    return out.reshape(lead + [c.b.shape[1]])


@int8_linear_forward.register("triton")
def int8_linear_triton(c: Int8LinearCall) -> Tensor:
    """W8A8: quantize kernel + int8 GEMM with the epilogue and activation fused.
    W8A16: weight dequantized inside the GEMM (M > 16) or the split-K GEMV (M <= 16)."""
    x2 = _rows2d(c.input)
    kernels = _kernels()
    linear = kernels.w8a8_linear if c.mode == "w8a8" else kernels.w8a16_linear
    out = linear(x2, c.weight, c.weight_scale, c.bias, c.activation)
    return out.reshape(list(c.input.shape[:-1]) + [c.weight.shape[0]])
