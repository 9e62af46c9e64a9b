"""Fuzz: gelu, bias_gelu, geglu, swiglu on every backend against float64 (the rule of
tests/_fuzz.py).

Shapes with 0, 1 and prime lengths and long rows; contiguous, transposed, sliced and
stride-0 operands (gate and up each their own); every dtype; normal, large, huge, tiny
(denormal), constant, zero and NaN / inf values; exact and tanh GELU; a float32 bias with a
half input; forward and backward. The C++ CPU kernels (cuda_ext) run in a subprocess, so a
crash fails a test instead of pytest.

Where float64's formula is not finite (gelu(-inf) is -inf * 0, NaN), llmkit's result is
not finite either (NaN or inf); see docs/architecture.md, Conventions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

import llmkit
from _fuzz import (
    F64,
    HALF,
    HALF_AND_FLOAT,
    KINDS,
    LAYOUTS,
    LEAD_DIMS,
    ROW_LENGTHS,
    WARNINGS,
    check,
    layout,
    leaf,
    run_fuzz,
    values,
)
from llmkit import reference64 as R

pytestmark = [pytest.mark.filterwarnings(w) for w in WARNINGS]

OPS = ["gelu", "bias_gelu", "geglu", "swiglu"]
EXAMPLES = {"reference": 60, "triton": 40, "cuda_ext": 50}


def _ref(op, a, b, approximate):
    """The float64 formulas of llmkit/reference64.py."""
    if op in ("gelu", "bias_gelu"):
        return R.gelu(a if b is None else a + b, approximate)
    return (R.gelu(a, approximate) if op == "geglu" else R.silu(a)) * b


def _ours(op, a, b, approximate):
    if op == "gelu":
        return llmkit.ops.gelu(a, approximate)
    if op == "bias_gelu":
        return llmkit.ops.bias_gelu(a, b, approximate)
    if op == "geglu":
        return llmkit.ops.geglu(a, b, approximate)
    return llmkit.ops.swiglu(a, b)


def _torch(op, a, b, approximate):
    if op == "gelu":
        return F.gelu(a, approximate=approximate)
    if op == "bias_gelu":
        return F.gelu(a + b.to(a.dtype), approximate=approximate)
    if op == "geglu":
        return F.gelu(a, approximate=approximate) * b
    return F.silu(a) * b


def _case(backend, data):
    op = data.draw(st.sampled_from(OPS), "op")
    dtypes = HALF_AND_FLOAT + ([F64] if backend == "reference" else [])
    dtype = data.draw(st.sampled_from(dtypes), "dtype")
    n = data.draw(ROW_LENGTHS, "n")
    lead = data.draw(LEAD_DIMS, "lead")
    assume(math.prod(lead) * n <= (30_000 if backend != "triton" else 8_000))
    kind = data.draw(st.sampled_from(KINDS), "kind")
    approximate = "none" if op == "swiglu" else data.draw(st.sampled_from(["none", "tanh"]), "approximate")
    lay_a, lay_b = data.draw(LAYOUTS, "layout"), data.draw(LAYOUTS, "layout_up")
    backward = data.draw(st.booleans(), "backward")
    if backend == "triton" and dtype == torch.bfloat16:
        assume(kind not in ("tiny", "mixed"))  # the interpreter flushes bfloat16 denormals
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "seed"))
    shape = tuple(lead) + (n,)
    a = layout(values(shape, dtype, kind, gen), lay_a)
    b = None
    if op == "bias_gelu":
        bdtype = torch.float32 if dtype in HALF and data.draw(st.booleans(), "float32_bias") else dtype
        b = values((n,), bdtype, "normal", gen)
    elif op in ("geglu", "swiglu"):
        b = layout(values(shape, dtype, data.draw(st.sampled_from(["normal", "mixed"]), "up_kind"), gen), lay_b)
    mine, base = ([leaf(t) for t in (a, b)] for _ in range(2))
    ref = [None if t is None else leaf(t.detach().to(F64)) for t in (a, b)]
    base32 = [None if t is None else leaf(t.detach().float()) for t in (a, b)]
    with llmkit.use_backend(backend):
        out = _ours(op, *mine, approximate)
    r = _ref(op, *ref, approximate)
    bs, bs32 = _torch(op, *base, approximate), _torch(op, *base32, approximate)
    name = f"{op} {backend} ({kind}, {str(dtype)[6:]}, {approximate}, {lay_a}/{lay_b})"
    check(name + " out", out, r, (bs, bs32.to(out.dtype)))
    if not backward:
        return
    dy = values(shape, dtype, "normal", gen)
    leaves = [i for i, t in enumerate(mine) if t is not None]
    with llmkit.use_backend(backend):
        g = torch.autograd.grad(out, [mine[i] for i in leaves], dy)
    g_ref = torch.autograd.grad(r, [ref[i] for i in leaves], dy.to(F64))
    g_base = torch.autograd.grad(bs, [base[i] for i in leaves], dy.to(bs.dtype))
    g_base32 = torch.autograd.grad(bs32, [base32[i] for i in leaves], dy.float())
    names = ("dgate", "dup") if op in ("geglu", "swiglu") else ("dinput", "dbias")
    for i, gi, gr, gb, gb32 in zip(leaves, g, g_ref, g_base, g_base32, strict=True):
        check(f"{name} {names[i]}", gi, gr, (gb, gb32.to(gi.dtype)))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda_ext"])
def test_activations_fuzz(backend, request):
    run_fuzz(request, backend, EXAMPLES[backend], f"activations-{backend}", _case)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda_ext"])
@pytest.mark.parametrize("op", ["gelu", "geglu"])
def test_tanh_gelu_tails(backend, op, request):
    """Found by the fuzz: past |z| ~ 1e12, z**3 overflows float32; the tanh form's value
    below z ~ -9.3 (and its derivative) must still round to float64's ~0, and its derivative
    above 9.3 to 1. One sign per call, so the tolerance's unit of rounding stays at the tail's
    own size."""
    if backend == "cuda_ext":
        request.getfixturevalue("ext")
    for sign in (-1.0, 1.0):
        z = torch.tensor([1e30, 3e13, 1e5, 20.0, 9.5], dtype=torch.float32) * sign
        up = torch.ones_like(z) * 0.5
        dy = torch.full_like(z, -0.75)
        x, u = leaf(z), leaf(up)
        with llmkit.use_backend(backend):
            out = llmkit.ops.gelu(x, "tanh") if op == "gelu" else llmkit.ops.geglu(x, u, "tanh")
            grads = torch.autograd.grad(out, [x] if op == "gelu" else [x, u], dy)
        x64, u64 = leaf(z.double()), leaf(up.double())
        ref = R.gelu(x64, "tanh") if op == "gelu" else R.geglu(x64, u64, "tanh")
        refs = torch.autograd.grad(ref, [x64] if op == "gelu" else [x64, u64], dy.double())
        rounded = [t.to(torch.float32) for t in (ref, *refs)]
        names = ("out", "dgate", "dup")[: 1 + len(grads)]
        for name, o, r, b in zip(names, (out, *grads), (ref, *refs), rounded, strict=True):
            if sign > 0 and name == "out":
                continue  # z itself: the rounding of 1e30 dwarfs everything
            check(f"{op} {backend} {name} (sign {sign})", o, r, (b,))
