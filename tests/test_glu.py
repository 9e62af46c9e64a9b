"""GeGLU and SwiGLU: every backend against the float64 reference.

The correctness rule of llmkit.testing (error <= 2 x PyTorch's own error in the dtype + floor) against
llmkit/reference64.py, PyTorch's ``act(gate) * up`` in the input dtype being the baseline.
The Triton kernels run through the interpreter (TRITON_INTERPRET=1, set by conftest) with
every output buffer poisoned with NaN before the kernels write it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkit
from conftest import assert_refused_then_falls_back, poison_kernel_buffers
from llmkit import reference64 as R
from llmkit.dispatch import triton_interpreting
from llmkit.testing import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
BACKENDS = ["reference", "triton", "cuda_ext"]
HALF_AND_FLOAT = [torch.float16, torch.bfloat16, torch.float32]
F64 = torch.float64
# (op name, approximate): the three activations
ACTS = [("swiglu", None), ("geglu", "none"), ("geglu", "tanh")]

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")


def _cases():
    return [(b, d) for b in BACKENDS for d in HALF_AND_FLOAT + ([F64] if b == "reference" else [])]


@pytest.fixture(autouse=True)
def _setup(request, monkeypatch):
    """cuda_ext cases need the extension (built by the session fixture); Triton outputs start NaN."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend == "cuda_ext":
        request.getfixturevalue("ext")
    from llmkit.kernels import glu as G

    poison_kernel_buffers(monkeypatch, G)


def _randn(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=F64, device=DEVICE) * scale).to(dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _op(name, approximate):
    if name == "swiglu":
        return llmkit.ops.swiglu, R.swiglu, lambda g, u: F.silu(g) * u
    return (
        lambda g, u: llmkit.ops.geglu(g, u, approximate),
        lambda g, u: R.geglu(g, u, approximate),
        lambda g, u: F.gelu(g, approximate=approximate) * u,
    )


def check_glu(backend, name, approximate, gate, up, dy=None):
    """Forward and backward against reference64, PyTorch's unfused code as the baseline."""
    op, ref_fn, base_fn = _op(name, approximate)
    dy = _randn(gate.shape, gate.dtype, scale=1.0) if dy is None else dy
    g, u = _leaf(gate), _leaf(up)
    with llmkit.use_backend(backend):
        out = op(g, u)
        grads = torch.autograd.grad(out, [g, u], dy) if out.numel() else [torch.zeros_like(g)] * 2
    g64, u64 = _leaf(gate.to(F64)), _leaf(up.to(F64))
    ref = ref_fn(g64, u64)
    refs = torch.autograd.grad(ref, [g64, u64], dy.to(F64)) if ref.numel() else [torch.zeros_like(g64)] * 2
    gb, ub = _leaf(gate), _leaf(up)
    base = base_fn(gb, ub)
    bases = torch.autograd.grad(base, [gb, ub], dy) if base.numel() else [torch.zeros_like(gb)] * 2

    assert out.shape == gate.shape and out.dtype == gate.dtype and out.is_contiguous()
    assert_close_to_reference(out, ref, base, name="out")
    for label, got, r, b in zip(["dgate", "dup"], grads, refs, bases, strict=True):
        assert got.dtype == gate.dtype and got.shape == gate.shape
        assert_close_to_reference(got, r, b, name=label)
    return out, grads


SHAPES = [(), (1,), (1, 1), (3, 7, 1500), (2, 4097)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("backend,dtype", _cases(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name,approximate", ACTS, ids=["swiglu", "geglu", "geglu_tanh"])
def test_glu(name, approximate, backend, dtype, shape):
    check_glu(backend, name, approximate, _randn(shape, dtype), _randn(shape, dtype, scale=1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,approximate", ACTS, ids=["swiglu", "geglu", "geglu_tanh"])
def test_long_flat_tensor(backend, name, approximate):
    """More elements than one tile, contiguous: the flat path over many column blocks."""
    check_glu(backend, name, approximate, _randn((3, 70001), torch.bfloat16), _randn((3, 70001), torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,approximate", ACTS, ids=["swiglu", "geglu", "geglu_tanh"])
def test_saturated_inputs(backend, name, approximate):
    """Gates out to +-100 (and -1e4), where exp overflows: no NaN, no inf, right limits."""
    gate = torch.cat([torch.linspace(-100, 100, 1001), torch.tensor([-1e4, 1e4, -88.7, 88.7])]).to(DEVICE)
    up = _randn(gate.shape, torch.float32, scale=1.0)
    out, grads = check_glu(backend, name, approximate, gate, up)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def _halves(shape, dtype):
    """gate and up as the two halves of one (*, 2N) projection: strided rows, read in place."""
    h = _randn(shape[:-1] + (2 * shape[-1],), dtype)
    return h[..., : shape[-1]], h[..., shape[-1] :]


STRIDED = {
    "halves": lambda shape, dt: _halves(shape, dt),
    "transposed_lead": lambda shape, dt: (
        _randn((shape[1], shape[0], *shape[2:]), dt).transpose(0, 1),
        _randn(shape, dt),
    ),
    "last_dim_strided": lambda shape, dt: (
        _randn(shape[:-1] + (2 * shape[-1],), dt)[..., ::2],
        _randn(shape[:-1] + (3 * shape[-1],), dt)[..., ::3],
    ),
    "mixed_layouts": lambda shape, dt: (
        _randn(shape, dt),
        _randn((shape[1], shape[0], *shape[2:]), dt).transpose(0, 1),
    ),
}


@pytest.mark.parametrize("kind", list(STRIDED))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,approximate", ACTS, ids=["swiglu", "geglu", "geglu_tanh"])
def test_strided_inputs(backend, name, approximate, kind):
    gate, up = STRIDED[kind]((4, 5, 97), torch.float16)
    dy = _randn((4, 5, 107), torch.float16, scale=1.0)[..., :97]
    assert not gate.is_contiguous() or not up.is_contiguous()
    check_glu(backend, name, approximate, gate, up, dy=dy)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 5)], ids=["0", "3x0", "0x5", "2x0x5"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend, shape):
    g = torch.zeros(shape, device=DEVICE, requires_grad=True)
    u = torch.zeros(shape, device=DEVICE, requires_grad=True)
    with llmkit.use_backend(backend):
        y = llmkit.ops.swiglu(g, u)
        z = llmkit.ops.geglu(g, u, "tanh")
        (y.sum() + z.sum()).backward()
    assert y.shape == z.shape == g.shape and g.grad.shape == u.grad.shape == g.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_input_needs_grad(backend):
    """up without grad (a frozen branch): d gate alone, right."""
    gate, up = _randn((5, 33), torch.float32), _randn((5, 33), torch.float32)
    g = _leaf(gate)
    with llmkit.use_backend(backend):
        llmkit.ops.swiglu(g, up).sum().backward()
    g64, gb = _leaf(gate.double()), _leaf(gate)
    want = torch.autograd.grad(R.swiglu(g64, up.double()).sum(), [g64])[0]
    base = torch.autograd.grad((F.silu(gb) * up).sum(), [gb])[0]
    assert_close_to_reference(g.grad, want, base, name="dgate")


# --------------------------------------------------------------------------------------
# op contracts
# --------------------------------------------------------------------------------------


def _opcheck_cases(dtype, shape):
    g, u, dy = _randn(shape, dtype), _randn(shape, dtype), _randn(shape, dtype)
    ops = torch.ops.llmkit
    cases = [(ops.swiglu.default, (_leaf(g), _leaf(u))), (ops.swiglu_backward.default, (dy, g, u))]
    for a in ("none", "tanh"):
        cases += [(ops.geglu.default, (_leaf(g), _leaf(u), a)), (ops.geglu_backward.default, (dy, g, u, a))]
    return cases


@pytest.mark.parametrize(
    "backend,dtype,shape",
    [("reference", torch.float32, (3, 5, 8)), ("reference", F64, (3, 5, 8)), ("triton", torch.float32, (3, 8))],
    ids=["reference-float32", "reference-float64", "triton-float32"],
)
def test_opcheck(backend, dtype, shape):
    with llmkit.use_backend(backend):
        for op, args in _opcheck_cases(dtype, shape):
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("name,approximate", ACTS, ids=["swiglu", "geglu", "geglu_tanh"])
def test_gradcheck_reference(name, approximate):
    op = _op(name, approximate)[0]
    g = _randn((4, 6), F64, scale=2.0).requires_grad_(True)
    u = _randn((4, 6), F64, scale=1.0).requires_grad_(True)
    with llmkit.use_backend("reference"):
        torch.autograd.gradcheck(op, (g, u))


def test_compile_sees_one_node():
    g, u = _randn((4, 8), torch.float32), _randn((4, 8), torch.float32)
    fn = torch.compile(
        lambda g, u: llmkit.ops.swiglu(g, u) + llmkit.ops.geglu(g, u, "tanh"), fullgraph=True, backend="eager"
    )
    assert torch.allclose(fn(g, u), F.silu(g) * u + F.gelu(g, approximate="tanh") * u, atol=1e-6)


# --------------------------------------------------------------------------------------
# bad input and backend selection
# --------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(4, 8, device=DEVICE)
    ops = llmkit.ops
    return [
        (lambda: ops.swiglu(torch.ones(3, dtype=torch.int64), torch.ones(3)), TypeError, "gate has dtype int64"),
        (lambda: ops.swiglu(x, x[:, :7]), ValueError, "up has shape [4, 7]; it must equal gate's shape [4, 8]"),
        (lambda: ops.swiglu(x, x.double()), TypeError, "up has dtype float64; it must equal gate's dtype float32"),
        (lambda: ops.geglu(x, x, "erf"), ValueError, "approximate must be 'none' or 'tanh', got 'erf'"),
        (lambda: ops.geglu(x, 3.0), TypeError, "up must be a torch.Tensor, got float"),
        (lambda: ops.swiglu(x, torch.randn(4, 8, device="meta")), ValueError, "up is on meta"),
        (
            lambda: torch.ops.llmkit.swiglu_backward(x[:, :4], x, x),
            ValueError,
            "grad_out has shape [4, 4]; it must equal gate's shape [4, 8]",
        ),
        (
            lambda: torch.ops.llmkit.geglu_backward(x.half(), x, x, "none"),
            TypeError,
            "grad_out has dtype float16; it must be gate's dtype float32",
        ),
        (lambda: torch.ops.llmkit.geglu_backward(x, x, x, "fast"), ValueError, "approximate must be"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    for call, exc, text in _bad_calls():
        with llmkit.use_backend(backend), pytest.raises(exc) as info:
            call()
        assert text in str(info.value), str(info.value)


def test_triton_refuses_float64():
    g, u = _randn((3, 16), F64), _randn((3, 16), F64)
    assert_refused_then_falls_back(
        (lambda: llmkit.ops.swiglu(g, u), lambda: llmkit.ops.geglu(g, u, "tanh")),
        "triton",
        "triton: takes float16, bfloat16, float32, got float64",
    )


def test_triton_backward_refuses_mismatched_arguments():
    from llmkit.ops.glu import geglu_backward, swiglu_backward

    x = _randn((4, 8), torch.float32)
    assert any("grad_out has shape [4, 4]" in r for r in swiglu_backward.why_not("triton", x[:, :4], x, x))
    assert any("up has dtype float16" in r for r in geglu_backward.why_not("triton", x, x, x.half(), "none"))
    assert swiglu_backward.why_not("triton", x, x, x) == []
