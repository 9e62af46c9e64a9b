"""Int8 ops: quantize_int8, int8_matmul, int8_linear on the triton kernels and the CPU path.

The Triton kernels run through the interpreter (TRITON_INTERPRET=1, CPU tensors) or, on
a GPU machine with LLMKIT_TEST_GPU=1, for real. Checks:

* quantization bit-exact against the reference backend (and reference64 on finite rows);
* the GEMM's int32 result bit-exact against reference64's int64 product;
* everything after the GEMM (scales, bias, GELU, casts) by the DESIGN rule against
  float64 formulas, with PyTorch's own computation in the output dtype as the baseline;
* odd M / N / K, strided operands, zero / NaN / inf rows, every output dtype, empty
  tensors, explicit small tiles that cover multi-tile, split-K and ragged-K code paths;
* bad inputs: clear errors before any kernel runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit import reference64 as R
from llmkit.backends.reference.int8_matmul import W8A16_CPU_TERMS, w8a16_cpu
from llmkit.dispatch import triton_interpreting
from llmkit.errors import BackendError
from llmkit.kernels import int8_matmul as K
from llmkit.kernels import quantize_int8 as KQ
from llmkit.ops import int8_linear, int8_matmul, quantize_int8
from llmkit.ops.int8_matmul import MAX_K
from llmkit.testing import assert_close_to_reference, poison_

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
FLOATS = [torch.float16, torch.bfloat16, torch.float32]
ACTIVATIONS = ["none", "gelu", "gelu_tanh"]

# Under the interpreter numpy warns about NaN * 0 (NaN rows) and exp overflowing to inf
# (the tanh-GELU of large negative values); the kernels mean both.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered", "ignore:overflow encountered", "ignore:divide by zero encountered"
)


def _randn(*shape, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """Gaussian data whose rows have scales spread over three orders of magnitude."""
    x = torch.randn(*shape, dtype=torch.float64)
    if len(shape) >= 2:
        x = x * torch.exp(torch.randn(*shape[:-1], 1, dtype=torch.float64) * 2)
    return x.to(dtype).to(device)


def _randint8(*shape, device=DEVICE) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8).to(device)


def _triton(fn, *args, **kwargs):
    with llmkit.use_backend("triton"):
        return fn(*args, **kwargs)


def _reference(fn, *args, **kwargs):
    with llmkit.use_backend("reference"):
        return fn(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)


def _assert_same_quantization(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _triton(quantize_int8, x, dim)
    q_ref, s_ref = _reference(quantize_int8, x, dim)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q.cpu(), q_ref), f"q differs in {(q.cpu() != q_ref).sum()} places"
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)
    return q_ref, s_ref


# --------------------------------------------------------------------------------------
# quantize_int8
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "shape,dim",
    [((1, 1), -1), ((7, 33), -1), ((33, 1023), 1), ((5, 7, 19), 1), ((19, 6), 0), ((3, 1500), -1), ((300, 16), -1)],
)
def test_quantize_bit_exact(dtype, shape, dim):
    x = _randn(*shape, dtype=dtype)
    q, s = _assert_same_quantization(x, dim)
    q64, s64 = R.quantize_int8(x.cpu(), dim)  # the independent yardstick (finite rows)
    assert torch.equal(q, q64)
    assert torch.equal(s, s64)
    # x ~= q * scale to within half a step
    err = (x.cpu().float() - q.float() * s.unsqueeze(dim)).abs()
    assert bool((err <= s.unsqueeze(dim) * 0.5001 + 1e-30).all())


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_special_rows(dtype):
    k = 37
    x = _randn(12, k, dtype=torch.float32, device="cpu")
    x[0] = 0.0
    x[1] = -0.0
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    x[4, 1] = -float("inf")
    x[5, 3], x[5, 9] = float("nan"), float("inf")
    x[6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 3.5] + [0.25] * (k - 8))  # ties: half to even
    x[7] = x[7] * 1e-4
    x[8] = 65504.0 if dtype == torch.float16 else 3.0e38
    x = x.to(dtype).to(DEVICE)
    q, s = _assert_same_quantization(x, -1)
    assert torch.equal(s[:2], torch.zeros(2)) and not bool(torch.signbit(s[:2]).any())
    assert not bool(q[:6].any()), "zero / NaN / inf rows must quantize to zeros"
    assert bool(s[2].isnan()) and bool(s[5].isnan())
    assert s[3] == float("inf") and s[4] == float("inf")
    assert q[6, :8].tolist() == [127, 0, 2, 2, 0, -2, 126, 4]
    assert q[8].eq(127).all()


@pytest.mark.parametrize("case", ["sliced", "transposed", "dim0_of_3d", "two_pass", "many_rows_per_program"])
def test_quantize_strided_and_long_rows(case):
    if case == "sliced":
        x, dim = _randn(9, 80)[:, 3::2], -1
    elif case == "transposed":
        x, dim = _randn(40, 23).t(), -1
    elif case == "dim0_of_3d":
        x, dim = _randn(17, 3, 5).permute(2, 0, 1), 1
    elif case == "two_pass":  # rows longer than one register-resident block
        x, dim = _randn(2, KQ.MAX_SINGLE_PASS_COLS + 3), -1
    else:
        x, dim = _randn(130, 9, dtype=torch.bfloat16), -1
    _assert_same_quantization(x, dim)


def test_quantize_kernel_writes_every_output():
    x = _randn(21, 45, dtype=torch.float16)
    q = poison_(torch.empty(21, 45, dtype=torch.int8, device=DEVICE))
    s = poison_(torch.empty(21, dtype=torch.float32, device=DEVICE))
    KQ.quantize_rows(x, 1, q, s)
    q_ref, s_ref = _reference(quantize_int8, x, -1)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)])
def test_quantize_empty(shape):
    x = torch.randn(shape, device=DEVICE)
    q, s = _triton(quantize_int8, x, -1)
    assert q.shape == x.shape and q.dtype == torch.int8
    assert list(s.shape) == list(shape[:-1]) and not bool(s.any())


def test_quantize_triton_refuses_float64_by_name_and_default_falls_back():
    x = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(BackendError, match="float64"):
        _triton(quantize_int8, x)
    q, s = quantize_int8(x)  # default order: the reference takes it
    assert torch.equal(q.cpu(), R.quantize_int8(x.cpu())[0])


# --------------------------------------------------------------------------------------
# int8_matmul: exact int32 GEMM
# --------------------------------------------------------------------------------------


def _b(k: int, n: int, layout: str) -> torch.Tensor:
    if layout == "k_major":  # the (N, K) nn.Linear weight viewed as (K, N)
        return _randint8(n, k).t()
    if layout == "n_major":
        return _randint8(k, n)
    return _randint8(k + 3, 2 * n + 1)[2 : k + 2, 1 : 2 * n + 1 : 2]  # strided both ways


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 33, 7), (7, 1023, 33), (33, 64, 1), (70, 100, 48), (65, 160, 129)])
@pytest.mark.parametrize("layout", ["k_major", "n_major", "strided"])
def test_int8_matmul_exact(m, k, n, layout):
    a = _randint8(m, k)
    b = _b(k, n, layout)
    ref = R.int8_matmul(a.cpu(), b.cpu())
    out = _triton(int8_matmul, a, b)
    assert out.dtype == torch.int32 and torch.equal(out.cpu().long(), ref)
    assert torch.equal(_reference(int8_matmul, a, b).long(), ref)


def test_int8_matmul_exact_at_the_largest_k():
    # every product 128 * 128 at K = MAX_K: the largest sum int32 holds without overflow
    a = torch.full((2, MAX_K), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((MAX_K, 3), -128, dtype=torch.int8, device=DEVICE)
    want = torch.full((2, 3), 128 * 128 * MAX_K, dtype=torch.int64)
    out = K.int8_gemm(a, b, None, None, None, None, config=K.GemmConfig(16, 16, 8192, 1, 4, 1))
    assert torch.equal(out.cpu().long(), want)
    assert torch.equal(_reference(int8_matmul, a, b).long(), want)


@pytest.mark.parametrize("layout", ["k_major", "n_major", "strided"])
def test_int8_gemm_small_tiles_cover_every_path(layout):
    """Many tiles, GROUP_M swizzle, K not a multiple of BLOCK_K; every output written."""
    m, k, n = 37, 100, 45
    a = _randint8(m, k)
    b = _b(k, n, layout)
    out = poison_(torch.empty(m, n, dtype=torch.int32, device=DEVICE))
    K.int8_gemm(a, b, None, None, None, None, config=K.GemmConfig(16, 16, 32, 2, 4, 1), out=out)
    assert torch.equal(out.cpu().long(), R.int8_matmul(a.cpu(), b.cpu()))


def test_int8_matmul_leading_dims_and_empty():
    a = _randint8(2, 3, 20)
    b = _randint8(20, 9)
    out = _triton(int8_matmul, a, b)
    assert out.shape == (2, 3, 9) and torch.equal(out.cpu().long(), R.int8_matmul(a.cpu(), b.cpu()))
    for m, k, n in [(0, 5, 4), (3, 0, 4), (3, 5, 0)]:
        a, b = _randint8(m, k), _randint8(k, n)
        assert torch.equal(_triton(int8_matmul, a, b).cpu(), torch.zeros(m, n, dtype=torch.int32))
        bias = torch.randn(n, device=DEVICE)
        scaled = _triton(int8_matmul, a, b, torch.rand(m, device=DEVICE), torch.rand(n, device=DEVICE), bias)
        assert torch.equal(scaled.cpu(), bias.cpu().expand(m, n))


# --------------------------------------------------------------------------------------
# int8_matmul: fused epilogue
# --------------------------------------------------------------------------------------


def _epilogue64(acc: torch.Tensor, a_scale, b_scale, bias, activation="none") -> torch.Tensor:
    y = acc.double() * a_scale.double().reshape(-1, 1) * b_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y if activation == "none" else R.gelu(y, "tanh" if activation == "gelu_tanh" else "none")


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scales", ["per_row_col", "scalar"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, "out"])
def test_int8_matmul_epilogue(out_dtype, scales, bias_dtype):
    m, k, n = 23, 70, 45
    a = _randint8(m, k)
    b = _b(k, n, "k_major")
    if scales == "scalar":
        a_scale, b_scale = torch.rand((), device=DEVICE) / 100, torch.rand(1, device=DEVICE) / 100
    else:
        a_scale, b_scale = torch.rand(m, device=DEVICE) / 100, torch.rand(n, device=DEVICE) / 100
    bdt = (out_dtype or torch.float32) if bias_dtype == "out" else bias_dtype
    bias = None if bdt is None else torch.randn(n, device=DEVICE).to(bdt)
    out = _triton(int8_matmul, a, b, a_scale, b_scale, bias, out_dtype)
    assert out.dtype == (out_dtype or torch.float32)
    bias64 = None if bias is None else bias.cpu()
    ref64 = _epilogue64(R.int8_matmul(a.cpu(), b.cpu()), a_scale.cpu(), b_scale.cpu(), bias64)
    baseline = _reference(int8_matmul, a, b, a_scale, b_scale, bias, out_dtype)
    assert_close_to_reference(out.cpu(), ref64, baseline, "int8_matmul epilogue")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_int8_gemm_fused_activation(activation, out_dtype):
    m, k, n = 19, 64, 40
    a, b = _randint8(m, k), _b(k, n, "n_major")
    a_scale, b_scale = torch.rand(m, device=DEVICE) / 200, torch.rand(n, device=DEVICE) / 200
    bias = torch.randn(n, device=DEVICE)
    out = poison_(torch.empty(m, n, dtype=out_dtype, device=DEVICE))
    K.int8_gemm(a, b, a_scale, b_scale, bias, out_dtype, activation, K.GemmConfig(16, 16, 32, 2, 4, 1), out)
    ref64 = _epilogue64(R.int8_matmul(a.cpu(), b.cpu()), a_scale.cpu(), b_scale.cpu(), bias.cpu(), activation)
    base = R.int8_matmul(a.cpu(), b.cpu()).float() * a_scale.cpu()[:, None] * b_scale.cpu()[None, :] + bias.cpu()
    base = base if activation == "none" else F.gelu(base, approximate="tanh" if activation == "gelu_tanh" else "none")
    assert_close_to_reference(out.cpu(), ref64, base.to(out_dtype), f"int8 epilogue {activation}")


# --------------------------------------------------------------------------------------
# int8_linear: W8A8 and W8A16 on the kernels and on the CPU path
# --------------------------------------------------------------------------------------


def _linear_case(m, k, n, dtype, bias_dtype=None, device=DEVICE):
    x = _randn(m, k, dtype=dtype, device=device)
    w_float = torch.randn(n, k, dtype=torch.float32) * torch.rand(n, 1)
    weight, weight_scale = R.quantize_int8(w_float)
    bias = torch.randn(n).to(bias_dtype or dtype)
    return x, weight.to(device), weight_scale.to(device), bias.to(device)


def _overflow_as(ref64, dtype):
    """``ref64`` with the values that round past ``dtype``'s range as the +-inf they round to
    (rows scaled over three orders of magnitude reach 8e4 in float16: inf is the right answer)."""
    r = ref64.to(dtype).to(torch.float64)
    return torch.where(torch.isinf(r) & torch.isfinite(ref64), r, ref64)


def _w8a8_ref64(x, weight, weight_scale, bias, activation):
    """The float64 value W8A8 approximates once the activations are quantized (bit-exactly),
    values past the input dtype's range as the inf they round to."""
    q, s = R.quantize_int8(x.cpu())
    ref = _epilogue64(R.int8_matmul(q, weight.cpu().t()), s, weight_scale.cpu(), bias.cpu(), activation)
    return _overflow_as(ref, x.dtype)


def _w8a16_baseline(x, weight, weight_scale, bias, activation):
    """PyTorch in the input dtype: F.linear with the dequantized weight, then the activation."""
    x = x.cpu()
    w = (weight.cpu().float() * weight_scale.cpu()[:, None]).to(x.dtype)
    y = F.linear(x, w, bias.cpu().to(x.dtype))
    return y if activation == "none" else F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 16, 17, 70])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_int8_linear_w8a8(dtype, m, activation):
    x, weight, weight_scale, bias = _linear_case(m, 100, 45, dtype)
    out = _triton(int8_linear, x, weight, weight_scale, bias, "w8a8", activation)
    ref_path = _reference(int8_linear, x, weight, weight_scale, bias, "w8a8", activation)
    ref64 = _w8a8_ref64(x, weight, weight_scale, bias, activation)
    assert out.dtype == dtype and out.shape == (m, 45)
    assert_close_to_reference(out.cpu(), ref64, ref_path, "w8a8 triton")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 70])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_int8_linear_w8a16(dtype, m, activation):
    x, weight, weight_scale, bias = _linear_case(m, 100, 45, dtype, bias_dtype=torch.float32)
    ref64 = _overflow_as(
        R.int8_linear(x.cpu(), weight.cpu(), weight_scale.cpu(), bias.cpu(), "w8a16", activation), dtype
    )
    baseline = _w8a16_baseline(x, weight, weight_scale, bias, activation)
    out = _triton(int8_linear, x, weight, weight_scale, bias, "w8a16", activation)
    assert out.dtype == dtype
    assert_close_to_reference(out.cpu(), ref64, baseline, "w8a16 triton")
    cpu = _reference(int8_linear, x, weight, weight_scale, bias, "w8a16", activation)
    assert_close_to_reference(cpu, ref64, baseline, "w8a16 CPU path")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "m,config",
    [(5, K.GemvConfig(16, 32, 3, 4, 1)), (16, K.GemvConfig(32, 64, 1, 4, 1)), (33, K.GemmConfig(16, 16, 32, 2, 4, 1))],
)
def test_w8a16_kernels_small_tiles(dtype, m, config):
    """Split-K GEMV with ragged K splits and the multi-tile GEMM; every output written."""
    k, n = 150, 37
    x, weight, weight_scale, bias = _linear_case(m, k, n, dtype, bias_dtype=torch.float32)
    x = _randn(m, 2 * k, dtype=dtype)[:, ::2]  # strided activations
    out = poison_(torch.empty(m, n, dtype=dtype, device=DEVICE))
    K.w8a16_linear(x, weight, weight_scale, bias, "gelu_tanh", config, out)
    ref64 = _overflow_as(
        R.int8_linear(x.cpu(), weight.cpu(), weight_scale.cpu(), bias.cpu(), "w8a16", "gelu_tanh"), dtype
    )
    assert_close_to_reference(out.cpu(), ref64, _w8a16_baseline(x, weight, weight_scale, bias, "gelu_tanh"))


def test_int8_linear_leading_dims_and_empty():
    x, weight, weight_scale, bias = _linear_case(6, 24, 10, torch.float32)
    x3 = x.reshape(2, 3, 24)
    for mode in ("w8a8", "w8a16"):
        out = _triton(int8_linear, x3, weight, weight_scale, bias, mode, "none")
        flat = _triton(int8_linear, x, weight, weight_scale, bias, mode, "none")
        assert out.shape == (2, 3, 10) and torch.equal(out.reshape(6, 10), flat)
        empty = _triton(int8_linear, x[:0], weight, weight_scale, bias, mode, "none")
        assert empty.shape == (0, 10)
        # K = 0: the bias alone, then the activation
        zk = _triton(int8_linear, x[:, :0], weight[:, :0], weight_scale, bias, mode, "gelu")
        zk_ref = _reference(int8_linear, x[:, :0], weight[:, :0], weight_scale, bias, mode, "gelu")
        want = F.gelu(bias.cpu().double()).expand(6, 10)
        base = F.gelu(bias.cpu()).expand(6, 10)  # PyTorch in float32: the tolerance's yardstick
        assert_close_to_reference(zk.cpu(), want, base, name=f"{mode} K = 0, triton")
        assert_close_to_reference(zk_ref, want, base, name=f"{mode} K = 0, reference")


# --------------------------------------------------------------------------------------
# the CPU W8A16 path: accuracy and non-finite rows
# --------------------------------------------------------------------------------------


def test_w8a16_cpu_non_finite_rows_match_the_float_product():
    x, weight, weight_scale, bias = _linear_case(6, 64, 20, torch.float32, device="cpu")
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    x[3] = x[3] * 1e30  # huge but finite: the int8 terms scale with the row
    out = w8a16_cpu(x, weight, weight_scale, bias, "none")
    ref = F.linear(x.double(), weight.double() * weight_scale.double()[:, None], bias.double())
    assert bool(out[2].isnan().all())
    assert torch.equal(out[1].isinf(), ref[1].isinf()) and torch.equal(out[1].isnan(), ref[1].isnan())
    assert bool(out[1].isinf().any()), "an inf input must give inf outputs where the float product does"
    finite = [0, 3, 4, 5]
    rel = (out[finite].double() - ref[finite]).abs().amax(dim=1) / ref[finite].abs().amax(dim=1)
    assert float(rel.max()) < 1e-6


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("outlier", [False, True])
def test_w8a16_cpu_terms_reach_the_exact_product(dtype, outlier):
    """The multi-term int8 split of the activations loses far less than the output dtype
    rounds (float16 / bfloat16: < 0.1 ulp relative; float32: < 2e-6 relative)."""
    x, weight, weight_scale, bias = _linear_case(9, 300, 50, dtype, device="cpu")
    if outlier:
        x[0, 7] = 100.0 * float(x[0].abs().max())  # an outlier channel
    exact = F.linear(x.double(), weight.double() * weight_scale.double()[:, None], bias.double())
    out = w8a16_cpu(x, weight, weight_scale, bias, "none")  # float32, before the output cast
    rel = float((out.double() - exact).norm() / exact.norm())
    bound = 2e-6 if dtype == torch.float32 else 0.1 * torch.finfo(dtype).eps
    assert rel < bound, f"relative error {rel:.3g} of the {W8A16_CPU_TERMS[dtype]}-term split"


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_int8_ops_reject_bad_input_before_any_kernel():
    a, b = _randint8(4, 8), _randint8(8, 5)
    with llmkit.use_backend("triton"):
        with pytest.raises(TypeError, match="a has dtype float32; it must be int8"):
            int8_matmul(a.float(), b)
        with pytest.raises(TypeError, match="b has dtype"):
            int8_matmul(a, b.float())
        with pytest.raises(ValueError, match="K mismatch"):
            int8_matmul(a, _randint8(7, 5))
        with pytest.raises(ValueError, match="a_scale has shape"):
            int8_matmul(a, b, torch.rand(3, device=DEVICE), torch.rand(5, device=DEVICE))
        with pytest.raises(ValueError, match="b_scale has shape"):
            int8_matmul(a, b, torch.rand(4, device=DEVICE), torch.rand(4, device=DEVICE))
        with pytest.raises(ValueError, match="give both"):
            int8_matmul(a, b, torch.rand(4, device=DEVICE))
        with pytest.raises(TypeError, match="a_scale has dtype"):
            int8_matmul(a, b, torch.rand(4, device=DEVICE).half(), torch.rand(5, device=DEVICE))
        with pytest.raises(ValueError, match="K = 131072 is too large"):
            int8_matmul(_randint8(1, MAX_K + 1), _randint8(MAX_K + 1, 1))
        x, weight, weight_scale, bias = _linear_case(3, 8, 5, torch.float32)
        with pytest.raises(ValueError, match="mode must be one of"):
            int8_linear(x, weight, weight_scale, bias, "w4a16")
        with pytest.raises(ValueError, match="activation must be one of"):
            int8_linear(x, weight, weight_scale, bias, "w8a8", "relu")
        with pytest.raises(TypeError, match="weight has dtype float32; it must be int8"):
            int8_linear(x, weight.float(), weight_scale, bias)
        with pytest.raises(ValueError, match="weight_scale has shape"):
            int8_linear(x, weight, weight_scale[:3], bias)
        with pytest.raises(ValueError, match="K mismatch"):
            int8_linear(x[:, :7], weight, weight_scale, bias)
        with pytest.raises(TypeError, match="input has dtype float64"):
            int8_linear(x.double(), weight, weight_scale, bias)


# --------------------------------------------------------------------------------------
# GPU only: the default (aligned, pipelined) configurations at realistic sizes
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (LLMKIT_TEST_GPU=1)")
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("k", [4096, 4095])
def test_int8_kernels_on_gpu_default_configs(m, k):
    n = 1024
    a, b = _randint8(m, k), _b(k, n, "k_major")
    assert torch.equal(_triton(int8_matmul, a, b).cpu().long(), R.int8_matmul(a.cpu(), b.cpu()))
    for dtype in (torch.bfloat16, torch.float16):
        x, weight, weight_scale, bias = _linear_case(m, k, n, dtype)
        _assert_same_quantization(x, -1)
        out = _triton(int8_linear, x, weight, weight_scale, bias, "w8a8", "gelu")
        assert_close_to_reference(
            out.cpu(),
            _w8a8_ref64(x, weight, weight_scale, bias, "gelu"),
            _reference(int8_linear, x, weight, weight_scale, bias, "w8a8", "gelu"),
        )
        out = _triton(int8_linear, x, weight, weight_scale, bias, "w8a16", "none")
        ref64 = R.int8_linear(x.cpu(), weight.cpu(), weight_scale.cpu(), bias.cpu(), "w8a16", "none")
        assert_close_to_reference(out.cpu(), ref64, _w8a16_baseline(x, weight, weight_scale, bias, "none"))
