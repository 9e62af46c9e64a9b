"""decode_attention (KV-cache, flash-decoding): both backends against the float64 reference.

Each result is held to the correctness rule of llmkit.testing against ``llmkit.reference64.decode_attention``;
the baseline is PyTorch's math ``F.scaled_dot_product_attention`` in the inputs' dtype on
each sequence's valid cache prefix with the bottom-right causal mask (rows with no
visible key are checked on their own). The Triton kernels run through the interpreter
(TRITON_INTERPRET=1) with every buffer the launcher allocates poisoned with NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit import reference64 as R
from llmkit.dispatch import triton_interpreting
from llmkit.errors import BackendError
from llmkit.testing import assert_close_to_reference, poison_
from test_attention import math_in_input_dtype

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
BACKENDS = ["reference", "triton"]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every buffer the Triton launcher allocates (output and split partials) starts as NaN."""
    from llmkit.kernels import decode_attention as K

    real = K._empty
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: poison_(real(shape, dtype, device)))


def _cache(b, hq, hkv, t, s_max, d, dv, dtype, layout="bhsd"):
    q = torch.randn(b, hq, t, d, dtype=dtype, device=DEVICE)
    if layout == "bshd":  # (B, S, H, D) caches viewed as (B, H, S, D)
        kc = torch.randn(b, s_max, hkv, d, dtype=dtype, device=DEVICE).transpose(1, 2)
        vc = torch.randn(b, s_max, hkv, dv, dtype=dtype, device=DEVICE).transpose(1, 2)
    else:
        kc = torch.randn(b, hkv, s_max, d, dtype=dtype, device=DEVICE)
        vc = torch.randn(b, hkv, s_max, dv, dtype=dtype, device=DEVICE)
    return q, kc, vc


def _baseline(q, kc, vc, lengths, scale, causal):
    """SDPA (math, in the inputs' dtype) per sequence on its valid prefix; NaN-free rows only."""
    t = q.shape[2]
    outs = []
    for i, n in enumerate(lengths.tolist()):
        mask = None
        if causal:
            tt = torch.arange(t, device=q.device)[:, None]
            jj = torch.arange(n, device=q.device)[None, :]
            mask = jj < n - t + tt + 1
        with math_in_input_dtype():
            outs.append(
                F.scaled_dot_product_attention(
                    q[i : i + 1],
                    kc[i : i + 1, :, :n],
                    vc[i : i + 1, :, :n],
                    attn_mask=mask,
                    scale=scale,
                    enable_gqa=True,
                )
            )
    return torch.cat(outs)


def _decode(backend, q, kc, vc, lengths, scale=None, causal=True):
    with llmkit.use_backend(backend):
        return llmkit.ops.decode_attention(q, kc, vc, lengths, scale=scale, is_causal=causal)


def check_decode(backend, q, kc, vc, lengths, scale=None, causal=True):
    out = _decode(backend, q, kc, vc, lengths, scale, causal)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    ref = R.decode_attention(q.to(F64), kc.to(F64), vc.to(F64), lengths, s, causal)
    assert_close_to_reference(out, ref, _baseline(q, kc, vc, lengths, s, causal), "out")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 3, 16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_decode_ragged(backend, t, hq, hkv):
    s_max = 53
    dtype = [torch.float16, torch.bfloat16][(t + hq) % 2]
    q, kc, vc = _cache(3, hq, hkv, t, s_max, 32, 32, dtype)
    lengths = torch.tensor([s_max, t, 17 + t], dtype=torch.int32, device=DEVICE)
    check_decode(backend, q, kc, vc, lengths)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_not_causal_dtypes(backend, dtype):
    q, kc, vc = _cache(2, 4, 2, 3, 40, 64, 64, dtype)
    lengths = torch.tensor([40, 9], dtype=torch.int64, device=DEVICE)
    check_decode(backend, q, kc, vc, lengths, scale=0.3, causal=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,dv", [(80, 80), (128, 128), (64, 32)])
def test_decode_head_dims(backend, d, dv):
    q, kc, vc = _cache(2, 2, 1, 2, 35, d, dv, torch.bfloat16)
    check_decode(backend, q, kc, vc, torch.tensor([35, 20], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_bshd_cache_views(backend):
    q, kc, vc = _cache(2, 4, 2, 3, 45, 32, 32, torch.float16, layout="bshd")
    assert not kc.is_contiguous()
    check_decode(backend, q, kc, vc, torch.tensor([45, 30], device=DEVICE))


@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (3, 16), (7, 16), (2, 32), (64, 16)])
def test_decode_splits(num_splits, block_n):
    """The split (flash-decoding) and single-pass paths, splits past the end included."""
    from llmkit.kernels import decode_attention as K

    q, kc, vc = _cache(3, 8, 2, 4, 100, 32, 32, torch.float16)
    lengths = torch.tensor([100, 4, 58], device=DEVICE)
    out, _ = K.decode_attention(q, kc, vc, lengths, 0.2, True, block_n=block_n, num_splits=num_splits)
    ref = R.decode_attention(q.to(F64), kc.to(F64), vc.to(F64), lengths, 0.2, True)
    assert_close_to_reference(out, ref, _baseline(q, kc, vc, lengths, 0.2, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rows_with_no_key(backend):
    """L_b < T (causal) or L_b = 0 leaves rows with no visible key: zeros, no NaN."""
    t = 3
    q, kc, vc = _cache(3, 2, 2, t, 20, 32, 32, torch.float16)
    lengths = torch.tensor([1, 0, 20], device=DEVICE)
    out = _decode(backend, q, kc, vc, lengths)
    assert not out.isnan().any()
    assert (out[0, :, :2] == 0).all() and (out[1] == 0).all()  # sequence 0: tokens 0, 1 see nothing
    assert torch.equal(out[0, :, 2], vc[0, :, 0])  # token 2 sees key 0 alone: its value, exactly
    last = slice(2, 3)
    check_decode(backend, q[last], kc[last], vc[last], lengths[last])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_matches_prefill_attention(backend):
    """The last T rows of causal attention over a full sequence equal decode of those T tokens."""
    b, h, s, t, d = 2, 4, 29, 5, 32
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float16, device=DEVICE) for _ in range(3))
    dec = _decode(backend, q[:, :, -t:], k, v, torch.full((b,), s, device=DEVICE))
    ref = R.attention(q.to(F64), k.to(F64), v.to(F64), is_causal=True)[:, :, -t:]
    assert_close_to_reference(dec, ref, _baseline(q[:, :, -t:], k, v, torch.full((b,), s), None, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_empty(backend):
    q, kc, vc = _cache(0, 2, 2, 1, 8, 16, 16, torch.float16)
    assert _decode(backend, q, kc, vc, torch.zeros(0, dtype=torch.int32, device=DEVICE)).shape == (0, 2, 1, 16)
    q, kc, vc = _cache(2, 2, 2, 1, 0, 16, 16, torch.float16)
    out = _decode(backend, q, kc, vc, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    assert out.shape == (2, 2, 1, 16) and (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_decode(backend):
    q, kc, vc = _cache(2, 4, 2, 2, 19, 16, 16, torch.float16)
    with llmkit.use_backend(backend):
        torch.library.opcheck(
            torch.ops.llmkit.decode_attention.default,
            (q, kc, vc, torch.tensor([19, 7], dtype=torch.int32, device=DEVICE), 0.25, True),
        )


def test_decode_bad_inputs():
    dec = llmkit.ops.decode_attention
    q, kc, vc = _cache(2, 4, 2, 1, 8, 16, 16, torch.float16)
    lens = torch.tensor([8, 3], device=DEVICE)
    with pytest.raises(ValueError, match="cache_seqlens has shape"):
        dec(q, kc, vc, lens[:1])
    with pytest.raises(TypeError, match="cache_seqlens has dtype float32"):
        dec(q, kc, vc, lens.float())
    if DEVICE == "cpu":  # lengths on a GPU are not read back (no sync) to be range-checked
        with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 8\]"):
            dec(q, kc, vc, torch.tensor([9, 3]))
    with pytest.raises(ValueError, match="head dims disagree"):
        dec(q, kc[..., :8], vc, lens)
    with pytest.raises(ValueError, match="multiple"):
        dec(q, *_cache(2, 4, 3, 1, 8, 16, 16, torch.float16)[1:], lens)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        dec(q, kc[:1], vc[:1], lens)
    big = _cache(1, 2, 2, 1, 4, 264, 264, torch.float16)
    with pytest.raises(BackendError, match="head dim 264 exceeds 256"):
        _decode("triton", *big, torch.tensor([4], device=DEVICE))
