"""Attention on the triton backend (``kernels/attention.py``, imported on first use): fused
tiled forward (online softmax, ``lse`` saved), backward row statistics, dQ pass then dK/dV pass,
no ``(Sq, Sk)`` tensor.

float16 / bfloat16 run on tensor cores; float32 with exact fp32 products (no TF32, so float32
keeps float32 accuracy), up to head dim 128. Every option of the op runs in the kernels: causal
alignment, sliding windows (key blocks outside the window skipped), softcap and ALiBi computed
in the kernel, forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops._attention_shift import shift_for_backward
from ...ops.attention import AttentionBackwardCall, AttentionCall, attention_backward, attention_forward, out_layout
from ...ops.varlen_attention import VarlenAttentionBackwardCall, VarlenAttentionCall
from ._common import TRITON_DTYPES

MAX_HEAD_DIM = 256
"""The largest head dim the Triton kernels tile."""
FP32_MAX_HEAD_DIM = 128
"""The largest head dim of float32 attention (exact fp32 products of larger tiles do not fit
the kernels' registers)."""


def shape_reasons(query: Tensor, value: Tensor) -> list[str]:
    """Why the Triton attention kernels cannot take these head dims (shared with decode)."""
    out = []
    for name, dim in (("query/key", query.shape[-1]), ("value", value.shape[-1])):
        if dim > MAX_HEAD_DIM:
            out.append(f"{name} head dim {dim} exceeds {MAX_HEAD_DIM}, the largest the Triton kernels tile")
        elif dim == 0:
            out.append(f"{name} head dim is 0")
    return out


def _reasons(query: Tensor, value: Tensor) -> list[str]:
    reasons = shape_reasons(query, value)
    if query.dtype == torch.float32 and max(query.shape[-1], value.shape[-1]) > FP32_MAX_HEAD_DIM:
        reasons.append(
            f"float32 attention with a head dim above {FP32_MAX_HEAD_DIM} is left to the "
            "reference backend: exact fp32 products (no TF32) of such tiles do not fit the "
            "kernels' registers"
        )
    return reasons


def _backward_reasons(c: AttentionBackwardCall) -> list[str]:
    reasons = _reasons(c.query, c.value)
    if c.mask_grad and c.attn_mask is not None and c.attn_mask.dtype != torch.bool:
        reasons.append(
            "the gradient of a float attn_mask is not computed by the Triton backward (it would "
            "need the (Sq, Sk) score gradient); the reference backend computes it"
        )
    return reasons


def _options(c: AttentionCall | AttentionBackwardCall | VarlenAttentionCall | VarlenAttentionBackwardCall) -> dict:
    """The launchers' keyword options: causal alignment, sliding window, softcap, ALiBi (of the
    dense and the packed variable-length calls alike)."""
    return dict(
        bottom_right=c.bottom_right,
        window=(c.window_left, c.window_right),
        softcap=c.softcap,
        alibi_slopes=c.alibi_slopes,
    )


def _kernels():
    from ...kernels import attention as K

    return K


@attention_forward.register("triton", dtypes=TRITON_DTYPES, why_not=lambda c: _reasons(c.query, c.value))
def attention_forward_triton(c: AttentionCall) -> tuple[Tensor, Tensor]:
    """Fused tiled forward (online softmax); writes ``out`` in the query's memory layout."""
    return _kernels().attention_forward(
        c.query,
        c.key,
        c.value,
        c.attn_mask,
        c.dropout_p,
        c.is_causal,
        c.scale,
        c.seed,
        c.offset,
        out_order=out_layout(c.query),
        **_options(c),
    )


@attention_backward.register("triton", dtypes=TRITON_DTYPES, why_not=_backward_reasons)
def attention_backward_triton(c: AttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row statistics, then dQ, then dK/dV, the probabilities recomputed from the scores
    (the forward's ``out`` and ``lse`` are not read); deterministic. Keys / values with a
    large common part are shifted first (exactly; see ``llmkit/ops/_attention_shift.py``)."""
    key, value = shift_for_backward(c.key, c.value, c.softcap, c.dropout_p)
    dq, dk, dv = _kernels().attention_backward(
        c.grad_out,
        c.query,
        key,
        value,
        c.attn_mask,
        c.dropout_p,
        c.is_causal,
        c.scale,
        c.seed,
        c.offset,
        **_options(c),
    )
    return dq, dk, dv, c.query.new_empty((0,))
