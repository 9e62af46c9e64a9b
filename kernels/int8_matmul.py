"""Triton kernels for int8 inference matmuls (the activations' quantization is in
``quantize_int8.py``).

Kernels (all launched by the host functions at the bottom of this file):

* ``_int8_gemm_kernel``: ``A (M, K) int8 @ B (K, N) int8`` with exact int32
  accumulation on the integer tensor cores (``mma`` on sm_80, ``wgmma`` on sm_90) and
  a fused epilogue: ``acc * a_scale[m] * b_scale[n] + bias[n]``, optional GELU,
  cast to float16 / bfloat16 / float32; or the raw int32 accumulator.
* ``_w8a16_gemm_kernel``: ``X (M, K) float @ W (N, K)^T int8`` with the weight tile
  converted to X's dtype inside the kernel (so it never exists in float in global
  memory), float32 accumulation, epilogue ``acc * w_scale[n] + bias[n]``, GELU.
* ``_w8a16_gemv_kernel`` (+ ``_splitk_epilogue_kernel``): the skinny-M (M <= 16)
  W8A16 path for decode. The roles are swapped (``out^T = W @ X^T``) so the large
  weight tile is the MMA's M side and the few tokens are its N side; K is split
  across programs when ``N / BLOCK_N`` alone cannot fill the GPU, the partial sums
  reduced in a fixed order by a small epilogue kernel (deterministic results).

float32 activations in the W8A16 kernels are split into three parts that are each
exact in TF32 (``x = hi + mid + lo``); with the int8 weight exact in TF32 too, every
product on the tensor cores is exact and the result has float32 accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import _common  # noqa: F401  (Triton interpreter fixes, applied on import)
from ._buffers import i32_inner, out_buffer
from ._compile import CompileSpec
from ._int8_tiles import (  # noqa: F401  (GemmConfig, GemvConfig: part of this module's API)
    GemmConfig,
    GemvConfig,
    int8_gemm_config,
    w8a16_gemm_config,
    w8a16_gemv_config,
)
from ._launch import device_target, launch
from .quantize_int8 import quantize_rows

# Activation codes shared with the host wrappers.
ACT_NONE = 0
ACT_GELU = 1
ACT_GELU_TANH = 2
ACTIVATION_CODES = {"none": ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}

SKINNY_M = 16
"""W8A16 calls with at most this many rows take the GEMV (decode) kernel."""

# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _activation(c, ACTIVATION: tl.constexpr):
    """GELU on a float32 tile: exact (erf) or tanh-approximate, written as c * sigmoid(2u)."""
    if ACTIVATION == 1:
        c = 0.5 * c * (1.0 + tl.math.erf(c * 0.7071067811865476))
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (c + 0.044715 * c * c * c)
        c = c / (1.0 + tl.exp(-2.0 * u))
    return c


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (row tile, column tile), GROUP_M row tiles at a time
    so that neighbouring programs share B tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % rows_in_group
    pid_n = (pid % tiles_per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _tf32_parts(v):
    """Split float32 ``v`` into hi + mid + lo, each exactly representable in TF32."""
    hi = (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    rest = tl.where(hi == v, 0.0, v - hi)
    mid = (rest.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    lo = rest - mid
    return hi, mid, lo


@triton.jit
def _w8_dot(x, w, acc, W_LEFT: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + x @ w (``W_LEFT``: acc + w @ x) for an int8 weight tile ``w``, float32 accumulation.

    The weight is converted to x's dtype (exact: |w| <= 127). float32 x is split into
    three TF32-exact parts, so the tensor cores form exact products. Under the Triton
    interpreter (``INTERPRETER``), whose ``tl.dot`` multiplies bfloat16 bit patterns as
    integers (Triton 3.9), bfloat16 operands are widened to float32 first: the same exact
    products.
    """
    if x.dtype == tl.float32:
        w = w.to(tl.float32)
        x_hi, x_mid, x_lo = _tf32_parts(x)
        if W_LEFT:
            acc = tl.dot(w, x_hi, acc, input_precision="tf32")
            acc = tl.dot(w, x_mid, acc, input_precision="tf32")
            acc = tl.dot(w, x_lo, acc, input_precision="tf32")
        else:
            acc = tl.dot(x_hi, w, acc, input_precision="tf32")
            acc = tl.dot(x_mid, w, acc, input_precision="tf32")
            acc = tl.dot(x_lo, w, acc, input_precision="tf32")
    elif INTERPRETER and x.dtype == tl.bfloat16:
        if W_LEFT:
            acc = tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        w = w.to(x.dtype)
        if W_LEFT:
            acc = tl.dot(w, x, acc)
        else:
            acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _cast_out(c, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 tile -> the output dtype, rounding to nearest even.

    The Triton 3.9 interpreter truncates float32 -> bfloat16; there the rounding is done
    on the bits first (on the GPU the conversion itself rounds to nearest even).
    """
    if INTERPRETER and dtype == tl.bfloat16:
        bits = c.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        c = tl.where(c != c, c, bits.to(tl.float32, bitcast=True))
    return c.to(dtype)


@triton.jit
def _column_epilogue(acc, offs_n, N, w_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr, N_AXIS: tl.constexpr):
    """acc * w_scale[n] + bias[n], then the activation; ``N_AXIS`` is the tile axis of n."""
    n_mask = offs_n < N
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    if N_AXIS == 1:
        c = acc * w_scale[None, :]
    else:
        c = acc * w_scale[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if N_AXIS == 1:
            c = c + bias[None, :]
        else:
            c = c + bias[:, None]
    return _activation(c, ACTIVATION)


@triton.jit
def _int8_epilogue_store(acc, offs_m, offs_n, M, N, out_ptr, out_row_stride, a_scale_ptr, a_scale_stride,
                         b_scale_ptr, b_scale_stride, bias_ptr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                         INTERPRETER: tl.constexpr):
    """Store ``acc * a_scale[m] * b_scale[n] + bias[n]``, activated, in out's dtype."""
    a_scale = tl.load(a_scale_ptr + offs_m.to(tl.int64) * a_scale_stride, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n.to(tl.int64) * b_scale_stride, mask=offs_n < N, other=0.0)
    c = acc.to(tl.float32) * a_scale[:, None]
    c = c * b_scale[None, :]
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c = _activation(c, ACTIVATION)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    tl.store(out_ptrs, _cast_out(c, out_ptr.dtype.element_ty, INTERPRETER),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K,
    a_row_stride, a_k_stride, b_k_stride, b_n_stride, out_row_stride,
    a_scale_stride, b_scale_stride,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of int8 A @ int8 B, int32 accumulation, fused epilogue.

    ALIGNED (checked by the host): 0 no alignment known; 1 A and B 16-byte aligned with
    rows of A and columns of B contiguous along K; 2 the same with B's rows contiguous and
    N a multiple of 16.
    INTERPRETER: running under the Triton interpreter (see :func:`_cast_out`).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge read valid memory (wrapped) and are never stored.
    a_rows = (offs_m % M).to(tl.int64)
    b_cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * a_row_stride + offs_k[None, :] * a_k_stride
    b_ptrs = b_ptr + offs_k[:, None] * b_k_stride + b_cols[None, :] * b_n_stride
    if ALIGNED != 0:
        a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [16, 16]), [1, BLOCK_K])
        if ALIGNED == 1:
            b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [16, 16]), [BLOCK_K, 1])
        else:  # columns wrap at N (a multiple of 16 here): runs of 16 contiguous bytes, no more
            b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [16, 16]), [1, 16])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * a_k_stride
        b_ptrs += BLOCK_K * b_k_stride

    if HAS_SCALE:
        _int8_epilogue_store(acc, offs_m, offs_n, M, N, out_ptr, out_row_stride, a_scale_ptr, a_scale_stride,
                             b_scale_ptr, b_scale_stride, bias_ptr, HAS_BIAS, ACTIVATION, INTERPRETER)
    else:
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
        tl.store(out_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, bias_ptr,
    M, N, K,
    x_row_stride, x_k_stride, w_n_stride, w_k_stride, out_row_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of X @ dequant(W)^T; W's int8 tile is converted in registers.

    ALIGNED (checked by the host): X and W 16-byte aligned, their rows contiguous along K.
    INTERPRETER: see :func:`_w8_dot`.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = (offs_m % M).to(tl.int64)
    w_rows = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + x_rows[:, None] * x_row_stride + offs_k[None, :] * x_k_stride
    w_ptrs = w_ptr + offs_k[:, None] * w_k_stride + w_rows[None, :] * w_n_stride
    if ALIGNED:
        x_ptrs = tl.max_contiguous(tl.multiple_of(x_ptrs, [16, 16]), [1, BLOCK_K])
        w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [BLOCK_K, 1])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = _w8_dot(x, w, acc, False, INTERPRETER)
        x_ptrs += BLOCK_K * x_k_stride
        w_ptrs += BLOCK_K * w_k_stride

    c = _column_epilogue(acc, offs_n, N, w_scale_ptr, bias_ptr, HAS_BIAS, ACTIVATION, 1)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, _cast_out(c, out_ptr.dtype.element_ty, INTERPRETER), mask=out_mask)


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, w_ptr, out_ptr, partial_ptr, w_scale_ptr, bias_ptr,
    M, N, K, k_per_split,
    x_row_stride, x_k_stride, w_n_stride, w_k_stride, out_row_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out^T tile (BLOCK_N, BLOCK_M) = W tile @ X^T over one K range (M <= BLOCK_M).

    With SPLIT_K == 1 the epilogue is fused and ``out`` written; otherwise the float32
    partial sums go to ``partial (SPLIT_K, M, N)`` for ``_splitk_epilogue_kernel``.
    EVEN_K: K and k_per_split are multiples of BLOCK_K (no masks). ALIGNED (checked by
    the host): X and W 16-byte aligned, rows contiguous along K. INTERPRETER: see
    :func:`_w8_dot`.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    w_rows = (offs_n % N).to(tl.int64)
    x_rows = (offs_m % M).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * w_n_stride + (k_start + offs_k)[None, :] * w_k_stride
    x_ptrs = x_ptr + x_rows[None, :] * x_row_stride + (k_start + offs_k)[:, None] * x_k_stride
    if ALIGNED:
        w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [1, BLOCK_K])
        x_ptrs = tl.max_contiguous(tl.multiple_of(x_ptrs, [16, 16]), [BLOCK_K, 1])
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            xt = tl.load(x_ptrs)
        else:
            k_mask = (k + offs_k) < k_end
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0)
            xt = tl.load(x_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _w8_dot(xt, w, acc, True, INTERPRETER)
        w_ptrs += BLOCK_K * w_k_stride
        x_ptrs += BLOCK_K * x_k_stride

    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if SPLIT_K == 1:
        c = _column_epilogue(acc, offs_n, N, w_scale_ptr, bias_ptr, HAS_BIAS, ACTIVATION, 0)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * out_row_stride + offs_n[:, None]
        tl.store(out_ptrs, _cast_out(c, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    else:
        part_ptrs = partial_ptr + (pid_k.to(tl.int64) * M + offs_m[None, :]) * N + offs_n[:, None]
        tl.store(part_ptrs, acc, mask=mask)


@triton.jit
def _splitk_epilogue_kernel(
    partial_ptr, out_ptr, w_scale_ptr, bias_ptr,
    M, N, out_row_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K partials of one row block in a fixed order, then the W8A16 epilogue."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(partial_ptr + (m.to(tl.int64) + s * M) * N + offs_n, mask=n_mask, other=0.0)
    c = _column_epilogue(acc[None, :], offs_n, N, w_scale_ptr, bias_ptr, HAS_BIAS, ACTIVATION, 1)
    tl.store(out_ptr + m.to(tl.int64) * out_row_stride + offs_n[None, :],
             _cast_out(c, out_ptr.dtype.element_ty, INTERPRETER), mask=n_mask[None, :])


# --------------------------------------------------------------------------------------
# host functions
# --------------------------------------------------------------------------------------


def _arch(device: torch.device) -> int:
    """The compute capability launches on ``device`` plan for; the interpreter runs the sm_80
    configurations."""
    target = device_target(device)
    return target.arch if target is not None else 80


INTERPRETER_SM_COUNT = 1
"""Multiprocessors assumed under the interpreter (one: the GEMV splits K only for small N)."""


def _sm_count(device: torch.device) -> int:
    target = device_target(device)
    return target.sms if target is not None else INTERPRETER_SM_COUNT


def _k_rows_aligned(t: torch.Tensor) -> bool:
    """2-D ``t`` (rows, K): contiguous along K, base and row stride multiples of 16 bytes."""
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _b_alignment(b: torch.Tensor) -> int:
    """``_int8_gemm_kernel``'s ALIGNED code for ``b (K, N)``, ignoring A.

    Code 2 (rows of B contiguous) also needs N % 16 == 0: the kernel wraps column indices
    past N to 0 and declares 16-byte vectors along N, which must not straddle the wrap.
    """
    if b.data_ptr() % 16:
        return 0
    if b.stride(0) == 1 and b.stride(1) % 16 == 0:
        return 1
    if b.stride(1) == 1 and b.stride(0) % 16 == 0 and b.shape[1] % 16 == 0:
        return 2
    return 0


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    activation: str = "none",
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 ``a (M, K)`` @ int8 ``b (K, N)`` (any strides), exact int32 accumulation.

    Without scales returns the int32 product ``(M, N)``. With float32 ``a_scale`` (M values
    or one) and ``b_scale`` (N values or one) returns ``acc * a_scale * b_scale + bias``
    with ``activation`` applied, in ``out_dtype`` (default float32), fused in the epilogue.
    ``out``: an optional contiguous ``(M, N)`` buffer of that dtype to write.
    """
    a = i32_inner(a)
    b = i32_inner(b.t()).t()  # K offsets of b in int32
    m, k = a.shape
    n = b.shape[1]
    has_scale = a_scale is not None
    dtype = (out_dtype or torch.float32) if has_scale else torch.int32
    out = out_buffer(out, [m, n], dtype, a.device, "int8_gemm")
    if m == 0 or n == 0:
        return out
    aligned = _b_alignment(b) if _k_rows_aligned(a) else 0
    cfg = config or int8_gemm_config(m, _arch(a.device), aligned != 0, activation)
    if a_scale is not None and b_scale is not None:
        a_scale = a_scale.reshape(-1)
        b_scale = b_scale.reshape(-1)
        a_scale_stride = 0 if a_scale.numel() == 1 else a_scale.stride(0)
        b_scale_stride = 0 if b_scale.numel() == 1 else b_scale.stride(0)
    else:
        a_scale = b_scale = out  # never read
        a_scale_stride = b_scale_stride = 0
    if bias is not None:
        bias = bias.contiguous()
    launch(
        _int8_gemm_kernel, (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N),),
        a, b, out, a_scale, b_scale, bias if bias is not None else out,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        a_scale_stride, b_scale_stride,
        HAS_SCALE=has_scale, HAS_BIAS=bias is not None, ACTIVATION=ACTIVATION_CODES[activation],
        EVEN_K=k % cfg.BLOCK_K == 0, ALIGNED=aligned, INTERPRETER=a.device.type == "cpu",
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K)`` float quantized per row, times int8 ``weight (N, K)``, in ``x``'s dtype."""
    q, s = quantize_rows(x, 1)
    return int8_gemm(q, weight.t(), s, weight_scale, bias, x.dtype, activation, config, out)


def w8a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    config: GemmConfig | GemvConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K)`` float16 / bfloat16 / float32 times int8 ``weight (N, K)`` dequantized in
    the kernel (``weight_scale (N,)`` float32), ``+ bias``, activation; output in ``x``'s dtype.

    M <= SKINNY_M takes the GEMV kernel (``config`` a :class:`GemvConfig`), larger M the
    GEMM kernel (``config`` a :class:`GemmConfig`). ``out``: an optional contiguous
    ``(M, N)`` buffer of x's dtype to write.
    """
    x, weight = i32_inner(x), i32_inner(weight)
    m, k = x.shape
    n = weight.shape[0]
    out = out_buffer(out, [m, n], x.dtype, x.device, "w8a16_linear")
    if m == 0 or n == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()
    weight_scale = weight_scale.contiguous()
    bias_arg = bias if bias is not None else weight_scale
    act = ACTIVATION_CODES[activation]
    aligned = _k_rows_aligned(x) and _k_rows_aligned(weight)
    interpreter = x.device.type == "cpu"
    if m <= SKINNY_M and not isinstance(config, GemmConfig):
        cfg = config or w8a16_gemv_config(n, k, x.dtype, _sm_count(x.device), aligned)
        k_per_split = triton.cdiv(triton.cdiv(max(k, 1), cfg.SPLIT_K), cfg.BLOCK_K) * cfg.BLOCK_K
        split = max(1, triton.cdiv(k, k_per_split))
        partial = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        launch(
            _w8a16_gemv_kernel, (triton.cdiv(n, cfg.BLOCK_N), split),
            x, weight, out, partial, weight_scale, bias_arg,
            m, n, k, k_per_split,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
            HAS_BIAS=bias is not None, ACTIVATION=act, SPLIT_K=split, EVEN_K=k % cfg.BLOCK_K == 0,
            ALIGNED=aligned, INTERPRETER=interpreter, BLOCK_M=SKINNY_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split > 1:
            block = min(1024, triton.next_power_of_2(n))
            launch(
                _splitk_epilogue_kernel, (m, triton.cdiv(n, block)),
                partial, out, weight_scale, bias_arg, m, n, out.stride(0),
                HAS_BIAS=bias is not None, ACTIVATION=act, SPLIT_K=split, INTERPRETER=interpreter, BLOCK_N=block,
                num_warps=4,
            )
        return out
    gemm = config if isinstance(config, GemmConfig) else w8a16_gemm_config(m, x.dtype, _arch(x.device), aligned)
    launch(
        _w8a16_gemm_kernel, (triton.cdiv(m, gemm.BLOCK_M) * triton.cdiv(n, gemm.BLOCK_N),),
        x, weight, out, weight_scale, bias_arg,
        m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, ACTIVATION=act, EVEN_K=k % gemm.BLOCK_K == 0, ALIGNED=aligned,
        INTERPRETER=interpreter, BLOCK_M=gemm.BLOCK_M, BLOCK_N=gemm.BLOCK_N, BLOCK_K=gemm.BLOCK_K, GROUP_M=gemm.GROUP_M,
        num_warps=gemm.num_warps, num_stages=gemm.num_stages,
    )
    return out


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------

_DTYPE_OF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "i32": torch.int32}


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _int8_gemm_spec(name: str, m: int, out_ty: str, has_scale: bool, bias_ty: str | None, activation: str,
                    b_layout: str = "weight", k: int = 4096, n: int = 4096) -> CompileSpec:
    """``b_layout``: "weight" (``b`` the transpose of an (N, K) weight: K contiguous) or "rows"
    (``b`` an (K, N) row-major matrix)."""
    def call():
        a = _meta(m, k, dtype=torch.int8)
        b = _meta(n, k, dtype=torch.int8).t() if b_layout == "weight" else _meta(k, n, dtype=torch.int8)
        if not has_scale:
            return int8_gemm(a, b, None, None, None, None)
        bias = _meta(n, dtype=_DTYPE_OF[bias_ty]) if bias_ty else None
        return int8_gemm(a, b, _meta(m, dtype=torch.float32), _meta(n, dtype=torch.float32), bias,
                         _DTYPE_OF[out_ty], activation)
    return CompileSpec(name, _int8_gemm_kernel, call, matrix=True)


def _w8a16_call(m: int, x_ty: str, has_bias: bool, activation: str, k: int = 4096,
                n: int = 4096) -> Callable[[], torch.Tensor]:
    def call():
        x = _meta(m, k, dtype=_DTYPE_OF[x_ty])
        bias = _meta(n, dtype=_DTYPE_OF[x_ty]) if has_bias else None
        return w8a16_linear(x, _meta(n, k, dtype=torch.int8), _meta(n, dtype=torch.float32), bias, activation)
    return call


@functools.cache
def compile_specs() -> list[CompileSpec]:
    """Every kernel of this file as launched for representative shapes (K = N = 4096 unless
    said): the W8A8 GEMM with int32 output,
    every epilogue, a row-major B and an odd K (operands not 16-byte aligned, smaller tiles);
    the W8A16 GEMM; rows and columns not multiples of 16 (Triton specializes less); the W8A16
    GEMV for one decode token on a GPT-2-sized vocabulary (no split) and for 1, 4 and 16 tokens
    (the three specializations of M: 1, runtime, divisible by 16) with K split across
    programs, then the split-K epilogue.
    """
    return [
        _int8_gemm_spec("int8_gemm[int32,M>64]", 4096, "i32", False, None, "none"),
        _int8_gemm_spec("int8_gemm[bf16,bias,gelu,M>64]", 4096, "bf16", True, "bf16", "gelu"),
        _int8_gemm_spec("int8_gemm[fp16,bias,M<=64]", 64, "fp16", True, "fp16", "none"),
        _int8_gemm_spec("int8_gemm[fp32,gelu_tanh,M<=64]", 64, "fp32", True, None, "gelu_tanh"),
        _int8_gemm_spec("int8_gemm[int32,B rows contiguous]", 4096, "i32", False, None, "none", b_layout="rows"),
        _int8_gemm_spec("int8_gemm[fp16,bias,gelu,unaligned]", 4096, "fp16", True, "fp32", "gelu", k=4095),
        _int8_gemm_spec("int8_gemm[bf16,bias,gelu,M=1000,N=1000]", 1000, "bf16", True, "bf16", "gelu", n=1000),
        CompileSpec("w8a16_gemm[bf16,bias,M>64]", _w8a16_gemm_kernel, _w8a16_call(4096, "bf16", True, "none"),
                    matrix=True),
        CompileSpec("w8a16_gemm[fp16,gelu,M<=64]", _w8a16_gemm_kernel, _w8a16_call(64, "fp16", False, "gelu"),
                    matrix=True),
        CompileSpec("w8a16_gemm[fp32,bias]", _w8a16_gemm_kernel, _w8a16_call(4096, "fp32", True, "none"),
                    matrix=True),
        CompileSpec("w8a16_gemm[bf16,bias,M=1000,N=1000]", _w8a16_gemm_kernel,
                    _w8a16_call(1000, "bf16", True, "none", n=1000), matrix=True),
        CompileSpec("w8a16_gemm[bf16,bias,unaligned]", _w8a16_gemm_kernel,
                    _w8a16_call(4096, "bf16", True, "none", k=4095), matrix=True),
        CompileSpec("w8a16_gemv[bf16,bias,gelu_tanh,M=1,N=50257]", _w8a16_gemv_kernel,
                    _w8a16_call(1, "bf16", True, "gelu_tanh", k=768, n=50257), matrix=True),
        *[CompileSpec(f"w8a16_gemv[{ty},{'bias,' if bias else ''}split-k,M={m}]", _w8a16_gemv_kernel,
                      _w8a16_call(m, ty, bias, "none"), matrix=True)
          for ty, bias in (("bf16", True), ("fp16", False), ("fp32", True)) for m in (1, 4, 16)],
        CompileSpec("w8a16_gemv[bf16,bias,unaligned,M=1]", _w8a16_gemv_kernel,
                    _w8a16_call(1, "bf16", True, "none", k=4095), matrix=True),
        CompileSpec("w8a16_gemv[bf16,bias,unaligned,M=16]", _w8a16_gemv_kernel,
                    _w8a16_call(16, "bf16", True, "none", k=4095), matrix=True),
        CompileSpec("splitk_epilogue[bf16,bias,gelu,M=16]", _splitk_epilogue_kernel,
                    _w8a16_call(16, "bf16", True, "gelu")),
    ]
