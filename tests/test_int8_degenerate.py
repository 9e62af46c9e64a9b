"""Int8 ops with degenerate operands on the CPU path: ``in_features == 1`` weights, stride-0
(expanded) operands, one-row / one-column products. ``torch._int_mm`` misreads such layouts
(its output is left unwritten and differs between runs); the ops must be exact anyway.

Every int32 product is compared bit-exactly with reference64's int64 product; the float
outputs of int8_linear with the float64 formulas by the tolerance rule of llmkit.testing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmkit
from llmkit import reference64 as R
from llmkit.ops import int8_linear, int8_matmul, quantize_int8
from llmkit.testing import assert_close_to_reference


def _i8(*shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def _b_layouts(k: int, n: int) -> dict[str, torch.Tensor]:
    return {
        "expanded row (stride 0)": _i8(1, n).expand(k, n),
        "expanded column (stride 0)": _i8(k, 1).expand(k, n),
        "single value expanded": _i8(1, 1).expand(k, n),
        "(N, 1) weight transposed": _i8(n, k).t(),
        "contiguous": _i8(k, n),
    }


@pytest.mark.parametrize("m,k,n", [(5, 1, 64), (1, 1, 9), (6, 8, 5), (33, 3, 17), (4, 64, 1)])
@pytest.mark.parametrize("a_kind", ["contiguous", "expanded"])
def test_int8_matmul_exact_with_degenerate_operands(m, k, n, a_kind):
    a = _i8(m, k) if a_kind == "contiguous" else _i8(1, k).expand(m, k)
    for name, b in _b_layouts(k, n).items():
        want = R.int8_matmul(a, b)
        for _ in range(2):  # unwritten output memory changes between calls
            with llmkit.use_backend("reference"):
                got = int8_matmul(a, b)
            assert got.dtype == torch.int32 and torch.equal(got.long(), want), name


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n", [(1, 64), (7, 64), (16, 3), (40, 1)])
def test_int8_linear_with_one_input_feature(mode, dtype, m, n):
    """K == 1: the (N, 1) weight seen as (1, N) has strides (1, 1)."""
    x = torch.randn(m, 1).to(dtype)
    weight, weight_scale = quantize_int8(torch.randn(n, 1), -1)
    bias = torch.randn(n)
    want = R.int8_linear(x, weight, weight_scale, bias, mode, "none")
    baseline = torch.nn.functional.linear(x, (weight.float() * weight_scale[:, None]).to(dtype), bias.to(dtype))
    for _ in range(2):
        with llmkit.use_backend("reference"):
            got = int8_linear(x, weight, weight_scale, bias, mode)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert_close_to_reference(got, want, baseline, f"{mode} K=1")


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_quantized_model_with_a_one_feature_input_stays_close(mode):
    """The reported repro: Linear(1, 64) first; quantized, the model must track the float one."""
    model = nn.Sequential(nn.Linear(1, 64), nn.GELU(), nn.Linear(64, 64), nn.Linear(64, 1))
    x = torch.randn(32, 1)
    with torch.no_grad():
        want = model.double()(x.double())
        # the magnitude the last dot products sum before they cancel: int8 errors scale with it,
        # not with the (random, possibly tiny) output
        h = model[:3](x.double())
        scale = (h.abs() @ model[3].weight.abs().T + model[3].bias.abs()).max().item()
        model.float()
        llmkit.quantize(model, mode, keep_head=False)
        got = [model(x) for _ in range(2)]
    for out in got:
        # int8 weights (and w8a8 activations): errors of a few 1/127 of the magnitudes, not 470
        assert (out.double() - want).abs().max().item() <= 0.02 * scale
    assert torch.equal(got[0], got[1])


def test_cuda_ext_declines_rows_past_the_cuda_grid():
    """The CUDA int8 GEMM puts row blocks of 64 on grid axis y (at most 65,535): a call with more
    rows is declined with the reason (the next backend takes it), never launched."""
    from llmkit.backends.cuda_ext import int8_matmul as X
    from llmkit.ops.int8_matmul import Int8LinearCall, Int8MatmulCall

    k = 16
    b = torch.zeros(k, 8, dtype=torch.int8)
    fits = torch.zeros(1, k, dtype=torch.int8).expand(65_535 * 64, k)  # no real memory
    too_many = torch.zeros(1, k, dtype=torch.int8).expand(65_535 * 64 + 1, k)
    assert list(X.grid_reasons(65_535 * 64)) == []
    impl = X.int8_matmul_forward.impls["cuda_ext"]
    assert list(impl.why_not(Int8MatmulCall(fits, b, None, None, None, None))) == []
    reasons = list(impl.why_not(Int8MatmulCall(too_many, b, None, None, None, None)))
    assert reasons and "grid axis y" in reasons[0] and "65535" in reasons[0].replace(",", "")
    w = torch.zeros(8, k, dtype=torch.int8)
    x = torch.zeros(1, 1, k).expand(2, 65_535 * 32 + 1, k)
    linear = X.int8_linear_forward.impls["cuda_ext"]
    assert any("grid axis y" in r for r in linear.why_not(Int8LinearCall(x, w, torch.ones(8), None, "w8a8", "none")))
