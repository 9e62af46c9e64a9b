"""Bad input gets a clear error before anything launches; empty and NaN inputs behave.

Table-driven over every op: each case names the call, the exception type and words the
message must contain (the argument, what it got, what it needs).
"""

from __future__ import annotations

import pytest
import torch

from llmkit import ops, use_backend
from llmkit.dispatch import BACKENDS


def i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD = {
    "layer_norm int input": (
        lambda: ops.layer_norm(torch.ones(2, 3, dtype=torch.int32), [3]),
        TypeError,
        ["input", "int32", "float16"],
    ),
    "layer_norm wrong normalized_shape": (
        lambda: ops.layer_norm(r(2, 3), [4]),
        ValueError,
        ["normalized_shape [4]", "[2, 3]"],
    ),
    "layer_norm too many dims": (lambda: ops.layer_norm(r(3), [1, 3]), ValueError, ["normalized_shape"]),
    "layer_norm weight shape": (lambda: ops.layer_norm(r(2, 3), [3], r(4)), ValueError, ["weight", "[4]", "[3]"]),
    "layer_norm weight dtype": (
        lambda: ops.layer_norm(r(2, 3), [3], r(3, dtype=torch.float64)),
        TypeError,
        ["weight", "float64", "float32"],
    ),
    "layer_norm devices differ": (
        lambda: ops.layer_norm(r(2, 3), [3], r(3, device="meta")),
        ValueError,
        ["weight is on meta", "input is on cpu"],
    ),
    "layer_norm negative eps": (lambda: ops.layer_norm(r(2, 3), [3], eps=-1.0), ValueError, ["eps", "-1.0"]),
    "rms_norm bias-free weight shape": (lambda: ops.rms_norm(r(2, 3), [3], r(2)), ValueError, ["weight"]),
    "add_layer_norm residual shape": (
        lambda: ops.add_layer_norm(r(2, 3), r(3, 3), [3]),
        ValueError,
        ["residual", "[3, 3]", "[2, 3]"],
    ),
    "add_layer_norm residual dtype": (
        lambda: ops.add_layer_norm(r(2, 3), r(2, 3, dtype=torch.float16), [3]),
        TypeError,
        ["residual", "float16", "float32"],
    ),
    "gelu approximate": (lambda: ops.gelu(r(3), "erf"), ValueError, ["approximate", "'erf'", "'tanh'"]),
    "gelu int input": (lambda: ops.gelu(torch.ones(3, dtype=torch.int64)), TypeError, ["input", "int64"]),
    "bias_gelu bias shape": (lambda: ops.bias_gelu(r(2, 5), r(4)), ValueError, ["bias", "[4]", "[5]"]),
    "bias_gelu bias dtype": (
        lambda: ops.bias_gelu(r(2, 5, dtype=torch.bfloat16), r(5, dtype=torch.float16)),
        TypeError,
        ["bias", "float16", "bfloat16"],
    ),
    "sdpa head dims differ": (
        lambda: ops.scaled_dot_product_attention(r(1, 2, 3, 8), r(1, 2, 3, 16), r(1, 2, 3, 16)),
        ValueError,
        ["head dims", "8", "16"],
    ),
    "sdpa batch sizes differ": (
        lambda: ops.scaled_dot_product_attention(r(2, 2, 3, 8), r(1, 2, 3, 8), r(1, 2, 3, 8)),
        ValueError,
        ["batch sizes", "query 2", "key 1"],
    ),
    "sdpa heads without gqa": (
        lambda: ops.scaled_dot_product_attention(r(1, 4, 3, 8), r(1, 2, 3, 8), r(1, 2, 3, 8)),
        ValueError,
        ["4 heads", "enable_gqa"],
    ),
    "sdpa gqa not a multiple": (
        lambda: ops.scaled_dot_product_attention(r(1, 3, 3, 8), r(1, 2, 3, 8), r(1, 2, 3, 8), enable_gqa=True),
        ValueError,
        ["multiple", "(3)", "(2)"],
    ),
    "sdpa mask shape": (
        lambda: ops.scaled_dot_product_attention(
            r(1, 2, 3, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), torch.ones(3, 4, dtype=torch.bool)
        ),
        ValueError,
        ["attn_mask", "[3, 4]", "[1, 2, 3, 5]"],
    ),
    "sdpa mask dtype": (
        lambda: ops.scaled_dot_product_attention(
            r(1, 2, 3, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), torch.ones(3, 5, dtype=torch.int32)
        ),
        TypeError,
        ["attn_mask", "int32", "bool"],
    ),
    "sdpa dtypes differ": (
        lambda: ops.scaled_dot_product_attention(r(1, 2, 3, 8), r(1, 2, 3, 8, dtype=torch.float16), r(1, 2, 3, 8)),
        TypeError,
        ["key", "float16", "query"],
    ),
    "sdpa dropout": (
        lambda: ops.scaled_dot_product_attention(r(1, 2, 3, 8), r(1, 2, 3, 8), r(1, 2, 3, 8), dropout_p=1.0),
        ValueError,
        ["dropout_p", "[0, 1)"],
    ),
    "sdpa 2-d query": (
        lambda: ops.scaled_dot_product_attention(r(3, 8), r(3, 8), r(3, 8)),
        ValueError,
        ["query", "4 dimensions"],
    ),
    "decode lengths shape": (
        lambda: ops.decode_attention(r(2, 2, 1, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), torch.tensor([3], dtype=torch.int32)),
        ValueError,
        ["cache_seqlens", "[1]", "[2]"],
    ),
    "decode lengths dtype": (
        lambda: ops.decode_attention(r(2, 2, 1, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), torch.tensor([3.0, 4.0])),
        TypeError,
        ["cache_seqlens", "float32", "int32"],
    ),
    "decode lengths range": (
        lambda: ops.decode_attention(r(2, 2, 1, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), torch.tensor([3, 7])),
        ValueError,
        ["cache_seqlens", "[0, 6]", "7"],
    ),
    "quantize int input": (lambda: ops.quantize_int8(torch.ones(3, dtype=torch.int8)), TypeError, ["x", "int8"]),
    "quantize dim": (lambda: ops.quantize_int8(r(3, 4), dim=2), ValueError, ["dim 2", "[3, 4]"]),
    "int8_matmul float a": (lambda: ops.int8_matmul(r(2, 3), i8(3, 4)), TypeError, ["a", "float32", "int8"]),
    "int8_matmul K mismatch": (lambda: ops.int8_matmul(i8(2, 3), i8(5, 4)), ValueError, ["K mismatch", "3", "5"]),
    "int8_matmul one scale": (
        lambda: ops.int8_matmul(i8(2, 3), i8(3, 4), a_scale=torch.ones(2)),
        ValueError,
        ["a_scale and b_scale"],
    ),
    "int8_matmul scale shape": (
        lambda: ops.int8_matmul(i8(2, 3), i8(3, 4), torch.ones(3), torch.ones(4)),
        ValueError,
        ["a_scale", "[3]", "[2]"],
    ),
    "int8_matmul scale dtype": (
        lambda: ops.int8_matmul(i8(2, 3), i8(3, 4), torch.ones(2), torch.ones(4, dtype=torch.float16)),
        TypeError,
        ["b_scale", "float16", "float32"],
    ),
    "int8_linear K mismatch": (
        lambda: ops.int8_linear(r(2, 5), i8(4, 6), torch.ones(4)),
        ValueError,
        ["K mismatch", "5", "6"],
    ),
    "int8_linear float weight": (
        lambda: ops.int8_linear(r(2, 5), r(4, 5), torch.ones(4)),
        TypeError,
        ["weight", "float32", "int8"],
    ),
    "int8_linear scale shape": (
        lambda: ops.int8_linear(r(2, 5), i8(4, 5), torch.ones(5)),
        ValueError,
        ["weight_scale", "[5]", "[4]"],
    ),
    "int8_linear mode": (
        lambda: ops.int8_linear(r(2, 5), i8(4, 5), torch.ones(4), mode="w4a16"),
        ValueError,
        ["mode", "w8a8", "'w4a16'"],
    ),
    "int8_linear activation": (
        lambda: ops.int8_linear(r(2, 5), i8(4, 5), torch.ones(4), activation="relu"),
        ValueError,
        ["activation", "'relu'"],
    ),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_gets_a_clear_error(name, backend, monkeypatch):
    if BACKENDS[backend].unavailable_reason("cpu"):
        pytest.skip(f"{backend} unavailable: {BACKENDS[backend].unavailable_reason('cpu')}")
    call, exc_type, words = BAD[name]
    launched = []
    # no implementation of any backend may run on bad input
    from llmkit.dispatch import DispatchPoint

    original = DispatchPoint.__call__
    monkeypatch.setattr(
        DispatchPoint, "__call__", lambda self, *a, **k: launched.append(self.qualname) or original(self, *a, **k)
    )
    with use_backend(backend), pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} missing from {message!r}"
    assert launched == [], f"dispatch reached {launched} on bad input"


@pytest.mark.parametrize(
    "fn",
    [
        lambda: ops.layer_norm(r(0, 7), [7], r(7), r(7)),
        lambda: ops.rms_norm(r(2, 0, 5), [5]),
        lambda: ops.add_layer_norm(r(0, 3), r(0, 3), [3])[0],
        lambda: ops.gelu(r(0)),
        lambda: ops.bias_gelu(r(0, 4), r(4)),
        lambda: ops.scaled_dot_product_attention(r(0, 2, 3, 8), r(0, 2, 3, 8), r(0, 2, 3, 8)),
        lambda: ops.scaled_dot_product_attention(r(1, 2, 0, 8), r(1, 2, 3, 8), r(1, 2, 3, 8)),
        lambda: ops.quantize_int8(r(0, 5))[0],
        lambda: ops.int8_matmul(i8(0, 5), i8(5, 3)),
        lambda: ops.int8_linear(r(0, 5), i8(3, 5), torch.ones(3)),
    ],
)
def test_empty_inputs_give_empty_results(fn):
    out = fn()
    assert out.numel() == 0


def test_attention_with_no_keys_gives_zeros():
    out = ops.scaled_dot_product_attention(r(1, 2, 3, 8), r(1, 2, 0, 8), r(1, 2, 0, 8))
    assert out.shape == (1, 2, 3, 8) and torch.equal(out, torch.zeros_like(out))


def test_nan_in_one_row_stays_in_that_row():
    x = r(4, 16)
    x[2, 5] = float("nan")
    for out in (
        ops.layer_norm(x, [16]),
        ops.rms_norm(x, [16]),
        ops.add_layer_norm(x, r(4, 16), [16])[0],
        ops.dequantize_int8(*ops.quantize_int8(x)),
        ops.int8_linear(x, i8(6, 16), torch.rand(6)),
    ):
        assert torch.isnan(out[2]).all()
        assert torch.isfinite(out[[0, 1, 3]]).all()
    q, k, v = r(1, 1, 4, 8), r(1, 1, 4, 8), r(1, 1, 4, 8)
    q[0, 0, 1, 0] = float("nan")
    out = ops.scaled_dot_product_attention(q, k, v)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 0, [0, 2, 3]]).all()
