"""Norms at the edges of float32: rows whose squares overflow (|x| above ~1.8e19) or, with
eps = 0, underflow (denormal rows), on every backend, forward and backward.

float64 gives +-1-sized results there, PyTorch's float32 kernels NaN or 0, so the baseline
of the tolerance rule is the float64 result rounded to the dtype: llmkit must be as good as
the correctly rounded answer, within the rule's slack. The Triton kernels run through the
interpreter, register-held rows and (forced, with a short chunk) the looped path; the C++
CPU kernels (cuda_ext) are built by the session fixture.
"""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit import reference64 as R
from llmkit.testing import ATOL_FLOOR, assert_close_to_reference
from test_layer_norm import (  # noqa: F401  (_poison_kernel_outputs: the autouse fixture)
    F64,
    RUNNERS,
    _check_all,
    _params,
    _poison_kernel_outputs,
    _randn,
)
from test_llm_norms import _grads, _leaf

pytestmark = [
    pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight"),
    # the interpreter's numpy reports the float32 overflow the kernels detect and redo
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

BACKENDS = ["reference", "triton", "cuda_ext"]


@pytest.fixture(params=["rows_in_registers", "looped"])
def path(request, monkeypatch):
    """Triton's register-held rows, or the looped forward / tiled backward (chunks of 128);
    the other backends have one path (the looped case is skipped for them)."""
    backend = request.node.callspec.params.get("backend")
    if backend == "cuda_ext":
        request.getfixturevalue("ext")
    if request.param == "looped":
        if backend != "triton":
            pytest.skip("the looped path is Triton's")
        from llmkit.kernels import layer_norm as K

        fwd, bwd = K.forward_config, K.backward_config
        monkeypatch.setattr(K, "forward_config", lambda m, n, e, s=8: fwd(m, n, e, s, max_fused_n=64, loop_block_n=128))
        monkeypatch.setattr(
            K, "backward_config", lambda m, n, e, s=8: bwd(m, n, e, s, max_fused_n=64, tile_block_n=128)
        )
    return request.param


def _rounded(refs, ours):
    """The float64 results rounded to each output's dtype: the baseline PyTorch cannot give."""
    return [None if r is None else r.detach().to(o.dtype) for o, r in zip(ours, refs, strict=True)]


def _huge_rows(n: int, magnitude: float, dtype: torch.dtype) -> torch.Tensor:
    x = _randn((3, 4, n), F64) * magnitude
    x[1, 0] = magnitude  # a constant row: variance exactly 0
    x[2, 1, :7] *= 1e-25  # a few ordinary values among huge ones
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(RUNNERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30, 3e37])
def test_huge_rows(backend, op, dtype, magnitude, path):
    n = 300
    x = _huge_rows(n, magnitude, dtype)
    w, b = _params([n], dtype)
    dy = _randn(x.shape, dtype)
    extra = {}
    if op == "add_layer_norm":
        extra = {"residual": _randn(x.shape, dtype), "dres": _randn(x.shape, dtype)}
    names, ours, refs, _ = RUNNERS[op](backend, x, [n], w, b, dy, **extra)
    for name, o in zip(names, ours, strict=True):
        assert o is None or torch.isfinite(o).all(), f"{name} not finite"
    # the gradients come from n-term float32 reductions: a few ulps of their largest value, where
    # the baseline (float64 rounded to the dtype: PyTorch overflows here) is half an ulp
    floors = {
        name: ATOL_FLOOR[dtype] + 2 * torch.finfo(dtype).eps * float(r.detach().abs().max())
        for name, r in zip(names, refs, strict=True)
        if name.startswith("d") and r is not None and r.numel()
    }
    _check_all(names, ours, refs, _rounded(refs, ours), floors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cast", [False, True], ids=["gemma_order", "llama_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_huge_rows_add_rms_norm_with_offset(backend, dtype, cast, path):
    """add_rms_norm with Gemma's offset (and Llama's casting where the backend takes it)."""
    if backend == "cuda_ext" and cast and dtype == torch.bfloat16:
        pytest.skip("cuda_ext rounds once, after the weight")
    n = 300
    x = _huge_rows(n, 1e30, dtype)
    res = _randn(x.shape, dtype)
    w = _randn((n,), dtype, scale=0.5)
    dy, dres = _randn(x.shape, dtype), _randn(x.shape, dtype)
    leaves = [_leaf(x), _leaf(res), _leaf(w)]
    with llmkit.use_backend(backend):
        out, s = llmkit.ops.add_rms_norm(*leaves[:2], n, leaves[2], 1e-6, offset=1.0, cast_before_weight=cast)
        ours = [out, s, *_grads([out, s], leaves, [dy, dres])]
    l64 = [_leaf(t.double()) for t in (x, res, w)]
    r_out, r_s = R.add_rms_norm(l64[0], l64[1], [n], l64[2], 1e-6, 1.0, dtype if cast else None, dtype, None, 0.0)
    refs = [r_out, r_s, *_grads([r_out, r_s], l64, [dy, dres])]
    for o in ours:
        assert torch.isfinite(o).all()
    _check_all(["out", "residual_out", "dinput", "dresidual", "dweight"], ours, refs, _rounded(refs, ours))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_denormal_rows_with_eps_zero(backend, op, path):
    """|x| ~ 1e-40 and eps = 0: float32 squares flush to zero (0 / 0); the result is +-1-sized.
    (float32 only: the Triton interpreter flushes bfloat16 denormals when widening them.)"""
    n = 300
    x = (_randn((5, n), F64) * 1e-40).to(torch.float32)
    with llmkit.use_backend(backend):
        if op == "layer_norm":
            out = llmkit.ops.layer_norm(x, [n], None, None, 0.0)
        else:
            out = llmkit.ops.rms_norm(x, [n], None, 0.0)
    ref = R.layer_norm(x.to(F64), [n], None, None, 0.0) if op == "layer_norm" else R.rms_norm(x.to(F64), [n], None, 0.0)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, ref, ref.to(out.dtype))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ordinary_rows_unchanged_by_scaling(backend, path):
    """Scaling by a power of two is exact: an ordinary row normalizes as before, bit for bit
    against itself times 2^k (same output; mean and rstd scale exactly)."""
    n = 300
    x = _randn((4, n), torch.float32)
    with llmkit.use_backend(backend):
        out, mean, rstd = torch.ops.llmkit.layer_norm(x, [n], None, None, 0.0)
        out2, mean2, rstd2 = torch.ops.llmkit.layer_norm(x * 2.0**40, [n], None, None, 0.0)
    assert torch.equal(out, out2)
    assert torch.equal(mean * 2.0**40, mean2) and torch.equal(rstd, rstd2 * 2.0**40)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=["float32", "bfloat16", "float64"])
def test_constant_rows(backend, dtype, path, request):
    """A constant row normalizes to exactly 0 (LayerNorm: the output is the bias), whatever its
    magnitude; with eps = 0 it is 0 / 0, NaN, as the float64 formula gives (the convention)."""
    if dtype == F64 and backend != "reference":
        pytest.skip("float64 is the reference backend's")
    x = torch.tensor([10000.37, 1e20, -3.0, 0.0], dtype=F64)[:, None].expand(4, 768).to(dtype)
    b = _randn((768,), dtype)
    with llmkit.use_backend(backend):
        out = llmkit.ops.layer_norm(x, [768], None, b, 1e-5)
        flat = llmkit.ops.layer_norm(x, [768], None, None, 0.0)
    assert torch.equal(out, b.expand(4, 768))
    assert torch.isnan(flat).all() and torch.isnan(R.layer_norm(x.to(F64), [768], None, None, 0.0)).all()
