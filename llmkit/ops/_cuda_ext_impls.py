"""The ``cuda_ext`` backend: llmkit's ops on the C++/CUDA extension (``csrc/``).

Registers implementations of the dispatch points of :mod:`llmkit.ops` that call the
extension's ops (``torch.ops.llmkit_ext.*``, a namespace apart from the user-facing
``llmkit::`` ops). The library is loaded by the backend's availability probe
(:mod:`llmkit._ext`) before any of these functions runs.

What the extension takes:

* CPU and CUDA, float32 / float16 / bfloat16: ``layer_norm``, ``rms_norm``,
  ``add_layer_norm``, ``gelu``, ``bias_gelu`` (forward and backward),
  ``quantize_int8``. The CPU kernels are vectorized (ATen ``Vectorized``, compiled
  for the CPU capability torch detects on the building machine: AVX512, AVX2 or
  generic) and parallel (``at::parallel_for``); the default CPU order prefers them to
  the reference per dispatch point, dtype and size, where they measured clearly faster
  (:data:`CPU_DEFAULT`).
* CUDA only: ``int8_matmul`` (tensor-core int8 GEMM, scale/bias epilogue fused),
  ``int8_linear`` (``mode="w8a8"``: per-token quantization + that GEMM with the
  activation fused), ``scaled_dot_product_attention`` forward and backward and
  ``decode_attention`` for float16 / bfloat16 with head dims up to 128 (causal,
  bool / float masks, GQA, Philox dropout matching :mod:`llmkit.ops._philox`).

Conventions are those of the op modules: float32 statistics with the input's
leading shape, the fused residual add rounded before it is normalized, an empty
``(0,)`` tensor for the gradient of an absent weight or bias, natural-log ``lse``
with ``+inf`` and zero output on fully masked rows, top-left causal masks.
Validation has already happened in the op; ``why_not`` only names what these
kernels do not take.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


# The op modules by name: llmkit.ops re-exports functions under the same names.
_attn = importlib.import_module(f"{__package__}.attention")
_ln = importlib.import_module(f"{__package__}.layer_norm")

BACKEND = "cuda_ext"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128

from ..backends.cuda_ext._common import CPU_DEFAULT  # noqa: E402


def _ops():
    return torch.ops.llmkit_ext


def _shaped(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t.reshape(shape)``, or ``t`` itself where it has that shape already: a reshape
    costs about 1 us on the CPU, as much as a one-row kernel, and decode calls make six."""
    return t if t.shape == tuple(shape) else t.reshape(shape)


def _rows(x: Tensor, n: int) -> Tensor:
    """``x (*, n)`` as ``(rows, n)`` (a view where possible)."""
    m = x.numel() // n if n else math.prod(x.shape[:-1])
    return _shaped(x, (m, n))


def _param_grad(g: Tensor, p: Tensor | None, need: bool, like: Tensor) -> Tensor:
    """The gradient of an optional parameter in the op's convention."""
    if p is None:
        return like.new_empty((0,))
    if not need:
        return torch.empty_like(p)
    return g.reshape(p.shape).to(p.dtype)


# --------------------------------------------------------------------------------------
# LayerNorm, RMSNorm, add + LayerNorm
# --------------------------------------------------------------------------------------


def _norm_why_not(input: Tensor, normalized_shape: Sequence[int], *rest) -> Iterator[str]:
    if math.prod(normalized_shape) == 0:
        yield "rows of length 0 are left to the reference path"


def _norm_rows(input: Tensor, normalized_shape: Sequence[int]) -> tuple[Tensor, torch.Size]:
    n = math.prod(normalized_shape)
    lead = input.shape[: input.dim() - len(normalized_shape)]
    return _shaped(input, (math.prod(lead), n)), lead


def _flat(p: Tensor | None) -> Tensor | None:
    if p is None or p.dim() == 1:
        return p
    return p.reshape(-1)


@_ln.layer_norm_forward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_norm_why_not, cpu_default=CPU_DEFAULT["layer_norm.forward"]
)
def layer_norm_forward_cuda_ext(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward: one kernel per row block, float32 statistics."""
    x2, lead = _norm_rows(input, normalized_shape)
    out, _, mean, rstd = _ops().norm_fwd(x2, None, _flat(weight), _flat(bias), eps, False)
    return _shaped(out, input.shape), _shaped(mean, lead), _shaped(rstd, lead)


def _ln_bwd_why_not(grad_out: Tensor, input: Tensor, normalized_shape: Sequence[int], *rest) -> Iterator[str]:
    return _norm_why_not(input, normalized_shape)


@_ln.layer_norm_backward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_ln_bwd_why_not, cpu_default=CPU_DEFAULT["layer_norm.backward"]
)
def layer_norm_backward_cuda_ext(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward from the saved statistics; d weight / d bias reduced in float32."""
    return _ln_backward(grad_out, None, input, normalized_shape, weight, bias, mean, rstd, output_mask)


def _ln_backward(grad_out, grad_residual_out, x, normalized_shape, weight, bias, mean, rstd, output_mask):
    """(dx [+ grad_residual_out], d weight, d bias) of LayerNorm in the op's conventions."""
    x2, _ = _norm_rows(x, normalized_shape)
    dy2, _ = _norm_rows(grad_out, normalized_shape)
    dr2 = None if grad_residual_out is None else _norm_rows(grad_residual_out, normalized_shape)[0]
    need_w = bool(output_mask[1]) and weight is not None
    need_b = bool(output_mask[2]) and bias is not None
    dx, dw, db = _ops().norm_bwd(
        dy2, x2, _flat(weight), _flat(mean), _flat(rstd), dr2, need_w, need_b, False
    )
    return _shaped(dx, x.shape), _param_grad(dw, weight, need_w, x), _param_grad(db, bias, need_b, x)


@_ln.rms_norm_forward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_norm_why_not, cpu_default=CPU_DEFAULT["rms_norm.forward"]
)
def rms_norm_forward_cuda_ext(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """RMSNorm forward, float32 rstd."""
    x2, lead = _norm_rows(input, normalized_shape)
    out, _, _, rstd = _ops().norm_fwd(x2, None, _flat(weight), None, eps, True)
    return _shaped(out, input.shape), _shaped(rstd, lead)


@_ln.rms_norm_backward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_ln_bwd_why_not, cpu_default=CPU_DEFAULT["rms_norm.backward"]
)
def rms_norm_backward_cuda_ext(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    """RMSNorm backward from the saved rstd."""
    x2, _ = _norm_rows(input, normalized_shape)
    dy2, _ = _norm_rows(grad_out, normalized_shape)
    need_w = bool(output_mask[1]) and weight is not None
    dx, dw, _ = _ops().norm_bwd(dy2, x2, _flat(weight), None, _flat(rstd), None, need_w, False, True)
    return _shaped(dx, input.shape), _param_grad(dw, weight, need_w, input)


def _aln_why_not(input: Tensor, residual: Tensor, normalized_shape: Sequence[int], *rest) -> Iterator[str]:
    return _norm_why_not(input, normalized_shape)


@_ln.add_layer_norm_forward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_aln_why_not, cpu_default=CPU_DEFAULT["add_layer_norm.forward"]
)
def add_layer_norm_forward_cuda_ext(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused residual add (float32, rounded to the dtype) + LayerNorm of the rounded sum."""
    x2, lead = _norm_rows(input, normalized_shape)
    r2, _ = _norm_rows(residual, normalized_shape)
    out, res_out, mean, rstd = _ops().norm_fwd(x2, r2, _flat(weight), _flat(bias), eps, False)
    return _shaped(out, input.shape), _shaped(res_out, input.shape), _shaped(mean, lead), _shaped(rstd, lead)


def _aln_bwd_why_not(grad_out: Tensor, grad_residual_out: Tensor, residual_out: Tensor,
                     normalized_shape: Sequence[int], *rest) -> Iterator[str]:
    return _norm_why_not(residual_out, normalized_shape)


@_ln.add_layer_norm_backward.register(
    BACKEND, dtypes=FLOAT_DTYPES, why_not=_aln_bwd_why_not, cpu_default=CPU_DEFAULT["add_layer_norm.backward"]
)
def add_layer_norm_backward_cuda_ext(
    grad_out: Tensor,
    grad_residual_out: Tensor,
    residual_out: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """One gradient for input and residual: LayerNorm's dx + grad_residual_out (float32 add)."""
    return _ln_backward(
        grad_out, grad_residual_out, residual_out, normalized_shape, weight, bias, mean, rstd, output_mask
    )


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


def _head_dims_why_not(query: Tensor, value: Tensor) -> Iterator[str]:
    d, dv = query.shape[-1], value.shape[-1]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        yield f"head dims up to {MAX_HEAD_DIM}, got {d} (query/key) and {dv} (value)"
    if d == 0:
        yield "head dim 0 is left to the reference path"


def _sdpa_why_not(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, offset):
    yield from _head_dims_why_not(query, value)


@_attn.sdpa_forward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_sdpa_why_not)
def sdpa_forward_cuda_ext(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Tiled attention forward on tensor cores (WMMA), online softmax, float32 lse."""
    return _ops().attention_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, offset)


def _sdpa_bwd_why_not(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
                      enable_gqa, seed, offset, mask_grad):
    yield from _head_dims_why_not(query, value)
    if mask_grad:
        yield "does not compute the gradient of a float attn_mask"


@_attn.sdpa_backward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_sdpa_bwd_why_not)
def sdpa_backward_cuda_ext(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    seed: int,
    offset: int,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv recomputing the probabilities from lse (dK/dV per key block, dQ per query block)."""
    dq, dk, dv = _ops().attention_bwd(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, seed, offset
    )
    return dq, dk, dv, query.new_empty((0,))


def _decode_why_not(query, key_cache, value_cache, cache_seqlens, scale, is_causal):
    yield from _head_dims_why_not(query, value_cache)


@_attn.decode_forward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_decode_why_not)
def decode_forward_cuda_ext(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float,
    is_causal: bool,
) -> Tensor:
    """Decode attention as the attention kernel with the cache-length mask."""
    mask = _attn.decode_mask(cache_seqlens, query.shape[2], key_cache.shape[2], is_causal)
    out, _ = _ops().attention_fwd(query, key_cache, value_cache, mask, 0.0, False, scale, 0, 0)
    return out
