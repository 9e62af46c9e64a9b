"""Fuzzing decode_attention on every backend against float64 math (hypothesis; see tests/_fuzz.py).

Drawn per example: dtype, batch (0 included), K/V heads and GQA group, new tokens T, head dim
(1, odd, primes), cache capacity and ragged lengths (0, 1, primes, full), a contiguous cache in
any layout (transposed, sliced rows, stride 0 along the batch) or a paged one (blocks of 1, 3,
16, scattered), ``cache_batch_idx``, causal or not, any finite scale (0 and negative included),
and per-row value classes of q / k / v (normal, huge, denormal, constant, zeros, NaN / +-inf).
Slots past each length are filled with NaN / inf: they never reach the output.

The yardstick gathers every sequence's prefix in float64 and runs
:func:`llmkit.reference64.decode_attention`. Rule (tests/_fuzz.py): where float64 is finite,
llmkit is finite and within tolerance; where it is not (a NaN query or a NaN / inf key or
value that a row sees), llmkit's is not finite either; rows that see no key are zeros.
Documented limit: "huge" values are drawn so that scores stay inside float32's range
(|q . k * scale| < 3.4e38): scores past it are not representable in the float32 every
backend computes them in; and inf against a denormal in q . k may give NaN where float64
gives a score of -inf (kernels may flush denormals to zero: inf x 0), so NaN / inf queries
are not drawn with denormal keys, nor NaN / inf keys with denormal queries.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmkit
from _fuzz import F64, KINDS, WARNINGS, check, gens, layout, run_fuzz, values
from llmkit import reference64 as R

pytestmark = [pytest.mark.filterwarnings(w) for w in WARNINGS]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# huge values whose products stay inside float32 (and float16) range: scores at most ~1e30
HUGE = {torch.float16: 1e2, torch.bfloat16: 1e14, torch.float32: 1e14}
EXAMPLES = {"reference": 60, "triton": 40}


@st.composite
def decode_calls(draw):
    gen = draw(gens())
    dtype = draw(st.sampled_from(DTYPES))
    b = draw(st.sampled_from([1, 2, 3, 0, 2]))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    t = draw(st.sampled_from([1, 1, 2, 3, 5]))
    d = draw(st.sampled_from([16, 1, 7, 32, 61]))
    s_max = draw(st.sampled_from([0, 1, 2, 3, 7, 13, 31, 61]))
    lens = [draw(st.integers(0, s_max)) for _ in range(b)]
    cache = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "paged", "paged", "batch_idx"]))
    bs = draw(st.sampled_from([1, 3, 16])) if cache == "paged" else 0
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, None, 0.0, -0.5, 1e-3, 3.0]))
    kinds = [draw(st.sampled_from(KINDS)) for _ in range(3)]
    for i, j in ((0, 1), (1, 0)):  # inf x denormal in q . k: documented limit (module docstring)
        if kinds[i] in ("specials", "mixed") and kinds[j] in ("tiny", "mixed"):
            kinds[j] = "normal"
    return gen, dtype, b, hkv, group, t, d, s_max, lens, cache, bs, causal, scale, kinds


def _build(gen, dtype, b, hkv, group, t, d, s_max, lens, cache, bs, kinds):
    """(q, key_cache, value_cache, kwargs, k64, v64): the call's tensors and each sequence's
    contiguous float64 (B, Hkv, S_max, D) cache (what the yardstick reads)."""
    huge = HUGE[dtype]
    q = values((b, hkv * group, t, d), dtype, kinds[0], gen, huge=huge)
    k64 = values((b, hkv, s_max, d), dtype, kinds[1], gen, huge=huge)
    v64 = values((b, hkv, s_max, d), dtype, kinds[2], gen, huge=huge)
    past = torch.arange(s_max)[None, :] >= torch.tensor(lens, dtype=torch.int64).view(b, 1)  # (B, S_max)
    kc, vc = k64.clone(), v64.clone()
    kc.transpose(1, 2)[past] = float("nan")  # garbage past each length: never part of the problem
    vc.transpose(1, 2)[past] = float("inf")
    kw: dict = {}
    if cache == "paged":
        per_seq = max(1, -(-s_max // bs))
        n_blocks = b * per_seq + 2
        perm = torch.randperm(n_blocks, generator=gen)[: b * per_seq].view(b, per_seq).to(torch.int32)
        pk = torch.full((n_blocks, bs, hkv, d), float("nan"), dtype=dtype)
        pv = torch.full((n_blocks, bs, hkv, d), float("nan"), dtype=dtype)
        pos = torch.arange(s_max)
        for i in range(b):
            pk[perm[i, pos // bs].long(), pos % bs] = kc[i].transpose(0, 1)
            pv[perm[i, pos // bs].long(), pos % bs] = vc[i].transpose(0, 1)
        for i, n in enumerate(lens):  # entries past a sequence's need are never read
            perm[i, -(-n // bs) :] = -1
        kw["block_table"] = perm
        return q, pk, pv, kw, k64, v64
    if cache == "batch_idx":
        rows = torch.randperm(b + 1, generator=gen)[:b]
        big_k = torch.full((b + 1, hkv, s_max, d), float("nan"), dtype=dtype)
        big_v = big_k.clone()
        big_k[rows], big_v[rows] = kc, vc
        kw["cache_batch_idx"] = rows
        return q, big_k, big_v, kw, k64, v64
    if cache == "expanded" and b > 0:  # every sequence the same cache (stride 0 along the batch)
        k64, v64 = k64[:1].expand_as(k64), v64[:1].expand_as(v64)
        past = past[:1].expand_as(past)
        lens[:] = [lens[0]] * b
        kc, vc = layout(kc, "expanded"), layout(vc, "expanded")
    else:
        kc, vc = layout(kc, cache), layout(vc, cache)
    return q, kc, vc, kw, k64, v64


def _baseline(q, k64, v64, lens, scale, causal, dtype, kernel):
    """PyTorch's SDPA (``kernel``: its fused CPU kernel or its math) per sequence on its prefix,
    in ``dtype``, rounded to q's dtype."""
    t = q.shape[2]
    outs = []
    for i, n in enumerate(lens):
        if n == 0:
            outs.append(torch.zeros(q.shape[1:3] + (v64.shape[-1],), dtype=dtype))
            continue
        mask = torch.arange(n)[None, :] < n - t + torch.arange(t)[:, None] + 1 if causal else None
        qq, kk, vv = q[i : i + 1].to(dtype), k64[i : i + 1, :, :n].to(dtype), v64[i : i + 1, :, :n].to(dtype)
        with sdpa_kernel(kernel):
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)[0]
        if mask is not None:
            o = o.masked_fill(~mask.any(-1)[None, :, None], 0.0)  # SDPA gives NaN on rows with no key
        outs.append(o)
    return torch.stack(outs).to(q.dtype) if outs else None


def _case(backend, data):
    gen, dtype, b, hkv, group, t, d, s_max, lens, cache, bs, causal, scale, kinds = data.draw(decode_calls())
    lens = list(lens)
    q, kc, vc, kw, k64, v64 = _build(gen, dtype, b, hkv, group, t, d, s_max, lens, cache, bs, kinds)
    lens_t = torch.tensor(lens, dtype=torch.int32).view(b)
    with llmkit.use_backend(backend):
        out = llmkit.ops.decode_attention(q, kc, vc, lens_t, scale=scale, is_causal=causal, **kw)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    if b == 0:
        assert out.shape == (0, hkv * group, t, d)
        return
    ref = R.decode_attention(q.to(F64), k64.to(F64), v64.to(F64), lens_t, s, causal)
    base = [
        _baseline(q, k64, v64, lens, s, causal, dt, kernel)
        for dt in {dtype, torch.float32}
        for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    ]
    # rows that see no key are zeros by convention (the float64 p @ v gives 0 * NaN there)
    tok = torch.arange(t)
    has_key = (lens_t[:, None] - t + tok + 1 > 0) if causal else (lens_t[:, None] > 0).expand(b, t)
    dead = ~has_key[:, None, :, None]
    assert (out.masked_select(dead.expand(out.shape)) == 0).all(), "a row with no visible key is not zeros"
    check(f"decode {backend} {cache}", out, ref, base, allow_finite=dead)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fuzz_decode(backend, request):
    run_fuzz(request, backend, EXAMPLES[backend], f"decode-{backend}", _case)
