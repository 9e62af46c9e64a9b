"""Int8 quantization and GEMMs on the reference backend.

``torch._int_mm`` (int8 GEMM with int32 accumulation, through :func:`llmkit._compat.int_mm`)
where it applies and an exact float64 product otherwise (exact: every partial sum is an
integer below 2**53 for K < 2**39). On the CPU, W8A16 splits the activations into int8
terms that go through ``torch._int_mm`` too (:func:`w8a16_cpu`): faster than a float32
``F.linear`` and within ~1e-7 (relative) of the exact product with the dequantized weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._compat import int_mm
from ...ops.int8_matmul import (
    Int8LinearCall,
    Int8MatmulCall,
    QuantizeInt8Call,
    int8_linear_forward,
    int8_matmul_forward,
    quantize_forward,
)


@quantize_forward.register("reference")
def quantize_int8_forward_reference(c: QuantizeInt8Call) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization along ``c.dim`` (float32 arithmetic)."""
    return quantize_int8_reference(c.x, c.dim)


def quantize_int8_reference(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization along ``dim`` (float32 arithmetic).

    Written for few passes over ``x`` on the CPU (abs + amax, one multiply, one rounding
    in place, one cast); the clamp and the NaN clean-up only run on the rare rows that
    need them (|round(x * (127 / absmax))| <= 127 holds whenever 127 / absmax is finite).
    """
    xf = x.to(torch.float32)
    if x.shape[dim] == 0:
        absmax = xf.sum(dim, keepdim=True)
    else:
        absmax = xf.abs().amax(dim=dim, keepdim=True)
    scale = absmax / 127.0
    usable = (absmax > 0) & torch.isfinite(absmax)
    # a true float32 division (python's ``127.0 / tensor`` is reciprocal-then-multiply in torch)
    inv = torch.where(usable, absmax.new_tensor(127.0) / torch.where(usable, absmax, 1.0), 0.0)
    q = torch.mul(xf, inv).round_()
    if not bool(usable.all()) or not bool(torch.isfinite(inv).all()):
        q.clamp_(-127.0, 127.0).nan_to_num_(nan=0.0)
    return q.to(torch.int8).contiguous(), scale.squeeze(dim).contiguous()


def _rows2d(t: Tensor) -> Tensor:
    """``t (*, K)`` as ``(rows, K)``, a view where possible (also for K = 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _int_mm_applies(a2: Tensor, b: Tensor) -> bool:
    if a2.device.type == "cpu":
        return True
    m, k = a2.shape
    n = b.shape[1]
    return a2.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0 and k >= 16


def int8_mm_exact(a2: Tensor, b: Tensor) -> Tensor:
    """Exact int32 product of int8 ``a2 (M, K)`` and ``b (K, N)``."""
    m, n = a2.shape[0], b.shape[1]
    if m == 0 or n == 0 or a2.shape[1] == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a2.device)
    if _int_mm_applies(a2, b):
        return int_mm(a2, b)
    return torch.matmul(a2.to(torch.float64), b.to(torch.float64)).to(torch.int32)


def _activate(out: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(out)
    if activation == "gelu_tanh":
        return F.gelu(out, approximate="tanh")
    return out


def _epilogue(
    acc: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Tensor | None, activation: str, out_dtype: torch.dtype
) -> Tensor:
    out = acc.to(torch.float32)  # a new tensor: the scaling below runs in place
    out.mul_(a_scale.reshape(-1, 1) if a_scale.numel() != 1 else a_scale.reshape(()))
    out.mul_(b_scale.reshape(1, -1) if b_scale.numel() != 1 else b_scale.reshape(()))
    if bias is not None:
        out.add_(bias.to(torch.float32))
    return _activate(out, activation).to(out_dtype)


@int8_matmul_forward.register("reference")
def int8_matmul_reference(c: Int8MatmulCall) -> Tensor:
    """int8 GEMM with exact int32 accumulation and a float32 epilogue."""
    a, b, a_scale, b_scale, bias, out_dtype = c
    lead = list(a.shape[:-1])
    acc = int8_mm_exact(_rows2d(a), b)
    if a_scale is None:
        return acc.reshape(lead + [b.shape[1]])
    assert b_scale is not None  # (validated: both scales or neither)
    out = _epilogue(acc, a_scale, b_scale, bias, "none", out_dtype or torch.float32)
    return out.reshape(lead + [b.shape[1]])


W8A16_CPU_TERMS: dict[torch.dtype, int] = {torch.float32: 3, torch.float16: 3, torch.bfloat16: 3}
"""Int8 terms the CPU W8A16 path splits each activation row into, per input dtype.

Relative L2 error of the split against the exact float64 product with the dequantized
weight (K=300, Gaussian rows / rows with a 100x outlier channel): T=2: 2.8e-5 / 1.4e-4
(91 / 77 dB); T=3: 1.2e-7 / 5.9e-7 (138 / 125 dB). Rounding the exact result to the
output dtype alone costs 1.6e-3 (bfloat16), 2.1e-4 (float16), 2.6e-8 (float32): with
outliers T=2 would be visible in bfloat16 (0.2 dB), T=3 is not, in any dtype.
"""

INT_MM_ROW_CALLS = 8
"""Up to this many int8 rows, one ``torch._int_mm`` call per row: with the weight in its
``(N, K)`` layout ATen takes a matrix-vector path for a single row that is ~10x faster
than its GEMM at 2..16 rows (measured on the 2-core CI machine at K = N = 4096)."""


def _int_mm_weight(q: Tensor, weight: Tensor) -> Tensor:
    """Exact int32 ``q (R, K) @ weight (N, K)^T`` on the CPU, ``(R, N)``."""
    wt = weight.t()
    if q.shape[0] <= INT_MM_ROW_CALLS:
        return torch.cat([int_mm(q[i : i + 1], wt) for i in range(q.shape[0])])
    return int_mm(q, wt)


def _w8a16_dequantized(
    x2: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    """float32 ``x2 @ (weight * weight_scale)^T + bias``, activated (a float32 weight copy)."""
    w = weight.to(torch.float32) * weight_scale[:, None]
    out = F.linear(x2.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return _activate(out, activation)


def w8a16_cpu(x2: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """W8A16 on the CPU through ``torch._int_mm``, without a float copy of the weight.

    Each activation row is split into T int8 terms, ``x ~= sum_t s_t q_t`` with
    ``(q_t, s_t) = quantize_int8(x - sum_{u<t} s_u q_u)`` (T = ``W8A16_CPU_TERMS``, 3);
    all terms go through one exact int32 GEMM with the int8 weight (one matrix-vector
    call per row below ``INT_MM_ROW_CALLS`` rows) and are combined in float32. Each term
    shrinks the residual by
    >= 254x, so the activations are represented to within ``absmax / (254 * 254**(T-1))``
    per row: ~2**-24 of the row's absmax for T = 3, below the rounding of the result to
    float16 / bfloat16 and near float32's (see ``W8A16_CPU_TERMS`` for figures).
    Rows with a non-finite input or output are recomputed with a dequantized float32
    weight, so inf / NaN come out as the float product gives them.

    Returns float32 ``(M, N)``.
    """
    m = x2.shape[0]
    residual = x2.to(torch.float32)
    qs: list[Tensor] = []
    scales: list[Tensor] = []
    for t in range(W8A16_CPU_TERMS[x2.dtype]):
        if t:
            residual = residual - qs[-1].to(torch.float32) * scales[-1][:, None]
        q, s = quantize_int8_reference(residual, -1)
        qs.append(q)
        scales.append(s)
    acc = _int_mm_weight(torch.cat(qs) if len(qs) > 1 else qs[0], weight)
    out = acc[:m].to(torch.float32).mul_(scales[0][:, None])
    for t in range(1, len(qs)):
        out.add_(acc[t * m : (t + 1) * m].to(torch.float32).mul_(scales[t][:, None]))
    out.mul_(weight_scale)
    if bias is not None:
        out.add_(bias.to(torch.float32))
    out = _activate(out, activation)
    bad = ~torch.isfinite(out).all(dim=1)
    if bool(bad.any()):
        out[bad] = _w8a16_dequantized(x2[bad], weight, weight_scale, bias, activation)
    return out


@int8_linear_forward.register("reference")
def int8_linear_reference(c: Int8LinearCall) -> Tensor:
    """W8A8 (dynamic per-token activation quantization) or W8A16.

    W8A16 on the CPU: :func:`w8a16_cpu` (int8 GEMMs, no float weight); on other devices
    the weight is dequantized to the input dtype and multiplied with ``F.linear``.
    """
    input, weight, weight_scale, bias, mode, activation = c
    k = input.shape[-1]
    n = weight.shape[0]
    lead = list(input.shape[:-1])
    x2 = _rows2d(input)
    if x2.shape[0] == 0 or n == 0 or k == 0:
        out = torch.zeros((x2.shape[0], n), dtype=torch.float32, device=input.device)
        if bias is not None:
            out = out + bias.to(torch.float32)
        out = _activate(out, activation).to(input.dtype)
    elif mode == "w8a8":
        q, s = quantize_int8_reference(x2, -1)
        acc = _int_mm_weight(q, weight) if input.device.type == "cpu" else int8_mm_exact(q, weight.t())
        out = _epilogue(acc, s, weight_scale, bias, activation, input.dtype)
    elif input.device.type == "cpu":
        out = w8a16_cpu(x2, weight, weight_scale, bias, activation).to(input.dtype)
    else:
        w = (weight.to(torch.float32) * weight_scale[:, None]).to(input.dtype)
        out = _activate(F.linear(x2, w, None if bias is None else bias.to(input.dtype)), activation)
    return out.reshape(lead + [n]).contiguous()
