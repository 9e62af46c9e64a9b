"""llmkit.swap of small random Llama, Mistral, Qwen2, Gemma and T5 (gated) models.

Each swapped model's logits agree with the unswapped model's (float32: within 1e-4; bfloat16:
by the tolerance rule against the float64 model, the unswapped bfloat16 model as the
baseline), its training gradients too, greedy ``generate`` gives the same tokens, the fused
ops really run (RMSNorm with the model's offset and casting order, add_rms_norm, SwiGLU /
GeGLU), and unswap restores bit-identical outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import llmkit
from llmkit.dispatch import DispatchPoint
from llmkit.testing import assert_close_to_reference
from test_hf import t5_train_step
from test_models import _widen_

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)
VOCAB = 97

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"hidden_act": "gelu_pytorch_tanh", "head_dim": 8}),
}
FUSED_OPS = {"llama": "swiglu", "mistral": "swiglu", "qwen2": "swiglu", "gemma": "geglu"}


def decoder(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg_name, cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=family == "gemma",
        **extra,
    )
    return _widen_(getattr(transformers, cls_name)(cfg), std=0.2).to(dtype).eval()


def t5_gated() -> torch.nn.Module:
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
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _widen_(transformers.T5ForConditionalGeneration(cfg), std=0.2).eval()


def _batch(b=2, s=11):
    ids = torch.randint(3, VOCAB, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as batched generation pads
    return ids, mask


@pytest.fixture
def ran(monkeypatch):
    """The dispatch points that ran (op.stage names), recorded while a test runs."""
    seen: list[str] = []
    original = DispatchPoint.__call__

    def spy(self, *a, **k):
        seen.append(self.qualname)
        return original(self, *a, **k)

    monkeypatch.setattr(DispatchPoint, "__call__", spy)
    return seen


def _train_step(model, ids, mask):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask).logits
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swapped_decoder_matches_forward_backward_and_greedy_generate(family, ran):
    model = decoder(family)
    ids, mask = _batch()
    out0, g0 = _train_step(model, ids, mask)
    with torch.no_grad():
        tokens0 = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)

    report = llmkit.swap(model)
    kinds = {(e.kind, e.before) for e in report.swapped}
    cap = family.capitalize() if family != "qwen2" else "Qwen2"
    assert {("norm", f"{cap}RMSNorm"), ("fused", f"{cap}MLP"), ("fused", f"{cap}DecoderLayer")} <= kinds, kinds
    assert ("attention", f"{cap}ForCausalLM") in kinds and not report.left

    ran.clear()
    out1, g1 = _train_step(model, ids, mask)
    torch.testing.assert_close(out1, out0, **TOL)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
    for point in (
        "rms_norm.forward",
        "add_rms_norm.forward",
        f"{FUSED_OPS[family]}.forward",
        "add_rms_norm.backward",
        f"{FUSED_OPS[family]}.backward",
        "rms_norm.backward",
    ):
        assert point in ran, f"{point} did not run: {sorted(set(ran))}"
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), tokens0)

    llmkit.unswap(model)
    assert type(model.model.norm).__name__ == f"{cap}RMSNorm"
    assert torch.equal(_train_step(model, ids, mask)[0], out0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swapped_bfloat16_decoder_is_as_close_to_float64_as_the_model(family):
    """In bfloat16 the fused ops round once where the model rounds twice; the swapped model's
    logits must meet the tolerance rule against the same model run in float64."""
    model = decoder(family, torch.bfloat16)
    ids, mask = _batch()
    truth = copy.deepcopy(model).double()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        want = truth(input_ids=ids, attention_mask=mask).logits
        llmkit.swap(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    assert_close_to_reference(got, want, base, name=f"{family} logits")


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_norm_weights_of_another_dtype_keep_the_models_dtypes(family):
    """A float32 norm weight in a bfloat16 model: Llama's product promotes to float32, Gemma's
    casts back to bfloat16; the swapped norm does what the model does."""
    model = decoder(family, torch.bfloat16)
    norm = model.model.norm
    norm.float()
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = norm(x)
        llmkit.swap(model)
        got = norm(x)
    assert got.dtype == want.dtype == (torch.float32 if family == "llama" else torch.bfloat16)
    torch.testing.assert_close(got, want, atol=0, rtol=2**-7)


def test_t5_gated_feed_forward_swap(ran):
    model = t5_gated()
    ids, mask = _batch(2, 8)
    dec = torch.randint(3, VOCAB, (2, 5))

    def run():
        return t5_train_step(model, ids, mask, dec)

    out0, g0 = run()
    with torch.no_grad():
        tokens0 = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    report = llmkit.swap(model)
    assert {e.before for e in report.swapped if e.kind == "fused"} == {"T5DenseGatedActDense"}
    assert {e.before for e in report.swapped if e.kind == "norm"} == {"T5LayerNorm"}
    ran.clear()
    out1, g1 = run()
    torch.testing.assert_close(out1, out0, **TOL)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **TOL)
    assert "geglu.forward" in ran and "geglu.backward" in ran and "rms_norm.forward" in ran
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), tokens0)
    llmkit.unswap(model)
    assert torch.equal(run()[0], out0)


def test_t5_half_norm_rounds_like_the_model():
    """T5LayerNorm rounds x_hat to its half weight's dtype before the product: bit for bit."""
    model = t5_gated().to(torch.bfloat16)
    norm = model.encoder.final_layer_norm
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16) * 4
    with torch.no_grad():
        want = norm(x)
        llmkit.swap(model, kinds="norm")
        got = norm(x)
    assert torch.equal(got, want)


def test_gated_mlp_with_an_unknown_activation_runs_as_written():
    model = decoder("llama")
    mlp = model.model.layers[0].mlp
    mlp.act_fn = torch.nn.Tanh()
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        want = mlp(x)
        llmkit.swap(model)
        assert type(mlp).__name__ == "LlmkitLlamaMLP"
        torch.testing.assert_close(mlp(x), want, **TOL)


def test_swapped_llama_pickles_and_deep_copies():
    model = decoder("llama")
    llmkit.swap(model)
    ids, mask = _batch()
    again = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(
            again(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )
    assert type(again.model.layers[0]).__name__ == "LlmkitLlamaDecoderLayer"
