"""The GEMM path of swapped blocks (``llmkit.nn._fused.dense``) and pickling swapped models.

``dense`` is compared with a float64 ``x @ W^T + b`` (then the float64 GELU) at odd shapes,
with and without bias, transposed (Conv1D) weights, on the oneDNN path and the ``F.linear``
path; swapped HuggingFace models survive pickle, ``torch.save`` and ``copy.deepcopy`` with
identical outputs, and ``unswap`` of the copy restores the original model's outputs exactly.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import llmkit
from conftest import select_linear_path
from llmkit._compat import ONEDNN_LINEAR
from llmkit.backends.reference.linear import onednn_applies
from llmkit.integrations import hf as hf_integration
from llmkit.nn import _fused
from llmkit.ops.linear import LinearCall, linear_forward
from test_hf import VOCAB, _padded_batch, bert, gpt2

transformers = pytest.importorskip("transformers")


def _gelu64(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.fixture(params=["onednn", "onednn_gelu_only", "f_linear"])
def onednn(request, monkeypatch):
    """Every CPU path of ``dense``: oneDNN for every float32 call (the rule off MKL's own
    CPUs), oneDNN only with a GELU (on them: :data:`linear.MKL_NATIVE`), no oneDNN."""
    from llmkit.backends.reference import linear

    monkeypatch.setattr(linear, "MKL_NATIVE", request.param == "onednn_gelu_only")
    if request.param == "f_linear":
        select_linear_path(monkeypatch, "bias_in_gemm")
    return request.param != "f_linear"


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 13), (2, 1, 1, 33), (0, 9)])
@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_dense_matches_float64(shape, gelu, bias, transposed, onednn):
    n_in, n_out = shape[-1], 19
    x = torch.randn(shape)
    w = torch.randn(n_in, n_out).t() if transposed else torch.randn(n_out, n_in)  # (out, in), maybe strided
    b = torch.randn(n_out) if bias else None
    with torch.no_grad():
        got = _fused.dense(x, w, b, gelu)
    want = x.double() @ w.double().t() + (b.double() if bias else 0)
    if gelu is not None:
        want = _gelu64(want, gelu)
    assert got.shape == (*shape[:-1], n_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5 * max(1.0, n_in**0.5), rtol=1e-5)


def test_dense_under_autograd_takes_f_linear_and_has_gradients():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _fused.dense(x, w, b, "tanh"), (x, w, b))
    x32 = torch.randn(3, 6, requires_grad=True)
    w32 = torch.randn(5, 6)
    out = _fused.dense(x32, w32, None)
    assert out.grad_fn is not None  # F.linear, not the oneDNN op (which has no autograd)
    out.sum().backward()
    torch.testing.assert_close(x32.grad, w32.sum(0).expand(3, 6))


def test_dense_bfloat16_and_mixed_dtypes_take_f_linear():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(_fused.dense(x, w, None), torch.nn.functional.linear(x, w))
    assert not onednn_applies(LinearCall(torch.randn(3, 8), torch.randn(4, 8, dtype=torch.float64), None, None))


def test_dense_takes_onednn_from_two_rows(onednn):
    from llmkit.backends.reference.linear import MKL_NATIVE

    w, b = torch.randn(7, 16), torch.randn(7)
    available = ONEDNN_LINEAR is not None
    plain = available and not MKL_NATIVE  # a GEMM without a GELU stays on MKL on its own CPUs
    assert not onednn_applies(LinearCall(torch.randn(1, 1, 16), w, b, "none"))  # one row: a decode step
    assert not onednn_applies(LinearCall(torch.randn(2, 0), torch.randn(7, 0), b, "none"))  # nothing to reduce
    assert onednn_applies(LinearCall(torch.randn(2, 16), w, b, None)) == plain
    assert onednn_applies(LinearCall(torch.randn(2, 1, 16), w, None, None)) == plain
    assert onednn_applies(LinearCall(torch.randn(2, 16), w, b, "tanh")) == available
    x = torch.randn(2, 16)
    took = linear_forward.select(x, w, b, None)
    assert took.name == ("reference:onednn" if plain and onednn else "reference:bias_in_gemm")
    took = linear_forward.select(x, w, b, "none")
    assert took.name == ("reference:onednn" if available and onednn else "reference:bias_in_gemm")


def test_plain_gemm_stays_on_mkl_only_on_an_intel_cpu_with_mkl(monkeypatch):
    from llmkit.backends.reference import linear

    for vendor, mkl, native in (
        ("GenuineIntel", True, True),
        ("AuthenticAMD", True, False),
        ("GenuineIntel", False, False),
        ("", True, False),
    ):
        monkeypatch.setattr(linear, "_cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda m=mkl: m)
        assert linear._mkl_native() == native, (vendor, mkl)


def test_dense_under_autocast_runs_in_the_autocast_dtype():
    """Under CPU autocast F.linear computes in bfloat16; dense must not keep it float32."""
    x, w, b = torch.randn(5, 16), torch.randn(7, 16), torch.randn(7)
    assert onednn_applies(LinearCall(x, w, b, "tanh")) == (ONEDNN_LINEAR is not None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_applies(LinearCall(x, w, b, "tanh"))
        got = _fused.dense(x, w, b, "tanh")
        want = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    assert got.dtype == want.dtype == torch.bfloat16
    # the same bfloat16 GEMM; the GELU may be the C++ CPU kernel (rounding apart)
    torch.testing.assert_close(got, want)


def test_linear_keeps_hooks_and_subclasses():
    lin = torch.nn.Linear(6, 3)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(1))
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(_fused.linear(x, lin), lin(x))
    assert len(seen) == 2  # the hook ran: the module was called as it is


def test_bert_self_attention_swap_with_only_fused_kind_keeps_sdpa():
    model = bert()
    ids, mask = _padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
    report = llmkit.swap(model, kinds=["fused", "gelu", "norm"])
    assert model.config._attn_implementation == "sdpa"  # attention not swapped: the original forward
    assert any(e.before == "BertSelfAttention" for e in report.swapped)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, before, atol=1e-4, rtol=1e-4)


def _save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_swapped_bert_pickles_and_copies(how):
    model = bert()
    ids, mask = _padded_batch()
    with torch.no_grad():
        original = model(ids, attention_mask=mask).last_hidden_state
    llmkit.swap(model)
    with torch.no_grad():
        swapped = model(ids, attention_mask=mask).last_hidden_state
    copied = {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": _save_load, "deepcopy": copy.deepcopy}[
        how
    ](model)
    layer = copied.encoder.layer[0]
    assert type(layer.output) is type(model.encoder.layer[0].output)  # the same fused class
    modeling_bert = transformers.models.bert.modeling_bert
    assert hf_integration.fused_original(type(layer.attention.self)) is modeling_bert.BertSelfAttention
    assert copied.config._attn_implementation == "llmkit"
    assert all(p is not q for p, q in zip(copied.parameters(), model.parameters(), strict=True))
    with torch.no_grad():
        assert torch.equal(copied(ids, attention_mask=mask).last_hidden_state, swapped)
    report = llmkit.unswap(copied)  # the copy's swaps are undone on the copy
    assert len(report) > 0 and type(copied.encoder.layer[0].output).__name__ == "BertOutput"
    assert type(model.encoder.layer[0].output).__name__ == "LlmkitBertOutput"  # the source is untouched
    with torch.no_grad():
        assert torch.equal(copied(ids, attention_mask=mask).last_hidden_state, original)


def test_swapped_gpt2_pickles_and_generates_the_same():
    model = gpt2()
    ids = torch.randint(2, VOCAB, (2, 6))
    llmkit.swap(model)
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    copied = pickle.loads(pickle.dumps(model))
    assert type(copied.transformer.h[0].mlp) is type(model.transformer.h[0].mlp)
    assert torch.equal(copied.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, model(ids).logits)
