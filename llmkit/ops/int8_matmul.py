"""Int8 quantization and int8 matrix multiplication.

Ops (inference only: no autograd):

* ``llmkit::quantize_int8(x, dim) -> (q, scale)``: symmetric per-row absmax
  quantization along ``dim``. ``scale = absmax / 127`` (float32, ``x``'s shape with
  ``dim`` removed); ``q = clamp(round_half_even(x * (127 / absmax)), -127, 127)`` as
  int8, computed in float32. A row of zeros gives scale 0 and zeros; a row holding
  NaN or inf gives scale NaN / inf and zeros, so the bad value stays in its row.
* ``llmkit::int8_matmul(a, b, a_scale, b_scale, bias, out_dtype) -> out``:
  ``a (*, K)`` int8 times ``b (K, N)`` int8 with exact int32 accumulation. Without
  scales the int32 product is returned. With scales the epilogue computes
  ``acc * a_scale[..., None] * b_scale[None, :] + bias`` in float32 and writes
  ``out_dtype`` (default float32).
* ``llmkit::int8_linear(input, weight, weight_scale, bias, mode, activation) -> out``:
  ``input (*, K)`` float16 / bfloat16 / float32 times the int8 weight ``(N, K)`` with
  per-output-channel float32 ``weight_scale (N,)``, ``+ bias``, then the optional
  ``activation`` ("none", "gelu", "gelu_tanh"), in the input dtype.
  ``mode="w8a8"`` quantizes the activations per token on the fly and multiplies in
  int8; ``mode="w8a16"`` multiplies the activations by the dequantized weight (the
  int8 weight never exists in float in memory on the triton and CPU paths).

K is limited to ``MAX_K`` (131071) for the int8 x int8 products, so the int32
accumulator cannot overflow.

Backends. ``triton`` (kernels/int8_matmul.py): quantization kernel, tensor-core int8
GEMM with the epilogue fused, W8A16 GEMM and split-K GEMV. ``reference``: PyTorch;
``torch._int_mm`` (int8 GEMM with int32 accumulation) where it applies and an exact
float64 product otherwise (exact: every partial sum is an integer below 2**53 for
K < 2**39). On the CPU, W8A16 splits the activations into int8 terms that go through
``torch._int_mm`` too (:func:`w8a16_cpu`): faster than a float32 ``F.linear`` and
within ~1e-7 (relative) of the exact product with the dequantized weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._compat import int_mm
from ..dispatch import DispatchPoint
from . import _validate as V

__all__ = ["quantize_int8", "int8_matmul", "int8_linear", "dequantize_int8"]

quantize_forward = DispatchPoint("quantize_int8", "forward")
int8_matmul_forward = DispatchPoint("int8_matmul", "forward")
int8_linear_forward = DispatchPoint("int8_linear", "forward")

ACTIVATIONS = ("none", "gelu", "gelu_tanh")
MAX_K = (2**31 - 1) // (128 * 128)
"""Largest K whose int32 accumulation cannot overflow (|a|, |b| <= 128): 131071."""
MODES = ("w8a8", "w8a16")
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _norm_dim(op: str, x: Tensor, dim: int, name: str = "x") -> int:
    if x.dim() == 0:
        raise ValueError(f"{op}: {name} must have at least 1 dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for {name} of shape {list(x.shape)}")
    return dim % x.dim()


def check_quantize_args(op: str, x: Tensor, dim: int) -> int:
    """x floating of any shape; returns dim made non-negative."""
    V.check_tensor(op, "x", x)
    V.check_floating(op, "x", x)
    return _norm_dim(op, x, dim)


def check_dequantize_args(op: str, q: Tensor, scale: Tensor, dim: int, dtype: torch.dtype) -> int:
    """q int8 of any shape; scale floating with q's shape minus ``dim``, on q's device;
    ``dtype`` a floating dtype. Returns dim made non-negative."""
    check_int8(op, "q", q)
    d = _norm_dim(op, q, dim, "q")
    V.check_tensor(op, "scale", scale)
    V.check_floating(op, "scale", scale)
    want = list(q.shape[:d]) + list(q.shape[d + 1 :])
    if list(scale.shape) != want:
        raise ValueError(
            f"{op}: scale has shape {list(scale.shape)}; it must be {want}, q's shape {list(q.shape)} "
            f"without dim {d} (one scale per row, as quantize_int8 returns it)"
        )
    V.check_same_device(op, q=q, scale=scale)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{op}: dtype must be a floating torch.dtype, got {dtype!r}")
    return d


def check_int8(op: str, name: str, t: Tensor) -> None:
    """``t`` must be an int8 tensor."""
    V.check_tensor(op, name, t)
    if t.dtype != torch.int8:
        raise TypeError(
            f"{op}: {name} has dtype {V.dtype_name(t.dtype)}; it must be int8 "
            "(quantize float data with llmkit.ops.quantize_int8 first)"
        )


def check_int8_matmul_args(
    op: str,
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None,
    b_scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype | None,
) -> None:
    """a (*, K) int8, b (K, N) int8, optional scales/bias; see module docstring."""
    check_int8(op, "a", a)
    check_int8(op, "b", b)
    if a.dim() < 1:
        raise ValueError(f"{op}: a must have at least 1 dimension, got a 0-d tensor")
    if b.dim() != 2:
        raise ValueError(f"{op}: b must be 2-D (K, N), got shape {list(b.shape)}")
    if a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"{op}: K mismatch: a has {a.shape[-1]} columns (shape {list(a.shape)}) but b has "
            f"{b.shape[0]} rows (shape {list(b.shape)})"
        )
    if a.shape[-1] > MAX_K:
        raise ValueError(
            f"{op}: K = {a.shape[-1]} is too large: the int32 accumulator is exact only up to "
            f"K = {MAX_K}; split the product along K"
        )
    if (a_scale is None) != (b_scale is None):
        raise ValueError(f"{op}: give both a_scale and b_scale, or neither (int32 output)")
    if a_scale is None:
        if bias is not None:
            raise ValueError(f"{op}: bias needs a_scale and b_scale (the int32 output has no epilogue)")
        if out_dtype not in (None, torch.int32):
            raise ValueError(
                f"{op}: without scales the output is int32, got out_dtype={V.dtype_name(out_dtype)}"
            )
    else:
        V.check_tensor(op, "a_scale", a_scale)
        V.check_tensor(op, "b_scale", b_scale)
        V.check_dtype(op, "a_scale", a_scale, (torch.float32,))
        V.check_dtype(op, "b_scale", b_scale, (torch.float32,))
        rows = list(a.shape[:-1])
        if list(a_scale.shape) not in (rows, [], [1]):
            raise ValueError(
                f"{op}: a_scale has shape {list(a_scale.shape)}; it must be {rows} (one scale per "
                "row of a) or a single value"
            )
        n = b.shape[1]
        if list(b_scale.shape) not in ([n], [], [1]):
            raise ValueError(
                f"{op}: b_scale has shape {list(b_scale.shape)}; it must be [{n}] (one scale per "
                "column of b) or a single value"
            )
        if out_dtype is not None and out_dtype not in _OUT_DTYPES:
            raise TypeError(
                f"{op}: out_dtype {V.dtype_name(out_dtype)} is not supported; use float16, "
                "bfloat16 or float32"
            )
    if bias is not None:
        V.check_tensor(op, "bias", bias)
        V.check_dtype(op, "bias", bias, _OUT_DTYPES)
        if list(bias.shape) != [b.shape[1]]:
            raise ValueError(f"{op}: bias has shape {list(bias.shape)}; it must be [{b.shape[1]}]")
    V.check_same_device(op, a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)


def check_int8_linear_args(
    op: str,
    input: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    mode: str,
    activation: str,
) -> None:
    """input (*, K) float16/bfloat16/float32; weight (N, K) int8; weight_scale (N,) float32."""
    V.check_tensor(op, "input", input)
    V.check_dtype(op, "input", input, _OUT_DTYPES)
    check_int8(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (N, K), got shape {list(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: K mismatch: input has {input.shape[-1] if input.dim() else 0} features "
            f"(shape {list(input.shape)}) but weight expects {weight.shape[1]} (shape {list(weight.shape)})"
        )
    V.check_tensor(op, "weight_scale", weight_scale)
    V.check_dtype(op, "weight_scale", weight_scale, (torch.float32,))
    if list(weight_scale.shape) != [weight.shape[0]]:
        raise ValueError(
            f"{op}: weight_scale has shape {list(weight_scale.shape)}; it must be [{weight.shape[0]}], "
            "one scale per output channel"
        )
    if bias is not None:
        V.check_tensor(op, "bias", bias)
        V.check_dtype(op, "bias", bias, (input.dtype, torch.float32))
        if list(bias.shape) != [weight.shape[0]]:
            raise ValueError(f"{op}: bias has shape {list(bias.shape)}; it must be [{weight.shape[0]}]")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "w8a8" and weight.shape[1] > MAX_K:
        raise ValueError(
            f"{op}: K = {weight.shape[1]} is too large for mode='w8a8': the int32 accumulator is "
            f"exact only up to K = {MAX_K}; use mode='w8a16'"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    V.check_same_device(op, input=input, weight=weight, weight_scale=weight_scale, bias=bias)


# --------------------------------------------------------------------------------------
# reference backend
# --------------------------------------------------------------------------------------


@quantize_forward.register("reference")
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
def int8_matmul_reference(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None,
    b_scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """int8 GEMM with exact int32 accumulation and a float32 epilogue."""
    lead = list(a.shape[:-1])
    acc = int8_mm_exact(_rows2d(a), b)
    if a_scale is None:
        return acc.reshape(lead + [b.shape[1]])
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
    qs, scales = [], []
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
def int8_linear_reference(
    input: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    mode: str,
    activation: str,
) -> Tensor:
    """W8A8 (dynamic per-token activation quantization) or W8A16.

    W8A16 on the CPU: :func:`w8a16_cpu` (int8 GEMMs, no float weight); on other devices
    the weight is dequantized to the input dtype and multiplied with ``F.linear``.
    """
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


# --------------------------------------------------------------------------------------
# triton backend (kernels/int8_matmul.py, imported on first use)
# --------------------------------------------------------------------------------------


def _kernels():
    from ..kernels import int8_matmul as kernels

    return kernels


@quantize_forward.register("triton", dtypes=_OUT_DTYPES)
def quantize_int8_triton(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-row quantization kernel, bit-exact to :func:`quantize_int8_reference`."""
    return _kernels().quantize_rows(x, dim)


@int8_matmul_forward.register("triton")
def int8_matmul_triton(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None,
    b_scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """Tensor-core int8 GEMM, exact int32 accumulation, scale/bias epilogue fused."""
    lead = list(a.shape[:-1])
    a2 = _rows2d(a)
    a_scale2 = None if a_scale is None else a_scale.reshape(-1)
    out = _kernels().int8_gemm(a2, b, a_scale2, b_scale, bias, out_dtype)
    return out.reshape(lead + [b.shape[1]])


@int8_linear_forward.register("triton")
def int8_linear_triton(
    input: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    mode: str,
    activation: str,
) -> Tensor:
    """W8A8: quantize kernel + int8 GEMM with the epilogue and activation fused.
    W8A16: weight dequantized inside the GEMM (M > 16) or the split-K GEMV (M <= 16)."""
    k = input.shape[-1]
    x2 = _rows2d(input)
    kernels = _kernels()
    if mode == "w8a8":
        out = kernels.w8a8_linear(x2, weight, weight_scale, bias, activation)
    else:
        out = kernels.w8a16_linear(x2, weight, weight_scale, bias, activation)
    return out.reshape(list(input.shape[:-1]) + [weight.shape[0]])


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("llmkit::quantize_int8", mutates_args=())
def _quantize_op(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    d = check_quantize_args("quantize_int8", x, dim)
    return quantize_forward(x, d)


@_quantize_op.register_fake
def _(x, dim):
    d = check_quantize_args("quantize_int8", x, dim)
    shape = list(x.shape)
    del shape[d]
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("llmkit::int8_matmul", mutates_args=())
def _int8_matmul_op(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None,
    b_scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    check_int8_matmul_args("int8_matmul", a, b, a_scale, b_scale, bias, out_dtype)
    return int8_matmul_forward(a, b, a_scale, b_scale, bias, out_dtype)


@_int8_matmul_op.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype):
    check_int8_matmul_args("int8_matmul", a, b, a_scale, b_scale, bias, out_dtype)
    dt = torch.int32 if a_scale is None else (out_dtype or torch.float32)
    return a.new_empty(list(a.shape[:-1]) + [b.shape[1]], dtype=dt)


@torch.library.custom_op("llmkit::int8_linear", mutates_args=())
def _int8_linear_op(
    input: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    mode: str,
    activation: str,
) -> Tensor:
    check_int8_linear_args("int8_linear", input, weight, weight_scale, bias, mode, activation)
    return int8_linear_forward(input, weight, weight_scale, bias, mode, activation)


@_int8_linear_op.register_fake
def _(input, weight, weight_scale, bias, mode, activation):
    check_int8_linear_args("int8_linear", input, weight, weight_scale, bias, mode, activation)
    return input.new_empty(list(input.shape[:-1]) + [weight.shape[0]])


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


def quantize_int8(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric per-row absmax int8 quantization along ``dim``.

    Args:
        x: float16 / bfloat16 / float32 / float64, any shape.
        dim: the dimension reduced by the absmax (each slice along it is one "row").

    Returns:
        ``(q, scale)``: ``q`` int8 with ``x``'s shape, ``scale`` float32 with ``x``'s
        shape minus ``dim``, such that ``x ~= q * scale.unsqueeze(dim)``.

    Inference only: with grad mode on, an ``x`` that requires grad is refused at the call.
    """
    dim = dim if type(dim) is int else V.check_int("quantize_int8", "dim", dim)
    V.check_no_grad("quantize_int8", x=x)
    return torch.ops.llmkit.quantize_int8(x, dim)


def dequantize_int8(q: Tensor, scale: Tensor, dim: int = -1, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_int8`: ``q * scale.unsqueeze(dim)`` in ``dtype``.

    ``q`` int8 of any shape; ``scale`` floating, ``q``'s shape without ``dim`` (as
    :func:`quantize_int8` returns it), on ``q``'s device; the product in float32.
    """
    dim = dim if type(dim) is int else V.check_int("dequantize_int8", "dim", dim)
    d = check_dequantize_args("dequantize_int8", q, scale, dim, dtype)
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(d)).to(dtype)


def int8_matmul(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None = None,
    b_scale: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """int8 ``a (*, K)`` @ int8 ``b (K, N)`` with int32 accumulation.

    Without scales returns the exact int32 product. With ``a_scale`` (per row of ``a``
    or one value) and ``b_scale`` (per column of ``b`` or one value), float32, returns
    ``acc * a_scale * b_scale + bias`` in ``out_dtype`` (float16 / bfloat16 / float32,
    default float32), the scaling fused into the GEMM's epilogue. Inference only: with grad
    mode on, a scale or bias that requires grad is refused at the call.
    """
    V.check_no_grad("int8_matmul", a_scale=a_scale, b_scale=b_scale, bias=bias)
    return torch.ops.llmkit.int8_matmul(a, b, a_scale, b_scale, bias, out_dtype)


def int8_linear(
    input: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    mode: str = "w8a8",
    activation: str = "none",
) -> Tensor:
    """``F.linear`` with an int8 weight.

    Args:
        input: ``(*, K)`` float16 / bfloat16 / float32.
        weight: int8 ``(N, K)`` (the ``nn.Linear`` layout); weight_scale: float32 ``(N,)``.
        bias: ``(N,)`` in the input dtype or float32, optional.
        mode: ``"w8a8"``: activations quantized per token on the fly, int8 x int8 GEMM;
            ``"w8a16"``: weight dequantized inside the GEMM, activations unchanged.
        activation: ``"none"``, ``"gelu"`` or ``"gelu_tanh"``, fused in the epilogue.

    Returns:
        ``(*, N)`` in the input dtype. Inference only: with grad mode on, an ``input``,
        ``weight_scale`` or ``bias`` that requires grad is refused at the call.
    """
    V.check_no_grad("int8_linear", input=input, weight_scale=weight_scale, bias=bias)
    return torch.ops.llmkit.int8_linear(input, weight, weight_scale, bias, mode, activation)
