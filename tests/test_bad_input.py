"""Bad input to every public op, backward ops included: a clear error before any kernel runs.

Table-driven like tests/test_validation.py: each case names the call, the exception type and
words the message must contain (the argument, what it got, what it needs). The backward
ops (``torch.ops.llmkit.*_backward``) check every tensor against the forward's input:
gradients, saved statistics / lse, weight and bias, devices (the C++ kernels once read out
of bounds on a short ``grad_out`` or bias). All tensors of a call live on one device: a
meta tensor next to CPU ones is refused (the fake kernel used to run and return garbage).
Inference-only ops refuse inputs that require grad at the call, and take them under
``torch.no_grad()`` / ``torch.inference_mode()``. Scalars are numbers, dims are ints.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import llmkit
from llmkit import ops
from llmkit import reference64 as R
from llmkit.dispatch import BACKENDS, DispatchPoint
from llmkit.testing import assert_close_to_reference

L = torch.ops.llmkit
F16, F32, F64 = torch.float16, torch.float32, torch.float64


def r(*shape, dtype=F32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def _call(fn, defaults: dict, over: dict):
    args = {**defaults, **over}
    return fn(*args.values())


def ln_bwd(**over):
    return _call(
        L.layer_norm_backward,
        dict(
            grad_out=r(6, 16),
            input=r(6, 16),
            normalized_shape=[16],
            weight=r(16),
            bias=r(16),
            mean=r(6),
            rstd=r(6).abs(),
            output_mask=[True, True, True],
        ),
        over,
    )


def rms_bwd(**over):
    return _call(
        L.rms_norm_backward,
        dict(
            grad_out=r(6, 16),
            input=r(6, 16),
            normalized_shape=[16],
            weight=r(16),
            rstd=r(6).abs(),
            output_mask=[True, True],
        ),
        over,
    )


def aln_bwd(**over):
    return _call(
        L.add_layer_norm_backward,
        dict(
            grad_out=r(6, 16),
            grad_residual_out=r(6, 16),
            residual_out=r(6, 16),
            normalized_shape=[16],
            weight=r(16),
            bias=r(16),
            mean=r(6),
            rstd=r(6).abs(),
            output_mask=[True, True, True],
        ),
        over,
    )


def gelu_bwd(**over):
    return _call(L.gelu_backward, dict(grad_out=r(5, 9), input=r(5, 9), approximate="none"), over)


def bias_gelu_bwd(**over):
    return _call(L.bias_gelu_backward, dict(grad_out=r(5, 9), input=r(5, 9), bias=r(9), approximate="tanh"), over)


def geglu_bwd(**over):
    return _call(L.geglu_backward, dict(grad_out=r(5, 9), gate=r(5, 9), up=r(5, 9), approximate="tanh"), over)


def swiglu_bwd(**over):
    return _call(L.swiglu_backward, dict(grad_out=r(5, 9), gate=r(5, 9), up=r(5, 9)), over)


def sdpa_bwd(**over):
    return _call(
        L.scaled_dot_product_attention_backward,
        dict(
            grad_out=r(1, 2, 5, 4),
            query=r(1, 2, 5, 8),
            key=r(1, 2, 7, 8),
            value=r(1, 2, 7, 4),
            out=r(1, 2, 5, 4),
            lse=r(1, 2, 5),
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            scale=0.35,
            enable_gqa=False,
            seed=0,
            offset=0,
            mask_grad=False,
        ),
        over,
    )


BAD_BACKWARD = {
    "layer_norm_backward short grad_out": (
        lambda: ln_bwd(grad_out=r(1, 16)),
        ValueError,
        ["grad_out", "[1, 16]", "input's shape [6, 16]"],
    ),
    "layer_norm_backward grad_out dtype": (
        lambda: ln_bwd(grad_out=r(6, 16, dtype=F16)),
        TypeError,
        ["grad_out", "float16", "float32"],
    ),
    "layer_norm_backward grad_out on meta": (
        lambda: ln_bwd(grad_out=r(6, 16, device="meta")),
        ValueError,
        ["grad_out is on meta", "input is on cpu"],
    ),
    "layer_norm_backward mean shape": (lambda: ln_bwd(mean=r(5)), ValueError, ["mean", "[5]", "[6]"]),
    "layer_norm_backward rstd dtype": (lambda: ln_bwd(rstd=r(6, dtype=F16)), TypeError, ["rstd", "float16", "float32"]),
    "layer_norm_backward rstd on meta": (lambda: ln_bwd(rstd=r(6, device="meta")), ValueError, ["rstd is on meta"]),
    "layer_norm_backward weight shape": (lambda: ln_bwd(weight=r(3)), ValueError, ["weight", "[3]", "[16]"]),
    "layer_norm_backward bias dtype": (lambda: ln_bwd(bias=r(16, dtype=F64)), TypeError, ["bias", "float64"]),
    "layer_norm_backward output_mask": (lambda: ln_bwd(output_mask=[True]), ValueError, ["output_mask", "3 bools"]),
    "layer_norm_backward int input": (
        lambda: ln_bwd(input=torch.ones(6, 16, dtype=torch.int32)),
        TypeError,
        ["input", "int32"],
    ),
    "layer_norm_backward normalized_shape": (
        lambda: ln_bwd(normalized_shape=[8]),
        ValueError,
        ["normalized_shape [8]", "[6, 16]"],
    ),
    "rms_norm_backward short grad_out": (
        lambda: rms_bwd(grad_out=r(1, 16)),
        ValueError,
        ["grad_out", "[1, 16]", "[6, 16]"],
    ),
    "rms_norm_backward rstd shape": (lambda: rms_bwd(rstd=r(60)), ValueError, ["rstd", "[60]", "[6]"]),
    "rms_norm_backward weight on meta": (
        lambda: rms_bwd(weight=r(16, device="meta")),
        ValueError,
        ["weight is on meta"],
    ),
    "rms_norm_backward output_mask": (
        lambda: rms_bwd(output_mask=[True, True, True]),
        ValueError,
        ["output_mask", "2 bools"],
    ),
    "add_layer_norm_backward grad_residual_out": (
        lambda: aln_bwd(grad_residual_out=r(6, 15)),
        ValueError,
        ["grad_residual_out", "[6, 15]", "residual_out's shape"],
    ),
    "add_layer_norm_backward grad_out dtype": (
        lambda: aln_bwd(grad_out=r(6, 16, dtype=F64)),
        TypeError,
        ["grad_out", "float64", "residual_out's dtype float32"],
    ),
    "add_layer_norm_backward mean on meta": (
        lambda: aln_bwd(mean=r(6, device="meta")),
        ValueError,
        ["mean is on meta"],
    ),
    "gelu_backward short grad_out": (
        lambda: gelu_bwd(grad_out=r(1)),
        ValueError,
        ["grad_out", "[1]", "input's shape [5, 9]"],
    ),
    "gelu_backward grad_out dtype": (
        lambda: gelu_bwd(grad_out=r(5, 9, dtype=torch.bfloat16)),
        TypeError,
        ["grad_out", "bfloat16", "float32"],
    ),
    "gelu_backward grad_out on meta": (
        lambda: gelu_bwd(grad_out=r(5, 9, device="meta")),
        ValueError,
        ["grad_out is on meta", "input is on cpu"],
    ),
    "gelu_backward approximate": (lambda: gelu_bwd(approximate="erf"), ValueError, ["approximate", "'erf'"]),
    "bias_gelu_backward one-element bias": (lambda: bias_gelu_bwd(bias=r(1)), ValueError, ["bias", "[1]", "[9]"]),
    "bias_gelu_backward bias dtype": (
        lambda: bias_gelu_bwd(bias=r(9, dtype=F16)),
        TypeError,
        ["bias", "float16", "float32"],
    ),
    "bias_gelu_backward short grad_out": (
        lambda: bias_gelu_bwd(grad_out=r(9)),
        ValueError,
        ["grad_out", "[9]", "[5, 9]"],
    ),
    "geglu_backward short grad_out": (
        lambda: geglu_bwd(grad_out=r(9)),
        ValueError,
        ["grad_out", "[9]", "gate's shape [5, 9]"],
    ),
    "geglu_backward short up": (lambda: geglu_bwd(up=r(5, 1)), ValueError, ["up", "[5, 1]", "[5, 9]"]),
    "geglu_backward approximate": (lambda: geglu_bwd(approximate="erf"), ValueError, ["approximate", "'erf'"]),
    "swiglu_backward up dtype": (lambda: swiglu_bwd(up=r(5, 9, dtype=F16)), TypeError, ["up", "float16", "float32"]),
    "swiglu_backward grad_out on meta": (
        lambda: swiglu_bwd(grad_out=r(5, 9, device="meta")),
        ValueError,
        ["grad_out is on meta", "gate is on cpu"],
    ),
    "swiglu_backward gate int": (
        lambda: swiglu_bwd(gate=torch.ones(5, 9, dtype=torch.int32)),
        TypeError,
        ["gate", "int32"],
    ),
    "sdpa_backward grad_out head dim": (
        lambda: sdpa_bwd(grad_out=r(1, 2, 5, 8)),
        ValueError,
        ["grad_out", "[1, 2, 5, 8]", "[1, 2, 5, 4]"],
    ),
    "sdpa_backward short out": (lambda: sdpa_bwd(out=r(1, 2, 1, 4)), ValueError, ["out", "[1, 2, 1, 4]"]),
    "sdpa_backward out dtype": (lambda: sdpa_bwd(out=r(1, 2, 5, 4, dtype=F16)), TypeError, ["out", "float16"]),
    "sdpa_backward lse shape": (lambda: sdpa_bwd(lse=r(1, 2, 4)), ValueError, ["lse", "[1, 2, 4]", "[1, 2, 5]"]),
    "sdpa_backward lse dtype": (lambda: sdpa_bwd(lse=r(1, 2, 5, dtype=F16)), TypeError, ["lse", "float16", "float32"]),
    "sdpa_backward lse on meta": (lambda: sdpa_bwd(lse=r(1, 2, 5, device="meta")), ValueError, ["lse is on meta"]),
    "sdpa_backward key batch": (lambda: sdpa_bwd(key=r(2, 2, 7, 8)), ValueError, ["batch sizes"]),
}

q4 = lambda: r(1, 2, 3, 8)  # noqa: E731


def _decode(**over):
    return _call(
        ops.decode_attention,
        dict(
            query=r(2, 2, 1, 8), key_cache=r(2, 2, 6, 8), value_cache=r(2, 2, 6, 8), cache_seqlens=torch.tensor([3, 6])
        ),
        over,
    )


BAD_FORWARD = {
    "sdpa scale string": (
        lambda: ops.scaled_dot_product_attention(q4(), q4(), q4(), scale="x"),
        TypeError,
        ["scale", "'x'", "number"],
    ),
    "sdpa scale two values": (
        lambda: ops.scaled_dot_product_attention(q4(), q4(), q4(), scale=torch.ones(2)),
        TypeError,
        ["scale", "shape [2]", "number"],
    ),
    "sdpa scale bool": (
        lambda: ops.scaled_dot_product_attention(q4(), q4(), q4(), scale=True),
        TypeError,
        ["scale", "True"],
    ),
    "sdpa dropout_p string": (
        lambda: ops.scaled_dot_product_attention(q4(), q4(), q4(), dropout_p="0.1"),
        TypeError,
        ["dropout_p", "'0.1'", "number"],
    ),
    "sdpa mask on meta": (
        lambda: ops.scaled_dot_product_attention(q4(), q4(), q4(), torch.ones(3, 3, dtype=torch.bool, device="meta")),
        ValueError,
        ["attn_mask is on meta"],
    ),
    "decode scale string": (lambda: _decode(scale="x"), TypeError, ["scale", "'x'"]),
    "decode lengths on meta": (
        lambda: _decode(cache_seqlens=torch.tensor([3, 6], device="meta")),
        ValueError,
        ["cache_seqlens is on meta", "query is on cpu"],
    ),
    "decode float lengths on meta": (
        lambda: _decode(cache_seqlens=torch.tensor([3.0, 6.0], device="meta")),
        TypeError,
        ["cache_seqlens", "float32", "int32"],
    ),
    "decode cache on meta": (
        lambda: _decode(value_cache=r(2, 2, 6, 8, device="meta")),
        ValueError,
        ["value_cache is on meta"],
    ),
    "decode query requires grad": (
        lambda: _decode(query=r(2, 2, 1, 8).requires_grad_()),
        RuntimeError,
        ["decode_attention", "query requires grad", "no gradient", "torch.no_grad()"],
    ),
    "decode cache requires grad": (
        lambda: _decode(key_cache=r(2, 2, 6, 8).requires_grad_()),
        RuntimeError,
        ["key_cache requires grad"],
    ),
    "quantize dim string": (lambda: ops.quantize_int8(r(3, 4), dim="a"), TypeError, ["dim", "'a'", "int"]),
    "quantize dim float": (lambda: ops.quantize_int8(r(3, 4), dim=1.5), TypeError, ["dim", "1.5", "int"]),
    "quantize requires grad": (
        lambda: ops.quantize_int8(r(3, 4).requires_grad_()),
        RuntimeError,
        ["quantize_int8", "x requires grad", "no gradient"],
    ),
    "dequantize scale shape": (
        lambda: ops.dequantize_int8(i8(4, 8), torch.ones(4, 1)),
        ValueError,
        ["scale", "[4, 1]", "[4]"],
    ),
    "dequantize scale dtype": (
        lambda: ops.dequantize_int8(i8(4, 8), torch.ones(4, dtype=torch.int32)),
        TypeError,
        ["scale", "int32"],
    ),
    "dequantize scale on meta": (
        lambda: ops.dequantize_int8(i8(4, 8), torch.ones(4, device="meta")),
        ValueError,
        ["scale is on meta", "q is on cpu"],
    ),
    "dequantize dim float": (
        lambda: ops.dequantize_int8(i8(4, 8), torch.ones(4), dim=1.0),
        TypeError,
        ["dim", "1.0", "int"],
    ),
    "dequantize dtype": (
        lambda: ops.dequantize_int8(i8(4, 8), torch.ones(4), dtype=torch.int32),
        TypeError,
        ["dtype", "int32", "floating"],
    ),
    "int8_linear input requires grad": (
        lambda: ops.int8_linear(r(2, 5).requires_grad_(), i8(4, 5), torch.ones(4)),
        RuntimeError,
        ["int8_linear", "input requires grad", "no gradient"],
    ),
    "int8_linear bias requires grad": (
        lambda: ops.int8_linear(r(2, 5), i8(4, 5), torch.ones(4), r(4).requires_grad_()),
        RuntimeError,
        ["bias requires grad"],
    ),
    "int8_linear weight_scale on meta": (
        lambda: ops.int8_linear(r(2, 5), i8(4, 5), torch.ones(4, device="meta")),
        ValueError,
        ["weight_scale is on meta"],
    ),
    "int8_matmul scale requires grad": (
        lambda: ops.int8_matmul(i8(2, 3), i8(3, 4), torch.ones(2), torch.ones(4, requires_grad=True)),
        RuntimeError,
        ["b_scale requires grad"],
    ),
    "int8_matmul b on meta": (
        lambda: ops.int8_matmul(i8(2, 3), torch.ones(3, 4, dtype=torch.int8, device="meta")),
        ValueError,
        ["b is on meta"],
    ),
    "rms_norm eps string": (lambda: ops.rms_norm(r(2, 3), [3], eps="a"), TypeError, ["eps", "'a'", "number"]),
    "layer_norm eps bool": (lambda: ops.layer_norm(r(2, 3), [3], eps=True), TypeError, ["eps", "True"]),
    "add_layer_norm eps tensor": (
        lambda: ops.add_layer_norm(r(2, 3), r(2, 3), [3], eps=torch.ones(3)),
        TypeError,
        ["eps", "shape [3]"],
    ),
    "layer_norm normalized_shape None": (
        lambda: ops.layer_norm(r(2, 3), None),
        TypeError,
        ["normalized_shape", "None", "int or a sequence of ints"],
    ),
    "rms_norm normalized_shape float": (lambda: ops.rms_norm(r(2, 3), [3.0]), TypeError, ["normalized_shape", "3.0"]),
    "add_layer_norm normalized_shape string": (
        lambda: ops.add_layer_norm(r(2, 3), r(2, 3), "3"),
        TypeError,
        ["normalized_shape", "'3'"],
    ),
    "bias_gelu bias on meta": (lambda: ops.bias_gelu(r(2, 5), r(5, device="meta")), ValueError, ["bias is on meta"]),
    "swiglu up on meta": (lambda: ops.swiglu(r(2, 5), r(2, 5, device="meta")), ValueError, ["up is on meta"]),
    "geglu broadcast up": (lambda: ops.geglu(r(2, 5), r(5)), ValueError, ["up has shape [5]", "gate's shape [2, 5]"]),
}


@pytest.fixture(scope="module")
def ext_here(request):
    """The C++ extension (conftest's ``ext``: built once if needed); where it cannot be built
    (a CUDA torch without the CUDA toolkit) the tests that need it skip: test_cuda_ext.py is
    where a failing build is reported."""
    try:
        return request.getfixturevalue("ext")
    except Exception as exc:  # noqa: BLE001 - the fixture's failure, whatever it is
        pytest.skip(f"the C++ extension cannot be used here: {str(exc)[:300]}")


@pytest.mark.parametrize("name", list(BAD_BACKWARD) + list(BAD_FORWARD))
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda_ext"])
def test_bad_input_gets_a_clear_error_before_any_kernel(name, backend, monkeypatch, request):
    if backend == "cuda_ext":
        request.getfixturevalue("ext_here")  # the C++ kernels that read out of bounds: built here if needed
    elif BACKENDS[backend].unavailable_reason("cpu"):
        pytest.skip(f"{backend}: {BACKENDS[backend].unavailable_reason('cpu')}")
    call, exc_type, words = {**BAD_BACKWARD, **BAD_FORWARD}[name]
    launched = []
    original = DispatchPoint.__call__
    monkeypatch.setattr(
        DispatchPoint, "__call__", lambda self, *a, **k: launched.append(self.qualname) or original(self, *a, **k)
    )
    with llmkit.use_backend(backend), pytest.raises(exc_type) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} missing from {str(info.value)!r}"
    assert launched == [], f"dispatch reached {launched} on bad input"


def test_backward_ops_still_take_what_autograd_gives(ext_here):
    """The checks accept every gradient autograd hands over: expanded (stride-0) ones from
    .sum(), float32 parameters next to half inputs, absent weight and bias."""
    x = r(3, 7, 16, dtype=torch.bfloat16).requires_grad_()
    w = r(16).requires_grad_()
    for out in (
        ops.layer_norm(x, [16], w, None),
        ops.rms_norm(x, [16]),
        ops.add_layer_norm(x, x, [16], w)[0],
        ops.bias_gelu(x, w.to(torch.bfloat16)),
        ops.gelu(x),
    ):
        (gx,) = torch.autograd.grad(out.float().sum(), x)
        assert gx.shape == x.shape and torch.isfinite(gx).all()
    q = r(1, 2, 5, 8).requires_grad_()
    out = ops.scaled_dot_product_attention(q, q, q, is_causal=True)
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(gq).all()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no tensor requires grad"])
def test_inference_only_ops_run_without_autograd(mode):
    q, kc, vc = r(2, 4, 1, 8), r(2, 2, 6, 8), r(2, 2, 6, 8)
    lens = torch.tensor([4, 6])
    x, w = r(3, 5), torch.randn(4, 5)
    if mode != "no tensor requires grad":
        q, kc, vc, x = (t.requires_grad_() for t in (q, kc, vc, x))
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with ctx():
        out = ops.decode_attention(q, kc, vc, lens)
        qx, sx = ops.quantize_int8(x)
        wq, ws = ops.quantize_int8(w)
        lin = ops.int8_linear(x, wq, ws, mode="w8a16")
    want = R.decode_attention(q.detach(), kc.detach(), vc.detach(), lens, 8**-0.5, True)
    assert_close_to_reference(out, want, want.to(out.dtype), "decode_attention")
    assert torch.equal(qx, R.quantize_int8(x.detach())[0]) and torch.equal(sx, R.quantize_int8(x.detach())[1])
    want_lin = R.int8_linear(x.detach(), wq, ws, None, "w8a16", "none")
    assert_close_to_reference(lin, want_lin, want_lin.float(), "int8_linear")


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_dequantize_int8_takes_the_scale_quantize_int8_returns(dim):
    x = r(3, 5, 7)
    q, scale = ops.quantize_int8(x, dim)
    out = ops.dequantize_int8(q, scale, dim, torch.float64)
    want = q.to(torch.float64) * scale.to(torch.float64).unsqueeze(dim)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=2**-23, atol=0)  # one float32 rounding


def test_the_reported_out_of_bounds_calls_raise_in_a_subprocess(ext_here):
    """The calls that crashed the process (SIGSEGV in the C++ kernels, the default path with the
    extension built) now raise ValueError naming the argument; a crash fails this test."""
    script = textwrap.dedent(
        """
        import torch, llmkit
        L = torch.ops.llmkit
        bf = torch.bfloat16
        calls = [
            lambda: L.gelu_backward(torch.randn(1), torch.randn(16_000_000), "none"),
            lambda: L.rms_norm_backward(torch.randn(1, 64), torch.randn(250_000, 64), [64], None,
                                        torch.ones(250_000), [True, False]),
            lambda: L.layer_norm_backward(torch.randn(1, 64, dtype=bf), torch.randn(250_000, 64, dtype=bf), [64],
                                          None, None, torch.ones(250_000), torch.ones(250_000), [True, False, False]),
            lambda: L.bias_gelu_backward(torch.randn(4, 64), torch.randn(4, 64), torch.randn(1), "none"),
        ]
        for call in calls:
            try:
                call()
                print("no error")
            except ValueError as exc:
                print("ValueError:", exc)
        """
    )
    env = dict(os.environ, **{ext_here.CACHE_ENV: os.path.dirname(ext_here.details()["path"])})
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by a signal)\n{proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and all(ln.startswith("ValueError:") for ln in lines), proc.stdout
    assert all("grad_out" in ln for ln in lines[:3]) and "bias" in lines[3]
