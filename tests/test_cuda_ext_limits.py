"""The C++/CUDA extension at its limits: the launch regimes of the CUDA kernels (the host
arithmetic on this CPU; every regime boundary on a GPU), row statistics that float32
sums get wrong (constant rows, rows whose squares leave float32's range) on the CPU and
CUDA kernels, and the precision of the CUDA attention backward where |O| >> |dO|.

Every result is compared with :mod:`llmkit.reference64` by the rule of
:func:`llmkit.testing.assert_close_to_reference`; int8 results bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit import reference64 as R
from llmkit.testing import assert_close_to_reference
from test_cuda_ext import DEVICES, _attention_vs_reference, _leaf, _need_cuda_kernels

try:  # the session fixture `ext`, where test_cuda_ext.py defines it rather than conftest.py
    from test_cuda_ext import ext  # noqa: F401
except ImportError:
    pass

HAS_GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DEFAULT_SMEM = 48 * 1024
STATIC_SMEM = 32 * 4  # the norm forward kernel's reduction scratch
SMEM_OPTIN = {"sm_90": 232448, "sm_80": 166912, "sm_86": 101376}  # cudaDevAttrMaxSharedMemoryPerBlockOptin


def _plan(cols: int, elem_bytes: int, vec: bool, optin: int) -> dict[str, int]:
    threads, v, cache, smem, opt_in = torch.ops.llmkit_ext.norm_forward_plan(cols, elem_bytes, vec, optin)
    return {"threads": threads, "vec": v, "cache": bool(cache), "smem": smem, "opt_in": bool(opt_in)}


def _threads_oracle(cols: int, vec: int) -> int:
    want = -(-cols // vec)
    t = 32
    while t < want and t < 1024:
        t *= 2
    return 128 if t < 128 and cols > 256 else t


# --------------------------------------------------------------------------------------
# launch regimes computed on the host (no GPU needed)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(SMEM_OPTIN))
@pytest.mark.parametrize("elem_bytes", [4, 2])
def test_norm_forward_caches_a_row_only_where_the_device_allows(ext, arch, elem_bytes):
    """Rows stay in shared memory while they fit beside the static scratch: in 48 KiB with
    no opt-in (12,256 floats; 12,257 to 12,288 once asked for 48 KiB of dynamic memory on
    top of the scratch and failed to launch), up to the device's opt-in limit with it."""
    optin = SMEM_OPTIN[arch]
    largest = (optin - STATIC_SMEM) // 4
    for cols in (1, 12255, 12256, 12257, 12288, largest - 1, largest, largest + 1, 65536, 262144):
        for vec in (True, False):
            p = _plan(cols, elem_bytes, vec, optin)
            assert p["cache"] == (cols <= largest), (cols, p)
            assert p["smem"] == (4 * cols if p["cache"] else 0)
            assert p["opt_in"] == (p["cache"] and 4 * cols + STATIC_SMEM > DEFAULT_SMEM), (cols, p)
            assert p["smem"] + STATIC_SMEM <= optin
            assert p["vec"] == (16 // elem_bytes if vec else 1)
            assert p["threads"] == _threads_oracle(cols, p["vec"])
    # a device of unknown (or only the default) limit: never past 48 KiB in all
    for cols in (12256, 12257, 12288, 20000):
        p = _plan(cols, elem_bytes, True, 0)
        assert p["cache"] == (cols <= 12256) and not p["opt_in"]
        assert p["smem"] + STATIC_SMEM <= DEFAULT_SMEM


def test_norm_forward_threads_at_their_switch_points(ext):
    for elem_bytes, vec in ((4, True), (2, True), (4, False)):
        v = 16 // elem_bytes if vec else 1
        for t in (32, 64, 128, 256, 512, 1024):
            for cols in (t * v - 1, t * v, t * v + 1):
                assert _plan(cols, elem_bytes, vec, 0)["threads"] == _threads_oracle(cols, v), (cols, v)
    assert _plan(256, 4, False, 0)["threads"] == 256 and _plan(257, 4, True, 0)["threads"] == 128
    assert _plan(10**6, 2, True, 0)["threads"] == 1024


def test_norm_forward_plan_refuses_bad_arguments(ext):
    with pytest.raises(RuntimeError, match="elem_bytes must be 2 or 4, got 8"):
        torch.ops.llmkit_ext.norm_forward_plan(16, 8, True, 0)
    with pytest.raises(RuntimeError, match="cols must be >= 0, got -1"):
        torch.ops.llmkit_ext.norm_forward_plan(-1, 4, True, 0)


# --------------------------------------------------------------------------------------
# row statistics (CPU and CUDA kernels)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_a_constant_row_normalizes_to_exactly_zero(ext, device, dtype, eps):
    """Constant rows have variance 0: the output is the bias, exactly (a plain float32 sum
    of 768 x 10000.37 rounds, and its deviations normalize to +-0.68, or +-1 at eps 1e-12)."""
    _need_cuda_kernels(device)
    n = 768
    c = 10000.37 if dtype != torch.float16 else 1000.37
    x = torch.full((5, n), c, device=device).to(dtype)
    x[2] = torch.randn(n, device=device).to(dtype)  # an ordinary row among them
    b = torch.randn(n, device=device).to(dtype)
    w = (torch.rand(n, device=device) + 0.5).to(dtype)
    const = [0, 1, 3, 4]
    with llmkit.use_backend("cuda_ext"):
        out, mean, _ = torch.ops.llmkit.layer_norm(x, [n], w, b, eps)
        fused, s = llmkit.ops.add_layer_norm(x - 1, torch.ones_like(x), n, w, b, eps)
    assert torch.equal(out[const], b.expand(4, n)) and torch.equal(mean[const], x[const, 0].float())
    assert torch.equal(s, ((x - 1).float() + 1).to(dtype))
    same = (s[const] == s[const, :1]).all(-1)  # x - 1 + 1 may round unevenly in a 16-bit type
    assert torch.equal(fused[const][same], b.expand(4, n)[same])
    ref = R.layer_norm(x[2:3].double(), [n], w.double(), b.double(), eps)
    assert_close_to_reference(out[2:3], ref, F.layer_norm(x[2:3], [n], w, b, eps), "the ordinary row")


def _scaled(t: torch.Tensor, k: int) -> torch.Tensor:
    return (t.double() * 2.0**k).to(t.dtype)  # exact: a power of two, no overflow or underflow here


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale, eps", [(1e20, 1e-5), (1e30, 1e-5), (3e37, 1e-5), (1e-20, 0.0), (1e-36, 0.0)])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm"])
def test_rows_whose_squares_leave_float32s_range_match_float64(ext, device, dtype, scale, eps, op):
    """|x| above ~1.8e19 (squares overflow float32: the output was 0 instead of +-1) and
    below ~1e-19 with eps = 0 (squares underflow). The baseline is PyTorch on the same
    rows scaled by 2^k into range (a norm is scale-invariant: out(x, eps) = out(x 2^k,
    eps 4^k), dx = 2^k dx'), forward and backward."""
    _need_cuda_kernels(device)
    n = 300
    k = -round(math.log2(scale))
    x = (torch.randn(4, n, device=device) * scale).to(dtype)
    r = (torch.randn(4, n, device=device) * scale).to(dtype)
    g = torch.randn(4, n, device=device).to(dtype)
    w = (torch.rand(n, device=device) + 0.5).to(dtype)
    eps_k = eps * 4.0**k

    def ours(xs, rs):
        if op == "layer_norm":
            return torch.ops.llmkit.layer_norm(xs, [n], w, None, eps)[0]
        if op == "rms_norm":
            return torch.ops.llmkit.rms_norm(xs, [n], w, eps)[0]
        return llmkit.ops.add_layer_norm(xs, rs, n, w, None, eps)[0]

    def torch_scaled(xs, rs):  # PyTorch on the rows brought into range
        if op == "layer_norm":
            return F.layer_norm(xs, [n], w, None, eps_k)
        if op == "rms_norm":
            return F.rms_norm(xs, [n], w, eps_k)
        return F.layer_norm(xs + rs, [n], w, None, eps_k)

    def ref64(xs, rs):
        if op == "layer_norm":
            return R.layer_norm(xs, [n], w.double(), None, eps)
        if op == "rms_norm":
            return R.rms_norm(xs, [n], w.double(), eps)
        return R.add_layer_norm(xs, rs, [n], w.double(), None, eps, round_to=dtype)[0]

    xs, rs = _leaf(x), _leaf(r)
    with llmkit.use_backend("cuda_ext"):
        out = ours(xs, rs)
        out.backward(g)
    xb, rb = _leaf(_scaled(x, k)), _leaf(_scaled(r, k))
    base = torch_scaled(xb, rb)
    base.backward(g)
    x64, r64 = _leaf(x.double()), _leaf(r.double())
    ref = ref64(x64, r64)
    ref.backward(g.double())
    assert_close_to_reference(out, ref, base, f"{op} out")
    # dx in the units of the scaled rows (dx 2^-k, exact), where the dtype's floor means what it says
    assert_close_to_reference(_scaled(xs.grad, -k), x64.grad * 2.0**-k, xb.grad, f"{op} dx")


# --------------------------------------------------------------------------------------
# every size regime of the CUDA kernels, on a GPU
# --------------------------------------------------------------------------------------


def _optin() -> int:
    props = torch.cuda.get_device_properties(0)
    v = getattr(props, "shared_memory_per_block_optin", None)
    if v:
        return int(v)
    major, minor = torch.cuda.get_device_capability(0)
    return SMEM_OPTIN.get(f"sm_{major}{minor}", DEFAULT_SMEM)


def _norm_boundaries(elem_bytes: int) -> list[int]:
    """Row lengths at every switch of the norm kernels: vector width, threads per block,
    the shared-memory row cache (without and with opt-in), and 12,288 / 65,536 / 262,144."""
    v = 16 // elem_bytes
    cols = {1, v - 1, v, v + 1, 256, 257, 12255, 12256, 12257, 12288, 65536, 262144}
    for t in (32, 64, 128, 256, 512, 1024):
        cols |= {t * v, t * v + 1}
    if HAS_GPU:
        largest = (_optin() - STATIC_SMEM) // 4
        cols |= {largest, largest + 1}
    return sorted(cols)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_at_every_regime_boundary_gpu(ext, dtype):
    _need_cuda_kernels("cuda")
    eb = torch.finfo(dtype).bits // 8
    for n in _norm_boundaries(eb):
        p = _plan(n, eb, n % (16 // eb) == 0, _optin())
        x = (torch.randn(3, n, device="cuda") * 2 + 1).to(dtype)
        r = torch.randn(3, n, device="cuda").to(dtype)
        w = (torch.rand(n, device="cuda") + 0.5).to(dtype)
        b = torch.randn(n, device="cuda").to(dtype)
        g = torch.randn(3, n, device="cuda").to(dtype)
        xs, rs, ws, bs = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
        with llmkit.use_backend("cuda_ext"):
            out, s = llmkit.ops.add_layer_norm(xs, rs, n, ws, bs, 1e-5)
            out.backward(g)
            rms, _ = torch.ops.llmkit.rms_norm(x, [n], w, 1e-6)
        torch.cuda.synchronize()
        x64, r64, w64, b64 = (_leaf(t.double()) for t in (x, r, w, b))
        ref, _ = R.add_layer_norm(x64, r64, [n], w64, b64, 1e-5, round_to=dtype)
        ref.backward(g.double())
        xt, rt, wt, bt = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
        base = F.layer_norm(xt + rt, [n], wt, bt, 1e-5)
        base.backward(g)
        what = f"n={n} {p}"
        assert_close_to_reference(out, ref, base, f"add_layer_norm out, {what}")
        assert_close_to_reference(xs.grad, x64.grad, xt.grad, f"d input, {what}")
        assert_close_to_reference(ws.grad, w64.grad, wt.grad, f"d weight, {what}")
        assert_close_to_reference(bs.grad, b64.grad, bt.grad, f"d bias, {what}")
        assert_close_to_reference(
            rms, R.rms_norm(x.double(), [n], w.double(), 1e-6), F.rms_norm(x, [n], w, 1e-6), f"rms_norm out, {what}"
        )


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_at_its_vector_and_grid_limits_gpu(ext, dtype):
    """Elementwise kernels: 16-byte vectors or single elements, and a grid capped at 65,535
    blocks of 256 threads (a grid-stride loop past it)."""
    _need_cuda_kernels("cuda")
    v = 16 // (torch.finfo(dtype).bits // 8)
    cap = 65535 * 256
    for n in (1, v - 1, v, v + 1, 12288, 65536, 262144, cap + 1, cap * v + v):
        x = (torch.randn(n, device="cuda") * 3).to(dtype)
        with llmkit.use_backend("cuda_ext"):
            out = llmkit.ops.gelu(x)
        assert_close_to_reference(out, R.gelu(x.double()), F.gelu(x), f"gelu n={n}")
        del x, out
    for rows, cols in ((3, v), (2, 12288), (2, 65536 + v), (1, 262144)):
        x = torch.randn(rows, cols, device="cuda").to(dtype)
        b = torch.randn(cols, device="cuda").to(dtype)
        g = torch.randn(rows, cols, device="cuda").to(dtype)
        xs, bs = _leaf(x), _leaf(b)
        with llmkit.use_backend("cuda_ext"):
            out = llmkit.ops.bias_gelu(xs, bs)
            out.backward(g)
        x64, b64 = _leaf(x.double()), _leaf(b.double())
        ref = R.bias_gelu(x64, b64)
        ref.backward(g.double())
        xt, bt = _leaf(x), _leaf(b)
        base = F.gelu(xt + bt)
        base.backward(g)
        assert_close_to_reference(out, ref, base, f"bias_gelu {rows}x{cols}")
        assert_close_to_reference(bs.grad, b64.grad, bt.grad, f"dbias {rows}x{cols}")


@gpu_only
def test_quantize_rows_at_every_block_size_gpu(ext):
    _need_cuda_kernels("cuda")
    for cols in (1, 31, 32, 33, 1023, 1024, 1025, 12288, 65536, 262144):
        x = (torch.randn(3, cols, device="cuda") * 4).to(torch.bfloat16)
        with llmkit.use_backend("cuda_ext"):
            q, scale = llmkit.ops.quantize_int8(x)
        q64, s64 = R.quantize_int8(x.cpu())
        assert torch.equal(q.cpu(), q64) and torch.equal(scale.cpu(), s64), cols


@gpu_only
@pytest.mark.parametrize("m, n, k", [(1, 64, 16), (63, 65, 31), (64, 64, 32), (65, 63, 33), (130, 129, 4096)])
def test_int8_matmul_at_tile_edges_gpu(ext, m, n, k):
    """64 x 64 x 32 tiles: one short of a tile, exactly one, one past; B as (k, n) and as a
    transposed (n, k) weight; A rows that are not 16-byte aligned (no vector loads)."""
    _need_cuda_kernels("cuda")
    wide = torch.randint(-127, 128, (m, k + 5), device="cuda", dtype=torch.int8)
    for a in (wide[:, :k].contiguous(), wide[:, 1 : k + 1]):
        for b in (
            torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8),
            torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8).t(),
        ):
            with llmkit.use_backend("cuda_ext"):
                acc = llmkit.ops.int8_matmul(a, b)
            assert torch.equal(acc.cpu().to(torch.int64), R.int8_matmul(a.cpu(), b.cpu())), (a.stride(), b.stride())


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "d, sq, sk", [(16, 1, 1), (32, 63, 64), (33, 64, 65), (64, 65, 63), (65, 129, 128), (96, 64, 200), (128, 130, 129)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_at_head_dim_and_block_edges_gpu(ext, dtype, d, sq, sk, causal):
    """Head dims padded to 32 / 64 / 128 (one past each switch), query and key blocks of 64."""
    _need_cuda_kernels("cuda")
    q = torch.randn(2, 4, sq, d, device="cuda").to(dtype)
    k = torch.randn(2, 2, sk, d, device="cuda").to(dtype)
    v = torch.randn(2, 2, sk, d, device="cuda").to(dtype)
    g = torch.randn(2, 4, sq, d, device="cuda").to(dtype)
    _attention_vs_reference(q, k, v, g, None, causal, 1 / math.sqrt(d), True)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_backward_where_the_output_dwarfs_its_gradient_gpu(ext, dtype):
    """v = 100 + 0.1 randn: delta = rowsum(dO O) computed from the rounded O carried its
    rounding into every dS (dQ error 0.039 in float16, 0.14 in bfloat16, at |dQ| ~0.1).
    The baseline is float32 math on the same inputs, rounded once: delta from a float32
    output."""
    _need_cuda_kernels("cuda")
    q = torch.randn(1, 2, 64, 64, device="cuda").to(dtype)
    k = torch.randn(1, 2, 64, 64, device="cuda").to(dtype)
    v = (100 + 0.1 * torch.randn(1, 2, 64, 64, device="cuda")).to(dtype)
    g = torch.randn(1, 2, 64, 64, device="cuda").to(dtype)
    qs, ks, vs = _leaf(q), _leaf(k), _leaf(v)
    with llmkit.use_backend("cuda_ext"):
        out, _ = torch.ops.llmkit.scaled_dot_product_attention(qs, ks, vs, None, 0.0, False, 0.125, False, 0, 0)
        out.backward(g)
    q64, k64, v64 = _leaf(q.double()), _leaf(k.double()), _leaf(v.double())
    R.attention(q64, k64, v64, None, False, 0.125).backward(g.double())
    q32, k32, v32 = _leaf(q.float()), _leaf(k.float()), _leaf(v.float())
    R.attention(q32, k32, v32, None, False, 0.125).backward(g.float())
    for name, ours, r64, b32 in (("dq", qs, q64, q32), ("dk", ks, k64, k32), ("dv", vs, v64, v32)):
        assert_close_to_reference(ours.grad, r64.grad, b32.grad.to(dtype), name)
