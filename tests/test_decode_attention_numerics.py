"""decode_attention at the edges of its numerics: cache slots no new token may see.

A slot past a sequence's ``cache_seqlens`` is not part of its problem: whatever it holds (a
cache made with ``torch.empty``: NaN, inf) never reaches the output, on every backend. A key
inside the length that the causal rule hides from an earlier token never enters that token's
row either (its score is replaced, not added to); only its value, seen by a later token,
reaches the rows of that token (NaN stays NaN there, as in the float64 math).
"""

from __future__ import annotations

import math

import pytest
import torch

from llmkit import reference64 as R
from test_decode_attention import (  # noqa: F401  (_poison_kernel_outputs: the autouse fixture)
    BACKENDS,
    DEVICE,
    F64,
    _cache,
    _decode,
    _poison_kernel_outputs,
    check_decode,
)


def _dirty_past(kc, vc, lens):
    """Copies of the caches with NaN keys and inf / NaN values in every slot past each length."""
    s_max = kc.shape[2]
    past = torch.arange(s_max, device=DEVICE)[None, :] >= lens[:, None]  # (B, S_max)
    dk, dv = kc.clone(), vc.clone()
    dk.permute(0, 2, 1, 3)[past] = float("nan")
    dv.permute(0, 2, 1, 3)[past] = float("inf")
    dv[past[:, -1], :, -1] = float("nan")  # the last slot, where it is past the length
    return dk, dv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("lengths", [[17, 39, 5], [9, 9, 9], [0, 4, 1]], ids=["ragged", "equal", "short"])
def test_decode_cache_garbage_past_lengths(backend, t, lengths):
    b, hq, hkv, s_max, d = 3, 4, 2, 40, 16
    q, kc, vc = _cache(b, hq, hkv, t, s_max, d, d, torch.float16)
    lens = torch.tensor(lengths, device=DEVICE)
    dk, dv = _dirty_past(kc, vc, lens)
    ref = R.decode_attention(q.to(F64), dk.to(F64), dv.to(F64), lens, 1 / math.sqrt(d), True)
    assert torch.isfinite(ref).all()  # the float64 math reads each sequence's prefix only
    out = check_decode(backend, q, dk, dv, lens)  # the rule, against that math
    assert torch.isfinite(out).all()
    if backend == "triton":  # the kernel reads such slots as zeros: bit for bit the clean result
        assert torch.equal(out, _decode(backend, q, kc, vc, lens))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[12, 12], [12, 20]], ids=["equal", "ragged"])
def test_decode_causally_hidden_nan_key(backend, lengths):
    """Token 0 of 3 does not see the last two keys of its sequence: NaN in them (keys) never
    enters its row; tokens that see such a key get NaN there, like the float64 math."""
    t, d = 3, 16
    q, kc, vc = _cache(2, 4, 2, t, 24, d, d, torch.float32)
    lens = torch.tensor(lengths, device=DEVICE)
    for i, n in enumerate(lengths):
        kc[i, :, n - 1] = float("nan")  # seen by token 2 only
    out = _decode(backend, q, kc, vc, lens)
    ref = R.decode_attention(q.to(F64), kc.to(F64), vc.to(F64), lens, 1 / math.sqrt(d), True)
    assert torch.isfinite(ref[:, :, :2]).all() and ref[:, :, 2].isnan().all()
    assert torch.isfinite(out[:, :, :2]).all() and out[:, :, 2].isnan().all()
    assert (out[:, :, :2].double() - ref[:, :, :2]).abs().max() < 1e-5


def test_cuda_ext_decode_hands_clean_values(monkeypatch):
    """The CUDA attention kernel multiplies a masked value by a zero probability: the cuda_ext
    decode wrapper zeroes value slots past each length first. Checked on the CPU with a
    stand-in for the extension's kernel that does the same multiply (NaN * 0 = NaN)."""
    from llmkit.backends.cuda_ext import decode_attention as E
    from llmkit.ops.decode_attention import DecodeAttentionCall

    def fake_attention_fwd(q, k, v, mask, dropout_p, causal, scale, seed, offset):
        g = q.shape[1] // k.shape[1]
        s = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        return (p @ v.float().repeat_interleave(g, 1)).to(q.dtype), torch.logsumexp(s, -1)

    class FakeOps:
        attention_fwd = staticmethod(fake_attention_fwd)

    monkeypatch.setattr(E, "ext_ops", lambda: FakeOps)
    q, kc, vc = _cache(3, 4, 2, 2, 30, 16, 16, torch.float16)
    lens = torch.tensor([30, 7, 1], device=DEVICE)
    dk, dv = _dirty_past(kc, vc, lens)
    out, _ = E.decode_attention_forward_cuda_ext(DecodeAttentionCall(q, dk, dv, lens, 0.25, True))
    clean, _ = E.decode_attention_forward_cuda_ext(DecodeAttentionCall(q, kc, vc, lens, 0.25, True))
    assert torch.isfinite(out).all() and torch.equal(out, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_row_without_key_is_zeros_whatever_values_hold(backend):
    """T = 2 against one key, causal: token 0 sees nothing (zeros), token 1 sees the key, whose
    value holds NaN / inf in some columns (NaN / inf there, like the float64 math)."""
    q, kc, vc = _cache(1, 2, 1, 2, 4, 16, 16, torch.float16)
    vc[0, 0, 0, 3], vc[0, 0, 0, 7] = float("nan"), float("inf")
    out = _decode(backend, q, kc, vc, torch.tensor([1], device=DEVICE))
    assert (out[:, :, 0] == 0).all()
    assert out[0, :, 1, 3].isnan().all() and out[0, :, 1, 7].isinf().all()
    assert torch.equal(torch.isfinite(out[0, :, 1]), torch.isfinite(vc[0, 0, 0]).expand(2, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_nan_or_inf_scores_give_nan(backend):
    """Every key a row sees gives a NaN score, or one gives +inf: the math is NaN (ATen's CPU
    kernel returned zeros for such rows)."""
    q, kc, vc = _cache(2, 2, 2, 1, 3, 16, 16, torch.float32)
    kc[0, :, :, 0] = float("nan")  # sequence 0: every key NaN
    kc[1, :, 1] = float("inf")
    q[1] = q[1].abs()  # sequence 1: q . inf = +inf
    out = _decode(backend, q, kc, vc, torch.tensor([3, 3], device=DEVICE), causal=False)
    ref = R.decode_attention(q.to(F64), kc.to(F64), vc.to(F64), torch.tensor([3, 3]), 0.25, False)
    assert ref.isnan().all() and out.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_large_scores_with_a_nan_value_column(backend):
    """Scores of ~4e8 (mean-1e4 q and k) and a NaN in one value column: the other columns are the
    softmax's, not scaled by a rounded log-sum-exp (4e8 + log 2 is 4e8 in float32)."""
    q = torch.randn(2, 1, 1, 16, dtype=torch.float64) + 1e4
    kc = torch.randn(2, 1, 2, 16, dtype=torch.float64) + 1e4
    vc = torch.randn(2, 1, 2, 16, dtype=torch.float64)
    vc[:, 0, 0, 2] = float("nan")
    q, kc, vc = (t.to(torch.float16).to(DEVICE) for t in (q, kc, vc))
    lens = torch.tensor([2, 1], device=DEVICE)  # ragged: the masked path
    out = _decode(backend, q, kc, vc, lens, causal=False)
    ref = R.decode_attention(q.to(F64), kc.to(F64), vc.to(F64), lens.cpu(), 0.25, False)
    keep = torch.ones(16, dtype=torch.bool)
    keep[2] = False
    assert out[..., 2].isnan().all()
    assert (out[..., keep].double() - ref[..., keep]).abs().max() < 2e-3


@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_decode_splits_weigh_by_sum_at_large_scores(num_splits):
    """Scores of 4e8, all equal (mean-1e4 float16 q and k): 17 keys in splits of 16 and 1 must
    weigh 16 : 1; their float32 log-sum-exps (4e8 + 4 and 4e8) are the same number."""
    from llmkit.kernels import decode_attention as K

    q = (torch.randn(1, 1, 1, 16) + 1e4).half()
    kc = (torch.randn(1, 1, 31, 16) + 1e4).half()
    vc = torch.randn(1, 1, 31, 16).half()
    lens = torch.tensor([17], dtype=torch.int32)
    out, lse = K.decode_attention(q, kc, vc, lens, 0.25, False, num_splits=num_splits)
    ref = R.decode_attention(q.to(F64), kc.to(F64), vc.to(F64), lens, 0.25, False)
    assert (out.double() - ref).abs().max() < 1e-3
