"""LayerNorm, RMSNorm and add_layer_norm: both backends against the float64 reference.

Every result is held to the correctness rule of llmkit.testing (error <= 2 x PyTorch's own error in the
same dtype + floor) against llmkit/reference64.py, PyTorch's own F.layer_norm /
F.rms_norm in that dtype being the baseline. The Triton kernels run through the
interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest) with every output
and scratch buffer poisoned with NaN before the kernels write it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmkit
from conftest import poison_kernel_buffers
from llmkit import reference64 as R
from llmkit.dispatch import triton_interpreting
from llmkit.testing import ATOL_FLOOR, assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
BACKENDS = ["reference", "triton"]
HALF_AND_FLOAT = [torch.float16, torch.bfloat16, torch.float32]
F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


def _dtypes(backend: str) -> list[torch.dtype]:
    return HALF_AND_FLOAT + ([F64] if backend == "reference" else [])


def _cases(dtypes_of=_dtypes):
    return [(b, d) for b in BACKENDS for d in dtypes_of(b)]


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN (the sums of partial rows too)."""
    from llmkit.kernels import layer_norm as K
    from llmkit.kernels import layer_norm_backward as KB

    poison_kernel_buffers(monkeypatch, K, KB)


def _randn(shape, dtype, mean=0.0, scale=1.0):
    return (torch.randn(shape, dtype=F64, device=DEVICE) * scale + mean).to(dtype)


def _params(n_shape, dtype, weight=True, bias=True):
    w = _randn(n_shape, dtype, mean=1.0, scale=0.5) if weight else None
    b = _randn(n_shape, dtype, scale=0.5) if bias else None
    return w, b


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _grads(outs, ins, gouts):
    ins_req = [t for t in ins if t is not None]
    gs = torch.autograd.grad(outs, ins_req, gouts, allow_unused=True)
    it = iter(gs)
    return [None if t is None else next(it) for t in ins]


def _check_all(names, outs, refs, bases, floors=None):
    for name, o, r, b in zip(names, outs, refs, bases, strict=True):
        if o is None and r is None:
            continue
        assert o is not None and r is not None, name
        assert o.shape == r.shape, (name, o.shape, r.shape)
        assert_close_to_reference(o, r, b, name=name, floor=(floors or {}).get(name))


# --------------------------------------------------------------------------------------
# op runners: ours (through a backend), PyTorch's baseline in the dtype, float64 reference
# --------------------------------------------------------------------------------------


def run_layer_norm(backend, x, ns, w, b, dy, eps=1e-5, **_):
    """(names, ours, ref64, baseline): forward output and every gradient."""
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    with llmkit.use_backend(backend):
        out = llmkit.ops.layer_norm(xs, ns, ws, bs, eps)
        ours = [out, *_grads([out], [xs, ws, bs], [dy])]
    x64, w64, b64 = (_leaf(t.to(F64)) if t is not None else None for t in (x, w, b))
    ref = R.layer_norm(x64, ns, w64, b64, eps)
    refs = [ref, *_grads([ref], [x64, w64, b64], [dy.to(F64)])]
    xb, wb, bb = (_leaf(t.to(x.dtype)) if t is not None else None for t in (x, w, b))
    base = F.layer_norm(xb, ns, wb, bb, eps)
    bases = [base, *_grads([base], [xb, wb, bb], [dy])]
    return ["out", "dx", "dweight", "dbias"], ours, refs, bases


def run_rms_norm(backend, x, ns, w, b, dy, eps=1e-6, **_):
    xs, ws = _leaf(x), _leaf(w)
    with llmkit.use_backend(backend):
        out = llmkit.ops.rms_norm(xs, ns, ws, eps)
        ours = [out, *_grads([out], [xs, ws], [dy])]
    x64, w64 = (_leaf(t.to(F64)) if t is not None else None for t in (x, w))
    ref = R.rms_norm(x64, ns, w64, eps)
    refs = [ref, *_grads([ref], [x64, w64], [dy.to(F64)])]
    xb, wb = (_leaf(t.to(x.dtype)) if t is not None else None for t in (x, w))
    base = F.rms_norm(xb, ns, wb, eps)
    bases = [base, *_grads([base], [xb, wb], [dy])]
    return ["out", "dx", "dweight"], ours, refs, bases


def run_add_layer_norm(backend, x, ns, w, b, dy, eps=1e-5, residual=None, dres=None):
    xs, rs, ws, bs = _leaf(x), _leaf(residual), _leaf(w), _leaf(b)
    with llmkit.use_backend(backend):
        out, res_out = llmkit.ops.add_layer_norm(xs, rs, ns, ws, bs, eps)
        ours = [out, res_out, *_grads([out, res_out], [xs, rs, ws, bs], [dy, dres])]
    x64, r64, w64, b64 = (_leaf(t.to(F64)) if t is not None else None for t in (x, residual, w, b))
    ref, ref_res = R.add_layer_norm(x64, r64, ns, w64, b64, eps, round_to=x.dtype)
    refs = [ref, ref_res, *_grads([ref, ref_res], [x64, r64, w64, b64], [dy.to(F64), dres.to(F64)])]
    xb, rb, wb, bb = (_leaf(t.to(x.dtype)) if t is not None else None for t in (x, residual, w, b))
    base_res = xb + rb
    base = F.layer_norm(base_res, ns, wb, bb, eps)
    bases = [base, base_res, *_grads([base, base_res], [xb, rb, wb, bb], [dy, dres])]
    return ["out", "residual_out", "dinput", "dresidual", "dweight", "dbias"], ours, refs, bases


RUNNERS = {"layer_norm": run_layer_norm, "rms_norm": run_rms_norm, "add_layer_norm": run_add_layer_norm}


def check_op(op, backend, x, ns, weight=True, bias=True, dy=None, residual=None, mean=0.0, floors=None):
    w, b = _params(ns, x.dtype, weight, bias)
    dy = _randn(x.shape, x.dtype) if dy is None else dy
    extra = {}
    if op == "add_layer_norm":
        extra = {
            "residual": _randn(x.shape, x.dtype, scale=0.5) if residual is None else residual,
            "dres": _randn(x.shape, x.dtype),
        }
    names, ours, refs, bases = RUNNERS[op](backend, x, ns, w, b, dy, **extra)
    _check_all(names, ours, refs, bases, floors)
    return ours


# --------------------------------------------------------------------------------------
# forward and backward, every op, dtype and backend
# --------------------------------------------------------------------------------------

SHAPES = [((1, 1), [1]), ((3, 7, 1500), [1500]), ((2, 4097), [4097]), ((5, 3, 40), [3, 40])]


@pytest.mark.parametrize("shape,ns", SHAPES, ids=["1x1", "3x7x1500", "2x4097", "5x3x40_ns2"])
@pytest.mark.parametrize("backend,dtype", _cases(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("op", list(RUNNERS))
def test_forward_backward(op, backend, dtype, shape, ns):
    x = _randn(shape, dtype, mean=0.5, scale=2.0)
    check_op(op, backend, x, ns)


@pytest.mark.parametrize(
    "weight,bias", [(False, False), (True, False), (False, True)], ids=["no_affine", "weight_only", "bias_only"]
)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(RUNNERS))
def test_weight_bias_absent(op, backend, weight, bias):
    x = _randn((6, 300), torch.bfloat16, scale=3.0)
    check_op(op, backend, x, [300], weight=weight, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(RUNNERS))
def test_float32_weight_with_half_input(op, backend):
    x = _randn((9, 130), torch.float16)
    w, b = _params([130], torch.float32)
    dy = _randn(x.shape, x.dtype)
    extra = {"residual": _randn(x.shape, x.dtype), "dres": _randn(x.shape, x.dtype)} if op == "add_layer_norm" else {}
    names, ours, refs, bases = RUNNERS[op](backend, x, [130], w, b, dy, **extra)
    _check_all(names, ours, refs, bases)
    assert ours[names.index("dweight")].dtype == torch.float32


LONG_ROWS = [(op, 65537) for op in RUNNERS] + [("layer_norm", 262144)]


@pytest.mark.parametrize("op,n", LONG_ROWS, ids=[f"{op}-{n}" for op, n in LONG_ROWS])
@pytest.mark.parametrize(
    "backend,dtype",
    [("reference", torch.float32), ("triton", torch.bfloat16)],
    ids=["reference-float32", "triton-bfloat16"],
)
def test_long_rows(op, n, backend, dtype):
    """Rows far beyond one register block take the looped forward and the tiled backward."""
    x = _randn((2, n) if n < 100000 else (1, n), dtype, mean=-1.0, scale=2.0)
    check_op(op, backend, x, [n])


@pytest.mark.parametrize(
    "backend,dtype",
    [("reference", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)],
    ids=["reference-float32", "triton-float32", "triton-bfloat16"],
)
@pytest.mark.parametrize("n", [1500, 20000])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_large_mean(op, backend, dtype, n):
    """Inputs of mean 1e4 and a spread of a few units in the input's precision: no
    cancellation in the variance (a one-pass E[x^2] - E[x]^2 in float32 fails here)."""
    scale = 1.0 if dtype == torch.float32 else 200.0  # bfloat16 spacing at 1e4 is 64
    x = _randn((2, n), dtype, mean=1e4, scale=scale)
    res = _randn((2, n), dtype, mean=-2e3, scale=scale) if op == "add_layer_norm" else None
    s = x.double() if res is None else (x.float() + res.float()).to(dtype).double()
    dy = _randn((2, n), dtype)
    # The saved float32 mean (~1e4, spacing ~1e-3) is off by up to half a unit in its last
    # place, and xhat = (x - mean) * rstd carries that into the weight gradient of any
    # implementation that saves its statistics in float32; PyTorch's own error on two rows
    # can be luckily smaller. Floor: that inherent error, summed over the rows.
    mean32 = s.mean(1).float()
    half_ulp = (torch.nextafter(mean32.abs(), torch.tensor(float("inf"))) - mean32.abs()).double() / 2
    rstd = 1 / torch.sqrt(s.var(1, unbiased=False) + 1e-5)
    dw_floor = max(ATOL_FLOOR[dtype], float((dy.double().abs() * (half_ulp * rstd)[:, None]).sum(0).max()))
    ours = check_op(op, backend, x, [n], residual=res, dy=dy, floors={"dweight": dw_floor})
    assert torch.isfinite(ours[0]).all()
    with llmkit.use_backend(backend):
        _, mean, rstd = torch.ops.llmkit.layer_norm(s.to(dtype), [n], None, None, 1e-5)
    var = s.var(1, unbiased=False)
    assert torch.allclose(mean.double(), s.mean(1), rtol=0, atol=2e-3)
    assert torch.allclose(rstd.double(), 1 / torch.sqrt(var + 1e-5), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------------
# strided inputs
# --------------------------------------------------------------------------------------


def _strided(kind, shape, dtype):
    """A tensor of ``shape`` with the given memory layout and fresh values."""
    if kind == "sliced_rows":  # row stride larger than the row
        return _randn(shape[:-1] + (shape[-1] + 13,), dtype)[..., : shape[-1]]
    if kind == "transposed_lead":  # (S, B, N) view of a (B, S, N) tensor: two row strides
        return _randn((shape[1], shape[0]) + shape[2:], dtype).transpose(0, 1)
    if kind == "three_strides":  # lead dims that two strides cannot describe: one copy
        return _randn((shape[1], shape[0]) + shape[2:], dtype).transpose(0, 1)
    if kind == "last_dim_strided":  # normalized dim not unit-stride: one copy
        return _randn(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    raise ValueError(kind)


STRIDED = {
    "sliced_rows": (4, 5, 97),
    "transposed_lead": (3, 5, 97),
    "three_strides": (2, 3, 4, 33),  # built as a (3, 2, 4, 33) tensor with dims 0, 1 swapped
    "last_dim_strided": (6, 97),
}


@pytest.mark.parametrize("kind", list(STRIDED))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(RUNNERS))
def test_strided_inputs(op, backend, kind):
    shape = STRIDED[kind]
    dtype = torch.bfloat16
    x = _strided(kind, shape, dtype)
    dy = _strided(kind, shape, dtype)
    res = _strided("sliced_rows", shape, dtype) if op == "add_layer_norm" else None
    assert not x.is_contiguous()
    ours = check_op(op, backend, x, [shape[-1]], dy=dy, residual=res)
    assert ours[0].is_contiguous()


def test_strided_rows_are_read_in_place():
    """Sliced and transposed row layouts reach the kernels without a copy."""
    from llmkit.kernels._common import row_layout

    for kind in ("sliced_rows", "transposed_lead"):
        x = _strided(kind, STRIDED[kind], torch.float32)
        layout = row_layout([x], 1)
        assert layout.tensors[0] is x, kind
        m, n = layout.m, layout.n
        (outer_stride, inner_stride), inner = layout.strides[0], layout.inner_rows
        starts = [(r // inner) * outer_stride + (r % inner) * inner_stride for r in range(m)]
        got = torch.stack([torch.as_strided(x, (n,), (1,), x.storage_offset() + s) for s in starts])
        assert torch.equal(got, x.reshape(m, n)), kind
    x = _strided("three_strides", STRIDED["three_strides"], torch.float32)
    assert row_layout([x], 1).tensors[0].is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight(backend):
    x = _randn((4, 50), torch.float32)
    w = _randn((100,), torch.float32)[::2]
    b = _randn((150,), torch.float32)[::3]
    dy = _randn(x.shape, torch.float32)
    names, ours, refs, bases = run_layer_norm(backend, x, [50], w, b, dy)
    _check_all(names, ours, refs, bases)


# --------------------------------------------------------------------------------------
# the looped / tiled paths at small sizes, through the kernel module's configurations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_AND_FLOAT, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("op", list(RUNNERS))
def test_looped_paths_forced(op, dtype, monkeypatch):
    """Short rows forced down the looped forward (chunks of 128) and the tiled backward
    (tiles of 128, row groups), with a chunk remainder and strided rows."""
    from llmkit.kernels import layer_norm as K

    fwd, bwd = K.forward_config, K.backward_config
    monkeypatch.setattr(K, "forward_config", lambda m, n, e, s=8: fwd(m, n, e, s, max_fused_n=256, loop_block_n=128))
    monkeypatch.setattr(K, "backward_config", lambda m, n, e, s=8: bwd(m, n, e, s, max_fused_n=256, tile_block_n=128))
    assert K.forward_config(13, 1001, 2).looped and K.backward_config(13, 1001, 2).looped
    x = _strided("transposed_lead", (3, 5, 1001), dtype)
    dy = _strided("sliced_rows", (3, 5, 1001), dtype)
    check_op(op, "triton", x, [1001], dy=dy)


def test_heuristics():
    """Launch configurations follow the shape: whole rows in registers up to the limit,
    several short rows per program, looped/tiled beyond; row groups cover every row."""
    from llmkit.kernels import layer_norm as K

    c = K.forward_config(4096, 1024, 2, slots=132)
    assert not c.looped and c.block_n == 1024 and c.block_m > 1
    assert not K.forward_config(8, 16384, 2, slots=132).looped
    assert K.forward_config(8, 16385, 2, slots=132).looped
    assert K.forward_config(8, 8193, 4, slots=132).looped
    for m, n, es in [(1, 1, 2), (4096, 1024, 2), (7, 8192, 2), (100000, 64, 4), (3, 9000, 2), (5000, 4097, 4)]:
        c = K.backward_config(m, n, es, slots=132)
        assert c.groups * c.rows_per_group >= m > (c.groups - 1) * c.rows_per_group
        assert c.rows_per_group % c.block_m == 0
        assert c.groups <= 4 * 132
        assert c.num_warps in (1, 2, 4, 8, 16, 32)


# --------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,ns",
    [((0, 16), [16]), ((2, 0, 8), [8]), ((3, 0), [0]), ((2, 3, 0), [3, 0])],
    ids=["no_rows", "no_rows_3d", "empty_rows", "empty_rows_ns2"],
)
@pytest.mark.parametrize("op", list(RUNNERS))
def test_empty(op, shape, ns):
    """Empty tensors: both backends give the same shapes and values (and zero grads)."""
    results = {}
    for backend in BACKENDS:
        x = torch.zeros(shape, dtype=torch.float32, device=DEVICE).requires_grad_(True)
        w = torch.ones(ns, device=DEVICE).requires_grad_(True)
        b = torch.zeros(ns, device=DEVICE).requires_grad_(True)
        with llmkit.use_backend(backend):
            if op == "layer_norm":
                outs = torch.ops.llmkit.layer_norm(x, ns, w, b, 1e-5)
                params = [x, w, b]
            elif op == "rms_norm":
                outs = torch.ops.llmkit.rms_norm(x, ns, w, 1e-5)
                params = [x, w]
            else:
                r = torch.zeros(shape, device=DEVICE).requires_grad_(True)
                outs = torch.ops.llmkit.add_layer_norm(x, r, ns, w, b, 1e-5)
                params = [x, r, w, b]
            (outs[0].sum() + (outs[1].sum() if op == "add_layer_norm" else 0)).backward()
        results[backend] = [o.detach() for o in outs] + [p.grad for p in params]
    for a, b in zip(results["reference"], results["triton"], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_backward_is_deterministic():
    """The same inputs give the same bits (partial sums, no atomics), in both backward paths."""
    from llmkit.kernels import layer_norm as K
    from llmkit.kernels import layer_norm_backward as KB

    for m, n in ((37, 300), (9, 9000)):
        x = _randn((m, n), torch.bfloat16)
        r = _randn((m, n), torch.bfloat16)
        w, b = _params([n], torch.bfloat16)
        out, res_out, mean, rstd = K.norm_forward(x, r, 1, w, b, 1e-5, rms=False)
        dy, dres = _randn(x.shape, x.dtype), _randn(x.shape, x.dtype)
        assert K.backward_config(m, n, 2).groups > 1
        first = KB.norm_backward(dy, res_out, 1, w, b, mean, rstd, [True, True, True], grad_residual=dres)[:3]
        again = KB.norm_backward(dy, res_out, 1, w, b, mean, rstd, [True, True, True], grad_residual=dres)[:3]
        for a, c in zip(first, again, strict=True):
            assert torch.equal(a.view(torch.int16), c.view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_mask(backend):
    """Only the requested gradients are computed; the others are not touched."""
    x = _randn((5, 64), torch.float32).requires_grad_(True)
    w, b = _params([64], torch.float32)
    w.requires_grad_(True)
    with llmkit.use_backend(backend):
        out = llmkit.ops.layer_norm(x, [64], w, b)
        (dw,) = torch.autograd.grad(out, [w], torch.ones_like(out))
        out, mean, rstd = torch.ops.llmkit.layer_norm(x.detach(), [64], w.detach(), b, 1e-5)
        dx, dw2, db = torch.ops.llmkit.layer_norm_backward(
            torch.ones_like(out), x.detach(), [64], w.detach(), None, mean, rstd, [False, True, False]
        )
    assert torch.equal(dx, torch.zeros_like(dx)) and db.shape == (0,)
    ref = (
        (x.detach().double() - x.detach().double().mean(1, keepdim=True))
        / torch.sqrt(x.detach().double().var(1, unbiased=False, keepdim=True) + 1e-5)
    ).sum(0)
    assert torch.allclose(dw.double(), ref, atol=1e-4) and torch.allclose(dw2.double(), ref, atol=1e-4)


def test_statistics_conventions():
    """mean/rstd: float32 of the leading shape for half inputs, float64 for float64, on both
    backends, and a forward on one backend feeds a backward on the other."""
    x = _randn((2, 3, 50), torch.bfloat16)
    w, b = _params([50], torch.bfloat16)
    dy = _randn(x.shape, x.dtype)
    stats = {}
    for backend in BACKENDS:
        with llmkit.use_backend(backend):
            stats[backend] = torch.ops.llmkit.layer_norm(x, [50], w, b, 1e-5)
    for _out, mean, rstd in stats.values():
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (2, 3)
    assert torch.allclose(stats["triton"][1], stats["reference"][1], atol=1e-6)
    assert torch.allclose(stats["triton"][2], stats["reference"][2], rtol=1e-5)
    grads = {}
    for fwd, bwd in (("reference", "triton"), ("triton", "reference")):
        _, mean, rstd = stats[fwd]
        with llmkit.use_backend(bwd):
            grads[fwd] = torch.ops.llmkit.layer_norm_backward(dy, x, [50], w, b, mean, rstd, [True, True, True])
    for a, c in zip(grads["reference"], grads["triton"], strict=True):
        assert torch.allclose(a.float(), c.float(), atol=3e-2, rtol=2e-2)
    with llmkit.use_backend("reference"):
        _, mean, rstd = torch.ops.llmkit.layer_norm(x.double(), [50], None, None, 1e-5)
    assert mean.dtype == rstd.dtype == F64


@pytest.mark.parametrize(
    "weight,bias",
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["affine", "weight_only", "bias_only", "no_affine"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_statistics_are_float32_on_every_path(dtype, weight, bias):
    """The CPU reference reads 16-bit input directly where a parameter is given (ATen's mixed
    kernel) and converts it otherwise: float32 statistics, equal to float64's to float32 rounding."""
    x = _randn((4, 3, 77), dtype, mean=3.0, scale=2.0)
    w, b = _params([77], dtype, weight, bias)
    with llmkit.use_backend("reference"):
        out, mean, rstd = torch.ops.llmkit.layer_norm(x, [77], w, b, 1e-5)
    assert out.dtype == dtype and mean.dtype == rstd.dtype == torch.float32 and mean.shape == (4, 3)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(x64.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------
# op contracts: opcheck, gradcheck
# --------------------------------------------------------------------------------------


def _opcheck_cases(dtype, lead=(3, 5)):
    """Forward ops with inputs that require grad (autograd is checked), backward ops without."""
    x = _randn(lead + (24,), dtype)
    w, b = _params([24], dtype)
    r = _randn(x.shape, dtype)
    dy = _randn(x.shape, dtype)
    with llmkit.use_backend("reference"):
        _, mean, rstd = torch.ops.llmkit.layer_norm(x, [24], w, b, 1e-5)
        _, rstd_rms = torch.ops.llmkit.rms_norm(x, [24], w, 1e-6)
        _, res_out, mean_a, rstd_a = torch.ops.llmkit.add_layer_norm(x, r, [24], w, b, 1e-5)
    x_, w_, b_, r_ = (_leaf(t) for t in (x, w, b, r))
    ops = torch.ops.llmkit
    return [
        (ops.layer_norm.default, (x_, [24], w_, b_, 1e-5)),
        (ops.layer_norm.default, (x_, [lead[-1], 24], None, None, 1e-5)),
        (ops.layer_norm_backward.default, (dy, x, [24], w, b, mean, rstd, [True, True, True])),
        (ops.layer_norm_backward.default, (dy, x, [24], None, b, mean, rstd, [True, False, True])),
        (ops.rms_norm.default, (x_, [24], w_, 1e-6)),
        (ops.rms_norm_backward.default, (dy, x, [24], w, rstd_rms, [True, True])),
        (ops.add_layer_norm.default, (x_, r_, [24], w_, b_, 1e-5)),
        (ops.add_layer_norm_backward.default, (dy, r, res_out, [24], w, b, mean_a, rstd_a, [True, True, True])),
    ]


@pytest.mark.parametrize(
    "backend,dtype,lead",
    [("reference", torch.float32, (3, 5)), ("reference", F64, (3, 5)), ("triton", torch.float32, (2, 3))],
    ids=["reference-float32", "reference-float64", "triton-float32"],
)
def test_opcheck(backend, dtype, lead):
    with llmkit.use_backend(backend):
        for op, args in _opcheck_cases(dtype, lead):
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("op", list(RUNNERS))
def test_gradcheck_reference(op):
    x = _randn((3, 7), F64).requires_grad_(True)
    w, b = _params([7], F64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    r = _randn((3, 7), F64).requires_grad_(True)
    with llmkit.use_backend("reference"):
        if op == "layer_norm":
            torch.autograd.gradcheck(lambda x, w, b: llmkit.ops.layer_norm(x, [7], w, b), (x, w, b))
            torch.autograd.gradcheck(lambda x: llmkit.ops.layer_norm(x, [3, 7]), (x,))
        elif op == "rms_norm":
            torch.autograd.gradcheck(lambda x, w: llmkit.ops.rms_norm(x, [7], w, 1e-6), (x, w))
        else:
            torch.autograd.gradcheck(lambda x, r, w, b: llmkit.ops.add_layer_norm(x, r, [7], w, b), (x, r, w, b))


# --------------------------------------------------------------------------------------
# bad input and backend selection
# --------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(8, device=DEVICE)
    xb = x.bfloat16()
    return [
        (
            "int input",
            lambda: llmkit.ops.layer_norm(torch.ones(4, 8, dtype=torch.int32), [8]),
            TypeError,
            "input has dtype int32",
        ),
        ("wrong normalized_shape", lambda: llmkit.ops.layer_norm(x, [7]), ValueError, "normalized_shape [7]"),
        ("empty normalized_shape", lambda: llmkit.ops.rms_norm(x, []), ValueError, "at least one dimension"),
        ("weight shape", lambda: llmkit.ops.layer_norm(x, [8], torch.randn(7)), ValueError, "weight has shape [7]"),
        ("weight dtype", lambda: llmkit.ops.layer_norm(xb, [8], w.double()), TypeError, "weight has dtype float64"),
        ("bias dtype", lambda: llmkit.ops.layer_norm(x, [8], w, w.bfloat16()), TypeError, "bias has dtype bfloat16"),
        (
            "weight device",
            lambda: llmkit.ops.layer_norm(x, [8], torch.randn(8, device="meta")),
            ValueError,
            "weight is on meta",
        ),
        ("negative eps", lambda: llmkit.ops.layer_norm(x, [8], eps=-1.0), ValueError, "eps must be"),
        (
            "rms weight shape",
            lambda: llmkit.ops.rms_norm(x, [8], torch.randn(2, 4)),
            ValueError,
            "weight has shape [2, 4]",
        ),
        (
            "residual shape",
            lambda: llmkit.ops.add_layer_norm(x, x[:, :4], [8]),
            ValueError,
            "residual has shape [4, 4]",
        ),
        ("residual dtype", lambda: llmkit.ops.add_layer_norm(x, xb, [8]), TypeError, "residual has dtype bfloat16"),
        (
            "residual device",
            lambda: llmkit.ops.add_layer_norm(x, torch.randn(4, 8, device="meta"), [8]),
            ValueError,
            "residual is on meta",
        ),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    for name, call, exc, text in _bad_calls():
        with llmkit.use_backend(backend), pytest.raises(exc, match=None) as info:
            call()
        assert text in str(info.value), (name, str(info.value))


def test_triton_refuses_float64():
    """Asked for by name, Triton raises with its reason; in an order, the next backend runs."""
    x = _randn((3, 16), F64)
    for call in (
        lambda: llmkit.ops.layer_norm(x, [16]),
        lambda: llmkit.ops.rms_norm(x, [16]),
        lambda: llmkit.ops.add_layer_norm(x, x, [16]),
    ):
        with llmkit.use_backend("triton"), pytest.raises(llmkit.BackendError) as info:
            call()
        assert "triton: takes float16, bfloat16, float32, got float64" in str(info.value)
        assert "triton" in info.value.reasons
        with llmkit.use_backend(["triton", "reference"]):
            got = call()
        with llmkit.use_backend("reference"):
            want = call()
        got, want = (t if isinstance(t, tuple) else (t,) for t in (got, want))
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_triton_backward_refuses_mismatched_arguments():
    """Backward ops are not validated by the op; the Triton backend refuses what it cannot read."""
    from llmkit.ops.layer_norm import layer_norm_backward

    x = _randn((4, 8), torch.float32)
    _, mean, rstd = torch.ops.llmkit.layer_norm(x, [8], None, None, 1e-5)
    reasons = layer_norm_backward.why_not("triton", x[:, :4], x, [8], None, None, mean, rstd, [True] * 3)
    assert any("grad_out has shape [4, 4]" in r for r in reasons)
    reasons = layer_norm_backward.why_not("triton", x, x, [8], None, None, mean.double(), rstd, [True] * 3)
    assert any("mean must be float32" in r for r in reasons)
    assert layer_norm_backward.why_not("triton", x, x, [8], None, None, mean, rstd, [True] * 3) == []


@pytest.mark.skipif(not torch.cuda.is_available() or triton_interpreting(), reason="needs a CUDA GPU")
def test_default_order_falls_back_on_gpu():
    x = torch.randn(3, 16, dtype=F64, device="cuda")
    out = llmkit.ops.layer_norm(x, [16])  # triton cannot take float64: reference does
    want = R.layer_norm(x, [16], None, None, 1e-5)
    assert torch.allclose(out, want)
    y = torch.randn(3, 16, dtype=torch.bfloat16, device="cuda")
    from llmkit.ops.layer_norm import layer_norm_forward

    assert layer_norm_forward.select(y, [16], None, None, 1e-5).backend == "triton"
    assert math.isfinite(float(llmkit.ops.layer_norm(y, [16]).float().sum()))
