"""Attention on the cuda_ext backend: tiled CUDA kernels on tensor cores (WMMA), float16 /
bfloat16, head dims up to 128, causal, bool / float masks, GQA, Philox dropout matching
:mod:`llmkit.ops._philox`."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from ...ops.attention import (
    AttentionBackwardCall,
    AttentionCall,
    attention_backward,
    attention_forward,
    uses_llm_options,
)
from ._common import BACKEND, HALF_DTYPES, ext_ops

MAX_HEAD_DIM = 128
BLOCK = 64
"""Query rows (and keys) per block of the CUDA kernels (csrc/cuda/attention_common.cuh):
blocks along the sequence sit on grid axis y, at most 65,535 of them."""
GRID_Y_MAX = 65_535


def head_dim_reasons(query: Tensor, value: Tensor) -> Iterator[str]:
    d, dv = query.shape[-1], value.shape[-1]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        yield f"head dims up to {MAX_HEAD_DIM}, got {d} (query/key) and {dv} (value)"
    if d == 0:
        yield "head dim 0 is left to the reference path"


def grid_reasons(length: int, what: str) -> Iterator[str]:
    blocks = -(-length // BLOCK)
    if blocks > GRID_Y_MAX:
        yield f"{what} {length} needs {blocks} blocks on grid axis y, more than CUDA's {GRID_Y_MAX}"


def option_reasons(c: AttentionCall | AttentionBackwardCall) -> Iterator[str]:
    used = uses_llm_options(c)
    if used:
        yield (
            f"the CUDA attention kernels implement SDPA's options only, not {', '.join(used)} "
            "(the triton and reference backends do)"
        )


def _forward_reasons(c: AttentionCall) -> Iterator[str]:
    yield from option_reasons(c)
    yield from head_dim_reasons(c.query, c.value)
    yield from grid_reasons(c.query.shape[2], "query length")


def _backward_reasons(c: AttentionBackwardCall) -> Iterator[str]:
    yield from option_reasons(c)
    yield from head_dim_reasons(c.query, c.value)
    yield from grid_reasons(c.query.shape[2], "query length")
    yield from grid_reasons(c.key.shape[2], "key length")
    if c.mask_grad:
        yield "does not compute the gradient of a float attn_mask"


@attention_forward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_forward_reasons)
def attention_forward_cuda_ext(c: AttentionCall) -> tuple[Tensor, Tensor]:
    """Tiled attention forward on tensor cores (WMMA), online softmax, float32 lse."""
    return ext_ops().attention_fwd(
        c.query, c.key, c.value, c.attn_mask, c.dropout_p, c.is_causal, c.scale, c.seed, c.offset
    )


@attention_backward.register(BACKEND, devices=("cuda",), dtypes=HALF_DTYPES, why_not=_backward_reasons)
def attention_backward_cuda_ext(c: AttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv recomputing the probabilities from lse (dK/dV per key block, dQ per query block)."""
    dq, dk, dv = ext_ops().attention_bwd(
        c.grad_out,
        c.query,
        c.key,
        c.value,
        c.out,
        c.lse,
        c.attn_mask,
        c.dropout_p,
        c.is_causal,
        c.scale,
        c.seed,
        c.offset,
    )
    return dq, dk, dv, c.query.new_empty((0,))
