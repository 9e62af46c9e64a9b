"""The eager fast path of the functional ops and the in-place temporaries of llmkit.nn.

The fast path (``llmkit/ops/_fastpath.py``) skips the custom op on plain CPU tensors
outside autograd / compile / modes; it must give exactly the op's result, validate
as the op does, honour the backend selection, and never be taken where the op is
needed. ``llmkit.nn``'s in-place GELU / residual add into a temporary it owns must give
the op's values bit for bit and only run where dispatch picks the reference backend.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llmkit
from llmkit import reference64 as R
from llmkit.errors import BackendError
from llmkit.nn import _fused
from llmkit.ops import _fastpath as FP
from llmkit.testing import assert_close_to_reference
from test_decode_attention import _baseline, _cache

OPS = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "gelu",
    "bias_gelu",
    "scaled_dot_product_attention",
    "decode_attention",
    "varlen_attention",
]


def _args(op: str, dtype=torch.float32, strided: bool = False):
    """(functional call, the custom op's call) giving the same output for ``op``."""
    n = 37
    x = torch.randn(5, 7, 2 * n, dtype=dtype)[..., ::2] if strided else torch.randn(5, 7, n, dtype=dtype)
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    lib = torch.ops.llmkit
    if op == "layer_norm":
        return (lambda: llmkit.ops.layer_norm(x, n, w, b, 1e-5), lambda: lib.layer_norm(x, [n], w, b, 1e-5)[0])
    if op == "rms_norm":
        return (lambda: llmkit.ops.rms_norm(x, [n], w, 1e-6), lambda: lib.rms_norm(x, [n], w, 1e-6)[0])
    if op == "add_layer_norm":
        r = torch.randn(5, 7, n, dtype=dtype)
        return (
            lambda: llmkit.ops.add_layer_norm(x, r, n, w, b, 1e-5),
            lambda: tuple(lib.add_layer_norm(x, r, [n], w, b, 1e-5)[:2]),
        )
    if op == "gelu":
        return (lambda: llmkit.ops.gelu(x, "tanh"), lambda: lib.gelu(x, "tanh"))
    if op == "bias_gelu":
        return (lambda: llmkit.ops.bias_gelu(x, b), lambda: lib.bias_gelu(x, b, "none"))
    if op == "scaled_dot_product_attention":
        q = torch.randn(2, 11, 4, 16, dtype=dtype).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
        k = torch.randn(2, 2, 13, 16, dtype=dtype)
        v = torch.randn(2, 2, 13, 16, dtype=dtype)
        mask = torch.rand(2, 1, 11, 13) > 0.3
        mask[0, 0, 3] = False  # a row with no key: zeros
        return (
            lambda: llmkit.ops.scaled_dot_product_attention(q, k, v, mask, is_causal=True, enable_gqa=True),
            lambda: lib.scaled_dot_product_attention(q, k, v, mask, 0.0, True, 0.25, True, 0, 0)[0],
        )
    if op == "decode_attention":
        q = torch.randn(3, 4, 2, 16, dtype=dtype)
        kc, vc = torch.randn(3, 2, 19, 16, dtype=dtype), torch.randn(3, 2, 19, 16, dtype=dtype)
        lengths = torch.tensor([19, 2, 7], dtype=torch.int32)
        return (
            lambda: llmkit.ops.decode_attention(q, kc, vc, lengths),
            lambda: lib.decode_attention(q, kc, vc, lengths, 0.25, True)[0],
        )
    if op == "varlen_attention":
        q = torch.randn(4, 13, 16, dtype=dtype).transpose(0, 1)  # (total, H, D) view of (H, total, D)
        k, v = torch.randn(13, 2, 16, dtype=dtype), torch.randn(13, 2, 16, dtype=dtype)
        cu = torch.tensor([0, 5, 5, 13], dtype=torch.int32)
        return (
            lambda: llmkit.ops.varlen_attention(q, k, v, cu, cu, 8, 8, is_causal=True, enable_gqa=True),
            lambda: lib.varlen_attention(q, k, v, cu, cu, 8, 8, 0.0, True, 0.25, True, 0, 0)[0],
        )
    raise AssertionError(op)


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


class OpCalls(list):
    """Names of the llmkit custom ops called inside ``with`` (from the profiler's events)."""

    def __enter__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.extend(
            e.name.split("::")[1]
            for e in self._prof.events()
            if e.name.startswith("llmkit::") and e.name.split("::")[1] in OPS
        )


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "dtype,strided", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float64, False)]
)
def test_fast_path_gives_the_ops_result_bitwise(op, dtype, strided):
    fast, full = _args(op, dtype, strided)
    with torch.no_grad():
        got = fast()
        assert _same(got, full())
        assert _same(fast(), got)  # again, with the validation remembered


def test_fast_path_skips_the_custom_op_only_outside_autograd():
    x = torch.randn(4, 9)
    with OpCalls() as calls:
        with torch.no_grad():
            llmkit.ops.gelu(x)
        llmkit.ops.gelu(x)  # grad mode on, but nothing requires grad
    assert calls == []
    x.requires_grad_(True)
    with OpCalls() as calls:
        y = llmkit.ops.gelu(x)
    assert calls == ["gelu"] and y.grad_fn is not None
    (dx,) = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(R.gelu(x64).sum(), x64)
    assert_close_to_reference(dx, dx64, torch.autograd.grad(F.gelu(x).sum(), x)[0], "dx")


def test_fast_path_not_taken_while_compiling_or_under_modes(monkeypatch):
    x = torch.randn(4, 9)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen() as seen:
        llmkit.ops.layer_norm(x, 9)
    assert any("llmkit.layer_norm" in o for o in seen.ops)

    class Through(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with OpCalls() as calls, torch.no_grad(), Through():
        llmkit.ops.layer_norm(x, 9)
    assert calls == ["layer_norm"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with OpCalls() as calls, torch.no_grad():
        llmkit.ops.add_layer_norm(x, x, 9)
    assert calls == ["add_layer_norm"]
    assert not FP.eager_ok(x)


def test_fast_path_not_taken_for_meta_or_vmap():
    x = torch.randn(3, 5, 4)
    with OpCalls() as calls, torch.no_grad():
        meta = llmkit.ops.gelu(torch.empty(3, 4, device="meta"))
        out = torch.vmap(lambda t: llmkit.ops.layer_norm(t, 4))(x)
    assert meta.device.type == "meta"
    assert calls[0] == "gelu" and set(calls[1:]) == {"layer_norm"}
    assert_close_to_reference(out, R.layer_norm(x.double(), [4], None, None, 1e-5), F.layer_norm(x, (4,)), "out")


def test_fast_path_validates_like_the_op():
    x = torch.randn(4, 9)
    with torch.no_grad():
        llmkit.ops.layer_norm(x, 9)  # remembered signature ...
        with pytest.raises(ValueError, match="normalized_shape"):
            llmkit.ops.layer_norm(x, 8)  # ... does not excuse another one
        with pytest.raises(ValueError, match="eps"):
            llmkit.ops.layer_norm(x, 9, eps=-1.0)
        with pytest.raises(TypeError, match="weight"):
            llmkit.ops.layer_norm(x, 9, torch.ones(9, dtype=torch.float64))
        with pytest.raises(ValueError, match="residual"):
            llmkit.ops.add_layer_norm(x, torch.randn(4, 8), 9)
        with pytest.raises(ValueError, match="approximate"):
            llmkit.ops.gelu(x, "fast")
        with pytest.raises(ValueError, match="bias"):
            llmkit.ops.bias_gelu(x, torch.randn(8))
        q = torch.randn(1, 2, 3, 8)
        llmkit.ops.scaled_dot_product_attention(q, q, q)
        with pytest.raises(ValueError, match="dropout_p"):
            llmkit.ops.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
        kc = torch.randn(1, 2, 6, 8)
        lengths = torch.tensor([6])
        llmkit.ops.decode_attention(q, kc, kc, lengths)
        with pytest.raises(ValueError, match="cache_seqlens must lie in"):  # values checked every call
            llmkit.ops.decode_attention(q, kc, kc, torch.tensor([7]))


def test_fast_path_honours_the_backend_selection(monkeypatch):
    """A backend named explicitly runs (or refuses) on the fast path as in the op."""
    import importlib

    G = importlib.import_module("llmkit.ops.gelu")
    ran = []
    impl = G.gelu_forward.impls["triton"]
    monkeypatch.setattr(impl, "fn", lambda *a, _f=impl.fn: ran.append("triton") or _f(*a))
    x = torch.randn(3, 5)
    with torch.no_grad():
        with llmkit.use_backend("triton"):
            out = llmkit.ops.gelu(x)
        assert ran == ["triton"]
        assert_close_to_reference(out, R.gelu(x.double()), F.gelu(x), "out")
        monkeypatch.setenv("LLMKIT_BACKEND", "gelu=triton")
        llmkit.ops.gelu(x)
        assert ran == ["triton", "triton"]
        monkeypatch.delenv("LLMKIT_BACKEND")
        monkeypatch.setattr(G.gelu_forward.impls["triton"], "why_not", lambda *a: ["refuses for the test"])
        with llmkit.use_backend("triton"), pytest.raises(BackendError, match="refuses for the test"):
            llmkit.ops.gelu(x)


def test_selects_reference_follows_use_backend_and_env(monkeypatch):
    import importlib

    A = importlib.import_module("llmkit.ops.attention")
    L = importlib.import_module("llmkit.ops.layer_norm")
    assert FP.selects_reference(A.attention_forward)  # no backend is CPU-preferred for attention
    with llmkit.use_backend("triton"):
        assert not FP.selects_reference(A.attention_forward)
    with llmkit.use_backend(attention="reference"), llmkit.use_backend("triton"):
        assert FP.selects_reference(A.attention_forward)
    monkeypatch.setenv("LLMKIT_BACKEND", "triton,reference")
    assert not FP.selects_reference(L.layer_norm_forward)
    monkeypatch.setenv("LLMKIT_BACKEND", "layer_norm=reference")
    assert FP.selects_reference(L.layer_norm_forward)


# -- decode attention: the uniform-length reference path -------------------------------


@pytest.mark.parametrize("t,causal", [(1, True), (3, True), (3, False), (9, True)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_decode_uniform_lengths(t, causal, hq, hkv):
    """Equal lengths read only the valid prefix of the cache (no mask for one token)."""
    s_max, n = 41, 7  # with t=9 > n some causal rows see no key: zeros
    q, kc, vc = _cache(2, hq, hkv, t, s_max, 24, 24, torch.float32)
    kc[:, :, n:] = float("nan")  # never read
    vc[:, :, n:] = float("nan")
    lengths = torch.full((2,), n, dtype=torch.int64)
    with torch.no_grad(), llmkit.use_backend("reference"):
        out = llmkit.ops.decode_attention(q, kc, vc, lengths, is_causal=causal)
    s = 1.0 / math.sqrt(24)
    ref = R.decode_attention(q.double(), kc.double(), vc.double(), lengths, s, causal)
    base = _baseline(q, kc, vc, lengths, s, causal)
    if t > n and causal:
        dead = torch.arange(t) < t - n
        assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
        out, ref, base = out[:, :, ~dead], ref[:, :, ~dead], base[:, :, ~dead]
    assert_close_to_reference(out, ref, base, "out")


def test_decode_uniform_full_and_empty_lengths():
    q, kc, vc = _cache(2, 2, 2, 1, 5, 8, 8, torch.float32)
    full = torch.full((2,), 5, dtype=torch.int32)
    out = llmkit.ops.decode_attention(q, kc, vc, full)
    s = 1 / math.sqrt(8)
    ref = R.decode_attention(q.double(), kc.double(), vc.double(), full, s, True)
    assert_close_to_reference(out, ref, _baseline(q, kc, vc, full, s, True), "out")
    empty = llmkit.ops.decode_attention(q, kc, vc, torch.zeros(2, dtype=torch.int32))
    assert torch.equal(empty, torch.zeros_like(empty))  # no key at all: zeros


# -- llmkit.nn: in-place into temporaries ----------------------------------------------


@pytest.mark.parametrize("approx", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gelu_after_matches_the_op_bitwise(approx, dtype):
    t = torch.randn(7, 1023, dtype=dtype)
    want = llmkit.ops.gelu(t.clone(), approx)
    with torch.no_grad():
        got = _fused.gelu_after(t.clone(), approx)
    assert torch.equal(got, want)


def test_gelu_after_in_place_only_where_allowed(monkeypatch):
    calls = []
    real = torch.ops.aten.gelu_
    monkeypatch.setattr(torch.ops.aten, "gelu_", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = torch.randn(3, 8)
    with torch.no_grad():
        with llmkit.use_backend(gelu="reference"):  # the C++ CPU kernel, when built, is preferred otherwise
            _fused.gelu_after(t.clone(), "none")
            assert len(calls) == 1
            _fused.gelu_after(t.clone().t(), "none")  # not contiguous
            assert len(calls) == 1
            for dt in (torch.bfloat16, torch.float16):  # ATen's float32 GELU rounded once, as the op
                h = (t * 3).to(dt)
                got = _fused.gelu_after(h.clone(), "none")
                assert torch.equal(got, llmkit.ops.gelu(h, "none"))
            assert len(calls) == 3
        with llmkit.use_backend("triton"):
            _fused.gelu_after(t.clone(), "none")
    assert len(calls) == 3
    w = torch.randn(8, 8, requires_grad=True)
    y = _fused.gelu_after(t @ w, "tanh")  # autograd: the op, with its gradient
    assert len(calls) == 3
    (dw,) = torch.autograd.grad(y.sum(), w)
    (dw_ref,) = torch.autograd.grad(F.gelu(t @ w, approximate="tanh").sum(), w)
    torch.testing.assert_close(dw, dw_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_norm_into_matches_add_layer_norm_bitwise(dtype):
    ln = torch.nn.LayerNorm(301, eps=1e-12)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    ln = ln.to(dtype)
    x, r = torch.randn(3, 5, 301).to(dtype), torch.randn(3, 5, 301).to(dtype)
    with torch.no_grad(), llmkit.use_backend(add_layer_norm="reference"):
        want_out, want_sum = llmkit.ops.add_layer_norm(x, r, 301, ln.weight, ln.bias, 1e-12)
        scratch = x.clone()
        out, total = _fused.add_norm_into(scratch, r, ln)
    assert total is scratch and torch.equal(total, want_sum) and torch.equal(out, want_out)
    if dtype == torch.float32:
        assert torch.equal(out, F.layer_norm(x + r, (301,), ln.weight, ln.bias, 1e-12))
    else:  # against float64: the sum rounded to the dtype, then normalized
        s64 = (x.double() + r.double()).to(dtype).double()
        want64 = F.layer_norm(s64, (301,), ln.weight.double(), ln.bias.double(), 1e-12)
        assert_close_to_reference(out, want64, F.layer_norm(x + r, (301,), ln.weight, ln.bias, 1e-12), "out")


def test_add_norm_into_leaves_its_input_alone_off_the_reference():
    ln = torch.nn.LayerNorm(16)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    keep = x.clone()
    with torch.no_grad(), llmkit.use_backend(add_layer_norm="triton"):
        out, total = _fused.add_norm_into(x, r, ln)
    assert torch.equal(x, keep) and total is not x
    assert_close_to_reference(
        out,
        R.add_layer_norm(x.double(), r.double(), [16], ln.weight.double(), ln.bias.double(), 1e-5)[0],
        F.layer_norm(x + r, (16,)),
        "out",
    )
    y = torch.randn(4, 16, requires_grad=True)
    out, total = _fused.add_norm_into(y * 1.0, r, ln)  # autograd: the op
    assert out.grad_fn is not None and not torch.equal(y.detach(), total.detach())
