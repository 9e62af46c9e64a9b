"""scaled_dot_product_attention: both backends against the float64 reference.

Forward output and dq / dk / dv are held to the correctness rule of llmkit.testing (error <= 2 x PyTorch's
own error in the same dtype + floor) against ``llmkit.reference64.attention`` (float64
autograd), PyTorch's math ``F.scaled_dot_product_attention`` computing in that dtype
(``allow_fp16_bf16_reduction_math_sdp``; by default it would compute half inputs in
float32) being the baseline. Masks never empty a row where the baseline is used (SDPA gives NaN there);
rows with no visible key are checked on their own. The Triton kernels run through the
interpreter (TRITON_INTERPRET=1, set by conftest) at small sizes with small tiles, with
every buffer the launchers allocate poisoned with NaN first.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmkit
from llmkit import reference64 as R
from llmkit.dispatch import triton_interpreting
from llmkit.errors import BackendError
from llmkit.ops import attention as A
from llmkit.ops._philox import dropout_keep_mask
from llmkit.testing import assert_close_to_reference, max_abs_error, poison_

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
BACKENDS = ["reference", "triton"]
F64 = torch.float64
HALF = [torch.float16, torch.bfloat16]


LAUNCHES = {"attention_forward": 0, "attention_backward": 0}


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN; launcher calls are counted."""
    from llmkit.kernels import _attention_common as KC
    from llmkit.kernels import attention as K

    real = KC._empty
    monkeypatch.setattr(KC, "_empty", lambda shape, dtype, device: poison_(real(shape, dtype, device)))
    for name in LAUNCHES:
        monkeypatch.setattr(K, name, _counted(getattr(K, name), name))


def _counted(fn, name):
    def counted(*args, **kwargs):
        LAUNCHES[name] += 1
        return fn(*args, **kwargs)

    return counted


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _qkv(b, hq, hkv, sq, sk, d, dv, dtype, layout="bhsd"):
    """q, k, v needing gradients; with layout 'bshd' they are views of (B, S, H, D) leaves."""

    def make(h, s, width):
        if layout == "bshd":
            return torch.randn(b, s, h, width, dtype=dtype, device=DEVICE, requires_grad=True).transpose(1, 2)
        return torch.randn(b, h, s, width, dtype=dtype, device=DEVICE, requires_grad=True)

    return make(hq, sq, d), make(hkv, sk, d), make(hkv, sk, dv)


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _combined_mask(mask, causal, sq, sk, dtype):
    """The single mask SDPA needs for attn_mask plus is_causal (it refuses both at once)."""
    if not causal:
        return mask
    tri = torch.ones(sq, sk, dtype=torch.bool, device=DEVICE).tril()
    if mask is None:
        return tri
    if mask.dtype == torch.bool:
        return mask & tri
    return mask.to(dtype).masked_fill(~tri, float("-inf"))


@contextlib.contextmanager
def math_in_input_dtype():
    """PyTorch's math SDPA computes float16 / bfloat16 inputs in float32 unless this switch
    is on; with it, it computes in the inputs' dtype: PyTorch's own error in that dtype."""
    prev = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(prev)


def _baseline(q, k, v, mask, causal, scale, gqa, math=True):
    """F.scaled_dot_product_attention in the inputs' dtype: the math backend, or the default one."""
    m = _combined_mask(mask, causal, q.shape[-2], k.shape[-2], q.dtype)
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)
    ctx = math_in_input_dtype() if math else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=gqa)


class Baselines:
    """PyTorch's own attention in the inputs' dtype, twice: the math backend and the default
    backend (on CPU, ATen's flash kernel). PyTorch's error is that of the one further from
    float64, output by output and gradient by gradient."""

    def __init__(self, q, k, v, mask=None, causal=False, scale=None, gqa=False, mask_grad=False):
        self.runs = []
        for use_math in (True, False):
            leaves = [_leaf(t) for t in (q, k, v)] + [_leaf(mask) if mask_grad else mask]
            self.runs.append((_baseline(*leaves, causal, scale, gqa, use_math), leaves))

    def _worst(self, values, ref):
        errs = [max_abs_error(t, ref) for t in values]
        finite = [i for i, e in enumerate(errs) if e != float("inf")] or [0]
        return values[max(finite, key=lambda i: errs[i])]

    def check_out(self, out, ref, select=lambda t: t):
        base = self._worst([select(o.detach()) for o, _ in self.runs], select(ref.detach()))
        assert_close_to_reference(select(out), select(ref.detach()), base, "out")

    def backward(self, grad):
        for out, _ in self.runs:
            out.backward(grad)

    def check_grad(self, name, index, grad, ref_grad, select=lambda t: t):
        base = self._worst([select(leaves[index].grad) for _, leaves in self.runs], select(ref_grad))
        assert_close_to_reference(select(grad), select(ref_grad), base, name)


def _run(backend, q, k, v, mask=None, causal=False, scale=None, gqa=False, dropout_p=0.0):
    with llmkit.use_backend(backend):
        return llmkit.ops.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
        )


def _backward(backend, out, grad):
    """Backward with the same backend selection (it is chosen when backward runs)."""
    with llmkit.use_backend(backend):
        out.backward(grad)


def check_sdpa(backend, q, k, v, mask=None, causal=False, scale=None, gqa=False, grads=True, mask_grad=False):
    """Forward and (optionally) dq/dk/dv [and d mask] of a backend against float64, SDPA as baseline.

    q, k, v may be (B, S, H, D) views; their gradients are read off the leaves' .grad.
    """
    if mask_grad:
        mask.requires_grad_(True)
    launches = dict(LAUNCHES)
    out = _run(backend, q, k, v, mask, causal, scale, gqa)
    q64, k64, v64 = (_leaf(t, F64) for t in (q, k, v))
    m64 = None if mask is None else (_leaf(mask, F64) if mask_grad else mask)
    ref = R.attention(q64, k64, v64, m64, causal, scale, gqa)
    base = Baselines(q, k, v, mask, causal, scale, gqa, mask_grad)
    base.check_out(out, ref)
    if not grads:
        return out
    g = torch.randn_like(out)
    _backward(backend, out, g)
    ref.backward(g.to(F64))
    base.backward(g)
    for i, (name, t, r) in enumerate((("dq", q, q64), ("dk", k, k64), ("dv", v, v64))):
        grad = t.grad if t.is_leaf else t._base.grad.transpose(1, 2)
        assert grad is not None, f"{name} missing"
        base.check_grad(name, i, grad, r.grad)
    if mask_grad:
        base.check_grad("dmask", 3, mask.grad, m64.grad)
    if backend == "triton":  # the kernels ran, forward and backward
        assert LAUNCHES["attention_forward"] > launches["attention_forward"]
        assert LAUNCHES["attention_backward"] > launches["attention_backward"]
    return out


# --------------------------------------------------------------------------------------
# lengths, causal, dtypes
# --------------------------------------------------------------------------------------

LENGTHS = [(1, 1), (17, 17), (37, 65), (65, 37), (129, 17), (1, 37), (37, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", LENGTHS)
def test_sdpa_lengths(backend, causal, sq, sk):
    dtype = HALF[(sq + sk + causal) % 2]
    q, k, v = _qkv(1, 2, 2, sq, sk, 32, 32, dtype)
    check_sdpa(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sdpa_dtypes_long(backend, dtype):
    q, k, v = _qkv(1, 1, 1, 129, 129, 64, 64, dtype)
    check_sdpa(backend, q, k, v, causal=True, scale=0.3)


def test_float32_head_dim_over_128_is_refused_by_triton_and_falls_back():
    q, k, v = _qkv(1, 2, 2, 9, 11, 160, 160, torch.float32)
    with pytest.raises(BackendError, match="float32 attention with a head dim above 128"):
        _run("triton", q, k, v)
    check_sdpa(["triton", "reference"], q, k, v, causal=True)


def test_sdpa_reference_float64():
    q, k, v = _qkv(2, 2, 2, 9, 13, 8, 8, F64)
    check_sdpa("reference", q, k, v, causal=True)


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------


def _mask(kind, b, h, sq, sk):
    """A mask of the given kind with at least one visible key per row (column 0)."""
    if kind == "bool":
        m = torch.rand(b, h, sq, sk, device=DEVICE) > 0.4
    elif kind == "bool_2d":
        m = torch.rand(sq, sk, device=DEVICE) > 0.4
    elif kind == "float_bcast_heads":
        return torch.randn(b, 1, sq, sk, device=DEVICE) * 2
    elif kind == "float_neg_inf":
        m = torch.randn(1, h, sq, sk, device=DEVICE)
        m[..., 1:][torch.rand(1, h, sq, sk - 1, device=DEVICE) > 0.6] = float("-inf")
        return m
    elif kind == "key_padding_bool":
        m = torch.rand(b, 1, 1, sk, device=DEVICE) > 0.4
    elif kind == "key_padding_float":
        m = torch.zeros(b, 1, 1, sk, device=DEVICE)
        m[torch.rand(b, 1, 1, sk, device=DEVICE) > 0.6] = float("-inf")
        m[..., 0] = 0.0
        return m
    else:
        raise AssertionError(kind)
    m[..., 0] = True
    return m


MASK_KINDS = ["bool", "bool_2d", "float_bcast_heads", "float_neg_inf", "key_padding_bool", "key_padding_float"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_masks(backend, kind, causal):
    b, h, sq, sk = 2, 2, 37, 45
    dtype = HALF[len(kind) % 2]
    q, k, v = _qkv(b, h, h, sq, sk, 32, 32, dtype)
    check_sdpa(backend, q, k, v, mask=_mask(kind, b, h, sq, sk), causal=causal)


def test_sdpa_mask_in_query_dtype_triton():
    b, h, sq, sk = 1, 2, 23, 30
    q, k, v = _qkv(b, h, h, sq, sk, 32, 32, torch.bfloat16)
    check_sdpa("triton", q, k, v, mask=_mask("float_bcast_heads", b, h, sq, sk).to(torch.bfloat16))


# --------------------------------------------------------------------------------------
# GQA, head dims, strides, scale
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (6, 3)], ids=["gqa", "mqa", "gqa3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_gqa(backend, hq, hkv, causal):
    q, k, v = _qkv(2, hq, hkv, 19, 27, 32, 32, torch.float16)
    check_sdpa(backend, q, k, v, causal=causal, gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,dv", [(32, 32), (64, 64), (80, 80), (128, 128), (160, 160), (256, 256), (64, 24), (16, 96)])
def test_sdpa_head_dims(backend, d, dv):
    q, k, v = _qkv(1, 2, 2, 21, 33, d, dv, torch.bfloat16)
    check_sdpa(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_bshd_views(backend):
    """(B, S, H, D) tensors viewed as (B, H, S, D): read in place, no copy needed."""
    q, k, v = _qkv(2, 4, 2, 23, 31, 32, 32, torch.float16, layout="bshd")
    assert not q.is_contiguous()
    out = check_sdpa(backend, q, k, v, causal=True, gqa=True)
    assert out.transpose(1, 2).is_contiguous()  # the output keeps the query's layout


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_unaligned_and_strided_last_dim(backend):
    """Storage offsets that break 16-byte alignment, and a non-unit last stride (copied)."""
    store = torch.randn(1 + 2 * 3 * 19 * 40, dtype=torch.float16, device=DEVICE)
    q = store[1:].view(2, 3, 19, 40)[..., :33]  # unaligned start, odd head dim, row stride 40
    kstore = torch.randn(2, 3, 25, 66, dtype=torch.float16, device=DEVICE)
    k = kstore[..., ::2]  # last stride 2
    v = torch.randn(2, 3, 25, 33, dtype=torch.float16, device=DEVICE)
    from llmkit.kernels.attention import rows_aligned

    assert not rows_aligned(q) and not rows_aligned(k)  # the launchers copy them to aligned rows
    out = _run(backend, q, k, v, causal=True)
    ref = R.attention(q.to(F64), k.to(F64), v.to(F64), None, True)
    Baselines(q, k, v, None, True).check_out(out, ref)


def test_sdpa_unbatched_3d():
    q, k, v = (t[0] for t in _qkv(1, 2, 2, 9, 11, 16, 16, torch.float16))
    out = _run("triton", q, k, v)
    ref = R.attention(q.to(F64), k.to(F64), v.to(F64))
    assert out.shape == (2, 9, 16)
    Baselines(q, k, v).check_out(out, ref)


# --------------------------------------------------------------------------------------
# rows with no visible key
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_rows(backend, kind):
    """Dead rows: output zeros, lse +inf, zero gradients, no NaN; the other rows as usual."""
    b, h, sq, sk = 2, 2, 33, 21
    q, k, v = _qkv(b, h, h, sq, sk, 32, 32, torch.float16)
    for t in (q, k, v):
        t.requires_grad_(True)
    visible = torch.rand(b, h, sq, sk, device=DEVICE) > 0.5
    visible[..., 0] = True
    dead = torch.zeros(b, h, sq, dtype=torch.bool, device=DEVICE)
    dead[:, :, 3] = True
    dead[1, 0, 20:] = True
    visible[dead] = False
    mask = visible if kind == "bool" else torch.zeros(visible.shape, device=DEVICE).masked_fill(~visible, float("-inf"))
    out = _run(backend, q, k, v, mask)
    g = torch.randn_like(out)
    _backward(backend, out, g)
    assert not any(t.isnan().any() for t in (out, q.grad, k.grad, v.grad))
    assert (out[dead] == 0).all()
    assert (q.grad[dead] == 0).all()
    # lse of dead rows is +inf
    with llmkit.use_backend(backend):
        _, lse = torch.ops.llmkit.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.125, False, 0, 0)
    assert torch.isinf(lse[dead]).all() and (lse[dead] > 0).all() and torch.isfinite(lse[~dead]).all()

    q64, k64, v64 = (_leaf(t, F64) for t in (q, k, v))
    ref = R.attention(q64, k64, v64, mask)
    ref.backward(g.to(F64))
    # baseline: SDPA with the dead rows opened and their gradient zeroed gives the same
    # alive rows and the same dk / dv (a row with dO = 0 contributes nothing)
    open_mask = mask.clone()
    open_mask[dead] = True if kind == "bool" else 0.0
    base = Baselines(q, k, v, open_mask)
    base.backward(g.masked_fill(dead[..., None], 0.0))

    def alive(t):
        return t[~dead]

    base.check_out(out, ref, alive)
    base.check_grad("dq", 0, q.grad, q64.grad, alive)
    base.check_grad("dk", 1, k.grad, k64.grad)
    base.check_grad("dv", 2, v.grad, v64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_empty(backend):
    q, k, v = _qkv(0, 2, 2, 5, 7, 16, 16, torch.float16)
    assert _run(backend, q, k, v).shape == (0, 2, 5, 16)
    q, k, v = _qkv(1, 2, 2, 0, 7, 16, 16, torch.float16)
    assert _run(backend, q, k, v).shape == (1, 2, 0, 16)
    q, k, v = (_leaf(t) for t in _qkv(1, 2, 2, 5, 0, 16, 16, torch.float16))
    out = _run(backend, q, k, v)  # no key at all: every row is dead
    assert out.shape == (1, 2, 5, 16) and (out == 0).all()
    _backward(backend, out.sum(), None)
    assert (q.grad == 0).all() and (k.grad == 0).all()


# --------------------------------------------------------------------------------------
# kernel tile shapes (causal block logic with BLOCK_M != BLOCK_N)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiles", [(32, 16, 16, 32), (16, 32, 32, 16)], ids=["m32n16", "m16n32"])
@pytest.mark.parametrize("sq,sk", [(45, 37), (37, 70)])
def test_triton_tile_configs(tiles, sq, sk):
    from llmkit.kernels import attention as K

    fm, fn, bm, bn = tiles
    fwd = K.TileConfig(fm, fn, 4, 1)
    bwd = K.BackwardConfig(K.TileConfig(fm, fn, 4, 1), K.TileConfig(bm, bn, 4, 1))
    q, k, v = _qkv(1, 2, 1, sq, sk, 32, 32, torch.float16)
    mask = _mask("key_padding_bool", 1, 2, sq, sk)
    out, lse = K.attention_forward(q, k, v, mask, 0.0, True, 0.2, 0, 0, config=fwd)
    g = torch.randn_like(out)
    dq, dk, dv = K.attention_backward(g, q, k, v, mask, 0.0, True, 0.2, 0, 0, config=bwd)
    q64, k64, v64 = (_leaf(t, F64) for t in (q, k, v))
    ref = R.attention(q64, k64, v64, mask, True, 0.2, True)
    ref.backward(g.to(F64))
    base = Baselines(q, k, v, mask, True, 0.2, True)
    base.backward(g)
    base.check_out(out, ref)
    for i, (name, a, r) in enumerate((("dq", dq, q64), ("dk", dk, k64), ("dv", dv, v64))):
        base.check_grad(name, i, a, r.grad)


def test_triton_backward_deterministic():
    q, k, v = _qkv(1, 4, 2, 40, 40, 32, 32, torch.bfloat16)
    grads = []
    for _ in range(2):
        qq, kk, vv = (_leaf(t) for t in (q, k, v))
        out = _run("triton", qq, kk, vv, causal=True, gqa=True)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        _backward("triton", out, grad.to(out.device, out.dtype))
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_pattern_bit_exact(backend):
    """With q = k = 0 every probability is 1/Sk, and with v = I the output shows the keep mask."""
    b, h, sq, sk, p = 2, 3, 37, 40, 0.3
    q = torch.zeros(b, h, sq, 16, dtype=torch.float16, device=DEVICE)
    k = torch.zeros(b, h, sk, 16, dtype=torch.float16, device=DEVICE)
    v = torch.eye(sk, dtype=torch.float16, device=DEVICE).expand(b, h, sk, sk)
    seed, offset = 0x1234_5678_9ABC, 977
    with llmkit.use_backend(backend):
        out, _ = torch.ops.llmkit.scaled_dot_product_attention(q, k, v, None, p, False, 1.0, False, seed, offset)
    keep = dropout_keep_mask(seed, offset, b, h, sq, sk, p, q.device)
    assert torch.equal(out != 0, keep)
    expected = (1.0 / sk) / (1.0 - p)
    assert torch.allclose(out[keep].float(), torch.tensor(expected), rtol=2e-3)


def _manual_dropout_sdpa(q, k, v, keep, p, scale, causal):
    """PyTorch ops in the inputs' dtype, same keep mask: the baseline for dropout."""
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return (torch.softmax(s, -1) * keep.to(s.dtype) / (1 - p)) @ v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_forward_backward(backend, causal):
    b, h, sq, sk, d, p = 2, 2, 29, 35, 32, 0.25
    q, k, v = (_leaf(t) for t in _qkv(b, h, h, sq, sk, d, d, torch.float16))
    seed, offset, scale = 987654321, 5, 1 / math.sqrt(d)
    with llmkit.use_backend(backend):
        out, _ = torch.ops.llmkit.scaled_dot_product_attention(q, k, v, None, p, causal, scale, False, seed, offset)
    keep = dropout_keep_mask(seed, offset, b, h, sq, sk, p, q.device)
    q64, k64, v64 = (_leaf(t, F64) for t in (q, k, v))
    ref = R.attention(q64, k64, v64, None, causal, scale, keep=keep, dropout_p=p)
    qb, kb, vb = (_leaf(t) for t in (q, k, v))
    base = _manual_dropout_sdpa(qb, kb, vb, keep, p, scale, causal)
    assert_close_to_reference(out, ref, base, "out")
    g = torch.randn_like(out)
    _backward(backend, out, g)
    ref.backward(g.to(F64))
    base.backward(g)
    for name, a, r, bl in (("dq", q, q64, qb), ("dk", k, k64, kb), ("dv", v, v64, vb)):
        assert_close_to_reference(a.grad, r.grad, bl.grad, name)


@pytest.mark.parametrize("fwd,bwd", [("triton", "reference"), ("reference", "triton")])
def test_dropout_forward_and_backward_on_different_backends(fwd, bwd):
    b, h, sq, sk, d, p = 1, 2, 21, 26, 32, 0.4
    q, k, v = _qkv(b, h, h, sq, sk, d, d, torch.bfloat16)
    seed, offset, scale = 2**40 + 17, 123, 0.2
    out, lse = A.attention_forward.call_backend(fwd, q, k, v, None, p, True, scale, False, seed, offset)
    g = torch.randn_like(out)
    dq, dk, dv, _ = A.attention_backward.call_backend(
        bwd, g, q, k, v, out, lse, None, p, True, scale, False, seed, offset, False
    )
    keep = dropout_keep_mask(seed, offset, b, h, sq, sk, p, q.device)
    q64, k64, v64 = (_leaf(t, F64) for t in (q, k, v))
    ref = R.attention(q64, k64, v64, None, True, scale, keep=keep, dropout_p=p)
    ref.backward(g.to(F64))
    qb, kb, vb = (_leaf(t) for t in (q, k, v))
    base = _manual_dropout_sdpa(qb, kb, vb, keep, p, scale, True)
    base.backward(g)
    for name, a, r, bl in (
        ("out", out, ref, base),
        ("dq", dq, q64.grad, qb.grad),
        ("dk", dk, k64.grad, kb.grad),
        ("dv", dv, v64.grad, vb.grad),
    ):
        assert_close_to_reference(a, r.detach(), bl.detach(), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_under_manual_seed(backend):
    """The functional API draws the Philox seed from torch's generator."""
    q, k, v = _qkv(1, 2, 2, 17, 19, 16, 16, torch.float16)
    outs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        outs.append(_run(backend, q, k, v, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    torch.manual_seed(5)
    seed = A._draw_seed()
    keep = dropout_keep_mask(seed, 0, 1, 2, 17, 19, 0.5, q.device)
    ref = R.attention(q.to(F64), k.to(F64), v.to(F64), keep=keep, dropout_p=0.5)
    assert_close_to_reference(outs[0], ref, _manual_dropout_sdpa(q, k, v, keep, 0.5, 0.25, False))


# --------------------------------------------------------------------------------------
# opcheck, gradcheck
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_sdpa(backend):
    q, k, v = (_leaf(t) for t in _qkv(1, 2, 1, 9, 12, 16, 16, torch.float16))
    mask = _mask("key_padding_bool", 1, 2, 9, 12)
    with llmkit.use_backend(backend):
        torch.library.opcheck(
            torch.ops.llmkit.scaled_dot_product_attention.default, (q, k, v, mask, 0.0, True, 0.25, True, 0, 0)
        )
        out, lse = torch.ops.llmkit.scaled_dot_product_attention(q, k, v, mask, 0.0, True, 0.25, True, 0, 0)
        torch.library.opcheck(
            torch.ops.llmkit.scaled_dot_product_attention_backward.default,
            (
                torch.randn_like(out),
                q.detach(),
                k.detach(),
                v.detach(),
                out.detach(),
                lse,
                mask,
                0.0,
                True,
                0.25,
                True,
                0,
                0,
                False,
            ),
        )


@pytest.mark.parametrize("case", ["plain_causal", "float_mask_grad", "dropout", "gqa_bool_mask"])
def test_gradcheck_reference(case):
    def leaf(*shape):
        return torch.randn(*shape, dtype=F64, device=DEVICE, requires_grad=True)

    b, sq, sk, d = 1, 5, 7, 4
    hq, hkv = (4, 2) if case == "gqa_bool_mask" else (2, 2)
    q, k, v = leaf(b, hq, sq, d), leaf(b, hkv, sk, d), leaf(b, hkv, sk, d)
    mask, p, causal = None, 0.0, case == "plain_causal"
    inputs = [q, k, v]
    if case == "float_mask_grad":
        mask = leaf(1, hq, sq, sk)
        inputs.append(mask)
    elif case == "gqa_bool_mask":
        mask = torch.rand(b, 1, sq, sk, device=DEVICE) > 0.3
        mask[..., 0] = True
    elif case == "dropout":
        p = 0.3

    def fn(*args):
        qq, kk, vv = args[:3]
        m = args[3] if len(args) > 3 else mask
        with llmkit.use_backend("reference"):
            out, _ = torch.ops.llmkit.scaled_dot_product_attention(qq, kk, vv, m, p, causal, 0.5, hq != hkv, 11, 3)
        return out

    assert torch.autograd.gradcheck(fn, tuple(inputs))


# --------------------------------------------------------------------------------------
# bad input, backend selection
# --------------------------------------------------------------------------------------


def test_bad_inputs():
    sdpa = llmkit.ops.scaled_dot_product_attention
    q, k, v = _qkv(2, 4, 2, 8, 8, 16, 16, torch.float16)
    with pytest.raises(ValueError, match="head dims disagree"):
        sdpa(
            q,
            torch.randn(2, 4, 8, 8, dtype=torch.float16, device=DEVICE),
            torch.randn(2, 4, 8, 16, dtype=torch.float16, device=DEVICE),
        )
    with pytest.raises(ValueError, match="batch sizes disagree"):
        sdpa(q, k[:1], v[:1], enable_gqa=True)
    with pytest.raises(ValueError, match="multiple"):
        sdpa(q, *_qkv(2, 3, 3, 8, 8, 16, 16, torch.float16)[1:], enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa(q, k, v, attn_mask=torch.ones(3, 8, dtype=torch.bool, device=DEVICE), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask has dtype int32"):
        sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int32, device=DEVICE), enable_gqa=True)
    with pytest.raises(TypeError, match="key has dtype float32"):
        sdpa(q, k.float(), v, enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.0, enable_gqa=True)


def test_head_dim_over_256_is_refused_by_triton_by_name():
    q, k, v = _qkv(1, 2, 2, 4, 4, 264, 264, torch.float16)
    with pytest.raises(BackendError, match="head dim 264 exceeds 256"):
        _run("triton", q, k, v)
    out = _run(["triton", "reference"], q, k, v)  # an explicit order may fall back
    Baselines(q, k, v).check_out(out, R.attention(q.to(F64), k.to(F64), v.to(F64)))


def test_float_mask_gradient_goes_to_reference():
    b, h, sq, sk = 1, 2, 9, 11
    q, k, v = _qkv(b, h, h, sq, sk, 16, 16, torch.float16)
    mask = _mask("float_bcast_heads", b, h, sq, sk)
    with pytest.raises(BackendError, match="gradient of a float attn_mask"):
        _backward("triton", _run("triton", _leaf(q), k, v, _leaf(mask)).sum(), None)
    # with a fallback order the triton forward is followed by the reference backward
    with llmkit.use_backend(["triton", "reference"]):
        check_sdpa(["triton", "reference"], q, k, v, mask=mask, mask_grad=True)


@pytest.mark.parametrize("mask_kind", ["bool", "float32"])
def test_reference_float64_with_masks_of_another_dtype(mask_kind):
    """ATen's CPU kernel misreads a float32 mask beside float64 inputs; the reference must not."""
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64) for n in (33, 40, 40))
    if mask_kind == "bool":
        mask = torch.rand(1, 1, 33, 40) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(1, 1, 33, 40)
    with llmkit.use_backend("reference"):
        out = llmkit.ops.scaled_dot_product_attention(q, k, v, mask, is_causal=True)
    ref = R.attention(q, k, v, mask, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
