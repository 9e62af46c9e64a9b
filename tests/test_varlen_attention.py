"""Packed variable-length attention (``llmkit.ops.varlen_attention``) on the reference and Triton
backends, forward and backward, against float64 attention of each sequence alone
(:func:`llmkit.reference64.attention_llm`, written independently of both) by the tolerance rule,
the baseline being PyTorch's eager computation of each sequence in the inputs' dtype.

Lengths include 0, 1 and primes, ``Sq != Sk`` per sequence both ways (bottom-right alignment),
GQA, windows, softcap, ALiBi (``(Hq,)`` and ``(B, Hq)``), every dtype, strided views; dropout
is checked against the dense op on each sequence with the documented Philox offset.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmkit
from llmkit import reference64 as R
from llmkit.check_attention import eager_attention
from llmkit.testing import assert_close_to_reference
from test_attention import (  # noqa: F401  (_poison_kernel_outputs: the autouse fixture)
    BACKENDS,
    DEVICE,
    F64,
    _leaf,
    _poison_kernel_outputs,
)

ops = llmkit.ops


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor(
        [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
    )


def _packed(total: int, h: int, d: int, dtype: torch.dtype, strided: bool) -> torch.Tensor:
    """(total, h, d); ``strided``: a view into a wider (total, h + 1, d + 3) buffer (non-unit token
    and head strides that no dense layout has, rows not 16-byte aligned)."""
    if strided:
        return torch.randn(total, h + 1, d + 3, device=DEVICE).to(dtype)[:, 1:, 2 : 2 + d]
    return torch.randn(total, h, d, device=DEVICE).to(dtype)


def _dense(t: torch.Tensor, s: int, e: int) -> torch.Tensor:
    return t[s:e].transpose(0, 1).unsqueeze(0)


def _per_sequence(fn, q, k, v, cq, ck, slopes):
    """``fn(q_b, k_b, v_b, slopes_b) -> (out (1, H, Sq, Dv), lse (1, H, Sq))`` per sequence, packed
    back to (total_q, H, Dv) and (H, total_q)."""
    outs, lses = [], []
    cq, ck = cq.tolist(), ck.tolist()
    for b in range(len(cq) - 1):
        sl = slopes[b : b + 1] if slopes is not None and slopes.dim() == 2 else slopes
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:  # no query or no key: zeros, lse = +inf
            n = cq[b + 1] - cq[b]
            outs.append(q.new_zeros(n, q.shape[1], v.shape[2]))
            lses.append(torch.full((q.shape[1], n), float("inf"), dtype=torch.float64, device=q.device))
            continue
        o, lse = fn(_dense(q, cq[b], cq[b + 1]), _dense(k, ck[b], ck[b + 1]), _dense(v, ck[b], ck[b + 1]), sl)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].to(torch.float64))
    return torch.cat(outs), torch.cat(lses, dim=1)


# name: (lengths_q, lengths_k, hq, hkv, d, causal, bottom_right, window, softcap, alibi, dtype, strided)
CASES = {
    "plain_fp32": ([5, 0, 1, 13, 7], [5, 0, 1, 13, 7], 2, 2, 16, False, False, (-1, -1), 0.0, None, "f32", False),
    "causal_bf16_gqa": (
        [17, 1, 3, 0, 11],
        [17, 1, 3, 0, 11],
        4,
        2,
        32,
        True,
        False,
        (-1, -1),
        0.0,
        None,
        "bf16",
        False,
    ),
    "br_chunks_sq_lt_sk_fp16": ([3, 1, 7, 0], [11, 5, 7, 2], 2, 1, 16, True, True, (-1, -1), 0.0, None, "f16", True),
    "br_sq_gt_sk_window": ([13, 2, 5], [5, 3, 0], 2, 2, 16, True, True, (2, -1), 0.0, "heads", "f32", False),
    "window_softcap_alibi_bh": (
        [19, 0, 2, 23],
        [19, 3, 2, 23],
        4,
        4,
        24,
        True,
        False,
        (4, -1),
        3.0,
        "batch_heads",
        "bf16",
        True,
    ),
    "window_both_sides_tl": ([7, 31], [11, 29], 2, 2, 16, False, False, (1, 2), 0.0, None, "f16", False),
}
_DT = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def _run_case(backend, lq, lk, hq, hkv, d, causal, br, window, softcap, alibi, dtype, strided):
    cq, ck = _cu(lq), _cu(lk)
    q = _packed(sum(lq), hq, d, dtype, strided)
    k = _packed(sum(lk), hkv, d, dtype, strided)
    v = _packed(sum(lk), hkv, d, dtype, strided)
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(hq, device=DEVICE)
    elif alibi == "batch_heads":
        slopes = torch.rand(len(lq), hq, device=DEVICE)
    scale = 1.0 / math.sqrt(d)
    opts = dict(
        is_causal=causal,
        causal_alignment="bottom_right" if br else "top_left",
        window_size=window,
        softcap=softcap,
        alibi_slopes=slopes,
        enable_gqa=hq != hkv,
    )
    qq, kk, vv = (_leaf(t) for t in (q, k, v))
    with llmkit.use_backend(backend):
        out, lse = ops.varlen_attention(qq, kk, vv, cq, ck, max(lq), max(lk), return_lse=True, **opts)
        g = torch.randn_like(out)
        out.backward(g)
    assert out.shape == (sum(lq), hq, d) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (hq, sum(lq)) and lse.dtype == (F64 if dtype == F64 else torch.float32)

    q6, k6, v6 = (_leaf(t, F64) for t in (q, k, v))
    ref, ref_lse = _per_sequence(
        lambda a, b_, c, sl: R.attention_llm(
            a, b_, c, None, causal, scale, bottom_right=br, window=window, softcap=softcap, alibi_slopes=sl
        ),
        q6,
        k6,
        v6,
        cq,
        ck,
        slopes,
    )
    leaves = [_leaf(t) for t in (q, k, v)]
    base, base_lse = _per_sequence(
        lambda a, b_, c, sl: eager_attention(
            a, b_, c, scale, causal=causal, bottom_right=br, window=window, softcap=softcap, slopes=sl
        ),
        *leaves,
        cq,
        ck,
        slopes,
    )
    assert_close_to_reference(out, ref.detach(), base.detach(), f"{backend} out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without a visible key: lse = +inf"
    live = torch.isfinite(ref_lse)
    if live.any():
        assert_close_to_reference(lse[live], ref_lse[live], base_lse.detach()[live], f"{backend} lse")
    assert (out.transpose(0, 1)[~live] == 0).all(), "rows without a visible key are zeros"
    ref.backward(g.to(F64))
    base.backward(g)
    for name, got, want, bl in zip(("dq", "dk", "dv"), (qq, kk, vv), (q6, k6, v6), leaves, strict=True):
        assert torch.isfinite(got.grad).all(), f"{name} not finite"
        want_g = want.grad if want.grad is not None else torch.zeros_like(want)
        bl_g = bl.grad if bl.grad is not None else torch.zeros_like(bl)
        assert_close_to_reference(got.grad, want_g, bl_g, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_against_float64_per_sequence(backend, case):
    lq, lk, hq, hkv, d, causal, br, window, softcap, alibi, dt, strided = CASES[case]
    _run_case(backend, lq, lk, hq, hkv, d, causal, br, window, softcap, alibi, _DT[dt], strided)


def test_varlen_float64_on_the_reference():
    _run_case("reference", [4, 0, 9], [6, 2, 9], 2, 1, 8, True, True, (3, -1), 2.0, "heads", F64, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_dropout_is_the_dense_op_per_sequence_with_its_offset(backend):
    """Sequence b keeps what the dense op on it alone keeps with offset b * Hq * max_q * max_k."""
    lq, lk, hq, d, p, seed = [6, 0, 9, 1], [8, 3, 9, 4], 2, 16, 0.3, 1234
    cq, ck = _cu(lq), _cu(lk)
    q, k, v = (_leaf(_packed(n, hq, d, torch.float32, False)) for n in (sum(lq), sum(lk), sum(lk)))
    mq, mk = max(lq), max(lk)
    scale = d**-0.5
    with llmkit.use_backend(backend):
        out, _ = torch.ops.llmkit.varlen_attention(
            q, k, v, cq, ck, mq, mk, p, True, scale, False, seed, 7, -1, -1, True, 0.0, None
        )
        g = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
        for b in range(len(lq)):
            qs, qe, ks, ke = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
            if qe == qs:
                continue
            qb, kb, vb = (_leaf(_dense(t, s, e)) for t, s, e in ((q, qs, qe), (k, ks, ke), (v, ks, ke)))
            ob, _ = torch.ops.llmkit.scaled_dot_product_attention(
                qb, kb, vb, None, p, True, scale, False, seed, 7 + b * hq * mq * mk, -1, -1, True, 0.0, None
            )
            torch.testing.assert_close(out[qs:qe], ob[0].transpose(0, 1).detach(), rtol=1e-5, atol=1e-5)
            gq, gk, gv = torch.autograd.grad(ob, (qb, kb, vb), _dense(g, qs, qe))
            torch.testing.assert_close(dq[qs:qe], gq[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dk[ks:ke], gk[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dv[ks:ke], gv[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert (out[: int(cq[-1])] != 0).any()


def _good():
    lq = [3, 5]
    return dict(
        query=torch.randn(8, 2, 16),
        key=torch.randn(8, 2, 16),
        value=torch.randn(8, 2, 16),
        cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 3, 8], dtype=torch.int32),
        max_seqlen_q=max(lq),
        max_seqlen_k=max(lq),
    )


BAD = [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens_q must be int32, got int64"),
    (dict(cu_seqlens_k=torch.tensor([[0, 3, 8]], dtype=torch.int32)), ValueError, "cu_seqlens_k must be 1-D"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (
        dict(
            cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32),
        ),
        ValueError,
        "must be non-decreasing",
    ),
    (
        dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_k\[-1\] = 7 must equal the number of key/value tokens, 8",
    ),
    (dict(max_seqlen_q=4), ValueError, "sequence 1 has 5 query tokens, more than max_seqlen_q = 4"),
    (
        dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
        ValueError,
        "cu_seqlens_q has 2 sequences but cu_seqlens_k has 1",
    ),
    (dict(window_size=(-2, 0)), ValueError, r"window_size\[0\] \(left\) must be an int >= -1"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes has shape \[3\]; it must be \(Hq,\)"),
    (dict(alibi_slopes=torch.rand(3, 2)), ValueError, r"\(B, Hq\) = \[2, 2\]"),
    (dict(key=torch.randn(8, 1, 16), value=torch.randn(8, 1, 16)), ValueError, "pass enable_gqa=True"),
    (dict(query=torch.randn(8, 2, 1, 16)), ValueError, r"query must be 3-D \(total_tokens, heads, head_dim\)"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be an int >= 0"),
    (dict(causal_alignment="left"), ValueError, "causal_alignment must be one of"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input_is_refused_before_any_launch(backend, change, error, match, monkeypatch):
    from llmkit.kernels import attention_varlen as KV

    def boom(*a, **k):
        raise AssertionError("launched")

    monkeypatch.setattr(KV, "varlen_attention_forward", boom)
    args = {**_good(), **change}
    with llmkit.use_backend(backend), pytest.raises(error, match=match):
        ops.varlen_attention(**args)


def test_backward_op_validates_its_inputs():
    a = _good()
    q, k, v, cq, ck = a["query"], a["key"], a["value"], a["cu_seqlens_q"], a["cu_seqlens_k"]
    out, lse = torch.ops.llmkit.varlen_attention(q, k, v, cq, ck, 5, 5, 0.0, False, 0.25, False, 0, 0)
    bwd = torch.ops.llmkit.varlen_attention_backward
    with pytest.raises(ValueError, match="lse"):
        bwd(out, q, k, v, out, lse.t(), cq, ck, 5, 5, 0.0, False, 0.25, False, 0, 0)
    with pytest.raises(ValueError, match="grad_out"):
        bwd(out[:4], q, k, v, out, lse, cq, ck, 5, 5, 0.0, False, 0.25, False, 0, 0)
    with pytest.raises(ValueError, match="must be non-decreasing"):
        bwd(out, q, k, v, out, lse, torch.tensor([0, 9, 8], dtype=torch.int32), ck, 9, 5, 0.0, False, 0.25, False, 0, 0)


def test_cuda_ext_declines_with_a_reason():
    from llmkit.backends.cuda_ext.varlen_attention import WHY_NOT, _declined
    from llmkit.ops.varlen_attention import VarlenAttentionCall

    a = _good()
    c = VarlenAttentionCall(*a.values(), 0.0, False, 0.25, False, 0, 0)
    assert list(_declined(c)) == [WHY_NOT] and "packed sequences" in WHY_NOT


@settings(max_examples=4, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    extra_k=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    causal=st.booleans(),
    window=st.sampled_from([(-1, -1), (0, -1), (3, 1)]),
)
def test_property_triton_equals_the_dense_op_per_sequence(lengths, extra_k, causal, window):
    """Whatever the lengths, each sequence's rows are the dense op's on that sequence alone."""
    lk = [n + e for n, e in zip(lengths, extra_k, strict=False)]
    cq, ck = _cu(lengths), _cu(lk)
    q = torch.randn(sum(lengths), 2, 16, device=DEVICE)
    k, v = torch.randn(sum(lk), 2, 16, device=DEVICE), torch.randn(sum(lk), 2, 16, device=DEVICE)
    opts = dict(is_causal=causal, causal_alignment="bottom_right", window_size=window)
    with llmkit.use_backend("triton"):
        out = ops.varlen_attention(q, k, v, cq, ck, max(lengths), max(lk), **opts)
    with llmkit.use_backend("reference"):
        want, _ = _per_sequence(
            lambda a, b_, c, sl: (ops.scaled_dot_product_attention(a, b_, c, **opts), torch.zeros(1, 2, a.shape[2])),
            q,
            k,
            v,
            cq,
            ck,
            None,
        )
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_keys_and_values_far_from_zero_per_sequence(backend, dtype):
    """Each sequence's keys / values share its own large common part (means 3e3 and -2e3, one
    sequence without): gradients within the tolerance of float64, as the dense backward's
    exact column shifts give them."""
    lq, lk = [7, 0, 5, 9], [9, 2, 5, 12]
    cq, ck = _cu(lq), _cu(lk)
    gen = torch.Generator().manual_seed(3)
    base = torch.tensor([3e3, 0.0, -2e3, 1e3]).repeat_interleave(torch.tensor(lk))[:, None, None]
    q = torch.randn(sum(lq), 4, 16, generator=gen).to(dtype)
    k = (torch.randn(sum(lk), 2, 16, generator=gen) + base).to(dtype)
    v = (torch.randn(sum(lk), 2, 16, generator=gen) - base).to(dtype)
    slopes = torch.rand(4, generator=gen) * 0.1
    opts = dict(
        is_causal=True, causal_alignment="bottom_right", window_size=(3, -1), alibi_slopes=slopes, enable_gqa=True
    )
    qq, kk, vv = (_leaf(t) for t in (q, k, v))
    with llmkit.use_backend(backend):
        out = ops.varlen_attention(qq, kk, vv, cq, ck, max(lq), max(lk), **opts)
        g = torch.randn_like(out)
        out.backward(g)
    q6, k6, v6 = (_leaf(t, F64) for t in (q, k, v))
    ref, _ = _per_sequence(
        lambda a, b_, c, sl: R.attention_llm(
            a, b_, c, None, True, 0.25, bottom_right=True, window=(3, -1), alibi_slopes=sl.to(F64)
        ),
        q6,
        k6,
        v6,
        cq,
        ck,
        slopes,
    )
    ref.backward(g.to(F64))
    leaves = [_leaf(t) for t in (q, k, v)]
    bo, _ = _per_sequence(
        lambda a, b_, c, sl: eager_attention(a, b_, c, 0.25, causal=True, bottom_right=True, window=(3, -1), slopes=sl),
        *leaves,
        cq,
        ck,
        slopes,
    )
    bo.backward(g)
    for name, got, want, bl in zip(("dq", "dk", "dv"), (qq, kk, vv), (q6, k6, v6), leaves, strict=True):
        assert torch.isfinite(got.grad).all(), name
        assert_close_to_reference(got.grad, want.grad, bl.grad, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_packed_column_shift_is_the_dense_shift_of_each_sequence(dtype):
    """The triton varlen backward's per-sequence shift equals column_shift on each sequence alone
    (exact differences; an outlier column or an empty sequence is left alone)."""
    from llmkit.backends.triton.varlen_attention import packed_column_shift
    from llmkit.ops._attention_shift import column_shift

    lk = [6, 0, 9, 1]
    cu = _cu(lk)
    gen = torch.Generator().manual_seed(4)
    t = (
        torch.randn(sum(lk), 3, 8, generator=gen)
        + torch.tensor([1e3, 0.0, -5e2, 7.0]).repeat_interleave(torch.tensor(lk))[:, None, None]
    )
    t[8, 1, 2] = 3e4  # sequence 2, head 1, column 2: an outlier
    t = t.to(dtype)
    got = packed_column_shift(t, cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        dense = t[s:e].transpose(0, 1)  # (H, S, D)
        want = (dense - column_shift(dense)).transpose(0, 1)
        # the same shifts (a float32 mean may differ in its last bit: summed in another order)
        torch.testing.assert_close(t[s:e] - got[s:e], t[s:e] - want, rtol=1e-6, atol=0.0)
    shift = t - got
    assert torch.equal(got.to(torch.float64), t.to(torch.float64) - shift.to(torch.float64))  # exact
    assert got[:6, :, :].abs().max() < 20 and got[8, 1, 2] == t[8, 1, 2]
