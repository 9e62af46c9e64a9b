"""The norms of today's LLMs: RMSNorm's offset (Gemma's 1 + w) and casting order (Llama's and
T5's x_hat rounded before the weight), add_rms_norm, and the add + norm options
residual_in_fp32 and fused input dropout, on every backend that takes them.

Every result, forward and backward, is held to the correctness rule of llmkit.testing against the float64
formulas of llmkit/reference64.py, the baseline being the model code in the same dtype (what
HuggingFace's Llama / Gemma RMSNorm compute, the unfused add then norm). Triton kernels run
through the interpreter with their outputs poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkit
from conftest import poison_kernel_buffers
from llmkit import reference64 as R
from llmkit.dispatch import triton_interpreting
from llmkit.ops._philox import row_dropout_keep_mask
from llmkit.testing import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
BACKENDS = ["reference", "triton", "cuda_ext"]
HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F64 = torch.float64
EPS = 1e-6
L = torch.ops.llmkit


@pytest.fixture(autouse=True)
def _setup(request, monkeypatch):
    """cuda_ext cases need the extension (built by the session fixture); Triton outputs start NaN."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") == "cuda_ext":
        request.getfixturevalue("ext")
    from llmkit.kernels import layer_norm as K
    from llmkit.kernels import layer_norm_backward as KB

    poison_kernel_buffers(monkeypatch, K, KB)


def takes(backend: str, dtype: torch.dtype, cast_before_weight=False, residual_in_fp32=False, dropout_p=0.0) -> bool:
    """Whether ``backend`` implements this combination (cuda_ext's C++ kernels round once, after
    the weight, keep the residual in the input dtype and have no dropout)."""
    if backend != "cuda_ext" or dtype not in HALF:
        return backend != "cuda_ext" or dropout_p == 0.0
    return not cast_before_weight and not residual_in_fp32 and dropout_p == 0.0


def _randn(shape, dtype, scale=1.0, mean=0.0):
    return (torch.randn(shape, dtype=F64, device=DEVICE) * scale + mean).to(dtype)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _grads(outs, leaves, grads):
    pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
    got = torch.autograd.grad(
        [o for o, _ in pairs],
        [t for t in leaves if t is not None],
        [g.to(o.dtype) for o, g in pairs],
        allow_unused=True,
    )
    it = iter(got)
    return [None if t is None else next(it) for t in leaves]


def _hf_rms(x, w, eps, offset, cast_before_weight):
    """RMSNorm as HuggingFace's models write it, in x's dtype: Llama's ``w * x_hat.to(dtype)``
    (cast_before_weight) or Gemma's ``(x_hat * (offset + w.float())).to(dtype)``."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if w is None:
        return h.to(x.dtype)
    if cast_before_weight:
        return (w + offset) * h.to(x.dtype)
    return (h * (offset + w.float())).to(x.dtype)


def _compare(names, got, ref, base):
    for name, g, r, b in zip(names, got, ref, base, strict=False):  # names may outnumber outputs
        if g is None:
            continue
        assert g.dtype == b.dtype and g.shape == b.shape, (name, g.dtype, b.dtype)
        assert_close_to_reference(g, r, b, name=name)


# --------------------------------------------------------------------------------------
# rms_norm: offset and casting order
# --------------------------------------------------------------------------------------


def check_rms(backend, x, w, offset, cast, dy=None):
    dy = _randn(x.shape, x.dtype) if dy is None else dy
    n = x.shape[-1]
    xs, ws = _leaf(x), _leaf(w)
    with llmkit.use_backend(backend):
        out = llmkit.ops.rms_norm(xs, [n], ws, EPS, offset=offset, cast_before_weight=cast)
        got = [out, *_grads([out], [xs, ws], [dy])]
    x64, w64 = _leaf(x.double()), _leaf(None if w is None else w.double())
    ref = R.rms_norm(x64, [n], w64, EPS, offset, x.dtype if cast else None)
    refs = [ref, *_grads([ref], [x64, w64], [dy])]
    xb, wb = _leaf(x), _leaf(w)
    base = _hf_rms(xb, wb, EPS, offset, cast)
    bases = [base, *_grads([base], [xb, wb], [dy])]
    assert out.dtype == x.dtype and out.is_contiguous()
    _compare(["out", "dx", "dweight"], got, refs, bases)


@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (2, 3, 1500)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cast", [False, True], ids=["gemma_order", "llama_order"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_offset_and_casting(backend, dtype, offset, cast, shape):
    if not takes(backend, dtype, cast):
        pytest.skip("not this backend's combination (test_cuda_ext_refuses_what_its_kernels_do_not_do)")
    x = _randn(shape, dtype, scale=2.0)
    w = _randn(shape[-1:], dtype, scale=0.5 if offset else 1.0)  # Gemma's weights sit near 0
    check_rms(backend, x, w, offset, cast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_float32_weight_with_half_input_in_llama_order(backend):
    if not takes(backend, torch.bfloat16, True):
        pytest.skip("not this backend's combination")
    x = _randn((7, 96), torch.bfloat16, scale=3.0)
    w = _randn((96,), torch.float32)
    n = 96
    xs, ws = _leaf(x), _leaf(w)
    dy = _randn(x.shape, x.dtype)
    with llmkit.use_backend(backend):
        out = llmkit.ops.rms_norm(xs, [n], ws, EPS, cast_before_weight=True)
        got = [out, *_grads([out], [xs, ws], [dy])]
    x64, w64 = _leaf(x.double()), _leaf(w.double())
    ref = R.rms_norm(x64, [n], w64, EPS, 0.0, torch.bfloat16)
    refs = [ref, *_grads([ref], [x64, w64], [dy])]
    xb, wb = _leaf(x), _leaf(w)
    base = _hf_rms(xb, wb, EPS, 0.0, True).to(x.dtype)  # HF would return float32 here; the op keeps bfloat16
    bases = [base, *_grads([base], [xb, wb], [dy])]
    _compare(["out", "dx", "dweight"], got, refs, bases)


def test_casting_order_matters_for_half_and_not_for_float32():
    x, w = _randn((64, 256), torch.bfloat16, 3.0), _randn((256,), torch.bfloat16)
    with llmkit.use_backend("reference"):
        a = llmkit.ops.rms_norm(x, 256, w, EPS)
        b = llmkit.ops.rms_norm(x, 256, w, EPS, cast_before_weight=True)
        assert not torch.equal(a, b)  # two roundings differ from one somewhere in 16k values
        assert torch.equal(b, _hf_rms(x, w, EPS, 0.0, True))  # Llama's code, bit for bit
        xf, wf = x.float(), w.float()
        assert torch.equal(
            llmkit.ops.rms_norm(xf, 256, wf, EPS), llmkit.ops.rms_norm(xf, 256, wf, EPS, cast_before_weight=True)
        )


def test_rms_norm_options_need_what_they_scale():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="offset 1.0 scales the weight .* needs a weight, got None"):
        llmkit.ops.rms_norm(x, 8, None, offset=1.0)
    with pytest.raises(ValueError, match="offset must be a finite number, got inf"):
        llmkit.ops.rms_norm(x, 8, torch.ones(8), offset=float("inf"))
    with pytest.raises(TypeError, match="offset must be a number, got 'one'"):
        llmkit.ops.rms_norm(x, 8, torch.ones(8), offset="one")
    with pytest.raises(TypeError, match="cast_before_weight must be a bool, got 1"):
        llmkit.ops.rms_norm(x, 8, torch.ones(8), cast_before_weight=1)


# --------------------------------------------------------------------------------------
# add_rms_norm / add_layer_norm: residual stream dtype and input dropout
# --------------------------------------------------------------------------------------


def check_add(
    backend,
    kind,
    x,
    res,
    w,
    b=None,
    offset=0.0,
    cast=False,
    residual_in_fp32=False,
    dropout_p=0.0,
    seed=1234,
    dy=None,
    dres=None,
):
    """add_rms_norm / add_layer_norm through the custom op (explicit seed) against the float64
    formula with the same keep mask, the unfused model code in the dtype as the baseline."""
    n = x.shape[-1]
    rdt = torch.float32 if residual_in_fp32 and x.dtype in HALF else x.dtype
    dy = _randn(x.shape, x.dtype) if dy is None else dy
    dres = _randn(x.shape, rdt) if dres is None else dres
    leaves = [_leaf(x), _leaf(res), _leaf(w), _leaf(b)]
    with llmkit.use_backend(backend):
        if kind == "rms":
            out, s, _ = L.add_rms_norm(
                leaves[0], leaves[1], [n], leaves[2], EPS, offset, cast, residual_in_fp32, dropout_p, seed
            )
        else:
            out, s, _, _ = L.add_layer_norm(
                leaves[0], leaves[1], [n], leaves[2], leaves[3], EPS, residual_in_fp32, dropout_p, seed
            )
        got = [out, s, *_grads([out, s], leaves, [dy, dres])]
    assert out.dtype == x.dtype and s.dtype == rdt and out.is_contiguous() and s.is_contiguous()

    keep = row_dropout_keep_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 else None
    l64 = [_leaf(t.double()) if t is not None else None for t in (x, res, w, b)]
    if kind == "rms":
        r_out, r_s = R.add_rms_norm(
            l64[0], l64[1], [n], l64[2], EPS, offset, x.dtype if cast else None, rdt, keep, dropout_p
        )
    else:
        r_out, r_s = R.add_layer_norm(l64[0], l64[1], [n], l64[2], l64[3], EPS, rdt, keep, dropout_p)
    refs = [r_out, r_s, *_grads([r_out, r_s], l64, [dy, dres])]

    lb = [_leaf(t) for t in (x, res, w, b)]
    xb = lb[0] if keep is None else (lb[0].float() * keep * (1.0 / (1.0 - dropout_p))).to(x.dtype)
    sb = xb.to(rdt) + lb[1].to(rdt) if rdt != x.dtype else xb + lb[1]
    if kind == "rms":
        o_b = _hf_rms(sb, lb[2], EPS, offset, cast).to(x.dtype)
    else:
        o_b = F.layer_norm(sb, [n], lb[2].to(sb.dtype), lb[3].to(sb.dtype), EPS).to(x.dtype)
    bases = [o_b, sb, *_grads([o_b, sb], lb, [dy, dres])]
    _compare(["out", "residual_out", "dinput", "dresidual", "dweight", "dbias"], got, refs, bases)
    return got


ADD_CASES = [  # (residual_in_fp32, residual given in float32, dropout_p)
    (False, False, 0.0),
    (True, False, 0.0),
    (True, True, 0.0),
    (False, False, 0.3),
    (True, True, 0.2),
]


@pytest.mark.parametrize("case", ADD_CASES, ids=lambda c: f"fp32res{int(c[0])}{'f' if c[1] else ''}_p{c[2]}")
@pytest.mark.parametrize("cast", [False, True], ids=["gemma_order", "llama_order"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm(backend, dtype, cast, case):
    residual_in_fp32, res_fp32, p = case
    if not takes(backend, dtype, cast, residual_in_fp32 and dtype in HALF, p):
        pytest.skip("not this backend's combination (test_cuda_ext_refuses_what_its_kernels_do_not_do)")
    x = _randn((3, 7, 96), dtype, 2.0)
    res = _randn((3, 7, 96), torch.float32 if res_fp32 and residual_in_fp32 and dtype in HALF else dtype, 3.0)
    w = _randn((96,), dtype, 0.5)
    check_add(
        backend,
        "rms",
        x,
        res,
        w,
        offset=1.0 if cast else 0.0,
        cast=cast,
        residual_in_fp32=residual_in_fp32,
        dropout_p=p,
    )


@pytest.mark.parametrize("case", ADD_CASES, ids=lambda c: f"fp32res{int(c[0])}{'f' if c[1] else ''}_p{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_layer_norm_residual_in_fp32_and_dropout(backend, dtype, case):
    residual_in_fp32, res_fp32, p = case
    if not takes(backend, dtype, False, residual_in_fp32 and dtype in HALF, p):
        pytest.skip("not this backend's combination (test_cuda_ext_refuses_what_its_kernels_do_not_do)")
    x = _randn((5, 130), dtype, 2.0)
    res = _randn((5, 130), torch.float32 if res_fp32 and residual_in_fp32 and dtype in HALF else dtype, 3.0, 4.0)
    check_add(
        backend,
        "ln",
        x,
        res,
        _randn((130,), dtype),
        _randn((130,), dtype),
        residual_in_fp32=residual_in_fp32,
        dropout_p=p,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_long_and_strided_rows(backend):
    """Rows longer than a register block (looped kernels), inputs as views."""
    x = _randn((3, 9000), torch.bfloat16, 2.0)
    res = _randn((9000, 3), torch.bfloat16).t()  # transposed storage
    check_add(backend, "rms", x, res, _randn((9000,), torch.bfloat16))
    x = _randn((4, 5, 200), torch.float32)[..., :150]
    check_add(backend, "rms", x, _randn((4, 5, 150), torch.float32), _randn((150,), torch.float32), offset=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_without_weight_and_with_empty_rows(backend):
    check_add(backend, "rms", _randn((4, 33), torch.float16), _randn((4, 33), torch.float16), None)
    x = torch.zeros((0, 16), device=DEVICE, requires_grad=True)
    with llmkit.use_backend(backend):
        out, s = llmkit.ops.add_rms_norm(x, x, 16, torch.ones(16, device=DEVICE))
        (out.sum() + s.sum()).backward()
    assert out.shape == s.shape == (0, 16) and x.grad.shape == (0, 16)


def test_dropout_is_a_function_of_the_seed():
    """The functional draws the seed from torch's generator: the same torch seed, the same
    mask; about p of the inputs dropped; dropped inputs get no gradient."""
    x = _randn((64, 256), torch.float32, 1.0, 5.0).requires_grad_()
    res = torch.zeros(64, 256, device=DEVICE)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(llmkit.ops.add_rms_norm(x, res, 256, dropout_p=0.25)[1])
    assert torch.equal(outs[0], outs[1])
    dropped = outs[0] == 0
    assert 0.2 < dropped.float().mean().item() < 0.3
    torch.testing.assert_close(outs[0][~dropped], x.detach()[~dropped] / 0.75, rtol=2**-23, atol=0)
    (g,) = torch.autograd.grad(outs[0].sum(), x)
    assert torch.equal(g == 0, dropped) and torch.allclose(g[~dropped], torch.full_like(g[~dropped], 1 / 0.75))
    torch.manual_seed(8)
    assert not torch.equal(llmkit.ops.add_rms_norm(x, res, 256, dropout_p=0.25)[1], outs[0])


@pytest.mark.parametrize(
    "case",
    [
        ("cast_before_weight", dict(cast_before_weight=True)),
        ("residual_in_fp32", dict(residual_in_fp32=True)),
        ("dropout", dict(dropout_p=0.1)),
    ],
    ids=lambda c: c[0],
)
def test_cuda_ext_refuses_what_its_kernels_do_not_do(ext, case):
    """Asked for by name, cuda_ext says why; by default the reference takes the call."""
    what, kw = case
    x = _randn((4, 32), torch.bfloat16)
    with llmkit.use_backend("cuda_ext"), pytest.raises(llmkit.BackendError) as info:
        llmkit.ops.add_rms_norm(x, x, 32, torch.ones(32, dtype=torch.bfloat16, device=DEVICE), **kw)
    assert {
        "cast_before_weight": "cast_before_weight",
        "residual_in_fp32": "residual_in_fp32",
        "dropout": "input dropout",
    }[what] in str(info.value)
    with llmkit.use_backend(["cuda_ext", "reference"]):
        llmkit.ops.add_rms_norm(x, x, 32, torch.ones(32, dtype=torch.bfloat16, device=DEVICE), **kw)


# --------------------------------------------------------------------------------------
# op contracts and bad input
# --------------------------------------------------------------------------------------


def _opcheck_cases():
    x, w = torch.randn(3, 5, 8), torch.randn(8)
    xh, rf = x.bfloat16(), torch.randn(3, 5, 8)

    def rq(t):
        return t.clone().requires_grad_()

    return [
        (L.rms_norm.default, (rq(x), [8], rq(w), 1e-6, 1.0, True)),
        (L.add_rms_norm.default, (rq(x), rq(x), [8], rq(w), 1e-6, 1.0, False, False, 0.0, 0)),
        (L.add_rms_norm.default, (rq(xh), rq(rf), [8], rq(w), 1e-6, 0.0, True, True, 0.3, 99)),
        (L.add_layer_norm.default, (rq(xh), rq(xh), [8], rq(w), rq(w), 1e-5, True, 0.5, 5)),
    ]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    with llmkit.use_backend(backend):
        for op, args in _opcheck_cases():
            torch.library.opcheck(op, args)


def test_gradcheck_reference():
    x, r = (torch.randn(3, 6, dtype=F64, requires_grad=True) for _ in range(2))
    w = torch.randn(6, dtype=F64, requires_grad=True)
    with llmkit.use_backend("reference"):
        torch.autograd.gradcheck(lambda x, w: llmkit.ops.rms_norm(x, 6, w, 1e-6, offset=1.0), (x, w))
        torch.autograd.gradcheck(
            lambda x, r, w: L.add_rms_norm(x, r, [6], w, 1e-6, 1.0, False, False, 0.4, 3)[:2], (x, r, w)
        )
        torch.autograd.gradcheck(
            lambda x, r, w: L.add_layer_norm(x, r, [6], w, None, 1e-5, False, 0.4, 3)[:2], (x, r, w)
        )


def _bad_calls():
    x, xh = torch.randn(4, 8), torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(8)
    ops = llmkit.ops
    return [
        (
            lambda: ops.add_rms_norm(x, x.double(), 8, w),
            TypeError,
            "residual has dtype float64; with a float32 input it must be float32",
        ),
        (lambda: ops.add_rms_norm(xh, x, 8), TypeError, "residual has dtype float32; with a bfloat16 input it must"),
        (
            lambda: ops.add_rms_norm(xh, x.half(), 8, residual_in_fp32=True),
            TypeError,
            "with a bfloat16 input and residual_in_fp32 it must be bfloat16 or float32",
        ),
        (lambda: ops.add_rms_norm(x, x[:, :4], 8), ValueError, "residual has shape [4, 4]"),
        (lambda: ops.add_rms_norm(x, x, 8, w, dropout_p=1.0), ValueError, "dropout_p must be in [0, 1), got 1.0"),
        (lambda: ops.add_layer_norm(x, x, 8, dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
        (lambda: ops.add_layer_norm(x, x, 8, residual_in_fp32="yes"), TypeError, "residual_in_fp32 must be a bool"),
        (lambda: ops.add_rms_norm(x, x, 8, None, offset=2.0), ValueError, "needs a weight"),
        (
            lambda: L.add_rms_norm_backward(x.double(), x, x, [8], w, torch.ones(4), [True, True]),
            TypeError,
            "grad_out has dtype float64; it must be residual_out's dtype float32 (or float16 / bfloat16 with a "
            "float32 residual_out)",
        ),
        (
            lambda: L.add_rms_norm_backward(xh, x.half(), x, [8], w, torch.ones(4), [True, True]),
            TypeError,
            "grad_residual_out has dtype float16; it must be residual_out's dtype float32",
        ),
        (
            lambda: L.add_rms_norm_backward(x, x, x, [8], w, torch.ones(5), [True, True]),
            ValueError,
            "rstd has shape [5]; it must be [4]",
        ),
        (
            lambda: L.add_layer_norm_backward(
                xh, x, x, [8], w.half(), None, torch.ones(4), torch.ones(4), [True, True, False]
            ),
            TypeError,
            "weight has dtype float16; with a bfloat16 input it must be bfloat16 or float32",
        ),
        (lambda: L.rms_norm_backward(x, x, [8], None, torch.ones(4), [True, False], 1.0), ValueError, "needs a weight"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, request):
    if backend == "cuda_ext":
        request.getfixturevalue("ext")
    for call, exc, text in _bad_calls():
        with llmkit.use_backend(backend), pytest.raises(exc) as info:
            call()
        assert text in str(info.value), str(info.value)


@pytest.mark.parametrize("n", [300, 9000], ids=["rows_in_registers", "looped"])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_triton_dropout_mask_is_the_references_bit_for_bit(kind, n):
    """The Triton kernels draw the input dropout's keep mask from the same Philox stream as the
    reference (element i * N + j of the seed): residual_out and d input agree exactly, and a
    forward on one backend can be differentiated on the other."""
    x = _randn((5, n), torch.float32)
    res = _randn((5, n), torch.float32)
    w = _randn((n,), torch.float32)
    dy, dres = _randn(x.shape, torch.float32), _randn(x.shape, torch.float32)
    got = {}
    for backend in ("reference", "triton"):
        with llmkit.use_backend(backend):
            if kind == "rms":
                out, s, rstd = L.add_rms_norm(x, res, [n], w, EPS, 0.0, False, False, 0.4, 2**61 + 12345)
                back = L.add_rms_norm_backward(dy, dres, s, [n], w, rstd, [True, True], 0.0, False, 0.4, 2**61 + 12345)
            else:
                out, s, mean, rstd = L.add_layer_norm(x, res, [n], w, None, EPS, False, 0.4, 2**61 + 12345)
                back = L.add_layer_norm_backward(
                    dy, dres, s, [n], w, None, mean, rstd, [True, True, False], 0.4, 2**61 + 12345
                )
        got[backend] = (s, back[0], back[1])
    keep = row_dropout_keep_mask(2**61 + 12345, x.shape, 0.4, x.device)
    for backend, (s, dsum, d_input) in got.items():
        assert torch.equal(s, torch.where(keep, x * (1.0 / 0.6), 0.0) + res), backend
        assert torch.equal(d_input == 0, ~keep | (dsum == 0)), backend
    torch.testing.assert_close(got["triton"][2], got["reference"][2], rtol=1e-5, atol=1e-6)
