"""The C++/CUDA extension (backend ``cuda_ext``) against the float64 reference.

The extension is built once per session (the ``ext`` fixture of conftest.py): an existing build in
the cache (``llmkit build-ext``, ``$LLMKIT_EXT_CACHE_DIR``) is loaded, else the CPU
part is compiled (about 30 s on 2 cores). A failed build fails these tests with the
compiler's first error. On the CPU these run the C++ kernels; on a GPU the same
tests run the CUDA kernels too (``device`` parameter), plus the CUDA-only ops
(attention, int8 GEMM). Every result is compared with :mod:`llmkit.reference64`
by the DESIGN rule (:func:`llmkit.testing.assert_close_to_reference`: error at most
twice PyTorch's own in that dtype, plus a floor); int8 quantization bit-exact.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit import _ext
from llmkit import reference64 as R
from llmkit.errors import BackendError
from llmkit.ops import _philox
from llmkit.testing import assert_close_to_reference

HAS_GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=gpu_only)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORM_SHAPES = [(1, 1), (7, 33), (3, 1023), (2, 5, 1500), (0, 16)]


def _need_cuda_kernels(device: str) -> None:
    if device == "cuda":
        why = _ext.unavailable_reason("cuda")
        if why is not None:
            pytest.fail(f"a GPU is present but the extension's CUDA kernels are not usable: {why}")


def _rand(shape, dtype, device, scale=1.0, noncontig=False):
    if noncontig and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], device=device).transpose(-1, -2)
    else:
        t = torch.randn(*shape, device=device)
    return (t * scale).to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------------------
# build, load, availability
# --------------------------------------------------------------------------------------


def test_build_is_loaded_and_reported(ext):
    assert ext.unavailable_reason("cpu") is None
    d = ext.details()
    assert d["cpu kernels"].startswith("yes"), d
    assert str(ext.csrc_dir()) and ext.source_hash() in d["build"], d
    info = {b.name: b for b in llmkit.backend_info()}["cuda_ext"]
    assert info.available["cpu"] is None
    assert "add_layer_norm" in info.ops and "attention" in info.ops
    if not HAS_GPU:
        assert info.available["cuda"]


def test_cuda_reason_without_gpu(ext):
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    assert ext.unavailable_reason("cuda") == "no CUDA GPU is available"


def test_named_backend_refuses_what_it_does_not_take(ext):
    x = torch.randn(4, 8, dtype=torch.float64)
    with llmkit.use_backend("cuda_ext"), pytest.raises(BackendError, match="float64"):
        llmkit.ops.layer_norm(x, 8)
    q = torch.randn(1, 2, 3, 16)
    with llmkit.use_backend("cuda_ext"), pytest.raises(BackendError, match="cuda"):
        llmkit.ops.scaled_dot_product_attention(q, q, q)


@pytest.mark.parametrize(
    "m,dtype,grad,expected",
    [
        (1, torch.float32, False, "reference"),  # one-row decode: the reference path is faster
        (1024, torch.float32, False, "cuda_ext"),
        (1, torch.bfloat16, False, "reference"),
        (128, torch.bfloat16, False, "cuda_ext"),
        (3, torch.float16, True, "reference"),  # the same rule through the custom op + autograd
        (128, torch.float16, True, "cuda_ext"),
    ],
)
def test_default_cpu_choice_of_add_layer_norm_by_dtype_and_size(ext, monkeypatch, m, dtype, grad, expected):
    """With the extension built, the default order takes the C++ kernel where the CPU rule
    prefers it and the reference elsewhere, on the fast path and through the op alike;
    the result is the op's either way, and a by-name request still runs cuda_ext."""
    point = llmkit.dispatch.OPS["add_layer_norm"]["forward"]
    ran = []
    for name in ("cuda_ext", "reference"):
        impl = point.impls[name]
        monkeypatch.setattr(impl, "fn", lambda *a, _f=impl.fn, _n=name: ran.append(_n) or _f(*a))
    n = 768
    x, r = _rand((m, n), dtype, "cpu"), _rand((m, n), dtype, "cpu")
    w, b = _rand((n,), dtype, "cpu") + 1, _rand((n,), dtype, "cpu")
    if grad:
        x.requires_grad_(True)
    out, res = llmkit.ops.add_layer_norm(x, r, n, w, b)
    assert ran == [expected]
    s64 = x.detach().double() + r.double()
    assert_close_to_reference(res, s64, x.detach() + r, "residual")
    ref = R.layer_norm(res.detach().double(), (n,), w.double(), b.double(), 1e-5)
    assert_close_to_reference(out, ref, F.layer_norm(res.detach(), (n,), w, b), "out")
    with llmkit.use_backend("cuda_ext"):
        llmkit.ops.add_layer_norm(x, r, n, w, b)
    assert ran[-1] == "cuda_ext"


def test_not_built_reports_the_command_and_never_compiles(tmp_path):
    """An empty cache: import works, the reason names `llmkit build-ext`, nothing builds."""
    env = {k: v for k, v in os.environ.items() if k != _ext.AUTOBUILD_ENV}
    env[_ext.CACHE_ENV] = str(tmp_path / "empty-cache")
    code = (
        "import llmkit; from llmkit import _ext; "
        "print(_ext.unavailable_reason('cpu')); "
        "print(llmkit.ops.layer_norm(__import__('torch').ones(2, 3), 3).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "llmkit build-ext" in out.stdout and "LLMKIT_EXT_AUTOBUILD=1" in out.stdout
    assert "torch.Size([2, 3])" in out.stdout
    assert not (tmp_path / "empty-cache").exists()  # no build was started


def test_failed_build_reports_first_compiler_error(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(_ext.csrc_dir(), src)
    for p in list(src.glob("*.cpp")) + list((src / "cpu").glob("*.cpp")):
        p.write_text(f"#error llmkit-test-injected-{p.stem}\n" + p.read_text())
    res = _ext.build(verbose=False, cuda=False, root=tmp_path / "cache", sources=src)
    assert not res.ok
    assert "error" in res.first_error and "llmkit-test-injected" in res.first_error
    assert res.log is not None and res.log.is_file()
    assert "failed" in res.summary() and str(res.log) in res.summary()


def test_builds_for_a_wider_isa_than_this_cpu_are_never_loaded(tmp_path, monkeypatch):
    """A cache shared between machines: an AVX512 build must not be picked on an AVX2 CPU,
    and the widest build the CPU runs comes first."""
    prefix = _ext._key_prefix(_ext.source_hash())
    for isa in ("default", "avx2", "avx512"):
        d = tmp_path / f"{prefix}cpu-{isa}"
        d.mkdir()
        (d / "lib.so").write_bytes(b"")
        (d / "build_info.json").write_text(f'{{"library": "lib.so", "cpu_isa": "{isa}", "cuda": null}}')
    monkeypatch.setattr(_ext, "_search_roots", lambda: [tmp_path])
    for here, expected in (
        ("avx512", ["avx512", "avx2", "default"]),
        ("avx2", ["avx2", "default"]),
        ("default", ["default"]),
    ):
        monkeypatch.setattr(_ext, "cpu_isa", lambda here=here: here)
        assert [info["cpu_isa"] for _, info in _ext.find_builds()] == expected
    assert _ext._cpu_flags("avx512")[-1] == "-DCPU_CAPABILITY_AVX512"
    assert not any(f.startswith("-m") for f in _ext._cpu_flags("default"))


@pytest.mark.parametrize(
    "log, expected",
    [
        (
            "[1/3] c++ -c a.cpp\nFAILED: a.o\n/x/a.cpp:3:5: error: 'foo' was not declared\n",
            "/x/a.cpp:3:5: error: 'foo'",
        ),
        ('/x/k.cu(12): error: identifier "bar" is undefined\n1 error detected', "/x/k.cu(12): error: identifier"),
        (
            "x.o: In function f:\nx.cpp:(.text+0x1): undefined reference to `g'\ncollect2: error: ld returned 1",
            "x.cpp:(.text+0x1): undefined reference",
        ),
        (
            "In file included from a.h:1,\na.h:2:10: fatal error: nope.h: No such file or directory\n",
            "a.h:2:10: fatal error: nope.h",
        ),
        (
            "OSError: /c/llmkit_ext.so: undefined symbol: _ZN2at3vec5AVX5121fE\n",
            "OSError: /c/llmkit_ext.so: undefined symbol",
        ),
        ("all good\n", None),
    ],
)
def test_first_error_parsing(log, expected):
    got = _ext.first_error(log)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected)


# --------------------------------------------------------------------------------------
# LayerNorm / RMSNorm / add + LayerNorm
# --------------------------------------------------------------------------------------


def _affine(n_shape, dtype, device, kind):
    if kind == "none":
        return None, None
    pdt = torch.float32 if kind == "f32" else dtype
    w = (torch.randn(n_shape, device=device) * 0.5 + 1).to(pdt)
    b = (torch.randn(n_shape, device=device) * 0.5).to(pdt)
    return w, b


def _d64(t):
    return None if t is None else t.detach().double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("affine", ["none", "same", "f32"])
def test_layer_norm_forward_backward(ext, device, dtype, shape, affine):
    _need_cuda_kernels(device)
    n = shape[-1]
    x = _rand(shape, dtype, device, 3.0, noncontig=len(shape) == 3) + 2
    w, b = _affine([n], dtype, device, affine)
    g = _rand(shape, dtype, device)
    xs, ws, bs = _leaf(x), w if w is None else _leaf(w), b if b is None else _leaf(b)
    with llmkit.use_backend("cuda_ext"):
        out, mean, rstd = torch.ops.llmkit.layer_norm(xs, [n], ws, bs, 1e-5)
        out.backward(g)
    # float64 reference and PyTorch's own result in this dtype
    x64, w64, b64 = _leaf(_d64(x)), None if w is None else _leaf(_d64(w)), None if b is None else _leaf(_d64(b))
    ref = R.layer_norm(x64, [n], w64, b64, 1e-5)
    ref.backward(g.double())
    xt, wt, bt = _leaf(x), None if w is None else _leaf(w.to(dtype)), None if b is None else _leaf(b.to(dtype))
    base = F.layer_norm(xt, [n], wt, bt, 1e-5)
    base.backward(g)
    assert out.dtype == dtype and mean.dtype == torch.float32 and mean.shape == shape[:-1]
    assert_close_to_reference(out, ref, base, "out")
    if x.numel():
        x64d = x.double()
        assert_close_to_reference(mean, x64d.mean(-1), x.float().mean(-1), "mean")
        rstd64 = 1 / torch.sqrt(x64d.var(-1, unbiased=False) + 1e-5)
        assert_close_to_reference(rstd, rstd64, 1 / torch.sqrt(x.float().var(-1, unbiased=False) + 1e-5), "rstd")
    assert_close_to_reference(xs.grad, x64.grad, xt.grad, "dx")
    if w is not None:
        assert ws.grad.dtype == w.dtype
        assert_close_to_reference(ws.grad, w64.grad, wt.grad, "dweight")
        assert_close_to_reference(bs.grad, b64.grad, bt.grad, "dbias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("affine", ["none", "same"])
def test_rms_norm_forward_backward(ext, device, dtype, shape, affine):
    _need_cuda_kernels(device)
    n = shape[-1]
    x = _rand(shape, dtype, device, 2.0, noncontig=len(shape) == 3)
    w, _ = _affine([n], dtype, device, affine)
    g = _rand(shape, dtype, device)
    xs, ws = _leaf(x), None if w is None else _leaf(w)
    with llmkit.use_backend("cuda_ext"):
        out, rstd = torch.ops.llmkit.rms_norm(xs, [n], ws, 1e-6)
        out.backward(g)
    x64, w64 = _leaf(_d64(x)), None if w is None else _leaf(_d64(w))
    ref = R.rms_norm(x64, [n], w64, 1e-6)
    ref.backward(g.double())
    xt, wt = _leaf(x), None if w is None else _leaf(w)
    base = F.rms_norm(xt, [n], wt, 1e-6)
    base.backward(g)
    assert rstd.dtype == torch.float32 and rstd.shape == shape[:-1]
    assert_close_to_reference(out, ref, base, "out")
    assert_close_to_reference(xs.grad, x64.grad, xt.grad, "dx")
    if w is not None:
        assert_close_to_reference(ws.grad, w64.grad, wt.grad, "dweight")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("affine", ["none", "same", "f32"])
def test_add_layer_norm_forward_backward(ext, device, dtype, shape, affine):
    _need_cuda_kernels(device)
    n = shape[-1]
    x = _rand(shape, dtype, device, 2.0, noncontig=len(shape) == 3)
    r = _rand(shape, dtype, device, 4.0) + 1
    w, b = _affine([n], dtype, device, affine)
    g, gr = _rand(shape, dtype, device), _rand(shape, dtype, device)
    xs, rs = _leaf(x), _leaf(r)
    ws, bs = (None, None) if w is None else (_leaf(w), _leaf(b))
    with llmkit.use_backend("cuda_ext"):
        out, res = llmkit.ops.add_layer_norm(xs, rs, n, ws, bs, 1e-5)
        torch.autograd.backward([out, res], [g, gr])
    # the sum is added in float32 and rounded once, exactly
    assert torch.equal(res, (x.float() + r.float()).to(dtype))
    x64, r64 = _leaf(_d64(x)), _leaf(_d64(r))
    w64, b64 = (None, None) if w is None else (_leaf(_d64(w)), _leaf(_d64(b)))
    ref, ref_res = R.add_layer_norm(x64, r64, [n], w64, b64, 1e-5, round_to=dtype)
    torch.autograd.backward([ref, ref_res], [g.double(), gr.double()])
    xt, rt = _leaf(x), _leaf(r)
    wt, bt = (None, None) if w is None else (_leaf(w.to(dtype)), _leaf(b.to(dtype)))
    s = xt + rt
    base = F.layer_norm(s, [n], wt, bt, 1e-5)
    torch.autograd.backward([base, s], [g, gr])
    assert_close_to_reference(out, ref, base, "out")
    assert_close_to_reference(xs.grad, x64.grad, xt.grad, "d input")
    assert torch.equal(xs.grad, rs.grad)
    if w is not None:
        assert_close_to_reference(ws.grad, w64.grad, wt.grad, "dweight")
        assert_close_to_reference(bs.grad, b64.grad, bt.grad, "dbias")


@pytest.mark.parametrize("device", DEVICES)
def test_norm_multi_dim_normalized_shape(ext, device):
    _need_cuda_kernels(device)
    x = torch.randn(3, 4, 5, 7, device=device)
    w = torch.randn(5, 7, device=device)
    with llmkit.use_backend("cuda_ext"):
        out, mean, rstd = torch.ops.llmkit.layer_norm(x, [5, 7], w, None, 1e-5)
    ref = R.layer_norm(x.double(), [5, 7], w.double(), None, 1e-5)
    assert mean.shape == (3, 4)
    assert_close_to_reference(out, ref, F.layer_norm(x, [5, 7], w, None, 1e-5))


def test_norm_ops_pass_opcheck(ext):
    x = torch.randn(5, 37, requires_grad=True)
    r = torch.randn(5, 37, requires_grad=True)
    w = torch.randn(37, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    with llmkit.use_backend("cuda_ext"):
        torch.library.opcheck(torch.ops.llmkit.add_layer_norm.default, (x, r, [37], w, b, 1e-5))
        torch.library.opcheck(torch.ops.llmkit.rms_norm.default, (x, [37], w, 1e-6))
        torch.library.opcheck(torch.ops.llmkit.bias_gelu.default, (x, b, "tanh"))


# --------------------------------------------------------------------------------------
# GELU, bias + GELU
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 33), (3, 1023), (2, 5, 1500), (4, 0)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_gelu_forward_backward(ext, device, dtype, shape, approximate, with_bias):
    _need_cuda_kernels(device)
    n = shape[-1]
    x = _rand(shape, dtype, device, 3.0, noncontig=len(shape) == 3)
    b = _rand((n,), dtype, device) if with_bias else None
    g = _rand(shape, dtype, device)
    xs, bs = _leaf(x), None if b is None else _leaf(b)
    with llmkit.use_backend("cuda_ext"):
        out = llmkit.ops.bias_gelu(xs, bs, approximate) if with_bias else llmkit.ops.gelu(xs, approximate)
        out.backward(g)
    x64, b64 = _leaf(x.double()), None if b is None else _leaf(b.double())
    ref = R.bias_gelu(x64, b64, approximate) if with_bias else R.gelu(x64, approximate)
    ref.backward(g.double())
    xt, bt = _leaf(x), None if b is None else _leaf(b)
    base = F.gelu(xt + bt if with_bias else xt, approximate=approximate)
    base.backward(g)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close_to_reference(out, ref, base, "out")
    assert_close_to_reference(xs.grad, x64.grad, xt.grad, "dx")
    if with_bias:
        assert bs.grad.dtype == b.dtype
        assert_close_to_reference(bs.grad, b64.grad, bt.grad, "dbias")


@pytest.mark.parametrize("device", DEVICES)
def test_bias_gelu_float32_bias_with_half_input(ext, device):
    _need_cuda_kernels(device)
    x = torch.randn(9, 130, device=device).half()
    b = torch.randn(130, device=device)
    with llmkit.use_backend("cuda_ext"):
        out = llmkit.ops.bias_gelu(x, b)
    ref = R.bias_gelu(x.double(), b.double())
    assert_close_to_reference(out, ref, F.gelu(x + b.half()))


def _gelu_and_grad(x: torch.Tensor, approximate: str, backend: str | None):
    """(gelu(x), d gelu / dx) through llmkit on ``backend`` (None: F.gelu; float64: reference)."""
    xs = _leaf(x)
    if backend is None:
        out = R.gelu(xs, approximate) if x.dtype == torch.float64 else F.gelu(xs, approximate=approximate)
        out.backward(torch.ones_like(out))
    else:
        with llmkit.use_backend(backend):
            out = llmkit.ops.gelu(xs, approximate)
            out.backward(torch.ones_like(out))
    return out.detach(), xs.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_cpu_math_over_the_whole_range(ext, dtype, approximate):
    """The CPU kernels' own exp / erfc / reciprocal (csrc/cpu/vec_math.h), densely over
    [-12, 12] (every branch of the erfc form and of the exp's range reduction) against
    the float64 formula, then at extremes: tiny, huge, the exp's clamp points, +-inf, NaN."""
    x = torch.linspace(-12, 12, 24001).to(dtype)
    out, grad = _gelu_and_grad(x, approximate, "cuda_ext")
    ref, ref_grad = _gelu_and_grad(x.double(), approximate, None)
    base, base_grad = _gelu_and_grad(x, approximate, None)
    assert_close_to_reference(out, ref, base, "gelu")
    assert_close_to_reference(grad, ref_grad, base_grad, "gelu'")

    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            1e-3,
            -1e-3,
            9.5,
            -9.5,
            13.4,
            -13.4,
            40.0,
            -40.0,
            1e3,
            -1e3,
            big,
            -big,
            inf,
            -inf,
            nan,
        ]
    ).to(dtype)
    out, grad = _gelu_and_grad(special, approximate, "cuda_ext")
    ref, ref_grad = _gelu_and_grad(special.double(), approximate, None)
    for got, want, what in ((out, ref, "gelu"), (grad, ref_grad, "gelu'")):
        want = want.to(dtype).double()  # the correctly rounded value
        got = got.double()
        assert torch.equal(got.isnan(), want.isnan()), (what, special, got, want)
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin), (what, special, got, want)
        assert torch.equal(got[~fin & ~want.isnan()], want[~fin & ~want.isnan()]), (what, got, want)
        # 1e-12 absolute: the float64 formula 0.5 x (1 + erf(x / sqrt 2)) itself cancels
        # to 0 below x ~ -8.3, where the kernels' erfc form keeps e.g. gelu(-9.5) = -1e-20
        tol = 4 * torch.finfo(dtype).eps * want[fin].abs() + 1e-12
        assert bool(((got[fin] - want[fin]).abs() <= tol).all()), (what, special, got, want)


# Row lengths around the vector step (2 float vectors: 16 elements with AVX2, 32 with
# AVX512, 16 generic): whole steps, a step and a tail, tails of 1 and of a step minus 1.
TAIL_LENGTHS = [1, 2, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_cpu_vector_tails_and_strided_rows(ext, dtype, approximate):
    """Every tail length and rows with a stride (a column slice of a wider tensor)."""
    for n in TAIL_LENGTHS:
        x = (torch.randn(5, 2 * n + 3) * 3)[:, 1 : n + 1].to(dtype)  # strided rows
        b = torch.randn(n).to(dtype)
        g = torch.randn(5, n).to(dtype)
        xs, bs = _leaf(x), _leaf(b)
        with llmkit.use_backend("cuda_ext"):
            out = llmkit.ops.bias_gelu(xs, bs, approximate)
            out.backward(g)
        x64, b64 = _leaf(x.double()), _leaf(b.double())
        ref = R.bias_gelu(x64, b64, approximate)
        ref.backward(g.double())
        xt, bt = _leaf(x), _leaf(b)
        base = F.gelu(xt + bt, approximate=approximate)
        base.backward(g)
        assert_close_to_reference(out, ref, base, f"out (n={n})")
        assert_close_to_reference(xs.grad, x64.grad, xt.grad, f"dx (n={n})")
        assert_close_to_reference(bs.grad, b64.grad, bt.grad, f"dbias (n={n})")


def _add_layer_norm_vs_reference(x, r, w, b):
    """Forward and backward of add_layer_norm on cuda_ext against reference64."""
    n = x.shape[-1]
    dtype = x.dtype
    g, gr = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)
    xs, rs, ws, bs = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
    with llmkit.use_backend("cuda_ext"):
        out, res = llmkit.ops.add_layer_norm(xs, rs, n, ws, bs, 1e-5)
        torch.autograd.backward([out, res], [g, gr])
    assert torch.equal(res, (x.float() + r.float()).to(dtype))
    x64, r64, w64, b64 = (_leaf(_d64(t)) for t in (x, r, w, b))
    ref, _ = R.add_layer_norm(x64, r64, [n], w64, b64, 1e-5, round_to=dtype)
    ref_res = ref.new_zeros(())  # the sum is checked exactly above
    torch.autograd.backward([ref], [g.double()])
    xt, rt, wt, bt = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
    s = xt + rt
    base = F.layer_norm(s, [n], wt, bt, 1e-5)
    torch.autograd.backward([base, s], [g, gr])
    del ref_res
    assert_close_to_reference(out, ref, base, f"out {list(x.shape)}")
    # the reference's d input lacks grad_residual_out (added exactly in float32 by the kernel)
    assert_close_to_reference(xs.grad, (x64.grad + gr.double()), xt.grad, f"d input {list(x.shape)}")
    assert torch.equal(xs.grad, rs.grad)
    assert_close_to_reference(ws.grad, w64.grad, wt.grad, "dweight")
    assert_close_to_reference(bs.grad, b64.grad, bt.grad, "dbias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_cpu_vector_tails_and_strided_rows(ext, dtype):
    for n in TAIL_LENGTHS:
        x = (torch.randn(6, 2 * n + 5) * 2)[:, 3 : n + 3].to(dtype)  # strided rows
        r = (torch.randn(6, n) * 4 + 1).to(dtype)
        w = (torch.randn(n) * 0.5 + 1).to(dtype)
        b = (torch.randn(n) * 0.5).to(dtype)
        _add_layer_norm_vs_reference(x, r, w, b)


@pytest.mark.parametrize(
    "dtype, rows, cols",
    [
        (torch.float32, 1280, 1024),  # 5 MiB per output, rows aligned: streaming stores
        (torch.bfloat16, 2560, 1024),  # the same in a 16-bit type
        (torch.float16, 1281, 2048),  # odd row count
        (torch.float32, 1300, 1025),  # large but rows not vector-aligned: normal stores
    ],
)
def test_add_layer_norm_cpu_large_outputs(ext, dtype, rows, cols):
    """The large-output path of the CPU kernels (streaming stores, next-row prefetch)."""
    x = (torch.randn(rows, cols) * 2).to(dtype)
    r = (torch.randn(rows, cols) * 4 + 1).to(dtype)
    w = (torch.randn(cols) * 0.5 + 1).to(dtype)
    b = (torch.randn(cols) * 0.5).to(dtype)
    _add_layer_norm_vs_reference(x, r, w, b)


# --------------------------------------------------------------------------------------
# int8 quantization (bit-exact)
# --------------------------------------------------------------------------------------


def _special_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    if x.shape[0] >= 6 and x.shape[-1] >= 3:
        x[0] = 0
        x[1, 1] = float("nan")
        x[2, 2] = float("inf")
        x[3] = x[3] * 1e-30  # tiny (subnormal in float32) values
        x[4, 0] = -x[4].abs().max() * 2  # the negative extreme
        x[5] = torch.arange(x.shape[-1], device=x.device) - x.shape[-1] // 2 + 0.5  # ties
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, dim", [((7, 33), -1), ((6, 1023), -1), ((9, 1500), 0), ((3, 6, 17), 1), ((0, 5), -1), ((5, 0), -1)]
)
def test_quantize_int8_bit_exact(ext, device, dtype, shape, dim):
    _need_cuda_kernels(device)
    x = _special_rows(torch.randn(*shape, device=device) * 5).to(dtype)
    if len(shape) == 3:
        x = x.transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous
    with llmkit.use_backend("cuda_ext"):
        q, scale = llmkit.ops.quantize_int8(x, dim)
    with llmkit.use_backend("reference"):
        q_ref, s_ref = llmkit.ops.quantize_int8(x, dim)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.is_contiguous()
    assert q.shape == x.shape and scale.shape == q_ref.shape[: dim % x.dim()] + q_ref.shape[dim % x.dim() + 1 :]
    assert torch.equal(q, q_ref)
    assert torch.equal(scale.nan_to_num(), s_ref.nan_to_num())
    assert torch.equal(torch.isnan(scale), torch.isnan(s_ref))
    if x.shape[dim] > 0:  # reference64 needs non-empty rows
        q64, s64 = R.quantize_int8(x, dim)
        assert torch.equal(q, q64)
        finite = torch.isfinite(s64)
        assert torch.equal(scale[finite], s64[finite])


# --------------------------------------------------------------------------------------
# Philox (the dropout stream the CUDA attention kernels use)
# --------------------------------------------------------------------------------------


def test_philox_header_matches_python(ext):
    offsets = torch.cat(
        [
            torch.arange(0, 300, dtype=torch.int64),
            torch.randint(0, 2**62, (300,), dtype=torch.int64),
            torch.tensor([2**32 - 1, 2**32, 2**33 + 5, 2**63 - 1], dtype=torch.int64),
        ]
    )
    for seed in (0, 1, 123456789, 2**40 + 17, int(torch.randint(0, 2**62, (1,)).item())):
        got = torch.ops.llmkit_ext.philox_uniform(seed, offsets)
        want = _philox.philox_uniform(seed, offsets)
        assert torch.equal(got, want), seed


# --------------------------------------------------------------------------------------
# CUDA-only ops (run on a GPU)
# --------------------------------------------------------------------------------------


def _attn_inputs(b, hq, hkv, sq, sk, d, dv, dtype, layout="bhsd"):
    def mk(h, s, dd):
        if layout == "bshd":  # a (B, S, H, D) tensor viewed as (B, H, S, D)
            return torch.randn(b, s, h, dd, device="cuda").to(dtype).transpose(1, 2)
        return torch.randn(b, h, s, dd, device="cuda").to(dtype)

    return mk(hq, sq, d), mk(hkv, sk, d), mk(hkv, sk, dv)


def _sdpa_baseline(q, k, v, mask, causal, scale, gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def _attention_vs_reference(q, k, v, g, mask, causal, scale, gqa):
    """cuda_ext attention forward and backward (output gradient g) against reference64, with
    SDPA in the same dtype as the baseline; returns the lse."""
    qs, ks, vs = _leaf(q), _leaf(k), _leaf(v)
    with llmkit.use_backend("cuda_ext"):
        out, lse = torch.ops.llmkit.scaled_dot_product_attention(qs, ks, vs, mask, 0.0, causal, scale, gqa, 0, 0)
        out.backward(g)
    q64, k64, v64 = _leaf(q.double()), _leaf(k.double()), _leaf(v.double())
    ref = R.attention(q64, k64, v64, mask, causal, scale, gqa)
    ref.backward(g.double())
    qt, kt, vt = _leaf(q), _leaf(k), _leaf(v)
    base = _sdpa_baseline(qt, kt, vt, mask, causal, scale, gqa)
    base.backward(g)
    assert_close_to_reference(out, ref, base, "out")
    for name, ours, r64, bt in (("dq", qs, q64, qt), ("dk", ks, k64, kt), ("dv", vs, v64, vt)):
        assert_close_to_reference(ours.grad, r64.grad, bt.grad, name)
    return lse


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b, hq, hkv, sq, sk, d, dv",
    [
        (1, 1, 1, 1, 1, 16, 16),
        (2, 3, 3, 7, 33, 64, 64),
        (1, 4, 2, 130, 77, 128, 128),
        (2, 8, 1, 65, 200, 40, 72),
        (1, 2, 2, 257, 257, 96, 96),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_forward_backward_gpu(ext, dtype, b, hq, hkv, sq, sk, d, dv, causal, mask_kind):
    _need_cuda_kernels("cuda")
    q, k, v = _attn_inputs(b, hq, hkv, sq, sk, d, dv, dtype, layout="bshd" if d == 64 else "bhsd")
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, sk, device="cuda") > 0.3
        mask[..., 0] = True  # no fully masked row (SDPA gives NaN there)
    elif mask_kind == "float":
        mask = torch.randn(1, hq, sq, sk, device="cuda").to(dtype)
    scale = 1 / math.sqrt(d)
    gqa = hq != hkv
    g = torch.randn(b, hq, sq, dv, device="cuda").to(dtype)
    lse = _attention_vs_reference(q, k, v, g, mask, causal, scale, gqa)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_dead_rows_and_dropout_gpu(ext, dtype):
    _need_cuda_kernels("cuda")
    b, h, sq, sk, d = 2, 3, 45, 70, 64
    q, k, v = _attn_inputs(b, h, h, sq, sk, d, d, dtype)
    mask = torch.rand(b, 1, sq, sk, device="cuda") > 0.5
    mask[:, :, 3] = False  # row 3 sees nothing
    p, seed, offset = 0.2, 1234567, 99
    with llmkit.use_backend("cuda_ext"):
        out, lse = torch.ops.llmkit.scaled_dot_product_attention(q, k, v, mask, p, False, 0.125, False, seed, offset)
    assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isinf(lse[:, :, 3]) & (lse[:, :, 3] > 0))
    keep = _philox.dropout_keep_mask(seed, offset, b, h, sq, sk, p, q.device)
    ref = R.attention(q.double(), k.double(), v.double(), mask, False, 0.125, keep=keep, dropout_p=p)
    with llmkit.use_backend("reference"):
        base, _ = torch.ops.llmkit.scaled_dot_product_attention(q, k, v, mask, p, False, 0.125, False, seed, offset)
    assert_close_to_reference(out, ref, base, "out with dropout")


@gpu_only
@pytest.mark.parametrize("m, k, n", [(1, 16, 8), (7, 33, 5), (130, 1023, 77), (256, 512, 384)])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_int8_matmul_gpu(ext, m, k, n, out_dtype):
    _need_cuda_kernels("cuda")
    a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
    exact = R.int8_matmul(a.cpu(), b.cpu())
    with llmkit.use_backend("cuda_ext"):
        acc = llmkit.ops.int8_matmul(a, b)
        assert acc.dtype == torch.int32 and torch.equal(acc.cpu().to(torch.int64), exact)
        if out_dtype is None:
            return
        sa = torch.rand(m, device="cuda") + 0.01
        sb = torch.rand(n, device="cuda") + 0.01
        bias = torch.randn(n, device="cuda")
        out = llmkit.ops.int8_matmul(a, b, sa, sb, bias, out_dtype)
    ref = exact.double() * sa.double().cpu()[:, None] * sb.double().cpu()[None, :] + bias.double().cpu()
    base = (acc.float() * sa[:, None] * sb[None, :] + bias).to(out_dtype)
    assert_close_to_reference(out.cpu(), ref, base.cpu(), "scaled int8 matmul")


@gpu_only
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_linear_w8a8_gpu(ext, activation, dtype):
    _need_cuda_kernels("cuda")
    x = torch.randn(3, 37, 200, device="cuda").to(dtype)
    w = torch.randint(-127, 128, (150, 200), device="cuda", dtype=torch.int8)
    ws = torch.rand(150, device="cuda") * 0.01
    bias = torch.randn(150, device="cuda").to(dtype)
    with llmkit.use_backend("cuda_ext"):
        out = llmkit.ops.int8_linear(x, w, ws, bias, "w8a8", activation)
    with llmkit.use_backend("reference"):
        base = llmkit.ops.int8_linear(x, w, ws, bias, "w8a8", activation)
    # same quantization, exact int32 GEMM, same float32 epilogue: only the final rounding may differ
    assert out.shape == (3, 37, 150) and out.dtype == dtype
    half = dtype != torch.float32
    torch.testing.assert_close(out, base, rtol=2e-2 if half else 1e-5, atol=1e-2 if half else 1e-5)


@gpu_only
def test_decode_attention_gpu(ext):
    _need_cuda_kernels("cuda")
    q = torch.randn(3, 8, 2, 64, device="cuda").half()
    kc = torch.randn(3, 2, 50, 64, device="cuda").half()
    vc = torch.randn(3, 2, 50, 64, device="cuda").half()
    lens = torch.tensor([50, 7, 2], device="cuda")
    with llmkit.use_backend("cuda_ext"):
        out = llmkit.ops.decode_attention(q, kc, vc, lens)
    ref = R.decode_attention(q.double(), kc.double(), vc.double(), lens, None, True)
    with llmkit.use_backend("reference"):
        base = llmkit.ops.decode_attention(q, kc, vc, lens)
    assert_close_to_reference(out, ref, base)


def test_sources_exist_for_every_cuda_entry_point():
    """Every launcher declared in csrc/cuda/launchers.h is defined in some .cu file."""
    src = Path(_ext.csrc_dir())
    header = (src / "cuda" / "launchers.h").read_text()
    body = "\n".join(p.read_text() for p in (src / "cuda").glob("*.cu"))
    names = re.findall(r"^(?:cudaError_t|int64_t)\s+(\w+)\(", header, re.M)
    assert len(names) >= 8
    for name in names:
        assert re.search(rf"^(?:cudaError_t|int64_t)\s+{name}\(", body, re.M), name


# --------------------------------------------------------------------------------------
# CLI: `llmkit build-ext`, `llmkit info`
# --------------------------------------------------------------------------------------


def test_cli_build_ext_reports_what_it_built(ext, capsys):
    from llmkit.cli import main

    rc = main(["build-ext", "--cpu-only", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "cpu kernels: yes" in out.out and "cuda kernels:" in out.out


def test_cli_build_ext_cuda_refused_on_cpu_torch(ext, capsys):
    import torch as _torch

    if _torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    from llmkit.cli import main

    rc = main(["build-ext", "--cuda"])
    err = capsys.readouterr().err
    assert rc == 1 and "CPU-only build" in err


def test_cli_info_shows_the_extension(ext):
    from llmkit.info import format_info

    text = format_info()
    block = text[text.index("cuda_ext") :]
    assert "cpu   available" in block and "cpu kernels: yes" in block and "cuda kernels:" in block
