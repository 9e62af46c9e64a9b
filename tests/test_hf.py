"""HuggingFace models: the "llmkit" attention registration, swap / unswap of BERT, GPT-2, T5.

Models are built from small configs with random weights (no downloads). Swapped
outputs agree with the unswapped model within 1e-4 in float32, greedy generation
gives the same tokens, and unswap restores bit-identical outputs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import llmkit
from conftest import select_linear_path
from llmkit._compat import cache_kwarg
from llmkit.integrations.hf import attention as hf_attention
from llmkit.integrations.hf import fused as hf_fused
from llmkit.nn import _fused
from test_models import _widen_

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 89


def bert(cls=None, **kw):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=52,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    return _widen_((cls or transformers.BertModel)(cfg)).eval()


def gpt2(**kw):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kw,
    )
    return _widen_(transformers.GPT2LMHeadModel(cfg)).eval()


def t5():
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _widen_(transformers.T5ForConditionalGeneration(cfg), std=0.2).eval()


def _padded_batch(b=3, s=10):
    ids = torch.randint(2, VOCAB, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


# -- registration -------------------------------------------------------------------------


def _python(*parts: str) -> str:
    """Run the code parts (each dedented) in a fresh interpreter; return its stdout."""
    code = "\n".join(textwrap.dedent(p) for p in parts)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


BUILD_AND_RUN = """
    import torch
    from transformers import AutoModel, BertConfig
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=20)
    model = AutoModel.from_config(cfg, attn_implementation="llmkit").eval()
    calls = []
    import llmkit.ops
    real = llmkit.ops.scaled_dot_product_attention
    llmkit.ops.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    ids = torch.randint(0, 50, (2, 7)); mask = torch.ones(2, 7, dtype=torch.long); mask[0, 4:] = 0
    out = model(ids, attention_mask=mask).last_hidden_state
    ref = model.set_attn_implementation("eager") or model(ids, attention_mask=mask).last_hidden_state
    print(model.config._attn_implementation, len(calls), float((out - ref).abs().max()))
"""


def test_import_llmkit_first_then_transformers():
    out = _python(
        """
        import sys, llmkit
        assert "transformers" not in sys.modules, "import llmkit must not import transformers"
    """,
        BUILD_AND_RUN,
    )
    impl, calls, err = out.split()
    assert impl == "eager" and int(calls) == 1 and float(err) < 1e-5


def test_import_transformers_first_then_llmkit():
    out = _python(
        """
        import transformers.modeling_utils, transformers.masking_utils
        import llmkit
    """,
        BUILD_AND_RUN,
    )
    impl, calls, err = out.split()
    assert int(calls) == 1 and float(err) < 1e-5


def test_from_pretrained_with_attn_implementation_llmkit(tmp_path):
    model = bert()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="llmkit").eval()
    assert loaded.config._attn_implementation == "llmkit"
    ids, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).last_hidden_state, model(ids, attention_mask=mask).last_hidden_state, **TOL
        )


def test_attention_function_warns_for_output_attentions(caplog):
    hf_attention._said.clear()
    model = bert()
    llmkit.swap(model, kinds="attention")
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        out = model(torch.randint(0, VOCAB, (1, 5)), output_attentions=True)
    assert "output_attentions" in caplog.text
    assert all(a is None for a in (out.attentions or [None]))


# -- BERT ---------------------------------------------------------------------------------


@pytest.fixture(params=[(True, True), (True, False), (False, False)], ids=["onednn", "bias_in_gemm", "bias_gelu"])
def bias_path(request, monkeypatch):
    """Every CPU linear / GELU-bias path: oneDNN GEMM with bias and GELU fused (CPU default),
    F.linear adding the bias then the GELU, or F.linear without bias then bias_gelu (GPU)."""
    in_gemm, onednn = request.param
    select_linear_path(monkeypatch, "onednn" if onednn else "bias_in_gemm" if in_gemm else "bias_gelu")
    return request.param


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_family_swap_matches_and_unswap_is_bit_identical(family, bias_path, monkeypatch):
    if family == "bert":
        model = bert()
    else:
        cfg = transformers.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=52,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=1,
        )
        model = _widen_(transformers.RobertaModel(cfg)).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask)
    report = llmkit.swap(model)
    counts = report.counts()
    assert counts["attention"] == 1 + 2  # the model's implementation, and each layer's self-attention
    assert counts["norm"] == 1 + 2 * 2 and counts["gelu"] == 2 and counts["fused"] == 4 * 2
    assert model.config._attn_implementation == "llmkit"
    assert type(model.encoder.layer[0].output).__name__.startswith("Llmkit")
    calls, gemms = [], []
    real = hf_fused.add_norm_into
    monkeypatch.setattr(hf_fused, "add_norm_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(hf_fused, "linear", lambda x, m: gemms.append(1) or _fused.linear(x, m))
    with torch.no_grad():
        after = model(ids, attention_mask=mask)
    # both residual + LayerNorm of each layer ran fused (in place into the GEMM output, or
    # add_layer_norm: which one depends on the backend preferred here); q, k, v and both
    # dense layers before a LayerNorm ran through the swapped GEMM path
    assert len(calls) == 2 * 2 and len(gemms) == 5 * 2
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, **TOL)
    torch.testing.assert_close(after.pooler_output, before.pooler_output, **TOL)
    llmkit.unswap(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        again = model(ids, attention_mask=mask)
    assert torch.equal(again.last_hidden_state, before.last_hidden_state)


def test_bert_training_gradients_agree_after_swap():
    model = bert(transformers.BertForMaskedLM).train()
    ids, mask = _padded_batch(2, 9)
    labels = torch.randint(0, VOCAB, (2, 9))

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g0 = grads()
    llmkit.swap(model)
    g1 = grads()
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **TOL)


def test_unsupported_activation_is_left_with_reason():
    model = bert(hidden_act="quick_gelu")
    report = llmkit.swap(model)
    left = {(e.kind, e.before) for e in report.left}
    assert ("gelu", "QuickGELUActivation") in left
    assert any("not GELU" in e.after for e in report.left)
    assert any(e.before == "BertIntermediate" and "not an llmkit GELU" in e.after for e in report.left)
    ids, mask = _padded_batch()
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        llmkit.unswap(model)
        b = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, **TOL)


# -- GPT-2 --------------------------------------------------------------------------------


def test_gpt2_swap_logits_cache_and_greedy_generate(bias_path):
    model = gpt2()
    ids = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    tokens_before = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    report = llmkit.swap(model)
    fused = {e.before for e in report.swapped if e.kind == "fused"}
    assert fused == {"GPT2MLP", "GPT2Block"}
    assert report.counts()["gelu"] == 2 and report.counts()["norm"] == 2 * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, **TOL)
        # the cache path: prefill then one token with the cache (its argument's name varies)
        out = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:7], **{cache_kwarg(type(model).forward): out.past_key_values}).logits
        torch.testing.assert_close(step[:, -1], before[:, 6], **TOL)
    tokens_after = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens_after, tokens_before)
    llmkit.unswap(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_swapped_gpt2_and_bert_forward_raise_no_warning():
    """llmkit's fused forwards pass the cache under the installed transformers' name: no
    deprecation warning (an unswapped model raises none either)."""
    models = [(gpt2(), torch.randint(2, VOCAB, (2, 9))), (bert(is_decoder=True), torch.randint(2, VOCAB, (2, 9)))]
    for model, ids in models:
        llmkit.swap(model)
        with warnings.catch_warnings(record=True) as seen, torch.no_grad():
            warnings.simplefilter("always")
            out = model(ids[:, :5], use_cache=True)
            model(ids[:, 5:6], **{cache_kwarg(type(model).forward): out.past_key_values})
            model(ids)
        assert [str(w.message) for w in seen] == [], type(model).__name__


def test_bert_fused_self_attention_with_a_cache_matches_unswapped():
    """A decoder BERT's cache reaches the original attention forward under its own name."""
    model = bert(is_decoder=True)
    ids = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad():
        want = model(ids).last_hidden_state
        llmkit.swap(model, kinds=["norm", "gelu", "fused"])
        out = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:7], **{cache_kwarg(type(model).forward): out.past_key_values}).last_hidden_state
    torch.testing.assert_close(step[:, -1], want[:, 6], **TOL)


def test_a_script_in_the_repo_root_loads_a_transformers_model_with_llmkit():
    """Python started in the repo root (a REPL, ``python -c``, a script beside the README) has
    the root first on sys.path; transformers' imports (HuggingFace ``kernels`` among them)
    must still find their own packages."""
    code = textwrap.dedent("""
        import llmkit, torch, transformers
        cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        llmkit.swap(model)
        print(tuple(model(torch.randint(0, 50, (1, 5))).logits.shape))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-"], input=code, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["(1,", "5,", "50)"]


def test_swapping_a_swapped_hf_model_says_so():
    model = gpt2()
    first = llmkit.swap(model)
    second = llmkit.swap(model)
    assert len(first) > 0 and first.already == 0
    assert len(second) == 0 and second.already > 0
    assert "already llmkit's" in str(second)


def test_gpt2_left_padded_batch_after_swap():
    model = gpt2()
    ids = torch.randint(2, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    llmkit.swap(model)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_swapped_hf_gpt2_and_llmkit_gpt_agree():
    model = gpt2()
    ours = llmkit.models.GPT.from_hf(model)
    llmkit.swap(model)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, **TOL)


# -- T5 -----------------------------------------------------------------------------------


def t5_train_step(model, ids, mask, dec):
    """One forward and backward of a T5 model: (logits, {parameter name: gradient})."""
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_t5_swap_relative_bias_forward_backward_and_generate():
    model = t5()
    ids, mask = _padded_batch(2, 8)
    dec = torch.randint(2, VOCAB, (2, 5))

    def run():
        return t5_train_step(model, ids, mask, dec)

    out0, g0 = run()
    tokens0 = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    final_weight = model.encoder.final_layer_norm.weight
    report = llmkit.swap(model)
    norms = [e for e in report.swapped if e.kind == "norm"]
    assert norms and all(e.before == "T5LayerNorm" for e in norms)
    assert type(model.encoder.final_layer_norm).__name__ == "LlmkitT5LayerNorm"
    assert model.encoder.final_layer_norm.weight is final_weight  # the same Parameter
    out1, g1 = run()
    torch.testing.assert_close(out1, out0, **TOL)
    rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert g1[rel].abs().sum() > 0  # the position bias is learned through llmkit's float mask
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **TOL)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), tokens0)
    llmkit.unswap(model)
    assert type(model.encoder.final_layer_norm).__name__ == "T5LayerNorm"
    assert torch.equal(run()[0], out0)
