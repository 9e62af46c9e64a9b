"""Int8 quantization and int8 matrix multiplication: what defines the ops.

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
accumulator cannot overflow. Dispatch points ``quantize_int8.forward``,
``int8_matmul.forward``, ``int8_linear.forward``; the implementations live in
``llmkit/backends/<backend>/int8_matmul.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _validate as V
from ._op import Op

__all__ = ["quantize_int8", "int8_matmul", "int8_linear", "dequantize_int8"]


class QuantizeInt8Call(NamedTuple):
    x: Tensor
    dim: int


class Int8MatmulCall(NamedTuple):
    a: Tensor
    b: Tensor
    a_scale: Tensor | None
    b_scale: Tensor | None
    bias: Tensor | None
    out_dtype: torch.dtype | None


class Int8LinearCall(NamedTuple):
    input: Tensor
    weight: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    mode: str
    activation: str


quantize_forward = DispatchPoint("quantize_int8", "forward", QuantizeInt8Call)
int8_matmul_forward = DispatchPoint("int8_matmul", "forward", Int8MatmulCall)
int8_linear_forward = DispatchPoint("int8_linear", "forward", Int8LinearCall)

ACTIVATIONS = ("none", "gelu", "gelu_tanh")
MAX_K = (2**31 - 1) // (128 * 128)
"""Largest K whose int32 accumulation cannot overflow (|a|, |b| <= 128): 131071."""
MODES = ("w8a8", "w8a16")
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
            raise ValueError(f"{op}: without scales the output is int32, got out_dtype={V.dtype_name(out_dtype)}")
    else:
        a_scale = V.check_tensor(op, "a_scale", a_scale)
        b_scale = V.check_tensor(op, "b_scale", b_scale)
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
        if out_dtype is not None and out_dtype not in OUT_DTYPES:
            raise TypeError(
                f"{op}: out_dtype {V.dtype_name(out_dtype)} is not supported; use float16, bfloat16 or float32"
            )
    if bias is not None:
        V.check_tensor(op, "bias", bias)
        V.check_dtype(op, "bias", bias, OUT_DTYPES)
        if list(bias.shape) != [b.shape[1]]:
            raise ValueError(f"{op}: bias has shape {list(bias.shape)}; it must be [{b.shape[1]}]")
    V.check_same_device(op, a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)


def check_int8_linear_args(
    op: str, input: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, mode: str, activation: str
) -> None:
    """input (*, K) float16/bfloat16/float32; weight (N, K) int8; weight_scale (N,) float32."""
    V.check_tensor(op, "input", input)
    V.check_dtype(op, "input", input, OUT_DTYPES)
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
# custom ops
# --------------------------------------------------------------------------------------


def _quantize_fake(c: QuantizeInt8Call) -> tuple[Tensor, Tensor]:
    shape = list(c.x.shape)
    del shape[c.dim % c.x.dim()]
    return c.x.new_empty(c.x.shape, dtype=torch.int8), c.x.new_empty(shape, dtype=torch.float32)


def _int8_matmul_fake(c: Int8MatmulCall) -> Tensor:
    dt = torch.int32 if c.a_scale is None else (c.out_dtype or torch.float32)
    return c.a.new_empty(list(c.a.shape[:-1]) + [c.b.shape[1]], dtype=dt)


QUANTIZE_INT8 = Op(
    "quantize_int8",
    QuantizeInt8Call,
    tuple[Tensor, Tensor],
    quantize_forward,
    lambda c: check_quantize_args("quantize_int8", c.x, c.dim),
    _quantize_fake,
)
INT8_MATMUL = Op(
    "int8_matmul",
    Int8MatmulCall,
    Tensor,
    int8_matmul_forward,
    lambda c: check_int8_matmul_args("int8_matmul", *c),
    _int8_matmul_fake,
)
INT8_LINEAR = Op(
    "int8_linear",
    Int8LinearCall,
    Tensor,
    int8_linear_forward,
    lambda c: check_int8_linear_args("int8_linear", *c),
    lambda c: c.input.new_empty(list(c.input.shape[:-1]) + [c.weight.shape[0]]),
)


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
    return QUANTIZE_INT8(QuantizeInt8Call(x, dim))


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
    return INT8_MATMUL(Int8MatmulCall(a, b, a_scale, b_scale, bias, out_dtype))


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
    return INT8_LINEAR(Int8LinearCall(input, weight, weight_scale, bias, mode, activation))
