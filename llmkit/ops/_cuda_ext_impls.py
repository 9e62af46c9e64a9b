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

from ..dispatch import CpuDefault, CpuPreference

# The op modules by name: llmkit.ops re-exports functions under the same names.
_attn = importlib.import_module(f"{__package__}.attention")
_gelu = importlib.import_module(f"{__package__}.gelu")
_int8 = importlib.import_module(f"{__package__}.int8_matmul")
_ln = importlib.import_module(f"{__package__}.layer_norm")

BACKEND = "cuda_ext"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
_ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2}

# Where the CPU kernels are preferred over the reference path on CPU tensors: per dispatch
# point, per dtype and per size (elements of the first tensor argument; a range is
# half-open), only where they measured clearly faster. Ratios reference time / cuda_ext
# time, median of 3 runs, each run's ratio of interleaved medians (2 threads, shared
# 2-core AMD EPYC VM with AVX512; sizes M rows x N):
#   flock /tmp/bench.lock llmkit bench --op layer_norm,rms_norm,add_layer_norm,gelu,bias_gelu,quantize_int8
#     --dtype float32 --dtype bfloat16 --dtype float16 --backend cuda_ext --backend reference
#     --no-compile --no-plots --seconds 0.2 [--shapes-file F --shapes small|mid]
# with the bench "cpu" shapes and a shapes file of small (M = 1, 2, 4, 8, 16, 64; N = 768,
# 1024) and mid (M = 128..1024 x 768 / 1024; gelu M = 16..1024 x 3072, float32) row counts.
# fwd timings outside autograd go through the CPU eager fast path. Those runs predate
# _shaped (below): every call paid ~1 us per no-op reshape of its 2-D arguments and
# outputs (8 for add_layer_norm). 2-D inputs now skip them (1 x 768 float32
# add_layer_norm: the cuda_ext implementation 16.1 -> 7.0 us, reference 7.4 us); 3-D
# inputs (B, S, N) still pay real reshapes (6 for add_layer_norm, ~10 us in all). A rerun
# of the float32 norms with 2-D inputs (3 runs, one disturbed) gave: add_layer_norm
# fwd 0.93-0.94x on one row, 1.03-1.23x at 2-16 rows, 1.19-1.24x at 64, 1.31-1.32x at 128,
# 1.43-1.47x at 256; layer_norm fwd 0.91-0.92x on one row, 0.97-1.29x at 2-64 rows,
# 1.17x at 128, 1.19-1.27x at 256-512; the bwd passes 0.93-1.30x up to 512 rows.
#   rms_norm       every dtype, fwd 1.28-2.06x (small) 2.28-51x (cpu), bwd 1.16-1.92x / 5.5-24x.
#   bias_gelu      every dtype, fwd 1.32-1.96x (small) 1.11-4.5x (cpu), bwd 1.52-2.26x / 1.84-15x.
#   quantize_int8  every dtype, 2.26-2.81x (small), 2.10-2.82x (cpu).
#   add_layer_norm bf16/f16 fwd 1.11-1.78x (one row 1.11-1.20x) .. 3.8-29x, bwd 1.09-1.48x .. 5-27x.
#                  float32 fwd 0.55-0.81x up to 64 rows, 0.92-0.96x at 128, 1.08x at 256,
#                  1.28-1.37x at 512, 1.46x at 1024, 1.13 / 2.02x at 2048 x 768 / 1024, but
#                  0.96x at 2048 x 4096 (8.4M elements, where fresh outputs page-fault for both).
#                  float32 bwd 0.96-1.13x up to 512 rows, 1.20-1.30x at 1024, 1.56-2.03x at 2048.
#   layer_norm     bf16/f16 fwd 0.99-1.02x on one row, 1.05-1.47x from 2 rows, 2.1-28x (cpu);
#                  bwd 1.03-1.30x (small), 3.2-13x (cpu).
#                  float32 fwd 0.57-0.88x up to 128 rows, 0.97-1.00x at 256, 1.10x at 512,
#                  1.19-1.27x at 1024 and 1.18-1.21x at 2048 x 768 / 1024, 0.94x at 2048 x 4096.
#                  float32 bwd 0.89-1.08x (small, mid), 1.23 / 1.74 / 0.93x (cpu): no clear win.
#   gelu           bf16/f16 fwd 1.37-2.06x (small), 3.0-5.8x (cpu); bwd 1.61-2.12x, 4.2-17x.
#                  float32 fwd 1.10-1.23x up to 6144 elements, 0.85-1.07x from 8192 to
#                  1024 x 3072, 1.49 / 0.98x (cpu); bwd 1.40-1.52x to 256 x 3072, 1.14x at
#                  1024 x 3072, 0.84 / 1.03x at 2048 x 3072 / 4096.
# Decode-like calls through the op (no_grad, torch.utils.benchmark, /tmp/taskA/rank*.py in
# the helper's report; reference / cuda_ext us): (1, 1, 768) add_layer_norm float32
# 14.9 / 26.5, bfloat16 19.3 / 27.9, layer_norm 13.4 / 21.3 and 17.5 / 22.7; (4, 32, 768)
# add_layer_norm 42.4 / 42.8 and 48.6 / 46.5, layer_norm 26.9 / 31.4 and 35.0 / 33.4;
# rms_norm, bias_gelu, gelu and quantize_int8 on (1, 1, 768) 1.1-3.4x faster on cuda_ext.
# Hence: add_layer_norm / layer_norm forward stay on the reference path for decode steps
# in every dtype (the 3-D reshapes cost more than the kernel saves): float16 / bfloat16
# from 128 x 768 elements, float32 from the size where both sets of runs had the C++
# kernel >= 1.08x faster (add_layer_norm 256 x 768, layer_norm 512 x 768) below 2**22
# elements; add_layer_norm backward float32 from 1024 x 768; everything else as listed.
# After the float16 / bfloat16 reference paths went straight to ATen (commit 5598c22), one
# rerun (bfloat16, cpu + small shapes, same command) gave: gelu fwd 1.14-1.17x on one row,
# 1.03x at 4 x 768, 0.88-0.99x from 8 rows, 0.80 / 0.85x at 2048 x 3072 / 4096, so the
# 16-bit gelu forward is preferred below 4096 elements only (float16 taken as bfloat16);
# the rest still won: layer_norm fwd 1.10-1.50x (small) 1.60-1.85x (cpu), bwd 1.17-1.54x /
# 3.0-21x; add_layer_norm fwd 1.11-1.39x / 1.06-1.72x, bwd 1.22-1.59x / 5.4-17x; gelu bwd
# 1.62-1.90x / 4.3-15.6x; bias_gelu fwd 1.86-2.22x / 3.9-22x, bwd 1.75-2.14x / 3.4-14x.
_HALF = {torch.bfloat16: 0, torch.float16: 0}
CPU_DEFAULT: dict[str, CpuDefault] = {
    "layer_norm.forward": CpuPreference(
        {torch.bfloat16: 128 * 768, torch.float16: 128 * 768, torch.float32: (512 * 768, 1 << 22)}
    ),
    "layer_norm.backward": CpuPreference(_HALF),
    "rms_norm.forward": True,
    "rms_norm.backward": True,
    "add_layer_norm.forward": CpuPreference(
        {torch.bfloat16: 128 * 768, torch.float16: 128 * 768, torch.float32: (256 * 768, 1 << 22)}
    ),
    "add_layer_norm.backward": CpuPreference({**_HALF, torch.float32: 1024 * 768}),
    "gelu.forward": CpuPreference(
        {torch.bfloat16: (0, 4096), torch.float16: (0, 4096), torch.float32: (0, 8192)}
    ),
    "gelu.backward": CpuPreference({**_HALF, torch.float32: (0, 1 << 22)}),
    "bias_gelu.forward": True,
    "bias_gelu.backward": True,
    "quantize_int8.forward": True,
}
"""Dispatch point (``op.stage``) -> its ``cpu_default`` (see the measurements above)."""


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
# GELU, bias + GELU
# --------------------------------------------------------------------------------------


def _flat_rows(x: Tensor) -> Tensor:
    return _shaped(x, (1, x.numel()))


@_gelu.gelu_forward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["gelu.forward"])
def gelu_forward_cuda_ext(input: Tensor, approximate: str) -> Tensor:
    """Elementwise GELU in float32, 16-byte vectorized."""
    out = _ops().bias_gelu_fwd(_flat_rows(input), None, approximate == "tanh")
    return _shaped(out, input.shape)


@_gelu.gelu_backward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["gelu.backward"])
def gelu_backward_cuda_ext(grad_out: Tensor, input: Tensor, approximate: str) -> Tensor:
    """grad_out * GELU'(input)."""
    dx, _ = _ops().bias_gelu_bwd(_flat_rows(grad_out), _flat_rows(input), None, False, approximate == "tanh")
    return _shaped(dx, input.shape)


@_gelu.bias_gelu_forward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["bias_gelu.forward"])
def bias_gelu_forward_cuda_ext(input: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """gelu(input + bias): the add in float32, never written."""
    n = input.shape[-1]
    out = _ops().bias_gelu_fwd(_rows(input, n), bias, approximate == "tanh")
    return _shaped(out, input.shape)


@_gelu.bias_gelu_backward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["bias_gelu.backward"])
def bias_gelu_backward_cuda_ext(
    grad_out: Tensor, input: Tensor, bias: Tensor, approximate: str
) -> tuple[Tensor, Tensor]:
    """(d input, d bias); d bias sums the float32 d input over rows, in a fixed order."""
    n = input.shape[-1]
    dx, db = _ops().bias_gelu_bwd(_rows(grad_out, n), _rows(input, n), bias, True, approximate == "tanh")
    return _shaped(dx, input.shape), db.to(bias.dtype)


# --------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------


@_int8.quantize_forward.register(BACKEND, dtypes=FLOAT_DTYPES, cpu_default=CPU_DEFAULT["quantize_int8.forward"])
def quantize_int8_cuda_ext(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization along ``dim``, bit-exact to the reference."""
    xt = x.movedim(dim, -1)
    q2, scale = _ops().quantize_rows(_rows(xt, xt.shape[-1]))
    q = q2.reshape(xt.shape).movedim(-1, dim).contiguous()
    return q, scale.reshape(xt.shape[:-1])


@_int8.int8_matmul_forward.register(BACKEND, devices=("cuda",))
def int8_matmul_cuda_ext(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None,
    b_scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """Tensor-core int8 GEMM, int32 accumulation, scale/bias epilogue fused."""
    lead = list(a.shape[:-1])
    out = _ops().int8_gemm(
        _rows(a, a.shape[-1]), b, False,
        None if a_scale is None else a_scale.reshape(-1),
        None if b_scale is None else b_scale.reshape(-1),
        bias, 0, out_dtype,
    )
    return out.reshape(lead + [b.shape[1]])


def _int8_linear_why_not(input, weight, weight_scale, bias, mode, activation) -> Iterator[str]:
    if mode != "w8a8":
        yield f"implements mode='w8a8' only, got mode={mode!r}"


@_int8.int8_linear_forward.register(BACKEND, devices=("cuda",), why_not=_int8_linear_why_not)
def int8_linear_cuda_ext(
    input: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    mode: str,
    activation: str,
) -> Tensor:
    """W8A8: per-token quantization, int8 GEMM with the (N, K) weight, epilogue + activation."""
    k = input.shape[-1]
    q, s = _ops().quantize_rows(_rows(input, k))
    out = _ops().int8_gemm(q, weight, True, s, weight_scale, bias, _ACTIVATIONS[activation], input.dtype)
    return out.reshape(list(input.shape[:-1]) + [weight.shape[0]])


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
