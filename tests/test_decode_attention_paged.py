"""decode_attention with a paged KV cache, ``cache_batch_idx``, ``k_new`` / ``v_new`` appended
inside the call, and ``return_lse``: both backends against float64 math written here.

The float64 yardstick gathers each sequence's keys and values position by position from the
paged cache (block ``table[b, j // block_size]``, slot ``j % block_size``) and does plain
softmax attention with the bottom-right causal rule; the baseline of the tolerance rule is
PyTorch's math SDPA in the inputs' dtype on the same gathered prefixes. Triton runs through the
interpreter with every buffer its launcher allocates poisoned.
"""

from __future__ import annotations

import math

import pytest
import torch

import llmkit
from llmkit.testing import assert_close_to_reference
from test_decode_attention import (  # noqa: F401  (_poison_kernel_outputs: the autouse fixture)
    BACKENDS,
    DEVICE,
    F64,
    _baseline,
    _poison_kernel_outputs,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _paged(b, hkv, lens, bs, d, dv, dtype, extra_blocks=3, pad=-1):
    """Paged caches holding random keys / values, each sequence's blocks scattered through the
    pool in random order; table entries past a sequence's need are ``pad``. Returns
    (key_cache, value_cache, block_table, max_blocks)."""
    need = [-(-n // bs) for n in lens]
    max_blocks = max(need + [1]) + 1
    n_blocks = sum(need) + extra_blocks
    perm = torch.randperm(n_blocks).tolist()
    table = torch.full((b, max_blocks), pad, dtype=torch.int32)
    for i, n in enumerate(need):
        for j in range(n):
            table[i, j] = perm.pop()
    kc = torch.randn(n_blocks, bs, hkv, d, dtype=dtype, device=DEVICE)
    vc = torch.randn(n_blocks, bs, hkv, dv, dtype=dtype, device=DEVICE)
    return kc, vc, table.to(DEVICE)


def _gather(cache, table, n):
    """(Hkv, n, D): positions 0..n-1 of one sequence, one by one from its blocks."""
    bs = cache.shape[1]
    rows = [cache[int(table[j // bs]), j % bs] for j in range(n)]  # each (Hkv, D)
    return torch.stack(rows, 1) if rows else cache.new_zeros((cache.shape[2], 0, cache.shape[3]))


def _contiguous(kc, vc, table, lens, s_max):
    """The same caches as (B, Hkv, s_max, D) tensors (zeros past each length)."""
    b = table.shape[0]
    k = kc.new_zeros((b, kc.shape[2], s_max, kc.shape[3]))
    v = vc.new_zeros((b, vc.shape[2], s_max, vc.shape[3]))
    for i, n in enumerate(lens):
        k[i, :, :n] = _gather(kc, table[i], n)
        v[i, :, :n] = _gather(vc, table[i], n)
    return k, v


def _math64(q, keys, values, lens, scale, causal, dtype=F64):
    """float64 out (B, Hq, T, Dv) and lse (B, Hq, T) from per-sequence (Hkv, L, D) keys/values.
    ``dtype``: the scores computed in another dtype (the lse baseline: PyTorch's math in the
    inputs' dtype, then a float32 logsumexp)."""
    b, hq, t, _ = q.shape
    out = torch.zeros(b, hq, t, values[0].shape[-1], dtype=F64)
    lse = torch.full((b, hq, t), float("inf"), dtype=F64)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        g = hq // keys[i].shape[0]
        k = keys[i].to(dtype).cpu().repeat_interleave(g, 0)
        v = values[i].to(F64).cpu().repeat_interleave(g, 0)
        s = (q[i].to(dtype).cpu() @ k.transpose(-1, -2) * scale).to(F64 if dtype == F64 else torch.float32)
        if causal:
            vis = torch.arange(n)[None, :] < n - t + torch.arange(t)[:, None] + 1
            s = s.masked_fill(~vis, float("-inf"))
        row_lse = torch.logsumexp(s, -1)
        live = torch.isfinite(row_lse)
        p = torch.exp(s - torch.where(live, row_lse, 0.0)[..., None]).to(F64)
        out[i] = torch.where(live[..., None], p @ v, 0.0)
        lse[i] = torch.where(live, row_lse, float("inf"))
    return out, lse


def _decode(backend, q, kc, vc, lens, **kw):
    with llmkit.use_backend(backend):
        return llmkit.ops.decode_attention(q, kc, vc, lens, **kw)


def _check(out, lse, q, keys, values, lens, scale, causal, contig_k, contig_v):
    ref, ref_lse = _math64(q, keys, values, lens, scale, causal)
    lens_t = torch.tensor(lens, device=DEVICE)
    assert_close_to_reference(out, ref, _baseline(q, contig_k, contig_v, lens_t, scale, causal), "out")
    # lse: the baseline is PyTorch's math with the scores in the inputs' dtype, logsumexp in float32
    base = _math64(q, keys, values, lens, scale, causal, dtype=q.dtype)[1]
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close_to_reference(lse, ref_lse, base.float(), "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 7, 48, 256])
def test_paged_against_float64(backend, dtype, bs):
    t = 1 if bs in (16, 256) else 3
    hq, hkv, d = 4, 2, 32
    lens = [37, t, 1 + 2 * bs, 0] if t == 1 else [37, t, 1 + 2 * bs, 2]
    b = len(lens)
    kc, vc, table = _paged(b, hkv, lens, bs, d, d, dtype)
    q = torch.randn(b, hq, t, d, dtype=dtype, device=DEVICE)
    scale = 1 / math.sqrt(d)
    out, lse = _decode(backend, q, kc, vc, torch.tensor(lens, device=DEVICE), block_table=table, return_lse=True)
    keys = [_gather(kc, table[i], n) for i, n in enumerate(lens)]
    values = [_gather(vc, table[i], n) for i, n in enumerate(lens)]
    ck, cv = _contiguous(kc, vc, table, lens, max(lens))
    _check(out, lse, q, keys, values, lens, scale, True, ck, cv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_paged_equals_contiguous(backend, causal):
    """The same cache, paged or contiguous (capacity alike): the same output and lse, bit for bit."""
    bs, lens, hq, hkv, d = 16, [50, 17, 33], 8, 2, 64
    kc, vc, table = _paged(3, hkv, lens, bs, d, d, torch.float16)
    ck, cv = _contiguous(kc, vc, table, lens, table.shape[1] * bs)
    q = torch.randn(3, hq, 2, d, dtype=torch.float16, device=DEVICE)
    lens_t = torch.tensor(lens, device=DEVICE)
    paged = _decode(backend, q, kc, vc, lens_t, block_table=table, is_causal=causal, return_lse=True)
    contig = _decode(backend, q, ck, cv, lens_t, is_causal=causal, return_lse=True)
    assert torch.equal(paged[0], contig[0]) and torch.equal(paged[1], contig[1])


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_paged_splits(num_splits):
    """The Triton split (flash-decoding) and single-pass paths on a paged cache, with block sizes
    that straddle the key tiles (16-key tiles over 12-slot blocks)."""
    from llmkit.kernels import decode_attention as K

    lens, bs, d = [70, 5, 41], 12, 32
    kc, vc, table = _paged(3, 2, lens, bs, d, d, torch.float16)
    q = torch.randn(3, 8, 4, d, dtype=torch.float16, device=DEVICE)
    out, lse = K.decode_attention(
        q, kc, vc, torch.tensor(lens, device=DEVICE), 0.2, True, table, None, block_n=16, num_splits=num_splits
    )
    keys = [_gather(kc, table[i], n) for i, n in enumerate(lens)]
    values = [_gather(vc, table[i], n) for i, n in enumerate(lens)]
    ck, cv = _contiguous(kc, vc, table, lens, max(lens))
    _check(out, lse, q, keys, values, lens, 0.2, True, ck, cv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_batch_idx(backend):
    """Sequence b reads row cache_batch_idx[b] of a larger contiguous cache (a (B, S, H, D) view)."""
    lens, hq, hkv, d = [20, 9, 31], 6, 3, 16
    kc = torch.randn(5, 31, hkv, d, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    vc = torch.randn(5, 31, hkv, d, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    idx = torch.tensor([4, 0, 2], device=DEVICE)
    q = torch.randn(3, hq, 1, d, dtype=torch.bfloat16, device=DEVICE)
    out, lse = _decode(backend, q, kc, vc, torch.tensor(lens, device=DEVICE), cache_batch_idx=idx, return_lse=True)
    keys = [kc[int(r), :, :n] for r, n in zip(idx, lens, strict=True)]
    values = [vc[int(r), :, :n] for r, n in zip(idx, lens, strict=True)]
    _check(out, lse, q, keys, values, lens, 0.25, True, kc[idx], vc[idx])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "paged", "batch_idx"])
def test_append_new_tokens(backend, layout):
    """k_new / v_new land at positions L_b .. L_b + T_new - 1 (lengths before the call), and the
    attention covers them: equal to writing them first and calling without k_new."""
    lens, t, hq, hkv, d, bs = [13, 0, 30], 2, 4, 2, 16, 8
    dtype = torch.float16
    b = len(lens)
    table = idx = None
    if layout == "paged":
        kc, vc, table = _paged(b, hkv, [n + t for n in lens], bs, d, d, dtype)
    else:
        rows = 4 if layout == "batch_idx" else b
        kc = torch.randn(rows, hkv, 40, d, dtype=dtype, device=DEVICE)
        vc = torch.randn(rows, hkv, 40, d, dtype=dtype, device=DEVICE)
        idx = torch.tensor([3, 1, 0], device=DEVICE) if layout == "batch_idx" else None
    q = torch.randn(b, hq, t, d, dtype=dtype, device=DEVICE)
    k_new = torch.randn(b, hkv, t, d, dtype=dtype, device=DEVICE)
    v_new = torch.randn(b, hkv, t, d, dtype=dtype, device=DEVICE)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # what the caches must hold afterwards, written here slot by slot
    want_k, want_v = kc.clone(), vc.clone()
    for i, n in enumerate(lens):
        for j in range(t):
            pos = n + j
            if table is not None:
                blk, slot = int(table[i, pos // bs]), pos % bs
                want_k[blk, slot], want_v[blk, slot] = k_new[i, :, j], v_new[i, :, j]
            else:
                r = i if idx is None else int(idx[i])
                want_k[r, :, pos], want_v[r, :, pos] = k_new[i, :, j], v_new[i, :, j]
    kw = dict(block_table=table, cache_batch_idx=idx, return_lse=True)
    out, lse = _decode(backend, q, kc, vc, lens_t, k_new=k_new, v_new=v_new, **kw)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert torch.equal(lens_t, torch.tensor(lens, dtype=torch.int32, device=DEVICE))  # not changed in place
    after = lens_t + t
    ref_out, ref_lse = _decode(backend, q, want_k, want_v, after, **kw)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    if table is not None:
        keys = [_gather(want_k, table[i], n + t) for i, n in enumerate(lens)]
        values = [_gather(want_v, table[i], n + t) for i, n in enumerate(lens)]
        ck, cv = _contiguous(want_k, want_v, table, [n + t for n in lens], max(lens) + t)
    else:
        rows = list(range(b)) if idx is None else idx.tolist()
        keys = [want_k[r, :, : n + t] for r, n in zip(rows, lens, strict=True)]
        values = [want_v[r, :, : n + t] for r, n in zip(rows, lens, strict=True)]
        ck, cv = want_k[rows], want_v[rows]
    _check(out, lse, q, keys, values, [n + t for n in lens], 0.25, True, ck, cv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_merges_partial_attention(backend):
    """Two halves of a cache attended apart merge, by their lse, into the whole (ring / chunked
    attention): out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2)."""
    b, hq, hkv, d, s = 2, 4, 2, 32, 40
    q = torch.randn(b, hq, 1, d, device=DEVICE)
    kc, vc = (torch.randn(b, hkv, s, d, device=DEVICE) for _ in range(2))
    full = torch.full((b,), s, device=DEVICE)
    half = torch.full((b,), s // 2, device=DEVICE)
    whole = _decode(backend, q, kc, vc, full, is_causal=False)
    o1, l1 = _decode(backend, q, kc[:, :, : s // 2], vc[:, :, : s // 2], half, is_causal=False, return_lse=True)
    o2, l2 = _decode(backend, q, kc[:, :, s // 2 :], vc[:, :, s // 2 :], half, is_causal=False, return_lse=True)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
    merged = (w1 * o1 + w2 * o2) / (w1 + w2)
    assert (merged - whole).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_of_rows_with_no_key(backend):
    q = torch.randn(2, 2, 3, 16, dtype=torch.float16, device=DEVICE)
    kc, vc, table = _paged(2, 2, [1, 0], 16, 16, 16, torch.float16)
    out, lse = _decode(backend, q, kc, vc, torch.tensor([1, 0], device=DEVICE), block_table=table, return_lse=True)
    assert (out[0, :, :2] == 0).all() and (out[1] == 0).all()
    assert torch.isinf(lse[0, :, :2]).all() and (lse[0, :, :2] > 0).all() and (lse[1] == float("inf")).all()
    assert torch.isfinite(lse[0, :, 2]).all()


def test_opcheck_paged():
    kc, vc, table = _paged(2, 2, [19, 7], 8, 16, 16, torch.float16)
    q = torch.randn(2, 4, 2, 16, dtype=torch.float16, device=DEVICE)
    for backend in BACKENDS:
        with llmkit.use_backend(backend):
            torch.library.opcheck(
                torch.ops.llmkit.decode_attention.default,
                (q, kc, vc, torch.tensor([19, 7], dtype=torch.int32, device=DEVICE), 0.25, True, table, None),
            )


def _bad_cases():
    """(name, kwargs changes, error type, message regex) for a paged / appending call."""
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return [
        (
            "table past the pool",
            dict(table_entry=(0, 1, 99)),
            ValueError,
            r"block_table\[0, 1\] = 99 points outside the cache.*\[0, 8\)",
        ),
        ("negative entry in use", dict(table_entry=(1, 0, -1)), ValueError, r"block_table\[1, 0\] = -1 points outside"),
        ("block size mismatch", dict(v_block=8), ValueError, "key_cache has shape .* but value_cache has"),
        ("lengths past capacity", dict(lens=[25, 3]), ValueError, r"cache_seqlens must lie in \[0, 24\] \(max_blocks"),
        (
            "append past capacity",
            dict(lens=[23, 3], new=2),
            ValueError,
            r"cache_seqlens \+ 2 new tokens must lie in \[0, 24\]",
        ),
        ("append into a -1 entry", dict(lens=[16, 3], new=1), ValueError, r"block_table\[0, 2\] = -1"),
        ("k_new heads", dict(new=1, k_new_shape=(2, 1, 1, 16)), ValueError, r"k_new has shape \[2, 1, 1, 16\]"),
        ("v_new tokens", dict(new=1, v_new_shape=(2, 2, 2, 16)), ValueError, r"v_new has shape \[2, 2, 2, 16\]"),
        ("k_new alone", dict(new=1, drop_v=True), ValueError, "k_new and v_new go together"),
        ("k_new dtype", dict(new=1, k_new_dtype=torch.float32), TypeError, "k_new has dtype float32"),
        ("table dtype", dict(table_dtype=torch.int64), TypeError, "block_table has dtype int64"),
        ("table rows", dict(table_rows=1), ValueError, r"block_table has shape \[1, 3\]; it must be \[2, max_blocks\]"),
        (
            "batch idx with table",
            dict(batch_idx=torch.tensor([0, 1], **i32)),
            ValueError,
            "cache_batch_idx cannot be combined with block_table",
        ),
        ("block size 0", dict(block0=True), ValueError, "block size must be at least 1"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_paged_bad_input_before_any_write(case):
    """Bad input raises a clear error before anything is written to the caches or launched."""
    _, kw, err, msg = case
    d, bs = 16, 8
    lens = kw.get("lens", [9, 3])
    kc, vc, table = _paged(2, 2, [9, 3], bs, d, d, torch.float16, extra_blocks=5)  # 8 blocks, 3 per row
    table = table.clone()
    if "table_entry" in kw:
        i, j, val = kw["table_entry"]
        table[i, j] = val
    if kw.get("v_block"):
        vc = vc[:, : kw["v_block"] - 1]
    if kw.get("block0"):
        kc, vc = kc[:, :0], vc[:, :0]
    if "table_dtype" in kw:
        table = table.to(kw["table_dtype"])
    if "table_rows" in kw:
        table = table[: kw["table_rows"]]
    q = torch.randn(2, 4, 1, d, dtype=torch.float16, device=DEVICE)
    extra = {}
    if kw.get("new"):
        t_new = kw["new"]
        k_new = torch.randn(
            *kw.get("k_new_shape", (2, 2, t_new, d)), dtype=kw.get("k_new_dtype", torch.float16), device=DEVICE
        )
        v_new = torch.randn(*kw.get("v_new_shape", (2, 2, t_new, d)), dtype=torch.float16, device=DEVICE)
        extra = dict(k_new=k_new) if kw.get("drop_v") else dict(k_new=k_new, v_new=v_new)
    before = kc.clone(), vc.clone()
    for backend in BACKENDS:
        with pytest.raises(err, match=msg):
            _decode(
                backend,
                q,
                kc,
                vc,
                torch.tensor(lens, device=DEVICE),
                block_table=table,
                cache_batch_idx=kw.get("batch_idx"),
                **extra,
            )
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_contiguous_bad_input():
    kc = torch.randn(3, 2, 10, 16, dtype=torch.float16, device=DEVICE)
    q = torch.randn(2, 4, 1, 16, dtype=torch.float16, device=DEVICE)
    lens = torch.tensor([4, 5], device=DEVICE)
    with pytest.raises(ValueError, match="batch sizes disagree: query 2, key_cache 3"):
        llmkit.ops.decode_attention(q, kc, kc, lens)
    with pytest.raises(ValueError, match=r"cache_batch_idx must lie in \[0, 3\).*from 0 to 3"):
        llmkit.ops.decode_attention(q, kc, kc, lens, cache_batch_idx=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"cache_batch_idx has shape \[3\]"):
        llmkit.ops.decode_attention(q, kc, kc, lens, cache_batch_idx=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="cache_batch_idx has dtype float32"):
        llmkit.ops.decode_attention(q, kc, kc, lens, cache_batch_idx=torch.tensor([0.0, 1.0]))
    new = torch.randn(2, 2, 1, 16, dtype=torch.float16, device=DEVICE)
    before = kc.clone()
    with pytest.raises(ValueError, match="cache_batch_idx repeats a cache row"):
        llmkit.ops.decode_attention(q, kc, kc, lens, cache_batch_idx=torch.tensor([1, 1]), k_new=new, v_new=new)
    assert torch.equal(kc, before)


def test_cuda_ext_declines_paged():
    from llmkit.backends.cuda_ext.decode_attention import _reasons
    from llmkit.ops.decode_attention import DecodeAttentionCall

    kc, vc, table = _paged(1, 2, [5], 16, 16, 16, torch.float16)
    q = torch.randn(1, 2, 1, 16, dtype=torch.float16, device=DEVICE)
    why = list(_reasons(DecodeAttentionCall(q, kc, vc, torch.tensor([5]), 0.25, True, table, None)))
    assert why and "paged KV cache (block_table)" in why[0]
