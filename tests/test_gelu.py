"""GELU and bias + GELU: both backends against the float64 reference.

The correctness rule of llmkit.testing (error <= 2 x PyTorch's own error in the dtype + floor) against
llmkit/reference64.py, PyTorch's F.gelu in the input dtype being the baseline. The
Triton kernels run through the interpreter (TRITON_INTERPRET=1, set by conftest) with
every output and scratch buffer poisoned with NaN before the kernels write it.
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
BACKENDS = ["reference", "triton"]
HALF_AND_FLOAT = [torch.float16, torch.bfloat16, torch.float32]
F64 = torch.float64
APPROXIMATE = ["none", "tanh"]

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")


def _cases():
    return [(b, d) for b in BACKENDS for d in HALF_AND_FLOAT + ([F64] if b == "reference" else [])]


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN."""
    from llmkit.kernels import gelu as G
    from llmkit.kernels import layer_norm as K

    poison_kernel_buffers(monkeypatch, K, G)


def _randn(shape, dtype, scale=3.0, mean=0.0):
    return (torch.randn(shape, dtype=F64, device=DEVICE) * scale + mean).to(dtype)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def check_gelu(backend, x, approximate, bias=None, dy=None):
    """Forward and backward of gelu / bias_gelu against reference64, PyTorch as baseline."""
    dy = _randn(x.shape, x.dtype, scale=1.0) if dy is None else dy
    xs, bs = _leaf(x), _leaf(bias)
    with llmkit.use_backend(backend):
        out = llmkit.ops.gelu(xs, approximate) if bias is None else llmkit.ops.bias_gelu(xs, bs, approximate)
    ins = [xs] + ([bs] if bias is not None else [])
    grads = torch.autograd.grad(out, ins, dy) if out.numel() else [torch.zeros_like(t) for t in ins]

    x64, b64 = _leaf(x.to(F64)), _leaf(bias.to(F64)) if bias is not None else None
    ref = R.gelu(x64, approximate) if bias is None else R.bias_gelu(x64, b64, approximate)
    refs = torch.autograd.grad(ref, [x64] + ([b64] if bias is not None else []), dy.to(F64))

    xb, bb = _leaf(x), _leaf(bias.to(x.dtype)) if bias is not None else None
    base = F.gelu(xb if bias is None else xb + bb, approximate=approximate)
    bases = torch.autograd.grad(base, [xb] + ([bb] if bias is not None else []), dy)

    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert_close_to_reference(out, ref, base, name="out")
    for name, g, r, b in zip(["dinput", "dbias"][: len(ins)], grads, refs, bases, strict=True):
        assert_close_to_reference(g, r, b, name=name)
    if bias is not None:
        assert grads[1].dtype == bias.dtype and grads[1].shape == bias.shape
    return out, grads


SHAPES = [(), (1,), (1, 1), (3, 7, 1500), (2, 4097)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("backend,dtype", _cases(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_gelu(approximate, backend, dtype, shape):
    check_gelu(backend, _randn(shape, dtype), approximate)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend,dtype", _cases(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_bias_gelu(approximate, backend, dtype, shape):
    x = _randn(shape, dtype)
    check_gelu(backend, x, approximate, bias=_randn(shape[-1:], dtype, scale=1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_bias_gelu_float32_bias_with_half_input(approximate, backend):
    x = _randn((33, 70), torch.bfloat16)
    check_gelu(backend, x, approximate, bias=_randn((70,), torch.float32, scale=1.0))


@pytest.mark.parametrize("shape", [(2, 65537), (1, 262144)], ids=["2x65537", "1x262144"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows(backend, shape):
    """Rows wider than a tile: several column tiles per row, the bias gradient tiled alike."""
    x = _randn(shape, torch.bfloat16)
    check_gelu(backend, x, "tanh" if shape[0] == 1 else "none", bias=_randn(shape[-1:], torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_saturated_inputs(approximate, backend):
    """Inputs out to +-60, where exp overflows and 1 + erf / 1 + tanh vanish: no NaN, no inf."""
    x = torch.linspace(-60, 60, 1001, dtype=torch.float32, device=DEVICE)
    out, grads = check_gelu(backend, x, approximate)
    assert torch.isfinite(out).all() and torch.isfinite(grads[0]).all()
    x = torch.linspace(-60, 60, 1001, dtype=torch.float32, device=DEVICE).reshape(7, 143)
    check_gelu(backend, x, approximate, bias=_randn((143,), torch.float32, scale=1.0))


def _strided(kind, shape, dtype):
    if kind == "sliced_rows":
        return _randn(shape[:-1] + (shape[-1] + 5,), dtype)[..., : shape[-1]]
    if kind == "transposed_lead":
        return _randn((shape[1], shape[0]) + shape[2:], dtype).transpose(0, 1)
    if kind == "three_strides":
        return _randn((shape[1], shape[0]) + shape[2:], dtype).transpose(0, 1)
    if kind == "last_dim_strided":
        return _randn(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    raise ValueError(kind)


STRIDED = {
    "sliced_rows": (4, 5, 97),
    "transposed_lead": (3, 5, 97),
    "three_strides": (2, 3, 4, 33),
    "last_dim_strided": (6, 97),
}


@pytest.mark.parametrize("with_bias", [False, True], ids=["gelu", "bias_gelu"])
@pytest.mark.parametrize("kind", list(STRIDED))
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, kind, with_bias):
    shape = STRIDED[kind]
    x = _strided(kind, shape, torch.float16)
    dy = _strided("sliced_rows", shape, torch.float16)
    bias = _randn((2 * shape[-1],), torch.float16, scale=1.0)[::2] if with_bias else None
    assert not x.is_contiguous()
    check_gelu(backend, x, "none", bias=bias, dy=dy)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 5)], ids=["0", "3x0", "0x5", "2x0x5"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend, shape):
    x = torch.zeros(shape, device=DEVICE, requires_grad=True)
    b = torch.ones(shape[-1:], device=DEVICE, requires_grad=True)
    with llmkit.use_backend(backend):
        y = llmkit.ops.gelu(x)
        z = llmkit.ops.bias_gelu(x, b)
        (y.sum() + z.sum()).backward()
    assert y.shape == z.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_bias_grad_is_deterministic():
    """dbias from per-program partial sums and a fixed-order second pass: same bits twice."""
    from llmkit.kernels import gelu as G

    x = _randn((150, 257), torch.bfloat16)
    b = _randn((257,), torch.bfloat16, scale=1.0)
    dy = _randn(x.shape, x.dtype, scale=1.0)
    cfg = G.gelu_config(150, 257, 2, bias_grad=True)
    assert cfg.groups > 1 and cfg.rows_per_group > cfg.block_m
    first = G.gelu_backward(dy, x, b, False)
    again = G.gelu_backward(dy, x, b, False)
    for a, c in zip(first, again, strict=True):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_heuristics():
    """Tiles of ~1024 values; bias-gradient row groups cover every row exactly once."""
    from llmkit.kernels import gelu as G

    for m, n in [(1, 1), (1, 10**7), (4096, 4096), (8192, 64), (3, 65537), (100000, 7)]:
        for bias_grad in (False, True):
            c = G.gelu_config(m, n, 132, bias_grad)
            assert c.block_m * c.block_n <= G.TILE_ELEMENTS and c.rows_per_group % c.block_m == 0
            assert c.groups * c.rows_per_group >= m > (c.groups - 1) * c.rows_per_group
            if bias_grad:
                assert c.groups * -(-n // c.block_n) <= max(4 * 132, -(-n // c.block_n))


# --------------------------------------------------------------------------------------
# op contracts
# --------------------------------------------------------------------------------------


def _opcheck_cases(dtype, shape):
    x = _randn(shape, dtype)
    b = _randn(shape[-1:], dtype, scale=1.0)
    dy = _randn(shape, dtype, scale=1.0)
    ops = torch.ops.llmkit
    cases = []
    for a in APPROXIMATE:
        cases += [
            (ops.gelu.default, (_leaf(x), a)),
            (ops.gelu_backward.default, (dy, x, a)),
            (ops.bias_gelu.default, (_leaf(x), _leaf(b), a)),
            (ops.bias_gelu_backward.default, (dy, x, b, a)),
        ]
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


@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_gradcheck_reference(approximate):
    x = _randn((4, 6), F64, scale=2.0).requires_grad_(True)
    b = _randn((6,), F64, scale=1.0).requires_grad_(True)
    with llmkit.use_backend("reference"):
        torch.autograd.gradcheck(lambda x: llmkit.ops.gelu(x, approximate), (x,))
        torch.autograd.gradcheck(lambda x, b: llmkit.ops.bias_gelu(x, b, approximate), (x, b))


# --------------------------------------------------------------------------------------
# bad input and backend selection
# --------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(4, 8, device=DEVICE)
    return [
        (lambda: llmkit.ops.gelu(torch.ones(3, dtype=torch.int64)), TypeError, "input has dtype int64"),
        (lambda: llmkit.ops.gelu(x, "erf"), ValueError, "approximate must be 'none' or 'tanh', got 'erf'"),
        (lambda: llmkit.ops.bias_gelu(x, torch.randn(8), "fast"), ValueError, "approximate must be"),
        (lambda: llmkit.ops.bias_gelu(x, torch.randn(7)), ValueError, "bias has shape [7]"),
        (lambda: llmkit.ops.bias_gelu(x, torch.randn(2, 4)), ValueError, "bias has shape [2, 4]"),
        (lambda: llmkit.ops.bias_gelu(x, torch.randn(8, dtype=F64)), TypeError, "bias has dtype float64"),
        (
            lambda: llmkit.ops.bias_gelu(x.half(), torch.randn(8, dtype=torch.bfloat16)),
            TypeError,
            "bias has dtype bfloat16",
        ),
        (lambda: llmkit.ops.bias_gelu(torch.tensor(1.0), torch.randn(1)), ValueError, "0-d tensor"),
        (lambda: llmkit.ops.bias_gelu(x, torch.randn(8, device="meta")), ValueError, "bias is on meta"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    for call, exc, text in _bad_calls():
        with llmkit.use_backend(backend), pytest.raises(exc) as info:
            call()
        assert text in str(info.value), str(info.value)


def test_triton_refuses_float64():
    x = _randn((3, 16), F64)
    b = _randn((16,), F64)
    assert_refused_then_falls_back(
        (lambda: llmkit.ops.gelu(x), lambda: llmkit.ops.bias_gelu(x, b, "tanh")),
        "triton",
        "triton: takes float16, bfloat16, float32, got float64",
    )


def test_triton_backward_refuses_mismatched_arguments():
    from llmkit.ops.gelu import bias_gelu_backward, gelu_backward

    x = _randn((4, 8), torch.float32)
    assert any("grad_out has shape [4, 4]" in r for r in gelu_backward.why_not("triton", x[:, :4], x, "none"))
    assert any("bias has shape [7]" in r for r in bias_gelu_backward.why_not("triton", x, x, x[0, :7], "none"))
    assert bias_gelu_backward.why_not("triton", x, x, x[0], "none") == []


@pytest.mark.skipif(not torch.cuda.is_available() or triton_interpreting(), reason="needs a CUDA GPU")
def test_default_order_falls_back_on_gpu():
    x = torch.randn(3, 16, dtype=F64, device="cuda")
    assert torch.allclose(llmkit.ops.gelu(x), R.gelu(x))
    from llmkit.ops.gelu import gelu_forward

    assert gelu_forward.select(x.float(), "none").backend == "triton"
