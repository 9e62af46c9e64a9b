"""Attention at the edges of its numerics, on both backends.

* Keys no query row may see (masked for every row, past ``Sq`` under ``is_causal``, cache
  slots past ``cache_seqlens``) never reach an output or gradient, whatever they hold.
* Any finite scale (zero, negative) with ``is_causal``; masks of 1 to 4 dims; GQA with no
  key; torch's ``CausalBias`` objects refused with llmkit's error.
* Backward precision: ``delta = rowsum(dO * O)`` from float32 (not the rounded output),
  probabilities normalized in the backward (not read through ``lse``'s rounding), and the
  reference's regimes (ATen float32 kernel for half inputs, ATen kernel for float32, math
  with dropout) held to the tolerance rule with the baseline PyTorch's math in the inputs'
  dtype, or float32 math where that is what the rule must be measured against.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import llmkit
from llmkit import reference64 as R
from llmkit.ops._philox import dropout_keep_mask
from llmkit.testing import assert_close_to_reference, max_abs_error, poison_
from test_attention import (  # noqa: F401  (_poison_kernel_outputs: the autouse fixture, launches counted)
    BACKENDS,
    DEVICE,
    F64,
    Baselines,
    _backward,
    _leaf,
    _poison_kernel_outputs,
    _qkv,
    _run,
    check_sdpa,
    math_in_input_dtype,
)


@pytest.fixture(autouse=True)
def _poison_decode_outputs(monkeypatch):
    """Every buffer the Triton decode launcher allocates starts as NaN (attention's: the
    fixture of test_attention)."""
    from llmkit.kernels import decode_attention as K

    real = K._empty
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: poison_(real(shape, dtype, device)))


def _grads(backend, q, k, v, mask=None, causal=False, scale=None, gqa=False, dropout=0.0, seed=7, grad=None):
    """(out, dq, dk, dv) of one backend on fresh leaves, through the custom op (seeded dropout)."""
    qq, kk, vv = (_leaf(t) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with llmkit.use_backend(backend):
        out, _ = torch.ops.llmkit.scaled_dot_product_attention(qq, kk, vv, mask, dropout, causal, scale, gqa, seed, 0)
        out.backward(torch.ones_like(out) if grad is None else grad)
    return out.detach(), qq.grad, kk.grad, vv.grad


# --------------------------------------------------------------------------------------
# keys no query row sees
# --------------------------------------------------------------------------------------


def _hidden_case(kind):
    """(q, k, v, mask, causal, gqa, hidden): hidden is a bool (B, Hkv, Sk) of keys no row of
    any query head of the group sees."""
    b, hkv, g, sq, sk, d = 2, 2, 2, 13, 29, 16
    q, k, v = (t.detach() for t in _qkv(b, hkv * g, hkv, sq, sk, d, d, torch.float16))
    hidden = torch.zeros(b, hkv, sk, dtype=torch.bool, device=DEVICE)
    if kind == "causal_past_sq":
        hidden[:, :, sq:] = True
        return q, k, v, None, True, True, hidden
    visible = torch.rand(b, hkv * g, sq, sk, device=DEVICE) > 0.3
    visible[..., 0] = True
    cols = [3, 7, 8, sk - 1]
    if kind == "key_padding":
        visible = visible[:, :1, :1].clone()
        visible[..., cols] = False
        hidden[..., cols] = True
    else:
        visible[:, :, :, cols] = False
        hidden[..., cols] = True
        visible[:, 1, :, 7] = True  # key 7 of kv head 0 is seen by query head 1: not hidden there
        hidden[:, 0, 7] = False
    mask = visible
    if kind == "float":
        mask = torch.randn(visible.shape, device=DEVICE).masked_fill(~visible, float("-inf"))
    return q, k, v, mask, kind == "causal_mask", True, hidden


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float", "key_padding", "causal_past_sq", "causal_mask"])
def test_hidden_keys_never_reach_output_or_gradients(backend, kind):
    q, k, v, mask, causal, gqa, hidden = _hidden_case(kind)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[hidden] = float("nan")
    dirty_v[hidden] = float("inf")
    dirty_v[..., 0, :][hidden[..., 0]] = float("nan")
    clean_k, clean_v = k.masked_fill(hidden[..., None], 0.0), v.masked_fill(hidden[..., None], 0.0)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=DEVICE)
    clean = _grads(backend, q, clean_k, clean_v, mask, causal, gqa=gqa, grad=g)
    dirty = _grads(backend, q, dirty_k, dirty_v, mask, causal, gqa=gqa, grad=g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), dirty, clean, strict=True):
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert torch.equal(a, b), f"{name}: a hidden key changed the result"
    assert (dirty[2][hidden] == 0).all() and (dirty[3][hidden] == 0).all()
    # the float64 reference drops such keys too, and the clean result meets the rule
    ref_dirty = R.attention(q.to(F64), dirty_k.to(F64), dirty_v.to(F64), mask, causal, None, gqa)
    assert torch.equal(ref_dirty, R.attention(q.to(F64), clean_k.to(F64), clean_v.to(F64), mask, causal, None, gqa))
    check_sdpa(backend, q, clean_k, clean_v, mask=mask, causal=causal, gqa=gqa, grads=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 3])
def test_decode_cache_garbage_past_lengths(backend, t):
    """A cache made with torch.empty: slots past each length hold NaN / inf, never read."""
    b, hq, hkv, s_max, d = 3, 4, 2, 40, 16
    q = torch.randn(b, hq, t, d, dtype=torch.float16, device=DEVICE)
    kc = torch.randn(b, hkv, s_max, d, dtype=torch.float16, device=DEVICE)
    vc = torch.randn(b, hkv, s_max, d, dtype=torch.float16, device=DEVICE)
    for lengths in ([17, 40, 5], [9, 9, 9]):
        lens = torch.tensor(lengths, device=DEVICE)
        past = torch.arange(s_max, device=DEVICE)[None, :] >= lens[:, None]  # (B, S_max)
        dk, dv = kc.clone(), vc.clone()
        dk.permute(0, 2, 1, 3)[past] = float("nan")
        dv.permute(0, 2, 1, 3)[past] = float("inf")
        with llmkit.use_backend(backend):
            out = llmkit.ops.decode_attention(q, dk, dv, lens)
            clean = llmkit.ops.decode_attention(q, kc, vc, lens)
        assert torch.isfinite(out).all()
        assert torch.equal(out, clean)
        ref = R.decode_attention(q.to(F64), kc.to(F64), vc.to(F64), lens, 1 / math.sqrt(d), True)
        assert (out.double() - ref).abs().max() < 5e-3


# --------------------------------------------------------------------------------------
# scale, mask ranks, empty GQA, CausalBias
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.5, -1e-30])
def test_causal_with_zero_or_negative_scale(backend, scale):
    q, k, v = _qkv(1, 2, 2, 11, 11, 16, 16, torch.float32)
    check_sdpa(backend, q, k, v, causal=True, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(23,), (9, 23), (2, 9, 23), (1, 1, 9, 23)], ids=["1d", "2d", "3d", "4d"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_of_every_rank(backend, shape, kind):
    """attn_mask of 1 to 4 dims broadcasts like torch's (ATen's CPU kernel takes 2 or 4)."""
    q, k, v = (_leaf(t) for t in _qkv(1, 2, 2, 9, 23, 16, 16, torch.float16))
    mask = torch.rand(shape, device=DEVICE) > 0.3
    mask[..., 0] = True
    if kind == "float":
        mask = torch.randn(shape, device=DEVICE).masked_fill(~mask, float("-inf"))
    out = _run(backend, q, k, v, mask=mask)
    g = torch.randn_like(out)
    _backward(backend, out, g)
    q6, k6, v6 = (_leaf(t, F64) for t in (q, k, v))
    ref = R.attention(q6, k6, v6, mask)
    ref.backward(g.to(F64))
    base = Baselines(q, k, v, mask[(None,) * (4 - mask.dim())])  # torch's CPU kernel takes 2 or 4 dims
    base.check_out(out, ref)
    base.backward(g)
    for i, (name, t, r) in enumerate((("dq", q, q6), ("dk", k, k6), ("dv", v, v6))):
        base.check_grad(name, i, t.grad, r.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_with_no_key(backend):
    q, k, v = (_leaf(t) for t in _qkv(1, 4, 2, 3, 0, 16, 16, torch.float16))
    out = _run(backend, q, k, v, gqa=True)
    _backward(backend, out, torch.ones_like(out))
    assert (out == 0).all() and (q.grad == 0).all()
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factory", [causal_lower_right, causal_upper_left])
@pytest.mark.parametrize("grad", [False, True])
def test_causal_bias_objects_never_read_as_data(backend, factory, grad):
    """torch's CausalBias is a tensor subclass without storage: the custom op refuses it before
    any kernel (the functional API turns it into is_causal with its alignment, see
    test_attention_llm)."""
    q, k, v = (t.detach().requires_grad_(grad) for t in _qkv(1, 2, 2, 4, 9, 32, 32, torch.float16))
    match = "attn_mask is a torch.nn.attention.bias.CausalBias"
    with llmkit.use_backend(backend), pytest.raises(TypeError, match=match):
        torch.ops.llmkit.scaled_dot_product_attention(q, k, v, factory(4, 9), 0.0, False, 0.2, False, 0, 0)


# --------------------------------------------------------------------------------------
# backward precision
# --------------------------------------------------------------------------------------


def _float32_math(q, k, v, g, keep=None, p=0.0, causal=False, scale=None):
    """out, dq, dk, dv of PyTorch's math in float32 on the same inputs, rounded to their dtype,
    twice: the head dim summed in its order and reversed. What the inputs' precision allows
    (the baseline where rounded outputs would hide the bug); the rule takes the worse of the
    two, as PyTorch's error in float32 is a matter of summation order at large scores."""
    runs = []
    for flip in (False, True):
        q3, k3, v3 = (_leaf(t, torch.float32) for t in (q, k, v))
        scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        a, b = (q3.flip(-1), k3.flip(-1)) if flip else (q3, k3)
        s = (a @ b.transpose(-1, -2)) * scale_
        if causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
        pr = torch.softmax(s, -1)
        if keep is not None:
            pr = pr * keep / (1.0 - p)
        out = pr @ v3
        out.backward(g.float())
        runs.append([t.detach().to(q.dtype) for t in (out, q3.grad, k3.grad, v3.grad)])
    return runs


def _check_against(backend, q, k, v, g, baselines, keep=None, p=0.0, causal=False, scale=None, names="out dq dk dv"):
    """Each output of ``backend`` against float64, the tolerance set by the baseline run
    (one of ``baselines``, each [out, dq, dk, dv]) further from float64."""
    got = _grads(backend, q, k, v, None, causal, scale, dropout=p, grad=g)
    q6, k6, v6 = (_leaf(t, F64) for t in (q, k, v))
    ref = R.attention(q6, k6, v6, None, causal, scale, keep=keep, dropout_p=p)
    ref.backward(g.to(F64))
    refs = (ref.detach(), q6.grad, k6.grad, v6.grad)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        if name in names.split():
            base = max((b[i] for b in baselines), key=lambda t: max_abs_error(t, refs[i]))
            assert_close_to_reference(got[i], refs[i], base, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_half_backward_delta_from_float32_output(backend, dtype, p):
    """|O| >> |dO|: v = 100 + 0.1 randn, dO rows of zero sum. delta = rowsum(dO * O) from the
    rounded output was off by |dO| * ulp(100) (dQ error 0.035 at max |dQ| 0.09)."""
    b, h, s, d, seed = 1, 2, 64, 64, 7
    q = torch.randn(b, h, s, d, device=DEVICE).to(dtype)
    k = torch.randn(b, h, s, d, device=DEVICE).to(dtype)
    v = (100 + 0.1 * torch.randn(b, h, s, d, device=DEVICE)).to(dtype)
    g = torch.randn(b, h, s, d, device=DEVICE)
    g = (g - g.mean(-1, keepdim=True)).to(dtype)
    keep = dropout_keep_mask(seed, 0, b, h, s, s, p, q.device) if p else None
    base = _float32_math(q, k, v, g, keep, p)
    _check_against(backend, q, k, v, g, base, keep, p, names="dq dk dv")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_float32_backward_large_scores(backend, p):
    """Scores ~100 (up to ~400), v = 10 + randn. Dropout: the probabilities recomputed as
    exp(s - lse) carried lse's float32 rounding into dS through a delta from an output
    normalized otherwise (reference dQ error 6e-3 against PyTorch's 5e-4); now dS has a
    relative error only. Without dropout the fused kernels (llmkit's and PyTorch's default)
    share that relative error ~|lse| * 6e-8, so the baseline is the worse of PyTorch's two."""
    b, h, s, d, seed = 1, 2, 64, 64, 7
    q = torch.randn(b, h, s, d, device=DEVICE) * 10
    k = torch.randn(b, h, s, d, device=DEVICE) * 10
    v = torch.randn(b, h, s, d, device=DEVICE) + 10
    g = torch.randn(b, h, s, d, device=DEVICE)
    if p:
        keep = dropout_keep_mask(seed, 0, b, h, s, s, p, q.device)
        _check_against(backend, q, k, v, g, _float32_math(q, k, v, g, keep, p), keep, p)
        return
    got = _grads(backend, q, k, v, grad=g)
    q6, k6, v6 = (_leaf(t, F64) for t in (q, k, v))
    ref = R.attention(q6, k6, v6)
    ref.backward(g.to(F64))
    base = Baselines(q, k, v)
    base.check_out(got[0], ref)
    base.backward(g)
    for i, (name, r) in enumerate((("dq", q6), ("dk", k6), ("dv", v6))):
        base.check_grad(name, i, got[i + 1], r.grad)


def _math_in_dtype(q, k, v, g, causal):
    """PyTorch's math SDPA computing in the inputs' dtype: [[out, dq, dk, dv]]."""
    qq, kk, vv = (_leaf(t) for t in (q, k, v))
    with math_in_input_dtype():
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
    out.backward(g)
    return [[out.detach(), qq.grad, kk.grad, vv.grad]]


@pytest.mark.parametrize(
    "dtype,b,sq,sk,d,causal",
    [
        (torch.float16, 1, 100_000, 16, 40, False),  # flash-attention's split-KV case: dK 0.65 against 0.24
        (torch.bfloat16, 2, 108, 256, 40, True),
        (torch.float16, 2, 113, 203, 64, False),
    ],
    ids=["fp16_long_query_few_keys", "bf16_causal", "fp16_odd"],
)
def test_reference_half_backward_meets_the_rule(dtype, b, sq, sk, d, causal):
    """ATen's float16 / bfloat16 CPU backward missed the rule on long-query / few-key shapes;
    the reference differentiates half inputs with its float32 kernel (exact widening)."""
    q = torch.randn(b, 1, sq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, 1, sk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, 1, sk, d, device=DEVICE).to(dtype)
    g = torch.randn(b, 1, sq, d, device=DEVICE).to(dtype)
    _check_against("reference", q, k, v, g, _math_in_dtype(q, k, v, g, causal), causal=causal)


def test_reference_float32_backward_keeps_the_aten_kernel(monkeypatch):
    """float32 without dropout: ATen's fused kernel (it meets the rule), not the math path."""
    from llmkit.backends.reference import attention as AR

    calls = []
    real = AR.cpu_flash_attention_backward
    monkeypatch.setattr(AR, "cpu_flash_attention_backward", lambda *a, **kw: calls.append(a[1].dtype) or real(*a, **kw))
    q, k, v = (t.detach() for t in _qkv(2, 2, 2, 37, 45, 32, 32, torch.float32))
    g = torch.randn(2, 2, 37, 32, device=DEVICE)
    _check_against("reference", q, k, v, g, _math_in_dtype(q, k, v, g, True), causal=True)
    assert calls == [torch.float32]
    calls.clear()
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    _grads("reference", q, k, v, causal=True)
    assert calls == [torch.float32]  # half inputs: widened, the same kernel
