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

BACKEND = "cuda_ext"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128



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
