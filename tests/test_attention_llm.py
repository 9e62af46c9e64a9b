"""Attention's options for today's LLMs, on the reference and Triton backends, forward and
backward: causal alignment (``causal_alignment``, torch's CausalBias objects), sliding windows,
softcapping, ALiBi, ``return_lse``; their validation; the kernels' block ranges.

Every result is compared with :func:`llmkit.reference64.attention_llm` (float64, written
independently) by the tolerance rule, the baseline being PyTorch's eager computation of the
same formula in the inputs' dtype (what HuggingFace's eager attention does: scores, softcap,
bias and mask in the inputs' dtype, softmax in float32).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import llmkit
from llmkit import reference64 as R
from llmkit.check_attention import eager_attention
from llmkit.kernels._attention_common import ScoreArgs, _key_range, _query_range
from llmkit.ops._philox import dropout_keep_mask
from llmkit.testing import assert_close_to_reference
from test_attention import (  # noqa: F401  (_poison_kernel_outputs: the autouse fixture, launches counted)
    BACKENDS,
    DEVICE,
    F64,
    LAUNCHES,
    _leaf,
    _poison_kernel_outputs,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(b, hq, hkv, sq, sk, d, dtype, alibi=None):
    q = torch.randn(b, hq, sq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, sk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, sk, d, device=DEVICE).to(dtype)
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(hq, device=DEVICE)
    elif alibi == "batch_heads":
        slopes = torch.rand(b, hq, device=DEVICE)
    return q, k, v, slopes


def _check(
    backend,
    q,
    k,
    v,
    slopes,
    causal=False,
    br=False,
    window=(-1, -1),
    softcap=0.0,
    mask=None,
    dropout=0.0,
    seed=5,
    grads=True,
):
    """out, lse and dq / dk / dv of ``backend`` against float64 by the tolerance rule."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qq, kk, vv = (_leaf(t) for t in (q, k, v))
    before = dict(LAUNCHES)
    with llmkit.use_backend(backend):
        out, lse = torch.ops.llmkit.scaled_dot_product_attention(
            qq,
            kk,
            vv,
            mask,
            dropout,
            causal,
            scale,
            q.shape[1] != k.shape[1],
            seed,
            0,
            window[0],
            window[1],
            br,
            softcap,
            slopes,
        )
        g = torch.randn_like(out)
        if grads:
            out.backward(g)
    b, hq, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = dropout_keep_mask(seed, 0, b, hq, sq, sk, dropout, q.device) if dropout else None
    q6, k6, v6 = (_leaf(t, F64) for t in (q, k, v))
    ref, ref_lse = R.attention_llm(
        q6,
        k6,
        v6,
        mask,
        causal,
        scale,
        bottom_right=br,
        window=window,
        softcap=softcap,
        alibi_slopes=slopes,
        keep=keep,
        dropout_p=dropout,
    )
    leaves = [_leaf(t) for t in (q, k, v)]
    base, base_lse = eager_attention(
        *leaves,
        scale,
        causal=causal,
        bottom_right=br,
        window=window,
        softcap=softcap,
        slopes=slopes,
        mask=mask,
        keep=keep,
        dropout_p=dropout,
    )
    assert_close_to_reference(out, ref.detach(), base.detach(), f"{backend} out")
    assert lse.dtype == (F64 if q.dtype == F64 else torch.float32) and lse.shape == (b, hq, sq)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without a visible key: lse = +inf"
    live = torch.isfinite(ref_lse)
    if live.any():
        assert_close_to_reference(lse[live], ref_lse[live], base_lse.detach()[live], f"{backend} lse")
    assert (out[~live] == 0).all(), "rows without a visible key are zeros"
    if backend == "triton":
        assert LAUNCHES["attention_forward"] > before["attention_forward"]
    if not grads:
        return
    ref.backward(g.to(F64))
    base.backward(g)
    for name, got, want, bl in zip(("dq", "dk", "dv"), (qq, kk, vv), (q6, k6, v6), leaves, strict=True):
        assert torch.isfinite(got.grad).all(), f"{name} not finite"
        assert_close_to_reference(got.grad, want.grad, bl.grad, f"{backend} {name}")
    if backend == "triton":
        assert LAUNCHES["attention_backward"] > before["attention_backward"]


# (sq, sk, causal, bottom_right, window, softcap, alibi, gqa): odd lengths, Sq != Sk both ways,
# windows 0, 1 and longer than the sequence, rows with nothing visible (bottom-right causal
# with Sq > Sk), GQA
CASES = {
    "br_causal_chunk": (19, 45, True, True, (-1, -1), 0.0, None, 1),
    "br_causal_sq_gt_sk": (45, 19, True, True, (-1, -1), 0.0, None, 2),
    "tl_causal_window7": (45, 45, True, False, (7, -1), 0.0, None, 1),
    "br_causal_window0": (23, 40, True, True, (0, -1), 0.0, None, 2),
    "window1_both_sides": (37, 37, False, False, (1, 1), 0.0, None, 1),
    "window_longer_than_seq": (29, 33, True, True, (100, 100), 0.0, None, 1),
    "window_left_only_sq_gt_sk": (50, 21, False, True, (4, -1), 0.0, None, 1),
    "window_right_only": (33, 47, False, False, (-1, 3), 0.0, None, 2),
    "softcap": (37, 29, False, False, (-1, -1), 2.0, None, 1),
    "softcap_causal_gqa": (41, 41, True, False, (-1, -1), 5.0, None, 2),
    "alibi_heads": (31, 31, True, False, (-1, -1), 0.0, "heads", 1),
    "alibi_batch_heads_br": (17, 40, False, True, (-1, -1), 0.0, "batch_heads", 2),
    "gemma2_like": (53, 53, True, False, (16, -1), 3.0, None, 2),
    "everything": (26, 51, True, True, (9, -1), 4.0, "heads", 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_llm_options_against_float64(backend, case):
    sq, sk, causal, br, window, softcap, alibi, g = CASES[case]
    dtype = DTYPES[sum(map(ord, case)) % 3]  # every dtype, spread over the cases
    q, k, v, slopes = _inputs(2, 2 * g, 2, sq, sk, 16, dtype, alibi)
    _check(backend, q, k, v, slopes, causal, br, window, softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_window_with_a_mask_and_dropout(backend, dtype):
    """A window with a boolean mask (fully masked rows included) and with dropout."""
    q, k, v, _ = _inputs(1, 2, 2, 33, 33, 16, dtype)
    mask = torch.rand(1, 2, 33, 33, device=DEVICE) > 0.4
    mask[:, :, 5] = False  # a row with nothing visible
    _check(backend, q, k, v, None, True, False, (6, -1), mask=mask)
    _check(backend, q, k, v, None, True, True, (6, -1), dropout=0.2)


def test_reference_float64_options():
    q, k, v, slopes = _inputs(1, 2, 2, 21, 30, 8, torch.float64, "heads")
    _check("reference", q, k, v, slopes, True, True, (5, 2), 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_outside_every_window_never_reach_a_result(backend):
    """NaN / inf in keys no row's window reaches (before row 0's window, past the last
    row's) change nothing, and their dk / dv are 0."""
    b, h, sq, sk, d = 1, 2, 16, 48, 16
    q, k, v, _ = _inputs(b, h, h, sq, sk, d, torch.float16)
    window, hidden = (3, 2), torch.zeros(sk, dtype=torch.bool)
    hidden[: sk - sq - 3] = True  # bottom-right: row 0's window starts at key Sk - Sq - 3
    dk, dv = k.clone(), v.clone()
    dk[:, :, hidden], dv[:, :, hidden] = float("nan"), float("inf")
    results = []
    for kk, vv in ((k, v), (dk, dv)):
        qq, kk, vv = (_leaf(t) for t in (q, kk, vv))
        with llmkit.use_backend(backend):
            out = llmkit.ops.scaled_dot_product_attention(
                qq, kk, vv, causal_alignment="bottom_right", window_size=window
            )
            out.backward(torch.ones_like(out))
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for name, clean, dirty in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert torch.isfinite(dirty).all(), name
        assert torch.equal(clean, dirty), name
    assert (results[1][2][:, :, hidden] == 0).all() and (results[1][3][:, :, hidden] == 0).all()


# --------------------------------------------------------------------------------------
# torch's CausalBias objects, return_lse, the functional API
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq,sk", [(4, 9), (9, 4), (7, 7)])
def test_causal_bias_objects_are_honoured(backend, sq, sk):
    """causal_lower_right / causal_upper_left equal the keyword alignment (and float64)."""
    q, k, v, _ = _inputs(1, 2, 2, sq, sk, 32, torch.float16)
    with llmkit.use_backend(backend):
        for factory, alignment in ((causal_lower_right, "bottom_right"), (causal_upper_left, "top_left")):
            got = llmkit.ops.scaled_dot_product_attention(q, k, v, attn_mask=factory(sq, sk))
            want = llmkit.ops.scaled_dot_product_attention(q, k, v, is_causal=True, causal_alignment=alignment)
            assert torch.equal(got, want)
            ref, _ = R.attention_llm(
                q.double(), k.double(), v.double(), None, True, bottom_right=alignment == "bottom_right"
            )
            assert (got.double() - ref).abs().max() < 5e-3


def test_causal_bias_conflicts_are_refused():
    q, k, v, _ = _inputs(1, 2, 2, 4, 9, 32, torch.float16)
    sdpa = llmkit.ops.scaled_dot_product_attention
    with pytest.raises(ValueError, match="is_causal=True; give one of them"):
        sdpa(q, k, v, attn_mask=causal_lower_right(4, 9), is_causal=True)
    with pytest.raises(ValueError, match="they must agree"):
        sdpa(q, k, v, attn_mask=causal_upper_left(4, 9), causal_alignment="bottom_right")
    with pytest.raises(ValueError, match=r"CausalBias for \(Sq, Sk\) = \(5, 9\)"):
        sdpa(q, k, v, attn_mask=causal_lower_right(5, 9))
    with pytest.raises(TypeError, match="CausalBias"):  # the custom op itself never reads one as data
        torch.ops.llmkit.scaled_dot_product_attention(q, k, v, causal_lower_right(4, 9), 0.0, False, 0.1, False, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_merges_partial_attentions(backend):
    """Attention over all keys equals the LSE-weighted merge of two halves (ring attention)."""
    q, k, v, _ = _inputs(2, 2, 2, 13, 40, 16, torch.float32)
    sdpa = llmkit.ops.scaled_dot_product_attention
    with llmkit.use_backend(backend):
        full, lse = sdpa(q, k, v, return_lse=True)
        o1, l1 = sdpa(q, k[:, :, :17], v[:, :, :17], return_lse=True)
        o2, l2 = sdpa(q, k[:, :, 17:], v[:, :, 17:], return_lse=True)
    lse12 = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - lse12)[..., None] + o2 * torch.exp(l2 - lse12)[..., None]
    torch.testing.assert_close(lse12, lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    _, ref_lse = R.attention_llm(q.double(), k.double(), v.double())
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    out3, lse3 = sdpa(q[0], k[0], v[0], return_lse=True)  # unbatched
    assert lse3.shape == (2, 13)


# --------------------------------------------------------------------------------------
# bad input: a clear error before any kernel runs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(window_size=(-2, 0)), ValueError, r"window_size\[0\] \(left\) must be an int >= -1"),
        (dict(window_size=(3, 1.5)), ValueError, r"window_size\[1\] \(right\) must be an int >= -1 .*, got 1.5"),
        (dict(window_size=3), ValueError, "window_size must be a pair"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap=float("nan")), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap="a"), TypeError, "softcap must be a number"),
        (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes has shape \[3\]; it must be \(Hq,\) = \[4\]"),
        (dict(alibi_slopes=torch.ones(2, 4, 1)), ValueError, "alibi_slopes has shape"),
        (dict(alibi_slopes=torch.ones(4, dtype=torch.int32)), TypeError, "alibi_slopes"),
        (dict(alibi_slopes=torch.ones(4, requires_grad=True)), ValueError, "alibi_slopes requires grad"),
        (dict(causal_alignment="bottom"), ValueError, "causal_alignment must be one of"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_options_are_refused_before_any_launch(backend, kwargs, error, match):
    q, k, v, _ = _inputs(2, 4, 2, 5, 7, 16, torch.float16)
    before = dict(LAUNCHES)
    with llmkit.use_backend(backend), pytest.raises(error, match=match):
        llmkit.ops.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    assert LAUNCHES == before


def test_cuda_ext_declines_the_llm_options_with_a_reason():
    from llmkit.backends.cuda_ext.attention import option_reasons
    from llmkit.ops.attention import AttentionCall

    q, k, v, _ = _inputs(1, 2, 2, 5, 7, 16, torch.float16)
    plain = AttentionCall(q, k, v, None, 0.0, True, 0.25, False, 0, 0)
    assert list(option_reasons(plain)) == []
    (reason,) = option_reasons(plain._replace(window_left=4, softcap=2.0))
    assert "window_size, softcap" in reason and "triton and reference backends do" in reason


# --------------------------------------------------------------------------------------
# the kernels' block ranges: whole key blocks outside the band are skipped
# --------------------------------------------------------------------------------------


@triton.jit
def _range_probe(
    out_q,
    out_k,
    q_len,
    k_len,
    diag_off,
    upper,
    lower,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPPER: tl.constexpr,
    LOWER: tl.constexpr,
):
    pid = tl.program_id(0)
    lo, full_lo, full_hi, hi = _key_range(pid * BLOCK_M, k_len, diag_off, upper, lower, BLOCK_M, BLOCK_N, UPPER, LOWER)
    tl.store(out_q + pid * 4, lo)
    tl.store(out_q + pid * 4 + 1, full_lo)
    tl.store(out_q + pid * 4 + 2, full_hi)
    tl.store(out_q + pid * 4 + 3, hi)
    m_lo, m_hi = _query_range(pid * BLOCK_N, q_len, diag_off, upper, lower, BLOCK_M, BLOCK_N, UPPER, LOWER)
    tl.store(out_k + pid * 2, m_lo)
    tl.store(out_k + pid * 2 + 1, m_hi)


@pytest.mark.parametrize(
    "sq,sk,causal,br,window",
    [
        (100, 100, True, False, (7, -1)),
        (40, 300, True, True, (20, -1)),
        (300, 40, False, True, (5, 9)),
        (64, 64, False, False, (0, 0)),
        (77, 130, True, True, (-1, -1)),
        (130, 77, True, True, (-1, -1)),
        (50, 50, False, False, (-1, 12)),
        (33, 90, False, False, (200, 200)),
    ],
)
def test_block_ranges_cover_the_band_and_skip_the_rest(sq, sk, causal, br, window):
    """_key_range and _query_range (run through the interpreter): every visible (i, j) lies in
    a visited block, the mask-free blocks are visible to every row, and no more key blocks
    are visited than the band spans."""
    bm, bn = 16, 16
    band = ScoreArgs.of(sq, sk, causal, br, window)

    n = max(triton.cdiv(sq, bm), triton.cdiv(sk, bn))
    kr, qr = torch.zeros(n, 4, dtype=torch.int32), torch.zeros(n, 2, dtype=torch.int32)
    c = band.constexprs()
    _range_probe[(n,)](
        kr, qr, sq, sk, *band.kernel_args(kr)[:3], BLOCK_M=bm, BLOCK_N=bn, UPPER=c["UPPER"], LOWER=c["LOWER"]
    )
    vis = band.visible(sq, sk, torch.device("cpu"))
    vis = torch.ones(sq, sk, dtype=torch.bool) if vis is None else vis
    for m in range(triton.cdiv(sq, bm)):
        lo, full_lo, full_hi, hi = kr[m].tolist()
        rows = vis[m * bm : (m + 1) * bm]
        cols = rows.any(0).nonzero().flatten()
        assert lo <= full_lo <= full_hi <= hi and lo % bn == 0
        if len(cols):
            assert lo <= cols.min() and cols.max() < hi, (m, lo, hi, cols.min(), cols.max())
        assert rows[:, full_lo:full_hi].all(), (m, full_lo, full_hi)
        if window[0] >= 0 or causal or window[1] >= 0:  # skipped: at most the band's span plus a block each side
            span = (
                bm
                + (window[0] if window[0] >= 0 else sk)
                + (0 if causal else max(window[1], 0) if window[1] >= 0 else sk)
            )
            assert hi - lo <= span + 2 * bn
    for nb in range(triton.cdiv(sk, bn)):
        m_lo, m_hi = qr[nb].tolist()
        rows = vis[:, nb * bn : (nb + 1) * bn].any(1).nonzero().flatten()
        if len(rows):
            assert m_lo <= rows.min() and rows.max() < m_hi, (nb, m_lo, m_hi)
        assert m_lo % bm == 0
