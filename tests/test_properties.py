"""Hypothesis property tests over shapes: reference ops against the float64 formulas.

Shapes are drawn freely (size-1 dims, odd lengths, several leading dims); every
result must meet the correctness rule of llmkit.testing against llmkit.reference64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit import ops
from llmkit import reference64 as R
from llmkit.testing import assert_close_to_reference

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LEAD = st.lists(st.integers(1, 6), min_size=0, max_size=3)
SETTINGS = settings(max_examples=30, deadline=None, derandomize=False)


def _x(shape, dtype, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + shift).to(dtype)


@SETTINGS
@given(lead=LEAD, n=st.integers(1, 300), dtype=DTYPES, seed=st.integers(0, 2**31), shift=st.sampled_from([0.0, 100.0]))
def test_layer_norm_any_shape(lead, n, dtype, seed, shift):
    x = _x(lead + [n], dtype, seed, shift)
    w = _x([n], dtype, seed + 1)
    b = _x([n], dtype, seed + 2)
    out = ops.layer_norm(x, [n], w, b)
    ref = R.layer_norm(x.double(), [n], w.double(), b.double(), 1e-5)
    assert_close_to_reference(out, ref, F.layer_norm(x, [n], w, b))


@SETTINGS
@given(lead=LEAD, n=st.integers(1, 300), dtype=DTYPES, seed=st.integers(0, 2**31))
def test_rms_norm_any_shape(lead, n, dtype, seed):
    x = _x(lead + [n], dtype, seed)
    w = _x([n], dtype, seed + 1)
    out = ops.rms_norm(x, [n], w, 1e-6)
    ref = R.rms_norm(x.double(), [n], w.double(), 1e-6)
    assert_close_to_reference(out, ref, F.rms_norm(x, [n], w, 1e-6))


@SETTINGS
@given(
    lead=LEAD, n=st.integers(1, 300), dtype=DTYPES, seed=st.integers(0, 2**31), approx=st.sampled_from(["none", "tanh"])
)
def test_bias_gelu_any_shape(lead, n, dtype, seed, approx):
    x = _x(lead + [n], dtype, seed) * 3
    b = _x([n], dtype, seed + 1)
    out = ops.bias_gelu(x, b, approx)
    ref = R.bias_gelu(x.double(), b.double(), approx)
    assert_close_to_reference(out, ref, F.gelu(x + b, approximate=approx))


def _model_rms(x, w, offset, cast):
    """RMSNorm as Llama (cast) or Gemma write it, in x's dtype."""
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return (w + offset) * h.to(x.dtype) if cast else (h * (offset + w.float())).to(x.dtype)


@SETTINGS
@given(
    lead=LEAD,
    n=st.integers(1, 300),
    dtype=DTYPES,
    seed=st.integers(0, 2**31),
    offset=st.sampled_from([0.0, 1.0]),
    cast=st.booleans(),
    fp32_residual=st.booleans(),
)
def test_add_rms_norm_any_shape_and_options(lead, n, dtype, seed, offset, cast, fp32_residual):
    """add_rms_norm with Gemma's offset, Llama's casting order and a float32 residual stream on
    any shape: the normed output and the residual stream against float64."""
    x = _x(lead + [n], dtype, seed)
    half = dtype != torch.float32
    rdt = torch.float32 if fp32_residual and half else dtype
    r = _x(lead + [n], rdt, seed + 1, shift=2.0)
    w = _x([n], dtype, seed + 2)
    out, s = ops.add_rms_norm(
        x, r, [n], w, 1e-6, offset=offset, cast_before_weight=cast, residual_in_fp32=fp32_residual
    )
    ref, ref_s = R.add_rms_norm(x.double(), r.double(), [n], w.double(), 1e-6, offset, dtype if cast else None, rdt)
    base_s = x.to(rdt) + r
    assert out.dtype == dtype and s.dtype == rdt
    assert_close_to_reference(s, ref_s, base_s)
    assert_close_to_reference(out, ref, _model_rms(base_s, w, offset, cast).to(dtype))


@SETTINGS
@given(
    lead=LEAD,
    n=st.integers(1, 300),
    dtype=DTYPES,
    seed=st.integers(0, 2**31),
    act=st.sampled_from(["silu", "none", "tanh"]),
    halves=st.booleans(),
)
def test_glu_any_shape_forward_and_backward(lead, n, dtype, seed, act, halves):
    """swiglu / geglu on any shape, gate and up contiguous or the two halves of one
    projection, forward and both gradients."""
    if halves:
        h = _x(lead + [2 * n], dtype, seed) * 3
        gate, up = h[..., :n], h[..., n:]
    else:
        gate, up = _x(lead + [n], dtype, seed) * 3, _x(lead + [n], dtype, seed + 1)
    dy = _x(lead + [n], dtype, seed + 2)

    def run(g, u, fused):
        if act == "silu":
            return ops.swiglu(g, u) if fused else (R.swiglu(g, u) if g.dtype == torch.float64 else F.silu(g) * u)
        if fused:
            return ops.geglu(g, u, act)
        return R.geglu(g, u, act) if g.dtype == torch.float64 else F.gelu(g, approximate=act) * u

    results = []
    for g, u, fused in ((gate, up, True), (gate.double(), up.double(), False), (gate, up, False)):
        g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
        out = run(g, u, fused)
        results.append((out, *torch.autograd.grad(out, [g, u], dy.to(out.dtype))))
    for got, ref, base in zip(*results, strict=True):
        assert_close_to_reference(got, ref, base)


@SETTINGS
@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 3),
    groups=st.integers(1, 3),
    sq=st.integers(1, 40),
    sk=st.integers(1, 40),
    d=st.sampled_from([1, 8, 24]),
    causal=st.booleans(),
    dtype=DTYPES,
    seed=st.integers(0, 2**31),
)
def test_attention_any_shape(b, hkv, groups, sq, sk, d, causal, dtype, seed):
    hq = hkv * groups
    q = _x([b, hq, sq, d], dtype, seed)
    k = _x([b, hkv, sk, d], dtype, seed + 1)
    v = _x([b, hkv, sk, d], dtype, seed + 2)
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=groups > 1)
    ref = R.attention(q.double(), k.double(), v.double(), is_causal=causal)
    base = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=groups > 1)
    assert_close_to_reference(out, ref, base)


@SETTINGS
@given(
    lead=LEAD, n=st.integers(1, 300), dtype=DTYPES, seed=st.integers(0, 2**31), scale=st.sampled_from([1e-3, 1.0, 1e4])
)
def test_quantize_int8_matches_the_formula_bit_for_bit(lead, n, dtype, seed, scale):
    x = _x(lead + [n], torch.float32, seed).mul(scale).to(dtype)
    q, s = ops.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    # round trip within half a step per element
    err = (q.float() * s.unsqueeze(-1) - x.float()).abs()
    assert bool((err <= s.unsqueeze(-1) * 0.5 + 1e-6 * x.float().abs()).all())


@SETTINGS
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_int8_matmul_is_exact(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    assert torch.equal(ops.int8_matmul(a, b), R.int8_matmul(a, b).to(torch.int32))
