"""The exact column shifts the attention backward applies to keys / values sharing a large
common part (llmkit/ops/_attention_shift.py): exact differences, applied only where the
gradients are invariant, and the gradients they give against float64."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit import reference64 as R
from llmkit.check_attention import eager_attention
from llmkit.ops._attention_shift import column_shift, shift_for_backward
from llmkit.testing import assert_close_to_reference

F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_column_shift_is_exact_and_only_where_every_entry_is_near_the_mean(dtype):
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 9, 8, generator=gen)
    t[..., :4] += 1e3  # columns 0-3: a common part of 1e3, spread ~1: shifted
    t[0, 0, 4, 5] = 1e6  # column 5 of head (0, 0): an outlier, not shifted
    t = t.to(dtype)
    c = column_shift(t)
    assert c.shape == (2, 3, 1, 8) and c.dtype == dtype
    assert (c[..., :4] != 0).all() and (c[..., 4:] == 0).all()
    diff = t - c
    assert torch.equal(diff.to(F64), t.to(F64) - c.to(F64))  # every difference exact
    assert diff[..., :4].abs().amax() < 20


def test_column_shift_leaves_non_finite_and_empty_columns_alone():
    t = torch.full((1, 1, 4, 3), 100.0)
    t[0, 0, 1, 0] = float("nan")
    t[0, 0, 2, 1] = float("inf")
    c = column_shift(t)
    assert c[0, 0, 0].tolist() == [0.0, 0.0, 100.0]
    assert column_shift(torch.empty(1, 1, 0, 3)).tolist() == [[[[0.0, 0.0, 0.0]]]]


def test_shift_only_where_the_backward_is_invariant():
    k = torch.randn(1, 1, 5, 4) + 1e3
    v = torch.randn(1, 1, 5, 4) + 1e3
    ks, vs = shift_for_backward(k, v, softcap=0.0, dropout_p=0.0)
    assert ks.abs().max() < 10 and vs.abs().max() < 10
    ks, vs = shift_for_backward(k, v, softcap=5.0, dropout_p=0.1)  # tanh and dropout: not invariant
    assert torch.equal(ks, k) and torch.equal(vs, v)
    ks, vs = shift_for_backward(k - 1e3, v - 1e3, 0.0, 0.0, sync=True)  # nothing moves: the same tensors
    assert ks.abs().max() < 10 and vs.abs().max() < 10


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("opts", [{}, {"window_size": (2, 0)}, {"alibi_slopes": "slopes"}])
def test_backward_with_keys_and_values_far_from_zero(backend, dtype, opts):
    """Keys / values of mean 3e3 (GQA, causal, odd lengths): gradients within the tolerance of
    float64 math."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 11, 16, generator=gen).to(dtype)
    k = (torch.randn(1, 2, 13, 16, generator=gen) + 3e3).to(dtype)
    v = (torch.randn(1, 2, 13, 16, generator=gen) - 3e3).to(dtype)
    g = torch.randn(1, 4, 11, 16, generator=gen).to(dtype)
    slopes = torch.rand(4, generator=gen) * 0.1
    kw = {n: (slopes if x == "slopes" else x) for n, x in opts.items()}
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with llmkit.use_backend(backend):
        out = llmkit.ops.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True, **kw)
        out.backward(g)
    l64 = [t.to(F64).requires_grad_(True) for t in (q, k, v)]
    ref, _ = R.attention_llm(
        *l64,
        None,
        True,
        None,
        bottom_right=False,
        window=kw.get("window_size", (-1, -1)),
        softcap=0.0,
        alibi_slopes=slopes.to(F64) if "alibi_slopes" in kw else None,
    )
    ref.backward(g.to(F64))
    # the baseline: the eager formula (HuggingFace's) in the inputs' dtype
    bl = [t.clone().requires_grad_(True) for t in (q, k, v)]
    window = kw.get("window_size", (-1, -1))
    bo, _ = eager_attention(
        *bl, 0.25, causal=True, bottom_right=False, window=window, softcap=0.0, slopes=kw.get("alibi_slopes"), mask=None
    )
    bo.backward(g)
    for name, a, b, c in zip(("dq", "dk", "dv"), leaves, l64, bl, strict=True):
        assert torch.isfinite(a.grad).all(), name
        assert_close_to_reference(a.grad, b.grad, c.grad, name=f"{backend} {dtype} {opts} {name}")
