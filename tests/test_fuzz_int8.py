"""Fuzz: quantize_int8, dequantize_int8, int8_matmul (exact and scaled), int8_linear (W8A8 and
W8A16, with its fused GELU) on every backend against the float64 / exact integer math of
llmkit/reference64.py (the rule of tests/_fuzz.py).

Shapes with 0, 1 and prime lengths and long rows; contiguous, transposed, sliced and stride-0
operands (an int8 weight with strides (1, 1) or an expanded one is what broke the CPU GEMM
once); every dtype; normal, large, huge, tiny (denormal), constant, zero and NaN / inf rows.
Quantization is bit-exact with the reference wherever a row is finite; a row holding NaN or
inf quantizes to zeros with a non-finite scale (docs/architecture.md, Conventions), so the
products of that row are not finite either. The C++ kernels (cuda_ext: quantization only on
the CPU) run in a subprocess.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

import llmkit
from _fuzz import F64, HALF_AND_FLOAT, KINDS, LAYOUTS, LEAD_DIMS, ROW_LENGTHS, WARNINGS, check, layout, run_fuzz, values
from llmkit import reference64 as R

pytestmark = [pytest.mark.filterwarnings(w) for w in WARNINGS]

FLOATS = HALF_AND_FLOAT
OPS = {
    "reference": ["quantize", "matmul", "matmul_scaled", "linear"],
    "triton": ["quantize", "matmul", "matmul_scaled", "linear"],
    "cuda_ext": ["quantize"],
}
EXAMPLES = {"reference": 80, "triton": 40, "cuda_ext": 40}
N_OUT = st.sampled_from([1, 2, 7, 16, 33, 64])


def _int8(shape, gen) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int16).to(torch.int8)


def _quantize(backend, data, gen):
    dtype = data.draw(st.sampled_from(FLOATS + ([F64] if backend == "reference" else [])), "dtype")
    n = data.draw(ROW_LENGTHS, "n")
    lead = data.draw(LEAD_DIMS, "lead")
    assume(math.prod(lead) * n <= 30_000)
    kind = data.draw(st.sampled_from(KINDS), "kind")
    if backend == "triton" and dtype == torch.bfloat16:
        assume(kind not in ("tiny", "mixed"))  # the interpreter flushes bfloat16 denormals
    shape = (*lead, n)
    x = layout(values(shape, dtype, kind, gen), data.draw(LAYOUTS, "layout"))
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1), "dim")
    with llmkit.use_backend(backend):
        q, scale = llmkit.ops.quantize_int8(x, dim)
    if x.shape[dim] == 0:  # rows of no element: absmax 0, scale 0 (reference64's amax refuses them)
        assert q.shape == x.shape and torch.equal(scale, torch.zeros_like(scale))
        return
    rq, rscale = R.quantize_int8(x, dim)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.dtype == torch.float32
    assert scale.shape == rscale.shape
    finite = torch.isfinite(x).all(dim)
    qd = q.movedim(dim, -1)
    assert torch.equal(qd[finite], rq.movedim(dim, -1)[finite]), "q differs from the reference on a finite row"
    assert torch.equal(scale[finite], rscale[finite]), "scale differs from the reference on a finite row"
    assert not torch.isfinite(scale[~finite]).any(), "a row with NaN / inf has a finite scale"
    assert not qd[~finite].any(), "a row with NaN / inf quantizes to something else than zeros"
    out_dtype = data.draw(st.sampled_from(FLOATS), "dequantize_dtype")
    dq = llmkit.ops.dequantize_int8(q, scale, dim, out_dtype)
    want = (rq.to(torch.float32) * rscale.unsqueeze(dim % x.dim())).to(out_dtype)
    assert torch.equal(dq.movedim(dim, -1)[finite], want.movedim(dim, -1)[finite])


def _matmul(backend, data, gen, scaled: bool):
    k = data.draw(ROW_LENGTHS, "k")
    n = data.draw(N_OUT, "n")
    lead = data.draw(LEAD_DIMS, "lead")
    assume(math.prod(lead) * k <= (20_000 if backend != "triton" else 5_000) and k * n <= 20_000)
    a = layout(_int8((*lead, k), gen), data.draw(LAYOUTS, "layout_a"))
    b_layout = data.draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]), "layout_b")
    b = _int8((k, n), gen)
    if b_layout == "transposed":
        b = b.t().contiguous().t()
    elif b_layout == "sliced":
        b = torch.cat([b, _int8((k, 5), gen)], 1)[:, :n]
    elif b_layout == "expanded":
        b = b[:1].expand(k, n)
    exact = R.int8_matmul(a, b)
    if not scaled:
        with llmkit.use_backend(backend):
            out = llmkit.ops.int8_matmul(a, b)
        assert out.dtype == torch.int32 and torch.equal(out.to(torch.int64), exact), f"int8 GEMM not exact ({b_layout})"
        return
    kind = data.draw(st.sampled_from(["normal", "huge", "tiny", "specials", "mixed"]), "scale_kind")
    per_row = data.draw(st.booleans(), "per_row_scale")
    a_scale = values((*lead, 1) if per_row else (1,), torch.float32, kind, gen).abs().squeeze(-1) * 0.01
    b_scale = (torch.rand(n, generator=gen) + 0.5) * 0.01
    out_dtype = data.draw(st.sampled_from([None, *FLOATS]), "out_dtype")
    bias = values((n,), torch.float32, "normal", gen) if data.draw(st.booleans(), "bias") else None
    with llmkit.use_backend(backend):
        out = llmkit.ops.int8_matmul(a, b, a_scale, b_scale, bias, out_dtype)
    a_s = a_scale[..., None] if per_row else a_scale
    ref = exact.to(F64) * a_s.to(F64) * b_scale.to(F64) + (0.0 if bias is None else bias.to(F64))
    dt = out_dtype or torch.float32
    base = (exact.to(torch.float32) * a_s * b_scale + (0.0 if bias is None else bias)).to(dt)
    check(f"int8_matmul {backend} scaled ({kind}, {dt}, {b_layout})", out, ref, (base,))


def _linear(backend, data, gen):
    dtype = data.draw(st.sampled_from(FLOATS), "dtype")
    k = data.draw(ROW_LENGTHS, "k")
    n = data.draw(N_OUT, "n")
    lead = data.draw(LEAD_DIMS, "lead")
    assume(math.prod(lead) * k <= (20_000 if backend != "triton" else 5_000) and k * n <= 20_000)
    kind = data.draw(st.sampled_from(KINDS), "kind")
    if backend == "triton" and dtype == torch.bfloat16:
        assume(kind not in ("tiny", "mixed"))
    mode = data.draw(st.sampled_from(["w8a8", "w8a16"]), "mode")
    activation = data.draw(st.sampled_from(["none", "gelu", "gelu_tanh"]), "activation")
    strict = []
    # huge rows are not strict here: PyTorch's float32 GEMM does not break on them, and a dot
    # product's rounding (a few ulps of its result where terms cancel) is its yardstick
    x = values((*lead, k), dtype, kind, gen, strict_rows=strict, strict_kinds=("tiny",))
    x = layout(x, data.draw(LAYOUTS, "layout"))
    w_float = torch.randn(n, k, generator=gen, dtype=F64)
    if data.draw(st.booleans(), "weight_1_column"):  # in_features == 1: strides (1, 1)
        k = 1
        x, w_float, strict = x[..., :1], w_float[:, :1], [torch.zeros(x.shape[:-1], dtype=torch.bool)]
    weight, weight_scale = R.quantize_int8(w_float.float(), -1)
    bias = values((n,), dtype, "normal", gen) if data.draw(st.booleans(), "bias") else None
    with llmkit.use_backend(backend):
        out = llmkit.ops.int8_linear(x, weight, weight_scale, bias, mode, activation)
    ref = R.int8_linear(x, weight, weight_scale, bias, mode, activation)
    act = {"none": lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}[activation]
    w32 = weight.to(torch.float32) * weight_scale[:, None]
    b32 = None if bias is None else bias.float()
    if mode == "w8a8":  # PyTorch's own int8 math: the activations quantized per token, exact int GEMM
        qx, sx = R.quantize_int8(x, -1)
        acc = R.int8_matmul(qx, weight.t()).to(torch.float32)
        ref = R.int8_linear(qx.to(F64) * sx.to(F64)[..., None], weight, weight_scale, bias, mode, activation)
        bases = [act(acc * sx[..., None] * weight_scale + (0.0 if b32 is None else b32)).to(dtype)]
    else:
        bases = [act(F.linear(x.float(), w32, b32)).to(dtype), act(F.linear(x, w32.to(dtype), bias)).to(dtype)]
    rows = strict[0][..., None] if strict else None
    check(f"int8_linear {backend} ({mode}, {activation}, {kind}, {dtype}, k {k})", out, ref, bases, strict=rows)


def _case(backend, data):
    op = data.draw(st.sampled_from(OPS[backend]), "op")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "seed"))
    if op == "quantize":
        _quantize(backend, data, gen)
    elif op.startswith("matmul"):
        _matmul(backend, data, gen, scaled=op == "matmul_scaled")
    else:
        _linear(backend, data, gen)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda_ext"])
def test_int8_fuzz(backend, request):
    run_fuzz(request, backend, EXAMPLES[backend], f"int8-{backend}", _case)
